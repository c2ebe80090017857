"""``clarify report``: seed aggregation, the Markdown table (bold best), the PNG, the paired comparison table."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from clarify_lit.data.records import ConversationRecord, write_records
from clarify_lit.evaluate.report import (
    aggregate,
    best_constant_answer,
    expand_inputs,
    main,
    read_metrics_file,
    run_report,
)


def write_run(folder: Path, method: str, metrics: dict, correct: list[bool] | None = None, seed: int = 0) -> Path:
    """A metrics.json (+ rollouts.jsonl when ``correct`` is given: one record per question q0, q1, ...)."""
    folder.mkdir(parents=True, exist_ok=True)
    meta = {"method": method, "seed": seed, "n": metrics.get("n", 0)}
    if correct is not None:
        recs = [
            ConversationRecord(
                id=f"{method}-{seed}-q{i}",
                task_id=f"q{i}",
                gold="A",
                reward=float(ok),
                messages=[
                    {"role": "user", "content": "Q"},
                    {"role": "assistant", "content": "The answer is A" if ok else "The answer is B"},
                ],
            )
            for i, ok in enumerate(correct)
        ]
        write_records(folder / "rollouts.jsonl", recs)
        meta["rollouts"] = "rollouts.jsonl"
    (folder / "metrics.json").write_text(json.dumps({"metrics": metrics, "meta": meta}))
    return folder / "metrics.json"


def m(acc: float, se: float, n: int = 100, **extra) -> dict:
    return {
        "n": n,
        "accuracy": acc,
        "accuracy_se": se,
        "reward": acc,
        "reward_se": se,
        "thinking_pct": 50.0,
        "thinking_pct_se": 5.0,
        **extra,
    }


def test_seed_aggregation_mean_and_combined_se(tmp_path):
    f1 = read_metrics_file(write_run(tmp_path / "s0", "Refit", m(0.6, 0.03)))
    f2 = read_metrics_file(write_run(tmp_path / "s1", "Refit", m(0.8, 0.04)))
    f3 = read_metrics_file(write_run(tmp_path / "b", "Base", m(0.3, 0.05)))
    refit, base = aggregate([f1, f2, f3])
    assert refit.label == "Refit" and refit.k == 2
    assert refit.mean["accuracy"] == pytest.approx(0.7)
    assert refit.se["accuracy"] == pytest.approx(math.sqrt(0.03**2 + 0.04**2) / 2)  # = 0.025
    assert refit.seed_sd["accuracy"] == pytest.approx(math.sqrt(0.02))
    assert refit.mean["n"] == 200  # counts add up
    assert base.k == 1 and base.se["accuracy"] == 0.05 and not base.seed_sd


def test_report_table_plot_and_paired(tmp_path, capsys):
    runs = tmp_path / "runs"
    write_run(
        runs / "base",
        "Base",
        m(0.3, 0.046, n=10, judge_overall=5.0, judge_overall_se=0.2),
        correct=[True, False, False, True, False, False, False, False, True, False],
    )
    write_run(
        runs / "swift",
        "Swift",
        m(0.8, 0.04, n=10, judge_overall=4.5, judge_overall_se=0.3),
        correct=[True] * 8 + [False, False],
    )
    out = tmp_path / "report" / "table.md"
    main([str(runs / "*"), "--out", str(out)])
    text = out.read_text()
    assert capsys.readouterr().out.strip() == text.strip()
    lines = text.splitlines()
    header = next(line for line in lines if line.startswith("| Method"))
    cols = [c.strip() for c in header.strip("|").split("|")]
    assert cols == ["Method", "seeds", "n", "Accuracy", "Thinking %", "Reward", "Overall"]
    base_row = next(line for line in lines if line.startswith("| Base |"))
    swift_row = next(line for line in lines if line.startswith("| Swift |"))
    assert "**0.800 ± 0.040**" in swift_row and "0.300 ± 0.046" in base_row
    assert "**5.00 ± 0.20**" in base_row  # judge Overall: Base is best, as in the paper's clarifying tables
    assert "**50.0" not in text  # Thinking % is not a quality metric: never bold
    # paired: Swift vs Base by default; per question q0..q9: Swift wins q1,q2,q4,q5,q6,q7 (6), loses q8 (1), ties 3
    paired = next(line for line in lines if line.startswith("| Swift vs Base |"))
    cells = [c.strip() for c in paired.strip("|").split("|")]
    assert cells[1] == "10"
    assert cells[2].startswith("0.500 ± ")
    assert cells[3] == "6/1/3"
    assert float(cells[4]) == pytest.approx(2 * (1 + 7) / 128, rel=1e-3)  # exact sign test, n = 7
    png = out.with_suffix(".png")
    assert png.is_file() and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    summary = json.loads(out.with_suffix(".json").read_text())
    assert [s["label"] for s in summary["methods"]] == ["Base", "Swift"]
    assert summary["paired"][0]["accuracy"]["wins"] == 6
    # one comparison: Holm's p is the raw p; the caption states the best constant answer (every gold is A here)
    assert float(cells[5]) == pytest.approx(float(cells[4]), rel=1e-3)
    assert summary["paired"][0]["holm_p_accuracy"] == pytest.approx(summary["paired"][0]["accuracy"]["p_sign"])
    caption = 'Best constant answer: always "The answer is A." scores accuracy 1.000 on these 10 questions'
    assert text.count(caption) == 3  # the results, paired and letters tables each carry it


def test_label_override_dir_input_and_missing_rollouts(tmp_path):
    p = write_run(tmp_path / "a", "whatever", m(0.5, 0.05))
    write_run(tmp_path / "b", "Other", m(0.4, 0.05))
    assert expand_inputs([f"Refit={tmp_path / 'a'}"]) == [("Refit", p)]
    text = run_report([f"Refit={p}", str(tmp_path / "b")], out=tmp_path / "r.md")
    assert "| Refit |" in text and "| Other |" in text
    assert "skipped (no rollouts file" in text  # two methods, no rollouts: the pair is named, not silently dropped


def test_bad_inputs_name_the_file(tmp_path):
    bad = tmp_path / "metrics.json"
    bad.write_text(json.dumps({"metrics": {"accuracy": "high"}}))
    with pytest.raises(ValueError, match=r"metrics.json: field 'metrics.accuracy'"):
        read_metrics_file(bad)
    with pytest.raises(FileNotFoundError, match="no metrics.json"):
        expand_inputs([str(_mkdir(tmp_path / "e"))])
    with pytest.raises(FileNotFoundError, match="does not exist"):
        expand_inputs([str(tmp_path / "nowhere" / "metrics.json")])
    with pytest.raises(ValueError, match="--metrics"):
        run_report([str(write_run(tmp_path / "x", "X", m(0.1, 0.01)))], out=tmp_path / "o.md", metrics=["nope"])


def _mkdir(p: Path) -> Path:
    p.mkdir()
    return p


def test_rename_and_order_rows(tmp_path):
    runs = tmp_path / "runs"
    write_run(runs / "a_sft", "SFT", m(0.4, 0.05), correct=[True, False])
    write_run(runs / "b_base", "Base", m(0.3, 0.05), correct=[False, False])
    write_run(runs / "c_refit", "Refit", m(0.5, 0.05), correct=[True, True])
    text = run_report([str(runs)], out=tmp_path / "r.md", rename=["SFT=STaR-GATE"], order=["Base", "Refit"])
    rows = [
        line.split("|")[1].strip()
        for line in text.split("## Final-answer letters")[0].splitlines()
        if line.startswith("| ") and "vs" not in line
    ]
    assert rows[1:] == ["Base", "Refit", "STaR-GATE"]  # named first, the rest in first-seen order; SFT renamed
    assert "| STaR-GATE vs Base |" in text  # the paired table follows the new names
    with pytest.raises(ValueError, match=r"--order \['SFT'\]: not among"):  # the old name no longer exists
        run_report([str(runs)], out=tmp_path / "r.md", rename=["SFT=STaR-GATE"], order=["SFT"])
    with pytest.raises(ValueError, match="expected OLD=NEW"):
        run_report([str(runs)], out=tmp_path / "r.md", rename=["SFT"])


def test_best_constant_answer_from_gold_letters():
    """Gold letters A, B, B, C (question q1 seen twice, counted once): always B is right on 2 of 4 questions."""
    recs = [
        ConversationRecord(id=f"r{i}", task_id=f"q{q}", gold=g, reward=0.0, messages=[])
        for i, (q, g) in enumerate([(0, "A"), (1, "B"), (1, "B"), (2, "B"), (3, "C")])
    ]
    assert best_constant_answer(recs) == ("B", 0.5)
    # a tie goes to the earlier letter
    assert best_constant_answer(recs[:1] + recs[4:]) == ("A", 0.5)


def test_paired_table_holm_column(tmp_path):
    """Three methods against Base: the Holm column is holm_adjust of the raw sign p over the table's rows."""
    runs = tmp_path / "runs"
    write_run(runs / "base", "Base", m(0.0, 0.0, n=10), correct=[False] * 10)
    write_run(runs / "a", "A", m(0.6, 0.1, n=10), correct=[True] * 6 + [False] * 4)  # 6/0/4: p = 2/64
    write_run(runs / "b", "B", m(0.2, 0.1, n=10), correct=[True] * 2 + [False] * 8)  # 2/0/8: p = 2/4 = 0.5
    write_run(runs / "c", "C", m(0.8, 0.1, n=10), correct=[True] * 8 + [False] * 2)  # 8/0/2: p = 2/256
    text = run_report([str(runs / "*")], out=tmp_path / "t.md")
    rows = {
        line.split("|")[1].strip(): [c.strip() for c in line.strip("|").split("|")]
        for line in text.splitlines()
        if " vs Base |" in line
    }
    # by hand: sorted 2/256 · 3 = 0.0234; 2/64 · 2 = 0.0625; max(0.0625, 0.5 · 1) = 0.5
    assert float(rows["C vs Base"][5]) == pytest.approx(3 * 2 / 256, rel=3e-3)
    assert float(rows["A vs Base"][5]) == pytest.approx(2 * 2 / 64, rel=3e-3)
    assert float(rows["B vs Base"][5]) == pytest.approx(0.5, rel=1e-3)


