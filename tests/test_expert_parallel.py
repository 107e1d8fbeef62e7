"""Expert parallelism: the dispatch arithmetic, one process against W, failures that leave nothing running.

What is asserted:
- the dispatch plan sends each token once to each rank holding one of its experts (last rank included),
  with the right local expert ids and split sizes;
- W = 1, 2, 4 spawned gloo processes give the single-process DeepSeekMoE's output and the gradient of every
  parameter and of the input within 1e-6 (relative to the largest value, at least 1), also with node-limited
  routing, a rank whose experts no token picks and a rank with no input tokens;
- the bytes per token measured from the split sizes equal the formula computed from the routing;
- a training run on 2 processes has the single-process loss curve;
- a world size that does not divide the experts, a taken port and a dying rank give clear errors, and no
  child process is left afterwards.
"""

from __future__ import annotations

import multiprocessing
import os
import socket
import time

import pytest
import torch

from course_lib.config import ModelConfig
from course_lib.expert_parallel import (
    ExpertParallelMoE,
    bytes_per_token,
    check_layout,
    crash_demo,
    cross_group_bytes,
    deepseek_v3_ep,
    dispatch_plan,
    expected_remote_ranks,
    fit_latency_bandwidth,
    groups_reached,
    launch,
    parallel_forward_backward,
    row_bytes,
    run_local_experts,
    run_parallel,
    train_parallel,
    train_steps,
    traffic_matrix,
)
from course_lib.model import CourseModel
from course_lib.moe import DeepSeekMoE

try:
    import psutil
except ImportError:
    psutil = None

torch.set_num_threads(1)


def moe_config(**changes) -> ModelConfig:
    base = dict(hidden_size=32, num_attention_heads=4, ffn="moe", n_routed_experts=8, num_experts_per_tok=3,
                moe_intermediate_size=16, n_shared_experts=1, scoring_func="sigmoid")
    return ModelConfig(**{**base, **changes})


def reference(moe: DeepSeekMoE, x: torch.Tensor, grad_out: torch.Tensor):
    x = x.clone().requires_grad_(True)
    moe.zero_grad(set_to_none=True)
    y = moe(x)
    (y * grad_out).sum().backward()
    grads = {n: p.grad.clone() for n, p in moe.named_parameters() if p.grad is not None}
    grads["input"] = x.grad
    return y.detach(), grads


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / max(1.0, b.abs().max().item())).item()


def no_children_left() -> list:
    """Child processes still running, except multiprocessing's resource tracker (one per parent, by design)."""
    alive = multiprocessing.active_children()
    if psutil is not None:
        for p in psutil.Process(os.getpid()).children(recursive=True):
            try:
                if p.status() != psutil.STATUS_ZOMBIE and "resource_tracker" not in " ".join(p.cmdline()):
                    alive.append(p)
            except psutil.NoSuchProcess:
                pass
    else:  # Linux without psutil: children from /proc
        for stat in os.listdir("/proc") if os.path.isdir("/proc") else []:
            try:
                with open(f"/proc/{stat}/stat") as f:
                    fields = f.read().rsplit(")", 1)[1].split()
                with open(f"/proc/{stat}/cmdline") as f:
                    cmd = f.read()
            except (OSError, IndexError):
                continue
            if int(fields[1]) == os.getpid() and fields[0] != "Z" and "resource_tracker" not in cmd:
                alive.append(int(stat))
    return alive


# ----------------------------------------------------------------------------- the plan, in one process

def test_dispatch_plan_sends_each_token_once_per_rank_holding_its_experts():
    topk_idx = torch.tensor([[0, 7, 6], [2, 3, 1], [5, 4, 0]])  # 8 experts on 4 ranks: rank = id // 2
    plan = dispatch_plan(topk_idx, experts_per_rank=2, world_size=4)
    assert plan.send_splits == [3, 1, 1, 1]  # rank 3 (experts 6, 7) gets token 0: the last rank counts
    assert plan.dest.tolist() == [0, 0, 0, 1, 2, 3] and plan.token.tolist() == [0, 1, 2, 1, 2, 0]
    rows = {(int(t), int(d)): plan.local_expert[i].tolist() for i, (t, d) in enumerate(zip(plan.token, plan.dest))}
    assert rows == {(0, 0): [0, -1, -1], (1, 0): [-1, -1, 1], (2, 0): [-1, -1, 0], (1, 1): [0, 1, -1],
                    (2, 2): [1, 0, -1], (0, 3): [-1, 1, 0]}


