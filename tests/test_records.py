"""Conversation records: loading JSONL / Parquet / datasets folders, validation errors that name file, line/record
and field, ``skip_invalid`` accounting, and the task-level train/val split."""

from __future__ import annotations

import json
import random

import pytest
from conftest import make_record

from clarify_lit.data.records import (
    ConversationRecord,
    RecordError,
    group_by_task,
    load_records,
    split_by_task,
    write_records,
)


def _write_lines(path, rows):
    """Write one JSON line per row; a ``str`` row is written verbatim (for broken lines)."""
    with open(path, "w", encoding="utf-8") as f:
        for r in rows:
            f.write((r if isinstance(r, str) else json.dumps(r)) + "\n")
    return path


def _rows(n_tasks=2, n_runs=3):
    return [make_record(t, r, float(r == 0)) for t in range(n_tasks) for r in range(n_runs)]


# ------------------------------------------------------------------------------------------------ valid loads
def test_load_jsonl_reads_every_field(records_factory):
    path = records_factory(n_tasks=3, n_runs=2)
    records, summary = load_records(path)
    assert summary.read == 6 and summary.skipped == 0
    assert [r.id for r in records] == ["t0-r0", "t0-r1", "t1-r0", "t1-r1", "t2-r0", "t2-r1"]
    first = records[0]
    assert isinstance(first, ConversationRecord)
    assert first.task_id == "t0" and first.run == 0 and first.reward == 1.0 and first.temperature == 0.0
    assert records[1].reward == 0.0 and records[1].temperature == 0.5
    assert [m["role"] for m in first.messages] == ["system"] + ["user", "assistant"] * 3
    assert first.reward_components == {"correct": 1.0, "judge": None}
    assert first.meta == {"question_prompt": "Question t0 as first asked"}
    # where a record came from is kept for error messages: file and line
    assert first.source == f"{path}:line 1" and records[3].source == f"{path}:line 4"
    assert "t1-r1" in records[3].where() and str(path) in records[3].where()


def test_parquet_round_trip_equals_jsonl(records_factory, tmp_path):
    jsonl = records_factory(n_tasks=2, n_runs=3)
    from_jsonl, _ = load_records(jsonl)
    pq_path = write_records(tmp_path / "records.parquet", from_jsonl)
    from_parquet, summary = load_records(pq_path)
    assert summary.read == 6
    assert [r.to_dict() for r in from_parquet] == [r.to_dict() for r in from_jsonl]
    assert from_parquet[0].source == f"{pq_path}:row 0"


def test_datasets_folder_and_dataset_dict(tmp_path):
    datasets = pytest.importorskip("datasets")
    rows = _rows()
    # columnar storage keeps dict-valued columns as JSON text (one schema for heterogeneous dicts)
    flat = [{**r, "meta": json.dumps(r["meta"]), "reward_components": json.dumps(r["reward_components"])} for r in rows]
    folder = tmp_path / "ds"
    datasets.Dataset.from_list(flat).save_to_disk(str(folder))
    records, summary = load_records(folder)
    assert summary.read == len(rows)
    assert [r.id for r in records] == [r["id"] for r in rows]
    assert records[0].meta == rows[0]["meta"] and records[0].reward_components == rows[0]["reward_components"]
    assert records[0].messages == rows[0]["messages"]

    dd_folder = tmp_path / "dd"
    datasets.DatasetDict(
        {"train": datasets.Dataset.from_list(flat[:4]), "extra": datasets.Dataset.from_list(flat[4:])}
    ).save_to_disk(str(dd_folder))
    dd_records, _ = load_records(dd_folder)
    assert sorted(r.id for r in dd_records) == sorted(r["id"] for r in rows)
    assert any(r.source.endswith("train[0]") for r in dd_records)


def test_several_files_and_unknown_format(tmp_path):
    rows = _rows()
    a = _write_lines(tmp_path / "a.jsonl", rows[:3])
    b = _write_lines(tmp_path / "b.jsonl", rows[3:])
    records, summary = load_records([a, b])
    assert summary.read == 6 and {r.task_id for r in records} == {"t0", "t1"}
    bad = tmp_path / "records.csv"
    bad.write_text("id,task_id\n")
    with pytest.raises(RecordError, match="unknown format") as e:
        load_records(bad)
    assert e.value.source == str(bad)
    with pytest.raises(FileNotFoundError):
        load_records(tmp_path / "missing.jsonl")


# ------------------------------------------------------------------------------------------------ validation errors
def _drop_messages(r):
    del r["messages"]


def _wrong_role(r):
    r["messages"][1]["role"] = "teacher"


def _two_assistants(r):
    r["messages"].insert(3, {"role": "assistant", "content": "And another thing."})


def _empty_assistant(r):
    r["messages"][4]["content"] = "   "


