"""A Lightning callback for the DDP test (``tests/test_ddp.py``), loaded by ``clarify fit`` in its subprocesses via
``--trainer.callbacks``: each rank writes what it trained on and saw to ``<out_dir>/rank<r>.json``."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch
from lightning.pytorch.callbacks import Callback


class ShardProbe(Callback):
    def __init__(self, out_dir: str):
        self.out_dir = Path(out_dir)
        self.train_ids: list[list[str]] = []  # per epoch
        self.val_losses: list[float] = []  # this rank's own validation batch losses (last validation run)

    def on_train_epoch_start(self, trainer, pl_module):
        self.train_ids.append([])

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.train_ids[-1].extend(batch["ids"])

    def on_validation_epoch_start(self, trainer, pl_module):
        self.val_losses = []

    def on_validation_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0):
        self.val_losses.append(float(outputs))

    def on_fit_end(self, trainer, pl_module):
        h = hashlib.sha256()
        for name, p in sorted(pl_module.named_parameters()):
            if p.requires_grad:
                h.update(name.encode())
                h.update(p.detach().to(torch.float64).cpu().numpy().tobytes())
        self.out_dir.mkdir(parents=True, exist_ok=True)
        torch.save(
            {n: p.detach().cpu() for n, p in pl_module.named_parameters() if p.requires_grad},
            self.out_dir / f"rank{trainer.global_rank}.pt",
        )
        (self.out_dir / f"rank{trainer.global_rank}.json").write_text(
            json.dumps(
                {
                    "rank": trainer.global_rank,
                    "world_size": trainer.world_size,
                    "train_ids": self.train_ids,
                    "val_losses": self.val_losses,
                    "trainable_hash": h.hexdigest(),
                    "metrics": {k: float(v) for k, v in trainer.callback_metrics.items() if v.numel() == 1},
                    # DPO with a precomputed reference: what this rank computed, and the values it holds for every pair
                    "reference_pairs_computed": getattr(pl_module, "reference_pairs_computed", 0),
                    "ref_logps": {
                        s["id"]: [s["ref_chosen_logps"], s["ref_rejected_logps"]]
                        for s in trainer.datamodule.train_set.samples
                        if "ref_chosen_logps" in s
                    },
                }
            )
        )
