"""``dtype: auto`` / ``precision: auto`` follow the CPU's bf16 flags; every output holding a number carries the
environment stamp; ``clarify report`` shows the stamps and warns when a table mixes them (docs/environment.md)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from clarify_lit import environment
from clarify_lit.evaluate.report import run_report
from clarify_lit.models import resolve_dtype
from clarify_lit.train.trainer import resolve_precision

REPO = Path(__file__).resolve().parents[1]
STAMP_KEYS = {
    "clarify_lit",
    "commit",
    "python",
    "torch",
    "transformers",
    "peft",
    "lightning",
    "device",
    "dtype",
    "torch_threads",
    "cpu",
    "cpu_flags",
}


def with_flags(monkeypatch, *flags: str) -> None:
    monkeypatch.setattr(environment, "cpu_flags", lambda: frozenset(flags))


@pytest.mark.parametrize(
    "flags, expected",
    [
        ((), "float32"),
        (("avx512f", "avx2"), "float32"),
        (("avx512f", "avx512_bf16"), "bfloat16"),
        (("amx_tile", "amx_bf16"), "bfloat16"),
    ],
)
def test_auto_follows_the_cpu_bf16_flags(monkeypatch, capsys, flags, expected):
    with_flags(monkeypatch, *flags)
    monkeypatch.setattr("clarify_lit.models._ANNOUNCED", set())
    assert resolve_dtype("auto", "cpu") == expected
    assert resolve_dtype("auto", "cpu") == expected
    printed = capsys.readouterr().err
    assert printed.count(f"dtype auto -> {expected} on cpu") == 1  # printed once per process
    precision = resolve_precision("auto", "cpu")
    assert precision == ("bf16-mixed" if expected == "bfloat16" else "32-true")


def test_explicit_choices_pass_through(monkeypatch):
    with_flags(monkeypatch)  # no bf16: an explicit bfloat16 is still honoured
    for dtype in ("float32", "bfloat16", "float16"):
        assert resolve_dtype(dtype, "cpu") == dtype
    for precision in ("bf16-mixed", "32-true", None):
        assert resolve_precision(precision, "cpu") == precision
    with pytest.raises(ValueError, match="dtype must be auto or one of"):
        resolve_dtype("fp8", "cpu")  # type: ignore[arg-type]


def test_stamp_has_every_field_and_never_fails(monkeypatch):
    with_flags(monkeypatch, "avx512_bf16", "avx512f")
    stamp = environment.environment_stamp("cpu", "bfloat16")
    assert STAMP_KEYS <= set(stamp) and stamp["dtype"] == "bfloat16" and stamp["device"] == "cpu"
    assert stamp["cpu_flags"] == ["avx512_bf16", "avx512f"] and isinstance(stamp["torch_threads"], int)
    json.dumps(stamp)  # JSON as is
    monkeypatch.setattr(environment, "CPUINFO", Path("/nonexistent/cpuinfo"))
    environment._cpuinfo.cache_clear()
    try:
        assert environment.environment_stamp("cpu")["cpu"]  # "unknown" or platform's name, never an error
    finally:
        environment._cpuinfo.cache_clear()


def test_trainer_precision_auto_is_validated_and_resolved(monkeypatch, tmp_path, tiny_model_dir, records_factory):
    """``--trainer.precision auto`` passes LightningCLI's validation and reaches the Trainer resolved; a typo is
    refused."""
    from clarify_lit.cli import lightning_main

    base = [
        "--config",
        str(REPO / "configs/trainer/cpu-auto.yaml"),
        "--config",
        str(REPO / "configs/model/tiny.yaml"),
        f"--data.train_files=[{records_factory()}]",
        "--trainer.default_root_dir",
        str(tmp_path / "run"),
    ]
    with_flags(monkeypatch, "avx512_bf16")
    cli = lightning_main(base, run=False)
    assert str(cli.trainer.precision) == "bf16-mixed"
    with_flags(monkeypatch)
    assert str(lightning_main(base, run=False).trainer.precision) == "32-true"
    with pytest.raises(SystemExit):
        lightning_main([*base, "--trainer.precision", "bf17"], run=False)


# --- the stamp in outputs --------------------------------------------------------------------------------------
def test_evaluate_writes_the_stamp_with_the_resolved_dtype(tmp_path):
    from clarify_lit.evaluate.command import main

    main(
        [
            "--model",
            "tiny-random",
            "--out_dir",
            str(tmp_path / "eval"),
            "--data.dataset",
            "local",
            "--data.path",
            str(REPO / "configs/simulate/tiny-tasks.jsonl"),
            "--data.n_train",
            "4",
            "--data.n_test",
            "2",
            "--data.columns",
            '{"question": "question", "choices": "choices", "answer": "answer", "id": "id"}',
            "--rollout.max_new_tokens",
            "2",
            "--rollout.n_turns",
            "1",
            "--progress",
            "false",
        ]
    )
    meta = json.loads((tmp_path / "eval" / "metrics.json").read_text())["meta"]
    assert meta["dtype"] == "float32"  # auto on the suite's CPU without native bf16 (conftest)
    assert STAMP_KEYS <= set(meta["environment"]) and meta["environment"]["dtype"] == "float32"


# --- the report ------------------------------------------------------------------------------------------------
def write_metrics(folder: Path, method: str, stamp: dict | None) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    meta = {"method": method, "dataset": "sciq", **({"environment": stamp} if stamp is not None else {})}
    (folder / "metrics.json").write_text(
        json.dumps({"metrics": {"n": 4, "accuracy": 0.5, "accuracy_se": 0.1}, "meta": meta})
    )
    return folder / "metrics.json"


def stamp_on(cpu: str, flags: list[str], dtype: str) -> dict:
    return {
        "clarify_lit": "0.1.0",
        "commit": "abc",
        "python": "3.11.7",
        "torch": "2.13.0",
        "transformers": "5.25.0",
        "peft": "0.21.2",
        "lightning": "2.6.6",
        "device": "cpu",
        "dtype": dtype,
        "torch_threads": 2,
        "cpu": cpu,
        "cpu_flags": flags,
    }


def test_report_shows_one_stamp_and_no_warning_when_all_match(tmp_path, capsys):
    epyc = stamp_on("AMD EPYC", ["avx512_bf16"], "bfloat16")
    write_metrics(tmp_path / "runs" / "base", "Base", epyc)
    write_metrics(tmp_path / "runs" / "refit", "Refit", {**epyc, "commit": "def", "python": "3.12.1"})
    text = run_report([str(tmp_path / "runs")], out=tmp_path / "r.md", paired=False, html=tmp_path / "r.html")
    assert "## Environment" in text and "AMD EPYC [avx512_bf16], cpu, bfloat16" in text
    assert "different machines" not in text and "different machines" not in capsys.readouterr().err
    assert "AMD EPYC [avx512_bf16]" in (tmp_path / "r.html").read_text()  # the audit page carries it too


def test_report_warns_when_methods_were_made_on_different_stamps(tmp_path, capsys):
    write_metrics(tmp_path / "runs" / "base", "Base", stamp_on("AMD EPYC", ["avx512_bf16"], "bfloat16"))
    write_metrics(tmp_path / "runs" / "refit", "Refit", stamp_on("Intel Xeon", ["avx512f"], "float32"))
    text = run_report([str(tmp_path / "runs")], out=tmp_path / "r.md", paired=False)
    err = [line for line in capsys.readouterr().err.splitlines() if "different machines" in line]
    assert len(err) == 1 and "Base on AMD EPYC" in err[0] and "Refit on Intel Xeon" in err[0]  # one line, names both
    assert "**Warning:** the table's methods were made on different machines" in text


def test_report_warns_when_only_the_thread_count_differs(tmp_path, capsys):
    # greedy bf16 text depends on the thread count (a matmul's reduction is split by thread), so 1 vs 2 threads is
    # two machines for a paired comparison
    epyc = stamp_on("AMD EPYC", ["avx512_bf16"], "bfloat16")
    write_metrics(tmp_path / "runs" / "base", "Base", epyc)
    write_metrics(tmp_path / "runs" / "refit", "Refit", {**epyc, "torch_threads": 1})
    text = run_report([str(tmp_path / "runs")], out=tmp_path / "r.md", paired=False)
    err = [line for line in capsys.readouterr().err.splitlines() if "different machines" in line]
    assert len(err) == 1 and "2 threads" in err[0] and "1 thread;" in err[0]
    assert "**Warning:** the table's methods were made on different machines" in text


def test_report_of_old_outputs_without_a_stamp_says_unknown(tmp_path, capsys):
    write_metrics(tmp_path / "runs" / "base", "Base", None)
    write_metrics(tmp_path / "runs" / "refit", "Refit", None)
    text = run_report([str(tmp_path / "runs")], out=tmp_path / "r.md", paired=False)
    assert "All methods: unknown" in text and "different machines" not in capsys.readouterr().err
