"""DeepSeekMoE: the router, four ways to dispatch tokens to experts, the layer, transformers' expert layout.

Sources: fine-grained + shared experts, [MoE] DeepSeekMoE (arXiv:2401.06066) §3 eq 9; the V2 softmax
router, [V2] (arXiv:2405.04434) §2.2 eqs 20-22; the V3 sigmoid router with normalized top-K weights and
the selection-only bias, [V3] (arXiv:2412.19437) §2.1.2 eqs 12-16; group-limited routing as [code]
(github.com/deepseek-ai/DeepSeek-V3 `inference/model.py`) `Gate.forward` does it. Names follow transformers'
`DeepseekV3MoE` (`gate`, `gate.e_score_correction_bias`, `experts`, `shared_experts`), with one
SwiGLU module per routed expert; `unpack_experts` / `pack_experts` convert to and from
transformers' packed `experts.gate_up_proj` / `experts.down_proj` tensors.

Shapes: B batch, T tokens per sequence, N = B·T tokens flattened, E routed experts, K top-k,
G group size (E / n_group experts per group), I expert width, C slots per expert buffer.

A training loop reads what the last forward recorded (`last_scores`, `last_topk_idx`, `last_load`)
to add an auxiliary loss or to update the router bias after the optimizer step: those methods live one
floor up, in `course_lib.balancing`.
"""

from __future__ import annotations

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
    and multiplied by `routed_scaling_factor` ([code] `Gate.forward`).

    Group-limited routing ([code] `Gate.forward`): experts are split into `n_group` groups of G; a token may only
    pick from its best `topk_group` groups. A group's score is `group_score`:
    "top2_sum" — the sum of its two highest (biased) scores, V3's node-limited routing ([V3] §2.1.2)
    and what transformers' `DeepseekV3TopkRouter` always does; "max" — its highest score, V2's
    device-limited routing as [code] runs it ([V2] §2.2.2). The default follows `scoring_func`:
    sigmoid -> "top2_sum", softmax -> "max". Excluded groups are masked with -inf, never multiplied by 0
    (with the bias, scores can be negative, and a masked 0 would then beat them; DeepSeek-V3 commit 1398800).
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

    def forward(self, x: torch.Tensor, token_mask: torch.Tensor | None = None
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Tokens x (N, hidden) -> topk_idx (N, K), topk_weight (N, K) float32, scores s (N, E) float32.

        topk_idx is sorted by biased score, best first. Routing is per token: `token_mask` (N,), True on real
        tokens, changes nothing here; it is an argument so that forward hooks (a capacity limit) see it.
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

def group_by_expert(flat_idx: torch.Tensor, num_experts: int,
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
    malloc after each call and page-faulted in again by the next, which costs time on every forward.
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
    order, pos, counts = group_by_expert(flat_idx, E)  # (N·K,), (N·K,), (E,)
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


DISPATCH_FNS = {"token_loop": dispatch_token_loop, "expert_loop": dispatch_expert_loop,
                 "vectorized": dispatch_vectorized, "padded": dispatch_padded}


# ----------------------------------------------------------------------------- the layer

class DeepSeekMoE(nn.Module):
    """Shared experts plus top-K of E fine-grained routed experts ([MoE] §3 eq 9; [V2] eq 20; [V3] eq 12).

    forward(x) returns Σ_shared FFN(u) + Σ_i g_i FFN_i(u); the residual u is added by the block.
    `dispatch` picks how tokens reach experts: "token_loop", "expert_loop", "vectorized" or "padded" (same result).
    After each forward, `last_scores` (B, T, E) (router affinities, still in the autograd graph for an
    aux loss), `last_topk_idx` (B, T, K), `last_mask` (B, T) (True on real tokens, None when all are) and
    `last_load` (E,) (token-slots per expert, real tokens only) hold that step's routing. Padding is routed
    like any token, but no statistic and no balancing method counts it: DeepSeek trains on packed sequences,
    whose loads hold real tokens only.
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
        self.last_mask: torch.Tensor | None = None
        self.last_load: torch.Tensor | None = None

    def route(self, x: torch.Tensor, token_mask: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Tokens x (B, T, hidden) -> topk_idx (B·T, K), topk_weight (B·T, K); records the last_* statistics,
        counting only the positions where `token_mask` (B, T) is True (all of them without a mask)."""
        flat_mask = None if token_mask is None else token_mask.reshape(-1)  # (N,)
        topk_idx, topk_weight, scores = self.gate(x.reshape(-1, x.shape[-1]), flat_mask)  # (N, K), (N, K), (N, E)
        self.last_scores = scores.reshape(*x.shape[:-1], scores.shape[-1])  # (B, T, E); explicit: B*T may be 0
        self.last_topk_idx = topk_idx.reshape(*x.shape[:-1], topk_idx.shape[-1])  # (B, T, K)
        self.last_mask = token_mask
        self.last_load = expert_load(topk_idx, len(self.experts), flat_mask)  # (E,)
        return topk_idx, topk_weight

    def forward(self, x: torch.Tensor, token_mask: torch.Tensor | None = None) -> torch.Tensor:
        """x (B, T, hidden) -> (B, T, hidden); `token_mask` (B, T) marks the real tokens (see the class doc)."""
        if self.dispatch not in DISPATCH_FNS:
            raise ValueError(f"dispatch={self.dispatch!r} is not known. Use one of {DISPATCHES}.")
        topk_idx, topk_weight = self.route(x, token_mask)  # (N, K), (N, K)
        flat = x.reshape(-1, x.shape[-1])  # (N, hidden)
        y = DISPATCH_FNS[self.dispatch](self.experts, flat, topk_idx, topk_weight).reshape(x.shape)  # (B, T, hidden)
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


# ----------------------------------------------------------------------------- load

def expert_load(topk_idx: torch.Tensor, num_experts: int, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Token-slots routed to each expert: topk_idx (..., K) -> (E,) int64 counts (sums to N·K).

    With `mask` (the shape of topk_idx without K; True on real tokens) only those positions count.
    """
    idx = topk_idx.detach()
    if mask is not None:
        idx = idx[mask]  # (kept, K)
    return torch.bincount(idx.flatten(), minlength=num_experts)  # (E,)
