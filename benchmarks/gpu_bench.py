"""GPU check, the measurements (issue 16 §5): a Refit step, a DPO step and a greedy rollout batch on random-weight
models of the real architectures — SmolLM2-135M and Llama-3.1-8B (``clarify_lit.models.random_model``, built directly
on the GPU: no weights downloaded, no CPU copy) — in bf16 with LoRA, against TRL's weighted SFTTrainer and its
DPOTrainer on the same shapes (``train_throughput.py``'s variants, reused). Writes ``benchmarks/results/gpu.json``:
the date, the GPU, the library versions, and per measurement tokens/s, step ms and peak GPU memory
(``torch.cuda.max_memory_allocated``). ``benchmarks/gpu_check.sh`` runs the GPU tests, then this.

    python benchmarks/gpu_bench.py                  # on a CUDA GPU: everything (~4-5 min on an H200)
    python benchmarks/gpu_bench.py --cpu_smoke      # no GPU: the same code path, tiny architecture, in-process
    python benchmarks/gpu_bench.py --archs smollm2-135m --variants ours_refit rollout

Without a CUDA GPU (and without ``--cpu_smoke``) it prints one line and exits 0.

What is measured (per architecture; every measurement in its own subprocess, so its peak memory is its own):

* ``ours_refit`` / ``ours_dpo``: ``ClarifyModule`` + ``Refit`` / ``DPO(pairs=final_answer)`` through Lightning,
  ``trl_sft_weighted`` / ``trl_dpo``: TRL on the same records (see ``train_throughput.py``). LoRA as the SmolLM2
  preset (``configs/model/smollm2-135m.yaml``: r 16, alpha 32, every projection) for both architectures (the 8B preset
  trains all weights, which TRL's comparison does not need), weights in bf16, ``bf16-mixed``, batch 4, no gradient
  checkpointing, ``--warmup`` untimed then ``--steps`` timed optimizer steps (GPU synchronised at each step end).
  Tokens/s counts trained tokens (labels ≠ −100).
* ``rollout``: ``rollout_tasks`` with the batched engine, greedy, one batch of ``--rollout_batch`` questions (the
  reasoning setting, scripted teacher), ``--turns`` assistant turns of exactly ``--new_tokens`` tokens each
  (``min_new_tokens`` = ``max_new_tokens``: a random model's turns would end at random). LM-head rows of ids the
  tokenizer cannot decode are zeroed (same compute), so the text round-trips as a real model's would. Also one plain
  decode step (``model(next_token, past_key_values=cache)``) at that batch over a ``--decode_context``-token cache,
  next to the weights' bytes over the measured copy bandwidth (its lower bound).
* ``device``: a bf16 matrix product's rate and a device-to-device copy's bandwidth, measured first (the ceilings).

Tokenizer: ``.whl/smollm2-tokenizer`` if present (``bash benchmarks/gpu_check.sh prepare`` saves the embedded
SmolLM2 tokenizer there, and the GPU run carries it), else the tiny test tokenizer (byte-level, ~2.8× more tokens
per conversation). Either way the token ids are valid in both vocabularies; ``settings.tokens_per_conversation`` says
which lengths were trained. Same-work checks (ours vs TRL on the same first batch, DPO at log 2) are reported, not
enforced: in bf16 the two frameworks' kernels round differently.
"""

from __future__ import annotations

import argparse
import datetime as dt
import gc
import importlib.util
import json
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

import train_throughput as tt  # noqa: E402

