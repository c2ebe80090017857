"""Start and stop llama.cpp's OpenAI-compatible server (``python -m llama_cpp.server``) for a GGUF file.

Used by the opt-in server tests (``make test-server``, tests/test_server.py) and the served-rollout benchmark
(benchmarks/served_rollouts.py); a user who serves a ``clarify export --format gguf`` file can use it too::

    with LlamaServer("runs/swift/export_gguf/model.f16.gguf", python=".venv-server/bin/python") as server:
        ...  # --policy_endpoint.base_url {server.url} --policy_endpoint.model {server.alias}

The server listens on 127.0.0.1 only, on a free port, in its own process group; :meth:`LlamaServer.stop` (called on
leaving the ``with`` block, whatever happened inside it) ends that group: SIGTERM, then SIGKILL after ``grace_s``.
Its output goes to ``log_path`` (a temp file by default), whose tail is quoted when it fails to start.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path


class LlamaServerError(RuntimeError):
    """The server did not start (its log's tail is in the message)."""


def free_port() -> int:
    """A TCP port on 127.0.0.1 that is free now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class LlamaServer:
    """``python -m llama_cpp.server --model GGUF --host 127.0.0.1 --port <free> --chat_format chatml`` (module
    docstring). ``python``: the interpreter that has ``llama-cpp-python[server]`` (default: this one);
    ``n_ctx``: context window; ``n_threads``: CPU threads (None: llama.cpp's default); ``extra``: more server
    arguments (e.g. ``["--n_batch", "512"]``)."""

    def __init__(
        self,
        model: str | Path,
        *,
        python: str | None = None,
        alias: str = "policy",
        n_ctx: int = 2048,
        n_threads: int | None = None,
        chat_format: str = "chatml",
        startup_timeout_s: float = 300.0,
        grace_s: float = 10.0,
        log_path: str | Path | None = None,
        extra: list[str] | None = None,
    ):
        self.model = Path(model)
        if not self.model.is_file():
            raise FileNotFoundError(f"GGUF file not found: {self.model}")
        self.python = python or sys.executable
        self.alias = alias
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}/v1"
        self.startup_timeout_s = startup_timeout_s
        self.grace_s = grace_s
        self.log_path = Path(log_path) if log_path else Path(tempfile.mkstemp(prefix="llama-server-", suffix=".log")[1])
        self.args = [
            self.python,
            "-m",
            "llama_cpp.server",
            "--model",
            str(self.model),
            "--host",
            "127.0.0.1",
            "--port",
            str(self.port),
            "--chat_format",
            chat_format,
            "--n_ctx",
            str(n_ctx),
            "--model_alias",
            alias,
            *(["--n_threads", str(n_threads)] if n_threads else []),
            *(extra or []),
        ]
        self.process: subprocess.Popen | None = None
        self.startup_s: float | None = None

    def start(self) -> LlamaServer:
        start = time.perf_counter()
        with open(self.log_path, "wb") as log:
            self.process = subprocess.Popen(
                self.args, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True
            )
        deadline = start + self.startup_timeout_s
        while time.perf_counter() < deadline:
            if self.process.poll() is not None:
                raise LlamaServerError(
                    f"llama_cpp.server exited with code {self.process.returncode} before it answered: {self.log_tail()}"
                )
            try:
                with urllib.request.urlopen(self.url + "/models", timeout=5) as resp:
                    models = json.loads(resp.read().decode("utf-8"))
                if any(m.get("id") == self.alias for m in models.get("data", [])):
                    self.startup_s = time.perf_counter() - start
                    return self
            except (urllib.error.URLError, OSError, ValueError):
                pass
            time.sleep(0.5)
        self.stop()
        raise LlamaServerError(
            f"llama_cpp.server did not answer within {self.startup_timeout_s:.0f}s: {self.log_tail()}"
        )

    def log_tail(self, chars: int = 1500) -> str:
        try:
            text = self.log_path.read_text(encoding="utf-8", errors="replace")
        except OSError:
            return "(no log)"
        return " ".join(text[-chars:].split()) or "(empty log)"

    def stop(self) -> None:
        """End the server's process group (SIGTERM, SIGKILL after ``grace_s``); safe to call twice."""
        proc, self.process = self.process, None
        if proc is None or proc.poll() is not None:
            return
        for sig, wait in ((signal.SIGTERM, self.grace_s), (signal.SIGKILL, 10.0)):
            try:
                os.killpg(proc.pid, sig)  # the group started with start_new_session: the server and its children
            except ProcessLookupError:
                return
            try:
                proc.wait(timeout=wait)
                return
            except subprocess.TimeoutExpired:
                continue

    def __enter__(self) -> LlamaServer:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
