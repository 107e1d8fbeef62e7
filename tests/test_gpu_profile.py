"""The `gpu` profile's models, built and stepped here on the CPU (and on the `meta` device), so that a size or
device bug on the GPU path fails in `make check` instead of on a learner's Colab: every notebook's model at
gpu sizes takes a forward, a backward, a cached decode equal to an uncached one, and a GRPO step."""

from dataclasses import replace

import pytest
import torch

from course_lib.generate import generate
from course_lib.grpo_trainer import grpo_step
from course_lib.model import CourseModel, lm_loss
from course_lib.mtp import MTPModel, mtp_loss_fn
from course_lib.presets import mla_config, mtp_config, nano_deepseek_config
from course_lib.profiles import PROFILES
from course_lib.recipes import balancing_configs, grpo_recipe
from course_lib.tasks import Tokenizer, addition_splits, encode_examples
from course_lib.train import TrainConfig, make_optimizer

GPU = PROFILES["gpu"]
BASE = GPU.baseline_config()
CONFIGS = {  # notebook: the gpu-profile model it trains
    "00 baseline": BASE,
    "02 GQA": BASE.replace(attention="gqa", num_key_value_heads=BASE.num_attention_heads // 2),
    "02 MQA": BASE.replace(attention="mqa"),
    "03 MLA": mla_config(GPU),
    "04 MoE": BASE.replace(ffn="moe", n_routed_experts=8, num_experts_per_tok=2, n_shared_experts=0,
                           moe_intermediate_size=GPU.intermediate_size // 2, scoring_func="softmax",
                           norm_topk_prob=False, n_group=1, topk_group=1),
    "05 coarse": balancing_configs(GPU)["coarse"],
    "05 DeepSeekMoE": balancing_configs(GPU)["fine"],
    "06 small": BASE.replace(hidden_size=128, intermediate_size=352, num_hidden_layers=3),
    "08 nano-DeepSeek": nano_deepseek_config(GPU),
    "09 MTP main": mtp_config(GPU),
    "10 expert-parallel MoE": BASE.replace(ffn="moe", n_routed_experts=8, num_experts_per_tok=2, n_shared_experts=1,
                                           moe_intermediate_size=GPU.intermediate_size // 2, scoring_func="sigmoid"),
}


def batch():
    tok = Tokenizer()
    problems, _ = addition_splits(4, 1, digits=GPU.digits, seed=0)
    return tok, *encode_examples(problems, tok)


@pytest.mark.parametrize("name", list(CONFIGS))
def test_gpu_profile_model_trains_and_decodes(name):
    tok, tokens, mask = batch()
    model = CourseModel(CONFIGS[name])
    loss = lm_loss(model, tokens, mask)
    loss.backward()
    assert torch.isfinite(loss) and all(p.grad is None or torch.isfinite(p.grad).all() for p in model.parameters())
    prompt = tokens[:2, :6]
    cached, uncached = (generate(model, prompt, 5, use_cache=flag).tokens for flag in (True, False))
    assert torch.equal(cached, uncached) and cached.shape == (2, 5)


@pytest.mark.parametrize("name", list(CONFIGS))
def test_gpu_profile_model_builds_on_meta_with_the_same_size(name):
    with torch.device("meta"):
        on_meta = CourseModel(CONFIGS[name])
    assert all(p.is_meta for p in on_meta.parameters())
    assert on_meta.num_parameters() == CourseModel(CONFIGS[name]).num_parameters()
    assert on_meta.num_parameters(active=True) <= on_meta.num_parameters()


def test_gpu_profile_sizes_are_the_profiles():
    assert CourseModel(BASE).num_parameters() > 4_000_000  # the README's ~4.8M
    assert GPU.batch_size * GPU.pretrain_steps >= 4 * PROFILES["cpu"].batch_size * PROFILES["cpu"].pretrain_steps


def test_gpu_profile_mtp_model_trains():
    tok, tokens, mask = batch()
    model = MTPModel(mtp_config(GPU), num_nextn_predict_layers=1)
    loss = mtp_loss_fn(0.3)(model, tokens, mask)
    loss.backward()
    assert torch.isfinite(loss) and model.mtp[0].eh_proj.weight.grad is not None


@pytest.mark.parametrize("name", ["00 baseline", "08 nano-DeepSeek"])
def test_gpu_profile_grpo_step(name):
    tok = Tokenizer()
    _, eval_problems = addition_splits(8, 8, digits=GPU.digits, seed=0)
    cfg, pool, reward = grpo_recipe(GPU, eval_problems, seed=0)
    cfg = replace(cfg, prompts_per_step=2, group_size=2, max_new_tokens=8, filter_zero_variance=False)
    model = CourseModel(CONFIGS[name])
    optimizer = make_optimizer(model, cfg)
    before = [p.detach().clone() for p in model.parameters()]
    stats, rollout = grpo_step(model, optimizer, None, tok, pool[:64], cfg, reward, step=0)
    assert stats["updated"] == 1.0 and rollout.tokens.shape[0] == 4
    assert any(not torch.equal(a, p) for a, p in zip(before, model.parameters())) or stats["zero_adv_frac"] == 1.0
    assert TrainConfig(steps=GPU.pretrain_steps, batch_size=GPU.batch_size, lr=GPU.lr).lr_at(0) > 0
