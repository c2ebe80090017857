"""``clarify iterate``: iterated Refit/Swift — simulate with the current policy → fit → evaluate, for K rounds.

The paper is one-shot offline RL: one batch of conversations logged with the base model, one fit. Here the loop is
closed: round 0 simulates with the base model, fits and evaluates; round k > 0 simulates with round k − 1's exported
policy (``--model round_{k-1}/fit/export``), fits on that round's conversations and evaluates again, so one can see
whether re-collecting data with the improved policy keeps improving reward. Every stage is an ordinary ``clarify``
command (run in a subprocess, or in this process with ``--in_process true``), printed before it runs and logged to
``commands.sh``; the simulate and evaluate stages read a per-round YAML written next to their output. Examples::

    clarify iterate --rounds 3 --output runs/iterate                     # SmolLM2, OpenBookQA, Refit, 3 rounds
    clarify iterate --config my-iterate.yaml --rounds 4                  # a finished 3-round run gains round 3
    clarify iterate --rounds 2 --dry_run true                            # print the commands, run nothing

Output folder::

    OUT/iterate_config.json                 the options (a rerun must match them; rounds may grow)
    OUT/commands.sh                         every command run, in order
    OUT/base/evaluate.yaml, base/eval/      the base model on the held-out questions (row "Base")
    OUT/round_000/simulate.yaml, simulate/  round 0's conversations (logged with the base model)
    OUT/round_000/fit/                      the clarify fit run; fit/export/ is round 0's policy
    OUT/round_000/evaluate.yaml, eval/      that policy on the held-out questions (row "round 0")
    OUT/round_001/...                       simulated with round_000/fit/export, …
    OUT/report.md, report.json, report.png  reward and accuracy by round

Resumable: a stage whose output exists is skipped (simulate: ``summary.json``; fit: ``export/``; evaluate:
``metrics.json``), and an interrupted simulation resumes chunk-wise. Design choices are in docs/iterate.md.
"""

from __future__ import annotations

import json
import logging
import math
import os
import sys
import time
from dataclasses import asdict, dataclass, field, replace
from functools import partial
from pathlib import Path
from typing import Any, Literal

import yaml

from clarify_lit.arguments import CommandLine, refuse_secrets
from clarify_lit.data.records import load_records
from clarify_lit.evaluate.metrics import compute_metrics, holm_adjust, nan_to_none, paired_comparison
from clarify_lit.evaluate.report import (
    aggregate,
    constant_caption,
    environment_footer,
    format_mean_se,
    letters_table,
    method_rollouts,
    mixed_environments,
    read_metrics_file,
    results_table,
    table_columns,
)
from clarify_lit.io import atomic_write, atomic_write_text, output_lock
from clarify_lit.jobs.stages import StageFailed, StageRunner
from clarify_lit.models import DTypeChoice, resolve_device, resolve_dtype
from clarify_lit.simulate.command import SimulateConfig
from clarify_lit.simulate.options import (
    ROLLOUT_MOVES,
    DataOptions,
    RewardOptions,
    RolloutOptions,
    TeacherOptions,
    moved_rollout_flags,
)

log = logging.getLogger("clarify.iterate")

REPORT_NAME = "report"
CONFIG_FILE = "iterate_config.json"
# options that may change between an interrupted (or shorter) run and its continuation
_RUNTIME_FIELDS = ("rounds", "output", "in_process", "dry_run", "progress", "device")


