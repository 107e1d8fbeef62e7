"""DeepSeekMoE: the router, four ways to dispatch tokens to experts, balancing methods, load stats.

Sources are the tags of DEEPSEEK_REFERENCE.md §2: fine-grained + shared experts [MoE] §3 eq 9;
the V2 softmax router and its balance loss [V2] §2.2 eqs 20–25; the V3 sigmoid router with
normalized top-K weights, the selection-only bias and the sequence-wise loss [V3] §2.1.2 eqs 12–20;
group-limited routing as [code] `Gate.forward` does it (reference §2.4). Names follow transformers'
`DeepseekV3MoE` (`gate`, `gate.e_score_correction_bias`, `experts`, `shared_experts`), with one
SwiGLU module per routed expert; `unpack_experts` / `pack_experts` convert to and from
transformers' packed `experts.gate_up_proj` / `experts.down_proj` tensors.

Shapes: B batch, T tokens per sequence, N = B·T tokens flattened, E routed experts, K top-k,
G group size (E / n_group experts per group), I expert width, C slots per expert buffer.

A training loop reads what the last forward recorded (`last_scores`, `last_topk_idx`, `last_load`)
to add an auxiliary loss or to call `update_bias` after the optimizer step.
"""

from __future__ import annotations

import math
from typing import Callable

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from .config import ModelConfig
from .layers import SwiGLU

GROUP_SCORES = ("top2_sum", "max")
DISPATCHES = ("token_loop", "expert_loop", "vectorized", "padded")


# ----------------------------------------------------------------------------- router

class TopkRouter(nn.Module):
    """The gate: affinity scores, group-limited top-K selection, and the weights of the selected experts.

    s_{i,t} = Softmax_i(u_t^T e_i) ([V2] eq 22) or Sigmoid(u_t^T e_i) ([V3] eq 15), computed in float32.
    Selection uses s + b, the aux-loss-free bias ([V3] eq 16: "the bias term is only used for routing");
    the weights gather the un-biased s ([V3] eq 14), are renormalized when `norm_topk_prob` ([V3] eq 13)
    and multiplied by `routed_scaling_factor` (reference §2.4).

    Group-limited routing (reference §2.4): experts are split into `n_group` groups of G; a token may only
    pick from its best `topk_group` groups. A group's score is `group_score`:
    "top2_sum" — the sum of its two highest (biased) scores, V3's node-limited routing ([V3] §2.1.2)
    and what transformers' `DeepseekV3TopkRouter` always does; "max" — its highest score, V2's
    device-limited routing as [code] runs it ([V2] §2.2.2). The default follows `scoring_func`:
    sigmoid -> "top2_sum", softmax -> "max". Excluded groups are masked with -inf, never multiplied by 0
    (the [code] fix 1398800 in reference §2.4).
    """

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        E = config.n_routed_experts
        self.top_k = config.num_experts_per_tok
        self.n_group = config.n_group
        self.topk_group = config.topk_group
        self.norm_topk_prob = config.norm_topk_prob
        self.routed_scaling_factor = config.routed_scaling_factor
        self.scoring_func = config.scoring_func
        self.group_score = "top2_sum" if config.scoring_func == "sigmoid" else "max"
        self.weight = nn.Parameter(torch.empty(E, config.hidden_size))
        nn.init.normal_(self.weight, std=0.02)
        # A buffer, not a parameter: it is moved by `update_bias`, never by gradients ([V3] §2.1.2).
        self.register_buffer("e_score_correction_bias", torch.zeros(E, dtype=torch.float32))

    def scores(self, x: torch.Tensor) -> torch.Tensor:
        """Affinities s (N, E) in float32 for tokens x (N, hidden)."""
        logits = F.linear(x.float(), self.weight.float())  # (N, E)
        return logits.softmax(-1) if self.scoring_func == "softmax" else logits.sigmoid()

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Tokens x (N, hidden) -> topk_idx (N, K), topk_weight (N, K) float32, scores s (N, E) float32.

        topk_idx is sorted by biased score, best first.
        """
        if self.group_score not in GROUP_SCORES:
            raise ValueError(f"group_score={self.group_score!r} is not known. Use one of {GROUP_SCORES}.")
        scores = self.scores(x)  # (N, E)
        choice = scores + self.e_score_correction_bias  # (N, E): the bias only picks, [V3] eq 16
        if self.n_group > 1:
            grouped = rearrange(choice, "n (g e) -> n g e", g=self.n_group)  # (N, n_group, G)
            if self.group_score == "top2_sum":
                group_scores = grouped.topk(min(2, grouped.shape[-1]), dim=-1).values.sum(-1)  # (N, n_group)
            else:
                group_scores = grouped.amax(-1)  # (N, n_group)
            keep = group_scores.topk(self.topk_group, dim=-1).indices  # (N, topk_group)
            allowed = torch.zeros_like(group_scores, dtype=torch.bool).scatter_(1, keep, True)  # (N, n_group)
            grouped = grouped.masked_fill(~allowed[..., None], float("-inf"))  # (N, n_group, G)
            choice = rearrange(grouped, "n g e -> n (g e)")  # (N, E)
        topk_idx = choice.topk(self.top_k, dim=-1).indices  # (N, K)
        topk_weight = scores.gather(1, topk_idx)  # (N, K): un-biased s, [V3] eq 14
        if self.norm_topk_prob:
            topk_weight = topk_weight / (topk_weight.sum(-1, keepdim=True) + 1e-20)  # [V3] eq 13
        return topk_idx, topk_weight * self.routed_scaling_factor, scores


# ----------------------------------------------------------------------------- dispatch

def _group_by_expert(flat_idx: torch.Tensor, num_experts: int,
                     priority: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Sort token-slots (N·K,) by expert id -> order (N·K,), each sorted slot's place in its run, counts (E,).

    Within one expert the slots keep the order of `priority` (a permutation of the slots; default: token order).
    """
    slots = torch.arange(flat_idx.numel(), device=flat_idx.device)  # (N·K,)
    priority = slots if priority is None else priority
    order = priority[flat_idx[priority].argsort(stable=True)]  # (N·K,) by expert, priority order within
    counts = torch.bincount(flat_idx, minlength=num_experts)  # (E,)
    starts = counts.cumsum(0) - counts  # (E,) where each expert's run begins
    return order, slots - starts[flat_idx[order]], counts


