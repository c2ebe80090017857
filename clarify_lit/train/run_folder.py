"""A ``clarify fit`` run folder: who may write into it, and what a resume may change (docs/reliability.md).

* A folder that holds another run (``config.yaml``, checkpoints, ``export/``, TensorBoard events) is refused unless
  the fit resumes it (``--ckpt_path``) or ``--overwrite true`` asks to replace it (:func:`run_files`,
  :func:`clear_run`): two runs' checkpoints and events never mix.
* A resume is checked against its checkpoint (:func:`check_resume`): a setting that changes the shape of the trained
  weights (model, ``use_lora``, LoRA rank/alpha/targets) is refused in one line naming it; any other change (the
  objective, the learning rate, the data files, the trainer) is allowed, warned about and recorded in
  ``resumes.jsonl`` with the resumed run's own ``config.resume-N.yaml`` — the original ``config.yaml`` is never
  rewritten, so it keeps describing the steps it produced.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
from pathlib import Path
from typing import Any

import torch

from clarify_lit.io import atomic_write_text

log = logging.getLogger(__name__)

RESUMES_FILE = "resumes.jsonl"
RUN_INFO = "run_info.json"  # the environment stamp of every segment of the run (record_run_info)
# what clarify fit writes into its run folder (trainer.default_root_dir); the rollout callback's rollouts/ alone does
# not make a folder a run (it is removed with the run by --overwrite)
RUN_FILES = ("config.yaml", "hparams.yaml", RESUMES_FILE, "checkpoints", "export", "export_merged")
RUN_GLOBS = ("config.resume-*.yaml", "events.out.tfevents.*")
ALSO_CLEARED = ("rollouts", RUN_INFO)
# settings that change the shape (or the meaning) of the trained weights a checkpoint holds
SHAPE_KEYS = ("model_name_or_path", "use_lora", "lora_r", "lora_alpha", "lora_target_modules")
DEFAULT_LORA_TARGETS = ["q_proj", "v_proj"]  # ClarifyModule's default when lora_target_modules is None
# options that say how to start (or where the run lives: a moved folder is the same run), not what the run is
_NOT_COMPARED = ("ckpt_path", "config", "overwrite", "trainer.default_root_dir")


def run_files(root: Path, everything: bool = False) -> list[Path]:
    """The files and folders of a ``clarify fit`` run inside ``root`` (empty: no run there); ``everything`` adds
    what :func:`clear_run` removes with them."""
    if not root.is_dir():
        return []
    found = [root / name for name in RUN_FILES + (ALSO_CLEARED if everything else ()) if (root / name).exists()]
    for pattern in RUN_GLOBS:
        found += sorted(root.glob(pattern))
    return found


def refuse_occupied(root: Path, ckpt_path: str | None, overwrite: bool) -> None:
    """Refuse to start a new fit in a folder holding another run, unless it resumes (``ckpt_path``) or
    ``overwrite``."""
    if ckpt_path is not None or overwrite:
        return
    held = run_files(root)
    if held:
        names = ", ".join(p.name + ("/" if p.is_dir() else "") for p in held[:4])
        raise FileExistsError(
            f"{root} already holds a clarify fit run ({names}); resume it with --ckpt_path last, "
            "replace it with --overwrite true, or choose another --trainer.default_root_dir"
        )


def clear_run(root: Path) -> list[str]:
    """Remove an earlier run's files from ``root`` (``--overwrite true``); return their names."""
    removed = []
    if not run_files(root):
        return removed  # no earlier run: nothing of anyone's to remove
    for p in run_files(root, everything=True):
        if p.is_dir():
            shutil.rmtree(p)
        else:
            p.unlink()
        removed.append(p.name)
    if removed:
        log.warning("--overwrite: removed the earlier run's %s from %s", ", ".join(removed), root)
    return removed


def remove_failed_start(root: Path, before: set[Path]) -> list[str]:
    """Remove the run files a fit that failed before its first step wrote into ``root`` (those not in ``before``,
    what the folder held when it started); never a checkpoint, never anything else. Return their names."""
    removed = []
    for p in run_files(root, everything=True):
        if p in before or p.name in ("checkpoints", "export", "export_merged"):
            continue
        if p.is_dir():
            shutil.rmtree(p, ignore_errors=True)
        else:
            p.unlink(missing_ok=True)
        removed.append(p.name)
    if removed:
        log.info(
            "the fit failed before its first step: removed what it had written to %s (%s)", root, ", ".join(removed)
        )
    return removed


def read_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
    """A checkpoint's contents (tensors memory-mapped, not read), or a one-line error naming the file."""
    path = Path(path)
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as e:  # a truncated or foreign file fails in many ways (zip, pickle, errno 22): name the file
        raise ValueError(
            f"checkpoint {path} cannot be read ({type(e).__name__}: {' '.join(str(e).split())[:200]}); "
            "it may be truncated (a full disk, a copy cut short): resume from another checkpoint or "
            "start again"
        ) from None


