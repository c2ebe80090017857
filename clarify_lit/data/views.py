"""Training views: what an objective makes of the records, in the data layer's terms.

An objective (``clarify_lit.train.objectives``) turns conversation records into **examples** — a conversation with
a per-sequence weight (:class:`WeightedExample`) or a preference pair (:class:`PairExample`) — and reports what it
kept (:class:`ViewStats`). The DataModule tokenizes and batches those examples; it knows an objective only through
the :class:`DataView` protocol defined here, so the data layer never imports the training layer.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Protocol

from clarify_lit.data.records import ConversationRecord


class ObjectiveDataError(ValueError):
    """The records do not suit the objective (e.g. negative rewards under Refit, no DPO pairs)."""


@dataclass
class WeightedExample:
    """One conversation trained with per-sequence weight ``weight`` on its assistant turns."""

    id: str
    task_id: str
    messages: list[dict[str, str]]
    weight: float
    where: str = ""  # "file:line (id=…)" of the source record, for errors
    cut_turns: tuple[
        int, ...
    ] = ()  # assistant turns (1-based) cut by the token limit: their end-of-turn is not trained


@dataclass
class PairExample:
    """One preference pair. ``only_last_assistant``: train/score the final assistant turn alone (final-answer DPO)."""

    id: str
    task_id: str
    chosen: list[dict[str, str]]
    rejected: list[dict[str, str]]
    only_last_assistant: bool = False
    where: str = ""
    chosen_cut_turns: tuple[int, ...] = ()  # as WeightedExample.cut_turns, numbered within ``chosen``
    rejected_cut_turns: tuple[int, ...] = ()


@dataclass
class ViewStats:
    """What a view kept and left out, for logging (``data/…`` scalars) and the run summary."""

    records: int = 0
    examples: int = 0
    tasks: int = 0
    excluded: dict[str, int] = field(default_factory=dict)

    def line(self, name: str) -> str:
        ex = ", ".join(f"{k}: {v}" for k, v in self.excluded.items()) or "none"
        return f"{name} view: {self.records} records of {self.tasks} tasks → {self.examples} examples (excluded: {ex})"


class DataView(Protocol):
    """What the DataModule needs of an objective: its examples and a name for the log."""

    def build_view(
        self, records: list[ConversationRecord]
    ) -> tuple[list[WeightedExample] | list[PairExample], ViewStats]: ...

    def describe(self) -> str: ...


def cut_turns(record: ConversationRecord) -> tuple[int, ...]:
    """The record's assistant turns (1-based) known to be cut by the token limit (``()`` when none or unknown)."""
    _, numbers = record.truncated_turns()
    return tuple(numbers or ())


def weighted(record: ConversationRecord, weight: float) -> WeightedExample:
    """``record`` as a weighted example (its id, messages, source location and cut turns)."""
    return WeightedExample(record.id, record.task_id, record.messages, weight, record.where(), cut_turns(record))


def reward_weighted_view(records: list[ConversationRecord]) -> tuple[list[WeightedExample], ViewStats]:
    """Refit's view: every record weighted by its reward, ``w = r``; a negative reward is refused, naming the record
    (the lower bound on the policy value that Refit maximises assumes ``r ≥ 0``)."""
    out = []
    for r in records:
        if r.reward < 0:
            raise ObjectiveDataError(
                f"{r.where()} (task {r.task_id!r}): field 'reward' = {r.reward} is negative; Refit needs "
                "rewards ≥ 0 (its lower bound on the policy value assumes it) — rescale the reward or use Swift"
            )
        out.append(weighted(r, r.reward))
    return out, ViewStats(len(records), len(out), len({r.task_id for r in records}))


class RewardWeightedView:
    """:func:`reward_weighted_view` (Refit's view) as a :class:`DataView`: the DataModule's view when neither it nor
    the LightningModule names an objective."""

    def build_view(self, records: list[ConversationRecord]) -> tuple[list[WeightedExample], ViewStats]:
        return reward_weighted_view(records)

    def describe(self) -> str:
        return "Refit"


# the largest float32: weights are float32 tensors in training (the collator's), so a larger one becomes inf there
FLOAT32_MAX = 3.4028234663852886e38


def check_finite_weights(examples: list[WeightedExample]) -> None:
    """Refuse a non-finite weight (it would turn the whole step's loss into NaN), or one beyond float32's range (finite
    in the file, infinite in training: a reward of 1e308), naming the record."""
    for e in examples:
        if not math.isfinite(e.weight):
            raise ObjectiveDataError(f"{e.where or repr(e.id)}: field 'reward' gives a non-finite weight {e.weight}")
        if abs(e.weight) > FLOAT32_MAX:
            raise ObjectiveDataError(
                f"{e.where or repr(e.id)}: field 'reward' gives the weight {e.weight:g}, beyond "
                "the float32 range (±3.4e38) training computes in; rescale the rewards"
            )
