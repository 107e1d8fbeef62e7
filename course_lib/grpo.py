"""GRPO: group-relative advantages, the clipped surrogate, the k3 KL, and the loss variants.

The first part is pure math on tensors; the second samples groups on the model's KV cache and
trains (``sample_groups``, ``completion_logprobs``, ``batch_loss``, ``train_grpo``). Sources are the tags of
DEEPSEEK_REFERENCE.md §3: GRPO [Math] §4.1 eqs 3–4, Dr. GRPO [DrGRPO] §3, DAPO [DAPO] §3.

Shapes: P prompts, G completions per prompt (the group), B = P·G sequences ordered group-major
(prompt p's G completions are rows p·G … p·G+G−1, i.e. ``rearrange(adv, "p g -> (p g)")``),
T completion tokens (padded), V vocabulary.
"""

import torch
from einops import rearrange

AGGREGATIONS = ("sequence", "token", "dr_grpo")


# Â_i = (r_i − mean(r)) / std(r)      [Math] §4.1.2, [DAPO] eq 9
# Â_i =  r_i − mean(r)                [DrGRPO] §3 (no std: removes the question-difficulty bias)
def group_advantages(rewards: torch.Tensor, scale: bool = True, eps: float = 1e-4) -> torch.Tensor:
    """Group-relative advantages (P, G) -> (P, G): ``(r − mean) / (std + eps)`` within each group.

    GRPO's outcome supervision ([Math] §4.1.2) normalizes each group's rewards by its mean and
    standard deviation and gives that value to every token of the completion. The paper does not
    say which std; like TRL's ``GRPOTrainer`` this uses the sample std (``correction=1``, divide by
    G−1) and adds ``eps`` (TRL's 1e-4) to the denominator. ``scale=False`` is Dr. GRPO's
    ``r − mean`` ([DrGRPO] §3). A group whose rewards all tie gets exactly 0, not a rounding residue:
    it carries no learning signal (the groups ``zero_variance_mask`` filters out).
    """
    if rewards.ndim != 2 or rewards.shape[1] < 2:
        raise ValueError(f"rewards must be (P, G) with G >= 2, got shape {tuple(rewards.shape)}")
    if not rewards.is_floating_point():
        rewards = rewards.to(torch.get_default_dtype())
    adv = rewards - rewards.mean(dim=1, keepdim=True)  # (P, G)
    if scale:
        adv = adv / (rewards.std(dim=1, keepdim=True, correction=1) + eps)  # (P, G)
    # mean() of G equal floats need not equal them (0.1 * 3 / 3 != 0.1), so pin ties to zero.
    return torch.where(zero_variance_mask(rewards)[:, None], adv, torch.zeros_like(adv))


def zero_variance_mask(rewards: torch.Tensor) -> torch.Tensor:
    """(P, G) -> (P,) bool: True for groups whose rewards are not all equal (the ones to keep).

    DAPO's dynamic sampling ([DAPO] §3.2, eq 11) keeps only prompts with 0 < #correct < G: a group
    that is all right or all wrong has zero advantage everywhere, so it adds no gradient and only
    dilutes the batch.
    """
    return rewards.amax(dim=1) != rewards.amin(dim=1)  # (P,)


def token_logprobs(logits: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """log π(tokens): (B, T, V) logits and (B, T) ids -> (B, T), in at least float32.

    ``logits[:, t]`` must be the distribution over ``tokens[:, t]``; for a causal LM that means
    passing ``logits[:, :-1]`` with ``ids[:, 1:]``. Uses ``x_y − logsumexp(x)`` rather than a full
    ``log_softmax`` so no second (B, T, V) tensor is kept.
    """
    if logits.shape[:-1] != tokens.shape:
        raise ValueError(f"logits {tuple(logits.shape)} and tokens {tuple(tokens.shape)} disagree on (B, T)")
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32))  # bf16/fp16 -> fp32
    picked = logits.gather(-1, tokens.long().unsqueeze(-1)).squeeze(-1)  # (B, T)
    return picked - torch.logsumexp(logits, dim=-1)  # (B, T)


# D_KL[π_θ || π_ref] = π_ref/π_θ − log(π_ref/π_θ) − 1      [Math] eq 4
def kl_k3(logp: torch.Tensor, ref_logp: torch.Tensor) -> torch.Tensor:
    """Per-token k3 KL estimator ``exp(ref − logp) − (ref − logp) − 1``, elementwise, >= 0.

    The "unbiased estimator" of [Math] eq 4 (Schulman's k3), nonnegative for every sample, zero when
    the two log-probs agree. ``expm1`` keeps it accurate when they nearly agree.
    """
    d = ref_logp - logp
    return torch.expm1(d) - d


