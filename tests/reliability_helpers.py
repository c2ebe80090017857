"""Helpers of the interruption tests: callbacks they inject into ``clarify fit`` (also in a subprocess, through a
YAML config), and :func:`interrupt_simulate_after_first_shard` for ``clarify simulate``."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from lightning.pytorch.callbacks import Callback

from clarify_lit.simulate.command import SHARD_DELAY_ENV

REPO = Path(__file__).resolve().parents[1]


def interrupt_simulate_after_first_shard(
    argv: list[str], out: Path, signum: int, cache: Path, timeout: float = 120
) -> int:
    """Run ``clarify simulate argv`` (writing to ``out``) in a subprocess that pauses 3 s after each shard, send it
    ``signum`` as soon as its first shard exists, and return its exit status (``-signum`` when the signal ended
    it)."""
    env = {
        **os.environ,
        SHARD_DELAY_ENV: "3",
        "OMP_NUM_THREADS": "1",
        "PYTHONPATH": str(REPO),
        "CLARIFY_CACHE": str(cache),
    }
    proc = subprocess.Popen(
        [sys.executable, "-m", "clarify_lit.simulate.command", *argv],
        cwd=REPO,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    first = out / "shards" / "shard-00000.jsonl"
    deadline = time.monotonic() + timeout
    try:
        while not first.exists():
            if proc.poll() is not None:
                pytest.fail(f"simulate exited early ({proc.returncode}): {proc.stderr.read().decode()[-2000:]}")
            if time.monotonic() > deadline:
                pytest.fail(f"no shard after {timeout:.0f} s")
            time.sleep(0.05)
        proc.send_signal(signum)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        proc.stderr.close()
    return proc.returncode


class SignalAtStep(Callback):
    """Sends ``signum`` to its own process as micro-batch ``micro_batch`` of the optimizer step after ``step`` done
    steps starts (0 = the step's first micro-batch; ``accumulate − 1`` = its last). ``signum`` 9 = SIGKILL (no
    cleanup at all), 15 = SIGTERM, 0 = a crash (an exception from the training loop)."""

    def __init__(self, step: int, signum: int = 9, micro_batch: int = 0):
        self.step, self.signum, self.micro_batch, self.sent = step, signum, micro_batch, False

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if (
            self.sent
            or trainer.global_step != self.step
            or batch_idx % trainer.accumulate_grad_batches != self.micro_batch
        ):
            return
        self.sent = True
        if self.signum == 0:
            raise RuntimeError("simulated crash")
        if self.signum == signal.SIGTERM and signal.getsignal(signal.SIGTERM) in (signal.SIG_DFL, None):
            # in-process tests: without Lightning's handler the signal would end the whole pytest run
            raise AssertionError("Lightning installed no SIGTERM handler")
        os.kill(os.getpid(), signal.Signals(self.signum))


class RecordBatches(Callback):
    """Keeps ``(epoch, global_step, sample ids)`` of every training micro-batch, whether it changed the weights, and
    the state at train start."""

    def __init__(self):
        self.batches: list[tuple[int, int, list[str]]] = []
        self.updated: list[bool] = []  # per micro-batch: did the trainable weights change
        self.start_step: int | None = None
        self.start_lr: float | None = None

    def on_train_start(self, trainer, pl_module):
        self.start_step = trainer.global_step
        self.start_lr = trainer.optimizers[0].param_groups[0]["lr"]

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.batches.append((trainer.current_epoch, trainer.global_step, list(batch["ids"])))
        self._before = [p.detach().clone() for p in pl_module.parameters() if p.requires_grad]

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        after = [p.detach() for p in pl_module.parameters() if p.requires_grad]
        self.updated.append(any(not torch.equal(a, b) for a, b in zip(after, self._before)))


def one_line_error(argv: list[str], capsys) -> tuple[int, str]:
    """``clarify <argv>`` in-process, expected to fail: (exit status, the one ``clarify …`` line on stderr). Fails the
    test on a stack trace or on more than one line of ours."""
    from clarify_lit.cli import main

    with pytest.raises(SystemExit) as e:
        main(argv)
    err = capsys.readouterr().err
    assert "Traceback" not in err, err[-3000:]
    lines = [x for x in err.splitlines() if x.startswith("clarify")]
    assert len(lines) == 1, err[-3000:]
    return e.value.code, lines[0]
