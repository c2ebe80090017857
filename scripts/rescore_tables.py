"""Regenerate the committed tables from the committed rollouts under the current parser and reward code (issue 25).

No generation: each evaluated rollout file (``<table>-rollouts/seed<k>-<Label>.jsonl.gz``) is re-scored with
``clarify rescore`` (its table's reward and data options), its metrics are recomputed with the current parser
(``compute_metrics``, tokens counted with the policy's tokenizer), and the table is rebuilt with ``clarify report``
(``run_report``) with the rows, baseline and display names of the committed table; iterate reports are rebuilt with
``clarify iterate``'s ``write_report`` from the same layout. Work files go to ``runs/rescore-tables/<table>``.

Usage: python scripts/rescore_tables.py [TABLE ...]    (default: every table below, in order; --list names them)
       python scripts/rescore_tables.py --moved OLD      (cells that moved by > 0.01 against the tables under OLD,
                                                          e.g. git archive 36ba693 results | tar -x -C OLD)
"""

from __future__ import annotations

import json
import shutil
import sys
from dataclasses import dataclass, field
from pathlib import Path

from clarify_lit.data.records import load_records
from clarify_lit.evaluate.metrics import compute_metrics, nan_to_none
from clarify_lit.evaluate.report import run_report
from clarify_lit.jobs.iterate import round_dir, write_report
from clarify_lit.models import load_tokenizer
from clarify_lit.simulate.options import DataOptions, RewardOptions
from clarify_lit.simulate.rescore import RescoreConfig, run

MODEL = "embedded:smollm2-135m-instruct"
WORK = Path("runs/rescore-tables")
CORRECT = RewardOptions(kind="correct")
RUBRIC = RewardOptions(kind="rubric")


@dataclass
class Table:
    """One committed table: its rollouts, its Markdown file, the data options and reward it was measured with."""

    rollouts: str
    out: str
    n_train: int = 32
    n_test: int = 100
    reward: RewardOptions = field(default_factory=lambda: CORRECT)
    baseline: str = "Base"
    renames: tuple[str, ...] = ("SFT=STaR-GATE",)


TABLES = {
    "reproduce-reasoning": Table("results/sciq-reasoning-standard-rollouts", "results/sciq-reasoning-standard.md"),
    "reproduce-clarifying": Table("results/sciq-clarifying-thinking-rollouts", "results/sciq-clarifying-thinking.md"),
    "demo": Table(
        "results/demo/sciq-reasoning-standard-rollouts",
        "results/demo/sciq-reasoning-standard.md",
        n_train=16,
        n_test=16,
        renames=(),
    ),
    "clarify-correct": Table(
        "results/clarify/sciq-clarifying-thinking-correct-rollouts",
        "results/clarify/sciq-clarifying-thinking-correct.md",
    ),
    "clarify-rubric-v2": Table(
        "results/clarify/rubric-v2/sciq-clarifying-thinking-rubric-rollouts",
        "results/clarify/rubric-v2/sciq-clarifying-thinking-rubric.md",
        reward=RUBRIC,
    ),
    "clarify-rubric-v2-vs-DPO": Table(
        "results/clarify/rubric-v2/sciq-clarifying-thinking-rubric-rollouts",
        "results/clarify/rubric-v2/paired-vs-DPO.md",
        reward=RUBRIC,
        baseline="DPO",
    ),
    "clarify-rubric-v2-vs-STaR-GATE": Table(
        "results/clarify/rubric-v2/sciq-clarifying-thinking-rubric-rollouts",
        "results/clarify/rubric-v2/paired-vs-STaR-GATE.md",
        reward=RUBRIC,
        baseline="STaR-GATE",
    ),
    "clarify-rubric-explore": Table(
        "results/clarify/rubric-explore/sciq-clarifying-thinking-rubric-explore-rollouts",
        "results/clarify/rubric-explore/sciq-clarifying-thinking-rubric-explore.md",
        reward=RUBRIC,
    ),
    "clarify-rubric-explore-vs-DPO": Table(
        "results/clarify/rubric-explore/sciq-clarifying-thinking-rubric-explore-rollouts",
        "results/clarify/rubric-explore/paired-vs-DPO.md",
        reward=RUBRIC,
        baseline="DPO",
    ),
    "clarify-rubric-explore-vs-STaR-GATE": Table(
        "results/clarify/rubric-explore/sciq-clarifying-thinking-rubric-explore-rollouts",
        "results/clarify/rubric-explore/paired-vs-STaR-GATE.md",
        reward=RUBRIC,
        baseline="STaR-GATE",
    ),
}
# clarify iterate's reports (rubric v2 with words=8-60, the version their rollouts were scored with)
ITERATE = {"iterate-rubric-explore": ("results/clarify/iterate/sciq-clarifying-thinking-rubric-explore", 3)}


def data(t_train: int, t_test: int, part: str) -> DataOptions:
    # every preset here uses split seed 0 (reproduce/clarify: split_seed 0; demo: seed 0's own split)
    return DataOptions(dataset="sciq", part=part, n_train=t_train, n_test=t_test, seed=0)


