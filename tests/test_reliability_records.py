"""Reliability, bad input (docs/reliability.md): the malformed-input corpus of issue 7 goes through the DataModule
(what ``clarify fit`` runs) and each fault is refused with one error naming the file, the record and the field, or,
under ``skip_invalid_records``, skipped and counted; the record loader is fuzzed for any other exception."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
from conftest import make_record
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from clarify_lit.data.datamodule import ConversationDataModule
from clarify_lit.data.records import RecordError, load_records, write_records
from clarify_lit.data.tokenization import TokenizationError
from clarify_lit.data.views import ObjectiveDataError
from clarify_lit.train.objectives import DPO, Refit, Swift

pytestmark = pytest.mark.usefixtures("clarify_cache")


def good_rows(n_tasks: int = 2, n_runs: int = 3) -> list[dict]:
    return [make_record(t, r, [1.0, 0.0, 0.5][r % 3]) for t in range(n_tasks) for r in range(n_runs)]


def write_lines(path: Path, rows) -> Path:
    """One JSON line per dict (NaN written as the ``NaN`` literal Python's json emits); a str row goes verbatim."""
    with path.open("w", encoding="utf-8") as f:
        for r in rows:
            f.write((r if isinstance(r, str) else json.dumps(r)) + "\n")
    return path


def with_bad(mutate, line: int = 3) -> list[dict]:
    """The good rows with row ``line`` (1-based) mutated in place."""
    rows = good_rows()
    mutate(rows[line - 1])
    return rows


def datamodule(path, tiny_model_dir, objective=None, **kw) -> ConversationDataModule:
    return ConversationDataModule(
        [str(path)],
        tokenizer_name_or_path=str(tiny_model_dir),
        val_fraction=0.0,
        objective=objective or Refit(),
        cache_tokenized=False,
        **kw,
    )


def _set(key, value):
    def mutate(r):
        r[key] = value

    return mutate


def _msg(i, key, value):
    def mutate(r):
        r["messages"][i][key] = value

    return mutate


def _del(key):
    def mutate(r):
        del r[key]

    return mutate


def _insert_assistant(r):
    r["messages"].insert(3, {"role": "assistant", "content": "And another thing."})


def _assistant_first(r):
    r["messages"].insert(1, {"role": "assistant", "content": "Hello, I will answer."})


def _ends_on_user(r):
    r["messages"].append({"role": "user", "content": "Anything else?"})


def _parquet_wrong_types(tmp_path: Path) -> Path:
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = good_rows()
    for r in rows:
        r["reward"] = str(r["reward"])  # a string column where a float belongs
        r["messages"] = json.dumps(r["messages"])  # a JSON text where a list belongs
        r["meta"], r["reward_components"] = json.dumps(r["meta"]), json.dumps(r["reward_components"])
    path = tmp_path / "strings.parquet"
    pq.write_table(pa.Table.from_pylist(rows), path)
    return path


def _parquet_missing_column(tmp_path: Path) -> Path:
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = [{k: v for k, v in r.items() if k not in ("messages", "meta", "reward_components")} for r in good_rows()]
    path = tmp_path / "no_messages.parquet"
    pq.write_table(pa.Table.from_pylist(rows), path)
    return path


def _long_final_answer(tmp_path: Path) -> Path:
    rows = good_rows()
    rows[4]["messages"][-1]["content"] = "The answer is A, because " + "the light makes the sugar " * 40
    return write_lines(tmp_path / "long.jsonl", rows)


def _latin1_line(tmp_path: Path) -> Path:
    path = write_lines(tmp_path / "r.jsonl", good_rows()[:2])
    with path.open("ab") as f:
        f.write('{"id": "caf\xe9"}\n'.encode("latin-1"))
    return path


def _pretty_json(tmp_path: Path) -> Path:
    path = tmp_path / "r.jsonl"
    path.write_text(json.dumps(good_rows(), indent=1))
    return path


def _not_a_dataset_folder(tmp_path: Path) -> Path:
    folder = tmp_path / "folder"
    folder.mkdir()
    (folder / "notes.txt").write_text("not a dataset")
    return folder


# (case, build(tmp_path) -> path, objective, DataModule kwargs, exception, (where, record id, field) fragments)
CORPUS = [
    (
        "invalid JSON line",
        lambda p: write_lines(p / "r.jsonl", [*good_rows()[:1], '{"id": "t0-r1", "task_id": ', *good_rows()[1:]]),
        None,
        {},
        RecordError,
        ("line 2", None, "<json>"),
    ),
    (
        "missing messages",
        lambda p: write_lines(p / "r.jsonl", with_bad(_del("messages"))),
        None,
        {},
        RecordError,
        ("line 3", "t0-r2", "'messages'"),
    ),
    (
        "wrong role name",
        lambda p: write_lines(p / "r.jsonl", with_bad(_msg(1, "role", "teacher"))),
        None,
        {},
        RecordError,
        ("line 3", "t0-r2", "'messages[1].role'"),
    ),
    (
        "two consecutive assistant turns",
        lambda p: write_lines(p / "r.jsonl", with_bad(_insert_assistant)),
        None,
        {},
        RecordError,
        ("line 3", "t0-r2", "'messages[3].role'"),
    ),
    (
        "empty assistant turn",
        lambda p: write_lines(p / "r.jsonl", with_bad(_msg(4, "content", " \n"))),
        None,
        {},
        RecordError,
        ("line 3", "t0-r2", "'messages[4].content'"),
    ),
    (
        "NaN reward",
        lambda p: write_lines(p / "r.jsonl", with_bad(_set("reward", float("nan")))),
        None,
        {},
        RecordError,
        ("line 3", "t0-r2", "'reward'"),
    ),
    (
        "infinite reward",
        lambda p: write_lines(p / "r.jsonl", with_bad(_set("reward", float("-inf")))),
        None,
        {},
        RecordError,
        ("line 3", "t0-r2", "'reward'"),
    ),
    (
        "string reward",
        lambda p: write_lines(p / "r.jsonl", with_bad(_set("reward", "0.5"))),
        None,
        {},
        RecordError,
        ("line 3", "t0-r2", "'reward'"),
    ),
    (
        "reward too large for a float",
        lambda p: write_lines(p / "r.jsonl", with_bad(_set("reward", 10**400))),
        None,
        {},
        RecordError,
        ("line 3", "t0-r2", "'reward'"),
    ),
    (
        "negative reward under Refit",
        lambda p: write_lines(p / "r.jsonl", with_bad(_set("reward", -0.5), line=5)),
        Refit(),
        {},
        ObjectiveDataError,
        ("line 5", "t1-r1", "'reward'"),
    ),
    (
        "duplicate id",
        lambda p: write_lines(p / "r.jsonl", [*good_rows(), good_rows()[1]]),
        None,
        {},
        RecordError,
        ("line 7", "t0-r1", "'id'"),
    ),
    (
        "task with a single run under Swift",
        lambda p: write_lines(p / "r.jsonl", good_rows()[:4]),
        Swift(),
        {},
        ObjectiveDataError,
        ("line 4", "t1-r0", "'task_id'"),
    ),
    (
        "final answer cut by max_length",
        _long_final_answer,
        None,
        {"max_length": 96},
        TokenizationError,
        ("line 5", "t1-r1", "'messages'"),
    ),
    ("empty file", lambda p: write_lines(p / "r.jsonl", ["", "   "]), None, {}, RecordError, ("file", None, "<file>")),
    ("not UTF-8", _latin1_line, None, {}, RecordError, ("line 3", None, "<encoding>")),
    ("a pretty-printed JSON document", _pretty_json, None, {}, RecordError, ("line 1", None, "JSONL")),
    (
        "Parquet without a messages column",
        _parquet_missing_column,
        None,
        {},
        RecordError,
        ("schema", None, "'messages'"),
    ),
    ("Parquet with string columns", _parquet_wrong_types, None, {}, RecordError, ("row 0", "t0-r0", "'reward'")),
    ("a folder that is not a dataset", _not_a_dataset_folder, None, {}, RecordError, ("folder", None, "save_to_disk")),
    (
        "DPO with no valid pairs",
        lambda p: write_lines(p / "r.jsonl", [make_record(t, r, 1.0) for t in range(2) for r in range(2)]),
        DPO(),
        {},
        ObjectiveDataError,
        ("DPO", None, "min_gap"),
    ),
    (
        "Swift where every task has zero spread",
        lambda p: write_lines(p / "r.jsonl", [make_record(t, r, float(t)) for t in range(2) for r in range(2)]),
        Swift(),
        {},
        ObjectiveDataError,
        ("Swift", None, "zero reward spread"),
    ),
    # issue 17
    (
        "lone surrogate in a message",
        lambda p: write_lines(p / "r.jsonl", with_bad(_msg(2, "content", "Why \ud800?"))),
        None,
        {},
        RecordError,
        ("line 3", "t0-r2", "'messages[2].content'"),
    ),
    (
        "assistant turn before any user turn",
        lambda p: write_lines(p / "r.jsonl", with_bad(_assistant_first)),
        None,
        {},
        RecordError,
        ("line 3", "t0-r2", "'messages[1].role'"),
    ),
    (
        "conversation ending on a user turn",
        lambda p: write_lines(p / "r.jsonl", with_bad(_ends_on_user)),
        None,
        {},
        RecordError,
        ("line 3", "t0-r2", "'messages[7].role'"),
    ),
    (
        "reward beyond float32 under Refit",
        lambda p: write_lines(p / "r.jsonl", with_bad(_set("reward", 1e308))),
        Refit(),
        {},
        ObjectiveDataError,
        ("line 3", "t0-r2", "'reward'"),
    ),
    (
        "all-zero rewards under Refit",
        lambda p: write_lines(p / "r.jsonl", [make_record(t, r, 0.0) for t in range(2) for r in range(3)]),
        Refit(),
        {},
        ObjectiveDataError,
        ("all 6 training conversations", None, "every reward is 0"),
    ),
    (
        "a record over max_record_chars",
        lambda p: write_lines(p / "r.jsonl", with_bad(_msg(2, "content", "x" * 900))),
        None,
        {"max_record_chars": 800},
        RecordError,
        ("line 3", "t0-r2", "'messages'"),
    ),
]


@pytest.mark.parametrize("case, build, objective, kwargs, exc, fragments", CORPUS, ids=[c[0] for c in CORPUS])
def test_bad_input_is_refused_naming_file_record_and_field(
    case, build, objective, kwargs, exc, fragments, tiny_model_dir, tmp_path
):
    path = build(tmp_path)
    dm = datamodule(path, tiny_model_dir, objective, **kwargs)
    with pytest.raises(exc) as e:
        dm.setup("fit")  # refused while the data is prepared: before a model forward or an optimizer step
    msg = str(e.value)
    assert "\n" not in msg.strip(), msg  # one line
    where, record_id, field = fragments
    if case not in ("DPO with no valid pairs", "Swift where every task has zero spread"):
        assert path.name in msg, msg  # the file
    assert where in msg, msg
    if record_id is not None:
        assert f"'{record_id}'" in msg, msg
    assert field in msg, msg
    assert dm.train_set is None  # nothing half-prepared


def test_skip_invalid_records_skips_counts_and_logs_every_record_level_fault(tiny_model_dir, tmp_path, caplog):
    rows = good_rows(n_tasks=3)  # 9 good records
    bad = [make_record(7, r, 1.0) for r in range(7)]
    del bad[0]["messages"]
    bad[1]["messages"][1]["role"] = "teacher"
    _insert_assistant(bad[2])
    bad[3]["messages"][4]["content"] = ""
    bad[4]["reward"] = float("nan")
    bad[5]["reward"] = "1"
    bad[6]["reward"] = 10**400
    more = [make_record(8, r, 1.0) for r in range(3)]  # issue 17: a lone surrogate, roles out of order
    more[0]["messages"][2]["content"] = "Why \ud800?"
    _assistant_first(more[1])
    _ends_on_user(more[2])
    bad += more
    lines = [rows[0], "{oops", *rows[1:5], *bad, *rows[5:], rows[3]]  # + a duplicate id
    path = write_lines(tmp_path / "mixed.jsonl", lines)
    with path.open("ab") as f:
        f.write(b"\xfe\xfe\n")
    with pytest.raises(RecordError, match="line 2"):
        datamodule(path, tiny_model_dir).setup("fit")  # off by default
    dm = datamodule(path, tiny_model_dir, skip_invalid_records=True)
    with caplog.at_level("INFO", logger="clarify_lit.data.datamodule"):
        dm.setup("fit")
    assert sorted(s["id"] for s in dm.train_set.samples) == sorted(r["id"] for r in rows)
    assert dm.stats["data/skipped_records"] == 13.0  # 10 bad + bad JSON + duplicate + bad UTF-8
    line = next(r.getMessage() for r in caplog.records if "skipped invalid" in r.getMessage())
    assert (
        "9 read, 13 skipped invalid" in line
        and "<json>: 1" in line
        and "<encoding>: 1" in line
        and "reward: 3" in line
        and "id: 1" in line
        and "messages[2].content: 1" in line
        and "messages[1].role: 2" in line
        and "messages[7].role: 1" in line
    )


def test_parquet_and_byte_order_mark_are_read(tiny_model_dir, tmp_path):
    """The good paths next to the bad ones: Parquet written by us and a JSONL file saved with a UTF-8 BOM load."""
    pq_path = write_records(tmp_path / "ok.parquet", good_rows())
    bom = tmp_path / "bom.jsonl"
    bom.write_bytes(b"\xef\xbb\xbf" + "".join(json.dumps(r) + "\n" for r in good_rows()).encode())
    assert (
        [r.id for r in load_records(pq_path)[0]]
        == [r.id for r in load_records(bom)[0]]
        == [r["id"] for r in good_rows()]
    )


def test_no_record_files_is_refused_before_anything_loads(tiny_model_dir, tmp_path):
    with pytest.raises(ValueError, match="train_files is empty"):
        ConversationDataModule([], tokenizer_name_or_path=str(tiny_model_dir))
    with pytest.raises(FileNotFoundError, match=r"data.val_files: record file not found: .*nope.jsonl"):
        ConversationDataModule([str(write_lines(tmp_path / "r.jsonl", good_rows()))], val_files=["nope.jsonl"])
    with pytest.raises(ValueError, match="no record files"):
        load_records([])


# ------------------------------------------------------------------------------------------------ fuzzing
FUZZ = settings(
    max_examples=150,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)

json_scalars = (
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(max_size=12)
    | st.integers(min_value=10**308, max_value=10**400)
)  # ints no float can hold
json_values = st.recursive(
    json_scalars,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3),
    max_leaves=12,
)
FIELDS = [
    "id",
    "task_id",
    "messages",
    "reward",
    "run",
    "temperature",
    "reward_components",
    "gold",
    "prediction",
    "dataset",
    "meta",
]


