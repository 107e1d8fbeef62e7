"""Exercises of notebooks 00 and 01: the decoder's pieces (RMSNorm, RoPE, SwiGLU) and attention with a KV cache.

Each reference below is what `ex.show_solution()` prints, so it is written to be read; the wrong versions
are the common mistakes the checker recognises and names. Sources: RMSNorm, Zhang & Sennrich 2019
(arXiv:1910.07467) eq 4; RoPE, RoFormer (Su et al., arXiv:2104.09864) §3.4.2 eq 34; SwiGLU, Shazeer 2020
(arXiv:2002.05202) eq 6; attention, Vaswani et al. 2017 (arXiv:1706.03762) eq 1.

Letters: B batch, H heads, T new tokens, S cached + new tokens, D head width, d hidden width, I FFN width.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from ..config import ModelConfig
from ..model import CourseModel
from .core import Experiment, Implement, Mistake, Predict
from .running import Case


def randn(seed: int, *shape: int, scale: float = 1.0) -> torch.Tensor:
    """Seeded standard-normal inputs: the same numbers on every machine."""
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)) * scale


# ----------------------------------------------------------------------------- 00: RMSNorm

def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """x / sqrt(mean(x^2) + eps) * weight over the last axis (no mean subtracted, unlike LayerNorm)."""
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * weight


def _norm_cases() -> list[Case]:
    return [Case("x (2, 5, 8)", (randn(0, 2, 5, 8), 1 + randn(1, 8, scale=0.1))),
            Case("x (3, 16) with a row of zeros", (torch.cat([randn(2, 2, 16), torch.zeros(1, 16)]), randn(3, 16))),
            Case("x (4, 32) of tiny values (1e-3)", (randn(4, 4, 32, scale=1e-3), torch.ones(32))),
            Case("x (1, 1, 64) far from zero mean", (3 + randn(5, 1, 1, 64), 1 + randn(6, 64, scale=0.1)))]


RMS_NORM = Implement(
    name="rms_norm", notebook="00",
    statement="Implement rms_norm(x, weight, eps=1e-6): x / sqrt(mean(x^2) + eps) * weight over the last axis "
              "(Zhang & Sennrich, arXiv:1910.07467, eq 4; the norm of Llama and DeepSeek).",
    hint_text="Mean of the squares over the last axis with keepdim=True, eps inside the square root, then the "
              "per-channel weight. No mean is subtracted: that is LayerNorm.",
    reference=rms_norm, cases=_norm_cases,
    mistakes=(
        Mistake("LayerNorm (the mean subtracted)", "RMSNorm only rescales: divide x itself by its root mean "
                "square, without centring it.",
                lambda x, w, eps=1e-6: (x - x.mean(-1, keepdim=True)) * torch.rsqrt(x.var(-1, keepdim=True, correction=0) + eps) * w),
        Mistake("eps added outside the square root", "Add eps to mean(x^2) before the square root: "
                "sqrt(mean(x^2) + eps).", lambda x, w, eps=1e-6: x / (x.pow(2).mean(-1, keepdim=True).sqrt() + eps) * w),
        Mistake("the weight left out", "Multiply by the learned per-channel `weight` at the end.",
                lambda x, w, eps=1e-6: x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)),
        Mistake("the sum of squares instead of their mean", "Divide by the root *mean* square: .mean(-1), not .sum(-1).",
                lambda x, w, eps=1e-6: x * torch.rsqrt(x.pow(2).sum(-1, keepdim=True) + eps) * w)))


# ----------------------------------------------------------------------------- 00: RoPE

def rope_interleaved(x: torch.Tensor, start_pos: int, theta: float = 10000.0) -> torch.Tensor:
    """Rotate x (B, H, T, D) whose tokens sit at positions start_pos .. start_pos+T-1 (RoFormer eq 34).

    Channel pair (2i, 2i+1) turns by the angle pos * theta^(-2i/D), the layout of RoFormer and DeepSeek.
    """
    T, D = x.shape[-2], x.shape[-1]
    inv_freq = theta ** (-torch.arange(0, D, 2, dtype=torch.float32) / D)  # (D/2,)
    pos = torch.arange(start_pos, start_pos + T, dtype=torch.float32)  # (T,)
    angle = torch.outer(pos, inv_freq)  # (T, D/2)
    cos, sin = angle.cos(), angle.sin()
    x0, x1 = x[..., 0::2], x[..., 1::2]  # (B, H, T, D/2): the two channels of every pair
    out = torch.stack((x0 * cos - x1 * sin, x0 * sin + x1 * cos), dim=-1)  # (B, H, T, D/2, 2)
    return out.flatten(-2)  # (B, H, T, D): pairs back in place


def _rope_rotate_half(x, start_pos, theta=10000.0):
    T, D = x.shape[-2], x.shape[-1]
    angle = torch.outer(torch.arange(start_pos, start_pos + T).float(), theta ** (-torch.arange(0, D, 2).float() / D))
    cos, sin = angle.cos(), angle.sin()
    x0, x1 = x[..., :D // 2], x[..., D // 2:]
    return torch.cat((x0 * cos - x1 * sin, x0 * sin + x1 * cos), dim=-1)


def _rope_negative(x, start_pos, theta=10000.0):
    flipped = x.clone()
    flipped[..., 1::2] = -flipped[..., 1::2]
    out = rope_interleaved(flipped, start_pos, theta)
    out[..., 1::2] = -out[..., 1::2]
    return out  # conjugating both sides turns the rotation by -angle


def _rope_keeps_lengths(case: Case, out) -> str | None:
    """RoPE is a rotation of every pair: each pair keeps its length."""
    x = case.args[0]
    if not isinstance(out, torch.Tensor) or out.shape != x.shape:
        return None
    def pair_lengths(t: torch.Tensor) -> torch.Tensor:
        return t.unflatten(-1, (-1, 2)).norm(dim=-1)  # (B, H, T, D/2)

    if (pair_lengths(out) - pair_lengths(x)).abs().max() > 1e-4:
        return "pairs (2i, 2i+1) changed length, so this is not a rotation of each pair"
    return None


def _rope_cases() -> list[Case]:
    return [Case("x (1, 1, 4, 8), start_pos=0", (randn(10, 1, 1, 4, 8), 0)),
            Case("x (2, 3, 5, 16), start_pos=7", (randn(11, 2, 3, 5, 16), 7)),
            Case("x (1, 2, 1, 4), start_pos=100 (one decoding step)", (randn(12, 1, 2, 1, 4), 100)),
            Case("x (2, 1, 6, 32), start_pos=3", (randn(13, 2, 1, 6, 32), 3))]


ROPE = Implement(
    name="rope_interleaved", notebook="00",
    statement="Implement rope_interleaved(x, start_pos, theta=10000): rotate channel pairs (2i, 2i+1) of x "
              "(B, H, T, D) by pos * theta^(-2i/D) at positions start_pos.. (RoFormer, arXiv:2104.09864, §3.4.2 eq 34).",
    hint_text="x[..., 0::2] and x[..., 1::2] are the pairs; the angle table is outer(positions, inv_freq) with "
              "inv_freq = theta ** (-arange(0, D, 2) / D); rotate each pair (a, b) to (a cos - b sin, a sin + b cos) "
              "and interleave the results back with stack(..., dim=-1).flatten(-2).",
    reference=rope_interleaved, cases=_rope_cases, properties=_rope_keeps_lengths,
    mistakes=(
        Mistake("pairs (i, i + D/2) instead of (2i, 2i+1)", "That is Llama's rotate-half layout. RoFormer's eq 34 "
                "and DeepSeek's checkpoints rotate neighbouring channels: x[..., 0::2] with x[..., 1::2].",
                _rope_rotate_half),
        Mistake("positions counted from 0, ignoring start_pos", "Cached decoding feeds tokens at positions "
                "start_pos..start_pos+T-1: use arange(start_pos, start_pos + T).",
                lambda x, start_pos, theta=10000.0: rope_interleaved(x, 0, theta)),
        Mistake("frequencies theta^(-i/D) instead of theta^(-2i/D)", "Pair i turns at theta^(-2i/D): "
                "arange(0, D, 2) / D, not arange(D/2) / D.",
                lambda x, start_pos, theta=10000.0: rope_interleaved(x, start_pos, theta ** 0.5)),
        Mistake("the rotation the wrong way (the sign of sin flipped)", "Each pair (a, b) becomes "
                "(a cos - b sin, a sin + b cos): a rotation by +angle.",
                _rope_negative)))



# ----------------------------------------------------------------------------- 00: SwiGLU

def swiglu(x: torch.Tensor, w_gate: torch.Tensor, w_up: torch.Tensor, w_down: torch.Tensor) -> torch.Tensor:
    """down(silu(gate(x)) * up(x)) for x (..., d), w_gate and w_up (I, d), w_down (d, I), as nn.Linear weights."""
    return (F.silu(x @ w_gate.T) * (x @ w_up.T)) @ w_down.T  # (..., I) -> (..., d)


def _swiglu_cases() -> list[Case]:
    def case(seed, shape, d, i):
        return Case(f"x {shape}, d={d}, I={i}", (randn(seed, *shape, d), randn(seed + 1, i, d, scale=d ** -0.5),
                                                 randn(seed + 2, i, d, scale=d ** -0.5), randn(seed + 3, d, i, scale=i ** -0.5)))
    return [case(20, (2, 3), 8, 24), case(30, (5,), 16, 40), case(40, (1, 1), 4, 12)]


SWIGLU = Implement(
    name="swiglu", notebook="00",
    statement="Implement swiglu(x, w_gate, w_up, w_down) = (silu(x w_gate^T) * (x w_up^T)) w_down^T, the FFN of "
              "Llama and DeepSeek (Shazeer, arXiv:2002.05202, eq 6).",
    hint_text="Weights are stored as nn.Linear stores them, (out, in): x @ w.T applies one. SiLU(z) = z * sigmoid(z) "
              "goes on the gate branch only, then multiply by the up branch and project down.",
    reference=swiglu, cases=_swiglu_cases,
    mistakes=(
        Mistake("SiLU on the up branch instead of the gate", "silu(x w_gate^T) * (x w_up^T): the gate is the branch "
                "that goes through the activation.", lambda x, g, u, d: (F.silu(x @ u.T) * (x @ g.T)) @ d.T),
        Mistake("a sigmoid gate (GLU) instead of SiLU", "SiLU(z) = z * sigmoid(z); sigmoid(z) alone is the original GLU.",
                lambda x, g, u, d: (torch.sigmoid(x @ g.T) * (x @ u.T)) @ d.T),
        Mistake("ReLU instead of SiLU (ReGLU)", "Use F.silu on the gate: SwiGLU is Swish (SiLU)-gated.",
                lambda x, g, u, d: (F.relu(x @ g.T) * (x @ u.T)) @ d.T)))


# ----------------------------------------------------------------------------- 00: parameters, overfitting

PARAMS_CONFIG = ModelConfig(vocab_size=32, hidden_size=256, num_hidden_layers=4, num_attention_heads=8,
                            intermediate_size=688)


def _params() -> int:
    return CourseModel(PARAMS_CONFIG).num_parameters()


L_, D_, I_, V_ = 4, 256, 688, 32  # the sizes above, for the mistakes' arithmetic
BASELINE_PARAMS = Predict(
    name="baseline_parameters", notebook="00",
    statement="Predict the parameter count of a course decoder with vocab 32, width 256, 4 layers of MHA "
              "(8 heads of 32) and SwiGLU width 688, untied embeddings, no biases; then check it with "
              "CourseModel(config).num_parameters().",
    hint_text="Per layer: q, k, v, o are d x d each; the SwiGLU has three d x I matrices; two RMSNorm weights of d. "
              "Then the embedding and the lm_head (V x d each, untied) and the final norm (d).",
    value=_params, unit="parameters",
    how=f"2 V d + L (4 d^2 + 3 d I + 2 d) + d = 2*{V_}*{D_} + {L_}*(4*{D_}^2 + 3*{D_}*{I_} + 2*{D_}) + {D_}",
    mistakes=(Mistake("the lm_head left out", "Embeddings are untied: the output head is another V x d matrix.",
                      lambda right: right - V_ * D_),
              Mistake("the RMSNorm weights left out", "Each layer has two norms of d weights, plus one final norm.",
                      lambda right: right - (2 * L_ + 1) * D_),
              Mistake("an FFN of two matrices", "SwiGLU has three: gate, up and down.", lambda right: right - L_ * D_ * I_)))


def _overfit(m) -> str | None:
    gap_small = m["train_accuracy_small"] - m["held_out_accuracy_small"]
    gap_large = m["train_accuracy_large"] - m["held_out_accuracy_large"]
    if gap_small <= gap_large:
        return (f"the gap between training and held-out accuracy is {gap_small:.2f} with fewer examples and "
                f"{gap_large:.2f} with more: it did not widen")
    return None


OVERFITTING = Experiment(
    name="overfitting_vs_data", notebook="00",
    statement="Pretrain the baseline twice, on n_train and on n_train // 4 examples (dataclasses.replace(profile, n_train=...)), "
              "and measure accuracy on training problems and on held-out ones.",
    hint_text="Use course_lib.recipes.pretrain_on_task with a profile whose n_train you change (dataclasses.replace), "
              "then evaluate on train_problems[:200] and eval_problems as section 5 does.",
    expected="with fewer examples the model still fits its training problems but does worse on held-out ones: "
             "the gap between training and held-out accuracy widens.",
    required=("train_accuracy_small", "held_out_accuracy_small", "train_accuracy_large", "held_out_accuracy_large"),
    judge=_overfit,
    example={"train_accuracy_small": 1.0, "held_out_accuracy_small": 0.2, "train_accuracy_large": 1.0,
             "held_out_accuracy_large": 0.57},
    against={"train_accuracy_small": 1.0, "held_out_accuracy_small": 0.6, "train_accuracy_large": 1.0,
             "held_out_accuracy_large": 0.57})


# ----------------------------------------------------------------------------- 01: attention with a cache

def causal_mask_with_cache(T: int, S: int) -> torch.Tensor:
    """(T, S) bool, True where new token i (at absolute position S - T + i) may see key j: j <= S - T + i."""
    q_pos = torch.arange(S - T, S)[:, None]  # (T, 1): where the new tokens sit
    k_pos = torch.arange(S)[None, :]  # (1, S)
    return k_pos <= q_pos  # (T, S)


CAUSAL_MASK = Implement(
    name="causal_mask_with_cache", notebook="01",
    statement="Implement causal_mask_with_cache(T, S): the (T, S) boolean mask of T new tokens attending over S "
              "cached + new keys, True where key j is visible to new token i (Vaswani et al., arXiv:1706.03762, §3.2.3).",
    hint_text="The T new tokens are the LAST T of the S positions: new token i sits at S - T + i and sees keys "
              "0 .. S - T + i. Compare two aranges with broadcasting.",
    reference=causal_mask_with_cache,
    cases=lambda: [Case("T=4, S=4 (prefill)", (4, 4)), Case("T=1, S=7 (one decoding step)", (1, 7)),
                   Case("T=3, S=8 (a chunk after 5 cached)", (3, 8)), Case("T=1, S=1", (1, 1))],
    mistakes=(
        Mistake("the mask aligned to the first key (torch.ones(T, S).tril())", "With a cache the new tokens are the "
                "last T positions: token i sees up to key S - T + i, not up to key i.",
                lambda T, S: torch.ones(T, S, dtype=torch.bool).tril()),
        Mistake("a token that cannot see itself (< instead of <=)", "Key j is visible when j <= position of the "
                "query: a token attends to itself.",
                lambda T, S: torch.arange(S)[None, :] < torch.arange(S - T, S)[:, None]),
        Mistake("the mask inverted (True where a key is hidden)", "True marks what a token MAY see (the convention "
                "of scaled_dot_product_attention's boolean attn_mask).", lambda T, S: ~causal_mask_with_cache(T, S))))


def attention_cache_step(q, k_new, v_new, cache_k=None, cache_v=None):
    """Causal attention of T new tokens over the cache plus themselves: returns (out, k_all, v_all).

    q, k_new, v_new (B, H, T, D), already rotated; cache_k, cache_v (B, H, S0, D) or None before the first step.
    """
    k = k_new if cache_k is None else torch.cat([cache_k, k_new], dim=2)  # (B, H, S, D): the cache grows
    v = v_new if cache_v is None else torch.cat([cache_v, v_new], dim=2)  # (B, H, S, D)
    T, S, D = q.shape[2], k.shape[2], q.shape[3]
    scores = q @ k.transpose(-1, -2) / math.sqrt(D)  # (B, H, T, S)
    scores = scores.masked_fill(~causal_mask_with_cache(T, S), float("-inf"))  # new token i sees keys <= S-T+i
    return scores.softmax(-1) @ v, k, v  # (B, H, T, D), (B, H, S, D), (B, H, S, D)


def _step_with(mask_fn=causal_mask_with_cache, scale=True, prepend=False):
    def step(q, k_new, v_new, cache_k=None, cache_v=None):
        cat = (lambda c, n: torch.cat([n, c], 2)) if prepend else (lambda c, n: torch.cat([c, n], 2))
        k = k_new if cache_k is None else cat(cache_k, k_new)
        v = v_new if cache_v is None else cat(cache_v, v_new)
        scores = q @ k.transpose(-1, -2) / (math.sqrt(q.shape[-1]) if scale else 1.0)
        scores = scores.masked_fill(~mask_fn(q.shape[2], k.shape[2]), float("-inf"))
        return scores.softmax(-1) @ v, k, v
    return step


def _cache_cases() -> list[Case]:
    def case(seed, B, H, T, S0, D):
        q, k, v = (randn(seed + i, B, H, T, D) for i in range(3))
        cache = (randn(seed + 3, B, H, S0, D), randn(seed + 4, B, H, S0, D)) if S0 else ()
        what = "prefill, no cache" if not S0 else f"{S0} cached"
        return Case(f"q (B={B}, H={H}, T={T}, D={D}), {what}", (q, k, v, *cache))
    return [case(50, 1, 2, 4, 0, 8), case(60, 2, 3, 1, 5, 8), case(70, 2, 2, 3, 6, 16), case(80, 1, 1, 1, 1, 4)]


ATTENTION_CACHE = Implement(
    name="attention_cache_step", notebook="01",
    statement="Implement attention_cache_step(q, k_new, v_new, cache_k=None, cache_v=None) -> (out, k_all, v_all): "
              "append the new keys/values to the cache and attend causally, softmax(q k^T / sqrt(D)) v "
              "(Vaswani et al., arXiv:1706.03762, eq 1).",
    hint_text="torch.cat the new K and V after the cached ones on the sequence axis (dim 2); scores (B, H, T, S); "
              "mask with causal_mask_with_cache(T, S) (-inf where hidden); softmax over the last axis.",
    reference=attention_cache_step, cases=_cache_cases, atol=1e-5,
    mistakes=(
        Mistake("the causal mask aligned to the first key", "New tokens are the last T positions: token i sees keys "
                "0 .. S - T + i (a top-left tril hides cached keys from them).",
                _step_with(mask_fn=lambda T, S: torch.ones(T, S, dtype=torch.bool).tril())),
        Mistake("no causal mask", "During a prefill or a chunk (T > 1) a token must not see the tokens after it.",
                _step_with(mask_fn=lambda T, S: torch.ones(T, S, dtype=torch.bool))),
        Mistake("the 1/sqrt(D) scale left out", "Divide the scores by sqrt(D) before the softmax (eq 1).",
                _step_with(scale=False)),
        Mistake("the new keys put before the cached ones", "Append: torch.cat([cache_k, k_new], dim=2), so "
                "positions stay in order.", _step_with(prepend=True))))


def _llama_bytes() -> int:
    return 2 * 32 * 32 * 128 * 2  # K and V, 32 layers, 32 heads of 128, 2 bytes


LLAMA_BYTES = Predict(
    name="kv_bytes_llama2_7b", notebook="01",
    statement="Predict the KV-cache bytes per token of a Llama-2-7B-shaped model: 32 layers, MHA with 32 heads of "
              "128, stored in bf16 (then check with memory.bytes_per_token).",
    hint_text="Every layer keeps a key and a value for every head: 2 x layers x heads x head width elements, "
              "times 2 bytes for bf16.",
    value=_llama_bytes(), unit="bytes per token", how="2 (K and V) x 32 layers x 32 heads x 128 x 2 bytes = 512 KiB",
    mistakes=(Mistake("keys only", "The cache holds a value for every key too: a factor 2.", _llama_bytes() // 2),
              Mistake("4 bytes per element", "bf16 takes 2 bytes; the course's CPU model caches fp32 (4).",
                      _llama_bytes() * 2),
              Mistake("one layer", "Every layer keeps its own cache: times 32 layers.", _llama_bytes() // 32)))


def _decode_growth(m) -> str | None:
    cached = m["cached_long_ms"] / m["cached_short_ms"]
    uncached = m["uncached_long_ms"] / m["uncached_short_ms"]
    if uncached <= cached:
        return (f"a step grew {uncached:.1f}x without the cache and {cached:.1f}x with it: the uncached step "
                f"should grow faster")
    if m["uncached_long_ms"] <= m["cached_long_ms"]:
        return "at the long context the uncached step was not slower than the cached one"
    return None


DECODE_GROWTH = Experiment(
    name="decode_cost_vs_context", notebook="01",
    statement="Time one decoding step at a short and a long context (e.g. 32 and 480 tokens), with the cache and "
              "with full recompute, as section 4 does, for a batch of your choice.",
    hint_text="course_lib.bench.compare times two callables round-robin; crop the cache back after each step so "
              "every repeat starts from the same context.",
    expected="without the cache a step's time grows with the context (it recomputes every position); with the "
             "cache it stays nearly flat, so the cache's advantage grows with the context.",
    required=("cached_short_ms", "cached_long_ms", "uncached_short_ms", "uncached_long_ms"), judge=_decode_growth,
    example={"cached_short_ms": 1.1, "cached_long_ms": 1.6, "uncached_short_ms": 1.6, "uncached_long_ms": 14.0},
    against={"cached_short_ms": 1.1, "cached_long_ms": 9.0, "uncached_short_ms": 1.6, "uncached_long_ms": 3.0})


EXERCISES = [RMS_NORM, ROPE, SWIGLU, BASELINE_PARAMS, OVERFITTING, CAUSAL_MASK, ATTENTION_CACHE, LLAMA_BYTES,
             DECODE_GROWTH]
