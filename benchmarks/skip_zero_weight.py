"""Refit epoch time with and without ``skip_zero_weight`` (issue 16.1) on the demo's logged conversations.

    python benchmarks/skip_zero_weight.py --records runs/demo/sciq-reasoning-standard/seed0/simulate/conversations.jsonl
    python benchmarks/skip_zero_weight.py --records … --lora-dropout 0 --repeats 1 --tag dropout0   # exact agreement

The demo (``make demo``) logs 48 conversations (16 SciQ questions × 3 temperatures) of which only the correct ones
have reward 1 (3 of 48 in seed 0), so Refit's weight is 0 on most rows. ``skip_zero_weight`` (the module's default)
leaves those rows out of the forward and backward pass; the optimizer still steps on every micro-batch, so the
trajectory is unchanged. This script trains one Refit epoch on those records with the demo's settings
(``configs/model/smollm2-135m.yaml``: SmolLM2-135M, LoRA r=16 on all 7 projections, lr 2e-4 cosine with 5 % warm-up,
batch 4; ``configs/trainer/cpu-bf16.yaml``: bf16-mixed, gradient clipping 1.0) with the skip on and off, each run in
its own subprocess, interleaved (``on, off`` then ``off, on`` …) because other jobs share the machine, and reports
the medians. All 48 records are trained (``val_fraction=0``: the demo holds one task out for validation, which is not
timed anyway).

Timed: from Lightning's ``on_train_epoch_start`` to ``on_train_epoch_end`` (data loading, forward, backward,
optimizer, logging; wall time and process CPU time — the latter is robust to other jobs), or, with ``--max-steps``,
that many micro-batches, extrapolated to the epoch by
``epoch_s = s_per_step_computed × steps_with_rows + s_per_step_empty × empty_steps`` (said in the JSON).

Agreement: every run seeds 0 before the LoRA adapter is created, so both variants start from the same weights; the
final LoRA parameters of the first ``on`` and ``off`` runs are compared (max abs difference). With the demo's LoRA
dropout (0.05) the two variants draw different dropout masks (the skipped rows draw none), so their parameters
differ by the dropout noise; with ``--lora-dropout 0`` they must agree to float error (the tests check 1e-6 on the
tiny model: tests/test_module.py::test_zero_weight_skip_keeps_the_trajectory).

Results are merged into ``benchmarks/results/skip_zero_weight.json`` under ``--tag``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

DEMO_RECORDS = ROOT / "runs" / "demo" / "sciq-reasoning-standard" / "seed0" / "simulate" / "conversations.jsonl"
MODEL_CONFIG = ROOT / "configs" / "model" / "smollm2-135m.yaml"
TRAINER_CONFIG = ROOT / "configs" / "trainer" / "cpu-bf16.yaml"


def _configs() -> tuple[dict, dict, dict]:
    """``(model, data, trainer)`` sections of the demo's presets (the objective is Refit,
    configs/objective/refit.yaml)."""
    import yaml

    model_cfg = yaml.safe_load(MODEL_CONFIG.read_text())
    trainer_cfg = yaml.safe_load(TRAINER_CONFIG.read_text())
    return model_cfg["model"], model_cfg.get("data", {}), trainer_cfg["trainer"]


# ------------------------------------------------------------------------------------------------------ child side
def child_main(spec: dict) -> None:
    import lightning as L
    import torch

    from clarify_lit.data.datamodule import ConversationDataModule
    from clarify_lit.train.module import ClarifyModule
    from clarify_lit.train.objectives import Refit

    torch.set_num_threads(spec["threads"])
    model_kw, data_kw, trainer_kw = _configs()
    model_kw = {**model_kw, "lora_dropout": spec["lora_dropout"]}
    L.seed_everything(0, verbose=False)  # the same LoRA initialisation in both variants
    module = ClarifyModule(objective=Refit(), skip_zero_weight=spec["skip"], export_on_fit_end=False, **model_kw)
    dm = ConversationDataModule(
        [spec["records"]],
        val_fraction=0.0,
        cache_tokenized=False,
        seed=0,
        tokenizer_name_or_path=model_kw["model_name_or_path"],
        **data_kw,
    )
    marks: dict[str, float] = {}
    steps: list[dict] = []

    class Timer(L.Callback):
        def on_train_epoch_start(self, trainer, pl_module):
            marks["start"], marks["cpu_start"] = time.perf_counter(), time.process_time()
            marks["last"] = marks["start"]

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            now = time.perf_counter()
            steps.append(
                {
                    "s": now - marks["last"],
                    "rows": len(batch["ids"]),
                    "nonzero_rows": int((batch["weights"] != 0).sum()),
                    "loss": float(outputs["loss"]),
                }
            )
            marks["last"] = now

        def on_train_epoch_end(self, trainer, pl_module):
            marks["end"], marks["cpu_end"] = time.perf_counter(), time.process_time()

    trainer_kw = {k: v for k, v in trainer_kw.items() if k not in ("log_every_n_steps", "num_sanity_val_steps")}
    trainer = L.Trainer(
        **{**trainer_kw, "max_epochs": 1},
        max_steps=spec["max_steps"] or -1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        limit_val_batches=0,
        callbacks=[Timer()],
    )
    trainer.fit(module, datamodule=dm)
    torch.save(
        {n: p.detach().clone() for n, p in module.model.named_parameters() if p.requires_grad}, spec["params_out"]
    )
    n_micro = len(dm.train_dataloader())
    res = {
        "epoch_s": round(marks["end"] - marks["start"], 3),
        "epoch_cpu_s": round(marks["cpu_end"] - marks["cpu_start"], 3),
        "steps_run": len(steps),
        "steps_per_epoch": n_micro,
        "steps": [{k: round(v, 4) if isinstance(v, float) else v for k, v in s.items()} for s in steps],
    }
    if len(steps) < n_micro:  # --max-steps: extrapolate from the measured step kinds (see the module docstring)
        res["epoch_s_measured"] = res.pop("epoch_s")
        res["epoch_s"] = None
    print("RESULT " + json.dumps(res), flush=True)


# ----------------------------------------------------------------------------------------------------- parent side
def _extrapolate(runs: list[dict], skip: bool, all_steps: list[dict]) -> float | None:
    """Epoch seconds from per-step medians: steps with non-zero rows cost the computed-step median; with the skip on,
    all-zero steps cost the empty-step median (no forward), else the computed one."""
    steps = [s for r in runs for s in r["steps"]]
    computed = [s["s"] for s in steps if s["nonzero_rows"] or not skip]
    empty = [s["s"] for s in steps if not s["nonzero_rows"] and skip]
    n_full = sum(1 for s in all_steps if s["nonzero_rows"] or not skip)
    n_empty = len(all_steps) - n_full
    if not computed or (n_empty and not empty):
        return None
    return statistics.median(computed) * n_full + (statistics.median(empty) * n_empty if n_empty else 0.0)


def main(argv: list[str] | None = None) -> dict:
    from train_throughput import machine_info, run_child

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--child", help=argparse.SUPPRESS)
    p.add_argument("--records", default=str(DEMO_RECORDS), help="the demo's simulate/conversations.jsonl")
    p.add_argument("--repeats", type=int, default=2, help="pairs of runs; the order alternates (on,off / off,on)")
    p.add_argument("--first", default="on", choices=["on", "off"], help="the variant that runs first")
    p.add_argument(
        "--max-steps",
        type=int,
        default=None,
        help="train this many micro-batches per run and extrapolate the epoch (default: the full epoch)",
    )
    p.add_argument(
        "--lora-dropout",
        type=float,
        default=None,
        help="default: the preset's (0.05); 0 makes the two variants' parameters agree exactly",
    )
    p.add_argument("--threads", type=int, default=1, help="torch threads per run (1 on a shared 2-core machine)")
    p.add_argument("--timeout", type=float, default=600)
    p.add_argument("--tag", default="demo")
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "skip_zero_weight.json"))
    args = p.parse_args(argv)
    if args.child:
        child_main(json.loads(args.child))
        return {}
    model_kw, _, _ = _configs()
    dropout = model_kw["lora_dropout"] if args.lora_dropout is None else args.lora_dropout
    records = [json.loads(ln) for ln in open(args.records)]
    tmp = Path(tempfile.mkdtemp(prefix="skip-bench-"))
    load_start, t_start = open("/proc/loadavg").read().split()[:3], time.time()
    runs: dict[str, list[dict]] = {"on": [], "off": []}
    for rep in range(args.repeats):
        order = ("on", "off") if args.first == "on" else ("off", "on")
        for name in order if rep % 2 == 0 else order[::-1]:
            spec = {
                "records": str(Path(args.records).resolve()),
                "skip": name == "on",
                "threads": args.threads,
                "max_steps": args.max_steps,
                "lora_dropout": dropout,
                "params_out": str(tmp / f"{name}{rep}.pt"),
            }
            res = run_child(spec, args.timeout, script=__file__)
            res["loadavg"] = open("/proc/loadavg").read().split()[:3]
            runs[name].append(res)
            shown = res["epoch_s"] if res["epoch_s"] is not None else f"{res['epoch_s_measured']} (partial)"
            print(
                f"[rep {rep}] skip {name:<3} epoch {shown} s  {res['steps_run']} steps  load {res['loadavg']}",
                flush=True,
            )

    import torch

    a, b = torch.load(tmp / "on0.pt"), torch.load(tmp / "off0.pt")
    max_diff = max((a[n] - b[n]).abs().max().item() for n in a)
    max_param = max(b[n].abs().max().item() for n in b if "lora_B" in n)
    all_steps = runs["off"][0]["steps"]
    summary = {}
    for name, rs in runs.items():
        full = [r["epoch_s"] for r in rs if r["epoch_s"] is not None]
        epoch = statistics.median(full) if len(full) == len(rs) else _extrapolate(rs, name == "on", all_steps)
        summary[name] = {
            "epoch_s": round(epoch, 2) if epoch is not None else None,
            "epoch_s_all": [r["epoch_s"] if r["epoch_s"] is not None else r["epoch_s_measured"] for r in rs],
            "extrapolated": len(full) != len(rs),
            "epoch_cpu_s": (
                round(statistics.median(r["epoch_cpu_s"] for r in rs), 2)
                if len(full) == len(rs) and "epoch_cpu_s" in rs[0]
                else None
            ),
            "rows_computed": sum(s["nonzero_rows"] if name == "on" else s["rows"] for s in rs[0]["steps"]),
            "rows": sum(s["rows"] for s in rs[0]["steps"]),
        }
    on, off = summary["on"]["epoch_s"], summary["off"]["epoch_s"]
    nonzero = sum(1 for r in records if r.get("reward"))
    steps_with_rows = sum(1 for s in all_steps if s["nonzero_rows"])
    report = {
        "command": "python benchmarks/skip_zero_weight.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "records": args.records,
        "n_records": len(records),
        "nonzero_weight_records": nonzero,
        "micro_batches": len(all_steps),
        "micro_batches_with_nonzero_rows": steps_with_rows,
        "lora_dropout": dropout,
        "threads": args.threads,
        "repeats": args.repeats,
        "first": args.first,
        "configs": [
            str(MODEL_CONFIG.relative_to(ROOT)),
            str(TRAINER_CONFIG.relative_to(ROOT)),
            "configs/objective/refit.yaml",
        ],
        "results": summary,
        "time_ratio_on_over_off": round(on / off, 3) if on and off else None,
        "cpu_time_ratio_on_over_off": (
            round(summary["on"]["epoch_cpu_s"] / summary["off"]["epoch_cpu_s"], 3)
            if summary["on"]["epoch_cpu_s"] and summary["off"]["epoch_cpu_s"]
            else None
        ),
        "nonzero_fraction_rows": round(nonzero / len(records), 3),
        "nonzero_fraction_micro_batches": round(steps_with_rows / len(all_steps), 3),
        "lora_max_abs_diff_on_vs_off": max_diff,
        "lora_B_max_abs": max_param,
        "step_losses": {
            "on": [s["loss"] for s in runs["on"][0]["steps"]],
            "off": [s["loss"] for s in runs["off"][0]["steps"]],
        },
        "machine": {
            **machine_info(args.threads),
            "loadavg_start": load_start,
            "loadavg_end": open("/proc/loadavg").read().split()[:3],
        },
        "wall_s": round(time.time() - t_start, 1),
        "runs": runs,
        "notes": (
            "medians over interleaved runs (subprocess each, order alternating) on a machine shared with other "
            "jobs: compare on/off only as the ratio of this run"
        ),
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    existing = json.loads(out.read_text()) if out.exists() else {}
    existing[args.tag] = report
    out.write_text(json.dumps(existing, indent=1) + "\n")
    print(
        f"\nskip on {on} s, off {off} s per epoch (ratio {report['time_ratio_on_over_off']}); non-zero rows "
        f"{nonzero}/{len(records)}, micro-batches with a non-zero row {steps_with_rows}/{len(all_steps)}; "
        f"LoRA max |on - off| {max_diff:.3g} (max |B| {max_param:.3g}); load {load_start} -> "
        f"{report['machine']['loadavg_end']}\n-> {out}"
    )
    return report


if __name__ == "__main__":
    main()
