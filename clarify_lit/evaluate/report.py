"""``clarify report``: the paper-style results table from several ``metrics.json`` files.

    clarify report runs/base/eval runs/refit-s*/eval 'Swift=runs/swift/eval/metrics.json' --out results/report.md

Each input is a ``metrics.json`` file (written by ``clarify evaluate`` or by the ``RolloutEvaluation`` callback as
``rollouts/step_XXXXXX.metrics.json``), a folder holding one (searched recursively when not directly inside), or a
glob; ``LABEL=PATH`` overrides the method label stored in the file. Several files with the same label are seeds of
one method and are aggregated: the mean over seeds, with the combined standard error ``sqrt(sum_i SE_i^2) / k`` (the
sampling error of the mean of k independent estimates; the spread between seeds is reported separately as
``<metric>_seed_sd`` in the JSON output). Outputs: a Markdown table (stdout and ``--out``), a PNG plot with error
bars, a JSON file with the aggregated numbers and, when rollouts are available, a second table of paired
per-question comparisons (accuracy and reward differences with paired SE and an exact sign test). ``--html PATH``
also writes one self-contained audit page: the tables, the plot and every conversation side by side per question
(:mod:`clarify_lit.evaluate.audit_html`).
"""

from __future__ import annotations

import glob
import hashlib
import json
import math
import os
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from clarify_lit.arguments import CommandLine
from clarify_lit.data.records import ConversationRecord, load_records
from clarify_lit.environment import describe_stamp, stamp_key
from clarify_lit.evaluate.audit_html import write_audit_html
from clarify_lit.evaluate.metrics import (
    HIGHER_IS_BETTER,
    PairedDiff,
    QuestionMismatchError,
    final_answer,
    holm_adjust,
    is_open,
    nan_to_none,
    paired_comparison,
)
from clarify_lit.evaluate.summary import MethodSummary, MetricsFile
from clarify_lit.io import atomic_write, atomic_write_text
from clarify_lit.simulate.open_answer import grade_open_answer

METRICS_FILE = "metrics.json"

# Table columns in paper order: metric key -> (header, decimals, scale). Columns nobody measured are dropped.
COLUMNS: dict[str, tuple[str, int]] = {
    "accuracy": ("Accuracy", 3),
    "format_rate": ("Format", 3),
    "hedge_rate": ("Hedged", 3),
    "conflict_rate": ("Conflict", 3),
    "truncated_rate": ("Cut turns", 3),
    "thinking_pct": ("Thinking %", 1),
    "reward": ("Reward", 3),
    "single_question_rate": ("One question, one option", 3),  # open mode: "One question" (_column_label)
    "accuracy_when_asked": ("Acc. if asked", 3),  # accuracy of the conversations whose turn 1 asked one question
    "accuracy_when_not_asked": ("Acc. if not", 3),
    "names_none_rate": ("Names none", 3),  # open mode: final answers naming no option
    "clarifying_turns": ("Clarifying turns", 2),  # adaptive length only
    "ended_early_rate": ("Ended early", 3),
    "tokens_per_turn": ("Tokens/turn", 1),
    "teacher_leak_rate": ("Teacher leaks", 3),  # the teacher named the gold option as the answer (simulate/leaks.py)
    "echoed_instructions_rate": ("Echoed instructions", 3),  # a reply repeated its instruction block
    "judge_overall": ("Overall", 2),
    "judge_accuracy": ("Accuracy (judge)", 2),
    "judge_reasoning": ("Reasoning", 2),
    "judge_comprehensiveness": ("Comprehensiveness", 2),
    "judge_pedagogical_value": ("Pedagogical value", 2),
    "judge_confidence": ("Confidence", 2),
}
#: columns of per-record flags, shown only when some method has a flagged conversation (a column of zeros is noise)
FLAG_COLUMNS = frozenset({"teacher_leak_rate", "echoed_instructions_rate"})
PLOT_METRICS = ("accuracy", "reward", "thinking_pct", "clarifying_turns", "judge_overall")


