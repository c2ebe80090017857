"""Rollout throughput: the batched engine vs one conversation at a time, and length-sorted vs unsorted batches.

Same model, same tasks, same settings for every variant (reasoning setting, scripted teacher, ``correct`` reward);
each variant is warmed up once, then timed over full ``rollout_tasks`` calls. Writes
``benchmarks/results/rollout_throughput.json`` and prints the speed-up ratios.

    python benchmarks/rollout_throughput.py                                   # tiny random model
    python benchmarks/rollout_throughput.py --model embedded:smollm2-135m-instruct --dtype bfloat16 --n-tasks 16 \
        --temperatures 0.7 --batch-size 16 --threads 2          # the README's batch-16 numbers
    python benchmarks/rollout_throughput.py --decode-step --model embedded:smollm2-135m-instruct --threads 1 \
        --decode-batches 16 --decode-contexts 30 300            # one decode step vs the weight-bytes / FLOP bounds
    python benchmarks/rollout_throughput.py --paths plain fast --model embedded:smollm2-135m-instruct \
        --dtype bfloat16 --threads 1 --n-tasks 8 --temperatures 0 --batch-size 8 --max-new-tokens 24 --rounds 1
                                                                # the engine's decode paths: speed and same text

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
sys.path.insert(0, str(ROOT / "benchmarks"))

from stamp import loadavg, machine_stamp  # noqa: E402

from clarify_lit.data.tasks import QATask  # noqa: E402
from clarify_lit.models import load_causal_lm, load_tokenizer  # noqa: E402
from clarify_lit.simulate.decode import decode_step_for, own_decode_step  # noqa: E402
from clarify_lit.simulate.engine import GenerationEngine, attention_implementation, new_cache  # noqa: E402
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


def time_variant(model, tok, tasks, *, batch_size: int, sort: bool, args, mix: bool = True, reuse: bool = True) -> dict:
    engine = GenerationEngine(
        model,
        tok,
        batch_size=batch_size,
        max_new_tokens=args.max_new_tokens,
        sort_by_length=sort,
        mix_temperatures=mix,
        reuse_kv_cache=reuse,
    )
    spec = RolloutSpec(
        setting="reasoning",
        mode="thinking",
        n_turns=args.n_turns,
        temperatures=args.temperatures,
        max_new_tokens=args.max_new_tokens,
        batch_size=batch_size,
    )
    rollout_tasks(model, tok, tasks[:1], replace(spec, seed=999), engine=engine)  # warm-up: one-time set-up
    engine.stats = type(engine.stats)()
    t0 = time.perf_counter()
    records = rollout_tasks(model, tok, tasks, replace(spec, seed=args.seed), engine=engine)
    seconds = time.perf_counter() - t0
    return {
        "batch_size": batch_size,
        "sort_by_length": sort,
        "mix_temperatures": mix,
        "reuse_kv_cache": reuse,
        "generate_calls": engine.stats.calls,
        "prompt_tokens": engine.stats.prompt_tokens,
        "reused_prompt_tokens": engine.stats.reused_tokens,
        "reuse_misses": engine.stats.reuse_misses,
        "conversations": len(records),
        "seconds": round(seconds, 3),
        "conversations_per_s": round(len(records) / seconds, 4),
        "new_tokens": engine.stats.new_tokens,
        "tokens_per_s": round(engine.stats.new_tokens / seconds, 2),
    }


# -- the engine's decode paths, old vs new (--paths) ------------------------------------------------------------------

#: Engine options of each compared path: ``plain`` is the engine before issue 16 (transformers' concatenating
#: cache); ``fast`` the defaults (preallocated cache: same values, same text); ``share_prefix`` and ``eager`` add
#: one opt-in option each (their numerics differ, so greedy text may too), ``share_prefix_eager`` both; ``step`` and
#: ``compiled`` run generate's one-token steps through the decode step of our own (issue 28,
#: ``clarify_lit.simulate.decode``), as plain ops or ``torch.compile``d.
PATHS = {
    "plain": dict(preallocate_kv=False),
    "fast": {},
    "share_prefix": dict(share_prefix=True),
    "eager": dict(attention="eager"),
    "gqa": dict(attention="gqa"),
    "step": dict(decode_step="eager"),
    "matmul": dict(decode_step="matmul"),
    "compiled": dict(decode_step="compiled"),
    "share_prefix_eager": dict(share_prefix=True, attention="eager"),
    "share_prefix_gqa": dict(share_prefix=True, attention="gqa"),
}


def paths_report(model, tok, tasks, args) -> dict:
    """Whole rollouts through each path, interleaved round by round (plain, fast, fast_eager, plain, ...) so a load
    change on a shared machine hits every path alike; median seconds per path, the speed ratio to ``plain``, and
    how many conversations have exactly ``plain``'s text (with greedy temperatures they all should)."""
    spec = RolloutSpec(
        setting="reasoning",
        mode="thinking",
        n_turns=args.n_turns,
        temperatures=args.temperatures,
        max_new_tokens=args.max_new_tokens,
        batch_size=args.batch_size,
    )
    names = [n for n in PATHS if n in args.paths]
    engines = {
        n: GenerationEngine(model, tok, batch_size=args.batch_size, max_new_tokens=args.max_new_tokens, **PATHS[n])
        for n in names
    }
    warmup = {}
    for n, engine in engines.items():  # warm-up: one-time set-up (a few tokens are enough; compiles `compiled`)
        t0, c0 = time.perf_counter(), time.process_time()
        rollout_tasks(model, tok, tasks[:1], replace(spec, seed=999, max_new_tokens=2), engine=engine)
        warmup[n] = {"seconds": round(time.perf_counter() - t0, 2), "cpu_seconds": round(time.process_time() - c0, 2)}
        print(n, "warm-up", warmup[n], flush=True)
    seconds: dict[str, list[float]] = {n: [] for n in names}
    cpu: dict[str, list[float]] = {n: [] for n in names}  # this process's CPU time: what load does not inflate
    texts: dict[str, list[list[str]]] = {}
    stats = {}
    for _ in range(args.rounds):
        for n in names:
            engines[n].stats = type(engines[n].stats)()
            t0, c0 = time.perf_counter(), time.process_time()
            records = rollout_tasks(model, tok, tasks, replace(spec, seed=args.seed), engine=engines[n])
            seconds[n].append(time.perf_counter() - t0)
            cpu[n].append(time.process_time() - c0)
            texts[n] = [[m["content"] for m in r.messages if m["role"] == "assistant"] for r in records]
            stats[n] = engines[n].stats
            print(n, round(seconds[n][-1], 2), "s,", round(cpu[n][-1], 2), "CPU-s", flush=True)
    out = {}
    for n in names:
        med = sorted(seconds[n])[len(seconds[n]) // 2]
        med_cpu = sorted(cpu[n])[len(cpu[n]) // 2]
        same = sum(a == b for a, b in zip(texts[n], texts[names[0]], strict=True))
        out[n] = {
            **PATHS[n],
            "seconds_each_round": [round(s, 2) for s in seconds[n]],
            "median_seconds": round(med, 2),
            "cpu_seconds_each_round": [round(s, 2) for s in cpu[n]],
            "median_cpu_seconds": round(med_cpu, 2),
            "conversations": len(texts[n]),
            "warmup": warmup[n],
            "conversations_per_s": round(len(texts[n]) / med, 4),
            "new_tokens": stats[n].new_tokens,
            "decoded_row_steps": stats[n].row_steps,
            "live_row_share": round(stats[n].new_tokens / max(1, stats[n].row_steps), 3),
            "shared_prefix_tokens": stats[n].shared_tokens,
            "reused_prompt_tokens": stats[n].reused_tokens,
            "prompt_tokens": stats[n].prompt_tokens,
            f"same_text_as_{names[0]}": f"{same}/{len(texts[n])}",
        }
    base, base_cpu = out[names[0]]["median_seconds"], out[names[0]]["median_cpu_seconds"]
    return {
        "paths": out,
        "speedup_vs_" + names[0]: {n: round(base / out[n]["median_seconds"], 3) for n in names},
        "cpu_time_speedup_vs_" + names[0]: {n: round(base_cpu / out[n]["median_cpu_seconds"], 3) for n in names},
    }


def profile_generate(model, tok, args) -> None:
    """torch.profiler over one greedy ``generate`` call of the engine (turn-1 prompts of ``--n-tasks`` tasks in one
    batch, ``--max-new-tokens``): the ops by CPU time, printed."""
    from torch.profiler import ProfilerActivity, profile

    from clarify_lit.simulate import prompts

    system = prompts.system_prompt("reasoning", "thinking", False)
    convs = [
        [
            {"role": "system", "content": system},
            {"role": "user", "content": prompts.teacher_message(t, "reasoning", "thinking", args.n_turns, 1)},
        ]
        for t in make_tasks(args.n_tasks)
    ]
    options = PATHS[args.paths[0]] if args.paths else {}
    engine = GenerationEngine(model, tok, batch_size=len(convs), max_new_tokens=args.max_new_tokens, **options)
    engine.generate(convs[:2], 0.0, seed=0, max_new_tokens=2)  # warm-up
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        engine.generate(convs, 0.0, seed=0)
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=25))