@st.composite
def mutated_records(draw):
    """A valid record with a few fields (or message fields) replaced, removed or retyped — near the schema, where
    validation bugs hide — or a wholly random JSON value."""
    if draw(st.integers(0, 9)) == 0:
        return draw(json_values)
    rec = make_record(draw(st.integers(0, 3)), draw(st.integers(0, 3)), draw(st.floats(0, 1)))
    for _ in range(draw(st.integers(1, 3))):
        key = draw(st.sampled_from(FIELDS + ["reward", "temperature", "messages"]))  # the checked fields, more often
        action = draw(st.sampled_from(["replace", "delete", "message"]))
        if action == "delete":
            rec.pop(key, None)
        elif action == "message" and isinstance(rec.get("messages"), list) and rec["messages"]:
            i = draw(st.integers(0, len(rec["messages"]) - 1))
            rec["messages"][i] = draw(
                json_values
                | st.fixed_dictionaries(
                    {
                        "role": st.sampled_from(["system", "user", "assistant", "bot", ""]) | json_values,
                        "content": st.text(max_size=10) | json_values,
                    }
                )
            )
        else:
            rec[key] = draw(json_scalars | json_values)
    return rec


def _check_loaded(records) -> None:
    """What a successful load promises the trainer."""
    for r in records:
        assert isinstance(r.id, str) and r.id and isinstance(r.task_id, str) and r.task_id
        assert math.isfinite(r.reward) and math.isfinite(r.temperature) and r.temperature >= 0
        assert any(m["role"] == "assistant" for m in r.messages)
        assert all(m["role"] in ("system", "user", "assistant") and isinstance(m["content"], str) for m in r.messages)
    assert len({r.id for r in records}) == len(records)


