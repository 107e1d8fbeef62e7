"""The course's speed and memory claims, each measured in one run: `python -m course_lib.bench kv|moe|mtp`.

kv (notebooks 01 and 03):
- `decode_speed`: greedy decoding with and without the KV cache, for the cpu profile's baseline model;
- `mla_decode_speed`: one decoding step over S cached tokens of MLA absorbed, MLA naive and MHA, on one
  attention layer with DeepSeek's proportions (C = 4·D and Dr = D/2 as in V2/V3, 16 heads);
- `cache_bytes`: cache bytes per token of notebook 03's MLA model and the MHA baseline, read off live caches.
moe (notebook 04):
- `dispatch_speed`: tokens/s of the four dispatches of `course_lib.moe` on a training-sized batch,
  forward and forward+backward, after checking that they agree;
- `moe_vs_dense`: a DeepSeekMoE layer against a dense SwiGLU as wide as its shared + K active experts.
mtp (notebook 09):
- `speculative_speed`: greedy decoding at batch 1, self-speculative vs plain cached, on MTP models of
  notebook 09's width with 3, 6 and 12 main blocks; the drafts are forced right at a chosen acceptance rate.

Each function returns rows, a list of dicts of plain numbers, which `main` prints; unit tests run them with
quick=True (small sizes, one repeat) and check structure, never time. Weights are untrained: speed does not
depend on them. Times are medians of callables measured round-robin (`bench.compare_many`), each sample
about 50 ms of back-to-back calls.

Letters: B batch, S cached tokens, H heads, D head width, C latent rank, Dr RoPE width, N tokens,
E experts, K top-k, I expert width.
"""

from __future__ import annotations

import argparse
import os
import time
from functools import partial

import torch
from torch import nn

from .attention import CausalSelfAttention, MultiHeadLatentAttention
from .bench import compare_many
from .config import ModelConfig
from .layers import SwiGLU
from .model import CourseModel
from .moe import DeepSeekMoE, dispatch_expert_loop, dispatch_padded, dispatch_token_loop, dispatch_vectorized
from .mtp import MTPModel, forced_drafter, speculative_generate
from .profiles import get_profile, notebook_threads
from .train import generate

# notebook 03's MLA variant of the baseline: 8 heads, C = Dr = D = Dv = 16
COURSE_MLA = dict(attention="mla", num_attention_heads=8, qk_nope_head_dim=16, v_head_dim=16, qk_rope_head_dim=16,
                  kv_lora_rank=16)
# DeepSeek-V2/V3 have D = 128, C = 512 = 4·D, Dr = 64 = D/2 and 128 heads; the same proportions at a CPU's size
DEEPSEEK_PROPORTIONS = ModelConfig(hidden_size=1024, num_attention_heads=16, head_dim=64, attention="mla",
                                   kv_lora_rank=256, qk_nope_head_dim=64, qk_rope_head_dim=32, v_head_dim=64,
                                   max_position_embeddings=8192)
MOE_SHAPES = ((8, 2), (16, 3))  # (E, K) of the MoE benchmarks
CLOCKS = {"wall": time.perf_counter, "cpu": time.process_time}
DISPATCH_FNS = {"token_loop": dispatch_token_loop, "expert_loop": dispatch_expert_loop,
                "vectorized": dispatch_vectorized, "padded": dispatch_padded}


def _time(fns: dict, quick: bool, repeats: int, clock, grad: bool = False) -> dict:
    """compare_many with one warm-up round, each sample about 50 ms of calls (quick: no warm-up, one call
    per sample), under no_grad unless the pass trains."""
    with torch.set_grad_enabled(grad):
        return compare_many(fns, warmup=0 if quick else 1, repeats=repeats, clock=clock,
                            sample_seconds=None if quick else 0.05)


# ----------------------------------------------------------------------------- kv

