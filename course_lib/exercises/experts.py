"""Exercises of notebooks 04 and 05: top-k routing, sort-and-scatter dispatch, load statistics, DeepSeek-V3's gate
and its balancing.

Sources: the softmax router, DeepSeek-V2 (arXiv:2405.04434) §2.2 eqs 20-22; DeepSeekMoE (arXiv:2401.06066) §3;
the sigmoid gate, group-limited routing and the auxiliary-loss-free bias, DeepSeek-V3 (arXiv:2412.19437)
§2.1.2 eqs 12-20 (group scores as github.com/deepseek-ai/DeepSeek-V3 `inference/model.py` `Gate.forward`);
MaxVio, Wang et al. 2024 (arXiv:2408.15664).

Letters: N tokens, d hidden width, E routed experts, K top-k, B sequences, T tokens per sequence.
"""

from __future__ import annotations

import torch
from torch import nn

from ..config import ModelConfig
from ..moe import DeepSeekMoE
from .core import Experiment, Implement, Mistake, Predict
from .decoder import randn
from .running import Case, difference


def by_expert(result) -> tuple:
    """(idx, weights) of a router with each row's experts in ascending id order: the order top-k returns is free."""
    idx, weight = result
    order = idx.argsort(dim=-1)
    return idx.gather(-1, order), weight.gather(-1, order)


def compare_routing(got, expected) -> str | None:
    """Routing results agree when every token picks the same experts with the same weights, in any order."""
    if not isinstance(got, (tuple, list)) or len(got) != 2 or not all(isinstance(t, torch.Tensor) for t in got):
        return "the result should be a pair (topk_idx, topk_weight) of tensors"
    if got[0].shape != expected[0].shape:
        return difference(got[0], expected[0], what="topk_idx")
    return difference(by_expert(got), by_expert(expected), atol=1e-5, rtol=1e-4, what="(topk_idx, topk_weight)")


# ----------------------------------------------------------------------------- 04: the router

