"""The benchmarks' command line: print each measurement of `measure` and judge the floors the course claims.

`python -m course_lib.benchmarks kv|moe|mtp|ep [--quick] [--repeats N] [--threads N] [--clock cpu]` exits with
status 1 when a floor is missed; a quick run (small sizes) judges none.
"""

from __future__ import annotations

import argparse
import os

import torch

from ..presets import mtp_config
from ..profiles import get_profile, notebook_threads
from . import measure
from .measure import CLOCKS, DEEPSEEK_PROPORTIONS


def _floor(claim: str, met: bool | None, detail: str = "") -> bool | None:
    """Print one floor's verdict (None: not judged, e.g. on a quick run) and return it."""
    verdict = "not judged (quick run)" if met is None else ("met" if met else "NOT met")
    print(f"  floor, {claim}: {verdict}{detail}")
    return met


def _header(device: str) -> str:
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    return (f"torch {torch.__version__} on {device}, {torch.get_num_threads()} thread(s); "
            f"load average {load:.1f} on {os.cpu_count()} CPUs")


def report_kv(quick: bool, repeats: int, device: str, clock) -> list[bool | None]:
    print("KV cache: greedy decode of the cpu profile's baseline model (untrained), cached vs uncached")
    decode = measure.decode_speed(quick, repeats, device, clock)
    for r in decode:
        print(f"  {r['new_tokens']:>4} new tokens x {r['batch']}: cached {r['cached_tok_s']:>9,.0f} tok/s, "
              f"uncached {r['uncached_tok_s']:>9,.0f} tok/s: cached/uncached {r['cached_speedup']:5.1f}x")
    at = [r["cached_speedup"] for r in decode if r["new_tokens"] == 128]
    floors = [_floor("cached decoding >= 3x uncached at 128 new tokens", None if not at else at[0] >= 3,
                     f", {at[0]:.1f}x" if at else "")]
    cfg = DEEPSEEK_PROPORTIONS
    print(f"\nOne decode step, {cfg.num_attention_heads} heads, D = {cfg.qk_nope_head_dim}, C = {cfg.kv_lora_rank}, "
          f"Dr = {cfg.qk_rope_head_dim} (MLA) vs MHA with D = {cfg.resolved_head_dim}; ms per decoded token")
    rows = measure.mla_decode_speed(quick, repeats, device, clock)
    for r in rows:
        print(f"  S={r['cached_tokens']:>5} batch {r['batch']}: absorbed {r['absorbed_ms']:7.2f} ms, "
              f"naive {r['naive_ms']:8.2f} ms, MHA {r['mha_ms']:7.2f} ms: naive/absorbed "
              f"{r['naive_over_absorbed']:5.1f}x, MHA/absorbed {r['mha_over_absorbed']:5.2f}x")
    last = rows[-1]
    floors.append(_floor("absorbed >= 2x faster than naive at 4096 cached tokens",
                         None if last["cached_tokens"] != 4096 else last["naive_over_absorbed"] >= 2,
                         f", {last['naive_over_absorbed']:.1f}x at {last['cached_tokens']}"))
    print("\nCache bytes per token, all layers, float32, read off live caches (notebook 03's configs)")
    mha, mla = measure.cache_bytes(device)
    for r in (mha, mla):
        print(f"  {r['attention']} ({r['layers']} layers, {r['heads']} heads): "
              f"{r['bytes_per_token']:>6,.0f} bytes per token")
    print(f"  MLA/MHA = {mla['relative_to_mha']:.3f}: MHA caches {1 / mla['relative_to_mha']:.1f}x more per token")
    return floors


