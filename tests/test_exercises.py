"""The exercises: every reference passes its own check, every known mistake is rejected with its name, and a
learner's function that raises, returns the wrong thing or runs too long gets one clear sentence.

Mutation tests: each implement-this exercise lists the realistic wrong implementations it recognises
(`Implement.mistakes`); checking one of them must fail with a message that names that mistake.
"""

import inspect
import time
from pathlib import Path

import pytest
import torch

from course_lib import exercises as ex_pkg
from course_lib.exercises import EXERCISES, SOLUTIONS_ENV, Result, by_notebook, exercise, readme_table

IMPLEMENT = [ex for ex in EXERCISES.values() if ex.kind == "implement"]
PREDICT = [ex for ex in EXERCISES.values() if ex.kind == "predict"]
EXPERIMENT = [ex for ex in EXERCISES.values() if ex.kind == "experiment"]
MUTANTS = [(ex, m) for ex in IMPLEMENT for m in ex.mistakes]
README = Path(__file__).resolve().parents[1] / "README.md"


def _id(value):
    return value.name if hasattr(value, "name") else None


# ----------------------------------------------------------------------------- the registry

def test_every_notebook_has_exercises_of_each_kind_and_at_least_thirty_in_all():
    assert len(EXERCISES) >= 30
    for nb in [f"{i:02d}" for i in range(10)]:
        assert len(by_notebook(nb)) >= 3, f"notebook {nb} has {len(by_notebook(nb))} exercises"
    kinds = {ex.kind for ex in EXERCISES.values()}
    assert kinds == {"implement", "predict", "experiment"}


@pytest.mark.parametrize("ex", list(EXERCISES.values()), ids=_id)
def test_each_exercise_says_what_to_do_in_one_line_and_offers_a_hint(ex, capsys):
    assert ex.notebook in [f"{i:02d}" for i in range(11)]
    assert ex.statement and "\n" not in ex.statement and ex.hint_text
    assert exercise(ex.name) is ex
    ex.task()
    ex.hint()
    ex.show_solution()
    out = capsys.readouterr().out
    assert ex.name in out and ex.hint_text in out


def test_an_unknown_name_lists_the_known_ones():
    with pytest.raises(KeyError, match="rope_interleaved"):
        exercise("rope_interleave")


def test_the_readme_lists_every_exercise():
    text = README.read_text()
    block = text.split("<!-- exercises:start -->\n", 1)[1].split("\n<!-- exercises:end -->", 1)[0]
    assert block.strip() == readme_table(), ("README's list of exercises is out of date: paste "
                                             "`python -c 'from course_lib.exercises import readme_table; print(readme_table())'`")


# ----------------------------------------------------------------------------- solutions can never rot

@pytest.mark.parametrize("ex", list(EXERCISES.values()), ids=_id)
def test_the_reference_solution_passes_quickly(ex):
    start = time.perf_counter()
    result = ex.check(ex.solution)
    seconds = time.perf_counter() - start
    assert isinstance(result, Result) and result.passed, result.message
    assert "PASS" in result.message and "\n" not in result.message
    assert seconds < 1.0, f"{ex.name}'s check took {seconds:.2f} s"


@pytest.mark.parametrize("ex", IMPLEMENT, ids=_id)
def test_the_solution_shown_is_the_reference_source(ex, capsys):
    ex.show_solution()
    assert inspect.getsource(ex.solution).strip().splitlines()[0].strip() in capsys.readouterr().out


# ----------------------------------------------------------------------------- mutation tests

@pytest.mark.parametrize("ex", IMPLEMENT, ids=_id)
def test_each_implement_exercise_knows_at_least_three_mistakes(ex):
    assert len(ex.mistakes) >= 3
    assert len({m.name for m in ex.mistakes}) == len(ex.mistakes)


@pytest.mark.parametrize("ex, mistake", MUTANTS, ids=lambda v: v.name.replace(" ", "_")[:40])
def test_a_known_mistake_is_rejected_and_named(ex, mistake):
    result = ex.check(mistake.wrong)
    assert not result.passed and result.attempted
    assert f"looks like {mistake.name}" in result.message, result.message
    assert mistake.hint in result.message and "Traceback" not in result.message


