"""Named model configs: the course's models, derived from the profile's baseline, and DeepSeek's real sizes.

One place for every model the course names, so notebooks, benchmarks and the memory arithmetic read the
same numbers:
- `mla_config(base)`: notebook 03's MLA variant of the baseline;
- `nano_deepseek_config(base)`: notebook 08's nano-DeepSeek (MLA everywhere, DeepSeekMoE after layer 0);
- `mtp_config(base)`: notebook 09's deeper, narrower main model;
- `DEEPSEEK_V2`, `DEEPSEEK_V2_LITE`, `DEEPSEEK_V3`: the released models' sizes, for arithmetic only (cache
  bytes, active parameters); never built. Sources: [V2] arXiv:2405.04434 §3.1.2 and App. B.1,
  [V3] arXiv:2412.19437 §4.2, and the configs in github.com/deepseek-ai/DeepSeek-V3 `inference/configs`.

`base` is the profile's dense MHA baseline (`profile.baseline_config()`), or the profile itself.
"""

from __future__ import annotations

from .config import ModelConfig


def _base(base) -> ModelConfig:
    return base if isinstance(base, ModelConfig) else base.baseline_config()


def mla_config(base) -> ModelConfig:
    """Notebook 03's MLA model: twice the baseline's heads, per-head widths of 16, and a latent sized so the cache
    holds 1/8 of MHA's numbers per token and layer (d_c + d_h^R = 2 n_h d_h / 8; cpu: 16 + 16 = 32 against 256)."""
    base = _base(base)
    mha_per_layer = 2 * base.num_attention_heads * base.resolved_head_dim  # elements per token per layer
    return base.replace(attention="mla", num_attention_heads=2 * base.num_attention_heads, qk_nope_head_dim=16,
                        v_head_dim=16, qk_rope_head_dim=16, kv_lora_rank=mha_per_layer // 8 - 16)


def nano_deepseek_config(base, **changes) -> ModelConfig:
    """The profile's nano-DeepSeek: MLA everywhere, DeepSeekMoE after the first layer.

    Sizes follow the baseline, so the two differ only where DeepSeek differs:
    - MLA with twice the baseline's heads and compressed queries (as V2/V3 compress them), the query rank
      chosen so that attention has as many parameters as the baseline's MHA (`_matching_q_rank`; 64 with
      the cpu profile), per-head content widths d_h/2, and a cache of a latent and a decoupled RoPE key each as
      wide as one baseline head d_h: 2 d_h numbers per token and layer, 1/n_h of MHA's 2 n_h d_h (1/4 with the
      cpu profile's 4 heads). DeepSeek's RoPE key is half its head width (64 of 128); here it is twice the
      content width, because this task is positional (column-by-column addition) and a narrower shared RoPE
      key learns it worse at this scale;
    - 16 routed experts a quarter of the dense FFN wide, top-3 in 2 of 4 groups, plus 1 shared expert of the
      same width: 4 experts of width d_ff/4 are active, the dense FFN's width d_ff, as in the first layer,
      which stays dense (`first_k_dense_replace`, as in DeepSeek-V2/V3).
    """
    base = _base(base)
    half = base.resolved_head_dim // 2
    d_h = base.resolved_head_dim
    mla = base.replace(attention="mla", num_attention_heads=2 * base.num_attention_heads,
                       qk_nope_head_dim=half, v_head_dim=half, qk_rope_head_dim=d_h, kv_lora_rank=d_h)
    cfg = mla.replace(
        q_lora_rank=_matching_q_rank(mla, 4 * base.hidden_size * base.num_attention_heads * d_h),
        ffn="moe", n_routed_experts=16, num_experts_per_tok=3, n_shared_experts=1,
        moe_intermediate_size=base.intermediate_size // 4, n_group=4, topk_group=2, scoring_func="sigmoid",
        norm_topk_prob=True, first_k_dense_replace=1)
    return cfg.replace(**changes) if changes else cfg


def _matching_q_rank(mla: ModelConfig, target: int) -> int:
    """The query rank r (a multiple of 8) that gives MLA attention about `target` parameters.

    MLA's projections hold d·r + r·H(D + Dr) (queries through the rank-r bottleneck, W^DQ and W^UQ/W^QR),
    d·(C + Dr) (W^DKV and W^KR), C·H(D + Dv) (W^UK and W^UV) and H·Dv·d (W^O) weights; solve for r.
    """
    d, H = mla.hidden_size, mla.num_attention_heads
    fixed = d * (mla.kv_lora_rank + mla.qk_rope_head_dim) \
        + mla.kv_lora_rank * H * (mla.qk_nope_head_dim + mla.v_head_dim) + H * mla.v_head_dim * d
    per_rank = d + H * mla.qk_head_dim
    return max(8, round((target - fixed) / per_rank / 8) * 8)


def mtp_config(base) -> ModelConfig:
    """Notebook 09's main model: twice the baseline's blocks at three quarters of its width, about the same
    number of parameters (cpu: 6 x 96, 681k, against 3 x 128, 625k). A speculative draft costs one block,
    so the deeper the main model, the smaller the draft's share of a forward ([V3]: 1 of 61 layers)."""
    base = _base(base)
    return base.replace(num_hidden_layers=2 * base.num_hidden_layers, hidden_size=base.hidden_size * 3 // 4,
                        intermediate_size=base.intermediate_size * 3 // 4 // 32 * 32)


# DeepSeek's released sizes ([V2] §3.1.2, App. B.1; [V3] §4.2; vocabularies and routed_scaling_factor from
# the released configs). The course builds none of them: they feed cache and parameter arithmetic.
DEEPSEEK_V2 = ModelConfig(
    vocab_size=102400, hidden_size=5120, num_hidden_layers=60, num_attention_heads=128, intermediate_size=12288,
    max_position_embeddings=4096, attention="mla", q_lora_rank=1536, kv_lora_rank=512, qk_nope_head_dim=128,
    qk_rope_head_dim=64, v_head_dim=128, ffn="moe", n_routed_experts=160, n_shared_experts=2,
    num_experts_per_tok=6, moe_intermediate_size=1536, n_group=8, topk_group=3, norm_topk_prob=False,
    routed_scaling_factor=16.0, scoring_func="softmax", first_k_dense_replace=1)
DEEPSEEK_V2_LITE = DEEPSEEK_V2.replace(
    hidden_size=2048, num_hidden_layers=27, num_attention_heads=16, intermediate_size=10944, q_lora_rank=0,
    n_routed_experts=64, moe_intermediate_size=1408, n_group=1, topk_group=1, routed_scaling_factor=1.0)
DEEPSEEK_V3 = DEEPSEEK_V2.replace(  # what V3 changed: more, finer experts, the sigmoid gate, 3 dense layers
    vocab_size=129280, hidden_size=7168, num_hidden_layers=61, intermediate_size=18432, n_routed_experts=256,
    n_shared_experts=1, num_experts_per_tok=8, moe_intermediate_size=2048, topk_group=4, norm_topk_prob=True,
    routed_scaling_factor=2.5, scoring_func="sigmoid", first_k_dense_replace=3)
DEEPSEEK = {"deepseek-v2": DEEPSEEK_V2, "deepseek-v2-lite": DEEPSEEK_V2_LITE, "deepseek-v3": DEEPSEEK_V3}


def course_presets(base) -> dict[str, ModelConfig]:
    """Every model the course trains, by name, for one profile's baseline."""
    base = _base(base)
    return {"baseline": base, "mla": mla_config(base), "nano-deepseek": nano_deepseek_config(base),
            "mtp": mtp_config(base)}
