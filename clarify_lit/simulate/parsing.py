"""Answer parsing: the one parser that rewards and metrics share.

``parse_answer_letter`` reads a final assistant turn and returns the chosen letter (A–D) or ``None``. Evidence comes
in two strengths, and the text *outside* ``<thinking>…</thinking>`` (where the prompts ask for the answer) is read
before the inside at each strength:

1. strong — an explicit answer phrase: "The answer is B", "Answer is C", "Answer: (c)", "final answer is **D**",
   "the correct option is B"; the first one in the text counts;
2. weak — a bare letter at the very start ("B", "B) ...", "(B)", "**B**"; not when the text is the option list
   echoed back, "A) …\nB) …"), else a letter marked on its own ("(B)",
   "**B**", "option B") when exactly one distinct letter is marked that way, else (with ``choices``) an answer phrase
   quoting exactly one option's text.

So "(A) is tempting <thinking>…</thinking> Answer: B" is B. A lowercase letter counts only where it cannot be the
English article ("the answer is a." yes, "the answer is a bit unclear" no). Several candidate letters → ``None``.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

LETTERS = ("A", "B", "C", "D")

_THINK_BLOCK = re.compile(r"<\s*thinking\s*>(.*?)<\s*/\s*thinking\s*>", re.IGNORECASE | re.DOTALL)
_THINK_OPEN = re.compile(r"<\s*thinking\s*>", re.IGNORECASE)
_THINK_CLOSE = re.compile(r"<\s*/\s*thinking\s*>", re.IGNORECASE)

# Wrappers a model puts around a letter: brackets, bold/italic markers, quotes.
_OPEN = r"[\(\[\*_\"'`]*"
# What may follow an answer letter: end of text, punctuation, closing wrappers, or whitespace.
_AFTER_UPPER = r"(?![A-Za-z0-9])"
# A lowercase letter must be followed by end/punctuation/wrapper, never by another word ("is a bit").
_AFTER_LOWER = r"(?=\s*(?:$|[\)\]\*_\"'`.,;:!?\n]))"

_ANSWER_PHRASE = (
    # "answer", "correct choice", "best option" — a bare "option B" is not a commitment ("option B is wrong")
    r"(?:\banswer\b|\b(?:correct|right|best)\s+(?:option|choice)\b)"
    r"(?:\s+(?:is|would\s+be|will\s+be|should\s+be|=))?"
    r"\s*[:=\-]?\s*"
    r"(?:\s*(?:option|choice|letter)\s+)?"
)


def _compile(letters: str) -> tuple[re.Pattern[str], re.Pattern[str], re.Pattern[str]]:
    up = f"[{letters.upper()}]"
    low = f"[{letters.lower()}]"
    phrase = re.compile(
        r"(?i:" + _ANSWER_PHRASE + ")" + _OPEN + rf"(?:(?P<up>{up}){_AFTER_UPPER}|(?P<low>{low}){_AFTER_LOWER})"
    )
    # A letter at the very start of the text: "B", "B.", "B) Sun", "(b)", "**C**" — but not the article "A plant".
    start = re.compile(
        r"^\s*(?:[\(\[]\s*(?P<w>[" + letters + letters.lower() + r"])\s*[\)\]]"
        r"|[\*_]+(?P<b>[" + letters + letters.lower() + r"])[\*_]+"
        rf"|(?P<up>{up})\s*(?:[\).:]|$)"
        rf"|(?P<low>{low})\s*(?:[\)]|$))"
    )
    # A letter marked on its own anywhere: "(B)", "[B]", "**B**", "option B".
    marked = re.compile(
        r"(?:[\(\[]\s*(?P<w>[" + letters + r"])\s*[\)\]]"
        r"|\*\*(?P<b>[" + letters + r"])\*\*"
        rf"|(?i:\b(?:option|choice)\s+)(?P<o>{up}){_AFTER_UPPER})"
    )
    return phrase, start, marked


_PATTERNS = {"ABCD": _compile("ABCD")}
# a line that starts like an option of a list: "A) …", "(b) …", "C. …"
_LISTED = re.compile(r"(?im)^\s*\(?([A-D])[\).:]\s")


def _patterns(letters: str):
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
        return " "

    outside = _THINK_BLOCK.sub(take, text)
    m = _THINK_OPEN.search(outside)
    if m:
        inside.append(outside[m.end():])
        outside = outside[: m.start()]
    outside = _THINK_CLOSE.sub(" ", outside)
    return outside, "\n".join(inside)


def _letter_from(m: re.Match[str]) -> str:
    for name in ("up", "low", "w", "b", "o"):
        g = m.groupdict().get(name)
        if g:
            return g.upper()
    raise AssertionError("pattern matched without a letter group")


def _parse_strong(text: str, letters: str) -> str | None:
    """An explicit answer phrase; the first one counts (the prompts ask for the answer first)."""
    m = _patterns(letters)[0].search(text)
    return _letter_from(m) if m else None


def _parse_weak(text: str, letters: str, choices: Sequence[str] | None) -> str | None:
    """A letter at the very start, else the one letter marked on its own, else an answer naming an option's text."""
    _, start, marked = _patterns(letters)
    listed = {m.group(1).upper() for m in _LISTED.finditer(text)}
    m = start.search(text)
    # "A) x\nB) y\n…" at the start is the option list echoed back, not a commitment to A
    if m and len(listed) < 2:
        return _letter_from(m)
    found = {_letter_from(m) for m in marked.finditer(text)}
    if len(found) == 1:
        return found.pop()
    if choices:
        return _match_choice_text(text, letters, choices)
    return None


