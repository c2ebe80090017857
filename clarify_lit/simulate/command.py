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
    clarify simulate --config ... --adaptive true --discount 0.9   # the agent may answer early; reward × γ^turns
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
from pathlib import Path
from typing import Any

import torch

from clarify_lit.arguments import dataclass_parser, parse_dataclass
from clarify_lit.data.records import (
    ConversationRecord,
    concat_files,
    load_records,
    mean_components,
    questions_with_reward_variance,
    write_records,
)
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
from clarify_lit.simulate.engine import Attention, GenerationEngine, derive_seed
from clarify_lit.simulate.leaks import count_flags
from clarify_lit.simulate.missing_rewards import (
    DEFAULT_MAX_MISSING_SHARE,
    MissingRewardsError,
    check_max_share,
    check_missing_rewards,
    missing_share,
)
from clarify_lit.simulate.options import (
    DataOptions,
    EndpointOptions,
    RewardOptions,
    TeacherOptions,
    build_reward,
    build_teacher,
    endpoint_backend,
    load_data_tasks,
    teacher_kind,
)
from clarify_lit.simulate.parsing import uses_thinking_tags
from clarify_lit.simulate.prompts import Mode, Setting, check_setting
from clarify_lit.simulate.rewards import final_answer_of
from clarify_lit.simulate.rollout import (
    DEFAULT_TEMPERATURES,
    RolloutSpec,
    check_context_budget,
    check_discount,
    check_explore,
    rollout_tasks,
)

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
    setting: Setting = "reasoning"
    mode: Mode = "thinking"
    n_turns: int = 3
    adaptive: bool = False
    """Adaptive length: the agent may give its final answer before turn n_turns, which ends the conversation."""
    discount: float = 1.0
    """γ in (0, 1]: every reward is multiplied by γ^n, n = assistant turns used (1 = off; meant for adaptive)."""
    temperatures: list[float] = field(default_factory=lambda: list(DEFAULT_TEMPERATURES))
    """One run per temperature per question (0 = greedy)."""
    teacher: TeacherOptions = field(default_factory=TeacherOptions)
    reward: RewardOptions = field(default_factory=RewardOptions)
    max_new_tokens: int = 64
    """Per assistant turn."""
    batch_size: int = 8
    sort_by_length: bool = True
    mix_temperatures: bool = True
    """Let runs of different temperatures share a generate batch (per-row temperature; greedy rows stay exact).
    False: one temperature per batch, the behaviour of simulations made before this option existed."""
    policy_endpoint: EndpointOptions = field(default_factory=EndpointOptions)
    """Generate the policy's turns through an OpenAI-compatible endpoint serving ``model`` (e.g. ``vllm serve``) instead
    of locally: set base_url and model (simulate/endpoint_policy.py). Unset: the local batched engine."""
    reuse_kv_cache: bool = True
    """Carry each batch's KV cache from one turn to the next (only the teacher's message is encoded anew); false =
    re-encode whole conversations every turn, the behaviour of simulations made before this option existed."""
    share_prefix: bool = False
    """Prefill each fresh batch's common prompt prefix (the system prompt) once and share its keys/values across the
    rows: less prefill, but greedy text may differ in bfloat16 (docs/simulate.md, Throughput)."""
    attention: Attention = "model"
    """Attention kernel while generating: model (as loaded: SDPA), sdpa, eager, or gqa (SDPA for prompts, two
    matmuls over the key/value heads for each decode step). eager and gqa decode faster on CPU at long contexts, but
    greedy text may differ from SDPA's where two tokens nearly tie (docs/simulate.md, Throughput)."""
    top_p: float = 1.0
    seed: int = 0
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
        return RolloutSpec(setting=self.setting, mode=self.mode, n_turns=self.n_turns,
                           temperatures=list(self.temperatures), max_new_tokens=self.max_new_tokens,
                           batch_size=self.batch_size, seed=seed, adaptive=self.adaptive, discount=self.discount,
                           reuse_kv_cache=self.reuse_kv_cache, share_prefix=self.share_prefix,
                           attention=self.attention, explore_runs=list(self.explore_runs or []),
                           explore_prefixes={int(k): v for k, v in (self.explore_prefixes or {}).items()})


