"""Per-record flags of what a conversation should not contain: a teacher that gives the answer away, a policy that
echoes its instructions.

* ``teacher_leak`` (clarifying setting; bool) — some teacher turn **names the gold option as the answer**: its
  letter ("B", "(B)", "option B") or its text in any inflection (:func:`~.open_answer.option_pattern`) inside an
  answer verdict within one sentence, not negated:

  - "the (correct / right / final / best) answer / option / choice is … B", "the answer is "B) seafloor"",
    "Answer: B" (the answer parser's explicit answer phrases, :func:`~.parsing.analyze_answer`, naming the gold);
  - "B is the correct answer", "seafloor is right", "seafloor is the answer", "the seafloor is correct";
  - "choose / pick / select / go with B".

  **Not a leak**: the gold text in an explanation ("Seafloor spreading happens at ridges"), a letter named to talk
  about it ("Option B refers to the seafloor"), a rejection ("the answer is not B"), a verdict on another option,
  or "the answer to your question is …" (answering the student's question, not the test's). The paper's teacher
  "never gives away the answer" but does explain the options, so only a verdict counts. Only the teacher's own words
  are read: turn 1 (the question, hard-coded) and the fixed requests and instruction blocks are left out. The open
  teacher (open mode) quotes notes and never sees the options; it is checked the same way.
* ``echoed_instructions`` (list) — the 1-based assistant turns whose reply repeats the per-turn instruction block
  (:mod:`clarify_lit.data.echoes`; training masks the echoed text).
"""

from __future__ import annotations

import re
from collections.abc import Sequence

from clarify_lit.data.echoes import echoed_turns, split_instruction
from clarify_lit.data.tasks import LETTERS, QATask
from clarify_lit.simulate import prompts
from clarify_lit.simulate.open_answer import option_pattern
from clarify_lit.simulate.parsing import analyze_answer

# the fixed text a teacher message adds after the teacher's own reply (prompts.clarifying_teacher_turn/open mode)
_FIXED_ENDINGS = (prompts.CLARIFY_FINAL, prompts.OPEN_FINAL, prompts.OPEN_ASK)
_SENTENCE = re.compile(r"[^.!?\n]+[.!?]*")
_NOT = r"(?!\s*(?:not|never|n't)\b)"


def teacher_words(content: str) -> str:
    """The teacher's own words in a teacher (``user``) message: the instruction block and the fixed request that
    follows a teacher's reply left out."""
    text, _ = split_instruction(content)
    text = text.rstrip()
    for ending in _FIXED_ENDINGS:
        if text.endswith(ending):
            text = text[: -len(ending)].rstrip()
    return text


def _gold_alternatives(task: QATask) -> str:
    """A regex alternation for the gold option: its letter (upper case, standalone, maybe "(B)"/"option B"/"B)") or
    its text in any inflection."""
    letter = rf"(?-i:\(?\b{task.gold}\b\)?)"
    pat = option_pattern(task.choices[LETTERS.index(task.gold)])
    alts = [rf"(?:(?:option|choice|letter)\s+)?[\"'*]*{letter}(?:\s*[\"'*]*[^.!?\"'*]{{0,40}}?[\"'*]*)?"]
    if pat is not None:
        alts.append(r"(?:the\s+)?[\"'*]*(?:" + pat.pattern.removeprefix("(?i)") + r")[\"'*]*")
    return "(?:" + "|".join(alts) + ")"


def _verdicts(task: QATask) -> list[re.Pattern[str]]:
    gold = _gold_alternatives(task)
    verdict = r"(?:the\s+)?(?:(?:correct|right|best|only\s+correct)(?:\s+(?:answer|option|choice))?|answer)\b"
    return [
        # "seafloor is the correct answer", "B is right", "the seafloor is the answer"
        re.compile(
            rf"(?i)(?:^|[^a-z]){gold}\s*,?\s*(?:is|would\s+be|must\s+be)\s+{_NOT}(?:definitely\s+|clearly\s+|"
            rf"indeed\s+)?{verdict}"
        ),
        # "the correct answer is the seafloor", "the right choice would be (B)"
        re.compile(
            rf"(?i)\b(?:correct|right|best|final)\s+(?:answer|option|choice)\s*(?:is|would\s+be|must\s+be|"
            rf"[:=])\s*{_NOT}(?:probably\s+|definitely\s+|clearly\s+)?{gold}"
        ),
        # "choose B", "go with the seafloor"
        re.compile(rf"(?i)\b(?:choose|pick|select|go\s+with)\s+{gold}"),
    ]


def leaked_turns(task: QATask, messages: Sequence[dict[str, str]]) -> list[int]:
    """The 1-based teacher turns (``user`` messages after the first) that name the gold option as the answer."""
    verdicts = _verdicts(task)
    out = []
    users = [m for m in messages if m["role"] == "user"]
    for n, m in enumerate(users, start=1):
        if n == 1:  # the question itself, hard-coded
            continue
        for sentence in _SENTENCE.findall(teacher_words(m["content"])):
            parse = analyze_answer(sentence, choices=task.choices)
            explicit = parse.how == "phrase" and parse.letter == task.gold
            if explicit or any(v.search(sentence) for v in verdicts):
                out.append(n)
                break
    return out


def record_flags(task: QATask, messages: Sequence[dict[str, str]], setting: str) -> dict[str, object]:
    """The flags a rollout writes into a record's ``meta`` (module docstring): ``teacher_leak`` in the clarifying
    setting (its teacher speaks free text), ``echoed_instructions`` always."""
    flags: dict[str, object] = {}
    if setting == "clarifying":
        flags["teacher_leak"] = bool(leaked_turns(task, messages))
    flags["echoed_instructions"] = echoed_turns(messages)
    return flags


def count_flags(metas: Sequence[dict]) -> dict[str, int]:
    """``teacher_leaks`` (records flagged) and ``echoed_instructions`` (records with an echoing turn), for summaries;
    records written before the flags existed count as unflagged."""
    return {
        "teacher_leaks": sum(bool(m.get("teacher_leak")) for m in metas),
        "echoed_instructions": sum(bool(m.get("echoed_instructions")) for m in metas),
    }
