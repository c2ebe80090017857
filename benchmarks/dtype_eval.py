"""bf16 against fp32 on this CPU, on real work: the `make demo` Base evaluation (issue 24).

    python benchmarks/dtype_eval.py [--repeats 1] [--n_questions 48]

Runs ``clarify evaluate`` on the embedded SmolLM2-135M-Instruct with the demo's options (open clarifying cell, 48
test questions, greedy, batch 48) once per dtype per repeat, alternating bfloat16 and float32, each in its own
process, and records wall time and CPU time (the child's user + system seconds: robust to other jobs on the machine,
unlike wall time), the load average before each run, the CPU's bf16 flags and what ``--dtype auto`` resolves to.
Writes ``benchmarks/results/dtype_eval.json`` (key: the CPU model).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from preset_eval import base_evaluation_args

from clarify_lit.environment import cpu_model, environment_stamp, native_bf16_flags
from clarify_lit.models import resolve_dtype

OUT = Path(__file__).parent / "results" / "dtype_eval.json"


def run_once(dtype: str, n_questions: int) -> dict[str, float]:
    with tempfile.TemporaryDirectory() as tmp:
        before = resource.getrusage(resource.RUSAGE_CHILDREN)
        load = os.getloadavg()[0]
        t0 = time.perf_counter()
        subprocess.run(
            [
                sys.executable,
                "-m",
                "clarify_lit.cli",
                *base_evaluation_args("demo", Path(tmp) / "eval", n_questions, dtype),
            ],
            check=True,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        wall = time.perf_counter() - t0
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
        metrics = json.loads((Path(tmp) / "eval" / "metrics.json").read_text())["metrics"]
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return {
        "wall_s": round(wall, 1),
        "cpu_s": round(cpu, 1),
        "load_before": round(load, 2),
        "accuracy": metrics["accuracy"],
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--n_questions", type=int, default=48)
    args = ap.parse_args()
    runs: dict[str, list[dict[str, float]]] = {"bfloat16": [], "float32": []}
    for _ in range(args.repeats):
        for dtype in runs:
            runs[dtype].append(run_once(dtype, args.n_questions))
            print(dtype, runs[dtype][-1], flush=True)
    cpu = {d: sum(r["cpu_s"] for r in rs) for d, rs in runs.items()}
    wall = {d: sum(r["wall_s"] for r in rs) for d, rs in runs.items()}
    stamp = environment_stamp("cpu", "float32")
    result = {
        "cpu_model": cpu_model(),
        "bf16_flags": native_bf16_flags(),
        "auto_resolves_to": resolve_dtype("auto", "cpu"),
        "runs": runs,
        "bf16_over_fp32_cpu_time": round(cpu["bfloat16"] / cpu["float32"], 3),
        "bf16_over_fp32_wall_time": round(wall["bfloat16"] / wall["float32"], 3),
        "command": f"python benchmarks/dtype_eval.py --repeats {args.repeats} --n_questions {args.n_questions}",
        "environment": stamp,
    }
    OUT.parent.mkdir(parents=True, exist_ok=True)
    existing = json.loads(OUT.read_text()) if OUT.exists() else {}
    existing[cpu_model()] = result
    OUT.write_text(json.dumps(existing, indent=1) + "\n")
    print(json.dumps({k: v for k, v in result.items() if k not in ("environment", "runs")}, indent=1))


if __name__ == "__main__":
    main()
