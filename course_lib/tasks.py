"""The course's verifiable task and its tokenizer.

Multi-digit addition with the carries worked out in the think part, e.g. for 347+85:

    prompt      347+85=
    completion  <think>7+5+0=12;4+8+1=13;3+0+1=04</think><answer>432</answer>

Each think step adds one column from the right: digit + digit + carry-in = two-digit sum, whose
first digit is the next carry. The answer is checkable by a rule, which is what RL with verifiable
rewards needs ([R1] §2.2.2). The tokenizer is character level, with the four tags as single tokens.
Generators are seeded, and held-out problems never overlap the training ones.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

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
