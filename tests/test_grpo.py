"""GRPO math against hand-computed cases (DEEPSEEK_REFERENCE.md §3).

What is asserted:
- group_advantages: hand values with the sample std (N−1) and eps; zero mean per group; exactly 0
  for tied groups even where float rounding would leave a residue; scale=False is Dr. GRPO's r − mean.
- zero_variance_mask keeps exactly the groups with a reward spread.
- token_logprobs matches hand log-probs and log_softmax.
- kl_k3: 0 when equal, positive otherwise, hand values, and gradient 1 − π_ref/π_θ.
- grpo_loss: clipped tokens (A>0 above the band, A<0 below it) have zero gradient, unclipped ones
  ρ·A; the clip-higher band lets A>0 tokens rise to 1+eps_high; the KL term adds beta·k3;
  "sequence", "token" and "dr_grpo" give the reference §3.6 values and weights on a ragged mask;
  masked positions (even NaN/inf) change neither the loss nor the gradient.
"""

import math
from dataclasses import replace

import pytest
import torch
from einops import rearrange

from course_lib.grpo import group_advantages, grpo_loss, kl_k3, token_logprobs, zero_variance_mask

# ---------------------------------------------------------------- advantages


def test_group_advantages_hand_values():
    rewards = torch.tensor([[1.0, 0.0, 0.0, 0.0], [0.0, 0.0, 1.0, 1.0]])
    # group 0: mean 0.25, deviations (0.75, -0.25, -0.25, -0.25);
    #   sample var = (0.5625 + 3 * 0.0625) / (4 - 1) = 0.25, std = 0.5
    # group 1: mean 0.5, deviations ±0.5; sample var = 4 * 0.25 / 3 = 1/3, std = 1/sqrt(3)
    s = 1 / math.sqrt(3)
    expected_eps0 = torch.tensor([[1.5, -0.5, -0.5, -0.5], [-0.5 / s, -0.5 / s, 0.5 / s, 0.5 / s]])
    torch.testing.assert_close(group_advantages(rewards, eps=0.0), expected_eps0)
    # default eps=1e-4 goes in the denominator: 0.75 / (0.5 + 1e-4)
    adv = group_advantages(rewards)
    assert adv[0, 0].item() == pytest.approx(0.75 / 0.5001, rel=1e-6)
    assert adv[1, 3].item() == pytest.approx(0.5 / (s + 1e-4), rel=1e-6)


def test_dr_grpo_advantages_are_centered_only():
    rewards = torch.tensor([[1.0, 0.0, 0.0, 0.0], [2.0, 4.0, 6.0, 8.0]])
    # r - mean, no division: means 0.25 and 5
    expected = torch.tensor([[0.75, -0.25, -0.25, -0.25], [-3.0, -1.0, 1.0, 3.0]])
    torch.testing.assert_close(group_advantages(rewards, scale=False), expected)


def test_advantages_zero_mean_per_group():
    rewards = torch.rand(5, 8, generator=torch.Generator().manual_seed(0))
    for scale in (True, False):
        adv = group_advantages(rewards, scale=scale)
        torch.testing.assert_close(adv.mean(dim=1), torch.zeros(5), atol=1e-6, rtol=0)
    # scaled advantages have sample std ~1 (up to eps)
    torch.testing.assert_close(group_advantages(rewards, eps=0.0).std(dim=1), torch.ones(5))


def test_tied_groups_get_exactly_zero():
    # float32 mean of sixteen 0.7s is not 0.7: the naive formula leaves ~6e-8 over a ~6e-8 "std",
    # which a small eps (the Dr. GRPO repo uses 1e-8) would blow up to an O(1) advantage.
    rewards = torch.full((1, 16), 0.7)
    centered = rewards - rewards.mean(dim=1, keepdim=True)
    naive = centered / (rewards.std(dim=1, keepdim=True) + 1e-8)
    assert naive.abs().max() > 0.1  # the bug the pinning prevents
    for scale in (True, False):
        assert torch.equal(group_advantages(rewards, scale=scale, eps=1e-8), torch.zeros(1, 16))
    mixed = torch.tensor([[1, 1, 1, 1], [0, 0, 0, 0], [1, 0, 1, 0]])  # int rewards are accepted
    adv = group_advantages(mixed)
    assert adv.dtype == torch.get_default_dtype()
    assert torch.equal(adv[:2], torch.zeros(2, 4)) and adv[2].abs().min() > 0


def test_group_advantages_needs_groups_of_two():
    with pytest.raises(ValueError):
        group_advantages(torch.ones(3, 1))
    with pytest.raises(ValueError):
        group_advantages(torch.ones(6))


def test_zero_variance_mask():
    rewards = torch.tensor([[1.0, 1.0, 1.0], [0.0, 1.0, 0.0], [0.0, 0.0, 0.0], [0.5, 0.5, 0.5], [-1.0, 1.0, 1.0]])
    assert zero_variance_mask(rewards).tolist() == [False, True, False, False, True]
    # the kept groups are exactly those with a nonzero advantage somewhere
    adv = group_advantages(rewards)
    assert torch.equal(adv.abs().amax(dim=1) > 0, zero_variance_mask(rewards))


# ---------------------------------------------------------------- log-probs and KL


