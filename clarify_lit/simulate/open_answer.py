"""Open answers: grading a final answer given in words, and finding the questions in a student's turn.

In open mode (``--mode open``, docs/simulate.md#open-mode) the student never sees the options; they are kept for
grading only. A final answer is graded by which options' texts it *names*, in any inflection the teacher's blanking
already recognises (:func:`option_pattern`: "a zygospore" matches "zygospores", "carbon dioxide" matches "Carbon
Dioxide's"):

* exactly one option named, and it is the gold one → correct;
* two or more options named → a hedge (0), counted as ``hedged``;
* no option named → wrong, counted apart as ``names_none`` (the model answered something else, or nothing).

Only the text outside ``<thinking>…</thinking>`` is read when there is any (a student may think aloud about several
candidates before committing). An option whose text contains another option's text ("water" and "salt water") is
named only where its own longer text does not cover the match, so "salt water" names one option, not two.

Worked example, options ``["mitochondria", "nucleus", "ribosome", "cell wall"]``, gold A:

>>> grade_open_answer("The answer is the mitochondrion.", ["mitochondria", "nucleus", "ribosome", "cell wall"]).letter
'A'
>>> grade_open_answer("Mitochondria or the nucleus", ["mitochondria", "nucleus", "ribosome", "cell wall"]).hedged
True
>>> grade_open_answer("The answer is: The answer is:", ["mitochondria", "nucleus", "ribosome", "cell wall"]).how
'none'
"""

from __future__ import annotations

import re
from collections.abc import Sequence

from clarify_lit.simulate.parsing import LETTERS, AnswerParse, split_thinking

_WORD = re.compile(r"[a-z0-9]+")
_ARTICLES = frozenset({"a", "an", "the"})
_SUFFIXES = (
    "ation",
    "ition",
    "ment",
    "ies",
    "ing",
    "ion",
    "ia",
    "um",
    "us",
    "on",
    "es",
    "ed",
    "er",
    "s",
    "y",
    "e",
    "a",
    "i",
)


def _stem(word: str) -> str:
    """A crude stem so one pattern matches a word's singular/plural, inflected and derived forms (cell/cells,
    energy/energies, evaporation/evaporates/evaporating, mitochondria/mitochondrion); the stem keeps ≥ 4 letters."""
    for suffix in _SUFFIXES:
        if len(word) - len(suffix) >= 4 and word.endswith(suffix):
            return word[: -len(suffix)]
    return word


def option_pattern(text: str) -> re.Pattern[str] | None:
    """A case-insensitive pattern for an option's text in any inflection ("a zygospore" → zygospore(s), "carbon
    dioxide" → carbon dioxide(s)); leading articles are optional. ``None`` when the text has no word to match."""
    words = [w for w in _WORD.findall(text.lower()) if len(w) > 1]  # drops the "s" of a possessive "Earth's"
    while words and words[0] in _ARTICLES:
        words = words[1:]
    if not words or len("".join(words)) < 2:
        return None
    # between words: any run of non-letters, or a possessive "'s" ("Earth's rotation", "earths rotation")
    parts = [re.escape(_stem(w)) + r"[a-z]{0,6}" for w in words]
    return re.compile(r"(?i)\b" + r"(?:'s)?[^a-z0-9]+".join(parts) + r"\b")


def named_options(text: str, choices: Sequence[str]) -> list[int]:
    """Indices of the options whose text ``text`` names (any inflection), a match inside a longer option's match
    not counting for the shorter option ("salt water" names "salt water", not also "water")."""
    spans: dict[int, list[tuple[int, int]]] = {}
    for i, choice in enumerate(choices):
        pat = option_pattern(choice)
        spans[i] = [m.span() for m in pat.finditer(text)] if pat is not None else []
    named = []
    for i, own in spans.items():
        others = [s for j, ss in spans.items() if j != i for s in ss]
        if any(not any(a <= s and e <= b and (b - a) > (e - s) for a, b in others) for s, e in own):
            named.append(i)
    return named


def grade_open_answer(text: str, choices: Sequence[str]) -> AnswerParse:
    """The letter of the one option a free-text answer names (``how="open"``); ``hedged`` when it names several;
    ``letter=None, how="none"`` when it names none (see the module docstring)."""
    outside, _ = split_thinking(text or "")
    body = outside if outside.strip() else (text or "")
    named = named_options(body, choices)
    if len(named) == 1:
        return AnswerParse(LETTERS[named[0]], how="open")
    if len(named) > 1:
        return AnswerParse(None, hedged=True, how="open")
    return AnswerParse(None)


_SENTENCE = re.compile(r"[^.!?\n]*\?+|[^.!?\n]+[.!\n]?")


def questions_in(text: str) -> list[str]:
    """The questions of a student turn, in order: the sentences (outside thinking tags) that end with "?"."""
    outside, _ = split_thinking(text or "")
    body = outside if outside.strip() else (text or "")
    return [s.strip() for s in _SENTENCE.findall(body) if s.strip().endswith("?") and len(s.strip()) > 1]


def holds_one_question(text: str) -> bool:
    """True if a student turn holds exactly one question (open mode's asking metric: no options to be about)."""
    return len(questions_in(text)) == 1
