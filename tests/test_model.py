import pytest
import torch

from course_lib.config import ModelConfig
from course_lib.model import CourseModel
from course_lib.generate import generate, sample_next

ATTENTIONS = [("mha", None), ("gqa", 2), ("mqa", None)]


def tiny(attention="mha", kv=None, **kw):
    torch.manual_seed(0)
    return CourseModel(ModelConfig(vocab_size=23, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                   num_key_value_heads=kv, attention=attention, intermediate_size=48,
                                   max_position_embeddings=128, **kw)).eval()


@pytest.mark.parametrize("attention, kv", ATTENTIONS)
def test_prefill_decode_and_chunks_equal_full_forward(attention, kv):
    m = tiny(attention, kv)
    x = torch.randint(0, 23, (3, 17))
    full = m(x)
    cache = m.new_cache()
    pieces = [m(x[:, :6], cache)] + [m(x[:, t:t + 1], cache) for t in range(6, 10)] + [m(x[:, 10:], cache)]
    torch.testing.assert_close(torch.cat(pieces, 1), full, atol=1e-5, rtol=0)
    assert cache.seq_len == 17


@pytest.mark.parametrize("attention, kv", ATTENTIONS)
def test_cached_generation_equals_uncached_token_for_token(attention, kv):
    m = tiny(attention, kv)
    prompt = torch.randint(0, 23, (4, 5))
    with_cache = generate(m, prompt, 60, use_cache=True)
    without = generate(m, prompt, 60, use_cache=False)
    assert torch.equal(with_cache.tokens, without.tokens)
    assert with_cache.tokens.shape == (4, 60)


def test_causality_future_tokens_do_not_change_the_past():
    m = tiny()
    x = torch.randint(0, 23, (1, 12))
    y = x.clone()
    y[0, 8:] = (y[0, 8:] + 1) % 23
    torch.testing.assert_close(m(x)[:, :8], m(y)[:, :8])
    assert not torch.allclose(m(x)[:, 8:], m(y)[:, 8:])


@pytest.mark.parametrize("attention, kv, per_token", [("mha", None, 2 * 4 * 8), ("gqa", 2, 2 * 2 * 8), ("mqa", None, 2 * 1 * 8)])
def test_cache_bytes_are_exactly_k_and_v_per_kv_head(attention, kv, per_token):
    m = tiny(attention, kv)
    cache = m.new_cache()
    m(torch.randint(0, 23, (2, 10)), cache)
    assert cache.nbytes == per_token * 2 * 10 * 2 * 4  # elements/token/layer * layers * tokens * batch * fp32


def test_crop_rolls_the_cache_back():
    m = tiny()
    x = torch.randint(0, 23, (1, 9))
    cache = m.new_cache()
    m(x[:, :6], cache)
    m(torch.randint(0, 23, (1, 2)), cache)  # a draft we then reject
    cache.crop(6)
    torch.testing.assert_close(m(x[:, 6:], cache), m(x)[:, 6:], atol=1e-5, rtol=0)


def test_stop_token_ends_rows_and_marks_them_finished():
    m = tiny()
    prompt = torch.randint(0, 23, (3, 4))
    free = generate(m, prompt, 30)
    stop = int(free.tokens[0, 2])  # the third token row 0 produces greedily
    gen = generate(m, prompt, 30, stop_id=stop, pad_id=0)
    assert gen.finished[0] and gen.to_lists()[0] == free.tokens[0, :3].tolist()
    for row, fin, ids in zip(gen.tokens, gen.finished, gen.to_lists()):
        assert fin == (stop in ids)
        if fin:
            assert ids[-1] == stop and stop not in ids[:-1]


def test_position_limit_is_a_clear_error():
    m = tiny()
    with pytest.raises(ValueError, match="Raise max_position_embeddings"):
        m(torch.zeros(1, 129, dtype=torch.long))
    with pytest.raises(ValueError, match="batch dimension"):
        m(torch.zeros(5, dtype=torch.long))


def test_top_p_keeps_the_smallest_nucleus():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    g = torch.Generator().manual_seed(0)
    draws = {int(sample_next(logits, 1.0, 0.7, g)) for _ in range(300)}
    assert draws == {0, 1}  # 0.5 + 0.3 >= 0.7: tokens 2 and 3 are cut
    assert int(sample_next(logits, 0.0)) == 0


def test_tied_embeddings_share_one_tensor():
    m = tiny(tie_word_embeddings=True)
    assert m.lm_head.weight is m.embed_tokens.weight
    assert m.num_parameters() == sum(p.numel() for p in set(m.parameters()))


@pytest.mark.parametrize("shape", [(1, 1, 128), (1, 2, 128), (32, 40, 128), (7, 13, 64), (85, 128)])
def test_rms_norm_is_bitwise_the_formula_forward_and_backward(shape):
    """RMSNorm's float32 fast path (torch's rms_norm) must give exactly x * rsqrt(mean(x^2) + eps) * w,
    gradients included: training results and committed notebook outputs depend on it."""
    from course_lib.layers import RMSNorm

    torch.manual_seed(0)
    norm = RMSNorm(shape[-1], eps=1e-6)
    norm.weight.data.normal_()
    x = (3 * torch.randn(shape)).requires_grad_()
    y = norm(x)
    ref = norm.weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6))
    assert torch.equal(y, ref)
    g = torch.randn_like(y)
    assert all(torch.equal(a, b) for a, b in zip(torch.autograd.grad(y, (x, norm.weight), g),
                                                 torch.autograd.grad(ref, (x, norm.weight), g)))
    half = norm.to(torch.bfloat16)(x.detach().bfloat16())  # other dtypes: computed in float32, cast back
    assert half.dtype == torch.bfloat16
    torch.testing.assert_close(half.float(), ref.detach(), atol=0.05, rtol=0.02)
