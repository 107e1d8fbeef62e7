"""Exercises of notebooks 06 and 07: rule-based rewards with tags, and GRPO's advantages, KL and clipped objective.

Sources: the rewards and template, DeepSeek-R1 (arXiv:2501.12948) §2.2.1-2.2.2 and Table 1; GRPO, DeepSeekMath
(Shao et al., arXiv:2402.03300) §4.1 eqs 3-4 and §4.1.2; Dr. GRPO (arXiv:2503.20783) §3; DAPO (arXiv:2503.14476)
§3.3. The references agree with `course_lib.rewards` and `course_lib.grpo` (tests check), written here to be read.

Letters: P prompts, G completions per prompt (the group), B = P*G sequences, T completion tokens.
"""

from __future__ import annotations

import re

import torch

from ..rewards import MAX_COMPLETION_CHARS
from .core import Experiment, Implement, Mistake, Predict
from .decoder import randn
from .running import Case

TAG_LIKE = re.compile(r"<\s*(?:/\s*)?(?:think|answer)>?", re.IGNORECASE)  # any spelling of the four tags


# ----------------------------------------------------------------------------- 06: the strict format reward

def strict_format_reward(completion: str) -> float:
    """1.0 iff the completion is exactly <think>...</think><answer>...</answer> (whitespace around), else 0.0."""
    if len(completion) > MAX_COMPLETION_CHARS:  # bounded work, whatever the model writes
        return 0.0
    m = re.fullmatch(r"[ \t\r\n]*<think>(.*?)</think>[ \t\r\n]*<answer>(.*?)</answer>[ \t\r\n]*", completion, re.DOTALL)
    if m is None:
        return 0.0
    think, answer = m.groups()
    if TAG_LIKE.search(think) or TAG_LIKE.search(answer):  # a second block, a nested or stray tag
        return 0.0
    return 1.0 if answer.strip(" \t\r\n") else 0.0  # an answer block with nothing to grade fails


COMPLETIONS = [
    "<think>7+5=12;4+8+1=13</think><answer>132</answer>",
    "<think>2+2=4</think><answer>4</answer><answer>5</answer>",
    "The answer is <think>1+1=2</think><answer>2</answer>",
    "<think>3+4=7</think><answer> </answer>",
    "<THINK>3+4=7</THINK><answer>7</answer>",
    "\n<think>5+5=10</think>\n<answer> 10 </answer>\n",
    "<think>1+2=3<answer>3</answer></think>",
    "<answer>9</answer><think>4+5=9</think>",
    "<think>no answer block</think>",
    "<think>6+1=7</think><answer>7",
]


def _reward_cases() -> list[Case]:
    return [Case(repr(c) if len(c) < 60 else repr(c[:57]) + "...", (c,)) for c in COMPLETIONS]


def _format_without(rule: str):
    def reward(completion: str) -> float:
        flags = re.DOTALL | (re.IGNORECASE if rule == "case" else 0)
        pattern = r"<think>(.*?)</think>\s*<answer>(.*?)</answer>"
        m = (re.search if rule == "outside" else re.fullmatch)(r"\s*" + pattern + r"\s*", completion, flags)
        if m is None:
            return 0.0
        think, answer = m.groups()
        if rule != "second" and (TAG_LIKE.search(think) or TAG_LIKE.search(answer)):
            return 0.0
        return 1.0 if rule == "blank" or answer.strip() else 0.0
    return reward


FORMAT_REWARD = Implement(
    name="strict_format_reward", notebook="06",
    statement="Implement strict_format_reward(completion) -> 1.0 or 0.0: one <think> block then one non-blank <answer> "
              "block, only whitespace around them, no other tag anywhere (DeepSeek-R1, arXiv:2501.12948, §2.2.2, "
              "template of Table 1).",
    hint_text="re.fullmatch with [ \\t\\r\\n]* around the two blocks and DOTALL; then reject any tag-like text inside "
              "either block (a second <answer>, a nested <think>, <THINK>), and a blank answer.",
    reference=strict_format_reward, cases=_reward_cases,
    mistakes=(
        Mistake("a format reward that accepts a second answer block", "'<answer>4</answer><answer>5</answer>' gives "
                "two answers to grade: reject any tag inside a block, not only a wrong order.", _format_without("second")),
        Mistake("text outside the two blocks accepted", "Match the whole completion (fullmatch), so nothing but "
                "whitespace stands around the blocks.", _format_without("outside")),
        Mistake("a blank answer block accepted", "An answer block of only whitespace has nothing to grade: 0.",
                _format_without("blank")),
        Mistake("tags in another case accepted (<THINK>)", "The tags are exact and lowercase; drop re.IGNORECASE.",
                _format_without("case"))))


