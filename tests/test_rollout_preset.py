"""``configs/callbacks/rollout-eval.yaml``: a tiny ``clarify fit`` with the preset logs rollout curves to TensorBoard
(accuracy, reward, format and hedge rates, sample conversations) and the export's model card shows the evaluation."""

from __future__ import annotations

import json
from pathlib import Path

import yaml

from clarify_lit.cli import main

REPO = Path(__file__).resolve().parents[1]
PRESET = REPO / "configs" / "callbacks" / "rollout-eval.yaml"
TINY_TASKS = REPO / "configs" / "simulate" / "tiny-tasks.jsonl"
CALLBACK = "--trainer.callbacks.init_args."


def test_preset_is_the_rollout_callback():
    callbacks = yaml.safe_load(PRESET.read_text())["trainer"]["callbacks"]
    assert [c["class_path"] for c in callbacks] == ["clarify_lit.evaluate.callback.RolloutEvaluation"]
    assert callbacks[0]["init_args"]["every_n_val_epochs"] == 1


def test_fit_with_the_preset_logs_rollout_curves(clarify_cache, records_factory, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    records = records_factory(n_tasks=4, n_runs=2)
    root = tmp_path / "run"
    columns = json.dumps({"question": "question", "choices": "choices", "answer": "answer", "id": "id"})
    main(
        [
            "fit",
            "--config",
            str(REPO / "configs/trainer/cpu.yaml"),
            "--config",
            str(REPO / "configs/model/tiny.yaml"),
            "--config",
            str(PRESET),
            f"{CALLBACK}data.dataset=local",
            f"{CALLBACK}data.path={TINY_TASKS}",
            f"{CALLBACK}data.columns={columns}",
            f"{CALLBACK}data.n_train=4",
            f"{CALLBACK}data.n_test=4",
            f"{CALLBACK}n_questions=2",
            f"{CALLBACK}rollout.max_new_tokens=3",
            "--data.train_files",
            f"[{records}]",
            "--data.val_fraction",
            "0.25",
            "--data.batch_size",
            "2",
            "--trainer.max_epochs",
            "2",
            "--trainer.default_root_dir",
            str(root),
            "--trainer.enable_progress_bar",
            "false",
            "--trainer.enable_model_summary",
            "false",
        ]
    )

    events = [
        EventAccumulator(str(f), size_guidance={"scalars": 0, "tensors": 0})
        for f in root.rglob("events.out.tfevents.*")
    ]
    for ea in events:
        ea.Reload()
    scalars = {tag: [e.step for e in ea.Scalars(tag)] for ea in events for tag in ea.Tags()["scalars"]}
    for tag in ("rollout/accuracy", "rollout/reward", "rollout/format_rate", "rollout/hedge_rate"):
        assert len(scalars.get(tag, [])) == 2, (tag, sorted(scalars))  # one point per validation: a curve
    texts = {tag for ea in events for tag in ea.Tags()["tensors"]}
    assert any(t.startswith("rollout/conversation_0") for t in texts), texts
    files = sorted((root / "rollouts").glob("step_*.metrics.json"))
    assert len(files) == 2
    card = (root / "export" / "README.md").read_text()
    last = json.loads(files[-1].read_text())
    assert f"Greedy rollouts of the policy at step {last['meta']['step']} on 2 held-out questions of `local`" in card
    assert f"| accuracy | {last['metrics']['accuracy']:.4g} |" in card
