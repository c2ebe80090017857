"""The training objectives. Each is a small plain object (not an ``nn.Module``) that says

* which **data view** it trains on (``build_view``: records → weighted conversations or preference pairs), and
* which **pure loss** it applies (``clarify_lit.train.losses``).

The examples and the view protocol the DataModule relies on live in the data layer (``clarify_lit.data.views``).

Switching objective is one config value (``--model.objective=Swift``); the DataModule asks the module's objective for
its view, so there is no second flag to keep in sync. Equations and decisions: docs/objectives.md.
"""

from __future__ import annotations

import logging
from typing import ClassVar, Literal

import torch

from clarify_lit.data.records import ConversationRecord, group_by_task
from clarify_lit.data.tasks import QUESTION_BLOCK, format_question
from clarify_lit.data.views import (
    ObjectiveDataError,
    PairExample,
    ViewStats,
    cut_turns,
    reward_weighted_view,
    weighted,
)
from clarify_lit.train.losses import standardize_rewards

log = logging.getLogger(__name__)

#: How DPO gets the reference policy's log-probs (see :class:`DPO`).
Reference = Literal["auto", "adapter_disabled", "frozen_copy", "precomputed"]


def _grouped(records: list[ConversationRecord]) -> tuple[dict[str, list[ConversationRecord]], ViewStats]:
    """Runs grouped by question, and the view stats with the record and task counts filled in."""
    groups = group_by_task(records)
    return groups, ViewStats(records=len(records), tasks=len(groups))


class Objective:
    """Base class. ``kind`` is ``weighted`` (per-conversation weighted NLL) or ``pairwise`` (DPO)."""

    kind: ClassVar[Literal["weighted", "pairwise"]] = "weighted"

    def build_view(self, records: list[ConversationRecord]) -> tuple[list, ViewStats]:
        raise NotImplementedError(f"{type(self).__name__} does not define a data view")

    def describe(self) -> str:
        return objective_name(self)


class Refit(Objective):
    """REward-weighted FIne-Tuning: weight ``w = r`` for every logged conversation (the paper's main method).

    Rewards must be ≥ 0: the paper's lower bound on the policy value needs non-negative rewards, so a negative reward
    is refused with the offending record named.
    """

    def build_view(self, records):
        return reward_weighted_view(records)


class Swift(Objective):
    """Standardized reWard-weIghted Fine-Tuning: ``w = (r − mean_task) / std_task`` over the runs of a question.

    Args:
        zero_std: groups whose population std is below ``min_std`` have no signal (all runs scored alike).
            ``drop`` removes them from the data; ``epsilon`` keeps them with weight 0 (they still count in the token
            normaliser) and divides every group by ``std + epsilon``.
        min_std: threshold for a zero-spread group.
        epsilon: added to the std under ``zero_std=epsilon``.
        min_weight: optional lower clamp of the standardized weights (off by default; the paper allows negatives).
    """

    def __init__(
        self,
        zero_std: Literal["drop", "epsilon"] = "drop",
        min_std: float = 1e-6,
        epsilon: float = 1e-6,
        min_weight: float | None = None,
    ):
        self.zero_std, self.min_std, self.epsilon, self.min_weight = zero_std, min_std, epsilon, min_weight

    def build_view(self, records):
        out, (groups, stats) = [], _grouped(records)
        zero = 0
        for task_id, runs in groups.items():
            if len(runs) < 2:
                raise ObjectiveDataError(
                    f"task {task_id!r} ({runs[0].where()}): field 'task_id' has a single run; Swift standardizes "
                    "rewards over the runs of a question and needs ≥ 2 (simulate with several temperatures)"
                )
            rewards = torch.tensor([r.reward for r in runs], dtype=torch.float64)
            weights, std = standardize_rewards(rewards, eps=self.epsilon if self.zero_std == "epsilon" else 0.0)
            if std < self.min_std:
                zero += 1
                if self.zero_std == "drop":
                    continue
                weights = torch.zeros_like(rewards)
            if self.min_weight is not None:
                weights = weights.clamp_min(self.min_weight)
            out += [weighted(r, float(w)) for r, w in zip(runs, weights)]
        stats.examples = len(out)
        stats.excluded["zero_std_groups"] = zero
        if zero:
            log.info(
                "Swift: %d of %d tasks have zero reward spread (%s)",
                zero,
                len(groups),
                "dropped" if self.zero_std == "drop" else "kept with weight 0",
            )
        if not out:
            raise ObjectiveDataError("Swift: every task has zero reward spread across its runs; nothing to learn")
        return out, stats