@pytest.mark.parametrize("ex", PREDICT, ids=_id)
def test_a_predict_exercise_names_the_mistakes_it_knows_and_rejects_a_wild_guess(ex):
    for mistake in ex.mistakes:
        wrong = mistake.wrong(ex.solution) if callable(mistake.wrong) else mistake.wrong
        result = ex.check(wrong)
        assert not result.passed and mistake.name in result.message, result.message
    right = ex.solution
    result = ex.check([1.0 - v for v in right] if isinstance(right, list) else right * 3 + 1)
    assert not result.passed and "hint" in result.message


@pytest.mark.parametrize("ex", EXPERIMENT, ids=_id)
def test_an_experiment_rejects_the_opposite_outcome_and_missing_numbers(ex):
    result = ex.check(ex.against)
    assert not result.passed and "Expected:" in result.message, result.message
    result = ex.check({})
    assert not result.passed and "lack" in result.message
    assert not ex.check([1, 2]).passed


# ----------------------------------------------------------------------------- a learner's function misbehaving

@pytest.mark.parametrize("ex", IMPLEMENT, ids=_id)
def test_a_raising_function_gets_one_sentence_not_a_traceback(ex):
    def broken(*args, **kwargs):
        return [][1]

    result = ex.check(broken)
    assert not result.passed and "raised IndexError" in result.message
    assert "Traceback" not in result.message and "\n" not in result.message


@pytest.mark.parametrize("ex", IMPLEMENT, ids=_id)
def test_a_wrong_type_or_shape_is_said_plainly(ex):
    result = ex.check(lambda *args, **kwargs: "a string")
    assert not result.passed and "should" in result.message, result.message


@pytest.mark.parametrize("name", ["rope_interleaved", "repeat_kv", "swiglu", "mla_absorbed_scores"])
def test_a_wrong_shape_names_both_shapes(name):
    result = exercise(name).check(lambda *args, **kwargs: torch.zeros(3, 2))
    assert not result.passed and "shape" in result.message and "got shape (3, 2)" in result.message, result.message


def test_too_slow_is_reported_with_the_reference_time_and_a_hint():
    def slow(x, topk_idx, topk_weight, experts):
        time.sleep(0.5)

    result = exercise("sort_scatter_dispatch").check(slow, time_limit=0.1)
    assert not result.passed and "too slow" in result.message and "the reference takes" in result.message
    assert "loop over tokens" in result.message


@pytest.mark.parametrize("ex", list(EXERCISES.values()), ids=_id)
def test_an_unattempted_exercise_is_not_an_error(ex):
    def stub(*args, **kwargs):
        raise NotImplementedError

    for answer in (None, ..., stub) if ex.kind == "implement" else (None, ...):
        result = ex.check(answer)
        assert not result.passed and not result.attempted and "not attempted yet" in result.message


def test_use_returns_the_learners_function_when_it_passes_and_the_reference_otherwise(capsys):
    ex = exercise("rope_interleaved")
    def mine(x, start_pos, theta=10000.0):
        return ex.solution(x, start_pos, theta)

    assert ex.use(mine) is mine
    assert ex.use(None) is ex.solution
    assert ex.use(ex.mistakes[0].wrong) is ex.solution
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 3 and "PASS" in lines[0] and "not attempted yet" in lines[1] and "looks like" in lines[2]
    assert exercise("kv_bytes_llama2_7b").use(None) == exercise("kv_bytes_llama2_7b").solution


def test_the_solutions_switch_fills_every_exercise(monkeypatch, capsys):
    monkeypatch.setenv(SOLUTIONS_ENV, "1")
    assert ex_pkg.solutions_on()
    for ex in EXERCISES.values():
        assert ex.use(None) is ex.solution or ex.use(None) == ex.solution
    assert "PASS" in capsys.readouterr().out


def test_a_value_instead_of_a_function_is_explained():
    result = exercise("rms_norm").check(torch.ones(3))
    assert not result.passed and "expected a function" in result.message


# ----------------------------------------------------------------------------- the references are course_lib's ideas