def report_moe(quick: bool, repeats: int, device: str, clock, threads_given: bool = False) -> list[bool | None]:
    print("MoE dispatch (routed experts only), tokens/s; hidden 128, expert width 88, the layer's own router")
    rows = measure.dispatch_speed(quick, repeats, device, clock)
    for r in rows:
        vec, tok, exp = r["vectorized_tok_s"], r["token_loop_tok_s"], r["expert_loop_tok_s"]
        print(f"  E={r['experts']:>2} K={r['top_k']} N={r['tokens']} {r['pass']:<16}: vectorized {vec:>9,.0f}, "
              f"token loop {tok:>8,.0f}, expert loop {exp:>9,.0f}, padded {r['padded_tok_s']:>9,.0f}: "
              f"vectorized/token {vec / tok:5.1f}x, vectorized/expert {vec / exp:4.2f}x "
              f"(load max/mean {r['load_max_over_mean']:.2f})")
    met = all(r["vectorized_tok_s"] >= 5 * r["token_loop_tok_s"] and r["vectorized_tok_s"] >= r["expert_loop_tok_s"]
              for r in rows if r["experts"] >= 8)
    floors = [_floor("vectorized >= 5x the token loop and >= the expert loop with 8+ experts",
                     None if quick else met, f" in {'every row' if met else 'some rows'}")]
    # The ratio depends on the thread count: the dense FFN's three large matmuls use every thread, the MoE's
    # many small per-expert ones gain little from a second. Without --threads, both the notebooks' setting
    # (setup_notebook: half the usable cores) and torch's default (all of them) are measured.
    default = torch.get_num_threads()
    if threads_given:
        settings = [(default, "as asked")]
    elif notebook_threads() == default:
        settings = [(default, "the notebooks' setting and torch's default")]
    else:
        settings = [(notebook_threads(), "the notebooks' setting"), (default, "torch's default")]
    try:
        for n, which in settings:
            torch.set_num_threads(n)
            print(f"\nMoE layer (router + 1 shared + top-K routed) vs dense SwiGLU of the same active width, "
                  f"tokens/s; {n} thread(s), {which}")
            layer_rows = measure.moe_vs_dense(quick, repeats, device, clock)
            for r in layer_rows:
                dense = r["dense_tok_s"]
                print(f"  E={r['experts']:>2} K={r['top_k']} N={r['tokens']} {r['pass']:<16}: MoE vectorized "
                      f"{r['moe_vectorized_tok_s']:>9,.0f} ({r['moe_vectorized_tok_s'] / dense:4.2f}x dense), "
                      f"expert loop {r['moe_expert_loop_tok_s']:>9,.0f} ({r['moe_expert_loop_tok_s'] / dense:4.2f}x), "
                      f"dense {dense:>9,.0f}; active params {r['moe_active_params']:,} vs {r['dense_params']:,}")
            met = all(r["moe_vectorized_tok_s"] >= 0.5 * r["dense_tok_s"] for r in layer_rows)
            floors.append(_floor(f"the MoE layer (vectorized) >= 0.5x the dense FFN's tokens/s with {n} thread(s)",
                                 None if quick else met, f" in {'every row' if met else 'some rows'}"))
    finally:
        torch.set_num_threads(default)
    return floors


def report_mtp(quick: bool, repeats: int, device: str, clock, acceptance: float) -> list[bool | None]:
    cfg = mtp_config(get_profile("cpu"))
    print(f"Self-speculative vs plain cached greedy decoding, batch 1, notebook 09's width ({cfg.hidden_size}), "
          f"untrained weights, a fraction {acceptance:.2f} of the drafts forced right")
    rows = measure.speculative_speed(quick, repeats, device, clock, acceptance)
    for r in rows:
        print(f"  {r['main_blocks']:>2} main blocks, {r['new_tokens']} new tokens: plain {r['plain_tok_s']:>6,.0f} "
              f"tok/s, speculative {r['speculative_tok_s']:>6,.0f} tok/s ({r['acceptance']:.0%} accepted, "
              f"{r['tokens_per_forward']:.2f} tokens per forward): {r['speedup']:.2f}x")
    at = [r["speedup"] for r in rows if r["main_blocks"] == cfg.num_hidden_layers]
    return [_floor(f"speculative >= 1.2x plain at notebook 09's depth ({cfg.num_hidden_layers} blocks)",
                   None if not at else at[0] >= 1.2, f", {at[0]:.2f}x" if at else "")]


