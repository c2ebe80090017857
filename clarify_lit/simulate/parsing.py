"""Answer parsing: the one parser that rewards and metrics share (rule: docs/evaluation.md#answer-parsing).

A reply earns a letter only when it **asserts exactly one letter as its answer**. :func:`analyze_answer` reads a
final assistant turn and returns an :class:`AnswerParse`: the letter (A–D) or ``None``, and whether the reply
*hedged* (named several letters as its answer). Evidence comes in two strengths, and the text *outside*
``<thinking>…</thinking>`` (where the prompts ask for the answer) is read before the inside at each strength:

1. strong — an explicit answer phrase: "The answer is B", "Answer is C", "Answer: (c)", "final answer is **D**",
   "the correct option is B", "the answer must be C", "the answer to the question is D", "A is the correct answer".
   Every such phrase in the text is read; they must all name the same letter;
2. weak — a bare letter at the very start ("B", "B) ...", "(B)", "**B**"), else a letter marked on its own ("(B)",
   "**B**", "option B") when exactly one distinct letter is marked that way, else (with ``choices``) an answer phrase
   quoting exactly one option's text.

What earns nothing (``letter=None``):

* alternatives and lists — "A or B", "A, B, C, D", "A/B", "A and B", "either A or B", "(B) or (C)": *hedged*;
* several different commitments — "The answer is A. … The correct answer is B.": *hedged*;
* the option list echoed back, on one line or several ("A) sun B) rock C) salt", "Answer is:\\nA) x\\nB) y"); after an
  answer phrase that is a *hedge* too (the reply offers every option as its answer);
* a question — "Is the answer A?", "The answer is C?", "Answer is A? Or maybe B?": a sentence that ends in "?" asks;
* a letter marked only to reject it — "(B) is wrong", "not (C)", "The answer is not A", "The answer is A, which is
  incorrect", "A) coffee is not the answer";
* a *conflict* (``conflict``, not ``hedged``) — a letter written as an option label with *another* option's text
  ("The answer is A) Isaac Newton" where Isaac Newton is option B; needs ``choices``), or one letter both asserted
  and rejected ("The answer is D) water … The answer is not D) water").

So "(A) is tempting <thinking>…</thinking> Answer: B" is B and "**B** is wrong; the answer must be C" is C. A
lowercase letter counts only where it cannot be the English article ("the answer is a." yes, "the answer is a bit
unclear" no).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

LETTERS = ("A", "B", "C", "D")

_THINK_BLOCK = re.compile(r"<\s*thinking\s*>(.*?)<\s*/\s*thinking\s*>", re.IGNORECASE | re.DOTALL)
_THINK_OPEN = re.compile(r"<\s*thinking\s*>", re.IGNORECASE)
_THINK_CLOSE = re.compile(r"<\s*/\s*thinking\s*>", re.IGNORECASE)

# Wrappers a model puts around a letter: brackets, bold/italic markers, quotes.
_OPEN = r"[\(\[\*_\"'`]*"
_CLOSE = r"[\)\]\*_\"'`]*"
# What may follow an answer letter: end of text, punctuation, closing wrappers, or whitespace.
_AFTER_UPPER = r"(?![A-Za-z0-9])"
# A lowercase letter must be followed by end/punctuation/wrapper, never by another word ("is a bit").
_AFTER_LOWER = r"(?=\s*(?:$|[\)\]\*_\"'`.,;:!?/\n]))"

_ANSWER_PHRASE = (
    # "answer", "correct choice", "best option" — a bare "option B" is not a commitment ("option B is wrong")
    r"(?:\banswer\b|\b(?:correct|right|best)\s+(?:option|choice)\b)"
    # "The answer to the question is D." (12 real final turns earned nothing before the third pass, issue 25)
    r"(?:\s+to\s+(?:the|this|that)\s+question)?"
    r"(?:\s+(?:is|would\s+be|will\s+be|should\s+be|must\s+be|has\s+to\s+be|=))?"
    r"(?:\s+(?:probably|likely|clearly|definitely|indeed|therefore|thus|then))?"
    r"\s*[:=\-]?\s*"
    r"(?P<either>either\s+)?"
    r"(?:\s*(?:option|choice|letter)\s+)?"
)
# Separators that join alternative letters: "A or B", "A, B", "A/B", "A and B", "A & B", "A, or B", "A vs B".
_SEPARATOR = (
    r"(?:\s*(?:,|/|&|\+|;)\s*(?:(?:or|and)\s+)?|\s+(?:or|and|nor|and/or|vs\.?|versus)\s+)"
    r"(?:(?:maybe|perhaps|possibly|even|also|probably)\s+)?"
)


@dataclass(frozen=True)
class AnswerParse:
    """What a reply commits to: ``letter`` (or ``None``), and ``hedged`` when it names several letters as its answer.

    ``conflict`` when it pairs a letter with another option's text ("The answer is A) Isaac Newton" where Isaac
    Newton is option B) or both asserts and rejects a letter: two answers, so none (and not a hedge over letters).
    ``how`` says which evidence decided (``phrase``, ``start``, ``marked``, ``text``, ``conflict``; ``none``), for
    audits.
    """

    letter: str | None
    hedged: bool = False
    how: str = "none"
    conflict: bool = False


_NONE = AnswerParse(None)


@dataclass(frozen=True)
class _Patterns:
    letters: str
    phrase: re.Pattern[str]  # "the answer is B"
    reverse: re.Pattern[str]  # "B is the correct answer"
    start: re.Pattern[str]  # a letter at the very start
    marked: re.Pattern[str]  # "(B)", "**B**", "option B" anywhere
    alternative: re.Pattern[str]  # right after a letter: ", B", " or (C)", "/D"
    negated: re.Pattern[str]  # "the answer is not B", "the correct answer is not (B)"


def _compile(letters: str) -> _Patterns:
    up = f"[{letters.upper()}]"
    low = f"[{letters.lower()}]"
    letter = rf"(?:(?P<up>{up}){_AFTER_UPPER}|(?P<low>{low}){_AFTER_LOWER})"
    phrase = re.compile(r"(?i:" + _ANSWER_PHRASE + ")" + _OPEN + letter)
    reverse = re.compile(
        r"(?:^|(?<=[\s(\[*_\"'`]))"
        + _OPEN
        + rf"(?P<up>{up})"
        + _CLOSE
        + r"(?i:\s+(?:is|would\s+be|must\s+be)\s+(?:the\s+)?(?:correct|right|best|final)\s+(?:answer|option|choice)\b)"
    )
    # A letter at the very start of the text: "B", "B.", "B) Sun", "(b)", "**C**" — but not the article "A plant".
    start = re.compile(
        r"^\s*(?:[\(\[]\s*(?P<w>[" + letters + letters.lower() + r"])\s*[\)\]]"
        r"|[\*_]+(?P<b>[" + letters + letters.lower() + r"])[\*_]+"
        rf"|(?P<up>{up})\s*(?:[\).:]|$|(?={_SEPARATOR}))"
        rf"|(?P<low>{low})\s*(?:[\)]|$))"
    )
    # A letter marked on its own anywhere: "(B)", "[B]", "**B**", "option B".
    marked = re.compile(
        r"(?:[\(\[]\s*(?P<w>[" + letters + r"])\s*[\)\]]"
        r"|\*\*(?P<b>[" + letters + r"])\*\*"
        rf"|(?i:\b(?:option|choice)\s+)(?P<o>{up}){_AFTER_UPPER})"
    )
    alternative = re.compile(
        r"^"
        + _CLOSE
        + r"(?:\s*[\).:])?"
        + r"(?i:"
        + _SEPARATOR
        + r")(?i:(?:option|choice|letter)\s+)?"
        + _OPEN
        + rf"(?:(?P<up>{up}){_AFTER_UPPER}|(?P<low>{low}){_AFTER_LOWER})"
        # "the answer is B and C is wrong" goes on to judge another option; it does not offer it
        + r"(?!"
        + _CLOSE
        + r"\s+(?:is|was|seems|looks)\b)"
    )
    negated = re.compile(
        r"(?i:(?:\banswer\b|\b(?:correct|right|best)\s+(?:option|choice)\b)(?:\s+to\s+(?:the|this|that)\s+question)?"
        r"\s+(?:is|would\s+be|must\s+be)\s+(?:definitely\s+|certainly\s+)?not\s+(?:(?:option|choice|letter)\s+)?)"
        + _OPEN
        + letter
    )
    return _Patterns(letters, phrase, reverse, start, marked, alternative, negated)


_PATTERNS = {"ABCD": _compile("ABCD")}
# a line that starts like an option of a list: "A) …", "(b) …", "C. …", "E) …" (a model may invent options)
_LISTED = re.compile(r"(?im)^\s*\(?([A-H])[\).:]\s")
# an option label inside a line: " B) rock", "(C) salt"
_INLINE_LABEL = re.compile(r"(?:(?<=\s)|^)\(?([A-H])\)\s")
# a marked letter rejected: "(B) is wrong", "option C is not", "(D) is less likely"
_REJECTED_AFTER = re.compile(
    r"^"
    + _CLOSE
    + r"\s*(?i:(?:is|are|was|seems|looks|would\s+be)\s+(?:not|wrong|incorrect|false|unlikely|less\s+likely"
    r"|implausible|ruled\s+out|eliminated)|can\s*not|cannot|isn't|is\s+n't)"
)
# a letter named and then rejected in the same clause: "The answer is A, which is incorrect", "A) coffee is not the
# answer", "(B) sun is wrong" (an option's text may stand between; "and"/"but" start another clause: "B and C is wrong")
_REJECTED_CLAUSE = re.compile(
    r"^" + _CLOSE + r"(?:\s*[\):]\s*(?:(?!\b(?:and|but|while|or)\b)[^.!?\n,;]){0,60}?)?\s*,?\s*(?:which\s+|that\s+)?"
    r"(?i:(?:is|are)\s+(?:not\s+(?:the\s+)?(?:(?:correct|right|final|best)\s+)?(?:answer|option|choice)\b"
    r"|(?:wrong|incorrect|false)\b))"
)
_REJECTED_BEFORE = re.compile(
    r"(?i:\b(?:not|exclude|excludes|eliminate|eliminates|rule\s+out|rules\s+out|except))\s*"
    + _OPEN
    + r"(?:(?:option|choice)\s+)?$"
)


def _patterns(letters: str) -> _Patterns:
    if letters not in _PATTERNS:
        _PATTERNS[letters] = _compile(letters)
    return _PATTERNS[letters]


def split_thinking(text: str) -> tuple[str, str]:
    """Return ``(outside, inside)``: the text outside all thinking blocks and the text inside them.

    An unclosed ``<thinking>`` runs to the end of the text (a turn cut off by the token limit); a stray
    ``</thinking>`` is dropped.
    """
    inside: list[str] = []

    def take(m: re.Match[str]) -> str:
        inside.append(m.group(1))
        return "\n"  # a sentence boundary: "Answer is A <thinking>…</thinking> Is X a gas?" asks nothing about A

    outside = _THINK_BLOCK.sub(take, text)
    m = _THINK_OPEN.search(outside)
    if m:
        inside.append(outside[m.end() :])
        outside = outside[: m.start()]
    outside = _THINK_CLOSE.sub(" ", outside)
    return outside, "\n".join(inside)


_LETTER_GROUPS = ("up", "low", "w", "b", "o")


def _letter_from(m: re.Match[str]) -> str:
    for name in _LETTER_GROUPS:
        g = m.groupdict().get(name)
        if g:
            return g.upper()
    raise AssertionError("pattern matched without a letter group")


def _letter_end(m: re.Match[str]) -> int:
    """Where the matched letter itself ends (a match may run on over a closing bracket or period)."""
    for name in _LETTER_GROUPS:
        if m.groupdict().get(name):
            return m.end(name)
    raise AssertionError("pattern matched without a letter group")


def _in_question(text: str, pos: int) -> bool:
    """True if the sentence around ``pos`` ends with a question mark (the sentence runs to the next . ! ? or line
    break; a period right after an option label "B." ends it too, which is what we want: "The answer is B. Why?")."""
    end = re.search(r"[.!?\n]", text[pos:])
    return end is not None and end.group(0) == "?"


def _line_start(text: str, pos: int) -> bool:
    """True if only whitespace and wrappers stand between the start of ``pos``'s line and ``pos``."""
    line = text[text.rfind("\n", 0, pos) + 1 : pos]
    return not line.strip(" \t(\[*_\"'`")


