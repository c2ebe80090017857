"""``clarify simulate``: configs, shards, summary, and resume after a SIGKILL (byte-identical output)."""

from __future__ import annotations

import json
import signal
from pathlib import Path

import pytest
from reliability_helpers import interrupt_simulate_after_first_shard

from clarify_lit.data.records import load_records
from clarify_lit.simulate.command import main, parse_config

ROOT = Path(__file__).resolve().parents[1]
FIXTURE = ROOT / "configs" / "simulate" / "tiny-tasks.jsonl"


def args(config: str, out: Path, *extra: str) -> list[str]:
    return [
        "--config",
        str(ROOT / "configs" / "simulate" / config),
        "--data.path",
        str(FIXTURE),
        "--output",
        str(out),
        "--progress",
        "false",
        "--data.limit",
        "4",
        "--chunk_size",
        "1",
        "--rollout.max_new_tokens",
        "5",
        *extra,
    ]


def test_help_and_configs_parse(capsys, clarify_cache):
    with pytest.raises(SystemExit) as e:
        main(["--help"])
    assert e.value.code == 0
    assert "--teacher.endpoint.base_url" in capsys.readouterr().out
    for name in ("tiny-reasoning", "tiny-clarifying", "smollm2-openbookqa-reasoning", "smollm2-sciq-clarifying"):
        cfg = parse_config(["--config", str(ROOT / "configs" / "simulate" / f"{name}.yaml")])
        assert cfg.rollout.n_turns == 3 and cfg.rollout.temperatures == [0.3, 0.7, 1.0]
    cfg = parse_config(
        [
            "--config",
            str(ROOT / "configs/simulate/smollm2-sciq-clarifying.yaml"),
            "--teacher.kind",
            "llm",
            "--teacher.backend",
            "endpoint",
            "--rollout.temperatures",
            "[0.0]",
        ]
    )
    assert cfg.rollout.setting == "clarifying" and cfg.teacher.kind == "llm" and cfg.rollout.temperatures == [0.0]


def test_reasoning_run_writes_shards_records_and_summary(tmp_path, capsys, clarify_cache):
    out = tmp_path / "run"
    main(args("tiny-reasoning.yaml", out))
    records, _ = load_records(out / "conversations.jsonl")
    assert len(records) == 4 * 3
    assert sorted(p.name for p in (out / "shards").iterdir()) == [f"shard-{k:05d}.jsonl" for k in range(4)]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["conversations"] == 12 and summary["tasks"] == 4 and summary["shards"] == 4
    assert summary["parse_failures"] == sum(r.prediction is None for r in records)
    assert summary["timing"]["new_tokens"] > 0 and summary["timing"]["conversations_per_s"] > 0
    assert {r.meta["setting"] for r in records} == {"reasoning"}
    assert "conversations" in capsys.readouterr().out
    # an existing output is never silently overwritten or mixed
    with pytest.raises(FileExistsError, match="--resume"):
        main(args("tiny-reasoning.yaml", out))
    with pytest.raises(ValueError, match="seed"):
        main(args("tiny-reasoning.yaml", out, "--resume", "true", "--rollout.seed", "9"))
    # resuming a finished run changes nothing
    before = (out / "conversations.jsonl").read_bytes()
    main(args("tiny-reasoning.yaml", out, "--resume", "true"))
    assert (out / "conversations.jsonl").read_bytes() == before
    main(args("tiny-reasoning.yaml", out, "--overwrite", "true", "--data.limit", "2"))
    assert len(load_records(out / "conversations.jsonl")[0]) == 6


@pytest.mark.slow
def test_resume_after_sigkill_is_byte_identical(tmp_path, clarify_cache):
    # the uninterrupted reference run, in-process
    full = tmp_path / "full"
    main(args("tiny-clarifying.yaml", full))
    # the same run in a subprocess, killed (SIGKILL: no cleanup at all) right after its first shard
    killed = tmp_path / "killed"
    status = interrupt_simulate_after_first_shard(
        args("tiny-clarifying.yaml", killed), killed, signal.SIGKILL, clarify_cache
    )
    assert status == -signal.SIGKILL
    assert not (killed / "conversations.jsonl").exists()
    assert len(list((killed / "shards").glob("shard-*.jsonl"))) == 1
    main(args("tiny-clarifying.yaml", killed, "--resume", "true"))
    assert (killed / "conversations.jsonl").read_bytes() == (full / "conversations.jsonl").read_bytes()
    summary = json.loads((killed / "summary.json").read_text())
    assert summary["shards_resumed"] == 1 and summary["conversations"] == 12
    assert summary["environment"]["dtype"] == "float32" and summary["environment"]["torch"]  # the stamp
    records, _ = load_records(killed / "conversations.jsonl")
    assert len({r.id for r in records}) == 12
    assert {r.meta["teacher"] for r in records} == {"retrieval:blank"} and {r.meta["reward"] for r in records} == {
        "gold_prob"
    }