class SFT(Objective):
    """STaR-GATE-style SFT: keep the ``top_k`` highest-reward runs of each question, weight 1.

    Args:
        top_k: runs kept per task (ties broken by run order).
        min_reward: also drop runs whose reward is below this (e.g. 1.0 keeps only correct conversations).
    """

    def __init__(self, top_k: int = 1, min_reward: float | None = None):
        if top_k < 1:
            raise ValueError(f"top_k must be ≥ 1, got {top_k}")
        self.top_k, self.min_reward = top_k, min_reward

    def build_view(self, records):
        out, (groups, stats) = [], _grouped(records)
        below = 0
        for runs in groups.values():
            best = sorted(runs, key=lambda r: -r.reward)[: self.top_k]
            for r in best:
                if self.min_reward is not None and r.reward < self.min_reward:
                    below += 1
                    continue
                out.append(weighted(r, 1.0))
        stats.examples = len(out)
        stats.excluded["below_min_reward"] = below
        stats.excluded["not_top_k"] = len(records) - len(out) - below
        if not out:
            raise ObjectiveDataError(f"SFT: no run has reward ≥ min_reward={self.min_reward}")
        return out, stats


class DPO(Objective):
    """Direct Preference Optimization on logged runs: per task, chosen = best run, rejected = worst run.

    Args:
        beta: DPO temperature β (TRL's default 0.1; the paper does not state it).
        pairs: ``conversation`` scores all assistant turns of each whole conversation (shared first context);
            ``final_answer`` is the paper's "DPO" baseline: prompt = the question alone, chosen/rejected = the final
            assistant turns.
        min_gap: a pair is kept only if reward(chosen) − reward(rejected) ≥ min_gap (> 0 so ties never pair).
        reference: ``auto`` = adapter-disabled model under LoRA, a frozen copy under full fine-tuning;
            ``precomputed`` = reference log-probs computed once before training and cached with the dataset.
    """

    kind = "pairwise"

    def __init__(
        self,
        beta: float = 0.1,
        pairs: Literal["conversation", "final_answer"] = "conversation",
        min_gap: float = 1e-6,
        reference: Reference = "auto",
    ):
        if not min_gap > 0:
            raise ValueError(f"min_gap must be > 0 (equal rewards carry no preference), got {min_gap}")
        self.beta, self.pairs, self.min_gap, self.reference = beta, pairs, min_gap, reference

    def build_view(self, records):
        out, (groups, stats) = [], _grouped(records)
        small_gap = 0
        for task_id, runs in groups.items():
            chosen = max(runs, key=lambda r: r.reward)
            rejected = min(runs, key=lambda r: r.reward)
            if not chosen.reward - rejected.reward >= self.min_gap:
                small_gap += 1
                continue
            if self.pairs == "final_answer":
                out.append(
                    PairExample(
                        f"{task_id}#dpo",
                        task_id,
                        _question_then(chosen),
                        _question_then(rejected),
                        only_last_assistant=True,
                        where=chosen.where(),
                        chosen_cut_turns=_final_cut(chosen),
                        rejected_cut_turns=_final_cut(rejected),
                    )
                )
            else:
                out.append(
                    PairExample(
                        f"{task_id}#dpo",
                        task_id,
                        chosen.messages,
                        rejected.messages,
                        where=chosen.where(),
                        chosen_cut_turns=cut_turns(chosen),
                        rejected_cut_turns=cut_turns(rejected),
                    )
                )
        stats.examples = len(out)
        stats.excluded["gap_below_min"] = small_gap
        if not out:
            raise ObjectiveDataError(
                f"DPO: no task has a reward gap ≥ min_gap={self.min_gap} between its best and worst run "
                f"({len(groups)} tasks); nothing to prefer"
            )
        return out, stats


