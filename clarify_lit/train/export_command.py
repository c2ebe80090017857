"""``clarify export``: write a run's policy as an HF folder, after the fit, from its checkpoint.

Examples::

    clarify export --run_dir runs/swift --merge true                      # runs/swift/export_merged (training dtype)
    clarify export --run_dir runs/swift --merge true --dtype bfloat16 --out_dir /tmp/swift-bf16
    clarify export --ckpt_path runs/swift/checkpoints/last.ckpt --out_dir /tmp/swift-adapter
    clarify export --run_dir runs/swift --format gguf                      # runs/swift/export_gguf/model.f16.gguf

``--merge true`` writes a standalone ``transformers`` folder (the LoRA merged into the base weights; no peft needed:
what vLLM, lm-evaluation-harness and GGUF converters take); without it, the adapter folder that ``clarify fit``
writes to ``<run>/export``. ``--format gguf`` writes the merged policy as one GGUF file for llama.cpp and Ollama,
with a model card saying how to serve it (:mod:`clarify_lit.train.gguf_export`). Either way with tokenizer, chat
template, generation config, a model card filled from
the run (checkpoint step, last logged losses, data, rollout evaluation, ``config.yaml``) and ``clarify_export.json``.

A folder that holds anything is refused unless ``--overwrite true``; even then only an earlier export's files there
are replaced (``clarify_export.json`` lists them) and every other file is kept: the export is built in a temp sibling
folder and its files are moved in, never the folder swapped whole.
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Literal

import torch

from clarify_lit.arguments import CommandLine
from clarify_lit.train.export import export_merged, refuse_occupied_export, write_export
from clarify_lit.train.gguf_export import GGUFType, export_gguf
from clarify_lit.train.module import ClarifyModule

log = logging.getLogger(__name__)


def checkpoint_of(run_dir: str | None, ckpt_path: str | None) -> tuple[Path, Path]:
    """``(checkpoint file, run folder)`` from exactly one of a run folder (its ``checkpoints/last.ckpt``) or a
    checkpoint (its run folder: the parent of ``checkpoints/``)."""
    if (run_dir is None) == (ckpt_path is None):
        raise ValueError(
            "clarify export needs exactly one of --run_dir (a clarify fit run folder) or --ckpt_path "
            "(a checkpoint file)"
        )
    if ckpt_path is not None:
        ckpt = Path(ckpt_path)
        run = ckpt.parent.parent if ckpt.parent.name == "checkpoints" else ckpt.parent
    else:
        run = Path(run_dir)
        ckpt = run / "checkpoints" / "last.ckpt"
    if not ckpt.is_file():
        raise FileNotFoundError(
            f"checkpoint not found: {ckpt} (give --ckpt_path, or --run_dir of a clarify fit run "
            "with checkpoints/last.ckpt)"
        )
    return ckpt, run


def export(
    run_dir: str | None = None,
    ckpt_path: str | None = None,
    out_dir: str | None = None,
    merge: bool = False,
    dtype: Literal["float32", "bfloat16", "float16"] | None = None,
    overwrite: bool = False,
    format: Literal["hf", "gguf"] = "hf",
    gguf_type: GGUFType = "f16",
) -> Path:
    """Export a ``clarify fit`` run from its checkpoint (the options are :class:`ExportConfig`'s)."""
    ckpt, run = checkpoint_of(run_dir, ckpt_path)
    if dtype is not None and not merge:
        raise ValueError("--dtype applies to --merge true (an adapter keeps the dtype it was trained in)")
    if format not in ("hf", "gguf"):
        raise ValueError(f"--format must be hf or gguf, got {format!r}")
    if format == "gguf" and dtype is not None:
        raise ValueError("--dtype applies to --format hf; a GGUF export's weights are set by --gguf_type")
    default = "export_gguf" if format == "gguf" else ("export_merged" if merge else "export")
    out = Path(out_dir) if out_dir else run / default
    refuse_occupied_export(out, overwrite)  # before the checkpoint loads
    module = ClarifyModule.from_checkpoint(ckpt)
    # the step and epoch for the card; the weights were restored above
    checkpoint = torch.load(ckpt, map_location="cpu", weights_only=False, mmap=True)
    state = {k: checkpoint.get(k) for k in ("global_step", "epoch")}
    if format == "gguf":
        folder = export_gguf(module, out, gguf_type, run_dir=run, checkpoint=state)
    elif merge:
        folder = export_merged(module, out, dtype, run_dir=run, checkpoint=state)
    else:
        folder = write_export(module, out, run_dir=run, checkpoint=state)
    what = "GGUF file" if format == "gguf" else ("merged model" if merge else "export")
    print(f"[clarify export] {what} of {ckpt} (step {state['global_step']}) → {folder}")
    return folder


@dataclass
class ExportConfig:
    """Write a clarify fit run's adapter, or with --merge true a standalone merged model, with its model card, from
    the run's checkpoint."""

    run_dir: str | None = None
    """A clarify fit run folder; its checkpoints/last.ckpt is exported."""
    ckpt_path: str | None = None
    """A ClarifyModule checkpoint (instead of run_dir)."""
    out_dir: str | None = None
    """The folder to write; default <run>/export_merged with merge, else <run>/export."""
    merge: bool = False
    """Write a standalone model (LoRA merged into the base weights) instead of the adapter."""
    dtype: Literal["float32", "bfloat16", "float16"] | None = None
    """Dtype of the merged weights (merge only); default the training dtype."""
    overwrite: bool = False
    """Write into a folder that is not empty: an earlier export's files there are replaced, any other file is kept;
    without it such a folder is refused."""
    format: Literal["hf", "gguf"] = "hf"
    """hf (a transformers/PEFT folder) or gguf (the merged policy as one GGUF file for llama.cpp and Ollama, default
    folder <run>/export_gguf; implies the merge)."""
    gguf_type: GGUFType = "f16"
    """Weight type of the GGUF file (f32, f16, bf16, q8_0); norms stay f32."""


def run(cfg: ExportConfig) -> Path:
    """Export the run of ``cfg``; return the folder written."""
    return export(**asdict(cfg))


COMMAND_LINE = CommandLine(ExportConfig, "clarify export", __doc__.split("\n\n")[0], "CLARIFY_EXPORT")
build_parser, parse_config = COMMAND_LINE.parser, COMMAND_LINE.parse


def main(argv: list[str] | None = None) -> None:
    """Entry point of ``clarify export``."""
    logging.basicConfig(level=logging.INFO, format="[%(name)s] %(message)s")
    run(parse_config(argv))


if __name__ == "__main__":
    main()