def _lists_others(text: str, end: int, letter: str) -> bool:
    """After the letter ending at ``end``: is the option list echoed (another option label on the same line, or —
    when the letter opens its own line — on the next line)?"""
    start = end - 1
    rest = text[end:]
    if not re.match(r"\s*[\).:]", rest) and not (start > 0 and text[start - 1] in "(["):
        return False  # the letter is not written as an option label
    line, _, after = rest.partition("\n")
    if any(m.group(1).upper() != letter for m in _INLINE_LABEL.finditer(line)):
        return True
    if _line_start(text, start):
        nxt = next((ln for ln in after.split("\n") if ln.strip()), "")
        m = _LISTED.match(nxt)
        return m is not None and m.group(1).upper() != letter
    return False


def _hedges_at(text: str, m: re.Match[str], pats: _Patterns) -> bool:
    """True if the letter matched by ``m`` is one of several offered: alternatives follow it, it is introduced by
    "either", or it opens an echoed option list."""
    if m.groupdict().get("either"):
        return True
    return _alternative_follows(text, m, pats) or _lists_others(text, _letter_end(m), _letter_from(m))


def _alternative_follows(text: str, m: re.Match[str], pats: _Patterns) -> bool:
    """True if another letter is offered right after the matched one: "A or B", "(A)/(B)", "A, B, C"."""
    alt = pats.alternative.match(text[_letter_end(m) :])
    return alt is not None and _letter_from(alt) != _letter_from(m)


