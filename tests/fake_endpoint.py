"""A fake OpenAI-compatible chat-completions endpoint for the tests (one server for every test that needs one)."""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any


def completion(text: str, model: str = "m") -> dict[str, Any]:
    """A chat-completions reply whose one choice says ``text``."""
    return {
        "id": "x",
        "object": "chat.completion",
        "model": model,
        "choices": [{"index": 0, "finish_reason": "stop", "message": {"role": "assistant", "content": text}}],
    }


class FakeEndpoint:
    """A 127.0.0.1 server in a thread (``with FakeEndpoint() as server: … server.url``). A subclass answers each POST
    in :meth:`respond`; ``requests`` keeps every request's JSON body, in arrival order."""

    def __init__(self):
        self.requests: list[dict[str, Any]] = []
        self.lock = threading.Lock()
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):  # keep pytest output clean
                pass

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                with outer.lock:
                    index = len(outer.requests)
                    outer.requests.append(body)
                outer.respond(self, body, index)

            def send(self, code: int, payload: dict[str, Any] | bytes) -> None:
                """Reply ``payload`` (a dict as JSON, bytes as they are) with status ``code``."""
                data = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def respond(self, handler: BaseHTTPRequestHandler, body: dict[str, Any], index: int) -> None:
        """Answer request number ``index`` (``handler.send(code, payload)``, or nothing to drop the connection)."""
        raise NotImplementedError

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.httpd.shutdown()
        self.httpd.server_close()
