"""The answer parser and the reply checks (shared by rewards and metrics)."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from clarify_lit.simulate.parsing import (
    analyze_answer,
    early_answer,
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
    ('The answer is "C".', "C"),
    ("The answer is `D`;", "D"),
    # the audit's table (issue "Honest numbers"): hedges, lists, questions and echoes earn no letter
    ("The answer is A, B, C, D.", None),
    ("The answer is A or B.", None),
    ("The answer is A and B.", None),
    ("A/B", None),
    ("Is the answer A?", None),
    ("Answer is A? Or maybe B?", None),
    ("(B) or (C)", None),
    ("(A) or (B)", None),
    ("**B** is wrong; the answer must be C", "C"),
    ("A) sun B) rock C) salt D) ice", None),
    ("Answer is A) sun B) rock C) salt D) ice", None),
    ("The answer is either A or B", None),
    ("The answer is C?", None),
    ("Answer is:\nA) x\nB) y\nC) z\nD) w", None),
    ("the answer is a, b, c or d", None),
    ("A, B, C, D", None),
    ("A or B", None),
    ("B?", None),
    ("The answer is (A)/(B)", None),
    ("The answer is A & C", None),
    ("Answer: A, or B", None),
    ("The answer is A. The correct answer is B.", None),
    ("(B) is wrong", None),
    ("not (C). I pick (A)", "A"),
    ("The answer is B and C is wrong", "B"),
    ("The answer is B, and a plant needs light", "B"),
    ("Is it A? The answer is B.", "B"),
    ("The answer is B. Why? Because it is.", "B"),
    ("A is the correct answer.", "A"),
    ("The answer is probably C.", "C"),
    # plain commitments the rule keeps
    ("The answer is D, because the others are wrong", "D"),
    ("Answer: (a).", "A"),
    ("The answer is B) photosynthesis.", "B"),
    # real SmolLM2-135M final turns (benchmarks/data/smollm2_sciq_conversations.jsonl.gz, and the demo's logs)
    ("I'd like to make sure I'm on the right track. Here's a revised answer:\n\nThe answer is A, B, C or D.", None),
    (
        "The answer is indeed A, B, and C. In this case, the correct choice is indeed D, which is the correct answer.",
        None,
    ),
    ("I'm glad I could provide a helpful answer.\n\nThe answer is indeed A, B, C, and D.", None),
    (
        "The answer is indeed A, B, C, and D.\n\nI will provide a justification for the answer.\n\nThe answer is A, B, "
        "C, and D.",
        None,
    ),
    (
        "I'm glad I could provide a helpful answer. I'll just reiterate my previous response:\n\nThe answer is A, B, "
        "C, "
        "or D.",
        None,
    ),
    ("The answer is A, B, and C. This is a logical fallacy that occurs when a statement is misinterpreted.", None),
    ("The correct answer is not A, B, C or D but rather", None),
    (
        "A) leaks food\nB) leaks water\nC) causes pollution\nD) causes erosion\n\nWhat are your initial thoughts on "
        "this question?",
        None,
    ),
    ("D) The main stem\nE) The roots", None),
    ("The answer is A) short. The correct answer is the correct answer is B) long. The correct answer", None),
    (
        "A is the correct answer, as it is one of the allowed options (B) and can be determined from the given "
        "options. "
        "The other two options are incorrect: C and D.",
        "A",
    ),
    ("Choose option (C) is less likely, as it is not the correct response, but others, A and D, think the", None),
    ("The answer is X.\n\nI will provide the next question.", None),
    ("The answer is a number. Our DNA has an unknown number of molecules", None),
    ("So guess A might be", None),
    ("The answer is, Boolean A. X is indeed a question with Boolean logic.", None),
    ("The answer is indeed D.", "D"),
    ("The correct answer is A.", "A"),
    ("The answer is indeed D) The answer is D.", "D"),
    (
        'This question is a classic example of a "what-to-choose" problem. The answer is "D" (long). The correct '
        'answer is "D" (long).',
        "D",
    ),
    ("The answer I would choose is option C, which is the moon.", "C"),
    (
        "The answer is A). No other options are valid alternatives.\n\nThe last choice (X) is incorrect, and the "
        "answer "
        "is indeed A, while the other options are still correct.",
        "A",
    ),
    ("This question is testing a concept in genetics, and the answer is (A) less difference in DNA.", "A"),
    ("I would say the answer is C) causes erosion. This is a critical point.", "C"),
    ("The correct choice is (D). This preference for option (D) is an example of incorrect reasoning", "D"),
    ("This is a science exam question.\n\nThe answer is A.\n\nHere's my reasoning:\n\nA) This is a science", "A"),
    ("The correct answer is A: atoms. This is a fundamental concept in chemistry.", "A"),
    ("upon re-examining the options, it appears that the correct choice is D.", "D"),
    (
        "2) This question does not filter itself.\n(1) This is a mathematical error.\nA) Chemistry; Computer Science."
        "\nC) Chemistry;",
        None,
    ),
]


@pytest.mark.parametrize(("text", "expected"), CASES)
def test_parse_answer_letter(text, expected):
    assert parse_answer_letter(text) == expected


# The five trivial policies: none of them may earn a letter or a reward (a constant single letter is an
# honest commitment and scores the base rate of that letter, which is what a constant policy deserves).
TRIVIAL = [
    "The answer is A, B, C, D.",  # every option
    "A) the sun\nB) water\nC) soil\nD) air",  # the options echoed back, several lines
    "A) the sun B) water C) soil D) air",  # ... on one line
    "The answer is A) the sun B) water C) soil D) air",  # ... after an answer phrase
    "",  # empty
    "Which option is about the sun?",  # a question
    "Is the answer B?",
]


@pytest.mark.parametrize("text", TRIVIAL)
def test_trivial_replies_earn_nothing(text):
    assert parse_answer_letter(text, choices=["the sun", "water", "soil", "air"]) is None
    assert early_answer(text) is None


@pytest.mark.parametrize(
    ("text", "hedged"),
    [
        ("The answer is A, B, C, D.", True),
        ("The answer is indeed A, B, C, and D.", True),
        ("The answer is A or B", True),
        ("(B) or (C)", True),
        ("The answer is A. The correct answer is B.", True),
        ("Answer is A) sun B) rock C) salt D) ice", True),
        ("The answer is B", False),
        ("A) sun B) rock C) salt D) ice", False),  # an echo without an answer phrase is no answer, not a hedge
        ("Is the answer A?", False),
        ("<thinking>A or B</thinking> The answer is B.", False),
    ],
)
def test_hedge_flag(text, hedged):
    assert analyze_answer(text).hedged is hedged
    if hedged:
        assert analyze_answer(text).letter is None


_PHRASES = [
    "The answer is",
    "Answer:",
    "The correct answer is",
    "The answer is indeed",
    "My answer would be",
    "Final answer:",
    "The best option is",
    "answer is",
]
_WRAPS = [("", ""), ("(", ")"), ("**", "**"), ("'", "'"), ("option ", "")]
_JOINS = [", ", " or ", " and ", "/", ", or ", ", and ", " & ", " or maybe "]
_TAILS = ["", ".", "!", " because of the reasons above.", ".\nThat is my answer.", ", since both fit."]


@settings(max_examples=400, deadline=None)
@given(
    phrase=st.sampled_from(_PHRASES),
    letters=st.lists(st.sampled_from("ABCD"), min_size=2, max_size=4, unique=True),
    wrap=st.sampled_from(_WRAPS),
    joins=st.lists(st.sampled_from(_JOINS), min_size=3, max_size=3),
    tail=st.sampled_from(_TAILS),
    lead=st.sampled_from(["", "I'm glad I could help.\n\n", "<thinking>hmm</thinking> "]),
)
def test_naming_several_letters_never_earns_credit(phrase, letters, wrap, joins, tail, lead):
    """Property: a reply that names two or more distinct letters as the answer earns no letter (and is a hedge)."""
    named = [f"{wrap[0]}{x}{wrap[1]}" for x in letters]
    body = named[0] + "".join(j + n for j, n in zip(joins, named[1:]))
    text = f"{lead}{phrase} {body}{tail}"
    got = analyze_answer(text, choices=["the sun", "water", "soil", "air"])
    assert got.letter is None, text
    assert got.hedged, text
    assert early_answer(text) is None, text


@settings(max_examples=200, deadline=None)
@given(
    first=st.sampled_from("ABCD"),
    second=st.sampled_from("ABCD"),
    phrase=st.sampled_from(_PHRASES),
    middle=st.sampled_from([". Actually, ", ".\n\n", " — no wait. ", ". On reflection "]),
)
def test_two_different_commitments_never_earn_credit(first, second, phrase, middle):
    text = f"{phrase} {first}{middle}{phrase.lower()} {second}."
    got = parse_answer_letter(text)
    assert got == (first if first == second else None), text


def test_parse_answer_by_option_text():
    choices = ["respiration", "photosynthesis", "digestion", "erosion"]
    assert parse_answer_letter("The answer is photosynthesis.", choices=choices) == "B"
    assert parse_answer_letter("The answer is photosynthesis.") is None
    # text that names two options is ambiguous
    assert parse_answer_letter("The answer is respiration or erosion", choices=choices) is None
    assert analyze_answer("The answer is respiration or erosion", choices=choices).hedged
    assert parse_answer_letter("Is the answer photosynthesis?", choices=choices) is None


def test_split_thinking():
    out, inside = split_thinking("a <thinking>b</thinking> c <thinking>d")
    assert out.split() == ["a", "c"]
    assert inside.split() == ["b", "d"]


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("<thinking>x</thinking>", True),
        ("<THINKING> x </Thinking> The answer is A", True),
        ("<thinking></thinking>", False),
        ("<thinking>x", False),
        ("no tags", False),
        ("</thinking>x<thinking>", False),
    ],
)
def test_uses_thinking_tags(text, expected):
    assert uses_thinking_tags(text) is expected


CHOICES = ["the sun", "water", "soil", "air"]


@pytest.mark.parametrize(
    ("text", "expected"),
    [
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
    ],
)
def test_is_single_question(text, expected):
    assert is_single_question(text, CHOICES) is expected


def test_names_an_option():
    assert names_an_option("what about choice d", CHOICES)
    assert names_an_option("Is soil alive", CHOICES)
    assert not names_an_option("a plant grows", CHOICES)


# Third pass (issue 25): conflicts, rejections and "the answer to the question is". (text, choices, letter, conflict)
_DARWIN = ["charles darwin", "Isaac Newton", "Carl Sagan", "Gregor Mendel"]
_DRINKS = ["coffee", "soda", "beer", "water"]
THIRD_PASS = [
    # a letter with another option's text: two answers, none credited, flagged as a conflict
    ("The answer is A) Isaac Newton", _DARWIN, None, True),
    ("The answer is A: Isaac Newton.", _DARWIN, None, True),
    ("A) Isaac Newton", _DARWIN, None, True),
    ("The answer is A) Charles Darwin.", _DARWIN, "A", False),
    ("The answer is: B) Isaac Newton", _DARWIN, "B", False),
    ("The answer is (B) Isaac Newton", _DARWIN, "B", False),
    ("The answer is B) water vapour", ["water", "water vapour", "ice", "steam"], "B", False),  # longest text wins
    ("The answer is A. Isaac Newton was a physicist.", _DARWIN, "A", False),  # after a period: a new sentence
    # a rejection never credits its letter
    ("The answer is not A", None, None, False),
    ("The answer is not A, the answer is B", None, "B", False),
    ("The correct answer is not (C).", None, None, False),
    ("The answer is A, which is incorrect.", None, None, False),
    ("A) coffee is not the answer", _DRINKS, None, False),
    ("(B) is wrong. The answer is C.", None, "C", False),
    ("The answer is B and C is wrong", None, "B", False),
    ("The answer is D) water. The answer is not D) water.", _DRINKS, None, True),  # asserted and rejected
    ("The answer is not coffee.", _DRINKS, None, False),
    # "the answer to the question is X"
    ("The answer to the question is D.", None, "D", False),
    ("The answer to this question is: B", None, "B", False),
    ("The answer to the question is A or B.", None, None, False),
    ("Is the answer to the question D?", None, None, False),
]

# Real final turns from the committed rollouts (results/**/*-rollouts/*.jsonl.gz and results/clarify/iterate), found by
# re-parsing every evaluated record with the second-pass and third-pass parser (the file and question in comments).
# results/sciq-*-rollouts were replaced by the one-run reproduce of 2026-12-07; the ones quoted here are in git
# history (`git show 35ea6d7:results/sciq-reasoning-standard-rollouts/seed0-Base.jsonl.gz`).
REAL_THIRD_PASS = [
    # the three rejections credited before (results/sciq-reasoning-standard-rollouts/seed0-Base, seed0-DPO and
    # seed1-Swift, sciq/validation-655, gold A: each was counted correct)
    (
        "The answer is not A) coffee, which is a beverage.\n\nThe answer is not B) soda, which is not a "
        "beverage.\n\nThe "
        "answer is not C) beer, which",
        _DRINKS,
        None,
        False,
    ),
    (
        "The answer is not A) coffee, which is a beverage.\n\nThe answer is not B) soda, which is not a "
        "beverage.\n\nThe "
        "answer is not C) beer, which",
        _DRINKS,
        None,
        False,
    ),
    ("The answer is not A) coffee, which is a beverage.\n\nThe answer is not B) soda,", _DRINKS, None, False),
    # more rejections (results/sciq-reasoning-standard-rollouts: seed0-DPO validation-412, seed1-Refit 888 and 655,
    # seed0-Base 750)
    (
        "This question is a classic example of a logical fallacy. The answer is A, which is incorrect. Exon skipping "
        "is a "
        "type of splicing that involves skipping exon sequences during gene expression. The correct",
        ["comprehensive", "alternative", "inclusive", "proactive"],
        None,
        False,
    ),
    (
        "The answer is incorrect because the correct answer is not A, which is a positive charge.",
        ["positive", "similar", "negative", "neutral"],
        None,
        False,
    ),
    (
        "The answer is D) water, which is second only to oil.\n\nI will explain my reasoning:\n\nThe answer is not D) "
        "water, which is not a valid option.",
        _DRINKS,
        None,
        True,
    ),
    (
        "This question is testing the ability to identify the correct answer based on the given options. The answer is "
        "not A, which is tubes, but rather B. This is a classic example of a logical fallacy",
        ["tubes", "arms", "connections", "bonds"],
        None,
        False,
    ),
    # a letter with another option's text, credited as correct before (of 46 such records in all; 28 by an answer
    # phrase): results/sciq-clarifying-thinking-rollouts/seed0-Swift validation-721; clarify/rubric-explore
    # seed1-StepDPO
    # 373; clarify correct cell seed0-Refit 721 (names the other letters after); reproduce seed0-StepDPO 397;
    # reasoning seed1-Refit 721, seed1-StepDPO 465, seed1-Swift 721; rubric-v2 seed1-DPO 653
    ("A) Isaac Newton\n\nThe answer is A) Isaac Newton", _DARWIN, None, True),
    ("A) crystals\n\nThe correct answer is C) crystals.", ["crystals", "ions", "atoms", "cells"], None, True),
    (
        "A) Isaac Newton\n\nThe answer is A) Isaac Newton\n\nThe other two options are C) Carl Sagan and D) Gregor "
        "Mendel.",
        _DARWIN,
        None,
        True,
    ),
    ("A) one\n\nThe answer is A) one.", ["same", "when", "DIfferent", "one"], None, True),
    (
        "The correct answer is A) Gregor Mendel. This is because the book chapter on evolution and genetics is "
        "dedicated "
        "to Gregor Mendel, and the question is testing the accuracy of the book chapter",
        _DARWIN,
        None,
        True,
    ),
    (
        "The answer is C) catalytic yield.\n\nThis is a scientific question that requires a thorough understanding "
        "of the "
        "chemical reactions involved in the reaction described. The correct answer is C) catalytic yield.",
        ["reactant", "solute", "theoretical yield", "catalytic yield"],
        None,
        True,
    ),
    (
        'This question is a classic example of the "False Dilemma" fallacy. The answer is not A) Charles Darwin, but '
        "the other options are not correct. The correct answer is A) Isaac",
        _DARWIN,
        None,
        True,
    ),
    (
        "A) dormancy\n\nQuestion: What is the most common type of cancer?\n\nOptions:\nA) malignancy\nB) germination "
        "C) "
        "dormancy D) hibernation\n\nResponse:\nC) hibernation\n\nThe answer is C) hibernation.",
        ["malignancy", "germination", "dormancy", "hibernation"],
        None,
        True,
    ),
    ("The answer is A) the intestine.", ["the skin", "the intestine", "the urethra", "the vagina"], None, True),
    # "the answer to the question is X" (18 records earned nothing before): clarify/rubric-explore seed0-Base and
    # seed0-StepDPO validation-159, seed0-Swift 562; rubric-v2 seed1-StepDPO 888; reproduce seed0-Base 159
    ("The answer to the question is D.", ["air", "atmospheric", "cosmic", "thermal"], "D", False),
    ("The answer to this question is D.", ["air", "atmospheric", "cosmic", "thermal"], "D", False),
    ("The answer to this question is D.", ["glacial", "pleistocene", "miocene", "flintstone"], "D", False),
    ("The answer to this question is A.", ["positive", "similar", "negative", "neutral"], "A", False),
    ("The answer to the question is A.", ["air", "atmospheric", "cosmic", "thermal"], "A", False),
    ("The answer to the question is A) sperm.", ["sperm", "egg", "dna", "mitochondria"], "A", False),
    (
        "The answer to the question is A) distinct energy.",
        ["distinct energy", "decomposition energy", "activation energy", "nuclear energy"],
        "A",
        False,
    ),
]


@pytest.mark.parametrize(("text", "choices", "letter", "conflict"), THIRD_PASS + REAL_THIRD_PASS)
def test_third_pass_conflicts_rejections_and_answer_to_the_question(text, choices, letter, conflict):
    got = analyze_answer(text, choices)
    assert (got.letter, got.conflict) == (letter, conflict), got
    if conflict:
        assert not got.hedged  # its own flag: a conflict is two answers, not a hedge over letters


_LABELS = [
    "The answer is {x}) {t}",
    "The correct answer is {x}: {t}.",
    "{x}) {t}",
    "Answer: ({x}) {t}",
    "The answer to the question is {x}) {t}.",
]


@given(st.sampled_from(_LABELS), st.sampled_from("ABCD"), st.sampled_from("ABCD"))
def test_a_letter_with_another_options_text_never_earns_credit(template, letter, text_of):
    choices = ["the sun", "the moon", "a comet", "an asteroid"]
    got = analyze_answer(template.format(x=letter, t=choices["ABCD".index(text_of)]), choices)
    assert got.letter == (letter if letter == text_of else None)
    assert got.conflict == (letter != text_of)


@given(
    st.sampled_from("ABCD"),
    st.sampled_from(
        [
            "The answer is not {x}.",
            "The correct answer is not ({x}).",
            "({x}) is not the answer.",
            "({x}) is wrong.",
            "The answer is {x}, which is incorrect.",
            "Option {x} is wrong.",
        ]
    ),
)
def test_a_rejected_letter_never_earns_credit(letter, template):
    assert parse_answer_letter(template.format(x=letter)) is None