def topk_routing(logits: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """DeepSeek-V2's router: softmax over all E experts, keep the K best and their probabilities as gates."""
    probs = logits.softmax(dim=-1)  # (N, E): s_{i,t}, eq 22
    weight, idx = probs.topk(k, dim=-1)  # (N, K): g_{i,t} = s_{i,t} for the K best, eq 21
    return idx, weight


def _routing_cases() -> list[Case]:
    return [Case("logits (6, 8), k=2", (randn(200, 6, 8), 2)), Case("logits (16, 16), k=4", (randn(201, 16, 16), 4)),
            Case("logits (1, 4), k=1", (randn(202, 1, 4), 1)), Case("logits (5, 6), k=6 (every expert)", (randn(203, 5, 6), 6))]


TOPK_ROUTING = Implement(
    name="topk_routing", notebook="04",
    statement="Implement topk_routing(logits, k) -> (topk_idx, topk_weight): softmax over all E experts, then the K "
              "largest probabilities as gates, not renormalized (DeepSeek-V2, arXiv:2405.04434, §2.2 eqs 21-22).",
    hint_text="logits.softmax(-1) first, then .topk(k, dim=-1), which returns (values, indices).",
    reference=topk_routing, cases=_routing_cases, compare=compare_routing,
    mistakes=(
        Mistake("a softmax over the K selected logits only", "Eq 22 takes the softmax over all E experts, then "
                "keeps K of those probabilities: they sum to less than 1 (Mixtral renormalizes; V2 does not).",
                lambda logits, k: (logits.topk(k, -1).indices, logits.topk(k, -1).values.softmax(-1))),
        Mistake("the K lowest scores", "topk picks the largest by default; do not pass largest=False.",
                lambda logits, k: (logits.softmax(-1).topk(k, -1, largest=False).indices,
                                   logits.softmax(-1).topk(k, -1, largest=False).values)),
        Mistake("a sigmoid instead of a softmax", "DeepSeek-V2's gate is a softmax over the experts (V3's is a "
                "sigmoid, notebook 05).", lambda logits, k: (logits.topk(k, -1).indices, logits.sigmoid().topk(k, -1).values))))


# ----------------------------------------------------------------------------- 04: dispatch

def sort_scatter_dispatch(x: torch.Tensor, topk_idx: torch.Tensor, topk_weight: torch.Tensor, experts) -> torch.Tensor:
    """y_t = sum_k g_{t,k} FFN_{e(t,k)}(x_t): sort the N*K slots by expert, run each expert once, scatter-add back."""
    N, K = topk_idx.shape
    flat = topk_idx.flatten()  # (N*K,): the expert of every token-slot
    order = flat.argsort(stable=True)  # (N*K,): slots grouped by expert
    token = order // K  # (N*K,): the token each sorted slot belongs to
    counts = torch.bincount(flat, minlength=len(experts)).tolist()  # slots per expert
    outputs = [expert(seg) for expert, seg in zip(experts, x[token].split(counts))]  # one call per expert
    y = torch.cat(outputs) * topk_weight.flatten()[order, None]  # (N*K, d): gated, still in sorted order
    return torch.zeros_like(x).index_add_(0, token, y)  # (N, d): every slot added into its token


def _experts(seed: int, E: int, d: int) -> nn.ModuleList:
    torch.manual_seed(seed)  # the experts' weights, seeded
    return nn.ModuleList(nn.Sequential(nn.Linear(d, 2 * d), nn.SiLU(), nn.Linear(2 * d, d)) for _ in range(E))


def _dispatch_cases() -> list[Case]:
    def case(seed, N, d, E, K, idx=None):
        gen = torch.Generator().manual_seed(seed)
        idx = torch.rand(N, E, generator=gen).argsort(-1)[:, :K] if idx is None else idx
        label = f"N={N} d={d} E={E} K={K}" + (" (expert 0 gets no token)" if (idx != 0).all() else "")
        return Case(label, (randn(seed, N, d), idx, torch.rand(N, K, generator=gen), _experts(seed, E, d)))
    with torch.random.fork_rng(devices=[]):  # the experts' seed leaves the caller's random state alone
        return [case(210, 5, 4, 4, 2), case(220, 32, 8, 8, 3),
                case(230, 6, 4, 4, 2, torch.tensor([[1, 2], [2, 3], [3, 1], [1, 2], [2, 3], [3, 1]])),
                case(240, 1, 8, 6, 6)]


def _dispatch_weights_unsorted(x, topk_idx, topk_weight, experts):
    K = topk_idx.shape[1]
    order = topk_idx.flatten().argsort(stable=True)
    counts = torch.bincount(topk_idx.flatten(), minlength=len(experts)).tolist()
    y = torch.cat([e(s) for e, s in zip(experts, x[order // K].split(counts))]) * topk_weight.flatten()[:, None]
    return torch.zeros_like(x).index_add_(0, order // K, y)


def _dispatch_assign(x, topk_idx, topk_weight, experts):
    y = torch.zeros_like(x)
    for e, expert in enumerate(experts):
        tok, slot = torch.where(topk_idx == e)
        if len(tok):
            y[tok] = expert(x[tok]) * topk_weight[tok, slot, None]  # overwrites the token's other experts
    return y


def _dispatch_no_gate(x, topk_idx, topk_weight, experts):
    return sort_scatter_dispatch(x, topk_idx, torch.ones_like(topk_weight), experts)


DISPATCH = Implement(
    name="sort_scatter_dispatch", notebook="04",
    statement="Implement sort_scatter_dispatch(x, topk_idx, topk_weight, experts): sort the N*K token-slots by "
              "expert, run each expert once on its segment, and add each gated output back into its token "
              "(DeepSeek-V3, arXiv:2412.19437, eq 12, routed part).",
    hint_text="flat = topk_idx.flatten(); order = flat.argsort(stable=True); token = order // K; counts = "
              "bincount(flat, minlength=E); split x[token] by counts; gate with topk_weight.flatten()[order]; "
              "combine with index_add_ (a token's K slots must add up).",
    reference=sort_scatter_dispatch, cases=_dispatch_cases,
    slow_hint="Did you loop over tokens? Sort the slots by expert once and call each expert on its whole segment.",
    mistakes=(
        Mistake("the gates not sorted with their slots", "After sorting the slots by expert, take the weights in "
                "the same order: topk_weight.flatten()[order].", _dispatch_weights_unsorted),
        Mistake("outputs assigned instead of added", "A token has K experts: y[tok] = ... keeps only the last one. "
                "Sum them with index_add_ (or +=).", _dispatch_assign),
        Mistake("the gates left out", "Multiply each expert's output by its gate g_{i,t} before adding.",
                _dispatch_no_gate)))


# ----------------------------------------------------------------------------- 04: load statistics

def max_violation(load: torch.Tensor) -> float:
    """MaxVio = max_i load_i / mean(load) - 1: 0 when every expert gets its share."""
    load = load.float()
    return (load.max() / load.mean() - 1).item()


MAX_VIO = Implement(
    name="max_violation", notebook="04",
    statement="Implement max_violation(load) -> float: MaxVio = max_i load_i / mean(load) - 1 for token counts "
              "load (E,) (Wang et al., arXiv:2408.15664, §4.1).",
    hint_text="Convert the counts to float first (bincount gives integers), divide the largest by the mean, "
              "subtract 1, and return a Python float (.item()).",
    reference=max_violation,
    cases=lambda: [Case("load [4, 4, 4, 4] (balanced)", (torch.tensor([4, 4, 4, 4]),)),
                   Case("load [10, 2, 0, 4]", (torch.tensor([10, 2, 0, 4]),)),
                   Case("load [1, 0, 0, 0, 0, 0, 0, 0] (collapse)", (torch.tensor([1, 0, 0, 0, 0, 0, 0, 0]),)),
                   Case("load (64,) random", (torch.randint(0, 50, (64,), generator=torch.Generator().manual_seed(250)),))],
    mistakes=(
        Mistake("max / min instead of max / mean", "MaxVio compares the busiest expert with the MEAN load "
                "(an idle expert makes max / min infinite).", lambda load: (load.float().max() / load.float().min() - 1).item()),
        Mistake("the -1 left out", "Subtract 1, so that perfect balance gives 0.",
                lambda load: (load.float().max() / load.float().mean()).item()),
        Mistake("(max - mean) / max", "Divide by the mean load, not by the max.",
                lambda load: ((load.float().max() - load.float().mean()) / load.float().max()).item())))


def _moe_config() -> ModelConfig:
    return ModelConfig(hidden_size=128, ffn="moe", n_routed_experts=16, num_experts_per_tok=3, n_shared_experts=1,
                       moe_intermediate_size=88)


def _active_moe() -> int:
    layer = DeepSeekMoE(_moe_config())
    return sum(p.numel() for p in layer.parameters()) - layer.inactive_parameters()


MOE_ACTIVE = Predict(
    name="moe_active_parameters", notebook="04",
    statement="Predict the parameters one token uses in an MoE layer of width 128 with 16 routed SwiGLU experts of "
              "width 88, top-3, one shared expert of width 88, and a router (16 x 128).",
    hint_text="A SwiGLU expert has 3 d I weights. A token runs its K routed experts and the shared one; the router "
              "scores every expert for every token.",
    value=_active_moe, unit="parameters", how="(3 + 1) x 3 x 128 x 88 + 16 x 128 = 135,168 + 2,048",
    mistakes=(Mistake("all 16 routed experts counted", "Only the K = 3 selected experts run for a token.",
                      lambda right: right + 13 * 3 * 128 * 88),
              Mistake("the shared expert left out", "The shared expert runs for every token.",
                      lambda right: right - 3 * 128 * 88),
              Mistake("the router left out", "The router's 16 x 128 weights score every token.",
                      lambda right: right - 16 * 128)))


def _imbalance(m) -> str | None:
    if m["max_vio_last_steps"] <= m["max_vio_first_steps"]:
        return (f"MaxVio went from {m['max_vio_first_steps']:.2f} to {m['max_vio_last_steps']:.2f}: it did not grow "
                f"during training without balancing")
    return None


IMBALANCE = Experiment(
    name="self_feeding_imbalance", notebook="04",
    statement="Train the MoE model of section 5 without any balancing for twice as many steps, and compare the mean "
              "MaxVio of the first 10 steps with that of the last 10.",
    hint_text="balancing.LoadTracker records MaxVio per step (tracker.max_vio); train_lm's callback runs it.",
    expected="MaxVio grows: experts that win tokens early get more gradient, become better at those tokens, and "
             "win more of them.",
    required=("max_vio_first_steps", "max_vio_last_steps"), judge=_imbalance,
    example={"max_vio_first_steps": 0.4, "max_vio_last_steps": 1.6},
    against={"max_vio_first_steps": 0.9, "max_vio_last_steps": 0.3})


EXERCISES = [TOPK_ROUTING, DISPATCH, MAX_VIO, MOE_ACTIVE, IMBALANCE]