def test_one_process_without_a_group_equals_deepseek_moe():
    torch.manual_seed(0)
    moe = DeepSeekMoE(moe_config())
    x, g = torch.randn(2, 5, 32), torch.randn(2, 5, 32)
    y, grads = reference(moe, x, g)
    ep = ExpertParallelMoE(moe)
    xe = x.clone().requires_grad_(True)
    (ep(xe) * g).sum().backward()
    assert rel_err(ep(x), y) < 1e-6
    assert rel_err(ep.gate.weight.grad, grads["gate.weight"]) < 1e-6  # gradients reach the router through the gates
    assert rel_err(xe.grad, grads["input"]) < 1e-6


def test_local_experts_apply_their_gate_weights():
    torch.manual_seed(0)
    moe = DeepSeekMoE(moe_config())
    rows = torch.randn(3, 32)
    gates = torch.tensor([[0.5, 0.2, 0.0], [0.0, 1.5, 0.3], [0.1, 0.0, 0.0]])
    local = torch.tensor([[0, 1, -1], [-1, 1, 0], [1, -1, -1]])
    out = run_local_experts(moe.experts[:2], rows, gates, local)
    want = torch.stack([0.5 * moe.experts[0](rows[0]) + 0.2 * moe.experts[1](rows[0]),
                        1.5 * moe.experts[1](rows[1]) + 0.3 * moe.experts[0](rows[1]),
                        0.1 * moe.experts[1](rows[2])])
    assert rel_err(out, want) < 1e-6


def test_layout_errors_say_how_to_fix_them():
    with pytest.raises(ValueError, match=r"16 routed experts cannot be split evenly over 3 ranks.*\[1, 2, 4, 8, 16\]"):
        check_layout(16, 3)
    with pytest.raises(ValueError, match="n_group=4 router groups do not map onto 6 ranks"):
        check_layout(24, 6, n_group=4)
    assert check_layout(256, 64, n_group=8) == 4  # DeepSeek-V3: 4 experts per GPU, 8 GPUs per node group
    with pytest.raises(ValueError, match="cannot be split evenly over 3 ranks"):
        run_parallel(DeepSeekMoE(moe_config()), torch.randn(2, 2, 32), world_size=3)  # before any process starts