def decode_speed(quick: bool = False, repeats: int = 5, device: str = "cpu", clock=time.perf_counter) -> list[dict]:
    """Greedy decoding tokens/s with and without the KV cache: one row per number of new tokens."""
    torch.manual_seed(0)
    model = CourseModel(get_profile("cpu").baseline_config()).to(device).eval()
    batch, lengths = (2, (8,)) if quick else (8, (32, 128))
    g = torch.Generator().manual_seed(0)
    prompt = torch.randint(2, model.config.vocab_size, (batch, 8), generator=g).to(device)  # (B, 8)
    rows = []
    for n in lengths:
        t = _time({"cached": partial(generate, model, prompt, n, use_cache=True),
                   "uncached": partial(generate, model, prompt, n, use_cache=False)}, quick, repeats, clock)
        rows.append({"new_tokens": n, "batch": batch, "cached_tok_s": t["cached"].per_second(n * batch),
                     "uncached_tok_s": t["uncached"].per_second(n * batch),
                     "cached_speedup": t["uncached"].median / t["cached"].median})
    return rows


def _decode_step(attn: nn.Module, cache, x_new: torch.Tensor, absorb: bool | None = None) -> torch.Tensor:
    """One new token attends over the cache; the cache is cropped back, so every repeat sees the same S."""
    if absorb is not None:
        attn.absorb = absorb
    S = cache.seq_len
    out = attn(x_new, cache)  # (B, 1, hidden)
    cache.crop(S)
    return out


@torch.no_grad()
def mla_decode_speed(quick: bool = False, repeats: int = 5, device: str = "cpu", clock=time.perf_counter,
                     batch: int = 1) -> list[dict]:
    """Per decoded token, ms of MLA absorbed, MLA naive and MHA (same heads and head width) over S cached tokens.

    The caches are filled with random numbers (cache.update): a step costs the same whatever they hold.
    Absorbed and naive must agree on that cache before they are timed.
    """
    cfg = DEEPSEEK_PROPORTIONS
    torch.manual_seed(0)
    mla = MultiHeadLatentAttention(cfg).to(device).eval()
    mha = CausalSelfAttention(cfg.replace(attention="mha")).to(device).eval()
    H, D, C, Dr = cfg.num_attention_heads, cfg.resolved_head_dim, cfg.kv_lora_rank, cfg.qk_rope_head_dim
    g = torch.Generator().manual_seed(0)
    x_new = torch.randn(batch, 1, cfg.hidden_size, generator=g).to(device)  # (B, 1, hidden)
    rows = []
    for S in ((64, 256) if quick else (1024, 4096)):
        mla_cache, mha_cache = mla.new_cache(), mha.new_cache()
        mla_cache.update(torch.randn(batch, S, C, generator=g).to(device),
                         torch.randn(batch, S, Dr, generator=g).to(device))  # (B, S, C), (B, S, Dr)
        mha_cache.update(torch.randn(batch, H, S, D, generator=g).to(device),
                         torch.randn(batch, H, S, D, generator=g).to(device))  # (B, H, S, D) each
        torch.testing.assert_close(_decode_step(mla, mla_cache, x_new, absorb=True),
                                   _decode_step(mla, mla_cache, x_new, absorb=False), rtol=1e-4, atol=1e-5)
        t = _time({"absorbed": partial(_decode_step, mla, mla_cache, x_new, absorb=True),
                   "naive": partial(_decode_step, mla, mla_cache, x_new, absorb=False),
                   "mha": partial(_decode_step, mha, mha_cache, x_new)}, quick, repeats, clock)
        ms = {name: timing.median * 1e3 for name, timing in t.items()}
        rows.append({"cached_tokens": S, "batch": batch, "absorbed_ms": ms["absorbed"], "naive_ms": ms["naive"],
                     "mha_ms": ms["mha"], "naive_over_absorbed": ms["naive"] / ms["absorbed"],
                     "mha_over_absorbed": ms["mha"] / ms["absorbed"]})
    return rows


