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
import tempfile
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

from clarify_lit.data.records import ConversationRecord, concat_files, load_records, write_records
from clarify_lit.simulate.branches import (
    BRANCH_CONFIG,
    BRANCH_FILE,
    branch_rollouts,
    branch_shard_path,
    branch_summary,
    check_branch_config,
    merge_branch_shards,
)
from clarify_lit.simulate.engine import GenerationEngine, derive_seed
from clarify_lit.simulate.parsing import is_hedge, uses_thinking_tags
from clarify_lit.simulate.rewards import Reward, make_reward
from clarify_lit.simulate.rollout import DEFAULT_TEMPERATURES, check_discount, rollout_tasks
from clarify_lit.simulate.teachers import (
    ChatBackend,
    EndpointChatBackend,
    HFChatBackend,
    Teacher,
    make_teacher,
)

log = logging.getLogger("clarify.simulate")

SHARD_DELAY_ENV = "CLARIFY_SIMULATE_SHARD_DELAY"  # test hook: seconds to sleep after each shard (kill window)


@dataclass
class DataOptions:
    """Which questions (passed to ``clarify_lit.data.tasks.load_tasks``)."""

    dataset: str = "openbookqa"
    """openbookqa, arc_easy, arc_challenge, sciq, mmlu, hub or local."""
    part: Literal["train", "test", "all"] = "train"
    """Our deterministic train/test division (400/100 by default)."""
    split: str | None = None
    """Source split (hub datasets; built-ins ship one)."""
    seed: int = 0
    """Seed of the train/test division."""
    n_train: int = 400
    n_test: int = 100
    path: str | None = None
    """File (local), hub id (hub) or an override folder (built-ins)."""
    name: str | None = None
    """Hub config name."""
    columns: dict[str, Any] | None = None
    """Column mapping for hub/local sources (ColumnMap fields)."""
    label: str | None = None
    on_bad_row: Literal["raise", "skip"] | None = None
    limit: int | None = None
    """Use only the first N tasks of the part (small runs)."""


@dataclass
class EndpointOptions:
    """An OpenAI-compatible chat-completions endpoint."""

    base_url: str | None = None
    """e.g. http://127.0.0.1:8000/v1"""
    model: str | None = None
    """Model name sent to the endpoint."""
    api_key_env: str | None = None
    """Name of the environment variable holding the API key (none: no auth header)."""
    timeout: float = 60.0
    max_retries: int = 3
    backoff: float = 1.0
    concurrency: int = 4


@dataclass
class TeacherOptions:
    """Who answers the student's clarifying questions (the reasoning setting is always scripted)."""

    kind: Literal["scripted", "retrieval", "llm"] | None = None
    """None: scripted (reasoning) / retrieval (clarifying)."""
    backend: Literal["hf", "endpoint"] = "hf"
    """For kind=llm: a local HF model or an endpoint."""
    model: str | None = None
    """HF backend: model name/path (None: the policy's model)."""
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    endpoint: EndpointOptions = field(default_factory=EndpointOptions)
    temperature: float = 0.0
    max_new_tokens: int = 96
    show_gold: bool = True
    """LLM teacher is told the answer (and told never to reveal it)."""
    show_knowledge: bool = True
    top_k: int = 2
    """Retrieval: sentences per reply."""
    hide_gold_text: bool = True
    """Retrieval: drop sentences quoting the gold option's text."""


@dataclass
class RewardOptions:
    """How a whole conversation is scored (reward >= 0)."""

    kind: Literal["correct", "gold_prob", "llm_judge", "weighted"] = "correct"
    judge_model: str | None = None
    """gold_prob / llm_judge with backend=hf: judge model (None: the policy's base model)."""
    judge_dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    backend: Literal["hf", "endpoint"] = "hf"
    """llm_judge: local HF model or endpoint."""
    endpoint: EndpointOptions = field(default_factory=EndpointOptions)
    weights: dict[str, float] | None = None
    """weighted: e.g. {correct: 0.5, gold_prob: 0.5}."""
    max_attempts: int = 3
    """llm_judge: tries before a reward is recorded as missing."""


