import random

import pytest
import torch

from course_lib.tasks import (
    ADDITION_LEVELS, R1_ZERO_TEMPLATE, TAGS, TEMPLATE, AdditionLevel, AdditionProblem, Templated, Tokenizer,
    addition_eval_set, addition_splits, apply_template, carries, draw_problems, encode_examples, is_held_out,
    sample_addition,
)


def test_tags_are_single_tokens_and_roundtrip():
    tok = Tokenizer()
    text = "12+9=<think>2+9+0=11;1+0+1=02</think><answer>21</answer>"
    ids = tok.encode(text)
    for tag in TAGS:
        assert tok.encode(tag) == [tok.stoi[tag]]
    assert tok.decode(ids) == text
    assert len(ids) == len(text) - sum(len(t) - 1 for t in TAGS)
    assert tok.encode("7", bos=True)[0] == tok.bos_id and tok.decode(tok.encode("7", bos=True)) == "7"


def test_unknown_character_is_a_clear_error():
    with pytest.raises(ValueError, match=r"character '€' at position 1 is not in the course vocabulary"):
        Tokenizer().encode("1€")


@pytest.mark.parametrize("a, b, steps", [
    (347, 85, "7+5+0=12;4+8+1=13;3+0+1=04"),
    (999, 1, "9+1+0=10;9+0+1=10;9+0+1=10"),
    (0, 0, "0+0+0=00"),
])
def test_worked_steps_carry_correctly(a, b, steps):
    p = AdditionProblem(a, b)
    assert p.worked_steps() == steps
    assert p.completion.endswith(f"<answer>{a + b}</answer>")


def test_worked_steps_agree_with_the_sum_for_many_problems():
    rng = random.Random(1)
    for _ in range(500):
        p = sample_addition(rng, 4)
        steps = p.worked_steps().split(";")
        digits = [s.split("=")[1][1] for s in steps]  # the units digit of each column sum
        carry = steps[-1].split("=")[1][0]
        assert int((carry + "".join(reversed(digits))).lstrip("0") or "0") == p.target


def test_splits_are_seeded_distinct_and_disjoint():
    tr, ev = addition_splits(256, 200, digits=3, seed=0)
    assert (tr, ev) == addition_splits(256, 200, digits=3, seed=0)
    assert tr != addition_splits(256, 200, digits=3, seed=1)[0]
    assert len(set(tr)) == 256 and len(set(ev)) == 200 and not set(tr) & set(ev)
    assert max(max(p.a, p.b) for p in tr + ev) < 1000


def test_splits_refuse_impossible_requests():
    with pytest.raises(ValueError, match="Ask for fewer problems"):
        addition_splits(40, 20, digits=1)


def test_encode_examples_masks_only_the_completion():
    tok = Tokenizer()
    p = AdditionProblem(12, 9)
    tokens, mask = encode_examples([p, AdditionProblem(3, 4)], tok)
    prompt_len = len(tok.encode(p.prompt, bos=True))
    row = tokens[0]
    # mask[t] marks that token t+1 is learned: the first learned token is the completion's first (<think>)
    learned = row[1:][mask[0, :-1]]
    assert tok.decode(learned) == p.completion
    assert not mask[0, :prompt_len - 1].any()
    q = AdditionProblem(3, 4)
    full_len = len(tok.encode(q.prompt, bos=True)) + len(tok.encode(q.completion))
    assert (tokens[1][full_len:] == tok.pad_id).all() and (tokens[1][:full_len] != tok.pad_id).all()
    assert tokens.dtype == torch.long


# ---------------------------------------------------------------- template, levels, held-out sets


def test_templates_tokenize_and_the_short_one_is_short():
    tok = Tokenizer()
    q = AdditionProblem(347, 85)
    short = Templated(q).prompt
    assert short == "User: 347+85= Use <think></think><answer></answer>. Assistant:"
    assert apply_template(q.prompt, R1_ZERO_TEMPLATE).endswith("User: 347+85=. Assistant:")
    long_ids, short_ids = tok.encode(apply_template(q.prompt, R1_ZERO_TEMPLATE)), tok.encode(short)
    assert tok.decode(long_ids) == apply_template(q.prompt, R1_ZERO_TEMPLATE)  # every character is in the vocabulary
    assert len(short_ids) <= 40 < 300 < len(long_ids)
    assert sum(i in (tok.stoi[t] for t in TAGS) for i in short_ids) == 4  # the tags are single tokens
    with pytest.raises(ValueError, match="placeholder"):
        apply_template("1+1=", "no slot here")


def test_templated_problem_keeps_completion_target_and_verifier():
    p = AdditionProblem(12, 9)
    t = Templated(p)
    assert (t.completion, t.target) == (p.completion, p.target) and TEMPLATE.count("{question}") == 1
    assert t.verify(p.completion) and not t.verify(p.completion.replace("21", "22"))


@pytest.mark.parametrize("a, b, n", [(0, 0, 0), (347, 85, 2), (999, 1, 3), (999, 101, 3), (123, 456, 0), (5, 5, 1)])
def test_carries_hand_values(a, b, n):
    assert carries(a, b) == n
    # each column whose two-digit sum starts with 1 carries out
    assert sum(step.split("=")[1][0] == "1" for step in AdditionProblem(a, b).worked_steps().split(";")) == n


def test_levels_sample_what_they_promise():
    rng = random.Random(0)
    for level in ADDITION_LEVELS.values():
        for _ in range(200):
            p = level.sample(rng)
            assert level.accepts(p) and len(str(p.a)) == len(str(p.b)) == level.digits
            hi = level.digits if level.max_carries is None else level.max_carries
            assert level.min_carries <= carries(p.a, p.b) <= hi
    with pytest.raises(ValueError):
        AdditionLevel(2, min_carries=3)


def test_held_out_split_is_fixed_and_disjoint():
    s1, s2 = addition_eval_set(4), addition_eval_set(4)
    assert s1 == s2 and len(set(s1)) == 100 and all(is_held_out(p) and ADDITION_LEVELS[4].accepts(p) for p in s1)
    train = draw_problems(ADDITION_LEVELS[4].sample, 2000, seed=123)
    assert not set(train) & set(s1) and not any(is_held_out(p) for p in train)
    assert 0.08 < sum(is_held_out(AdditionProblem(a, b)) for a in range(100) for b in range(100)) / 1e4 < 0.17
    # excluded problems never come back, and an exhausted space fails fast with a clear message
    more = draw_problems(ADDITION_LEVELS[4].sample, 100, seed=123, exclude=train[:50])
    assert not set(more) & set(train[:50])
    with pytest.raises(ValueError, match="Ask for fewer"):
        draw_problems(lambda rng: AdditionProblem(rng.randint(0, 3), 0), 10, seed=0)
