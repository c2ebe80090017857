"""Instruction echoes: a policy reply that repeats the per-turn instruction block it was given.

Per-turn instructions (word limits, answer format) reach the policy at the end of the teacher's ``user`` message,
after :data:`INSTRUCTION_MARK` (``simulate/prompts.with_instruction``): conditioning, never meant to be trained on.
A small policy sometimes copies them into its own reply ("[Instructions for your reply: Ask ONE short …"); trained
on, that text would teach the policy to write instructions. :func:`echo_spans` finds the echoed text of one reply:

* the marker itself, case-insensitive, with or without its ``[`` (``Instructions for your reply:``), through the
  block's closing ``]``; without one, through the end of the longest run of the instruction's words that follows,
  else to the end of the reply;
* a run of at least :data:`MIN_ECHO_WORDS` consecutive words of the instruction, copied without the marker — unless
  that run also appears in what the teacher visibly said (the question and options, which "Remember the question: …"
  instructions repeat: restating the question is not an echo).

**Decision: masked, not refused.** :func:`clarify_lit.data.tokenization.tokenize_conversation` gives those
characters' tokens the label −100, so the rest of the reply (often a good question after the echo) still trains,
and the echoed block never does. The simulator flags such records (``meta.echoed_instructions``: the 1-based
assistant turns that echo) so the rate is visible (docs/simulate.md#teacher-leaks-and-instruction-echoes).
"""

from __future__ import annotations

import re
from collections.abc import Sequence

INSTRUCTION_MARK = "[Instructions for your reply:"
#: the fewest consecutive instruction words copied without the marker that count as an echo
MIN_ECHO_WORDS = 8

_MARK = re.compile(r"\[?\s*instructions\s+for\s+your\s+reply\s*:?", re.IGNORECASE)
_WORDS = re.compile(r"[a-z0-9]+(?:'[a-z]+)?")


def split_instruction(content: str) -> tuple[str, str | None]:
    """``(teacher text, instruction or None)`` of a teacher message (the inverse of ``prompts.with_instruction``)."""
    i = content.rfind("\n\n" + INSTRUCTION_MARK)
    if i < 0 or not content.endswith("]"):
        return content, None
    return content[:i], content[i + 2 + len(INSTRUCTION_MARK) : -1].strip()


def _words(text: str) -> list[tuple[str, int, int]]:
    return [(m.group(0), m.start(), m.end()) for m in _WORDS.finditer(text.lower())]


def _runs(reply: list[tuple[str, int, int]], source: list[str], min_words: int) -> list[tuple[int, int]]:
    """Maximal runs ``(first, last)`` (word indices into ``reply``) of ≥ ``min_words`` consecutive words that occur
    consecutively in ``source``."""
    best_end: dict[int, int] = {}
    prev = [0] * (len(source) + 1)
    for i, (w, _, _) in enumerate(reply):
        cur = [0] * (len(source) + 1)
        for j, s in enumerate(source):
            if w == s:
                cur[j + 1] = prev[j] + 1
                if cur[j + 1] >= min_words:
                    start = i - cur[j + 1] + 1
                    best_end[start] = max(best_end.get(start, i), i)
        prev = cur
    runs: list[tuple[int, int]] = []
    for start in sorted(best_end):
        end = best_end[start]
        if runs and start <= runs[-1][1]:
            runs[-1] = (runs[-1][0], max(runs[-1][1], end))
        else:
            runs.append((start, end))
    return runs


def _contains(haystack: list[str], needle: list[str]) -> bool:
    n = len(needle)
    return any(haystack[i : i + n] == needle for i in range(len(haystack) - n + 1))


def _through_punctuation(text: str, end: int) -> int:
    """``end`` moved past the punctuation that closes the copied words ("… 50-60 words." keeps its full stop)."""
    while end < len(text) and text[end] in ".,;:!]":
        end += 1
    return end


def echo_spans(reply: str, instruction: str | None, visible: str = "") -> list[tuple[int, int]]:
    """Character spans ``[start, end)`` of ``reply`` that echo the instruction block (module docstring).
    ``instruction``: the block the reply answered (None: only the marker is looked for); ``visible``: what the
    teacher said outside the block (runs found there too are not echoes)."""
    spans: list[tuple[int, int]] = []
    words = _words(reply)
    source = [w for w, _, _ in _words(instruction or "")]
    seen = [w for w, _, _ in _words(visible)]
    runs = _runs(words, source, MIN_ECHO_WORDS) if source else []
    for m in _MARK.finditer(reply):
        close = reply.find("]", m.end())
        if close >= 0:
            end = close + 1
        else:
            after = [words[b][2] for a, b in runs if words[a][1] <= m.end() + 2 and words[b][2] > m.end()]
            end = _through_punctuation(reply, max(after)) if after else len(reply)
        spans.append((m.start(), end))
    for a, b in runs:
        if seen and _contains(seen, [w for w, _, _ in words[a : b + 1]]):
            continue  # the teacher said these words too (the question restated)
        spans.append((words[a][1], _through_punctuation(reply, words[b][2])))
    merged: list[tuple[int, int]] = []
    for s, e in sorted(spans):
        if merged and s <= merged[-1][1]:
            merged[-1] = (merged[-1][0], max(merged[-1][1], e))
        else:
            merged.append((s, e))
    return merged


def turn_echoes(messages: Sequence[dict[str, str]]) -> dict[int, list[tuple[int, int]]]:
    """``{message index: echoed spans}`` for every assistant message that echoes the instruction block of the
    teacher message before it (the block a policy reply was conditioned on)."""
    out: dict[int, list[tuple[int, int]]] = {}
    visible = " ".join(split_instruction(m["content"])[0] for m in messages if m["role"] == "user")
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        instruction = None
        if i and messages[i - 1]["role"] == "user":
            instruction = split_instruction(messages[i - 1]["content"])[1]
        spans = echo_spans(m["content"], instruction, visible)
        if spans:
            out[i] = spans
    return out


def echoed_turns(messages: Sequence[dict[str, str]]) -> list[int]:
    """The 1-based assistant-turn numbers whose reply echoes its instruction block."""
    assistant = [i for i, m in enumerate(messages) if m["role"] == "assistant"]
    echoes = turn_echoes(messages)
    return [n for n, i in enumerate(assistant, start=1) if i in echoes]