@dataclass
class SimulateConfig:
    """Simulate conversations of a policy with a teacher and score them (see docs/simulate.md)."""

    model: str = "embedded:smollm2-135m-instruct"
    """Policy (= logging policy): hub id, local folder, embedded:smollm2-135m-instruct, tiny-random, or an exported
    LoRA adapter folder (runs/<run>/export: applied to its base and merged; teacher/judge default to that base)."""
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    device: str = "auto"
    """auto (cuda if available), cpu, cuda, cuda:1 …"""
    data: DataOptions = field(default_factory=DataOptions)
    setting: Literal["reasoning", "clarifying"] = "reasoning"
    mode: Literal["thinking", "standard"] = "thinking"
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
    output: str = "runs/simulate"
    """Output folder."""
    resume: bool = False
    """Skip chunks whose shard exists (the run config must match)."""
    overwrite: bool = False
    """Delete an existing output folder's shards first."""
    progress: bool = True


# fields that may differ between an interrupted run and its resumption
_RUNTIME_FIELDS = ("output", "resume", "overwrite", "progress", "device")


def dataclass_parser(config_class: type, prog: str, description: str, env_prefix: str, config_help: str):
    """A jsonargparse parser for a command configured by one dataclass (``--config`` YAML + one option per field)."""
    from jsonargparse import ActionConfigFile, ArgumentParser

    parser = ArgumentParser(prog=prog, description=description, env_prefix=env_prefix, default_env=False)
    parser.add_argument("--config", action=ActionConfigFile, help=config_help)
    parser.add_class_arguments(config_class, None, as_group=False)
    return parser


def parse_dataclass(parser, config_class: type, argv: list[str] | None):
    """Parse ``argv`` with a :func:`dataclass_parser` parser and build the dataclass from it."""
    init = parser.instantiate(parser.parse_args(argv))
    return config_class(**{k: v for k, v in vars(init).items() if k in config_class.__dataclass_fields__})


def build_parser():
    return dataclass_parser(SimulateConfig, "clarify simulate", __doc__.split("\n\n")[0], "CLARIFY_SIMULATE",
                            "YAML config (e.g. configs/simulate/*.yaml)")


def parse_config(argv: list[str] | None = None) -> SimulateConfig:
    return parse_dataclass(build_parser(), SimulateConfig, argv)


# ---------------------------------------------------------------------------------------------------------------
# building the pieces

def _device(name: str) -> str:
    import torch

    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return name


class _Models:
    """Loads each (name, dtype) once, so policy, teacher and judge share one copy when they are the same model."""

    def __init__(self, device: str):
        self.device = device
        self.cache: dict[tuple[str, str], tuple[Any, Any]] = {}

    def get(self, name: str, dtype: str):
        from clarify_lit.models import load_causal_lm, load_tokenizer

        key = (name, dtype)
        if key not in self.cache:
            log.info("loading %s (%s) on %s", name, dtype, self.device)
            if is_adapter_folder(name):  # an exported policy (clarify fit's export/): its base + the LoRA, merged
                from clarify_lit.evaluate.command import load_export

                model, tok, _ = load_export(name, dtype, merge_lora=True)
                model = model.to(self.device).eval()
                model.requires_grad_(False)
                self.cache[key] = (model, tok)
                return self.cache[key]
            model = load_causal_lm(name, dtype=dtype).to(self.device)
            model.eval()
            model.requires_grad_(False)  # frozen: logging policy, teacher and judge are never trained here
            self.cache[key] = (model, load_tokenizer(name))
        return self.cache[key]


def is_adapter_folder(name: str) -> bool:
    """Whether ``name`` is a PEFT adapter folder (``adapter_config.json``), e.g. ``<run>/export`` of ``clarify fit``."""
    return bool(name) and (Path(name) / "adapter_config.json").is_file()


