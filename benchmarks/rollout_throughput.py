"""Rollout throughput: the batched engine vs one conversation at a time, and length-sorted vs unsorted batches.

Same model, same tasks, same settings for every variant (reasoning setting, scripted teacher, ``correct`` reward);
each variant is warmed up once, then timed over full ``rollout_tasks`` calls. Writes
``benchmarks/results/rollout_throughput.json`` and prints the speed-up ratios.

    python benchmarks/rollout_throughput.py                                   # tiny random model
    python benchmarks/rollout_throughput.py --model embedded:smollm2-135m-instruct --dtype bfloat16 --n-tasks 16 \
        --temperatures 0.7 --batch-size 16 --threads 2          # the README's batch-16 numbers

Notes: with sampling the variants generate different text (a batch's random draws depend on its composition), so
tokens/s is reported next to conversations/s; greedy batched == one-by-one text is a test
(tests/test_simulate_engine.py). The task prompts get extra context of varying length so sorting has work to do.
``batched_sorted`` is the full engine (mixed temperatures, length-sorted, KV cache carried across turns); the
other variants switch one thing off. ``naive_one_at_a_time`` is the loop a user would write (one conversation per
``generate``, the whole conversation re-encoded every turn); ``one_at_a_time_kv_reuse`` isolates the batching gain.
``batched_per_temperature`` is the engine with ``mix_temperatures=False`` (one temperature per generate batch, the
behaviour before runs of different temperatures could share a batch). The warm-up is excluded from
``new_tokens`` and ``generate_calls``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from clarify_lit.data.tasks import QATask  # noqa: E402
from clarify_lit.models import load_causal_lm, load_tokenizer  # noqa: E402
from clarify_lit.simulate.engine import GenerationEngine  # noqa: E402
from clarify_lit.simulate.rollout import RolloutSpec, rollout_tasks  # noqa: E402

BASE = [
    ("What do plants need to make their own food?", ["sunlight", "sand", "salt", "smoke"], "A"),
    ("Which of these is a source of heat?", ["ice", "fire", "snow", "rain"], "B"),
    ("What is the boiling point of water at sea level in degrees Celsius?", ["0", "50", "100", "212"], "C"),
    ("Which planet is closest to the sun?", ["Venus", "Earth", "Mars", "Mercury"], "D"),
    ("What gas do animals breathe out?", ["oxygen", "carbon dioxide", "nitrogen", "helium"], "B"),
    ("Which tool is used to measure temperature?", ["thermometer", "ruler", "scale", "clock"], "A"),
    ("What state of matter has a fixed shape?", ["gas", "liquid", "solid", "plasma"], "C"),
    ("What causes day and night on Earth?", ["the Moon's orbit", "Earth's orbit", "clouds", "Earth's rotation"], "D"),
]
CONTEXT = "A student is studying for a science exam and reads about energy, matter and living things. "


def make_tasks(n: int) -> list[QATask]:
    """``n`` tasks whose prompts range from short to long (0–7 context sentences)."""
    tasks = []
    for i in range(n):
        q, choices, gold = BASE[i % len(BASE)]
        tasks.append(QATask(f"bench/{i}", "arc_easy", CONTEXT * ((i * 3) % 8) + q, list(choices), gold))
    return tasks


def time_variant(model, tok, tasks, *, batch_size: int, sort: bool, args, mix: bool = True,
                 reuse: bool = True) -> dict:
    engine = GenerationEngine(model, tok, batch_size=batch_size, max_new_tokens=args.max_new_tokens,
                              sort_by_length=sort, mix_temperatures=mix, reuse_kv_cache=reuse)
    spec = RolloutSpec(setting="reasoning", mode="thinking", n_turns=args.n_turns, temperatures=args.temperatures,
                       max_new_tokens=args.max_new_tokens, batch_size=batch_size)
    rollout_tasks(model, tok, tasks[:1], replace(spec, seed=999), engine=engine)  # warm-up: one-time set-up
    engine.stats = type(engine.stats)()
    t0 = time.perf_counter()
    records = rollout_tasks(model, tok, tasks, replace(spec, seed=args.seed), engine=engine)
    seconds = time.perf_counter() - t0
    return {"batch_size": batch_size, "sort_by_length": sort, "mix_temperatures": mix, "reuse_kv_cache": reuse,
            "generate_calls": engine.stats.calls, "prompt_tokens": engine.stats.prompt_tokens,
            "reused_prompt_tokens": engine.stats.reused_tokens, "reuse_misses": engine.stats.reuse_misses,
            "conversations": len(records),
            "seconds": round(seconds, 3), "conversations_per_s": round(len(records) / seconds, 4),
            "new_tokens": engine.stats.new_tokens, "tokens_per_s": round(engine.stats.new_tokens / seconds, 2)}


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="tiny-random")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--n-tasks", type=int, default=16)
    p.add_argument("--n-turns", type=int, default=3)
    p.add_argument("--temperatures", type=float, nargs="+", default=[0.3, 0.7, 1.0])
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--skip-naive", action="store_true", help="skip the slow one-at-a-time loop")
    p.add_argument("--key", default=None, help="entry name in the JSON (default: '<model> threads=<n>')")
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "rollout_throughput.json"))
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    model, tok = load_causal_lm(args.model, dtype=args.dtype), load_tokenizer(args.model)
    tasks = make_tasks(args.n_tasks)

    results = {}
    results["batched_sorted"] = time_variant(model, tok, tasks, batch_size=args.batch_size, sort=True, args=args)
    print("batched, sorted  ", results["batched_sorted"], flush=True)
    results["batched_unsorted"] = time_variant(model, tok, tasks, batch_size=args.batch_size, sort=False, args=args)
    print("batched, unsorted", results["batched_unsorted"], flush=True)
    if len(set(args.temperatures)) > 1:
        results["batched_per_temperature"] = time_variant(model, tok, tasks, batch_size=args.batch_size, sort=True,
                                                          args=args, mix=False)
        print("batched, one temperature per batch", results["batched_per_temperature"], flush=True)
    results["batched_no_kv_reuse"] = time_variant(model, tok, tasks, batch_size=args.batch_size, sort=True,
                                                  args=args, reuse=False)
    print("batched, every turn re-encoded", results["batched_no_kv_reuse"], flush=True)
    if not args.skip_naive:
        # the loop a user would write: one conversation per generate call, the whole conversation encoded each turn
        results["naive_one_at_a_time"] = time_variant(model, tok, tasks, batch_size=1, sort=False, args=args,
                                                      reuse=False)
        print("one at a time    ", results["naive_one_at_a_time"], flush=True)
        results["one_at_a_time_kv_reuse"] = time_variant(model, tok, tasks, batch_size=1, sort=False, args=args)
        print("one at a time, KV reuse", results["one_at_a_time_kv_reuse"], flush=True)

    cps = {k: v["conversations_per_s"] for k, v in results.items()}
    ratios = {"sorted_vs_unsorted": round(cps["batched_sorted"] / cps["batched_unsorted"], 3)}
    if "batched_per_temperature" in cps:
        ratios["mixed_vs_per_temperature"] = round(cps["batched_sorted"] / cps["batched_per_temperature"], 3)
    ratios["kv_reuse"] = round(cps["batched_sorted"] / cps["batched_no_kv_reuse"], 3)
    if "naive_one_at_a_time" in cps:
        ratios["batched_vs_naive"] = round(cps["batched_sorted"] / cps["naive_one_at_a_time"], 3)
        ratios["batching_alone"] = round(cps["batched_sorted"] / cps["one_at_a_time_kv_reuse"], 3)
    report = {
        "model": args.model, "dtype": args.dtype, "n_tasks": args.n_tasks, "n_turns": args.n_turns,
        "temperatures": args.temperatures, "max_new_tokens": args.max_new_tokens, "batch_size": args.batch_size,
        "torch_threads": torch.get_num_threads(), "cpu_count": os.cpu_count(),
        "load_average_1m": round(os.getloadavg()[0], 2), "torch": torch.__version__, "machine": platform.machine(),
        "results": results, "ratios": ratios,
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    # one entry per (model, threads), so the tiny and the SmolLM2 numbers live side by side
    existing = json.loads(out.read_text()) if out.exists() else {}
    if not isinstance(existing, dict) or "results" in existing:
        existing = {}
    existing[args.key or f"{args.model} threads={torch.get_num_threads()}"] = report
    out.write_text(json.dumps(existing, indent=1) + "\n")
    print(json.dumps(ratios), f"-> {out}")
    return report


if __name__ == "__main__":
    main()
