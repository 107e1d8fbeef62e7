import math

import pytest
import torch

from course_lib import bench
from course_lib.benchmarks import cli, measure


def test_time_callable_warms_up_then_repeats():
    calls = []
    t = bench.time_callable(lambda: calls.append(1), warmup=2, repeats=5)
    assert len(calls) == 7 and len(t.times) == 5
    assert t.median == sorted(t.times)[2]
    assert t.per_second(10) == pytest.approx(10 / t.median)


def test_compare_alternates_the_two_callables():
    order = []
    c = bench.compare(lambda: order.append("a"), lambda: order.append("b"), warmup=1, repeats=3)
    assert order == ["a", "b"] * 4
    assert c.speedup == pytest.approx(c.b.median / c.a.median)


def test_compare_reports_the_ratio_of_medians_on_the_given_clock():
    now = [0.0]
    c = bench.compare(lambda: now.__setitem__(0, now[0] + 1), lambda: now.__setitem__(0, now[0] + 20),
                      warmup=0, repeats=3, clock=lambda: now[0])  # a takes 1 tick, b 20: no real time involved
    assert c.a.times == (1.0,) * 3 and c.b.times == (20.0,) * 3 and c.speedup == 20.0


def test_bad_repeat_counts():
    with pytest.raises(ValueError, match="repeats >= 1"):
        bench.time_callable(lambda: None, repeats=0)


def test_compare_many_runs_round_robin_on_the_given_clock():
    order = []
    ticks = iter(range(100))
    t = bench.compare_many({"a": lambda: order.append("a"), "b": lambda: order.append("b"),
                            "c": lambda: order.append("c")}, warmup=1, repeats=2, clock=lambda: next(ticks))
    assert order == ["a", "b", "c"] * 3
    assert list(t) == ["a", "b", "c"] and all(timing.times == (1, 1) for timing in t.values())


def test_compare_sizes_samples_after_the_warm_up_and_reports_time_per_call():
    calls = []
    ticks = iter([0.0, 0.01, 1.0, 1.001] + [float(t) for t in range(100, 200)])  # sizing: a 10 ms, b 1 ms
    t = bench.compare_many({"a": lambda: calls.append("a"), "b": lambda: calls.append("b")}, warmup=1, repeats=2,
                           clock=lambda: next(ticks), sample_seconds=0.05)
    # warm-up a b, sizing a b, then per repeat 5 calls of a and 50 of b, each sample 1 clock unit long
    assert calls == ["a", "b", "a", "b"] + (["a"] * 5 + ["b"] * 50) * 2
    assert t["a"].times == (1 / 5, 1 / 5) and t["b"].times == (1 / 50, 1 / 50)
    with pytest.raises(ValueError, match="sample_seconds > 0"):
        bench.compare_many({"a": lambda: None}, sample_seconds=0)


# ---------------------------------------------------------------- python -m course_lib.benchmarks kv|moe|mtp
# The benchmarks run at quick sizes; only their structure and exact invariants are checked, never time.

def _positive_numbers(rows, keys):
    for row in rows:
        assert set(keys) <= set(row)
        assert all(math.isfinite(row[k]) and row[k] > 0 for k in keys), row


def test_kv_benchmarks_quick():
    decode = measure.decode_speed(quick=True, repeats=1)
    assert [r["new_tokens"] for r in decode] == [8]
    _positive_numbers(decode, ["cached_tok_s", "uncached_tok_s", "cached_speedup"])
    assert decode[0]["cached_speedup"] == pytest.approx(decode[0]["cached_tok_s"] / decode[0]["uncached_tok_s"])
    mla = measure.mla_decode_speed(quick=True, repeats=1)  # also asserts absorbed == naive on its cache
    assert [r["cached_tokens"] for r in mla] == [64, 256]
    _positive_numbers(mla, ["absorbed_ms", "naive_ms", "mha_ms", "naive_over_absorbed", "mha_over_absorbed"])
    cfg = measure.DEEPSEEK_PROPORTIONS
    assert cfg.kv_lora_rank == 4 * cfg.qk_nope_head_dim and cfg.qk_rope_head_dim == cfg.qk_nope_head_dim // 2
    assert cfg.num_attention_heads >= 16


