"""The countdown task ("reach the target"), verified by a safe parser.

The "countdown" task of TinyZero-style R1-Zero reproductions: reach a target from a few numbers with
+ - * / and parentheses, each number used exactly once. For the numbers 3, 7, 25 and the target 54:

    prompt      make 54 from 3,7,25:
    completion  <think>25-7=18;18*3=54</think><answer>(25-7)*3</answer>

Many answers are right, so the verifier checks the expression instead of comparing with one stored
answer: a small recursive-descent parser (never ``eval``) with exact fractions and bounded work.
The generator is seeded and always builds a solvable instance; difficulty levels set how many numbers
and how large, and the fixed held-out set reuses the held-out machinery of ``course_lib.tasks``.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from fractions import Fraction

from .rewards import extract_answer
from .tasks import ANSWER_CLOSE, ANSWER_OPEN, EVAL_SEED, THINK_CLOSE, THINK_OPEN, draw_problems

OPS = "+-*/"
MAX_EXPRESSION_CHARS = 64  # an honest answer for 3-4 small numbers needs ~15 characters
MAX_NUMBER_DIGITS = 4
MAX_NESTING = 8
_APPLY = {"+": lambda x, y: x + y, "-": lambda x, y: x - y, "*": lambda x, y: x * y, "/": lambda x, y: x / y}


def parse_expression(text: str):
    """Parse an arithmetic expression safely: returns ``(value, numbers)`` or None.

    Grammar (recursive descent; no ``eval``, no names, no calls, no unary minus, no exponent)::

        expr   := term (("+" | "-") term)*
        term   := factor (("*" | "/") factor)*
        factor := NUMBER | "(" expr ")"

    ``value`` is an exact ``fractions.Fraction`` and ``numbers`` the integer literals in order, so a
    verifier can check which numbers were used. ASCII spaces are allowed between tokens. Limits keep
    the work bounded whatever a model writes: ``MAX_EXPRESSION_CHARS`` characters, numbers of at most
    ``MAX_NUMBER_DIGITS`` digits, ``MAX_NESTING`` levels of parentheses; division by zero gives None.
    """
    if not isinstance(text, str) or len(text) > MAX_EXPRESSION_CHARS:
        return None
    tokens, i = [], 0
    while i < len(text):
        ch = text[i]
        if ch == " ":
            i += 1
        elif ch in OPS or ch in "()":
            tokens.append(ch)
            i += 1
        elif "0" <= ch <= "9":  # ASCII digits only: str.isdigit() would take '٣'
            j = i
            while j < len(text) and "0" <= text[j] <= "9":
                j += 1
            if j - i > MAX_NUMBER_DIGITS:
                return None
            tokens.append(int(text[i:j]))
            i = j
        else:
            return None
    numbers: list[int] = []
    pos = 0

    def peek():
        return tokens[pos] if pos < len(tokens) else None

    def factor(depth: int):
        nonlocal pos
        tok = peek()
        if isinstance(tok, int):
            pos += 1
            numbers.append(tok)
            return Fraction(tok)
        if tok == "(" and depth < MAX_NESTING:
            pos += 1
            value = expr(depth + 1)
            if value is None or peek() != ")":
                return None
            pos += 1
            return value
        return None

    def chain(depth: int, ops: str, operand):
        """operand (op operand)*, left to right: ``expr`` with ops "+-", ``term`` with ops "*/"."""
        nonlocal pos
        value = operand(depth)
        while value is not None and peek() in tuple(ops):
            op = tokens[pos]
            pos += 1
            rhs = operand(depth)
            if rhs is None or (op == "/" and rhs == 0):
                return None
            value = _APPLY[op](value, rhs)
        return value

    def term(depth: int):
        return chain(depth, "*/", factor)

    def expr(depth: int):
        return chain(depth, "+-", term)

    value = expr(0)
    if value is None or pos != len(tokens):
        return None
    return value, numbers


@dataclass(frozen=True)
class CountdownProblem:
    """Reach ``target`` from ``numbers`` with + - * / and parentheses, each number used exactly once.

    The "countdown" task of TinyZero-style R1-Zero reproductions: many answers are right, so the
    verifier checks the expression instead of comparing with one stored answer. ``solution`` is one
    expression that works (the generator's), used for the worked completion.

        prompt      make 54 from 3,7,25:
        completion  <think>25-7=18;18*3=54</think><answer>(25-7)*3</answer>   (for target 54)
    """
    numbers: tuple[int, ...]
    target: int
    solution: str = field(compare=False)  # one of possibly many: two instances differing only here are equal

    @property
    def prompt(self) -> str:
        return f"make {self.target} from {','.join(map(str, self.numbers))}:"

    @property
    def completion(self) -> str:
        return f"{THINK_OPEN}{_solution_steps(self.solution)}{THINK_CLOSE}{ANSWER_OPEN}{self.solution}{ANSWER_CLOSE}"

    def check_expression(self, text: str) -> bool:
        """True iff ``text`` parses, uses exactly the given numbers (as a multiset) and equals the target."""
        parsed = parse_expression(text)
        if parsed is None:
            return False
        value, used = parsed
        return sorted(used) == sorted(self.numbers) and value == self.target

    def verify(self, completion: str) -> bool:
        """The accuracy check on a whole completion: its one answer block must solve the problem."""
        answer = extract_answer(completion)
        return answer is not None and self.check_expression(answer)


def _solution_steps(solution: str) -> str:
    """The generator's fully parenthesized solution as evaluation steps: '(25-7)*3' -> '25-7=18;18*3=54'."""
    steps: list[str] = []
    stack: list[list] = [[]]
    for tok in _tokens(solution):
        if tok == "(":
            stack.append([])
        elif tok == ")":
            inner = stack.pop()
            stack[-1].append(_reduce(inner, steps))
        else:
            stack[-1].append(tok)
    _reduce(stack[0], steps)
    return ";".join(steps)


def _tokens(text: str) -> list:
    out, i = [], 0
    while i < len(text):
        if text[i].isdigit():
            j = i
            while j < len(text) and text[j].isdigit():
                j += 1
            out.append(int(text[i:j]))
            i = j
        else:
            out.append(text[i])
            i += 1
    return out


def _reduce(items: list, steps: list[str]) -> int:
    """Evaluate one parenthesis-free binary item list [x, op, y] written by the generator; log the step."""
    if len(items) == 1:
        return items[0]
    x, op, y = items
    value = {"+": x + y, "-": x - y, "*": x * y, "/": x // y}[op]
    steps.append(f"{x}{op}{y}={value}")
    return value


def sample_countdown(rng: random.Random, n_numbers: int = 3, max_number: int = 25,
                     max_target: int = 999) -> CountdownProblem:
    """A solvable instance: combine shuffled numbers left to right with random operations, keeping
    every intermediate a positive integer (exact divisions only), so the target is reachable."""
    if not 2 <= n_numbers <= 6:
        raise ValueError(f"n_numbers={n_numbers}: use 2 to 6 numbers.")
    while True:
        numbers = [rng.randint(1, max_number) for _ in range(n_numbers)]
        value, text = numbers[0], str(numbers[0])
        for k, y in enumerate(numbers[1:]):
            op = rng.choice(OPS)
            if op == "/" and (value % y or y == 1):
                op = rng.choice("+*")
            if op == "-" and value <= y:
                op = "+"
            value = {"+": value + y, "-": value - y, "*": value * y, "/": value // y}[op]
            left = f"({text})" if k > 0 else text
            text = f"{left}{op}{y}"
        if 1 <= value <= max_target:
            shown = tuple(sorted(numbers))  # the prompt does not give away the order of the solution
            return CountdownProblem(shown, value, text)


COUNTDOWN_LEVELS = {1: dict(n_numbers=3, max_number=10), 2: dict(n_numbers=3, max_number=25),
                    3: dict(n_numbers=4, max_number=25)}


def countdown_eval_set(level: int, n: int = 100) -> list[CountdownProblem]:
    """The fixed held-out countdown problems of a difficulty level (``COUNTDOWN_LEVELS``)."""
    return draw_problems(lambda rng: sample_countdown(rng, **COUNTDOWN_LEVELS[level]), n, seed=EVAL_SEED, split="eval")