# J = E[ agg_{i,t} min(ρ Â, clip(ρ, 1−ε_low, 1+ε_high) Â) − β D_KL ],  ρ = π_θ/π_θold
#     [Math] eq 3 (ε_low = ε_high), [DAPO] eq 8 (token-level agg, β = 0)
def grpo_loss(
    logp: torch.Tensor,
    old_logp: torch.Tensor,
    adv: torch.Tensor,
    mask: torch.Tensor,
    *,
    ref_logp: torch.Tensor | None = None,
    beta: float = 0.0,
    eps_low: float = 0.2,
    eps_high: float | None = None,
    aggregation: str = "sequence",
    max_len: int | None = None,
) -> tuple[torch.Tensor, dict[str, float]]:
    """The GRPO family's loss (the negative objective) and a few stats.

    Per token ``l = min(ρÂ, clip(ρ, 1−eps_low, 1+eps_high)Â) − beta·k3`` with ``ρ = exp(logp − old_logp)``
    ([Math] eq 3; the asymmetric band is DAPO's Clip-Higher, [DAPO] §3.1, e.g. 0.2/0.28). Then
    (reference §3.6):

    - ``"sequence"``: mean over each sequence's tokens, then mean over sequences (GRPO, [Math] eq 3).
    - ``"token"``: sum over all tokens / number of tokens (DAPO token-level loss, [DAPO] §3.3 eq 12).
    - ``"dr_grpo"``: sum over all tokens / (B · max_len), a constant ([DrGRPO] §3). ``max_len=None``
      uses the padded width T, which is constant only if batches are padded to a fixed length.

    Shapes: ``logp``, ``old_logp``, ``ref_logp``, ``mask`` (B, T); ``adv`` (B,) per sequence or (B, T).
    ``old_logp``, ``ref_logp`` and ``adv`` are treated as constants. Positions where ``mask`` is
    false contribute nothing, not even NaNs. Stats: ``clip_frac`` (tokens whose gradient the clip
    zeroes, also split into ``clip_frac_low`` / ``clip_frac_high``), ``ratio_mean``, ``kl`` (mean k3,
    when ``ref_logp`` is given), ``tokens``.
    """
    eps_high = eps_low if eps_high is None else eps_high
    if aggregation not in AGGREGATIONS:
        raise ValueError(f"aggregation must be one of {AGGREGATIONS}, got {aggregation!r}")
    if not (0.0 <= eps_low < 1.0 and eps_high >= 0.0):
        raise ValueError(f"need 0 <= eps_low < 1 and eps_high >= 0, got {eps_low}, {eps_high}")
    if beta != 0.0 and ref_logp is None:
        raise ValueError("beta != 0 needs ref_logp (the reference policy's token log-probs)")
    if not (logp.shape == old_logp.shape == mask.shape) or logp.ndim != 2:
        raise ValueError(f"logp, old_logp, mask must all be (B, T); got {logp.shape}, {old_logp.shape}, {mask.shape}")
    if adv.ndim == 1:
        adv = rearrange(adv, "b -> b 1")  # (B, 1), broadcasts over T
    if adv.shape[0] != logp.shape[0]:
        raise ValueError(f"adv has {adv.shape[0]} rows but there are {logp.shape[0]} sequences")

    mask = mask.bool()
    # Zero the padding first, so garbage there (even NaN/inf) never reaches the loss or its gradient:
    # with adv = 0 and ρ = 1 there, every padded term below is exactly 0.
    zero = torch.zeros((), dtype=logp.dtype, device=logp.device)
    logp = torch.where(mask, logp, zero)
    old_logp = torch.where(mask, old_logp.detach(), zero)
    adv = torch.where(mask, adv.detach(), zero)  # (B, T)

    ratio = torch.exp(logp - old_logp)  # (B, T)  ρ_{i,t}
    clipped = torch.clamp(ratio, 1.0 - eps_low, 1.0 + eps_high)
    per_token = torch.minimum(ratio * adv, clipped * adv)  # (B, T)
    stats: dict[str, float] = {}
    if ref_logp is not None:
        kl = kl_k3(logp, torch.where(mask, ref_logp.detach(), zero))  # (B, T), 0 on padding
        per_token = per_token - beta * kl
        stats["kl"] = _masked_mean(kl, mask)

    lengths = mask.sum(dim=1)  # (B,)
    if aggregation == "sequence":
        objective = (per_token.sum(dim=1) / lengths.clamp(min=1)).mean()
    elif aggregation == "token":
        objective = per_token.sum() / lengths.sum().clamp(min=1)
    else:
        max_len = mask.shape[1] if max_len is None else max_len
        if max_len < 1 or int(lengths.max()) > max_len:
            raise ValueError(f"max_len={max_len} must be >= every sequence's token count ({int(lengths.max())})")
        objective = per_token.sum() / (mask.shape[0] * max_len)

    with torch.no_grad():
        low = (ratio < 1.0 - eps_low) & (adv < 0)  # min() picks the clipped term: no gradient
        high = (ratio > 1.0 + eps_high) & (adv > 0)
        stats.update(
            clip_frac=_masked_mean((low | high).float(), mask),
            clip_frac_low=_masked_mean(low.float(), mask),
            clip_frac_high=_masked_mean(high.float(), mask),
            ratio_mean=_masked_mean(ratio, mask),
            tokens=float(lengths.sum()),
        )
    return -objective, stats


