"""``clarify evaluate``: roll a policy out on held-out questions and write ``metrics.json`` + ``rollouts.jsonl``.

The policy is exactly one of

* ``--model NAME`` — a base model: hub id, local folder, ``embedded:smollm2-135m-instruct`` or ``tiny-random``
  (the paper's "Base" row; label ``Base`` unless ``--method`` says otherwise);
* ``--ckpt_path PATH`` — a Lightning checkpoint of ``ClarifyModule`` (label: its objective, e.g. ``Refit``);
* ``--export_dir DIR`` — an exported HF folder (full weights) or PEFT adapter folder (``adapter_config.json``; the
  base model is read from it) as written to ``<run>/export/`` at fit end (label: the run folder's name).

Examples::

    clarify evaluate --model embedded:smollm2-135m-instruct --data.dataset sciq --out_dir runs/base/eval
    clarify evaluate --export_dir runs/swift/export --data.dataset sciq --out_dir runs/swift/eval --method Swift
    clarify report runs/*/eval --out results/sciq.md

Greedy decoding by default (``--rollout.temperatures [0.0]``); several temperatures give several runs per question.
The held-out questions are the ``test`` part of ``--data`` (``clarify simulate``'s data options; ``seed``/``n_train``/
``n_test`` must match the simulated training data so the parts are disjoint). ``--config`` takes a YAML of these
options; the rollout, teacher and reward take ``clarify simulate``'s options too.
"""

from __future__ import annotations

import json
import logging
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

from clarify_lit.arguments import CommandLine, refuse_secrets
from clarify_lit.data.records import write_records
from clarify_lit.environment import environment_stamp
from clarify_lit.evaluate.callback import build_teacher_and_reward, load_eval_tasks, run_rollouts
from clarify_lit.evaluate.metrics import compute_metrics, nan_to_none
from clarify_lit.evaluate.served import check_served_source, served, served_info, served_rollouts
from clarify_lit.io import atomic_write_text, output_lock
from clarify_lit.models import (
    DTYPES,
    DTypeChoice,
    load_causal_lm,
    load_export,
    load_tokenizer,
    resolve_device,
    resolve_dtype,
)
from clarify_lit.simulate.missing_rewards import (
    DEFAULT_MAX_MISSING_SHARE,
    MissingRewardsError,
    check_max_share,
    check_missing_rewards,
)
from clarify_lit.simulate.options import (
    ROLLOUT_MOVES,
    DataOptions,
    EndpointOptions,
    RewardOptions,
    RolloutOptions,
    TeacherOptions,
    moved_rollout_flags,
)
from clarify_lit.simulate.rollout import RolloutSpec, check_context_budget
from clarify_lit.train.module import load_checkpoint

log = logging.getLogger(__name__)


def check_one_source(model: str | None, ckpt_path: str | None, export_dir: str | None) -> None:
    given = [name for name, v in (("--model", model), ("--ckpt_path", ckpt_path), ("--export_dir", export_dir)) if v]
    if len(given) != 1:
        raise ValueError(
            "clarify evaluate needs exactly one of --model (a base model), --ckpt_path (a Lightning "
            f"checkpoint) or --export_dir (an exported HF/PEFT folder); got {given or 'none'}"
        )


def load_policy(
    model: str | None, ckpt_path: str | None, export_dir: str | None, dtype: str, merge_lora: bool
) -> tuple[Any, Any, dict[str, Any]]:
    """Load exactly one of the three policy sources; return ``(model, tokenizer, info)`` (info goes into meta)."""
    check_one_source(model, ckpt_path, export_dir)
    if model:
        return (
            load_causal_lm(model, dtype),
            load_tokenizer(model),
            {"source": "model", "model": model, "base_model": model, "default_method": "Base"},
        )
    if ckpt_path:
        m, tok, base, objective = load_checkpoint(ckpt_path, merge_lora)
        return m, tok, {"source": "ckpt", "model": str(ckpt_path), "base_model": base, "default_method": objective}
    assert export_dir is not None
    m, tok, base = load_export(export_dir, dtype, merge_lora)
    folder = Path(export_dir).resolve()
    label = folder.parent.name if folder.name == "export" else folder.name
    return m, tok, {"source": "export", "model": str(export_dir), "base_model": base, "default_method": label}


def check_out_dir(out: Path, overwrite: bool) -> None:
    """Refuse a folder holding a finished evaluation (``metrics.json``) unless ``overwrite``, and make sure the folder
    can be written — before any model loads or rollout runs, not after all the work."""
    finished = out / "metrics.json"
    if finished.exists() and not overwrite:
        try:
            method = json.loads(finished.read_text(encoding="utf-8")).get("meta", {}).get("method")
        except (ValueError, OSError, AttributeError):
            method = None
        held = f" (method {method!r})" if method else ""
        raise FileExistsError(
            f"--out_dir {out} already holds a finished evaluation{held}: metrics.json; pass "
            "--overwrite true to replace it, or choose another --out_dir"
        )
    try:
        out.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=out):
            pass
    except OSError as e:
        raise PermissionError(
            f"--out_dir {out} cannot be written ({e.strerror or e}); choose another --out_dir"
        ) from None


