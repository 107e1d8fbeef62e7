"""The course's verifiable task and its tokenizer.

Multi-digit addition with the carries worked out in the think part, e.g. for 347+85:

    prompt      347+85=
    completion  <think>7+5+0=12;4+8+1=13;3+0+1=04</think><answer>432</answer>

Each think step adds one column from the right: digit + digit + carry-in = two-digit sum, whose
first digit is the next carry. The answer is checkable by a rule, which is what RL with verifiable
rewards needs ([R1] §2.2.2). The tokenizer is character level, with the four tags as single tokens.
Generators are seeded, and held-out problems never overlap the training ones.

For the reasoning-RL notebooks (06-07): the R1-Zero prompt template and a short course version,
difficulty levels for addition, a countdown task ("reach the target") whose verifier parses the
answer with a small safe parser, and fixed held-out evaluation sets chosen by a hash of the prompt.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field

import torch

PAD, BOS = "<pad>", "<bos>"
THINK_OPEN, THINK_CLOSE, ANSWER_OPEN, ANSWER_CLOSE = "<think>", "</think>", "<answer>", "</answer>"
TAGS = (THINK_OPEN, THINK_CLOSE, ANSWER_OPEN, ANSWER_CLOSE)
# Digits, arithmetic, punctuation and letters: enough for this task, the countdown task and a short
# text template. Fixed, so a trained checkpoint's vocabulary never depends on the data.
CHARS = "0123456789+-*/=()<>;:,.?! " + "abcdefghijklmnopqrstuvwxyz" + "ABCDEFGHIJKLMNOPQRSTUVWXYZ" + "\n"


class Tokenizer:
    """Character-level tokenizer; the four tags are single tokens, tried before single characters."""

    def __init__(self) -> None:
        self.itos = [PAD, BOS, *TAGS, *CHARS]
        self.stoi = {s: i for i, s in enumerate(self.itos)}
        self.pad_id, self.bos_id = self.stoi[PAD], self.stoi[BOS]
        self.stop_id = self.stoi[ANSWER_CLOSE]  # generation ends after the answer closes

    @property
    def vocab_size(self) -> int:
        return len(self.itos)

    def encode(self, text: str, bos: bool = False) -> list[int]:
        ids = [self.bos_id] if bos else []
        i = 0
        while i < len(text):
            for tag in TAGS:
                if text.startswith(tag, i):
                    ids.append(self.stoi[tag])
                    i += len(tag)
                    break
            else:
                ch = text[i]
                if ch not in self.stoi:
                    raise ValueError(f"character {ch!r} at position {i} is not in the course vocabulary. "
                                     f"Use only these characters: {CHARS!r} and the tags {TAGS}.")
                ids.append(self.stoi[ch])
                i += 1
        return ids

    def decode(self, ids) -> str:
        """Tokens to text; padding and BOS are dropped."""
        skip = (self.pad_id, self.bos_id)
        return "".join(self.itos[int(i)] for i in ids if int(i) not in skip)


@dataclass(frozen=True)
class AdditionProblem:
    a: int
    b: int

    @property
    def target(self) -> int:
        return self.a + self.b

    @property
    def prompt(self) -> str:
        return f"{self.a}+{self.b}="

    def worked_steps(self) -> str:
        """The column additions from the right, with carries: '7+5+0=12;4+8+1=13;3+0+1=04'."""
        da, db = str(self.a)[::-1], str(self.b)[::-1]
        steps, carry = [], 0
        for i in range(max(len(da), len(db))):
            x = int(da[i]) if i < len(da) else 0
            y = int(db[i]) if i < len(db) else 0
            s = x + y + carry
            steps.append(f"{x}+{y}+{carry}={s:02d}")
            carry = s // 10
        return ";".join(steps)

    @property
    def completion(self) -> str:
        return f"{THINK_OPEN}{self.worked_steps()}{THINK_CLOSE}{ANSWER_OPEN}{self.target}{ANSWER_CLOSE}"


def sample_addition(rng: random.Random, digits: int) -> AdditionProblem:
    """Operands with 1..digits digits each (the number of digits is drawn first, so short ones appear)."""
    if digits < 1:
        raise ValueError(f"digits={digits} must be at least 1.")

    def operand() -> int:
        n = rng.randint(1, digits)
        return rng.randint(0 if n == 1 else 10 ** (n - 1), 10 ** n - 1)

    return AdditionProblem(operand(), operand())


def addition_splits(n_train: int, n_eval: int, digits: int, seed: int = 0) -> tuple[list[AdditionProblem], list[AdditionProblem]]:
    """Disjoint train and held-out sets of distinct problems, reproducible from the seed."""
    space = (10 ** digits) ** 2
    if n_train + n_eval > space // 2:
        raise ValueError(f"{n_train + n_eval} problems asked from only {space} with digits={digits}. "
                         f"Ask for fewer problems or more digits.")
    rng = random.Random(seed)
    seen: set[AdditionProblem] = set()
    problems: list[AdditionProblem] = []
    while len(problems) < n_train + n_eval:
        p = sample_addition(rng, digits)
        if p not in seen:
            seen.add(p)
            problems.append(p)
    return problems[:n_train], problems[n_train:]


def encode_examples(problems, tok: Tokenizer, max_len: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Teacher-forcing batch: tokens (N, L) = <bos> prompt completion, right-padded, and a loss mask
    (N, L) that is True where the *next* token is part of the completion (the prompt is given, not learned)."""
    rows, masks = [], []
    for p in problems:
        prompt = tok.encode(p.prompt, bos=True)
        full = prompt + tok.encode(p.completion)
        rows.append(full)
        masks.append([False] * (len(prompt) - 1) + [True] * (len(full) - len(prompt)) + [False])
    L = max_len or max(len(r) for r in rows)
    if any(len(r) > L for r in rows):
        raise ValueError(f"an example has {max(len(r) for r in rows)} tokens, more than max_len={L}.")
    tokens = torch.full((len(rows), L), tok.pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), L), dtype=torch.bool)
    for i, (r, m) in enumerate(zip(rows, masks)):
        tokens[i, :len(r)] = torch.tensor(r)
        mask[i, :len(m)] = torch.tensor(m)
    return tokens, mask


