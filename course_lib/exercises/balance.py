"""Exercises of notebook 05: DeepSeek-V3's sigmoid gate with group-limited routing, and balancing the load.

Sources: DeepSeek-V3 (arXiv:2412.19437) §2.1.2: the gate eqs 12-16 (the bias "only used for routing"), the
bias update ("decrease the bias term by γ if its corresponding expert is overloaded"), the sequence-wise loss
eqs 17-20; group scores as github.com/deepseek-ai/DeepSeek-V3 `inference/model.py` `Gate.forward` (the sum of
each group's two best biased scores).

Letters: N tokens, E routed experts, K top-k, B sequences, T tokens per sequence.
"""

from __future__ import annotations

import torch

from ..presets import DEEPSEEK_V3
from .core import Experiment, Implement, Mistake, Predict
from .decoder import randn
from .experts import compare_routing
from .running import Case


def v3_gate(logits, bias, k, n_group, topk_group, routed_scaling_factor=1.0):
    """DeepSeek-V3's gate: (topk_idx (N, K), topk_weight (N, K)) from router logits (N, E) and the bias (E,)."""
    s = logits.sigmoid()  # (N, E): affinities, eq 15
    choice = s + bias  # (N, E): the bias only picks experts, eq 16
    grouped = choice.view(len(s), n_group, -1)  # (N, n_group, E / n_group)
    group_score = grouped.topk(2, dim=-1).values.sum(-1)  # (N, n_group): each group's two best
    keep = group_score.topk(topk_group, dim=-1).indices  # (N, topk_group)
    allowed = torch.zeros_like(group_score, dtype=torch.bool).scatter_(1, keep, True)  # (N, n_group)
    choice = grouped.masked_fill(~allowed[..., None], float("-inf")).view(len(s), -1)  # (N, E): others never picked
    idx = choice.topk(k, dim=-1).indices  # (N, K)
    weight = s.gather(1, idx)  # (N, K): the UN-biased affinities, eq 13
    return idx, weight / weight.sum(-1, keepdim=True) * routed_scaling_factor  # normalized over the K, eq 13


def _gate_with(score="sigmoid", bias_in_weights=False, normalize=True, group="top2", fill=float("-inf")):
    def gate(logits, bias, k, n_group, topk_group, routed_scaling_factor=1.0):
        s = logits.softmax(-1) if score == "softmax" else logits.sigmoid()
        grouped = (s + bias).view(len(s), n_group, -1)
        group_score = grouped.topk(2, -1).values.sum(-1) if group == "top2" else grouped.amax(-1)
        allowed = torch.zeros_like(group_score, dtype=torch.bool).scatter_(1, group_score.topk(topk_group, -1).indices, True)
        idx = grouped.masked_fill(~allowed[..., None], fill).view(len(s), -1).topk(k, -1).indices
        weight = (s + bias if bias_in_weights else s).gather(1, idx)
        return idx, (weight / weight.sum(-1, keepdim=True) if normalize else weight) * routed_scaling_factor
    return gate


def _weights_sum_to_scale(case: Case, result) -> str | None:
    """Eq 13 normalizes the K weights: each token's sum is the scaling factor."""
    weight = result[1] if isinstance(result, (tuple, list)) and len(result) == 2 else None
    if isinstance(weight, torch.Tensor) and (weight.sum(-1) - case.args[5]).abs().max() > 1e-4:
        return f"each token's weights should sum to routed_scaling_factor = {case.args[5]}"
    return None


def _gate_cases() -> list[Case]:
    def case(seed, N, E, K, n_group, topk_group, low, high, scale=1.0):
        bias = low + (high - low) * torch.rand(E, generator=torch.Generator().manual_seed(seed + 1))
        label = f"N={N} E={E} K={K}, {topk_group} of {n_group} groups, bias in [{low}, {high}]" + (
            f", scale {scale}" if scale != 1.0 else "")
        return Case(label, (randn(seed, N, E, scale=2.0), bias, K, n_group, topk_group, scale))
    return [case(300, 6, 8, 2, 1, 1, -0.1, 0.1), case(310, 12, 16, 4, 4, 2, -0.3, 0.3, 2.5),
            case(320, 8, 16, 3, 4, 2, -1.5, -1.0), case(330, 1, 8, 8, 1, 1, 0.0, 0.0)]


