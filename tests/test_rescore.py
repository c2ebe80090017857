"""``clarify rescore``: a new reward on finished records, no generation; the round trip is exact, bad input is named."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from clarify_lit.data.records import RecordError, load_records, write_records
from clarify_lit.simulate.command import main as simulate_main
from clarify_lit.simulate.options import DataOptions, load_data_tasks
from clarify_lit.simulate.rescore import main
from clarify_lit.simulate.rubric import RubricReward

ROOT = Path(__file__).resolve().parents[1]
FIXTURE = ROOT / "configs" / "simulate" / "tiny-tasks.jsonl"
DATA = [
    "--data.dataset",
    "local",
    "--data.path",
    str(FIXTURE),
    "--data.label",
    "tiny",
    "--data.n_train",
    "6",
    "--data.n_test",
    "2",
    "--data.columns",
    '{"question": "question", "choices": "choices", "answer": "answer", "id": "id", "knowledge": "knowledge"}',
]


@pytest.fixture(scope="module")
def logged(tmp_path_factory) -> Path:
    """A tiny clarifying simulation scored with `correct` (4 questions x 3 runs)."""
    out = tmp_path_factory.mktemp("sim") / "run"
    simulate_main(
        [
            "--config",
            str(ROOT / "configs/simulate/tiny-clarifying.yaml"),
            "--data.path",
            str(FIXTURE),
            "--reward.kind",
            "correct",
            "--data.limit",
            "4",
            "--rollout.max_new_tokens",
            "6",
            "--progress",
            "false",
            "--output",
            str(out),
        ]
    )
    return out / "conversations.jsonl"


def test_rescore_with_the_rubric_and_back(logged, tmp_path, capsys):
    original, _ = load_records(logged)
    main(
        [
            "--inputs",
            f"[{logged}]",
            "--output",
            str(tmp_path / "rubric"),
            *DATA,
            "--reward.kind",
            "rubric",
            "--model",
            "tiny-random",
        ]
    )
    rescored, _ = load_records(tmp_path / "rubric" / "conversations.jsonl")
    assert [r.id for r in rescored] == [r.id for r in original]
    assert [r.messages for r in rescored] == [r.messages for r in original]  # nothing generated
    tasks = {
        t.task_id: t
        for t in load_data_tasks(
            DataOptions(
                dataset="local",
                path=str(FIXTURE),
                label="tiny",
                n_train=6,
                n_test=2,
                columns={
                    "question": "question",
                    "choices": "choices",
                    "answer": "answer",
                    "id": "id",
                    "knowledge": "knowledge",
                },
            )
        )
    }
    direct = RubricReward().score([tasks[r.task_id] for r in original], [r.messages for r in original])
    assert [r.reward for r in rescored] == [d.value for d in direct]
    assert all(r.reward_components["rubric"] == r.reward for r in rescored)
    assert [r.meta["rescored_from"]["reward"] for r in rescored] == [r.reward for r in original]
    summary = json.loads((tmp_path / "rubric" / "rescore.json").read_text())
    f = summary["files"]["conversations.jsonl"]
    assert summary["reward"].startswith("rubric(") and f["records"] == len(original)
    assert summary["environment"]["device"] == "cpu"  # the environment stamp (docs/environment.md)
    assert f["before"]["mean_reward"] == pytest.approx(sum(r.reward for r in original) / len(original))
    assert "concise" in f["components_mean"]
    # back to `correct`: the original rewards exactly (the rescore is a pure function of the messages)
    main(
        [
            "--inputs",
            f"[{tmp_path / 'rubric' / 'conversations.jsonl'}]",
            "--output",
            str(tmp_path / "back"),
            *DATA,
            "--reward.kind",
            "correct",
            "--model",
            "tiny-random",
        ]
    )
    back, _ = load_records(tmp_path / "back" / "conversations.jsonl")
    assert [r.reward for r in back] == [r.reward for r in original]
    assert "mean_reward" in capsys.readouterr().out


def test_existing_output_and_inputs_are_never_overwritten(logged, tmp_path):
    args = [
        "--inputs",
        f"[{logged}]",
        "--output",
        str(tmp_path / "o"),
        *DATA,
        "--reward.kind",
        "correct",
        "--model",
        "tiny-random",
    ]
    main(args)
    with pytest.raises(FileExistsError, match="--overwrite"):
        main(args)
    main([*args, "--overwrite", "true"])
    with pytest.raises(ValueError, match="overwrite an input"):
        main(
            [
                "--inputs",
                f"[{tmp_path / 'o' / 'conversations.jsonl'}]",
                "--output",
                str(tmp_path / "o"),
                *DATA,
                "--reward.kind",
                "correct",
                "--model",
                "tiny-random",
                "--overwrite",
                "true",
            ]
        )
    with pytest.raises(ValueError, match="--inputs"):
        main(["--output", str(tmp_path / "p"), *DATA])


def test_records_from_other_data_are_named(logged, tmp_path):
    # the records' questions are in the train part; the test part does not hold them
    with pytest.raises(RecordError, match=r"conversations.jsonl:line 1 .*field 'task_id'.*part test"):
        main(
            [
                "--inputs",
                f"[{logged}]",
                "--output",
                str(tmp_path / "x"),
                *DATA,
                "--data.part",
                "test",
                "--reward.kind",
                "correct",
                "--model",
                "tiny-random",
            ]
        )
    records, _ = load_records(logged)
    records[2].gold = "D" if records[2].gold != "D" else "C"
    bad = write_records(tmp_path / "bad.jsonl", records)
    with pytest.raises(RecordError, match=r"bad.jsonl:line 3 .*field 'gold'"):
        main(
            [
                "--inputs",
                f"[{bad}]",
                "--output",
                str(tmp_path / "y"),
                *DATA,
                "--reward.kind",
                "correct",
                "--model",
                "tiny-random",
            ]
        )
    assert not (tmp_path / "x").exists() and not (tmp_path / "y" / "bad.jsonl").exists()


def test_committed_gzipped_rollouts_can_be_rescored(logged, tmp_path):
    import gzip

    packed = tmp_path / "seed0-Refit.jsonl.gz"
    packed.write_bytes(gzip.compress(logged.read_bytes()))
    common = [*DATA, "--reward.kind", "rubric", "--model", "tiny-random"]
    main(["--inputs", f"[{packed}]", "--output", str(tmp_path / "gz"), *common])
    main(["--inputs", f"[{logged}]", "--output", str(tmp_path / "plain"), *common])
    a, _ = load_records(tmp_path / "gz" / "seed0-Refit.jsonl")  # written plain, under the name without .gz
    b, _ = load_records(tmp_path / "plain" / "conversations.jsonl")
    assert [r.reward for r in a] == [r.reward for r in b]


def test_records_of_other_question_text_are_refused_by_their_hash(logged, tmp_path, capsys):
    """Same task ids and gold letters, other question text or options: the rewards would be of other questions
    (mean 1.0 vs 0.0 on the same records), so the record's ``meta.question_hash`` is compared with the data's."""
    from clarify_lit.cli import main as clarify

    records, _ = load_records(logged)
    assert all(r.meta.get("question_hash") for r in records)
    rows = [json.loads(line) for line in FIXTURE.read_text().splitlines() if line.strip()]
    target = next(row for row in rows if f"tiny/{row['id']}" == records[0].task_id)
    target["choices"] = [f"{c} (edited)" for c in target["choices"]]  # same id, same gold, other options
    edited = tmp_path / "edited.jsonl"
    edited.write_text("".join(json.dumps(row) + "\n" for row in rows))
    data = [str(edited) if a == str(FIXTURE) else a for a in DATA]
    with pytest.raises(SystemExit) as e:
        clarify(
            [
                "rescore",
                "--inputs",
                f"[{logged}]",
                "--output",
                str(tmp_path / "x"),
                *data,
                "--reward.kind",
                "correct",
                "--model",
                "tiny-random",
            ]
        )
    err = capsys.readouterr().err
    assert e.value.code == 1 and len(err.strip().splitlines()) == 1, err
    assert (
        f"{logged}:line 1 (id={records[0].id!r}): field 'meta.question_hash'" in err
        and f"question {records[0].task_id!r} of --data (local, part train) hashes to" in err
    ), err
    assert not (tmp_path / "x").exists()


def test_records_without_a_question_hash_are_rescored_and_counted(logged, tmp_path, caplog, capsys):
    records, _ = load_records(logged)
    for r in records[:5]:
        del r.meta["question_hash"]  # written before the hash existed
    old = write_records(tmp_path / "old.jsonl", records)
    with caplog.at_level("WARNING", logger="clarify.rescore"):
        main(
            [
                "--inputs",
                f"[{old}]",
                "--output",
                str(tmp_path / "o"),
                *DATA,
                "--reward.kind",
                "correct",
                "--model",
                "tiny-random",
            ]
        )
    assert f"5 of {len(records)} records carry no meta.question_hash" in caplog.text
    assert json.loads((tmp_path / "o" / "rescore.json").read_text())["records_without_question_hash"] == 5
    assert '"records_without_question_hash (not checked)": 5' in capsys.readouterr().out
