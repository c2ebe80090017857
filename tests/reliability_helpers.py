"""Callbacks the reliability tests inject into ``clarify fit`` (also in a subprocess, through a YAML config)."""

from __future__ import annotations

import os
import signal

import torch
from lightning.pytorch.callbacks import Callback


class SignalAtStep(Callback):
    """Sends ``signum`` to its own process as micro-batch ``micro_batch`` of the optimizer step after ``step`` done
    steps starts (0 = the step's first micro-batch; ``accumulate − 1`` = its last). ``signum`` 9 = SIGKILL (no
    cleanup at all), 15 = SIGTERM, 0 = a crash (an exception from the training loop)."""

    def __init__(self, step: int, signum: int = 9, micro_batch: int = 0):
        self.step, self.signum, self.micro_batch, self.sent = step, signum, micro_batch, False

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if self.sent or trainer.global_step != self.step or \
                batch_idx % trainer.accumulate_grad_batches != self.micro_batch:
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