def _default_rollout() -> RolloutOptions:
    return RolloutOptions(temperatures=[0.0])


@dataclass
class EvaluateConfig:
    """Roll a policy (--model, --ckpt_path or --export_dir) out on held-out questions; write metrics.json and
    rollouts.jsonl to --out_dir (see docs/evaluation.md)."""

    model: str | None = None
    """A base model: hub id, folder, embedded:smollm2-135m-instruct, tiny-random."""
    ckpt_path: str | None = None
    """A ClarifyModule Lightning checkpoint."""
    export_dir: str | None = None
    """An exported HF folder or PEFT adapter folder."""
    method: str | None = None
    """The label in metrics.json and in clarify report (default: Base / the objective / the run)."""
    out_dir: str = "runs/eval"
    """Where metrics.json and rollouts.jsonl are written."""
    data: DataOptions = field(default_factory=DataOptions)
    """The questions, with clarify simulate's data options (--data.dataset sciq, --data.path, --data.columns,
    --data.seed, --data.n_train, --data.n_test): its held-out test part (part is overridden; keep seed/n_train/n_test
    equal to the simulation's so the parts are disjoint)."""
    n_questions: int | None = None
    """Evaluate the first N held-out questions (default: all data.n_test; the paper: 100)."""
    rollout: RolloutOptions = field(default_factory=_default_rollout)
    """How conversations are played and generated (clarify simulate's --rollout.* options); greedy by default
    (temperatures [0.0]: one run per question). With rollout.adaptive the metrics add the mean number of clarifying
    turns."""
    teacher: TeacherOptions = field(default_factory=TeacherOptions)
    """The teacher, with clarify simulate's options (--teacher.kind llm --teacher.backend endpoint
    --teacher.endpoint.base_url …); default scripted (reasoning) / retrieval (clarifying). An llm teacher defaults to
    the base model, so every method meets the same teacher."""
    reward: RewardOptions = field(default_factory=RewardOptions)
    """The reward, with clarify simulate's options (--reward.kind gold_prob, --reward.judge_model, --reward.kind
    llm_judge --reward.backend endpoint …); default correct. Judges default to the base model."""
    dtype: DTypeChoice = "auto"
    """Weights dtype the policy generates in (any source; a checkpoint is cast): auto = bfloat16 where the device
    computes it natively (a CPU with avx512_bf16 or amx_bf16, a GPU with bf16), else float32 (docs/environment.md);
    the resolved dtype is recorded in metrics.json (meta.dtype and meta.environment)."""
    device: str = "auto"
    """auto (CUDA if available), cpu, cuda, cuda:1 …"""
    merge_lora: bool = True
    """Merge a LoRA adapter into the base weights before generating (faster, same outputs)."""
    progress: bool = True
    """Show a progress bar."""
    overwrite: bool = False
    """Replace a finished evaluation (metrics.json) already in out_dir; without it such a folder is refused."""
    policy_endpoint: EndpointOptions = field(default_factory=EndpointOptions)
    """The policy on an OpenAI-compatible server (--policy_endpoint.base_url http://127.0.0.1:8765/v1
    --policy_endpoint.model NAME: llama.cpp serving a clarify export --format gguf file, vLLM, Ollama); nothing is
    loaded locally, --model optionally names its base (evaluate/served.py)."""
    max_missing_rewards: float = DEFAULT_MAX_MISSING_SHARE
    """The largest share of conversations whose reward may be missing (a judge reply that could not be parsed) before
    the evaluation fails: exit 3 with one line naming the judge, the share and one raw reply (saved in out_dir);
    rollouts.jsonl is written, metrics.json (the "done" marker) is not. 1 = never fail."""


def run(cfg: EvaluateConfig) -> dict[str, float]:
    """Evaluate the policy of ``cfg`` (see the module docstring); return its metrics."""
    if served(cfg.policy_endpoint):
        check_served_source(cfg.policy_endpoint, cfg.ckpt_path, cfg.export_dir)
    else:
        check_one_source(
            cfg.model, cfg.ckpt_path, cfg.export_dir
        )  # before any loading: fail fast on a bad command line
    cfg.rollout.check()
    check_max_share(cfg.max_missing_rewards)
    # keys come from environment variables only
    refuse_secrets({"teacher": cfg.teacher, "reward": cfg.reward, "policy_endpoint": cfg.policy_endpoint})
    out = Path(cfg.out_dir)
    check_out_dir(out, cfg.overwrite)
    with output_lock(out, "clarify evaluate"):
        check_out_dir(out, cfg.overwrite)  # again under the lock: another evaluation may have finished meanwhile
        if cfg.overwrite:  # the old marker goes first: the folder never pairs old metrics with new rollouts
            (out / "metrics.json").unlink(missing_ok=True)
        return _evaluate(cfg, out)


