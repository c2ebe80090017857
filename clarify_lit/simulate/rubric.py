"""An offline, deterministic, rule-checked reward for the clarifying setting (``--reward.kind rubric``): a diagnostic.

**Not a judge, and gameable** (issue 25; docs/simulate.md#the-rubric-is-a-diagnostic-not-a-judge): each process term
checks a form that a fixed template or fresh filler satisfies — "What does option A refer to?" then "The answer is
B. <thinking>ten random words</thinking>" twice earns 0.716 on the clarifying test questions, six times the best
trained row. ``experiments/rubric_exploits.py`` and tests/test_rubric.py document the exploits. Report it beside
accuracy (and the best constant answer); the paper's reward is an LLM judge (``--reward.kind llm_judge``).

The paper's reward is a GPT-4o judge's Overall score over five criteria (accuracy, reasoning, comprehensiveness,
pedagogical value, confidence calibration). Offline we cannot ask GPT-4o; what can be checked by rule is the
*form* the clarifying prompts ask for, so the rubric scores that:

==================  =====================================================================  =========================
component           what it checks (each in [0, 1])                                        judge criterion it stands
                                                                                           in for
==================  =====================================================================  =========================
``correct``         the final turn commits to the gold letter (``accuracy="correct"``), or  accuracy
                    the gold-answer probability of a frozen judge LM
                    (``accuracy="gold_prob"``: dense, so runs of one question differ)
``asks_one``        turn 1 is exactly one question (one "?", at the end) about exactly     pedagogical value (the
                    one option                                                             clarifying behaviour)
``thinking``        share of the turns whose instruction asked for <thinking> tags that    reasoning
                    used them (closed, non-empty, not a copy of an earlier turn's)
``concise``         share of assistant turns with substance within the word limit          comprehensiveness within
                    (``word_limit``, the prompts' "at most 50-60 words"): a single         the turn budget
                    question about one option, or at least ``min_words`` words, half of
                    them distinct; never a repeat of an earlier turn or an echo of the
                    options (a bare "The answer is A." is not a concise turn, it is an
                    empty one)
==================  =====================================================================  =========================

``reward = committed · Σ_k w_k c_k / Σ_k w_k`` where ``committed`` is 1 when the final turn commits to exactly one
letter (:func:`~clarify_lit.simulate.parsing.analyze_answer`) and 0 otherwise — no hedging, no echoed options, no
question or silence instead of an answer (confidence calibration). The gate keeps the process terms from paying a
policy that never commits: one that only ever asks "What does option A mean?", hedges "A, B, C or D", echoes the
options or
says nothing gets 0 whatever else it does; a constant single letter earns its base-rate accuracy plus the process
terms it actually shows.

Every term must be earned by doing something: a term a trivial policy satisfies by doing nothing is free reward.
Version 1 of ``concise`` (any turn under the word limit) was such a term: on the 135M policy it was 1 for every
logged conversation, and a constant "The answer is A." every turn earned 0.28 on the clarifying test questions,
more than any trained policy (README, "Learning to clarify"). In version 2 a constant committed letter earns exactly
``w_correct · accuracy / Σw`` (its base rate), a constant template is credited once (repeats earn nothing), and
the hedges, echoes, empty replies and questions earn 0 (tests/test_rubric.py) — but a fixed question template and
fresh filler still earn every process term (above). Every component (and ``committed``,
``hedged``) is logged in ``reward_components``.

Worked example (default weights correct 0.4, asks_one 0.2, thinking 0.2, concise 0.2): a conversation that asks
one question about option B, uses thinking tags in 1 of the 2 turns that asked for them, keeps 3 of 3 turns short
and answers the gold letter: ``(0.4·1 + 0.2·1 + 0.2·0.5 + 0.2·1) / 1.0 = 0.9``; the same with a wrong letter: 0.5;
with "The answer is B or C": 0. A constant "The answer is A." in all three turns: ``(0.4·[A is gold]) / 1.0``, i.e.
0 here (the gold is B), 0.4 where the gold is A.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from typing import Literal

from clarify_lit.data.records import Message
from clarify_lit.data.tasks import QATask
from clarify_lit.simulate.parsing import (
    analyze_answer,
    is_single_question,
    split_thinking,
    uses_thinking_tags,
)
from clarify_lit.simulate.rewards import GoldProbReward, Reward, RewardResult
from clarify_lit.simulate.teachers import referenced_options

RUBRIC_COMPONENTS = ("correct", "asks_one", "thinking", "concise")
DEFAULT_RUBRIC_WEIGHTS: dict[str, float] = {"correct": 0.4, "asks_one": 0.2, "thinking": 0.2, "concise": 0.2}
THINK_REQUEST = "<thinking></thinking>"  # how every prompt that wants the tags asks for them


def asks_one_question(text: str, choices: Sequence[str]) -> bool:
    """One question, at the end, naming exactly one option (by letter or by its text)."""
    if not is_single_question(text, choices):
        return False
    return len(referenced_options(text, choices)) == 1


_WORD = re.compile(r"[a-z0-9]+")
_TAG = re.compile(r"<\s*/?\s*thinking\s*>", re.IGNORECASE)
# an option line as the options are shown: "A) sun", "(B) rock", "C. salt", "D: ice"
_OPTION_LINE = re.compile(r"(?:^|\s)[\(\[]?([A-D])[\)\]\.:](?=\s)")
DEFAULT_MIN_WORDS = 8


def _words(text: str) -> list[str]:
    """Lower-case words, the thinking tags themselves left out."""
    return _WORD.findall(_TAG.sub(" ", text).lower())


def echoes_options(text: str) -> bool:
    """True if the text lists three or more options the way they are shown ("A) sun B) rock C) salt")."""
    return len(set(_OPTION_LINE.findall(text))) >= 3


def has_substance(
    text: str, earlier: Sequence[str], choices: Sequence[str], min_words: int = DEFAULT_MIN_WORDS
) -> bool:
    """A turn that does something: one question about one option, or ``min_words`` words or more of which at least
    half are distinct; never a copy of an earlier turn (``earlier``, compared by words) nor an echo of the options."""
    words = _words(text)
    if not words or echoes_options(text) or any(words == _words(e) for e in earlier):
        return False
    if asks_one_question(text, choices):
        return True
    return len(words) >= min_words and len(set(words)) * 2 >= len(words)


def rubric_components(
    task: QATask, messages: Sequence[Message], word_limit: int = 60, min_words: int = DEFAULT_MIN_WORDS
) -> dict[str, float]:
    """The rule-checked components of one conversation (``correct`` as 0/1; see the module docstring)."""
    assistant = [i for i, m in enumerate(messages) if m["role"] == "assistant"]
    if not assistant:
        raise ValueError(f"task {task.task_id}: conversation has no assistant turn")
    texts = [messages[i]["content"] for i in assistant]
    final = analyze_answer(texts[-1], task.choices)
    asked = [
        k
        for k, i in enumerate(assistant)
        if i > 0 and messages[i - 1]["role"] == "user" and THINK_REQUEST in messages[i - 1]["content"]
    ]
    thoughts = [split_thinking(t)[1] for t in texts]
    # a thinking block counts once: the same thoughts again (a constant template) are not reasoning
    fresh_thinking = [
        uses_thinking_tags(texts[k]) and _words(thoughts[k]) not in [_words(x) for x in thoughts[:k]] for k in asked
    ]
    concise = [
        len(t.split()) <= word_limit and has_substance(t, texts[:k], task.choices, min_words)
        for k, t in enumerate(texts)
    ]
    return {
        "committed": float(final.letter is not None),
        "hedged": float(final.hedged),
        "correct": float(final.letter == task.gold),
        "asks_one": float(asks_one_question(texts[0], task.choices)),
        "thinking": (sum(fresh_thinking) / len(asked)) if asked else 1.0,
        "concise": sum(concise) / len(concise),
    }


def rubric_score(components: Mapping[str, float], weights: Mapping[str, float]) -> float:
    """``committed · Σ w_k c_k / Σ w_k`` (module docstring)."""
    total = sum(weights.values())
    return components["committed"] * sum(w * components[k] for k, w in weights.items()) / total


class RubricReward(Reward):
    """The rubric reward (module docstring). ``accuracy="gold_prob"`` needs ``gold_prob`` (a :class:`GoldProbReward`
    on a frozen judge model) and puts its gold-answer probability in place of the 0/1 ``correct`` term."""

    kind = "rubric"

    def __init__(
        self,
        weights: Mapping[str, float] | None = None,
        *,
        accuracy: Literal["correct", "gold_prob"] = "correct",
        gold_prob: GoldProbReward | None = None,
        word_limit: int = 60,
        min_words: int = DEFAULT_MIN_WORDS,
    ):
        weights = dict(DEFAULT_RUBRIC_WEIGHTS if weights is None else weights)
        unknown = sorted(set(weights) - set(RUBRIC_COMPONENTS))
        if unknown:
            raise ValueError(f"rubric weights name unknown components {unknown}; choose from {RUBRIC_COMPONENTS}")
        if any(not w >= 0 for w in weights.values()) or not sum(weights.values()) > 0:
            raise ValueError(f"rubric weights must be >= 0 and not all 0, got {weights}")
        if accuracy not in ("correct", "gold_prob"):
            raise ValueError(f"rubric accuracy must be 'correct' or 'gold_prob', got {accuracy!r}")
        if accuracy == "gold_prob" and gold_prob is None:
            raise ValueError("rubric accuracy='gold_prob' needs a gold-probability judge (GoldProbReward)")
        if word_limit < 1:
            raise ValueError(f"word_limit must be >= 1, got {word_limit}")
        if not 1 <= min_words <= word_limit:
            raise ValueError(f"min_words must be in [1, word_limit={word_limit}], got {min_words}")
        self.weights, self.accuracy, self.gold_prob = weights, accuracy, gold_prob
        self.word_limit, self.min_words = word_limit, min_words

    def describe(self) -> str:
        ws = ",".join(f"{k}={w:g}" for k, w in self.weights.items())
        return f"rubric({self.accuracy};{ws};words={self.min_words}-{self.word_limit})"

    def score(
        self, tasks: Sequence[QATask], conversations: Sequence[Sequence[Message]], *, seed: int = 0
    ) -> list[RewardResult]:
        probs = None
        if self.accuracy == "gold_prob":
            probs = [r.value for r in self.gold_prob.score(tasks, conversations, seed=seed)]
        out = []
        for i, (task, conv) in enumerate(zip(tasks, conversations, strict=True)):
            comps = rubric_components(task, conv, self.word_limit, self.min_words)
            comps["parsed"] = comps["committed"]
            scored = dict(comps)
            if probs is not None:
                comps["gold_prob"] = scored["correct"] = float(probs[i])
            value = rubric_score(scored, self.weights)
            out.append(RewardResult(value=value, components={**comps, "rubric": value}))
        return out
