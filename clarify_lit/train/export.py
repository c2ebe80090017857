"""Export folders of a trained :class:`~clarify_lit.train.module.ClarifyModule`, loadable without clarify_lit.

* :func:`write_export` — ``<run>/export``: the LoRA adapter (PEFT) or, without LoRA, the full weights;
* :func:`export_merged` — ``<run>/export_merged``: the LoRA merged into the base, a standalone ``transformers``
  folder (what vLLM, lm-evaluation-harness and GGUF converters take), in the training dtype or a chosen one.

Each folder also holds the tokenizer with its chat template, a model card ``README.md`` filled from the run
(:mod:`clarify_lit.train.model_card`) and ``clarify_export.json`` (how the base was resolved here:
:mod:`clarify_lit.base_reference`). An adapter names its base by a portable name (the embedded SmolLM2 by its hub id).
"""

from __future__ import annotations

import copy
import json
import logging
from pathlib import Path
from typing import Any

from clarify_lit.base_reference import base_metadata, portable_base_name, write_export_metadata
from clarify_lit.io import atomic_folder
from clarify_lit.models import ADAPTER_CONFIG, DTYPES, DType, resolve_model_path
from clarify_lit.train.model_card import ExportFormat, gather_card_facts, render_model_card

log = logging.getLogger(__name__)


def write_export(module, folder: str | Path, *, run_dir: Path | None = None, trainer=None,
                 checkpoint: dict | None = None) -> Path:
    """Write the adapter (LoRA) or the full weights of ``module`` with tokenizer, chat template, model card and
    ``clarify_export.json``. ``run_dir``, ``trainer`` or ``checkpoint`` fill the card (see ``gather_card_facts``)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    model = module.model
    spec = str(module.hparams.model_name_or_path)
    adapter = hasattr(model, "peft_config")
    if adapter:
        # saved with the local folder first: peft's save compares the vocabulary with the base's config, and only a
        # local folder answers that offline; the portable name replaces it in the written file below
        for cfg in model.peft_config.values():
            cfg.base_model_name_or_path = resolve_model_path(spec)
    model.save_pretrained(folder)
    module.tokenizer.save_pretrained(folder)
    if adapter:
        _rename_base(folder / ADAPTER_CONFIG, portable_base_name(spec))
    fmt: ExportFormat = "adapter" if adapter else "full"
    _describe(module, folder, fmt, module.hparams.dtype, run_dir, trainer, checkpoint)
    log.info("exported %s to %s", "adapter" if adapter else "model", folder)
    return folder


def export_merged(module, folder: str | Path, dtype: DType | None = None, *, run_dir: Path | None = None,
                  trainer=None, checkpoint: dict | None = None) -> Path:
    """Write ``module``'s policy as one standalone ``transformers`` folder: the LoRA merged into a copy of the base
    weights (the module keeps its adapter), cast to ``dtype`` (default: the training dtype), with tokenizer, chat
    template, generation config, model card and ``clarify_export.json``. Without LoRA: the full weights in ``dtype``."""
    folder = Path(folder)
    dtype = dtype or module.hparams.dtype
    if dtype not in DTYPES:
        raise ValueError(f"export dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
    model = _host_copy(module.model)
    if hasattr(model, "merge_and_unload"):
        model = model.merge_and_unload()  # merged in the training dtype, then cast: no rounding before the sum
    model = model.to(DTYPES[dtype]).eval()
    model.config.use_cache = True  # gradient checkpointing turned it off for training; generation wants it
    gen = model.generation_config
    tok = module.tokenizer
    if gen.eos_token_id is None:
        gen.eos_token_id = tok.eos_token_id
    if gen.pad_token_id is None:
        gen.pad_token_id = tok.pad_token_id

    def build(tmp: Path) -> None:
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        _describe(module, tmp, "merged", dtype, run_dir, trainer, checkpoint)

    # built in a temp sibling and renamed into place: a full disk leaves no half-written folder and no temp files
    try:
        atomic_folder(folder, build, done=lambda _: False)
    except OSError as e:
        message = (f"writing the merged export {folder} failed: {e.strerror or e}; nothing was left there (the "
                   "previous export, if any, is unchanged)")
        raise (OSError(e.errno, message) if e.errno is not None else OSError(message)) from None
    log.info("exported the merged model (%s) to %s", dtype, folder)
    return folder


def _host_copy(model):
    """A deep copy of ``model`` in host memory: an accelerator holding the training state need not fit a second
    model (the trained one goes to the host for the copy and back)."""
    device = next(model.parameters()).device
    if device.type == "cpu":
        return copy.deepcopy(model)
    model.cpu()
    try:
        return copy.deepcopy(model)
    finally:
        model.to(device)


def _rename_base(config_file: Path, name: str) -> None:
    config = json.loads(config_file.read_text(encoding="utf-8"))
    config["base_model_name_or_path"] = name
    config_file.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def _describe(module, folder: Path, fmt: ExportFormat, dtype: str, run_dir: Path | None, trainer,
              checkpoint: dict | None) -> None:
    """``clarify_export.json`` and the model card ``README.md`` (replacing peft's empty template)."""
    spec = str(module.hparams.model_name_or_path)
    meta: dict[str, Any] = {"format": fmt, **base_metadata(spec, module.hparams.dtype), "export_dtype": dtype}
    facts = gather_card_facts(module, export_format=fmt, run_dir=run_dir, trainer=trainer, checkpoint=checkpoint,
                              dtype=dtype)
    meta["clarify_lit_version"] = facts["versions"].get("clarify_lit")
    meta["global_step"] = (facts.get("training") or {}).get("global_step")
    write_export_metadata(folder, meta)
    title = f"{run_dir.name} ({fmt})" if run_dir is not None else None
    (folder / "README.md").write_text(render_model_card(facts, title), encoding="utf-8")
