"""What the spawned ranks run, and the one-call helpers that launch them (notebook 10, tests, benchmarks).

- `parallel_forward_backward` / `run_parallel`: one MoE layer sharded over W processes, each rank with its
  share of the batch; outputs, every parameter's gradient and the split sizes come back to the caller.
- `straggler_steps`: forward steps with skewed routing, with or without the auxiliary-loss-free bias, timing
  each rank's experts and the step (the step waits for the busiest rank).
- `train_parallel` / `train_steps`: the same training loop on one process or on W (data split over ranks for
  the replicated parts, experts sharded), so their losses can be compared step by step.
- `alltoall_times`: the all-to-all's time against its size, for the cost model.

Gradients of replicated parameters (router, shared experts, attention) are summed over ranks with
`all_reduce`; an expert's gradient arrives whole on its own rank through the backward all-to-alls.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from ..config import ModelConfig
from ..model import CourseModel
from ..moe import DeepSeekMoE
from ..profiles import peak_memory_mb
from .processes import RankContext, launch
from .layer import ExpertParallelMoE
from .sharding import check_layout


def _is_expert(name: str) -> bool:
    return name.startswith("experts.") or ".experts." in name


def sum_replicated_grads(model: nn.Module) -> None:
    """all_reduce(SUM) the gradient of every parameter that each rank holds a copy of (not the routed experts)."""
    if not dist.is_initialized():
        return
    for name, p in model.named_parameters():
        if not _is_expert(name):
            if p.grad is None:
                p.grad = torch.zeros_like(p)
            dist.all_reduce(p.grad)


def global_load(moe: DeepSeekMoE) -> torch.Tensor:
    """Token-slots per expert (E,) over every rank's tokens (the batch's load, [V3] §2.1.2)."""
    load = moe.last_load.clone()
    if dist.is_initialized():
        dist.all_reduce(load)
    return load


@torch.no_grad()
def balance_bias(moe: DeepSeekMoE, gamma: float) -> None:
    """The auxiliary-loss-free update b_i += γ·sign(mean(c) − c_i) with the whole batch's load c ([V3] §2.1.2,
    as `balancing.update_bias`): every rank applies the same step, so the replicated router stays identical."""
    load = global_load(moe).float()
    moe.gate.e_score_correction_bias += gamma * torch.sign(load.mean() - load)


# ----------------------------------------------------------------------------- one layer, forward and backward

@dataclass
class ParallelResult:
    output: torch.Tensor  # (B, T, hidden) as one process would compute it
    grads: dict  # {parameter name in the single-process layer: gradient}, every parameter
    send_splits: list  # (W, W) dispatch rows rank i sent to rank j
    tokens: list  # (W,) tokens per rank
    rank_load: list  # (W,) expert slots each rank computed
    peak_mb: list  # (W,) each process's peak resident memory


def _forward_backward_job(ctx: RankContext, config: ModelConfig, state: dict, x: torch.Tensor,
                          grad_out: torch.Tensor) -> dict:
    moe = DeepSeekMoE(config)
    moe.load_state_dict(state)
    layer = ExpertParallelMoE(moe)
    x_r = x.tensor_split(ctx.world_size)[ctx.rank].clone().requires_grad_(True)  # (B_r, T, hidden)
    y = layer(x_r)
    (y * grad_out.tensor_split(ctx.world_size)[ctx.rank]).sum().backward()
    sum_replicated_grads(layer)
    grads = {}
    for name, p in layer.named_parameters():
        if _is_expert(name) and p.grad is None:
            continue  # an expert no token chose: no gradient, as in one process
        if _is_expert(name):
            local, rest = name.split(".", 2)[1:]
            name = f"experts.{layer.global_expert(int(local))}.{rest}"
        if _is_expert(name) or ctx.rank == 0:
            grads[name] = p.grad
    return {"output": y.detach(), "grads": grads, "x_grad": x_r.grad, "send_splits": layer.last_send_splits,
            "tokens": x_r.shape[0] * x_r.shape[1], "rank_load": layer.last_rank_load, "peak_mb": peak_memory_mb()}


def parallel_forward_backward(moe: DeepSeekMoE, x: torch.Tensor, world_size: int, grad_out: torch.Tensor | None = None,
                              **launch_kw) -> ParallelResult:
    """Shard `moe`'s routed experts over `world_size` processes, split x (B, T, hidden) over them by sequence,
    run forward and backward of Σ y·grad_out (default: all ones), and gather everything back."""
    check_layout(moe.config.n_routed_experts, world_size, moe.config.n_group)  # fail here, not in W processes
    grad_out = torch.ones_like(x) if grad_out is None else grad_out
    state = {k: v.detach().cpu() for k, v in moe.state_dict().items()}
    ranks = launch(_forward_backward_job, world_size, moe.config, state, x.detach().cpu(), grad_out.cpu(), **launch_kw)
    grads = {k: v for r in ranks for k, v in r["grads"].items()}
    grads["input"] = torch.cat([r["x_grad"] for r in ranks])
    return ParallelResult(torch.cat([r["output"] for r in ranks]), grads, [r["send_splits"] for r in ranks],
                          [r["tokens"] for r in ranks], [r["rank_load"] for r in ranks], [r["peak_mb"] for r in ranks])


def run_parallel(moe: DeepSeekMoE, x: torch.Tensor, world_size: int, **launch_kw) -> torch.Tensor:
    """`moe(x)` computed by `world_size` processes with the experts sharded over them: (B, T, hidden)."""
    return parallel_forward_backward(moe, x, world_size, **launch_kw).output


# ----------------------------------------------------------------------------- stragglers

def _straggler_job(ctx: RankContext, config: ModelConfig, state: dict, tokens: int, steps: int, gamma: float,
                   skew: torch.Tensor, seed: int) -> list[dict]:
    moe = DeepSeekMoE(config)
    moe.load_state_dict(state)
    layer = ExpertParallelMoE(moe)
    g = torch.Generator().manual_seed(seed * 1000 + ctx.rank)
    rows = []
    with torch.no_grad():
        for step in range(steps):
            x = torch.randn(1, tokens, config.hidden_size, generator=g) + skew  # (1, N, hidden)
            dist.barrier()
            t0 = time.perf_counter()
            layer(x)
            seconds = time.perf_counter() - t0
            splits = torch.tensor(layer.last_send_splits)  # (W,)
            everyone = [torch.empty_like(splits) for _ in range(ctx.world_size)]
            dist.all_gather(everyone, splits)
            if ctx.rank == 0:
                ctx.post((step, torch.stack(everyone).tolist()))
            if gamma:
                balance_bias(layer, gamma)
            rows.append({"step": step, "load": layer.last_rank_load, "expert_s": layer.last_expert_seconds,
                         "expert_cpu_s": layer.last_expert_cpu_seconds,
                         "comm_s": layer.last_comm_seconds, "step_s": seconds,
                         "send_splits": layer.last_send_splits, "peak_mb": peak_memory_mb()})
    return rows


def straggler_steps(moe: DeepSeekMoE, world_size: int, tokens: int, steps: int, gamma: float = 0.0,
                    skew: torch.Tensor | None = None, seed: int = 0, **launch_kw) -> list[list[dict]]:
    """`steps` forward passes of `tokens` tokens per rank, inputs N(skew, 1); rows[rank][step] of that rank's
    expert load and times. With gamma > 0 the router bias is balanced after every step."""
    check_layout(moe.config.n_routed_experts, world_size, moe.config.n_group)
    skew = torch.zeros(moe.config.hidden_size) if skew is None else skew
    state = {k: v.detach().cpu() for k, v in moe.state_dict().items()}
    return launch(_straggler_job, world_size, moe.config, state, tokens, steps, gamma, skew, seed, **launch_kw)


# ----------------------------------------------------------------------------- training

def batch_rows(step: int, n: int, batch_size: int, seed: int) -> torch.Tensor:
    """The step's batch: the same row indices on every rank and in the single-process run."""
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed * 100_003 + step))[:batch_size]