def _masked_mean(x: torch.Tensor, mask: torch.Tensor) -> float:
    return float((x.detach() * mask).sum() / mask.sum().clamp(min=1))


# ============================================================================= sampling and the trainer
#
# The R1-Zero loop ([R1] §2.2, [Math] §4.1): for each prompt q sample a group {o_1..o_G} from the
# current policy (which is π_θold), score each o_i with rule-based rewards, turn the rewards into
# group-relative advantages, and take μ gradient steps on the clipped surrogate. No value network.
# Letters as above, plus L completion tokens (padded to the longest in the batch), Tp prompt tokens.

import copy  # noqa: E402
import os  # noqa: E402
import random  # noqa: E402
import time  # noqa: E402
from dataclasses import asdict, dataclass, field, replace  # noqa: E402
from typing import Callable  # noqa: E402

from tqdm.auto import tqdm  # noqa: E402


@dataclass
class Rollout:
    """G sampled completions for each of P problems, group-major (row p·G+g is problem p's g-th).

    ``tokens`` (B, L) are completion ids right-padded with the pad id; ``mask`` (B, L) is True on
    every generated token up to and including ``</answer>``; ``finished`` (B,) is False where the
    completion hit the length limit instead (truncated). ``prompts`` holds each problem's prompt ids.
    """
    problems: list
    prompts: list[list[int]]
    tokens: torch.Tensor
    mask: torch.Tensor
    finished: torch.Tensor
    texts: list[str]
    group_size: int

    @property
    def lengths(self) -> torch.Tensor:
        return self.mask.sum(dim=1)  # (B,)

    def problem_of(self, row: int):
        return self.problems[row // self.group_size]

    def select_groups(self, groups: list[int]) -> "Rollout":
        """The rollout restricted to some groups (problem indices), in the order given."""
        G = self.group_size
        rows = [p * G + g for p in groups for g in range(G)]
        idx = torch.tensor(rows, dtype=torch.long, device=self.tokens.device)
        return Rollout([self.problems[p] for p in groups], [self.prompts[p] for p in groups], self.tokens[idx],
                       self.mask[idx], self.finished[idx], [self.texts[r] for r in rows], G)


def concat_rollouts(rollouts: list[Rollout], pad_id: int) -> Rollout:
    """One rollout from several with the same group size (completions right-padded to the longest)."""
    L = max(r.tokens.shape[1] for r in rollouts)

    def pad(x: torch.Tensor, value) -> torch.Tensor:
        return torch.nn.functional.pad(x, (0, L - x.shape[1]), value=value)  # (b, L)

    return Rollout([p for r in rollouts for p in r.problems], [q for r in rollouts for q in r.prompts],
                   torch.cat([pad(r.tokens, pad_id) for r in rollouts]), torch.cat([pad(r.mask, False) for r in rollouts]),
                   torch.cat([r.finished for r in rollouts]), [t for r in rollouts for t in r.texts],
                   rollouts[0].group_size)


def _by_prompt_length(prompts: list[list[int]], group_size: int, device) -> list[tuple[list[int], torch.Tensor]]:
    """Rows of equal prompt length, with their prompts repeated G times: [(rows, prompt (b, Tp))].

    The course's attention has no padding mask, so prompts of different lengths cannot share a
    batch; each length is one batch (addition prompts come in about five lengths).
    """
    by_len: dict[int, list[int]] = {}
    for p, ids in enumerate(prompts):
        by_len.setdefault(len(ids), []).append(p)
    out = []
    for ps in by_len.values():
        rows = [p * group_size + g for p in ps for g in range(group_size)]
        prompt = torch.tensor([prompts[p] for p in ps], device=device).repeat_interleave(group_size, dim=0)  # (b, Tp)
        out.append((rows, prompt))
    return out


@torch.no_grad()
def sample_groups(model, tok, problems: list, group_size: int, max_new_tokens: int, *, temperature: float = 1.0,
                  top_p: float = 1.0, generator: torch.Generator | None = None, use_cache: bool = True) -> Rollout:
    """Sample ``group_size`` completions per problem, batched on the model's KV cache (``train.generate``).

    Each completion stops after ``</answer>`` (the tokenizer's stop id) or at ``max_new_tokens``
    (truncated: ``finished`` is False). Temperature 0 is greedy, which makes G identical copies.
    """
    from .train import generate

    device = next(model.parameters()).device
    prompts = [tok.encode(p.prompt, bos=True) for p in problems]
    B = len(problems) * group_size
    tokens = torch.full((B, max_new_tokens), tok.pad_id, dtype=torch.long, device=device)  # (B, L)
    mask = torch.zeros((B, max_new_tokens), dtype=torch.bool, device=device)  # (B, L)
    finished = torch.zeros(B, dtype=torch.bool, device=device)  # (B,)
    for rows, prompt in _by_prompt_length(prompts, group_size, device):
        gen = generate(model, prompt, max_new_tokens, temperature=temperature, top_p=top_p, stop_id=tok.stop_id,
                       pad_id=tok.pad_id, use_cache=use_cache, generator=generator)
        n = gen.tokens.shape[1]
        idx = torch.tensor(rows, device=device)
        tokens[idx, :n], mask[idx, :n], finished[idx] = gen.tokens, gen.mask, gen.finished
    L = max(1, int(mask.sum(dim=1).max()))
    tokens, mask = tokens[:, :L], mask[:, :L]  # (B, L): drop the columns nobody used
    texts = [tok.decode(row[m].tolist()) for row, m in zip(tokens.cpu(), mask.cpu())]
    return Rollout(list(problems), prompts, tokens, mask, finished, texts, group_size)


def completion_logprobs(model, rollout: Rollout, temperature: float = 1.0,
                        with_entropy: bool = False) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """log π_θ(o_{i,t} | q, o_{i,<t}) of every completion token: (B, L), one causal forward per prompt length.

    Logits are divided by ``temperature`` first, so these are the log-probs of the distribution the
    completions were sampled from (as TRL does; top-p is not renormalized, as in TRL). Padding
    positions hold log-probs of pad tokens: use ``rollout.mask``. With ``with_entropy`` also returns
    the per-token entropy (B, L) of that distribution, detached (a statistic, not a loss term).
    """
    device = rollout.tokens.device
    pieces, entropies, order = [], [], []
    for rows, prompt in _by_prompt_length(rollout.prompts, rollout.group_size, device):
        Tp = prompt.shape[1]
        completion = rollout.tokens[torch.tensor(rows, device=device)]  # (b, L)
        ids = torch.cat([prompt, completion], dim=1)  # (b, Tp + L)
        logits = model(ids[:, :-1])[:, Tp - 1:] / temperature  # (b, L, V): position Tp-1+t predicts token t
        pieces.append(token_logprobs(logits, completion))  # (b, L)
        if with_entropy:
            with torch.no_grad():
                logits = logits.float()
                entropies.append(torch.logsumexp(logits, -1) - (logits.softmax(-1) * logits).sum(-1))  # (b, L)
        order.extend(rows)
    inverse = torch.argsort(torch.tensor(order, device=device))  # back to group-major row order
    logp = torch.cat(pieces)[inverse]  # (B, L)
    return (logp, torch.cat(entropies)[inverse]) if with_entropy else logp


# ----------------------------------------------------------------------------- rewards for the trainer

def make_reward(accuracy_weight: float = 1.0, format_weight: float = 0.5,
                format_fn: Callable[[str], float] | None = None) -> Callable[[str, object], float]:
    """``reward(completion, problem) = accuracy_weight·accuracy + format_weight·format``.

    R1-Zero sums a rule-based accuracy reward and a format reward ([R1] §2.2.2; the weights are not
    published). Accuracy is the task's verifier (``tasks.score_answer``: the answer block parsed,
    never evaluated); format is ``rewards.format_reward`` unless ``format_fn`` says otherwise
    (notebook 06 passes the naive ``partial_format_reward`` to watch it get hacked).
    """
    from .rewards import format_reward
    from .tasks import score_answer

    format_fn = format_fn or format_reward

    def reward(completion: str, problem) -> float:
        acc = score_answer(problem, completion) if accuracy_weight else 0.0
        return accuracy_weight * acc + format_weight * format_fn(completion)

    return reward


def rollout_stats(rewards: torch.Tensor, correct: torch.Tensor, formatted: torch.Tensor,
                  lengths: torch.Tensor, finished: torch.Tensor) -> dict[str, float]:
    """Per-step numbers of a rollout: rewards, correct, formatted (P, G); lengths, finished (B,).

    ``zero_adv_frac`` is the fraction of groups whose rewards all tie (zero advantage everywhere:
    no learning signal, [DAPO] §3.2); ``truncation_rate`` the fraction of completions that hit the
    length limit.
    """
    return {
        "reward": float(rewards.float().mean()),
        "accuracy": float(correct.float().mean()),
        "format_rate": float(formatted.float().mean()),
        "length": float(lengths.float().mean()),
        "zero_adv_frac": float(1.0 - zero_variance_mask(rewards).float().mean()),
        "truncation_rate": float(1.0 - finished.float().mean()),
    }


def score_rollout(rollout: Rollout, reward_fn: Callable[[str, object], float]) -> tuple[torch.Tensor, dict[str, float]]:
    """Rewards (P, G) of a rollout and its ``rollout_stats`` (accuracy and strict format always measured)."""
    from .rewards import format_reward
    from .tasks import score_answer

    P, G = len(rollout.problems), rollout.group_size
    probs = [rollout.problem_of(r) for r in range(P * G)]
    rewards = torch.tensor([reward_fn(t, p) for t, p in zip(rollout.texts, probs)]).view(P, G)  # (P, G)
    correct = torch.tensor([score_answer(p, t) for t, p in zip(rollout.texts, probs)]).view(P, G)
    formatted = torch.tensor([format_reward(t) for t in rollout.texts]).view(P, G)
    return rewards, rollout_stats(rewards, correct, formatted, rollout.lengths.cpu(), rollout.finished.cpu())


def evaluate_policy(model, tok, problems: list, max_new_tokens: int, *, samples: int = 1, temperature: float = 0.0,
                    top_p: float = 1.0, seed: int = 0) -> tuple[dict[str, float], Rollout]:
    """Accuracy, strict format rate, mean length and truncation rate on ``problems``: greedy by default,
    or ``samples`` completions each at ``temperature`` (seeded). Returns the numbers and the rollout."""
    device = next(model.parameters()).device
    g = torch.Generator(device=device).manual_seed(seed) if temperature > 0 else None
    rollout = sample_groups(model, tok, problems, samples, max_new_tokens, temperature=temperature, top_p=top_p,
                            generator=g)
    _, stats = score_rollout(rollout, lambda t, p: 0.0)
    return {k: stats[k] for k in ("accuracy", "format_rate", "length", "truncation_rate")}, rollout


# ----------------------------------------------------------------------------- config and loss of one batch

VARIANTS = {
    "grpo": {},                                                   # [Math] eq 3: std-scaled Â, per-sequence mean
    "dr_grpo": dict(scale_rewards=False, aggregation="dr_grpo"),  # [DrGRPO] §3: Â = r − mean, constant normalizer
    "clip_higher": dict(eps_high=0.28),                           # [DAPO] §3.1: ε_low 0.2, ε_high 0.28
    "token_level": dict(aggregation="token"),                     # [DAPO] §3.3 eq 12: every token weighs the same
    "filter_zero_variance": dict(filter_zero_variance=True),      # [DAPO] §3.2: drop groups that all tie
    "dynamic_sampling": dict(filter_zero_variance=True, sampling_rounds=4),  # [DAPO] §3.2: and refill the batch
}


@dataclass(frozen=True)
class GRPOConfig:
    steps: int = 100                  # rollout + update rounds
    prompts_per_step: int = 16        # P problems per rollout
    group_size: int = 8               # G completions per problem ([Math] §4.2 uses 64, DAPO 16)
    max_new_tokens: int = 48          # length limit; also Dr. GRPO's constant normalizer L_max
    temperature: float = 1.0          # sampling temperature (R1-Zero reproductions use 1.0)
    top_p: float = 1.0
    lr: float = 1e-4                  # far above [Math]'s 1e-6 (a tiny model); 2e-4+ made ours worse
    warmup_steps: int = 10            # linear warm-up, then constant ([DAPO] §4.1 warms up 20 steps)
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    mu: int = 1                       # gradient steps per rollout; 1 = [Math] §4.2 (ρ ≡ 1, clip inactive)
    beta: float = 0.0                 # KL coefficient to the frozen reference ([Math] 0.04; DAPO/Dr. GRPO 0)
    eps_low: float = 0.2              # clip band [1 − eps_low, 1 + eps_high]
    eps_high: float | None = None     # None = eps_low (symmetric); 0.28 = DAPO's clip-higher
    scale_rewards: bool = True        # divide by the group std; False = Dr. GRPO
    aggregation: str = "sequence"     # "sequence" (GRPO), "token" (DAPO), "dr_grpo"
    filter_zero_variance: bool = False  # drop tied groups from the loss (and from the training forward)
    sampling_rounds: int = 1          # with the filter: sample up to this many batches of P prompts until
                                      # P groups with a reward spread are found ([DAPO] §3.2 dynamic sampling)
    same_length_prompts: bool = True  # one prompt length per step: one batch on the cache, no padding
    track_kl: bool = True             # measure KL to the reference even when beta = 0 (one extra forward)
    kl_every: int = 1                 # with beta = 0, measure it every this many steps only (NaN between)
    checkpoint_every: int = 20
    seed: int = 0                     # seeds prompt choice and sampling, per step (exact resume)

    def __post_init__(self) -> None:
        for name in ("steps", "prompts_per_step", "max_new_tokens", "mu", "checkpoint_every", "sampling_rounds",
                     "kl_every"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)} must be at least 1.")
        if self.group_size < 2:
            raise ValueError(f"group_size={self.group_size}: GRPO compares completions within a group, use G >= 2.")
        if self.temperature <= 0:
            raise ValueError(f"temperature={self.temperature}: RL needs sampling, use a temperature > 0 (e.g. 1.0).")
        if self.aggregation not in AGGREGATIONS:
            raise ValueError(f"aggregation={self.aggregation!r}: use one of {AGGREGATIONS}.")
        if self.beta and self.kl_every != 1:
            raise ValueError(f"kl_every={self.kl_every} with beta={self.beta}: the KL term needs the reference at "
                             "every step. Use kl_every=1, or beta=0 to only watch the KL.")
        if self.lr <= 0 or not 0 <= self.warmup_steps <= self.steps:
            raise ValueError(f"need lr > 0 and 0 <= warmup_steps <= steps, got lr={self.lr}, "
                             f"warmup_steps={self.warmup_steps}, steps={self.steps}.")

    def lr_at(self, step: int) -> float:
        return self.lr * min(1.0, (step + 1) / self.warmup_steps) if self.warmup_steps else self.lr

    def variant(self, *names: str, **changes) -> "GRPOConfig":
        """This config with the named switches of ``VARIANTS`` turned on, e.g. ``cfg.variant("dr_grpo")``."""
        for name in names:
            if name not in VARIANTS:
                raise ValueError(f"unknown variant {name!r}: use one of {sorted(VARIANTS)}.")
            changes = {**VARIANTS[name], **changes}
        return replace(self, **changes)


