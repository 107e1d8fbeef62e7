"""Attention with a KV cache: multi-head (MHA), grouped-query (GQA), multi-query (MQA) and
multi-head latent attention (MLA, DeepSeek-V2/V3).

Letters: B batch, T new tokens, S cached + new tokens, H query heads, Hkv K/V heads, D head width,
C KV latent rank (kv_lora_rank), Dr decoupled RoPE width (qk_rope_head_dim); in MLA, D is the
per-head query/key width without position (qk_nope_head_dim) and Dv the value width (v_head_dim).

Every attention module here has the same interface, so `course_lib.model` can swap them by config:
`forward(x, cache=None)` takes x (B, T, hidden) and returns (B, T, hidden); with a cache, the new
tokens sit at positions cache.seq_len .. cache.seq_len+T-1 and are appended to it;
`new_cache()` returns an empty cache of the right kind.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from einops import rearrange, repeat
from torch import nn

from .config import ModelConfig
from .layers import RMSNorm, RotaryEmbedding, causal_bias, causal_mask


class KVCache:
    """Keys and values of every token seen so far, one entry per K/V head: (B, Hkv, S, D) each.

    This is the cache of MHA/GQA/MQA: 2 * Hkv * D elements per token per layer. `nbytes` is the
    exact memory of what it holds.
    """

    def __init__(self) -> None:
        self.k: torch.Tensor | None = None
        self.v: torch.Tensor | None = None

    @property
    def seq_len(self) -> int:
        return 0 if self.k is None else self.k.shape[2]

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.k, self.v) if t is not None)

    def update(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Append the new tokens' K and V (B, Hkv, T, D) and return all of them (B, Hkv, S, D)."""
        self.k = k if self.k is None else torch.cat([self.k, k], dim=2)
        self.v = v if self.v is None else torch.cat([self.v, v], dim=2)
        return self.k, self.v

    def crop(self, length: int) -> None:
        """Forget every token from position `length` on (e.g. a rejected speculative draft)."""
        if self.k is not None:
            self.k, self.v = self.k[:, :, :length], self.v[:, :, :length]


class CausalSelfAttention(nn.Module):
    """MHA, GQA or MQA (Ainslie et al. 2023; Shazeer 2019), by `config.kv_heads`.

    H query heads share Hkv = H / groups K/V heads: Hkv = H is MHA, Hkv = 1 is MQA. Only K and V
    are cached, so the cache shrinks by H / Hkv while the queries keep all heads.
    """

    def __init__(self, config: ModelConfig, layer_idx: int = 0) -> None:
        super().__init__()
        self.config, self.layer_idx = config, layer_idx
        self.num_heads, self.num_kv_heads, self.head_dim = config.num_attention_heads, config.kv_heads, config.resolved_head_dim
        self.q_proj = nn.Linear(config.hidden_size, self.num_heads * self.head_dim, bias=False)
        self.k_proj = nn.Linear(config.hidden_size, self.num_kv_heads * self.head_dim, bias=False)
        self.v_proj = nn.Linear(config.hidden_size, self.num_kv_heads * self.head_dim, bias=False)
        self.o_proj = nn.Linear(self.num_heads * self.head_dim, config.hidden_size, bias=False)
        self.rope = RotaryEmbedding(self.head_dim, config.max_position_embeddings, config.rope_theta)

    def new_cache(self) -> KVCache:
        return KVCache()

    def forward(self, x: torch.Tensor, cache: KVCache | None = None) -> torch.Tensor:
        B, T, _ = x.shape
        start = cache.seq_len if cache is not None else 0
        q = rearrange(self.q_proj(x), "b t (h d) -> b h t d", h=self.num_heads)  # (B, H, T, D)
        k = rearrange(self.k_proj(x), "b t (h d) -> b h t d", h=self.num_kv_heads)  # (B, Hkv, T, D)
        v = rearrange(self.v_proj(x), "b t (h d) -> b h t d", h=self.num_kv_heads)  # (B, Hkv, T, D)
        q, k = self.rope(q, start), self.rope(k, start)
        if cache is not None:
            k, v = cache.update(k, v)  # (B, Hkv, S, D)
        groups = self.num_heads // self.num_kv_heads
        k = repeat(k, "b h s d -> b (h g) s d", g=groups)  # (B, H, S, D): query head h*g+i reads K/V head h
        v = repeat(v, "b h s d -> b (h g) s d", g=groups)  # (B, H, S, D)
        S = k.shape[2]
        mask = None if T == 1 else causal_bias(T, S, x.device, q.dtype)  # one new token may see everything cached
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)  # (B, H, T, D)
        return self.o_proj(rearrange(out, "b h t d -> b t (h d)"))  # (B, T, hidden)


