"""StepDPO's branches (after ACT, Chen et al. 2024, as the paper uses it): for every logged conversation and every
assistant step t, a new turn t is sampled from the same prefix (x, τ_{t−1}) with the logging policy, the branch is
completed to the end with the same teacher and scored with the same reward.

A branch is an ordinary rollout that starts from a prefix (``rollout_tasks(..., prefixes=, start_turn=t)``), so it
uses the batched engine, the teacher and the reward exactly as the logged runs did. Each branch is a valid
:class:`ConversationRecord` (``id = "<parent id>#step<t>"``, the parent's ``task_id`` and ``run``) whose ``meta``
names its parent and step (``branch_of``, ``branch_step``); ``clarify simulate --step_branches true`` writes them to
``branches.jsonl`` beside ``conversations.jsonl``. The StepDPO objective (``train/objectives.py``) pairs every
branch with its parent: the turn-t action whose completed conversation scored higher is chosen.

Cost: a parent with n assistant turns gets n branches that generate n, n−1, …, 1 turns, i.e. n(n+1)/2 turns against
the parent's n — twice the logged generation at n = 3 (``branch_runs`` branches only some runs).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

from clarify_lit.data.records import ConversationRecord, concat_files
from clarify_lit.data.tasks import QATask
from clarify_lit.io import atomic_write_text
from clarify_lit.simulate.engine import derive_seed
from clarify_lit.simulate.rollout import RolloutSpec, rollout_tasks

BRANCH_FILE = "branches.jsonl"
BRANCH_CONFIG = "branch_config.json"


def assistant_positions(messages: Sequence[dict[str, str]]) -> list[int]:
    """Indices of the assistant messages (step t = ``positions[t − 1]``)."""
    return [i for i, m in enumerate(messages) if m["role"] == "assistant"]


def branch_prefix(messages: Sequence[dict[str, str]], step: int) -> list[dict[str, str]]:
    """The prefix (x, τ_{t−1}) a step-``step`` branch starts from: everything before the step-th assistant turn
    (system, the earlier exchanges and teacher turn ``step``)."""
    pos = assistant_positions(messages)
    if not 1 <= step <= len(pos):
        raise ValueError(f"step must be in 1..{len(pos)} (assistant turns), got {step}")
    return [dict(m) for m in messages[: pos[step - 1]]]


def branch_rollouts(
    model,
    tokenizer,
    tasks: Sequence[QATask],
    parents: Sequence[ConversationRecord],
    spec: RolloutSpec,
    *,
    runs: Sequence[int] | None = None,
    temperature: float | None = None,
    **rollout_kw: Any,
) -> list[ConversationRecord]:
    """One branch per (parent, assistant step t): a new turn t sampled from the parent's prefix, completed and scored.

    ``parents`` are the logged records of ``tasks``; ``spec`` is the logged rollout's (its ``temperatures`` are not
    used, its ``seed`` seeds the branches); ``runs`` restricts which runs are branched (None: all); ``temperature``
    samples the branches (None: each parent's own temperature, i.e. the logging policy of that run). ``rollout_kw``
    are :func:`rollout_tasks`' other arguments (teacher, reward, engine, model_name), the same as the logged
    rollout's. Branches of one (step, run) go through one batched call (a task appears once per call); each call's
    seed is ``derive_seed(spec.seed, "step", t, "run", run)``, so the output depends on its inputs alone. Records come
    back ordered by parent, then step.
    """
    by_id = {t.task_id: t for t in tasks}
    run_set = None if runs is None else set(runs)
    branched = [p for p in parents if run_set is None or p.run in run_set]
    groups: dict[tuple[int, int], list[ConversationRecord]] = {}
    for p in branched:
        if p.task_id not in by_id:
            raise ValueError(f"record {p.id!r}: task {p.task_id!r} is not among the tasks given to branch_rollouts")
        for step in range(1, len(assistant_positions(p.messages)) + 1):
            groups.setdefault((step, p.run), []).append(p)
    made: dict[tuple[str, int], ConversationRecord] = {}
    for (step, run), group in sorted(groups.items()):
        temps = {p.temperature if temperature is None else float(temperature) for p in group}
        for temp in sorted(temps):  # one temperature per call (a run has one temperature unless records were mixed)
            members = [p for p in group if (p.temperature if temperature is None else float(temperature)) == temp]
            # branches continue logged prefixes: never seeded (a seeded parent's branch at its seeded turn is the
            # model's own reply, the contrast StepDPO learns from)
            call = replace(
                spec,
                temperatures=[temp],
                seed=derive_seed(spec.seed, "step", step, "run", run),
                explore_runs=[],
                explore_prefixes={},
            )
            out = rollout_tasks(
                model,
                tokenizer,
                [by_id[p.task_id] for p in members],
                call,
                prefixes=[branch_prefix(p.messages, step) for p in members],
                start_turn=step,
                **rollout_kw,
            )
            for p, rec in zip(members, out, strict=True):
                # the prefix's cut turns are the parent's (turns before `step`); the rollout counted only its own
                _, parent_cut = p.truncated_turns()
                cut = sorted({*(t for t in (parent_cut or []) if t < step), *rec.meta["truncated_turns"]})
                made[(p.id, step)] = replace(
                    rec,
                    id=f"{p.id}#step{step}",
                    run=p.run,
                    meta={**rec.meta, "truncated_turns": cut, "branch_of": p.id, "branch_step": step},
                )
    return [made[(p.id, s)] for p in branched for s in range(1, len(assistant_positions(p.messages)) + 1)]


def branch_shard_path(out: Path, k: int) -> Path:
    return out / "shards" / f"branches-{k:05d}.jsonl"


def check_branch_config(out: Path, config: dict[str, Any]) -> None:
    """Record the branch options in ``branch_config.json``; refuse to mix branch shards made with other options.

    Branching never changes the logged records (its seeds are its own), so it is not part of the run's fingerprint:
    ``--resume true --step_branches true`` on a finished simulation adds branches to it."""
    path = out / BRANCH_CONFIG
    config = json.loads(json.dumps(config))
    if path.exists() and any((out / "shards").glob("branches-*.jsonl")):
        old = json.loads(path.read_text(encoding="utf-8"))
        if old != config:
            raise ValueError(
                f"--resume: {out} holds branches made with {old}, this run asks for {config}; use the "
                "same branch options or another --output"
            )
    atomic_write_text(path, json.dumps(config, sort_keys=True) + "\n")


def merge_branch_shards(out: Path, n_chunks: int) -> Path:
    """Concatenate the branch shards in order into ``branches.jsonl`` (atomically)."""
    return concat_files((branch_shard_path(out, k) for k in range(n_chunks)), out / BRANCH_FILE)


def branch_summary(
    parents: Sequence[ConversationRecord], branches: Sequence[ConversationRecord], min_gap: float = 1e-6
) -> dict[str, Any]:
    """How many branches, and how their completed rewards compare with their parents' (StepDPO keeps the
    decisive ones whose turn-t actions differ)."""
    by_id = {p.id: p for p in parents}
    out = {
        "branches": len(branches),
        "per_step": {},
        "branch_better": 0,
        "parent_better": 0,
        "ties": 0,
        "same_action": 0,
        "reward_missing": 0,
    }
    for b in branches:
        p = by_id[b.meta["branch_of"]]
        step = int(b.meta["branch_step"])
        out["per_step"][str(step)] = out["per_step"].get(str(step), 0) + 1
        if b.meta.get("reward_missing") or p.meta.get("reward_missing"):
            out["reward_missing"] += 1
            continue
        pos = assistant_positions(p.messages)[step - 1]
        if b.messages[pos]["content"] == p.messages[pos]["content"]:
            out["same_action"] += 1
        elif b.reward - p.reward >= min_gap:
            out["branch_better"] += 1
        elif p.reward - b.reward >= min_gap:
            out["parent_better"] += 1
        else:
            out["ties"] += 1
    out["pairs"] = out["branch_better"] + out["parent_better"]
    return out
