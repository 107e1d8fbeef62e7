"""nano-DeepSeek's preset and the report card's measurements (notebook 08)."""

from dataclasses import replace

import pytest
import torch

from course_lib.capstone import (decode_fn, held_out_max_violation, kv_bytes_per_token,
                                 training_step_fn)
from course_lib.recipes import grpo_recipe, train_nano_deepseek
from course_lib.presets import nano_deepseek_config
from course_lib.model import CourseModel
from course_lib.balancing import moe_layers
from course_lib.profiles import PROFILES
from course_lib.tasks import Tokenizer, addition_splits, encode_examples

TINY = replace(PROFILES["cpu"], hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=96,
               n_train=32, n_eval=8, pretrain_steps=4, batch_size=4, digits=2)


@pytest.mark.parametrize("name", sorted(PROFILES))
def test_preset_is_deepseek_shaped_and_meets_the_capstone_floors(name):
    profile = PROFILES[name]
    base_cfg, cfg = profile.baseline_config(), nano_deepseek_config(profile)
    assert cfg.attention == "mla" and cfg.scoring_func == "sigmoid" and cfg.n_shared_experts >= 1
    assert [cfg.is_moe_layer(i) for i in range(cfg.num_hidden_layers)] == [False] + [True] * (cfg.num_hidden_layers - 1)
    # equal FFN compute per token: active experts x expert width = the dense width
    assert (cfg.num_experts_per_tok + cfg.n_shared_experts) * cfg.moe_intermediate_size == base_cfg.intermediate_size
    torch.manual_seed(0)
    base, nano = CourseModel(base_cfg), CourseModel(cfg)
    prompt = torch.randint(4, cfg.vocab_size, (2, 5))
    assert kv_bytes_per_token(nano, prompt) <= kv_bytes_per_token(base, prompt) / 4
    assert nano.num_parameters(active=True) <= nano.num_parameters() / 2
    assert abs(nano.num_parameters(active=True) - base.num_parameters()) / base.num_parameters() < 0.05


def test_kv_bytes_per_token_reads_the_live_cache():
    cfg = nano_deepseek_config(TINY)
    model = CourseModel(cfg)
    prompt = torch.randint(4, cfg.vocab_size, (3, 7))
    # MLA caches the latent and the rope key, fp32, in every layer; per sequence, so the batch divides out
    assert kv_bytes_per_token(model, prompt) == cfg.num_hidden_layers * (cfg.kv_lora_rank + cfg.qk_rope_head_dim) * 4
    base = CourseModel(TINY.baseline_config())
    assert kv_bytes_per_token(base, prompt) == 2 * TINY.num_hidden_layers * TINY.hidden_size * 4


def test_held_out_max_violation_counts_only_masked_positions():
    torch.manual_seed(0)
    model = CourseModel(nano_deepseek_config(TINY)).eval()
    tokens = torch.randint(4, model.config.vocab_size, (3, 6))
    mask = torch.zeros(3, 6, dtype=torch.bool)
    mask[0, :4] = True
    mask[2, 1] = True
    got = held_out_max_violation(model, tokens, mask)
    # by hand: each MoE layer's load over the 5 kept tokens, MaxVio = max / mean - 1, averaged over layers
    layers = moe_layers(model)
    assert len(layers) == TINY.num_hidden_layers - 1
    expected = []
    for m in layers:
        load = torch.bincount(m.last_topk_idx[mask].flatten(), minlength=m.config.n_routed_experts).float()
        assert load.sum() == 5 * model.config.num_experts_per_tok
        expected.append((load.max() / load.mean() - 1).item())
    assert got == pytest.approx(sum(expected) / len(expected)) and got > 0
    everything = held_out_max_violation(model, tokens, torch.ones_like(mask))
    assert everything != pytest.approx(got)  # padding positions would change the number: they are left out
    with pytest.raises(ValueError, match="no MoE layer"):
        held_out_max_violation(CourseModel(TINY.baseline_config()), tokens, mask)


def test_training_step_fn_trains_a_copy_and_leaves_the_model_alone():
    tok = Tokenizer()
    train, _ = addition_splits(16, 4, digits=2, seed=0)
    tokens, mask = encode_examples(train, tok)
    torch.manual_seed(0)
    model = CourseModel(nano_deepseek_config(TINY))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    step = training_step_fn(model, tokens, mask, batch_size=4, lr=1e-2)
    step()
    step()
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k


def test_decode_fn_generates_the_requested_tokens_and_refuses_too_long_contexts():
    model = CourseModel(TINY.baseline_config(max_position_embeddings=64))
    gen = decode_fn(model, context=20, new_tokens=10, batch=2)()
    assert gen.tokens.shape == (2, 10)
    with pytest.raises(ValueError, match="max_position_embeddings"):
        decode_fn(model, context=60, new_tokens=10)


