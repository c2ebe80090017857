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
import fnmatch
import json
import logging
from pathlib import Path
from typing import Any

from clarify_lit.base_reference import base_metadata, portable_base_name, write_export_metadata
from clarify_lit.io import LOCK_FILE, build_into
from clarify_lit.models import ADAPTER_CONFIG, DTYPES, EXPORT_METADATA, DType, resolve_model_path
from clarify_lit.train.model_card import ExportFormat, gather_card_facts, render_model_card

log = logging.getLogger(__name__)

# the names an export writes: how the files of an export written before clarify_export.json listed them are known
EXPORT_FILE_PATTERNS = (
    "adapter_config.json",
    "adapter_model.safetensors",
    "adapter_model.bin",
    "config.json",
    "generation_config.json",
    "model.safetensors",
    "model-*-of-*.safetensors",
    "model.safetensors.index.json",
    "pytorch_model*.bin",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.json",
    "merges.txt",
    "chat_template.jinja",
    "README.md",
    EXPORT_METADATA,
)


def folder_contents(folder: str | Path) -> list[str]:
    """The names in ``folder`` (none when it does not exist), the output lock file left out."""
    folder = Path(folder)
    return sorted(p.name for p in folder.iterdir() if p.name != LOCK_FILE) if folder.is_dir() else []


def earlier_export_files(folder: str | Path) -> list[str]:
    """The files an earlier export wrote into ``folder`` (its ``clarify_export.json`` lists them; for an export written
    before that list, the files with the names an export writes); ``[]`` when ``folder`` holds no export."""
    folder = Path(folder)
    meta_file = folder / EXPORT_METADATA
    if not meta_file.is_file():
        return []
    try:
        listed = json.loads(meta_file.read_text(encoding="utf-8")).get("files")
    except (json.JSONDecodeError, AttributeError, UnicodeDecodeError):
        listed = None
    present = folder_contents(folder)
    if isinstance(listed, list):
        return sorted(set(present) & {str(n) for n in listed})
    return [n for n in present if any(fnmatch.fnmatchcase(n, p) for p in EXPORT_FILE_PATTERNS)]


def refuse_occupied_export(folder: str | Path, overwrite: bool) -> None:
    """Refuse to export into a folder that holds anything, unless ``overwrite`` (which replaces only an earlier
    export's files there: files an export did not write are never deleted)."""
    if Path(folder).exists() and not Path(folder).is_dir():
        raise FileExistsError(f"--out_dir {folder} is a file, not a folder; choose another --out_dir")
    held = folder_contents(folder)
    if held and not overwrite:
        names = ", ".join(held[:4]) + (f", … ({len(held)} entries)" if len(held) > 4 else "")
        raise FileExistsError(
            f"--out_dir {folder} is not empty ({names}); pass --overwrite true to write the export "
            "there (an earlier export's files are replaced, other files are kept), or choose "
            "another --out_dir"
        )


def write_export(
    module, folder: str | Path, *, run_dir: Path | None = None, trainer=None, checkpoint: dict | None = None
) -> Path:
    """Write the adapter (LoRA) or the full weights of ``module`` with tokenizer, chat template, model card and
    ``clarify_export.json``. ``run_dir``, ``trainer`` or ``checkpoint`` fill the card (see ``gather_card_facts``)."""
    folder = Path(folder)
    model = module.model
    spec = str(module.hparams.model_name_or_path)
    adapter = hasattr(model, "peft_config")
    if adapter:
        # saved with the local folder first: peft's save compares the vocabulary with the base's config, and only a
        # local folder answers that offline; the portable name replaces it in the written file below
        for cfg in model.peft_config.values():
            cfg.base_model_name_or_path = resolve_model_path(spec)
    fmt: ExportFormat = "adapter" if adapter else "full"

    def build(tmp: Path) -> None:
        model.save_pretrained(tmp)
        module.tokenizer.save_pretrained(tmp)
        if adapter:
            _rename_base(tmp / ADAPTER_CONFIG, portable_base_name(spec))
        _describe(module, tmp, fmt, module.hparams.dtype, run_dir, trainer, checkpoint)

    _build_export(folder, build, "export")
    log.info("exported %s to %s", "adapter" if adapter else "model", folder)
    return folder


def export_merged(
    module,
    folder: str | Path,
    dtype: DType | None = None,
    *,
    run_dir: Path | None = None,
    trainer=None,
    checkpoint: dict | None = None,
) -> Path:
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

    _build_export(folder, build, "merged export")
    log.info("exported the merged model (%s) to %s", dtype, folder)
    return folder


def _build_export(folder: Path, build, what: str) -> None:
    """Build the export in a temp sibling folder and move its files in (:func:`clarify_lit.io.build_into`): a full disk
    leaves no half-written folder and no temp files, and only an earlier export's files are replaced (the folder is
    never swapped whole). A failed write is one ``OSError`` naming the folder (safetensors reports a full disk as its
    own ``SafetensorError``, naming no path)."""
    try:
        build_into(folder, build, replace=earlier_export_files(folder))
    except Exception as e:
        if not isinstance(e, OSError) and type(e).__name__ != "SafetensorError":
            raise
        errno_ = getattr(e, "errno", None)
        reason = getattr(e, "strerror", None) or " ".join(str(e).split())[:200] or type(e).__name__
        message = (
            f"writing the {what} {folder} failed: {reason}; nothing was left there (the previous export, "
            "if any, is unchanged)"
        )
        raise (OSError(errno_, message) if errno_ is not None else OSError(message)) from None


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


def _describe(
    module, folder: Path, fmt: ExportFormat, dtype: str, run_dir: Path | None, trainer, checkpoint: dict | None
) -> None:
    """``clarify_export.json`` and the model card ``README.md`` (replacing peft's empty template)."""
    spec = str(module.hparams.model_name_or_path)
    meta: dict[str, Any] = {"format": fmt, **base_metadata(spec, module.hparams.dtype), "export_dtype": dtype}
    facts = gather_card_facts(
        module, export_format=fmt, run_dir=run_dir, trainer=trainer, checkpoint=checkpoint, dtype=dtype
    )
    meta["clarify_lit_version"] = facts["versions"].get("clarify_lit")
    meta["global_step"] = (facts.get("training") or {}).get("global_step")
    # what this export wrote: a later export into the same folder replaces these files and no others
    meta["files"] = sorted({p.name for p in folder.iterdir()} | {EXPORT_METADATA, "README.md"})
    write_export_metadata(folder, meta)
    title = f"{run_dir.name} ({fmt})" if run_dir is not None else None
    (folder / "README.md").write_text(render_model_card(facts, title), encoding="utf-8")