# fields that may differ between an interrupted run and its resumption
_RUNTIME_FIELDS = ("output", "resume", "overwrite", "progress", "device", "max_missing_rewards")


def build_parser():
    return dataclass_parser(SimulateConfig, "clarify simulate", __doc__.split("\n\n")[0], "CLARIFY_SIMULATE",
                            "YAML config (e.g. configs/simulate/*.yaml)")


def parse_config(argv: list[str] | None = None) -> SimulateConfig:
    return parse_dataclass(build_parser(), SimulateConfig, argv)


# ---------------------------------------------------------------------------------------------------------------
# shards, resume, merge

def shard_path(out: Path, k: int) -> Path:
    return out / "shards" / f"shard-{k:05d}.jsonl"


def run_fingerprint(cfg: SimulateConfig, task_ids: list[str]) -> dict[str, Any]:
    """Everything that determines the records: the config without runtime fields, plus the task ids."""
    conf = {k: v for k, v in asdict(cfg).items() if k not in _RUNTIME_FIELDS}
    if not cfg.adaptive and cfg.discount == 1.0:  # off: fingerprints match those written before adaptive length
        conf.pop("adaptive")
        conf.pop("discount")
    if not cfg.policy_endpoint.base_url:  # local policy: fingerprints match those written before the option
        conf.pop("policy_endpoint")
    for k in ("mix_temperatures", "reuse_kv_cache"):
        if not conf[k]:  # off = the behaviour before the option: fingerprints match those written before it
            conf.pop(k)
    if not conf["share_prefix"]:  # off = the behaviour before the option
        conf.pop("share_prefix")
    if conf["attention"] == "model":  # the kernel the model was loaded with: as before the option existed
        conf.pop("attention")
    # options that cannot change these records stay out, so runs made before the options existed still resume:
    # the gold-text hiding of the retrieval teacher, and the rubric's settings under any other reward
    if teacher_kind(cfg.teacher, cfg.setting, cfg.mode) != "retrieval" or not cfg.teacher.hide_gold_text:
        conf["teacher"].pop("hide_mode")
    if cfg.reward.kind != "rubric":
        for k in ("rubric_weights", "rubric_accuracy", "word_limit", "min_words"):
            conf["reward"].pop(k)
    if not cfg.explore_runs and not cfg.explore_prefixes:  # off: as before the option
        conf.pop("explore_runs")
        conf.pop("explore_prefixes")
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
        for p in (shards, out / "conversations.jsonl", out / BRANCH_FILE, out / BRANCH_CONFIG, out / "summary.json",
                  cfg_file):
            if p.is_dir():
                shutil.rmtree(p)
            elif p.exists():
                p.unlink()
        existing = []
    if (existing or cfg_file.exists()) and not cfg.resume:
        raise FileExistsError(f"{out} already holds a simulation ({len(existing)} shards); pass --resume true to "
                              "finish it or --overwrite true to start again")
    if cfg.resume and cfg_file.exists():
        old = json.loads(cfg_file.read_text(encoding="utf-8"))
        new = json.loads(json.dumps(fingerprint))  # as written: JSON keys are strings
        if old != new:
            diff = _diff_keys(old.get("config", {}), new["config"])
            if old.get("task_ids") != fingerprint["task_ids"]:
                diff.append("task_ids")
            raise ValueError(f"--resume: {out} was produced by a different configuration (differs in: "
                             f"{', '.join(diff) or 'unknown'}); use the same config or another --output")
    elif cfg.resume and existing:
        raise ValueError(f"--resume: {out} has shards but no run_config.json; cannot check they match")
    shards.mkdir(parents=True, exist_ok=True)
    for tmp in shards.glob("*.tmp"):  # a shard half-written when the run was killed (never renamed into place)
        tmp.unlink()
    # run_config.json is written by run() once the models and endpoints are built: a command that fails its checks
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
    return final_answer_of(record.messages[-1]["content"], record.meta["choices"] if open_answers else None,
                           open_answers=open_answers).hedged


