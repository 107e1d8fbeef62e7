"""Rule-based rewards for R1-style reasoning RL: format, accuracy, and a naive partial reward.

DeepSeek-R1-Zero is trained with two rule-based rewards and no neural reward model ([R1] §2.2.2):
an *accuracy* reward that checks the final answer against a known result, and a *format* reward that
makes the model put its reasoning in ``<think>…</think>`` (and, with the R1 template of [R1] Table 1,
the answer in ``<answer>…</answer>``). The paper gives no numeric values; here both are 0.0 or 1.0.

A completion is only what the model writes after the prompt, e.g.
``<think>7+5=12;4+8+1=13;3+1=4</think><answer>432</answer>`` for the prompt ``347+85=``.

Decisions, all deliberate (the rewards are the only thing RL optimises, so any slack gets found):

* Whitespace means ASCII space, tab, CR and LF only. It may stand before, between and after the two
  blocks; any other character outside the blocks breaks the format.
* Tags are exact and lowercase. Anything that looks like one of the four tags in another spelling
  (``<THINK>``, ``< answer>``, ``<thinking>``, a ``<think`` never closed by ``>``) counts as a stray tag.
* The think block may be empty (the format reward checks structure, not the quality of reasoning);
  the answer block may not be blank, since there is nothing to grade.
* Completions longer than ``MAX_COMPLETION_CHARS`` get 0 from every strict function, before any
  parsing, so the cost of a reward is bounded whatever the model writes.
* Answers are parsed without ``eval``/``exec``: an optional ``+``/``-`` and 1 to ``MAX_ANSWER_DIGITS``
  ASCII digits ``0-9``, surrounded by optional whitespace. Leading zeros are fine (``007`` is 7) and
  ``-0`` equals 0. Non-ASCII digits (Arabic-Indic ``٤٣٢``, fullwidth ``４３２``) are rejected even
  though Python's ``int()`` would accept them: the task and its tokenizer are ASCII, so such digits
  can only come from a model drifting into text that a grader should not have to normalise.
  Thousands separators, underscores, decimals and expressions (``12.0``, ``1_000``, ``4*108``) are
  rejected too: the task asks for a plain integer.
"""

import re

MAX_COMPLETION_CHARS = 4096  # far above any honest completion of the course's arithmetic task
MAX_ANSWER_DIGITS = 50  # counts leading zeros too, so parsing work stays bounded

_WS = " \t\r\n"
# Every spelling a model could use to open or close one of the two tags; only the exact lowercase
# forms followed by ">" are well-formed. Case-insensitive so that "<Answer>" is a stray tag, not text.
_TAG_LIKE = re.compile(r"<\s*(?:/\s*)?(?:think|answer)", re.IGNORECASE)  # one \s* run per '<': linear scan
_INTEGER = re.compile(r"[+-]?[0-9]+")  # [0-9] is exactly the ASCII digits, unlike \d


def _tags(completion: str) -> list[tuple[str, int, int]]:
    """Every tag-like token as (text, start, end); ``text`` is exact only for well-formed tags."""
    found = []
    for m in _TAG_LIKE.finditer(completion):
        closed = completion.startswith(">", m.end())
        text = m.group() + ">" if closed else m.group()
        found.append((text, m.start(), m.start() + len(text)))
    return found


def _is_ws(text: str) -> bool:
    return text.strip(_WS) == ""


def format_reward(completion: str) -> float:
    """1.0 iff the completion is exactly ``<think>…</think><answer>…</answer>``, else 0.0.

    The strict R1-style format reward ([R1] §2.2.2, template of Table 1): one think block, then one
    non-blank answer block, only ASCII whitespace around and between them, no other tag-like text
    anywhere (so nested, repeated, unclosed and reordered tags all fail), and at most
    ``MAX_COMPLETION_CHARS`` characters.
    """
    if not isinstance(completion, str) or len(completion) > MAX_COMPLETION_CHARS:
        return 0.0
    tags = _tags(completion)
    if [t for t, _, _ in tags] != ["<think>", "</think>", "<answer>", "</answer>"]:
        return 0.0
    (_, _, think_open), (_, think_close, think_end), (_, ans_start, ans_open), (_, ans_close, ans_end) = tags
    outside = completion[: tags[0][1]] + completion[think_end:ans_start] + completion[ans_end:]
    if not _is_ws(outside) or _is_ws(completion[ans_open:ans_close]):
        return 0.0
    return 1.0