def policy_base(name: str) -> str:
    """The base model of a policy: an adapter folder's ``base_model_name_or_path``, else ``name`` itself.

    The LLM teacher and the judges default to it, so a trained policy (``--model runs/swift/export``) meets the same
    teacher and judge as the base model did and is never its own judge. A full-weights export does not name its
    base: set ``--teacher.model``/``--reward.judge_model`` explicitly there.
    """
    if is_adapter_folder(name):
        base = json.loads((Path(name) / "adapter_config.json").read_text(encoding="utf-8")).get(
            "base_model_name_or_path")
        if base:
            return str(base)
    return name


def _endpoint(opts: EndpointOptions, what: str) -> EndpointChatBackend:
    if not opts.base_url or not opts.model:
        raise ValueError(f"{what} with backend=endpoint needs endpoint.base_url and endpoint.model")
    return EndpointChatBackend(opts.base_url, opts.model, api_key_env=opts.api_key_env, timeout=opts.timeout,
                               max_retries=opts.max_retries, backoff=opts.backoff, concurrency=opts.concurrency)


def build_teacher(cfg: SimulateConfig, models: _Models) -> Teacher | None:
    t = cfg.teacher
    kind = t.kind or ("scripted" if cfg.setting == "reasoning" else "retrieval")
    if kind == "scripted":
        return make_teacher("scripted")
    if kind == "retrieval":
        return make_teacher("retrieval", top_k=t.top_k, hide_gold_text=t.hide_gold_text)
    backend: ChatBackend
    if t.backend == "endpoint":
        backend = _endpoint(t.endpoint, "teacher")
    else:
        name = t.model or policy_base(cfg.model)
        model, tok = models.get(name, t.dtype)
        backend = HFChatBackend(model, tok, batch_size=cfg.batch_size, name=f"hf:{name}")
    return make_teacher("llm", backend=backend, temperature=t.temperature, max_new_tokens=t.max_new_tokens,
                        show_gold=t.show_gold, show_knowledge=t.show_knowledge)


def build_reward(cfg: SimulateConfig, models: _Models) -> Reward:
    r = cfg.reward
    kinds = set(r.weights or {}) if r.kind == "weighted" else {r.kind}
    judge_model = judge_tok = judge_backend = None
    judge_name = r.judge_model or policy_base(cfg.model)
    if "gold_prob" in kinds:
        judge_model, judge_tok = models.get(judge_name, r.judge_dtype)
    if "llm_judge" in kinds:
        if r.backend == "endpoint":
            judge_backend = _endpoint(r.endpoint, "reward llm_judge")
        else:
            m, tok = models.get(judge_name, r.judge_dtype)
            judge_backend = HFChatBackend(m, tok, batch_size=cfg.batch_size, name=f"hf:{judge_name}")
    return make_reward(r.kind, judge_model=judge_model, judge_tokenizer=judge_tok, judge_backend=judge_backend,
                       weights=r.weights, batch_size=cfg.batch_size, max_attempts=r.max_attempts)


def load_config_tasks(cfg: SimulateConfig):
    from clarify_lit.data.tasks import load_tasks  # lazy: dataset loaders pull in `datasets`

    d = cfg.data
    tasks = load_tasks(d.dataset, d.split, seed=d.seed, n_train=d.n_train, n_test=d.n_test, part=d.part,
                       path=d.path, name=d.name, columns=d.columns, label=d.label, on_bad_row=d.on_bad_row)
    if d.limit is not None:
        if d.limit < 1:
            raise ValueError(f"data.limit must be >= 1, got {d.limit}")
        tasks = tasks[: d.limit]
    if not tasks:
        raise ValueError(f"dataset {d.dataset!r} part {d.part!r} gave no tasks")
    return tasks


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
    for k in ("step_branches", "branch_runs", "branch_temperature"):
        conf.pop(k)  # branches never change the logged records; their options are checked by check_branch_config
    return {"config": conf, "task_ids": task_ids}


