"""The course's recipes, on top of everything else: pretraining on the task, GRPO, nano-DeepSeek, seed sweeps.

A recipe fixes data, steps, schedule and seed, so every notebook that trains "the baseline" or "GRPO on it"
trains the same thing and results compare fairly:
- `pretrain_on_task`: notebook 00's pretraining, shared by every model of notebooks 01-09;
- `grpo_recipe`: notebook 07's GRPO protocol, reused by notebook 08;
- `train_nano_deepseek`: notebook 08's model pretrained with V3's balancing ([V3] arXiv:2412.19437 §2.1.2);
- `balancing_configs`, `train_balancing`: notebook 05's balancing methods side by side;
- `seed_sweep`: the whole recipe on several seeds, the spread behind every single-seed number:

    python -m course_lib.recipes --seeds 3                      # GRPO on the baseline, seeds 0, 1, 2, 200 steps
    python -m course_lib.recipes --seeds 2 --models baseline nano_deepseek
    python -m course_lib.recipes --seeds 3 --variant dynamic_sampling --json
"""

from __future__ import annotations

import argparse
import json
from dataclasses import replace
from typing import Callable

import torch

from .balancing import LoadTracker, apply_capacity, balancing_loss_fn
from .capstone import held_out_max_violation
from .config import ModelConfig
from .grpo_trainer import VARIANTS, GRPOConfig, train_grpo
from .model import CourseModel
from .presets import nano_deepseek_config
from .profiles import Profile, checkpoint_path, get_profile
from .rollout import evaluate, make_reward
from .tasks import Tokenizer, addition_splits, draw_problems, encode_examples, sample_addition
from .train import TrainConfig, train_lm

# V3's balancing ([V3] §2.1.2): the bias update speed γ, and the tiny sequence-wise loss weight α
# (V3 uses γ = 0.001 over 14.8T tokens and α = 1e-4; a few hundred steps need a faster γ, notebook 05).
BIAS_GAMMA = 0.01
SEQUENCE_ALPHA = 1e-4
MODELS = ("baseline", "nano_deepseek")
RECIPE_VARIANT = "filter_zero_variance"  # the switches of grpo_trainer.VARIANTS the course's GRPO recipe turns on
# The command line's GRPO steps: twice the notebooks' budget. In a notebook GRPO shares a few minutes with
# everything else; a sweep from the command line can afford the steps that slower seeds need.
SWEEP_GRPO_STEPS = {"cpu": 200, "gpu": 400}


def pretrain_on_task(config, profile, *, name: str | None = None, steps: int | None = None, seed: int = 0,
                     callback: Callable[[int, float], None] | None = None, progress: bool = True, device=None,
                     model=None, loss_fn: Callable | None = None):
    """Build a CourseModel from `config` and train it on the profile's addition examples.

    The shared recipe of every notebook that needs a trained model (notebook 00's baseline, the
    GQA/MLA/MoE variants, nano-DeepSeek): same data, same steps, same seed, so results compare fairly.
    With a `name` it checkpoints to `checkpoint_path(name)` and resumes or reloads from there. Pass a
    prebuilt `model` (then `config` is ignored) when the callback needs it, e.g. an MoE load tracker,
    and `loss_fn` to add terms to the next-token loss (`train_lm`'s).
    Returns (model, TrainResult, tokenizer, train_problems, eval_problems).
    """
    tok = Tokenizer()
    train_problems, eval_problems = addition_splits(profile.n_train, profile.n_eval, digits=profile.digits, seed=0)
    tokens, mask = encode_examples(train_problems, tok)
    if model is None:
        torch.manual_seed(seed)
        model = CourseModel(config)
    if device is not None:
        model = model.to(device)
    steps = steps or profile.pretrain_steps
    cfg = TrainConfig(steps=steps, batch_size=profile.batch_size, lr=profile.lr, seed=seed,
                      warmup_steps=min(TrainConfig.warmup_steps, steps))
    result = train_lm(model, tokens, mask, cfg, checkpoint_path=checkpoint_path(name) if name else None,
                      callback=callback, progress=progress, loss_fn=loss_fn)
    return model, result, tok, train_problems, eval_problems


