"""Decode speed with and without the KV cache, for the profile's baseline model (untrained weights:
speed does not depend on what the weights are).

    python benchmarks/decode.py [--profile cpu] [--batch 8] [--tokens 64 128 256]

Prints one row per length: tokens/s with and without the cache, measured alternately in one run.
"""

from __future__ import annotations

import argparse

import torch

from course_lib.bench import compare
from course_lib.model import CourseModel
from course_lib.profiles import get_profile, setup_notebook
from course_lib.train import generate


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--profile", default=None)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--tokens", type=int, nargs="+", default=[64, 128, 256])
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    setup = setup_notebook(seed=0, profile=args.profile)
    profile = get_profile(args.profile)
    model = CourseModel(profile.baseline_config()).to(setup.device).eval()
    prompt = torch.randint(2, model.config.vocab_size, (args.batch, 8), device=setup.device)
    print(f"{'tokens':>6} {'cached tok/s':>13} {'uncached tok/s':>15} {'speedup':>8}")
    for n in args.tokens:
        c = compare(lambda: generate(model, prompt, n, use_cache=True),
                    lambda: generate(model, prompt, n, use_cache=False), warmup=1, repeats=args.repeats)
        units = n * args.batch
        print(f"{n:>6} {c.a.per_second(units):>13,.0f} {c.b.per_second(units):>15,.0f} {c.speedup:>7.1f}x")


if __name__ == "__main__":
    main()
