"""clarify_lit: offline RL by reward-weighted fine-tuning (Refit, Swift, SFT, DPO, StepDPO, Distill) of language
models on simulated multi-turn conversations, on PyTorch Lightning.

The names a notebook needs are importable from the package itself::

    import clarify_lit as cl

    tasks = cl.load_tasks("sciq", part="test", n_test=20)
    model, tokenizer, base = cl.load_export("runs/swift/export")

They load on first access (PEP 562 ``__getattr__``): ``import clarify_lit`` — and so ``import
clarify_lit.data.records`` — stays cheap and imports neither torch nor Lightning, and no submodule is imported by the
package before it asks for it (no import cycles through ``__init__``).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

# public name -> the module that defines it (``__all__`` lists the same names: tests/test_api.py checks)
_EXPORTS = {
    "ClarifyModule": "clarify_lit.train.module",
    "ConversationDataModule": "clarify_lit.data.datamodule",
    "Refit": "clarify_lit.train.objectives",
    "Swift": "clarify_lit.train.objectives",
    "SFT": "clarify_lit.train.objectives",
    "DPO": "clarify_lit.train.objectives",
    "StepDPO": "clarify_lit.train.objectives",
    "Distill": "clarify_lit.train.objectives",
    "load_records": "clarify_lit.data.records",
    "load_tasks": "clarify_lit.data.tasks",
    "rollout_tasks": "clarify_lit.simulate.rollout",
    "load_export": "clarify_lit.models",
}

__all__ = [
    "__version__",
    "ClarifyModule",
    "ConversationDataModule",
    "Refit",
    "Swift",
    "SFT",
    "DPO",
    "StepDPO",
    "Distill",
    "load_records",
    "load_tasks",
    "rollout_tasks",
    "load_export",
]


def _package_version() -> str:
    """The installed distribution's version; from a source tree that is not installed, ``pyproject.toml``'s."""
    from importlib import metadata

    try:
        return metadata.version("clarify_lit")
    except metadata.PackageNotFoundError:
        import tomllib
        from pathlib import Path

        pyproject = Path(__file__).resolve().parents[1] / "pyproject.toml"
        try:
            return tomllib.loads(pyproject.read_text(encoding="utf-8"))["project"]["version"]
        except (OSError, KeyError, tomllib.TOMLDecodeError):
            return "0+unknown"


__version__ = _package_version()


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'clarify_lit' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # later accesses skip __getattr__
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))


if TYPE_CHECKING:  # for type checkers and IDEs only: at run time the names load lazily
    from clarify_lit.data.datamodule import ConversationDataModule
    from clarify_lit.data.records import load_records
    from clarify_lit.data.tasks import load_tasks
    from clarify_lit.models import load_export
    from clarify_lit.simulate.rollout import rollout_tasks
    from clarify_lit.train.module import ClarifyModule
    from clarify_lit.train.objectives import DPO, SFT, Distill, Refit, StepDPO, Swift
