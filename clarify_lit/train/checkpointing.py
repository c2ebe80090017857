"""Checkpoints that survive interruptions (wired into ``clarify fit`` by default, see docs/reliability.md).

* :class:`AtomicCheckpointIO` writes each checkpoint to a temp file in the target's folder, fsyncs it and renames it
  over the target, so a kill during a save leaves the previous ``last.ckpt`` intact. (Lightning's own writer goes
  through a temp file in the system temp dir and ``shutil.move``, which degrades to copying *into* the target — a
  torn file — when that dir is on another filesystem, as it usually is on clusters.)
* :class:`ResumeState` stores the random-number generators' state in every checkpoint and puts it back when a fit
  resumes, so dropout draws the same masks as in an uninterrupted run; together with the DataModule's resumable
  batch order (``ConversationDataModule.state_dict``) a resumed fit retraces the uninterrupted one.
* :class:`LastCheckpoint` (the default checkpoint callback) writes ``last.ckpt`` at every epoch end.
* On SIGTERM (``kill``, a scheduler's preemption, ``docker stop``) Lightning stops after the current batch;
  :class:`ResumeState` then saves ``last.ckpt`` at that point (when it is an optimizer-step boundary) and
  ``clarify fit`` exits with status 143 and one line saying how to resume, instead of Lightning's status 0.
* Ctrl-C (SIGINT) is turned into the same stop (single-process fits): the fit stops after the current batch,
  ``last.ckpt`` is saved there (at an optimizer-step boundary) and ``clarify fit`` exits with status 130. A second
  Ctrl-C stops at once, as Lightning does (nothing saved).
"""

from __future__ import annotations

import contextlib
import logging
import os
import random
import signal
import threading
from pathlib import Path
from typing import Any

import torch
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from lightning.pytorch.utilities.exceptions import SIGTERMException

from clarify_lit.io import atomic_write

log = logging.getLogger(__name__)

PARTIAL_SUFFIX = ".partial"


def _is_local(path: str | os.PathLike) -> bool:
    return "://" not in str(path) or str(path).startswith("file://")


def atomic_torch_save(obj: Any, path: str | os.PathLike) -> Path:
    """``torch.save`` to ``.<name>.<random>.partial`` beside ``path``, fsync, then ``os.replace`` onto ``path``.

    A reader (or a resumed run) sees either the old file or the complete new one, never a torn one. A failure
    removes the temp file; a kill leaves it behind under a name no checkpoint glob matches, and the next save of the
    same target removes it.
    """
    path = Path(str(path).removeprefix("file://"))
    with atomic_write(path, "wb", suffix=PARTIAL_SUFFIX, clear_stale=True) as f:
        torch.save(obj, f)
    return path


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning's ``TorchCheckpointIO`` with an atomic local write (:func:`atomic_torch_save`); remote URLs
    (``s3://`` …) keep Lightning's own writer."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path, storage_options: Any | None = None) -> None:
        if storage_options is not None or not _is_local(path):
            return super().save_checkpoint(checkpoint, path, storage_options)
        atomic_torch_save(checkpoint, path)


class LastCheckpoint(ModelCheckpoint):
    """``ModelCheckpoint`` whose ``last.ckpt`` is also written at every epoch end (after validation, when there is
    one), not only when training ends: Lightning 2.6 writes ``save_last`` only together with a top-k checkpoint, so
    with ``save_top_k=0`` (``clarify fit``'s default: one file, no copies) a run killed in epoch 5 of 10 had no
    checkpoint at all. ``every_n_train_steps`` / ``train_time_interval`` add saves within an epoch as usual."""

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        super().on_train_epoch_end(trainer, pl_module)
        if self._should_save_on_train_epoch_end(trainer):
            self._save_last_if_due(trainer)

    def on_validation_end(self, trainer, pl_module) -> None:
        super().on_validation_end(trainer, pl_module)
        if not self._should_save_on_train_epoch_end(trainer):
            self._save_last_if_due(trainer)

    def on_train_end(self, trainer, pl_module) -> None:
        # Lightning writes last.ckpt at train end only if it never wrote one; after epoch-end saves the final state
        # (the last epoch, or max_steps reached mid-epoch) still has to be written
        if (
            self.save_last
            and self._last_checkpoint_saved
            and not trainer.fast_dev_run
            and self._last_global_step_saved != trainer.global_step
        ):
            self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))
            return
        super().on_train_end(trainer, pl_module)

    def _save_last_if_due(self, trainer) -> None:
        if (
            self.save_last
            and not self._should_skip_saving_checkpoint(trainer)
            and self._every_n_epochs >= 1
            and (trainer.current_epoch + 1) % self._every_n_epochs == 0
            and not _last_epoch(trainer)
        ):
            self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))


def _last_epoch(trainer) -> bool:
    """Training stops after this epoch: ``on_train_end`` writes ``last.ckpt`` then (one write, not two)."""
    max_epochs = trainer.max_epochs
    return (
        (trainer.max_steps != -1 and trainer.global_step >= trainer.max_steps)
        or trainer.should_stop
        or (max_epochs is not None and max_epochs != -1 and trainer.current_epoch + 1 >= max_epochs)
    )