class MLACache:
    """MLA's cache ([V2] §2.1.3; [V3] §2.1.1 "only c_t^KV and k_t^R need to be cached").

    Per token it holds the normalized latent c^KV_t (B, S, C) and the rotated RoPE key k^R_t
    (B, S, Dr) that all heads share: C + Dr elements per token per layer ([V2] Table 1), against
    2 * Hkv * D for KVCache. Same interface as KVCache; `nbytes` is the exact memory held.
    """

    def __init__(self) -> None:
        self.c_kv: torch.Tensor | None = None  # (B, S, C)
        self.k_rope: torch.Tensor | None = None  # (B, S, Dr)

    @property
    def seq_len(self) -> int:
        return 0 if self.c_kv is None else self.c_kv.shape[1]

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.c_kv, self.k_rope) if t is not None)

    def update(self, c_kv: torch.Tensor, k_rope: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Append the new tokens' c_kv (B, T, C) and k_rope (B, T, Dr); return all (B, S, C), (B, S, Dr)."""
        self.c_kv = c_kv if self.c_kv is None else torch.cat([self.c_kv, c_kv], dim=1)  # (B, S, C)
        self.k_rope = k_rope if self.k_rope is None else torch.cat([self.k_rope, k_rope], dim=1)  # (B, S, Dr)
        return self.c_kv, self.k_rope

    def crop(self, length: int) -> None:
        """Forget every token from position `length` on."""
        if self.c_kv is not None:
            self.c_kv, self.k_rope = self.c_kv[:, :length], self.k_rope[:, :length]


class MultiHeadLatentAttention(nn.Module):
    """Multi-head latent attention (MLA), as DeepSeek-V2/V3 define it ([V2] §2.1.2-2.1.3, eqs 9-19).

    Keys and values of all heads come from one low-rank latent per token, c^KV_t = W^DKV h_t (eq 9),
    RMS-normalized ([V2] §3.1.2); per head k^C = W^UK c^KV and v^C = W^UV c^KV (eqs 10-11). Queries
    may be compressed too: c^Q_t = W^DQ h_t, q^C = W^UQ c^Q (eqs 12-13; q_lora_rank > 0). Position is
    decoupled (eqs 14-17): RoPE on k^C would sit between W^Q and W^UK and block absorbing W^UK, so a
    per-head query part q^R = RoPE(W^QR c^Q) and ONE key k^R_t = RoPE(W^KR h_t) shared by all heads are
    concatenated to the content parts. Softmax scale 1/sqrt(D + Dr) (eq 18); u = W^O [o_1; ...] (eq 19).
    Only c^KV and k^R are cached (`MLACache`).

    Two ways to attend over that same cache, chosen by the attribute `absorb`:
    - naive (absorb=False): expand every cached latent into per-head K^C and V with W^UK, W^UV
      (kv_b_proj), then attention with eqs 16-18 as written;
    - absorbed (absorb=True, the default, as DeepSeek's inference code): since q^T W^UK c = (W^UK^T q)^T c,
      fold W^UK into the query (a latent-space query), score it against c^KV plus q^R against k^R,
      attend over the latents and apply W^UV afterwards ([V2] §2.1.2, "W^UK can be absorbed").

    Names follow transformers' DeepseekV3Attention, so a state dict loads one-to-one: `q_proj`
    ([W^UQ; W^QR] on h, q_lora_rank == 0) or `q_a_proj` (W^DQ), `q_a_layernorm`, `q_b_proj`
    ([W^UQ; W^QR]); `kv_a_proj_with_mqa` ([W^DKV; W^KR]); `kv_a_layernorm`; `kv_b_proj` (per head
    [W^UK_h; W^UV_h]); `o_proj` (W^O). RoPE rotates interleaved pairs, the layout of DeepSeek's
    checkpoints (github.com/deepseek-ai/DeepSeek-V3 `inference/model.py`, `apply_rotary_emb`).
    """

    def __init__(self, config: ModelConfig, layer_idx: int = 0, absorb: bool = True) -> None:
        super().__init__()
        if config.attention != "mla":
            config.replace(attention="mla")  # a non-MLA config never checked its MLA fields: raises ValueError if bad
        self.config, self.layer_idx, self.absorb = config, layer_idx, absorb
        self.num_heads, self.q_lora_rank, self.kv_lora_rank = config.num_attention_heads, config.q_lora_rank, config.kv_lora_rank
        self.qk_nope_head_dim, self.qk_rope_head_dim, self.v_head_dim = config.qk_nope_head_dim, config.qk_rope_head_dim, config.v_head_dim
        H, d = self.num_heads, config.hidden_size
        if self.q_lora_rank == 0:
            self.q_proj = nn.Linear(d, H * config.qk_head_dim, bias=False)
        else:
            self.q_a_proj = nn.Linear(d, self.q_lora_rank, bias=False)
            self.q_a_layernorm = RMSNorm(self.q_lora_rank, eps=1e-6)  # eps as DeepSeek's code and transformers
            self.q_b_proj = nn.Linear(self.q_lora_rank, H * config.qk_head_dim, bias=False)
        self.kv_a_proj_with_mqa = nn.Linear(d, self.kv_lora_rank + self.qk_rope_head_dim, bias=False)
        self.kv_a_layernorm = RMSNorm(self.kv_lora_rank, eps=1e-6)  # on c^KV only, not on the rope key
        self.kv_b_proj = nn.Linear(self.kv_lora_rank, H * (self.qk_nope_head_dim + self.v_head_dim), bias=False)
        self.o_proj = nn.Linear(H * self.v_head_dim, d, bias=False)
        self.rope = RotaryEmbedding(self.qk_rope_head_dim, config.max_position_embeddings, config.rope_theta)
        self.softmax_scale = config.qk_head_dim ** -0.5  # eq (18): 1/sqrt(D + Dr)

    def new_cache(self) -> MLACache:
        return MLACache()

    def forward(self, x: torch.Tensor, cache: MLACache | None = None) -> torch.Tensor:
        B, T, _ = x.shape
        start = cache.seq_len if cache is not None else 0
        # queries, eqs (12)-(14): [q^C; q^R] per head, from c^Q when the query is compressed
        q = self.q_proj(x) if self.q_lora_rank == 0 else self.q_b_proj(self.q_a_layernorm(self.q_a_proj(x)))  # (B, T, H*(D+Dr))
        q = rearrange(q, "b t (h d) -> b h t d", h=self.num_heads)  # (B, H, T, D+Dr)
        q_nope, q_rope = q.split([self.qk_nope_head_dim, self.qk_rope_head_dim], dim=-1)  # (B, H, T, D), (B, H, T, Dr)
        q_rope = self.rope(q_rope, start)
        # the latent c^KV (eq 9) and the shared rope key k^R (eq 15): all that is cached
        c_kv, k_rope = self.kv_a_proj_with_mqa(x).split([self.kv_lora_rank, self.qk_rope_head_dim], dim=-1)  # (B, T, C), (B, T, Dr)
        c_kv = self.kv_a_layernorm(c_kv)
        k_rope = self.rope(k_rope, start)  # one key per token, no head axis
        if cache is not None:
            c_kv, k_rope = cache.update(c_kv, k_rope)  # (B, S, C), (B, S, Dr)
        mask = None if T == 1 else causal_mask(T, c_kv.shape[1], x.device)  # (T, S)
        attend = self._attend_absorbed if self.absorb else self._attend_naive
        out = attend(q_nope, q_rope, c_kv, k_rope, mask)  # (B, H, T, Dv)
        return self.o_proj(rearrange(out, "b h t d -> b t (h d)"))  # (B, T, hidden): eq (19)

    def up_proj_weights(self) -> tuple[torch.Tensor, torch.Tensor]:
        """W^UK (H, D, C) and W^UV (H, Dv, C) (eqs 10-11): kv_b_proj's rows are [W^UK_h; W^UV_h] per head."""
        w = rearrange(self.kv_b_proj.weight, "(h d) c -> h d c", h=self.num_heads)  # (H, D+Dv, C)
        return w.split([self.qk_nope_head_dim, self.v_head_dim], dim=1)  # (H, D, C), (H, Dv, C)

    def _softmax(self, scores: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        """Scaled, causally masked softmax over the keys, in float32 as DeepSeek's code does."""
        scores = scores * self.softmax_scale
        if mask is not None:
            scores = scores.masked_fill(~mask, float("-inf"))
        return scores.softmax(dim=-1, dtype=torch.float32).type_as(scores)  # (B, H, T, S)

    def _attend_naive(self, q_nope, q_rope, c_kv, k_rope, mask) -> torch.Tensor:
        """Eqs (10)-(11) and (16)-(18) as written: per-head keys and values rebuilt from every cached latent."""
        w_uk, w_uv = self.up_proj_weights()
        k_nope = torch.einsum("bsc,hdc->bhsd", c_kv, w_uk)  # (B, H, S, D): k^C = W^UK c^KV, eq (10)
        v = torch.einsum("bsc,hdc->bhsd", c_kv, w_uv)  # (B, H, S, Dv): v^C = W^UV c^KV, eq (11)
        q = torch.cat([q_nope, q_rope], dim=-1)  # (B, H, T, D+Dr): eq (16)
        k = torch.cat([k_nope, repeat(k_rope, "b s r -> b h s r", h=self.num_heads)], dim=-1)  # (B, H, S, D+Dr): eq (17)
        probs = self._softmax(torch.einsum("bhtd,bhsd->bhts", q, k), mask)  # (B, H, T, S)
        return torch.einsum("bhts,bhsd->bhtd", probs, v)  # (B, H, T, Dv): eq (18)

    def _attend_absorbed(self, q_nope, q_rope, c_kv, k_rope, mask) -> torch.Tensor:
        """W^UK folded into the query, W^UV applied after attending over the latents ([V2] §2.1.2)."""
        w_uk, w_uv = self.up_proj_weights()
        q_absorbed = torch.einsum("bhtd,hdc->bhtc", q_nope, w_uk)  # (B, H, T, C): q^C_h W^UK_h, a latent-space query
        scores = torch.einsum("bhtc,bsc->bhts", q_absorbed, c_kv) + torch.einsum("bhtr,bsr->bhts", q_rope, k_rope)  # (B, H, T, S)
        probs = self._softmax(scores, mask)  # (B, H, T, S)
        out_latent = torch.einsum("bhts,bsc->bhtc", probs, c_kv)  # (B, H, T, C): the latent doubles as the value
        return torch.einsum("bhtc,hdc->bhtd", out_latent, w_uv)  # (B, H, T, Dv): W^UV_h, eq (11) after attention
