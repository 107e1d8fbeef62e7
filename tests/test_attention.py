"""Tests for course_lib.attention: MHA/GQA/MQA with a KV cache, and MLA with its latent cache.

What is asserted (float32, seeded tiny configs, tolerance 1e-5):
- every attention kind (MHA, GQA, MQA; MLA naive and absorbed, with and without query compression):
  the full causal forward == prefill then token-by-token decode == chunked prefill from nonzero
  positions; cropping the cache and re-feeding the dropped tokens gives the same outputs;
- MLA absorbed == naive, on a full forward and when the two paths take turns over ONE cache;
- cache sizes: MLA holds exactly (kv_lora_rank + qk_rope_head_dim) * S * B elements per layer
  (checked through `nbytes`, in float32 and bfloat16), MHA/GQA/MQA 2 * Hkv * D * S * B;
- parity with transformers 5.24.0 `DeepseekV3Attention` built from a tiny random config: our state dict
  loads strictly, outputs agree for q_lora_rank None/0 and > 0, for a full forward and for
  cached decode, and its cache holds our c_kv and our rope key de-interleaved; with
  `rope_interleave=False` it agrees only once the rope weights are permuted into halves;
- parity of our GQA with transformers' `LlamaAttention` (rotate-half RoPE) after the same permutation;
- the whole course model with MLA: state dict loads into `DeepseekV3ForCausalLM` and logits agree;
  greedy generation with the cache equals generation without it, on both paths;
- bad MLA configs raise ValueError naming the field and the fix.
"""

import pytest
import torch

from course_lib.attention import KVCache, MLACache, MultiHeadLatentAttention
from course_lib.config import ModelConfig
from course_lib.model import CourseModel, build_attention
from course_lib.generate import generate

TOL = 1e-5
CONFIGS = {
    "mha": ModelConfig(attention="mha"),
    "gqa": ModelConfig(attention="gqa", num_key_value_heads=2),
    "mqa": ModelConfig(attention="mqa"),
    "mla": ModelConfig(attention="mla"),  # q_lora_rank=0: no query compression (V2-Lite)
    "mla_q_lora": ModelConfig(attention="mla", q_lora_rank=24),  # query compression (V2/V3)
}
# (config name, absorb): absorb only matters for MLA
CASES = [("mha", None), ("gqa", None), ("mqa", None),
         ("mla", False), ("mla", True), ("mla_q_lora", False), ("mla_q_lora", True)]


def make_attention(name: str, absorb: bool | None = None, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    attn = build_attention(CONFIGS[name], layer_idx=0).eval()
    if absorb is not None:
        attn.absorb = absorb
    return attn


def inputs(cfg: ModelConfig, B: int = 2, T: int = 11, seed: int = 1) -> torch.Tensor:
    return torch.randn(B, T, cfg.hidden_size, generator=torch.Generator().manual_seed(seed))


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a - b).abs().max().item()


def assert_same(a: torch.Tensor, b: torch.Tensor, tol: float = TOL) -> None:
    assert a.shape == b.shape
    assert a.abs().mean() > 1e-2, "outputs too small for the comparison to mean anything"
    assert max_diff(a, b) < tol, f"max abs difference {max_diff(a, b):.2e} >= {tol}"


# ---------------------------------------------------------------- (a) cached decode == full forward

@pytest.mark.parametrize("name, absorb", CASES)
@torch.no_grad()
def test_cached_decode_equals_full_forward(name, absorb):
    attn = make_attention(name, absorb)
    x = inputs(attn.config)
    T = x.shape[1]
    full = attn(x)  # (B, T, hidden)

    cache = attn.new_cache()
    steps = [attn(x[:, :4], cache)] + [attn(x[:, t:t + 1], cache) for t in range(4, T)]
    assert cache.seq_len == T
    assert_same(torch.cat(steps, dim=1), full)

    cache = attn.new_cache()
    chunks = [attn(x[:, a:b], cache) for a, b in ((0, 3), (3, 8), (8, T))]  # prefill from positions 3 and 8
    assert_same(torch.cat(chunks, dim=1), full)

    cache.crop(6)  # forget positions 6.. and feed them again
    assert cache.seq_len == 6
    assert_same(attn(x[:, 6:], cache), full[:, 6:])