def summarize(records: list[ConversationRecord], *, timing: dict[str, float], cfg: SimulateConfig,
              n_tasks: int, shards_total: int, shards_resumed: int, extra: dict[str, Any]) -> dict[str, Any]:
    rewards = [r.reward for r in records if not r.meta.get("reward_missing")]
    cut_turns = sum(r.truncated_turns()[0] for r in records)
    return {
        "tasks": n_tasks,
        "conversations": len(records),
        "runs_per_task": len(cfg.temperatures),
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
        if records else None,
        "tasks_with_reward_variance": questions_with_reward_variance(records),
        "empty_turns": sum(int(r.meta.get("empty_turns", 0)) for r in records),
        **({"explore_seeded": sum("explore_prefixes" in r.meta for r in records)} if cfg.explore_runs else {}),
        "truncated_turns": cut_turns,
        "truncated_rate": cut_turns / max(1, sum(m["role"] == "assistant" for r in records for m in r.messages)),
        **({"mean_turns_used": statistics.fmean(sum(m["role"] == "assistant" for m in r.messages) for r in records),
            "ended_early": sum(bool(r.meta.get("ended_early")) for r in records)}
           if cfg.adaptive and records else {}),
        "shards": shards_total,
        "shards_resumed": shards_resumed,
        "timing": timing,
        **extra,
        "config": asdict(cfg),
    }


def resolve_dtypes(cfg: SimulateConfig, device: torch.device | str) -> SimulateConfig:
    """``cfg`` with every ``auto`` dtype (policy, teacher, judge) resolved for ``device``
    (:func:`~clarify_lit.models.resolve_dtype`): the fingerprint and the summary record what actually ran."""
    return replace(cfg, dtype=resolve_dtype(cfg.dtype, device),
                   teacher=replace(cfg.teacher, dtype=resolve_dtype(cfg.teacher.dtype, device)),
                   reward=replace(cfg.reward, judge_dtype=resolve_dtype(cfg.reward.judge_dtype, device)))


# ---------------------------------------------------------------------------------------------------------------
# main

def run(cfg: SimulateConfig) -> dict[str, Any]:
    """Run a simulation described by ``cfg``; return the summary (also written to ``summary.json``).

    The output folder is locked for the whole run (:func:`~clarify_lit.io.output_lock`): a second simulation into
    the same folder is refused instead of mixing its shards with this one's."""
    with output_lock(Path(cfg.output), "clarify simulate"):
        return _run(cfg)