def _norm(key: str, value: Any) -> Any:
    if key == "lora_target_modules":
        return sorted(value or DEFAULT_LORA_TARGETS)
    return json.loads(json.dumps(value, default=str))


def check_resume(ckpt_path: Path, ckpt_hparams: dict[str, Any], hparams: dict[str, Any]) -> dict[str, list]:
    """Compare the module's hyperparameters with the checkpoint's: raise on a shape-changing difference (naming every
    one), return the others as ``{"model.<key>": [checkpoint's, now]}``."""
    lora = bool(ckpt_hparams.get("use_lora", True)) or bool(hparams.get("use_lora", True))
    shape, other = [], {}
    for key in sorted(set(ckpt_hparams) | set(hparams)):
        if key not in ckpt_hparams or key not in hparams:
            continue  # a setting added (or dropped) by another version: nothing to compare
        old, new = _norm(key, ckpt_hparams[key]), _norm(key, hparams[key])
        if old == new:
            continue
        if key in SHAPE_KEYS and (lora or not key.startswith("lora_")):
            shape.append(f"model.{key} {old!r} → {new!r}")
        elif key not in SHAPE_KEYS:
            other[f"model.{key}"] = [old, new]
    if shape:
        raise ValueError(
            f"--ckpt_path {ckpt_path} cannot be resumed with this configuration: {'; '.join(shape)} "
            "(the checkpoint's weights have another shape); resume with the checkpoint's settings, or "
            "start a new run in another --trainer.default_root_dir"
        )
    return other


def _flatten(d: Any, prefix: str = "") -> dict[str, Any]:
    if not isinstance(d, dict) or not d:
        return {prefix.rstrip("."): d} if prefix else {}
    out: dict[str, Any] = {}
    for k, v in d.items():
        if k == "init_args" or k == "dict_kwargs":
            out.update(_flatten(v, prefix))
        else:
            out.update(_flatten(v, f"{prefix}{k}."))
    return out


def config_differences(before: dict[str, Any], now: dict[str, Any]) -> dict[str, list]:
    """``{"data.train_files": [before, now], …}`` over two ``clarify fit`` configs (``model.*`` left to
    :func:`check_resume`, which compares with the checkpoint itself)."""
    a, b = _flatten(before), _flatten(now)
    diff = {}
    for key in sorted(set(a) | set(b)):
        if key.split(".")[0] in _NOT_COMPARED or key in _NOT_COMPARED or key.startswith("model."):
            continue
        va, vb = _norm(key, a.get(key)), _norm(key, b.get(key))
        if va != vb:
            diff[key] = [va, vb]
    return diff


def latest_config(root: Path) -> Path | None:
    """The config of the run's latest segment: ``config.resume-N.yaml`` with the largest N, else ``config.yaml``."""
    resumed = sorted(
        root.glob("config.resume-*.yaml"),
        key=lambda p: int(p.stem.rsplit("-", 1)[-1]) if p.stem.rsplit("-", 1)[-1].isdigit() else -1,
    )
    if resumed:
        return resumed[-1]
    return root / "config.yaml" if (root / "config.yaml").is_file() else None


def next_resume_config(root: Path) -> str:
    """The name of the next resumed segment's config file (``config.resume-1.yaml``, …)."""
    n = 1
    while (root / f"config.resume-{n}.yaml").exists():
        n += 1
    return f"config.resume-{n}.yaml"


def record_run_info(root: Path, stamp: dict[str, Any]) -> Path:
    """Append this fit segment's environment stamp (:func:`clarify_lit.environment.environment_stamp`: machine,
    library versions, resolved precision) to ``run_info.json``'s ``segments``: a resumed run lists each segment's
    machine, so a run trained partly on another CPU kind says so."""
    path = root / RUN_INFO
    try:
        info = json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON ({e}); remove it or restore it") from None
    segments = list(info.get("segments") or []) if isinstance(info, dict) else []
    segments.append({"time": time.strftime("%Y-%m-%dT%H:%M:%S"), "environment": stamp})
    return atomic_write_text(path, json.dumps({"segments": segments}, indent=1) + "\n")


def record_resume(root: Path, ckpt_path: Path, step: Any, config_name: str, changed: dict[str, list]) -> Path:
    """Append one line to ``resumes.jsonl``: when, from which checkpoint and step, the segment's config file and what
    changed (``{"key": [before, now]}``)."""
    path = root / RESUMES_FILE
    lines = path.read_text(encoding="utf-8") if path.is_file() else ""
    entry = {
        "time": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "ckpt_path": str(ckpt_path),
        "global_step": step,
        "config": config_name,
        "changed": changed,
    }
    return atomic_write_text(path, lines + json.dumps(entry, default=str) + "\n")