def _norm(s: str) -> str:
    return re.sub(r"\s+", " ", re.sub(r"[^\w\s]", " ", s.lower())).strip()


def _match_choice_text(text: str, letters: str, choices: Sequence[str]) -> str | None:
    """"The answer is photosynthesis": map an answer phrase naming exactly one option's text to its letter."""
    m = re.search(r"(?i)\banswer\b(?:\s+is)?\s*[:\-]?\s*(.{1,200})", text)
    if not m:
        return None
    tail = f" {_norm(m.group(1))} "
    hits = [letters[i] for i, c in enumerate(choices[: len(letters)]) if _norm(c) and f" {_norm(c)} " in tail]
    return hits[0] if len(hits) == 1 else None


def parse_answer_letter(text: str, choices: Sequence[str] | None = None, letters: str = "ABCD") -> str | None:
    """The letter (``"A"``–``"D"``) a reply commits to, or ``None`` if it commits to none (or to several).

    ``choices`` (optional) lets "The answer is <option text>" count. The text outside thinking tags is read first;
    only if it holds no answer is the thinking text read.
    """
    if not text:
        return None
    outside, inside = split_thinking(text)
    # strong evidence anywhere beats weak evidence outside: "(A) is tempting <thinking>..</thinking> Answer: B"
    for parse in (lambda t: _parse_strong(t, letters), lambda t: _parse_weak(t, letters, choices)):
        for part in (outside, inside):
            if part.strip():
                letter = parse(part)
                if letter is not None:
                    return letter
    return None


def early_answer(text: str, letters: str = "ABCD") -> str | None:
    """The letter a turn *before the last* commits to as its final answer, or ``None`` (the conversation goes on).

    Used by adaptive-length rollouts to decide that the agent ended the conversation itself. Stricter than
    :func:`parse_answer_letter`, because a clarifying turn names options all the time: only an explicit answer
    phrase ("The answer is B", "Answer is C", "Answer: D", "the correct option is A") in the text *outside*
    ``<thinking>`` tags counts, and the first such phrase must not sit in a question ("Is the answer B?" asks, it
    does not answer; the sentence is the text up to the next ``.``, ``!``, ``?`` or line break). Bare or marked
    letters ("(B)", "option B", "B) sunlight") never end a conversation. When it returns a letter,
    :func:`parse_answer_letter` on the same text returns the same letter (both take the first answer phrase outside
    the thinking tags), so the reward scores exactly the answer that ended the conversation.
    """
    outside, _ = split_thinking(text or "")
    m = _patterns(letters)[0].search(outside)
    if m is None:
        return None
    end = re.search(r"[.!?\n]", outside[m.end():])
    if end is not None and end.group(0) == "?":
        return None
    return _letter_from(m)


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
