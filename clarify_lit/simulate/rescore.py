"""``clarify rescore``: score finished conversations again with another reward, generating nothing.

Offline RL only reweights what the logging policy did, so a changed reward needs no new rollouts: rescore the
logged records (``conversations.jsonl`` and, for StepDPO, ``branches.jsonl``) and train on the new files; or
rescore an evaluation's ``rollouts.jsonl`` to read the same policies under another reward. Examples::

    clarify rescore --inputs '[runs/x/simulate/conversations.jsonl, runs/x/simulate/branches.jsonl]' \\
        --output runs/x/simulate-rubric --data.dataset sciq --data.n_train 32 --data.n_test 100 \\
        --reward.kind rubric
    clarify rescore --inputs '[runs/x/eval/Refit/rollouts.jsonl]' --output runs/x/eval-rubric/Refit \\
        --data.dataset sciq --data.part test --data.n_train 32 --data.n_test 100 --reward.kind rubric

Output folder ``--output DIR``: ``DIR/<name of each input>`` (the records with ``reward`` and
``reward_components`` replaced; the old ones kept in ``meta.rescored_from``) and ``DIR/rescore.json`` (the reward, and
per file: records, mean reward and questions whose runs differ in reward, before and after, components' means).
Records are matched to their questions by ``task_id`` under ``--data`` (the data options the records were made
with); a record whose question is not there, whose gold letter differs from the dataset's, or whose
``meta.question_hash`` (question text, options and gold) differs from the dataset question's, is an error naming
the file, the line, the record and the field — never a silent skip. Records written before the hash existed are
matched by id and gold alone, and counted (a warning and ``records_without_question_hash`` in ``rescore.json``).
Existing outputs are refused unless ``--overwrite true``.
"""

from __future__ import annotations

import json
import logging
import math
import statistics
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from clarify_lit.arguments import CommandLine
from clarify_lit.data.records import (
    ConversationRecord,
    RecordError,
    load_records,
    mean_components,
    questions_with_reward_variance,
    write_records,
)
from clarify_lit.environment import environment_stamp
from clarify_lit.io import atomic_write_text, output_lock
from clarify_lit.models import DType, FrozenModels, resolve_device, resolve_dtype
from clarify_lit.simulate.options import DataOptions, RewardOptions, build_reward, load_data_tasks

log = logging.getLogger("clarify.rescore")

SUMMARY_FILE = "rescore.json"


@dataclass
class RescoreConfig:
    """Score finished conversation records again with another reward (no generation; see docs/simulate.md)."""

    inputs: list[str] = field(default_factory=list)
    """Record files (JSONL, .jsonl.gz, Parquet or a datasets folder): a simulation's conversations.jsonl and
    branches.jsonl, an evaluation's rollouts.jsonl, or committed rollouts (results/*-rollouts/*.jsonl.gz). Each is
    written to the output folder under its own name, without .gz (names must differ)."""
    output: str = "runs/rescore"
    """Output folder."""
    data: DataOptions = field(default_factory=DataOptions)
    """The questions the records were made on (same options as their simulate/evaluate; part test for an evaluation)."""
    reward: RewardOptions = field(default_factory=RewardOptions)
    model: str = "embedded:smollm2-135m-instruct"
    """The policy the records came from: judges (gold_prob, the rubric's dense accuracy, an HF llm_judge) default to
    its base model, as in simulate."""
    dtype: DType = "float32"
    """Judge model dtype."""
    device: str = "auto"
    batch_size: int = 8
    """Judge batch size."""
    seed: int = 0
    """Seed passed to the reward (sampling judges)."""
    overwrite: bool = False
    """Replace outputs that exist already."""


COMMAND_LINE = CommandLine(RescoreConfig, "clarify rescore", __doc__.split("\n\n")[0], "CLARIFY_RESCORE")
build_parser, parse_config = COMMAND_LINE.parser, COMMAND_LINE.parse


def _line(r: ConversationRecord) -> str:
    """The record's place in its file (``source`` is ``file:line``)."""
    return r.source.rsplit(":", 1)[-1] if ":" in r.source else "?"


def _reward_stats(records: list[ConversationRecord]) -> dict[str, Any]:
    rewards = [r.reward for r in records]
    return {
        "mean_reward": statistics.fmean(rewards),
        "se_reward": statistics.stdev(rewards) / math.sqrt(len(rewards)) if len(rewards) > 1 else None,
        "questions": len({r.task_id for r in records}),
        "questions_with_reward_variance": questions_with_reward_variance(records),
    }


