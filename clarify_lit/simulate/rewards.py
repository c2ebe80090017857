"""One reward per whole conversation (Refit needs r ≥ 0), with its components kept.

* ``correct`` — 1 if the final turn's parsed letter equals the gold letter, else 0. Components: ``correct`` and
  ``parsed`` (1/0: whether a letter could be read at all), so an unparseable answer is visible, not just a 0.
* ``gold_prob`` — the probability a frozen judge LM gives the gold letter after reading the conversation and
  "The answer is", normalised over A–D. Smooth where ``correct`` is sparse; batched forward passes. The judge
  defaults to the policy's base model (the command loads it; callers may pass any model).
* ``llm_judge`` — the paper's judge prompt (six 0–10 scores as JSON) through a :class:`ChatBackend`; reward =
  Overall / 10. A reply that does not parse is retried (sampling) ``max_attempts − 1`` times, then recorded as
  missing: components ``None`` and ``missing=True`` (the record gets ``meta.reward_missing = true`` and reward 0 —
  flagged, never a silent 0; training should drop such records).
* ``weighted`` — Σ wᵢ·rᵢ over named rewards (weights ≥ 0); missing if any part with weight > 0 is missing.
* ``rubric`` — an offline rule-checked score of the clarifying protocol's form: a gameable diagnostic, not a judge
  (:mod:`clarify_lit.simulate.rubric`, built by ``simulate.options.build_reward``).

All rewards also report ``correct`` and ``parsed`` (cheap, and the metrics want them).
"""

from __future__ import annotations

import logging
import math
from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Literal

import torch

from clarify_lit.data.records import Message
from clarify_lit.data.tasks import LETTERS, QATask
from clarify_lit.simulate import prompts
from clarify_lit.simulate.engine import GenerationEngine, derive_seed
from clarify_lit.simulate.judge_parsing import parse_judge_scores, without_echoes
from clarify_lit.simulate.open_answer import grade_open_answer
from clarify_lit.simulate.parsing import AnswerParse, analyze_answer
from clarify_lit.simulate.teachers import ChatBackend

log = logging.getLogger(__name__)

RewardKind = Literal["correct", "gold_prob", "llm_judge", "weighted", "rubric"]  # rubric: simulate/rubric.py


@dataclass
class RewardResult:
    """A conversation's reward: ``value`` is None when it could not be computed (``missing``)."""

    value: float | None
    components: dict[str, float | None] = field(default_factory=dict)

    @property
    def missing(self) -> bool:
        return self.value is None


def final_assistant_text(messages: Sequence[Message]) -> str:
    """The last assistant turn's text (the one the answer is parsed from)."""
    for m in reversed(messages):
        if m["role"] == "assistant":
            return m["content"]
    raise ValueError("conversation has no assistant turn")


def final_answer_of(text: str, choices: Sequence[str], *, open_answers: bool = False) -> AnswerParse:
    """What a final turn commits to: the letter it asserts (:func:`~.parsing.analyze_answer`), or in open mode the
    one option whose text it names (:func:`~.open_answer.grade_open_answer`)."""
    return grade_open_answer(text, choices) if open_answers else analyze_answer(text, choices=choices)


def correctness(task: QATask, messages: Sequence[Message], *, open_answers: bool = False) -> dict[str, float | None]:
    got = final_answer_of(final_assistant_text(messages), task.choices, open_answers=open_answers)
    comps = {
        "correct": float(got.letter == task.gold),
        "parsed": float(got.letter is not None),
        "hedged": float(got.hedged),
    }
    if open_answers:  # an answer naming no option is wrong, and counted apart (open_answer's module docstring)
        comps["names_none"] = float(got.letter is None and not got.hedged)
    return comps


class Reward(ABC):
    """Scores a batch of finished conversations."""

    kind: RewardKind

    @abstractmethod
    def score(
        self, tasks: Sequence[QATask], conversations: Sequence[Sequence[Message]], *, seed: int = 0
    ) -> list[RewardResult]: ...

    def describe(self) -> str:
        return self.kind


