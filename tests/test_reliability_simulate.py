"""Reliability, interrupted simulation (docs/reliability.md): ``clarify simulate`` stopped by SIGTERM (a scheduler's
or ``kill``'s default signal) after its first shard; ``--resume`` completes it with no duplicated and no missing
conversation, byte-identical to an uninterrupted run. (SIGKILL: tests/test_simulate_command.py.)"""

from __future__ import annotations

import json
import signal
from pathlib import Path

import pytest
from reliability_helpers import interrupt_simulate_after_first_shard

from clarify_lit.data.records import load_records
from clarify_lit.simulate.command import main

ROOT = Path(__file__).resolve().parents[1]


def args(out: Path, *extra: str) -> list[str]:
    return [
        "--config",
        str(ROOT / "configs/simulate/tiny-reasoning.yaml"),
        "--data.path",
        str(ROOT / "configs/simulate/tiny-tasks.jsonl"),
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


@pytest.mark.slow
def test_resume_after_sigterm_is_byte_identical(tmp_path, clarify_cache):
    full = tmp_path / "full"
    main(args(full))
    killed = tmp_path / "killed"
    status = interrupt_simulate_after_first_shard(args(killed), killed, signal.SIGTERM, clarify_cache)
    assert status == -signal.SIGTERM  # ended by the signal, not a clean exit that looks finished
    assert not (killed / "conversations.jsonl").exists() and not (killed / "summary.json").exists()
    assert [p.name for p in (killed / "shards").iterdir()] == ["shard-00000.jsonl"]  # no half-written shard
    main(args(killed, "--resume", "true"))
    assert (killed / "conversations.jsonl").read_bytes() == (full / "conversations.jsonl").read_bytes()
    records, _ = load_records(killed / "conversations.jsonl")  # validates; ids unique (no duplicate)
    assert len(records) == 4 * 3 and len({r.id for r in records}) == 12
    assert json.loads((killed / "summary.json").read_text())["shards_resumed"] == 1