def extract_answer(completion: str) -> str | None:
    """The stripped text of the ONE <answer>...</answer> block, or None if there is not exactly one."""
    if len(completion) > MAX_COMPLETION_CHARS:
        return None
    tags = list(TAG_LIKE.finditer(completion))
    answers = [m for m in tags if "answer" in m.group().lower()]
    if [m.group() for m in answers] != ["<answer>", "</answer>"]:  # none, two, unclosed, misspelt: ambiguous
        return None
    start, end = answers[0].end(), answers[1].start()
    if any(start <= m.start() < end for m in tags):  # a think tag inside the answer
        return None
    return completion[start:end].strip(" \t\r\n")


def _extract_regex(greedy: bool):
    def extract(completion: str) -> str | None:
        m = re.search(r"<answer>(.*)</answer>" if greedy else r"<answer>(.*?)</answer>", completion, re.DOTALL)
        return None if m is None else m.group(1).strip()
    return extract


EXTRACT_ANSWER = Implement(
    name="extract_answer", notebook="06",
    statement="Implement extract_answer(completion) -> str or None: the stripped text of the single <answer>...</answer> "
              "block; None when there is none, two, an unclosed one or a tag inside it (DeepSeek-R1, "
              "arXiv:2501.12948, §2.2.2: the answer in a specified format).",
    hint_text="Find every tag-like token; the answer tags must be exactly ['<answer>', '</answer>'] in that order, and "
              "no other tag may sit between them. Strip ASCII whitespace from what is inside.",
    reference=extract_answer, cases=_reward_cases,
    mistakes=(
        Mistake("the first of two answer blocks taken", "Two answer blocks are ambiguous: return None, or a model "
                "learns to write several answers and be graded on the best.", _extract_regex(greedy=False)),
        Mistake("a greedy match from the first <answer> to the last </answer>", "(.*) runs over the inner tags; "
                "count the answer tags instead and reject anything but exactly one pair.", _extract_regex(greedy=True)),
        Mistake("the answer not stripped of whitespace", "'<answer> 10 </answer>' holds 10: strip spaces and newlines.",
                lambda c: None if extract_answer(c) is None else c[c.index("<answer>") + 8:c.index("</answer>")]),
        Mistake("an empty string instead of None when there is no single answer", "None says 'nothing to grade'; "
                "'' would be parsed as a (wrong) answer.", lambda c: "" if extract_answer(c) is None else extract_answer(c))))


REWARD_TABLE = Predict(
    name="reward_table", notebook="06",
    statement="Predict strict_format_reward for each of the ten completions that ex.task() lists "
              "(course_lib.exercises.rl.COMPLETIONS): a list of ten 0.0 / 1.0 values.",
    details="\n".join(f"  {i}: {c!r}" for i, c in enumerate(COMPLETIONS)),
    hint_text="Exactly one think block, then one non-blank answer block, only whitespace outside, no other tag "
              "anywhere (any case). Two of the ten pass.",
    value=[strict_format_reward(c) for c in COMPLETIONS], unit="",
    how="only the first (plain) and the sixth (whitespace around and inside the blocks is fine) are well formed")


def _hacking(m) -> str | None:
    if m["lenient_reward"] - m["strict_format_rate"] < 0.2:
        return (f"the lenient reward ({m['lenient_reward']:.2f}) and the strict format rate "
                f"({m['strict_format_rate']:.2f}) stayed close: no hacking showed up")
    return None


