"""Model configs: frozen dataclasses that refuse bad values with a message saying how to fix them.

One flat `ModelConfig` carries the baseline decoder fields plus the MLA and MoE fields, named as in
transformers' `DeepseekV3Config`, so a learner can map each field to the real checkpoints' config.json.
Which attention and FFN the model uses is chosen by `attention` and `ffn` (see `course_lib.model`).
Vary a config with `dataclasses.replace(cfg, field=value)`: validation runs again.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace

ATTENTION_KINDS = ("mha", "gqa", "mqa", "mla")
FFN_KINDS = ("dense", "moe")


def _fail(what: str, fix: str) -> None:
    raise ValueError(f"{what}. {fix}")


def check_kv_heads(attention: str, heads: int, kv_heads: int) -> None:
    """K/V heads must divide the query heads; MHA needs one per query head and MQA exactly one. Shared by
    `ModelConfig` and `course_lib.memory.CacheSpec`, so both refuse the same shapes with the same words."""
    if not 1 <= kv_heads <= heads or heads % kv_heads:
        _fail(f"num_key_value_heads={kv_heads} must divide num_attention_heads={heads}",
              f"Use a divisor of {heads}: {[d for d in range(1, heads + 1) if heads % d == 0]} "
              f"(1 = MQA, {heads} = MHA).")
    expected = {"mha": heads, "mqa": 1}.get(attention)
    if expected is not None and kv_heads != expected:
        _fail(f"attention={attention!r} needs num_key_value_heads={expected}, got {kv_heads}",
              "Use attention='gqa' for any other number of K/V heads (ModelConfig: or leave num_key_value_heads=None).")


@dataclass(frozen=True)
class ModelConfig:
    vocab_size: int = 32                # set from the tokenizer: `ModelConfig(vocab_size=tok.vocab_size, ...)`
    hidden_size: int = 64               # residual stream width d
    num_hidden_layers: int = 2          # transformer blocks
    num_attention_heads: int = 4        # query heads n_h
    num_key_value_heads: int | None = None  # K/V heads: = heads (MHA), 1 (MQA), in between (GQA); None -> heads
    head_dim: int | None = None         # per-head width for MHA/GQA/MQA; None -> hidden_size // heads
    intermediate_size: int = 176        # SwiGLU width of a dense FFN (~8/3 d, rounded)
    max_position_embeddings: int = 256  # longest sequence the RoPE table covers
    rope_theta: float = 10000.0         # RoPE base
    rms_norm_eps: float = 1e-6
    tie_word_embeddings: bool = False   # share embed_tokens and lm_head weights
    pad_token_id: int | None = None     # padding positions: MoE routing statistics and balancing skip them
    attention: str = "mha"              # which attention module: one of ATTENTION_KINDS
    ffn: str = "dense"                  # which FFN module: one of FFN_KINDS
    # --- MLA ([V2] §2.1.2-2.1.3), used when attention == "mla"
    q_lora_rank: int = 0                # query compression rank d_c'; 0 = no query compression
    kv_lora_rank: int = 32              # KV latent rank d_c: what the cache stores per token
    qk_nope_head_dim: int = 16          # per-head query/key width without position d_h
    qk_rope_head_dim: int = 8           # decoupled RoPE width d_h^R, one key shared by all heads
    v_head_dim: int = 16                # per-head value width
    # --- MoE ([MoE] §3, [V3] §2.1.2), used when ffn == "moe"
    n_routed_experts: int = 8           # routed experts N_r
    n_shared_experts: int = 1           # always-on shared experts N_s
    num_experts_per_tok: int = 2        # top-K routed experts per token
    moe_intermediate_size: int = 32     # SwiGLU width of one (fine-grained) expert
    n_group: int = 1                    # expert groups for group-limited routing
    topk_group: int = 1                 # groups a token may route to
    norm_topk_prob: bool = True         # renormalize the selected weights to sum to 1
    routed_scaling_factor: float = 1.0  # scale on the routed output
    scoring_func: str = "sigmoid"       # "softmax" (V2) or "sigmoid" (V3) router scores
    first_k_dense_replace: int = 1      # the first k layers keep a dense FFN, as DeepSeek's models do

    def __post_init__(self) -> None:
        for name in ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads",
                     "intermediate_size", "max_position_embeddings"):
            if getattr(self, name) <= 0:
                _fail(f"{name}={getattr(self, name)} must be positive", f"Pass {name}=<a positive integer>.")
        if self.attention not in ATTENTION_KINDS:
            _fail(f"attention={self.attention!r} is not known", f"Use one of {ATTENTION_KINDS}.")
        if self.ffn not in FFN_KINDS:
            _fail(f"ffn={self.ffn!r} is not known", f"Use one of {FFN_KINDS}.")
        if self.rope_theta <= 0:
            _fail(f"rope_theta={self.rope_theta} must be positive", "The usual value is 10000.0.")
        if self.attention == "mla":
            self._check_mla()
        else:
            self._check_mha()
        if self.ffn == "moe":
            self._check_moe()

    def _check_mha(self) -> None:
        h, kv = self.num_attention_heads, self.kv_heads
        if self.head_dim is None and self.hidden_size % h:
            _fail(f"hidden_size={self.hidden_size} is not divisible by num_attention_heads={h}",
                  f"Pick a hidden_size that is a multiple of {h} (e.g. {h * max(1, self.hidden_size // h)}), "
                  f"or set head_dim explicitly.")
        if self.resolved_head_dim % 2:
            _fail(f"head_dim={self.resolved_head_dim} is odd, but RoPE rotates pairs of channels",
                  "Choose hidden_size / num_attention_heads (or head_dim) even.")
        check_kv_heads(self.attention, h, kv)

    def _check_mla(self) -> None:
        for name in ("kv_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim"):
            if getattr(self, name) <= 0:
                _fail(f"{name}={getattr(self, name)} must be positive for MLA", f"Pass {name}=<a positive integer>.")
        if self.q_lora_rank < 0:
            _fail(f"q_lora_rank={self.q_lora_rank} is negative", "Use 0 for no query compression, or a positive rank.")
        if self.qk_rope_head_dim % 2:
            _fail(f"qk_rope_head_dim={self.qk_rope_head_dim} is odd, but RoPE rotates pairs of channels",
                  "Choose an even qk_rope_head_dim (DeepSeek-V2/V3 use 64).")

    def _check_moe(self) -> None:
        e, k = self.n_routed_experts, self.num_experts_per_tok
        if e <= 0 or self.moe_intermediate_size <= 0 or self.n_shared_experts < 0:
            _fail("n_routed_experts and moe_intermediate_size must be positive and n_shared_experts >= 0",
                  f"Got n_routed_experts={e}, moe_intermediate_size={self.moe_intermediate_size}, "
                  f"n_shared_experts={self.n_shared_experts}.")
        if not 1 <= k <= e:
            _fail(f"num_experts_per_tok={k} must be between 1 and n_routed_experts={e}",
                  "Each token picks K of the routed experts.")
        if self.n_group <= 0 or e % self.n_group:
            _fail(f"n_routed_experts={e} is not divisible by n_group={self.n_group}",
                  f"Use an n_group that divides {e}, or n_group=1 to turn group-limited routing off.")
        if not 1 <= self.topk_group <= self.n_group:
            _fail(f"topk_group={self.topk_group} must be between 1 and n_group={self.n_group}",
                  "topk_group is how many of the n_group groups a token may use.")
        if self.topk_group * (e // self.n_group) < k:
            _fail(f"topk_group={self.topk_group} groups of {e // self.n_group} experts hold fewer than "
                  f"num_experts_per_tok={k} experts", "Raise topk_group or lower num_experts_per_tok.")
        if self.scoring_func not in ("softmax", "sigmoid"):
            _fail(f"scoring_func={self.scoring_func!r} is not known", "Use 'softmax' (V2) or 'sigmoid' (V3).")
        if not 0 <= self.first_k_dense_replace <= self.num_hidden_layers:
            _fail(f"first_k_dense_replace={self.first_k_dense_replace} is outside 0..num_hidden_layers",
                  f"Use a value between 0 and {self.num_hidden_layers}.")

    @property
    def kv_heads(self) -> int:
        """K/V heads for MHA/GQA/MQA (None means one per query head)."""
        if self.num_key_value_heads is None:
            return 1 if self.attention == "mqa" else self.num_attention_heads
        return self.num_key_value_heads

    @property
    def resolved_head_dim(self) -> int:
        return self.head_dim if self.head_dim is not None else self.hidden_size // self.num_attention_heads

    @property
    def qk_head_dim(self) -> int:
        """MLA's query/key width per head: the no-position part plus the decoupled RoPE part."""
        return self.qk_nope_head_dim + self.qk_rope_head_dim

    def is_moe_layer(self, layer_idx: int) -> bool:
        return self.ffn == "moe" and layer_idx >= self.first_k_dense_replace

    def to_dict(self) -> dict:
        return asdict(self)

    def replace(self, **changes) -> "ModelConfig":
        return replace(self, **changes)
