import dataclasses

import pytest

from course_lib.config import ModelConfig


def test_defaults_are_valid_and_frozen():
    cfg = ModelConfig()
    assert cfg.kv_heads == cfg.num_attention_heads
    assert cfg.resolved_head_dim == cfg.hidden_size // cfg.num_attention_heads
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.hidden_size = 3


@pytest.mark.parametrize("changes, message", [
    (dict(hidden_size=66, num_attention_heads=4), r"hidden_size=66 is not divisible by num_attention_heads=4.*multiple of 4"),
    (dict(hidden_size=0), r"hidden_size=0 must be positive"),
    (dict(attention="flash"), r"attention='flash' is not known.*mha"),
    (dict(ffn="sparse"), r"ffn='sparse' is not known"),
    (dict(attention="gqa", num_key_value_heads=3), r"num_key_value_heads=3 must divide num_attention_heads=4.*\[1, 2, 4\]"),
    (dict(attention="mqa", num_key_value_heads=2), r"needs num_key_value_heads=1"),
    (dict(attention="mha", num_key_value_heads=2), r"attention='gqa'"),
    (dict(hidden_size=12, num_attention_heads=4), r"head_dim=3 is odd"),
    (dict(attention="mla", qk_rope_head_dim=7), r"qk_rope_head_dim=7 is odd"),
    (dict(attention="mla", kv_lora_rank=0), r"kv_lora_rank=0 must be positive"),
    (dict(ffn="moe", num_experts_per_tok=9), r"num_experts_per_tok=9 must be between 1 and n_routed_experts=8"),
    (dict(ffn="moe", n_group=3), r"not divisible by n_group=3"),
    (dict(ffn="moe", n_group=4, topk_group=5), r"topk_group=5 must be between 1 and n_group=4"),
    (dict(ffn="moe", n_group=4, topk_group=1, num_experts_per_tok=3), r"hold fewer than num_experts_per_tok=3"),
    (dict(ffn="moe", scoring_func="relu"), r"scoring_func='relu'"),
])
def test_bad_configs_say_what_and_how(changes, message):
    with pytest.raises(ValueError, match=message):
        ModelConfig(**changes)


def test_replace_revalidates():
    cfg = ModelConfig()
    assert cfg.replace(num_key_value_heads=2, attention="gqa").kv_heads == 2
    with pytest.raises(ValueError, match="divisible"):
        cfg.replace(hidden_size=65)


def test_mqa_default_has_one_kv_head_and_moe_layers_follow_first_k_dense():
    assert ModelConfig(attention="mqa").kv_heads == 1
    cfg = ModelConfig(ffn="moe", num_hidden_layers=3, first_k_dense_replace=1)
    assert [cfg.is_moe_layer(i) for i in range(3)] == [False, True, True]
    assert not any(ModelConfig().is_moe_layer(i) for i in range(2))
