"""``clarify simulate``: roll the logging policy out on a QA dataset and write conversation records.

Output folder ``--output DIR``::

    DIR/run_config.json      what produced the shards (checked by --resume)
    DIR/shards/shard-00000.jsonl   one shard per chunk of ``chunk_size`` tasks, each written atomically
    DIR/conversations.jsonl  all shards merged in order (atomically, at the end)
    DIR/branches.jsonl       with --step_branches true: StepDPO's branches (simulate/branches.py)
    DIR/summary.json         counts, mean reward and components, parse failures, timing

Chunk k is rolled out with seed ``derive_seed(seed, "chunk", k)``, a function of the chunk alone, so ``--resume``
(which skips chunks whose shard exists) finishes an interrupted run with output byte-identical to an uninterrupted
one. Examples::

    clarify simulate --config configs/simulate/tiny-reasoning.yaml
    clarify simulate --config configs/simulate/smollm2-openbookqa-reasoning.yaml --data.limit 20 --output runs/x
    clarify simulate --config ... --resume true
    clarify simulate --config ... --rollout.adaptive true --rollout.discount 0.9   # may answer early; reward × γ^turns
    clarify simulate --config ... --model runs/swift/export         # a trained policy (LoRA export) logs the data
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import statistics
import sys
import time
from collections import Counter
from dataclasses import asdict, dataclass, field, replace
from functools import partial
from pathlib import Path
from typing import Any

import torch

from clarify_lit.arguments import CommandLine
from clarify_lit.data.records import (
    ConversationRecord,
    concat_files,
    load_records,
    mean_components,
    questions_with_reward_variance,
    write_records,
)
from clarify_lit.data.tasks import QATask
from clarify_lit.environment import environment_stamp
from clarify_lit.io import atomic_write_text, output_lock
from clarify_lit.models import DTypeChoice, FrozenModels, resolve_device, resolve_dtype
from clarify_lit.simulate.branches import (
    BRANCH_CONFIG,
    BRANCH_FILE,
    branch_rollouts,
    branch_shard_path,
    branch_summary,
    check_branch_config,
    merge_branch_shards,
)
from clarify_lit.simulate.endpoint_calls import endpoint_calls
from clarify_lit.simulate.endpoint_policy import EndpointPolicyEngine
from clarify_lit.simulate.engine import derive_seed
from clarify_lit.simulate.leaks import count_flags
from clarify_lit.simulate.missing_rewards import (
    DEFAULT_MAX_MISSING_SHARE,
    MissingRewardsError,
    check_max_share,
    check_missing_rewards,
    missing_share,
)
from clarify_lit.simulate.options import (
    ROLLOUT_MOVES,
    DataOptions,
    EndpointOptions,
    RewardOptions,
    RolloutOptions,
    TeacherOptions,
    build_reward,
    build_teacher,
    endpoint_backend,
    load_data_tasks,
    moved_rollout_flags,
    teacher_kind,
)
from clarify_lit.simulate.parsing import uses_thinking_tags
from clarify_lit.simulate.rewards import Reward, final_answer_of
from clarify_lit.simulate.rollout import (
    RolloutSpec,
    build_engine,
    check_context_budget,
    check_explore,
    rollout_tasks,
)
from clarify_lit.simulate.teachers import Teacher

log = logging.getLogger("clarify.simulate")

SHARD_DELAY_ENV = "CLARIFY_SIMULATE_SHARD_DELAY"  # test hook: seconds to sleep after each shard (kill window)


@dataclass
class SimulateConfig:
    """Simulate conversations of a policy with a teacher and score them (see docs/simulate.md)."""

    model: str = "embedded:smollm2-135m-instruct"
    """Policy (= logging policy): hub id, local folder, embedded:smollm2-135m-instruct, tiny-random, or an exported
    LoRA adapter folder (runs/<run>/export: applied to its base and merged; teacher/judge default to that base)."""
    dtype: DTypeChoice = "auto"
    """Policy weights dtype: auto = bfloat16 where the device computes it natively (a CPU with avx512_bf16 or
    amx_bf16, a GPU with bf16), else float32 (docs/environment.md); resolved before the run, and the resolved dtype
    is what run_config.json and summary.json record (so a resume on a CPU of the other kind is refused)."""
    device: str = "auto"
    """auto (cuda if available), cpu, cuda, cuda:1 …"""
    data: DataOptions = field(default_factory=DataOptions)
    rollout: RolloutOptions = field(default_factory=RolloutOptions)
    """How conversations are played and generated (--rollout.n_turns, --rollout.temperatures, …)."""
    teacher: TeacherOptions = field(default_factory=TeacherOptions)
    reward: RewardOptions = field(default_factory=RewardOptions)
    policy_endpoint: EndpointOptions = field(default_factory=EndpointOptions)
    """Generate the policy's turns through an OpenAI-compatible endpoint serving ``model`` (e.g. ``vllm serve``) instead
    of locally: set base_url and model (simulate/endpoint_policy.py). Unset: the local batched engine."""
    chunk_size: int = 8
    """Tasks per shard (the unit of --resume)."""
    step_branches: bool = False
    """StepDPO data: for every conversation and assistant step t, branch a new turn t from the same prefix,
    complete it with the same teacher and reward (branches.jsonl; about 2x the generation at n_turns=3)."""
    branch_runs: list[int] | None = None
    """Runs (indices into temperatures) whose conversations are branched (None: all)."""
    branch_temperature: float | None = None
    """Temperature of the branches (None: each parent run's own temperature)."""
    explore_runs: list[int] | None = None
    """Seeded exploration (docs/simulate.md): runs (indices into temperatures) whose replies are forced to begin
    with explore_prefixes — a logging policy that asks where the model alone rarely does. None: off."""
    explore_prefixes: dict[int, str] | None = None
    """Assistant turn → forced start of a seeded run's reply ({letter}: an option letter drawn per conversation),
    e.g. {1: "What does option {letter}", 2: "<thinking>"}. Logged as part of the reply (trained on); recorded in
    the record's meta.explore_prefixes. Evaluation and StepDPO branches never seed."""
    output: str = "runs/simulate"
    """Output folder."""
    resume: bool = False
    """Skip chunks whose shard exists (the run config must match)."""
    overwrite: bool = False
    """Delete an existing output folder's shards first."""
    progress: bool = True
    max_missing_rewards: float = DEFAULT_MAX_MISSING_SHARE
    """Largest share (0-1) of conversations allowed to end without a reward (an LLM judge whose replies could not be
    parsed); above it the command exits non-zero with one line naming the judge, the share and a raw reply (saved in
    the output folder: simulate/missing_rewards.py). 1 = never fail."""

    def rollout_spec(self, seed: int) -> RolloutSpec:
        """How this simulation plays its conversations, seeded with ``seed`` (a chunk's or the branches' own)."""
        return RolloutSpec.of(
            self.rollout,
            seed=seed,
            explore_runs=list(self.explore_runs or []),
            explore_prefixes={int(k): v for k, v in (self.explore_prefixes or {}).items()},
        )


# fields that may differ between an interrupted run and its resumption
_RUNTIME_FIELDS = ("output", "resume", "overwrite", "progress", "device", "max_missing_rewards")


COMMAND_LINE = CommandLine(
    SimulateConfig,
    "clarify simulate",
    __doc__.split("\n\n")[0],
    "CLARIFY_SIMULATE",
    "YAML config (e.g. configs/simulate/*.yaml)",
    rewrite=partial(moved_rollout_flags, prog="clarify simulate"),
    moved=ROLLOUT_MOVES,
)
build_parser, parse_config = COMMAND_LINE.parser, COMMAND_LINE.parse


# ---------------------------------------------------------------------------------------------------------------
# shards, resume, merge


def shard_path(out: Path, k: int) -> Path:
    return out / "shards" / f"shard-{k:05d}.jsonl"


# Options that are "off" at these values (alone or, for a group, all together) stay out of a run's fingerprint: a
# run made before an option existed behaved as the option's off value, so its run_config.json still matches. A new
# option whose off value reproduces the older records gets its line here.
OFF_VALUES: tuple[tuple[tuple[str, ...], tuple[Any, ...]], ...] = (
    (("adaptive", "discount"), (False, 1.0)),
    (("mix_temperatures",), (False,)),
    (("reuse_kv_cache",), (False,)),
    (("share_prefix",), (False,)),
    (("attention",), ("model",)),
    (("explore_runs", "explore_prefixes"), (None, None)),  # None, [] and {} alike
    (("policy_endpoint.base_url",), (None,)),  # a local policy: the whole endpoint block goes
)


def _is_off(value: Any, off: Any) -> bool:
    return value == off or (off is None and not value)


def run_fingerprint(cfg: SimulateConfig, task_ids: list[str]) -> dict[str, Any]:
    """Everything that determines the records: the config without runtime fields, plus the task ids.

    The rollout block is recorded flat (``n_turns``, ``temperatures``, … beside ``model``), as ``run_config.json``
    has always held it; options at their :data:`OFF_VALUES` are left out."""
    values = asdict(cfg)
    conf = {k: v for k, v in values.items() if k not in _RUNTIME_FIELDS and k != "rollout"}
    conf.update(values["rollout"])
    for keys, offs in OFF_VALUES:
        current = [conf[k] if "." not in k else conf[k.split(".")[0]][k.split(".")[1]] for k in keys]
        if all(_is_off(v, off) for v, off in zip(current, offs, strict=True)):
            for k in keys:
                conf.pop(k.split(".")[0])
    # options that cannot change these records stay out, so runs made before the options existed still resume:
    # the gold-text hiding of the retrieval teacher, and the rubric's settings under any other reward
    if (
        teacher_kind(cfg.teacher, cfg.rollout.setting, cfg.rollout.mode) != "retrieval"
        or not cfg.teacher.hide_gold_text
    ):
        conf["teacher"].pop("hide_mode")
    if cfg.reward.kind != "rubric":
        for k in ("rubric_weights", "rubric_accuracy", "word_limit", "min_words"):
            conf["reward"].pop(k)
    for k in ("step_branches", "branch_runs", "branch_temperature"):
        conf.pop(k)  # branches never change the logged records; their options are checked by check_branch_config
    return {"config": conf, "task_ids": task_ids}


def prepare_output(cfg: SimulateConfig, fingerprint: dict[str, Any]) -> tuple[Path, set[int]]:
    """Create/check the output folder; return it and the chunk indices already done (on --resume)."""
    out = Path(cfg.output)
    shards = out / "shards"
    cfg_file = out / "run_config.json"
    existing = sorted(shards.glob("shard-*.jsonl")) if shards.exists() else []
    branched = any(shards.glob("branches-*.jsonl")) if shards.exists() else False
    if cfg_file.exists() and not existing and not branched and not (out / "conversations.jsonl").exists():
        # a start that failed before its first shard (a template that raised, a refused endpoint, an earlier
        # version's late checks): not a run, so neither refused nor compared on --resume; its run_config.json is ours
        log.info("%s holds only a failed start (run_config.json, no shard): starting afresh", out)
        cfg_file.unlink()
    if cfg.overwrite and out.exists():
        for p in (
            shards,
            out / "conversations.jsonl",
            out / BRANCH_FILE,
            out / BRANCH_CONFIG,
            out / "summary.json",
            cfg_file,
        ):
            if p.is_dir():
                shutil.rmtree(p)
            elif p.exists():
                p.unlink()
        existing = []
    if (existing or cfg_file.exists()) and not cfg.resume:
        raise FileExistsError(
            f"{out} already holds a simulation ({len(existing)} shards); pass --resume true to "
            "finish it or --overwrite true to start again"
        )
    if cfg.resume and cfg_file.exists():
        old = json.loads(cfg_file.read_text(encoding="utf-8"))
        new = json.loads(json.dumps(fingerprint))  # as written: JSON keys are strings
        if old != new:
            diff = _diff_keys(old.get("config", {}), new["config"])
            if old.get("task_ids") != fingerprint["task_ids"]:
                diff.append("task_ids")
            raise ValueError(
                f"--resume: {out} was produced by a different configuration (differs in: "
                f"{', '.join(diff) or 'unknown'}); use the same config or another --output"
            )
    elif cfg.resume and existing:
        raise ValueError(f"--resume: {out} has shards but no run_config.json; cannot check they match")
    shards.mkdir(parents=True, exist_ok=True)
    for tmp in shards.glob("*.tmp"):  # a shard half-written when the run was killed (never renamed into place)
        tmp.unlink()
    # run_config.json is written by _run() once the models and endpoints are built: a command that fails its checks
    # leaves nothing behind that would refuse the corrected command
    done = {int(p.stem.split("-")[1]) for p in shards.glob("shard-*.jsonl")}
    return out, done


def _diff_keys(a: dict, b: dict, prefix: str = "") -> list[str]:
    keys = []
    for k in sorted(set(a) | set(b)):
        va, vb = a.get(k), b.get(k)
        if isinstance(va, dict) and isinstance(vb, dict):
            keys.extend(_diff_keys(va, vb, f"{prefix}{k}."))
        elif va != vb:
            keys.append(prefix + k)
    return keys


def merge_shards(out: Path, n_chunks: int) -> Path:
    """Concatenate the shards in order into ``conversations.jsonl`` (atomically)."""
    return concat_files((shard_path(out, k) for k in range(n_chunks)), out / "conversations.jsonl")


def _final_hedges(record: ConversationRecord) -> bool:
    """Whether the final answer hedges: names several letters, or (open mode) several options' texts."""
    open_answers = record.meta.get("mode") == "open"
    return final_answer_of(
        record.messages[-1]["content"], record.meta["choices"] if open_answers else None, open_answers=open_answers
    ).hedged


def summarize(
    records: list[ConversationRecord],
    *,
    timing: dict[str, float],
    cfg: SimulateConfig,
    n_tasks: int,
    shards_total: int,
    shards_resumed: int,
    extra: dict[str, Any],
) -> dict[str, Any]:
    rewards = [r.reward for r in records if not r.meta.get("reward_missing")]
    cut_turns = sum(r.truncated_turns()[0] for r in records)
    return {
        "tasks": n_tasks,
        "conversations": len(records),
        "runs_per_task": len(cfg.rollout.temperatures),
        "datasets": dict(Counter(r.dataset for r in records)),
        "mean_reward": statistics.fmean(rewards) if rewards else None,
        "std_reward": statistics.pstdev(rewards) if len(rewards) > 1 else None,
        "reward_missing": sum(bool(r.meta.get("reward_missing")) for r in records),
        "reward_missing_share": missing_share(records),
        **count_flags([r.meta for r in records]),  # teacher_leaks, echoed_instructions (simulate/leaks.py)
        "components_mean": mean_components(records),
        "parse_failures": sum(r.prediction is None for r in records),
        "hedged": sum(_final_hedges(r) for r in records),
        "accuracy": statistics.fmean(float(r.prediction == r.gold) for r in records) if records else None,
        "thinking_rate": statistics.fmean(float(uses_thinking_tags(r.messages[-1]["content"])) for r in records)
        if records
        else None,
        "tasks_with_reward_variance": questions_with_reward_variance(records),
        "empty_turns": sum(int(r.meta.get("empty_turns", 0)) for r in records),
        **({"explore_seeded": sum("explore_prefixes" in r.meta for r in records)} if cfg.explore_runs else {}),
        "truncated_turns": cut_turns,
        "truncated_rate": cut_turns / max(1, sum(m["role"] == "assistant" for r in records for m in r.messages)),
        **(
            {
                "mean_turns_used": statistics.fmean(sum(m["role"] == "assistant" for m in r.messages) for r in records),
                "ended_early": sum(bool(r.meta.get("ended_early")) for r in records),
            }
            if cfg.rollout.adaptive and records
            else {}
        ),
        "shards": shards_total,
        "shards_resumed": shards_resumed,
        "timing": timing,
        **extra,
        "config": asdict(cfg),
    }


def resolve_dtypes(cfg: SimulateConfig, device: torch.device | str) -> SimulateConfig:
    """``cfg`` with every ``auto`` dtype (policy, teacher, judge) resolved for ``device``
    (:func:`~clarify_lit.models.resolve_dtype`): the fingerprint and the summary record what actually ran."""
    return replace(
        cfg,
        dtype=resolve_dtype(cfg.dtype, device),
        teacher=replace(cfg.teacher, dtype=resolve_dtype(cfg.teacher.dtype, device)),
        reward=replace(cfg.reward, judge_dtype=resolve_dtype(cfg.reward.judge_dtype, device)),
    )


# ---------------------------------------------------------------------------------------------------------------
# main


def run(cfg: SimulateConfig) -> dict[str, Any]:
    """Run a simulation described by ``cfg``; return the summary (also written to ``summary.json``).

    The output folder is locked for the whole run (:func:`~clarify_lit.io.output_lock`): a second simulation into
    the same folder is refused instead of mixing its shards with this one's."""
    with output_lock(Path(cfg.output), "clarify simulate"):
        return _run(cfg)


def _run(cfg: SimulateConfig) -> dict[str, Any]:
    check_config(cfg)  # before loading any model or writing anything
    device = resolve_device(cfg.device)
    cfg = resolve_dtypes(cfg, device)
    plan = plan_run(cfg)
    players = build_players(cfg, device, needed=bool(plan.todo or plan.branch_todo))
    # only now that the models and endpoints are built (prepare_output says why)
    atomic_write_text(plan.out / "run_config.json", json.dumps(plan.fingerprint, indent=1, sort_keys=True) + "\n")
    done = run_chunks(cfg, plan, players)
    return finish(cfg, plan, players, done, device)


def check_config(cfg: SimulateConfig) -> None:
    """Refuse options no simulation can run with, naming the option."""
    if cfg.chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {cfg.chunk_size}")
    cfg.rollout.check()
    check_max_share(cfg.max_missing_rewards)
    check_explore(cfg.rollout_spec(cfg.rollout.seed))
    if cfg.explore_runs and cfg.policy_endpoint.base_url:
        raise ValueError(
            "explore_runs with policy_endpoint: a chat-completions endpoint cannot be made to continue "
            "a forced start of the assistant's reply; seed a local policy"
        )
    if cfg.rollout.discount != 1.0 and not cfg.rollout.adaptive:
        log.warning(
            "discount=%g without adaptive: every conversation has n_turns turns, so the discount only "
            "rescales all rewards by the same factor",
            cfg.rollout.discount,
        )
    run_ids = set(range(len(cfg.rollout.temperatures)))
    if cfg.branch_runs is not None and not set(cfg.branch_runs) <= run_ids:
        raise ValueError(f"branch_runs must index temperatures (0..{len(run_ids) - 1}), got {cfg.branch_runs}")
    bt = cfg.branch_temperature
    if bt is not None and not (bt >= 0 and math.isfinite(bt)):
        raise ValueError(f"branch_temperature must be a finite number >= 0, got {bt}")


@dataclass
class RunPlan:
    """What a simulation has to do: its tasks in chunks, its output folder and which chunks are done."""

    tasks: list[QATask]
    chunks: list[list[QATask]]
    fingerprint: dict[str, Any]
    out: Path
    done: set[int]
    """Chunks whose shard exists (resume)."""
    todo: list[int]
    """Chunks to roll out."""
    branch_todo: list[int]
    """Chunks logged without their StepDPO branches (e.g. branching added on --resume)."""


def plan_run(cfg: SimulateConfig) -> RunPlan:
    """Load the tasks, prepare (or check, on --resume) the output folder and list the chunks left to run."""
    tasks = load_data_tasks(cfg.data)
    chunks = [tasks[i : i + cfg.chunk_size] for i in range(0, len(tasks), cfg.chunk_size)]
    fingerprint = run_fingerprint(cfg, [t.task_id for t in tasks])
    out, done = prepare_output(cfg, fingerprint)
    stray = sorted(k for k in done if k >= len(chunks))
    if stray:
        raise ValueError(f"{out}/shards holds shards {stray} beyond the {len(chunks)} chunks of this run")
    todo = [k for k in range(len(chunks)) if k not in done]
    log.info("%d tasks in %d chunks; %d done already, %d to run", len(tasks), len(chunks), len(done), len(todo))
    branch_todo: list[int] = []
    if cfg.step_branches:
        check_branch_config(out, {"branch_runs": cfg.branch_runs, "branch_temperature": cfg.branch_temperature})
        branch_todo = [k for k in sorted(done) if not branch_shard_path(out, k).exists()]
        if branch_todo:
            log.info("branching the %d chunk(s) already logged without branches", len(branch_todo))
    return RunPlan(tasks, chunks, fingerprint, out, done, todo, branch_todo)


@dataclass
class Players:
    """Who plays the conversations: the teacher, the reward and the policy's engine (with its local model, if any);
    all None when every chunk is done."""

    teacher: Teacher | None = None
    reward: Reward | None = None
    engine: Any = None
    model: Any = None
    tokenizer: Any = None


def build_players(cfg: SimulateConfig, device: torch.device, needed: bool) -> Players:
    """The teacher, reward and policy engine of ``cfg`` (models loaded once, in :class:`FrozenModels`); nothing when
    not ``needed``."""
    if not needed:
        return Players()
    models = FrozenModels(device)
    r = cfg.rollout
    teacher = build_teacher(
        cfg.teacher, setting=r.setting, policy=cfg.model, models=models, batch_size=r.batch_size, mode=r.mode
    )
    reward = build_reward(cfg.reward, policy=cfg.model, models=models, batch_size=r.batch_size, mode=r.mode)
    if cfg.policy_endpoint.base_url:  # the policy lives on a server: nothing to load here
        engine = EndpointPolicyEngine(
            endpoint_backend(cfg.policy_endpoint, "policy_endpoint"), max_new_tokens=r.max_new_tokens
        )
        return Players(teacher, reward, engine)
    model, tok = models.get(cfg.model, cfg.dtype)
    check_context_budget(model, r.n_turns, r.max_new_tokens, cfg.model)
    return Players(teacher, reward, build_engine(model, tok, r), model, tok)


@dataclass
class ChunksDone:
    """What :func:`run_chunks` added in this process."""

    conversations: int
    branches: int
    seconds: float


def run_chunks(cfg: SimulateConfig, plan: RunPlan, players: Players) -> ChunksDone:
    """Roll out every chunk left (each written as a shard, its StepDPO branches first), and branch chunks logged
    without branches."""
    runs = len(cfg.rollout.temperatures)
    delay = float(os.environ.get(SHARD_DELAY_ENV, "0") or 0)
    start = time.perf_counter()
    bar = None
    if cfg.progress:
        from tqdm.auto import tqdm

        bar = tqdm(
            total=len(plan.tasks) * runs,
            initial=sum(len(plan.chunks[k]) for k in plan.done) * runs,
            unit="conv",
            desc="simulate",
            dynamic_ncols=True,
            file=sys.stderr,
        )
    new_convs = new_branches = 0
    model, tok, out = players.model, players.tokenizer, plan.out
    # the logged runs and their StepDPO branches share every rollout option
    rollout_kw = dict(
        teacher=players.teacher, reward=players.reward, progress=False, model_name=cfg.model, engine=players.engine
    )

    def branch(k: int, parents: list[ConversationRecord]) -> int:
        spec = cfg.rollout_spec(derive_seed(cfg.rollout.seed, "branches", k))
        branches = branch_rollouts(
            model,
            tok,
            plan.chunks[k],
            parents,
            spec,
            runs=cfg.branch_runs,
            temperature=cfg.branch_temperature,
            **rollout_kw,
        )
        write_records(branch_shard_path(out, k), branches)
        return len(branches)

    try:
        for k in plan.branch_todo:
            new_branches += branch(k, load_records(shard_path(out, k))[0])
        for k in plan.todo:
            spec = cfg.rollout_spec(derive_seed(cfg.rollout.seed, "chunk", k))
            records = rollout_tasks(model, tok, plan.chunks[k], spec, **rollout_kw)
            if cfg.step_branches:  # written before the shard: a finished shard implies its branches (resume)
                new_branches += branch(k, records)
            write_records(shard_path(out, k), records)
            new_convs += len(records)
            if bar is not None:
                elapsed = max(time.perf_counter() - start, 1e-9)
                bar.update(len(records))
                bar.set_postfix(tok_s=f"{players.engine.stats.new_tokens / elapsed:.1f}", shard=k)
            if delay:
                time.sleep(delay)
    finally:
        if bar is not None:
            bar.close()
    return ChunksDone(new_convs, new_branches, time.perf_counter() - start)


def finish(
    cfg: SimulateConfig, plan: RunPlan, players: Players, done: ChunksDone, device: torch.device
) -> dict[str, Any]:
    """Merge the shards into conversations.jsonl (checked: every record valid, ids unique, the count right) and
    write summary.json; return the summary."""
    runs = len(cfg.rollout.temperatures)
    final = merge_shards(plan.out, len(plan.chunks))
    records, _ = load_records(final)  # validates every record and that ids are unique
    expected = len(plan.tasks) * runs
    if len(records) != expected:
        raise RuntimeError(
            f"{final}: {len(records)} records, expected {expected} ({len(plan.tasks)} tasks x {runs} runs)"
        )
    seconds, new_convs = done.seconds, done.conversations
    new_tokens = players.engine.stats.new_tokens if players.engine else 0
    timing = {
        "seconds": round(seconds, 3),
        "conversations": new_convs,
        "new_tokens": new_tokens,
        "conversations_per_s": round(new_convs / seconds, 4) if seconds > 0 and new_convs else None,
        "tokens_per_s": round(new_tokens / seconds, 2) if seconds > 0 and new_tokens else None,
    }
    # the process that finished the run (earlier shards of a resumed run were made under the same resolved dtype:
    # run_config.json holds it)
    extra: dict[str, Any] = {"environment": environment_stamp(device, cfg.dtype)}
    if cfg.step_branches:
        branch_records, _ = load_records(merge_branch_shards(plan.out, len(plan.chunks)))
        extra["step_branches"] = branch_summary(records, branch_records)
        timing["branch_conversations"] = done.branches
    teacher = players.teacher
    if endpoint_calls(
        teacher, players.reward, players.engine
    ):  # requests answered, attempts, retries per endpoint role
        extra["endpoint_calls"] = endpoint_calls(teacher, players.reward, players.engine)
    if teacher is not None:
        extra["teacher"] = teacher.describe()
        extra["teacher_fallbacks"] = getattr(teacher, "fallbacks", None)
        extra["teacher_empty_replies"] = getattr(teacher, "empty_replies", None)
    summary = summarize(
        records,
        timing=timing,
        cfg=cfg,
        n_tasks=len(plan.tasks),
        shards_total=len(plan.chunks),
        shards_resumed=len(plan.done),
        extra=extra,
    )
    atomic_write_text(plan.out / "summary.json", json.dumps(summary, indent=1) + "\n")
    log.info(
        "wrote %d conversations to %s (mean reward %s, %d parse failures)",
        len(records),
        final,
        summary["mean_reward"],
        summary["parse_failures"],
    )
    check_missing_rewards(records, players.reward, plan.out, cfg.max_missing_rewards)
    return summary


def interrupted_line(out: Path) -> str:
    """What Ctrl-C left in ``out`` and how to go on, in one line."""
    shards = sorted((out / "shards").glob("shard-*.jsonl")) if (out / "shards").is_dir() else []
    if (out / "run_config.json").exists():
        return (
            f"clarify simulate: interrupted (Ctrl-C); kept {len(shards)} finished shard(s) in {out / 'shards'}; "
            "finish with the same command and --resume true"
        )
    return f"clarify simulate: interrupted (Ctrl-C) before the first shard; nothing kept in {out}; run it again"


def main(argv: list[str] | None = None) -> None:
    """Entry point of ``clarify simulate``."""
    logging.basicConfig(level=logging.INFO, format="[%(name)s] %(message)s")
    cfg = parse_config(argv)
    try:
        summary = run(cfg)
    except KeyboardInterrupt:
        print(interrupted_line(Path(cfg.output)), file=sys.stderr)
        raise SystemExit(130) from None
    except MissingRewardsError as e:  # summary.json is written; the run has (almost) no reward to learn from
        print(e, file=sys.stderr)
        raise SystemExit(3) from None
    print(
        json.dumps(
            {
                k: summary[k]
                for k in (
                    "conversations",
                    "mean_reward",
                    "accuracy",
                    "parse_failures",
                    "reward_missing",
                    "reward_missing_share",
                    "teacher_leaks",
                    "echoed_instructions",
                    "timing",
                )
            },
            indent=1,
        )
    )
    print(f"records: {Path(cfg.output) / 'conversations.jsonl'}")


if __name__ == "__main__":
    main()
