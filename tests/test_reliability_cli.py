"""Reliability, config errors (docs/reliability.md): each mistake ends ``clarify`` with one clear line on stderr and
a non-zero status, never a stack trace, and before any training step."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from conftest import make_record

from clarify_lit.cli import main
from clarify_lit.data.records import write_records

pytestmark = pytest.mark.usefixtures("clarify_cache")

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def records(tmp_path) -> Path:
    return write_records(
        tmp_path / "records.jsonl", [make_record(t, r, [1.0, 0.0, 0.5][r]) for t in range(3) for r in range(3)]
    )


@pytest.fixture
def no_template_model(tiny_model_dir, tmp_path) -> Path:
    bare = tmp_path / "no-template"
    shutil.copytree(tiny_model_dir, bare)
    (bare / "chat_template.jinja").unlink()
    return bare


def run_clarify(argv: list[str], capsys) -> tuple[int, str]:
    """``clarify <argv>`` in-process: (exit status, the one ``clarify`` line on stderr)."""
    with pytest.raises(SystemExit) as e:
        main(argv)
    err = capsys.readouterr().err
    assert "Traceback" not in err, err[-3000:]
    lines = [x for x in err.splitlines() if x.startswith("clarify")]
    assert len(lines) == 1, err[-3000:]  # exactly one line of ours, whatever the libraries logged before it
    return e.value.code, lines[0]


def fit(records: Path, root: Path, *extra: str) -> list[str]:
    return [
        "fit",
        f"--data.train_files=[{records}]",
        "--trainer.max_steps=1",
        f"--trainer.default_root_dir={root}",
        "--trainer.enable_progress_bar=false",
        *extra,
    ]


CASES = {
    "unknown objective": (
        ["--model.objective=Reflt"],
        2,
        ["--model.objective: 'Reflt' is not an objective; choose one of Refit, Swift, SFT, DPO"],
    ),
    "LoRA target the model lacks": (
        ["--model.lora_target_modules=[q_proj,qkv_proj]"],
        1,
        ["lora_target_modules ['qkv_proj'] not found in 'tiny-random'", "its linear layers are", "v_proj"],
    ),
    "dataset path that does not exist": (
        ["--data.train_files=[nowhere/records.jsonl]"],
        1,
        ["data.train_files: record file not found: nowhere/records.jsonl"],
    ),
    "model folder that does not exist": (
        ["--model.model_name_or_path=./no/such/model"],
        1,
        ["model folder not found: ./no/such/model"],
    ),
    "mistyped option": (["--data.batch_sise=2"], 2, ["unrecognized arguments: --data.batch_sise=2"]),
    "option of the wrong type": (["--data.batch_size=two"], 2, ['"data.batch_size"', "two"]),
    "DPO without a single preference": (
        ["--model.objective=DPO", "--data.val_fraction=0"],
        1,
        ["DPO: no task has a reward gap"],
    ),
    "batch size 0": (["--data.batch_size=0"], 1, ["data.batch_size must be an integer >= 1, got 0"]),
}


@pytest.mark.parametrize("case", list(CASES))
def test_config_error_is_one_line_and_nonzero(case, records, tmp_path, capsys):
    extra, status, fragments = CASES[case]
    if case == "DPO without a single preference":  # every run of every task scored alike
        records = write_records(tmp_path / "ties.jsonl", [make_record(t, r, 1.0) for t in range(3) for r in range(3)])
    root = tmp_path / "run"
    code, line = run_clarify(fit(records, root, *extra), capsys)
    assert code == status
    assert line.startswith("clarify: error:" if status == 2 else "clarify fit: error:"), line
    for f in fragments:
        assert f in line, line
    assert not (root / "checkpoints").exists()  # stopped before any training step


def test_tokenizer_without_chat_template(records, no_template_model, tmp_path, capsys):
    code, line = run_clarify(fit(records, tmp_path / "run", f"--model.model_name_or_path={no_template_model}"), capsys)
    assert code == 1 and "has no chat template" in line and str(no_template_model) in line


def test_simulate_dataset_path_that_does_not_exist(tmp_path, capsys):
    code, line = run_clarify(
        [
            "simulate",
            "--config",
            str(REPO / "configs/simulate/tiny-reasoning.yaml"),
            "--data.path",
            "no/such/tasks.jsonl",
            "--output",
            str(tmp_path / "sim"),
            "--progress",
            "false",
        ],
        capsys,
    )
    assert code == 1 and line == "clarify simulate: error: local QA dataset no/such/tasks.jsonl does not exist"


def test_debug_mode_keeps_the_traceback(records, tmp_path, monkeypatch):
    monkeypatch.setenv("CLARIFY_DEBUG", "1")
    with pytest.raises(FileNotFoundError, match="record file not found"):
        main(fit(records, tmp_path / "run", "--data.train_files=[nowhere.jsonl]"))