def test_expected_remote_ranks_matches_enumeration():
    import itertools
    E, K, W = 8, 3, 4
    combos = list(itertools.combinations(range(E), K))
    mean = sum(len({e // (E // W) for e in c} - {0}) for c in combos) / len(combos)
    assert abs(expected_remote_ranks(E, K, W) - mean) < 1e-12


def test_cost_model_fit_and_deepseek_v3_numbers():
    sizes = [1e3, 1e4, 1e5, 1e6]
    alpha, beta = fit_latency_bandwidth(sizes, [2e-5 + s / 3e9 for s in sizes])
    assert abs(alpha - 2e-5) < 1e-9 and abs(beta / 3e9 - 1) < 1e-6
    v3 = deepseek_v3_ep()
    assert v3["node_limited"]["remote_nodes"] <= 4 < v3["unrestricted"]["remote_nodes"]
    assert abs(v3["unrestricted"]["remote_nodes"] - v3["uniform_remote_nodes_formula"]) < 0.1
    assert 0.15 < v3["ib_cut"] < 0.35 and v3["experts_per_node_free"] == pytest.approx(3.2)


# ----------------------------------------------------------------------------- W processes

def remote_rows_by_hand(moe: DeepSeekMoE, x: torch.Tensor, world_size: int) -> int:
    """Rows that leave their rank, from the single-process routing and Python sets."""
    per_rank = moe.config.n_routed_experts // world_size
    rows = 0
    for rank, chunk in enumerate(x.tensor_split(world_size)):
        if chunk.numel():
            idx, _ = moe.route(chunk)
            rows += sum(len({int(e) // per_rank for e in token} - {rank}) for token in idx)
    return rows


@pytest.mark.parametrize("world_size", [1, 2])
def test_parallel_layer_equals_one_process(world_size):
    torch.manual_seed(world_size)
    moe = DeepSeekMoE(moe_config())
    x, g = torch.randn(4, 6, 32), torch.randn(4, 6, 32)
    y, grads = reference(moe, x, g)
    res = parallel_forward_backward(moe, x, world_size, g)
    assert rel_err(res.output, y) < 1e-6
    assert set(res.grads) == set(grads)
    for name, grad in grads.items():
        assert rel_err(res.grads[name], grad) < 1e-6, name
    d, c = row_bytes(32, 3)
    measured = sum(res.send_splits[i][j] for i in range(world_size) for j in range(world_size) if i != j) * (d + c)
    assert measured / x[..., 0].numel() == bytes_per_token(remote_rows_by_hand(moe, x, world_size), 24, 32, 3)
    assert sum(res.rank_load) == 24 * 3  # every token-slot computed exactly once
    assert not no_children_left()


def test_four_ranks_node_limited_with_an_idle_rank_and_a_rank_without_tokens():
    torch.manual_seed(4)
    moe = DeepSeekMoE(moe_config(n_routed_experts=16, num_experts_per_tok=4, n_group=4, topk_group=2))
    with torch.no_grad():
        moe.gate.e_score_correction_bias[12:] = -10.0  # rank 3's experts: never picked, still in every collective
    x, g = torch.randn(3, 8, 32), torch.randn(3, 8, 32)  # 3 sequences on 4 ranks: rank 3 has no tokens either
    y, grads = reference(moe, x, g)
    res = parallel_forward_backward(moe, x, 4, g)
    assert res.tokens == [8, 8, 8, 0] and res.rank_load[3] == 0
    assert rel_err(res.output, y) < 1e-6
    assert set(res.grads) == set(grads) and not any(k.startswith("experts.12.") for k in res.grads)
    for name, grad in grads.items():
        assert rel_err(res.grads[name], grad) < 1e-6, name
    idx, _ = moe.route(x)
    assert int(groups_reached(idx, 4).max()) <= 2  # node-limited: at most M = 2 groups (here: ranks) per token
    assert sum(map(sum, res.send_splits)) <= 2 * 24
    d, c = row_bytes(32, 4)
    measured = sum(res.send_splits[i][j] for i in range(4) for j in range(4) if i != j) * (d + c)
    assert measured / 24 == bytes_per_token(remote_rows_by_hand(moe, x, 4), 24, 32, 4)
    assert not no_children_left()


def test_training_on_two_processes_follows_the_one_process_loss_curve():
    config = ModelConfig(vocab_size=16, hidden_size=32, num_attention_heads=4, num_hidden_layers=2,
                         intermediate_size=64, ffn="moe", n_routed_experts=4, num_experts_per_tok=2,
                         moe_intermediate_size=16, n_shared_experts=1, scoring_func="sigmoid",
                         first_k_dense_replace=0, max_position_embeddings=32)
    torch.manual_seed(0)
    model = CourseModel(config)
    tokens = torch.randint(0, 16, (16, 12))
    mask = torch.rand(16, 12) < 0.8
    run = train_parallel(model, tokens, mask, world_size=2, steps=6, batch_size=8, gamma=1e-2)
    single = train_steps(model, tokens, mask, steps=6, batch_size=8, lr=3e-3, gamma=1e-2)
    assert len(run["losses"]) == 6 and single[-1] < single[0]
    assert max(abs(a - b) for a, b in zip(run["losses"], single)) < 1e-5, (run["losses"], single)
    assert not no_children_left()


# ----------------------------------------------------------------------------- failures

def test_a_dying_rank_is_named_and_nothing_is_left_running():
    t0 = time.monotonic()
    with pytest.raises(RuntimeError, match=r"rank 1 of 2 died \(exit code 3\).*no process is left running"):
        crash_demo(world_size=2, dying_rank=1)
    assert time.monotonic() - t0 < 40
    assert not no_children_left()


def test_a_taken_port_is_refused_before_anything_starts():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        with pytest.raises(RuntimeError, match=f"port {port} on 127.0.0.1 is taken.*port=None"):
            launch(print, 2, port=port)
    assert not no_children_left()


def test_traffic_matrix_counts_dispatch_out_and_combine_answers():
    d, c = row_bytes(8, 2)
    m = traffic_matrix([[5, 2, 0], [1, 4, 3], [0, 0, 6]], 8, 2)
    assert m[0] == [0, 2 * d + 1 * c, 0]  # rank 0 -> 1: 2 dispatch rows out, answers to rank 1's 1 row
    assert m[1] == [1 * d + 2 * c, 0, 3 * d]
    assert m[2] == [0, 3 * c, 0]  # rank 2 sent nothing itself: it only answers rank 1's 3 rows
    assert cross_group_bytes(m, 1) == sum(map(sum, m)) and cross_group_bytes(m, 3) == 0


@pytest.mark.slow
def test_benchmark_ep_quick_prints_its_floors(capsys):
    from course_lib.benchmarks.cli import main
    status = main(["ep", "--quick"])
    out = capsys.readouterr().out
    assert "floor, bytes per token from the split sizes equal the formula: met" in out
    assert "floor, outputs and gradients within 1e-6 of one process: met" in out
    assert "not judged (quick run)" in out  # the waiting-time floor needs full sizes
    assert status == 0
    assert not no_children_left()