# h_t = Σ_i g_{i,t} FFN_i(u_t) over the K selected experts      [V3] eq 12 (routed part)
def dispatch_token_loop(experts: nn.ModuleList, x: torch.Tensor, topk_idx: torch.Tensor,
                        topk_weight: torch.Tensor) -> torch.Tensor:
    """Routed output (N, hidden), one token and one slot at a time: the equation read literally (teaching only)."""
    rows = []
    for t in range(x.shape[0]):
        y_t = torch.zeros_like(x[t], dtype=torch.float32)  # (hidden,)
        for k in range(topk_idx.shape[1]):
            y_t = y_t + topk_weight[t, k] * experts[int(topk_idx[t, k])](x[t])  # (hidden,)
        rows.append(y_t.to(x.dtype))
    return torch.stack(rows) if rows else torch.zeros_like(x)  # (N, hidden)


def dispatch_expert_loop(experts: nn.ModuleList, x: torch.Tensor, topk_idx: torch.Tensor,
                         topk_weight: torch.Tensor) -> torch.Tensor:
    """Routed output (N, hidden), one expert at a time over the tokens that chose it, as [code] `MoE.forward`.

    A token picks an expert at most once, so `tok` has no repeats and `y[tok] +=` is safe.
    """
    y = torch.zeros_like(x)  # (N, hidden)
    counts = torch.bincount(topk_idx.flatten(), minlength=len(experts)).tolist()
    for i, expert in enumerate(experts):
        if counts[i] == 0:
            continue
        tok, slot = torch.where(topk_idx == i)  # (n_i,), (n_i,)
        y[tok] += (expert(x[tok]) * topk_weight[tok, slot, None]).to(x.dtype)  # (n_i, hidden)
    return y


