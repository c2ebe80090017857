"""Stages at once against one after another, on real work: `make reproduce`'s Base evaluation (issue 28.3).

    python benchmarks/parallel_stages.py [--copies 2] [--jobs 2 3] [--n_questions 50] [--one_thread true]
                                         [--active_spin true]

Runs the same ``clarify evaluate`` (reproduce's own Base evaluation of its reasoning cell, ``preset_eval``: the
embedded SmolLM2-135M-Instruct, 3 turns × 40 tokens, greedy, batch 50, ``--dtype auto``) ``copies`` times through
the demo's own runner (``clarify_lit.jobs.stages.StageRunner.run_all``): first one after another (``jobs=1``), then
with each ``--jobs`` value. Records each variant's wall time, the cores its stages kept busy (CPU time / wall time),
the ratio of the serial wall time to it (work per hour), the load average before and after, and how many of the
copies' conversations are byte-identical to the first serial copy's (``rollouts.jsonl``). ``--one_thread true`` adds
the variant that gives each of 2 parallel stages one torch thread of the 2 cores instead of keeping the thread
count: greedy bf16 text depends on the thread count, which is why the runner keeps it. ``--active_spin true`` adds 2
parallel stages with ``OMP_WAIT_POLICY=ACTIVE`` instead of the runner's ``PASSIVE`` (OpenMP threads that spin while
they wait take the cores the other stage's threads need). Writes
``benchmarks/results/parallel_stages.json`` (key: the CPU model and the variants).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from preset_eval import base_evaluation_args  # noqa: E402
from stamp import loadavg, machine_stamp  # noqa: E402

from clarify_lit.environment import cpu_model  # noqa: E402
from clarify_lit.jobs.stages import Stage, StageRunner  # noqa: E402
from clarify_lit.models import resolve_dtype  # noqa: E402

OUT = Path(__file__).parent / "results" / "parallel_stages.json"


def run_variant(root: Path, name: str, copies: int, jobs: int, n_questions: int, env: dict[str, str]) -> dict:
    """``copies`` evaluations through the runner with ``jobs``; ``env`` is set around it (the children inherit)."""
    outs = [root / name / f"copy{i}" for i in range(copies)]
    stages = [Stage(base_evaluation_args("reproduce", out, n_questions)) for out in outs]
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        load_before = loadavg()
        cpu0 = resource.getrusage(resource.RUSAGE_CHILDREN)
        t0 = time.perf_counter()
        runner = StageRunner(root / name, tag=f"bench {name}")
        runner.run_all(stages, jobs)
        wall = time.perf_counter() - t0
        cpu1 = resource.getrusage(resource.RUSAGE_CHILDREN)
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    return {
        "jobs": jobs,
        "env": env,
        "wall_s": round(wall, 1),
        # the stages' CPU time (user + system) over the wall time: how many of the cores they kept busy (a thread
        # spinning in an OpenMP barrier counts as busy)
        "cores_busy": round((cpu1.ru_utime + cpu1.ru_stime - cpu0.ru_utime - cpu0.ru_stime) / wall, 2),
        "load_before": load_before,
        "load_after": loadavg(),
        "rollouts": [out / "rollouts.jsonl" for out in outs],
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--copies", type=int, default=2, help="evaluations per variant")
    ap.add_argument("--jobs", type=int, nargs="+", default=[2], help="parallel variants to measure")
    ap.add_argument("--n_questions", type=int, default=50)
    ap.add_argument("--one_thread", choices=["true", "false"], default="true")
    ap.add_argument("--active_spin", choices=["true", "false"], default="true")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        variants = {"serial": run_variant(root, "serial", args.copies, 1, args.n_questions, {})}
        for jobs in args.jobs:
            variants[f"jobs{jobs}"] = run_variant(root, f"jobs{jobs}", args.copies, jobs, args.n_questions, {})
        if args.one_thread == "true":
            variants["jobs2_one_thread_each"] = run_variant(
                root, "jobs2_one_thread_each", args.copies, 2, args.n_questions, {"OMP_NUM_THREADS": "1"}
            )
        if args.active_spin == "true":
            variants["jobs2_omp_active"] = run_variant(
                root, "jobs2_omp_active", args.copies, 2, args.n_questions, {"OMP_WAIT_POLICY": "ACTIVE"}
            )
        reference = variants["serial"]["rollouts"][0].read_bytes().splitlines()
        for v in variants.values():
            same = [
                sum(a == b for a, b in zip(reference, p.read_bytes().splitlines(), strict=True)) for p in v["rollouts"]
            ]
            v["conversations_identical_to_serial"] = f"{sum(same)}/{len(reference) * len(same)}"
            v["work_per_hour_vs_serial"] = round(variants["serial"]["wall_s"] / v["wall_s"], 3)
            del v["rollouts"]
    result = {
        "cpu_model": cpu_model(),
        "dtype": resolve_dtype("auto", "cpu"),
        "copies": args.copies,
        "n_questions": args.n_questions,
        "variants": variants,
        "command": "python benchmarks/parallel_stages.py --copies {} --jobs {} --n_questions {} --one_thread {} "
        "--active_spin {}".format(
            args.copies, " ".join(map(str, args.jobs)), args.n_questions, args.one_thread, args.active_spin
        ),
        "environment": machine_stamp(resolve_dtype("auto", "cpu")),
    }
    OUT.parent.mkdir(parents=True, exist_ok=True)
    existing = json.loads(OUT.read_text()) if OUT.exists() else {}
    existing[f"{cpu_model()} copies={args.copies} jobs={','.join(map(str, args.jobs))}"] = result
    OUT.write_text(json.dumps(existing, indent=1) + "\n")
    print(json.dumps({k: v for k, v in result.items() if k != "environment"}, indent=1))


if __name__ == "__main__":
    main()