def _evaluate(cfg: EvaluateConfig, out: Path) -> dict[str, float]:
    """:func:`run`'s work, once ``out`` is checked and locked."""
    start = time.perf_counter()
    dev = resolve_device(cfg.device)
    dtype = resolve_dtype(cfg.dtype, dev)
    tasks = load_eval_tasks(cfg.data, cfg.n_questions)
    spec = RolloutSpec.of(cfg.rollout)
    if served(cfg.policy_endpoint):  # the server generates: nothing to load (evaluate/served.py)
        policy = tokenizer = None
        info = served_info(cfg.policy_endpoint, cfg.model)
    else:
        policy, tokenizer, info = load_policy(cfg.model, cfg.ckpt_path, cfg.export_dir, dtype, cfg.merge_lora)
        # every source generates in the resolved dtype (a checkpoint holds its training dtype until cast here)
        policy = policy.to(device=dev, dtype=DTYPES[dtype]).eval()
        check_context_budget(policy, spec.n_turns, spec.max_new_tokens, info["model"])
    teacher_obj, reward_obj = build_teacher_and_reward(
        cfg.teacher,
        cfg.reward,
        base_model=info["base_model"],
        setting=spec.setting,
        device=dev,
        batch_size=spec.batch_size,
        mode=spec.mode,
    )
    if served(cfg.policy_endpoint):
        records = served_rollouts(
            cfg.policy_endpoint,
            tasks,
            spec,
            teacher=teacher_obj,
            reward=reward_obj,
            progress=cfg.progress,
            model_name=info["model"],
        )
    else:
        records = run_rollouts(
            policy,
            tokenizer,
            tasks,
            spec,
            teacher=teacher_obj,
            reward=reward_obj,
            progress=cfg.progress,
            model_name=info["model"],
        )
    metrics = compute_metrics(records, tokenizer, setting=spec.setting, choices={t.task_id: t.choices for t in tasks})
    write_records(out / "rollouts.jsonl", records)
    # before metrics.json: an evaluation whose judge could not be read is not marked done
    check_missing_rewards(records, reward_obj, out, cfg.max_missing_rewards, prog="clarify evaluate")
    data = cfg.data
    meta = {
        "method": cfg.method or info["default_method"],
        "model": info["model"],
        "base_model": info["base_model"],
        "source": info["source"],
        **({"endpoint": info["endpoint"]} if "endpoint" in info else {}),
        "n": len(records),
        "n_questions": len(tasks),
        "dataset": data.label or data.dataset,
        "data": {**asdict(data), "part": "test"},  # the part evaluated
        "teacher": teacher_obj.describe(),
        "reward": reward_obj.describe(),
        **spec.describe(),
        "dtype": dtype,
        "device": str(dev),
        "seconds": round(time.perf_counter() - start, 2),
        "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "rollouts": "rollouts.jsonl",
        "argv": sys.argv[1:],
        "environment": environment_stamp(dev, dtype),  # what made these numbers (clarify report compares them)
    }
    # written last and atomically: metrics.json is the "stage done" marker `clarify iterate` and the demo resume on
    atomic_write_text(out / "metrics.json", json.dumps(nan_to_none({"metrics": metrics, "meta": meta}), indent=2))
    print(summary_line(meta["method"], metrics, out))
    return metrics


def summary_line(method: str, m: dict[str, float], out: Path) -> str:
    """One human line: accuracy ± SE, reward ± SE, Thinking %, format rate, where the files went."""
    return (
        f"[clarify evaluate] {method}: n={m['n']:.0f}  accuracy {m['accuracy']:.3f} ± {m['accuracy_se']:.3f}  "
        f"reward {m['reward']:.3f} ± {m['reward_se']:.3f}  thinking {m['thinking_pct']:.1f}%  "
        f"format {m['format_rate']:.3f}"
        + (f"  clarifying turns {m['clarifying_turns']:.2f}" if "clarifying_turns" in m else "")
        + f"  → {out / 'metrics.json'}"
    )


COMMAND_LINE = CommandLine(
    EvaluateConfig,
    "clarify evaluate",
    __doc__.split("\n\n")[0],
    "CLARIFY_EVALUATE",
    rewrite=partial(moved_rollout_flags, prog="clarify evaluate"),
    moved=ROLLOUT_MOVES,
)
build_parser, parse_config = COMMAND_LINE.parser, COMMAND_LINE.parse


def main(argv: list[str] | None = None) -> None:
    """Entry point of ``clarify evaluate``."""
    cfg = parse_config(argv)
    try:
        run(cfg)
    except MissingRewardsError as e:  # rollouts.jsonl is written, metrics.json is not
        print(e, file=sys.stderr)
        raise SystemExit(3) from None


if __name__ == "__main__":
    main()
