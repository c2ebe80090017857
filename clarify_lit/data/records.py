"""Conversation records: the one schema every stage reads and writes.

One record = one simulated conversation (question ``task_id``, run ``run`` at ``temperature``) with one reward for
the whole conversation. Files may be JSONL, Parquet, or a ``datasets.save_to_disk`` folder; every record is
validated on load and a bad one raises :class:`RecordError` naming the file, the line/record id and the field.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import math
import os
import shutil
import statistics
import zlib
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from clarify_lit.io import atomic_write

ROLES = ("system", "user", "assistant")
Message = dict[str, str]  # one chat message: {"role": one of ROLES, "content": text}
REQUIRED_FIELDS = ("id", "task_id", "messages", "reward")


class RecordError(ValueError):
    """A record failed validation. The message names file, line/record id and field."""

    def __init__(self, source: str, where: str, record_id: str | None, field_name: str, problem: str):
        self.source, self.where, self.record_id, self.field_name, self.problem = (
            source,
            where,
            record_id,
            field_name,
            problem,
        )
        rid = f" (id={record_id!r})" if record_id is not None else ""
        super().__init__(f"{source}:{where}{rid}: field '{field_name}': {problem}")


@dataclass
class ConversationRecord:
    """One simulated conversation and its reward (see docs/data.md for the field table)."""

    id: str
    task_id: str
    messages: list[dict[str, str]]
    reward: float
    dataset: str = ""
    run: int = 0
    temperature: float = 0.0
    reward_components: dict[str, float | None] | None = None
    gold: str | None = None
    prediction: str | None = None
    meta: dict[str, Any] = field(default_factory=dict)
    # where the record was read from ("file:line"); not part of the schema, never written
    source: str = field(default="", repr=False, compare=False)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d.pop("source")
        return d

    def where(self) -> str:
        """``file:line (id=…)`` for error messages."""
        return f"{self.source or '<memory>'} (id={self.id!r})"

    def truncated_turns(self) -> tuple[int, list[int] | None]:
        """The assistant turns cut by the token limit: ``(count, turn numbers)``.

        ``meta["truncated_turns"]`` is a list of 1-based assistant-turn numbers (a turn that hit ``max_new_tokens``
        before its end-of-turn token); records written before that was recorded hold only a count, for which the
        numbers are ``None`` (unknown). Absent means no turn was cut.
        """
        value = self.meta.get("truncated_turns")
        if isinstance(value, list):
            return len(value), [int(t) for t in value]
        if _is_number(value) and not isinstance(value, bool) and _is_finite(value):
            return int(value), ([] if int(value) == 0 else None)
        return 0, []


@dataclass
class LoadSummary:
    """What a load read and what it skipped (only ``skip_invalid=True`` skips)."""

    read: int = 0
    skipped: int = 0
    reasons: Counter = field(default_factory=Counter)
    first_errors: list[str] = field(default_factory=list)

    def add_skip(self, err: RecordError) -> None:
        self.skipped += 1
        self.reasons[err.field_name] += 1
        if len(self.first_errors) < 5:
            self.first_errors.append(str(err))

    def line(self) -> str:
        reasons = ", ".join(f"{k}: {v}" for k, v in sorted(self.reasons.items())) or "none"
        return f"records: {self.read} read, {self.skipped} skipped invalid ({reasons})"


def _is_number(x: Any) -> bool:
    return isinstance(x, int | float) and not isinstance(x, bool)


def _is_finite(x: int | float) -> bool:
    """``math.isfinite`` that also answers for integers too large for a float (JSON allows them)."""
    try:
        return math.isfinite(float(x))
    except OverflowError:
        return False


def _short(x: Any, limit: int = 80) -> str:
    """``repr`` for error messages, cut to ``limit`` characters (a bad value may be a megabyte of text)."""
    try:
        text = repr(x)
    except ValueError:  # e.g. an int too long for str()
        text = f"<{type(x).__name__}>"
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _not_unicode(text: str) -> str | None:
    """Why ``text`` cannot be written as UTF-8 (a lone surrogate such as ``\\ud800``, which JSON escapes allow), or
    None. Tokenizers and writers fail on such text deep inside their own code."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        return f"contains a lone surrogate {text[e.start]!r} at character {e.start}: not valid Unicode text"
    return None