class CorrectReward(Reward):
    """1 when the final answer is the gold option, else 0. ``open_answers``: the answer is graded by the option text
    it names (open mode), not by its letter."""

    kind: RewardKind = "correct"

    def __init__(self, open_answers: bool = False):
        self.open_answers = open_answers

    def describe(self) -> str:
        return "correct:open" if self.open_answers else "correct"

    def score(self, tasks, conversations, *, seed=0):
        out = []
        for t, c in zip(tasks, conversations, strict=True):
            comps = correctness(t, c, open_answers=self.open_answers)
            out.append(RewardResult(value=comps["correct"], components=comps))
        return out


class GoldProbReward(Reward):
    """P(gold letter | conversation, "The answer is") under a frozen judge LM, renormalised over A–D.

    Each letter's continuation (" A" …) is scored as a whole token sequence, so tokenizers that split " B" into two
    tokens work; when every continuation is one distinct token a single forward pass per conversation suffices.
    """

    kind: RewardKind = "gold_prob"

    def __init__(self, model, tokenizer, *, batch_size: int = 8):
        self.engine = GenerationEngine(model, tokenizer, batch_size=batch_size)
        self.tokenizer = tokenizer
        self.letter_ids = [tokenizer(" " + letter, add_special_tokens=False)["input_ids"] for letter in LETTERS]
        self.single_token = all(len(ids) == 1 for ids in self.letter_ids) and len(
            {ids[0] for ids in self.letter_ids}
        ) == len(LETTERS)

    def letter_probs(self, tasks: Sequence[QATask], conversations: Sequence[Sequence[Message]]) -> torch.Tensor:
        """``(n, 4)`` probabilities over A–D."""
        prefixes = [
            self.engine.encode(prompts.gold_prob_request(t, c), assistant_prefix=prompts.GOLD_PROB_PREFIX)
            for t, c in zip(tasks, conversations, strict=True)
        ]
        if self.single_token:
            logp = self.engine.next_token_logprobs(prefixes)[:, [ids[0] for ids in self.letter_ids]]
        else:
            logp = self._sequence_logprobs(prefixes)
        return torch.softmax(logp, dim=-1)

    def _sequence_logprobs(self, prefixes: list[list[int]]) -> torch.Tensor:
        """Sum of token log-probs of each letter continuation (teacher-forced, one row per prefix × letter)."""
        # token k of a continuation is scored by the next-token distribution after prefix + ids[:k]
        out = torch.zeros((len(prefixes), len(LETTERS)))
        for k in range(max(len(ids) for ids in self.letter_ids)):
            batch, where = [], []
            for i, p in enumerate(prefixes):
                for j, ids in enumerate(self.letter_ids):
                    if k < len(ids):
                        batch.append(p + ids[:k])
                        where.append((i, j, ids[k]))
            lp = self.engine.next_token_logprobs(batch)
            for r, (i, j, tok) in enumerate(where):
                out[i, j] += lp[r, tok]
        return out

    def score(self, tasks, conversations, *, seed=0):
        probs = self.letter_probs(tasks, conversations)
        out = []
        for t, c, p in zip(tasks, conversations, probs, strict=True):
            gp = float(p[LETTERS.index(t.gold)])
            out.append(RewardResult(value=gp, components={"gold_prob": gp, **correctness(t, c)}))
        return out


JUDGE_KEYS = prompts.JUDGE_KEYS