def batch_loss(logp: torch.Tensor, mask: torch.Tensor, rewards: torch.Tensor, cfg: GRPOConfig, *,
               old_logp: torch.Tensor | None = None, ref_logp: torch.Tensor | None = None):
    """The loss of one rollout under ``cfg``'s switches: logp, mask (B, L) group-major, rewards (P, G).

    Advantages are group-relative (std-scaled unless ``scale_rewards=False``); with
    ``filter_zero_variance`` the tied groups' rows leave the batch, so they no longer count in any
    normalizer. ``old_logp=None`` means μ = 1, where π_θold is the current policy: ρ ≡ 1 in value
    but still carries the gradient. Returns ``(loss, stats)``, or ``(None, {})`` when no group is left.
    """
    P, G = rewards.shape
    adv = rearrange(group_advantages(rewards, scale=cfg.scale_rewards), "p g -> (p g)")  # (B,)
    if cfg.filter_zero_variance:
        rows = torch.nonzero(zero_variance_mask(rewards).repeat_interleave(G)).squeeze(1).to(logp.device)
        if rows.numel() == 0:
            return None, {}
        logp, mask, adv = logp[rows], mask[rows], adv[rows.cpu()]
        old_logp = None if old_logp is None else old_logp[rows]
        ref_logp = None if ref_logp is None else ref_logp[rows]
    old_logp = logp.detach() if old_logp is None else old_logp
    return grpo_loss(logp, old_logp, adv.to(logp.device), mask, ref_logp=ref_logp, beta=cfg.beta,
                     eps_low=cfg.eps_low, eps_high=cfg.eps_high, aggregation=cfg.aggregation,
                     max_len=cfg.max_new_tokens)