# builds the RecordError of a field: (field, problem) -> error naming the record
FieldError = Callable[[str, str], RecordError]


def checked_messages(messages: Any, err: FieldError) -> list[dict[str, str]]:
    """A record's messages as clean ``{role, content}`` dicts: roles known, a system message only first, user and
    assistant turns alternating, no empty assistant turn, and the last turn the assistant's."""
    if not isinstance(messages, list) or not messages:
        raise err("messages", "must be a non-empty list of {role, content}")
    clean: list[dict[str, str]] = []
    prev_role = None
    for i, m in enumerate(messages):
        if not isinstance(m, dict):
            raise err(f"messages[{i}]", f"must be an object with role/content, got {type(m).__name__}")
        role, content = m.get("role"), m.get("content")
        if role not in ROLES:
            raise err(f"messages[{i}].role", f"must be one of {ROLES}, got {_short(role)}")
        if not isinstance(content, str):
            raise err(f"messages[{i}].content", f"must be a string, got {type(content).__name__}")
        if _not_unicode(content):
            raise err(f"messages[{i}].content", _not_unicode(content))
        if role == "system" and i != 0:
            raise err(f"messages[{i}].role", "a system message is only allowed first")
        if role == "assistant" and prev_role in (None, "system"):
            raise err(f"messages[{i}].role", "an assistant turn before any user turn")
        if role == "assistant" and prev_role == "assistant":
            raise err(f"messages[{i}].role", "two consecutive assistant turns")
        if role == "assistant" and not content.strip():
            raise err(f"messages[{i}].content", "empty assistant turn")
        clean.append({"role": role, "content": content})
        prev_role = role
    if not any(m["role"] == "assistant" for m in clean):
        raise err("messages", "no assistant turn")
    if clean[-1]["role"] != "assistant":
        raise err(
            f"messages[{len(clean) - 1}].role",
            f"the conversation ends on a {clean[-1]['role']} turn that no "
            "assistant turn answers (the reward scored the last assistant turn)",
        )
    return clean


def checked_extras(
    raw: dict[str, Any], clean: list[dict[str, str]], err: FieldError
) -> tuple[int, float, dict[str, Any] | None, dict[str, Any]]:
    """A record's optional fields, checked: ``(run, temperature, reward_components, meta)`` (run 0 and temperature
    0.0 when absent), and that ``gold``/``prediction``/``dataset`` are strings or null."""
    run = raw.get("run", 0)
    if run is None:
        run = 0
    if not isinstance(run, int) or isinstance(run, bool):
        raise err("run", f"must be an integer, got {_short(run)}")
    temperature = raw.get("temperature", 0.0)
    if temperature is None:
        temperature = 0.0
    if not _is_number(temperature) or not _is_finite(temperature) or temperature < 0:
        raise err("temperature", f"must be a finite number >= 0, got {_short(temperature)}")
    comps = raw.get("reward_components")
    if comps is not None:
        if not isinstance(comps, dict):
            raise err("reward_components", f"must be an object, got {type(comps).__name__}")
        for k, v in comps.items():
            if v is not None and not _is_number(v):
                raise err(f"reward_components.{k}", f"must be a number or null, got {_short(v)}")
    meta = raw.get("meta") or {}
    if not isinstance(meta, dict):
        raise err("meta", f"must be an object, got {type(meta).__name__}")
    cut = meta.get("truncated_turns")
    if isinstance(cut, list):
        n_assistant = sum(m["role"] == "assistant" for m in clean)
        bad = [t for t in cut if not isinstance(t, int) or isinstance(t, bool) or not 1 <= t <= n_assistant]
        if bad:
            raise err("meta.truncated_turns", f"must list assistant-turn numbers 1..{n_assistant}, got {_short(bad)}")
    for name in ("gold", "prediction", "dataset"):
        v = raw.get(name)
        if v is not None and not isinstance(v, str):
            raise err(name, f"must be a string or null, got {_short(v)}")
        if isinstance(v, str) and _not_unicode(v):
            raise err(name, _not_unicode(v))
    return run, temperature, comps, meta