def rescored_eval(
    src: Path, dest: Path, label: str, seed: int, opts: DataOptions, reward: RewardOptions, tokenizer
) -> Path:
    """``clarify rescore`` of one evaluated rollout file into ``dest`` plus its ``metrics.json`` (current parser)."""
    name = src.name.removesuffix(".gz")
    run(RescoreConfig(inputs=[str(src)], output=str(dest), data=opts, reward=reward, model=MODEL, overwrite=True))
    records, _ = load_records(dest / name)
    metrics = compute_metrics(records, tokenizer, source=str(dest / name))
    meta = {"method": label, "seed": seed, "dataset": opts.dataset, "rollouts": name, "rescored_from": str(src)}
    (dest / "metrics.json").write_text(json.dumps({"metrics": nan_to_none(metrics), "meta": meta}, indent=1) + "\n")
    return dest / "metrics.json"


def regenerate(name: str, t: Table, tokenizer) -> None:
    work = WORK / name
    shutil.rmtree(work, ignore_errors=True)
    opts = data(t.n_train, t.n_test, "test")
    for f in sorted(Path(t.rollouts).glob("seed*-*.jsonl.gz")):
        seed_part, label = f.name.removesuffix(".jsonl.gz").split("-", 1)
        if label == "logged":
            continue
        rescored_eval(
            f, work / f"{seed_part}-{label}", label, int(seed_part.removeprefix("seed")), opts, t.reward, tokenizer
        )
    old = json.loads(Path(t.out).with_suffix(".json").read_text())  # the committed table's row order
    order = [m["label"] for m in old["methods"]]
    html = Path(t.out).with_suffix(".html")
    run_report(
        [str(work / "*")],
        out=t.out,
        baseline=t.baseline,
        rename=list(t.renames) or None,
        order=order,
        html=str(html) if html.is_file() else None,
    )
    print(f"[rescore-tables] {name}: {t.out}")


def regenerate_iterate(name: str, folder: str, rounds: int, tokenizer) -> None:
    """Rebuild the iterate layout (base/eval, round_k/eval, round_k/simulate) from the archived files, then report."""
    src, work = Path(folder), WORK / name
    shutil.rmtree(work, ignore_errors=True)
    test, train = data(32, 100, "test"), data(32, 100, "train")
    rescored_eval(src / "base-eval.jsonl.gz", work / "base" / "eval", "Base", 0, test, RUBRIC, tokenizer)
    for k in range(rounds):
        rescored_eval(
            src / f"round_{k:03d}-eval.jsonl.gz", round_dir(work, k) / "eval", f"round {k}", 0, test, RUBRIC, tokenizer
        )
        logged = src / f"round_{k:03d}-logged.jsonl.gz"
        sim = round_dir(work, k) / "simulate"
        run(
            RescoreConfig(inputs=[str(logged)], output=str(sim), data=train, reward=RUBRIC, model=MODEL, overwrite=True)
        )
        (sim / logged.name.removesuffix(".gz")).rename(sim / "conversations.jsonl")
    write_report(work, rounds)
    for ext in ("md", "json", "png"):
        shutil.copyfile(work / f"report.{ext}", src / f"report.{ext}")
    print(f"[rescore-tables] {name}: {src / 'report.md'}")


METRICS = ("accuracy", "format_rate", "hedge_rate", "reward", "single_question_rate")


def moved(old_root: Path, threshold: float = 0.01) -> list[str]:
    """Markdown lines: every table cell (method mean of ``METRICS``) that moved by more than ``threshold`` between
    the committed tables under ``old_root`` (e.g. ``git archive <commit> results | tar -x -C OLD``) and now."""
    lines = []
    for t in TABLES.values():
        rel = Path(t.out).with_suffix(".json")
        if "paired-vs" in rel.name:
            continue  # the same rows as the cell's main table
        old = {m["label"]: m["mean"] for m in json.loads((old_root / rel).read_text())["methods"]}
        new = {m["label"]: m["mean"] for m in json.loads(rel.read_text())["methods"]}
        for label, mean in new.items():
            for k in METRICS:
                a, b = old.get(label, {}).get(k), mean.get(k)
                if a is not None and b is not None and abs(b - a) > threshold:
                    lines.append(f"| {rel.with_suffix('.md')} | {label} | {k} | {a:.3f} | {b:.3f} |")
    for folder, _ in ITERATE.values():
        rel = Path(folder) / "report.json"
        rows = {r["label"]: r["eval"] for r in json.loads((old_root / rel).read_text())["rows"]}
        for r in json.loads(rel.read_text())["rows"]:
            for k in METRICS:
                a, b = rows.get(r["label"], {}).get(k), r["eval"].get(k)
                if a is not None and b is not None and abs(b - a) > threshold:
                    lines.append(f"| {rel.with_suffix('.md')} | {r['label']} | {k} | {a:.3f} | {b:.3f} |")
    return lines


def main(argv: list[str]) -> None:
    if argv == ["--list"]:
        print("\n".join([*TABLES, *ITERATE]))
        return
    if argv[:1] == ["--moved"]:  # --moved OLD_RESULTS_ROOT: what changed, as a Markdown table
        print("| table | row | metric | before | after |\n|---|---|---|---|---|")
        print("\n".join(moved(Path(argv[1]))))
        return
    names = argv or [*TABLES, *ITERATE]
    unknown = [n for n in names if n not in TABLES and n not in ITERATE]
    if unknown:
        raise SystemExit(f"unknown tables {unknown}; choose from {[*TABLES, *ITERATE]}")
    tokenizer = load_tokenizer(MODEL)
    for n in names:
        if n in TABLES:
            regenerate(n, TABLES[n], tokenizer)
        else:
            regenerate_iterate(n, *ITERATE[n], tokenizer)


if __name__ == "__main__":
    main(sys.argv[1:])
