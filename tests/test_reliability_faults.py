"""Reliability, second pass (issue 17; docs/reliability.md): no silent no-op results (Refit and ``clarify iterate`` on
all-zero rewards), ``clarify report`` never pairs different questions, and the faults that used to end in a stack
trace — a chat template that raises, Ctrl-C during ``clarify simulate``, an argument check that left files behind —
end in one line."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from conftest import make_record
from reliability_helpers import one_line_error

from clarify_lit.cli import main
from clarify_lit.data.datamodule import ConversationDataModule
from clarify_lit.data.records import load_records, write_records
from clarify_lit.data.tasks import question_hash
from clarify_lit.data.tokenization import ChatTemplateError
from clarify_lit.simulate.command import SHARD_DELAY_ENV
from clarify_lit.train.objectives import Refit

REPO = Path(__file__).resolve().parents[1]
TINY = str(REPO / "configs/simulate/tiny-reasoning.yaml")
TINY_DATA = yaml.safe_load(Path(TINY).read_text())["data"]


# ----------------------------------------------------------------------------------------------------- no signal


def test_iterate_names_the_round_without_signal(tmp_path, capsys):
    """The tiny preset's policy never answers correctly: every conversation of round 0 scores 0, and iterate stops
    before fitting on them (Refit would exit 0 with an adapter that never moved), naming the round."""
    out = tmp_path / "it"
    cfg = tmp_path / "iterate.yaml"
    cfg.write_text(yaml.safe_dump({"data": {**TINY_DATA, "limit": 2}}))
    code, line = one_line_error(
        [
            "iterate",
            "--config",
            str(cfg),
            "--rounds",
            "2",
            "--output",
            str(out),
            "--model",
            "tiny-random",
            "--in_process",
            "true",
            "--model_config",
            str(REPO / "configs/model/tiny.yaml"),
            "--trainer_config",
            str(REPO / "configs/trainer/cpu.yaml"),
            "--objective_config",
            str(REPO / "configs/objective/refit.yaml"),
            "--rollout.temperatures",
            "[0.0]",
            "--n_questions",
            "1",
            "--rollout.max_new_tokens",
            "4",
            "--reward.kind",
            "correct",
            "--progress",
            "false",
        ],
        capsys,
    )
    conversations = out / "round_000" / "simulate" / "conversations.jsonl"
    assert code == 1 and line == (
        f"clarify iterate: error: round 0 has no signal: all 2 conversations its policy "
        f"logged ({conversations}) have reward 0, so its fit would leave the policy "
        "unchanged; stopped before round 0's fit (give the policy more tokens or turns, or "
        "another reward)"
    )
    assert not (out / "round_000" / "fit").exists()


# ----------------------------------------------------------------------------------------------------- report


def evaluation(folder: Path, method: str, dataset: str, question: str, *, hashed: bool = True) -> Path:
    """A ``clarify evaluate`` output written by hand: 3 questions, rollouts with ``meta.question_hash``."""
    rows = []
    for t in range(3):
        rec = make_record(t, 0, float(t % 2), dataset=dataset, prediction="A" if t % 2 else "B")
        if hashed:
            rec["meta"]["question_hash"] = question_hash(f"{question} {t}", ["a", "b", "c", "d"], "A")
        rec["meta"]["evaluated"] = method  # two methods' rollouts are never byte-identical (a copy is refused)
        rows.append(rec)
    write_records(folder / "rollouts.jsonl", rows)
    metrics = {"n": 3.0, "accuracy": 1 / 3, "accuracy_se": 0.3, "reward": 1 / 3, "reward_se": 0.3}
    (folder / "metrics.json").write_text(
        json.dumps({"metrics": metrics, "meta": {"method": method, "dataset": dataset, "rollouts": "rollouts.jsonl"}})
    )
    return folder


def test_report_refuses_to_pair_different_questions_under_the_same_ids(tmp_path, capsys):
    a = evaluation(tmp_path / "base", "Base", "sciq", "Which gas do plants take in?")
    b = evaluation(tmp_path / "refit", "Refit", "sciq", "What do bees make?")  # same label and ids, other questions
    code, line = one_line_error(["report", str(a), str(b), "--out", str(tmp_path / "r.md")], capsys)
    assert code == 1 and line.startswith(
        "clarify report: error: Refit vs Base: 3 of 3 shared task ids hold different "
        "questions (text, options or gold) in the two evaluations, e.g. 't0'"
    ), line
    assert "rollouts.jsonl:line 1" in line and not (tmp_path / "r.md").exists()
    same = evaluation(tmp_path / "refit2", "Refit", "sciq", "Which gas do plants take in?")
    text = run_report(capsys, a, same, out=tmp_path / "ok.md")
    assert "Refit vs Base" in text and "Warning" not in text
    old = evaluation(tmp_path / "old", "Refit", "sciq", "What do bees make?", hashed=False)  # written before hashes
    assert "Refit vs Base" in run_report(capsys, a, old, out=tmp_path / "old.md")


def run_report(capsys, *inputs: Path, out: Path) -> str:
    main(["report", *map(str, inputs), "--out", str(out)])
    capsys.readouterr()
    return out.read_text()


def test_report_warns_when_the_table_mixes_datasets(tmp_path, capsys):
    a = evaluation(tmp_path / "base", "Base", "sciq", "Which gas do plants take in?")
    b = evaluation(tmp_path / "refit", "Refit", "openbookqa", "Which gas do plants take in?")
    main(["report", str(a), str(b), "--out", str(tmp_path / "r.md"), "--no_paired", "true"])
    warning = "the table mixes datasets (sciq: Base; openbookqa: Refit); its rows are not comparable"
    assert f"clarify report: warning: {warning}" in capsys.readouterr().err
    assert f"**Warning:** {warning}." in (tmp_path / "r.md").read_text()


def test_rollouts_store_the_question_hash(tmp_path):
    """What the report compares: every rollout record carries its question's content hash."""
    from clarify_lit.data.tasks import load_tasks

    cfg = tmp_path / "evaluate.yaml"
    cfg.write_text(yaml.safe_dump({"data": {**TINY_DATA, "part": "test"}}))
    main(
        [
            "evaluate",
            "--config",
            str(cfg),
            "--model",
            "tiny-random",
            "--out_dir",
            str(tmp_path / "eval"),
            "--n_questions",
            "1",
            "--rollout.max_new_tokens",
            "2",
            "--progress",
            "false",
        ]
    )
    (rec,), _ = load_records(tmp_path / "eval" / "rollouts.jsonl")
    task = next(
        t
        for t in load_tasks(
            "local",
            path=TINY_DATA["path"],
            columns=TINY_DATA["columns"],
            n_train=6,
            n_test=2,
            part="test",
            label="tiny",
        )
        if t.task_id == rec.task_id
    )
    assert rec.meta["question_hash"] == task.content_hash == question_hash(task.question, task.choices, task.gold)