def _rejected_after(text: str, m: re.Match[str]) -> bool:
    """True if the clause after the matched letter rejects it: "(B) is wrong", "A, which is incorrect",
    "A) coffee is not the answer"."""
    rest = text[_letter_end(m) :]
    return bool(_REJECTED_AFTER.match(rest) or _REJECTED_CLAUSE.match(rest))


def _rejected(text: str, m: re.Match[str]) -> bool:
    """True if a marked letter is named only to reject it: "(B) is wrong", "not (C)", "B) sun is not the answer"."""
    return _rejected_after(text, m) or bool(_REJECTED_BEFORE.search(text[: m.start()]))


# what follows a letter written as an option label: "A) Isaac Newton", "A: atoms", "(A) sun" (not "A. Water is …":
# after a period the next sentence may well start with an option's words)
_LABEL_TEXT = re.compile(r"[\]\*_\"'`]*\s*[\):]\s*([^\n]{1,200})")


def _label_conflict(text: str, m: re.Match[str], choices: Sequence[str] | None, letters: str) -> bool:
    """True if the matched letter is written as an option label whose text is *another* option's: "The answer is
    A) Isaac Newton" where Isaac Newton is option B. The longest option text the label starts with decides, so an
    option whose text extends another's ("water" / "water vapour") is read as itself.

    >>> _label_conflict("The answer is A) Isaac Newton.", _patterns("ABCD").phrase.search("The answer is A) Isaac"
    ...                 " Newton."), ["Charles Darwin", "Isaac Newton", "Carl Sagan", "Gregor Mendel"], "ABCD")
    True
    """
    if not choices:
        return False
    end = _letter_end(m)
    lab = _LABEL_TEXT.match(text, end)
    if lab is None and not (m.start() < end - 1 and text[end - 2] in "(["):
        return False
    rest = lab.group(1) if lab else text[end:].lstrip(")] ").split("\n", 1)[0]
    said = f"{_norm(rest)} "
    named = [
        (len(_norm(c)), letters[i])
        for i, c in enumerate(choices[: len(letters)])
        if _norm(c) and said.startswith(f"{_norm(c)} ")
    ]
    if not named:
        return False
    longest = max(n for n, _ in named)
    return _letter_from(m) not in {x for n, x in named if n == longest}


