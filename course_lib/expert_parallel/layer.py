"""DeepSeekMoE with its routed experts split over the ranks of a `torch.distributed` process group.

The router and the shared experts are replicated on every rank; each rank holds E / W routed experts and
routes its own tokens. One forward is four collectives ([V3] arXiv:2412.19437 §3.2.2, dispatch and combine):

1. all-to-all of the split sizes: how many rows each rank will send to each other rank;
2. dispatch, an all-to-all of uneven splits: each token once to every rank holding one of its experts,
   with its K gate weights and the local index of each of those experts;
3. every rank runs its experts on the rows it received and sums each row's weighted outputs;
4. combine, the reverse all-to-all: each row's sum goes back to the token's rank and is added in.

Backward runs the same all-to-alls in reverse (`AllToAll`), so the gradients of the experts and, through the
gate weights, of the router reach the right ranks. Works on gloo (CPU processes) and NCCL (GPUs) alike.
Letters as in `sharding`: N tokens on this rank, K top-k, W ranks, E_r experts per rank, S rows sent, R received.
"""

from __future__ import annotations

import copy
import time

import torch
import torch.distributed as dist
from torch import nn

from ..moe import DeepSeekMoE, expert_load
from .sharding import check_layout, dispatch_plan


class AllToAll(torch.autograd.Function):
    """all_to_all_single with uneven splits whose backward is the all-to-all with the splits swapped."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, out_splits: list[int], in_splits: list[int], group) -> torch.Tensor:
        ctx.splits, ctx.group = (in_splits, out_splits), group
        return _all_to_all(x, out_splits, in_splits, group)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        in_splits, out_splits = ctx.splits
        return _all_to_all(grad.contiguous(), in_splits, out_splits, ctx.group), None, None, None


def _all_to_all(x: torch.Tensor, out_splits: list[int], in_splits: list[int], group) -> torch.Tensor:
    out = x.new_empty(sum(out_splits), *x.shape[1:])  # (R, ...)
    if group is None and not dist.is_initialized():  # one process, no group: the exchange is a copy
        return out.copy_(x)
    dist.all_to_all_single(out, x.contiguous(), out_splits, in_splits, group=group)
    return out


def exchange_splits(send_splits: list[int], group, device) -> list[int]:
    """Every rank tells every other how many rows it will send: the receive split sizes."""
    send = torch.tensor(send_splits, dtype=torch.int64, device=device)  # (W,)
    return _all_to_all(send, [1] * len(send_splits), [1] * len(send_splits), group).tolist()


def run_local_experts(experts: nn.ModuleList, rows: torch.Tensor, gates: torch.Tensor,
                      local_expert: torch.Tensor) -> torch.Tensor:
    """Σ_k gate_k · FFN_{e_k}(row) over the slots whose expert e_k is here: rows (R, hidden) -> (R, hidden).

    Sorted by expert so each expert runs once on all its rows, as `moe.dispatch_vectorized` does.
    `rows * 0` starts the sum so the output always depends on the received rows: a rank that received
    nothing still joins the backward all-to-all instead of leaving the others waiting.
    """
    out = rows * 0  # (R, hidden)
    row, slot = (local_expert >= 0).nonzero(as_tuple=True)  # (R·k,), (R·k,) occupied slots
    expert = local_expert[row, slot]  # (R·k,)
    order = expert.argsort(stable=True)
    row, slot = row[order], slot[order]
    counts = torch.bincount(expert, minlength=len(experts)).tolist()  # rows per local expert
    segments = rows.index_select(0, row).split(counts)  # E_r views of (count_e, hidden)
    for ffn, seg, r, g in zip(experts, segments, row.split(counts), gates[row, slot].split(counts)):
        if seg.shape[0]:
            out = out.index_add(0, r, ffn(seg) * g[:, None])  # (R, hidden)
    return out


class ExpertParallelMoE(DeepSeekMoE):
    """A `DeepSeekMoE` whose routed experts are sharded over `group`: this rank keeps experts
    [rank·E_r, (rank+1)·E_r) of `moe` (copies), the router and the shared experts whole.

    forward(x) on every rank, each with its own tokens, equals the single-process layer on those tokens.
    After each forward, besides DeepSeekMoE's `last_*` routing records (this rank's tokens), it holds
    `last_send_splits` and `last_recv_splits` (W,) (dispatch rows per rank), `last_rank_load` (expert slots
    this rank computed) and `last_comm_seconds`, `last_expert_seconds` (wall time in the all-to-alls and in its experts) and
    `last_expert_cpu_seconds` (CPU time of its experts: what the work costs even when processes share cores).
    """

    def __init__(self, moe: DeepSeekMoE, group=None, rank: int | None = None, world_size: int | None = None) -> None:
        nn.Module.__init__(self)
        distributed = dist.is_initialized()
        self.group = group
        self.rank = rank if rank is not None else (dist.get_rank(group) if distributed else 0)
        self.world_size = world_size if world_size is not None else (dist.get_world_size(group) if distributed else 1)
        config = moe.config
        self.experts_per_rank = check_layout(config.n_routed_experts, self.world_size, config.n_group)
        self.config = config
        self.gate = copy.deepcopy(moe.gate)
        first = self.rank * self.experts_per_rank
        self.experts = nn.ModuleList(copy.deepcopy(moe.experts[e]) for e in range(first, first + self.experts_per_rank))
        self.shared_experts = None if moe.shared_experts is None else copy.deepcopy(moe.shared_experts)
        self.dispatch = "all_to_all"
        self.last_scores = self.last_topk_idx = self.last_mask = self.last_load = None
        self.last_send_splits: list[int] = []
        self.last_recv_splits: list[int] = []
        self.last_rank_load = 0
        self.last_comm_seconds = self.last_expert_seconds = self.last_expert_cpu_seconds = 0.0

    def global_expert(self, local: int) -> int:
        return self.rank * self.experts_per_rank + local

    def route(self, x: torch.Tensor, token_mask: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """As `DeepSeekMoE.route`, but also for a rank holding no tokens: x (0, T, hidden) routes to (0, K)."""
        flat_mask = None if token_mask is None else token_mask.reshape(-1)  # (N,)
        topk_idx, topk_weight, scores = self.gate(x.reshape(-1, x.shape[-1]), flat_mask)  # (N, K), (N, K), (N, E)
        self.last_scores = scores.reshape(*x.shape[:-1], scores.shape[-1])  # (B, T, E)
        self.last_topk_idx = topk_idx.reshape(*x.shape[:-1], topk_idx.shape[-1])  # (B, T, K)
        self.last_mask = token_mask
        self.last_load = expert_load(topk_idx, self.config.n_routed_experts, flat_mask)  # (E,) this rank's tokens
        return topk_idx, topk_weight

    def forward(self, x: torch.Tensor, token_mask: torch.Tensor | None = None) -> torch.Tensor:
        """x (B, T, hidden), this rank's tokens -> (B, T, hidden); collective: every rank must call it."""
        topk_idx, topk_weight = self.route(x, token_mask)  # (N, K), (N, K)
        flat = x.reshape(-1, x.shape[-1])  # (N, hidden)
        y = self.dispatch_combine(flat, topk_idx, topk_weight).reshape(x.shape)  # (B, T, hidden)
        if self.shared_experts is not None:
            y = y + self.shared_experts(x)  # (B, T, hidden)
        return y

    def dispatch_combine(self, flat: torch.Tensor, topk_idx: torch.Tensor, topk_weight: torch.Tensor) -> torch.Tensor:
        """Σ_k g_k FFN_k(u) for this rank's tokens flat (N, hidden), the experts living on all ranks."""
        d, K = flat.shape[-1], topk_idx.shape[-1]
        plan = dispatch_plan(topk_idx, self.experts_per_rank, self.world_size)  # S rows, sorted by rank
        gates = torch.where(plan.local_expert >= 0, topk_weight[plan.token], 0.0)  # (S, K)
        payload = torch.cat([flat[plan.token], gates.to(flat.dtype), plan.local_expert.to(flat.dtype)], -1)  # (S, d+2K)
        t0 = time.perf_counter()
        recv_splits = exchange_splits(plan.send_splits, self.group, flat.device)
        recv = AllToAll.apply(payload, recv_splits, plan.send_splits, self.group)  # (R, d+2K)
        t1, c1 = time.perf_counter(), time.thread_time()
        rows, rgates, rexp = recv.split([d, K, K], dim=-1)  # (R, d), (R, K), (R, K)
        out = run_local_experts(self.experts, rows, rgates, rexp.detach().long())  # (R, d)
        t2, c2 = time.perf_counter(), time.thread_time()
        back = AllToAll.apply(out, plan.send_splits, recv_splits, self.group)  # (S, d): each row's answer
        self.last_comm_seconds = t1 - t0 + time.perf_counter() - t2
        self.last_expert_seconds, self.last_expert_cpu_seconds = t2 - t1, c2 - c1
        self.last_send_splits, self.last_recv_splits = plan.send_splits, recv_splits
        self.last_rank_load = int((rexp >= 0).sum())
        return flat.new_zeros(flat.shape).index_add(0, plan.token, back)  # (N, d)

