"""``clarify evaluate --policy_endpoint``: the policy's turns come from a server (evaluate/served.py); nothing of the
policy is loaded. Against the fake endpoint here; against llama.cpp serving a GGUF export in tests/test_server.py."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from fake_endpoint import FakeEndpoint, completion

from clarify_lit.cli import main

REPO = Path(__file__).resolve().parents[1]


class AlwaysA(FakeEndpoint):
    def respond(self, handler, body, index):
        reply = completion("The answer is A.", body["model"])
        reply["usage"] = {"completion_tokens": 5}
        handler.send(200, reply)


def evaluate_args(out: Path, *extra: str) -> list[str]:
    return [
        "evaluate",
        "--data.dataset",
        "local",
        "--data.path",
        str(REPO / "configs/simulate/tiny-tasks.jsonl"),
        "--data.columns",
        "{question: question, choices: choices, answer: answer, id: id, knowledge: knowledge}",
        "--data.n_train",
        "4",
        "--data.n_test",
        "4",
        "--rollout.n_turns",
        "1",
        "--rollout.max_new_tokens",
        "8",
        "--progress",
        "false",
        "--out_dir",
        str(out),
        *extra,
    ]


def test_evaluate_a_served_policy(clarify_cache, tmp_path, capsys):
    with AlwaysA() as server:
        main(
            evaluate_args(
                tmp_path / "eval",
                "--policy_endpoint.base_url",
                server.url,
                "--policy_endpoint.model",
                "policy",
                "--policy_endpoint.concurrency",
                "1",
            )
        )
    assert len(server.requests) == 4 and {r["model"] for r in server.requests} == {"policy"}
    result = json.loads((tmp_path / "eval/metrics.json").read_text())
    meta, metrics = result["meta"], result["metrics"]
    assert meta["source"] == "endpoint" and meta["model"] == "endpoint:policy" and meta["method"] == "Served"
    assert meta["endpoint"] == {"base_url": server.url, "model": "policy"}
    rollouts = [json.loads(line) for line in (tmp_path / "eval/rollouts.jsonl").read_text().splitlines()]
    assert metrics["n"] == 4 and metrics["format_rate"] == 1.0
    assert metrics["accuracy"] == sum(r["gold"] == "A" for r in rollouts) / 4
    assert all(r["messages"][-1]["content"] == "The answer is A." for r in rollouts)


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (
            ["--export_dir", "runs/x/export", "--policy_endpoint.model", "p"],
            "--ckpt_path/--export_dir would load another",
        ),
        ([], "needs --policy_endpoint.model"),
    ],
)
def test_a_served_policy_is_one_source(clarify_cache, tmp_path, capsys, extra, message):
    with pytest.raises(SystemExit):
        main(evaluate_args(tmp_path / "e", "--policy_endpoint.base_url", "http://127.0.0.1:9/v1", *extra))
    assert message in capsys.readouterr().err