# ---------------------------------------------------------------- (b) absorbed == naive

@pytest.mark.parametrize("name", ["mla", "mla_q_lora"])
@torch.no_grad()
def test_absorbed_equals_naive(name):
    attn = make_attention(name)
    x = inputs(attn.config)
    attn.absorb = False
    naive = attn(x)
    attn.absorb = True
    absorbed = attn(x)
    assert_same(absorbed, naive)

    # the two paths read the same cache: prefill naive, then alternate while decoding
    cache = attn.new_cache()
    attn.absorb = False
    outs = [attn(x[:, :5], cache)]
    for t in range(5, x.shape[1]):
        attn.absorb = t % 2 == 0
        outs.append(attn(x[:, t:t + 1], cache))
    assert_same(torch.cat(outs, dim=1), naive)


def test_absorb_is_the_default_and_a_constructor_argument():
    cfg = CONFIGS["mla"]
    assert MultiHeadLatentAttention(cfg).absorb is True
    assert MultiHeadLatentAttention(cfg, absorb=False).absorb is False


# ---------------------------------------------------------------- (c) what the caches hold

@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@torch.no_grad()
def test_mla_cache_holds_only_latent_and_rope_key(dtype):
    attn = make_attention("mla_q_lora").to(dtype)
    cfg = attn.config
    B, S = 3, 10
    cache = attn.new_cache()
    assert isinstance(cache, MLACache) and cache.seq_len == 0 and cache.nbytes == 0
    attn(inputs(cfg, B, 7).to(dtype), cache)
    attn(inputs(cfg, B, 3, seed=2).to(dtype), cache)
    assert cache.c_kv.shape == (B, S, cfg.kv_lora_rank)
    assert cache.k_rope.shape == (B, S, cfg.qk_rope_head_dim)
    elements = (cfg.kv_lora_rank + cfg.qk_rope_head_dim) * S * B
    assert cache.nbytes == elements * torch.finfo(dtype).bits // 8
    cache.crop(4)
    assert cache.nbytes == (cfg.kv_lora_rank + cfg.qk_rope_head_dim) * 4 * B * torch.finfo(dtype).bits // 8


@pytest.mark.parametrize("name", ["mha", "gqa", "mqa"])
@torch.no_grad()
def test_kv_cache_holds_keys_and_values_per_kv_head(name):
    attn = make_attention(name)
    cfg = attn.config
    B, S = 3, 10
    cache = attn.new_cache()
    assert isinstance(cache, KVCache)
    attn(inputs(cfg, B, S), cache)
    assert cache.nbytes == 2 * cfg.kv_heads * cfg.resolved_head_dim * S * B * 4


def test_causal_bias_is_the_boolean_mask_sdpa_would_build():
    # the attention passes a ready-made additive mask; it must be bitwise what SDPA makes of the boolean one
    import torch.nn.functional as F

    from course_lib.layers import causal_bias, causal_mask

    cpu = torch.device("cpu")
    for T, S in ((2, 9), (6, 6)):  # a two-token verification on a cache; a training row
        mask, bias = causal_mask(T, S, cpu), causal_bias(T, S, cpu, torch.float32)
        assert mask[0].tolist() == [True] * (S - T + 1) + [False] * (T - 1)  # token 0 sees the cache and itself
        assert torch.equal(bias == 0, mask) and torch.isinf(bias[~mask]).all() and (bias[~mask] < 0).all()
        assert causal_mask(T, S, cpu) is mask and causal_bias(T, S, cpu, torch.float32) is bias  # memoized
        gen = torch.Generator().manual_seed(T)
        q, k, v = (torch.randn(2, 4, n, 8, generator=gen).requires_grad_() for n in (T, S, S))
        outs = []
        for m in (mask, bias):
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=m)
            outs.append((out, *torch.autograd.grad(out.square().sum(), (q, k, v))))
        assert all(torch.equal(a, b) for a, b in zip(*outs))
    # first built under inference mode (as a learner's generation loop might), then trained through
    causal_mask.cache_clear()
    causal_bias.cache_clear()
    with torch.inference_mode():
        causal_bias(5, 5, cpu, torch.float32)
    q = torch.randn(1, 2, 5, 8, requires_grad=True)
    F.scaled_dot_product_attention(q, q, q, attn_mask=causal_bias(5, 5, cpu, torch.float32)).sum().backward()
    assert q.grad is not None


