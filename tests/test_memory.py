"""Tests for course_lib.memory: KV-cache arithmetic against hand-computed values and the V2 paper's numbers.

What is asserted:
- per-layer / per-token element counts for MHA, GQA, MQA, MLA equal hand-computed products;
- [V2] Table 1: V2's MLA caches 576 elements per layer = GQA with 2.25 groups; the 4 rows at V2 sizes;
- [V2] abstract: "reduces the KV cache by 93.3%" vs DeepSeek 67B holds only with V2's 6-bit cache vs a
  bf16 67B; equal precision gives 82.2% (DEEPSEEK_REFERENCE.md §1.9);
- [V2] Table 9: V2-Lite-sized MLA vs MHA counts (15.6K vs 110.6K, "14%");
- fractional element sizes, linear scaling in tokens and batch, and ValueErrors that say how to fix;
- the explorer's `with_attention` / `explore`: one model under each kind, totals against a GPU.
"""

import dataclasses

import pytest

from course_lib.memory import (
    CONTEXT_LENGTHS,
    ELEMENT_BYTES,
    GPU_MEMORY_GIB,
    PRESETS,
    CacheSpec,
    attention_label,
    bytes_per_token,
    cache_bytes,
    compare,
    element_bytes,
    elements_per_token,
    elements_per_token_per_layer,
    equivalent_gqa_groups,
    explore,
    kv_cache_reduction,
    mha_counterpart,
    table1,
    with_attention,
)

V2, V3, LITE, D67B = PRESETS["deepseek-v2"], PRESETS["deepseek-v3"], PRESETS["deepseek-v2-lite"], PRESETS["deepseek-llm-67b"]


def tiny(attention="gqa", kv=2, **kw):
    args = dict(name="tiny", attention=attention, num_hidden_layers=3, num_attention_heads=4,
                num_key_value_heads=kv, head_dim=8)
    return CacheSpec(**{**args, **kw})


# --- formulas ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("attention,kv,per_layer", [
    ("mha", 4, 2 * 4 * 8),   # 2 n_h d_h
    ("gqa", 2, 2 * 2 * 8),   # 2 n_g d_h
    ("mqa", 1, 2 * 8),       # 2 d_h
])
def test_per_token_elements_dense_kinds(attention, kv, per_layer):
    spec = tiny(attention, kv)
    assert elements_per_token_per_layer(spec) == per_layer
    assert elements_per_token(spec) == per_layer * 3
    assert equivalent_gqa_groups(spec) == kv


def test_per_token_elements_mla_is_latent_plus_rope_key():
    spec = tiny("mla", 4, kv_lora_rank=20, qk_rope_head_dim=6)
    assert elements_per_token_per_layer(spec) == 26  # d_c + d_h^R, independent of n_h
    assert elements_per_token(dataclasses.replace(spec, num_attention_heads=64, num_key_value_heads=64)) == 26 * 3


def test_real_presets_hand_computed():
    assert elements_per_token_per_layer(V2) == 512 + 64 == 576
    assert elements_per_token(V2) == 576 * 60 == 34_560
    assert elements_per_token(V3) == 576 * 61 == 35_136
    assert elements_per_token(LITE) == 576 * 27 == 15_552
    assert elements_per_token(D67B) == 2 * 8 * 128 * 95 == 194_560
    assert elements_per_token(PRESETS["llama-3-8b"]) == 2 * 8 * 128 * 32 == 65_536
    assert elements_per_token(PRESETS["llama-3-70b"]) == 2 * 8 * 128 * 80 == 163_840
    # bf16: Llama-3-8B keeps 128 KiB per token, the 67B 380 KiB
    assert bytes_per_token(PRESETS["llama-3-8b"], "bf16") == 131_072
    assert bytes_per_token(D67B, "bf16") == 389_120


def test_every_preset_cites_a_source():
    for name, spec in PRESETS.items():
        assert spec.name == name
        assert spec.source.strip(), f"{name} has no source"


# --- [V2] Table 1 -----------------------------------------------------------------------------------