def test_cache_bytes_match_the_formulas():
    mha, mla = measure.cache_bytes()
    L = mha["layers"]
    assert mha["bytes_per_token"] == L * 2 * 128 * 4  # K and V, 4 heads x 32 wide, float32
    assert mla["bytes_per_token"] == L * (16 + 16) * 4  # c_kv (C = 16) and k_rope (Dr = 16)
    assert mla["relative_to_mha"] == 1 / 8 and mha["relative_to_mha"] == 1


def test_moe_benchmarks_quick():
    rows = measure.dispatch_speed(quick=True, repeats=1)  # also asserts the three dispatches agree
    assert [(r["experts"], r["top_k"], r["pass"]) for r in rows] == [
        (E, K, p) for E, K in measure.MOE_SHAPES for p in ("forward", "forward+backward")]
    _positive_numbers(rows, ["vectorized_tok_s", "token_loop_tok_s", "expert_loop_tok_s", "tokens"])
    for E, K in measure.MOE_SHAPES:  # the recorded imbalance is the routing's own, recomputed here
        torch.manual_seed(0)
        layer = measure.moe_layer(E, K)
        with torch.no_grad():
            idx, _ = layer.route(measure._batch(True, layer.config.hidden_size, "cpu"))
        load = torch.bincount(idx.flatten(), minlength=E).float()
        assert {r["load_max_over_mean"] for r in rows if r["experts"] == E} == {(load.max() / load.mean()).item()}
    layers = measure.moe_vs_dense(quick=True, repeats=1)
    _positive_numbers(layers, ["moe_vectorized_tok_s", "moe_expert_loop_tok_s", "dense_tok_s"])
    for r in layers:  # same active parameters but for the router (E x hidden)
        assert r["moe_active_params"] - r["dense_params"] == r["experts"] * 128


def test_cli_prints_ratios_and_floors(monkeypatch, capsys):
    """main() on canned rows: the printed ratios and the floor verdicts follow the numbers."""
    monkeypatch.setattr(measure, "decode_speed", lambda *a: [
        {"new_tokens": 128, "batch": 8, "cached_tok_s": 800.0, "uncached_tok_s": 100.0, "cached_speedup": 8.0}])
    monkeypatch.setattr(measure, "mla_decode_speed", lambda *a: [
        {"cached_tokens": 4096, "batch": 1, "absorbed_ms": 10.0, "naive_ms": 15.0, "mha_ms": 20.0,
         "naive_over_absorbed": 1.5, "mha_over_absorbed": 2.0}])
    assert cli.main(["kv", "--repeats", "2"]) == 1  # a floor missed: the command fails
    out = capsys.readouterr().out
    assert "cached/uncached   8.0x" in out and "naive/absorbed   1.5x" in out
    assert "floor, absorbed >= 2x faster than naive at 4096 cached tokens: NOT met, 1.5x at 4096" in out
    assert "floor, cached decoding >= 3x uncached at 128 new tokens: met, 8.0x" in out and "1 of 2 floor(s) missed" in out
    assert "MLA/MHA = 0.125" in out and "2 round-robin repeat(s)" in out
    row = {"experts": 8, "top_k": 2, "tokens": 1280, "pass": "forward", "load_max_over_mean": 1.1,
           "vectorized_tok_s": 600.0, "token_loop_tok_s": 100.0, "expert_loop_tok_s": 500.0, "padded_tok_s": 400.0}
    layer = {"experts": 8, "top_k": 2, "tokens": 1280, "pass": "forward", "moe_active_params": 10, "dense_params": 10,
             "moe_vectorized_tok_s": 60.0, "moe_expert_loop_tok_s": 40.0, "dense_tok_s": 100.0}
    monkeypatch.setattr(measure, "dispatch_speed", lambda *a: [row])
    monkeypatch.setattr(measure, "moe_vs_dense", lambda *a: [layer])
    assert cli.main(["moe", "--threads", "1"]) == 0
    out = capsys.readouterr().out
    assert "vectorized/token   6.0x" in out and "vectorized/expert 1.20x" in out and "padded       400" in out
    assert "0.60x dense" in out and "NOT met" not in out and out.count(": met in every row") == 2
    assert "1 thread(s), as asked" in out and "with 1 thread(s): met" in out
    monkeypatch.setattr(measure, "dispatch_speed", lambda *a: [{**row, "expert_loop_tok_s": 700.0}])
    assert cli.main(["moe"]) == 1
    assert "NOT met in some rows" in capsys.readouterr().out
    monkeypatch.setattr(measure, "dispatch_speed", lambda *a: [row])
    monkeypatch.setattr(measure, "moe_vs_dense", lambda *a: [{**layer, "moe_vectorized_tok_s": 45.0}])
    assert cli.main(["moe", "--threads", "1"]) == 1
    out = capsys.readouterr().out
    assert "the MoE layer (vectorized) >= 0.5x the dense FFN's tokens/s with 1 thread(s): NOT met in some rows" in out