# ----------------------------------------------------------------------------------------------------- tracebacks


@pytest.fixture
def gemma_like(tiny_model_dir, tmp_path) -> Path:
    """The tiny model with a chat template that refuses a system message, as Gemma's does."""
    folder = tmp_path / "no-system-role"
    shutil.copytree(tiny_model_dir, folder)
    template = folder / "chat_template.jinja"
    template.write_text(
        "{%- if messages[0]['role'] == 'system' %}{{ raise_exception('System role not supported') }}"
        "{%- endif %}" + template.read_text()
    )
    return folder


def test_a_chat_template_that_raises_is_named_and_fold_trains(gemma_like, records_factory, tmp_path, capsys):
    records = records_factory()
    dm = ConversationDataModule(
        [str(records)],
        tokenizer_name_or_path=str(gemma_like),
        val_fraction=0.0,
        objective=Refit(),
        cache_tokenized=False,
    )
    with pytest.raises(ChatTemplateError) as e:
        dm.setup("fit")
    assert str(e.value) == (
        f"{records}:line 1 (id='t0-r0'): field 'messages': the tokenizer's chat template refused "
        "the conversation (System role not supported); this template accepts no system message: "
        "set --data.system_prompt fold to merge it into the first user turn"
    )
    code, line = one_line_error(
        [
            "fit",
            f"--data.train_files=[{records}]",
            f"--model.model_name_or_path={gemma_like}",
            f"--trainer.default_root_dir={tmp_path / 'run'}",
            "--trainer.max_steps=1",
            "--data.val_fraction=0",
        ],
        capsys,
    )
    assert code == 1 and "System role not supported" in line and "--data.system_prompt fold" in line
    dm = ConversationDataModule(
        [str(records)],
        tokenizer_name_or_path=str(gemma_like),
        val_fraction=0.0,
        objective=Refit(),
        cache_tokenized=False,
        system_prompt="fold",
    )
    dm.setup("fit")
    text = dm.tokenizer.decode(dm.train_set.samples[0]["input_ids"])
    assert "You are an expert at multiple-choice questions.\n\nQuestion 0" in text  # the system prompt, folded in
    code, line = one_line_error(
        [
            "simulate",
            "--config",
            TINY,
            "--model",
            str(gemma_like),
            "--output",
            str(tmp_path / "sim"),
            "--data.limit",
            "1",
            "--progress",
            "false",
        ],
        capsys,
    )
    assert (
        code == 1 and "the chat template of" in line and "refused the conversation (System role not supported)" in line
    ), line