def test_token_logprobs_hand_values():
    logits = torch.log(torch.tensor([[[1.0, 1.0, 1.0], [1.0, 2.0, 5.0]]]))  # (1, 2, 3): probs 1/3 each; 1/8, 2/8, 5/8
    tokens = torch.tensor([[0, 2]])  # (1, 2)
    expected = torch.log(torch.tensor([[1 / 3, 5 / 8]]))
    torch.testing.assert_close(token_logprobs(logits, tokens), expected)
    # adding a constant to the logits changes nothing (softmax is shift invariant)
    torch.testing.assert_close(token_logprobs(logits + 7.0, tokens), expected)


def test_token_logprobs_matches_log_softmax():
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(2, 5, 11, generator=g).to(torch.bfloat16)
    tokens = torch.randint(0, 11, (2, 5), generator=g)
    out = token_logprobs(logits, tokens)
    assert out.dtype == torch.float32 and out.shape == (2, 5)
    ref = torch.log_softmax(logits.float(), dim=-1).gather(-1, tokens[..., None])[..., 0]
    torch.testing.assert_close(out, ref)
    with pytest.raises(ValueError):
        token_logprobs(logits, tokens[:, :4])


def test_kl_k3_hand_values():
    logp = torch.log(torch.tensor([0.5, 0.25, 0.3]))
    ref = torch.log(torch.tensor([0.25, 0.5, 0.3]))
    # π_ref/π = 0.5: 0.5 - ln 0.5 - 1 = ln 2 - 0.5 = 0.193147
    # π_ref/π = 2:   2 - ln 2 - 1     = 1 - ln 2   = 0.306853
    # equal: exactly 0
    kl = kl_k3(logp, ref)
    torch.testing.assert_close(kl, torch.tensor([math.log(2) - 0.5, 1 - math.log(2), 0.0]))
    assert kl[2].item() == 0.0


def test_kl_k3_nonnegative_and_gradient():
    g = torch.Generator().manual_seed(2)
    logp = torch.randn(1000, generator=g, dtype=torch.float64).requires_grad_()
    ref = torch.randn(1000, generator=g, dtype=torch.float64)
    kl = kl_k3(logp, ref)
    assert (kl >= 0).all() and (kl > 0).all()  # random pairs are never equal
    kl.sum().backward()
    # d/dlogp [e^{ref-logp} - (ref-logp) - 1] = 1 - π_ref/π_θ  (reference §3.6)
    torch.testing.assert_close(logp.grad, 1 - torch.exp(ref - logp.detach()))


# ---------------------------------------------------------------- clipped surrogate


def _one_token_batch(ratios, advs):
    """B sequences of one token each, with π_θ/π_θold = ratios; returns (logp leaf, old_logp, adv, mask)."""
    old = torch.log(torch.full((len(ratios), 1), 0.5))  # (B, 1)
    logp = (old + torch.log(torch.tensor(ratios))[:, None]).requires_grad_()  # (B, 1)
    return logp, old, torch.tensor(advs), torch.ones(len(ratios), 1, dtype=torch.bool)


def test_clip_symmetric_band_and_zero_gradient_where_clipped():
    # eps = 0.2, band [0.8, 1.2]; per token l = min(ρA, clip(ρ)A):
    #   ρ=1.5, A=+1: min(1.5, 1.2)  = 1.2   clipped, grad 0
    #   ρ=0.5, A=-1: min(-0.5, -0.8) = -0.8 clipped, grad 0
    #   ρ=1.5, A=-1: min(-1.5, -1.2) = -1.5 not clipped (pessimistic side), dl/dlogp = ρA = -1.5
    #   ρ=0.5, A=+1: min(0.5, 0.8)  = 0.5   not clipped, dl/dlogp = ρA = 0.5
    #   ρ=1.1, A=+1: inside the band, 1.1, dl/dlogp = 1.1
    logp, old, adv, mask = _one_token_batch([1.5, 0.5, 1.5, 0.5, 1.1], [1.0, -1.0, -1.0, 1.0, 1.0])
    loss, stats = grpo_loss(logp, old, adv, mask, aggregation="token")
    # objective = (1.2 - 0.8 - 1.5 + 0.5 + 1.1) / 5 = 0.1; loss = -0.1
    assert loss.item() == pytest.approx(-0.1, abs=1e-6)
    loss.backward()
    torch.testing.assert_close(logp.grad[:, 0], -torch.tensor([0.0, 0.0, -1.5, 0.5, 1.1]) / 5)
    assert stats["clip_frac"] == pytest.approx(2 / 5)
    assert stats["clip_frac_low"] == pytest.approx(1 / 5) and stats["clip_frac_high"] == pytest.approx(1 / 5)


def test_clip_higher_asymmetric_band():
    # ρ = 1.25 and 1.3 with A=+1, ρ = 0.75 with A=-1
    #   eps_low = eps_high = 0.2:   1.2 (clipped), 1.2 (clipped), -0.8 (clipped)
    #   eps_low 0.2, eps_high 0.28: 1.25 (free, grad 1.25), 1.28 (clipped), -0.8 (clipped: low side unchanged)
    ratios, advs = [1.25, 1.3, 0.75], [1.0, 1.0, -1.0]
    logp, old, adv, mask = _one_token_batch(ratios, advs)
    sym, sym_stats = grpo_loss(logp, old, adv, mask, aggregation="token")
    assert sym.item() == pytest.approx(-(1.2 + 1.2 - 0.8) / 3, abs=1e-6)
    assert sym_stats["clip_frac"] == pytest.approx(1.0)

    logp, old, adv, mask = _one_token_batch(ratios, advs)
    asym, asym_stats = grpo_loss(logp, old, adv, mask, eps_low=0.2, eps_high=0.28, aggregation="token")
    assert asym.item() == pytest.approx(-(1.25 + 1.28 - 0.8) / 3, abs=1e-6)
    asym.backward()
    torch.testing.assert_close(logp.grad[:, 0], -torch.tensor([1.25, 0.0, 0.0]) / 3)
    assert asym_stats["clip_frac_high"] == pytest.approx(1 / 3) and asym_stats["clip_frac_low"] == pytest.approx(1 / 3)