def train_steps(model: CourseModel, tokens: torch.Tensor, mask: torch.Tensor, steps: int, batch_size: int,
                lr: float, gamma: float, seed: int = 0, rank: int = 0, world_size: int = 1) -> list[float]:
    """A plain AdamW loop on next-token loss; on W ranks each takes its slice of every batch and the loss is
    scaled by the whole batch's count of learned tokens, so the summed gradients equal one process's."""
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    moes = [m for m in model.modules() if isinstance(m, DeepSeekMoE)]
    losses = []
    for step in range(steps):
        idx = batch_rows(step, tokens.shape[0], batch_size, seed)
        tok, m = tokens[idx], mask[idx]  # (B, L)
        total = m[:, :-1].sum()
        tok, m = tok.tensor_split(world_size)[rank], m.tensor_split(world_size)[rank]  # (B_r, L)
        logits = model(tok[:, :-1])  # (B_r, L-1, V)
        learned = m[:, :-1]  # (B_r, L-1)
        loss = F.cross_entropy(logits[learned], tok[:, 1:][learned], reduction="sum") / total
        opt.zero_grad(set_to_none=False)
        loss.backward()
        sum_replicated_grads(model)
        opt.step()
        for moe in moes:
            balance_bias(moe, gamma)
        loss = loss.detach()
        if dist.is_initialized():
            dist.all_reduce(loss)
        losses.append(loss.item())
    return losses