@pytest.mark.slow
def test_ctrl_c_during_simulate_exits_130_saying_what_was_kept(tmp_path, cache_root):
    out = tmp_path / "sim"
    argv = [
        "simulate",
        "--config",
        TINY,
        "--output",
        str(out),
        "--data.limit",
        "4",
        "--chunk_size",
        "2",
        "--rollout.temperatures",
        "[0.0]",
        "--rollout.max_new_tokens",
        "4",
        "--progress",
        "false",
    ]
    env = {
        **os.environ,
        SHARD_DELAY_ENV: "3",
        "OMP_NUM_THREADS": "1",
        "PYTHONPATH": str(REPO),
        "CLARIFY_CACHE": str(cache_root),
    }
    proc = subprocess.Popen(
        [sys.executable, "-m", "clarify_lit.cli", *argv],
        cwd=REPO,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )  # as a terminal gives it
    deadline = time.monotonic() + 120
    try:
        while not (out / "shards" / "shard-00000.jsonl").exists():
            assert proc.poll() is None, proc.stderr.read()[-2000:]
            assert time.monotonic() < deadline, "no shard after 120 s"
            time.sleep(0.05)
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 130 and "Traceback" not in err, err[-3000:]
    ours = [x for x in err.splitlines() if x.startswith("clarify")]
    assert ours == [
        f"clarify simulate: interrupted (Ctrl-C); kept 1 finished shard(s) in {out / 'shards'}; finish "
        "with the same command and --resume true"
    ], err[-3000:]
    main([*argv, "--resume", "true"])
    assert len(load_records(out / "conversations.jsonl")[0]) == 4


def test_a_failed_simulate_check_leaves_nothing_that_refuses_the_corrected_command(tmp_path, capsys):
    out = tmp_path / "sim"
    code, line = one_line_error(
        ["simulate", "--config", TINY, "--model", "./no/such/model", "--output", str(out), "--progress", "false"],
        capsys,
    )
    assert code == 1 and "model folder not found: ./no/such/model" in line
    assert not (out / "run_config.json").exists()  # the corrected command is not refused as "already holds …"


def test_samples_cut_to_max_length_are_counted_and_logged(records_factory, tiny_model_dir, caplog):
    rows = [make_record(t, r, 1.0) for t in range(2) for r in range(2)]
    rows[0]["messages"][1]["content"] += " Think of the light, the water and the leaves." * 20
    path = write_records(records_factory().with_name("long.jsonl"), rows)
    dm = ConversationDataModule(
        [str(path)],
        tokenizer_name_or_path=str(tiny_model_dir),
        val_fraction=0.0,
        objective=Refit(),
        cache_tokenized=False,
        max_length=400,
    )
    with caplog.at_level("WARNING", logger="clarify_lit.data.datamodule"):
        dm.setup("fit")
    assert dm.stats["data/train_truncated_samples"] == 1.0
    line = next(r.getMessage() for r in caplog.records if "cut to max_length" in r.getMessage())
    assert line.startswith("train: 1 of 4 samples were cut to max_length=400 (")


def test_a_full_disk_during_the_merged_export_names_the_folder_and_leaves_nothing(
    tiny_model_dir, tmp_path, monkeypatch
):
    import clarify_lit.train.export as export
    from clarify_lit.train.module import ClarifyModule

    def disk_full(module, folder, *args):
        (folder / "README.md").write_text("half a model card")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(export, "_describe", disk_full)
    folder = tmp_path / "run" / "export_merged"
    with pytest.raises(OSError) as e:
        export.export_merged(ClarifyModule(str(tiny_model_dir), lora_r=4), folder)
    assert str(e.value) == (
        f"[Errno 28] writing the merged export {folder} failed: No space left on device; nothing "
        "was left there (the previous export, if any, is unchanged)"
    )
    assert list((tmp_path / "run").iterdir()) == []  # no half folder, no temp folder


def test_a_full_disk_while_merging_shards_names_the_file_and_leaves_no_temp(tmp_path, monkeypatch):
    """``clarify simulate``'s final merge (and every other atomic write): the error names the file, no temp is left."""
    import shutil as shutil_module

    from clarify_lit.data.records import concat_files

    parts = [write_records(tmp_path / f"shard-{k}.jsonl", [make_record(k, 0, 1.0)]) for k in range(2)]

    def disk_full(src, dst, *args):
        dst.write(b"half")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(shutil_module, "copyfileobj", disk_full)
    target = tmp_path / "sim" / "conversations.jsonl"
    with pytest.raises(OSError) as e:
        concat_files(parts, target)
    assert str(e.value) == f"[Errno 28] No space left on device: '{target}'"
    assert list(target.parent.iterdir()) == []