def grpo_recipe(profile, eval_problems: list, seed: int = 0, steps: int | None = None,
                variant: str = RECIPE_VARIANT):
    """Notebook 07's GRPO protocol for a profile: (config, 4000 training questions disjoint from
    `eval_problems`, reward = accuracy + 0.5·format). Notebook 08 and the seed sweep reuse it.

    Each step samples 64 questions x 8 completions and, with the default `variant`, trains only on the groups
    whose rewards differ (DAPO's filter, [DAPO] arXiv:2503.14476 §3.2): from the course's pretrained baseline
    most groups tie (all right or all wrong), carry no gradient, and would cost a forward and a backward pass
    each. `variant="grpo"` gives plain GRPO ([Math] eq 3)."""
    steps = steps or {"cpu": 100, "gpu": 200}[profile.name]
    pool = draw_problems(lambda rng: sample_addition(rng, profile.digits), 4000, seed=seed + 1, split="any",
                         exclude=eval_problems)
    cfg = GRPOConfig(steps=steps, prompts_per_step=64, group_size=8, max_new_tokens=48, lr=1e-4,
                     warmup_steps=min(10, steps), seed=seed)
    return cfg.variant(variant), pool, make_reward(accuracy_weight=1.0, format_weight=0.5)


def train_nano_deepseek(profile, *, seed: int = 0, name: str | None = None, on_load=None, then=None,
                        progress: bool = True, device=None, config: ModelConfig | None = None,
                        steps: int | None = None):
    """Pretrain nano-DeepSeek with the baseline's recipe (`pretrain_on_task`: same data, steps and
    schedule), balancing with V3's bias update and sequence-wise loss. Checkpoints under `name` (resumes
    exactly, bias included). Returns (model, TrainResult, LoadTracker, tokenizer, train_problems, eval_problems)."""
    torch.manual_seed(seed)
    model = CourseModel(config or nano_deepseek_config(profile))
    tracker = LoadTracker(model, gamma=BIAS_GAMMA, on_load=on_load, then=then)
    model, result, tok, train_problems, eval_problems = pretrain_on_task(
        None, profile, name=name, steps=steps, seed=seed, callback=tracker, progress=progress, device=device,
        model=model, loss_fn=balancing_loss_fn("sequence", SEQUENCE_ALPHA))
    return model, result, tracker, tok, train_problems, eval_problems


def balancing_callback(model: CourseModel, then: Callable | None = None, gamma: float = BIAS_GAMMA) -> Callable:
    """A `train_grpo` callback that keeps an MoE model balancing during RL as it did in pretraining: after every
    GRPO update, a `LoadTracker` (the callback's `.tracker`) reads the loads of the update's forward (the
    rollout's prompts and completions, padding not counted) and applies the bias update ([V3] §2.1.2); then
    `then(step, stats, rollout)` runs (a dashboard). A step that trained on nothing leaves the bias alone. With
    one prompt length per step (`GRPOConfig.same_length_prompts`, the default) the update is one forward; with
    mixed lengths the tracker sees the last length's."""
    tracker = LoadTracker(model, gamma=gamma)

    def callback(step: int, stats: dict, rollout) -> None:
        if stats["updated"]:
            tracker(step, stats["loss"])
        if then is not None:
            then(step, stats, rollout)

    callback.tracker = tracker
    return callback


# ----------------------------------------------------------------------------- notebook 05's balancing study

# name: (auxiliary loss, its weight alpha, bias update speed gamma, capacity factor); [V3] §2.1.2, [V2] §3.1.2
BALANCING_METHODS = {
    "none": ("none", 0.0, 0.0, None),
    "Switch": ("switch", 0.01, 0.0, None),
    "V2 expert-level": ("expert", 0.01, 0.0, None),
    "aux-loss-free": ("none", 0.0, BIAS_GAMMA, None),
    "V3 (bias + sequence-wise)": ("sequence", SEQUENCE_ALPHA, BIAS_GAMMA, None),
    "capacity 1.0": ("none", 0.0, 0.0, 1.0),
}
BALANCING_STEPS = {"cpu": 120, "gpu": 600}
BALANCING_BATCH = {"cpu": 32, "gpu": 64}  # notebook 05's short 2-layer runs keep their own batch