def _train_job(ctx: RankContext, config: ModelConfig, state: dict, tokens, mask, steps, batch_size, lr, gamma,
               seed) -> dict:
    torch.manual_seed(seed)
    model = CourseModel(config)
    model.load_state_dict(state)
    for block in model.layers:
        if isinstance(block.mlp, DeepSeekMoE):
            block.mlp = ExpertParallelMoE(block.mlp)
    losses = train_steps(model, tokens, mask, steps, batch_size, lr, gamma, seed, ctx.rank, ctx.world_size)
    return {"losses": losses, "peak_mb": peak_memory_mb()}


def train_parallel(model: CourseModel, tokens: torch.Tensor, mask: torch.Tensor, world_size: int, steps: int,
                   batch_size: int, lr: float = 3e-3, gamma: float = 1e-3, seed: int = 0, **launch_kw) -> dict:
    """Train a copy of `model` on `world_size` processes (experts sharded); {"losses", "peak_mb" per rank}."""
    check_layout(model.config.n_routed_experts, world_size, model.config.n_group)
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    ranks = launch(_train_job, world_size, model.config, state, tokens, mask, steps, batch_size, lr, gamma, seed,
                   **launch_kw)
    return {"losses": ranks[0]["losses"], "peak_mb": [r["peak_mb"] for r in ranks]}


# ----------------------------------------------------------------------------- all-to-all timing, failures

def _alltoall_job(ctx: RankContext, sizes: list[int], repeats: int) -> list[float]:
    W, out = ctx.world_size, []
    for n in sizes:  # n bytes to every other rank
        x = torch.zeros(W * (n // 4))  # float32
        y = torch.empty_like(x)
        times = []
        for _ in range(repeats):
            dist.barrier()
            t0 = time.perf_counter()
            dist.all_to_all_single(y, x)
            times.append(time.perf_counter() - t0)
        out.append(sorted(times)[len(times) // 2])
    return out


def alltoall_times(world_size: int, sizes: list[int], repeats: int = 15, **launch_kw) -> list[float]:
    """Median seconds of one all_to_all_single sending `size` bytes to every other rank, per size (rank 0)."""
    return launch(_alltoall_job, world_size, sizes, repeats, **launch_kw)[0]


def _crash_job(ctx: RankContext, dying_rank: int) -> None:
    x = torch.zeros(ctx.world_size)
    if ctx.rank == dying_rank:
        os._exit(3)  # as a process killed mid-step would: no goodbye to the group
    dist.all_to_all_single(torch.empty_like(x), x)  # the others wait for it in a collective


def crash_demo(world_size: int = 2, dying_rank: int = 1, **launch_kw) -> None:
    """Let one rank die while the others wait in an all-to-all: `launch` raises a RuntimeError naming it."""
    launch(_crash_job, world_size, dying_rank, **launch_kw)