def _run(cfg: SimulateConfig) -> dict[str, Any]:
    if cfg.chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {cfg.chunk_size}")
    if not cfg.temperatures or any(t < 0 or not math.isfinite(t) for t in cfg.temperatures):
        raise ValueError(f"temperatures must be a non-empty list of finite numbers >= 0, got {cfg.temperatures}")
    check_discount(cfg.discount)
    check_max_share(cfg.max_missing_rewards)
    check_setting(cfg.setting, cfg.mode, cfg.n_turns)  # before loading any model or writing anything
    check_explore(cfg.rollout_spec(cfg.seed))
    if cfg.explore_runs and cfg.policy_endpoint.base_url:
        raise ValueError("explore_runs with policy_endpoint: a chat-completions endpoint cannot be made to continue "
                         "a forced start of the assistant's reply; seed a local policy")
    if cfg.discount != 1.0 and not cfg.adaptive:
        log.warning("discount=%g without adaptive: every conversation has n_turns turns, so the discount only "
                    "rescales all rewards by the same factor", cfg.discount)
    run_ids = set(range(len(cfg.temperatures)))
    if cfg.branch_runs is not None and not set(cfg.branch_runs) <= run_ids:
        raise ValueError(f"branch_runs must index temperatures (0..{len(run_ids) - 1}), got {cfg.branch_runs}")
    bt = cfg.branch_temperature
    if bt is not None and not (bt >= 0 and math.isfinite(bt)):
        raise ValueError(f"branch_temperature must be a finite number >= 0, got {bt}")
    device = resolve_device(cfg.device)
    cfg = resolve_dtypes(cfg, device)
    tasks = load_data_tasks(cfg.data)
    chunks = [tasks[i:i + cfg.chunk_size] for i in range(0, len(tasks), cfg.chunk_size)]
    fingerprint = run_fingerprint(cfg, [t.task_id for t in tasks])
    out, done = prepare_output(cfg, fingerprint)
    stray = sorted(k for k in done if k >= len(chunks))
    if stray:
        raise ValueError(f"{out}/shards holds shards {stray} beyond the {len(chunks)} chunks of this run")
    todo = [k for k in range(len(chunks)) if k not in done]
    log.info("%d tasks in %d chunks; %d done already, %d to run", len(tasks), len(chunks), len(done), len(todo))
    branch_todo: list[int] = []  # chunks logged without branches (e.g. branching added on --resume)
    if cfg.step_branches:
        check_branch_config(out, {"branch_runs": cfg.branch_runs, "branch_temperature": cfg.branch_temperature})
        branch_todo = [k for k in sorted(done) if not branch_shard_path(out, k).exists()]
        if branch_todo:
            log.info("branching the %d chunk(s) already logged without branches", len(branch_todo))

    models = FrozenModels(device)
    teacher = reward = engine = None
    model = tok = None
    if todo or branch_todo:
        teacher = build_teacher(cfg.teacher, setting=cfg.setting, policy=cfg.model, models=models,
                                batch_size=cfg.batch_size, mode=cfg.mode)
        reward = build_reward(cfg.reward, policy=cfg.model, models=models, batch_size=cfg.batch_size, mode=cfg.mode)
        if cfg.policy_endpoint.base_url:  # the policy lives on a server: nothing to load here
            engine = EndpointPolicyEngine(endpoint_backend(cfg.policy_endpoint, "policy_endpoint"),
                                          max_new_tokens=cfg.max_new_tokens)
        else:
            model, tok = models.get(cfg.model, cfg.dtype)
            check_context_budget(model, cfg.n_turns, cfg.max_new_tokens, cfg.model)
            engine = GenerationEngine(model, tok, batch_size=cfg.batch_size, max_new_tokens=cfg.max_new_tokens,
                                      sort_by_length=cfg.sort_by_length, top_p=cfg.top_p,
                                      mix_temperatures=cfg.mix_temperatures, reuse_kv_cache=cfg.reuse_kv_cache,
                                      share_prefix=cfg.share_prefix, attention=cfg.attention)
    atomic_write_text(out / "run_config.json", json.dumps(fingerprint, indent=1, sort_keys=True) + "\n")
    runs = len(cfg.temperatures)
    delay = float(os.environ.get(SHARD_DELAY_ENV, "0") or 0)
    start = time.perf_counter()
    bar = None
    if cfg.progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(tasks) * runs, initial=sum(len(chunks[k]) for k in done) * runs, unit="conv",
                   desc="simulate", dynamic_ncols=True, file=sys.stderr)
    new_convs = new_branches = 0
    # the logged runs and their StepDPO branches share every rollout option
    rollout_kw = dict(teacher=teacher, reward=reward, progress=False, model_name=cfg.model, engine=engine)

    def branch(k: int, parents: list[ConversationRecord]) -> int:
        spec = cfg.rollout_spec(derive_seed(cfg.seed, "branches", k))
        branches = branch_rollouts(model, tok, chunks[k], parents, spec, runs=cfg.branch_runs,
                                   temperature=cfg.branch_temperature, **rollout_kw)
        write_records(branch_shard_path(out, k), branches)
        return len(branches)

    try:
        for k in branch_todo:
            new_branches += branch(k, load_records(shard_path(out, k))[0])
        for k in todo:
            records = rollout_tasks(model, tok, chunks[k], cfg.rollout_spec(derive_seed(cfg.seed, "chunk", k)),
                                    **rollout_kw)
            if cfg.step_branches:  # written before the shard: a finished shard implies its branches (resume)
                new_branches += branch(k, records)
            write_records(shard_path(out, k), records)
            new_convs += len(records)
            if bar is not None:
                elapsed = max(time.perf_counter() - start, 1e-9)
                bar.update(len(records))
                bar.set_postfix(tok_s=f"{engine.stats.new_tokens / elapsed:.1f}", shard=k)
            if delay:
                time.sleep(delay)
    finally:
        if bar is not None:
            bar.close()
    seconds = time.perf_counter() - start

    final = merge_shards(out, len(chunks))
    records, _ = load_records(final)  # validates every record and that ids are unique
    expected = len(tasks) * runs
    if len(records) != expected:
        raise RuntimeError(f"{final}: {len(records)} records, expected {expected} ({len(tasks)} tasks x {runs} runs)")
    new_tokens = engine.stats.new_tokens if engine else 0
    timing = {"seconds": round(seconds, 3), "conversations": new_convs, "new_tokens": new_tokens,
              "conversations_per_s": round(new_convs / seconds, 4) if seconds > 0 and new_convs else None,
              "tokens_per_s": round(new_tokens / seconds, 2) if seconds > 0 and new_tokens else None}
    # the process that finished the run (earlier shards of a resumed run were made under the same resolved dtype:
    # run_config.json holds it)
    extra: dict[str, Any] = {"environment": environment_stamp(device, cfg.dtype)}
    if cfg.step_branches:
        branch_records, _ = load_records(merge_branch_shards(out, len(chunks)))
        extra["step_branches"] = branch_summary(records, branch_records)
        timing["branch_conversations"] = new_branches
    if endpoint_calls(teacher, reward, engine):  # requests answered, attempts, retries per endpoint role
        extra["endpoint_calls"] = endpoint_calls(teacher, reward, engine)
    if teacher is not None:
        extra["teacher"] = teacher.describe()
        extra["teacher_fallbacks"] = getattr(teacher, "fallbacks", None)
        extra["teacher_empty_replies"] = getattr(teacher, "empty_replies", None)
    summary = summarize(records, timing=timing, cfg=cfg, n_tasks=len(tasks), shards_total=len(chunks),
                        shards_resumed=len(done), extra=extra)
    atomic_write_text(out / "summary.json", json.dumps(summary, indent=1) + "\n")
    log.info("wrote %d conversations to %s (mean reward %s, %d parse failures)", len(records), final,
             summary["mean_reward"], summary["parse_failures"])
    check_missing_rewards(records, reward, out, cfg.max_missing_rewards)
    return summary


def interrupted_line(out: Path) -> str:
    """What Ctrl-C left in ``out`` and how to go on, in one line."""
    shards = sorted((out / "shards").glob("shard-*.jsonl")) if (out / "shards").is_dir() else []
    if (out / "run_config.json").exists():
        return (f"clarify simulate: interrupted (Ctrl-C); kept {len(shards)} finished shard(s) in {out / 'shards'}; "
                "finish with the same command and --resume true")
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
    print(json.dumps({k: summary[k] for k in ("conversations", "mean_reward", "accuracy", "parse_failures",
                                              "reward_missing", "reward_missing_share", "teacher_leaks",
                                              "echoed_instructions", "timing")}, indent=1))
    print(f"records: {Path(cfg.output) / 'conversations.jsonl'}")


if __name__ == "__main__":
    main()
