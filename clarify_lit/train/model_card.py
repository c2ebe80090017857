"""The model card (``README.md``) of an export, filled from the run that produced it.

:func:`gather_card_facts` collects plain data — from the live trainer at fit end, or from a checkpoint and its run
folder (``clarify export``) — and :func:`render_model_card` turns it into Markdown with Hugging Face Hub front matter
(``base_model``, ``library_name``, ``license``, ``tags``, ``datasets``). Facts that a run does not have (no rollout
evaluation, no simulation folder next to the records) are left out or said to be absent, never filled with a
placeholder.

Where each part comes from:

* objective, LoRA and optimiser settings: the module's hyper-parameters;
* steps and final losses: ``trainer.callback_metrics`` (fit end) or the checkpoint and the run's TensorBoard events;
* data: the training record files (counts, datasets, teacher, reward, logging policy from each record's ``meta``)
  and, when the records sit in a ``clarify simulate`` folder, its ``summary.json``/``run_config.json``;
* evaluation: the newest ``<run>/rollouts/step_*.metrics.json`` of the ``RolloutEvaluation`` callback;
* command: ``<run>/config.yaml`` (every resolved value: ``clarify fit --config`` it to rerun) and the process's argv.
"""

from __future__ import annotations

import json
import logging
import math
import platform
import shlex
import sys
from collections import Counter
from importlib import metadata
from pathlib import Path
from typing import Any, Literal

import yaml

from clarify_lit.base_reference import BASE_LICENSES, EMBEDDED_NOTE, portable_base_name
from clarify_lit.data.records import iter_raw
from clarify_lit.models import EMBEDDED_SMOLLM2

log = logging.getLogger(__name__)

ExportFormat = Literal["adapter", "full", "merged"]
LIBRARIES = ("clarify_lit", "torch", "transformers", "peft", "lightning")
# the QA sources of clarify_lit.data.tasks and their public hub datasets (front matter ``datasets``)
DATASET_HUB_IDS = {
    "openbookqa": "allenai/openbookqa",
    "arc_easy": "allenai/ai2_arc",
    "arc_challenge": "allenai/ai2_arc",
    "sciq": "allenai/sciq",
    "mmlu": "cais/mmlu",
}
# metrics of clarify evaluate / the rollout callback shown in the card's evaluation table, in this order
# logged per batch for throughput and skip accounting, not results: left out of the card's final values
BOOKKEEPING = ("tokens", "rows_computed")
EVAL_METRICS = (
    "accuracy",
    "accuracy_se",
    "reward",
    "reward_se",
    "format_rate",
    "hedge_rate",
    "thinking_pct",
    "single_question_rate",
    "truncated_rate",
    "words_per_turn",
)
BASE_DIFFERENCE_UNMEASURED = (
    "Not measured: the original bf16 weights of the hub model were not available (offline) where this export was "
    "made, so the difference between the two bases (mean |Δ logit|, greedy agreement) is unknown here. The Q4_1 "
    "quantization changes every weight slightly; expect close but not identical outputs. Where the hub is "
    "reachable, `python -m clarify_lit.base_reference` measures it on 20 prompts."
)


def library_versions() -> dict[str, str]:
    """Installed versions of the libraries an export depends on (``"not installed"`` when absent)."""
    out = {"python": platform.python_version()}
    for name in LIBRARIES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = "not installed"
    return out


def finite_scalars(metrics: dict[str, Any], prefixes: tuple[str, ...] = ("train/", "val/")) -> dict[str, float]:
    """The finite scalar metrics (tensors or numbers) whose names start with one of ``prefixes``, without the
    batch bookkeeping (token and row counts)."""
    out = {}
    for key, value in metrics.items():
        if not key.startswith(prefixes) or key.split("/", 1)[-1].startswith(BOOKKEEPING):
            continue
        try:
            number = float(value.item() if hasattr(value, "item") else value)
        except (TypeError, ValueError, RuntimeError):
            continue
        if math.isfinite(number):
            out[key] = number
    return dict(sorted(out.items()))