ARCHS = ["smollm2-135m", "llama-3.1-8b"]
TRAIN_VARIANTS = ["ours_refit", "trl_sft_weighted", "ours_dpo", "trl_dpo"]
VARIANTS = [*TRAIN_VARIANTS, "rollout"]
LORA = tt.PRESETS["embedded:smollm2-135m-instruct"]  # configs/model/smollm2-135m.yaml
TINY_LORA = tt.PRESETS["tiny-random"]  # configs/model/tiny.yaml
PAIRS = [("ours_refit", "trl_sft_weighted"), ("ours_dpo", "trl_dpo")]
SMOLLM2_TOKENIZER = ROOT / ".whl" / "smollm2-tokenizer"
DEFAULT_OUT = ROOT / "benchmarks" / "results" / "gpu.json"
NO_GPU = (
    "gpu_bench: no CUDA GPU here (torch.cuda.is_available() is false): nothing measured "
    "(--cpu_smoke runs the code path on the CPU)"
)


# ------------------------------------------------------------------------------------------------------ child side
def _decodable_only(model, n_tokens: int) -> None:
    """Zero the LM-head rows of the ids ≥ ``n_tokens`` (the tokenizer cannot decode them): their logit is 0, below
    the arg-max of the random logits of the decodable ids. The compute is unchanged."""
    import torch

    with torch.no_grad():
        model.get_output_embeddings().weight[n_tokens:].zero_()


def decode_step_ms(model, batch: int, context: int, steps: int, vocab: int) -> float:
    """Median time of one plain decode step, ``model(next_token, past_key_values=cache)``, at ``batch`` rows over a
    ``context``-token cache (prefilled with random ids < ``vocab``), GPU synchronised around each step."""
    import torch

    dev = next(model.parameters()).device
    ids = torch.randint(3, vocab, (batch, context), device=dev, generator=None)
    times = []
    with torch.no_grad():
        out = model(input_ids=ids, use_cache=True, logits_to_keep=1)
        cache, nxt = out.past_key_values, out.logits[:, -1:].argmax(-1)
        for _ in range(steps + 2):  # 2 warm-up steps
            tt._sync()
            t0 = time.perf_counter()
            out = model(input_ids=nxt, past_key_values=cache, use_cache=True)
            cache, nxt = out.past_key_values, out.logits[:, -1:].argmax(-1)
            tt._sync()
            times.append(time.perf_counter() - t0)
    return round(statistics.median(times[2:]) * 1000, 3)


def run_rollout(spec: dict) -> dict:
    """One greedy rollout batch through ``rollout_tasks`` (after a 1-turn warm-up), then one plain decode step."""
    from dataclasses import replace

    from rollout_throughput import make_tasks

    from clarify_lit.models import load_causal_lm, load_tokenizer
    from clarify_lit.simulate.engine import GenerationEngine
    from clarify_lit.simulate.rollout import RolloutSpec, rollout_tasks

    tok = load_tokenizer(spec.get("tokenizer") or spec["model"])
    with tt._device(spec):
        model = load_causal_lm(spec["model"], spec["dtype"])
    _decodable_only(model, len(tok))
    b, turns, new = spec["batch_size"], spec["turns"], spec["new_tokens"]
    tasks = make_tasks(b)
    rspec = RolloutSpec(
        setting="reasoning",
        mode="thinking",
        n_turns=turns,
        temperatures=[0.0],
        max_new_tokens=new,
        batch_size=b,
        seed=0,
    )
    warm = GenerationEngine(model, tok, batch_size=b, max_new_tokens=4, min_new_tokens=4)
    rollout_tasks(model, tok, tasks, replace(rspec, n_turns=1, max_new_tokens=4), engine=warm)
    engine = GenerationEngine(model, tok, batch_size=b, max_new_tokens=new, min_new_tokens=new)
    tt._sync()
    t0 = time.perf_counter()
    records = rollout_tasks(model, tok, tasks, rspec, engine=engine)
    tt._sync()
    seconds = time.perf_counter() - t0
    st = engine.stats
    return {
        "conversations": len(records),
        "turns": turns,
        "new_tokens_per_turn": new,
        "batch_size": b,
        "seconds": round(seconds, 4),
        "conversations_per_s": round(len(records) / seconds, 3),
        "new_tokens": st.new_tokens,
        "tokens_per_s": round(st.new_tokens / seconds, 1),
        "ms_per_decode_step": round(seconds * 1000 / (turns * new), 3),  # the whole rollout, prefills included
        "generate_calls": st.calls,
        "prompt_tokens": st.prompt_tokens,
        "reused_prompt_tokens": st.reused_tokens,
        "reuse_misses": st.reuse_misses,
        "decode_step_ms": decode_step_ms(model, b, spec["decode_context"], spec["decode_steps"], len(tok)),
        "decode_context": spec["decode_context"],
        "weight_bytes": sum(p.numel() * p.element_size() for p in model.parameters()),
    }