def dispatch_vectorized(experts: nn.ModuleList, x: torch.Tensor, topk_idx: torch.Tensor,
                        topk_weight: torch.Tensor) -> torch.Tensor:
    """Routed output (N, hidden): sort slots by expert, one matmul per expert segment, scatter-add back.

    The N·K token-slots are sorted by expert id once (a stable sort: token order within an expert), the
    tokens are gathered once in that order, and the gathered rows split into E contiguous segments (views,
    no copies); each expert runs once on its whole segment, and its output, weighted by the gates, is added
    into its tokens with `index_add_`. The Python loop is over E experts with no per-expert masks, searches
    or host syncs (one `tolist` of the counts): the work of the per-expert loop without its overhead.

    Each segment is added back on its own rather than concatenating all outputs for one `index_add_`: the
    same sums in the same order (bitwise the same result, gradients included), without two more
    (N·K, hidden) temporaries. On a CPU such megabyte-sized temporaries are often handed back to the OS by
    malloc after each call and page-faulted in again by the next (seen: about 700 faults and up to 1.3x the
    time per forward at N = 1280, K = 2).
    """
    N, K = topk_idx.shape
    flat_idx = topk_idx.flatten()  # (N·K,)
    order = flat_idx.argsort(stable=True)  # (N·K,) slots grouped by expert, token order within
    token = order // K  # (N·K,) the token of each sorted slot
    counts = torch.bincount(flat_idx, minlength=len(experts)).tolist()  # slots per expert
    segments = x.index_select(0, token).split(counts)  # E views of (count_e, hidden)
    tokens = token.split(counts)  # E views of (count_e,)
    gates = topk_weight.flatten()[order, None].split(counts)  # E views of (count_e, 1)
    y = x.new_zeros(N, x.shape[-1])  # (N, hidden)
    for expert, seg, tok, gate in zip(experts, segments, tokens, gates):
        if seg.shape[0]:
            y.index_add_(0, tok, (expert(seg) * gate).to(x.dtype))  # (N, hidden)
    return y