@dataclass
class IterateConfig:
    """Iterated Refit/Swift: K rounds of simulate (current policy) → fit → evaluate (see docs/iterate.md)."""

    rounds: int = 2
    """Number of rounds K (round 0 simulates with the base model)."""
    output: str = "runs/iterate"
    """Output folder (round_000/, round_001/, …, base/, report.md)."""
    model: str = "embedded:smollm2-135m-instruct"
    """Base model: round 0's logging policy, the Base row, and the default teacher/judge of every round."""
    objective_config: str = "configs/objective/refit.yaml"
    """Objective preset for clarify fit (refit.yaml, swift.yaml, sft.yaml, …)."""
    model_config: str = "configs/model/smollm2-135m.yaml"
    """Model preset for clarify fit (its model_name_or_path is replaced by --model)."""
    trainer_config: str | None = "configs/trainer/cpu-auto.yaml"
    """Trainer preset for clarify fit (None: Lightning's defaults); cpu-auto.yaml trains in bf16-mixed where the CPU
    has native bf16, else 32-true (docs/environment.md)."""
    fit_args: list[str] = field(default_factory=list)
    """Extra clarify fit arguments, e.g. ["--trainer.max_epochs=2", "--model.learning_rate=1e-4"]."""
    init: Literal["continue", "base"] = "continue"
    """Round k > 0 starts from round k-1's adapter (continue) or from the base model (base); both train on the
    round's own conversations only."""
    data: DataOptions = field(default_factory=DataOptions)
    """Questions (clarify simulate's data options): simulation uses the train part, evaluation the test part."""
    rollout: RolloutOptions = field(default_factory=RolloutOptions)
    """How conversations are played and generated, in simulation and evaluation alike (clarify simulate's
    --rollout.* options), except that evaluation plays eval_temperatures. Round k simulates with rollout.seed + k and
    fits with seed_everything = rollout.seed + k; evaluation always uses rollout.seed."""
    teacher: TeacherOptions = field(default_factory=TeacherOptions)
    reward: RewardOptions = field(default_factory=RewardOptions)
    eval_temperatures: list[float] = field(default_factory=lambda: [0.0])
    """Evaluation: one run per temperature per held-out question (0 = greedy)."""
    n_questions: int | None = None
    """Held-out questions evaluated (None: all of data.n_test)."""
    dtype: DTypeChoice = "auto"
    """Generation dtype (simulate/evaluate): auto = bfloat16 where the device computes it natively, else float32
    (docs/environment.md), resolved once before round 0, so every round and iterate_config.json hold the same
    concrete dtype; training precision comes from the trainer preset."""
    device: str = "auto"
    simulate_args: list[str] = field(default_factory=list)
    """Extra clarify simulate arguments (after the round's YAML), e.g. ["--chunk_size", "4"]."""
    evaluate_args: list[str] = field(default_factory=list)
    """Extra clarify evaluate arguments (after the round's YAML)."""
    in_process: bool = False
    """Run the clarify commands in this process instead of subprocesses (faster start; tests)."""
    dry_run: bool = False
    """Print the commands (and write the per-round YAMLs) without running anything."""
    progress: bool = True


COMMAND_LINE = CommandLine(
    IterateConfig,
    "clarify iterate",
    __doc__.split("\n\n")[0],
    "CLARIFY_ITERATE",
    rewrite=partial(moved_rollout_flags, prog="clarify iterate"),
    moved=ROLLOUT_MOVES,
)
build_parser, parse_config = COMMAND_LINE.parser, COMMAND_LINE.parse


# ---------------------------------------------------------------------------------------------------------------
# layout


def round_dir(out: Path, k: int) -> Path:
    return out / f"round_{k:03d}"


def round_label(k: int) -> str:
    return f"round {k}"


def policy_of_round(cfg: IterateConfig, out: Path, k: int) -> str:
    """The logging policy of round k: the base model for k = 0, else round k − 1's export."""
    return cfg.model if k == 0 else str(round_dir(out, k - 1) / "fit" / "export")


def export_done(folder: Path) -> bool:
    return (folder / "adapter_config.json").is_file() or (folder / "config.json").is_file()


def check_config(cfg: IterateConfig) -> None:
    refuse_secrets(cfg)  # keys come from environment variables only: never into iterate_config.json or a stage YAML
    if not isinstance(cfg.rounds, int) or cfg.rounds < 1:
        raise ValueError(f"rounds must be an integer >= 1, got {cfg.rounds!r}")
    if not cfg.rollout.temperatures or not cfg.eval_temperatures:
        raise ValueError("rollout.temperatures and eval_temperatures must each name at least one run")
    cfg.rollout.check()
    replace(cfg.rollout, temperatures=cfg.eval_temperatures).check()
    for name in ("objective_config", "model_config", "trainer_config"):
        path = getattr(cfg, name)
        if path is not None and not Path(path).is_file():
            raise FileNotFoundError(f"--{name} {path!r} not found (paths are relative to the current folder)")


