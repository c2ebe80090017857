"""An offline, deterministic, judge-like reward for the clarifying setting (``--reward.kind rubric``).

The paper's reward is a GPT-4o judge's Overall score over five criteria (accuracy, reasoning, comprehensiveness,
pedagogical value, confidence calibration). Offline we cannot ask GPT-4o, but most of what the clarifying prompts
ask for can be checked by rule, so the rubric scores the protocol itself:

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
                    used them (closed, non-empty)
``concise``         share of assistant turns within the word limit (``word_limit``, the    comprehensiveness within
                    prompts' "at most 50-60 words")                                        the turn budget
==================  =====================================================================  =========================

``reward = committed · Σ_k w_k c_k / Σ_k w_k`` where ``committed`` is 1 when the final turn commits to exactly one
letter (:func:`~clarify_lit.simulate.parsing.analyze_answer`) and 0 otherwise — no hedging, no echoed options, no
question or silence instead of an answer (confidence calibration). The gate is what keeps the process terms from
being gamed: a policy that only ever asks "What does option A mean?", hedges "A, B, C or D", echoes the options or
says nothing gets 0 whatever else it does; a constant single letter earns its base-rate accuracy plus the process
terms it actually shows. Every component (and ``committed``, ``hedged``) is logged in ``reward_components``.

Worked example (default weights correct 0.4, asks_one 0.2, thinking 0.2, concise 0.2): a conversation that asks
one question about option B, uses thinking tags in 1 of the 2 turns that asked for them, keeps 3 of 3 turns short
and answers the gold letter: ``(0.4·1 + 0.2·1 + 0.2·0.5 + 0.2·1) / 1.0 = 0.9``; the same with a wrong letter: 0.5;
with "The answer is B or C": 0.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Literal

from clarify_lit.data.records import Message
from clarify_lit.data.tasks import QATask
from clarify_lit.simulate.parsing import analyze_answer, is_single_question, uses_thinking_tags
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


def rubric_components(task: QATask, messages: Sequence[Message], word_limit: int = 60) -> dict[str, float]:
    """The rule-checked components of one conversation (``correct`` as 0/1; see the module docstring)."""
    assistant = [i for i, m in enumerate(messages) if m["role"] == "assistant"]
    if not assistant:
        raise ValueError(f"task {task.task_id}: conversation has no assistant turn")
    final = analyze_answer(messages[assistant[-1]]["content"], task.choices)
    asked = [i for i in assistant if i > 0 and messages[i - 1]["role"] == "user"
             and THINK_REQUEST in messages[i - 1]["content"]]
    first = messages[assistant[0]]["content"]
    return {
        "committed": float(final.letter is not None),
        "hedged": float(final.hedged),
        "correct": float(final.letter == task.gold),
        "asks_one": float(asks_one_question(first, task.choices)),
        "thinking": (sum(uses_thinking_tags(messages[i]["content"]) for i in asked) / len(asked)) if asked else 1.0,
        "concise": sum(len(messages[i]["content"].split()) <= word_limit for i in assistant) / len(assistant),
    }


def rubric_score(components: Mapping[str, float], weights: Mapping[str, float]) -> float:
    """``committed · Σ w_k c_k / Σ w_k`` (module docstring)."""
    total = sum(weights.values())
    return components["committed"] * sum(w * components[k] for k, w in weights.items()) / total


class RubricReward(Reward):
    """The rubric reward (module docstring). ``accuracy="gold_prob"`` needs ``gold_prob`` (a :class:`GoldProbReward`
    on a frozen judge model) and puts its gold-answer probability in place of the 0/1 ``correct`` term."""

    kind = "rubric"

    def __init__(self, weights: Mapping[str, float] | None = None, *, accuracy: Literal["correct", "gold_prob"] = "correct",
                 gold_prob: GoldProbReward | None = None, word_limit: int = 60):
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
        self.weights, self.accuracy, self.gold_prob, self.word_limit = weights, accuracy, gold_prob, word_limit

    def describe(self) -> str:
        ws = ",".join(f"{k}={w:g}" for k, w in self.weights.items())
        return f"rubric({self.accuracy};{ws})"

    def score(self, tasks: Sequence[QATask], conversations: Sequence[Sequence[Message]], *, seed: int = 0
              ) -> list[RewardResult]:
        probs = None
        if self.accuracy == "gold_prob":
            probs = [r.value for r in self.gold_prob.score(tasks, conversations, seed=seed)]
        out = []
        for i, (task, conv) in enumerate(zip(tasks, conversations, strict=True)):
            comps = rubric_components(task, conv, self.word_limit)
            comps["parsed"] = comps["committed"]
            scored = dict(comps)
            if probs is not None:
                comps["gold_prob"] = scored["correct"] = float(probs[i])
            value = rubric_score(scored, self.weights)
            out.append(RewardResult(value=value, components={**comps, "rubric": value}))
        return out