def test_kl_term_enters_with_beta():
    # ρ = 1 and A = 0, so the loss is only beta * k3 = 0.1 * (ln 2 - 0.5) for π_ref/π = 0.5
    logp = torch.log(torch.tensor([[0.5]])).requires_grad_()
    ref = torch.log(torch.tensor([[0.25]]))
    mask = torch.ones(1, 1, dtype=torch.bool)
    loss, stats = grpo_loss(logp, logp.detach(), torch.zeros(1), mask, ref_logp=ref, beta=0.1)
    assert loss.item() == pytest.approx(0.1 * (math.log(2) - 0.5), rel=1e-6)
    assert stats["kl"] == pytest.approx(math.log(2) - 0.5, rel=1e-6)
    loss.backward()
    # d(beta * k3)/dlogp = beta * (1 - π_ref/π) = 0.1 * 0.5
    assert logp.grad.item() == pytest.approx(0.05, rel=1e-6)
    # beta = 0: KL reported, not optimized
    loss0, stats0 = grpo_loss(logp, logp.detach(), torch.zeros(1), mask, ref_logp=ref)
    assert loss0.item() == 0.0 and stats0["kl"] == pytest.approx(stats["kl"])
    with pytest.raises(ValueError):
        grpo_loss(logp, logp.detach(), torch.zeros(1), mask, beta=0.1)


# ---------------------------------------------------------------- aggregations


def _ragged():
    """Two sequences, ρ = 1 everywhere: row 0 has 4 tokens with A=1, row 1 has 1 token with A=2."""
    logp = torch.log(torch.full((2, 4), 0.5)).requires_grad_()  # (B, T) = (2, 4)
    mask = torch.tensor([[1, 1, 1, 1], [1, 0, 0, 0]], dtype=torch.bool)
    return logp, logp.detach().clone(), torch.tensor([1.0, 2.0]), mask


@pytest.mark.parametrize(
    "aggregation,max_len,objective,w0,w1",
    [
        # GRPO: (1/G) Σ_i (1/|o_i|) Σ_t l = (4·1/4 + 2/1) / 2 = 1.5; token weights 1/(2·4), 1/(2·1)
        ("sequence", None, 1.5, 1 / 8, 1 / 2),
        # DAPO: Σ l / Σ|o_i| = (4·1 + 2) / 5 = 1.2; every token weighs 1/5
        ("token", None, 1.2, 1 / 5, 1 / 5),
        # Dr. GRPO: Σ l / (G·L_max) = 6 / (2·8) = 0.375 with L_max = 8; 6 / (2·4) = 0.75 with T = 4
        ("dr_grpo", 8, 0.375, 1 / 16, 1 / 16),
        ("dr_grpo", None, 0.75, 1 / 8, 1 / 8),
    ],
)
def test_aggregations_on_ragged_mask(aggregation, max_len, objective, w0, w1):
    logp, old, adv, mask = _ragged()
    loss, stats = grpo_loss(logp, old, adv, mask, aggregation=aggregation, max_len=max_len)
    assert loss.item() == pytest.approx(-objective, rel=1e-6)
    assert stats["tokens"] == 5.0 and stats["clip_frac"] == 0.0 and stats["ratio_mean"] == pytest.approx(1.0)
    loss.backward()
    # with ρ ≡ 1 (one update per batch) the gradient is -A · weight · ∇log π on real tokens, 0 on padding
    expected = -torch.tensor([[w0 * 1.0] * 4, [w1 * 2.0, 0.0, 0.0, 0.0]])
    torch.testing.assert_close(logp.grad, expected)


def test_dr_grpo_max_len_must_cover_lengths():
    logp, old, adv, mask = _ragged()
    with pytest.raises(ValueError):
        grpo_loss(logp, old, adv, mask, aggregation="dr_grpo", max_len=3)
    with pytest.raises(ValueError):
        grpo_loss(logp, old, adv, mask, aggregation="mean")


# ---------------------------------------------------------------- masking