def validate_record(raw: Any, source: str, where: str) -> ConversationRecord:
    """Check one raw mapping and build a :class:`ConversationRecord`; raise :class:`RecordError` if bad."""
    if not isinstance(raw, dict):
        raise RecordError(source, where, None, "<record>", f"expected a JSON object, got {type(raw).__name__}")
    rid = raw.get("id")
    rid_s = rid if isinstance(rid, str) else None

    def err(field_name: str, problem: str) -> RecordError:
        return RecordError(source, where, rid_s, field_name, problem)

    for name in REQUIRED_FIELDS:
        if name not in raw or raw[name] is None:
            raise err(name, "missing")
    if not isinstance(rid, str) or not rid:
        raise err("id", f"must be a non-empty string, got {_short(rid)}")
    if _not_unicode(rid):
        raise RecordError(source, where, None, "id", _not_unicode(rid))
    task_id = raw["task_id"]
    if not isinstance(task_id, str | int) or isinstance(task_id, bool) or str(task_id) == "":
        raise err("task_id", f"must be a non-empty string, got {_short(task_id)}")
    if isinstance(task_id, str) and _not_unicode(task_id):
        raise err("task_id", _not_unicode(task_id))

    reward = raw["reward"]
    if not _is_number(reward):
        raise err("reward", f"must be a number, got {type(reward).__name__} {_short(reward)}")
    if not _is_finite(reward):
        raise err("reward", f"must be finite, got {_short(reward)}")

    clean = checked_messages(raw["messages"], err)
    run, temperature, comps, meta = checked_extras(raw, clean, err)
    return ConversationRecord(
        id=rid,
        task_id=str(task_id),
        messages=clean,
        reward=float(reward),
        dataset=raw.get("dataset") or "",
        run=run,
        temperature=float(temperature),
        reward_components=comps,
        gold=raw.get("gold"),
        prediction=raw.get("prediction"),
        meta=meta,
        source=f"{source}:{where}",
    )


def _jsonl_rows(path: Path) -> Iterator[tuple[str, Any]]:
    """``(where, value)`` per non-blank line; ``value`` is a :class:`RecordError` for a line that is not valid UTF-8
    or not JSON (the callers raise it or, under ``skip_invalid``, count it and go on). ``*.jsonl.gz`` is read
    through gzip (the committed rollouts in results/); a damaged gzip stream ends the file with an error."""
    if path.name.endswith(".gz"):
        lineno = 0
        try:
            with gzip.open(path, "rb") as f:
                for lineno, raw in enumerate(f, start=1):
                    yield from _jsonl_row(path, lineno, raw)
        except (OSError, EOFError, zlib.error) as e:
            yield (
                f"line {lineno + 1}",
                RecordError(
                    str(path),
                    f"line {lineno + 1}",
                    None,
                    "<gzip>",
                    f"not a readable gzip stream ({_short(str(e), 120)})",
                ),
            )
        return
    with path.open("rb") as f:
        for lineno, raw in enumerate(f, start=1):
            yield from _jsonl_row(path, lineno, raw)


def _jsonl_row(path: Path, lineno: int, raw: bytes) -> Iterator[tuple[str, Any]]:
    """The ``(where, value)`` of one raw line (nothing for a blank one)."""
    where = f"line {lineno}"
    try:
        line = raw.decode("utf-8-sig" if lineno == 1 else "utf-8")
    except UnicodeDecodeError as e:
        yield (
            where,
            RecordError(
                str(path),
                where,
                None,
                "<encoding>",
                f"not valid UTF-8 (byte {e.start}: {raw[e.start : e.start + 1]!r})",
            ),
        )
        return
    if not line.strip():
        return
    try:
        yield where, json.loads(line)
    except json.JSONDecodeError as e:
        hint = ""
        if lineno == 1 and line.strip() in ("[", "{"):
            hint = " (this looks like a pretty-printed JSON document; expected JSONL: one record per line)"
        yield where, RecordError(str(path), where, None, "<json>", f"invalid JSON: {e.msg}{hint}")
    except (ValueError, RecursionError) as e:  # an int too long to convert, nesting too deep
        yield where, RecordError(str(path), where, None, "<json>", f"invalid JSON: {_short(str(e), 120)}")