def _conflict(how: str) -> AnswerParse:
    return AnswerParse(None, how=how, conflict=True)


def _parse_strong(text: str, pats: _Patterns, choices: Sequence[str] | None = None) -> AnswerParse | None:
    """Every explicit answer phrase that is not a question; one letter among them, or a hedge; none when a phrase
    rejects its letter only ("The answer is A, which is incorrect"), a conflict when a letter is both asserted and
    rejected or is paired with another option's text."""
    found: set[str] = set()
    rejected: set[str] = set()
    for m in [*pats.phrase.finditer(text), *pats.reverse.finditer(text)]:
        if _in_question(text, m.end()):
            continue
        if _hedges_at(text, m, pats):
            return AnswerParse(None, hedged=True, how="phrase")
        if _rejected_after(text, m):
            rejected.add(_letter_from(m))
            continue
        if _label_conflict(text, m, choices, pats.letters):
            return _conflict("phrase")
        found.add(_letter_from(m))
    rejected |= {_letter_from(m) for m in pats.negated.finditer(text) if not _in_question(text, m.end())}
    if found & rejected:  # "The answer is D) water … The answer is not D) water": two answers about D
        return _conflict("phrase")
    if len(found) > 1:
        return AnswerParse(None, hedged=True, how="phrase")
    if found:
        return AnswerParse(found.pop(), how="phrase")
    # only rejections: the reply's answer phrase says what the answer is not; weaker evidence is not read
    return AnswerParse(None, how="phrase") if rejected else None