# ----------------------------------------------------------------------------- R1-Zero prompt template

# [R1] Table 1, verbatim but for the placeholder: "prompt will be replaced with the specific reasoning
# question during training". About 400 characters, i.e. about 360 tokens for this tokenizer.
R1_ZERO_TEMPLATE = (
    "A conversation between User and Assistant. The user asks a question, and the Assistant solves it. "
    "The assistant first thinks about the reasoning process in the mind and then provides the user with "
    "the answer. The reasoning process and answer are enclosed within <think> </think> and <answer> </answer> "
    "tags, respectively, i.e., <think> reasoning process here </think> <answer> answer here </answer>. "
    "User: {question}. Assistant:"
)
# The course's short version: the same roles and the same two tags, in ~30 tokens. Every token of a
# template is paid again in every prefill and every training forward, and a model trained from
# scratch learns the format from its data, not from reading instructions.
TEMPLATE = "User: {question} Use <think></think><answer></answer>. Assistant:"


def apply_template(question: str, template: str = TEMPLATE) -> str:
    """The prompt the model sees: ``template`` with ``{question}`` filled in."""
    if "{question}" not in template:
        raise ValueError("the template has no {question} placeholder, so the question would be lost. "
                         "Put {question} where the problem goes.")
    return template.replace("{question}", question)


@dataclass(frozen=True)
class Templated:
    """A problem whose prompt goes through a template; completion, target and verifier are the problem's.

    ``Templated(AdditionProblem(347, 85)).prompt`` is
    ``'User: 347+85= Use <think></think><answer></answer>. Assistant:'``.
    """
    problem: object
    template: str = TEMPLATE

    @property
    def prompt(self) -> str:
        return apply_template(self.problem.prompt, self.template)

    @property
    def completion(self) -> str:
        return self.problem.completion

    @property
    def target(self):
        return self.problem.target

    def verify(self, completion: str) -> bool:
        return score_answer(self.problem, completion) == 1.0


# ----------------------------------------------------------------------------- difficulty levels

def carries(a: int, b: int) -> int:
    """How many columns of a + b produce a carry (the hard steps of the worked solution)."""
    n, carry = 0, 0
    while a or b:
        carry = (a % 10 + b % 10 + carry) // 10
        n += carry
        a, b = a // 10, b // 10
    return n