# the rollout options iterate took (flat) before the rollout block; the block's others are recorded only when they
# differ from their defaults, so iterate_config.json of a run made before them still matches
_FLAT_ROLLOUT = (
    "setting",
    "mode",
    "n_turns",
    "adaptive",
    "discount",
    "temperatures",
    "max_new_tokens",
    "batch_size",
    "seed",
)


def fingerprint(cfg: IterateConfig) -> dict[str, Any]:
    """The options a continuation must share (``iterate_config.json``): the rollout block flat, beside the others."""
    values = {k: v for k, v in asdict(cfg).items() if k not in _RUNTIME_FIELDS}
    rollout, default = values.pop("rollout"), asdict(RolloutOptions())
    values.update({k: v for k, v in rollout.items() if k in _FLAT_ROLLOUT or v != default[k]})
    return values


def lock_config(cfg: IterateConfig, out: Path) -> None:
    """Write ``iterate_config.json``, or check that a rerun uses the same options (rounds may differ)."""
    path = out / CONFIG_FILE
    want = json.loads(json.dumps(fingerprint(cfg)))
    if path.is_file():
        have = json.loads(path.read_text(encoding="utf-8"))
        diff = sorted(k for k in set(have) | set(want) if have.get(k) != want.get(k))
        if diff:
            raise ValueError(
                f"{out} holds an iterate run with other options (differ in: {', '.join(diff)}); use the "
                "same options (only --rounds may change) or another --output"
            )
        return
    atomic_write_text(path, json.dumps(want, indent=1) + "\n")


# ---------------------------------------------------------------------------------------------------------------
# the stages' arguments


def _teacher_reward(cfg: IterateConfig) -> tuple[dict, dict]:
    """Teacher and reward options with the *base* model as the default LLM teacher / judge, so every round's policy
    meets the same teacher and judge (a trained policy is never its own judge, and rewards stay comparable)."""
    teacher = asdict(cfg.teacher)
    reward = asdict(cfg.reward)
    teacher["model"] = teacher["model"] or cfg.model
    reward["judge_model"] = reward["judge_model"] or cfg.model
    return teacher, reward


def simulate_config(cfg: IterateConfig, out: Path, k: int) -> dict[str, Any]:
    """Round k's ``clarify simulate`` config (written to ``round_k/simulate.yaml``)."""
    teacher, reward = _teacher_reward(cfg)
    sim = SimulateConfig(
        model=policy_of_round(cfg, out, k),
        dtype=cfg.dtype,
        device=cfg.device,
        data=replace(cfg.data, part="train"),
        rollout=replace(cfg.rollout, seed=cfg.rollout.seed + k),
        output=str(round_dir(out, k) / "simulate"),
        resume=True,
        progress=cfg.progress,
    )
    values = asdict(sim)
    values["teacher"], values["reward"] = teacher, reward
    return values


def evaluate_config(
    cfg: IterateConfig, out_dir: Path, label: str, *, model: str | None = None, export_dir: str | None = None
) -> dict[str, Any]:
    """A ``clarify evaluate`` config on the held-out questions (the same for every row)."""
    teacher, reward = _teacher_reward(cfg)
    source = {"model": model} if model is not None else {"export_dir": export_dir}
    return {
        **source,
        "method": label,
        "out_dir": str(out_dir),
        "data": asdict(replace(cfg.data, part="test", limit=None)),
        "n_questions": cfg.n_questions,
        "rollout": asdict(replace(cfg.rollout, temperatures=list(cfg.eval_temperatures))),
        "teacher": teacher,
        "reward": reward,
        "dtype": cfg.dtype,
        "device": cfg.device,
        "progress": cfg.progress,
    }


