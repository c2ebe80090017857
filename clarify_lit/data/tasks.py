"""Multiple-choice QA tasks (the contexts x of the paper). Loaders are filled in by the simulate work."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

LETTERS = ("A", "B", "C", "D")


@dataclass
class QATask:
    """One 4-option multiple-choice question.

    ``task_id`` is stable across runs (``"<dataset>/<source id>"``); ``gold`` is a letter A–D; ``knowledge`` is hidden
    teacher-only text (e.g. SciQ ``support``), never shown to the policy.
    """

    task_id: str
    dataset: str
    question: str
    choices: list[str]
    gold: str
    knowledge: str | None = None
    meta: dict[str, Any] = field(default_factory=dict)
