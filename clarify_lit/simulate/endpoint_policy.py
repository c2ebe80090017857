"""The policy served by an OpenAI-compatible endpoint, for rollouts at scale.

``clarify simulate --policy_endpoint.base_url http://127.0.0.1:8000/v1 --policy_endpoint.model NAME`` sends every
assistant turn to a server (e.g. ``vllm serve NAME``) instead of generating locally. The server batches concurrent
requests itself (continuous batching, its own prefix cache), so this engine only fans the turn's conversations out
``concurrency`` at a time; it has the same ``generate`` interface as :class:`~clarify_lit.simulate.engine.
GenerationEngine`, so ``rollout_tasks``, StepDPO branches, teachers and rewards are unchanged.

Differences from the local engine, by necessity: sampling follows the server's RNG (``seed`` is sent per request, so
a server that honours it — vLLM does — repeats itself), and ``n_tokens``/``truncated`` come from the reply's
``usage.completion_tokens`` and ``finish_reason == "length"`` (0 / False when the server omits them).
"""

from __future__ import annotations

import time
from collections.abc import Sequence

from clarify_lit.data.records import Message
from clarify_lit.simulate.engine import Generation, GenerationStats, derive_seed, row_temperatures
from clarify_lit.simulate.teachers import EndpointChatBackend


class EndpointPolicyEngine:
    """``generate(conversations, temperatures, seed=...)`` through an :class:`EndpointChatBackend`."""

    reuse_kv_cache = False  # the server keeps (and prefix-caches) its own KV state

    def __init__(self, backend: EndpointChatBackend, *, max_new_tokens: int = 64):
        if max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
        self.backend = backend
        self.max_new_tokens = max_new_tokens
        self.stats = GenerationStats()

    def generate(
        self,
        conversations: Sequence[Sequence[Message]],
        temperatures: float | Sequence[float],
        *,
        seed: int,
        max_new_tokens: int | None = None,
        assistant_prefixes: Sequence[str] | None = None,
    ) -> list[Generation]:
        """The next assistant turn of every conversation, in input order (one request each, per temperature)."""
        if assistant_prefixes is not None and any(assistant_prefixes):
            raise NotImplementedError(
                "seeded exploration (forced reply starts) needs a local policy: a "
                "chat-completions endpoint cannot continue a forced assistant prefix"
            )
        temperatures = row_temperatures(len(conversations), temperatures)
        max_new = max_new_tokens or self.max_new_tokens
        results: list[Generation | None] = [None] * len(conversations)
        start = time.perf_counter()
        for temp in sorted(set(temperatures)):
            if temp < 0:
                raise ValueError(f"temperature must be >= 0, got {temp}")
            rows = [i for i, t in enumerate(temperatures) if t == temp]
            replies = self.backend.complete(
                [list(conversations[i]) for i in rows],
                temperature=temp,
                max_new_tokens=max_new,
                seed=derive_seed(seed, temp),
            )
            for i, (text, finish, tokens) in zip(rows, replies, strict=True):
                results[i] = Generation(text=text.strip(), n_tokens=tokens or 0, truncated=finish == "length")
            self.stats.calls += 1
        self.stats.record(results, time.perf_counter() - start)  # type: ignore[arg-type]
        return results  # type: ignore[return-value]
