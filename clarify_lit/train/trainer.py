"""``ClarifyTrainer``: Lightning's ``Trainer`` whose ``precision`` also takes ``auto``.

``--trainer.precision auto`` (``configs/trainer/cpu-auto.yaml``, the demo's and ``clarify iterate``'s default) is
resolved before Lightning builds anything: ``bf16-mixed`` where the training device computes bf16 natively (a CPU
with ``avx512_bf16`` or ``amx_bf16``, a GPU with bf16: :func:`clarify_lit.models.resolve_dtype`, the rule every
``dtype: auto`` follows), else ``32-true``. On a CPU without native bf16, bf16 autocast is emulated and slower than
fp32 (docs/environment.md). The choice is printed once; ``trainer.precision`` (the model card, the reference cache's
key, ``run_info.json``) holds the resolved value, ``config.yaml`` the requested one. Every other precision passes
through unchanged, and LightningCLI validates the option against this signature (a typo is an error, not a default).
"""

from __future__ import annotations

import sys
from typing import Any, Literal

import lightning as L
import torch
from lightning.fabric.connector import _PRECISION_INPUT
from lightning.pytorch.accelerators import Accelerator

from clarify_lit.models import resolve_dtype

#: what ``--trainer.precision`` accepts: Lightning's precisions, or ``auto``
PrecisionChoice = Literal["auto"] | _PRECISION_INPUT


def training_device(accelerator: str | Accelerator) -> str:
    """The device type a trainer with this ``accelerator`` trains on: ``cuda`` or ``cpu`` (``auto``: CUDA when
    available, as Lightning picks it). Any other accelerator (MPS, TPU …) is returned as its name."""
    if isinstance(accelerator, Accelerator):
        return type(accelerator).__name__.removesuffix("Accelerator").lower()
    name = str(accelerator).lower()
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return "cuda" if name == "gpu" else name


def resolve_precision(
    precision: PrecisionChoice | None, accelerator: str | Accelerator = "auto"
) -> _PRECISION_INPUT | None:
    """``auto`` → ``bf16-mixed`` where ``dtype: auto`` would pick bfloat16 on the training device, else ``32-true``
    (printed once); any other value unchanged."""
    if precision != "auto":
        return precision
    device = training_device(accelerator)
    if device not in ("cpu", "cuda"):
        raise ValueError(
            f"--trainer.precision auto: no rule for accelerator {accelerator!r}; set the precision "
            "explicitly (e.g. 32-true or bf16-mixed)"
        )
    chosen = "bf16-mixed" if resolve_dtype("auto", device) == "bfloat16" else "32-true"
    print(f"[clarify] trainer.precision auto -> {chosen} on {device}", file=sys.stderr)
    return chosen


class ClarifyTrainer(L.Trainer):
    """``lightning.Trainer`` with ``precision: auto`` (see the module docstring); every other argument is
    Lightning's own."""

    def __init__(
        self, *, accelerator: str | Accelerator = "auto", precision: PrecisionChoice | None = None, **kwargs: Any
    ) -> None:
        """Args:
        accelerator: as ``lightning.Trainer`` (``cpu``, ``gpu``, ``auto`` …).
        precision: as ``lightning.Trainer``, or ``auto``: ``bf16-mixed`` where the training device computes bf16
            natively (a CPU with avx512_bf16 or amx_bf16, a GPU with bf16), else ``32-true``.
        """
        super().__init__(accelerator=accelerator, precision=resolve_precision(precision, accelerator), **kwargs)