def dispatch_padded(experts: nn.ModuleList, x: torch.Tensor, topk_idx: torch.Tensor,
                    topk_weight: torch.Tensor) -> torch.Tensor:
    """Routed output (N, hidden) with no Python loop: sort slots by expert, pad, batched matmuls, scatter-add.

    The N·K token-slots are sorted by expert id so each expert's slots are contiguous, then laid into a
    padded buffer of E·C rows (C = the busiest expert's count): row e·C + p holds the p-th token of expert
    e, and padding rows read an all-zero row appended to x. All experts then run at once as batched
    matmuls with stacked weights, gate and up in one (E, 2I, hidden) stack, and every row's output is
    weighted and summed back into its token with `index_add_` (padding rows land on the extra row, which
    is dropped). Only gathers of whole rows (`index_select`) and their scatter-add are used: both are cheap
    forward and backward. Padding costs compute when routing is unbalanced (E·C rows for N·K slots); a
    capacity-factor MoE fixes C in advance and drops what does not fit (`capacity_drop`), grouped-GEMM
    kernels skip the padding. On a CPU its large temporaries (about 10 MB for 1,280 tokens of width 128) can
    be handed back to the OS by malloc after each call and page-faulted in again by the next, which the
    per-expert loop's small ones avoid: the loop can win a forward pass, and `dispatch_vectorized` (no
    padding, no copies of the weights) wins on a CPU; one launch for all experts is what suits a GPU.
    Assumes SwiGLU experts (gate_proj, up_proj, down_proj).
    """
    N, K = topk_idx.shape
    E, d = len(experts), x.shape[-1]
    flat_idx = topk_idx.flatten()  # (N·K,)
    order, pos, counts = _group_by_expert(flat_idx, E)  # (N·K,), (N·K,), (E,)
    C = int(counts.max()) if N else 0
    row = flat_idx[order] * C + pos  # (N·K,) each sorted slot's row in the E·C buffer
    token = torch.full((E * C,), N, device=x.device).index_copy_(0, row, order // K)  # (E·C,) N on padding
    weight = topk_weight.new_zeros(E * C).index_copy_(0, row, topk_weight.flatten()[order])  # (E·C,) 0 on padding
    x_pad = torch.cat([x, x.new_zeros(1, d)])  # (N+1, hidden): row N is the padding token
    buf = x_pad.index_select(0, token).view(E, C, d)  # (E, C, hidden)
    w_gate_up = torch.stack([w for e in experts for w in (e.gate_proj.weight, e.up_proj.weight)])  # (2E, I, hidden)
    w_gate_up = w_gate_up.view(E, -1, d)  # (E, 2I, hidden): expert e's gate rows, then its up rows
    w_down = torch.stack([e.down_proj.weight for e in experts])  # (E, hidden, I)
    gate, up = torch.bmm(buf, w_gate_up.transpose(1, 2)).chunk(2, dim=-1)  # (E, C, I) each: "ecd,eid->eci"
    out = torch.bmm(F.silu(gate) * up, w_down.transpose(1, 2)).view(E * C, d)  # (E·C, hidden): "eci,edi->ecd"
    out = out * weight[:, None]  # (E·C, hidden)
    return x.new_zeros(N + 1, d).index_add_(0, token, out.to(x.dtype))[:N]  # (N, hidden)


_DISPATCH_FNS = {"token_loop": dispatch_token_loop, "expert_loop": dispatch_expert_loop,
                 "vectorized": dispatch_vectorized, "padded": dispatch_padded}


# ----------------------------------------------------------------------------- the layer

class DeepSeekMoE(nn.Module):
    """Shared experts plus top-K of E fine-grained routed experts ([MoE] §3 eq 9; [V2] eq 20; [V3] eq 12).

    forward(x) returns Σ_shared FFN(u) + Σ_i g_i FFN_i(u); the residual u is added by the block.
    `dispatch` picks how tokens reach experts: "token_loop", "expert_loop", "vectorized" or "padded" (same result).
    After each forward, `last_scores` (B, T, E) (router affinities, still in the autograd graph for an
    aux loss), `last_topk_idx` (B, T, K) and `last_load` (E,) (token-slots per expert) hold that step's routing.
    """

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        # Validate the MoE fields even when the config was built with ffn="dense".
        config = config.replace(ffn="moe")
        self.config = config
        self.gate = TopkRouter(config)
        self.experts = nn.ModuleList(
            SwiGLU(config.hidden_size, config.moe_intermediate_size) for _ in range(config.n_routed_experts))
        self.shared_experts = (
            SwiGLU(config.hidden_size, config.n_shared_experts * config.moe_intermediate_size)
            if config.n_shared_experts > 0 else None)
        self.dispatch = "vectorized"
        self.last_scores: torch.Tensor | None = None
        self.last_topk_idx: torch.Tensor | None = None
        self.last_load: torch.Tensor | None = None

    def route(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Tokens x (B, T, hidden) -> topk_idx (B·T, K), topk_weight (B·T, K); records the last_* statistics."""
        topk_idx, topk_weight, scores = self.gate(x.reshape(-1, x.shape[-1]))  # (N, K), (N, K), (N, E)
        self.last_scores = scores.reshape(*x.shape[:-1], -1)  # (B, T, E)
        self.last_topk_idx = topk_idx.reshape(*x.shape[:-1], -1)  # (B, T, K)
        self.last_load = expert_load(topk_idx, len(self.experts))  # (E,)
        return topk_idx, topk_weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.dispatch not in _DISPATCH_FNS:
            raise ValueError(f"dispatch={self.dispatch!r} is not known. Use one of {DISPATCHES}.")
        topk_idx, topk_weight = self.route(x)  # (N, K), (N, K)
        flat = x.reshape(-1, x.shape[-1])  # (N, hidden)
        y = _DISPATCH_FNS[self.dispatch](self.experts, flat, topk_idx, topk_weight).reshape(x.shape)  # (B, T, hidden)
        if self.shared_experts is not None:
            y = y + self.shared_experts(x)  # (B, T, hidden)
        return y

    def inactive_parameters(self) -> int:
        """Parameters of the E − K routed experts a token does not use (for active-parameter counts)."""
        per_expert = sum(p.numel() for p in self.experts[0].parameters())
        return (len(self.experts) - self.gate.top_k) * per_expert


# ----------------------------------------------------------------------------- transformers' packed layout

def unpack_experts(state_dict: dict, prefix: str = "") -> dict:
    """transformers' packed expert tensors -> one SwiGLU per expert; other keys pass through unchanged.

    `{prefix}experts.gate_up_proj` (E, 2I, hidden) holds gate_proj in rows :I and up_proj in rows I:
    (`DeepseekV3Experts.forward` does `gate, up = linear(x, gate_up_proj[e]).chunk(2, -1)`);
    `{prefix}experts.down_proj` (E, hidden, I) is each expert's down_proj weight as is.
    """
    out = {k: v for k, v in state_dict.items()
           if k not in (f"{prefix}experts.gate_up_proj", f"{prefix}experts.down_proj")}
    gate_up = state_dict[f"{prefix}experts.gate_up_proj"]  # (E, 2I, hidden)
    gate, up = gate_up.chunk(2, dim=1)  # (E, I, hidden) each
    for e in range(gate_up.shape[0]):
        out[f"{prefix}experts.{e}.gate_proj.weight"] = gate[e]  # (I, hidden)
        out[f"{prefix}experts.{e}.up_proj.weight"] = up[e]  # (I, hidden)
        out[f"{prefix}experts.{e}.down_proj.weight"] = state_dict[f"{prefix}experts.down_proj"][e]  # (hidden, I)
    return out


def pack_experts(state_dict: dict, num_experts: int, prefix: str = "") -> dict:
    """The reverse of `unpack_experts`: per-expert SwiGLU weights -> transformers' packed tensors."""
    names = [f"{prefix}experts.{e}.{p}.weight" for e in range(num_experts)
             for p in ("gate_proj", "up_proj", "down_proj")]
    out = {k: v for k, v in state_dict.items() if k not in names}

    def stacked(proj: str) -> torch.Tensor:
        return torch.stack([state_dict[f"{prefix}experts.{e}.{proj}.weight"] for e in range(num_experts)])  # (E, ., .)

    gate_up = torch.cat([stacked("gate_proj"), stacked("up_proj")], dim=1)  # (E, 2I, hidden)
    out[f"{prefix}experts.gate_up_proj"] = gate_up
    out[f"{prefix}experts.down_proj"] = stacked("down_proj")  # (E, hidden, I)
    return out


def load_packed_experts(moe: DeepSeekMoE, state_dict: dict, prefix: str = "") -> DeepSeekMoE:
    """Load a transformers `DeepseekV3MoE` state dict (packed experts) into `moe`, strictly; returns moe."""
    unpacked = unpack_experts(state_dict, prefix)
    moe.load_state_dict({k[len(prefix):]: v for k, v in unpacked.items() if k.startswith(prefix)})
    return moe


def packed_state_dict(moe: DeepSeekMoE) -> dict:
    """`moe`'s state dict in transformers' `DeepseekV3MoE` layout."""
    return pack_experts(moe.state_dict(), len(moe.experts))


# ----------------------------------------------------------------------------- balancing

def switch_aux_loss(probs: torch.Tensor, alpha: float = 0.01) -> torch.Tensor:
    """Switch Transformer's load-balancing loss α·E·Σ_i f_i P_i over all tokens of probs (..., E).

    Fedus et al. 2021 (Switch Transformers) §2.2 eqs 4–6 (not in the reference sheet): f_i = fraction of
    tokens whose top-1 expert is i, P_i = mean router probability of expert i; α = 1e-2 in that paper.
    GShard's l_aux is the same f·P product with first-choice counts under a different constant.
    Counting only the first choice is what sets it apart from `expert_balance_loss`. Pass softmax
    probabilities (normalize sigmoid scores first, as `sequence_balance_loss` does).
    """
    probs = probs.reshape(-1, probs.shape[-1])  # (N, E)
    E = probs.shape[-1]
    f = F.one_hot(probs.argmax(-1), E).float().mean(0)  # (E,)
    P = probs.mean(0)  # (E,)
    return alpha * E * (f * P).sum()


def _f_times_p(probs: torch.Tensor, topk_idx: torch.Tensor) -> torch.Tensor:
    """Σ_i f_i P_i per sequence, averaged over sequences; f_i = E/(K·T)·count_i, P_i = mean_t probs_i."""
    if probs.ndim == 2:
        probs, topk_idx = probs[None], topk_idx[None]  # (1, T, E), (1, T, K)
    _, T, E = probs.shape
    K = topk_idx.shape[-1]
    counts = F.one_hot(topk_idx, E).sum(dim=(1, 2)).float()  # (B, E)
    f = counts * E / (K * T)  # (B, E)
    P = probs.mean(1)  # (B, E)
    return (f * P).sum(-1).mean()


# L_ExpBal = α1 Σ_i f_i P_i,  f_i = N_r/(K_r T) Σ_t 1(token t selects i),  P_i = (1/T) Σ_t s_{i,t}   [V2] 23–25
def expert_balance_loss(probs: torch.Tensor, topk_idx: torch.Tensor, alpha: float = 0.003) -> torch.Tensor:
    """DeepSeek-V2's expert-level balance loss ([V2] §2.2.3, eqs 23–25; α1 = 0.003, §3.1.2).

    probs (B, T, E) softmax affinities and topk_idx (B, T, K), or (T, E) and (T, K) for one sequence. T is
    the tokens of a sequence, as the paper defines it; the loss is averaged over the B sequences. f counts
    all K selections (scaled so a perfectly balanced router gives f_i = 1 and the loss is α).
    """
    return alpha * _f_times_p(probs, topk_idx)


# L_Bal = α Σ_i f_i P_i,  f_i = N_r/(K_r T) Σ_t 1(s_{i,t} ∈ Topk(s_t, K_r))     [V3] eqs 17–18
# s'_{i,t} = s_{i,t} / Σ_j s_{j,t},  P_i = (1/T) Σ_t s'_{i,t}                   [V3] eqs 19–20
def sequence_balance_loss(scores: torch.Tensor, k: int, alpha: float = 1e-4,
                          topk_idx: torch.Tensor | None = None) -> torch.Tensor:
    """DeepSeek-V3's complementary sequence-wise balance loss ([V3] §2.1.2, eqs 17–20; α = 1e-4, §4.2).

    scores (B, T, E) are the raw sigmoid affinities s; they are normalized per token (eq 19) before the mean.
    By default f counts the top-K of the UN-biased s, as eq 18 is printed; pass `topk_idx` (B, T, K) to count
    the experts actually routed to (bias- and group-limited selection, eq 16) instead.
    """
    if topk_idx is None:
        topk_idx = scores.topk(k, dim=-1).indices  # (B, T, K)
    probs = scores / scores.sum(-1, keepdim=True)  # (B, T, E)  eq 19
    return alpha * _f_times_p(probs, topk_idx)


@torch.no_grad()
def update_bias(moe: DeepSeekMoE, load: torch.Tensor | None = None, gamma: float = 1e-3) -> torch.Tensor:
    """Aux-loss-free balancing: b_i += γ·sign(mean(c) − c_i), in place on `moe.gate.e_score_correction_bias`.

    [V3] §2.1.2: "decrease the bias term by γ if its corresponding expert is overloaded, and increase it by γ
    if … underloaded", at the end of each step, with the load c of the whole batch ([LF] Alg. 1). γ = 0.001
    in V3 (§4.2). `load` defaults to `moe.last_load`. Returns the new bias.
    """
    load = (moe.last_load if load is None else load).float()  # (E,)
    bias = moe.gate.e_score_correction_bias
    bias += gamma * torch.sign(load.mean() - load).to(bias)
    return bias


def capacity_drop(topk_idx: torch.Tensor, topk_weight: torch.Tensor, num_experts: int,
                  capacity_factor: float = 1.0, by: str = "score") -> torch.Tensor:
    """Token dropping under a capacity factor: (N, K) bool, True for the token-slots that are dropped.

    Each expert takes at most C = ceil(capacity_factor · N·K / E) slots. by="score" drops the slots with the
    lowest routing weight first, the rule DeepSeek-V2 applies per device ([V2] §2.2.4; here per expert);
    by="position" keeps the earliest tokens, as Switch Transformer does. DeepSeek-V3 drops nothing
    ([V3] §2.1.2); this is for contrast. To apply it, zero the dropped weights:
    `topk_weight.masked_fill(dropped, 0)`.
    """
    if by not in ("score", "position"):
        raise ValueError(f"by={by!r} is not known. Use 'score' or 'position'.")
    N, K = topk_idx.shape
    C = math.ceil(capacity_factor * N * K / num_experts)
    flat_idx = topk_idx.flatten()  # (N·K,)
    priority = None  # token order
    if by == "score":
        priority = topk_weight.flatten().argsort(descending=True, stable=True)  # (N·K,) best first
    order, rank, _ = _group_by_expert(flat_idx, num_experts, priority)  # (N·K,) place in its expert's queue
    dropped = torch.zeros(N * K, dtype=torch.bool, device=flat_idx.device)
    dropped[order] = rank >= C
    return dropped.reshape(N, K)  # (N, K)


# ----------------------------------------------------------------------------- load statistics

def expert_load(topk_idx: torch.Tensor, num_experts: int) -> torch.Tensor:
    """Token-slots routed to each expert: topk_idx (..., K) -> (E,) int64 counts (sums to N·K)."""
    return torch.bincount(topk_idx.detach().flatten(), minlength=num_experts)  # (E,)


def max_violation(load: torch.Tensor) -> float:
    """MaxVio = max_i load_i / mean(load) − 1, 0 when perfectly balanced.

    The imbalance metric of [LF] (Wang et al., its MaxVio; not spelled out in the reference sheet).
    Over one batch it is [LF]'s MaxVio_batch; over a whole evaluation set's summed load, MaxVio_global.
    """
    load = load.float()
    return (load.max() / load.mean() - 1).item()


def load_entropy(load: torch.Tensor, normalized: bool = False) -> float:
    """Entropy −Σ p_i log p_i of the load distribution p = load / Σ load (nats; 0·log 0 = 0).

    normalized=True divides by log E, so 1 is perfect balance and 0 is every token on one expert.
    """
    p = load.float() / load.sum()
    h = -torch.xlogy(p, p).sum().item()
    if not normalized:
        return h
    return h / math.log(load.numel()) if load.numel() > 1 else 1.0


def dropped_fraction(dropped: torch.Tensor) -> float:
    """Fraction of token-slots dropped (from `capacity_drop`)."""
    return dropped.float().mean().item()


# ----------------------------------------------------------------------------- training with balancing
# The pieces a training loop needs to run each balancing method of notebook 05 on a whole model:
# `balancing_loss_fn` (train_lm's `loss_fn`: LM loss + an auxiliary loss summed over MoE layers),
# `apply_capacity` (token dropping during training), and `LoadTracker` (train_lm's `callback`: records
# every layer's load each step and, with gamma > 0, applies the aux-loss-free bias update).

BALANCING = ("none", "switch", "expert", "sequence", "aux_free", "capacity")
AUX_LOSSES = ("switch", "expert", "sequence")


def moe_layers(model: nn.Module) -> list[DeepSeekMoE]:
    """The DeepSeekMoE layers of `model` in forward order (empty for a dense model)."""
    return [m for m in model.modules() if isinstance(m, DeepSeekMoE)]


def router_probs(moe: DeepSeekMoE) -> torch.Tensor:
    """The last forward's affinities as a distribution per token (B, T, E): softmax scores as they are,
    sigmoid scores divided by their sum ([V3] eq 19), so every loss below sees probabilities."""
    scores = moe.last_scores  # (B, T, E)
    return scores if moe.gate.scoring_func == "softmax" else scores / scores.sum(-1, keepdim=True)


def aux_loss(moe: DeepSeekMoE, method: str, alpha: float) -> torch.Tensor:
    """One layer's auxiliary balance loss on its last forward: "switch", "expert" (V2) or "sequence" (V3).

    All three are α·Σ_i f_i P_i, scaled so a perfectly balanced router gives α; they differ in what f counts
    (Switch: first choices over the batch; V2: all K choices per sequence; V3: per sequence, on normalized
    sigmoid scores). f counts the experts actually routed to (`last_topk_idx`, after group limits and bias).
    """
    if method == "switch":
        return switch_aux_loss(router_probs(moe), alpha)
    if method == "expert":
        return expert_balance_loss(router_probs(moe), moe.last_topk_idx, alpha)
    if method == "sequence":
        return sequence_balance_loss(moe.last_scores, moe.gate.top_k, alpha, topk_idx=moe.last_topk_idx)
    raise ValueError(f"method={method!r} has no auxiliary loss. Use one of {AUX_LOSSES}.")


def balancing_loss_fn(method: str, alpha: float = 0.01, base: Callable | None = None) -> Callable:
    """A `loss_fn(model, batch, mask)` for `train_lm`: `base` (default: next-token loss) plus, for the
    methods in AUX_LOSSES, α times that balance loss summed over the model's MoE layers.

    The returned function keeps each call's `base` loss in `loss_fn.lm_losses`, so methods can be compared
    on the language-model loss alone (train_lm's own record includes the auxiliary term).
    """
    if method not in BALANCING:
        raise ValueError(f"method={method!r} is not known. Use one of {BALANCING}.")
    if base is None:
        from .train import lm_loss as base

    def loss_fn(model: nn.Module, batch: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        loss = base(model, batch, mask)
        loss_fn.lm_losses.append(loss.item())
        if method in AUX_LOSSES:
            loss = loss + sum(aux_loss(m, method, alpha) for m in moe_layers(model))
        return loss

    loss_fn.lm_losses = []
    return loss_fn


class CapacityLimit:
    """A forward hook on a router that drops the token-slots over capacity (`capacity_drop`) while training.

    Dropped slots get weight 0, so they add nothing to the output and pass no gradient (the dispatch
    still computes them: a real capacity-factor kernel would skip them). Nothing is dropped in eval mode,
    as DeepSeek-V2 does ([V2] §3.1.2). `last_dropped` (N, K) holds the last training forward's drops.
    """

    def __init__(self, gate: TopkRouter, capacity_factor: float, by: str = "score") -> None:
        self.capacity_factor, self.by = capacity_factor, by
        self.num_experts = gate.weight.shape[0]
        self.last_dropped: torch.Tensor | None = None
        self.handle = gate.register_forward_hook(self)

    def __call__(self, gate: nn.Module, inputs, output):
        if not gate.training:
            return output
        topk_idx, topk_weight, scores = output  # (N, K), (N, K), (N, E)
        dropped = capacity_drop(topk_idx, topk_weight, self.num_experts, self.capacity_factor, self.by)  # (N, K)
        self.last_dropped = dropped
        return topk_idx, topk_weight.masked_fill(dropped, 0.0), scores

    def remove(self) -> None:
        self.handle.remove()


def apply_capacity(model: nn.Module, capacity_factor: float = 1.0, by: str = "score") -> list[CapacityLimit]:
    """Install a `CapacityLimit` on every MoE layer's router; `.remove()` each to undo."""
    return [CapacityLimit(m.gate, capacity_factor, by) for m in moe_layers(model)]


def layer_loads(model_or_layers) -> torch.Tensor:
    """The last forward's token-slots per expert for every MoE layer, stacked: (L, E) int64."""
    layers = moe_layers(model_or_layers) if isinstance(model_or_layers, nn.Module) else model_or_layers
    return torch.stack([m.last_load for m in layers])  # (L, E)


def mean_max_violation(loads: torch.Tensor) -> float:
    """MaxVio of each layer's load (L, E), averaged over layers (a single (E,) load is one layer)."""
    loads = loads.reshape(-1, loads.shape[-1])  # (L, E)
    return sum(max_violation(row) for row in loads) / loads.shape[0]


class LoadTracker:
    """`train_lm`'s per-step callback for MoE models: record each layer's load, then balance the bias.

    After every optimizer step it stacks the layers' `last_load` (the whole batch's routing), stores the
    (L, E) load and its MaxVio (mean over layers), normalized load entropy and, with `capacity` hooks, the
    fraction of dropped slots; with gamma > 0 it then applies the aux-loss-free update
    b_i += γ·sign(mean load − load_i) to every layer ([V3] §2.1.2, "at the end of each step").
    `on_load(step, loads)` (e.g. an ExpertLoadMonitor's update) and `then(step, loss)` run after that.
    """

    def __init__(self, model: nn.Module, gamma: float = 0.0, capacity: list[CapacityLimit] | None = None,
                 on_load: Callable | None = None, then: Callable | None = None) -> None:
        self.layers = moe_layers(model)
        if not self.layers:
            raise ValueError("the model has no DeepSeekMoE layer: build it with ffn='moe'.")
        self.gamma, self.capacity, self.on_load, self.then = gamma, capacity or [], on_load, then
        self.steps: list[int] = []
        self.loads: list[torch.Tensor] = []  # (L, E) per step
        self.max_vio: list[float] = []
        self.entropy: list[float] = []
        self.dropped: list[float] = []
        self.losses: list[float] = []

    def __call__(self, step: int, loss: float | None = None) -> None:
        loads = layer_loads(self.layers)  # (L, E)
        self.steps.append(step)
        self.loads.append(loads)
        self.max_vio.append(mean_max_violation(loads))
        self.entropy.append(sum(load_entropy(row, normalized=True) for row in loads) / len(loads))
        if self.capacity:
            self.dropped.append(sum(dropped_fraction(c.last_dropped) for c in self.capacity) / len(self.capacity))
        if loss is not None:
            self.losses.append(float(loss))
        if self.gamma > 0:
            for m, load in zip(self.layers, loads):
                update_bias(m, load, self.gamma)
        if self.on_load is not None:
            self.on_load(step, loads)
        if self.then is not None:
            self.then(step, loss)

    def final(self, last: int = 10) -> dict:
        """Means over the last `last` steps: MaxVio, normalized entropy, dropped fraction, loss."""
        def tail(xs):
            return sum(xs[-last:]) / len(xs[-last:]) if xs else float("nan")
        return {"max_vio": tail(self.max_vio), "entropy": tail(self.entropy), "dropped": tail(self.dropped),
                "loss": tail(self.losses)}
