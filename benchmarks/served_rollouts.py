"""Rollouts served by llama.cpp vs the built-in engine, on the same conversations (issue 30).

The same 32 SciQ questions, reasoning setting (scripted teacher, so the policy is the only model), 3 turns, greedy,
``--max-new-tokens`` per turn, ``correct`` reward:

* ``engine``: the built-in batched engine (``GenerationEngine``: batch ``--batch-size``, KV cache across turns)
  on the embedded SmolLM2-135M-Instruct (the dequantized Q4_1 weights) in ``--dtype``, ``--threads`` torch threads;
* ``served-cK``: the policy's turns sent to ``python -m llama_cpp.server`` serving the embedded Q4_1 GGUF itself
  (the same weights, quantized arithmetic) through ``--policy_endpoint``'s engine with K concurrent requests
  (``--concurrency 1 4``), ``--threads`` llama.cpp threads.

Each variant is timed over one whole ``rollout_tasks`` call after a one-question warm-up; tokens are the generated
ones (the engine's count; the server's ``usage.completion_tokens``). The load average is read before and after each
variant. Writes ``benchmarks/results/served_rollouts.json`` (one entry per ``--key``) with the machine stamp.

    python benchmarks/served_rollouts.py --server-python .venv-server/bin/python
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from clarify_lit.data.tasks import load_tasks  # noqa: E402
from clarify_lit.environment import environment_stamp  # noqa: E402
from clarify_lit.models import EMBEDDED_SMOLLM2, embedded_gguf, load_causal_lm, load_tokenizer  # noqa: E402
from clarify_lit.simulate.endpoint_policy import EndpointPolicyEngine  # noqa: E402
from clarify_lit.simulate.engine import GenerationEngine  # noqa: E402
from clarify_lit.simulate.llama_server import LlamaServer  # noqa: E402
from clarify_lit.simulate.rollout import RolloutSpec, rollout_tasks  # noqa: E402
from clarify_lit.simulate.teachers import EndpointChatBackend  # noqa: E402

OUT = ROOT / "benchmarks" / "results" / "served_rollouts.json"


def loadavg() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


def timed(name: str, tasks, spec: RolloutSpec, engine, model=None, tok=None) -> dict:
    rollout_tasks(model, tok, tasks[:1], spec, engine=engine, model_name=name)  # warm-up (excluded)
    engine.stats.new_tokens = 0
    before = loadavg()
    start = time.perf_counter()
    records = rollout_tasks(model, tok, tasks, spec, engine=engine, model_name=name)
    seconds = time.perf_counter() - start
    tokens = engine.stats.new_tokens
    row = {
        "variant": name,
        "conversations": len(records),
        "seconds": round(seconds, 2),
        "conversations_per_s": round(len(records) / seconds, 4),
        "new_tokens": tokens,
        "tokens_per_s": round(tokens / seconds, 2),
        "accuracy": sum(r.prediction == r.gold for r in records) / len(records),
        "loadavg_before": before,
        "loadavg_after": loadavg(),
        "final_turns": [r.messages[-1]["content"][:80] for r in records[:3]],
    }
    print(json.dumps({k: v for k, v in row.items() if k != "final_turns"}), flush=True)
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument(
        "--server-python",
        default=str(ROOT / ".venv-server/bin/python"),
        help="the interpreter with llama-cpp-python[server]",
    )
    ap.add_argument("--n-tasks", type=int, default=32)
    ap.add_argument("--max-new-tokens", type=int, default=32)
    ap.add_argument("--batch-size", type=int, default=32, help="built-in engine: conversations per generate call")
    ap.add_argument("--concurrency", type=int, nargs="+", default=[1, 4], help="served: concurrent requests")
    ap.add_argument("--threads", type=int, default=2, help="torch threads / llama.cpp threads")
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--skip-engine", action="store_true")
    ap.add_argument("--key", default=None, help="entry name in the JSON (default: from the options)")
    args = ap.parse_args()

    torch.set_num_threads(args.threads)
    tasks = load_tasks("sciq", part="test", n_test=args.n_tasks)[: args.n_tasks]
    spec = RolloutSpec(
        setting="reasoning",
        mode="thinking",
        n_turns=3,
        temperatures=[0.0],
        max_new_tokens=args.max_new_tokens,
        batch_size=args.batch_size,
        seed=0,
    )
    rows = []
    if not args.skip_engine:
        model, tok = load_causal_lm(EMBEDDED_SMOLLM2, args.dtype), load_tokenizer(EMBEDDED_SMOLLM2)
        engine = GenerationEngine(model, tok, batch_size=args.batch_size, max_new_tokens=args.max_new_tokens)
        rows.append(timed(f"engine {args.dtype} batch={args.batch_size}", tasks, spec, engine, model, tok))
        del model, engine
    gguf = embedded_gguf()
    with LlamaServer(gguf, python=args.server_python, alias="smollm2", n_ctx=8192, n_threads=args.threads) as server:
        startup = round(server.startup_s or 0.0, 2)
        for k in args.concurrency:
            backend = EndpointChatBackend(server.url, "smollm2", timeout=600, concurrency=k)
            engine = EndpointPolicyEngine(backend, max_new_tokens=args.max_new_tokens)
            rows.append({**timed(f"served Q4_1 concurrency={k}", tasks, spec, engine), "server_startup_s": startup})
    key = args.key or (
        f"served vs engine smollm2 {args.n_tasks} greedy reasoning 3 turns max_new_tokens="
        f"{args.max_new_tokens} threads={args.threads}"
    )
    results = json.loads(OUT.read_text()) if OUT.exists() else {}
    results[key] = {
        "rows": rows,
        "args": vars(args),
        "environment": environment_stamp("cpu", args.dtype),
        "gguf": gguf.name,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
    }
    OUT.write_text(json.dumps(results, indent=1) + "\n")
    print(f"wrote {OUT} [{key}]")


if __name__ == "__main__":
    main()
