"""How many requests each endpoint of a run answered and how many it needed retried (simulate's summary:
``endpoint_calls``), so a run against a real server shows that every request was answered and what it cost."""

from __future__ import annotations

from typing import Any

from clarify_lit.simulate.missing_rewards import judges_of
from clarify_lit.simulate.teachers import EndpointChatBackend


def endpoint_calls(teacher: Any, reward: Any, engine: Any) -> dict[str, dict[str, int]]:
    """``{role: {answered, attempts, retries}}`` for the teacher, judge and policy that talk to an endpoint."""
    backends = {"teacher": getattr(teacher, "backend", None), "policy": getattr(engine, "backend", None)}
    for i, judge in enumerate(judges_of(reward)):
        backends["judge" if i == 0 else f"judge{i}"] = judge.backend
    return {role: b.calls() for role, b in backends.items() if isinstance(b, EndpointChatBackend)}