def _nan_reward(r):
    r["reward"] = float("nan")


def _inf_reward(r):
    r["reward"] = float("inf")


def _string_reward(r):
    r["reward"] = "1.0"


def _bool_reward(r):
    r["reward"] = True


def _late_system(r):
    r["messages"].insert(2, {"role": "system", "content": "again"})


def _no_assistant(r):
    r["messages"] = [m for m in r["messages"] if m["role"] != "assistant"]


def _empty_id(r):
    r["id"] = ""


@pytest.mark.parametrize(
    "mutate, field, problem",
    [
        (_drop_messages, "messages", "missing"),
        (_wrong_role, "messages[1].role", "must be one of"),
        (_two_assistants, "messages[3].role", "two consecutive assistant turns"),
        (_empty_assistant, "messages[4].content", "empty assistant turn"),
        (_nan_reward, "reward", "finite"),
        (_inf_reward, "reward", "finite"),
        (_string_reward, "reward", "must be a number"),
        (_bool_reward, "reward", "must be a number"),
        (_late_system, "messages[2].role", "only allowed first"),
        (_no_assistant, "messages", "no assistant turn"),
    ],
)
def test_invalid_record_names_file_line_id_and_field(tmp_path, mutate, field, problem):
    rows = _rows()
    mutate(rows[1])
    path = _write_lines(tmp_path / "bad.jsonl", rows)
    with pytest.raises(RecordError) as e:
        load_records(path)
    err = e.value
    assert (err.source, err.where, err.record_id, err.field_name) == (str(path), "line 2", "t0-r1", field)
    msg = str(err)
    assert str(path) in msg and "line 2" in msg and "'t0-r1'" in msg and f"'{field}'" in msg and problem in msg


def test_invalid_id_is_named_by_line(tmp_path):
    rows = _rows()
    _empty_id(rows[2])
    path = _write_lines(tmp_path / "bad.jsonl", rows)
    with pytest.raises(RecordError) as e:
        load_records(path)
    assert (e.value.where, e.value.field_name) == ("line 3", "id")
    assert f"{path}:line 3" in str(e.value)


def test_invalid_json_line(tmp_path):
    rows = _rows()
    path = _write_lines(tmp_path / "bad.jsonl", [rows[0], rows[1], '{"id": "t0-r2", "task_id": ', rows[3]])
    with pytest.raises(RecordError) as e:
        load_records(path)
    assert (e.value.source, e.value.where, e.value.field_name) == (str(path), "line 3", "<json>")
    assert "invalid JSON" in str(e.value) and f"{path}:line 3" in str(e.value)


def test_duplicate_id_within_and_across_files(tmp_path):
    rows = _rows()
    path = _write_lines(tmp_path / "dup.jsonl", [rows[0], rows[1], rows[0]])
    with pytest.raises(RecordError) as e:
        load_records(path)
    assert (e.value.where, e.value.record_id, e.value.field_name) == ("line 3", "t0-r0", "id")
    assert "duplicate id" in str(e.value) and f"{path}:line 1" in str(e.value)  # names the first occurrence

    a = _write_lines(tmp_path / "a.jsonl", rows[:2])
    b = _write_lines(tmp_path / "b.jsonl", [rows[2], rows[1]])
    with pytest.raises(RecordError) as e:
        load_records([a, b])
    assert (e.value.source, e.value.where, e.value.record_id) == (str(b), "line 2", "t0-r1")


def test_empty_file_raises(tmp_path):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n\n")
    with pytest.raises(RecordError, match="contains no records") as e:
        load_records(empty)
    assert e.value.source == str(empty) and e.value.field_name == "<file>"


def test_parquet_missing_column(tmp_path):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    rows = [{k: v for k, v in r.items() if k not in ("reward", "meta", "reward_components")} for r in _rows()]
    path = tmp_path / "no_reward.parquet"
    pq.write_table(pa.Table.from_pylist(rows), path)
    with pytest.raises(RecordError) as e:
        load_records(path)
    assert (e.value.source, e.value.where, e.value.field_name) == (str(path), "schema", "reward")
    assert "column missing" in str(e.value)


def test_parquet_bad_row_is_named(tmp_path):
    recs = _rows()
    recs[4]["reward"] = float("nan")
    path = write_records(tmp_path / "nan.parquet", recs)
    with pytest.raises(RecordError) as e:
        load_records(path)
    assert (e.value.where, e.value.record_id, e.value.field_name) == ("row 4", "t1-r1", "reward")