def balancing_configs(profile: Profile) -> dict[str, ModelConfig]:
    """Notebook 05's two MoE models at the dense baseline's active FFN width: 8 coarse experts (top-2) against
    16 fine ones (top-3) plus one shared ([MoE] arXiv:2401.06066 §3), 2 layers on the cpu profile."""
    layers = {"cpu": 2, "gpu": profile.num_hidden_layers}[profile.name]
    width = profile.intermediate_size
    common = dict(ffn="moe", num_hidden_layers=layers, scoring_func="sigmoid", norm_topk_prob=True)
    return {"coarse": profile.baseline_config(**common, n_routed_experts=8, num_experts_per_tok=2, n_shared_experts=0,
                                              moe_intermediate_size=width // 2, n_group=1, topk_group=1),
            "fine": profile.baseline_config(**common, n_routed_experts=16, num_experts_per_tok=3, n_shared_experts=1,
                                            moe_intermediate_size=width // 4, n_group=4, topk_group=2)}


def train_balancing(config: ModelConfig, method: str, profile: Profile, *, seed: int = 0, device=None,
                    on_load: Callable | None = None, progress: bool = False):
    """Train `config` on the task with one of `BALANCING_METHODS`, from the same initial weights for every
    method of a seed. Returns (model, LoadTracker, the LM losses without the auxiliary term, TrainResult)."""
    loss, alpha, gamma, capacity = BALANCING_METHODS[method]
    tokens, mask = encode_examples(addition_splits(profile.n_train, profile.n_eval, digits=profile.digits, seed=0)[0],
                                   Tokenizer())
    torch.manual_seed(seed)
    model = CourseModel(config).to(device or "cpu")
    limits = apply_capacity(model, capacity) if capacity else []
    tracker = LoadTracker(model, gamma=gamma, capacity=limits, on_load=on_load)
    loss_fn = balancing_loss_fn(loss, alpha)
    cfg = TrainConfig(steps=BALANCING_STEPS[profile.name], batch_size=BALANCING_BATCH[profile.name], lr=profile.lr,
                      seed=seed)
    result = train_lm(model, tokens, mask, cfg, loss_fn=loss_fn, callback=tracker, progress=progress)
    for limit in limits:
        limit.remove()  # evaluation never drops tokens ([V2] §3.1.2)
    return model, tracker, loss_fn.lm_losses, result


# ----------------------------------------------------------------------------- seed sweep (a script)

def seed_sweep(seeds, models: tuple[str, ...] = ("baseline",), profile: str | Profile | None = None, progress: bool = False,
               pretrain_steps: int | None = None, grpo_steps: int | None = None, variant: str | None = None,
               on_row: Callable[[dict], None] | None = None, reuse_pretraining: bool = False) -> list[dict]:
    """For each seed and each of `models`, the whole recipe: pretrain (with `pretrain_steps`, longer or
    shorter than the profile's), measure greedy held-out accuracy, run `grpo_recipe` (with `variant`, one of
    `VARIANTS` in place of the recipe's own switches), measure again. nano-DeepSeek keeps balancing during GRPO (`balancing_callback`) and
    its rows hold the held-out MaxVio before and after (None for the dense baseline). Returns one row of plain
    numbers per seed and model; `on_row(row)` sees each row as soon as it is measured. With `reuse_pretraining`,
    each pretrained model is checkpointed under a name of its own (`sweep_<model>_s<seed>`) and reloaded by
    later sweeps in the same checkpoint folder instead of trained again."""
    unknown = [m for m in models if m not in MODELS]
    if unknown:
        raise ValueError(f"unknown model(s) {unknown}: use {MODELS}.")
    if variant is not None:
        GRPOConfig().variant(variant)  # an unknown name fails here, before minutes of pretraining
    prof = profile if isinstance(profile, Profile) else get_profile(profile)
    rows = []
    for seed in seeds:
        for name in models:
            callback = None
            ckpt = f"sweep_{name}_s{seed}" if reuse_pretraining and pretrain_steps is None else None
            if name == "baseline":
                model, _, tok, _, eval_problems = pretrain_on_task(prof.baseline_config(), prof, seed=seed, name=ckpt,
                                                                   progress=progress, steps=pretrain_steps)
            else:
                model, _, _, tok, _, eval_problems = train_nano_deepseek(prof, seed=seed, progress=progress, name=ckpt,
                                                                         steps=pretrain_steps)
                callback = balancing_callback(model)  # the router keeps balancing on rollout tokens
            eval_tokens, eval_mask = encode_examples(eval_problems, tok)
            max_vio = (lambda: held_out_max_violation(model, eval_tokens, eval_mask)) if callback else (lambda: None)
            before, vio_before = evaluate(model, tok, eval_problems, 64), max_vio()
            cfg, pool, reward = grpo_recipe(prof, eval_problems, seed, grpo_steps, variant or RECIPE_VARIANT)
            cfg = replace(cfg, track_kl=False)  # the sweep reports no KL: skip the reference model's forward
            result = train_grpo(model, tok, pool, cfg, reward_fn=reward, progress=progress, callback=callback)
            after = evaluate(model, tok, eval_problems, 64)
            rows.append({"seed": seed, "model": name, "variant": variant or RECIPE_VARIANT, "accuracy_before": before.accuracy,
                         "accuracy_after": after.accuracy, "format_before": before.format_rate,
                         "format_after": after.format_rate, "grpo_seconds": result.seconds,
                         "max_vio_before": vio_before, "max_vio_after": max_vio()})
            if on_row is not None:
                on_row(rows[-1])
    return rows


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m course_lib.recipes",
                                     description="Pretraining then GRPO, held-out accuracy before and after, one run per seed.")
    parser.add_argument("--seeds", type=int, default=3, help="how many seeds (default 3)")
    parser.add_argument("--first-seed", type=int, default=0, help="start the seeds here (default 0)")
    parser.add_argument("--models", nargs="+", default=["baseline"], choices=MODELS, help="which models (default: baseline)")
    parser.add_argument("--profile", default=None, help="cpu or gpu (default: $COURSE_PROFILE, else by device)")
    parser.add_argument("--pretrain-steps", type=int, default=None, help="pretraining steps (default: the profile's)")
    parser.add_argument("--steps", type=int, default=None,
                        help=f"GRPO steps (default: {SWEEP_GRPO_STEPS}, by profile; notebook 07 runs half)")
    parser.add_argument("--variant", default=None, choices=sorted(VARIANTS),
                        help=f"a GRPO variant in place of the recipe's ({RECIPE_VARIANT}); grpo is plain GRPO")
    parser.add_argument("--json", action="store_true", help="print one JSON list of the rows instead of a table")
    args = parser.parse_args(argv)

    def show(row: dict) -> None:
        print(f"{row['seed']:>4} {row['model']:<14} {row['accuracy_before']:>10.1%} {row['accuracy_after']:>10.1%} "
              f"{row['format_after']:>13.1%} {row['grpo_seconds']:>7.0f}", flush=True)

    if not args.json:
        print(f"GRPO variant: {args.variant or RECIPE_VARIANT}")
        print(f"{'seed':>4} {'model':<14} {'acc before':>10} {'acc after':>10} {'format after':>13} {'GRPO s':>7}")
    steps = args.steps or SWEEP_GRPO_STEPS[get_profile(args.profile).name]
    rows = seed_sweep(range(args.first_seed, args.first_seed + args.seeds), tuple(args.models), args.profile,
                      progress=False, pretrain_steps=args.pretrain_steps, grpo_steps=steps, variant=args.variant,
                      on_row=None if args.json else show)
    if args.json:
        print(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