@pytest.fixture(scope="module")
def fuzz_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("fuzz")


@FUZZ
@given(
    data=st.binary(max_size=300)
    | st.lists(st.text(max_size=40), max_size=4).map(lambda lines: "\n".join(lines).encode("utf-8", "surrogatepass"))
)
def test_fuzz_jsonl_bytes_raise_only_record_errors(fuzz_dir, data):
    path = fuzz_dir / "bytes.jsonl"
    path.write_bytes(data)
    for skip in (False, True):
        try:
            records, _ = load_records(path, skip_invalid=skip)
        except RecordError:
            continue
        _check_loaded(records)


@FUZZ
@given(rows=st.lists(mutated_records(), min_size=1, max_size=4))
def test_fuzz_record_fields_raise_only_record_errors(fuzz_dir, rows):
    path = fuzz_dir / "fields.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    for skip in (False, True):
        try:
            records, summary = load_records(path, skip_invalid=skip)
        except RecordError:
            continue
        _check_loaded(records)
        assert summary.read + summary.skipped == len(rows)


@settings(FUZZ, max_examples=40)
@given(rows=st.lists(mutated_records().filter(lambda r: isinstance(r, dict) and r), min_size=1, max_size=3))
def test_fuzz_parquet_raise_only_record_errors(fuzz_dir, rows):
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = fuzz_dir / "fuzz.parquet"
    try:
        pq.write_table(pa.Table.from_pylist(rows), path)
    except (pa.ArrowException, TypeError, ValueError, OverflowError):
        return  # pyarrow cannot store these rows at all: nothing for the loader to read
    for skip in (False, True):
        try:
            records, _ = load_records(path, skip_invalid=skip)
        except RecordError:
            continue
        _check_loaded(records)