def test_skip_invalid_counts_every_skip(tmp_path):
    rows = _rows(n_tasks=3, n_runs=3)  # 9 valid
    bad_role = make_record(7, 0, 1.0)
    _wrong_role(bad_role)
    bad_reward = make_record(7, 1, 1.0)
    _string_reward(bad_reward)
    lines = [rows[0], "not json at all", *rows[1:5], bad_role, *rows[5:], bad_reward, rows[0]]  # + a duplicate
    path = _write_lines(tmp_path / "mixed.jsonl", lines)
    with pytest.raises(RecordError):
        load_records(path)  # default: the first bad record raises
    records, summary = load_records(path, skip_invalid=True)
    assert [r.id for r in records] == [r["id"] for r in rows]
    assert summary.read == 9 and summary.skipped == 4
    assert dict(summary.reasons) == {"<json>": 1, "messages[1].role": 1, "reward": 1, "id": 1}
    assert len(summary.first_errors) == 4 and "line 2" in summary.first_errors[0]
    assert "9 read, 4 skipped" in summary.line()


def test_skip_invalid_file_of_only_bad_records_is_not_silent(tmp_path):
    bad = make_record(0, 0, 1.0)
    _nan_reward(bad)
    path = _write_lines(tmp_path / "allbad.jsonl", [bad])
    records, summary = load_records(path, skip_invalid=True)
    assert records == [] and summary.skipped == 1 and summary.reasons["reward"] == 1


# ------------------------------------------------------------------------------------------------ split by task
def _many_records(n_tasks=10, n_runs=3):
    out = []
    for t in range(n_tasks):
        for r in range(n_runs):
            rec = make_record(t, r, float(r == 0))
            out.append(ConversationRecord(**{k: v for k, v in rec.items()}))
    return out


def test_split_by_task_never_splits_a_task():
    records = _many_records()
    train, val = split_by_task(records, 0.3, seed=0)
    train_tasks, val_tasks = {r.task_id for r in train}, {r.task_id for r in val}
    assert len(val_tasks) == 3 and len(train_tasks) == 7
    assert not train_tasks & val_tasks
    assert len(train) + len(val) == len(records) == 30
    # every run of a held-out question is held out
    groups = group_by_task(records)
    assert all(len([r for r in val if r.task_id == t]) == len(groups[t]) for t in val_tasks)


def test_split_by_task_is_deterministic_and_order_independent():
    records = _many_records()
    train, val = split_by_task(records, 0.3, seed=0)
    train2, val2 = split_by_task(records, 0.3, seed=0)
    assert [r.id for r in val] == [r.id for r in val2] and [r.id for r in train] == [r.id for r in train2]
    shuffled = records[:]
    random.Random(1).shuffle(shuffled)
    s_train, s_val = split_by_task(shuffled, 0.3, seed=0)
    assert {r.task_id for r in s_val} == {r.task_id for r in val}
    assert {r.id for r in s_train} == {r.id for r in train}
    # the seed is what moves the split (some seed among a few must differ from seed 0)
    splits = {frozenset(r.task_id for r in split_by_task(records, 0.3, seed=s)[1]) for s in range(6)}
    assert len(splits) > 1


def test_split_by_task_edge_fractions():
    records = _many_records(n_tasks=4)
    train, val = split_by_task(records, 0.0)
    assert val == [] and len(train) == 12
    _, val = split_by_task(records, 0.01)  # a positive fraction holds out at least one task
    assert len({r.task_id for r in val}) == 1
    for bad in (1.0, -0.1):
        with pytest.raises(ValueError, match="val_fraction"):
            split_by_task(records, bad)


def test_nonfinite_json_literal_reward(tmp_path):
    """``NaN``/``Infinity`` literals are valid for Python's json module; the validator still refuses them."""
    rows = _rows()
    line = json.dumps(rows[0]).replace('"reward": 1.0', '"reward": Infinity')
    assert "Infinity" in line
    path = _write_lines(tmp_path / "inf.jsonl", [line])
    with pytest.raises(RecordError) as e:
        load_records(path)
    assert e.value.field_name == "reward" and "finite" in str(e.value)


def test_gzipped_jsonl_reads_like_the_plain_file_and_a_damaged_stream_is_named(tmp_path):
    import gzip

    from clarify_lit.data.records import RecordError, load_records, write_records

    rows = [
        {
            "id": f"r{i}",
            "task_id": f"t{i}",
            "messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "A"}],
            "reward": float(i),
        }
        for i in range(3)
    ]
    plain = write_records(tmp_path / "x.jsonl", rows)
    packed = tmp_path / "x.jsonl.gz"
    packed.write_bytes(gzip.compress(plain.read_bytes()))
    a, _ = load_records(plain)
    b, _ = load_records(packed)
    assert [r.to_dict() for r in a] == [r.to_dict() for r in b]
    assert b[1].source == f"{packed}:line 2"
    cut = tmp_path / "cut.jsonl.gz"
    cut.write_bytes(packed.read_bytes()[:-12])  # the stream ends early
    with pytest.raises(RecordError, match=r"cut.jsonl.gz:line \d+: field '<gzip>'"):
        load_records(cut)