class StepDPO(DPO):
    """Per-step DPO (after ACT, Chen et al. 2024, as the paper's StepDPO baseline): preference pairs of single
    assistant actions taken from the same prefix.

    Needs branch records (``clarify simulate --step_branches true`` writes ``branches.jsonl``; pass it together with
    ``conversations.jsonl`` in ``data.train_files``). A branch (``meta.branch_of`` = its parent's id,
    ``meta.branch_step`` = t) shares its parent's prefix (x, τ_{t−1}), takes a new action at step t and was completed
    and scored like its parent. Per (parent, branch): prompt = the prefix, chosen/rejected = the step-t action of the
    conversation that scored higher/lower; the loss covers that single assistant turn (the prefix and the later turns
    are not trained). Pairs whose reward gap is below ``min_gap`` (ties) or whose two actions are the same text are
    dropped. Other records (the logged runs) are only the parents.

    Args: as :class:`DPO` (``beta``, ``min_gap``, ``reference``); there is no ``pairs`` choice.
    """

    def __init__(self, beta: float = 0.1, min_gap: float = 1e-6, reference: Reference = "auto"):
        if not min_gap > 0:
            raise ValueError(f"min_gap must be > 0 (equal rewards carry no preference), got {min_gap}")
        self.beta, self.min_gap, self.reference = beta, min_gap, reference

    def build_view(self, records):
        branches = [r for r in records if "branch_of" in r.meta]
        parents = {r.id: r for r in records if "branch_of" not in r.meta}
        stats = ViewStats(records=len(records), tasks=len({r.task_id for r in records}))
        if not branches:
            raise ObjectiveDataError(
                f"StepDPO: none of the {len(records)} records is a branch (meta.branch_of); simulate with "
                "--step_branches true and pass branches.jsonl together with conversations.jsonl in data.train_files"
            )
        out = []
        no_parent = ties = same = 0
        for b in branches:
            parent = parents.get(b.meta["branch_of"])
            if parent is None:
                no_parent += 1
                continue
            step = b.meta.get("branch_step")
            pos = [i for i, m in enumerate(parent.messages) if m["role"] == "assistant"]
            if not isinstance(step, int) or not 1 <= step <= len(pos):
                raise ObjectiveDataError(
                    f"record {b.id!r}: field 'meta.branch_step' = {step!r} is not an assistant "
                    f"step of its parent {parent.id!r} (1..{len(pos)})"
                )
            at = pos[step - 1]
            prefix = parent.messages[:at]
            if b.messages[:at] != prefix or len(b.messages) <= at or b.messages[at]["role"] != "assistant":
                raise ObjectiveDataError(
                    f"record {b.id!r}: field 'messages' does not continue the prefix of its "
                    f"parent {parent.id!r} up to step {step}"
                )
            if b.messages[at]["content"] == parent.messages[at]["content"]:
                same += 1
                continue
            gap = b.reward - parent.reward
            if abs(gap) < self.min_gap:
                ties += 1
                continue
            win, lose = (b, parent) if gap > 0 else (parent, b)
            out.append(
                PairExample(
                    f"{b.id}#stepdpo",
                    b.task_id,
                    [*prefix, win.messages[at]],
                    [*prefix, lose.messages[at]],
                    only_last_assistant=True,
                    where=b.where(),
                    chosen_cut_turns=(step,) if step in cut_turns(win) else (),
                    rejected_cut_turns=(step,) if step in cut_turns(lose) else (),
                )
            )
        stats.examples = len(out)
        stats.excluded.update(ties=ties, same_action=same, no_parent=no_parent)
        if no_parent:
            log.warning("StepDPO: %d branch(es) whose parent is not among the records were skipped", no_parent)
        if not out:
            raise ObjectiveDataError(
                f"StepDPO: no (parent, branch) pair has a reward gap ≥ min_gap={self.min_gap} and distinct actions "
                f"({len(branches)} branches: {ties} ties, {same} identical actions, {no_parent} without parent)"
            )
        return out, stats


