"""notebooks/analyze_checkpoints.ipynb runs top to bottom headless on a tiny-model run made here:
simulate → fit (with export) → evaluate Base and the export → the notebook reads all of it."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
TASKS = REPO / "configs/simulate/tiny-tasks.jsonl"
DATA = [
    "--data.dataset",
    "local",
    "--data.path",
    str(TASKS),
    "--data.label",
    "tiny",
    "--data.n_train",
    "6",
    "--data.n_test",
    "2",
    "--data.columns",
    '{"question": "question", "choices": "choices", "answer": "answer", "id": "id"}',
]


@pytest.mark.slow
def test_notebook_runs_headless_on_a_tiny_run(clarify_cache, tmp_path, monkeypatch):
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")
    from clarify_lit.cli import main as clarify

    root = tmp_path / "runs"
    sim = root / "simulate"
    clarify(
        [
            "simulate",
            "--model",
            "tiny-random",
            *DATA,
            "--data.part",
            "train",
            "--rollout.setting",
            "reasoning",
            "--rollout.mode",
            "standard",
            "--rollout.max_new_tokens",
            "4",
            "--rollout.temperatures",
            "[0.3, 1.0]",
            "--output",
            str(sim),
            "--progress",
            "false",
        ]
    )
    fit_dir = root / "fit" / "SFT"
    clarify(
        [
            "fit",
            "--config",
            str(REPO / "configs/model/tiny.yaml"),
            "--model.objective=SFT",
            f"--data.train_files=[{sim / 'conversations.jsonl'}]",
            "--data.val_fraction=0",
            "--trainer.max_steps=2",
            "--trainer.log_every_n_steps=1",
            "--trainer.enable_progress_bar=false",
            "--trainer.enable_model_summary=false",
            f"--trainer.default_root_dir={fit_dir}",
        ]
    )
    for label, source in (("Base", ["--model", "tiny-random"]), ("SFT", ["--export_dir", str(fit_dir / "export")])):
        clarify(
            [
                "evaluate",
                *source,
                "--method",
                label,
                *DATA,
                "--rollout.setting",
                "reasoning",
                "--rollout.mode",
                "standard",
                "--rollout.max_new_tokens",
                "4",
                "--progress",
                "false",
                "--out_dir",
                str(root / "eval" / label),
            ]
        )

    nb = nbformat.read(REPO / "notebooks" / "analyze_checkpoints.ipynb", as_version=4)
    monkeypatch.setenv("CLARIFY_NB_ROOT", str(root))
    monkeypatch.setenv("CLARIFY_NB_MAX_NEW_TOKENS", "4")
    nbclient.NotebookClient(
        nb, timeout=300, kernel_name="python3", resources={"metadata": {"path": str(REPO / "notebooks")}}
    ).execute()
    text = "\n".join(o.get("text", "") for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", []))
    assert "1 training runs, 2 evaluations" in text
    assert "methods with rollouts: ['Base', 'SFT']" in text
    assert "[assistant]" in text  # the exported policy was loaded and generated a reply
    assert os.environ["CLARIFY_NB_ROOT"] == str(root)
