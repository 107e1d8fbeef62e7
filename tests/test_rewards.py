"""Rewards on a table of good, malformed and adversarial completions.

What is asserted:
- format_reward: 1.0 only for one think block then one non-blank answer block with nothing but
  ASCII whitespace around them; 0.0 for nested, repeated, unclosed, reordered, misspelled or
  stray tags, text outside the tags, blank answers, non-strings and over-long completions.
- accuracy_reward: reads one unambiguous answer block as a plain ASCII integer (whitespace, leading
  zeros, +/- sign, -0); 0.0 for two answer blocks, non-ASCII digits, huge numbers, code, expressions,
  decimals and empty answers; huge inputs are rejected fast; bad targets raise.
- partial_format_reward gives full credit to tag spam that the strict reward scores 0.
"""

import time

import pytest

from course_lib.rewards import (
    MAX_ANSWER_DIGITS,
    MAX_COMPLETION_CHARS,
    accuracy_reward,
    extract_answer,
    format_reward,
    parse_integer,
    partial_format_reward,
)

GOOD = "<think>7+5=12;4+8+1=13;3+1=4</think><answer>432</answer>"  # 347+85=
SPAM = "</answer><think></think><answer>"  # every tag once, wrong order, no answer

# (id, completion, format_reward, extract_answer, accuracy_reward against 432)
TABLE = [
    # good
    ("canonical", GOOD, 1.0, "432", 1.0),
    ("newlines_between", "<think>\n7+5=12\n</think>\n<answer>\n432\n</answer>\n", 1.0, "432", 1.0),
    ("ws_around", "  \t<think>x</think>  <answer> 432 </answer>\r\n", 1.0, "432", 1.0),
    ("empty_think", "<think></think><answer>432</answer>", 1.0, "432", 1.0),
    ("leading_zeros", "<think>t</think><answer>00432</answer>", 1.0, "00432", 1.0),
    ("plus_sign", "<think>t</think><answer>+432</answer>", 1.0, "+432", 1.0),
    ("wrong_number", "<think>t</think><answer>431</answer>", 1.0, "431", 0.0),
    ("negative", "<think>t</think><answer>-432</answer>", 1.0, "-432", 0.0),
    ("lt_in_think", "<think>3<4 and 5>2</think><answer>432</answer>", 1.0, "432", 1.0),
    # text outside the tags: format 0, but the one answer block is unambiguous
    ("text_before", "Sure! <think>t</think><answer>432</answer>", 0.0, "432", 1.0),
    ("text_between", "<think>t</think> so <answer>432</answer>", 0.0, "432", 1.0),
    ("text_after", "<think>t</think><answer>432</answer> done", 0.0, "432", 1.0),
    ("no_think", "<answer>432</answer>", 0.0, "432", 1.0),
    ("nbsp_outside", "\u00a0<think>t</think><answer>432</answer>", 0.0, "432", 1.0),
    # repeated / nested / unclosed / reordered tags
    ("two_answers", "<think>t</think><answer>432</answer><answer>432</answer>", 0.0, None, 0.0),
    ("two_answers_hedge", "<think>t</think><answer>431</answer><answer>432</answer>", 0.0, None, 0.0),
    ("two_thinks", "<think>a</think><think>b</think><answer>432</answer>", 0.0, "432", 1.0),
    ("nested_think", "<think><think>t</think></think><answer>432</answer>", 0.0, "432", 1.0),
    ("answer_in_think", "<think><answer>1</answer></think><answer>432</answer>", 0.0, None, 0.0),
    ("think_in_answer", "<think>t</think><answer><think>432</think></answer>", 0.0, None, 0.0),
    ("unclosed_think", "<think>t<answer>432</answer>", 0.0, "432", 1.0),
    ("unclosed_answer", "<think>t</think><answer>432", 0.0, None, 0.0),
    ("unopened_answer", "<think>t</think>432</answer>", 0.0, None, 0.0),
    ("answer_first", "<answer>432</answer><think>t</think>", 0.0, "432", 1.0),
    ("answer_tags_swapped", "<think>t</think></answer>432<answer>", 0.0, None, 0.0),
    ("think_tags_swapped", "</think>t<think><answer>432</answer>", 0.0, "432", 1.0),
    # tags in other spellings are stray tags, not text
    ("upper_answer", "<think>t</think><ANSWER>432</ANSWER>", 0.0, None, 0.0),
    ("spaced_answer", "<think>t</think>< answer>432</ answer>", 0.0, None, 0.0),
    ("open_bracket_only", "<think>t</think><answer>432</answer", 0.0, None, 0.0),
    ("thinking_tag", "<thinking>t</thinking><answer>432</answer>", 0.0, "432", 1.0),
    ("second_upper_answer", "<think>t</think><answer>432</answer><Answer>5</Answer>", 0.0, None, 0.0),
    # tag spam
    ("tag_spam", SPAM, 0.0, None, 0.0),
    ("tag_spam_repeated", SPAM * 50, 0.0, None, 0.0),
    # empty / blank answers
    ("empty_answer", "<think>t</think><answer></answer>", 0.0, "", 0.0),
    ("blank_answer", "<think>t</think><answer> \n </answer>", 0.0, "", 0.0),
    ("empty_string", "", 0.0, None, 0.0),
    ("no_tags", "432", 0.0, None, 0.0),
    # answers that must not parse: well-formed, so format is 1.0, accuracy 0.0
    ("code", "<think>t</think><answer>__import__('os').system('ls')</answer>", 1.0,
     "__import__('os').system('ls')", 0.0),
    ("expression", "<think>t</think><answer>400+32</answer>", 1.0, "400+32", 0.0),
    ("decimal", "<think>t</think><answer>432.0</answer>", 1.0, "432.0", 0.0),
    ("underscore", "<think>t</think><answer>4_32</answer>", 1.0, "4_32", 0.0),
    ("comma", "<think>t</think><answer>0,432</answer>", 1.0, "0,432", 0.0),
    ("inner_space", "<think>t</think><answer>4 32</answer>", 1.0, "4 32", 0.0),
    ("double_sign", "<think>t</think><answer>--432</answer>", 1.0, "--432", 0.0),
    ("arabic_indic", "<think>t</think><answer>\u0664\u0663\u0662</answer>", 1.0, "\u0664\u0663\u0662", 0.0),
    ("fullwidth", "<think>t</think><answer>\uff14\uff13\uff12</answer>", 1.0, "\uff14\uff13\uff12", 0.0),
    ("superscript", "<think>t</think><answer>\u2074\u00b3\u00b2</answer>", 1.0, "\u2074\u00b3\u00b2", 0.0),
    ("huge", "<think>t</think><answer>" + "9" * 200 + "</answer>", 1.0, "9" * 200, 0.0),
    ("zero_padded_past_cap", "<think>t</think><answer>" + "0" * 60 + "432</answer>", 1.0, "0" * 60 + "432", 0.0),
]


