"""The OpenAI-compatible endpoint backend against a local server that serves the tiny model's real generations."""

from __future__ import annotations

import socket
import threading
import time

import pytest
from fake_endpoint import FakeEndpoint, completion

from clarify_lit.data.tasks import QATask
from clarify_lit.simulate.rewards import CorrectReward
from clarify_lit.simulate.rollout import RolloutSpec, rollout_tasks
from clarify_lit.simulate.teachers import EndpointChatBackend, EndpointError, HFChatBackend, LLMTeacher

TASKS = [
    QATask(
        "sciq/1",
        "sciq",
        "What do plants need to make food?",
        ["sunlight", "sand", "salt", "smoke"],
        "A",
        knowledge="Plants make food by photosynthesis.",
    ),
    QATask("obqa/2", "openbookqa", "Which is a source of heat?", ["ice", "fire", "snow", "rain"], "B"),
]


class Server(FakeEndpoint):
    """The fake endpoint; ``behaviour`` decides each reply (``"model"`` = the tiny model answers)."""

    def __init__(self, backend: HFChatBackend | None, behaviour: str = "model", api_key: str | None = None):
        super().__init__()
        self.backend, self.behaviour, self.api_key = backend, behaviour, api_key
        self.generate_lock = threading.Lock()

    def respond(self, handler, body, index):
        if self.api_key and handler.headers.get("Authorization") != f"Bearer {self.api_key}":
            return handler.send(401, {"error": {"message": "bad key"}})
        if handler.path != "/v1/chat/completions":
            return handler.send(404, {"error": {"message": f"no route {handler.path}"}})
        if self.behaviour == "unavailable":
            return handler.send(503, {"error": {"message": "overloaded"}})
        if self.behaviour == "bad_request":
            return handler.send(400, {"error": {"message": "unknown model"}})
        if self.behaviour == "slow":
            time.sleep(0.5)
        with self.generate_lock:  # one generate at a time on the shared model
            text = self.backend.chat(
                [body["messages"]], temperature=body.get("temperature", 0.0), max_new_tokens=body["max_tokens"]
            )[0]
        return handler.send(200, completion(text, body["model"]))


def test_endpoint_serves_the_models_own_generation(tiny):
    model, tok = tiny
    hf = HFChatBackend(model, tok, batch_size=4)
    requests = [
        [{"role": "system", "content": "You are a teacher."}, {"role": "user", "content": f"Explain {w}."}]
        for w in ("energy", "water plants sun", "science")
    ]
    with Server(hf) as server:
        ep = EndpointChatBackend(server.url, "tiny", concurrency=2)
        got = ep.chat(requests, temperature=0.0, max_new_tokens=8)
    assert got == hf.chat(requests, temperature=0.0, max_new_tokens=8)
    assert len(server.requests) == 3 and server.requests[0]["max_tokens"] == 8 and server.requests[0]["model"] == "tiny"


def test_clarifying_rollout_with_endpoint_teacher_equals_local_teacher(tiny):
    model, tok = tiny
    hf = HFChatBackend(model, tok, batch_size=4)
    spec = RolloutSpec(
        setting="clarifying",
        mode="thinking",
        n_turns=3,
        temperatures=[0.0, 1.0],
        max_new_tokens=6,
        batch_size=4,
        seed=3,
    )
    local = rollout_tasks(model, tok, TASKS, spec, teacher=LLMTeacher(hf, max_new_tokens=8), reward=CorrectReward())
    with Server(hf) as server:
        remote = rollout_tasks(
            model,
            tok,
            TASKS,
            spec,
            reward=CorrectReward(),
            teacher=LLMTeacher(EndpointChatBackend(server.url, "tiny"), max_new_tokens=8),
        )
    assert len(server.requests) == len(TASKS) * 2  # one teacher reply per conversation
    assert [r.messages for r in remote] == [r.messages for r in local]
    assert remote[0].meta["teacher"] == "llm:endpoint:tiny"