def test_grpo_recipe_is_notebook_07s_protocol_and_never_trains_on_held_out_questions():
    _, eval_problems = addition_splits(256, 200, digits=3, seed=0)
    cfg, pool, reward = grpo_recipe(PROFILES["cpu"], eval_problems, seed=0)
    assert (cfg.steps, cfg.prompts_per_step, cfg.group_size, cfg.max_new_tokens, cfg.lr, cfg.warmup_steps, cfg.seed) == \
        (100, 64, 8, 48, 1e-4, 10, 0)
    assert cfg.filter_zero_variance and cfg.sampling_rounds == 1  # trains on groups with a reward spread only
    plain = grpo_recipe(PROFILES["cpu"], eval_problems, seed=0, variant="grpo")[0]
    assert not plain.filter_zero_variance and plain.prompts_per_step == 64
    assert not set(pool) & set(eval_problems)
    p = eval_problems[0]
    assert reward(f"<think>x</think><answer>{p.target}</answer>", p) == 1.5  # accuracy 1 + 0.5 x format 1
    assert grpo_recipe(PROFILES["cpu"], eval_problems, seed=1)[0].seed == 1


def test_train_nano_deepseek_balances_with_the_bias_and_resumes(tmp_path, monkeypatch):
    monkeypatch.setenv("COURSE_CHECKPOINT_DIR", str(tmp_path))
    model, result, tracker, *_ = train_nano_deepseek(TINY, name="nano", progress=False)
    assert len(result.losses) == TINY.pretrain_steps and len(tracker.max_vio) == TINY.pretrain_steps
    assert all(m.dispatch == "vectorized" for m in moe_layers(model))  # the default: the fastest on a CPU
    assert any(m.gate.e_score_correction_bias.abs().sum() > 0 for m in moe_layers(model)), "the bias never moved"
    again, result2, *_ = train_nano_deepseek(TINY, name="nano", progress=False, seed=5)
    assert result2.resumed_from == TINY.pretrain_steps
    for (k, a), b in zip(model.state_dict().items(), again.state_dict().values()):
        assert torch.equal(a, b), k


@pytest.mark.parametrize("name", sorted(PROFILES))
def test_query_rank_gives_mla_the_parameters_of_the_baselines_attention(name):
    from course_lib.attention import CausalSelfAttention, MultiHeadLatentAttention

    profile = PROFILES[name]
    mla = MultiHeadLatentAttention(nano_deepseek_config(profile))
    mha = CausalSelfAttention(profile.baseline_config())
    n_mla, n_mha = (sum(p.numel() for p in m.parameters()) for m in (mla, mha))
    assert mla.q_lora_rank > 0 and mla.q_lora_rank % 8 == 0
    assert abs(n_mla - n_mha) / n_mha < 0.03, (n_mla, n_mha)


def test_grpo_keeps_balancing_nano_deepseek_on_rollout_tokens(tmp_path):
    from course_lib.grpo_trainer import train_grpo
    from course_lib.recipes import balancing_callback

    model, _, _, tok, _, eval_problems = train_nano_deepseek(TINY, progress=False)
    cfg, pool, reward = grpo_recipe(TINY, eval_problems, seed=0, steps=3)
    cfg = replace(cfg, prompts_per_step=4, group_size=4, max_new_tokens=12, track_kl=False, filter_zero_variance=False)
    seen = []
    callback = balancing_callback(model, then=lambda step, stats, rollout: seen.append((step, rollout)))
    biases = [m.gate.e_score_correction_bias.clone() for m in moe_layers(model)]
    result = train_grpo(model, tok, pool, cfg, reward_fn=reward, callback=callback, progress=False,
                        checkpoint_path=str(tmp_path / "grpo.pt"))
    tracker = callback.tracker
    assert tracker.steps == [0, 1, 2] and [s for s, _ in seen] == [0, 1, 2]  # every update, then the dashboard
    # the tracker counted the update forward's real tokens (prompt + completion, the last one fed to no forward)
    _, last = seen[-1]
    prompts = torch.tensor(last.prompts).repeat_interleave(cfg.group_size, dim=0)  # one prompt length per step
    fed = torch.cat([prompts, last.tokens], dim=1)[:, :-1]  # (B, Tp + L - 1): the update forward's input
    assert int(tracker.loads[-1][0].sum()) == int((fed != tok.pad_id).sum()) * model.config.num_experts_per_tok
    assert int((fed == tok.pad_id).sum()) > 0  # there was padding to leave out
    assert any(not torch.equal(b, m.gate.e_score_correction_bias) for b, m in zip(biases, moe_layers(model)))
    saved = torch.load(tmp_path / "grpo.pt", weights_only=True)["model"]  # the bias update is in the checkpoint
    assert all(torch.equal(saved[k], v) for k, v in model.state_dict().items() if k.endswith("e_score_correction_bias"))
    assert len(result.history) == 3