# ----------------------------------------------------------------------------- the trainer

@dataclass
class GRPOResult:
    history: list[dict[str, float]] = field(default_factory=list)  # one dict of stats per step
    resumed_from: int = 0            # the step a checkpoint put us at (0 = fresh start)
    seconds: float = 0.0             # wall time of the steps run in this call
    last_rollout: Rollout | None = None

    def series(self, key: str) -> list[float]:
        return [h[key] for h in self.history]


def choose_problems(prompt_lengths: list[int], n: int, rng: random.Random, same_length: bool = True) -> list[int]:
    """Indices of ``n`` distinct problems. With ``same_length``, all from one prompt length (drawn with
    probability proportional to how many problems have it), so the whole group batch is one batch on
    the KV cache: the course's attention has no padding mask, and mixed lengths mean one batch per length.
    Falls back to any lengths when no length has ``n`` problems."""
    if same_length:
        by_len: dict[int, list[int]] = {}
        for i, length in enumerate(prompt_lengths):
            by_len.setdefault(length, []).append(i)
        big = [idx for idx in by_len.values() if len(idx) >= n]
        if big:
            return rng.sample(rng.choices(big, weights=[len(b) for b in big])[0], n)
    return rng.sample(range(len(prompt_lengths)), n)


def grpo_step(model, optimizer, ref_model, tok, problems: list, cfg: GRPOConfig,
              reward_fn: Callable[[str, object], float], step: int,
              prompt_lengths: list[int] | None = None) -> tuple[dict[str, float], Rollout]:
    """One round: sample P·G completions, score them, take ``cfg.mu`` gradient steps. Returns stats and
    the rollout trained on.

    With ``filter_zero_variance`` only groups whose rewards differ are trained on (and forwarded);
    with ``sampling_rounds`` > 1, more batches of P prompts are sampled until P such groups are found
    (DAPO's dynamic sampling). The rollout stats (reward, accuracy, ..., ``zero_adv_frac``) cover
    everything sampled; entropy and KL cover the rows trained on, measured before the update.
    Prompts and samples are drawn from generators seeded with (seed, step), so a resumed run draws
    exactly what an uninterrupted one would. ``prompt_lengths`` (token counts of the problems'
    prompts) can be passed to save re-encoding the pool at every step.
    """
    device = next(model.parameters()).device
    t0 = time.perf_counter()
    P = cfg.prompts_per_step
    if prompt_lengths is None:
        prompt_lengths = [len(tok.encode(p.prompt, bos=True)) for p in problems]
    rng = random.Random(cfg.seed * 1_000_003 + step)
    gen = torch.Generator(device=device).manual_seed(cfg.seed * 1_000_003 + step)
    sampled, kept, kept_rewards = [], [], []
    for _ in range(cfg.sampling_rounds if cfg.filter_zero_variance else 1):
        chosen = choose_problems(prompt_lengths, P, rng, cfg.same_length_prompts)
        rollout = sample_groups(model, tok, [problems[i] for i in chosen], cfg.group_size, cfg.max_new_tokens,
                                temperature=cfg.temperature, top_p=cfg.top_p, generator=gen)
        rewards, _ = score_rollout(rollout, reward_fn)
        sampled.append(rollout)
        spread = zero_variance_mask(rewards) if cfg.filter_zero_variance else torch.ones(P, dtype=torch.bool)
        groups = spread.nonzero().flatten().tolist()[:P - sum(len(k.problems) for k in kept)]
        kept.append(rollout.select_groups(groups))
        kept_rewards.append(rewards[groups])
        if sum(len(k.problems) for k in kept) == P:
            break
    _, stats = score_rollout(concat_rollouts(sampled, tok.pad_id), reward_fn)
    rollout, rewards = concat_rollouts(kept, tok.pad_id), torch.cat(kept_rewards).to(device)  # (P', G)
    stats.update(kl=float("nan"), entropy=float("nan"), loss=float("nan"), clip_frac=float("nan"),
                 lr=cfg.lr_at(step), updated=0.0, sampling_rounds=float(len(sampled)),
                 groups_trained=float(len(rollout.problems)))
    if not rollout.problems:  # every group tied and filtering is on: nothing to learn from
        stats["seconds"] = time.perf_counter() - t0
        return stats, rollout
    ref_logp = old_logp = None
    with torch.no_grad():
        if ref_model is not None and (cfg.beta or step % cfg.kl_every == 0):  # with beta = 0 only a statistic
            ref_logp = completion_logprobs(ref_model, rollout, cfg.temperature)
        if cfg.mu > 1:  # π_θold: the policy that sampled, fixed for all μ steps
            old_logp = completion_logprobs(model, rollout, cfg.temperature)
    for group in optimizer.param_groups:
        group["lr"] = cfg.lr_at(step)
    model.train()
    for inner in range(cfg.mu):
        logp, entropy = completion_logprobs(model, rollout, cfg.temperature, with_entropy=True)
        if inner == 0:  # before this step's updates
            m = rollout.mask
            stats["entropy"] = float((entropy * m).sum() / m.sum())
            if ref_logp is not None:
                stats["kl"] = float((kl_k3(logp.detach(), ref_logp) * m).sum() / m.sum())
        loss, loss_stats = batch_loss(logp, rollout.mask, rewards, cfg, old_logp=old_logp,
                                      ref_logp=ref_logp if cfg.beta else None)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        optimizer.step()
        stats.update(loss=loss.item(), clip_frac=loss_stats["clip_frac"], updated=float(inner + 1))
    model.eval()
    stats["seconds"] = time.perf_counter() - t0
    return stats, rollout