def logged_scalars(run_dir: Path, prefixes: tuple[str, ...] = ("train/", "val/")) -> dict[str, float]:
    """The last value of each ``prefixes`` scalar in the run's TensorBoard events (for an export made after the fit,
    from a checkpoint); ``{}`` when there are none or tensorboard cannot read them."""
    files = sorted(run_dir.glob("events.out.tfevents.*")) if run_dir.is_dir() else []
    if not files:
        return {}
    try:
        from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    except ImportError:
        return {}
    last: dict[str, tuple[int, float]] = {}
    for f in files:
        acc = EventAccumulator(str(f), size_guidance={"scalars": 0})
        acc.Reload()
        for tag in acc.Tags().get("scalars", []):
            if tag.startswith(prefixes):
                event = acc.Scalars(tag)[-1]
                if tag not in last or event.step >= last[tag][0]:
                    last[tag] = (event.step, event.value)
    return finite_scalars({k: v for k, (_, v) in last.items()}, prefixes)


def data_facts(train_files: list[str]) -> dict[str, Any]:
    """What the training records say about themselves: counts, datasets, teacher, reward, logging policy.

    Read from each record's ``meta`` (``clarify simulate`` writes ``teacher``, ``reward``, ``model``, ``setting``)
    and, when a file sits in a ``clarify simulate`` output folder, from its ``summary.json`` and ``run_config.json``.
    """
    conversations, tasks, rewards = 0, set(), []
    datasets: Counter[str] = Counter()
    meta_values: dict[str, Counter[str]] = {k: Counter() for k in ("teacher", "reward", "model", "setting", "mode")}
    unreadable = []
    for f in train_files:
        try:
            for _, raw in iter_raw(f):
                if not isinstance(raw, dict):
                    continue
                conversations += 1
                tasks.add(raw.get("task_id"))
                if raw.get("dataset"):
                    datasets[str(raw["dataset"])] += 1
                if isinstance(raw.get("reward"), int | float):
                    rewards.append(float(raw["reward"]))
                meta = raw.get("meta") if isinstance(raw.get("meta"), dict) else {}
                for key, counter in meta_values.items():
                    if meta.get(key) is not None:
                        counter[str(meta[key])] += 1
        except (OSError, ValueError) as e:  # the card describes what it can; the fit itself already read the files
            unreadable.append(f"{f}: {e}")
    facts: dict[str, Any] = {
        "train_files": [str(f) for f in train_files],
        "conversations": conversations,
        "questions": len(tasks),
        "datasets": dict(datasets),
        "mean_reward": sum(rewards) / len(rewards) if rewards else None,
        **{key: sorted(counter) for key, counter in meta_values.items() if counter},
    }
    if unreadable:
        facts["unreadable"] = unreadable
    simulations = [simulation_facts(Path(f).parent) for f in train_files]
    facts["simulations"] = [s for s in simulations if s]
    return facts


def simulation_facts(folder: Path) -> dict[str, Any]:
    """The ``clarify simulate`` folder ``folder``'s summary and configuration, ``{}`` if it is not one."""
    facts: dict[str, Any] = {}
    summary_file, config_file = folder / "summary.json", folder / "run_config.json"
    try:
        if summary_file.is_file():
            summary = json.loads(summary_file.read_text(encoding="utf-8"))
            facts["summary"] = {
                k: summary.get(k)
                for k in ("tasks", "conversations", "runs_per_task", "datasets", "mean_reward", "accuracy", "teacher")
                if summary.get(k) is not None
            }
        if config_file.is_file():
            config = json.loads(config_file.read_text(encoding="utf-8")).get("config", {})
            keep = (
                "model",
                "setting",
                "mode",
                "n_turns",
                "temperatures",
                "seed",
                "max_new_tokens",
                "data",
                "teacher",
                "reward",
                "adaptive",
                "discount",
            )
            facts["config"] = {k: config[k] for k in keep if k in config}
    except (OSError, ValueError, AttributeError) as e:
        log.warning("model card: could not read the simulation folder %s (%s)", folder, e)
    if facts:
        facts["folder"] = str(folder)
    return facts