def test_v2_mla_equals_gqa_with_2_25_groups():
    d_h = V2.head_dim
    assert V2.kv_lora_rank == 4 * d_h and V2.qk_rope_head_dim == d_h // 2  # the caption's d_c = 4 d_h, d_h^R = d_h/2
    assert elements_per_token_per_layer(V2) == 9 * d_h // 2
    assert equivalent_gqa_groups(V2) == 2.25
    assert equivalent_gqa_groups(V3) == 2.25
    gqa = CacheSpec("gqa-2.25?", "gqa", 60, 128, 2, 128)
    assert elements_per_token(gqa) < elements_per_token(V2) < elements_per_token(dataclasses.replace(gqa, num_key_value_heads=4))


def test_table1_rows_at_v2_sizes():
    rows = {r["attention"]: r for r in table1(V2, num_groups=8)}
    assert rows["MHA"]["elements_per_token"] == 2 * 128 * 128 * 60 == 1_966_080
    assert rows["GQA (n_g=8)"]["elements_per_token"] == 2 * 8 * 128 * 60 == 122_880
    assert rows["MQA"]["elements_per_token"] == 2 * 128 * 60 == 15_360
    assert rows["MLA"]["elements_per_token"] == 34_560
    assert [r["equivalent_gqa_groups"] for r in rows.values()] == [128, 8, 1, 2.25]
    assert elements_per_token_per_layer(mha_counterpart(V2)) / elements_per_token_per_layer(V2) == pytest.approx(56.89, abs=0.01)


def test_table9_small_moe_mla_vs_mha():
    # [V2] Table 9: small MoE 15.6K (MLA) vs 110.6K (MHA) elements per token; text: "14%".
    mla, mha = elements_per_token(LITE), elements_per_token(mha_counterpart(LITE))
    assert (mla, mha) == (15_552, 110_592)
    assert round(mla / 1000, 1) == 15.6 and round(mha / 1000, 1) == 110.6
    assert round(100 * mla / mha) == 14
    assert round(elements_per_token(V2) / 1000, 1) == 34.6  # the large MLA column


# --- the 93.3% headline ([V2] abstract, §3.2.3) -------------------------------------------------------

def test_headline_93_3_needs_6bit_cache():
    r = kv_cache_reduction(D67B, V2, "bf16", "6bit")
    assert bytes_per_token(V2, "6bit") == 25_920
    assert round(100 * r, 1) == 93.3
    assert 100 * r == pytest.approx(93.34, abs=0.01)


def test_same_precision_reduction_is_82_2():
    for dtype in ("bf16", "fp8", 0.75):  # equal element sizes cancel: it is the element ratio
        r = kv_cache_reduction(D67B, V2, dtype, dtype)
        assert round(100 * r, 1) == 82.2
        assert r == pytest.approx(1 - 34_560 / 194_560)
    assert kv_cache_reduction(V2, V2) == 0.0
    assert kv_cache_reduction(V2, D67B) < 0  # growing the cache is a negative reduction


def test_compare_table_reproduces_headline():
    rows = compare([D67B, V2], num_tokens=1000, batch_size=2,
                   elem_bytes={"deepseek-llm-67b": "bf16", "deepseek-v2": "6bit"}, baseline="deepseek-llm-67b")
    base, v2 = rows
    assert base["reduction_vs_baseline"] == 0.0
    assert round(100 * v2["reduction_vs_baseline"], 1) == 93.3
    assert v2["kib_per_token"] == pytest.approx(25_920 / 1024)
    assert v2["cache_gib"] == pytest.approx(25_920 * 1000 * 2 / 1024**3)
    assert v2["equivalent_gqa_groups"] == 2.25 and base["equivalent_gqa_groups"] == 8
    assert {r["name"] for r in compare()} == set(PRESETS)
    assert all(r["reduction_vs_baseline"] is None for r in compare())


# --- bytes, dtypes, scaling ---------------------------------------------------------------------------