def train_grpo(model, tok, problems: list, cfg: GRPOConfig, *, reward_fn: Callable[[str, object], float] | None = None,
               checkpoint_path: str | None = None, callback: Callable[[int, dict, Rollout], None] | None = None,
               progress: bool = True) -> GRPOResult:
    """GRPO on ``problems`` (anything with ``prompt`` and ``target``, or a ``verify`` method).

    The reference policy for the KL term is a frozen copy of the model as it was at step 0 (kept in
    the checkpoint, so a resumed run measures KL against the same reference). If
    ``checkpoint_path`` holds a checkpoint, training resumes from it; the result of an interrupted
    and resumed run equals an uninterrupted one. ``callback(step, stats, rollout)`` runs after every
    step (the live dashboard); raising from it stops training.
    """
    from .train import load_checkpoint, make_optimizer, save_checkpoint

    if len(problems) < cfg.prompts_per_step:
        raise ValueError(f"{len(problems)} problems but prompts_per_step={cfg.prompts_per_step}: pass more problems.")
    reward_fn = reward_fn or make_reward()
    optimizer = make_optimizer(model, cfg)
    ref_model = copy.deepcopy(model).eval().requires_grad_(False) if (cfg.beta or cfg.track_kl) else None
    result = GRPOResult()
    start = 0
    if checkpoint_path and os.path.exists(checkpoint_path):
        ckpt = load_checkpoint(checkpoint_path, model, optimizer)  # torch.load(weights_only=True)
        start = result.resumed_from = ckpt["step"]
        result.history = list(ckpt["extra"]["history"])
        if ref_model is not None:
            ref_model.load_state_dict(ckpt["extra"]["ref_model"])
    lengths = [len(tok.encode(p.prompt, bos=True)) for p in problems]
    t0 = time.perf_counter()
    bar = tqdm(range(start, cfg.steps), initial=start, total=cfg.steps, disable=not progress, desc="grpo")
    for step in bar:
        stats, rollout = grpo_step(model, optimizer, ref_model, tok, problems, cfg, reward_fn, step, lengths)
        result.history.append(stats)
        result.last_rollout = rollout
        bar.set_postfix(reward=f"{stats['reward']:.2f}", acc=f"{stats['accuracy']:.2f}", fmt=f"{stats['format_rate']:.2f}")
        if checkpoint_path and ((step + 1) % cfg.checkpoint_every == 0 or step + 1 == cfg.steps):
            extra = {"history": result.history, "grpo_config": asdict(cfg),
                     "ref_model": ref_model.state_dict() if ref_model is not None else {}}
            save_checkpoint(checkpoint_path, model, optimizer, step + 1, [h["loss"] for h in result.history], extra)
        if callback is not None:
            callback(step, stats, rollout)
    result.seconds = time.perf_counter() - t0
    model.eval()
    return result