def _atomic_write_text(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name + ".", suffix=".tmp")
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def prepare_output(cfg: SimulateConfig, fingerprint: dict[str, Any]) -> tuple[Path, set[int]]:
    """Create/check the output folder; return it and the chunk indices already done (on --resume)."""
    out = Path(cfg.output)
    shards = out / "shards"
    cfg_file = out / "run_config.json"
    existing = sorted(shards.glob("shard-*.jsonl")) if shards.exists() else []
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
        if old != json.loads(json.dumps(fingerprint)):
            diff = _diff_keys(old.get("config", {}), fingerprint["config"])
            if old.get("task_ids") != fingerprint["task_ids"]:
                diff.append("task_ids")
            raise ValueError(f"--resume: {out} was produced by a different configuration (differs in: "
                             f"{', '.join(diff) or 'unknown'}); use the same config or another --output")
    elif cfg.resume and existing:
        raise ValueError(f"--resume: {out} has shards but no run_config.json; cannot check they match")
    shards.mkdir(parents=True, exist_ok=True)
    for tmp in shards.glob("*.tmp"):  # a shard half-written when the run was killed (never renamed into place)
        tmp.unlink()
    _atomic_write_text(cfg_file, json.dumps(fingerprint, indent=1, sort_keys=True) + "\n")
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


def summarize(records: list[ConversationRecord], *, timing: dict[str, float], cfg: SimulateConfig,
              n_tasks: int, shards_total: int, shards_resumed: int, extra: dict[str, Any]) -> dict[str, Any]:
    rewards = [r.reward for r in records if not r.meta.get("reward_missing")]
    comps: dict[str, list[float]] = {}
    for r in records:
        for k, v in (r.reward_components or {}).items():
            if v is not None:
                comps.setdefault(k, []).append(float(v))
    per_task: dict[str, set[float]] = {}
    for r in records:
        per_task.setdefault(r.task_id, set()).add(r.reward)
    return {
        "tasks": n_tasks,
        "conversations": len(records),
        "runs_per_task": len(cfg.temperatures),
        "datasets": dict(Counter(r.dataset for r in records)),
        "mean_reward": statistics.fmean(rewards) if rewards else None,
        "std_reward": statistics.pstdev(rewards) if len(rewards) > 1 else None,
        "reward_missing": sum(bool(r.meta.get("reward_missing")) for r in records),
        "components_mean": {k: statistics.fmean(v) for k, v in sorted(comps.items())},
        "parse_failures": sum(r.prediction is None for r in records),
        "hedged": sum(is_hedge(r.messages[-1]["content"]) for r in records),
        "accuracy": statistics.fmean(float(r.prediction == r.gold) for r in records) if records else None,
        "thinking_rate": statistics.fmean(float(uses_thinking_tags(r.messages[-1]["content"])) for r in records)
        if records else None,
        "tasks_with_reward_variance": sum(len(v) > 1 for v in per_task.values()),
        "empty_turns": sum(int(r.meta.get("empty_turns", 0)) for r in records),
        "truncated_turns": sum(r.truncated_turns()[0] for r in records),
        "truncated_rate": (sum(r.truncated_turns()[0] for r in records)
                           / max(1, sum(m["role"] == "assistant" for r in records for m in r.messages))),
        **({"mean_turns_used": statistics.fmean(sum(m["role"] == "assistant" for m in r.messages) for r in records),
            "ended_early": sum(bool(r.meta.get("ended_early")) for r in records)}
           if cfg.adaptive and records else {}),
        "shards": shards_total,
        "shards_resumed": shards_resumed,
        "timing": timing,
        **extra,
        "config": asdict(cfg),
    }


# ---------------------------------------------------------------------------------------------------------------
# main

