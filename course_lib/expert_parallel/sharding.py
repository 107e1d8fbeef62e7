"""Where experts live and where tokens go: the pure arithmetic of expert parallelism (no processes here).

E routed experts are split into W equal, contiguous shards, one per rank: rank r holds experts
r·E/W ... (r+1)·E/W − 1, as DeepSeek-V3 puts 4 of its 256 routed experts on each of 64 GPUs ([V3]
arXiv:2412.19437 §3.2, §4.2: EP64 over 8 nodes). A token is sent once to every rank that holds one of its
K experts (rank-level de-duplication: the rank applies all of its experts that the token chose), and the
results come back in the same rows. Router groups map onto sets of whole ranks ("nodes"), so group-limited
routing ([V3] §2.1.2, node-limited routing) bounds how many nodes a token reaches.

Letters: N tokens on one rank, K top-k, E routed experts, W ranks, E_r = E / W experts per rank,
S rows sent (one per token and destination rank), M groups a token may use.
"""

from __future__ import annotations

from dataclasses import dataclass
from math import comb

import torch


def divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def check_layout(n_experts: int, world_size: int, n_group: int = 1) -> int:
    """Experts per rank E / W; a ValueError that says how to fix a layout that does not split evenly."""
    if world_size < 1 or n_experts % world_size:
        raise ValueError(f"{n_experts} routed experts cannot be split evenly over {world_size} ranks: every rank must "
                         f"hold the same number. Use a world size that divides {n_experts}: {divisors(n_experts)}.")
    if n_group > 1 and world_size % n_group and n_group % world_size:
        raise ValueError(f"n_group={n_group} router groups do not map onto {world_size} ranks: node-limited routing "
                         f"needs each group on whole ranks (world size a multiple of n_group) or whole groups on "
                         f"each rank (n_group a multiple of the world size). Try world size {n_group}.")
    return n_experts // world_size


def rank_group(rank: int, world_size: int, n_group: int) -> int:
    """The router group ("node") rank r belongs to; with fewer groups than ranks, W / n_group ranks share one."""
    return rank // (world_size // n_group) if n_group <= world_size else rank


@dataclass
class DispatchPlan:
    """What one rank sends: rows sorted by destination rank, one per (token, destination) pair."""

    token: torch.Tensor  # (S,) the local token of each row
    dest: torch.Tensor  # (S,) its destination rank, non-decreasing
    local_expert: torch.Tensor  # (S, K) expert index on the destination for each of the token's K slots, −1 if elsewhere
    send_splits: list[int]  # (W,) rows for each destination rank: the split sizes of the all-to-all


def dispatch_plan(topk_idx: torch.Tensor, experts_per_rank: int, world_size: int) -> DispatchPlan:
    """topk_idx (N, K) global expert ids -> the rows this rank sends to each rank (see `DispatchPlan`)."""
    N, K = topk_idx.shape
    owner = topk_idx // experts_per_rank  # (N, K) rank holding each chosen expert
    hits = torch.zeros(N, world_size, dtype=torch.bool, device=topk_idx.device)
    hits.scatter_(1, owner, True)  # (N, W): does token n need rank w?
    dest, token = hits.T.nonzero(as_tuple=True)  # (S,), (S,): sorted by destination, token order within
    here = owner[token] == dest[:, None]  # (S, K): which of the row's slots the destination holds
    local_expert = torch.where(here, topk_idx[token] % experts_per_rank, -1)  # (S, K)
    send_splits = torch.bincount(dest, minlength=world_size).tolist()
    return DispatchPlan(token, dest, local_expert, send_splits)


# ----------------------------------------------------------------------------- bytes

def row_bytes(hidden: int, top_k: int, element_size: int = 4) -> tuple[int, int]:
    """(dispatch, combine) bytes of one row: dispatch carries the token (hidden values) plus its K gate weights
    and K local expert ids; combine carries the weighted sum of its experts' outputs (hidden values)."""
    return (hidden + 2 * top_k) * element_size, hidden * element_size


def bytes_per_token(remote_rows: int, tokens: int, hidden: int, top_k: int, element_size: int = 4) -> float:
    """The formula: bytes one MoE layer sends between ranks per token, dispatch and combine together,

        bytes/token = (remote rows / tokens) · ((hidden + 2K) + hidden) · element size,

    where a remote row is one (token, other rank) pair. Rows a rank keeps for its own experts cost nothing."""
    dispatch, combine = row_bytes(hidden, top_k, element_size)
    return remote_rows * (dispatch + combine) / max(tokens, 1)


def traffic_matrix(send_splits: list[list[int]], hidden: int, top_k: int, element_size: int = 4) -> list[list[int]]:
    """(W, W) bytes rank i sends to rank j in one forward: its dispatch rows to j plus the combine rows with
    which it answers j's rows. send_splits[i][j] are rank i's dispatch split sizes; the diagonal (rows a rank
    keeps for its own experts) moves no bytes and is 0."""
    dispatch, combine = row_bytes(hidden, top_k, element_size)
    W = len(send_splits)
    return [[0 if i == j else send_splits[i][j] * dispatch + send_splits[j][i] * combine for j in range(W)]
            for i in range(W)]


def cross_group_bytes(matrix: list[list[int]], ranks_per_group: int) -> int:
    """Bytes of a (W, W) traffic matrix that leave a group of `ranks_per_group` ranks (in DeepSeek-V3: cross IB)."""
    W = len(matrix)
    return sum(matrix[i][j] for i in range(W) for j in range(W) if i // ranks_per_group != j // ranks_per_group)


def expected_remote_ranks(n_experts: int, top_k: int, world_size: int) -> float:
    """Other ranks a token reaches on average when its K experts are K distinct experts drawn uniformly:
    (W − 1) · (1 − C(E − E/W, K) / C(E, K)): each other rank is missed only when all K avoid its E/W experts."""
    miss = comb(n_experts - n_experts // world_size, top_k) / comb(n_experts, top_k)
    return (world_size - 1) * (1 - miss)


def groups_reached(topk_idx: torch.Tensor, experts_per_group: int) -> torch.Tensor:
    """(N,) how many router groups (nodes) each token's K experts span."""
    group = topk_idx // experts_per_group  # (N, K)
    n = int(group.max()) + 1 if group.numel() else 1
    return torch.zeros(topk_idx.shape[0], n, dtype=torch.bool, device=topk_idx.device).scatter_(1, group, True).sum(1)