class LLMJudgeReward(Reward):
    """The paper's LLM judge; reward = Overall / 10 (see the module docstring for retries and missing values)."""

    kind: RewardKind = "llm_judge"

    def __init__(self, backend: ChatBackend, *, max_attempts: int = 3, max_new_tokens: int = 160):
        if max_attempts < 1:
            raise ValueError("max_attempts must be >= 1")
        self.backend = backend
        self.max_attempts = max_attempts
        self.max_new_tokens = max_new_tokens
        self.missing = 0
        #: ``(task id, the last raw reply)`` of each conversation whose reward went missing (simulate saves one)
        self.unparseable: list[tuple[str, str]] = []

    def describe(self) -> str:
        return f"llm_judge:{self.backend.name}"

    def score(self, tasks, conversations, *, seed=0):
        requests = [prompts.judge_request(t, c) for t, c in zip(tasks, conversations, strict=True)]
        parsed: list[dict[str, float] | None] = [None] * len(requests)
        raw: list[str] = [""] * len(requests)
        todo = list(range(len(requests)))
        for attempt in range(self.max_attempts):
            if not todo:
                break
            # first attempt greedy; retries sample, else a deterministic backend repeats its unparseable reply
            replies = self.backend.chat(
                [requests[i] for i in todo],
                temperature=0.0 if attempt == 0 else 0.7,
                max_new_tokens=self.max_new_tokens,
                seed=derive_seed(seed, attempt),
            )
            for i, r in zip(todo, replies, strict=True):
                # the judge's own words only: a verdict copied from the policy's reply is not one (judge_parsing)
                parsed[i] = parse_judge_scores(without_echoes(r, conversations[i]))
                raw[i] = r
            todo = [i for i in todo if parsed[i] is None]
        out = []
        for i, (t, c) in enumerate(zip(tasks, conversations, strict=True)):
            scores = parsed[i]
            comps: dict[str, float | None] = {k: (scores or {}).get(k) for k in JUDGE_KEYS}
            if scores is None:
                self.missing += 1
                self.unparseable.append((t.task_id, raw[i]))
                log.warning(
                    "judge reply for %s unparseable after %d attempts; reward recorded as missing",
                    t.task_id,
                    self.max_attempts,
                )
                comps["llm_judge"] = None
                out.append(RewardResult(value=None, components={**comps, **correctness(t, c)}))
            else:
                comps["llm_judge"] = scores["overall"] / 10.0
                out.append(RewardResult(value=comps["llm_judge"], components={**comps, **correctness(t, c)}))
        return out


class WeightedReward(Reward):
    """Σ wᵢ·rᵢ of named rewards (all weights ≥ 0, at least one > 0, so the sum stays ≥ 0)."""

    kind: RewardKind = "weighted"

    def __init__(self, parts: Mapping[str, Reward], weights: Mapping[str, float]):
        if set(parts) != set(weights):
            raise ValueError(f"weights {sorted(weights)} must name exactly the parts {sorted(parts)}")
        if any(w < 0 or not math.isfinite(w) for w in weights.values()) or not any(w > 0 for w in weights.values()):
            raise ValueError(f"weights must be finite, >= 0 and not all 0 (Refit needs a reward >= 0), got {weights}")
        self.parts = dict(parts)
        self.weights = dict(weights)

    def describe(self) -> str:
        return "weighted(" + ", ".join(f"{w:g}*{self.parts[k].describe()}" for k, w in self.weights.items()) + ")"

    def score(self, tasks, conversations, *, seed=0):
        per_part = {k: r.score(tasks, conversations, seed=derive_seed(seed, k)) for k, r in self.parts.items()}
        out = []
        for i in range(len(tasks)):
            comps: dict[str, float | None] = {}
            total: float | None = 0.0
            for k, results in per_part.items():
                res = results[i]
                comps.update(res.components)
                comps[k] = res.value
                if self.weights[k] > 0:
                    total = None if (total is None or res.value is None) else total + self.weights[k] * res.value
            out.append(RewardResult(value=total, components=comps))
        return out


def make_reward(
    kind: RewardKind,
    *,
    judge_model=None,
    judge_tokenizer=None,
    judge_backend: ChatBackend | None = None,
    weights: Mapping[str, float] | None = None,
    batch_size: int = 8,
    max_attempts: int = 3,
) -> Reward:
    """Build a reward by name. ``gold_prob`` needs ``judge_model``/``judge_tokenizer``; ``llm_judge`` needs
    ``judge_backend``; ``weighted`` needs ``weights`` over the other three names."""

    def single(name: str) -> Reward:
        if name == "correct":
            return CorrectReward()
        if name == "gold_prob":
            if judge_model is None or judge_tokenizer is None:
                raise ValueError("reward 'gold_prob' needs a judge model and tokenizer")
            return GoldProbReward(judge_model, judge_tokenizer, batch_size=batch_size)
        if name == "llm_judge":
            if judge_backend is None:
                raise ValueError("reward 'llm_judge' needs a judge backend (local HF model or endpoint)")
            return LLMJudgeReward(judge_backend, max_attempts=max_attempts)
        raise ValueError(f"reward must be one of correct, gold_prob, llm_judge, weighted; got {name!r}")

    if kind == "weighted":
        if not weights:
            raise ValueError("reward 'weighted' needs weights, e.g. {'correct': 0.5, 'gold_prob': 0.5}")
        return WeightedReward({k: single(k) for k in weights}, weights)
    return single(kind)