V3_GATE = Implement(
    name="v3_gate", notebook="05",
    statement="Implement v3_gate(logits, bias, k, n_group, topk_group, routed_scaling_factor=1.0) -> (topk_idx, "
              "topk_weight): sigmoid affinities, experts picked by s + b within the best groups (each scored by its "
              "two best), weights from the un-biased s normalized over the K (DeepSeek-V3, arXiv:2412.19437, "
              "§2.1.2 eqs 13-16).",
    hint_text="s = sigmoid(logits); pick with s + bias: view as (N, n_group, E/n_group), score groups by the sum of "
              "their top-2, mask the other groups with -inf, top-k; gather the weights from s (not s + bias), divide "
              "by their sum, times the scaling factor.",
    reference=v3_gate, cases=_gate_cases, compare=compare_routing, properties=_weights_sum_to_scale,
    mistakes=(
        Mistake("a softmax gate where V3 uses a sigmoid", "Eq 15: s = Sigmoid(u^T e); V2's softmax couples the experts, "
                "V3 scores each one on its own.", _gate_with(score="softmax")),
        Mistake("the bias used in the weights as well as the selection", "The bias only picks experts (eq 16); the "
                "weights gather the un-biased s.", _gate_with(bias_in_weights=True)),
        Mistake("the weights not normalized over the K", "Eq 13 divides each selected s by the sum over the K selected.",
                _gate_with(normalize=False)),
        Mistake("groups scored by their best expert instead of their two best", "V3 scores a group by the sum of its "
                "two highest biased scores (V2 used the max).", _gate_with(group="max")),
        Mistake("excluded groups masked with 0 instead of -inf", "With the bias, scores can be negative and a masked "
                "0 would beat them: mask with -inf.", _gate_with(fill=0.0))))


def update_bias(bias: torch.Tensor, load: torch.Tensor, gamma: float = 1e-3) -> torch.Tensor:
    """The auxiliary-loss-free update: b_i + γ sign(mean(load) - load_i); an expert at the mean keeps its bias."""
    load = load.float()
    return bias + gamma * torch.sign(load.mean() - load)


BIAS_UPDATE = Implement(
    name="bias_update", notebook="05",
    statement="Implement update_bias(bias, load, gamma=1e-3) -> new bias: raise an underloaded expert's bias by γ, "
              "lower an overloaded one's by γ (DeepSeek-V3, arXiv:2412.19437, §2.1.2).",
    hint_text="torch.sign(mean(load) - load) is +1 under the mean, -1 over it and 0 exactly at it; convert the "
              "counts to float first.",
    reference=update_bias,
    cases=lambda: [Case("load [8, 0, 4, 4], γ=0.001", (torch.zeros(4), torch.tensor([8, 0, 4, 4]), 1e-3)),
                   Case("load [3, 3, 3] (balanced)", (torch.tensor([0.1, -0.2, 0.0]), torch.tensor([3, 3, 3]), 1e-3)),
                   Case("load (16,) random, γ=0.01", (randn(340, 16, scale=0.01),
                        torch.randint(0, 9, (16,), generator=torch.Generator().manual_seed(341)), 1e-2))],
    atol=1e-7,
    mistakes=(
        Mistake("the sign flipped (the busy expert's bias raised)", "An overloaded expert (load above the mean) must "
                "get a LOWER bias so it is picked less: sign(mean - load).",
                lambda b, load, g=1e-3: b + g * torch.sign(load.float() - load.float().mean())),
        Mistake("a step proportional to the imbalance", "V3 moves every bias by exactly γ: the sign of the imbalance, "
                "not its size.", lambda b, load, g=1e-3: b + g * (load.float().mean() - load.float())),
        Mistake("an expert exactly at the mean treated as underloaded", "sign(0) = 0: an expert at the mean keeps its "
                "bias.", lambda b, load, g=1e-3: b + g * torch.where(load.float() > load.float().mean(), -1.0, 1.0))))


def sequence_balance_loss(scores: torch.Tensor, k: int, alpha: float = 1e-4) -> torch.Tensor:
    """V3's sequence-wise balance loss (eqs 17-20) for sigmoid scores (B, T, E), averaged over the B sequences."""
    B, T, E = scores.shape
    idx = scores.topk(k, dim=-1).indices  # (B, T, K): eq 18's Topk
    counts = torch.zeros(B, E).scatter_add_(1, idx.reshape(B, -1), torch.ones(B, T * k))  # (B, E)
    f = counts * E / (k * T)  # (B, E): eq 18, 1 for every expert when balanced
    P = (scores / scores.sum(-1, keepdim=True)).mean(1)  # (B, E): eqs 19-20, normalized affinities
    return alpha * (f * P).sum(-1).mean()  # eq 17, averaged over sequences


def _seq_loss_batch(scores, k, alpha=1e-4):
    B, T, E = scores.shape
    return sequence_balance_loss(scores.reshape(1, B * T, E), k, alpha)


