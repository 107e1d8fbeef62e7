"""Seed spreads: the notebooks' comparisons repeated over seeds, so one seed's number can be read against its range.

A model this small moves held-out accuracy by many points from one seed to the next, more than some of the
differences the notebooks measure. Each function here reruns one notebook's recipe on one seed and returns
rows of plain numbers; `python -m course_lib.spread --seeds 3` runs them all and writes
`assets/seed_spread_<profile>.json`, which the notebooks read to print the mean and range beside their own
single-seed result (`summarize`).

- `attention_rows`: held-out accuracy and loss of MHA, GQA, MQA (notebook 02) and MLA (notebook 03);
- `rl_rows`: greedy held-out accuracy before and after GRPO of the baseline (notebook 07) and of
  nano-DeepSeek, with its held-out MaxVio before and after (notebook 08);
- `mtp_rows`: accuracy and held-out next-token loss with and without multi-token prediction (notebook 09);
- `balancing_rows`: notebook 05's balancing methods: MaxVio, LM loss and held-out accuracy of each;
- `variant_rows`: the GRPO recipe with each switch of `grpo_trainer.VARIANTS`, on one seed (notebook 07's table).

The studies share their pretrained models through checkpoints in one folder ($COURSE_CHECKPOINT_DIR, else a
temporary one), so the baseline of a seed is trained once for all of them.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
from pathlib import Path

import torch

from .balancing import layer_loads, mean_max_violation
from .capstone import held_out_max_violation
from .model import lm_loss
from .mtp import MTPModel, mtp_loss_fn
from .presets import mla_config, mtp_config
from .profiles import Profile, get_profile
from .grpo_trainer import VARIANTS
from .recipes import BALANCING_METHODS, balancing_configs, pretrain_on_task, seed_sweep, train_balancing
from .rollout import evaluate
from .tasks import Tokenizer, addition_splits, encode_examples
from .train import TrainConfig, train_lm

MTP_LAMBDA = 0.3  # notebook 09's weight of the MTP loss ([V3] §4.2)


def _held_out(model, tok, eval_problems) -> dict:
    tokens, mask = encode_examples(eval_problems, tok)
    with torch.no_grad():
        loss = lm_loss(model.eval(), tokens, mask).item()
    return {"accuracy": evaluate(model, tok, eval_problems, 64).accuracy, "held_out_loss": loss}


def attention_rows(profile: Profile, seed: int) -> list[dict]:
    """Notebook 02's and 03's models, pretrained with the baseline's recipe on one seed."""
    base = profile.baseline_config()
    configs = {"MHA": base, "GQA": base.replace(attention="gqa", num_key_value_heads=base.num_attention_heads // 2),
               "MQA": base.replace(attention="mqa"), "MLA": mla_config(base)}
    rows = []
    for name, cfg in configs.items():
        name_ = "sweep_baseline" if name == "MHA" else f"sweep_{name.lower()}"
        model, _, tok, _, eval_problems = pretrain_on_task(cfg, profile, seed=seed, progress=False, name=f"{name_}_s{seed}")
        rows.append({"seed": seed, "model": name, **_held_out(model, tok, eval_problems)})
    return rows


def rl_rows(profile: Profile, seed: int, grpo_steps: int | None = None) -> list[dict]:
    """The seed sweep of the GRPO recipe on the baseline and on nano-DeepSeek (notebooks 07 and 08)."""
    return seed_sweep([seed], models=("baseline", "nano_deepseek"), profile=profile, grpo_steps=grpo_steps,
                      reuse_pretraining=True)


# With one gradient step per rollout the ratio is exactly 1 and no clip is active: clip_higher makes grpo's updates.
SAME_AS = {"clip_higher": "grpo"}


def variant_rows(profile: Profile, seed: int, grpo_steps: int | None = None) -> list[dict]:
    """Notebook 07's table: the recipe with each of `VARIANTS` in place of its own switches, from one baseline
    (a variant that makes the same updates as another at the recipe's settings, `SAME_AS`, is not rerun)."""
    return [row for name in VARIANTS if name not in SAME_AS
            for row in seed_sweep([seed], profile=profile, grpo_steps=grpo_steps, variant=name, reuse_pretraining=True)]


def mtp_rows(profile: Profile, seed: int) -> list[dict]:
    """Notebook 09's main model trained with and without MTP on one seed: accuracy and held-out loss."""
    tok = Tokenizer()
    train_problems, eval_problems = addition_splits(profile.n_train, profile.n_eval, digits=profile.digits, seed=0)
    tokens, mask = encode_examples(train_problems, tok)
    config = mtp_config(profile)
    baseline, *_ = pretrain_on_task(config, profile, seed=seed, progress=False)
    torch.manual_seed(seed)  # pretrain_on_task's seed: the main model starts where the baseline started
    model = MTPModel(config, num_nextn_predict_layers=1)
    cfg = TrainConfig(steps=profile.pretrain_steps, batch_size=profile.batch_size, lr=profile.lr, seed=seed,
                      warmup_steps=min(TrainConfig.warmup_steps, profile.pretrain_steps))
    train_lm(model, tokens, mask, cfg, loss_fn=mtp_loss_fn(MTP_LAMBDA), progress=False)
    return [{"seed": seed, "model": "without MTP", **_held_out(baseline, tok, eval_problems)},
            {"seed": seed, "model": f"MTP (lambda {MTP_LAMBDA})", **_held_out(model, tok, eval_problems)}]


def balancing_rows(profile: Profile, seed: int) -> list[dict]:
    """Notebook 05's table on one seed: each balancing method on the fine-grained model, and the coarse model
    with aux-loss-free balancing. MaxVio and LM loss are means of the last 20 training steps; the held-out
    numbers come from one forward over the held-out set (no dropping) and greedy answers."""
    tok = Tokenizer()
    _, eval_problems = addition_splits(profile.n_train, profile.n_eval, digits=profile.digits, seed=0)
    tokens, mask = encode_examples(eval_problems, tok)
    configs = balancing_configs(profile)
    runs = [(name, "fine", name) for name in BALANCING_METHODS] + [("coarse (aux-loss-free)", "coarse", "aux-loss-free")]
    rows = []
    for label, size, method in runs:
        model, tracker, lm_losses, _ = train_balancing(configs[size], method, profile, seed=seed)
        with torch.no_grad():
            held_out_loss = lm_loss(model.eval(), tokens, mask).item()
        final = tracker.final(last=20)
        rows.append({"seed": seed, "model": label, "max_vio": final["max_vio"],
                     "held_out_vio": mean_max_violation(layer_loads(model)), "dropped": final["dropped"],
                     "lm_loss": sum(lm_losses[-20:]) / 20, "held_out_loss": held_out_loss,
                     "accuracy": evaluate(model, tok, eval_problems, 64).accuracy})
    return rows


STUDIES = {"attention": attention_rows, "rl": rl_rows, "mtp": mtp_rows, "variants": variant_rows,
           "balancing": balancing_rows}
SEEDS_OF = {"variants": 1}  # the variants table is one seed per switch, read as such


def summarize(rows: list[dict], key: str, by: str = "model") -> dict[str, dict]:
    """{group: {"mean", "min", "max", "n", "seeds"}} of `key` over the rows of each value of `by`."""
    groups: dict[str, list[dict]] = {}
    for row in rows:
        groups.setdefault(row[by], []).append(row)
    return {name: {"mean": statistics.fmean(r[key] for r in rs), "min": min(r[key] for r in rs),
                   "max": max(r[key] for r in rs), "n": len(rs), "seeds": [r["seed"] for r in rs]}
            for name, rs in groups.items()}


def spread_table(rows: list[dict], models: list[str] | None = None,
                 keys: tuple[tuple[str, str], ...] = (("accuracy", "{:.1%}"), ("held_out_loss", "{:.3f}"))) -> str:
    """A text table of each model's mean and range (min to max) of each key over the seeds of `rows`."""
    stats = {key: summarize(rows, key) for key, _ in keys}
    models = models or list(stats[keys[0][0]])
    seeds = stats[keys[0][0]][models[0]]["seeds"]
    head = f"over seeds {seeds}"
    width = max(len(head), *(len(name) + 2 for name in models))
    lines = [f"{head:<{width}}" + "".join(f"{key + ': mean (range)':>34}" for key, _ in keys)]
    for name in models:
        cells = []
        for key, fmt in keys:
            s = stats[key][name]
            cells.append(f"{fmt.format(s['mean'])} ({fmt.format(s['min'])} to {fmt.format(s['max'])})")
        lines.append(f"{name:<{width}}" + "".join(f"{c:>34}" for c in cells))
    return "\n".join(lines)


def spread_path(profile_name: str, root: Path | None = None) -> Path:
    """Where the sweep's JSON lives: assets/ of the repository (notebooks read it as ../assets/...)."""
    return (root or Path(__file__).resolve().parents[1]) / "assets" / f"seed_spread_{profile_name}.json"


def load_spread(profile_name: str, root: Path | None = None) -> dict | None:
    """The committed sweep for a profile, or None where the repository's assets are not at hand (e.g. on Colab)."""
    path = spread_path(profile_name, root)
    return json.loads(path.read_text()) if path.exists() else None


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m course_lib.spread",
                                     description="Rerun the notebooks' comparisons over seeds; write one JSON file.")
    parser.add_argument("--seeds", type=int, default=3, help="seeds 0 .. N-1 (default 3)")
    parser.add_argument("--profile", default=None, help="cpu or gpu (default: $COURSE_PROFILE, else by device)")
    parser.add_argument("--studies", nargs="+", default=list(STUDIES), choices=list(STUDIES))
    parser.add_argument("--out", type=Path, default=None, help="the JSON file (default: assets/seed_spread_<profile>.json)")
    args = parser.parse_args(argv)
    profile = get_profile(args.profile)
    out = args.out or spread_path(profile.name)
    result = load_spread(profile.name) if out == spread_path(profile.name) else None
    result = result if result and result.get("seeds") == list(range(args.seeds)) else {}
    result.update(profile=profile.name, seeds=list(range(args.seeds)))
    os.environ.setdefault("COURSE_CHECKPOINT_DIR", tempfile.mkdtemp(prefix="seed_spread_"))  # shared pretraining
    for study in args.studies:
        seeds = range(min(args.seeds, SEEDS_OF.get(study, args.seeds)))
        result[study] = [row for seed in seeds for row in STUDIES[study](profile, seed)]
        out.write_text(json.dumps(result, indent=1) + "\n")  # after every study: a long sweep keeps what it did
        print(f"{study}: {len(result[study])} rows written to {out}", flush=True)


if __name__ == "__main__":
    main()