def test_the_references_agree_with_course_lib():
    from course_lib import balancing, grpo, memory, rewards
    from course_lib.config import ModelConfig
    from course_lib.exercises import balance, beyond, decoder, experts, heads, rl
    from course_lib.layers import RMSNorm, RotaryEmbedding, causal_mask
    from course_lib.moe import DeepSeekMoE, TopkRouter, dispatch_vectorized

    x = decoder.randn(0, 2, 3, 5, 16)
    assert torch.allclose(decoder.rope_interleaved(x, 7), RotaryEmbedding(16, 64)(x, 7), atol=1e-6)
    norm = RMSNorm(16)
    assert torch.allclose(decoder.rms_norm(x, norm.weight), norm(x), atol=1e-6)
    assert torch.equal(decoder.causal_mask_with_cache(3, 8), causal_mask(3, 8, torch.device("cpu")))
    for a, h, g, d, l, c, r in heads._SPECS:
        spec = memory.CacheSpec("x", a, l, h, g, d, kv_lora_rank=c, qk_rope_head_dim=r)
        assert heads.cache_elements(a, h, g, d, l, c, r) == memory.elements_per_token(spec)

    cfg = ModelConfig(hidden_size=16, ffn="moe", n_routed_experts=16, num_experts_per_tok=3, n_group=4, topk_group=2,
                      scoring_func="sigmoid", routed_scaling_factor=2.5)
    router = TopkRouter(cfg)
    router.e_score_correction_bias.copy_(decoder.randn(1, 16, scale=0.3))
    u = decoder.randn(2, 10, 16)
    idx, weight, _ = router(u)
    mine = balance.v3_gate(u @ router.weight.T, router.e_score_correction_bias, 3, 4, 2, 2.5)
    assert experts.compare_routing(mine, (idx, weight)) is None
    softmax_router = TopkRouter(cfg.replace(scoring_func="softmax", n_group=1, topk_group=1, norm_topk_prob=False,
                                            routed_scaling_factor=1.0))
    idx, weight, _ = softmax_router(u)
    assert experts.compare_routing(experts.topk_routing(u @ softmax_router.weight.T, 3), (idx, weight)) is None
    moe = DeepSeekMoE(cfg)
    idx, weight = moe.route(u[None])
    with torch.no_grad():
        assert torch.allclose(experts.sort_scatter_dispatch(u, idx, weight, moe.experts),
                              dispatch_vectorized(moe.experts, u, idx, weight), atol=1e-6)
    scores = decoder.randn(3, 2, 6, 8).sigmoid()
    assert torch.allclose(balance.sequence_balance_loss(scores, 2), balancing.sequence_balance_loss(scores, 2))
    assert torch.tensor(experts.max_violation(torch.tensor([5, 1, 0, 2]))) == balancing.max_violation(torch.tensor([5, 1, 0, 2]))

    for c in rl.COMPLETIONS + ["<think></think><answer>1</answer>", "<think>x</think><answer>1</answer >", "<think>"]:
        assert rl.strict_format_reward(c) == rewards.format_reward(c), c
        assert rl.extract_answer(c) == rewards.extract_answer(c), c
    r = torch.tensor([[1.0, 0, 0, 0], [1, 1, 1, 1], [0.2, 0.5, 0.9, 0.1]])
    assert torch.allclose(rl.group_advantages(r), grpo.group_advantages(r), atol=1e-6)
    logp, ref = decoder.randn(4, 3, 5) - 2, decoder.randn(5, 3, 5) - 2
    assert torch.allclose(rl.kl_k3(logp, ref), grpo.kl_k3(logp, ref), atol=1e-6)
    case = rl._surrogate_cases()[1]
    assert torch.allclose(rl.clipped_surrogate(*case.args), grpo.grpo_loss(*case.args, aggregation="sequence")[0], atol=1e-6)


def test_the_capstone_and_mtp_references_agree_with_the_models():
    from course_lib.exercises import beyond
    from course_lib.model import CourseModel
    from course_lib.mtp import MTPModel, mtp_losses
    from course_lib.presets import nano_deepseek_config
    from course_lib.profiles import get_profile

    cfg = nano_deepseek_config(get_profile("cpu"))
    model = CourseModel(cfg)
    for i, layer in enumerate(model.layers):
        inactive = getattr(layer.mlp, "inactive_parameters", lambda: 0)()
        assert beyond.active_ffn_parameters(cfg, i) == sum(p.numel() for p in layer.mlp.parameters()) - inactive

    torch.manual_seed(0)
    mtp = MTPModel(get_profile("cpu").baseline_config(num_hidden_layers=1, hidden_size=32, num_attention_heads=2,
                                                      intermediate_size=64), num_nextn_predict_layers=2)
    tokens = torch.randint(0, mtp.config.vocab_size, (2, 9))
    with torch.no_grad():
        main, depths = mtp.forward_all(tokens)
        ref_main, ref_losses = mtp_losses(mtp, tokens, torch.ones_like(tokens, dtype=torch.bool))
        expected = ref_main + 0.3 / 2 * sum(ref_losses)
        assert torch.allclose(beyond.mtp_loss(main, depths, tokens, 0.3), expected, atol=1e-5)
