"""Exercises of notebook 10: the per-rank split sizes of the all-to-all, DeepSeek-V3's bytes per token over IB,
and node-limited routing's effect on cross-group traffic.

Sources: DeepSeek-V3 (arXiv:2412.19437) §2.1.2 (node-limited routing), §3.2.2 (a token crosses IB once per
node, at most 4 nodes; IB 50 GB/s, NVLink 160 GB/s), §3.3 (FP8 dispatch with one scale per 128 values, BF16
combine), §4.2 (hidden 7168, top-8).

Letters: N tokens on one rank, K top-k, E routed experts, W ranks, E_r = E / W experts per rank.
"""

from __future__ import annotations

import torch

from .core import Experiment, Implement, Mistake, Predict
from .running import Case, difference


# ----------------------------------------------------------------------------- 10: split sizes

def rank_split_sizes(topk_idx: torch.Tensor, experts_per_rank: int, world_size: int) -> torch.Tensor:
    """Rows one rank sends to each rank (W,): a token goes once to every rank that holds one of its K experts."""
    owner = topk_idx // experts_per_rank  # (N, K): rank r holds experts r·E_r .. (r+1)·E_r - 1
    hits = torch.zeros(topk_idx.shape[0], world_size, dtype=torch.bool).scatter_(1, owner, True)  # (N, W)
    return hits.sum(0)  # (W,): tokens that need each rank


def _split_cases() -> list[Case]:
    def case(seed, N, E, K, W, idx=None):
        gen = torch.Generator().manual_seed(seed)
        idx = torch.rand(N, E, generator=gen).argsort(-1)[:, :K] if idx is None else idx
        return Case(f"N={N} E={E} K={K} W={W}", (idx, E // W, W))
    return [case(300, 6, 8, 3, 4), case(301, 32, 16, 4, 4), case(302, 5, 8, 2, 2),
            case(303, 4, 8, 2, 4, torch.tensor([[0, 1], [1, 0], [2, 3], [0, 3]])),  # the last two ranks get nothing
            case(304, 3, 16, 4, 8, torch.tensor([[14, 15, 0, 1], [15, 2, 3, 14], [7, 6, 5, 4]]))]


def _per_slot(topk_idx, experts_per_rank, world_size):
    return torch.bincount((topk_idx // experts_per_rank).flatten(), minlength=world_size)


def _round_robin(topk_idx, experts_per_rank, world_size):
    owner = topk_idx % world_size  # expert e on rank e mod W
    return torch.zeros(topk_idx.shape[0], world_size, dtype=torch.bool).scatter_(1, owner, True).sum(0)


def _no_minlength(topk_idx, experts_per_rank, world_size):
    owner = topk_idx // experts_per_rank
    pairs = torch.unique(torch.stack([torch.arange(len(owner))[:, None].expand_as(owner), owner], -1).reshape(-1, 2),
                         dim=0)
    return torch.bincount(pairs[:, 1])  # as long as the highest rank used, not W


SPLIT_SIZES = Implement(
    name="rank_split_sizes", notebook="10",
    statement="Implement rank_split_sizes(topk_idx, experts_per_rank, world_size) -> (W,) int tensor: the rows this "
              "rank sends to each rank, one per token and rank holding at least one of its K experts "
              "(experts sharded contiguously, DeepSeek-V3 arXiv:2412.19437 §3.2).",
    hint_text="owner = topk_idx // experts_per_rank; mark (token, owner) in an (N, W) bool tensor with scatter_, "
              "then sum over tokens. A token with two experts on one rank is sent there once.",
    reference=rank_split_sizes, cases=_split_cases,
    mistakes=(
        Mistake("one row per expert slot", "A token with two experts on the same rank is sent there once: count "
                "distinct (token, rank) pairs, not the N·K slots.", _per_slot),
        Mistake("experts dealt out round-robin", "Rank r holds a contiguous block: experts r·E_r .. (r+1)·E_r - 1, so "
                "the owner is expert // experts_per_rank, not expert % world_size.", _round_robin),
        Mistake("the ranks after the last one used dropped", "Every rank needs a split size, even 0: pass "
                "minlength=world_size to bincount (or build an (N, W) table).", _no_minlength)))


# ----------------------------------------------------------------------------- 10: bytes per token

HIDDEN, NODES_REACHED = 7168, 4
FP8_WITH_SCALES, BF16 = 1 + 4 / 128, 2


def _v3_ib_bytes() -> float:
    return NODES_REACHED * HIDDEN * (FP8_WITH_SCALES + BF16)


IB_BYTES = Predict(
    name="v3_ib_bytes_per_token", notebook="10",
    statement="Predict the bytes one token sends over InfiniBand in one DeepSeek-V3 MoE layer (dispatch and combine) "
              "if it reaches 4 other nodes: hidden 7168, dispatch in FP8 with one float32 scale per 128 values, "
              "combine in BF16, once per node (arXiv:2412.19437 §3.2.2, §3.3).",
    hint_text="Per node: 7168 values out at (1 + 4/128) bytes each, and 7168 values back at 2 bytes each. The 8 "
              "experts do not multiply it: NVLink fans the token out inside the node.",
    value=_v3_ib_bytes, unit="bytes", how="4 nodes x 7168 x ((1 + 4/128) + 2) = 4 x 7168 x 3.03125",
    mistakes=(Mistake("the combine left out", "The results come back over IB too, in BF16.",
                      lambda right: NODES_REACHED * HIDDEN * FP8_WITH_SCALES),
              Mistake("one copy per expert (8) instead of per node", "A token crosses IB once per node; NVLink "
                      "forwards it to the node's experts.", lambda right: right * 8 / NODES_REACHED),
              Mistake("the FP8 scales left out", "FP8 activations carry one float32 scale per 128 values "
                      "(4/128 bytes a value).", lambda right: NODES_REACHED * HIDDEN * (1 + BF16)),
              Mistake("BF16 both ways", "Dispatch goes in FP8 (1 byte a value plus scales).",
                      lambda right: NODES_REACHED * HIDDEN * 2 * BF16)))


# ----------------------------------------------------------------------------- 10: node limit

def _node_limit(m) -> str | None:
    free, two, one = m["unrestricted_bytes"], m["limit_2_bytes"], m["limit_1_bytes"]
    if not one < two < free:
        return (f"cross-group bytes were {free:.0f} unrestricted, {two:.0f} with M = 2 and {one:.0f} with M = 1: "
                f"they should fall as the limit tightens")
    return None


NODE_LIMIT = Experiment(
    name="node_limit_sweep", notebook="10",
    statement="Run study.node_limited_rows with limit=1 as well as limit=2 (section 4), and compare the cross-group "
              "bytes per token of unrestricted routing, M = 2 and M = 1.",
    hint_text="study.node_limited_rows(limit=1)[1]['cross_group_bytes_per_token'] is the M = 1 number; the first "
              "row of either call is the unrestricted one.",
    expected="the bytes fall as M tightens: with M = 1 a token leaves its group only when its one group is not "
             "its own rank's, at the cost of fewer experts to choose from (quality, notebook 05)",
    required=("unrestricted_bytes", "limit_2_bytes", "limit_1_bytes"), judge=_node_limit,
    example={"unrestricted_bytes": 1190.0, "limit_2_bytes": 803.0, "limit_1_bytes": 408.0},
    against={"unrestricted_bytes": 800.0, "limit_2_bytes": 803.0, "limit_1_bytes": 900.0})


EXERCISES = [SPLIT_SIZES, IB_BYTES, NODE_LIMIT]