def report_ep(quick: bool) -> list[bool | None]:
    print("Expert parallelism: one DeepSeekMoE layer (8 experts, top-2, hidden 64) on W gloo processes vs one")
    rows = measure.ep_parity(quick)
    for r in rows:
        print(f"  W={r['world_size']}: output error {r['output_err']:.1e}, gradient error {r['grad_err']:.1e}; "
              f"bytes/token measured {r['bytes_measured']:.2f}, formula {r['bytes_formula']:.2f}")
    worst = max(max(r["output_err"], r["grad_err"]) for r in rows)
    floors = [_floor("outputs and gradients within 1e-6 of one process", worst <= 1e-6, f", worst {worst:.1e}"),
              _floor("bytes per token from the split sizes equal the formula",
                     all(r["bytes_measured"] == r["bytes_formula"] for r in rows))]
    print("\nNode-limited routing on 4 ranks (one group each), 16 experts, top-4")
    limited = measure.ep_node_limited(quick)
    for r in limited:
        print(f"  {r['routing']:>18}: {r['cross_group_bytes_per_token']:7.1f} cross-group bytes/token, "
              f"groups per token mean {r['mean_groups']:.2f}, max {r['max_groups']}")
    cut = 1 - limited[1]["cross_group_bytes_per_token"] / limited[0]["cross_group_bytes_per_token"]
    floors.append(_floor("node-limited: at most M=2 groups per token and >= 15% fewer cross-group bytes",
                         limited[1]["max_groups"] <= 2 and cut >= 0.15, f", cut {cut:.0%}"))
    print("\nStragglers on 2 ranks: a router preferring rank 0's experts, without and with the aux-loss-free bias")
    summary = measure.ep_stragglers(quick)
    for name in ("no balancing", "aux-loss-free bias"):
        s = summary[name]
        print(f"  {name:>18}: load max/mean {s['load_max_over_mean']:.2f}, expert CPU ms busiest "
              f"{s['busiest_cpu_ms']:.1f} / mean {s['mean_cpu_ms']:.1f} (ranks wait {s['waiting']:.0%}), "
              f"step {s['step_ms']:.1f} ms")
    skewed, balanced = summary["no balancing"], summary["aux-loss-free bias"]
    print(f"  step time no balancing / balanced: {skewed['step_ms'] / balanced['step_ms']:.2f}x "
          f"(load ratio {skewed['load_max_over_mean'] / balanced['load_max_over_mean']:.2f}x)")
    floors.append(_floor("aux-loss-free balancing: busiest rank within 15% of the mean (from > 30% above it)",
                         skewed["load_max_over_mean"] > 1.3 and balanced["load_max_over_mean"] <= 1.15))
    floors.append(_floor("the other ranks wait >= 25% of the expert CPU time unbalanced, <= 20% balanced",
                         None if quick else skewed["waiting"] >= 0.25 and balanced["waiting"] <= 0.2,
                         f", {skewed['waiting']:.0%} and {balanced['waiting']:.0%}"))
    return floors


def main(argv: list[str] | None = None) -> int:
    """Run one benchmark; returns the exit status: 1 if a floor was missed, else 0."""
    ap = argparse.ArgumentParser(prog="python -m course_lib.benchmarks", description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="bench", required=True)
    for name, text in (("kv", "KV cache decode, MLA absorbed/naive vs MHA, cache bytes per token"),
                       ("moe", "MoE dispatch tokens/s, MoE layer vs dense SwiGLU"),
                       ("mtp", "self-speculative vs plain greedy decoding at 3 depths of the main model"),
                       ("ep", "expert parallelism on gloo processes: parity, bytes per token, node limit, stragglers")):
        p = sub.add_parser(name, help=text, description=text)
        p.add_argument("--repeats", type=int, default=None,
                       help="timed repeats per measurement (default 5; 1 with --quick)")
        p.add_argument("--quick", action="store_true", help="small sizes and one repeat: a smoke run in seconds")
        p.add_argument("--device", default="cpu", help="torch device (default cpu)")
        p.add_argument("--threads", type=int, default=None,
                       help="torch.set_num_threads (default: torch's choice; the MoE-vs-dense comparison then "
                            "also runs at the notebooks' setting, half the usable cores)")
        p.add_argument("--clock", choices=CLOCKS, default="wall",
                       help="wall time (default), or this process's CPU time: steadier on a busy machine, "
                            "meaningful with --threads 1")
        if name == "mtp":
            p.add_argument("--acceptance", type=float, default=0.85,
                           help="fraction of the drafts forced right (default 0.85, DeepSeek-V3's lower figure)")
    args = ap.parse_args(argv)
    if args.bench == "mtp" and not 0 <= args.acceptance <= 1:
        ap.error(f"--acceptance {args.acceptance} must be between 0 and 1, e.g. 0.85")
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    repeats = args.repeats or (1 if args.quick else 5)
    print(_header(args.device) + f"; {args.clock} clock, medians of {repeats} round-robin repeat(s)"
          f"{', quick sizes' if args.quick else ''}\n")
    if args.bench == "kv":
        floors = report_kv(args.quick, repeats, args.device, CLOCKS[args.clock])
    elif args.bench == "ep":
        floors = report_ep(args.quick)
    elif args.bench == "mtp":
        floors = report_mtp(args.quick, repeats, args.device, CLOCKS[args.clock], args.acceptance)
    else:
        floors = report_moe(args.quick, repeats, args.device, CLOCKS[args.clock], threads_given=args.threads is not None)
    judged = [f for f in floors if f is not None]
    missed = judged.count(False)
    if not judged:
        print("\nno floor judged (a quick run measures small sizes)")
    else:
        print(f"\n{missed} of {len(judged)} floor(s) missed" if missed else f"\nall {len(judged)} floor(s) met")
    return 1 if missed else 0