def _parse_weak(text: str, pats: _Patterns, choices: Sequence[str] | None, outside: bool) -> AnswerParse | None:
    """A letter at the very start, else the one letter marked on its own, else an answer naming an option's text."""
    listed = {m.group(1).upper() for m in _LISTED.finditer(text)}
    m = pats.start.search(text)
    if m and not _in_question(text, m.end()) and not _rejected(text, m):
        if _alternative_follows(text, m, pats):
            return AnswerParse(None, hedged=outside, how="start")
        if len(listed) < 2 and _label_conflict(text, m, choices, pats.letters):
            return _conflict("start")  # "A) Isaac Newton" where Isaac Newton is option B
        # "A) x\nB) y\n…" or "A) x B) y" at the start is the option list echoed back, not a commitment to A
        letter = _letter_from(m)
        if len(listed) < 2 and not _lists_others(text, _letter_end(m), letter):
            return AnswerParse(letter, how="start")
    found: set[str] = set()
    for mk in pats.marked.finditer(text):
        if _in_question(text, mk.end()) or _rejected(text, mk):
            continue
        if _alternative_follows(text, mk, pats):
            return AnswerParse(None, hedged=outside, how="marked")
        found.add(_letter_from(mk))
    if len(found) == 1:
        return AnswerParse(found.pop(), how="marked")
    if len(found) > 1:
        return _NONE
    if choices:
        return _match_choice_text(text, pats, choices, outside)
    return None


def _norm(s: str) -> str:
    return re.sub(r"\s+", " ", re.sub(r"[^\w\s]", " ", s.lower())).strip()


def _match_choice_text(text: str, pats: _Patterns, choices: Sequence[str], outside: bool) -> AnswerParse | None:
    """ "The answer is photosynthesis": map an answer phrase naming exactly one option's text to its letter."""
    m = re.search(r"(?i)\banswer\b(?:\s+to\s+(?:the|this|that)\s+question)?(?:\s+is)?\s*[:\-]?\s*(.{1,200})", text)
    if not m or _in_question(text, m.start(1)):
        return None
    tail = f" {_norm(m.group(1))} "
    if re.match(r" (?:not|never|incorrect|wrong)\b", tail):  # "The answer is not A) coffee": a rejection
        return None
    # an option's text right after a "not" ("… but not coffee", "is not A which is tubes") is rejected, not chosen
    hits = [
        pats.letters[i]
        for i, c in enumerate(choices[: len(pats.letters)])
        if _norm(c)
        and f" {_norm(c)} " in tail
        and not re.search(r"\bnot(?: \w+){0,3} $", tail[: tail.index(f" {_norm(c)} ") + 1])
    ]
    if len(hits) > 1:
        return AnswerParse(None, hedged=outside, how="text")
    return AnswerParse(hits[0], how="text") if hits else None