def fit_args(cfg: IterateConfig, out: Path, k: int) -> list[str]:
    """Round k's ``clarify fit`` arguments.

    ``init=continue`` and k > 0: a LoRA export of round k − 1 seeds the adapter (``--model.init_adapter``); a
    full-weights export becomes the model itself (``--model.model_name_or_path``).
    """
    folder = round_dir(out, k)
    args = ["fit", "--config", cfg.model_config]
    if cfg.trainer_config:
        args += ["--config", cfg.trainer_config]
    args += ["--config", cfg.objective_config, "--model.model_name_or_path", cfg.model]
    if cfg.init == "continue" and k > 0:
        previous = round_dir(out, k - 1) / "fit" / "export"
        full = (previous / "config.json").is_file() and not (previous / "adapter_config.json").is_file()
        args += ["--model.model_name_or_path" if full else "--model.init_adapter", str(previous)]
    args += [
        f"--data.train_files=[{folder / 'simulate' / 'conversations.jsonl'}]",
        "--data.val_fraction",
        "0",
        "--data.seed",
        str(cfg.rollout.seed + k),
        "--seed_everything",
        str(cfg.rollout.seed + k),
        "--trainer.default_root_dir",
        str(folder / "fit"),
        # a fit interrupted earlier resumes from its last checkpoint (or starts again when it saved none)
        "--ckpt_path",
        "last_or_none",
        *cfg.fit_args,
    ]
    return args