HACKING = Experiment(
    name="reward_hacking", notebook="06",
    statement="Train with rewards.partial_format_reward (0.25 per tag present anywhere) in place of the strict format "
              "reward, and measure at the end the mean lenient reward, the strict format rate and accuracy.",
    hint_text="Section 4 already runs this; change the steps or the weight of the format term and watch the "
              "completions viewer.",
    expected="the lenient reward climbs towards 1.0 while the strict format rate and accuracy fall: the policy "
             "learns to spray tags instead of answering (reward hacking).",
    required=("lenient_reward", "strict_format_rate", "accuracy"), judge=_hacking,
    example={"lenient_reward": 0.98, "strict_format_rate": 0.15, "accuracy": 0.05},
    against={"lenient_reward": 0.98, "strict_format_rate": 0.95, "accuracy": 0.6})


# ----------------------------------------------------------------------------- 07: advantages, KL, the objective

def group_advantages(rewards: torch.Tensor, eps: float = 1e-4) -> torch.Tensor:
    """GRPO's advantages (P, G) -> (P, G): each reward minus its group's mean, over the group's sample std + eps."""
    mean = rewards.mean(dim=1, keepdim=True)  # (P, 1)
    std = rewards.std(dim=1, keepdim=True)  # (P, 1): sample std (divides by G - 1), 0 for a tied group
    return (rewards - mean) / (std + eps)  # (P, G): a tied group gets 0, not NaN


def _adv_cases() -> list[Case]:
    return [Case("rewards [[1, 0, 0, 0]]", (torch.tensor([[1.0, 0, 0, 0]]),)),
            Case("rewards (3, 4): one group all right, one all wrong", (torch.tensor([[1.0, 1, 1, 1], [0, 0, 0, 0], [1, 0, 1, 0]]),)),
            Case("rewards (4, 8) of 0/1", ((torch.rand(4, 8, generator=torch.Generator().manual_seed(400)) > 0.5).float(),)),
            Case("rewards (2, 16) graded in [0, 1]", (torch.rand(2, 16, generator=torch.Generator().manual_seed(401)),))]


ADVANTAGES = Implement(
    name="group_advantages", notebook="07",
    statement="Implement group_advantages(rewards) for rewards (P, G): (r - mean of its group) / (sample std of its "
              "group + 1e-4) (DeepSeekMath, arXiv:2402.03300, §4.1.2; the std as TRL's GRPOTrainer).",
    hint_text="Mean and std over dim=1 with keepdim=True; torch's std is the sample std (divides by G - 1); the eps "
              "keeps a group whose rewards all tie at 0 instead of 0/0.",
    reference=group_advantages, cases=_adv_cases, atol=1e-4, rtol=1e-3,
    properties=lambda case, adv: ("the advantages of a group should sum to 0"
                                  if isinstance(adv, torch.Tensor) and adv.shape == case.args[0].shape
                                  and adv.sum(1).abs().max() > 1e-3 else None),
    mistakes=(
        Mistake("advantages not divided by the group's std", "r - mean is Dr. GRPO's choice; GRPO (eq 3's Â) also "
                "divides by the group's std.", lambda r, eps=1e-4: r - r.mean(1, keepdim=True)),
        Mistake("normalized over the whole batch instead of per group", "Each prompt's G completions form a group: "
                "mean and std over dim=1 only.", lambda r, eps=1e-4: (r - r.mean()) / (r.std() + eps)),
        Mistake("the population std (divided by G) instead of the sample std (G - 1)", "torch's default std divides by "
                "G - 1; correction=0 or unbiased=False divides by G.",
                lambda r, eps=1e-4: (r - r.mean(1, keepdim=True)) / (r.std(1, keepdim=True, correction=0) + eps)),
        Mistake("no eps: a tied group gives NaN", "A group whose rewards all tie has std 0; add 1e-4 to the std.",
                lambda r, eps=1e-4: (r - r.mean(1, keepdim=True)) / r.std(1, keepdim=True))))


def kl_k3(logp: torch.Tensor, ref_logp: torch.Tensor) -> torch.Tensor:
    """The per-token k3 estimate of KL[π_θ || π_ref]: π_ref/π_θ - log(π_ref/π_θ) - 1, never negative (eq 4)."""
    log_ratio = ref_logp - logp  # log(π_ref / π_θ)
    return torch.exp(log_ratio) - log_ratio - 1