@pytest.mark.parametrize("completion,fmt,answer,acc", [row[1:] for row in TABLE], ids=[row[0] for row in TABLE])
def test_reward_table(completion, fmt, answer, acc):
    assert format_reward(completion) == fmt
    assert extract_answer(completion) == answer
    assert accuracy_reward(completion, 432) == acc


def test_table_has_unique_ids():
    ids = [row[0] for row in TABLE]
    assert len(ids) == len(set(ids))


@pytest.mark.parametrize(
    "text,value",
    [("432", 432), (" 432\n", 432), ("+5", 5), ("-5", -5), ("-0", 0), ("+0", 0), ("007", 7),
     ("9" * MAX_ANSWER_DIGITS, int("9" * MAX_ANSWER_DIGITS)),
     ("-" + "9" * MAX_ANSWER_DIGITS, -int("9" * MAX_ANSWER_DIGITS))],
)
def test_parse_integer_accepts(text, value):
    assert parse_integer(text) == value


@pytest.mark.parametrize(
    "text",
    ["", " ", "+", "-", "+-5", "5-", "1e3", "0x1A", "12.0", "1_000", "1,000", "4 32", "\u0665", "\uff15",
     "\u00a05", "9" * (MAX_ANSWER_DIGITS + 1), "__import__('os').system('ls')", None, 5],
)
def test_parse_integer_rejects(text):
    assert parse_integer(text) is None


def test_sign_and_zero_targets():
    assert accuracy_reward("<think>t</think><answer>-0</answer>", 0) == 1.0
    assert accuracy_reward("<think>t</think><answer>+5</answer>", 5) == 1.0
    assert accuracy_reward("<think>t</think><answer>-5</answer>", -5) == 1.0
    assert accuracy_reward("<think>t</think><answer>-5</answer>", 5) == 0.0
    assert accuracy_reward(GOOD, "0432") == 1.0  # string targets go through the same parser


@pytest.mark.parametrize("target", [432.0, True, None, "4e2", "abc"])
def test_bad_target_raises(target):
    with pytest.raises((TypeError, ValueError)):
        accuracy_reward(GOOD, target)


def test_enormous_inputs_are_rejected_fast():
    huge_answer = "<think>t</think><answer>" + "9" * 10**6 + "</answer>"
    too_long = "<think>" + "x" * MAX_COMPLETION_CHARS + "</think><answer>432</answer>"
    spaces = "<" + " " * (MAX_COMPLETION_CHARS - 1)  # worst case for the tag scanner
    start = time.perf_counter()
    assert accuracy_reward(huge_answer, 432) == 0.0
    assert parse_integer("9" * 10**6) is None
    assert format_reward(too_long) == 0.0 and extract_answer(too_long) is None
    assert format_reward(spaces) == 0.0
    assert time.perf_counter() - start < 0.5


def test_limit_is_inclusive():
    filler = MAX_COMPLETION_CHARS - len(GOOD)
    at_limit = GOOD.replace("<think>", "<think>" + "x" * filler)
    assert len(at_limit) == MAX_COMPLETION_CHARS
    assert format_reward(at_limit) == 1.0
    assert format_reward(at_limit.replace("<think>", "<think>x")) == 0.0


def test_non_string_completion_scores_zero():
    for bad in (None, 432, b"<think>t</think><answer>432</answer>"):
        assert format_reward(bad) == 0.0
        assert extract_answer(bad) is None
        assert accuracy_reward(bad, 432) == 0.0
        assert partial_format_reward(bad) == 0.0


@pytest.mark.parametrize(
    "completion,partial",
    [(GOOD, 1.0), ("", 0.0), ("<think>", 0.25), ("<think></think>", 0.5), ("<answer>432</answer>", 0.5),
     (SPAM, 1.0), (SPAM * 50, 1.0), ("<think><answer></think></answer>", 1.0)],
)
def test_partial_format_reward_counts_tags_by_substring(completion, partial):
    assert partial_format_reward(completion) == partial


def test_tag_spam_hacks_partial_reward_but_not_strict():
    for spam in (SPAM, SPAM * 50, "<think><answer></think></answer>", "<answer></answer><think></think>"):
        assert partial_format_reward(spam) == 1.0  # full credit, same as a perfect completion
        assert format_reward(spam) == 0.0
        assert accuracy_reward(spam, 432) == 0.0
    assert partial_format_reward(GOOD) == format_reward(GOOD) == 1.0