def _seq_loss_raw(scores, k, alpha=1e-4):
    B, T, E = scores.shape
    idx = scores.topk(k, -1).indices
    f = torch.zeros(B, E).scatter_add_(1, idx.reshape(B, -1), torch.ones(B, T * k)) * E / (k * T)
    return alpha * (f * scores.mean(1)).sum(-1).mean()


BALANCE_LOSS = Implement(
    name="sequence_balance_loss", notebook="05",
    statement="Implement sequence_balance_loss(scores, k, alpha=1e-4) for sigmoid scores (B, T, E): "
              "α Σ_i f_i P_i per sequence, averaged (DeepSeek-V3, arXiv:2412.19437, §2.1.2 eqs 17-20).",
    hint_text="Per sequence: f_i = E / (K T) x how often expert i is in a token's top-K; P_i = the mean over tokens of "
              "s_i / Σ_j s_j (eq 19 normalizes the sigmoid scores). Then α Σ_i f_i P_i, averaged over sequences.",
    reference=sequence_balance_loss, atol=1e-9, rtol=1e-4,
    cases=lambda: [Case("scores (1, 6, 4), k=2", (randn(350, 1, 6, 4).sigmoid(), 2)),
                   Case("scores (3, 8, 8), k=2", (randn(351, 3, 8, 8, scale=2.0).sigmoid(), 2)),
                   Case("scores (2, 5, 16), k=4, α=0.01", (randn(352, 2, 5, 16, scale=3.0).sigmoid(), 4, 0.01))],
    mistakes=(
        Mistake("raw sigmoid scores in P", "Eq 19 divides each token's scores by their sum before the mean.",
                _seq_loss_raw),
        Mistake("counted over the whole batch instead of per sequence", "The loss is sequence-wise: f and P per "
                "sequence, then the mean of the B losses.", _seq_loss_batch),
        Mistake("f without the factor E / (K T)", "Eq 18 scales the count by N_r / (K_r T) so a balanced router "
                "gives f_i = 1.", lambda s, k, alpha=1e-4: sequence_balance_loss(s, k, alpha) / s.shape[-1])))


V3_CANDIDATES = Predict(
    name="v3_candidate_experts", notebook="05",
    statement="DeepSeek-V3 has 256 routed experts in 8 groups and lets a token use its best 4 groups: from how "
              "many experts does each token pick its 8? (DeepSeek-V3, arXiv:2412.19437, §2.1.2 and §4.2).",
    hint_text="Experts per group times the groups a token may use.",
    value=DEEPSEEK_V3.n_routed_experts // DEEPSEEK_V3.n_group * DEEPSEEK_V3.topk_group, unit="experts",
    how="256 / 8 = 32 experts per group, 4 groups: 128 candidates (on at most 4 nodes)",
    mistakes=(Mistake("one group's experts", "A token may use 4 groups, not 1.", 32),
              Mistake("the groups left out", "Group-limited routing removes the other 4 groups first.", 256)))


def _balancing(m) -> str | None:
    if m["max_vio_aux_free"] >= m["max_vio_none"]:
        return (f"MaxVio {m['max_vio_aux_free']:.2f} with the bias against {m['max_vio_none']:.2f} without: the bias "
                f"should lower it")
    if m["loss_aux_free"] > 1.1 * m["loss_none"]:
        return "the language-model loss with the bias is more than 10% above the one without: it should cost little"
    return None


BALANCING = Experiment(
    name="aux_free_vs_none", notebook="05",
    statement="Train the DeepSeekMoE model of section 3 with no balancing and with the aux-loss-free bias (γ = 0.001 "
              "and γ = 0.01), and record the final MaxVio and language-model loss of each.",
    hint_text="balancing.LoadTracker(model, gamma=...) is the bias update; tracker.final() gives MaxVio and loss.",
    expected="the bias brings MaxVio well below the unbalanced run's at little or no cost in loss; a larger γ "
             "balances faster but oscillates more.",
    required=("max_vio_none", "max_vio_aux_free", "loss_none", "loss_aux_free"), judge=_balancing,
    example={"max_vio_none": 1.9, "max_vio_aux_free": 0.3, "loss_none": 0.52, "loss_aux_free": 0.51},
    against={"max_vio_none": 0.4, "max_vio_aux_free": 0.6, "loss_none": 0.52, "loss_aux_free": 0.51})


EXERCISES = [V3_GATE, BIAS_UPDATE, BALANCE_LOSS, V3_CANDIDATES, BALANCING]