def _iter_jsonl(path: Path) -> Iterator[tuple[str, Any]]:
    for where, value in _jsonl_rows(path):
        if isinstance(value, RecordError):
            raise value
        yield where, value


def _iter_parquet(path: Path) -> Iterator[tuple[str, Any]]:
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(path)
    except Exception as e:  # pyarrow raises many types; name the file instead of a deep trace
        raise RecordError(str(path), "file", None, "<parquet>", f"not a readable Parquet file: {e}") from None
    missing = [c for c in REQUIRED_FIELDS if c not in table.column_names]
    if missing:
        raise RecordError(
            str(path), "schema", None, missing[0], f"column missing from Parquet schema (has {table.column_names})"
        )
    try:
        rows = table.to_pylist()
    except Exception as e:  # a column type Python cannot represent (e.g. an out-of-range timestamp)
        raise RecordError(
            str(path), "file", None, "<parquet>", f"cannot read the rows: {_short(str(e), 200)}"
        ) from None
    for i, row in enumerate(rows):
        yield f"row {i}", _decode_json_columns(row)


def _iter_hf_folder(path: Path) -> Iterator[tuple[str, Any]]:
    import datasets

    try:
        ds = datasets.load_from_disk(str(path))
    except (FileNotFoundError, ValueError, OSError) as e:
        raise RecordError(
            str(path), "folder", None, "<format>", f"not a datasets.save_to_disk folder ({_short(str(e), 200)})"
        ) from None
    if isinstance(ds, datasets.DatasetDict):
        for split, part in ds.items():
            for i, row in enumerate(part):
                yield f"{split}[{i}]", _decode_json_columns(row)
    else:
        for i, row in enumerate(ds):
            yield f"row {i}", _decode_json_columns(row)


def _decode_json_columns(row: dict) -> dict:
    """Columnar files store ``meta``/``reward_components`` as JSON text (one schema for heterogeneous dicts)."""
    for name in ("meta", "reward_components"):
        v = row.get(name)
        if isinstance(v, str):
            try:
                row[name] = json.loads(v)
            except (ValueError, RecursionError):
                pass  # left as a string: validation then names the field
    return row


def _is_jsonl(p: Path) -> bool:
    return p.suffix in (".jsonl", ".json") or p.name.endswith((".jsonl.tmp", ".jsonl.gz"))


def iter_raw(path: str | os.PathLike) -> Iterator[tuple[str, Any]]:
    """Yield ``(where, raw_record)`` from a JSONL file, a Parquet file or a ``datasets`` folder."""
    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"record file not found: {p}")
    if p.is_dir():
        return _iter_hf_folder(p)
    if p.suffix == ".parquet":
        return _iter_parquet(p)
    if _is_jsonl(p):
        return _iter_jsonl(p)
    raise RecordError(
        str(p), "file", None, "<format>", "unknown format (expected .jsonl, .jsonl.gz, .parquet or a folder)"
    )


def load_records(
    paths: str | os.PathLike | Sequence[str | os.PathLike], skip_invalid: bool = False
) -> tuple[list[ConversationRecord], LoadSummary]:
    """Read and validate records from one or more files; ids must be unique across all of them.

    With ``skip_invalid=False`` (default) the first bad record raises :class:`RecordError`; with ``True`` bad records
    are skipped and counted in the returned :class:`LoadSummary` (never silently). An empty input raises.
    """
    if isinstance(paths, str | os.PathLike):
        paths = [paths]
    if not paths:
        raise ValueError("no record files given")
    records: list[ConversationRecord] = []
    summary = LoadSummary()
    seen: dict[str, str] = {}
    for path in paths:
        n_before = len(records) + summary.skipped
        for where, raw in _checked_iter(path, skip_invalid, summary):
            try:
                rec = validate_record(raw, str(path), where)
                if rec.id in seen:
                    raise RecordError(str(path), where, rec.id, "id", f"duplicate id (first seen at {seen[rec.id]})")
            except RecordError as e:
                if not skip_invalid:
                    raise
                summary.add_skip(e)
                continue
            seen[rec.id] = f"{path}:{where}"
            records.append(rec)
            summary.read += 1
        if len(records) + summary.skipped == n_before:
            raise RecordError(str(path), "file", None, "<file>", "contains no records")
    return records, summary


