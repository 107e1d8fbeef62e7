"""Notebook 10's exercises: each reference passes, each known mistake is rejected with its name, the experiment
rejects the opposite outcome, and an unattempted answer is not an error."""

import pytest

from course_lib.exercises import EXERCISES
from course_lib.exercises.parallel import EXERCISES as PARALLEL, IB_BYTES, NODE_LIMIT, SPLIT_SIZES, rank_split_sizes


def test_notebook_10_exercises_are_registered_one_of_each_kind():
    assert all(EXERCISES[ex.name] is ex for ex in PARALLEL)
    assert sorted(ex.kind for ex in PARALLEL) == ["experiment", "implement", "predict"]
    assert all(ex.notebook == "10" for ex in PARALLEL)


@pytest.mark.parametrize("ex", PARALLEL, ids=lambda ex: ex.name)
def test_the_reference_passes_and_nothing_is_not_an_error(ex):
    assert ex.check(ex.solution).passed
    result = ex.check(None)
    assert not result.passed and "not attempted" in result.message


@pytest.mark.parametrize("mistake", SPLIT_SIZES.mistakes, ids=lambda m: m.name[:30])
def test_a_split_size_mistake_is_named(mistake):
    result = SPLIT_SIZES.check(mistake.wrong)
    assert not result.passed and f"looks like {mistake.name}" in result.message, result.message


@pytest.mark.parametrize("mistake", IB_BYTES.mistakes, ids=lambda m: m.name[:30])
def test_a_bytes_mistake_is_named(mistake):
    result = IB_BYTES.check(mistake.wrong(IB_BYTES.solution))
    assert not result.passed and mistake.name in result.message, result.message
    assert not IB_BYTES.check(50_000).passed


def test_the_split_sizes_match_the_library_dispatch_plan():
    import torch

    from course_lib.expert_parallel import dispatch_plan
    idx = torch.rand(40, 16, generator=torch.Generator().manual_seed(0)).argsort(-1)[:, :4]
    assert rank_split_sizes(idx, 4, 4).tolist() == dispatch_plan(idx, 4, 4).send_splits


def test_the_node_limit_experiment_rejects_the_opposite_outcome_and_missing_numbers():
    assert not NODE_LIMIT.check(NODE_LIMIT.against).passed
    assert not NODE_LIMIT.check({"unrestricted_bytes": 1.0}).passed