# ----------------------------------------------------------------------------- seed sweep (a script)

def grpo_recipe(profile, eval_problems: list, seed: int = 0, steps: int | None = None):
    """Notebook 07's GRPO protocol for a profile: (config, 4000 training questions disjoint from
    `eval_problems`, reward = accuracy + 0.5·format). Notebook 08 and both seed sweeps reuse it."""
    from .tasks import draw_problems, sample_addition

    steps = steps or {"cpu": 60, "gpu": 200}[profile.name]
    pool = draw_problems(lambda rng: sample_addition(rng, profile.digits), 4000, seed=seed + 1, split="any",
                         exclude=eval_problems)
    cfg = GRPOConfig(steps=steps, prompts_per_step=16, group_size=8, max_new_tokens=48, lr=1e-4,
                     warmup_steps=min(10, steps), seed=seed)
    return cfg, pool, make_reward(accuracy_weight=1.0, format_weight=0.5)


def seed_sweep(seeds, steps: int | None = None, profile: str | None = None, progress: bool = False,
               pretrain_steps: int | None = None, variant: str | None = None) -> list[dict]:
    """Notebook 07's recipe for each seed: pretrain the baseline (``train.pretrain_on_task``; with
    ``pretrain_steps``, longer or shorter than the profile's), measure, run GRPO with ``grpo_recipe``
    (with ``variant``, one of ``VARIANTS`` switched on), measure again. Returns one row of numbers per seed."""
    if variant is not None:
        GRPOConfig().variant(variant)  # an unknown name fails here, before minutes of pretraining
    from .profiles import get_profile
    from .train import pretrain_on_task

    prof = get_profile(profile)
    rows = []
    for seed in seeds:
        model, _, tok, _, eval_problems = pretrain_on_task(prof.baseline_config(), prof, seed=seed, progress=progress,
                                                           steps=pretrain_steps)
        before, _ = evaluate_policy(model, tok, eval_problems, 64)
        cfg, pool, reward = grpo_recipe(prof, eval_problems, seed, steps)
        cfg = cfg.variant(variant) if variant else cfg
        cfg = replace(cfg, track_kl=False)  # the sweep reports no KL: skip the reference model's forward
        result = train_grpo(model, tok, pool, cfg, reward_fn=reward, progress=progress)
        after, _ = evaluate_policy(model, tok, eval_problems, 64)
        rows.append({"seed": seed, "accuracy_before": before["accuracy"], "accuracy_after": after["accuracy"],
                     "format_before": before["format_rate"], "format_after": after["format_rate"],
                     "grpo_seconds": result.seconds})
    return rows