def _rng_state() -> dict[str, Any]:
    import numpy as np

    np_state = np.random.get_state()
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "python": random.getstate(),
        # plain lists, so the checkpoint still loads with torch.load(weights_only=True)
        "numpy": [np_state[0], np_state[1].tolist(), *np_state[2:]],
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    import numpy as np

    torch.set_rng_state(state["torch"])
    random.setstate(_as_tuple(state["python"]))
    name, keys, *rest = state["numpy"]
    np.random.set_state((name, np.asarray(keys, dtype=np.uint32), *rest))
    cuda = state.get("cuda")
    if cuda is not None and torch.cuda.is_available():
        if len(cuda) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(cuda)
        else:
            log.warning(
                "resuming: the checkpoint holds the CUDA RNG of %d devices, this machine has %d; CUDA random "
                "streams start afresh",
                len(cuda),
                torch.cuda.device_count(),
            )


def _as_tuple(x):
    return tuple(_as_tuple(v) for v in x) if isinstance(x, list | tuple) else x


class ResumeState(Callback):
    """Keeps the RNG state in checkpoints (restored when training starts after ``--ckpt_path``) and saves
    ``last.ckpt`` when the fit is stopped by SIGTERM."""

    def __init__(self) -> None:
        self._pending: dict[str, Any] | None = None
        self.sigterm_checkpoint: str | None = None  # where the SIGTERM checkpoint went (for the CLI's message)
        self.sigterm_step: int | None = None
        self.sigint = False  # the stop came from Ctrl-C
        self._previous_sigint: Any = None

    def state_dict(self) -> dict[str, Any]:
        return {"rng": _rng_state()}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._pending = state_dict.get("rng")

    def on_train_start(self, trainer, pl_module) -> None:
        # restored here, not at load time: the sanity-check validation and setup in between must not shift the stream
        if self._pending is not None:
            _set_rng_state(self._pending)
            self._pending = None
        self._catch_sigint(trainer)

    def _catch_sigint(self, trainer) -> None:
        """First Ctrl-C: stop after the current batch as SIGTERM does (saving ``last.ckpt``); a second one: at once.
        Single process only: DDP ranks must agree on where to stop, which Lightning's own SIGTERM handling does."""
        current = signal.getsignal(signal.SIGINT)
        if (
            trainer.world_size != 1
            or threading.current_thread() is not threading.main_thread()
            # someone else's handler is left alone; a stale one of ours (an earlier fit in this process that ended
            # without its teardown) is replaced, else this fit's Ctrl-C would stop that dead trainer instead
            or (current is not signal.default_int_handler and not getattr(current, "clarify_fit_sigint", False))
        ):
            return
        connector = getattr(trainer, "_signal_connector", None)
        if connector is None or not hasattr(connector, "received_sigterm"):
            return

        def stop_after_this_batch(signum, frame):
            if self.sigint:  # the second Ctrl-C
                signal.signal(signal.SIGINT, signal.default_int_handler)
                raise KeyboardInterrupt
            self.sigint = True
            log.warning("Ctrl-C: stopping after this batch and saving last.ckpt (press Ctrl-C again to stop at once)")
            connector.received_sigterm = True

        stop_after_this_batch.clarify_fit_sigint = True
        signal.signal(signal.SIGINT, stop_after_this_batch)
        # what was there is Python's default or a stale handler of ours (the check above); either way the default
        # comes back at the end
        self._previous_sigint = signal.default_int_handler

    def _release_sigint(self) -> None:
        if self._previous_sigint is not None:
            with contextlib.suppress(ValueError):
                signal.signal(signal.SIGINT, self._previous_sigint)
            self._previous_sigint = None

    def on_train_end(self, trainer, pl_module) -> None:
        self._release_sigint()

    def teardown(self, trainer, pl_module, stage: str) -> None:
        self._release_sigint()

    def on_exception(self, trainer, pl_module, exception: BaseException) -> None:
        self._release_sigint()
        if not isinstance(exception, SIGTERMException):
            return
        if self.sigint:
            exception.clarify_signal = "SIGINT"
        self.sigterm_step = exception.clarify_step = trainer.global_step
        ckpt = next((c for c in trainer.checkpoint_callbacks if isinstance(c, ModelCheckpoint)), None)
        if ckpt is None or not ckpt.save_last:
            log.warning("SIGTERM: no ModelCheckpoint with save_last; nothing saved at step %d", trainer.global_step)
            return
        if trainer.sanity_checking or trainer.state.fn != "fit":
            return
        if trainer.training and trainer.fit_loop.epoch_loop._should_accumulate():
            # part of an optimizer step's gradient exists only in memory: saving here would lose it on resume
            log.warning("SIGTERM arrived in the middle of a gradient-accumulation step; the last checkpoint stands")
            self.sigterm_checkpoint = exception.clarify_checkpoint = ckpt.last_model_path or None
            return
        if ckpt._last_global_step_saved != trainer.global_step or not ckpt.last_model_path:
            ckpt._save_last_checkpoint(trainer, ckpt._monitor_candidates(trainer))
        self.sigterm_checkpoint = exception.clarify_checkpoint = ckpt.last_model_path or None
        log.warning("SIGTERM: saved %s at step %d", self.sigterm_checkpoint, trainer.global_step)
