"""What machine and software made a number: the CPU's native bf16 support (which ``dtype: auto`` reads) and the
environment stamp every output holding a number carries (docs/environment.md).

* :func:`cpu_flags` — the CPU's feature flags (``/proc/cpuinfo``, read once); :func:`native_bf16_flags` — those of
  them that mean native bf16 arithmetic (:data:`BF16_FLAGS`). ``dtype: auto`` is bf16 on a CPU only where this is
  non-empty (:func:`clarify_lit.models.resolve_dtype`): without them torch emulates bf16 and runs ~2x *slower* than
  fp32.
* :func:`environment_stamp` — one dict: clarify_lit's version and git commit, Python, torch / transformers / peft /
  lightning versions, device, resolved dtype, torch's thread count, the CPU model and its bf16/AMX flags. It never
  fails: whatever cannot be read is ``"unknown"``.
* :func:`stamp_key` / :func:`describe_stamp` — what makes two stamps "the same machine" for a paired comparison
  (CPU kind, its bf16 flags, device, dtype, library versions; not the commit, thread count or Python), and one
  line for humans. ``clarify report`` warns when a table's methods differ in this key.

Base layer: imports no clarify_lit module but the bare package (its version).
"""

from __future__ import annotations

import functools
import platform
import subprocess
import sys
from importlib import metadata
from pathlib import Path
from typing import Any

import torch

from clarify_lit import __version__

UNKNOWN = "unknown"
CPUINFO = Path("/proc/cpuinfo")
#: CPU flags (Linux ``/proc/cpuinfo`` names) meaning native bf16 arithmetic: AVX512-BF16 dot products, or Intel AMX
#: tiles with bf16. AVX-512F alone is not enough: torch then converts bf16 to fp32 around every kernel.
BF16_FLAGS = ("avx512_bf16", "amx_bf16")
#: the flags a stamp records (bf16 and AMX): what decides which bf16 kernels run, hence which greedy text comes out
STAMP_FLAGS = ("avx512_bf16", "amx_bf16", "amx_tile", "amx_int8", "avx512f")
LIBRARIES = ("torch", "transformers", "peft", "lightning")
#: stamp fields that must match for two numbers to come from "the same machine" (paired greedy comparisons). The
#: thread count is one: a bf16 matmul's reduction is split by thread, so greedy SmolLM2 text at batch 50 differs
#: between 1 and 2 threads (5 of 50 conversations, measured 2026-12-07; docs/demo.md#parallel-stages).
KEY_FIELDS = ("cpu", "cpu_flags", "device", "gpu", "dtype", "torch_threads", *LIBRARIES)


@functools.cache
def _cpuinfo() -> dict[str, str]:
    """The first processor block of ``/proc/cpuinfo`` as ``{field: value}``; ``{}`` where there is none (macOS,
    Windows, a sandbox): the stamp then says "unknown" and ``auto`` picks fp32 on the CPU."""
    try:
        text = CPUINFO.read_text(encoding="utf-8", errors="replace")
    except OSError:
        return {}
    info: dict[str, str] = {}
    for line in text.splitlines():
        if not line.strip():
            if info:
                break  # one processor's block is enough: every core of one machine reports the same flags
            continue
        key, sep, value = line.partition(":")
        if sep:
            info.setdefault(key.strip(), value.strip())
    return info


def cpu_flags() -> frozenset[str]:
    """The CPU's feature flags (empty where they cannot be read). Tests monkeypatch this function."""
    return frozenset(_cpuinfo().get("flags", "").split())


def native_bf16_flags() -> list[str]:
    """Which of :data:`BF16_FLAGS` this CPU has (empty: bf16 is emulated on it, slower than fp32)."""
    flags = cpu_flags()
    return [f for f in BF16_FLAGS if f in flags]


def cpu_model() -> str:
    """The CPU's model name (``/proc/cpuinfo``'s ``model name``, else ``platform.processor()``), or "unknown"."""
    return _cpuinfo().get("model name") or platform.processor() or UNKNOWN


def library_version(name: str) -> str:
    """The installed version of distribution ``name`` (without importing it), or "unknown"."""
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return UNKNOWN


@functools.cache
def git_commit() -> str:
    """The commit of the clarify_lit checkout this code runs from (``+dirty`` when files differ), or "unknown"
    (an installed wheel, no git, a git error): a stamp never fails for it."""
    root = Path(__file__).resolve().parents[1]
    if not (root / ".git").exists():
        return UNKNOWN
    try:
        head = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10)
        if head.returncode != 0:
            return UNKNOWN
        dirty = subprocess.run(
            ["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
            capture_output=True,
            text=True,
            timeout=10,
        )
    except (OSError, subprocess.SubprocessError):
        return UNKNOWN
    return head.stdout.strip() + ("+dirty" if dirty.returncode == 0 and dirty.stdout.strip() else "")


def environment_stamp(device: torch.device | str = "cpu", dtype: str | None = None) -> dict[str, Any]:
    """What made a number: package version and commit, Python and library versions, ``device`` and the resolved
    ``dtype`` (None: the output has no single dtype), torch's thread count, the CPU model and its bf16/AMX flags;
    with CUDA, the GPU's name. Every field is a string, int or list: JSON as is."""
    dev = torch.device(device)
    flags = cpu_flags()
    stamp: dict[str, Any] = {
        "clarify_lit": __version__,
        "commit": git_commit(),
        "python": platform.python_version(),
        **{lib: library_version(lib) for lib in LIBRARIES},
        "device": dev.type,
        "dtype": dtype or UNKNOWN,
        "torch_threads": torch.get_num_threads(),
        "cpu": cpu_model(),
        "cpu_flags": [f for f in STAMP_FLAGS if f in flags],
        "platform": sys.platform,
    }
    if dev.type == "cuda" and torch.cuda.is_available():
        stamp["gpu"] = torch.cuda.get_device_name(dev)
    return stamp


def stamp_key(stamp: dict[str, Any] | None) -> tuple | None:
    """The part of a stamp two paired numbers must share (:data:`KEY_FIELDS`); None for an output without one."""
    if not isinstance(stamp, dict):
        return None
    return tuple(str(stamp.get(k, UNKNOWN)) for k in KEY_FIELDS)


def describe_stamp(stamp: dict[str, Any] | None) -> str:
    """One line: ``AMD EPYC 7B13 [avx512_bf16], cpu, bfloat16, 2 threads; torch 2.13.0, transformers …``."""
    if not isinstance(stamp, dict):
        return "unknown (written before outputs carried an environment stamp)"
    flags = ", ".join(stamp.get("cpu_flags") or []) or "no bf16/AMX flags"
    where = stamp.get("gpu") or f"{stamp.get('cpu', UNKNOWN)} [{flags}]"
    libs = ", ".join(f"{lib} {stamp.get(lib, UNKNOWN)}" for lib in LIBRARIES)
    threads = stamp.get("torch_threads", UNKNOWN)
    return (
        f"{where}, {stamp.get('device', UNKNOWN)}, {stamp.get('dtype', UNKNOWN)}, "
        f"{threads} thread{'' if threads == 1 else 's'}; {libs}; clarify_lit {stamp.get('clarify_lit', UNKNOWN)} "
        f"({stamp.get('commit', UNKNOWN)})"
    )