# -- decode step vs the machine's bounds (--decode-step) --------------------------------------------------------------


def _median_times(fn, repeats: int) -> tuple[float, float]:
    """Median wall-clock and median process-CPU seconds of ``fn`` (CPU time is what other processes' load does not
    inflate: on a shared machine compare those, with 1 torch thread)."""
    wall, cpu = [], []
    for _ in range(repeats):
        t0, c0 = time.perf_counter(), time.process_time()
        fn()
        wall.append(time.perf_counter() - t0)
        cpu.append(time.process_time() - c0)
    return sorted(wall)[len(wall) // 2], sorted(cpu)[len(cpu) // 2]


def copy_bandwidth(n_bytes: int = 512 * 2**20, repeats: int = 5) -> tuple[float, float]:
    """Bytes/s of a large tensor copy (per wall second, per CPU second), counting bytes read + bytes written
    (STREAM's "copy" convention): what streaming the weights through the cores once can cost at best."""
    src = torch.ones(n_bytes // 4, dtype=torch.float32)
    dst = torch.empty_like(src)
    dst.copy_(src)  # touch the pages before timing
    wall, cpu = _median_times(lambda: dst.copy_(src), repeats)
    return 2 * n_bytes / wall, 2 * n_bytes / cpu


def matmul_peak(dtype: torch.dtype, n: int = 2048, repeats: int = 5) -> tuple[float, float]:
    """FLOP/s (per wall second, per CPU second) of one large square ``torch.matmul`` in ``dtype``: the best the
    BLAS does on this CPU."""
    a, b = torch.randn(n, n).to(dtype), torch.randn(n, n).to(dtype)
    torch.matmul(a, b)
    wall, cpu = _median_times(lambda: torch.matmul(a, b), repeats)
    return 2 * n**3 / wall, 2 * n**3 / cpu


def random_cache(model, batch: int, context: int, dtype: torch.dtype, preallocate: bool = False):
    """A ``DynamicCache`` holding ``context`` random keys/values per row (``preallocate``: the engine's
    preallocated layers): a decode step's cost does not depend on the values, and building it this way skips a
    prefill that would cost more than all the steps timed."""
    cfg = model.config
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    cache = new_cache(model, preallocate)
    for layer in range(cfg.num_hidden_layers):
        k = torch.randn(batch, cfg.num_key_value_heads, context, head_dim).to(dtype)
        cache.update(k, torch.randn_like(k), layer)
    return cache


def decode_step_bounds(model, batch: int, context: int, bandwidth: float, peak: float) -> dict:
    """The two lower bounds of one decode step: every weight byte read once (over the copy bandwidth), and the
    step's FLOPs (2·params per row for the matmuls, plus attention: q·k and p·v over the context, every layer)
    over the matmul peak."""
    cfg = model.config
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    params = sum(p.numel() for p in model.parameters())
    weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    attention = 4 * cfg.num_hidden_layers * cfg.num_attention_heads * head_dim * (context + 1) * batch
    flops = 2 * params * batch + attention
    return {
        "weight_bytes": weight_bytes,
        "flops": flops,
        "weight_bound_ms": 1e3 * weight_bytes / bandwidth,
        "flop_bound_ms": 1e3 * flops / peak,
    }


def decode_step_time(
    model,
    batch: int,
    context: int,
    steps: int,
    preallocate: bool = False,
    decode: str = "model",
    first: list | None = None,
) -> tuple[float, float]:
    """Median wall and CPU seconds of ``model(next_token, cache=cache)`` (``past_key_values=`` in older
    transformers) over ``steps`` steps after one warm-up, the cache growing by one token per step as in generation.
    ``decode``: the engine's decode step of our own (``clarify_lit.simulate.decode``: ``eager`` or ``compiled``)
    instead of the model's forward; ``first`` gets the warm-up's wall and CPU seconds (a compilation's cost)."""
    dtype = next(model.parameters()).dtype
    cache = random_cache(model, batch, context, dtype, preallocate)
    token = torch.randint(0, model.config.vocab_size, (batch, 1))
    with torch.inference_mode(), own_decode_step(model, decode_step_for(model, decode)):
        t0, c0 = time.perf_counter(), time.process_time()
        model(token, cache=cache, use_cache=True)
        if first is not None:
            first.append((time.perf_counter() - t0, time.process_time() - c0))
        return _median_times(lambda: model(token, cache=cache, use_cache=True), steps)


#: variant -> (dtype, attention, preallocated cache[, decode step]): the plain step with transformers' concatenating
#: cache in three set-ups, the engine's preallocated cache (no per-step copy of the whole cache) with SDPA, eager and
#: the engine's grouped-query decode attention (``attention="gqa"``), and the decode step of our own (issue 28:
#: ``step`` = its plain ops, ``compiled`` = ``torch.compile``d).
DECODE_VARIANTS = {
    "bf16_sdpa": ("bfloat16", "sdpa", False),
    "bf16_eager": ("bfloat16", "eager", False),
    "fp32_sdpa": ("float32", "sdpa", False),
    "bf16_sdpa_prealloc": ("bfloat16", "sdpa", True),
    "bf16_eager_prealloc": ("bfloat16", "eager", True),
    "bf16_gqa_prealloc": ("bfloat16", "gqa", True),
    "bf16_step": ("bfloat16", "sdpa", True, "eager"),
    "bf16_matmul": ("bfloat16", "sdpa", True, "matmul"),
    "bf16_compiled": ("bfloat16", "sdpa", True, "compiled"),
    "fp32_step": ("float32", "sdpa", True, "eager"),
    "fp32_compiled": ("float32", "sdpa", True, "compiled"),
}


def decode_step_report(args, save=None) -> dict:
    """One decode step of every variant at every (batch, context), interleaved variant by variant inside each
    shape (so a load change on a shared machine hits all variants alike), against both bounds, per wall second and
    per CPU second (bounds and steps measured the same way). ``save`` gets the report so far after every shape (a
    run cut short by a time limit keeps what it measured)."""
    models = {}
    for name in args.decode_variants:
        dtype, attn = DECODE_VARIANTS[name][:2]
        model = load_causal_lm(args.model, dtype=dtype)
        model.set_attn_implementation(attention_implementation(attn))
        models[name] = model.eval()
    bandwidth = copy_bandwidth()
    peaks = {"bfloat16": matmul_peak(torch.bfloat16), "float32": matmul_peak(torch.float32)}
    print(
        f"copy bandwidth {bandwidth[0] / 1e9:.1f} GB/s ({bandwidth[1] / 1e9:.1f} per CPU-s), matmul peak bf16 "
        f"{peaks['bfloat16'][0] / 1e9:.0f} / fp32 {peaks['float32'][0] / 1e9:.0f} GFLOP/s "
        f"({peaks['bfloat16'][1] / 1e9:.0f} / {peaks['float32'][1] / 1e9:.0f} per CPU-s)",
        flush=True,
    )
    report = {
        "model": args.model,
        "steps_per_median": args.decode_steps,
        "rounds": args.decode_rounds,
        "copy_bandwidth_gb_s": {"wall": round(bandwidth[0] / 1e9, 1), "cpu": round(bandwidth[1] / 1e9, 1)},
        "matmul_peak_gflop_s": {
            k: {"wall": round(v[0] / 1e9, 1), "cpu": round(v[1] / 1e9, 1)} for k, v in peaks.items()
        },
        "weight_bytes": {name: sum(p.numel() * p.element_size() for p in m.parameters()) for name, m in models.items()},
        "steps": [],
    }
    rows = report["steps"]
    for batch in args.decode_batches:
        for context in args.decode_contexts:
            step: dict[str, list[tuple[float, float]]] = {name: [] for name in models}
            first: dict[str, list[tuple[float, float]]] = {name: [] for name in models}
            for _ in range(args.decode_rounds):  # A, B, C, A, B, C, ...: medians of medians
                for name, model in models.items():
                    v = DECODE_VARIANTS[name]
                    step[name].append(
                        decode_step_time(
                            model, batch, context, args.decode_steps, v[2], v[3] if len(v) > 3 else "model", first[name]
                        )
                    )
            for name, model in models.items():
                dtype = DECODE_VARIANTS[name][0]
                row = {
                    "variant": name,
                    "batch": batch,
                    "context": context,
                    "first_step_s": [[round(w, 2), round(c, 2)] for w, c in first[name]],
                }  # [wall, CPU]
                for clock, k in (("wall", 0), ("cpu", 1)):
                    ms = 1e3 * sorted(t[k] for t in step[name])[len(step[name]) // 2]
                    b = decode_step_bounds(model, batch, context, bandwidth[k], peaks[dtype][k])
                    larger = max(b["weight_bound_ms"], b["flop_bound_ms"])
                    row.update(
                        {
                            f"{clock}_step_ms": round(ms, 1),
                            f"{clock}_weight_bound_ms": round(b["weight_bound_ms"], 1),
                            f"{clock}_flop_bound_ms": round(b["flop_bound_ms"], 1),
                            f"{clock}_step_over_weight_bound": round(ms / b["weight_bound_ms"], 2),
                            f"{clock}_step_over_flop_bound": round(ms / b["flop_bound_ms"], 2),
                            f"{clock}_step_over_larger_bound": round(ms / larger, 2),
                        }
                    )
                rows.append(row)
                print(row, flush=True)
            if save is not None:
                save(report)
    return report


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
    p.add_argument(
        "--decode-step",
        action="store_true",
        help="time one decode step against the weight-bytes and FLOP bounds instead of whole rollouts",
    )
    p.add_argument("--decode-batches", type=int, nargs="+", default=[16, 32, 50], help="the presets' batch sizes")
    p.add_argument(
        "--decode-contexts",
        type=int,
        nargs="+",
        default=[30, 300],
        help="cached tokens: a short prompt, and the reasoning prompt's ~300",
    )
    p.add_argument("--decode-steps", type=int, default=6, help="steps per median")
    p.add_argument("--decode-variants", nargs="+", choices=list(DECODE_VARIANTS), default=list(DECODE_VARIANTS))
    p.add_argument("--decode-rounds", type=int, default=3, help="interleaved rounds per shape (median taken)")
    p.add_argument(
        "--paths",
        nargs="+",
        choices=list(PATHS),
        default=None,
        help="compare the engine's decode paths (the first is the reference) instead of the variants",
    )
    p.add_argument("--rounds", type=int, default=2, help="--paths: interleaved rounds (median taken)")
    p.add_argument(
        "--profile-generate",
        action="store_true",
        help="print a torch.profiler table of one greedy generate call (path: the first of --paths)",
    )
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.decode_step:
        key = args.key or f"decode_step {args.model} threads={torch.get_num_threads()}"
        head = {
            "torch_threads": torch.get_num_threads(),
            "cpu_count": os.cpu_count(),
            "load_average_1m_before": round(os.getloadavg()[0], 2),
            "torch": torch.__version__,
            "machine": platform.machine(),
            "stamp": machine_stamp(),
            "loadavg_before": loadavg(),
        }

        def save(partial: dict) -> None:
            save_entry(
                Path(args.out),
                key,
                {**head, **partial, "load_average_1m_after": round(os.getloadavg()[0], 2), "loadavg_after": loadavg()},
            )

        return {**head, **decode_step_report(args, save)}
    model, tok = load_causal_lm(args.model, dtype=args.dtype), load_tokenizer(args.model)
    tasks = make_tasks(args.n_tasks)
    if args.profile_generate:
        profile_generate(model, tok, args)
        return {}
    if args.paths:
        load_before = round(os.getloadavg()[0], 2)
        report = {
            "model": args.model,
            "dtype": args.dtype,
            "n_tasks": args.n_tasks,
            "n_turns": args.n_turns,
            "temperatures": args.temperatures,
            "max_new_tokens": args.max_new_tokens,
            "batch_size": args.batch_size,
            "rounds": args.rounds,
            "torch_threads": torch.get_num_threads(),
            "cpu_count": os.cpu_count(),
            "load_average_1m_before": load_before,
            "torch": torch.__version__,
            "stamp": machine_stamp(args.dtype),
            "loadavg_before": loadavg(),
            **paths_report(model, tok, tasks, args),
            "load_average_1m_after": round(os.getloadavg()[0], 2),
            "loadavg_after": loadavg(),
        }
        print(
            json.dumps(report["speedup_vs_" + args.paths[0]]),
            json.dumps(report["cpu_time_speedup_vs_" + args.paths[0]]),
        )
        save_entry(
            Path(args.out),
            args.key or f"paths {args.model} batch={args.batch_size} threads={torch.get_num_threads()}",
            report,
        )
        return report

    results = {}
    results["batched_sorted"] = time_variant(model, tok, tasks, batch_size=args.batch_size, sort=True, args=args)
    print("batched, sorted  ", results["batched_sorted"], flush=True)
    results["batched_unsorted"] = time_variant(model, tok, tasks, batch_size=args.batch_size, sort=False, args=args)
    print("batched, unsorted", results["batched_unsorted"], flush=True)
    if len(set(args.temperatures)) > 1:
        results["batched_per_temperature"] = time_variant(
            model, tok, tasks, batch_size=args.batch_size, sort=True, args=args, mix=False
        )
        print("batched, one temperature per batch", results["batched_per_temperature"], flush=True)
    results["batched_no_kv_reuse"] = time_variant(
        model, tok, tasks, batch_size=args.batch_size, sort=True, args=args, reuse=False
    )
    print("batched, every turn re-encoded", results["batched_no_kv_reuse"], flush=True)
    if not args.skip_naive:
        # the loop a user would write: one conversation per generate call, the whole conversation encoded each turn
        results["naive_one_at_a_time"] = time_variant(
            model, tok, tasks, batch_size=1, sort=False, args=args, reuse=False
        )
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
        "model": args.model,
        "dtype": args.dtype,
        "n_tasks": args.n_tasks,
        "n_turns": args.n_turns,
        "temperatures": args.temperatures,
        "max_new_tokens": args.max_new_tokens,
        "batch_size": args.batch_size,
        "torch_threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
        "load_average_1m": round(os.getloadavg()[0], 2),
        "torch": torch.__version__,
        "machine": platform.machine(),
        "results": results,
        "ratios": ratios,
    }
    # one entry per (model, threads), so the tiny and the SmolLM2 numbers live side by side
    save_entry(Path(args.out), args.key or f"{args.model} threads={torch.get_num_threads()}", report)
    print(json.dumps(ratios))
    return report


def save_entry(out: Path, key: str, report: dict) -> None:
    """Merge one entry into the results JSON (the other entries are kept)."""
    out.parent.mkdir(parents=True, exist_ok=True)
    existing = json.loads(out.read_text()) if out.exists() else {}
    if not isinstance(existing, dict) or "results" in existing:
        existing = {}
    existing[key] = report
    out.write_text(json.dumps(existing, indent=1) + "\n")
    print(f"{key} -> {out}")


if __name__ == "__main__":
    main()
