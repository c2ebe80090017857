"""`clarify evaluate`: base model, Lightning checkpoint and exported PEFT folder give metrics.json + rollouts.jsonl."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from clarify_lit.data.records import load_records
from clarify_lit.evaluate.command import main
from clarify_lit.evaluate.metrics import compute_metrics, nan_to_none

REPO = Path(__file__).resolve().parents[1]
DATA_ARGS = [
    "--data.dataset",
    "local",
    "--data.path",
    str(REPO / "configs/simulate/tiny-tasks.jsonl"),
    "--data.label",
    "tiny",
    "--data.n_train",
    "4",
    "--data.n_test",
    "4",
    "--data.columns",
    '{"question": "question", "choices": "choices", "answer": "answer", "id": "id"}',
    "--rollout.max_new_tokens",
    "3",
    "--progress",
    "false",
]


def read_out(folder: Path) -> tuple[dict, list]:
    saved = json.loads((folder / "metrics.json").read_text())
    records, _ = load_records(folder / "rollouts.jsonl")
    return saved, records


def test_three_sources_agree_for_an_untrained_adapter(clarify_cache, tmp_path):
    """A fresh LoRA adapter (B = 0) changes nothing: base model, checkpoint and export must give the same rollouts,
    which exercises each loading path (adapter applied to the right base, tokenizer found, labels)."""
    import lightning as L

    from clarify_lit.train.module import ClarifyModule, export_model
    from clarify_lit.train.objectives import Swift

    module = ClarifyModule("tiny-random", objective=Swift())
    trainer = L.Trainer(logger=False, enable_checkpointing=False, enable_progress_bar=False)
    trainer.strategy.connect(module)
    ckpt = tmp_path / "run" / "last.ckpt"
    trainer.save_checkpoint(ckpt)
    export_model(module, tmp_path / "swift-run" / "export")

    main(["--model", "tiny-random", "--out_dir", str(tmp_path / "base"), *DATA_ARGS])
    main(["--ckpt_path", str(ckpt), "--out_dir", str(tmp_path / "ckpt"), *DATA_ARGS])
    main(["--export_dir", str(tmp_path / "swift-run" / "export"), "--out_dir", str(tmp_path / "export"), *DATA_ARGS])

    base, base_recs = read_out(tmp_path / "base")
    assert base["meta"]["method"] == "Base" and base["meta"]["source"] == "model"
    assert base["meta"]["n"] == 4 and base["meta"]["temperatures"] == [0.0]
    assert nan_to_none(compute_metrics(base_recs, setting="reasoning"))["accuracy"] == base["metrics"]["accuracy"]
    for name, method in (("ckpt", "Swift"), ("export", "swift-run")):
        saved, recs = read_out(tmp_path / name)
        assert saved["meta"]["method"] == method
        assert [r.messages for r in recs] == [r.messages for r in base_recs], name
        assert saved["metrics"] == base["metrics"]


def test_method_label_temperatures_and_clarifying(clarify_cache, tmp_path, capsys):
    main(
        [
            "--model",
            "tiny-random",
            "--method",
            "Base-greedy",
            "--rollout.setting",
            "clarifying",
            "--n_questions",
            "2",
            "--rollout.temperatures",
            "[0.0, 1.0]",
            "--out_dir",
            str(tmp_path),
            *DATA_ARGS,
        ]
    )
    saved, recs = read_out(tmp_path)
    assert saved["meta"]["method"] == "Base-greedy" and saved["meta"]["teacher"] == "retrieval:blank"
    assert len(recs) == 4 and {r.run for r in recs} == {0, 1}  # 2 questions × 2 temperatures
    assert saved["metrics"]["n_first_turns"] == 4  # clarifying: the one-question check ran
    assert "accuracy" in capsys.readouterr().out


def test_faster_decode_options_reach_the_rollouts(clarify_cache, tmp_path):
    """``--share_prefix`` and ``--attention`` (issue 16.2's opt-in decode paths) reach the rollout spec and are
    recorded in the metrics' meta; on the tiny model in fp32 they give the default path's greedy text."""
    main(["--model", "tiny-random", "--n_questions", "2", "--out_dir", str(tmp_path / "plain"), *DATA_ARGS])
    main(
        [
            "--model",
            "tiny-random",
            "--n_questions",
            "2",
            "--rollout.share_prefix",
            "true",
            "--rollout.attention",
            "gqa",
            "--out_dir",
            str(tmp_path / "fast"),
            *DATA_ARGS,
        ]
    )
    (plain, recs_a), (fast, recs_b) = read_out(tmp_path / "plain"), read_out(tmp_path / "fast")
    assert (plain["meta"]["share_prefix"], plain["meta"]["attention"]) == (False, "model")
    assert (fast["meta"]["share_prefix"], fast["meta"]["attention"]) == (True, "gqa")
    assert [r.messages for r in recs_a] == [r.messages for r in recs_b]


@pytest.mark.parametrize(
    "args,match",
    [
        ([], "exactly one of --model"),
        (["--model", "tiny-random", "--export_dir", "x"], "exactly one of --model"),
    ],
)
def test_policy_source_errors(clarify_cache, tmp_path, args, match):
    with pytest.raises(ValueError, match=match):
        main([*args, "--out_dir", str(tmp_path), *DATA_ARGS])


def test_missing_export_folder_is_named(clarify_cache, tmp_path):
    with pytest.raises(FileNotFoundError, match="export folder not found"):
        main(["--export_dir", str(tmp_path / "nope"), "--out_dir", str(tmp_path), *DATA_ARGS])