@torch.no_grad()
def cache_bytes(device: str = "cpu") -> list[dict]:
    """Cache bytes per token (all layers, float32) of notebook 03's MLA model and the MHA baseline, live."""
    profile = get_profile("cpu")
    configs = {"MHA": profile.baseline_config(), "MLA": profile.baseline_config(**COURSE_MLA)}
    prompt = torch.randint(2, 32, (4, 9), generator=torch.Generator().manual_seed(0)).to(device)  # (B, T)
    rows = []
    for name, cfg in configs.items():
        torch.manual_seed(0)
        model = CourseModel(cfg).to(device).eval()
        cache = model.new_cache()
        model(prompt, cache)
        rows.append({"attention": name, "layers": cfg.num_hidden_layers, "heads": cfg.num_attention_heads,
                     "bytes_per_token": cache.nbytes / prompt.numel()})
    for row in rows:
        row["relative_to_mha"] = row["bytes_per_token"] / rows[0]["bytes_per_token"]
    return rows


# ----------------------------------------------------------------------------- moe

def moe_layer(E: int, K: int) -> DeepSeekMoE:
    """The cpu profile's width (hidden 128) with E experts of width I = 88, top-K, one shared expert."""
    profile = get_profile("cpu")
    cfg = profile.baseline_config(ffn="moe", n_routed_experts=E, num_experts_per_tok=K, n_shared_experts=1,
                                  moe_intermediate_size=profile.intermediate_size // 4)
    return DeepSeekMoE(cfg)


def _batch(quick: bool, hidden: int, device: str) -> torch.Tensor:
    """A training batch of hidden states: the cpu profile's 32 sequences of 40 tokens (quick: 4 of 16)."""
    B, T = (4, 16) if quick else (get_profile("cpu").batch_size, 40)
    return torch.randn(B, T, hidden, generator=torch.Generator().manual_seed(0)).to(device)  # (B, T, hidden)


def _dispatch_fwd_bwd(fn, experts: nn.ModuleList, x: torch.Tensor, topk_idx: torch.Tensor,
                      topk_weight: torch.Tensor, probe: torch.Tensor) -> None:
    """One training pass of a dispatch: forward, then backward into x, the routing weights and the experts."""
    experts.zero_grad(set_to_none=True)
    x.grad = topk_weight.grad = None
    (fn(experts, x, topk_idx, topk_weight) * probe).sum().backward()


def dispatch_speed(quick: bool = False, repeats: int = 5, device: str = "cpu", clock=time.perf_counter) -> list[dict]:
    """Tokens/s of each dispatch, forward and forward+backward: one row per (E, K, pass).

    The expert loop, the vectorized and the padded dispatch are timed round-robin; the token loop apart
    (see below).

    Routing comes from the layer's own (untrained) router, so the load is close to balanced; each row
    records its busiest expert's load over the mean, which sets the padded dispatch's padding.
    """
    rows = []
    for E, K in MOE_SHAPES:
        torch.manual_seed(0)
        layer = moe_layer(E, K).to(device)
        x = _batch(quick, layer.config.hidden_size, device)
        N = x.shape[0] * x.shape[1]
        with torch.no_grad():
            topk_idx, topk_weight = layer.route(x)  # (N, K), (N, K)
        x = x.reshape(N, -1)  # (N, hidden)
        load = torch.bincount(topk_idx.flatten(), minlength=E).float()  # (E,)
        with torch.no_grad():
            outs = {name: fn(layer.experts, x, topk_idx, topk_weight) for name, fn in DISPATCH_FNS.items()}
        for name, out in outs.items():
            torch.testing.assert_close(out, outs["token_loop"], rtol=1e-4, atol=1e-5, msg=lambda m: f"{name}: {m}")
        x_leaf, w_leaf = x.clone().requires_grad_(), topk_weight.clone().requires_grad_()
        probe = torch.randn(x.shape, generator=torch.Generator().manual_seed(1)).to(device)  # (N, hidden)
        forward = {name: partial(fn, layer.experts, x, topk_idx, topk_weight)
                   for name, fn in DISPATCH_FNS.items()}
        training = {name: partial(_dispatch_fwd_bwd, fn, layer.experts, x_leaf, topk_idx, w_leaf, probe)
                    for name, fn in DISPATCH_FNS.items()}
        for pass_, fns in (("forward", forward), ("forward+backward", training)):
            grad = pass_ != "forward"
            # The token loop is timed on its own: its thousands of small tensors make malloc hand memory back
            # to the OS, and the next callable's large buffers would page-fault it in again (seen: ~1,900
            # faults and 1.5x the time for the padded dispatch right after it).
            t = {**_time({"token_loop": fns.pop("token_loop")}, quick, repeats, clock, grad),
                 **_time(fns, quick, repeats, clock, grad)}
            rows.append({"experts": E, "top_k": K, "tokens": N, "pass": pass_,
                         "load_max_over_mean": (load.max() / load.mean()).item(),
                         **{f"{name}_tok_s": timing.per_second(N) for name, timing in t.items()}})
    return rows


def _layer_step(module: nn.Module, x: torch.Tensor, probe: torch.Tensor | None,
                dispatch: str | None = None) -> None:
    """A whole FFN layer (router included for MoE) forward, and backward too when given a probe (training)."""
    if dispatch is not None:
        module.dispatch = dispatch
    module.zero_grad(set_to_none=True)
    out = module(x)  # (B, T, hidden)
    if probe is not None:
        (out * probe).sum().backward()


def moe_vs_dense(quick: bool = False, repeats: int = 5, device: str = "cpu", clock=time.perf_counter) -> list[dict]:
    """Tokens/s of a DeepSeekMoE layer (vectorized and expert-loop dispatch) against a dense SwiGLU of width
    (shared + K)·I, which has the same active parameters but for the router: one row per (E, K, pass)."""
    rows = []
    for E, K in MOE_SHAPES:
        torch.manual_seed(0)
        moe = moe_layer(E, K).to(device)
        cfg = moe.config
        dense = SwiGLU(cfg.hidden_size, (cfg.n_shared_experts + K) * cfg.moe_intermediate_size).to(device)
        x = _batch(quick, cfg.hidden_size, device)
        N = x.shape[0] * x.shape[1]
        dense_params = sum(p.numel() for p in dense.parameters())
        active_params = sum(p.numel() for p in moe.parameters()) - moe.inactive_parameters()
        probe = torch.randn(x.shape, generator=torch.Generator().manual_seed(1)).to(device)  # (B, T, hidden)
        forward = {"moe_vectorized": partial(_layer_step, moe, x, None, "vectorized"),
                   "moe_expert_loop": partial(_layer_step, moe, x, None, "expert_loop"),
                   "dense": partial(_layer_step, dense, x, None)}
        training = {"moe_vectorized": partial(_layer_step, moe, x, probe, "vectorized"),
                    "moe_expert_loop": partial(_layer_step, moe, x, probe, "expert_loop"),
                    "dense": partial(_layer_step, dense, x, probe)}
        for pass_, fns in (("forward", forward), ("forward+backward", training)):
            t = _time(fns, quick, repeats, clock, grad=pass_ != "forward")
            rows.append({"experts": E, "top_k": K, "tokens": N, "pass": pass_, "moe_active_params": active_params,
                         "dense_params": dense_params,
                         **{f"{name}_tok_s": timing.per_second(N) for name, timing in t.items()}})
    return rows


# ----------------------------------------------------------------------------- mtp

def speculative_speed(quick: bool = False, repeats: int = 5, device: str = "cpu", clock=time.perf_counter,
                      acceptance: float = 0.85) -> list[dict]:
    """Greedy decoding of one sequence (batch 1), self-speculative against plain cached, one row per depth of
    the main model (the draft is always one MTP block), at notebook 09's width. Weights are untrained and the
    drafts forced right at the rate `acceptance` (`forced_drafter`), so both decoders emit the same
    tokens (checked) and only the speed differs; notebook 09 measures a trained drafter's own rate."""
    base = get_profile("cpu").mtp_config()
    depths, n = ((2,), 8) if quick else ((base.num_hidden_layers // 2, base.num_hidden_layers,
                                          2 * base.num_hidden_layers), 64)
    g = torch.Generator().manual_seed(0)
    prompt = torch.randint(2, base.vocab_size, (1, 8), generator=g).to(device)  # (1, 8)
    rows = []
    for layers in depths:
        torch.manual_seed(0)
        model = MTPModel(base.replace(num_hidden_layers=layers), num_nextn_predict_layers=1).to(device).eval()
        plain = generate(model, prompt, n)  # greedy, no stop token: n new tokens
        drafter = forced_drafter(prompt[0].tolist() + plain.tokens[0].tolist(), acceptance)
        spec = speculative_generate(model, prompt, n, decoder_cls=drafter)
        if spec.tokens.tolist() != plain.tokens.tolist():
            raise RuntimeError(f"self-speculative decoding changed the greedy output of a {layers}-block model")
        t = _time({"plain": partial(generate, model, prompt, n),
                   "speculative": partial(speculative_generate, model, prompt, n, decoder_cls=drafter)},
                  quick, repeats, clock)
        rows.append({"main_blocks": layers, "new_tokens": n, "acceptance": spec.acceptance_rate,
                     "tokens_per_forward": n / spec.main_forwards, "plain_tok_s": t["plain"].per_second(n),
                     "speculative_tok_s": t["speculative"].per_second(n),
                     "speedup": t["plain"].median / t["speculative"].median})
    return rows


# ----------------------------------------------------------------------------- the command line

def _header(device: str) -> str:
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    return (f"torch {torch.__version__} on {device}, {torch.get_num_threads()} thread(s); "
            f"load average {load:.1f} on {os.cpu_count()} CPUs")


def report_kv(quick: bool, repeats: int, device: str, clock) -> None:
    print("KV cache: greedy decode of the cpu profile's baseline model (untrained), cached vs uncached")
    for r in decode_speed(quick, repeats, device, clock):
        print(f"  {r['new_tokens']:>4} new tokens x {r['batch']}: cached {r['cached_tok_s']:>9,.0f} tok/s, "
              f"uncached {r['uncached_tok_s']:>9,.0f} tok/s: cached/uncached {r['cached_speedup']:5.1f}x")
    cfg = DEEPSEEK_PROPORTIONS
    print(f"\nOne decode step, {cfg.num_attention_heads} heads, D = {cfg.qk_nope_head_dim}, C = {cfg.kv_lora_rank}, "
          f"Dr = {cfg.qk_rope_head_dim} (MLA) vs MHA with D = {cfg.resolved_head_dim}; ms per decoded token")
    rows = mla_decode_speed(quick, repeats, device, clock)
    for r in rows:
        print(f"  S={r['cached_tokens']:>5} batch {r['batch']}: absorbed {r['absorbed_ms']:7.2f} ms, "
              f"naive {r['naive_ms']:8.2f} ms, MHA {r['mha_ms']:7.2f} ms: naive/absorbed "
              f"{r['naive_over_absorbed']:5.1f}x, MHA/absorbed {r['mha_over_absorbed']:5.2f}x")
    last = rows[-1]
    verdict = "met" if last["naive_over_absorbed"] >= 2 else "NOT met"
    note = "" if last["cached_tokens"] == 4096 else " (quick run: the floor is set at 4096)"
    print(f"  floor, absorbed >= 2x faster than naive at 4096 cached tokens: {verdict}, "
          f"{last['naive_over_absorbed']:.1f}x at {last['cached_tokens']}{note}")
    print("\nCache bytes per token, all layers, float32, read off live caches (notebook 03's configs)")
    mha, mla = cache_bytes(device)
    for r in (mha, mla):
        print(f"  {r['attention']} ({r['layers']} layers, {r['heads']} heads): "
              f"{r['bytes_per_token']:>6,.0f} bytes per token")
    print(f"  MLA/MHA = {mla['relative_to_mha']:.3f}: MHA caches {1 / mla['relative_to_mha']:.1f}x more per token")


def report_moe(quick: bool, repeats: int, device: str, clock, threads_given: bool = False) -> None:
    print("MoE dispatch (routed experts only), tokens/s; hidden 128, expert width 88, the layer's own router")
    rows = dispatch_speed(quick, repeats, device, clock)
    for r in rows:
        vec, tok, exp = r["vectorized_tok_s"], r["token_loop_tok_s"], r["expert_loop_tok_s"]
        print(f"  E={r['experts']:>2} K={r['top_k']} N={r['tokens']} {r['pass']:<16}: vectorized {vec:>9,.0f}, "
              f"token loop {tok:>8,.0f}, expert loop {exp:>9,.0f}, padded {r['padded_tok_s']:>9,.0f}: "
              f"vectorized/token {vec / tok:5.1f}x, vectorized/expert {vec / exp:4.2f}x "
              f"(load max/mean {r['load_max_over_mean']:.2f})")
    met = all(r["vectorized_tok_s"] >= 5 * r["token_loop_tok_s"] and r["vectorized_tok_s"] >= r["expert_loop_tok_s"]
              for r in rows if r["experts"] >= 8)
    print(f"  floor, vectorized >= 5x the token loop and >= the expert loop with 8+ experts: "
          f"{'met' if met else 'NOT met'} in {'every row' if met else 'some rows'}")
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
            layer_rows = moe_vs_dense(quick, repeats, device, clock)
            for r in layer_rows:
                dense = r["dense_tok_s"]
                print(f"  E={r['experts']:>2} K={r['top_k']} N={r['tokens']} {r['pass']:<16}: MoE vectorized "
                      f"{r['moe_vectorized_tok_s']:>9,.0f} ({r['moe_vectorized_tok_s'] / dense:4.2f}x dense), "
                      f"expert loop {r['moe_expert_loop_tok_s']:>9,.0f} ({r['moe_expert_loop_tok_s'] / dense:4.2f}x), "
                      f"dense {dense:>9,.0f}; active params {r['moe_active_params']:,} vs {r['dense_params']:,}")
            met = all(r["moe_vectorized_tok_s"] >= 0.5 * r["dense_tok_s"] for r in layer_rows)
            print(f"  floor, the MoE layer (vectorized) >= 0.5x the dense FFN's tokens/s with {n} thread(s): "
                  f"{'met' if met else 'NOT met'} in {'every row' if met else 'some rows'}")
    finally:
        torch.set_num_threads(default)


def report_mtp(quick: bool, repeats: int, device: str, clock, acceptance: float) -> None:
    cfg = get_profile("cpu").mtp_config()
    print(f"Self-speculative vs plain cached greedy decoding, batch 1, notebook 09's width ({cfg.hidden_size}), "
          f"untrained weights, a fraction {acceptance:.2f} of the drafts forced right")
    rows = speculative_speed(quick, repeats, device, clock, acceptance)
    for r in rows:
        print(f"  {r['main_blocks']:>2} main blocks, {r['new_tokens']} new tokens: plain {r['plain_tok_s']:>6,.0f} "
              f"tok/s, speculative {r['speculative_tok_s']:>6,.0f} tok/s ({r['acceptance']:.0%} accepted, "
              f"{r['tokens_per_forward']:.2f} tokens per forward): {r['speedup']:.2f}x")
    at = [r["speedup"] for r in rows if r["main_blocks"] == cfg.num_hidden_layers]
    verdict = "not measured (quick run)" if not at else f"{'met' if at[0] >= 1.2 else 'NOT met'}, {at[0]:.2f}x"
    print(f"  floor, speculative >= 1.2x plain at notebook 09's depth ({cfg.num_hidden_layers} blocks): {verdict}")


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m course_lib.bench", description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="bench", required=True)
    for name, text in (("kv", "KV cache decode, MLA absorbed/naive vs MHA, cache bytes per token"),
                       ("moe", "MoE dispatch tokens/s, MoE layer vs dense SwiGLU"),
                       ("mtp", "self-speculative vs plain greedy decoding at 3 depths of the main model")):
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
        report_kv(args.quick, repeats, args.device, CLOCKS[args.clock])
    elif args.bench == "mtp":
        report_mtp(args.quick, repeats, args.device, CLOCKS[args.clock], args.acceptance)
    else:
        report_moe(args.quick, repeats, args.device, CLOCKS[args.clock], threads_given=args.threads is not None)