def run(cfg: RescoreConfig) -> dict[str, Any]:
    """Rescore every input; return the summary (also written to ``DIR/rescore.json``)."""
    if not cfg.inputs:
        raise ValueError("clarify rescore: give the record files to rescore with --inputs")
    names = [Path(p).name.removesuffix(".gz") for p in cfg.inputs]  # a gzipped input is written as plain JSONL
    if len(set(names)) != len(names):
        raise ValueError(
            f"clarify rescore: inputs must have distinct file names (each is written under its own "
            f"name in --output), got {names}"
        )
    out = Path(cfg.output)
    targets = [out / n for n in names] + [out / SUMMARY_FILE]
    if any(Path(p).resolve() == t.resolve() for p in cfg.inputs for t in targets):
        raise ValueError("clarify rescore: --output would overwrite an input; choose another folder")
    existing = [str(t) for t in targets if t.exists()]
    if existing and not cfg.overwrite:
        raise FileExistsError(
            f"clarify rescore: {', '.join(existing)} exist(s); choose another --output or pass --overwrite true"
        )
    tasks = {t.task_id: t for t in load_data_tasks(cfg.data)}
    loaded = []
    unchecked = 0  # records without meta.question_hash (older files): matched by task id and gold only
    for path in cfg.inputs:
        records, _ = load_records(path)
        for r in records:
            task = tasks.get(r.task_id)
            if task is None:
                raise RecordError(
                    path,
                    _line(r),
                    r.id,
                    "task_id",
                    f"{r.task_id!r} is not a question of --data ({cfg.data.dataset}, part "
                    f"{cfg.data.part}, seed {cfg.data.seed}): pass the data options the records "
                    "were made with",
                )
            if r.gold is not None and r.gold != task.gold:
                raise RecordError(
                    path,
                    _line(r),
                    r.id,
                    "gold",
                    f"{r.gold!r} but the dataset's gold for {r.task_id!r} is {task.gold!r}: the "
                    "records come from other data options",
                )
            stored = r.meta.get("question_hash")
            if stored is None:
                unchecked += 1
            elif stored != task.content_hash:
                raise RecordError(
                    path,
                    _line(r),
                    r.id,
                    "meta.question_hash",
                    f"{stored!r}, but question {r.task_id!r} of --data ({cfg.data.dataset}, part "
                    f"{cfg.data.part}) hashes to {task.content_hash!r}: its text, options or gold "
                    "differ from those the record was made on (the rewards would be of another "
                    "question); pass the data the records were made with",
                )
        loaded.append((path, records))
    if unchecked:
        log.warning(
            "%d of %d records carry no meta.question_hash (written before it existed): their questions were "
            "matched by task id and gold letter only, not checked against --data's text and options",
            unchecked,
            sum(len(records) for _, records in loaded),
        )
    modes = {str(r.meta.get("mode", "thinking")) for _, records in loaded for r in records}
    if len(modes) > 1:
        raise ValueError(
            f"clarify rescore: the inputs mix modes {sorted(modes)}; rescore open-mode records "
            "(graded by the option text named) apart from lettered ones"
        )
    device = resolve_device(cfg.device)
    reward = build_reward(
        cfg.reward,
        policy=cfg.model,
        models=FrozenModels(device),
        batch_size=cfg.batch_size,
        mode="open" if modes == {"open"} else "thinking",
    )
    summary: dict[str, Any] = {
        "reward": reward.describe(),
        "files": {},
        "config": asdict(cfg),
        "records_without_question_hash": unchecked,
        "environment": environment_stamp(device, resolve_dtype(cfg.reward.judge_dtype, device)),
    }
    with output_lock(out, "clarify rescore"):
        for (path, records), name in zip(loaded, names, strict=True):
            before = _reward_stats(records)
            results = reward.score([tasks[r.task_id] for r in records], [r.messages for r in records], seed=cfg.seed)
            for r, res in zip(records, results, strict=True):
                if not (res.value >= 0 and math.isfinite(res.value)):  # Refit weights need r >= 0
                    raise ValueError(
                        f"reward {reward.describe()} gave {res.value} for {r.where()}; Refit needs finite r >= 0"
                    )
                r.meta["rescored_from"] = {"reward": r.reward, "reward_components": r.reward_components}
                r.reward, r.reward_components = float(res.value), dict(res.components)
            write_records(out / name, records)
            summary["files"][name] = {
                "input": str(path),
                "records": len(records),
                "before": before,
                "after": _reward_stats(records),
                "components_mean": mean_components(records),
            }
            log.info(
                "%s: %d records, mean reward %.4f -> %.4f",
                name,
                len(records),
                before["mean_reward"],
                summary["files"][name]["after"]["mean_reward"],
            )
        atomic_write_text(out / SUMMARY_FILE, json.dumps(summary, indent=1) + "\n")
    return summary


def main(argv: list[str] | None = None) -> None:
    """Entry point of ``clarify rescore``."""
    logging.basicConfig(level=logging.INFO, format="[%(name)s] %(message)s")
    cfg = parse_config(argv)
    summary = run(cfg)
    unchecked = summary["records_without_question_hash"]
    print(
        json.dumps(
            {
                "reward": summary["reward"],
                **({"records_without_question_hash (not checked)": unchecked} if unchecked else {}),
                **{
                    n: {"records": f["records"], "mean_reward": [f["before"]["mean_reward"], f["after"]["mean_reward"]]}
                    for n, f in summary["files"].items()
                },
            },
            indent=1,
        )
    )
    print(f"records: {cfg.output}")


if __name__ == "__main__":
    main()
