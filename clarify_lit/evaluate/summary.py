"""What ``clarify report`` reads and aggregates: one loaded ``metrics.json`` (``MetricsFile``) and a method averaged
over its seed files (``MethodSummary``).

Both the report (:mod:`clarify_lit.evaluate.report`, which builds them) and the audit page
(:mod:`clarify_lit.evaluate.audit_html`, which renders them) import these types from here, so neither imports the
other's module for a type: the import runs one way, report → audit_html → summary.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


@dataclass
class MetricsFile:
    """One loaded ``metrics.json``: its metrics, its run metadata and where it came from."""

    path: Path
    label: str
    metrics: dict[str, float]
    meta: dict[str, Any]

    def rollouts_path(self) -> Path | None:
        """The rollouts written next to the metrics (``meta["rollouts"]`` relative to the file, else a sibling)."""
        name = self.meta.get("rollouts")
        candidates = [self.path.parent / name] if isinstance(name, str) else []
        candidates.append(self.path.parent / "rollouts.jsonl")
        if self.path.name.endswith(".metrics.json"):  # callback layout: step_000100.metrics.json + .jsonl
            candidates.append(self.path.with_name(self.path.name[: -len(".metrics.json")] + ".jsonl"))
        return next((c for c in candidates if c.is_file()), None)


@dataclass
class MethodSummary:
    """A method aggregated over its seeds (files)."""

    label: str
    files: list[MetricsFile]
    mean: dict[str, float] = field(default_factory=dict)
    se: dict[str, float] = field(default_factory=dict)
    seed_sd: dict[str, float] = field(default_factory=dict)

    @property
    def k(self) -> int:
        return len(self.files)
