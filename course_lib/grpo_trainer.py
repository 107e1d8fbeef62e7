"""GRPO's training loop: the config with the variants' switches, the loss of one rollout, and the trainer.

One step ([Math] arXiv:2402.03300 §4.1, Algorithm 1 with one policy update per rollout by default):
sample P·G completions (`course_lib.rollout`), score them, turn rewards into group-relative advantages
and take ``mu`` gradient steps on the clipped surrogate (`course_lib.grpo`). The variants are switches:
Dr. GRPO ([DrGRPO] arXiv:2503.20783 §3), DAPO's clip-higher, token-level loss, zero-variance filter and
dynamic sampling ([DAPO] arXiv:2503.14476 §3). Training resumes exactly from its checkpoint.

Letters: P prompts, G completions per prompt, B = P·G rows (group-major), L completion tokens.
"""

from __future__ import annotations

import copy
import os
import random
import time
from dataclasses import asdict, dataclass, field, replace
from typing import Callable

import torch
from einops import rearrange

from .generate import by_length
from .progress import progress_bar
from .grpo import AGGREGATIONS, grpo_loss, group_advantages, kl_k3, zero_variance_mask
from .rollout import Rollout, completion_logprobs, concat_rollouts, make_reward, sample_groups, score_rollout
from .train import load_checkpoint, make_optimizer, save_checkpoint

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


def choose_problems(prompts: list[list[int]], n: int, rng: random.Random, same_length: bool = True) -> list[int]:
    """Indices of ``n`` distinct problems. With ``same_length``, all from one prompt length (drawn with
    probability proportional to how many problems have it), so the whole group batch is one batch on
    the KV cache: the course's attention has no padding mask, and mixed lengths mean one batch per length.
    Falls back to any lengths when no length has ``n`` problems."""
    if same_length:
        big = [idx for idx in by_length(prompts).values() if len(idx) >= n]
        if big:
            return rng.sample(rng.choices(big, weights=[len(b) for b in big])[0], n)
    return rng.sample(range(len(prompts)), n)


def grpo_step(model, optimizer, ref_model, tok, problems: list, cfg: GRPOConfig,
              reward_fn: Callable[[str, object], float], step: int,
              prompts: list[list[int]] | None = None) -> tuple[dict[str, float], Rollout]:
    """One round: sample P·G completions, score them, take ``cfg.mu`` gradient steps. Returns stats and
    the rollout trained on.

    With ``filter_zero_variance`` only groups whose rewards differ are trained on (and forwarded);
    with ``sampling_rounds`` > 1, more batches of P prompts are sampled until P such groups are found
    (DAPO's dynamic sampling). The rollout stats (reward, accuracy, ..., ``zero_adv_frac``) cover
    everything sampled; entropy and KL cover the rows trained on, measured before the update.
    Prompts and samples are drawn from generators seeded with (seed, step), so a resumed run draws
    exactly what an uninterrupted one would. ``prompts`` (the problems' encoded prompts) can be passed to
    save re-encoding the pool at every step.
    """
    device = next(model.parameters()).device
    t0 = time.perf_counter()
    P = cfg.prompts_per_step
    if prompts is None:
        prompts = [tok.encode(p.prompt, bos=True) for p in problems]
    rng = random.Random(cfg.seed * 1_000_003 + step)
    gen = torch.Generator(device=device).manual_seed(cfg.seed * 1_000_003 + step)
    sampled, kept, kept_rewards = [], [], []
    for _ in range(cfg.sampling_rounds if cfg.filter_zero_variance else 1):
        chosen = choose_problems(prompts, P, rng, cfg.same_length_prompts)
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
    step, before that step's checkpoint (the live dashboard; a router-bias update, whose change is then saved);
    raising from it stops training.
    """
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
    prompts = [tok.encode(p.prompt, bos=True) for p in problems]
    t0 = time.perf_counter()
    bar = progress_bar(range(start, cfg.steps), initial=start, total=cfg.steps, disable=not progress, desc="grpo")
    for step in bar:
        stats, rollout = grpo_step(model, optimizer, ref_model, tok, problems, cfg, reward_fn, step, prompts)
        result.history.append(stats)
        result.last_rollout = rollout
        bar.set_postfix(reward=f"{stats['reward']:.2f}", acc=f"{stats['accuracy']:.2f}", fmt=f"{stats['format_rate']:.2f}")
        if callback is not None:  # before the checkpoint: what a callback changes (a router bias) is saved too
            callback(step, stats, rollout)
        if checkpoint_path and ((step + 1) % cfg.checkpoint_every == 0 or step + 1 == cfg.steps):
            extra = {"history": result.history, "grpo_config": asdict(cfg),
                     "ref_model": ref_model.state_dict() if ref_model is not None else {}}
            save_checkpoint(checkpoint_path, model, optimizer, step + 1, [h["loss"] for h in result.history], extra)
    result.seconds = time.perf_counter() - t0
    model.eval()
    return result