def test_named_and_fractional_element_sizes():
    assert ELEMENT_BYTES["fp32"] == 4 and ELEMENT_BYTES["bf16"] == ELEMENT_BYTES["fp16"] == 2
    assert ELEMENT_BYTES["fp8"] == 1 and ELEMENT_BYTES["6bit"] == 0.75
    assert element_bytes(0.75) == element_bytes("6bit")
    spec = tiny("mqa", 1)  # 48 elements per token
    assert bytes_per_token(spec, "fp32") == 192
    assert bytes_per_token(spec, 0.75) == 36.0
    assert bytes_per_token(spec, 0.5) == 24.0
    assert cache_bytes(tiny("mqa", 1, head_dim=1, num_hidden_layers=1), num_tokens=3, elem_bytes=0.75) == 4.5  # not rounded


@pytest.mark.parametrize("spec", [D67B, V2, PRESETS["llama-3-8b"]], ids=lambda s: s.name)
def test_cache_bytes_linear_in_tokens_and_batch(spec):
    one = cache_bytes(spec, 1, 1, "bf16")
    assert one == bytes_per_token(spec, "bf16")
    assert cache_bytes(spec, 0, 4) == 0
    assert cache_bytes(spec, 4096, 1) == 4096 * one
    assert cache_bytes(spec, 4096, 8) == 8 * cache_bytes(spec, 4096, 1)
    assert cache_bytes(spec, 300, 5, "fp8") == 300 * 5 * elements_per_token(spec)


def test_v3_full_context_size():
    # 128K tokens of V3 in bf16: 35,136 * 2 * 131,072 bytes = 8.578125 GiB
    assert cache_bytes(V3, 128 * 1024, 1, "bf16") / 1024**3 == pytest.approx(8.578125)


# --- validation ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("kw,match", [
    (dict(attention="flash"), r"attention='flash' is not known.*Use one of"),
    (dict(num_hidden_layers=0), r"num_hidden_layers=0 must be a positive integer"),
    (dict(head_dim=-8), r"head_dim=-8 must be a positive integer"),
    (dict(head_dim=8.0), r"head_dim=8.0 must be a positive integer"),
    (dict(kv=3), r"num_key_value_heads=3 must divide num_attention_heads=4.*\[1, 2, 4\]"),
    (dict(kv=5), r"num_key_value_heads=5 must divide"),
    (dict(attention="mha", kv=2), r"attention='mha' needs num_key_value_heads=4, got 2.*attention='gqa'"),
    (dict(attention="mqa", kv=2), r"attention='mqa' needs num_key_value_heads=1"),
    (dict(kv_lora_rank=512), r"only apply to MLA.*attention='mla'"),
    (dict(attention="mla", kv_lora_rank=0), r"kv_lora_rank=0 must be positive for MLA"),
    (dict(attention="mla", kv_lora_rank=16, qk_rope_head_dim=-1), r"qk_rope_head_dim=-1 is negative"),
])
def test_bad_specs_raise_helpful_errors(kw, match):
    with pytest.raises(ValueError, match=match):
        tiny(**kw)


def test_replace_revalidates_and_spec_is_frozen():
    with pytest.raises(ValueError, match="needs num_key_value_heads=1"):
        dataclasses.replace(PRESETS["llama-3-8b"], attention="mqa")
    with pytest.raises(dataclasses.FrozenInstanceError):
        V2.num_hidden_layers = 1


@pytest.mark.parametrize("bad,match", [
    ("int3", r"'int3' is not known.*bf16"), (0, "must be a positive number"), (-2, "must be a positive"),
    (True, "must be a positive"),
])
def test_bad_element_sizes(bad, match):
    with pytest.raises(ValueError, match=match):
        bytes_per_token(V2, bad)


def test_bad_cache_arguments():
    with pytest.raises(ValueError, match=r"num_tokens=-1 must be a non-negative integer"):
        cache_bytes(V2, -1)
    with pytest.raises(ValueError, match=r"batch_size=0 must be a positive integer"):
        cache_bytes(V2, 10, 0)
    with pytest.raises(ValueError, match=r"table1 needs an MLA spec.*deepseek-v2"):
        table1(D67B)
    with pytest.raises(ValueError, match=r"baseline='gpt-4' is not among the compared specs"):
        compare(baseline="gpt-4")


# --- the cache-size explorer's pure function ----------------------------------------------------------
# What is asserted: `with_attention` keeps n_h, d_h, l and applies V2's proportions to a new MLA;
# `explore` gives one row per kind with bytes, totals, GPU share and fit that match the formulas above,
# curves linear in context length, and the selected row follows `attention`.


