"""The benchmarks' measurements: each function times one claim of the course and returns rows of plain numbers.

Weights are untrained (speed does not depend on them); times are medians of callables measured round-robin
(`course_lib.bench.compare_many`), each sample about 50 ms of back-to-back calls. Unit tests run every
function with quick=True (small sizes, one repeat) and check structure, never time; `course_lib.benchmarks.cli`
prints the rows and judges the floors.

Letters: B batch, S cached tokens, H heads, D head width, C latent rank, Dr RoPE width, N tokens,
E experts, K top-k, I expert width.
"""

from __future__ import annotations

import time
from functools import partial

import torch
from torch import nn

from ..attention import CausalSelfAttention, MultiHeadLatentAttention
from ..bench import compare_many
from ..config import ModelConfig
from ..expert_parallel import study
from ..generate import generate
from ..layers import SwiGLU
from ..model import CourseModel
from ..moe import DISPATCH_FNS, DeepSeekMoE
from ..mtp import MTPModel, SpeculativeDecoder, speculative_generate
from ..presets import mla_config, mtp_config
from ..profiles import get_profile

# DeepSeek-V2/V3 have D = 128, C = 512 = 4·D, Dr = 64 = D/2 and 128 heads; the same proportions at a CPU's size
DEEPSEEK_PROPORTIONS = ModelConfig(hidden_size=1024, num_attention_heads=16, head_dim=64, attention="mla",
                                   kv_lora_rank=256, qk_nope_head_dim=64, qk_rope_head_dim=32, v_head_dim=64,
                                   max_position_embeddings=8192)
MOE_SHAPES = ((8, 2), (16, 3))  # (E, K) of the MoE benchmarks
CLOCKS = {"wall": time.perf_counter, "cpu": time.process_time}


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
    configs = {"MHA": profile.baseline_config(), "MLA": mla_config(profile)}
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
            # to the OS, and the next callable's large buffers would page-fault it in again, slowing whichever
            # dispatch is timed right after it.
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

def forced_drafter(oracle: list[int], acceptance: float) -> type:
    """A SpeculativeDecoder class whose drafts are right (the token of `oracle`, the whole greedy sequence,
    prompt included) in a fraction `acceptance` of the drafts and wrong in the others, spread evenly and the
    same on every run: a trained drafter's acceptance rate on untrained weights (`python -m course_lib.benchmarks
    mtp`), or every draft right (1.0) or wrong (0.0) in tests. Drafts never change the output, only the speed."""
    if not 0 <= acceptance <= 1:
        raise ValueError(f"acceptance={acceptance} must be between 0 and 1 (DeepSeek-V3 reports 0.85-0.90).")

    class ForcedDrafter(SpeculativeDecoder):
        credit = 0.5  # each draft adds `acceptance`, a right one spends 1: round(m · acceptance) of m drafts right

        def propose(self, logits: torch.Tensor, k: int) -> int:
            right = oracle[len(self.tokens) + k - 1]  # d_k is the draft for t_{n+k-1}
            self.credit += acceptance
            if self.credit >= 1 - 1e-9:
                self.credit -= 1
                return right
            return (right + 1) % logits.shape[-1]

    return ForcedDrafter


def speculative_speed(quick: bool = False, repeats: int = 5, device: str = "cpu", clock=time.perf_counter,
                      acceptance: float = 0.85) -> list[dict]:
    """Greedy decoding of one sequence (batch 1), self-speculative against plain cached, one row per depth of
    the main model (the draft is always one MTP block), at notebook 09's width. Weights are untrained and the
    drafts forced right at the rate `acceptance` (`forced_drafter`), so both decoders emit the same
    tokens (checked) and only the speed differs; notebook 09 measures a trained drafter's own rate."""
    base = mtp_config(get_profile("cpu"))
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


# ----------------------------------------------------------------------------- ep (notebook 10)

def ep_parity(quick: bool = False) -> list[dict]:
    """One MoE layer on W spawned gloo processes against one process: errors and bytes per token per W."""
    return study.parity_rows((1, 2) if quick else (1, 2, 4))


def ep_node_limited(quick: bool = False) -> list[dict]:
    """Cross-group bytes per token on 4 ranks (one group each), unrestricted top-4 of 16 and limited to 2 groups."""
    return study.node_limited_rows(world_size=4, experts=16, top_k=4, limit=2, tokens=128 if quick else 512)


def ep_stragglers(quick: bool = False) -> dict:
    """Skewed routing on 2 ranks, without and with the aux-loss-free bias: {setting: straggler_summary}."""
    steps = 12 if quick else 24
    runs = study.straggler_runs(world_size=2, tokens=256 if quick else 1024, steps=steps)
    return {name: study.straggler_summary(rows, last=steps // 3) for name, rows in runs.items()} | {"runs": runs}
