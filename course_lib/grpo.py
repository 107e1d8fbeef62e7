"""GRPO's loss: group-relative advantages, the clipped surrogate, the k3 KL, and the aggregation variants.

Pure math on tensors, checked against the papers' formulas on hand-computed cases; sampling lives in
`course_lib.rollout` and the training loop in `course_lib.grpo_trainer`. Sources: GRPO [Math]
(Shao et al. 2024, arXiv:2402.03300) §4.1 eqs 3-4; Dr. GRPO [DrGRPO] (Liu et al. 2025, arXiv:2503.20783)
§3; DAPO [DAPO] (Yu et al. 2025, arXiv:2503.14476) §3.

Shapes: P prompts, G completions per prompt (the group), B = P·G sequences ordered group-major
(prompt p's G completions are rows p·G … p·G+G−1, i.e. ``rearrange(adv, "p g -> (p g)")``),
T completion tokens (padded), V vocabulary.
"""

from __future__ import annotations

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
    (TRL's `loss_type` names the same three: "grpo", "dapo", "dr_grpo"):

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