if __name__ == "__main__":  # python -m course_lib.grpo --seeds 3
    import argparse

    parser = argparse.ArgumentParser(description="GRPO on the course baseline, one run per seed.")
    parser.add_argument("--seeds", type=int, default=3, help="how many seeds (0, 1, ...)")
    parser.add_argument("--steps", type=int, default=None, help="GRPO steps (default: the profile's)")
    parser.add_argument("--profile", default=None, help="cpu or gpu (default: $COURSE_PROFILE, else by device)")
    parser.add_argument("--pretrain-steps", type=int, default=None,
                        help="pretraining steps of the starting model (default: the profile's)")
    parser.add_argument("--variant", default=None, choices=sorted(VARIANTS),
                        help="turn on one of the GRPO variants (default: plain GRPO)")
    args = parser.parse_args()
    print(f"GRPO variant: {args.variant or 'grpo'}")
    print(f"{'seed':>4} {'acc before':>10} {'acc after':>10} {'format before':>14} {'format after':>13} {'GRPO s':>7}")
    for row in seed_sweep(range(args.seeds), args.steps, args.profile, progress=True, pretrain_steps=args.pretrain_steps,
                          variant=args.variant):
        print(f"{row['seed']:>4} {row['accuracy_before']:>10.1%} {row['accuracy_after']:>10.1%} "
              f"{row['format_before']:>14.1%} {row['format_after']:>13.1%} {row['grpo_seconds']:>7.0f}", flush=True)