def check_round_signal(out: Path, k: int) -> None:
    """Refuse to fit round k on conversations that all scored 0: no objective can learn from them (Refit's weights
    are all 0, Swift has no spread, DPO no pair), so the round would leave the policy as it was."""
    summary_file = round_dir(out, k) / "simulate" / "summary.json"
    try:
        summary = json.loads(summary_file.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return  # no summary to judge by: the fit's own checks decide
    n, mean = summary.get("conversations"), summary.get("mean_reward")
    if n and mean == 0:
        raise ValueError(
            f"round {k} has no signal: all {n} conversations its policy logged "
            f"({summary_file.parent / 'conversations.jsonl'}) have reward 0, so its fit would leave the "
            f"policy unchanged; stopped before round {k}'s fit (give the policy more tokens or turns, or "
            "another reward)"
        )


# ---------------------------------------------------------------------------------------------------------------
# running


def write_yaml(path: Path, values: dict[str, Any]) -> Path:
    return atomic_write_text(path, yaml.safe_dump(values, sort_keys=False))


def run(cfg: IterateConfig) -> dict[str, Any] | None:
    """Run (or resume) the K rounds and write the report; return the report's JSON summary (None on a dry run)."""
    cfg = replace(cfg, dtype=resolve_dtype(cfg.dtype, resolve_device(cfg.device)))
    check_config(cfg)
    out = Path(cfg.output)
    if cfg.dry_run:
        return _run(cfg, out)
    with output_lock(out, "clarify iterate"):  # a second iterate into the same folder is refused
        lock_config(cfg, out)
        return _run(cfg, out)


def _run(cfg: IterateConfig, out: Path) -> dict[str, Any] | None:
    runner = StageRunner(out, tag="iterate", dry_run=cfg.dry_run, in_process=cfg.in_process)
    start = time.time()

    base_eval = out / "base" / "eval"
    conf = write_yaml(out / "base" / "evaluate.yaml", evaluate_config(cfg, base_eval, "Base", model=cfg.model))
    runner.run(["evaluate", "--config", str(conf), *cfg.evaluate_args], (base_eval / "metrics.json").is_file())
    for k in range(cfg.rounds):
        folder = round_dir(out, k)
        conf = write_yaml(folder / "simulate.yaml", simulate_config(cfg, out, k))
        runner.run(
            ["simulate", "--config", str(conf), *cfg.simulate_args], (folder / "simulate" / "summary.json").is_file()
        )
        export = folder / "fit" / "export"
        if not cfg.dry_run and not export_done(export):
            check_round_signal(out, k)
        runner.run(fit_args(cfg, out, k), export_done(export))
        conf = write_yaml(
            folder / "evaluate.yaml", evaluate_config(cfg, folder / "eval", round_label(k), export_dir=str(export))
        )
        runner.run(
            ["evaluate", "--config", str(conf), *cfg.evaluate_args], (folder / "eval" / "metrics.json").is_file()
        )
    if cfg.dry_run:
        return None
    summary = write_report(out, cfg.rounds)
    print(
        f"\n[iterate] {cfg.rounds} rounds finished in {(time.time() - start) / 60:.1f} min; report: "
        f"{out / (REPORT_NAME + '.md')}",
        flush=True,
    )
    return summary


# ---------------------------------------------------------------------------------------------------------------
# the report


def _data_metrics(path: Path) -> dict[str, float] | None:
    """Reward/accuracy of a round's simulated conversations (train questions, sampling temperatures)."""
    if not path.is_file():
        return None
    records, _ = load_records(path)
    return compute_metrics(records)


def collect_rows(out: Path, rounds: int) -> list[dict[str, Any]]:
    """One row per policy: Base, round 0, …, round K−1 — its held-out evaluation and the conversations it logged
    (Base logged round 0's data, round k's policy logged round k+1's), with the paired change from the row before."""
    rows: list[dict[str, Any]] = []
    sources = [("Base", out / "base" / "eval", None)] + [
        (round_label(k), round_dir(out, k) / "eval", round_dir(out, k) / "fit" / "export") for k in range(rounds)
    ]
    previous_rollouts = None
    for i, (label, eval_dir, policy) in enumerate(sources):
        metrics_file = eval_dir / "metrics.json"
        if not metrics_file.is_file():
            break
        mf = read_metrics_file(metrics_file, label)
        data_file = round_dir(out, i) / "simulate" / "conversations.jsonl"  # row i's policy logged round i
        rollouts_path = mf.rollouts_path()
        rollouts = load_records(rollouts_path)[0] if rollouts_path else None
        paired = None
        if rollouts is not None and previous_rollouts is not None:
            try:
                paired = {k: v.as_dict() for k, v in paired_comparison(rollouts, previous_rollouts).items()}
            except ValueError:
                paired = None
        rows.append(
            {
                "label": label,
                "policy": str(policy) if policy else None,
                "metrics_file": str(metrics_file),
                "eval": mf.metrics,
                "data_file": str(data_file) if data_file.is_file() else None,
                "data": _data_metrics(data_file),
                "paired_vs_previous": paired,
            }
        )
        previous_rollouts = rollouts
    return rows


def by_round_table(rows: list[dict[str, Any]]) -> str:
    adaptive = any("clarifying_turns" in r["eval"] for r in rows)
    header = [
        "Policy",
        "n",
        "Accuracy",
        "Reward",
        *(["Clarifying turns"] if adaptive else []),
        "Δ accuracy vs previous (sign p; Holm p)",
        "Logged data: reward",
        "Logged data: accuracy",
    ]
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    # Holm over the table's round-on-round comparisons (issue 25: several tests, one family)
    tested = [k for k, r in enumerate(rows) if r["paired_vs_previous"] is not None]
    holm = dict(
        zip(tested, holm_adjust([rows[k]["paired_vs_previous"]["accuracy"]["p_sign"] for k in tested]), strict=True)
    )
    for k, r in enumerate(rows):
        m, d, p = r["eval"], r["data"] or {}, r["paired_vs_previous"]
        delta = (
            "–"
            if p is None
            else (
                f"{format_mean_se(p['accuracy']['diff'], p['accuracy']['se'])} "
                f"({p['accuracy']['p_sign']:.3g}; {holm[k]:.3g})"
            )
        )
        cells = [
            r["label"],
            f"{m.get('n', math.nan):.0f}",
            format_mean_se(m.get("accuracy"), m.get("accuracy_se")),
            format_mean_se(m.get("reward"), m.get("reward_se")),
        ]
        if adaptive:
            cells.append(format_mean_se(m.get("clarifying_turns"), m.get("clarifying_turns_se"), 2))
        cells += [
            delta,
            format_mean_se(d.get("reward"), d.get("reward_se")),
            format_mean_se(d.get("accuracy"), d.get("accuracy_se")),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot_rounds(rows: list[dict[str, Any]], path: Path) -> Path:
    """Held-out accuracy and reward by round (mean ± SE), with the reward of the data each policy logged."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    def series(key: str, source: str) -> tuple[list[float], list[float]]:
        vals, errs = [], []
        for r in rows:
            m = r[source] or {}
            v, e = m.get(key), m.get(f"{key}_se")
            vals.append(math.nan if v is None else v)
            errs.append(0.0 if e is None or math.isnan(e) else e)
        return vals, errs

    panels = [("accuracy", "Accuracy (held-out)"), ("reward", "Reward")]
    if any("clarifying_turns" in r["eval"] for r in rows):
        panels.append(("clarifying_turns", "Clarifying turns (held-out)"))
    fig, axes = plt.subplots(1, len(panels), figsize=(3.6 * len(panels) + 1, 3.6), squeeze=False)
    xs = list(range(len(rows)))
    labels = [r["label"] for r in rows]
    for ax, (key, title) in zip(axes[0], panels, strict=True):
        ys, es = series(key, "eval")
        ax.errorbar(xs, ys, yerr=es, fmt="o-", capsize=4, color="tab:blue", label="held-out (eval)")
        if key == "reward":
            ys, es = series(key, "data")
            ax.errorbar(
                [x + 0.05 for x in xs],
                ys,
                yerr=es,
                fmt="s--",
                capsize=4,
                color="tab:orange",
                label="logged data (train)",
            )
            ax.legend(fontsize=7)
        ax.set_xticks(xs, labels, rotation=30, ha="right")
        ax.set_title(title)
        ax.grid(axis="y", alpha=0.3)
    fig.suptitle("clarify iterate: by round (mean ± SE)")
    fig.tight_layout()
    with atomic_write(path, "wb") as f:
        fig.savefig(f, dpi=120, format=path.suffix.lstrip(".") or None)
    plt.close(fig)
    return path


def write_report(out: Path, rounds: int) -> dict[str, Any]:
    """``report.md`` (by-round table + every metric per policy), ``report.json`` and ``report.png``."""
    rows = collect_rows(out, rounds)
    if not rows:
        raise FileNotFoundError(f"{out}: no evaluated policy to report (base/eval/metrics.json missing)")
    files = [read_metrics_file(r["metrics_file"], r["label"]) for r in rows]
    methods = aggregate(files)
    caption = constant_caption([x for s in methods for x in (method_rollouts(s) or [])])
    text = "\n".join(
        [
            f"# clarify iterate: {len(rows) - 1} of {rounds} rounds evaluated",
            "",
            "## Reward and accuracy by round",
            "",
            "Each row is a policy: Base, then the policy fitted in round k. Accuracy, reward (and clarifying turns) "
            "are "
            "its held-out evaluation; Δ accuracy is paired per question against the row above (exact sign test); "
            "*logged data* is the conversations this policy produced as the next round's logging policy (train "
            "questions, sampling temperatures; – for the last policy).",
            "",
            *([caption, ""] if caption else []),
            by_round_table(rows),
            "",
            "## Every metric (mean ± SE; best in bold)",
            "",
            *([caption, ""] if caption else []),
            results_table(methods, table_columns(methods)),
            "",
        ]
    )
    letters = letters_table(methods)
    if letters:  # a round that only collapsed onto one letter scores that letter's base rate (docs/evaluation.md)
        text += "\n".join(
            [
                "",
                "## Final-answer letters (share of conversations; last row: a constant answer's accuracy)",
                "",
                caption,
                "",
                letters,
                "",
            ]
        )
    mixed = mixed_environments(files)  # e.g. a run resumed on a CPU of another kind
    if mixed:
        print(f"clarify iterate: warning: {mixed}", file=sys.stderr)
    text += "\n".join(["", *environment_footer(files, mixed), ""])
    atomic_write_text(out / f"{REPORT_NAME}.md", text)
    plot_rounds(rows, out / f"{REPORT_NAME}.png")
    summary = {"rounds": rounds, "rows": rows}
    atomic_write_text(out / f"{REPORT_NAME}.json", json.dumps(nan_to_none(summary), indent=1) + "\n")
    print(text)
    return summary


def main(argv: list[str] | None = None) -> None:
    """Entry point of ``clarify iterate``."""
    logging.basicConfig(level=logging.INFO, format="[%(name)s] %(message)s")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    cfg = parse_config(argv)
    try:
        run(cfg)
    except KeyboardInterrupt:
        print(
            f"clarify iterate: interrupted (Ctrl-C); the finished stages are kept in {cfg.output}; run the same "
            "command again to go on (finished stages are skipped, an interrupted simulation or fit resumes)",
            file=sys.stderr,
        )
        raise SystemExit(130) from None
    except StageFailed as e:
        print(f"clarify iterate: error: {e}", file=sys.stderr)
        raise SystemExit(1) from None


if __name__ == "__main__":
    main()