@dataclass(frozen=True)
class AdditionLevel:
    """Both operands have exactly ``digits`` digits (level 1 allows 0-9) and the sum has between
    ``min_carries`` and ``max_carries`` carries: more digits means longer reasoning, more carries
    means more steps that a model copying digits gets wrong."""
    digits: int
    min_carries: int = 0
    max_carries: int | None = None

    def __post_init__(self) -> None:
        hi = self.digits if self.max_carries is None else self.max_carries
        if self.digits < 1 or not 0 <= self.min_carries <= hi <= self.digits:
            raise ValueError(f"{self} is impossible: need digits >= 1 and 0 <= min_carries <= max_carries <= digits.")

    def accepts(self, p: AdditionProblem) -> bool:
        lo = 0 if self.digits == 1 else 10 ** (self.digits - 1)
        hi = self.digits if self.max_carries is None else self.max_carries
        return all(lo <= x < 10 ** self.digits for x in (p.a, p.b)) and self.min_carries <= carries(p.a, p.b) <= hi

    def sample(self, rng: random.Random) -> AdditionProblem:
        lo = 0 if self.digits == 1 else 10 ** (self.digits - 1)
        while True:  # rejection: every level keeps at least ~1/10 of the draws
            p = AdditionProblem(rng.randint(lo, 10 ** self.digits - 1), rng.randint(lo, 10 ** self.digits - 1))
            if self.accepts(p):
                return p


ADDITION_LEVELS = {
    1: AdditionLevel(2, max_carries=0),                 # 23+45: two columns, no carry to track
    2: AdditionLevel(2, min_carries=1),                 # 58+67: carries appear
    3: AdditionLevel(3, max_carries=0),                 # 321+456: three columns, still no carry
    4: AdditionLevel(3, min_carries=1, max_carries=1),  # one carry to pass along
    5: AdditionLevel(3, min_carries=2),                 # carry chains (e.g. 999+101)
    6: AdditionLevel(4),                                # beyond the 3-digit training data of the profiles
}


# ----------------------------------------------------------------------------- countdown

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
    from fractions import Fraction

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

        prompt      make 46 from 3,7,25:
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
        from .rewards import extract_answer

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


# ----------------------------------------------------------------------------- answers and held-out sets

def score_answer(problem, completion: str) -> float:
    """1.0 if the completion's answer solves ``problem``, else 0.0: the task's own verifier where it
    has one (countdown), else the accuracy reward on ``problem.target`` (addition). Never evaluates code."""
    verify = getattr(problem, "verify", None)
    if verify is not None:
        return 1.0 if verify(completion) else 0.0
    from .rewards import accuracy_reward

    return accuracy_reward(completion, problem.target)


HELD_OUT_EVERY = 8  # one problem in 8 is reserved for evaluation, whatever the seed


def is_held_out(problem) -> bool:
    """Whether a problem belongs to the fixed evaluation side. Decided by a hash of its prompt, not by
    a seed, so training draws with any seed never meet an evaluation problem."""
    import zlib

    return zlib.crc32(problem.prompt.encode()) % HELD_OUT_EVERY == 0


def draw_problems(sample, n: int, *, seed: int, split: str = "train", exclude=(),
                  max_tries: int | None = None) -> list:
    """``n`` distinct problems from ``sample(rng)`` on one side of the held-out split, none in ``exclude``.

    ``split="train"`` keeps problems that are not held out, ``"eval"`` those that are, ``"any"`` both.
    """
    if split not in ("train", "eval", "any"):
        raise ValueError(f"split={split!r}: use 'train', 'eval' or 'any'.")
    rng, excluded = random.Random(seed), set(exclude)
    seen, out = set(), []
    max_tries = max_tries or 100 * n + 10_000  # a level that has run out of problems fails fast
    for _ in range(max_tries):
        if len(out) == n:
            return out
        p = sample(rng)
        if p in seen or p in excluded or (split != "any" and is_held_out(p) != (split == "eval")):
            continue
        seen.add(p)
        out.append(p)
    raise ValueError(f"found only {len(out)} of {n} distinct {split} problems in {max_tries} draws. "
                     "Ask for fewer, or use a harder level (more distinct problems).")


EVAL_SEED = 20250122  # fixed forever: the evaluation sets never change between runs or machines


def addition_eval_set(level: int, n: int = 100) -> list[AdditionProblem]:
    """The fixed held-out addition problems of a difficulty level (``ADDITION_LEVELS``)."""
    return draw_problems(ADDITION_LEVELS[level].sample, n, seed=EVAL_SEED, split="eval")


def countdown_eval_set(level: int, n: int = 100) -> list[CountdownProblem]:
    """The fixed held-out countdown problems of a difficulty level (``COUNTDOWN_LEVELS``)."""
    return draw_problems(lambda rng: sample_countdown(rng, **COUNTDOWN_LEVELS[level]), n, seed=EVAL_SEED, split="eval")