def test_simulate_with_the_policy_on_an_endpoint_equals_the_local_policy(tiny, tiny_model_dir, tmp_path, clarify_cache):
    """``clarify simulate --policy_endpoint.base_url``: the policy's turns come from the server (here serving the
    tiny model's own greedy generations), and the logged conversations equal a local run's; StepDPO branches too."""
    from pathlib import Path

    from clarify_lit.data.records import load_records
    from clarify_lit.simulate.command import main as simulate_main

    root = Path(__file__).resolve().parents[1]
    common = [
        "--config",
        str(root / "configs/simulate/tiny-reasoning.yaml"),
        "--model",
        str(tiny_model_dir),
        "--data.path",
        str(root / "configs/simulate/tiny-tasks.jsonl"),
        "--data.limit",
        "2",
        "--rollout.temperatures",
        "[0.0]",
        "--rollout.max_new_tokens",
        "5",
        "--progress",
        "false",
        "--step_branches",
        "true",
    ]
    simulate_main([*common, "--output", str(tmp_path / "local")])
    with Server(HFChatBackend(*tiny)) as server:
        simulate_main(
            [
                *common,
                "--output",
                str(tmp_path / "served"),
                "--policy_endpoint.base_url",
                server.url,
                "--policy_endpoint.model",
                "tiny",
            ]
        )
        served_requests = len(server.requests)
    for name in ("conversations.jsonl", "branches.jsonl"):
        local, _ = load_records(tmp_path / "local" / name)
        served, _ = load_records(tmp_path / "served" / name)
        assert [r.messages for r in served] == [r.messages for r in local]
    # one request per assistant turn: 2 questions × 3 turns, plus the branches' turns (3 + 2 + 1 per conversation)
    assert served_requests == 2 * 3 + 2 * (3 + 2 + 1)


def test_api_key_is_sent(tiny, monkeypatch):
    model, tok = tiny
    monkeypatch.setenv("TEST_TEACHER_KEY", "s3cret")
    with Server(HFChatBackend(model, tok), api_key="s3cret") as server:
        out = EndpointChatBackend(server.url, "tiny", api_key_env="TEST_TEACHER_KEY").chat(
            [[{"role": "user", "content": "hi"}]], max_new_tokens=3
        )
    assert isinstance(out[0], str)
    with pytest.raises(EndpointError, match="TEST_MISSING_KEY"):
        EndpointChatBackend(server.url, "tiny", api_key_env="TEST_MISSING_KEY")


def test_unavailable_endpoint_fails_after_bounded_retries():
    with Server(None, behaviour="unavailable") as server:
        ep = EndpointChatBackend(server.url, "tiny", max_retries=2, backoff=0.01)
        t0 = time.perf_counter()
        with pytest.raises(EndpointError, match=r"after 3 attempts.*HTTP 503"):
            ep.chat([[{"role": "user", "content": "hi"}]])
        assert len(server.requests) == 3
        assert time.perf_counter() - t0 >= 0.03  # backoff 0.01 + 0.02 s really waited


def test_client_error_is_not_retried():
    with Server(None, behaviour="bad_request") as server:
        with pytest.raises(EndpointError, match="refused.*HTTP 400.*unknown model"):
            EndpointChatBackend(server.url, "tiny", max_retries=3, backoff=0.01).chat(
                [[{"role": "user", "content": "x"}]]
            )
        assert len(server.requests) == 1


def test_timeout_is_retried_then_reported(tiny):
    model, tok = tiny
    with Server(HFChatBackend(model, tok), behaviour="slow") as server:
        ep = EndpointChatBackend(server.url, "tiny", timeout=0.1, max_retries=1, backoff=0.01)
        with pytest.raises(EndpointError, match="after 2 attempts"):
            ep.chat([[{"role": "user", "content": "x"}]], max_new_tokens=2)


def test_unreachable_endpoint_is_a_clear_error():
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ep = EndpointChatBackend(f"http://127.0.0.1:{port}/v1", "tiny", max_retries=1, backoff=0.01, timeout=1)
    with pytest.raises(EndpointError, match=rf"127.0.0.1:{port}.*Is the server running"):
        ep.chat([[{"role": "user", "content": "x"}]])
    with pytest.raises(ValueError, match="http"):
        EndpointChatBackend("localhost:8000", "tiny")
