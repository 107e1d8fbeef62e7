"""GRPO's rollouts: sample a group of completions per prompt on the KV cache, score them, evaluate.

The R1-Zero loop ([R1] arXiv:2501.12948 §2.2; [Math] arXiv:2402.03300 §4.1) samples, for each prompt q,
a group {o_1..o_G} from the current policy, scores each o_i with rule-based rewards and turns the rewards
into group-relative advantages (`course_lib.grpo`). This module holds the sampling and scoring half;
`course_lib.grpo_trainer` the update. `evaluate` is the course's held-out evaluator: a rollout of one
greedy completion per problem.

Letters: P prompts, G completions per prompt, B = P·G rows ordered group-major (row p·G+g is problem p's
g-th completion), L completion tokens (padded to the longest in the batch), Tp prompt tokens, V vocabulary.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from .generate import by_length, generate
from .grpo import token_logprobs, zero_variance_mask
from .rewards import format_reward
from .tasks import score_answer


@dataclass
class Rollout:
    """G sampled completions for each of P problems, group-major (row p·G+g is problem p's g-th).

    ``tokens`` (B, L) are completion ids right-padded with the pad id; ``mask`` (B, L) is True on
    every generated token up to and including ``</answer>``; ``finished`` (B,) is False where the
    completion hit the length limit instead (truncated). ``prompts`` holds each problem's prompt ids.
    """
    problems: list
    prompts: list[list[int]]
    tokens: torch.Tensor
    mask: torch.Tensor
    finished: torch.Tensor
    texts: list[str]
    group_size: int

    @property
    def lengths(self) -> torch.Tensor:
        return self.mask.sum(dim=1)  # (B,)

    def problem_of(self, row: int):
        return self.problems[row // self.group_size]

    def select_groups(self, groups: list[int]) -> "Rollout":
        """The rollout restricted to some groups (problem indices), in the order given."""
        G = self.group_size
        rows = [p * G + g for p in groups for g in range(G)]
        idx = torch.tensor(rows, dtype=torch.long, device=self.tokens.device)
        return Rollout([self.problems[p] for p in groups], [self.prompts[p] for p in groups], self.tokens[idx],
                       self.mask[idx], self.finished[idx], [self.texts[r] for r in rows], G)


def concat_rollouts(rollouts: list[Rollout], pad_id: int) -> Rollout:
    """One rollout from several with the same group size (completions right-padded to the longest)."""
    L = max(r.tokens.shape[1] for r in rollouts)

    def pad(x: torch.Tensor, value) -> torch.Tensor:
        return torch.nn.functional.pad(x, (0, L - x.shape[1]), value=value)  # (b, L)

    return Rollout([p for r in rollouts for p in r.problems], [q for r in rollouts for q in r.prompts],
                   torch.cat([pad(r.tokens, pad_id) for r in rollouts]), torch.cat([pad(r.mask, False) for r in rollouts]),
                   torch.cat([r.finished for r in rollouts]), [t for r in rollouts for t in r.texts],
                   rollouts[0].group_size)


def _by_prompt_length(prompts: list[list[int]], group_size: int, device) -> list[tuple[list[int], torch.Tensor]]:
    """Rows of equal prompt length, with their prompts repeated G times: [(rows, prompt (b, Tp))].

    The course's attention has no padding mask, so prompts of different lengths cannot share a
    batch; each length is one batch (addition prompts come in about five lengths).
    """
    out = []
    for ps in by_length(prompts).values():
        rows = [p * group_size + g for p in ps for g in range(group_size)]
        prompt = torch.tensor([prompts[p] for p in ps], device=device).repeat_interleave(group_size, dim=0)  # (b, Tp)
        out.append((rows, prompt))
    return out


@torch.no_grad()
def sample_groups(model, tok, problems: list, group_size: int, max_new_tokens: int, *, temperature: float = 1.0,
                  top_p: float = 1.0, generator: torch.Generator | None = None, use_cache: bool = True) -> Rollout:
    """Sample ``group_size`` completions per problem, batched on the model's KV cache (``generate.generate``).

    Each completion stops after ``</answer>`` (the tokenizer's stop id) or at ``max_new_tokens``
    (truncated: ``finished`` is False). Temperature 0 is greedy, which makes G identical copies.
    """
    device = next(model.parameters()).device
    prompts = [tok.encode(p.prompt, bos=True) for p in problems]
    B = len(problems) * group_size
    tokens = torch.full((B, max_new_tokens), tok.pad_id, dtype=torch.long, device=device)  # (B, L)
    mask = torch.zeros((B, max_new_tokens), dtype=torch.bool, device=device)  # (B, L)
    finished = torch.zeros(B, dtype=torch.bool, device=device)  # (B,)
    for rows, prompt in _by_prompt_length(prompts, group_size, device):
        gen = generate(model, prompt, max_new_tokens, temperature=temperature, top_p=top_p, stop_id=tok.stop_id,
                       pad_id=tok.pad_id, use_cache=use_cache, generator=generator)
        n = gen.tokens.shape[1]
        idx = torch.tensor(rows, device=device)
        tokens[idx, :n], mask[idx, :n], finished[idx] = gen.tokens, gen.mask, gen.finished
    L = max(1, int(mask.sum(dim=1).max()))
    tokens, mask = tokens[:, :L], mask[:, :L]  # (B, L): drop the columns nobody used
    texts = [tok.decode(row[m].tolist()) for row, m in zip(tokens.cpu(), mask.cpu())]
    return Rollout(list(problems), prompts, tokens, mask, finished, texts, group_size)


def completion_logprobs(model, rollout: Rollout, temperature: float = 1.0,
                        with_entropy: bool = False) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """log π_θ(o_{i,t} | q, o_{i,<t}) of every completion token: (B, L), one causal forward per prompt length.

    Logits are divided by ``temperature`` first, so these are the log-probs of the distribution the
    completions were sampled from (as TRL does; top-p is not renormalized, as in TRL). Padding
    positions hold log-probs of pad tokens: use ``rollout.mask``. With ``with_entropy`` also returns
    the per-token entropy (B, L) of that distribution, detached (a statistic, not a loss term).
    """
    device = rollout.tokens.device
    pieces, entropies, order = [], [], []
    for rows, prompt in _by_prompt_length(rollout.prompts, rollout.group_size, device):
        Tp = prompt.shape[1]
        completion = rollout.tokens[torch.tensor(rows, device=device)]  # (b, L)
        ids = torch.cat([prompt, completion], dim=1)  # (b, Tp + L)
        logits = model(ids[:, :-1])[:, Tp - 1:] / temperature  # (b, L, V): position Tp-1+t predicts token t
        pieces.append(token_logprobs(logits, completion))  # (b, L)
        if with_entropy:
            with torch.no_grad():
                logits = logits.float()
                entropies.append(torch.logsumexp(logits, -1) - (logits.softmax(-1) * logits).sum(-1))  # (b, L)
        order.extend(rows)
    inverse = torch.argsort(torch.tensor(order, device=device))  # back to group-major row order
    logp = torch.cat(pieces)[inverse]  # (B, L)
    return (logp, torch.cat(entropies)[inverse]) if with_entropy else logp


# ----------------------------------------------------------------------------- rewards and their statistics

def make_reward(accuracy_weight: float = 1.0, format_weight: float = 0.5,
                format_fn: Callable[[str], float] | None = None) -> Callable[[str, object], float]:
    """``reward(completion, problem) = accuracy_weight·accuracy + format_weight·format``.

    R1-Zero sums a rule-based accuracy reward and a format reward ([R1] §2.2.2; the weights are not
    published). Accuracy is the task's verifier (``tasks.score_answer``: the answer block parsed,
    never evaluated); format is ``rewards.format_reward`` unless ``format_fn`` says otherwise
    (notebook 06 passes the naive ``partial_format_reward`` to watch it get hacked).
    """
    format_fn = format_fn or format_reward

    def reward(completion: str, problem) -> float:
        acc = score_answer(problem, completion) if accuracy_weight else 0.0
        return accuracy_weight * acc + format_weight * format_fn(completion)

    return reward


def rollout_stats(rewards: torch.Tensor, correct: torch.Tensor, formatted: torch.Tensor,
                  lengths: torch.Tensor, finished: torch.Tensor) -> dict[str, float]:
    """Per-step numbers of a rollout: rewards, correct, formatted (P, G); lengths, finished (B,).

    ``zero_adv_frac`` is the fraction of groups whose rewards all tie (zero advantage everywhere:
    no learning signal, [DAPO] §3.2); ``truncation_rate`` the fraction of completions that hit the
    length limit.
    """
    return {
        "reward": float(rewards.float().mean()),
        "accuracy": float(correct.float().mean()),
        "format_rate": float(formatted.float().mean()),
        "length": float(lengths.float().mean()),
        "zero_adv_frac": float(1.0 - zero_variance_mask(rewards).float().mean()),
        "truncation_rate": float(1.0 - finished.float().mean()),
    }


def score_rollout(rollout: Rollout, reward_fn: Callable[[str, object], float]) -> tuple[torch.Tensor, dict[str, float]]:
    """Rewards (P, G) of a rollout and its ``rollout_stats`` (accuracy and strict format always measured)."""
    P, G = len(rollout.problems), rollout.group_size
    probs = [rollout.problem_of(r) for r in range(P * G)]
    rewards = torch.tensor([reward_fn(t, p) for t, p in zip(rollout.texts, probs)]).view(P, G)  # (P, G)
    correct = torch.tensor([score_answer(p, t) for t, p in zip(rollout.texts, probs)]).view(P, G)
    formatted = torch.tensor([format_reward(t) for t in rollout.texts]).view(P, G)
    return rewards, rollout_stats(rewards, correct, formatted, rollout.lengths.cpu(), rollout.finished.cpu())


@dataclass
class Evaluation:
    """Held-out numbers of a model: accuracy, strict format rate, mean completion length and the fraction
    of completions cut at the length limit, with the rollout they were measured on."""
    accuracy: float
    format_rate: float
    length: float
    truncation_rate: float
    rollout: Rollout

    def metrics(self) -> dict[str, float]:
        return {"accuracy": self.accuracy, "format_rate": self.format_rate, "length": self.length,
                "truncation_rate": self.truncation_rate}


def evaluate(model, tok, problems: list, max_new_tokens: int, *, samples: int = 1, temperature: float = 0.0,
             top_p: float = 1.0, seed: int = 0, use_cache: bool = True) -> Evaluation:
    """The course's one evaluator: greedy completions of ``problems`` by default, or ``samples`` completions
    each at ``temperature`` (seeded), scored by the task's verifier and the strict format reward."""
    device = next(model.parameters()).device
    g = torch.Generator(device=device).manual_seed(seed) if temperature > 0 else None
    rollout = sample_groups(model, tok, problems, samples, max_new_tokens, temperature=temperature, top_p=top_p,
                            generator=g, use_cache=use_cache)
    _, stats = score_rollout(rollout, lambda t, p: 0.0)
    return Evaluation(stats["accuracy"], stats["format_rate"], stats["length"], stats["truncation_rate"], rollout)