KL_K3 = Implement(
    name="kl_k3", notebook="07",
    statement="Implement kl_k3(logp, ref_logp): the per-token estimate π_ref/π_θ - log(π_ref/π_θ) - 1 of "
              "KL[π_θ || π_ref] (DeepSeekMath, arXiv:2402.03300, §4.1 eq 4).",
    hint_text="With d = ref_logp - logp (the log of π_ref/π_θ), the estimate is exp(d) - d - 1, >= 0 and 0 when the "
              "policies agree.",
    reference=kl_k3, atol=1e-5,
    cases=lambda: [Case("logp (2, 5), ref close", (randn(410, 2, 5) - 2, randn(410, 2, 5) - 2 + randn(411, 2, 5, scale=0.1))),
                   Case("logp (3, 7), ref far", (randn(412, 3, 7) - 3, randn(413, 3, 7) - 3)),
                   Case("logp == ref_logp (4, 4)", (randn(414, 4, 4) - 1, randn(414, 4, 4) - 1))],
    properties=lambda case, kl: ("the estimate should never be negative" if isinstance(kl, torch.Tensor)
                                 and (kl < -1e-6).any() else None),
    mistakes=(
        Mistake("the KL estimator's sign flipped (the ratio inverted)", "eq 4 uses π_ref/π_θ: exp(ref - logp), not "
                "exp(logp - ref); the inverted one estimates KL[π_ref || π_θ].",
                lambda logp, ref: torch.exp(logp - ref) - (logp - ref) - 1),
        Mistake("k1, the plain log-ratio logp - ref_logp", "It is unbiased but negative for many tokens; eq 4's "
                "estimator is exp(d) - d - 1.", lambda logp, ref: logp - ref),
        Mistake("k2, half the squared log-ratio", "eq 4 is exp(d) - d - 1 (k3), not d^2 / 2.",
                lambda logp, ref: 0.5 * (logp - ref) ** 2),
        Mistake("the -1 left out", "Subtract 1 so that the estimate is 0 when the policies agree.",
                lambda logp, ref: torch.exp(ref - logp) - (ref - logp))))


def clipped_surrogate(logp, old_logp, adv, mask, eps=0.2):
    """GRPO's loss (the negative of eq 3 without the KL term): per token min(ρÂ, clip(ρ, 1-ε, 1+ε)Â), averaged over
    each sequence's tokens, then over sequences. logp, old_logp, mask (B, T); adv (B,)."""
    ratio = torch.exp(logp - old_logp)  # (B, T): ρ = π_θ / π_θold
    adv = adv[:, None]  # (B, 1): one advantage for every token of a completion
    per_token = torch.minimum(ratio * adv, ratio.clamp(1 - eps, 1 + eps) * adv)  # (B, T): pessimistic bound
    per_token = per_token * mask  # padding adds nothing
    per_seq = per_token.sum(1) / mask.sum(1).clamp(min=1)  # (B,): 1/|o_i| Σ_t
    return -per_seq.mean()  # minimise the negative objective


def _surrogate_with(pick=torch.minimum, sign=-1.0, agg="sequence", use_mask=True):
    def loss(logp, old_logp, adv, mask, eps=0.2):
        ratio = torch.exp(logp - old_logp)
        per_token = pick(ratio * adv[:, None], ratio.clamp(1 - eps, 1 + eps) * adv[:, None])
        m = mask if use_mask else torch.ones_like(mask)
        if agg == "token":
            return sign * (per_token * m).sum() / m.sum()
        return sign * ((per_token * m).sum(1) / m.sum(1).clamp(min=1)).mean()
    return loss


def _surrogate_cases() -> list[Case]:
    def case(seed, B, T, lengths):
        mask = (torch.arange(T)[None, :] < torch.tensor(lengths)[:, None]).float()
        logp = randn(seed, B, T) - 2
        return Case(f"B={B} T={T}, lengths {lengths}", (logp, logp + randn(seed + 1, B, T, scale=0.4),
                                                         randn(seed + 2, B), mask))
    return [case(420, 2, 4, [4, 4]), case(430, 4, 6, [6, 2, 4, 1]), case(440, 3, 5, [5, 3, 2])]


