"""Small building blocks shared by the model, attention and MoE modules: RMSNorm, SwiGLU, RoPE.

Shapes: B batch, T new tokens, H heads, D head width.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn


class RMSNorm(nn.Module):
    """x / rms(x) * weight, computed in float32 as DeepSeek and Llama do for stability."""

    def __init__(self, hidden_size: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.variance_epsilon = eps  # transformers' name, so state dicts and reprs line up

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype == self.weight.dtype == torch.float32:
            # torch's rms_norm: bitwise the formula below, forward and backward (tested), in fewer operations,
            # which is most of a norm's cost when decoding one token on a CPU
            return F.rms_norm(x, (x.shape[-1],), self.weight, self.variance_epsilon)
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.variance_epsilon)
        return self.weight * x.to(dtype)


class SwiGLU(nn.Module):
    """The gated FFN of Llama and DeepSeek: down(silu(gate(x)) * up(x)) (Shazeer 2020, "GLU Variants")."""

    def __init__(self, hidden_size: int, intermediate_size: int) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.up_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.down_proj = nn.Linear(intermediate_size, hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class RotaryEmbedding(nn.Module):
    """Rotary position embedding (Su et al. 2021, RoFormer) over interleaved channel pairs.

    Channel pairs (0,1), (2,3), ... are rotated by angle pos * theta^(-2i/D). This is the
    layout of RoFormer and of DeepSeek-V3's `inference/model.py` (`apply_rotary_emb`); Llama's
    "rotate half" pairs channel i with i + D/2 instead. Dot products between rotated queries and keys
    are the same under either layout once weights are permuted to match, but cached keys differ.
    The cos/sin table is a non-persistent buffer: it never enters a state dict.
    """

    def __init__(self, dim: int, max_position_embeddings: int, theta: float = 10000.0) -> None:
        super().__init__()
        if dim % 2:
            raise ValueError(f"RoPE needs an even width, got {dim}. Choose an even head width.")
        inv_freq = theta ** (-torch.arange(0, dim, 2, dtype=torch.float32) / dim)  # (D/2,)
        angles = torch.outer(torch.arange(max_position_embeddings, dtype=torch.float32), inv_freq)  # (P, D/2)
        self.register_buffer("cos", angles.cos(), persistent=False)
        self.register_buffer("sin", angles.sin(), persistent=False)
        self.max_position_embeddings = max_position_embeddings

    def forward(self, x: torch.Tensor, start_pos: int) -> torch.Tensor:
        """Rotate x (B, H, T, D) whose tokens sit at positions start_pos .. start_pos+T-1."""
        T = x.shape[-2]
        if start_pos + T > self.max_position_embeddings:
            raise ValueError(
                f"positions up to {start_pos + T - 1} requested but the RoPE table covers "
                f"{self.max_position_embeddings} positions. Raise max_position_embeddings in the config "
                f"or generate fewer tokens.")
        cos = self.cos[start_pos:start_pos + T].to(x.dtype)  # (T, D/2)
        sin = self.sin[start_pos:start_pos + T].to(x.dtype)  # (T, D/2)
        pairs = rearrange(x, "... t (d two) -> ... t d two", two=2)  # (B, H, T, D/2, 2)
        x0, x1 = pairs.unbind(-1)  # (B, H, T, D/2) each
        rotated = torch.stack((x0 * cos - x1 * sin, x0 * sin + x1 * cos), dim=-1)  # (B, H, T, D/2, 2)
        return rearrange(rotated, "... t d two -> ... t (d two)")  # (B, H, T, D)


@functools.lru_cache(maxsize=256)
def causal_mask(T: int, S: int, device: torch.device) -> torch.Tensor:
    """Boolean (T, S) mask: new token i (at absolute position S-T+i) may see keys 0..S-T+i.

    Memoized: every layer of a forward, and every training step, asks for the same (T, S); building
    it costs five small tensor ops, a visible share of a decoding step that feeds two tokens (the
    verification of a speculative draft). The tensor is shared, so never modify it in place. It is
    built outside inference mode even when first asked for inside it, so later training can use it.
    """
    with torch.inference_mode(False):
        q_pos = torch.arange(S - T, S, device=device)[:, None]  # (T, 1)
        k_pos = torch.arange(S, device=device)[None, :]  # (1, S)
        return k_pos <= q_pos  # (T, S)


@functools.lru_cache(maxsize=256)
def causal_bias(T: int, S: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """`causal_mask` as an additive float (T, S) mask: 0 where a key is visible, -inf where it is not.

    What `scaled_dot_product_attention` turns a boolean mask into on every call (two more small ops);
    passing it ready-made gives bitwise the same attention, forward and backward. Memoized and shared
    like `causal_mask`.
    """
    mask = causal_mask(T, S, device)
    with torch.inference_mode(False):  # as causal_mask: usable by autograd whenever it was first built
        return torch.zeros(T, S, device=device, dtype=dtype).masked_fill(~mask, float("-inf"))
