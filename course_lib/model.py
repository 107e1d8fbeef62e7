"""The course's decoder: token embedding, pre-norm blocks of attention + FFN, final RMSNorm, LM head,
and the next-token loss it is trained with.

Letters: B batch, T new tokens, V vocabulary.

Attention and FFN are chosen by the config (`attention`, `ffn`), through `build_attention` and
`build_ffn`; later notebooks swap in GQA/MQA/MLA and DeepSeekMoE without touching this file.
Module names follow transformers' Llama/DeepSeek-V3 models (`embed_tokens`, `layers.N.self_attn`,
`layers.N.mlp`, `input_layernorm`, `post_attention_layernorm`, `norm`, `lm_head`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .attention import CausalSelfAttention, MultiHeadLatentAttention
from .config import ModelConfig
from .layers import RMSNorm, SwiGLU
from .moe import DeepSeekMoE


def build_attention(config: ModelConfig, layer_idx: int) -> nn.Module:
    if config.attention == "mla":
        return MultiHeadLatentAttention(config, layer_idx)
    return CausalSelfAttention(config, layer_idx)


def build_ffn(config: ModelConfig, layer_idx: int) -> nn.Module:
    if config.is_moe_layer(layer_idx):
        return DeepSeekMoE(config)
    return SwiGLU(config.hidden_size, config.intermediate_size)


class ModelCache:
    """One cache per layer, plus the bookkeeping every decode loop needs."""

    def __init__(self, layers: list) -> None:
        self.layers = layers

    @property
    def seq_len(self) -> int:
        return self.layers[0].seq_len

    @property
    def nbytes(self) -> int:
        """Exact bytes held by all layers' caches."""
        return sum(c.nbytes for c in self.layers)

    def crop(self, length: int) -> None:
        for c in self.layers:
            c.crop(length)

    def __getitem__(self, i: int):
        return self.layers[i]


class DecoderLayer(nn.Module):
    """Pre-norm block: x + attn(norm(x)), then x + ffn(norm(x))."""

    def __init__(self, config: ModelConfig, layer_idx: int) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = build_attention(config, layer_idx)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = build_ffn(config, layer_idx)

    def forward(self, x: torch.Tensor, cache=None, token_mask: torch.Tensor | None = None) -> torch.Tensor:
        """token_mask (B, T), True on real tokens, tells an MoE FFN which positions its statistics count."""
        x = x + self.self_attn(self.input_layernorm(x), cache)  # (B, T, hidden)
        h = self.post_attention_layernorm(x)  # (B, T, hidden)
        return x + (self.mlp(h, token_mask) if isinstance(self.mlp, DeepSeekMoE) else self.mlp(h))  # (B, T, hidden)


class CourseModel(nn.Module):
    """A small decoder-only language model with pluggable attention and FFN."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(config, i) for i in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.apply(self._init_weights)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.embed_tokens.weight

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
            if getattr(module, "bias", None) is not None:
                nn.init.zeros_(module.bias)

    def new_cache(self) -> ModelCache:
        """An empty cache for every layer; pass it to `forward` to decode incrementally."""
        return ModelCache([layer.self_attn.new_cache() for layer in self.layers])

    def forward(self, input_ids: torch.Tensor, cache: ModelCache | None = None,
                return_hidden: bool = False):
        """Logits (B, T, V) for input_ids (B, T); with a cache, the tokens continue what it holds.

        With return_hidden=True also returns the last block's output (B, T, hidden) before the final
        norm, which multi-token prediction builds on.
        """
        if input_ids.dim() != 2:
            raise ValueError(f"input_ids must be (batch, tokens), got shape {tuple(input_ids.shape)}. "
                             "Add a batch dimension with input_ids[None].")
        x = self.embed_tokens(input_ids)  # (B, T, hidden)
        pad = self.config.pad_token_id
        token_mask = None if pad is None else input_ids != pad  # (B, T): what routing statistics count
        for i, layer in enumerate(self.layers):
            x = layer(x, None if cache is None else cache[i], token_mask)  # (B, T, hidden)
        logits = self.lm_head(self.norm(x))  # (B, T, V)
        return (logits, x) if return_hidden else logits

    def num_parameters(self, active: bool = False) -> int:
        """All parameters, or (active=True) those one token uses: for MoE, only K routed experts."""
        total = sum(p.numel() for p in self.parameters())
        if not active:
            return total
        inactive = 0
        for layer in self.layers:
            inactive_fn = getattr(layer.mlp, "inactive_parameters", None)
            if inactive_fn is not None:
                inactive += inactive_fn()
        return total - inactive


def lm_loss(model: nn.Module, tokens: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy over the positions where mask is True."""
    logits = model(tokens[:, :-1])  # (B, T-1, V)
    targets = tokens[:, 1:]  # (B, T-1)
    m = mask[:, :-1]  # (B, T-1): mask[t] says token t+1 is learned
    return F.cross_entropy(logits[m], targets[m])
