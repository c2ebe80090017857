"""Scaling curve of our training: time per epoch and peak RSS vs the number of conversations (×1, ×2, ×4) and vs
sequence length (each assistant turn's text ×1, ×2, ×4), Refit + LoRA on the tiny random model.

    python benchmarks/scaling.py                 # ~4 min on 2 loaded cores

Each point is one full epoch (``max_epochs=1``, batch size 4, bf16-mixed) in its own subprocess (clean peak RSS via
``ru_maxrss``); the points are interleaved and repeated (order reversed on the second repeat), the median is kept.
Records come from ``benchmarks/bench_data.py`` (real SmolLM2 simulator conversations). Writes
``benchmarks/results/scaling.json`` with per-point seconds per epoch (wall and process CPU time, one torch thread),
trained tokens, seconds per 1k trained tokens, peak RSS, and the ratios against the ×1 point (linear cost: time
ratio ≈ token ratio).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from train_throughput import PRESETS, machine_info, run_child  # noqa: E402


def child_main(spec: dict) -> None:
    import lightning as L
    import torch

    from clarify_lit.data.datamodule import ConversationDataModule
    from clarify_lit.train.module import ClarifyModule
    from clarify_lit.train.objectives import Refit

    torch.set_num_threads(spec["threads"])
    torch.manual_seed(0)
    lk = PRESETS.get(spec["model"], PRESETS["tiny-random"])
    module = ClarifyModule(
        model_name_or_path=spec["model"],
        objective=Refit(),
        lora_r=lk["lora_r"],
        lora_alpha=lk["lora_alpha"],
        lora_target_modules=lk["lora_target_modules"],
        learning_rate=2e-4,
        warmup_ratio=0.0,
        lr_schedule="constant",
        export_on_fit_end=False,
    )
    dm = ConversationDataModule(
        [spec["records"]],
        val_fraction=0.0,
        tokenizer_name_or_path=spec["model"],
        max_length=spec["max_length"],
        batch_size=spec["batch_size"],
        cache_tokenized=False,
        objective=module.objective,
    )
    dm.setup("fit")
    marks, tokens = {}, {"trained": 0, "input": 0, "padded": 0, "steps": 0}

    class Timer(L.Callback):
        def on_train_epoch_start(self, trainer, pl_module):
            marks["start"], marks["cpu_start"] = time.perf_counter(), time.process_time()

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            tokens["trained"] += int((batch["labels"][:, 1:] != -100).sum())
            tokens["input"] += int(batch["attention_mask"].sum())
            tokens["padded"] += batch["input_ids"].numel()
            tokens["steps"] += 1

        def on_train_epoch_end(self, trainer, pl_module):
            marks["end"], marks["cpu_end"] = time.perf_counter(), time.process_time()

    L.Trainer(
        accelerator="cpu",
        devices=1,
        precision=spec["precision"],
        max_epochs=1,
        gradient_clip_val=1.0,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        limit_val_batches=0,
        callbacks=[Timer()],
    ).fit(module, datamodule=dm)
    seconds = marks["end"] - marks["start"]
    cpu = marks["cpu_end"] - marks["cpu_start"]
    res = {
        "conversations": len(dm.train_set),
        "epoch_s": round(seconds, 3),
        "epoch_cpu_s": round(cpu, 3),
        "steps": tokens["steps"],
        "trained_tokens": tokens["trained"],
        "input_tokens": tokens["input"],
        "padded_tokens": tokens["padded"],
        "mean_length": round(tokens["input"] / len(dm.train_set), 1),
        "s_per_1k_trained_tokens": round(1000 * seconds / tokens["trained"], 4),
        "cpu_s_per_1k_trained_tokens": round(1000 * cpu / tokens["trained"], 4),
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
    }
    print("RESULT " + json.dumps(res), flush=True)


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--child", help=argparse.SUPPRESS)
    p.add_argument("--model", default="tiny-random")
    p.add_argument("--base-conversations", type=int, default=96)
    p.add_argument("--factors", type=int, nargs="+", default=[1, 2, 4])
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--max-length", type=int, default=4096)
    p.add_argument("--precision", default="bf16-mixed")
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--timeout", type=float, default=900)
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "scaling.json"))
    args = p.parse_args(argv)
    if args.child:
        child_main(json.loads(args.child))
        return {}

    from bench_data import write_records

    tmp = Path(tempfile.mkdtemp(prefix="clarify-scaling-"))
    points = [
        ("conversations", f, write_records(tmp / f"n{f}.jsonl", args.base_conversations * f)) for f in args.factors
    ]
    points += [
        ("sequence_length", f, write_records(tmp / f"len{f}.jsonl", args.base_conversations, scale_text=f))
        for f in args.factors
    ]
    load_start = os.getloadavg()
    t0 = time.time()
    runs: dict[str, list[dict]] = {f"{kind} x{f}": [] for kind, f, _ in points}
    for rep in range(args.repeats):
        for kind, f, path in points if rep % 2 == 0 else list(reversed(points)):
            spec = {
                "model": args.model,
                "records": str(path),
                "batch_size": args.batch_size,
                "max_length": args.max_length,
                "precision": args.precision,
                "threads": args.threads,
            }
            res = run_child(spec, args.timeout, script=__file__)
            runs[f"{kind} x{f}"].append(res)
            print(
                f"[rep {rep}] {kind:<15} x{f}: {res['conversations']:>4} conversations, mean length "
                f"{res['mean_length']:>7.1f}, epoch {res['epoch_s']:>7.2f} s, peak RSS {res['peak_rss_mb']:.0f} MB",
                flush=True,
            )
    curves: dict[str, list[dict]] = {"conversations": [], "sequence_length": []}
    for kind, f, _ in points:
        rs = runs[f"{kind} x{f}"]
        curves[kind].append(
            {
                "factor": f,
                "conversations": rs[0]["conversations"],
                "mean_length": rs[0]["mean_length"],
                "trained_tokens": rs[0]["trained_tokens"],
                "steps": rs[0]["steps"],
                "epoch_s": round(statistics.median(r["epoch_s"] for r in rs), 3),
                "epoch_s_all": [r["epoch_s"] for r in rs],
                "epoch_cpu_s": round(statistics.median(r["epoch_cpu_s"] for r in rs), 3),
                "epoch_cpu_s_all": [r["epoch_cpu_s"] for r in rs],
                "cpu_s_per_1k_trained_tokens": round(
                    statistics.median(r["cpu_s_per_1k_trained_tokens"] for r in rs), 4
                ),
                "s_per_1k_trained_tokens": round(statistics.median(r["s_per_1k_trained_tokens"] for r in rs), 4),
                "peak_rss_mb": round(statistics.median(r["peak_rss_mb"] for r in rs), 1),
            }
        )
    for pts in curves.values():
        base = pts[0]
        for pt in pts:
            pt["time_ratio"] = round(pt["epoch_s"] / base["epoch_s"], 3)
            pt["cpu_time_ratio"] = round(pt["epoch_cpu_s"] / base["epoch_cpu_s"], 3)
            pt["token_ratio"] = round(pt["trained_tokens"] / base["trained_tokens"], 3)
            pt["rss_ratio"] = round(pt["peak_rss_mb"] / base["peak_rss_mb"], 3)
    report = {
        "command": "python benchmarks/scaling.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "model": args.model,
        "objective": "Refit",
        "finetune": "lora",
        "batch_size": args.batch_size,
        "precision": args.precision,
        "repeats": args.repeats,
        "machine": {
            **machine_info(args.threads),
            "loadavg_start": [round(x, 2) for x in load_start],
            "loadavg_end": [round(x, 2) for x in os.getloadavg()],
        },
        "wall_s": round(time.time() - t0, 1),
        "notes": (
            "one subprocess per point and repeat, points interleaved, order reversed on odd repeats, median "
            "kept; sequence_length xF repeats each assistant turn's text F times (same conversations); "
            "linear cost in data size means time_ratio ~ token_ratio; cpu_* use the process CPU time (one "
            "torch thread), much less sensitive than wall time to other jobs on the machine"
        ),
        "curves": curves,
        "runs": runs,
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({args.model: report}, indent=1) + "\n")
    print(
        f"\n{'curve':<16} {'factor':>6} {'convs':>6} {'mean len':>8} {'epoch s':>8} {'time x':>7} {'cpu s':>7} "
        f"{'cpu x':>6} {'tokens x':>8} {'cpu s/1k tok':>12} {'peak MB':>8}"
    )
    for kind, pts in curves.items():
        for pt in pts:
            print(
                f"{kind:<16} {pt['factor']:>6} {pt['conversations']:>6} {pt['mean_length']:>8.0f} "
                f"{pt['epoch_s']:>8.2f} {pt['time_ratio']:>7.2f} {pt['epoch_cpu_s']:>7.2f} "
                f"{pt['cpu_time_ratio']:>6.2f} "
                f"{pt['token_ratio']:>8.2f} {pt['cpu_s_per_1k_trained_tokens']:>12.3f} {pt['peak_rss_mb']:>8.0f}"
            )
    print(f"-> {out}")
    return report


if __name__ == "__main__":
    main()