def test_with_attention_keeps_the_model_and_uses_v2_proportions_for_mla():
    llama = PRESETS["llama-3-8b"]
    assert with_attention(llama, "gqa") is llama  # already GQA: the model itself
    mla = with_attention(llama, "mla")
    assert (mla.kv_lora_rank, mla.qk_rope_head_dim) == (4 * 128, 128 // 2)
    assert elements_per_token(mla) == 576 * 32 and equivalent_gqa_groups(mla) == 2.25
    assert with_attention(V3, "mla") is V3  # its own d_c and d_h^R, not derived ones
    assert elements_per_token(with_attention(V3, "mha")) == elements_per_token(mha_counterpart(V3))
    assert elements_per_token(with_attention(V3, "gqa", num_groups=16)) == 2 * 16 * 128 * 61
    assert elements_per_token(with_attention(V3, "mqa")) == 2 * 128 * 61
    assert [attention_label(with_attention(V3, k)) for k in ("mha", "gqa", "mqa", "mla")] == \
        ["MHA", "GQA (n_g=8)", "MQA", "MLA (d_c=512)"]
    with pytest.raises(ValueError, match=r"attention='sparse' is not known"):
        with_attention(V3, "sparse")
    with pytest.raises(ValueError, match=r"num_key_value_heads=3 must divide"):
        with_attention(LITE, "gqa", num_groups=3)


def test_explore_v3_at_128k_on_an_80_gib_gpu():
    out = explore(V3, num_tokens=128 * 1024, batch_size=1, elem_bytes="bf16", gpu_gib=80)
    rows = {r["attention"]: r for r in out["rows"]}
    assert list(rows) == ["mha", "gqa", "mqa", "mla"] and out["selected"] is rows["mla"]  # V3's own kind
    assert rows["mla"]["cache_gib"] == pytest.approx(8.578125)  # as test_v3_full_context_size
    assert rows["mha"]["cache_gib"] == pytest.approx(2 * 128 * 128 * 61 * 2 * 128 * 1024 / 1024**3) == 488
    assert rows["mha"]["fits"] is False and rows["mla"]["fits"] is True
    assert rows["mha"]["gpu_fraction"] == pytest.approx(488 / 80)
    assert rows["mla"]["max_tokens_in_gpu"] == 80 * 1024**3 // (35_136 * 2)
    assert rows["mla"]["reduction_vs_mha"] == pytest.approx(1 - 576 / 32_768)
    assert rows["mha"]["reduction_vs_mha"] == 0
    assert rows["gqa"]["bytes_per_token"] == 2 * 8 * 128 * 61 * 2


def test_explore_totals_scale_with_batch_dtype_and_context():
    base = explore(D67B, "gqa", num_tokens=4096, batch_size=1, elem_bytes="bf16")
    big = explore(D67B, "gqa", num_tokens=8192, batch_size=4, elem_bytes="6bit")
    assert big["selected"]["cache_gib"] == pytest.approx(base["selected"]["cache_gib"] * 2 * 4 * 0.75 / 2)
    assert big["selected"]["bytes_per_token"] == 194_560 * 0.75 and big["element_bytes"] == 0.75
    assert explore(D67B, "mla")["selected"]["label"] == "MLA (d_c=512)"
    curve = base["curves"]["gqa"]
    assert base["context_lengths"] == list(CONTEXT_LENGTHS) and CONTEXT_LENGTHS[0] == 1024 and CONTEXT_LENGTHS[-1] == 2**20
    assert curve[3] == pytest.approx(cache_bytes(D67B, 8192) / 1024**3)
    assert all(b == pytest.approx(2 * a) for a, b in zip(curve, curve[1:]))  # linear: doubling context doubles it
    assert all(0 < v < 1024 for v in GPU_MEMORY_GIB.values())
    with pytest.raises(ValueError, match=r"gpu_gib=0 must be positive"):
        explore(V3, gpu_gib=0)
    with pytest.raises(ValueError, match=r"batch_size=0 must be a positive integer"):
        explore(V3, batch_size=0)
