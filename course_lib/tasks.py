"""The course's verifiable task and its tokenizer.

Multi-digit addition with the carries worked out in the think part, e.g. for 347+85:

    prompt      347+85=
    completion  <think>7+5+0=12;4+8+1=13;3+0+1=04</think><answer>432</answer>

Each think step adds one column from the right: digit + digit + carry-in = two-digit sum, whose
first digit is the next carry. The answer is checkable by a rule, which is what RL with verifiable
rewards needs ([R1] §2.2.2). The tokenizer is character level, with the four tags as single tokens.
Generators are seeded, and held-out problems never overlap the training ones.

For the reasoning-RL notebooks (06-07): the R1-Zero prompt template and a short course version,
difficulty levels for addition, and fixed held-out evaluation sets chosen by a hash of the prompt.
The countdown task ("reach the target") lives in ``course_lib.countdown``.
"""

from __future__ import annotations

import random
import zlib
from dataclasses import dataclass

import torch

from .rewards import accuracy_reward

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


# ----------------------------------------------------------------------------- answers and held-out sets

def score_answer(problem, completion: str) -> float:
    """1.0 if the completion's answer solves ``problem``, else 0.0: the task's own verifier where it
    has one (countdown), else the accuracy reward on ``problem.target`` (addition). Never evaluates code."""
    verify = getattr(problem, "verify", None)
    if verify is not None:
        return 1.0 if verify(completion) else 0.0
    return accuracy_reward(completion, problem.target)


HELD_OUT_EVERY = 8  # one problem in 8 is reserved for evaluation, whatever the seed


def is_held_out(problem) -> bool:
    """Whether a problem belongs to the fixed evaluation side. Decided by a hash of its prompt, not by
    a seed, so training draws with any seed never meet an evaluation problem."""
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