def extract_answer(completion: str) -> str | None:
    """The text inside the one ``<answer>…</answer>`` block, stripped, or None if there isn't exactly one.

    More lenient than ``format_reward`` on purpose: a missing think block or text outside the tags
    costs the format reward, not the accuracy reward, as in [R1] §2.2.2 where the two are separate.
    What it refuses is an *ambiguous* answer: two answer blocks, an unclosed or reordered one, any
    other spelling of an answer tag, or a think tag inside the answer. Over-long completions give None.
    """
    if not isinstance(completion, str) or len(completion) > MAX_COMPLETION_CHARS:
        return None
    tags = _tags(completion)
    answer_tags = [(t, s, e) for t, s, e in tags if "answer" in t.lower()]
    if [t for t, _, _ in answer_tags] != ["<answer>", "</answer>"]:
        return None
    (_, _, start), (_, end, _) = answer_tags
    if any(start <= s < end for _, s, _ in tags):  # a think tag nested inside the answer
        return None
    return completion[start:end].strip(_WS)


def parse_integer(text: str) -> int | None:
    """Parse a plain ASCII integer (optional sign, at most ``MAX_ANSWER_DIGITS`` digits) or give None.

    Never evaluates anything: the text must match ``[+-]?[0-9]+`` after stripping ASCII whitespace,
    and the length is checked before any work, so ``"9" * 10**6`` is rejected at once.
    """
    if not isinstance(text, str):
        return None
    text = text.strip(_WS)
    if len(text) > MAX_ANSWER_DIGITS + 1 or not _INTEGER.fullmatch(text):
        return None
    if len(text.lstrip("+-")) > MAX_ANSWER_DIGITS:
        return None
    return int(text)


def accuracy_reward(completion: str, target) -> float:
    """1.0 iff the single answer block holds an integer equal to ``target``, else 0.0.

    The rule-based accuracy reward of [R1] §2.2.2 ("the model is required to provide the final
    answer in a specified format"): ``extract_answer`` finds the answer, ``parse_integer`` reads it.
    ``target`` is trusted (it comes from the task generator): an ``int``, or a string that
    ``parse_integer`` accepts; anything else raises, because that is a bug in the caller.
    """
    if isinstance(target, bool) or not isinstance(target, (int, str)):
        raise TypeError(f"target must be an int or an integer string, got {type(target).__name__}")
    if isinstance(target, str):
        parsed = parse_integer(target)
        if parsed is None:
            raise ValueError(f"target {target!r} is not a plain integer; pass an int")
        target = parsed
    answer = extract_answer(completion)
    value = None if answer is None else parse_integer(answer)
    return 1.0 if value is not None and value == target else 0.0


def partial_format_reward(completion: str) -> float:
    """A DELIBERATELY NAIVE partial-credit format reward, kept for the reward-hacking lesson.

    +0.25 for each of the four tags that appears anywhere as a substring, ignoring order, nesting,
    repetition and everything else. Partial credit looks kind to a weak model, but the policy soon
    learns that ``"</answer><think></think><answer>"`` (tag spam, no reasoning, no answer) earns the
    full 1.0. This is why [R1] §2.2.2 uses rule-based rewards that are hard to game, and why
    ``format_reward`` is all or nothing. Do not train with this one except to watch it get hacked.
    """
    if not isinstance(completion, str):
        return 0.0
    return 0.25 * sum(tag in completion for tag in ("<think>", "</think>", "<answer>", "</answer>"))
