"""On-disk cache of DPO reference log-probs (``DPO(reference="precomputed")``).

The reference log-probs of a preference pair depend only on the reference weights, the numeric precision of the
forward and the pair's tokens. So they are stored in one file per (reference weights, precision) under
``$CLARIFY_CACHE/reference_logps/``, as a table ``{pair key: (chosen, rejected)}``:

* **model key**: a BLAKE2 hash of the reference parameters (names, shapes, dtypes and bytes) — with LoRA the frozen base
  weights (the adapter is disabled for the reference), with full fine-tuning every weight as it is at fit start — plus
  the precision of the forward (``bf16-mixed`` and ``32-true`` give different numbers). Hashing reads each weight once
  (about a second for a 135M model; far less than one reference pass over the data).
* **pair key**: a hash of the pair's chosen/rejected ``input_ids`` and ``labels``. Changing the data (records, chat
  template, ``max_length``, the objective's view) changes the tokens, so changed pairs miss and are computed again,
  while unchanged ones hit; two different datasets on the same model share the file.

Writes are atomic (temp file + rename), so DDP ranks that compute the same table at once never leave a broken file.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Iterable
from pathlib import Path

import torch

from clarify_lit.io import atomic_write, cache_dir

log = logging.getLogger(__name__)
CACHE_VERSION = 1
PAIR_FIELDS = ("chosen_input_ids", "chosen_labels", "rejected_input_ids", "rejected_labels")


def fingerprint_parameters(named_tensors: Iterable[tuple[str, torch.Tensor]]) -> str:
    """Content hash of named tensors (order-independent: sorted by name)."""
    h = hashlib.blake2b(digest_size=16)
    for name, t in sorted(named_tensors, key=lambda kv: kv[0]):
        t = t.detach().cpu().contiguous()
        h.update(f"{name}|{tuple(t.shape)}|{t.dtype}|".encode())
        if t.numel():
            h.update(t.reshape(-1).view(torch.uint8).numpy().data)
    return h.hexdigest()


def reference_parameters(model) -> list[tuple[str, torch.Tensor]]:
    """The tensors that define the reference policy: a PEFT model's weights without its adapters (the reference is
    the adapter-disabled model), otherwise every parameter."""
    if hasattr(model, "peft_config"):
        return [(n, p) for n, p in model.named_parameters() if "lora_" not in n and "modules_to_save" not in n]
    return list(model.named_parameters())


def pair_key(sample: dict) -> str:
    """Hash of a tokenized preference pair's token ids and labels."""
    h = hashlib.blake2b(digest_size=16)
    h.update(json.dumps([sample[f] for f in PAIR_FIELDS], separators=(",", ":")).encode())
    return h.hexdigest()


class ReferenceCache:
    """The cached reference log-probs of one (reference weights, precision)."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.table: dict[str, tuple[float, float]] = {}
        self.hits = self.misses = 0
        self._dirty = False
        if self.path.exists():
            try:
                data = torch.load(self.path, weights_only=True)
                if data.get("version") == CACHE_VERSION:
                    self.table = {k: (float(c), float(r)) for k, (c, r) in data["logps"].items()}
            except Exception as e:  # a broken cache is a cache miss, never an error
                log.warning("ignoring unreadable reference cache %s (%s)", self.path, e)

    @classmethod
    def for_model(cls, model, precision: str, folder: str | Path | None = None) -> ReferenceCache:
        key = fingerprint_parameters(reference_parameters(model))
        safe = "".join(c if c.isalnum() or c in "-_" else "_" for c in str(precision))
        return cls(Path(folder or cache_dir() / "reference_logps") / f"{key}-{safe}.pt")

    def fill(self, samples: list[dict]) -> list[dict]:
        """Set ``ref_chosen_logps``/``ref_rejected_logps`` on the samples found in the cache; return the others."""
        missing = []
        for s in samples:
            hit = self.table.get(pair_key(s))
            if hit is None:
                missing.append(s)
            else:
                s["ref_chosen_logps"], s["ref_rejected_logps"] = hit
        self.hits += len(samples) - len(missing)
        self.misses += len(missing)
        return missing

    def add(self, samples: list[dict]) -> None:
        for s in samples:
            self.table[pair_key(s)] = (float(s["ref_chosen_logps"]), float(s["ref_rejected_logps"]))
        self._dirty = self._dirty or bool(samples)

    def save(self) -> None:
        if not self._dirty:
            return
        with atomic_write(self.path, "wb") as f:
            torch.save({"version": CACHE_VERSION, "logps": {k: list(v) for k, v in self.table.items()}}, f)
        self._dirty = False