def child(spec: dict) -> dict:
    """One measurement: ``train_throughput.run_ours``/``run_trl`` or :func:`run_rollout`, plus peak memory."""
    import torch

    torch.set_num_threads(spec["threads"])
    torch.manual_seed(0)
    gpu = spec["accelerator"] == "gpu"
    if gpu:
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    v = spec["variant"]
    res = run_rollout(spec) if v == "rollout" else tt.run_ours(spec) if v.startswith("ours") else tt.run_trl(spec)
    res["child_wall_s"] = round(time.perf_counter() - t0, 2)
    if "s_per_step" in res:
        res["step_ms"] = round(res["s_per_step"] * 1000, 2)
    res["peak_gpu_mem_gb"] = round(torch.cuda.max_memory_allocated() / 2**30, 3) if gpu else None
    res["peak_gpu_reserved_gb"] = round(torch.cuda.max_memory_reserved() / 2**30, 3) if gpu else None
    res["peak_rss_mb"] = round(tt._rss_mb(), 1)
    return res


# ----------------------------------------------------------------------------------------------------- parent side
def device_ceilings(gpu: bool) -> dict:
    """bf16 matrix-product rate (mean of 10 after 3 warm-ups) and device-to-device copy bandwidth (read + write)."""
    import torch

    dev = torch.device("cuda" if gpu else "cpu")
    n, nbytes = (8192, 2**31) if gpu else (256, 2**24)
    a = torch.randn(n, n, device=dev, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=dev, dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    tt._sync()
    t0 = time.perf_counter()
    for _ in range(10):
        a @ b
    tt._sync()
    tflops = 2 * n**3 * 10 / (time.perf_counter() - t0) / 1e12
    x = torch.empty(nbytes, dtype=torch.uint8, device=dev)
    y = torch.empty_like(x)
    y.copy_(x)
    tt._sync()
    t0 = time.perf_counter()
    for _ in range(10):
        y.copy_(x)
    tt._sync()
    gbps = 2 * nbytes * 10 / (time.perf_counter() - t0) / 1e9
    del a, b, x, y
    if gpu:
        torch.cuda.empty_cache()
    return {
        "bf16_matmul_tflops": round(tflops, 1),
        "matmul_n": n,
        "copy_gb_per_s_read_plus_write": round(gbps, 1),
        "copy_bytes": nbytes,
    }


def environment(gpu: bool) -> dict:
    import importlib.metadata as md

    import torch

    versions = {}
    for pkg in ("torch", "transformers", "peft", "lightning", "trl", "accelerate", "datasets"):
        try:
            versions[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            versions[pkg] = None
    env = {
        "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "gpu": torch.cuda.get_device_name(0) if gpu else "none (--cpu_smoke)",
        "versions": versions,
        "cuda": torch.version.cuda,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpu_count": os.cpu_count(),
    }
    if gpu:
        props = torch.cuda.get_device_properties(0)
        env.update(
            gpu_memory_gb=round(props.total_memory / 2**30, 1),
            gpu_capability=f"{props.major}.{props.minor}",
            gpu_multiprocessors=props.multi_processor_count,
        )
    return env


def pick_tokenizer(choice: str, arch_vocab: int) -> str | None:
    """The records' tokenizer: ``auto`` = the saved SmolLM2 tokenizer if present and its ids fit the vocabulary,
    else ``None`` (the model's own: the tiny tokenizer of ``random:`` models); or a path."""
    if choice == "auto":
        if not (SMOLLM2_TOKENIZER / "tokenizer.json").is_file():
            return None
        choice = str(SMOLLM2_TOKENIZER)
    if choice in ("", "model"):
        return None
    from clarify_lit.models import load_tokenizer

    return choice if len(load_tokenizer(choice)) <= arch_vocab else None


def tokens_per_conversation(records: Path, tokenizer: str) -> dict:
    from clarify_lit.models import load_tokenizer

    tok = load_tokenizer(tokenizer)
    lengths = []
    with open(records) as fh:
        for line in fh:
            text = tok.apply_chat_template(json.loads(line)["messages"], tokenize=False)
            lengths.append(len(tok(text, add_special_tokens=False)["input_ids"]))
    return {
        "tokenizer": tokenizer,
        "vocab": len(tok),
        "min": min(lengths),
        "mean": round(statistics.mean(lengths), 1),
        "max": max(lengths),
    }


def plan(archs: list[str], variants: list[str]) -> list[tuple[str, str]]:
    """Ours and the rollouts of every architecture first, then TRL's: if the time runs out, TRL is what is missing."""
    ours = [(a, v) for a in archs for v in variants if not v.startswith("trl")]
    return ours + [(a, v) for a in archs for v in variants if v.startswith("trl")]


def summarise(arch_results: dict) -> tuple[dict, dict]:
    """``(ratios ours/TRL, same-work checks)`` of one architecture's finished measurements."""
    ok = {v: r for v, r in arch_results.items() if "error" not in r and "skipped" not in r}
    ratios = {}
    for ours, trl in PAIRS:
        if ours in ok and trl in ok:
            a, b = ok[ours], ok[trl]
            ratios[f"{ours}_vs_{trl}"] = {
                "tokens_per_s": round(a["tokens_per_s"] / b["tokens_per_s"], 3),
                "peak_gpu_mem": (
                    round(a["peak_gpu_mem_gb"] / b["peak_gpu_mem_gb"], 3)
                    if a.get("peak_gpu_mem_gb") and b.get("peak_gpu_mem_gb")
                    else None
                ),
            }
    try:
        values, failures = tt.checks({"lora": {v: r for v, r in ok.items() if v != "rollout"}}, "lora")
    except (KeyError, TypeError) as e:  # a measurement without the check fields
        values, failures = {}, [f"checks not computed: {e!r}"]
    return ratios, {"values": values, "not_within_tolerance": failures}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--child", help=argparse.SUPPRESS)
    p.add_argument(
        "--cpu_smoke",
        action="store_true",
        help="run the whole code path on the CPU: tiny architecture, tiny batches, in-process (seconds)",
    )
    p.add_argument("--archs", nargs="+", default=None, choices=[*ARCHS, "tiny"])
    p.add_argument("--variants", nargs="+", default=VARIANTS, choices=VARIANTS)
    p.add_argument("--batch_size", type=int, default=None, help="training batch (default 4; smoke 2)")
    p.add_argument("--warmup", type=int, default=None, help="untimed optimizer steps (default 2; smoke 1)")
    p.add_argument("--steps", type=int, default=None, help="timed optimizer steps (default 5; smoke 1)")
    p.add_argument("--n_conversations", type=int, default=None, help="records (default 96; smoke 24)")
    p.add_argument("--max_length", type=int, default=1024)
    p.add_argument("--rollout_batch", type=int, default=None, help="questions in the rollout batch (default 50)")
    p.add_argument("--turns", type=int, default=3)
    p.add_argument("--new_tokens", type=int, default=None, help="tokens per assistant turn (default 40; smoke 4)")
    p.add_argument("--decode_context", type=int, default=None, help="cache length of the decode step (default 300)")
    p.add_argument("--tokenizer", default="auto", help="auto | model | a tokenizer folder (see the module doc)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads per measurement (default 4; smoke 1)")
    p.add_argument(
        "--isolation",
        choices=["subprocess", "in_process"],
        default=None,
        help="one subprocess per measurement (default on a GPU) or all in this process (smoke default)",
    )
    p.add_argument("--deadline", type=float, default=None, help="epoch seconds: start nothing that cannot end before")
    p.add_argument("--budget_s", type=float, default=480, help="without --deadline: seconds from now")
    p.add_argument("--child_timeout", type=float, default=240, help="seconds per measurement at most")
    p.add_argument("--pytest_log", default=None, help="the GPU tests' log (gpu_check.sh): its summary goes in")
    p.add_argument("--pytest_exit", type=int, default=None)
    p.add_argument("--out", default=None, help=f"JSON (default {DEFAULT_OUT.relative_to(ROOT)}; smoke: a temp file)")
    args = p.parse_args(argv)
    if args.child:
        res = child(json.loads(args.child))
        print("RESULT " + json.dumps(res), flush=True)
        return 0

    import torch

    smoke = args.cpu_smoke
    gpu = not smoke
    if gpu and not torch.cuda.is_available():
        print(NO_GPU)
        return 0
    t_start = time.time()
    deadline = args.deadline or (t_start + args.budget_s)
    archs = args.archs or (["tiny"] if smoke else ARCHS)
    isolation = args.isolation or ("in_process" if smoke else "subprocess")

    def d(smoke_value, gpu_value):  # a default: the smoke's or the GPU's
        return smoke_value if smoke else gpu_value

    batch_size = args.batch_size or d(2, 4)
    warmup = args.warmup if args.warmup is not None else d(1, 2)
    steps = args.steps or d(1, 5)
    n_conv = args.n_conversations or d(24, 96)
    rollout_batch = args.rollout_batch or d(4, 50)
    new_tokens = args.new_tokens or d(4, 40)
    decode_context = args.decode_context or d(16, 300)
    threads = args.threads or d(1, 4)
    out = (
        Path(args.out)
        if args.out
        else (Path(tempfile.mkdtemp(prefix="gpu-bench-smoke-")) / "gpu.json" if smoke else DEFAULT_OUT)
    )

    from bench_data import write_records

    from clarify_lit.models import ARCHITECTURES, TINY_RANDOM

    records = write_records(Path(tempfile.mkdtemp(prefix="gpu-bench-")) / "records.jsonl", n_conv)
    tokenizers = {a: pick_tokenizer(args.tokenizer, ARCHITECTURES[a]["vocab_size"]) for a in archs}
    have_trl = importlib.util.find_spec("trl") is not None
    report = {
        **environment(gpu),
        "command": "python benchmarks/gpu_bench.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "settings": {
            "archs": archs,
            "dtype": "bfloat16",
            "precision": "bf16-mixed",
            "finetune": "lora",
            "lora": {a: (TINY_LORA if a == "tiny" else LORA) for a in archs},
            "batch_size": batch_size,
            "warmup_steps": warmup,
            "timed_steps": steps,
            "n_conversations": n_conv,
            "max_length": args.max_length,
            "gradient_checkpointing": False,
            "rollout_batch": rollout_batch,
            "turns": args.turns,
            "new_tokens_per_turn": new_tokens,
            "decode_context": decode_context,
            "isolation": isolation,
            "torch_threads": threads,
            "tokens_per_conversation": {
                a: tokens_per_conversation(records, tokenizers[a] or TINY_RANDOM) for a in archs
            },
        },
        "tests": None,
        "device": None,
        "results": {a: {} for a in archs},
        "ratios_ours_over_trl": {},
        "same_work_checks": {},
        "wall_s": None,
    }
    if args.pytest_log:
        log_lines = [ln.strip() for ln in Path(args.pytest_log).read_text(errors="replace").splitlines() if ln.strip()]
        report["tests"] = {"exit_code": args.pytest_exit, "summary": log_lines[-1] if log_lines else None}

    def save() -> None:
        report["wall_s"] = round(time.time() - t_start, 1)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(report, indent=1) + "\n")

    try:
        report["device"] = device_ceilings(gpu)
    except Exception as e:  # the ceilings are context, never a reason to measure nothing
        report["device"] = {"error": repr(e)}
    print(f"gpu_bench: {report['gpu']}, torch {report['versions']['torch']}, device {report['device']}", flush=True)
    save()
    for arch, variant in plan(archs, args.variants):
        left = deadline - time.time()
        if variant.startswith("trl") and not have_trl:
            res = {"skipped": "trl is not importable (carry its wheel: benchmarks/gpu_check.sh prepare)"}
        elif left < (20 if smoke else 45):
            res = {"skipped": f"time budget: {left:.0f} s left"}
        else:
            spec = {
                "variant": variant,
                "finetune": "lora",
                "model": f"random:{arch}",
                "tokenizer": tokenizers[arch],
                "records": str(records),
                "batch_size": rollout_batch if variant == "rollout" else batch_size,
                "max_length": args.max_length,
                "precision": "bf16-mixed",
                "dtype": "bfloat16",
                "gradient_checkpointing": False,
                "warmup": warmup,
                "steps": steps,
                "threads": threads,
                "accelerator": "gpu" if gpu else "cpu",
                "lora": TINY_LORA if arch == "tiny" else LORA,
                "turns": args.turns,
                "new_tokens": new_tokens,
                "decode_context": decode_context,
                "decode_steps": d(3, 10),
            }
            try:
                if isolation == "subprocess":
                    res = tt.run_child(spec, timeout=min(args.child_timeout, left - 5), script=__file__)
                else:
                    res = child(spec)
            except Exception as e:  # one failed measurement must not cost the others
                res = {"error": (str(e) or repr(e))[-4000:], "traceback": traceback.format_exc()[-4000:]}
            finally:
                gc.collect()
                if gpu:
                    torch.cuda.empty_cache()
        report["results"][arch][variant] = res
        if "error" in res or "skipped" in res:
            why = [ln for ln in (res.get("error") or res.get("skipped")).splitlines() if ln.strip()][-4:]
            print(
                f"{arch:<13} {variant:<17} {'ERROR' if 'error' in res else 'skipped'}: "
                + "\n    ".join(ln[:300] for ln in why),
                flush=True,
            )
        else:
            mem = f"{res['peak_gpu_mem_gb']:.2f} GB" if res.get("peak_gpu_mem_gb") is not None else "n/a (CPU)"
            speed = (
                f"{res['tokens_per_s']:>10.1f} tok/s  {res['step_ms']:>8.1f} ms/step"
                if variant != "rollout"
                else f"{res['tokens_per_s']:>10.1f} new tok/s  {res['ms_per_decode_step']:.1f} ms/turn token, "
                f"decode step {res['decode_step_ms']:.2f} ms"
            )
            print(f"{arch:<13} {variant:<17} {speed}  peak GPU {mem}  ({res['child_wall_s']:.0f} s)", flush=True)
        ratios, checks = summarise(report["results"][arch])
        report["ratios_ours_over_trl"][arch], report["same_work_checks"][arch] = ratios, checks
        save()
    bw = (report["device"] or {}).get("copy_gb_per_s_read_plus_write")
    for arch in archs:  # the decode step's lower bound: every weight read once at the measured copy bandwidth
        roll = report["results"][arch].get("rollout", {})
        if bw and "weight_bytes" in roll:
            roll["decode_step_bound_ms"] = round(roll["weight_bytes"] / (bw * 1e9) * 1000, 3)
    save()
    shutil.rmtree(records.parent, ignore_errors=True)
    print(f"gpu_bench: ratios ours/TRL {json.dumps(report['ratios_ours_over_trl'])}\n-> {out}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
