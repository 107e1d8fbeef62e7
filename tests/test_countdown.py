import random
from fractions import Fraction

import pytest

from course_lib.countdown import COUNTDOWN_LEVELS, CountdownProblem, countdown_eval_set, parse_expression, sample_countdown
from course_lib.tasks import Templated, is_held_out, score_answer


def test_countdown_generator_is_solvable_and_worked():
    rng = random.Random(0)
    for level in COUNTDOWN_LEVELS.values():
        for _ in range(200):
            p = sample_countdown(rng, **level)
            assert len(p.numbers) == level["n_numbers"] and list(p.numbers) == sorted(p.numbers)
            assert p.check_expression(p.solution) and p.verify(p.completion)
            # the think part replays the solution: its last step ends in the target
            steps = p.completion.split("<think>")[1].split("</think>")[0].split(";")
            assert len(steps) == len(p.numbers) - 1 and steps[-1].endswith(f"={p.target}")
    assert CountdownProblem((3, 7, 25), 54, "(25-7)*3").prompt == "make 54 from 3,7,25:"


@pytest.mark.parametrize("text, value, numbers", [
    ("(25-7)*3", Fraction(54), [25, 7, 3]),
    ("25 - 7 * 3", Fraction(4), [25, 7, 3]),          # precedence: * before -
    ("2*3+4*5", Fraction(26), [2, 3, 4, 5]),
    ("8-4-2", Fraction(2), [8, 4, 2]),                # left associative
    ("12/8*2", Fraction(3), [12, 8, 2]),              # exact fractions, no float rounding
    ("((((7))))", Fraction(7), [7]),
    ("007+1", Fraction(8), [7, 1]),
])
def test_parse_expression_values(text, value, numbers):
    assert parse_expression(text) == (value, numbers)


@pytest.mark.parametrize("text", [
    "__import__('os').system('ls')", "2**10", "-3+5", "3+", "(3+4", "3+4)", "3 4", "", "()",
    "5/0", "5/(3-3)", "1e3", "3.5*2", "٣+4", "４+4", "3+x", "12345+1", "1" * 65, "(" * 9 + "1" + ")" * 9,
    "abs(3)", "3;4", "[3]",
])
def test_parse_expression_rejects_everything_else(text):
    assert parse_expression(text) is None


def test_countdown_verifier_checks_numbers_and_value():
    p = CountdownProblem((3, 7, 25), 54, "(25-7)*3")
    ok = "<think>x</think><answer>3*(25-7)</answer>"
    assert p.verify(ok) and score_answer(p, ok) == 1.0
    for answer in ["54", "(25-7)*3+0", "(25-7)*3*1", "25*3-7-14", "(25-7)*3 - 3 + 3", "(25-7) * 3 ",
                   "__import__('os')", "(25-7)*3</answer><answer>1"]:
        expected = answer.strip() == "(25-7) * 3"
        assert p.verify(f"<think></think><answer>{answer}</answer>") == expected, answer
    assert not p.verify("(25-7)*3")  # no answer block


def test_templated_countdown_problem_keeps_its_verifier():
    c = CountdownProblem((3, 7, 25), 54, "(25-7)*3")
    assert Templated(c).verify(c.completion) and score_answer(Templated(c), c.completion) == 1.0


def test_countdown_eval_set_is_fixed_and_held_out():
    cd = countdown_eval_set(2, n=50)
    assert cd == countdown_eval_set(2, n=50) and all(is_held_out(p) for p in cd)
