"""Reading the LLM judge's scores from its reply: as forgiving as is honest.

The judge is asked for a JSON object of six 0–10 scores (:func:`clarify_lit.simulate.prompts.judge_request`). Served
models answer in many shapes; :func:`parse_judge_scores` reads, in this order, and takes the first that gives an
``overall`` score:

1. a JSON object anywhere in the reply — in prose, in a code fence, nested one level (``{"scores": {...}}``), or
   written as a Python dict (single quotes); keys are matched to the six scores by :func:`~.prompts.judge_key`
   (``"Overall Score"``, ``"overall_quality"``, ``"pedagogy"`` …); numeric strings and ``"7/10"`` count;
2. labelled lines — ``Overall: 7``, ``**Overall score**: 7/10``, ``Overall rating - 7 out of 10``,
   ``6. Overall: 8`` — one per score;
3. a reply that gives exactly one score on the scale asked for and no label: ``7/10``, ``7 out of 10``,
   ``Score: 7``, or the bare number ``7`` as the whole reply: that one number is the overall score.

What is never read (``None``, so the reward is *missing*, never a guess): a value outside [0, 10]; a word instead of
a number; several unlabelled ``N/10`` scores (which one is overall?); an unlabelled fraction of another maximum
("5/6 of the steps"); a JSON object without an overall score when the
reply has no other overall; a reply whose only number is not a score ("The student answered B on turn 3").
Tested on real replies of the served SmolLM2-135M-Instruct (tests/fixtures/judge_replies_llama_cpp.json).

A judge that quotes or continues the transcript would hand the policy's own words to this forgiving parser: a reply
ending ``{"overall": 10}`` or ``Overall: 10`` would score itself once the judge echoes it. :func:`without_echoes`
drops every line of the judge's reply that copies the conversation (system prompt aside) before it is read, so a
verdict counts only in the judge's own words; an echoed score alone leaves the reward missing, never a guess.
"""

from __future__ import annotations

import ast
import json
import math
import re
from collections.abc import Mapping, Sequence

from clarify_lit.simulate import prompts

_NUMBER = r"(\d+(?:\.\d+)?)"
# "7/10", "7 / 10", "7 out of 10", "4/5" (a score out of another maximum is rescaled to 0–10)
_OUT_OF = r"(?:\s*/\s*|\s+out\s+of\s+)(\d+(?:\.\d+)?)"
_SCORE = rf"{_NUMBER}(?:{_OUT_OF})?"
_OUT_OF_TEN = r"(?:\s*/\s*|\s+out\s+of\s+)10(?:\.0)?\b"


def _scaled(number: str, out_of: str | None) -> float | None:
    """``number`` (out of ``out_of``, default 10) as a 0–10 score, or None when it is not one."""
    x = float(number)
    if out_of is not None:
        top = float(out_of)
        if top <= 0:
            return None
        x = x * 10.0 / top
    return x if math.isfinite(x) and 0 <= x <= 10 else None


def _score(value) -> float | None:
    """A 0–10 score from a JSON value (a number, ``"7"``, ``"7/10"``), else None."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int | float):
        return _scaled(str(float(value)), None) if math.isfinite(value) and value >= 0 else None
    if isinstance(value, str):
        m = re.fullmatch(rf"\s*{_SCORE}\s*", value, flags=re.IGNORECASE)
        return _scaled(m.group(1), m.group(2)) if m else None
    return None


def _key(name) -> str | None:
    return prompts.judge_key(re.sub(r"[^a-z]+", "_", str(name).lower()).strip("_"))


def _objects(text: str) -> list[dict]:
    """Every JSON (or Python-literal) object in ``text``, innermost first, nested ones flattened into their parent."""
    found: list[dict] = []
    for raw in re.findall(r"\{(?:[^{}]|\{[^{}]*\})*\}", text, flags=re.DOTALL):
        obj = None
        for load in (json.loads, ast.literal_eval):
            try:
                obj = load(raw)
                break
            except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):
                continue
        if isinstance(obj, dict):
            flat = dict(obj)
            for v in obj.values():  # {"scores": {"overall": 7}}
                if isinstance(v, dict):
                    flat.update(v)
            found.append(flat)
    return found


def _from_objects(text: str) -> dict[str, float] | None:
    for obj in _objects(text):
        scores: dict[str, float] = {}
        for k, v in obj.items():
            key, x = _key(k), _score(v)
            if key is not None and x is not None:
                scores[key] = x
        if "overall" in scores:
            return scores
    return None


def _from_labels(text: str) -> dict[str, float] | None:
    scores: dict[str, float] = {}
    for key in prompts.JUDGE_KEYS:
        spellings = [key.replace("_", r"[ _]")] + [
            a.replace("_", r"[ _]") for a, k in prompts.JUDGE_ALIASES.items() if k == key and a != key
        ]
        label = "(?:" + "|".join(sorted(spellings, key=len, reverse=True)) + ")"
        m = re.search(
            rf"(?i)\b{label}\b(?:[ _](?:score|rating|quality))?[*_\"' ]*(?:[:=\-–]|\bis\b)?[*_\"' ]*"
            rf"{_SCORE}",
            text,
        )
        if m:
            x = _scaled(m.group(1), m.group(2))
            if x is not None:
                scores[key] = x
    return scores if "overall" in scores else None


def _lone_score(text: str) -> dict[str, float] | None:
    """The one score of a reply that gives exactly one on the scale asked for (``7/10``, ``7 out of 10``,
    ``Score: 7``, or the bare number as the whole reply). Unlabelled, only "/10" counts: "5/6" in prose is a fraction,
    not a verdict."""
    whole = re.fullmatch(
        rf"\s*(?:[*_]*(?:score|rating)[*_]*\s*[:=]\s*)?{_NUMBER}(?:{_OUT_OF_TEN})?\s*\.?\s*", text, flags=re.IGNORECASE
    )
    if whole:
        x = _scaled(whole.group(1), None)
        return {"overall": x} if x is not None else None
    found = {m.span(1): m.group(1) for m in re.finditer(rf"{_NUMBER}{_OUT_OF_TEN}", text, flags=re.IGNORECASE)}
    found.update(
        {
            m.span(1): m.group(1)
            for m in re.finditer(rf"(?i)\b(?:score|rating)[*_]*\s*[:=]\s*{_NUMBER}(?:{_OUT_OF_TEN})?", text)
        }
    )
    values = set(found.values())
    if len(values) == 1:
        x = _scaled(values.pop(), None)
        return {"overall": x} if x is not None else None
    return None


def without_echoes(reply: str, conversation: Sequence[Mapping[str, str]]) -> str:
    """``reply`` without its lines that occur verbatim in the conversation's messages (the system prompt aside;
    lines of fewer than 3 characters kept: ``{``, ``}``, a bare ``7``), so the policy cannot write its own score."""
    said = "\n".join(m.get("content", "") for m in conversation if m.get("role") != "system")
    return "\n".join(line for line in reply.splitlines() if len(line.strip()) < 3 or line.strip() not in said)


def parse_judge_scores(text: str) -> dict[str, float] | None:
    """The judge's 0–10 scores (``overall`` always among them) from its reply, or None (module docstring)."""
    text = text or ""
    return _from_objects(text) or _from_labels(text) or _lone_score(text)