SURROGATE = Implement(
    name="clipped_surrogate", notebook="07",
    statement="Implement clipped_surrogate(logp, old_logp, adv, mask, eps=0.2) -> loss: minus the mean over sequences "
              "of each sequence's mean over its tokens of min(ρÂ, clip(ρ, 1-ε, 1+ε)Â) (DeepSeekMath, "
              "arXiv:2402.03300, §4.1 eq 3, without the KL term).",
    hint_text="ρ = exp(logp - old_logp); adv is per sequence, so broadcast it with adv[:, None]; torch.minimum of the "
              "two terms; zero the padding with the mask, divide each row's sum by its token count, average, negate.",
    reference=clipped_surrogate, cases=_surrogate_cases, atol=1e-5,
    mistakes=(
        Mistake("max instead of min", "The min makes the objective a pessimistic bound: a large ratio cannot earn "
                "more than the clipped term.", _surrogate_with(pick=torch.maximum)),
        Mistake("the objective returned instead of the loss", "An optimizer minimises: return minus the objective.",
                _surrogate_with(sign=1.0)),
        Mistake("a token-level mean over the batch (DAPO's aggregation)", "Eq 3 averages each completion's tokens "
                "(1/|o_i|), then the completions: long and short ones weigh the same.", _surrogate_with(agg="token")),
        Mistake("padding counted in the mean", "Multiply by the mask and divide by each row's real token count.",
                _surrogate_with(use_mask=False))))


ADVANTAGE_VALUE = Predict(
    name="advantage_one_right", notebook="07",
    statement="A group of 4 completions scores rewards [1, 0, 0, 0]. Predict the advantage of the right one under "
              "GRPO's normalization (sample std, eps = 1e-4), to 3 digits.",
    hint_text="mean 0.25; the sample std of [1, 0, 0, 0] divides the squared deviations by G - 1 = 3.",
    value=lambda: group_advantages(torch.tensor([[1.0, 0, 0, 0]]))[0, 0].item(), rel_tol=2e-3,
    how="(1 - 0.25) / (sqrt((0.75^2 + 3 x 0.25^2) / 3) + 1e-4) = 0.75 / 0.5 = 1.5",
    mistakes=(Mistake("no division by the std", "GRPO divides r - mean by the group's std.", 0.75),
              Mistake("the population std", "The sample std divides by G - 1 = 3, not G = 4.", 0.75 / 0.4330127)))


def _kl_outcome(m) -> str | None:
    if m["kl_with_beta"] >= m["kl_beta_0"]:
        return f"the mean KL was {m['kl_with_beta']:.4f} with β > 0 and {m['kl_beta_0']:.4f} with β = 0: it should be lower"
    return None


KL_EXPERIMENT = Experiment(
    name="kl_penalty", notebook="07",
    statement="Run the GRPO recipe with β = 0 and with β = 0.04 (GRPOConfig(beta=...)) on the same seed, and record "
              "the mean k3 KL to the reference over the last steps and held-out accuracy after training.",
    hint_text="The trainer's history holds the KL of every step when a reference model is kept (beta > 0); for β = 0, "
              "keep a reference copy and measure kl_k3 on a rollout yourself.",
    expected="the KL penalty keeps the policy closer to the reference (a smaller KL), at a similar or slightly lower "
             "accuracy; β = 0 (DAPO's and Dr. GRPO's choice) drifts further.",
    required=("kl_beta_0", "kl_with_beta", "accuracy_beta_0", "accuracy_with_beta"), judge=_kl_outcome,
    example={"kl_beta_0": 0.05, "kl_with_beta": 0.01, "accuracy_beta_0": 0.74, "accuracy_with_beta": 0.71},
    against={"kl_beta_0": 0.01, "kl_with_beta": 0.05, "accuracy_beta_0": 0.74, "accuracy_with_beta": 0.71})


EXERCISES = [FORMAT_REWARD, EXTRACT_ANSWER, REWARD_TABLE, HACKING, ADVANTAGES, KL_K3, SURROGATE, ADVANTAGE_VALUE,
             KL_EXPERIMENT]