@pytest.mark.parametrize("aggregation", ["sequence", "token", "dr_grpo"])
def test_masked_tokens_contribute_nothing(aggregation):
    g = torch.Generator().manual_seed(3)
    B, T = 4, 6
    mask = torch.tensor([[1] * 6, [1] * 3 + [0] * 3, [1] + [0] * 5, [1] * 5 + [0]], dtype=torch.bool)
    logp = -torch.rand(B, T, generator=g) - 0.1
    old = logp + 0.3 * torch.randn(B, T, generator=g)  # ratios spread across the clip band
    ref = logp + 0.3 * torch.randn(B, T, generator=g)
    adv = torch.randn(B, T, generator=g)

    def run(lp, ol, rf, ad):
        lp = lp.clone().requires_grad_()
        loss, stats = grpo_loss(lp, ol, ad, mask, ref_logp=rf, beta=0.04, eps_high=0.28, aggregation=aggregation)
        loss.backward()
        return loss.detach(), lp.grad, stats

    base_loss, base_grad, base_stats = run(logp, old, ref, adv)
    assert torch.isfinite(base_loss) and base_stats["clip_frac"] > 0
    fills = (torch.randn(B, T, generator=g) * 5, torch.full((B, T), float("nan")), torch.full((B, T), float("inf")))
    for fill in fills:
        def junk(x, fill=fill):
            return torch.where(mask, x, fill)

        loss, grad, stats = run(junk(logp), junk(old), junk(ref), junk(adv))
        assert torch.equal(loss, base_loss)
        assert torch.equal(grad, base_grad) and torch.equal(grad[~mask], torch.zeros(int((~mask).sum())))
        assert stats == base_stats


def test_per_sequence_adv_from_groups():
    # (P, G) rewards -> (B,) advantages in group-major order, as the trainer will pass them
    rewards = torch.tensor([[1.0, 0.0], [0.0, 0.0]])
    adv = rearrange(group_advantages(rewards, scale=False), "p g -> (p g)")  # (B,) = (0.5, -0.5, 0, 0)
    logp = torch.zeros(4, 3, requires_grad=True)
    mask = torch.ones(4, 3, dtype=torch.bool)
    loss, _ = grpo_loss(logp, logp.detach(), adv, mask)
    loss.backward()
    # sequence mean: each token weighs 1/(4·3); grad = -A/12 per token
    torch.testing.assert_close(logp.grad, -rearrange(adv, "b -> b 1").expand(4, 3) / 12)
    assert loss.item() == 0.0


def test_old_logp_ref_logp_and_adv_are_constants():
    # μ = 1: old_logp is the same numbers as logp. Even if the caller forgets to detach it (or
    # ref_logp, or adv), ρ = exp(logp - old_logp) must still give ∇ = A · ∇log π, not 0.
    logp = torch.log(torch.full((2, 1), 0.5)).requires_grad_()  # (B, T) = (2, 1)
    adv = torch.tensor([1.0, -1.0]) * logp[:, 0].exp() * 2  # values (1, -1), attached to logp's graph
    mask = torch.ones(2, 1, dtype=torch.bool)
    ref = logp + math.log(0.5)  # π_ref/π = 0.5, attached to logp's graph
    loss, _ = grpo_loss(logp, logp, adv, mask, ref_logp=ref, beta=0.5, aggregation="token")
    loss.backward()
    # token weight 1/2: surrogate -A/2; KL beta·(1 - π_ref/π)/2 = 0.5·0.5/2 = 0.125.
    # (An attached ref would add beta·(π_ref/π - 1)/2 = -0.125 and cancel the KL gradient.)
    torch.testing.assert_close(logp.grad, torch.tensor([[-0.5 + 0.125], [0.5 + 0.125]]))


# ================================================================ sampling, batch loss and the trainer
#
# What is asserted:
# - sample_groups: completion log-probs from one padded forward per prompt length equal a token-by-token
#   recomputation on the KV cache; rows are group-major; masks end right after </answer>, truncated rows
#   run to the limit; greedy evaluation agrees with train.generate_texts.
# - grpo_step: one step with a hand-made reward raises the rewarded completion's probability and lowers
#   the others'; mu sets the number of optimizer steps.
# - train_grpo: an interrupted and resumed run equals an uninterrupted one (weights and stats).
#   kl_every measures the KL on every n-th step only and leaves the trained weights unchanged (beta = 0).
# - batch_loss switches, each against the hand formula of its per-token weight: scale_rewards (std),
#   dr_grpo (constant normalizer), token-level, clip-higher (only A>0 tokens above 1+eps_low move),
#   zero-variance filtering (tied rows leave every normalizer); variant() changes only its fields.

import copy  # noqa: E402
import json  # noqa: E402
from dataclasses import asdict  # noqa: E402

from course_lib import recipes  # noqa: E402

from course_lib.config import ModelConfig  # noqa: E402
from course_lib.grpo_trainer import GRPOConfig, VARIANTS, batch_loss, grpo_step, train_grpo
from course_lib.rollout import (completion_logprobs, evaluate, make_reward, rollout_stats, sample_groups,
                                score_rollout)
from course_lib.model import CourseModel  # noqa: E402
from course_lib.tasks import AdditionProblem, Tokenizer, addition_splits  # noqa: E402
from course_lib.generate import generate_texts
from course_lib.train import make_optimizer  # noqa: E402

MIXED_LENGTHS = [AdditionProblem(3, 4), AdditionProblem(12, 9), AdditionProblem(347, 85), AdditionProblem(5, 67)]


def tiny_model(seed=0, stop_bias=None):
    """A 1-layer random model; ``stop_bias`` adds a bias to the </answer> logit so completions stop early."""
    tok = Tokenizer()
    torch.manual_seed(seed)
    model = CourseModel(ModelConfig(vocab_size=tok.vocab_size, hidden_size=32, num_hidden_layers=1,
                                    num_attention_heads=2, intermediate_size=64, max_position_embeddings=128))
    if stop_bias is not None:
        head = torch.nn.Linear(32, tok.vocab_size, bias=True)
        head.weight.data.copy_(model.lm_head.weight.data)
        head.bias.data.zero_()
        head.bias.data[tok.stop_id] = stop_bias
        model.lm_head = head
    return model.eval(), tok


