"""Reliability, interrupted training (docs/reliability.md): ``clarify fit`` stopped by SIGTERM and killed by SIGKILL
resumes with ``--ckpt_path last`` to the same global step, optimizer, scheduler, data order and final weights as an
uninterrupted run; checkpoints are written atomically; non-finite losses stop training naming the batch (or are
skipped and counted)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from conftest import make_record
from reliability_helpers import RecordBatches

from clarify_lit.cli import ClarifyCLI, lightning_main, main
from clarify_lit.data.records import write_records
from clarify_lit.train.checkpointing import AtomicCheckpointIO, ResumeState, atomic_torch_save
from clarify_lit.train.module import ClarifyModule

REPO = Path(__file__).resolve().parents[1]
TESTS = Path(__file__).resolve().parent

# 4 tasks × 3 runs, one task held out for validation: 9 training conversations = 5 micro-batches of 2 per epoch,
# 3 optimizer steps per epoch with accumulate_grad_batches=2 (the last step has one micro-batch); 6 steps = 2 epochs.
# LoRA dropout stays at its default 0.05, so an exact match also needs the RNG state restored.
MAX_STEPS = 6


def fit_args(records: Path, root: Path, *extra: str) -> list[str]:
    return [
        "fit",
        f"--data.train_files=[{records}]",
        "--data.skip_invalid_records=true",
        "--seed_everything=0",
        "--trainer.deterministic=true",
        "--data.batch_size=2",
        "--trainer.accumulate_grad_batches=2",
        "--data.val_fraction=0.25",
        f"--trainer.max_steps={MAX_STEPS}",
        f"--trainer.default_root_dir={root}",
        "--trainer.enable_progress_bar=false",
        "--trainer.enable_model_summary=false",
        "--trainer.log_every_n_steps=1",
        "--model.learning_rate=1e-3",
        "--model.export_on_fit_end=false",
        *extra,
    ]


def signal_config(tmp_path: Path, step: int, signum: int, micro_batch: int = 0) -> Path:
    path = tmp_path / f"signal-{signum}-{step}.yaml"
    path.write_text(
        yaml.safe_dump(
            {
                "trainer": {
                    "callbacks": [
                        {
                            "class_path": "reliability_helpers.SignalAtStep",
                            "init_args": {"step": step, "signum": signum, "micro_batch": micro_batch},
                        }
                    ]
                }
            }
        )
    )
    return path


def fit_recording(args: list[str]):
    """``clarify fit`` in-process with a :class:`RecordBatches` callback; returns ``(cli, recorder)``."""
    rec = RecordBatches()
    orig = ClarifyCLI._instantiate_trainer

    def with_recorder(self, config, callbacks):
        return orig(self, config, [*callbacks, rec])

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(ClarifyCLI, "_instantiate_trainer", with_recorder)
        cli = lightning_main(args)
    return cli, rec


def load_ckpt(root: Path) -> dict:
    return torch.load(root / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)


@pytest.fixture(scope="module")
def records(tmp_path_factory) -> Path:
    """12 good records and 2 invalid ones (skipped and counted under ``skip_invalid_records``)."""
    rows = [make_record(t, r, [1.0, 0.0, 0.5][r]) for t in range(4) for r in range(3)]
    bad = make_record(9, 0, "high")
    path = write_records(tmp_path_factory.mktemp("data") / "records.jsonl", rows[:5] + [bad] + rows[5:])
    with path.open("a", encoding="utf-8") as f:
        f.write('{"id": "truncated", "task_id"\n')
    return path


@pytest.fixture(scope="module")
def reference(records, cache_root, tmp_path_factory):
    """The uninterrupted run: ``(root, recorder, cli)``."""
    root = tmp_path_factory.mktemp("reference")
    threads = torch.get_num_threads()
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("CLARIFY_CACHE", str(cache_root))
        torch.set_num_threads(1)  # as in the tests that compare with it (conftest's single_torch_thread)
        try:
            cli, rec = fit_recording(fit_args(records, root))
        finally:
            torch.set_num_threads(threads)
    assert cli.trainer.global_step == MAX_STEPS
    return root, rec, cli


@pytest.mark.slow
def test_sigterm_then_sigkill_then_resume_equals_an_uninterrupted_run(
    reference, records, cache_root, tmp_path, capsys, monkeypatch
):
    monkeypatch.setenv("CLARIFY_CACHE", str(cache_root))
    ref_root, ref, _ = reference
    root = tmp_path / "run"

    # 1. SIGTERM during the last micro-batch of step 2 (mid-epoch): Lightning stops after that batch, ResumeState
    #    saves last.ckpt at step 2, and clarify exits 143 with one line (not Lightning's status 0)
    with pytest.raises(SystemExit) as e:
        main(fit_args(records, root, "--config", str(signal_config(tmp_path, step=1, signum=15, micro_batch=1))))
    assert e.value.code == 143
    err = capsys.readouterr().err
    assert "Traceback" not in err
    assert (
        f"clarify fit: stopped by SIGTERM at step 2; last checkpoint {root / 'checkpoints' / 'last.ckpt'}, "
        "resume with --ckpt_path last" in err.strip().splitlines()
    )
    first = load_ckpt(root)
    assert first["global_step"] == 2
    # the data position: 4 micro-batches (of the epoch's 5) trained
    assert first["ConversationDataModule"]["train_loader"] == {"micro_batches": 4, "per_epoch": 5, "seed": 0}

    # 2. resume in a subprocess, SIGKILLed (no cleanup at all) as step 5 is about to start: the last checkpoint is
    #    the one ModelCheckpoint wrote at the end of epoch 0 (step 3)
    env = {
        **os.environ,
        "CLARIFY_CACHE": str(cache_root),
        "OMP_NUM_THREADS": "1",
        "PYTHONPATH": os.pathsep.join([str(TESTS), str(REPO)]),
    }
    cmd = [
        sys.executable,
        "-m",
        "clarify_lit.cli",
        *fit_args(records, root, "--ckpt_path", "last", "--config", str(signal_config(tmp_path, step=4, signum=9))),
    ]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-3000:]
    second = load_ckpt(root)
    assert second["global_step"] == 3 and second["epoch"] == 0
    assert not list((root / "checkpoints").glob("*.partial"))

    # 3. resume again, in-process, to the end
    cli, rec = fit_recording(fit_args(records, root, "--ckpt_path", "last"))
    assert rec.start_step == 3
    assert cli.trainer.global_step == MAX_STEPS
    # the same micro-batches in the same order as the uninterrupted run from there on (epoch 1 from its start)
    assert rec.batches == ref.batches[5:], (rec.batches, ref.batches)
    assert [b[2] for b in ref.batches[:5]] != [b[2] for b in ref.batches[5:10]]  # epochs really are reshuffled

    want, got = load_ckpt(ref_root), load_ckpt(root)
    assert got["global_step"] == want["global_step"] == MAX_STEPS
    assert got["state_dict"].keys() == want["state_dict"].keys() and got["state_dict"]
    for k, v in want["state_dict"].items():
        torch.testing.assert_close(got["state_dict"][k], v, rtol=0, atol=1e-6, msg=lambda m, k=k: f"{k}: {m}")
    opt_want, opt_got = want["optimizer_states"][0]["state"], got["optimizer_states"][0]["state"]
    assert opt_got.keys() == opt_want.keys()
    for i in opt_want:
        assert float(opt_got[i]["step"]) == float(opt_want[i]["step"]) == MAX_STEPS
        for name in ("exp_avg", "exp_avg_sq"):
            torch.testing.assert_close(opt_got[i][name], opt_want[i][name], rtol=0, atol=1e-8)
    sched_want, sched_got = want["lr_schedulers"][0], got["lr_schedulers"][0]
    assert sched_got["last_epoch"] == sched_want["last_epoch"] == MAX_STEPS
    assert sched_got["_last_lr"] == sched_want["_last_lr"]


@pytest.mark.slow
def test_crash_mid_step_resumes_from_per_step_checkpoints(reference, records, cache_root, tmp_path, monkeypatch):
    """With a ModelCheckpoint every step (docs/reliability.md: for long epochs), a crash in the middle of an
    accumulation step loses only that step: the resume restarts it from its first micro-batch."""
    monkeypatch.setenv("CLARIFY_CACHE", str(cache_root))
    ref_root, ref, _ = reference
    root = tmp_path / "run"
    checkpoint = {
        "class_path": "clarify_lit.train.checkpointing.LastCheckpoint",  # the snippet in the docs
        "init_args": {
            "dirpath": str(root / "checkpoints"),
            "save_last": True,
            "save_top_k": 0,
            "every_n_train_steps": 1,
        },
    }
    every_step, crash = tmp_path / "every-step.yaml", tmp_path / "every-step-crash.yaml"
    every_step.write_text(yaml.safe_dump({"trainer": {"callbacks": [checkpoint]}}))
    # (one list: a second --config's callbacks would replace the first's) the 2nd micro-batch of the 5th step
    crash.write_text(
        yaml.safe_dump(
            {
                "trainer": {
                    "callbacks": [
                        checkpoint,
                        {
                            "class_path": "reliability_helpers.SignalAtStep",
                            "init_args": {"step": 4, "signum": 0, "micro_batch": 1},
                        },
                    ]
                }
            }
        )
    )
    with pytest.raises(RuntimeError, match="simulated crash"):
        lightning_main(fit_args(records, root, "--config", str(crash)))
    ckpt = load_ckpt(root)
    assert ckpt["global_step"] == 4 and ckpt["ConversationDataModule"]["train_loader"]["micro_batches"] == 7
    cli, rec = fit_recording(fit_args(records, root, "--ckpt_path", "last", "--config", str(every_step)))
    assert rec.start_step == 4 and rec.batches == ref.batches[7:]
    want, got = load_ckpt(ref_root), load_ckpt(root)
    for k, v in want["state_dict"].items():
        torch.testing.assert_close(got["state_dict"][k], v, rtol=0, atol=1e-6, msg=lambda m, k=k: f"{k}: {m}")


@pytest.mark.slow
def test_sigterm_mid_accumulation_keeps_the_last_step_checkpoint(
    reference, records, cache_root, tmp_path, capsys, monkeypatch
):
    """SIGTERM after the first micro-batch of an accumulation step: saving there would lose that micro-batch's
    gradient on resume, so the checkpoint of step 1 stands and the resume redoes the next step whole."""
    monkeypatch.setenv("CLARIFY_CACHE", str(cache_root))
    ref_root, ref, _ = reference
    root = tmp_path / "run"
    cfg = tmp_path / "sigterm-every-step.yaml"
    cfg.write_text(
        yaml.safe_dump(
            {
                "trainer": {
                    "callbacks": [
                        {
                            "class_path": "clarify_lit.train.checkpointing.LastCheckpoint",
                            "init_args": {
                                "dirpath": str(root / "checkpoints"),
                                "save_last": True,
                                "save_top_k": 0,
                                "every_n_train_steps": 1,
                            },
                        },
                        {
                            "class_path": "reliability_helpers.SignalAtStep",
                            "init_args": {"step": 1, "signum": 15, "micro_batch": 0},
                        },
                    ]
                }
            }
        )
    )
    with pytest.raises(SystemExit) as e:
        main(fit_args(records, root, "--config", str(cfg)))
    assert e.value.code == 143
    assert (
        f"stopped by SIGTERM at step 1; last checkpoint {root / 'checkpoints' / 'last.ckpt'}" in capsys.readouterr().err
    )
    ckpt = load_ckpt(root)
    assert ckpt["global_step"] == 1 and ckpt["ConversationDataModule"]["train_loader"]["micro_batches"] == 2
    every_step = tmp_path / "every-step.yaml"
    every_step.write_text(
        yaml.safe_dump({"trainer": {"callbacks": yaml.safe_load(cfg.read_text())["trainer"]["callbacks"][:1]}})
    )
    cli, rec = fit_recording(fit_args(records, root, "--ckpt_path", "last", "--config", str(every_step)))
    assert rec.start_step == 1 and rec.batches == ref.batches[2:]
    want, got = load_ckpt(ref_root), load_ckpt(root)
    for k, v in want["state_dict"].items():
        torch.testing.assert_close(got["state_dict"][k], v, rtol=0, atol=1e-6, msg=lambda m, k=k: f"{k}: {m}")


def test_checkpointing_is_wired_in_by_default(reference):
    root, _, cli = reference
    assert isinstance(cli.trainer.strategy.checkpoint_io, AtomicCheckpointIO)
    assert any(isinstance(c, ResumeState) for c in cli.trainer.callbacks)
    ckpt = load_ckpt(root)
    assert set(ckpt["callbacks"]["ResumeState"]["rng"]) >= {"torch", "python", "numpy"}
    umask = os.umask(0)
    os.umask(umask)
    assert (root / "checkpoints" / "last.ckpt").stat().st_mode & 0o777 == 0o666 & ~umask


def test_skipped_records_are_counted_in_tensorboard(reference):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    root, _, cli = reference
    assert cli.datamodule.stats["data/skipped_records"] == 2.0
    (events,) = root.glob("events.out.tfevents.*")
    acc = EventAccumulator(str(events), size_guidance={"scalars": 0})
    acc.Reload()
    assert [e.value for e in acc.Scalars("data/skipped_records")] == [2.0]


# ------------------------------------------------------------------------------------------------ atomic writes
def test_failed_save_leaves_the_previous_checkpoint(tmp_path, monkeypatch):
    path = tmp_path / "checkpoints" / "last.ckpt"
    io = AtomicCheckpointIO()
    io.save_checkpoint({"global_step": 1, "w": torch.ones(3)}, path)

    def disk_full(obj, f):
        f.write(b"PK\x03\x04 half a checkpoint")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr("clarify_lit.train.checkpointing.torch.save", disk_full)
    with pytest.raises(OSError, match="No space left"):
        io.save_checkpoint({"global_step": 2, "w": torch.zeros(3)}, path)
    monkeypatch.undo()
    ckpt = io.load_checkpoint(path)
    assert ckpt["global_step"] == 1 and torch.equal(ckpt["w"], torch.ones(3))
    assert sorted(p.name for p in path.parent.iterdir()) == ["last.ckpt"]  # the partial file is gone


def test_kill_during_save_leaves_the_previous_checkpoint(tmp_path):
    """A process SIGKILLed in the middle of writing a checkpoint (forked child, killed by itself after half the bytes):
    ``last.ckpt`` still loads and holds the previous step; the next save clears the orphaned partial file."""
    import io as _io

    from lightning.pytorch.callbacks import ModelCheckpoint

    path = tmp_path / "checkpoints" / "last.ckpt"
    atomic_torch_save({"global_step": 1, "w": torch.arange(1000.0)}, path)
    pid = os.fork()
    if pid == 0:  # child: write half of step 2's checkpoint, then die without any cleanup
        try:
            import clarify_lit.train.checkpointing as ckpt_module

            real_save = torch.save

            def half_then_die(obj, f):
                buf = _io.BytesIO()
                real_save(obj, buf)
                f.write(buf.getvalue()[: len(buf.getvalue()) // 2])
                f.flush()
                os.kill(os.getpid(), signal.SIGKILL)

            ckpt_module.torch.save = half_then_die
            atomic_torch_save({"global_step": 2, "w": torch.zeros(1000)}, path)
        finally:
            os._exit(3)  # never reached when the kill works
    _, status = os.waitpid(pid, 0)
    assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL
    ckpt = torch.load(path, weights_only=True)
    assert ckpt["global_step"] == 1 and torch.equal(ckpt["w"], torch.arange(1000.0))
    (partial,) = [p for p in path.parent.iterdir() if p.name != "last.ckpt"]
    assert partial.name.startswith(".last.ckpt.") and partial.suffix == ".partial" and partial.stat().st_size > 0
    # Lightning's `--ckpt_path last` search never picks the orphan up
    cb = ModelCheckpoint(dirpath=str(path.parent))
    assert cb._find_last_checkpoints(None) == {str(path)}
    atomic_torch_save({"global_step": 3}, path)
    assert [p.name for p in path.parent.iterdir()] == ["last.ckpt"]


# ------------------------------------------------------------------------------------------------ non-finite losses
def _poison(monkeypatch, bad_id: str):
    """Make the loss of every batch holding ``bad_id`` NaN (as a diverging model would)."""
    orig = ClarifyModule._step

    def step(self, batch, stage):
        loss, metrics = orig(self, batch, stage)
        if stage == "train" and bad_id in batch["ids"]:
            loss = loss * float("nan")
        return loss, metrics

    monkeypatch.setattr(ClarifyModule, "_step", step)


def _nan_args(records: Path, root: Path, *extra: str) -> list[str]:
    return [
        "fit",
        f"--data.train_files=[{records}]",
        "--data.skip_invalid_records=true",
        "--data.val_fraction=0",
        "--data.batch_size=2",
        "--data.group_by_length=false",
        "--trainer.max_epochs=1",
        f"--trainer.default_root_dir={root}",
        "--trainer.enable_progress_bar=false",
        "--trainer.enable_model_summary=false",
        "--trainer.log_every_n_steps=1",
        "--model.export_on_fit_end=false",
        *extra,
    ]


def test_nonfinite_loss_stops_training_naming_the_batch(records, cache_root, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("CLARIFY_CACHE", str(cache_root))
    _poison(monkeypatch, "t2-r1")
    with pytest.raises(SystemExit) as e:
        main(_nan_args(records, tmp_path / "run"))
    assert e.value.code == 1
    (line,) = [x for x in capsys.readouterr().err.splitlines() if x.startswith("clarify fit: error:")]
    assert "non-finite training loss nan at global step" in line and "'t2-r1'" in line and "sample ids" in line


def test_nonfinite_loss_skip_option_skips_counts_and_logs(records, cache_root, tmp_path, monkeypatch):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    monkeypatch.setenv("CLARIFY_CACHE", str(cache_root))
    _poison(monkeypatch, "t2-r1")
    cli, rec = fit_recording(_nan_args(records, tmp_path / "run", "--model.on_nonfinite_loss=skip"))
    module = cli.model
    poisoned = [i for i, b in enumerate(rec.batches) if "t2-r1" in b[2]]
    assert len(poisoned) == 1 and module.nonfinite_skipped == 1 and len(rec.batches) == 6  # 12 samples / 2
    # the skipped batch has no gradient, so its optimizer step leaves the weights as they were; the others train
    assert rec.updated == [i not in poisoned for i in range(6)]
    assert all(torch.isfinite(p).all() for p in module.parameters())
    (events,) = (tmp_path / "run").glob("events.out.tfevents.*")
    acc = EventAccumulator(str(events), size_guidance={"scalars": 0})
    acc.Reload()
    assert {e.value for e in acc.Scalars("train/nonfinite_skipped")} == {1.0}  # the running count


def test_resume_state_survives_a_weights_only_load(reference):
    """The RNG state is stored as tensors and plain lists: ``torch.load(weights_only=True)`` (PyTorch's default)
    reads the checkpoint."""
    root, _, _ = reference
    ckpt = torch.load(root / "checkpoints" / "last.ckpt", weights_only=True)
    assert json.dumps(ckpt["callbacks"]["ResumeState"]["rng"]["numpy"][2:]) and ckpt["global_step"] == MAX_STEPS
