"""Reliability, failing teacher and judge endpoints (docs/reliability.md): a local OpenAI-compatible server that
times out, answers 500, sends malformed JSON or no ``choices``, drops or truncates the connection. The LLM teacher and
the LLM judge retry a bounded number of times with backoff, then raise a clear error naming the endpoint — never a
hang, never a reward of 0 passed off as real. An unparseable judge verdict is recorded as a missing reward. A
``clarify simulate`` whose judge fails mid-run keeps its finished shards and ``--resume`` completes it exactly."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
from fake_endpoint import FakeEndpoint

from clarify_lit.cli import main
from clarify_lit.data.records import load_records
from clarify_lit.data.tasks import QATask
from clarify_lit.simulate.rewards import LLMJudgeReward
from clarify_lit.simulate.teachers import EndpointChatBackend, EndpointError, LLMTeacher

REPO = Path(__file__).resolve().parents[1]
TASK = QATask(
    "sciq/1",
    "sciq",
    "What do plants need to make food?",
    ["sunlight", "sand", "salt", "smoke"],
    "A",
    knowledge="Plants make food by photosynthesis.",
)
CONVERSATION = [
    {"role": "system", "content": "You are an expert."},
    {"role": "user", "content": "Question?"},
    {"role": "assistant", "content": "Is it about light? The answer is A."},
]
VERDICT = json.dumps(
    {
        "accuracy": 9,
        "reasoning": 8,
        "comprehensiveness": 7,
        "pedagogical_value": 6,
        "confidence_calibration": 5,
        "overall": 7,
    }
)
HANG_S = 1.5  # longer than the clients' timeout below


class FaultServer(FakeEndpoint):
    """The fake endpoint; ``script`` gives the behaviour of each request in turn (the last one repeats): ``ok``,
    ``500``, ``hang``, ``garbage`` (200, not JSON), ``no_choices`` (200, JSON without choices), ``drop`` (connection
    closed, no reply), ``truncated`` (Content-Length promised, half the body sent), ``unparseable`` (a valid reply
    whose text is no verdict). ``ok`` answers ``VERDICT``."""

    def __init__(self, script: list[str]):
        super().__init__()
        self.script = list(script)

    def respond(self, handler, body, index):
        what = self.script[min(index, len(self.script) - 1)]
        if what == "drop":
            handler.close_connection = True
            return
        if what == "hang":
            time.sleep(HANG_S)
            return handler.send(200, b"{}")
        if what == "500":
            return handler.send(500, b'{"error": {"message": "internal error"}}')
        if what == "garbage":
            return handler.send(200, b"<html>502 Bad Gateway</html")
        if what == "no_choices":
            return handler.send(200, b'{"object": "error", "message": "model overloaded"}')
        text = "I cannot grade this." if what == "unparseable" else VERDICT
        data = json.dumps({"choices": [{"index": 0, "message": {"role": "assistant", "content": text}}]}).encode()
        if what == "truncated":
            handler.send_response(200)
            handler.send_header("Content-Length", str(len(data)))
            handler.end_headers()
            handler.wfile.write(data[: len(data) // 2])
            handler.close_connection = True
            return
        return handler.send(200, data)


def backend(server: FaultServer, retries: int = 2) -> EndpointChatBackend:
    return EndpointChatBackend(server.url, "m", timeout=0.3, max_retries=retries, backoff=0.01, concurrency=1)


def ask(role: str, server: FaultServer):
    if role == "teacher":
        return LLMTeacher(backend(server)).reply([TASK], [CONVERSATION])
    return LLMJudgeReward(backend(server), max_attempts=2).score([TASK], [CONVERSATION])


FAULTS = {
    "500": ("HTTP 500",),
    "hang": ("timed out",),
    "garbage": ("not JSON",),
    "no_choices": ("lacks choices",),
    "drop": ("RemoteDisconnected", "ConnectionResetError"),
    "truncated": ("IncompleteRead",),
}


@pytest.mark.parametrize("role", ["teacher", "judge"])
@pytest.mark.parametrize("fault", list(FAULTS))
def test_persistent_fault_is_a_clear_error_after_bounded_retries(fault, role):
    with FaultServer([fault]) as server:
        t0 = time.perf_counter()
        with pytest.raises(EndpointError) as e:
            ask(role, server)
        elapsed = time.perf_counter() - t0
    msg = str(e.value)
    assert server.url in msg and "after 3 attempts" in msg and any(f in msg for f in FAULTS[fault]), msg
    assert len(server.requests) == 3  # 1 try + max_retries=2, then it stops: no endless retrying
    assert elapsed < 3 * 0.3 + 2.0  # three timeouts at most, plus the backoff: never a hang


@pytest.mark.parametrize("role", ["teacher", "judge"])
def test_transient_faults_are_retried_to_the_real_answer(role):
    with FaultServer(["500", "drop", "truncated", "ok"]) as server:
        be = EndpointChatBackend(server.url, "m", timeout=0.3, max_retries=3, backoff=0.01, concurrency=1)
        if role == "teacher":
            assert LLMTeacher(be).reply([TASK], [CONVERSATION]) == [VERDICT]
        else:
            (res,) = LLMJudgeReward(be).score([TASK], [CONVERSATION])
            assert res.value == 0.7 and res.components["overall"] == 7.0
    assert len(server.requests) == 4


def test_unparseable_verdict_is_a_missing_reward_not_a_zero():
    with FaultServer(["unparseable"]) as server:
        judge = LLMJudgeReward(backend(server), max_attempts=3)
        (res,) = judge.score([TASK], [CONVERSATION])
    assert res.value is None and res.missing and judge.missing == 1
    assert res.components["llm_judge"] is None and res.components["overall"] is None
    assert len(server.requests) == 3  # max_attempts, each a well-formed HTTP exchange


def simulate_args(out: Path, url: str, *extra: str) -> list[str]:
    return [
        "simulate",
        "--config",
        str(REPO / "configs/simulate/tiny-reasoning.yaml"),
        "--data.path",
        str(REPO / "configs/simulate/tiny-tasks.jsonl"),
        "--data.limit",
        "4",
        "--rollout.temperatures",
        "[0.0, 1.0]",
        "--chunk_size",
        "2",
        "--rollout.max_new_tokens",
        "4",
        "--progress",
        "false",
        "--output",
        str(out),
        "--reward.kind",
        "llm_judge",
        "--reward.backend",
        "endpoint",
        "--reward.endpoint.base_url",
        url,
        "--reward.endpoint.model",
        "judge",
        "--reward.endpoint.max_retries",
        "1",
        "--reward.endpoint.backoff",
        "0.01",
        "--reward.endpoint.timeout",
        "2",
        "--reward.endpoint.concurrency",
        "1",
        *extra,
    ]


@pytest.mark.slow
def test_simulate_with_a_judge_that_dies_keeps_its_shards_and_resumes_exactly(clarify_cache, tmp_path, capsys):
    with FaultServer(["ok"]) as healthy:
        main(simulate_args(tmp_path / "full", healthy.url))
    # the first chunk (2 tasks × 2 runs = 4 verdicts) is judged, then the judge answers 500 for good
    with FaultServer(["ok"] * 4 + ["500"]) as flaky:
        out = tmp_path / "interrupted"
        with pytest.raises(SystemExit) as e:
            main(simulate_args(out, flaky.url))
        assert e.value.code == 1
        (line,) = [x for x in capsys.readouterr().err.splitlines() if x.startswith("clarify simulate")]
        assert (
            line.startswith(
                f"clarify simulate: error: endpoint {flaky.url}/chat/completions gave no usable answer after 2 attempts"
            )
            and "HTTP 500" in line
        )
        assert sorted(p.name for p in (out / "shards").iterdir()) == ["shard-00000.jsonl"]
        assert not (out / "conversations.jsonl").exists()
        # the judge comes back (same URL: the run's configuration must match to resume)
        flaky.script = ["ok"]
        main(simulate_args(out, flaky.url, "--resume", "true"))
    assert (out / "conversations.jsonl").read_bytes() == (tmp_path / "full" / "conversations.jsonl").read_bytes()
    records, _ = load_records(out / "conversations.jsonl")
    assert len(records) == 8 and all(r.reward == 0.7 and not r.meta["reward_missing"] for r in records)
