"""Load balancing for DeepSeekMoE: auxiliary losses, the auxiliary-loss-free bias update, capacity
dropping, and the load statistics that compare them (notebook 05).

Every method reads the routing a `DeepSeekMoE` forward recorded (`last_scores`, `last_topk_idx`,
`last_load`). Sources: Switch Transformer's loss (Fedus et al. 2021, arXiv:2101.03961 §2.2); DeepSeek-V2's
expert-level loss ([V2] arXiv:2405.04434 §2.2.3 eqs 23-25); DeepSeek-V3's sequence-wise loss and
auxiliary-loss-free bias ([V3] arXiv:2412.19437 §2.1.2 eqs 16-20); MaxVio from [LF] (Wang et al. 2024,
arXiv:2408.15664); capacity dropping as DeepSeek-V2 ([V2] §2.2.4).

Letters: B batch, T tokens per sequence, N tokens, E routed experts, K top-k, L MoE layers.
"""

from __future__ import annotations

import math
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from .model import lm_loss
from .moe import DeepSeekMoE, TopkRouter, group_by_expert

def switch_aux_loss(probs: torch.Tensor, alpha: float = 0.01, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Switch Transformer's load-balancing loss α·E·Σ_i f_i P_i over all tokens of probs (..., E).

    Fedus et al. 2021 (Switch Transformers, arXiv:2101.03961) §2.2 eqs 4–6: f_i = fraction of
    tokens whose top-1 expert is i, P_i = mean router probability of expert i; α = 1e-2 in that paper.
    GShard's l_aux is the same f·P product with first-choice counts under a different constant.
    Counting only the first choice is what sets it apart from `expert_balance_loss`. Pass softmax
    probabilities (normalize sigmoid scores first, as `sequence_balance_loss` does). With `mask` (the
    shape of probs without E), only the real tokens count.
    """
    probs = probs.reshape(-1, probs.shape[-1])  # (N, E)
    if mask is not None:
        probs = probs[mask.reshape(-1)]  # (real tokens, E)
    E = probs.shape[-1]
    f = F.one_hot(probs.argmax(-1), E).float().mean(0)  # (E,)
    P = probs.mean(0)  # (E,)
    return alpha * E * (f * P).sum()


def _f_times_p(probs: torch.Tensor, topk_idx: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Σ_i f_i P_i per sequence, averaged over sequences; f_i = E/(K·T)·count_i, P_i = mean_t probs_i.

    With `mask` (B, T), T is each sequence's count of real tokens and only they are summed; a sequence
    with none is left out of the mean."""
    if probs.ndim == 2:
        probs, topk_idx = probs[None], topk_idx[None]  # (1, T, E), (1, T, K)
        mask = None if mask is None else mask[None]  # (1, T)
    _, T, E = probs.shape
    K = topk_idx.shape[-1]
    if mask is None:
        counts = F.one_hot(topk_idx, E).sum(dim=(1, 2)).float()  # (B, E)
        f = counts * E / (K * T)  # (B, E)
        P = probs.mean(1)  # (B, E)
        return (f * P).sum(-1).mean()
    m = mask.to(probs.dtype)  # (B, T)
    n = m.sum(1, keepdim=True)  # (B, 1) real tokens per sequence
    keep = n[:, 0] > 0  # (B,)
    counts = (F.one_hot(topk_idx, E).sum(2).float() * m[..., None]).sum(1)  # (B, E)
    f = counts[keep] * E / (K * n[keep])  # (B', E)
    P = (probs * m[..., None]).sum(1)[keep] / n[keep]  # (B', E)
    return (f * P).sum(-1).mean() if keep.any() else probs.sum() * 0.0


# L_ExpBal = α1 Σ_i f_i P_i,  f_i = N_r/(K_r T) Σ_t 1(token t selects i),  P_i = (1/T) Σ_t s_{i,t}   [V2] 23–25
def expert_balance_loss(probs: torch.Tensor, topk_idx: torch.Tensor, alpha: float = 0.003,
                        mask: torch.Tensor | None = None) -> torch.Tensor:
    """DeepSeek-V2's expert-level balance loss ([V2] §2.2.3, eqs 23–25; α1 = 0.003, §3.1.2).

    probs (B, T, E) softmax affinities and topk_idx (B, T, K), or (T, E) and (T, K) for one sequence. T is
    the tokens of a sequence, as the paper defines it; the loss is averaged over the B sequences. f counts
    all K selections (scaled so a perfectly balanced router gives f_i = 1 and the loss is α). With `mask`
    (B, T), True on real tokens, T counts a sequence's real tokens and padding adds nothing.
    """
    return alpha * _f_times_p(probs, topk_idx, mask)


# L_Bal = α Σ_i f_i P_i,  f_i = N_r/(K_r T) Σ_t 1(s_{i,t} ∈ Topk(s_t, K_r))     [V3] eqs 17–18
# s'_{i,t} = s_{i,t} / Σ_j s_{j,t},  P_i = (1/T) Σ_t s'_{i,t}                   [V3] eqs 19–20
def sequence_balance_loss(scores: torch.Tensor, k: int, alpha: float = 1e-4, topk_idx: torch.Tensor | None = None,
                          mask: torch.Tensor | None = None) -> torch.Tensor:
    """DeepSeek-V3's complementary sequence-wise balance loss ([V3] §2.1.2, eqs 17–20; α = 1e-4, §4.2).

    scores (B, T, E) are the raw sigmoid affinities s; they are normalized per token (eq 19) before the mean.
    By default f counts the top-K of the UN-biased s, as eq 18 is printed; pass `topk_idx` (B, T, K) to count
    the experts actually routed to (bias- and group-limited selection, eq 16) instead. With `mask` (B, T),
    only real tokens count, as in `expert_balance_loss`.
    """
    if topk_idx is None:
        topk_idx = scores.topk(k, dim=-1).indices  # (B, T, K)
    probs = scores / scores.sum(-1, keepdim=True)  # (B, T, E)  eq 19
    return alpha * _f_times_p(probs, topk_idx, mask)


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
                  capacity_factor: float = 1.0, by: str = "score", mask: torch.Tensor | None = None) -> torch.Tensor:
    """Token dropping under a capacity factor: (N, K) bool, True for the token-slots that are dropped.

    Each expert takes at most C = ceil(capacity_factor · N·K / E) slots. by="score" drops the slots with the
    lowest routing weight first, the rule DeepSeek-V2 applies per device ([V2] §2.2.4; here per expert);
    by="position" keeps the earliest tokens, as Switch Transformer does. DeepSeek-V3 drops nothing
    ([V3] §2.1.2); this is for contrast. To apply it, zero the dropped weights:
    `topk_weight.masked_fill(dropped, 0)`. With `mask` (N,), True on real tokens, N counts real tokens only
    and padding never takes a slot (its slots come back dropped: it has no output worth computing).
    """
    if by not in ("score", "position"):
        raise ValueError(f"by={by!r} is not known. Use 'score' or 'position'.")
    N, K = topk_idx.shape
    real = torch.ones(N, dtype=torch.bool, device=topk_idx.device) if mask is None else mask.reshape(N)  # (N,)
    C = math.ceil(capacity_factor * int(real.sum()) * K / num_experts)
    real_slot = real.repeat_interleave(K)  # (N·K,)
    queue = torch.where(real_slot, topk_idx.flatten(), num_experts)  # (N·K,) padding waits in a queue of its own
    priority = None  # token order
    if by == "score":
        priority = topk_weight.flatten().argsort(descending=True, stable=True)  # (N·K,) best first
    order, rank, _ = group_by_expert(queue, num_experts + 1, priority)  # (N·K,) place in its expert's queue
    dropped = torch.zeros(N * K, dtype=torch.bool, device=topk_idx.device)
    dropped[order] = rank >= C
    return (dropped | ~real_slot).reshape(N, K)  # (N, K)


