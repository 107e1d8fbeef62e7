"""Attention with a KV cache: multi-head (MHA), grouped-query (GQA) and multi-query (MQA) attention.

Letters: B batch, T new tokens, S cached + new tokens, H query heads, Hkv K/V heads, D head width.

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
from .layers import RotaryEmbedding, causal_mask


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
        mask = None if T == 1 else causal_mask(T, S, x.device)  # one new token may see everything cached
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)  # (B, H, T, D)
        return self.o_proj(rearrange(out, "b h t d -> b t (h d)"))  # (B, T, hidden)