def test_moe_cli_compares_layers_at_the_notebooks_threads_and_all_cores(monkeypatch, capsys):
    """Without --threads the MoE-vs-dense rows are measured at the notebooks' thread count and at torch's
    default, each with its own verdict, and torch's thread count is restored afterwards."""
    seen = []
    row = {"experts": 8, "top_k": 2, "tokens": 1280, "pass": "forward", "load_max_over_mean": 1.1,
           "vectorized_tok_s": 600.0, "token_loop_tok_s": 100.0, "expert_loop_tok_s": 500.0, "padded_tok_s": 400.0}

    def layers(*a):
        seen.append(torch.get_num_threads())
        ratio = 0.6 if torch.get_num_threads() == 1 else 0.4  # fewer threads slow the dense FFN more
        return [{"experts": 8, "top_k": 2, "tokens": 1280, "pass": "forward", "moe_active_params": 10,
                 "dense_params": 10, "moe_vectorized_tok_s": 100.0 * ratio, "moe_expert_loop_tok_s": 30.0,
                 "dense_tok_s": 100.0}]

    monkeypatch.setattr(measure, "dispatch_speed", lambda *a: [row])
    monkeypatch.setattr(measure, "moe_vs_dense", layers)
    monkeypatch.setattr(cli, "notebook_threads", lambda: 1)
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        assert cli.main(["moe"]) == 1
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)
    out = capsys.readouterr().out
    assert seen == [1, 2]
    assert "1 thread(s), the notebooks' setting" in out and "2 thread(s), torch's default" in out
    assert "with 1 thread(s): met in every row" in out and "with 2 thread(s): NOT met in some rows" in out


def test_mtp_benchmark_quick():
    rows = measure.speculative_speed(quick=True, repeats=1)  # also checks speculative == plain greedy
    assert [r["main_blocks"] for r in rows] == [2]
    _positive_numbers(rows, ["plain_tok_s", "speculative_tok_s", "speedup", "tokens_per_forward"])
    r = rows[0]
    assert r["speedup"] == pytest.approx(r["speculative_tok_s"] / r["plain_tok_s"])
    assert 1 < r["tokens_per_forward"] <= 2 and 0 < r["acceptance"] <= 1


def test_mtp_cli_prints_the_floor_at_notebook_09s_depth(monkeypatch, capsys):
    asked = []

    def rows(quick, repeats, device, clock, acceptance):
        asked.append(acceptance)
        return [{"main_blocks": L, "new_tokens": 64, "acceptance": acceptance, "tokens_per_forward": 1.8,
                 "plain_tok_s": 100.0, "speculative_tok_s": s, "speedup": s / 100} for L, s in ((3, 110.0), (6, 130.0))]

    monkeypatch.setattr(measure, "speculative_speed", rows)
    assert cli.main(["mtp", "--acceptance", "0.9"]) == 0
    out = capsys.readouterr().out
    assert asked == [0.9] and " 3 main blocks" in out and "1.10x" in out
    assert "floor, speculative >= 1.2x plain at notebook 09's depth (6 blocks): met, 1.30x" in out
    with pytest.raises(SystemExit):
        cli.main(["mtp", "--acceptance", "1.5"])
    assert "must be between 0 and 1" in capsys.readouterr().err


def test_a_quick_run_judges_no_floor(capsys):
    assert cli.main(["mtp", "--quick"]) == 0
    out = capsys.readouterr().out
    assert "not judged (quick run)" in out and "no floor judged" in out