# ---------------------------------------------------------------------------------------------------------------
# Reading
# ---------------------------------------------------------------------------------------------------------------
def read_metrics_file(path: str | os.PathLike, label: str | None = None) -> MetricsFile:
    """Load one ``metrics.json`` (``{"metrics": {...}, "meta": {...}}``); errors name the file and the field."""
    p = Path(path)
    try:
        data = json.loads(p.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise ValueError(f"{p}: not valid JSON ({e.msg}, line {e.lineno})") from None
    if not isinstance(data, dict) or not isinstance(data.get("metrics"), dict):
        raise ValueError(f"{p}: field 'metrics': missing or not an object (expected the output of clarify evaluate)")
    meta = data.get("meta") or {}
    if not isinstance(meta, dict):
        raise ValueError(f"{p}: field 'meta': must be an object")
    metrics: dict[str, float] = {}
    for k, v in data["metrics"].items():
        if v is None:
            metrics[k] = math.nan
        elif isinstance(v, int | float) and not isinstance(v, bool):
            metrics[k] = float(v)
        else:
            raise ValueError(f"{p}: field 'metrics.{k}': must be a number, got {v!r}")
    name = label or meta.get("method") or p.parent.name
    return MetricsFile(path=p, label=str(name), metrics=metrics, meta=meta)


def expand_inputs(inputs: Sequence[str]) -> list[tuple[str | None, Path]]:
    """Resolve ``[LABEL=]PATH`` inputs (files, folders, globs) to ``(label, metrics.json path)`` pairs."""
    found: list[tuple[str | None, Path]] = []
    for item in inputs:
        label, _, spec = item.partition("=") if "=" in item and not os.path.exists(item) else (None, "", item)
        label = label or None
        matches = sorted(glob.glob(spec, recursive=True)) if glob.has_magic(spec) else [spec]
        if not matches:
            raise FileNotFoundError(f"report input {item!r}: the glob matched nothing")
        for m in matches:
            p = Path(m)
            if p.is_dir():
                direct = p / METRICS_FILE
                files = [direct] if direct.is_file() else sorted(p.rglob(METRICS_FILE))
                if not files:
                    raise FileNotFoundError(f"report input {item!r}: no {METRICS_FILE} in folder {p}")
                found.extend((label, f) for f in files)
            elif p.is_file():
                found.append((label, p))
            else:
                raise FileNotFoundError(f"report input {item!r}: {p} does not exist")
    return found


def _file_hash(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def refuse_duplicate_inputs(files: Sequence[MetricsFile]) -> None:
    """Refuse an evaluation given more than once — the same file twice (a repeated argument, a glob matching a
    folder twice, two labels on one path) or a copy of it (the same rollouts, by content hash; the metrics file's
    own bytes where there are no rollouts): each copy would count as another seed, shrinking the SE by √copies."""
    by_path: dict[str, list[MetricsFile]] = {}
    for f in files:
        by_path.setdefault(os.path.realpath(f.path), []).append(f)
    repeated = [group for group in by_path.values() if len(group) > 1]
    if repeated:
        named = "; ".join(f"{group[0].path} given {len(group)} times" for group in repeated[:3])
        raise ValueError(
            f"report inputs repeat an evaluation ({named}{'; …' if len(repeated) > 3 else ''}): a "
            "repeated input is not another seed; give each evaluation once"
        )
    by_content: dict[str, list[MetricsFile]] = {}
    for f in files:
        rollouts = f.rollouts_path()
        key = "rollouts " + _file_hash(rollouts) if rollouts is not None else "metrics " + _file_hash(f.path)
        by_content.setdefault(key, []).append(f)
    copies = [(key, group) for key, group in by_content.items() if len(group) > 1]
    if copies:
        named = "; ".join(
            " and ".join(str(f.path) for f in group) + f" hold the same {key.split()[0]} (sha256 {key.split()[1][:12]})"
            for key, group in copies[:3]
        )
        raise ValueError(
            f"report inputs repeat an evaluation ({named}{'; …' if len(copies) > 3 else ''}): a copy "
            "is not another seed; give each evaluation once"
        )


# ---------------------------------------------------------------------------------------------------------------
# Aggregation over seeds
# ---------------------------------------------------------------------------------------------------------------
def _finite(x: float | None) -> bool:
    return x is not None and not math.isnan(x)


def aggregate(files: Sequence[MetricsFile]) -> list[MethodSummary]:
    """Group files by label (first-seen order) and average every metric over the group's seeds.

    For a metric ``m`` measured in k files: mean ``(1/k) sum m_i``; SE ``sqrt(sum SE_i^2) / k`` where ``SE_i`` is
    ``m_se`` of file i (if any file lacks ``m_se`` the SE is NaN); seed sd = sample std of the ``m_i`` (k > 1).
    Counts (``n``, ``n_assistant_turns``, ``*_n``, ``*_missing``) are summed instead.
    """
    groups: dict[str, list[MetricsFile]] = {}
    for f in files:
        groups.setdefault(f.label, []).append(f)
    out = []
    for label, group in groups.items():
        s = MethodSummary(label=label, files=group)
        keys = [k for k in dict.fromkeys(k for f in group for k in f.metrics) if not k.endswith("_se")]
        for key in keys:
            vals = [f.metrics[key] for f in group if _finite(f.metrics.get(key))]
            if not vals:
                continue
            if key == "n" or key.startswith("n_") or key.endswith(("_n", "_missing")):
                s.mean[key] = float(sum(vals))
                continue
            k = len(vals)
            s.mean[key] = sum(vals) / k
            ses = [f.metrics.get(f"{key}_se") for f in group if _finite(f.metrics.get(key))]
            if all(_finite(x) for x in ses):
                s.se[key] = math.sqrt(sum(x * x for x in ses)) / k  # type: ignore[operator]
            elif any(f"{key}_se" in f.metrics for f in group):
                s.se[key] = math.nan
            if k > 1:
                m = s.mean[key]
                s.seed_sd[key] = math.sqrt(sum((v - m) ** 2 for v in vals) / (k - 1))
        out.append(s)
    return out


# ---------------------------------------------------------------------------------------------------------------
# Tables
# ---------------------------------------------------------------------------------------------------------------
def table_columns(methods: Sequence[MethodSummary], wanted: Sequence[str] | None = None) -> list[str]:
    """The metric columns to show: ``wanted`` (validated), else every :data:`COLUMNS` entry someone measured."""
    if wanted:
        unknown = [m for m in wanted if not any(m in s.mean for s in methods)]
        if unknown:
            have = sorted({k for s in methods for k in s.mean})
            raise ValueError(f"--metrics {unknown} not found in any metrics.json (available: {have})")
        return list(wanted)
    return [
        c
        for c in COLUMNS
        if any(c in s.mean for s in methods) and (c not in FLAG_COLUMNS or any(s.mean.get(c) for s in methods))
    ]


def format_mean_se(value: float | None, se: float | None = None, decimals: int = 3) -> str:
    """``mean ± SE`` at ``decimals`` places: ``–`` for a missing mean, ``?`` for a missing SE, no ``±`` without one."""
    if not _finite(value):
        return "–"
    text = f"{value:.{decimals}f}"
    if se is not None:
        text += " ± " + (f"{se:.{decimals}f}" if _finite(se) else "?")
    return text


def _column_label(column: str, methods: Sequence[MethodSummary]) -> str:
    """A column's header; in an open-mode table the one-question rate counts any one question (there are no options
    to ask about), and its header says so."""
    if (
        column == "single_question_rate"
        and methods
        and all(f.meta.get("mode") == "open" for s in methods for f in s.files)
    ):
        return "One question"
    return COLUMNS.get(column, (column, 3))[0]


def results_table(methods: Sequence[MethodSummary], columns: Sequence[str]) -> str:
    """Markdown table: one row per method, ``mean ± SE`` per metric, the best value of a higher-is-better column in
    bold (ties at the displayed precision are all bold)."""
    header = ["Method", "seeds", "n", *(_column_label(c, methods) for c in columns)]
    best: dict[str, str] = {}
    for c in columns:
        dec = COLUMNS.get(c, (c, 3))[1]
        vals = [s.mean[c] for s in methods if _finite(s.mean.get(c))]
        if c in HIGHER_IS_BETTER and len(vals) > 1:
            best[c] = f"{max(vals):.{dec}f}"
    rows = []
    for s in methods:
        cells = [s.label, str(s.k), f"{s.mean['n']:.0f}" if _finite(s.mean.get("n")) else "–"]
        for c in columns:
            dec = COLUMNS.get(c, (c, 3))[1]
            v = s.mean.get(c, math.nan)
            cell = format_mean_se(v, s.se.get(c) if c in s.se else None, dec)
            if c in best and _finite(v) and f"{v:.{dec}f}" == best[c]:
                cell = f"**{cell}**"
            cells.append(cell)
        rows.append(cells)
    return _markdown(header, rows)


def _markdown(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


def choose_pairs(labels: Sequence[str], pairs: Sequence[str] | None, baseline: str | None) -> list[tuple[str, str]]:
    """Which (A, B) comparisons to make: explicit ``A:B`` pairs; else all vs ``baseline`` (default ``Base`` when
    present); else the only two methods; else none."""
    if pairs:
        out = []
        for p in pairs:
            a, sep, b = p.partition(":")
            if not sep or a not in labels or b not in labels:
                raise ValueError(f"--pairs {p!r}: expected A:B with method labels among {list(labels)}")
            out.append((a, b))
        return out
    if baseline is None and "Base" in labels:
        baseline = "Base"
    if baseline is not None:
        if baseline not in labels:
            raise ValueError(f"--baseline {baseline!r} is not among the methods {list(labels)}")
        return [(m, baseline) for m in labels if m != baseline]
    return [(labels[0], labels[1])] if len(labels) == 2 else []


def method_rollouts(s: MethodSummary) -> list[ConversationRecord] | None:
    """All rollouts of a method's seeds, or ``None`` when some seed has no rollouts file next to its metrics."""
    records: list[ConversationRecord] = []
    for f in s.files:
        path = f.rollouts_path()
        if path is None:
            return None
        # seeds may share record ids (same question, same run) — load each file separately, ids are per file
        recs, _ = load_records(path)
        records.extend(recs)
    return records


LETTERS = "ABCD"


def letter_shares(records: Sequence[ConversationRecord]) -> dict[str, float]:
    """Share of conversations whose final answer commits to each letter (``none``: no single letter), parsed as the
    accuracy is (:func:`~clarify_lit.evaluate.metrics.final_answer`)."""
    counts = dict.fromkeys([*LETTERS, "none"], 0)
    for r in records:
        letter = (final_answer(r) or "none").strip().upper()
        counts[letter if letter in counts else "none"] += 1
    n = max(len(records), 1)
    return {k: v / n for k, v in counts.items()}


def constant_answer_accuracy(records: Sequence[ConversationRecord]) -> dict[str, float]:
    """Accuracy of always answering one letter on these records' questions (each question once)."""
    gold = {r.task_id: (r.gold or "").strip().upper() for r in records}
    n = max(len(gold), 1)
    return {x: sum(g == x for g in gold.values()) / n for x in LETTERS}


def best_constant_answer(records: Sequence[ConversationRecord]) -> tuple[str, float]:
    """The constant reply with the highest accuracy on these records' questions (each question once): the most
    frequent gold letter, and its share. Ties go to the earlier letter. Example: gold letters A, B, B, C give
    ``("B", 0.5)`` (always answering B is right on 2 of 4 questions; tests/test_evaluate_report.py)."""
    const = constant_answer_accuracy(records)
    best = max(LETTERS, key=lambda x: const[x])
    return best, const[best]


def best_constant_open_answer(records: Sequence[ConversationRecord]) -> tuple[str, float]:
    """Open mode's best constant reply: the answer text that, given to every question ("The answer is <text>."),
    is graded correct on the most of these records' questions (each question once), and that share. Only a gold
    option's text can score, so the candidates are the gold texts. Example: golds "oxygen", "oxygen", "iron" over
    questions whose other options never name oxygen give ``("oxygen", 2/3)``."""
    questions = {r.task_id: r for r in records}
    candidates = sorted({r.meta["choices"][LETTERS.index(r.gold)] for r in questions.values()})
    scored = [
        (
            sum(
                grade_open_answer(f"The answer is {text}.", r.meta["choices"]).letter == r.gold
                for r in questions.values()
            )
            / len(questions),
            text,
        )
        for text in candidates
    ]
    acc, text = max(scored, key=lambda x: (x[0], [-ord(ch) for ch in x[1]]))
    return text, acc


def constant_caption(records: Sequence[ConversationRecord] | None) -> str:
    """The caption line every table carries (issue 25): what the best constant answer scores on its questions, the
    accuracy a policy must beat before it has learned anything. Empty without records."""
    if not records:
        return ""
    if all(is_open(r) for r in records):
        text, acc = best_constant_open_answer(records)
        return (
            f'Best constant answer: always "The answer is {text}." scores accuracy {acc:.3f} on these '
            f"{len({r.task_id for r in records})} questions (open mode: the most often correct answer text)."
        )
    letter, acc = best_constant_answer(records)
    n = len({r.task_id for r in records})
    return (
        f'Best constant answer: always "The answer is {letter}." scores accuracy {acc:.3f} on these {n} '
        "questions (from their gold letters)."
    )


def letters_table(
    methods: Sequence[MethodSummary], rollouts: Mapping[str, list[ConversationRecord] | None] | None = None
) -> str:
    """Markdown: each method's spread of final-answer letters (all seeds), then the accuracy of always answering one
    letter. A policy that collapses onto one letter scores that letter's base rate, so an accuracy gain is only a
    gain where it beats the best constant answer (issue "Honest numbers": test metrics against a constant answer).
    ``rollouts``: each method's records by label, when the caller has loaded them already (else read here)."""
    header = ["Method", *LETTERS, "none", "top letter"]
    rows, golds = [], []
    for s in methods:
        recs = rollouts[s.label] if rollouts is not None else method_rollouts(s)
        if not recs:
            continue
        golds.extend(recs)
        sh = letter_shares(recs)
        top = max(LETTERS, key=lambda x: sh[x])
        rows.append(
            [s.label, *(f"{sh[x]:.2f}" for x in [*LETTERS, "none"]), f"{top} ({sh[top]:.2f})" if sh[top] else "–"]
        )
    if not rows or all(is_open(r) for r in golds):
        return ""  # (open mode: no letters were answered; the caption gives the best constant answer text)
    const = constant_answer_accuracy(golds)
    best = max(LETTERS, key=lambda x: const[x])
    rows.append(
        ["*accuracy of always answering X*", *(f"{const[x]:.2f}" for x in LETTERS), "", f"{best} ({const[best]:.2f})"]
    )
    return _markdown(header, rows)


def paired_table(results: Sequence[tuple[str, str, dict[str, PairedDiff]]]) -> str:
    """Markdown table of paired comparisons: Δ = A − B per shared question, paired SE, wins/losses/ties, sign p and
    Holm's adjusted p over this table's comparisons (one family per column: accuracy, reward)."""
    header = [
        "A vs B",
        "questions",
        "Δ accuracy ± SE",
        "acc. W/L/T",
        "sign p (acc.)",
        "Holm p (acc.)",
        "Δ reward ± SE",
        "reward W/L/T",
        "sign p (reward)",
        "Holm p (reward)",
    ]
    holm_acc = holm_adjust([res["accuracy"].p_sign for _, _, res in results])
    holm_rew = holm_adjust([res["reward"].p_sign for _, _, res in results])
    rows = []
    for (a, b, res), h_acc, h_rew in zip(results, holm_acc, holm_rew, strict=True):
        acc, rew = res["accuracy"], res["reward"]
        rows.append(
            [
                f"{a} vs {b}",
                str(acc.n),
                format_mean_se(acc.diff, acc.se, 3),
                f"{acc.wins}/{acc.losses}/{acc.ties}",
                f"{acc.p_sign:.3g}",
                f"{h_acc:.3g}",
                format_mean_se(rew.diff, rew.se, 3),
                f"{rew.wins}/{rew.losses}/{rew.ties}",
                f"{rew.p_sign:.3g}",
                f"{h_rew:.3g}",
            ]
        )
    return _markdown(header, rows)


# ---------------------------------------------------------------------------------------------------------------
# Plot
# ---------------------------------------------------------------------------------------------------------------
def plot_methods(methods: Sequence[MethodSummary], columns: Sequence[str], path: str | os.PathLike) -> Path:
    """One panel per metric (accuracy, reward, Thinking %, judge Overall when measured): mean with SE error bars."""
    import matplotlib

    matplotlib.use("Agg")  # headless: never needs a display
    import matplotlib.pyplot as plt

    shown = [c for c in PLOT_METRICS if c in columns] or list(columns[:4])
    fig, axes = plt.subplots(1, len(shown), figsize=(3.2 * len(shown) + 1, 3.6), squeeze=False)
    labels = [s.label for s in methods]
    for ax, c in zip(axes[0], shown, strict=True):
        ys = [s.mean.get(c, math.nan) for s in methods]
        es = [s.se.get(c, 0.0) if _finite(s.se.get(c)) else 0.0 for s in methods]
        xs = list(range(len(methods)))
        ax.errorbar(xs, ys, yerr=es, fmt="o", capsize=4, color="tab:blue")
        ax.set_xticks(xs, labels, rotation=30, ha="right")
        ax.set_title(COLUMNS.get(c, (c, 3))[0])
        ax.grid(axis="y", alpha=0.3)
        ax.set_xlim(-0.5, len(methods) - 0.5)
    fig.suptitle("mean ± SE")
    fig.tight_layout()
    out = Path(path)
    with atomic_write(out, "wb") as f:
        fig.savefig(f, dpi=120, format=out.suffix.lstrip(".") or None)
    plt.close(fig)
    return out


# ---------------------------------------------------------------------------------------------------------------
# Command
# ---------------------------------------------------------------------------------------------------------------
@dataclass
class ReportConfig:
    """The paper-style results table from several metrics.json files (see docs/evaluation.md)."""

    inputs: list[str] = field(default_factory=list)
    """metrics.json files, folders or globs; LABEL=PATH sets the label (positional)."""
    out: str = "report.md"
    """Markdown output (the PNG and JSON go next to it)."""
    plot: str | None = None
    """PNG path (default: --out with .png)."""
    metrics: list[str] | None = None
    """Metric columns (default: all measured)."""
    baseline: str | None = None
    """Compare every method against this one (default: Base)."""
    pairs: list[str] | None = None
    """Explicit paired comparisons A:B."""
    paired: bool = True
    """The paired per-question table (false: skip it)."""
    rename: list[str] | None = None
    """Show method OLD as NEW, as OLD=NEW (e.g. SFT=STaR-GATE: the paper's name for the SFT-on-best row)."""
    order: list[str] | None = None
    """Row order (labels after --rename); methods not named follow in first-seen order."""
    html: str | None = None
    """Also write a self-contained HTML audit page here (tables, plot, conversations side by side)."""


def negated_paired(argv: list[str] | None) -> list[str]:
    """``argv`` with the deprecated ``--no_paired true|false`` (and the older ``--no-paired`` switch) spelled as
    ``--paired false|true``, each use reported in one line."""
    out: list[str] = []
    args = list(sys.argv[1:] if argv is None else argv)
    i = 0
    while i < len(args):
        name, eq, value = args[i].partition("=")
        if name in ("--no_paired", "--no-paired"):
            if name == "--no-paired":  # a switch: no value
                value = "true"
            elif not eq:
                i += 1
                value = args[i] if i < len(args) else "true"
            flipped = {"true": "false", "false": "true"}.get(value.lower())
            if flipped is None:
                raise ValueError(f"{name} takes true or false, got {value!r}")
            print(f"clarify report: {name} is deprecated, use --paired {flipped}", file=sys.stderr)
            out += ["--paired", flipped]
        else:
            out.append(args[i])
        i += 1
    return out


COMMAND_LINE = CommandLine(
    ReportConfig,
    "clarify report",
    __doc__.split("\n\n")[0],
    "CLARIFY_REPORT",
    positional="inputs",
    spaced=("metrics", "pairs", "rename", "order"),
    rewrite=negated_paired,
)
build_parser, parse_config = COMMAND_LINE.parser, COMMAND_LINE.parse


def run(cfg: ReportConfig) -> str:
    """Write the report of ``cfg``; return its Markdown text."""
    if not cfg.inputs:
        raise ValueError("clarify report needs at least one input (metrics.json files, folders or globs)")
    return run_report(
        cfg.inputs,
        out=cfg.out,
        plot=cfg.plot,
        metrics=cfg.metrics,
        baseline=cfg.baseline,
        pairs=cfg.pairs,
        paired=cfg.paired,
        rename=cfg.rename,
        order=cfg.order,
        html=cfg.html,
    )


def run_report(
    inputs: Sequence[str],
    out: str | os.PathLike = "report.md",
    plot: str | os.PathLike | None = None,
    metrics: Sequence[str] | None = None,
    baseline: str | None = None,
    pairs: Sequence[str] | None = None,
    paired: bool = True,
    rename: Sequence[str] | None = None,
    order: Sequence[str] | None = None,
    html: str | os.PathLike | None = None,
) -> str:
    """Build the report, write ``out`` (.md), the plot (.png), a .json summary and, with ``html``, the audit page;
    return the Markdown text."""
    files = [read_metrics_file(p, label) for label, p in expand_inputs(inputs)]
    refuse_duplicate_inputs(files)
    names = parse_renames(rename)
    for f in files:
        f.label = names.get(f.label, f.label)
    methods = order_methods(aggregate(files), order)
    columns = table_columns(methods, metrics)
    # each method's rollouts read once, for the captions, the pairs and the letter table
    rollouts: dict[str, list[ConversationRecord] | None] = (
        {s.label: method_rollouts(s) for s in methods} if paired else {}
    )
    caption = constant_caption([r for recs in rollouts.values() if recs for r in recs])
    parts = [
        "## Results (mean ± SE; best in bold)",
        "",
        *([caption, ""] if caption else []),
        results_table(methods, columns),
    ]
    mixed = mixed_datasets(files)
    if mixed:
        print(f"clarify report: warning: {mixed}", file=sys.stderr)
        parts += ["", f"**Warning:** {mixed}."]
    if any(s.k > 1 for s in methods):
        parts += ["", "Methods with several seeds: mean over seeds, SE = sqrt(Σ SE_i²)/k."]
    comparisons: list[tuple[str, str, dict[str, PairedDiff]]] = []
    notes: list[str] = []
    if paired:
        for a, b in choose_pairs(list(rollouts), pairs, baseline):
            ra, rb = rollouts[a], rollouts[b]
            if ra is None or rb is None:
                notes.append(f"{a} vs {b}: skipped (no rollouts file next to a metrics.json)")
                continue
            try:
                comparisons.append((a, b, paired_comparison(ra, rb)))
            except QuestionMismatchError as e:
                raise ValueError(f"{a} vs {b}: {e}") from None
            except ValueError as e:
                notes.append(f"{a} vs {b}: skipped ({e})")
    if comparisons:
        parts += [
            "",
            "## Paired per-question comparison (Δ = A − B; exact two-sided sign test, ties dropped; Holm "
            "p adjusts for this table's comparisons)",
            "",
            caption,
            "",
            paired_table(comparisons),
        ]
    letters = letters_table(methods, rollouts) if paired else ""
    if letters:
        parts += [
            "",
            "## Final-answer letters (share of conversations; last row: a constant answer's accuracy)",
            "",
            caption,
            "",
            letters,
        ]
    if notes:
        parts += [""] + [f"- {n}" for n in notes]
    mixed_env = mixed_environments(files)
    if mixed_env:
        print(f"clarify report: warning: {mixed_env}", file=sys.stderr)
    parts += ["", *environment_footer(files, mixed_env)]
    text = "\n".join(parts) + "\n"
    out = Path(out)
    atomic_write_text(out, text)
    plot_path = plot_methods(methods, columns, plot or out.with_suffix(".png"))
    summary = {
        "methods": [
            {
                "label": s.label,
                "seeds": s.k,
                "files": [str(f.path) for f in s.files],
                "mean": s.mean,
                "se": s.se,
                "seed_sd": s.seed_sd,
            }
            for s in methods
        ],
        "paired": [
            {"a": a, "b": b, **{k: v.as_dict() for k, v in r.items()}, "holm_p_accuracy": ha, "holm_p_reward": hr}
            for (a, b, r), ha, hr in zip(
                comparisons,
                holm_adjust([r["accuracy"].p_sign for _, _, r in comparisons]),
                holm_adjust([r["reward"].p_sign for _, _, r in comparisons]),
                strict=True,
            )
        ],
        "best_constant_answer": caption or None,
    }
    atomic_write_text(out.with_suffix(".json"), json.dumps(nan_to_none(summary), indent=2))
    if html:
        write_audit_html(html, methods, text, plot_path, title=f"Evaluation audit: {out.stem}")
    return text


def mixed_datasets(files: Sequence[MetricsFile]) -> str | None:
    """A warning when the table's rows were evaluated on different datasets (``meta.dataset``), else None."""
    by_dataset: dict[str, list[str]] = {}
    for f in files:
        name = f.meta.get("dataset")
        if isinstance(name, str):
            by_dataset.setdefault(name, [])
            if f.label not in by_dataset[name]:
                by_dataset[name].append(f.label)
    if len(by_dataset) < 2:
        return None
    parts = "; ".join(f"{d}: {', '.join(labels)}" for d, labels in by_dataset.items())
    return f"the table mixes datasets ({parts}); its rows are not comparable"


def _stamp(f: MetricsFile) -> dict[str, Any] | None:
    stamp = f.meta.get("environment")
    return stamp if isinstance(stamp, dict) else None


def mixed_environments(files: Sequence[MetricsFile]) -> str | None:
    """A warning naming the methods when the table's rows were made on different environment stamps (CPU kind and
    its bf16 flags, device, dtype, torch thread count or library versions: :func:`clarify_lit.environment.stamp_key`),
    else None. Files without a stamp (written before stamps existed) are left out: nothing to compare them by."""
    groups: dict[tuple, tuple[list[str], dict[str, Any]]] = {}
    for f in files:
        stamp = _stamp(f)
        key = stamp_key(stamp)
        if key is None or stamp is None:
            continue
        labels, _ = groups.setdefault(key, ([], stamp))
        if f.label not in labels:
            labels.append(f.label)
    if len(groups) < 2:
        return None
    parts = "; ".join(f"{', '.join(labels)} on {describe_stamp(stamp)}" for labels, stamp in groups.values())
    return (
        "the table's methods were made on different machines, dtypes, thread counts or library versions "
        f"({parts}); greedy text differs across them, so paired comparisons mix machine noise into the result"
    )


def environment_footer(files: Sequence[MetricsFile], mixed: str | None) -> list[str]:
    """The report's last section: which environment made each method's numbers (one line when all share one)."""
    described: dict[str, list[str]] = {}
    for f in files:
        text = describe_stamp(_stamp(f))
        if text not in described.setdefault(f.label, []):
            described[f.label].append(text)
    texts = {t for ts in described.values() for t in ts}
    lines = ["## Environment", ""]
    if len(texts) == 1:
        lines.append(f"All methods: {texts.pop()}.")
    else:
        lines += [f"- {label}: {' | '.join(ts)}" for label, ts in described.items()]
    if mixed:
        lines += ["", f"**Warning:** {mixed}."]
    return lines


def parse_renames(rename: Sequence[str] | None) -> dict[str, str]:
    """``["SFT=STaR-GATE"]`` → ``{"SFT": "STaR-GATE"}``; a malformed item is a clear error."""
    names: dict[str, str] = {}
    for item in rename or []:
        old, sep, new = item.partition("=")
        if not sep or not old or not new:
            raise ValueError(f"--rename {item!r}: expected OLD=NEW")
        names[old] = new
    return names


def order_methods(methods: Sequence[MethodSummary], order: Sequence[str] | None) -> list[MethodSummary]:
    """Rows in ``order`` first (names not measured are an error: a typo would silently reorder), the rest after in
    their first-seen order."""
    if not order:
        return list(methods)
    by_label = {s.label: s for s in methods}
    unknown = [o for o in order if o not in by_label]
    if unknown:
        raise ValueError(f"--order {unknown}: not among the methods {list(by_label)}")
    return [by_label[o] for o in dict.fromkeys(order)] + [s for s in methods if s.label not in order]


def main(argv: list[str] | None = None) -> None:
    """Entry point of ``clarify report``."""
    print(run(parse_config(argv)))


if __name__ == "__main__":
    main()