def run(cfg: SimulateConfig) -> dict[str, Any]:
    """Run a simulation described by ``cfg``; return the summary (also written to ``summary.json``)."""
    if cfg.chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {cfg.chunk_size}")
    if not cfg.temperatures or any(t < 0 or not math.isfinite(t) for t in cfg.temperatures):
        raise ValueError(f"temperatures must be a non-empty list of finite numbers >= 0, got {cfg.temperatures}")
    check_discount(cfg.discount)
    if cfg.discount != 1.0 and not cfg.adaptive:
        log.warning("discount=%g without adaptive: every conversation has n_turns turns, so the discount only "
                    "rescales all rewards by the same factor", cfg.discount)
    run_ids = set(range(len(cfg.temperatures)))
    if cfg.branch_runs is not None and not set(cfg.branch_runs) <= run_ids:
        raise ValueError(f"branch_runs must index temperatures (0..{len(run_ids) - 1}), got {cfg.branch_runs}")
    bt = cfg.branch_temperature
    if bt is not None and not (bt >= 0 and math.isfinite(bt)):
        raise ValueError(f"branch_temperature must be a finite number >= 0, got {bt}")
    tasks = load_config_tasks(cfg)
    chunks = [tasks[i:i + cfg.chunk_size] for i in range(0, len(tasks), cfg.chunk_size)]
    out, done = prepare_output(cfg, run_fingerprint(cfg, [t.task_id for t in tasks]))
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

    models = _Models(_device(cfg.device))
    teacher = reward = engine = None
    model = tok = None
    if todo or branch_todo:
        teacher = build_teacher(cfg, models)
        reward = build_reward(cfg, models)
        if cfg.policy_endpoint.base_url:  # the policy lives on a server: nothing to load here
            from clarify_lit.simulate.endpoint_policy import EndpointPolicyEngine

            engine = EndpointPolicyEngine(_endpoint(cfg.policy_endpoint, "policy_endpoint"),
                                          max_new_tokens=cfg.max_new_tokens)
        else:
            model, tok = models.get(cfg.model, cfg.dtype)
            engine = GenerationEngine(model, tok, batch_size=cfg.batch_size, max_new_tokens=cfg.max_new_tokens,
                                      sort_by_length=cfg.sort_by_length, top_p=cfg.top_p,
                                      mix_temperatures=cfg.mix_temperatures, reuse_kv_cache=cfg.reuse_kv_cache)
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
    rollout_kw = dict(setting=cfg.setting, mode=cfg.mode, n_turns=cfg.n_turns, teacher=teacher,
                      reward=reward, max_new_tokens=cfg.max_new_tokens, batch_size=cfg.batch_size,
                      progress=False, model_name=cfg.model, engine=engine, adaptive=cfg.adaptive,
                      discount=cfg.discount)

    def branch(k: int, parents: list[ConversationRecord]) -> int:
        branches = branch_rollouts(model, tok, chunks[k], parents, seed=derive_seed(cfg.seed, "branches", k),
                                   runs=cfg.branch_runs, temperature=cfg.branch_temperature, **rollout_kw)
        write_records(branch_shard_path(out, k), branches)
        return len(branches)

    try:
        for k in branch_todo:
            new_branches += branch(k, load_records(shard_path(out, k))[0])
        for k in todo:
            records = rollout_tasks(model, tok, chunks[k], temperatures=cfg.temperatures,
                                    seed=derive_seed(cfg.seed, "chunk", k), **rollout_kw)
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
    extra: dict[str, Any] = {}
    if cfg.step_branches:
        branch_records, _ = load_records(merge_branch_shards(out, len(chunks)))
        extra["step_branches"] = branch_summary(records, branch_records)
        timing["branch_conversations"] = new_branches
    if teacher is not None:
        extra["teacher"] = teacher.describe()
        extra["teacher_fallbacks"] = getattr(teacher, "fallbacks", None)
        extra["teacher_empty_replies"] = getattr(teacher, "empty_replies", None)
    summary = summarize(records, timing=timing, cfg=cfg, n_tasks=len(tasks), shards_total=len(chunks),
                        shards_resumed=len(done), extra=extra)
    _atomic_write_text(out / "summary.json", json.dumps(summary, indent=1) + "\n")
    log.info("wrote %d conversations to %s (mean reward %s, %d parse failures)", len(records), final,
             summary["mean_reward"], summary["parse_failures"])
    return summary


def main(argv: list[str] | None = None) -> None:
    """Entry point of ``clarify simulate``."""
    logging.basicConfig(level=logging.INFO, format="[%(name)s] %(message)s")
    cfg = parse_config(argv)
    summary = run(cfg)
    print(json.dumps({k: summary[k] for k in ("conversations", "mean_reward", "accuracy", "parse_failures",
                                              "reward_missing", "timing")}, indent=1))
    print(f"records: {Path(cfg.output) / 'conversations.jsonl'}")


if __name__ == "__main__":
    main()