def rollout_evaluation(run_dir: Path) -> dict[str, Any] | None:
    """The newest ``rollouts/step_*.metrics.json`` of the ``RolloutEvaluation`` callback, or ``None``."""
    files = sorted((run_dir / "rollouts").glob("step_*.metrics.json")) if run_dir.is_dir() else []
    if not files:
        return None
    try:
        data = json.loads(files[-1].read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        log.warning("model card: could not read %s (%s)", files[-1], e)
        return None
    return {"file": str(files[-1]), "metrics": data.get("metrics") or {}, "meta": data.get("meta") or {}}


def run_command(run_dir: Path) -> dict[str, Any]:
    """``config.yaml`` of the run folder (every resolved value) and this process's command line when it is a fit."""
    out: dict[str, Any] = {}
    config = run_dir / "config.yaml"
    if config.is_file():
        out["config_file"] = str(config)
        out["config"] = config.read_text(encoding="utf-8")
    if "fit" in sys.argv[1:2]:  # the clarify CLI's own process (not a test runner or notebook)
        out["argv"] = "clarify " + " ".join(shlex.quote(a) for a in sys.argv[1:])
    return out


def gather_card_facts(
    module,
    *,
    export_format: ExportFormat,
    run_dir: Path | None,
    trainer=None,
    checkpoint: dict | None = None,
    train_files: list[str] | None = None,
    dtype: str | None = None,
) -> dict[str, Any]:
    """Everything the card shows, as plain data. ``trainer`` (fit end) or ``checkpoint`` (a loaded ``.ckpt`` dict)
    give the steps and losses; ``train_files`` default to the trainer's datamodule or the run's ``config.yaml``."""
    hp = dict(module.hparams)
    spec = str(hp.get("model_name_or_path", ""))
    facts: dict[str, Any] = {
        "format": export_format,
        "base_model": portable_base_name(spec) if spec else "unknown",
        "base_model_spec": spec,
        "dtype": dtype or hp.get("dtype"),
        "training_dtype": hp.get("dtype"),
        "objective": dict(hp.get("objective_config") or {}),
        "optimizer": {k: hp.get(k) for k in ("learning_rate", "weight_decay", "warmup_ratio", "lr_schedule")},
        "lora": (
            {k: hp.get(k) for k in ("lora_r", "lora_alpha", "lora_dropout")} | {"target_modules": _lora_targets(module)}
        )
        if hp.get("use_lora")
        else None,
        "versions": library_versions(),
        "run_dir": str(run_dir) if run_dir else None,
    }
    training: dict[str, Any] = {}
    if trainer is not None:
        training = {
            "global_step": trainer.global_step,
            "epochs": trainer.current_epoch,
            "precision": str(trainer.precision),
            "accumulate_grad_batches": trainer.accumulate_grad_batches,
            "final_metrics": finite_scalars(trainer.callback_metrics),
        }
        dm = getattr(trainer, "datamodule", None)
        if train_files is None and dm is not None:
            train_files = list(getattr(dm, "train_files", []) or [])
            training["batch_size"] = getattr(dm, "batch_size", None)
    elif checkpoint is not None:
        training = {
            "global_step": checkpoint.get("global_step"),
            "epochs": checkpoint.get("epoch"),
            "final_metrics": logged_scalars(run_dir) if run_dir else {},
        }
    facts["training"] = training
    command = run_command(run_dir) if run_dir else {}
    facts["command"] = command
    if train_files is None and command.get("config"):
        train_files = ((yaml.safe_load(command["config"]) or {}).get("data") or {}).get("train_files")
    facts["data"] = data_facts(list(train_files)) if train_files else None
    facts["evaluation"] = rollout_evaluation(run_dir) if run_dir else None
    return facts


def _lora_targets(module) -> list[str]:
    config = getattr(getattr(module, "model", None), "peft_config", {}).get("default")
    return sorted(getattr(config, "target_modules", None) or module.hparams.get("lora_target_modules") or [])


# ---------------------------------------------------------------------------------------------------------------
# rendering


def front_matter(facts: dict[str, Any]) -> dict[str, Any]:
    """The Hub card metadata: ``base_model``, ``library_name``, ``license``, ``tags``, ``datasets``."""
    objective = (facts.get("objective") or {}).get("class", "").lower()
    data = facts.get("data") or {}
    datasets = sorted({DATASET_HUB_IDS.get(d, d) for d in data.get("datasets", {})})
    meta: dict[str, Any] = {
        "base_model": facts["base_model"],
        "library_name": "peft" if facts["format"] == "adapter" else "transformers",
        "pipeline_tag": "text-generation",
        "tags": [
            t
            for t in (
                "clarify_lit",
                objective,
                "lora" if facts.get("lora") else None,
                "merged" if facts["format"] == "merged" else None,
                "multi-turn",
                "offline-rl",
                "reward-weighted-fine-tuning",
            )
            if t
        ],
    }
    if facts["base_model"] in BASE_LICENSES:
        meta["license"] = BASE_LICENSES[facts["base_model"]]
    if datasets:
        meta["datasets"] = datasets
    return meta


def _table(rows: list[tuple[str, Any]], header: tuple[str, str] = ("", "")) -> str:
    lines = [f"| {header[0]} | {header[1]} |", "|---|---|"]
    lines += [f"| {k} | {_cell(v)} |" for k, v in rows]
    return "\n".join(lines)


def _cell(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, list | dict):
        return "`" + json.dumps(value, sort_keys=True) + "`"
    return str(value).replace("|", "\\|").replace("\n", " ")


def render_model_card(facts: dict[str, Any], title: str | None = None) -> str:
    """The Markdown model card of an export described by ``facts`` (:func:`gather_card_facts`)."""
    fmt, base = facts["format"], facts["base_model"]
    objective = facts.get("objective") or {}
    method = objective.get("class", "an unknown objective")
    what = {
        "adapter": f"a LoRA adapter (PEFT) for `{base}`",
        "full": f"the fully fine-tuned weights of `{base}`",
        "merged": f"`{base}` with the trained LoRA adapter merged into its weights (a standalone model)",
    }[fmt]
    parts = [
        "---",
        yaml.safe_dump(front_matter(facts), sort_keys=False).strip(),
        "---",
        "",
        f"# {title or 'clarify_lit policy'}",
        "",
        f"This is {what}, trained with clarify_lit's **{method}** objective on simulated multi-turn "
        "conversations (offline RL by reward-weighted fine-tuning: the policy learns from scored conversations "
        "with a teacher, e.g. to ask clarifying questions before answering multiple-choice questions).",
        "",
    ]
    parts += _base_section(facts) + _usage_section(facts) + _objective_section(facts) + _training_section(facts)
    parts += _data_section(facts) + _evaluation_section(facts) + _command_section(facts)
    parts += ["## Library versions", "", _table(list(facts["versions"].items()), ("library", "version")), ""]
    parts += _limitations_section(facts)
    return "\n".join(parts).rstrip() + "\n"


def _base_section(facts: dict[str, Any]) -> list[str]:
    spec, base = facts["base_model_spec"], facts["base_model"]
    rows = [
        ("base model (as named in this folder)", f"`{base}`"),
        ("clarify model spec", f"`{spec}`"),
        ("training dtype", facts.get("training_dtype")),
        ("dtype of this export", facts.get("dtype")),
    ]
    lines = ["## Base model", "", _table(rows), ""]
    if spec == EMBEDDED_SMOLLM2:
        lines += [
            f"**Note.** {EMBEDDED_NOTE}",
            "",
            f"**Difference between the two bases.** {facts.get('base_difference') or BASE_DIFFERENCE_UNMEASURED}",
            "",
        ]
    elif base.startswith(("/", ".", "~")):
        lines += [
            "**Note.** The base is a local folder of the training machine; to use this export elsewhere, put "
            "that model on a hub or next to the export and edit `base_model_name_or_path` in "
            "`adapter_config.json`.",
            "",
        ]
    return lines


def _usage_section(facts: dict[str, Any]) -> list[str]:
    if facts["format"] == "adapter":
        code = [
            "from peft import PeftModel",
            "from transformers import AutoModelForCausalLM, AutoTokenizer",
            "",
            f'base = AutoModelForCausalLM.from_pretrained("{facts["base_model"]}")',
            'model = PeftModel.from_pretrained(base, "path/to/this/folder").merge_and_unload()',
            'tokenizer = AutoTokenizer.from_pretrained("path/to/this/folder")  # with the chat template',
        ]
        offline = (
            'With clarify_lit installed, `clarify_lit.load_export("path/to/this/folder")` loads the exact '
            "base the adapter was trained on (`clarify_export.json`), offline."
        )
    else:
        code = [
            "from transformers import AutoModelForCausalLM, AutoTokenizer",
            "",
            'model = AutoModelForCausalLM.from_pretrained("path/to/this/folder")',
            'tokenizer = AutoTokenizer.from_pretrained("path/to/this/folder")  # with the chat template',
        ]
        offline = "It needs neither peft nor clarify_lit."
    return ["## How to load", "", "```python", *code, "```", "", offline, ""]


def _objective_section(facts: dict[str, Any]) -> list[str]:
    objective = dict(facts.get("objective") or {})
    name = objective.pop("class", "unknown")
    rows = [
        ("objective", name),
        *[(f"objective.{k}", v) for k, v in objective.items()],
        *[(k, v) for k, v in (facts.get("optimizer") or {}).items()],
    ]
    lines = ["## Objective and hyper-parameters", "", _table(rows), ""]
    if facts.get("lora"):
        lines += ["LoRA:", "", _table(list(facts["lora"].items())), ""]
    return lines


def _training_section(facts: dict[str, Any]) -> list[str]:
    training = facts.get("training") or {}
    if not training:
        return []
    rows = [
        (k, training[k])
        for k in ("global_step", "epochs", "precision", "accumulate_grad_batches", "batch_size")
        if training.get(k) is not None
    ]
    lines = ["## Training", "", _table(rows), ""]
    final = training.get("final_metrics") or {}
    if final:
        lines += ["Final logged values:", "", _table(list(final.items()), ("metric", "value")), ""]
    return lines


def _data_section(facts: dict[str, Any]) -> list[str]:
    data = facts.get("data")
    if not data:
        return []
    rows = [
        ("training files", data["train_files"]),
        ("conversations", data["conversations"]),
        ("questions (task ids)", data["questions"]),
        ("datasets (conversations)", data["datasets"]),
    ]
    rows += [
        (label, data[key])
        for key, label in (
            ("mean_reward", "mean reward"),
            ("teacher", "teacher"),
            ("reward", "reward kind"),
            ("model", "logging policy"),
            ("setting", "setting"),
            ("mode", "mode"),
        )
        if data.get(key)
    ]
    lines = ["## Data", "", _table(rows), ""]
    for sim in data.get("simulations") or []:
        lines += [f"Simulation folder `{sim['folder']}`:", ""]
        summary = sim.get("summary") or {}
        config = sim.get("config") or {}
        lines += [_table([*summary.items(), *[(f"config.{k}", v) for k, v in config.items()]]), ""]
    if data.get("unreadable"):
        lines += ["Unreadable when the card was written: " + "; ".join(data["unreadable"]), ""]
    return lines


def _evaluation_section(facts: dict[str, Any]) -> list[str]:
    ev = facts.get("evaluation")
    if not ev:
        return [
            "## Evaluation",
            "",
            "This run had no rollout evaluation during training (the `RolloutEvaluation` "
            "callback). Evaluate the export with `clarify evaluate --export_dir <this folder>`.",
            "",
        ]
    metrics, meta = ev["metrics"], ev["meta"]
    shown = [(k, metrics[k]) for k in EVAL_METRICS if metrics.get(k) is not None]
    shown += [
        (k, v)
        for k, v in sorted(metrics.items())
        if k not in EVAL_METRICS and isinstance(v, int | float) and not isinstance(v, bool)
    ]
    temperatures = meta.get("temperatures") or [0.0]
    how = "Greedy rollouts" if set(temperatures) == {0.0} else f"Rollouts (temperatures {temperatures})"
    where = (
        f"{how} of the policy at step {meta.get('step')} on {meta.get('n_questions')} held-out "
        f"questions of `{meta.get('dataset')}` (teacher `{meta.get('teacher')}`, reward `{meta.get('reward')}`),"
        f" from `{ev['file']}`:"
    )
    return ["## Evaluation", "", where, "", _table(shown, ("metric", "value")), ""]


def _command_section(facts: dict[str, Any]) -> list[str]:
    command = facts.get("command") or {}
    if not command:
        return []
    lines = ["## Reproduce", ""]
    if command.get("config_file"):
        lines += [
            "The run's full resolved configuration; rerun it with",
            "",
            "```bash",
            f"clarify fit --config {command['config_file']}",
            "```",
            "",
        ]
    if command.get("argv"):
        lines += ["Launched as:", "", "```bash", command["argv"], "```", ""]
    if command.get("config"):
        lines += [
            "<details><summary>config.yaml</summary>",
            "",
            "```yaml",
            command["config"].rstrip(),
            "```",
            "",
            "</details>",
            "",
        ]
    return lines


def _limitations_section(facts: dict[str, Any]) -> list[str]:
    return [
        "## Intended use and limitations",
        "",
        "A research artefact of clarify_lit: a small policy fine-tuned offline on conversations that it (or a "
        "base model) had with a simulated teacher, scored by an automatic reward. Intended for studying "
        "reward-weighted fine-tuning, clarifying questions and multi-turn evaluation; not for deployment.",
        "",
        "* It was trained and evaluated on multiple-choice science/trivia questions with a scripted or LLM "
        "teacher; behaviour on other tasks, languages or real users is untested.",
        "* The reward measures the final answer's correctness (and format) as the simulator saw it; a higher "
        "reward does not mean more truthful or safer text. Small models state wrong facts confidently.",
        "* It inherits the limitations, biases and licence of its base model"
        + (f" (`{facts['base_model']}`)." if facts.get("base_model") else "."),
        "",
    ]