@torch.no_grad()
def test_model_cache_of_an_mla_model():
    cfg = CONFIGS["mla"].replace(num_hidden_layers=3)
    model = CourseModel(cfg).eval()
    cache = model.new_cache()
    B, S = 2, 9
    model(torch.randint(0, cfg.vocab_size, (B, S)), cache)
    assert cache.seq_len == S
    assert cache.nbytes == cfg.num_hidden_layers * (cfg.kv_lora_rank + cfg.qk_rope_head_dim) * S * B * 4


# ---------------------------------------------------------------- (d) parity with transformers

def interleaved_to_halves(n: int) -> torch.Tensor:
    """Channel order that turns interleaved RoPE pairs (0,1),(2,3),... into rotate-half pairs (i, i+n/2)."""
    return torch.cat([torch.arange(0, n, 2), torch.arange(1, n, 2)])


def hf_deepseek_config(cfg: ModelConfig, rope_interleave: bool = True, num_hidden_layers: int = 1):
    from transformers import DeepseekV3Config

    return DeepseekV3Config(
        vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size, intermediate_size=cfg.intermediate_size,
        num_hidden_layers=num_hidden_layers, first_k_dense_replace=num_hidden_layers,  # dense FFNs only
        num_attention_heads=cfg.num_attention_heads,
        num_key_value_heads=cfg.num_attention_heads,  # transformers repeats K/V by heads // kv_heads: must be 1
        q_lora_rank=cfg.q_lora_rank or None,  # transformers wants None; 0 builds a zero-width q_a_proj
        kv_lora_rank=cfg.kv_lora_rank, qk_nope_head_dim=cfg.qk_nope_head_dim,
        qk_rope_head_dim=cfg.qk_rope_head_dim, v_head_dim=cfg.v_head_dim,
        max_position_embeddings=cfg.max_position_embeddings, rms_norm_eps=cfg.rms_norm_eps,
        rope_parameters={"rope_type": "default", "rope_theta": cfg.rope_theta},
        rope_interleave=rope_interleave, attention_bias=False, num_mtp_layers=0,
        tie_word_embeddings=cfg.tie_word_embeddings, attn_implementation="eager")


def additive_causal_mask(B: int, T: int, start: int) -> torch.Tensor:
    """transformers' eager mask: (B, 1, T, S) with 0 where allowed and the dtype's min elsewhere."""
    allowed = torch.ones(T, start + T, dtype=torch.bool).tril(diagonal=start)  # (T, S)
    return torch.zeros(B, 1, T, start + T).masked_fill(~allowed, torch.finfo(torch.float32).min)


def hf_rope(rotary, x: torch.Tensor, start: int = 0):
    B, T, _ = x.shape
    position_ids = torch.arange(start, start + T)[None].expand(B, T)  # (B, T)
    return rotary(x, position_ids)  # cos, sin (B, T, Dr)


def hf_mla(cfg: ModelConfig, state_dict: dict, rope_interleave: bool = True):
    from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3Attention, DeepseekV3RotaryEmbedding

    hf_cfg = hf_deepseek_config(cfg, rope_interleave)
    theirs = DeepseekV3Attention(hf_cfg, layer_idx=0).eval()
    theirs.load_state_dict(state_dict, strict=True)
    return theirs, DeepseekV3RotaryEmbedding(hf_cfg)