def analyze_answer(text: str, choices: Sequence[str] | None = None, letters: str = "ABCD") -> AnswerParse:
    """What a reply commits to: one letter, or none (nothing, a question, a rejection, or a hedge over several).

    ``choices`` (optional) lets "The answer is <option text>" count. Strong evidence anywhere beats weak evidence
    outside the thinking tags ("(A) is tempting <thinking>…</thinking> Answer: B" is B); at each strength the text
    outside the tags is read first. A hedge ends the search: a reply that offers several letters gets none, even if
    its thinking names one.
    """
    if not text:
        return _NONE
    pats = _patterns(letters)
    outside, inside = split_thinking(text)
    for strong in (True, False):
        for part, is_outside in ((outside, True), (inside, False)):
            if not part.strip():
                continue
            # None = no evidence here, read on; anything else decides (a weak "several marked letters" is a
            # decided none: weaker evidence is not read)
            got = _parse_strong(part, pats, choices) if strong else _parse_weak(part, pats, choices, is_outside)
            if got is not None:
                return got
    return _NONE


def parse_answer_letter(text: str, choices: Sequence[str] | None = None, letters: str = "ABCD") -> str | None:
    """The letter (``"A"``–``"D"``) a reply commits to, or ``None`` if it commits to none or to several
    (:func:`analyze_answer`)."""
    return analyze_answer(text, choices, letters).letter


def is_hedge(text: str, choices: Sequence[str] | None = None) -> bool:
    """True if the reply names several letters as its answer ("The answer is A, B, C, D.", "A or B")."""
    return analyze_answer(text, choices).hedged


def early_answer(text: str, letters: str = "ABCD") -> str | None:
    """The letter a turn *before the last* commits to as its final answer, or ``None`` (the conversation goes on).

    Used by adaptive-length rollouts to decide that the agent ended the conversation itself. Stricter than
    :func:`parse_answer_letter`, because a clarifying turn names options all the time: only explicit answer phrases
    ("The answer is B", "Answer: D", "the correct option is A", "B is the correct answer") in the text *outside*
    ``<thinking>`` tags count, under the same rule as the final answer — a phrase in a question ("Is the answer B?")
    asks and does not answer, and alternatives or different letters ("The answer is A or B") are a hedge, not an
    answer. Bare or marked letters ("(B)", "option B", "B) sunlight") never end a conversation. When it returns a
    letter, :func:`parse_answer_letter` on the same text returns the same letter (strong evidence outside the tags
    is what it reads first), so the reward scores exactly the answer that ended the conversation.
    """
    outside, _ = split_thinking(text or "")
    got = _parse_strong(outside, _patterns(letters)) if outside.strip() else None
    return got.letter if got is not None else None


def uses_thinking_tags(text: str) -> bool:
    """True if the text has a ``<thinking>`` block that is opened and later closed (any case) with content."""
    for m in _THINK_BLOCK.finditer(text or ""):
        if m.group(1).strip():
            return True
    return False


_LETTER_REF = re.compile(
    r"(?:[\(\[]\s*[A-D]\s*[\)\]]"  # (B)
    r"|\b[A-D]\)"  # B)
    r"|(?i:\b(?:option|choice|answer|letter)\s+)[A-Da-d]\b"  # option B / option b
    r"|\b[B-D]\b"  # a bare capital B/C/D
    r"|(?<=[A-Za-z,:] )A\b)"  # a capital "A" mid-sentence ("Is A right?"); at a sentence start it is the article
)


def names_an_option(text: str, choices: Sequence[str]) -> bool:
    """True if the text refers to an option by letter ("option B", "(C)", "D)") or quotes an option's text."""
    if _LETTER_REF.search(text):
        return True
    t = f" {_norm(text)} "
    return any(len(_norm(c)) >= 2 and f" {_norm(c)} " in t for c in choices)


def is_single_question(text: str, choices: Sequence[str]) -> bool:
    """True if a reply is exactly one question about an option: one '?', at the end, naming an option.

    The text outside thinking tags is judged when there is any (a student may think before asking).
    """
    outside, _ = split_thinking(text or "")
    body = outside if outside.strip() else (text or "")
    body = body.strip().rstrip("\"'`*)] ").strip()
    if body.count("?") != 1 or not body.endswith("?"):
        return False
    return names_an_option(body, choices)