# ------------------------------------------------------------------------------ duplicate inputs (issue 29)
def test_a_repeated_input_is_refused_naming_it(tmp_path, capsys):
    """One evaluation given twice (the same path, a glob matching its folder again, two labels on it) used to read
    as two seeds ("seeds 2, n 4") with the SE shrunk by √2."""
    from clarify_lit.cli import main as clarify

    run = write_run(tmp_path / "runs" / "refit", "Refit", m(0.5, 0.1, n=2), correct=[True, False]).parent
    write_run(tmp_path / "runs" / "base", "Base", m(0.0, 0.0, n=2), correct=[False, False])
    for args in ([str(run), str(run)], [str(run), str(tmp_path / "runs" / "*")], [f"A={run}", f"B={run}/"]):
        with pytest.raises(SystemExit) as e:
            clarify(["report", *args, "--out", str(tmp_path / "r.md")])
        err = capsys.readouterr().err
        assert e.value.code == 1 and len(err.strip().splitlines()) == 1, err
        assert f"report inputs repeat an evaluation ({run / 'metrics.json'} given 2 times)" in err
        assert not (tmp_path / "r.md").exists()


def test_a_copied_evaluation_is_refused_by_content(tmp_path, capsys):
    import shutil

    from clarify_lit.cli import main as clarify

    a = write_run(tmp_path / "runs" / "s0", "Refit", m(0.5, 0.1, n=2), correct=[True, False]).parent
    b = shutil.copytree(a, tmp_path / "runs" / "s1")
    with pytest.raises(SystemExit) as e:
        clarify(["report", str(tmp_path / "runs"), "--out", str(tmp_path / "r.md")])
    err = capsys.readouterr().err
    assert e.value.code == 1 and len(err.strip().splitlines()) == 1, err
    assert (
        f"{a / 'metrics.json'} and {b / 'metrics.json'} hold the same rollouts (sha256 " in err
        and "a copy is not another seed" in err
    )
    # without rollouts, the metrics file's own bytes
    (a / "rollouts.jsonl").unlink()
    (b / "rollouts.jsonl").unlink()
    with pytest.raises(ValueError, match=r"hold the same metrics \(sha256"):
        run_report([str(a), str(b)], out=tmp_path / "r.md")
    # a real second seed (other rollouts) is aggregated as before
    write_run(b, "Refit", m(0.5, 0.1, n=2), correct=[False, True], seed=1)
    summary = run_report([str(a), str(b)], out=tmp_path / "r.md")
    assert "| Refit | 2 | 4 |" in summary