@pytest.mark.parametrize("name", ["mla", "mla_q_lora"])
@pytest.mark.parametrize("absorb", [False, True])
@torch.no_grad()
def test_mla_matches_transformers_deepseek_v3(name, absorb):
    ours = make_attention(name, absorb)
    theirs, rotary = hf_mla(ours.config, ours.state_dict())
    assert set(theirs.state_dict()) == set(ours.state_dict())
    x = inputs(ours.config)
    B, T, _ = x.shape
    expected, _ = theirs(x, hf_rope(rotary, x), additive_causal_mask(B, T, 0))
    assert_same(ours(x), expected)


@pytest.mark.parametrize("name", ["mla", "mla_q_lora"])
@torch.no_grad()
def test_mla_cached_decode_matches_transformers_and_its_cache(name):
    from transformers import DynamicCache

    ours = make_attention(name)
    theirs, rotary = hf_mla(ours.config, ours.state_dict())
    x = inputs(ours.config)
    B, T, _ = x.shape
    our_cache, their_cache = ours.new_cache(), DynamicCache(config=theirs.config)
    for a, b in ((0, 5), *((t, t + 1) for t in range(5, T))):
        chunk = x[:, a:b]
        expected, _ = theirs(chunk, hf_rope(rotary, chunk, a), additive_causal_mask(B, b - a, a), cache=their_cache)
        assert_same(ours(chunk, our_cache), expected)
    # transformers caches the same two tensors, with a head axis of 1, as "keys" and "values";
    # its rope key comes out of apply_rotary_pos_emb_interleave de-interleaved: evens, then odds
    layer = their_cache.layers[0]
    assert max_diff(layer.keys[:, 0], our_cache.c_kv) < TOL
    perm = interleaved_to_halves(ours.config.qk_rope_head_dim)
    assert max_diff(layer.values[:, 0], our_cache.k_rope[..., perm]) < TOL


@torch.no_grad()
def test_rotate_half_transformers_needs_the_rope_weights_permuted():
    """rope_interleave=False applies rotate_half to the raw channels: it matches DeepSeek's interleaved
    RoPE only if the rows producing q^R and k^R are reordered evens-then-odds."""
    ours = make_attention("mla_q_lora")
    cfg = ours.config
    x = inputs(cfg)
    B, T, _ = x.shape
    H, Dn, Dr, C = cfg.num_attention_heads, cfg.qk_nope_head_dim, cfg.qk_rope_head_dim, cfg.kv_lora_rank
    perm = interleaved_to_halves(Dr)
    q_rows = torch.cat([h * (Dn + Dr) + torch.cat([torch.arange(Dn), Dn + perm]) for h in range(H)])
    kv_rows = torch.cat([torch.arange(C), C + perm])
    permuted = dict(ours.state_dict())
    permuted["q_b_proj.weight"] = permuted["q_b_proj.weight"][q_rows]
    permuted["kv_a_proj_with_mqa.weight"] = permuted["kv_a_proj_with_mqa.weight"][kv_rows]

    theirs, rotary = hf_mla(cfg, permuted, rope_interleave=False)
    mask = additive_causal_mask(B, T, 0)
    expected, _ = theirs(x, hf_rope(rotary, x), mask)
    assert_same(ours(x), expected)

    unpermuted, rotary = hf_mla(cfg, ours.state_dict(), rope_interleave=False)
    wrong, _ = unpermuted(x, hf_rope(rotary, x), mask)
    assert max_diff(ours(x), wrong) > 1e-3