class Distill(SFT):
    """STaR-GATE-D: distil a trained teacher policy (the STaR-GATE/SFT run) into the base model.

    ``loss = α·T²·KL(p_teacher,T ‖ p_student,T) + (1 − α)·CE`` per trained token, averaged over the optimizer step's
    trained tokens (``losses.distillation_loss``), on the SFT view: the ``top_k`` best runs of each question (the
    conversations the teacher was trained on). The teacher's log-probs are computed in the training step under
    ``no_grad`` (never cached: a full-vocabulary distribution per token does not fit on disk or in memory).

    Args:
        teacher: an exported folder (``<run>/export``: PEFT adapter naming its base model, or full weights), a
            ``ClarifyModule`` checkpoint (``.ckpt``) or a model name/path. A string, loaded when training starts.
        alpha: weight of the KL term (the paper: 0.5).
        temperature: softening temperature T of both distributions in the KL term (the paper: 2).
        top_k, min_reward: the SFT selection (see :class:`SFT`).
    """

    def __init__(
        self,
        teacher: str | None = None,
        alpha: float = 0.5,
        temperature: float = 2.0,
        top_k: int = 1,
        min_reward: float | None = None,
    ):
        super().__init__(top_k=top_k, min_reward=min_reward)
        if not 0.0 <= alpha <= 1.0:
            raise ValueError(f"alpha must be in [0, 1], got {alpha}")
        if not temperature > 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        self.teacher, self.alpha, self.temperature = teacher, alpha, temperature


def question_prompt(record: ConversationRecord) -> str:
    """The question alone — text and lettered options, no turn instruction: ``meta.question_prompt`` as the simulator
    stores it, else built from ``meta.question``/``meta.choices``, else the options read back from the first teacher
    turn with that turn's instruction removed. Never the raw teacher turn (in the clarifying setting it says "ask
    me one question, do not answer", which the final-answer pairs would then train against)."""
    stored = record.meta.get("question_prompt")
    if isinstance(stored, str) and stored.strip():
        return stored
    question, choices = record.meta.get("question"), record.meta.get("choices")
    if isinstance(question, str) and question.strip() and isinstance(choices, list) and choices:
        return format_question(question, [str(c) for c in choices])
    first = next((m["content"] for m in record.messages if m["role"] == "user"), "")
    block = QUESTION_BLOCK.search(first)
    if block:
        return block.group(0)
    raise ObjectiveDataError(
        f"{record.where()}: field 'meta.question_prompt': missing, and the question cannot be rebuilt (no "
        "meta.question/meta.choices, no lettered options in the first teacher turn); re-simulate to record it"
    )


def _question_then(record: ConversationRecord) -> list[dict[str, str]]:
    """The final-answer DPO prompt: system + the question alone (:func:`question_prompt`), then the record's final
    assistant turn."""
    msgs = record.messages
    system = [msgs[0]] if msgs[0]["role"] == "system" else []
    final = next(m for m in reversed(msgs) if m["role"] == "assistant")
    return [*system, {"role": "user", "content": question_prompt(record)}, final]


def _final_cut(record: ConversationRecord) -> tuple[int, ...]:
    """``(1,)`` if the record's final assistant turn was cut (it is turn 1 of the final-answer pair), else ``()``."""
    n = sum(m["role"] == "assistant" for m in record.messages)
    return (1,) if n in cut_turns(record) else ()


def objective_name(objective: Objective) -> str:
    """The objective's class name, also for jsonargparse's ``lazy_instance`` wrappers (``LazyInstance_Refit``)."""
    for cls in type(objective).__mro__:
        if cls.__module__ == __name__ and issubclass(cls, Objective) and cls is not Objective:
            return cls.__name__
    return type(objective).__name__


def objective_settings(objective: Objective) -> dict:
    """Constructor settings of an objective, without lazy-instance bookkeeping attributes."""
    return {k: v for k, v in vars(objective).items() if not k.startswith("_") and not callable(v)}