def _checked_iter(path, skip_invalid: bool, summary: LoadSummary) -> Iterator[tuple[str, Any]]:
    """Like :func:`iter_raw` but, under ``skip_invalid``, an unreadable line skips one line instead of the file."""
    p = Path(path)
    if skip_invalid and p.is_file() and _is_jsonl(p):
        for where, value in _jsonl_rows(p):
            if isinstance(value, RecordError):
                summary.add_skip(value)
            else:
                yield where, value
        return
    yield from iter_raw(p)


def concat_files(parts: Iterable[str | os.PathLike], path: str | os.PathLike) -> Path:
    """Concatenate ``parts`` in order into ``path`` atomically (temp file beside it, fsync, rename), e.g. a
    simulation's shards into its final file."""
    p = Path(path)
    with atomic_write(p, "wb") as f:
        for part in parts:
            with open(part, "rb") as src:
                shutil.copyfileobj(src, f)
    return p


def write_records(path: str | os.PathLike, records: Iterable[ConversationRecord | dict]) -> Path:
    """Write records atomically (temp file + rename): a finished file is never half-written."""
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    rows = [r.to_dict() if isinstance(r, ConversationRecord) else r for r in records]
    if p.suffix == ".parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq

        # dict-valued columns are stored as JSON strings so heterogeneous meta/components keep one schema
        flat = [
            {**r, "meta": json.dumps(r.get("meta") or {}), "reward_components": json.dumps(r.get("reward_components"))}
            for r in rows
        ]
        with atomic_write(p, "wb") as f:
            pq.write_table(pa.Table.from_pylist(flat), f)
    else:
        with atomic_write(p) as f:
            for r in rows:
                f.write(json.dumps(r, ensure_ascii=False) + "\n")
    return p


def mean_components(records: Iterable[ConversationRecord]) -> dict[str, float]:
    """The mean of each ``reward_components`` entry over the records that have it (``None`` values left out)."""
    comps: dict[str, list[float]] = {}
    for r in records:
        for k, v in (r.reward_components or {}).items():
            if v is not None:
                comps.setdefault(k, []).append(float(v))
    return {k: statistics.fmean(v) for k, v in sorted(comps.items())}


def questions_with_reward_variance(records: Iterable[ConversationRecord]) -> int:
    """How many questions (``task_id``) have runs whose rewards differ: the ones Swift and DPO can learn from."""
    per_task: dict[str, set[float]] = {}
    for r in records:
        per_task.setdefault(r.task_id, set()).add(r.reward)
    return sum(len(v) > 1 for v in per_task.values())


def split_by_task(
    records: Sequence[ConversationRecord], val_fraction: float, seed: int = 0
) -> tuple[list[ConversationRecord], list[ConversationRecord]]:
    """Split into (train, val) by ``task_id`` — all runs of a question land on the same side, never split by row.

    Deterministic in ``seed`` and the task ids alone (not file order): tasks are ordered by a seeded hash and the
    first ``round(n_tasks * val_fraction)`` go to validation.
    """
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
    tasks = sorted({r.task_id for r in records}, key=lambda t: hashlib.sha256(f"{seed}:{t}".encode()).hexdigest())
    n_val = round(len(tasks) * val_fraction)
    if val_fraction > 0 and n_val == 0 and len(tasks) > 1:
        n_val = 1
    val_tasks = set(tasks[:n_val])
    train = [r for r in records if r.task_id not in val_tasks]
    val = [r for r in records if r.task_id in val_tasks]
    return train, val


def group_by_task(records: Iterable[ConversationRecord]) -> dict[str, list[ConversationRecord]]:
    """Group records by ``task_id`` keeping first-seen order of tasks and of runs within a task."""
    groups: dict[str, list[ConversationRecord]] = {}
    for r in records:
        groups.setdefault(r.task_id, []).append(r)
    return groups