@torch.no_grad()
def test_gqa_matches_transformers_llama_with_permuted_rope_rows():
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaAttention, LlamaRotaryEmbedding

    ours = make_attention("gqa")
    cfg = ours.config
    D = cfg.resolved_head_dim
    hf_cfg = LlamaConfig(hidden_size=cfg.hidden_size, num_attention_heads=cfg.num_attention_heads,
                         num_key_value_heads=cfg.kv_heads, head_dim=D, max_position_embeddings=cfg.max_position_embeddings,
                         rope_parameters={"rope_type": "default", "rope_theta": cfg.rope_theta},
                         attention_bias=False, attn_implementation="eager")
    perm = interleaved_to_halves(D)
    state = dict(ours.state_dict())
    for proj, heads in (("q_proj", cfg.num_attention_heads), ("k_proj", cfg.kv_heads)):
        state[f"{proj}.weight"] = state[f"{proj}.weight"][torch.cat([h * D + perm for h in range(heads)])]
    theirs = LlamaAttention(hf_cfg, layer_idx=0).eval()
    theirs.load_state_dict(state, strict=True)
    x = inputs(cfg)
    B, T, _ = x.shape
    expected, _ = theirs(x, hf_rope(LlamaRotaryEmbedding(hf_cfg), x), additive_causal_mask(B, T, 0))
    assert_same(ours(x), expected)


@pytest.mark.slow
@pytest.mark.parametrize("q_lora_rank", [0, 24])
@torch.no_grad()
def test_mla_course_model_matches_transformers_deepseek_v3_model(q_lora_rank):
    from transformers import DeepseekV3ForCausalLM

    cfg = ModelConfig(attention="mla", q_lora_rank=q_lora_rank, num_hidden_layers=2)
    torch.manual_seed(0)
    ours = CourseModel(cfg).eval()
    theirs = DeepseekV3ForCausalLM(hf_deepseek_config(cfg, num_hidden_layers=2)).eval()
    state = {(k if k.startswith("lm_head") else f"model.{k}"): v for k, v in ours.state_dict().items()}
    theirs.load_state_dict(state, strict=True)
    ids = torch.randint(0, cfg.vocab_size, (2, 9), generator=torch.Generator().manual_seed(3))
    assert_same(ours(ids), theirs(ids).logits)


# ---------------------------------------------------------------- (e) the course model with MLA

@pytest.mark.slow
@pytest.mark.parametrize("q_lora_rank", [0, 24])
@pytest.mark.parametrize("absorb", [False, True])
def test_mla_model_generates_the_same_with_and_without_cache(q_lora_rank, absorb):
    cfg = ModelConfig(attention="mla", q_lora_rank=q_lora_rank, num_hidden_layers=2)
    torch.manual_seed(0)
    model = CourseModel(cfg)
    for layer in model.layers:
        layer.self_attn.absorb = absorb
    prompt = torch.randint(0, cfg.vocab_size, (3, 5), generator=torch.Generator().manual_seed(4))
    cached = generate(model, prompt, 16, use_cache=True)
    uncached = generate(model, prompt, 16, use_cache=False)
    assert cached.tokens.shape == (3, 16)
    assert torch.equal(cached.tokens, uncached.tokens)


def test_mla_model_trains_every_parameter():
    cfg = ModelConfig(attention="mla", q_lora_rank=24)
    model = CourseModel(cfg)
    ids = torch.randint(0, cfg.vocab_size, (2, 8))
    model(ids).logsumexp(-1).mean().backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert not missing, f"no gradient reaches {missing}"


# ---------------------------------------------------------------- (f) bad configs

@pytest.mark.parametrize("changes, words", [
    (dict(qk_rope_head_dim=7), "even"),
    (dict(kv_lora_rank=0), "kv_lora_rank"),
    (dict(v_head_dim=-1), "v_head_dim"),
    (dict(q_lora_rank=-8), "q_lora_rank"),
])
def test_bad_mla_config_raises_a_helpful_error(changes, words):
    with pytest.raises(ValueError, match=words):
        ModelConfig(attention="mla", **changes)
    # a config built for another attention never checked its MLA fields; the module does
    with pytest.raises(ValueError, match=words):
        MultiHeadLatentAttention(ModelConfig(attention="mha", **changes))


@torch.no_grad()
def test_decoding_past_the_rope_table_says_how_to_fix():
    attn = MultiHeadLatentAttention(CONFIGS["mla"].replace(max_position_embeddings=8))
    cache = attn.new_cache()
    attn(inputs(attn.config, T=8), cache)
    with pytest.raises(ValueError, match="max_position_embeddings"):
        attn(inputs(attn.config, T=1), cache)