def test_sampled_completion_logprobs_equal_a_recomputation_on_the_cache():
    model, tok = tiny_model()
    G, T = 3, 1.3
    ro = sample_groups(model, tok, MIXED_LENGTHS, G, 10, temperature=T, top_p=0.9,
                       generator=torch.Generator().manual_seed(0))
    assert ro.tokens.shape[0] == len(MIXED_LENGTHS) * G and ro.problem_of(5) is MIXED_LENGTHS[1]
    logp = completion_logprobs(model, ro, temperature=T)  # (B, L): one padded forward per prompt length
    assert logp.shape == ro.tokens.shape
    with torch.no_grad():
        for r in range(ro.tokens.shape[0]):
            # token by token on the KV cache, from this row's own prompt, nothing padded
            prompt = torch.tensor([ro.prompts[r // G]])
            assert tok.decode(prompt[0].tolist()) == ro.problem_of(r).prompt
            cache = model.new_cache()
            logits = model(prompt, cache)[:, -1]  # (1, V)
            for t in range(int(ro.lengths[r])):
                y = ro.tokens[r, t]
                expected = torch.log_softmax(logits[0] / T, dim=-1)[y]
                torch.testing.assert_close(logp[r, t], expected, atol=1e-5, rtol=1e-5)
                logits = model(y.view(1, 1), cache)[:, -1]
            assert tok.decode(ro.tokens[r, :int(ro.lengths[r])].tolist()) == ro.texts[r]


def test_masks_stop_right_after_answer_close_and_truncation_is_tracked():
    model, tok = tiny_model(stop_bias=3.0)
    limit = 12
    ro = sample_groups(model, tok, MIXED_LENGTHS * 4, 4, limit, generator=torch.Generator().manual_seed(1))
    n_fin = int(ro.finished.sum())
    assert 0 < n_fin < len(ro.texts)  # both kinds occur
    for row, m, fin, text in zip(ro.tokens, ro.mask, ro.finished, ro.texts):
        stops = (row == tok.stop_id).nonzero().flatten().tolist()
        n = int(m.sum())
        assert m[:n].all() and not m[n:].any()  # one contiguous run from the start
        assert (row[n:] == tok.pad_id).all()
        if fin:
            assert stops and stops[0] == n - 1 and text.endswith("</answer>") and text.count("</answer>") == 1
        else:
            assert n == limit and not stops and not text.endswith("</answer>")
    rewards, stats = score_rollout(ro, lambda t, p: 0.0)
    assert stats["truncation_rate"] == pytest.approx(1 - n_fin / len(ro.texts))
    assert stats["length"] == pytest.approx(float(ro.mask.sum()) / len(ro.texts)) and stats["zero_adv_frac"] == 1.0


def test_greedy_evaluation_agrees_with_generate_texts():
    model, tok = tiny_model(stop_bias=2.0)
    ev = evaluate(model, tok, MIXED_LENGTHS, 16)
    metrics, ro = ev.metrics(), ev.rollout
    texts, finished = generate_texts(model, tok, [p.prompt for p in MIXED_LENGTHS], 16)
    assert ro.texts == texts and ro.finished.tolist() == finished
    assert metrics["truncation_rate"] == pytest.approx(1 - sum(finished) / len(finished))


def test_rollout_stats_hand_values_and_reward_weights():
    rewards = torch.tensor([[1.0, 1.0], [0.0, 1.5]])
    correct = torch.tensor([[1.0, 1.0], [0.0, 1.0]])
    formatted = torch.tensor([[1.0, 0.0], [1.0, 1.0]])
    stats = rollout_stats(rewards, correct, formatted, torch.tensor([10, 20, 30, 40]), torch.tensor([1, 1, 0, 1]).bool())
    assert stats == {"reward": 0.875, "accuracy": 0.75, "format_rate": 0.75, "length": 25.0,
                     "zero_adv_frac": 0.5, "truncation_rate": 0.25}
    p = AdditionProblem(2, 3)
    good, spam = "<think>x</think><answer>5</answer>", "<answer><think></think></answer>"
    assert make_reward()(good, p) == 1.5 and make_reward()(spam, p) == 0.0
    assert make_reward(0.0, 1.0)(good.replace("5<", "6<"), p) == 1.0  # format only
    from course_lib.rewards import partial_format_reward

    assert make_reward(0.0, 1.0, partial_format_reward)(spam, p) == 1.0  # the hackable one


def _step_with(model, tok, problems, cfg, reward_fn):
    optimizer = make_optimizer(model, cfg)
    return grpo_step(model, optimizer, None, tok, problems, cfg, reward_fn, step=0), optimizer


def test_one_step_raises_the_probability_of_the_rewarded_completion():
    model, tok = tiny_model()
    before = copy.deepcopy(model)
    seen = []

    def reward_first(text, problem):  # 1 for the first completion sampled (and its duplicates), 0 otherwise
        seen.append(text)
        return float(text == seen[0])

    cfg = GRPOConfig(steps=1, prompts_per_step=1, group_size=8, max_new_tokens=6, lr=1e-2, warmup_steps=0,
                     track_kl=False)
    (stats, ro), _ = _step_with(model, tok, [AdditionProblem(12, 9)], cfg, reward_first)
    rewarded = torch.tensor([t == seen[0] for t in ro.texts])
    assert 0 < rewarded.sum() < 8 and stats["updated"] == 1.0
    with torch.no_grad():
        old = (completion_logprobs(before, ro) * ro.mask).sum(1)  # log π(o_i) per completion, (B,)
        new = (completion_logprobs(model, ro) * ro.mask).sum(1)
    assert (new[rewarded] > old[rewarded]).all()
    assert (new[~rewarded] - old[~rewarded]).mean() < 0


def test_mu_sets_the_number_of_updates_per_rollout():
    problems = MIXED_LENGTHS
    for mu in (1, 3):
        model, tok = tiny_model()
        cfg = GRPOConfig(steps=1, prompts_per_step=4, group_size=4, max_new_tokens=8, mu=mu, lr=1e-2,
                         warmup_steps=0, track_kl=False)
        (stats, _), opt = _step_with(model, tok, problems, cfg, lambda t, p: float(len(t) % 2))
        steps = {int(s["step"]) for s in opt.state.values()}
        assert steps == {mu} and stats["updated"] == mu
        if mu > 1:  # later inner steps move away from π_θold: ratios leave 1, the clip can act
            assert stats["clip_frac"] >= 0.0 and stats["loss"] == stats["loss"]


def test_kl_every_skips_the_reference_forward_without_changing_training():
    problems, _ = addition_splits(32, 8, digits=2, seed=0)
    cfg = GRPOConfig(steps=4, prompts_per_step=4, group_size=4, max_new_tokens=12, lr=1e-2, warmup_steps=2)

    def reward(text, problem):
        return text.count("1") / 4 + make_reward()(text, problem)

    runs = {}
    for every in (1, 3):
        model, tok = tiny_model(stop_bias=1.0)
        runs[every] = model, train_grpo(model, tok, problems, replace(cfg, kl_every=every), reward_fn=reward,
                                        progress=False).history
    (every_step, h1), (sparse, h3) = runs[1], runs[3]
    assert [h["kl"] == h["kl"] for h in h3] == [True, False, False, True]  # measured at steps 0 and 3 only
    assert [h1[i]["kl"] for i in (0, 3)] == [h3[i]["kl"] for i in (0, 3)] and h3[3]["kl"] > 0
    for (name, a), b in zip(every_step.state_dict().items(), sparse.state_dict().values()):
        assert torch.equal(a, b), name  # with beta = 0 the reference is only watched, never trained against
    with pytest.raises(ValueError, match="kl_every"):
        GRPOConfig(beta=0.04, kl_every=5)
    with pytest.raises(ValueError, match="kl_every"):
        GRPOConfig(kl_every=0)


class Interrupt(Exception):
    pass


def test_interrupted_and_resumed_grpo_equals_an_uninterrupted_run(tmp_path):
    problems, _ = addition_splits(32, 8, digits=2, seed=0)
    cfg = GRPOConfig(steps=4, prompts_per_step=4, group_size=4, max_new_tokens=12, lr=1e-2, warmup_steps=2,
                     beta=0.04, checkpoint_every=2)
    def reward(text, problem):  # a random model never solves a problem: reward something it does vary on
        return text.count("1") / 4 + make_reward()(text, problem)

    def drop_time(history):
        return [{k: v for k, v in h.items() if k != "seconds"} for h in history]

    straight, tok = tiny_model(stop_bias=1.0)
    full = train_grpo(straight, tok, problems, cfg, reward_fn=reward, progress=False)

    path = str(tmp_path / "grpo.pt")
    first, _ = tiny_model(stop_bias=1.0)

    def stop_after_3(step, stats, rollout):
        if step == 2:
            raise Interrupt  # the checkpoint from step 2 survives

    with pytest.raises(Interrupt):
        train_grpo(first, tok, problems, cfg, reward_fn=reward, checkpoint_path=path, callback=stop_after_3,
                   progress=False)
    resumed, _ = tiny_model(seed=5, stop_bias=1.0)  # a fresh kernel: other weights, and another reference
    out = train_grpo(resumed, tok, problems, cfg, reward_fn=reward, checkpoint_path=path, progress=False)
    assert out.resumed_from == 2 and len(out.history) == 4
    for (name, a), b in zip(straight.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(a, b), name
    assert drop_time(out.history) == drop_time(full.history)
    assert full.history[0]["kl"] == 0.0 and full.history[-1]["kl"] > 0  # KL to the step-0 policy
    assert torch.load(path, weights_only=True)["step"] == 4


# ---------------------------------------------------------------- each switch, against its hand formula

REWARDS = torch.tensor([[1.0, 0.0, 0.0, 1.0], [0.5, 0.5, 0.5, 0.5], [1.0, 0.5, 0.0, 0.0]])  # group 1 ties
LENGTHS = torch.tensor([3, 5, 1, 4, 2, 2, 5, 3, 1, 4, 4, 2])  # ragged completions, (B,) = (12,)
L_MAX = 8


def _switch_grad(cfg, shift=0.0):
    """Gradient of batch_loss w.r.t. a leaf logp (B, L); ``shift`` sets log ρ = shift on every token."""
    g = torch.Generator().manual_seed(0)
    B, L = LENGTHS.numel(), int(LENGTHS.max())
    mask = torch.arange(L)[None, :] < LENGTHS[:, None]  # (B, L)
    logp = (-torch.rand(B, L, generator=g) - 0.1).requires_grad_()
    old = logp.detach() - shift if shift else None
    loss, stats = batch_loss(logp, mask, REWARDS, cfg, old_logp=old)
    loss.backward()
    return logp.grad, mask, loss.item()


def _adv(scale):
    return rearrange(group_advantages(REWARDS, scale=scale), "p g -> (p g)")[:, None]  # (B, 1)


def test_default_switches_give_grpo_weights():
    grad, mask, _ = _switch_grad(GRPOConfig(max_new_tokens=L_MAX))
    # −A_i / (|o_i| · B) on each real token: [Math] eq 3, std-scaled advantages
    expected = -_adv(True) / (LENGTHS[:, None] * 12) * mask
    torch.testing.assert_close(grad, expected)


def test_scale_rewards_switch_only_drops_the_std():
    grad, mask, _ = _switch_grad(GRPOConfig(max_new_tokens=L_MAX, scale_rewards=False))
    torch.testing.assert_close(grad, -_adv(False) / (LENGTHS[:, None] * 12) * mask)


def test_dr_grpo_variant_weights_every_token_by_a_constant():
    cfg = GRPOConfig(max_new_tokens=L_MAX).variant("dr_grpo")
    grad, mask, _ = _switch_grad(cfg)
    torch.testing.assert_close(grad, -_adv(False) / (12 * L_MAX) * mask)  # [DrGRPO] §3: 1/(G·L_max)


def test_token_level_switch_weights_every_token_alike():
    grad, mask, _ = _switch_grad(GRPOConfig(max_new_tokens=L_MAX, aggregation="token"))
    torch.testing.assert_close(grad, -_adv(True) / LENGTHS.sum() * mask)  # [DAPO] eq 12


def test_clip_higher_frees_only_positive_advantage_tokens_in_the_gap():
    shift = 0.22  # ρ = e^0.22 = 1.246: above 1 + 0.2, below 1 + 0.28
    ratio = math.exp(shift)
    base, mask, _ = _switch_grad(GRPOConfig(max_new_tokens=L_MAX), shift)
    high, _, _ = _switch_grad(GRPOConfig(max_new_tokens=L_MAX).variant("clip_higher"), shift)
    adv = _adv(True).expand_as(mask)
    w = 1 / (LENGTHS[:, None] * 12)
    # A < 0: never clipped on this side, gradient −ρ·A·w in both; A > 0: clipped (0) at ε_high = 0.2 only
    torch.testing.assert_close(base, torch.where(adv < 0, -ratio * adv * w, torch.zeros_like(adv)) * mask)
    torch.testing.assert_close(high, -ratio * adv * w * mask)
    assert torch.equal(base[adv <= 0], high[adv <= 0])


def test_zero_variance_filter_removes_tied_groups_from_every_normalizer():
    for aggregation in ("sequence", "token", "dr_grpo"):
        cfg = GRPOConfig(max_new_tokens=L_MAX, aggregation=aggregation)
        base, mask, base_loss = _switch_grad(cfg)
        filt, _, filt_loss = _switch_grad(cfg.variant("filter_zero_variance"))
        tied = torch.zeros(12, dtype=torch.bool)
        tied[4:8] = True
        assert (base[tied] == 0).all() and (filt[tied] == 0).all()  # tied groups had no signal either way
        # kept rows: same direction, larger by (what the normalizer counted) / (what is left)
        factor = {"sequence": 12 / 8, "dr_grpo": 12 / 8,
                  "token": float(LENGTHS.sum() / LENGTHS[~tied].sum())}[aggregation]
        torch.testing.assert_close(filt[~tied], base[~tied] * factor)
        assert filt_loss == pytest.approx(base_loss * factor, abs=1e-7)
    all_tied = torch.ones(2, 4)
    loss, stats = batch_loss(torch.zeros(8, 3, requires_grad=True), torch.ones(8, 3, dtype=torch.bool), all_tied,
                             GRPOConfig(filter_zero_variance=True))
    assert loss is None and stats == {}


def test_variants_change_only_their_own_fields():
    base = GRPOConfig()
    for name, changes in VARIANTS.items():
        diff = {k for k, v in asdict(base.variant(name)).items() if asdict(base)[k] != v}
        assert diff == set(changes), name
    assert base.variant("dr_grpo", "clip_higher").eps_high == 0.28
    with pytest.raises(ValueError, match="unknown variant"):
        base.variant("ppo")
    with pytest.raises(ValueError, match="G >= 2"):
        GRPOConfig(group_size=1)


def test_choose_problems_takes_one_prompt_length_per_step():
    import random as pyrandom

    from course_lib.grpo_trainer import choose_problems

    lengths = [5] * 10 + [6] * 30 + [7] * 3
    prompts = [[0] * n for n in lengths]  # encoded prompts: only their lengths matter here
    picks = [choose_problems(prompts, 4, pyrandom.Random(s)) for s in range(200)]
    assert all(len(set(p)) == 4 and len({lengths[i] for i in p}) == 1 for p in picks)
    assert {lengths[p[0]] for p in picks} == {5, 6}  # 7 has too few problems for a batch of 4
    assert 0.6 < sum(lengths[p[0]] == 6 for p in picks) / 200 < 0.9  # in proportion to the pool (30 vs 10)
    mixed = choose_problems(prompts, 4, pyrandom.Random(0), same_length=False)
    assert len(set(mixed)) == 4
    assert len(choose_problems([[0], [0, 0], [0] * 3, [0] * 4], 3, pyrandom.Random(0))) == 3  # no length has 3


def test_dynamic_sampling_trains_only_on_groups_with_a_reward_spread():
    problems, _ = addition_splits(64, 8, digits=2, seed=0)

    def reward(text, problem):  # varies within some groups, ties in others
        return float(problem.a % 2 == 0 and any(c.isdigit() for c in text))

    for rounds in (1, 4):
        model, tok = tiny_model(stop_bias=1.0)
        cfg = GRPOConfig(steps=1, prompts_per_step=4, group_size=4, max_new_tokens=8, lr=1e-2, warmup_steps=0,
                         track_kl=False, filter_zero_variance=True, sampling_rounds=rounds, same_length_prompts=False)
        (stats, ro), _ = _step_with(model, tok, problems, cfg, reward)
        rewards = torch.tensor([reward(t, ro.problem_of(r)) for r, t in enumerate(ro.texts)]).view(-1, 4)
        assert zero_variance_mask(rewards).all() and stats["groups_trained"] == len(ro.problems) <= 4
        assert stats["zero_adv_frac"] > 0 and 1 <= stats["sampling_rounds"] <= rounds
        if rounds == 4:  # refilled: more rounds sampled until the batch is full
            assert stats["sampling_rounds"] > 1 and len(ro.problems) == 4
    # the rollout helpers keep rows and group order
    ro2 = sample_groups(model, tok, MIXED_LENGTHS, 2, 6, generator=torch.Generator().manual_seed(0))
    sub = ro2.select_groups([2, 0])
    assert sub.problems == [MIXED_LENGTHS[2], MIXED_LENGTHS[0]] and sub.texts == ro2.texts[4:6] + ro2.texts[0:2]
    from course_lib.rollout import concat_rollouts

    both = concat_rollouts([sub, ro2.select_groups([1])], tok.pad_id)
    assert both.tokens.shape[0] == 6 and both.texts[4:] == ro2.texts[2:4]
    torch.testing.assert_close(completion_logprobs(model, both)[4:] * both.mask[4:],
                               (completion_logprobs(model, ro2) * ro2.mask)[2:4, :both.tokens.shape[1]])


@pytest.mark.slow
def test_seed_sweep_runs_the_recipe(monkeypatch):
    # the script's plumbing on a tiny stand-in for the profile's model (the real sweep takes minutes)
    real_pretrain, real_train = recipes.pretrain_on_task, recipes.train_grpo
    asked, configs = [], []

    def tiny_pretrain(config, profile, *, steps=None, **kw):
        asked.append(steps)
        small = config.replace(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64)
        return real_pretrain(small, profile, steps=steps or 20, **kw)

    def recording_train(model, tok, pool, cfg, **kw):
        configs.append(cfg)
        return real_train(model, tok, pool, cfg, **kw)

    monkeypatch.setattr(recipes, "pretrain_on_task", tiny_pretrain)
    monkeypatch.setattr(recipes, "train_grpo", recording_train)
    rows = recipes.seed_sweep([0, 1], grpo_steps=1, profile="cpu")
    assert asked == [None, None]  # the profile's pretraining unless told otherwise
    recipes.seed_sweep([0], grpo_steps=1, profile="cpu", pretrain_steps=25)
    assert asked[-1] == 25
    assert [r["seed"] for r in rows] == [0, 1] and {r["model"] for r in rows} == {"baseline"}
    assert all(0.0 <= r[k] <= 1.0 for r in rows for k in ("accuracy_before", "accuracy_after", "format_after"))
    configs.clear()
    recipes.seed_sweep([0], grpo_steps=1, profile="cpu", variant="dr_grpo")
    recipes.seed_sweep([0], grpo_steps=1, profile="cpu")
    assert (configs[0].scale_rewards, configs[0].aggregation) == (False, "dr_grpo")  # the switch reached the trainer
    assert (configs[1].scale_rewards, configs[1].aggregation) == (True, "sequence")
    assert [c.steps for c in configs] == [1, 1]
    assert not any(c.track_kl for c in configs)  # the sweep reports no KL, so it skips the reference forward
    with pytest.raises(ValueError, match="unknown variant"):
        recipes.seed_sweep([0], grpo_steps=1, profile="cpu", variant="ppo")
    with pytest.raises(ValueError, match="unknown model"):
        recipes.seed_sweep([0], models=("gpt",), profile="cpu")


def test_seed_sweep_command_prints_json_rows(monkeypatch, capsys):
    row = {"seed": 0, "model": "baseline", "accuracy_before": 0.4, "accuracy_after": 0.6, "format_before": 0.9,
           "format_after": 1.0, "grpo_seconds": 12.0}
    seen = []
    monkeypatch.setattr(recipes, "seed_sweep", lambda seeds, models, *a, **kw: seen.append(
        (list(seeds), models, kw["grpo_steps"])) or [{**row, "seed": s} for s in seeds])
    recipes.main(["--seeds", "2", "--json", "--profile", "cpu"])
    assert json.loads(capsys.readouterr().out) == [row, {**row, "seed": 1}]
    assert seen == [([0, 1], ("baseline",), recipes.SWEEP_GRPO_STEPS["cpu"])]
    recipes.main(["--seeds", "1", "--steps", "7", "--json"])
    assert seen[-1][2] == 7