# ----------------------------------------------------------------------------- load statistics

def max_violation(load: torch.Tensor) -> float:
    """MaxVio = max_i load_i / mean(load) − 1, 0 when perfectly balanced.

    The imbalance metric of [LF] (Wang et al. 2024, arXiv:2408.15664, its MaxVio).
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


def dropped_fraction(dropped: torch.Tensor, mask: torch.Tensor | None = None) -> float:
    """Fraction of token-slots dropped (from `capacity_drop`), over the real tokens' slots when `mask` (N,)
    marks them."""
    if mask is not None:
        dropped = dropped[mask.reshape(-1)]  # (real tokens, K)
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
    mask = moe.last_mask  # (B, T) real tokens, or None: padding never counts
    if method == "switch":
        return switch_aux_loss(router_probs(moe), alpha, mask)
    if method == "expert":
        return expert_balance_loss(router_probs(moe), moe.last_topk_idx, alpha, mask)
    if method == "sequence":
        return sequence_balance_loss(moe.last_scores, moe.gate.top_k, alpha, topk_idx=moe.last_topk_idx, mask=mask)
    raise ValueError(f"method={method!r} has no auxiliary loss. Use one of {AUX_LOSSES}.")


def balancing_loss_fn(method: str, alpha: float = 0.01, base: Callable | None = None) -> Callable:
    """A `loss_fn(model, batch, mask)` for `train_lm`: `base` (default: next-token loss) plus, for the
    methods in AUX_LOSSES, α times that balance loss summed over the model's MoE layers.

    The returned function keeps each call's `base` loss in `loss_fn.lm_losses`, so methods can be compared
    on the language-model loss alone (train_lm's own record includes the auxiliary term).
    """
    if method not in BALANCING:
        raise ValueError(f"method={method!r} is not known. Use one of {BALANCING}.")
    base = base or lm_loss

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
    as DeepSeek-V2 does ([V2] §3.1.2). `last_dropped` (N, K) holds the last training forward's drops and
    `last_mask` (N,) its real tokens (padding takes no slot; see `capacity_drop`).
    """

    def __init__(self, gate: TopkRouter, capacity_factor: float, by: str = "score") -> None:
        self.capacity_factor, self.by = capacity_factor, by
        self.num_experts = gate.weight.shape[0]
        self.last_dropped: torch.Tensor | None = None
        self.last_mask: torch.Tensor | None = None
        self.handle = gate.register_forward_hook(self)

    def __call__(self, gate: nn.Module, inputs, output):
        if not gate.training:
            return output
        topk_idx, topk_weight, scores = output  # (N, K), (N, K), (N, E)
        mask = inputs[1] if len(inputs) > 1 else None  # (N,): the router's token_mask
        dropped = capacity_drop(topk_idx, topk_weight, self.num_experts, self.capacity_factor, self.by, mask)  # (N, K)
        self.last_dropped, self.last_mask = dropped, mask
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
        on_device = layer_loads(self.layers)  # (L, E), where the model is
        loads = on_device.cpu()  # one copy (one wait on a GPU) instead of one per statistic below
        self.steps.append(step)
        self.loads.append(loads)
        self.max_vio.append(mean_max_violation(loads))
        self.entropy.append(sum(load_entropy(row, normalized=True) for row in loads) / len(loads))
        if self.capacity:
            self.dropped.append(sum(dropped_fraction(c.last_dropped, c.last_mask) for c in self.capacity)
                                / len(self.capacity))
        if loss is not None:
            self.losses.append(float(loss))
        if self.gamma > 0:
            for m, load in zip(self.layers, on_device):  # on the device: no wait
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
