import random

import pytest
import torch

from course_lib.tasks import TAGS, AdditionProblem, Tokenizer, addition_splits, encode_examples, sample_addition


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
