"""The answer parser and the reply checks (shared by rewards and metrics)."""

from __future__ import annotations

import pytest

from clarify_lit.simulate.parsing import (
    is_single_question,
    names_an_option,
    parse_answer_letter,
    split_thinking,
    uses_thinking_tags,
)

CASES = [
    # the required formats
    ("The answer is B", "B"),
    ("The answer is B.", "B"),
    ("Answer is C. Because plants need light.", "C"),
    ("Answer: D", "D"),
    ("answer: d", "D"),
    ("The answer is (A)", "A"),
    ("The answer is **C**.", "C"),
    ("The answer is: B) the sun", "B"),
    ("The answer is option D!", "D"),
    ("The correct answer is (c).", "C"),
    ("Final answer: [D]", "D"),
    ("The best option is B.", "B"),
    ("answer is 'c'", "C"),
    ("The answer is A: photosynthesis", "A"),
    ("Answer is D, because the others are wrong", "D"),
    ("My answer would be C", "C"),
    ("THE ANSWER IS B", "B"),
    # lowercase: a letter only where it cannot be the article
    ("the answer is a.", "A"),
    ("the answer is a", "A"),
    ("the answer is a bit unclear", None),
    ("The answer is A because", "A"),
    ("The answer is Also unclear", None),
    # bare letters
    ("(A)", "A"),
    ("**B**", "B"),
    ("B", "B"),
    ("B) the sun", "B"),
    ("b)", "B"),
    ("C.", "C"),
    ("A plant needs water", None),
    # the option list echoed back is not an answer
    ("A) thermometer\nB) ruler\nC) scale\nD) clock", None),
    ("A) Earth's orbit\nB) Earth's orbit\nC) Clouds", None),
    ("The answer is C.\nA) x\nB) y\nC) z", "C"),
    ("B) ruler\nbecause it measures length", "B"),
    # ambiguous or absent
    ("I think (A) or (B)", None),
    ("Option A is wrong and option C is wrong", None),
    ("The answer is E", None),
    ("", None),
    ("I am not sure.", None),
    # the first explicit answer counts; "option X" mentions are not commitments
    ("Option A is wrong; the answer is C.", "C"),
    ("The answer is not A, the answer is B", "B"),
    ("The answer is A. Option B is tempting but wrong.", "A"),
    # thinking tags: outside preferred, inside as fallback
    ("<thinking>the answer is b</thinking>", "B"),
    ("<thinking>The answer is A</thinking> The answer is C.", "C"),
    ("The answer is C <thinking>maybe the answer is A</thinking>", "C"),
    ("(A) is tempting <thinking>x</thinking> Answer: B", "B"),
    ("<thinking>reasoning about (A) and (B)", None),
    ("The answer is A.\n<thinking>B is wrong", "A"),
    ("<THINKING>answer: d</THINKING>", "D"),
    ("<thinking>hmm</thinking>\n**D**", "D"),
    # trailing punctuation and wrappers
    ("The answer is B!!!", "B"),
    ("The answer is \"C\".", "C"),
    ("The answer is `D`;", "D"),
]


@pytest.mark.parametrize(("text", "expected"), CASES)
def test_parse_answer_letter(text, expected):
    assert parse_answer_letter(text) == expected


def test_parse_answer_by_option_text():
    choices = ["respiration", "photosynthesis", "digestion", "erosion"]
    assert parse_answer_letter("The answer is photosynthesis.", choices=choices) == "B"
    assert parse_answer_letter("The answer is photosynthesis.") is None
    # text that names two options is ambiguous
    assert parse_answer_letter("The answer is respiration or erosion", choices=choices) is None


def test_split_thinking():
    out, inside = split_thinking("a <thinking>b</thinking> c <thinking>d")
    assert out.split() == ["a", "c"]
    assert inside.split() == ["b", "d"]


@pytest.mark.parametrize(("text", "expected"), [
    ("<thinking>x</thinking>", True),
    ("<THINKING> x </Thinking> The answer is A", True),
    ("<thinking></thinking>", False),
    ("<thinking>x", False),
    ("no tags", False),
    ("</thinking>x<thinking>", False),
])
def test_uses_thinking_tags(text, expected):
    assert uses_thinking_tags(text) is expected


CHOICES = ["the sun", "water", "soil", "air"]


@pytest.mark.parametrize(("text", "expected"), [
    ("What does option B mean?", True),
    ("Is the sun a star?", True),
    ("Is A right?", True),
    ("Does (C) include sand?", True),
    ("<thinking>hmm</thinking> Does water count as (B)?", True),
    ("What? Why is B?", False),  # two questions
    ("Tell me about B.", False),  # not a question
    ("Is B correct? I think so.", False),  # does not end with the question
    ("What is the question about?", False),  # names no option
    ("A plant needs what?", False),  # "A" here is the article
])
def test_is_single_question(text, expected):
    assert is_single_question(text, CHOICES) is expected


def test_names_an_option():
    assert names_an_option("what about choice d", CHOICES)
    assert names_an_option("Is soil alive", CHOICES)
    assert not names_an_option("a plant grows", CHOICES)
