"""Training throughput and peak memory: our Refit and DPO steps vs TRL's SFTTrainer (with per-sample weights) and
DPOTrainer, on the same records, model, batch size, precision and LoRA/full settings.

    python benchmarks/train_throughput.py                                          # tiny random model, ~1.5 min
    python benchmarks/train_throughput.py --model embedded:smollm2-135m-instruct   # SmolLM2-135M, ~11 min
    python benchmarks/train_throughput.py --model embedded:smollm2-135m-instruct --gradient-checkpointing \
        --finetune lora --variants ours_refit trl_sft_weighted ours_dpo ours_dpo_precomputed trl_dpo      # ~6 min
    python benchmarks/train_throughput.py --accelerator gpu    # Lightning and TRL on a CUDA GPU (see gpu_bench.py)
    python benchmarks/train_throughput.py --model embedded:smollm2-135m-instruct --finetune lora \
        --variants ours_refit ours_dpo --warmup 1 --steps 2 --profile    # where the time goes (~5 min under load)

Our variants also report model FLOPs utilisation (``mfu``): the timed steps' matmul FLOPs (formula in
``benchmarks/mfu.py``) per wall second and per CPU second, over a ``torch.matmul`` peak measured in the same child
after training, in the dtype the step's matmuls ran in (bf16 under ``bf16-mixed``, fp32 under ``32-true``). A figure
above 100 % is refused (``mfu.MFUError``): the child reports the error instead of the figure, the parent prints it
and the run exits non-zero after writing the JSON, like a failed same-work check. ``--profile`` runs our variants
under ``torch.profiler`` and writes the CPU time per part
(attention, base linears, LoRA adapters, LM head, optimizer, data; ``profile``) and what a training forward keeps for
backward per part (``saved_activations``), under the key ``"<model> <precision> profile"``.

(times on a 2-core machine shared with other jobs, load ~3). Results are merged into
``benchmarks/results/train_throughput.json`` under ``"<model> <precision>[ gc]"``.

Every (fine-tuning mode, variant, repeat) runs in its own subprocess, so peak RSS (``resource.getrusage`` in the child,
``ru_maxrss``) is that variant's alone; the variants are interleaved (the order alternates between repeats) because
other jobs share the machine. Each child trains ``--warmup`` + ``--steps`` optimizer steps; the timed window is the
``--steps`` steps after the warm-up (forward, backward, optimizer step, data loading and logging, from the end of the
last warm-up step to the end of the last timed step). Tokens/s counts the trained tokens (labels ≠ −100) of the timed
batches as each framework built them; ``input_tokens_per_s`` counts all non-padding tokens.

Variants (same LoRA config / full fine-tuning, same batch size, same precision, gradient checkpointing as set):

* ``ours_refit``: ``ClarifyModule`` + ``Refit`` (reward-weighted NLL) through Lightning's ``Trainer``.
* ``trl_sft_weighted``: TRL ``SFTTrainer`` with a weight column, added the simplest way (subclass ``compute_loss``,
  keep TRL's own fused LM-head forward, multiply each sequence's log-prob sum by its weight; a collator subclass passes
  the weights). It gets our tokenized ``input_ids``/``labels`` (assistant-only labels: the ChatML template has no
  ``{% generation %}`` markers, so TRL's ``assistant_only_loss`` cannot build them) — the same tokens, the same work.
* ``ours_refit_pre28``: the same step before issue 28's memory savers (LM-head logits kept for backward, 1024-row
  head chunks, LoRA dropout keeping its fp32 noise tensor): the savers' ablation (LoRA only).
* ``ours_dpo``: ``DPO(pairs=final_answer)``, reference ``auto`` (LoRA: adapter disabled; full: frozen copy), pairs
  packed with their shared prompt (``data.share_pair_prefix``, the default: the prompt is computed once per pair).
* ``ours_dpo_stacked``: the same with ``share_pair_prefix=false`` (chosen and rejected as two rows, as TRL does): the
  packing ablation (LoRA only).
* ``ours_dpo_precomputed``: packed, reference log-probs precomputed at fit start (not in the timed window;
  ``setup_s`` reports it; the on-disk reference cache is off so every run computes them).
* ``trl_dpo``: TRL ``DPOTrainer`` with its defaults for the reference (LoRA: adapter disabled; full: a second model
  loaded from the same folder) on the same prompt/chosen/rejected pairs, tokenized by TRL.

Settings: the repo's presets (``configs/model/{tiny,smollm2-135m}.yaml`` LoRA ranks/targets), AdamW, constant
lr, gradient clipping 1.0, bf16 autocast on fp32 weights, batch size 4, gradient checkpointing off unless
``--gradient-checkpointing`` (TRL's own default is on; the flag sets it for every variant). DPO runs without LoRA
dropout on both sides (TRL's ``disable_dropout=True`` default); Refit and the weighted SFTTrainer keep
``lora_dropout=0.05``. Ours pads batches to a multiple of 16 (its default), TRL does not pad extra. Both frameworks
shuffle with ``torch.randperm`` seeded 0, so they see the same batches in the same order (their step losses match).
``tokens_per_cpu_s`` divides by the process CPU time of the timed steps (one torch thread by default): it is much
less sensitive than wall time to other jobs on the machine. Peak RSS varies by up to ~20 % between identical runs
(malloc), so read small RSS differences as noise.

Same-work checks (the run fails after writing the JSON if one does not hold): in each child, before training and in
fp32, the loss of the framework's own code on the first ``batch_size`` examples — Refit vs the weighted SFTTrainer,
with weights 1 and with the real weights, must agree to 1e-4; both sides must have tokenized the same sequences
(same token counts; TRL's DPO completions also hold the ``\n`` after ``<|im_end|>``, one more trained token per
sequence); the first DPO training step must be log 2 (policy == reference) to 1e-4, or to 1e-2 for a precomputed
reference (computed in other batches, which bf16 rounds differently).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from mfu import (  # noqa: E402
    MFUError,
    batch_shape,
    breakdown,
    matmul_dtype,
    matmul_peak,
    model_shapes,
    profile_scopes,
    saved_activation_bytes,
    step_flops,
    utilisation,
)
from stamp import loadavg, machine_stamp  # noqa: E402

VARIANTS = [
    "ours_refit",
    "trl_sft_weighted",
    "ours_dpo",
    "ours_dpo_stacked",
    "ours_dpo_precomputed",
    "trl_dpo",
    "ours_refit_pre28",
]
# ablations, measured with LoRA only to keep the run short: packing off; the step before issue 28's memory savers
LORA_ONLY = {"ours_dpo_stacked", "ours_refit_pre28"}
PAIRS = [
    ("ours_refit", "trl_sft_weighted"),
    ("ours_dpo", "trl_dpo"),
    ("ours_dpo_precomputed", "trl_dpo"),
    ("ours_dpo_stacked", "trl_dpo"),
    ("ours_refit_pre28", "trl_sft_weighted"),
]
#: ClarifyModule arguments of an ablation variant (on top of --module-args)
VARIANT_MODULE_ARGS = {
    "ours_refit_pre28": {"lm_head_recompute": False, "lora_dropout_bitmask": False, "logprob_chunk_size": 1024}
}
PRESETS = {  # the repo's model presets (configs/model/*.yaml)
    "tiny-random": {"lora_r": 4, "lora_alpha": 8, "lora_target_modules": ["q_proj", "v_proj"]},
    "embedded:smollm2-135m-instruct": {
        "lora_r": 16,
        "lora_alpha": 32,
        "lora_target_modules": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
    },
}
LORA_DROPOUT = 0.05
LR = 2e-4
BETA = 0.1


# ------------------------------------------------------------------------------------------------------ child side
def _rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


class _Steps:
    """Step-end timestamps and token counts of the batches, in order."""

    def __init__(self):
        self.t_end: list[float] = []
        self.cpu_end: list[float] = []
        self.trained: list[int] = []
        self.inputs: list[int] = []
        self.losses: list[float] = []

    def summary(self, warmup: int, steps: int) -> dict:
        if len(self.t_end) < warmup + steps:
            raise RuntimeError(f"only {len(self.t_end)} steps ran, need {warmup + steps}")
        seconds = self.t_end[warmup + steps - 1] - self.t_end[warmup - 1]
        cpu = self.cpu_end[warmup + steps - 1] - self.cpu_end[warmup - 1]
        trained = sum(self.trained[warmup : warmup + steps])
        inputs = sum(self.inputs[warmup : warmup + steps])
        return {
            "timed_steps": steps,
            "seconds": round(seconds, 4),
            "s_per_step": round(seconds / steps, 4),
            "cpu_s_per_step": round(cpu / steps, 4),
            "trained_tokens": trained,
            "input_tokens": inputs,
            "tokens_per_s": round(trained / seconds, 2),
            "input_tokens_per_s": round(inputs / seconds, 2),
            "tokens_per_cpu_s": round(trained / cpu, 2),
            "step_losses": [round(x, 6) for x in self.losses[: warmup + steps]],
        }


def _lora_kwargs(spec: dict) -> dict:
    return spec.get("lora") or PRESETS.get(spec["model"], PRESETS["tiny-random"])


def _device(spec: dict):
    """Where the child builds its model (a ``torch.device`` is also a context manager): the GPU with
    ``accelerator=gpu`` (benchmarks/gpu_bench.py builds random-weight models there directly), else the CPU."""
    import torch

    return torch.device("cuda" if spec.get("accelerator") == "gpu" else "cpu")


def _sync() -> None:
    """Wait for the queued GPU work, so that a step's end time includes its kernels (no-op without CUDA)."""
    import torch

    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()


def _lora_dropout(variant: str) -> float:
    """DPO runs without dropout: TRL's DPOTrainer disables it (``disable_dropout=True``), so ours does too."""
    return 0.0 if "dpo" in variant else LORA_DROPOUT


def _our_data_tokens(samples: list[dict]) -> dict:
    """Tokens of the whole training set as sequences (unpacked), to check that both sides see the same sequences."""
    if "chosen_input_ids" in samples[0]:
        inputs = sum(len(s["chosen_input_ids"]) + len(s["rejected_input_ids"]) for s in samples)
    else:
        inputs = sum(len(s["input_ids"]) for s in samples)
    return {"examples": len(samples), "input": inputs, "trained": sum(s["trained"] for s in samples)}


def _batch_tokens(batch: dict) -> tuple[int, int]:
    """(trained, non-padding) tokens of one of our batches, stacked or packed."""
    if "pair_tokens" in batch:
        return len(batch["pair_tokens"]), int(batch["token_mask"].sum())
    return int((batch["labels"][:, 1:] != -100).sum()), int(batch["attention_mask"].sum())


def _our_objective(variant: str):
    from clarify_lit.train.objectives import DPO, Refit

    if variant.startswith("ours_refit"):
        return Refit()
    # ours_dpo, ours_dpo_stacked, ours_dpo_precomputed
    return DPO(
        beta=BETA, pairs="final_answer", reference="precomputed" if variant == "ours_dpo_precomputed" else "auto"
    )


def _datamodule(spec: dict, objective):
    from clarify_lit.data.datamodule import ConversationDataModule

    dm = ConversationDataModule(
        [spec["records"]],
        val_fraction=0.0,
        tokenizer_name_or_path=spec.get("tokenizer") or spec["model"],
        max_length=spec["max_length"],
        batch_size=spec["batch_size"],
        cache_tokenized=False,
        seed=0,
        objective=objective,
        share_pair_prefix=spec["variant"] != "ours_dpo_stacked",
    )
    dm.setup("fit")
    return dm


def run_ours(spec: dict) -> dict:
    import lightning as L
    import torch

    from clarify_lit.data.datamodule import PadCollator
    from clarify_lit.train.module import ClarifyModule

    variant, lora = spec["variant"], spec["finetune"] == "lora"
    objective = _our_objective(variant)
    lk = _lora_kwargs(spec)
    with _device(spec):
        module = ClarifyModule(
            model_name_or_path=spec["model"],
            objective=objective,
            use_lora=lora,
            lora_r=lk["lora_r"],
            lora_alpha=lk["lora_alpha"],
            lora_dropout=_lora_dropout(variant),
            lora_target_modules=lk["lora_target_modules"],
            learning_rate=LR,
            warmup_ratio=0.0,
            lr_schedule="constant",
            gradient_checkpointing=spec["gradient_checkpointing"],
            export_on_fit_end=False,
            reference_cache=False,
            dtype=spec.get("dtype", "float32"),
            **{**spec.get("module_args", {}), **VARIANT_MODULE_ARGS.get(variant, {})},
        )
    dm = _datamodule(spec, objective)
    out: dict = {"data_tokens": _our_data_tokens(dm.train_set.samples)}
    if variant.startswith("ours_refit"):  # same-batch loss check, fp32, before any update
        batch = PadCollator(dm.tokenizer.pad_token_id)(dm.train_set.samples[: spec["batch_size"]])
        at = next(module.parameters()).device
        batch = {k: (v.to(at) if isinstance(v, torch.Tensor) else v) for k, v in batch.items()}
        with torch.no_grad():
            out["check_loss_real_weights"] = float(module._step(batch, "val")[0])
            batch["weights"] = torch.ones_like(batch["weights"])
            out["check_loss_weights_1"] = float(module._step(batch, "val")[0])
    out["rss_before_train_mb"] = round(_rss_mb(), 1)
    rec = _Steps()
    marks: dict[str, float] = {}
    shapes = model_shapes(module.model)
    step_flop: list[dict] = []  # per step, mfu.step_flops parts
    reference_forward = variant in ("ours_dpo", "ours_dpo_stacked")  # auto reference: a no-grad forward per step
    profiler = _StepProfiler(spec, module.model)

    class Timer(L.Callback):
        def on_fit_start(self, trainer, pl_module):
            marks["fit_start"] = time.perf_counter()

        def on_train_start(self, trainer, pl_module):
            marks["train_start"] = time.perf_counter()

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            _sync()
            rec.t_end.append(time.perf_counter())
            rec.cpu_end.append(time.process_time())
            trained, inputs = _batch_tokens(batch)
            rec.trained.append(trained)
            rec.inputs.append(inputs)
            rec.losses.append(float(outputs["loss"]))
            step_flop.append(step_flops(shapes, *batch_shape(batch), reference_forward=reference_forward))
            profiler.after_step(len(rec.t_end))

    trainer = L.Trainer(
        accelerator=spec.get("accelerator", "cpu"),
        devices=1,
        precision=spec["precision"],
        max_steps=spec["warmup"] + spec["steps"],
        gradient_clip_val=1.0,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        limit_val_batches=0,
        callbacks=[Timer()],
    )
    with profiler:
        trainer.fit(module, datamodule=dm)
    out.update(rec.summary(spec["warmup"], spec["steps"]))
    out["setup_s"] = round(marks["train_start"] - marks["fit_start"], 3)
    out["step0_loss"] = rec.losses[0]
    if spec.get("accelerator", "cpu") == "cpu":
        peak = matmul_peak(dtype=matmul_dtype(spec["precision"], spec.get("dtype", "float32")))
        out["mfu"] = _mfu(out, step_flop[spec["warmup"] : spec["warmup"] + spec["steps"]], peak)
    if profiler.result is not None:
        out["profile"] = profiler.result
        out["saved_activations"] = _saved_activations(module, dm, spec)
    return out


def _saved_activations(module, dm, spec: dict) -> dict:
    """``--profile``: what a training forward of the first micro-batch keeps for backward, by part (mfu.py)."""
    import torch

    from clarify_lit.data.datamodule import PadCollator
    from clarify_lit.train.module import target_logps

    collate = PadCollator(
        dm.tokenizer.pad_token_id, getattr(dm, "share_pair_prefix", False), getattr(dm, "pad_to_multiple_of", 1)
    )
    batch = collate(dm.train_set.samples[: spec["batch_size"]])
    shapes = {(mod.out_features, mod.in_features) for mod in module.model.modules() if isinstance(mod, torch.nn.Linear)}

    def forward():
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=spec["precision"] == "bf16-mixed"):
            if module.is_dpo:
                return module._pair_logps(module.model, batch)
            return target_logps(
                module.model,
                batch["input_ids"],
                batch["attention_mask"],
                batch["labels"],
                module.hparams.logprob_chunk_size,
            )

    module.model.train()
    return {**saved_activation_bytes(module.model, forward, shapes), "tokens": batch_shape(batch)[0]}


class _StepProfiler:
    """``--profile``: ``torch.profiler`` over the timed steps (after the warm-up), time attributed to scopes by
    ``mfu.breakdown``. A no-op without the flag (profiling slows the steps: those runs are not timed runs)."""

    def __init__(self, spec: dict, model):
        self.on, self.warmup, self.model = bool(spec.get("profile")), spec["warmup"], model
        self.prof, self.scopes, self.result = None, None, None

    def __enter__(self):
        if self.on:
            self.scopes = profile_scopes(self.model)
            self.scopes.__enter__()
            if self.warmup == 0:
                self._start()
        return self

    def _start(self):
        from torch.profiler import ProfilerActivity, profile

        self.prof = profile(activities=[ProfilerActivity.CPU])
        self.prof.__enter__()

    def after_step(self, done: int) -> None:
        if self.on and done == self.warmup:
            self._start()

    def __exit__(self, *exc):
        if self.prof is not None:
            self.prof.__exit__(None, None, None)
            self.result = breakdown(self.prof)
        if self.scopes is not None:
            self.scopes.__exit__(None, None, None)


def _mfu(timed: dict, flops: list[dict], peak: dict) -> dict:
    """Model FLOPs utilisation of the timed steps (FLOP formula: benchmarks/mfu.py) against the matmul peak measured
    in this process after training in the step's matmul dtype (``peak["dtype"]``); by wall time and by CPU time
    (robust to other jobs). A utilisation above 100 % is not a result: the entry then holds ``error`` (the
    ``MFUError`` message) and no ``mfu_*`` figure."""
    total = sum(f["total"] for f in flops)
    parts = {k: sum(f[k] for f in flops) for k in flops[0] if k != "total"}
    wall = total / timed["seconds"] / 1e9
    cpu = total / (timed["cpu_s_per_step"] * timed["timed_steps"]) / 1e9
    out = {
        "gflop_per_step": round(total / len(flops) / 1e9, 2),
        "gflop_parts_share": {k: round(v / total, 3) for k, v in parts.items()},
        "achieved_gflops_wall": round(wall, 2),
        "achieved_gflops_cpu": round(cpu, 2),
        "peak": peak,
    }
    try:
        out["mfu_wall"] = round(utilisation(wall, peak["gflops_wall_best"], f" ({peak['dtype']}, wall time)"), 3)
        out["mfu_cpu"] = round(utilisation(cpu, peak["gflops_cpu_best"], f" ({peak['dtype']}, CPU time)"), 3)
    except MFUError as e:
        out.pop("mfu_wall", None)
        out["error"] = str(e)
    return out


def mfu_line(mfu: dict) -> str:
    """The MFU part of a variant's progress line: the figure, or the refusal."""
    if "error" in mfu:
        return f"  MFU refused: {mfu['error']}"
    return f"  MFU {mfu['mfu_cpu']:.1%} of the {mfu['peak']['dtype']} matmul peak (CPU time)"


def run_trl(spec: dict) -> dict:
    import torch
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import TrainerCallback
    from trl import DPOConfig, DPOTrainer, SFTConfig, SFTTrainer
    from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

    from clarify_lit.models import load_causal_lm, load_tokenizer

    variant, lora = spec["variant"], spec["finetune"] == "lora"
    lk = _lora_kwargs(spec)
    tok = load_tokenizer(spec.get("tokenizer") or spec["model"])
    with _device(spec):
        model = load_causal_lm(spec["model"], spec.get("dtype", "float32"))
    peft_config = (
        LoraConfig(
            r=lk["lora_r"],
            lora_alpha=lk["lora_alpha"],
            lora_dropout=_lora_dropout(variant),
            target_modules=lk["lora_target_modules"],
            task_type="CAUSAL_LM",
        )
        if lora
        else None
    )
    rec = _Steps()
    common = dict(
        output_dir=tempfile.mkdtemp(prefix="trl-bench-"),
        per_device_train_batch_size=spec["batch_size"],
        gradient_accumulation_steps=1,
        max_steps=spec["warmup"] + spec["steps"],
        learning_rate=LR,
        lr_scheduler_type="constant",
        warmup_steps=0,
        weight_decay=0.0,
        max_grad_norm=1.0,
        logging_steps=1,
        save_strategy="no",
        report_to="none",
        use_cpu=spec.get("accelerator", "cpu") == "cpu",
        bf16=spec["precision"] == "bf16-mixed",
        gradient_checkpointing=spec["gradient_checkpointing"],
        dataloader_num_workers=0,
        seed=0,
        disable_tqdm=True,
        max_length=spec["max_length"],
    )

    class Timer(TrainerCallback):
        def on_step_end(self, args, state, control, **kw):
            _sync()
            rec.t_end.append(time.perf_counter())
            rec.cpu_end.append(time.process_time())

    out: dict = {}
    if variant == "trl_sft_weighted":
        dm = _datamodule(spec, _our_objective("ours_refit"))
        rows = [
            {"input_ids": s["input_ids"], "labels": s["labels"], "weight": s["weight"]} for s in dm.train_set.samples
        ]

        class WeightedCollator(DataCollatorForLanguageModeling):
            def torch_call(self, examples):
                batch = super().torch_call(examples)
                batch["weight"] = torch.tensor([e["weight"] for e in examples], dtype=torch.float32)
                rec.trained.append(int((batch["labels"][:, 1:] != -100).sum()))
                rec.inputs.append(int(batch["attention_mask"].sum()))
                return batch

        class WeightedSFTTrainer(SFTTrainer):
            """Per-sample weights the simplest way: TRL's own fused forward, each sequence's log-prob sum × weight,
            divided by the trained tokens of the batch (``num_items_in_batch`` under accumulation)."""

            def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
                weights = inputs.pop("weight")
                outputs = model(**inputs, use_cache=False, fused_lm_head=True)
                seq_logps = outputs.log_probs.sum(dim=-1)
                n = outputs.label_mask.sum() if num_items_in_batch is None else num_items_in_batch
                loss = -(weights.to(seq_logps) * seq_logps).sum() / torch.as_tensor(n).clamp(min=1)
                if model.training:
                    rec.losses.append(float(loss.detach()))
                return (loss, outputs) if return_outputs else loss

        out["data_tokens"] = _our_data_tokens(dm.train_set.samples)  # the same tokenized samples as ours
        args = SFTConfig(**common, remove_unused_columns=False)
        collator = WeightedCollator(pad_token_id=tok.pad_token_id)
        trainer = WeightedSFTTrainer(
            model=model,
            args=args,
            train_dataset=Dataset.from_list(rows),
            processing_class=tok,
            data_collator=collator,
            peft_config=peft_config,
            callbacks=[Timer()],
        )
        # same-batch loss check, fp32, before any update: the same first examples as ours
        first = rows[: spec["batch_size"]]
        n_before = len(rec.trained)
        with torch.no_grad():
            batch = {
                k: (v.to(trainer.args.device) if isinstance(v, torch.Tensor) else v) for k, v in collator(first).items()
            }
            out["check_loss_real_weights"] = float(trainer.compute_loss(trainer.model, dict(batch)))
            batch["weight"] = torch.ones_like(batch["weight"])
            out["check_loss_weights_1"] = float(trainer.compute_loss(trainer.model, dict(batch)))
        del rec.trained[n_before:], rec.inputs[n_before:], rec.losses[:]
    else:
        from clarify_lit.data.records import load_records
        from clarify_lit.train.objectives import DPO

        # our final-answer pairs, given to TRL as conversational prompt/chosen/rejected; TRL tokenizes them
        records, _ = load_records([spec["records"]])
        examples, _ = DPO(beta=BETA, pairs="final_answer").build_view(records)
        rows = []
        for e in examples:
            assert e.chosen[:-1] == e.rejected[:-1], e.id
            rows.append({"prompt": e.chosen[:-1], "chosen": e.chosen[-1:], "rejected": e.rejected[-1:]})

        class CountingDPOTrainer(DPOTrainer):
            """DPOTrainer unchanged; only records the batches' token counts and the training losses."""

            def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
                if model.training:
                    cm = inputs["completion_mask"]
                    rec.trained.append(int(cm[:, 1:].sum()))
                    rec.inputs.append(int(inputs["attention_mask"].sum()))
                res = super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
                if model.training:
                    rec.losses.append(float((res[0] if return_outputs else res).detach()))
                return res

        args = DPOConfig(**common, beta=BETA)
        trainer = CountingDPOTrainer(
            model=model,
            args=args,
            train_dataset=Dataset.from_list(rows),
            processing_class=tok,
            peft_config=peft_config,
            callbacks=[Timer()],
        )
        ds = trainer.train_dataset
        out["data_tokens"] = {
            "examples": len(ds),
            "input": sum(
                2 * len(p) + len(c) + len(r) for p, c, r in zip(ds["prompt_ids"], ds["chosen_ids"], ds["rejected_ids"])
            ),
            "trained": sum(len(c) + len(r) for c, r in zip(ds["chosen_ids"], ds["rejected_ids"])),
        }
    out["rss_before_train_mb"] = round(_rss_mb(), 1)
    trainer.train()
    out.update(rec.summary(spec["warmup"], spec["steps"]))
    out["setup_s"] = None  # TRL's reference handling has no setup step here
    out["step0_loss"] = rec.losses[0]
    return out


def child_main(spec: dict) -> None:
    import torch

    torch.set_num_threads(spec["threads"])
    torch.manual_seed(0)
    t0 = time.perf_counter()
    res = run_ours(spec) if spec["variant"].startswith("ours") else run_trl(spec)
    res["child_wall_s"] = round(time.perf_counter() - t0, 2)
    res["peak_rss_mb"] = round(_rss_mb(), 1)
    print("RESULT " + json.dumps(res), flush=True)


# ----------------------------------------------------------------------------------------------------- parent side
def machine_info(threads: int) -> dict:
    import importlib.metadata as md

    cpu = ""
    try:
        cpu = next(ln.split(":", 1)[1].strip() for ln in open("/proc/cpuinfo") if ln.startswith("model name"))
    except (OSError, StopIteration):
        pass
    versions = {}
    for pkg in ("torch", "transformers", "peft", "lightning", "trl", "accelerate"):
        try:
            versions[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            versions[pkg] = None
    return {
        "cpu_count": os.cpu_count(),
        "cpu": cpu,
        "torch_threads": threads,
        "platform": platform.platform(),
        "python": platform.python_version(),
        "versions": versions,
    }


def run_child(spec: dict, timeout: float, script: str | Path = __file__) -> dict:
    """Run ``script --child <spec>`` in a fresh process; return the JSON it prints after ``RESULT``."""
    env = {
        **os.environ,
        "OMP_NUM_THREADS": str(spec["threads"]),
        "TQDM_DISABLE": "1",
        "TOKENIZERS_PARALLELISM": "false",
        "TRANSFORMERS_VERBOSITY": "error",
        "PYTHONWARNINGS": "ignore",
    }
    cmd = [sys.executable, str(Path(script).resolve()), "--child", json.dumps(spec)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    if proc.returncode != 0 or not lines:
        raise RuntimeError(f"{spec} failed (exit {proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}")
    return json.loads(lines[-1][len("RESULT ") :])


def aggregate(runs: list[dict]) -> dict:
    tps = [r["tokens_per_s"] for r in runs]
    itps = [r["input_tokens_per_s"] for r in runs]
    rss = [r["peak_rss_mb"] for r in runs]
    agg = {
        "tokens_per_s": round(statistics.median(tps), 2),
        "tokens_per_s_all": tps,
        "input_tokens_per_s": round(statistics.median(itps), 2),
        "peak_rss_mb": round(statistics.median(rss), 1),
        "peak_rss_mb_all": rss,
        "s_per_step": round(statistics.median(r["s_per_step"] for r in runs), 4),
        "rss_before_train_mb": round(statistics.median(r["rss_before_train_mb"] for r in runs), 1),
        "setup_s": None if runs[0]["setup_s"] is None else round(statistics.median(r["setup_s"] for r in runs), 3),
        "tokens_per_cpu_s": round(statistics.median(r["tokens_per_cpu_s"] for r in runs), 2),
        "cpu_s_per_step": round(statistics.median(r["cpu_s_per_step"] for r in runs), 4),
        "step0_loss": runs[0]["step0_loss"],
        "step_losses": runs[0]["step_losses"],
        "data_tokens": runs[0]["data_tokens"],
    }
    for k in ("check_loss_weights_1", "check_loss_real_weights"):
        if k in runs[0]:
            agg[k] = runs[0][k]
    if "mfu" in runs[0]:  # ours: model FLOPs utilisation (benchmarks/mfu.py), medians over repeats
        m = [r["mfu"] for r in runs]
        if any("error" in x for x in m):  # refused (above 100 %): no figure, the errors instead
            agg["mfu"] = {"errors": [x["error"] for x in m if "error" in x]}
        else:
            agg["mfu"] = {
                **m[0],
                **{
                    k: round(statistics.median(x[k] for x in m), 3)
                    for k in ("mfu_wall", "mfu_cpu", "achieved_gflops_wall", "achieved_gflops_cpu")
                },
                "mfu_cpu_all": [x["mfu_cpu"] for x in m],
            }
    if "profile" in runs[0]:
        agg["profile"], agg["saved_activations"] = runs[0]["profile"], runs[0]["saved_activations"]
    return agg


def checks(summary: dict, finetune: str) -> tuple[dict, list[str]]:
    """Same-work checks: ``(values, failures)``. Failures are raised after the results are written."""
    s = summary[finetune]
    out, failed = {}, []

    def check(ok: bool, msg: str) -> None:
        if not ok:
            failed.append(f"{finetune}: {msg}")

    if "ours_refit" in s and "trl_sft_weighted" in s:
        a, b = s["ours_refit"]["check_loss_weights_1"], s["trl_sft_weighted"]["check_loss_weights_1"]
        out["sft_weights_1"] = {"ours": a, "trl": b, "abs_diff": abs(a - b)}
        ar, br = s["ours_refit"]["check_loss_real_weights"], s["trl_sft_weighted"]["check_loss_real_weights"]
        out["sft_real_weights"] = {"ours": ar, "trl": br, "abs_diff": abs(ar - br)}
        check(abs(a - b) <= 1e-4 * max(1.0, abs(a)), f"SFT loss (weights 1) at step 0 differs: ours {a}, TRL {b}")
        check(abs(ar - br) <= 1e-4 * max(1.0, abs(ar)), f"weighted loss at step 0 differs: ours {ar}, TRL {br}")
        check(s["ours_refit"]["data_tokens"] == s["trl_sft_weighted"]["data_tokens"], "SFT data differ")
    if "ours_refit" in s and "ours_refit_pre28" in s:  # the memory savers change no number (bf16: rounding only)
        a, b = s["ours_refit"]["step_losses"], s["ours_refit_pre28"]["step_losses"]
        out["refit_vs_pre28_step_losses"] = {"ours": a, "pre28": b}
        check(
            len(a) == len(b) and all(abs(x - y) <= 1e-3 * max(1.0, abs(y)) for x, y in zip(a, b)),
            f"Refit step losses with and without the memory savers differ: {a} vs {b}",
        )
    if "ours_dpo" in s and "trl_dpo" in s:  # the same sequences; TRL also trains the "\n" after each <|im_end|>
        a, b = s["ours_dpo"]["data_tokens"], s["trl_dpo"]["data_tokens"]
        out["dpo_data_tokens"] = {"ours": a, "trl": b}
        check(a["examples"] == b["examples"] and a["input"] == b["input"], f"DPO sequences differ: {a} vs {b}")
        check(0 <= b["trained"] - a["trained"] <= 2 * a["examples"], f"DPO trained tokens: {a} vs {b}")
    for v in ("ours_dpo", "ours_dpo_stacked", "ours_dpo_precomputed", "trl_dpo"):
        if v in s:
            loss = s[v]["step0_loss"]
            # policy and reference run on the same batch: log 2 up to float error. A precomputed reference ran in
            # other batches (other padding/packing), which bf16 rounds differently: a small offset is expected
            tol = 1e-2 if v == "ours_dpo_precomputed" else 1e-4
            out[f"dpo_step0_{v}"] = {
                "loss": loss,
                "log2": math.log(2),
                "abs_diff": abs(loss - math.log(2)),
                "tolerance": tol,
            }
            check(abs(loss - math.log(2)) < tol, f"{v}: DPO loss at step 0 is {loss}, not log 2 (±{tol})")
    return out, failed


def ratio_table(summary: dict) -> tuple[dict, str]:
    """Ours / TRL: trained tokens per wall second and per CPU second (load-robust), peak RSS."""
    ratios, lines = {}, []
    head = (
        f"{'mode':<5} {'ours':<21} {'vs TRL':<17} {'ours tok/s':>10} {'TRL tok/s':>9} {'tok/s':>6} "
        f"{'tok/cpu-s':>9} {'ours MB':>8} {'TRL MB':>7} {'RSS':>5}"
    )
    lines += [head, "-" * len(head)]
    for ft, s in summary.items():
        for ours, trl in PAIRS:
            if ours not in s or trl not in s:
                continue
            tr = s[ours]["tokens_per_s"] / s[trl]["tokens_per_s"]
            cr = s[ours]["tokens_per_cpu_s"] / s[trl]["tokens_per_cpu_s"]
            mr = s[ours]["peak_rss_mb"] / s[trl]["peak_rss_mb"]
            ratios[f"{ft}/{ours}_vs_{trl}"] = {
                "tokens_per_s": round(tr, 3),
                "tokens_per_cpu_s": round(cr, 3),
                "peak_rss": round(mr, 3),
            }
            lines.append(
                f"{ft:<5} {ours:<21} {trl:<17} {s[ours]['tokens_per_s']:>10.1f} {s[trl]['tokens_per_s']:>9.1f} "
                f"{tr:>5.2f}x {cr:>8.2f}x {s[ours]['peak_rss_mb']:>8.0f} {s[trl]['peak_rss_mb']:>7.0f} "
                f"{mr:>4.2f}x"
            )
    return ratios, "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--child", help=argparse.SUPPRESS)
    p.add_argument("--model", default="tiny-random")
    p.add_argument("--n-conversations", type=int, default=216)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--max-length", type=int, default=1024)
    p.add_argument("--precision", default="bf16-mixed", choices=["bf16-mixed", "32-true"])
    p.add_argument("--gradient-checkpointing", action="store_true", help="on for every variant (TRL's default)")
    p.add_argument("--warmup", type=int, default=None, help="untimed steps (default: 2 tiny, 1 otherwise)")
    p.add_argument("--steps", type=int, default=None, help="timed steps (default: 8 tiny, 3 otherwise)")
    p.add_argument("--repeats", type=int, default=1, help="repeat the interleaved sequence (order reversed)")
    p.add_argument("--finetune", nargs="+", default=["lora", "full"], choices=["lora", "full"])
    p.add_argument("--variants", nargs="+", default=VARIANTS, choices=VARIANTS)
    p.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch threads per child (1: on a shared 2-core machine more threads only spin, 3-7x slower)",
    )
    p.add_argument("--timeout", type=float, default=900, help="seconds per child")
    p.add_argument("--accelerator", default="cpu", choices=["cpu", "gpu"], help="Lightning's / TRL's device")
    p.add_argument(
        "--profile",
        action="store_true",
        help="torch.profiler over our variants' timed steps: time per part (attention, LM head, LoRA, "
        "optimizer, data; benchmarks/mfu.py) under the result key '... profile' (slower: not timings)",
    )
    p.add_argument(
        "--module-args",
        type=json.loads,
        default={},
        help="extra ClarifyModule arguments for our variants, as JSON (an ablation: "
        '\'{"lm_head_recompute": false, "lora_dropout_bitmask": false}\' is the step before issue 28)',
    )
    p.add_argument("--tag", default="", help="appended to the result key (an ablation's name)")
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "train_throughput.json"))
    args = p.parse_args(argv)
    if args.child:
        child_main(json.loads(args.child))
        return {}

    from bench_data import write_records

    tiny = args.model == "tiny-random"
    warmup = args.warmup if args.warmup is not None else (2 if tiny else 1)
    steps = args.steps if args.steps is not None else (8 if tiny else 3)
    repeats = args.repeats
    threads = args.threads
    records = write_records(Path(tempfile.mkdtemp(prefix="clarify-bench-")) / "records.jsonl", args.n_conversations)
    load_start = loadavg()
    t_start = time.time()
    runs: dict[str, dict[str, list[dict]]] = {
        ft: {v: [] for v in args.variants if ft == "lora" or v not in LORA_ONLY} for ft in args.finetune
    }
    for rep in range(repeats):
        order = args.variants if rep % 2 == 0 else list(reversed(args.variants))
        for ft in args.finetune:
            for v in order:
                if v in LORA_ONLY and ft != "lora":
                    continue
                spec = {
                    "variant": v,
                    "finetune": ft,
                    "model": args.model,
                    "records": str(records),
                    "batch_size": args.batch_size,
                    "max_length": args.max_length,
                    "precision": args.precision,
                    "gradient_checkpointing": args.gradient_checkpointing,
                    "warmup": warmup,
                    "steps": steps,
                    "threads": threads,
                    "accelerator": args.accelerator,
                    "profile": args.profile,
                    "module_args": args.module_args,
                }
                res = run_child(spec, args.timeout)
                runs[ft][v].append(res)
                mfu = mfu_line(res["mfu"]) if "mfu" in res else ""
                print(
                    f"[rep {rep}] {ft:<4} {v:<21} {res['tokens_per_s']:>9.1f} tok/s  {res['s_per_step']:.3f} s/step"
                    f"  peak RSS {res['peak_rss_mb']:.0f} MB  step-0 loss {res['step0_loss']:.4f}{mfu}  load "
                    f"{os.getloadavg()[0]:.2f}",
                    flush=True,
                )
                if "profile" in res:
                    print(
                        "      profile (share of CPU time): "
                        + ", ".join(f"{k} {v:.0%}" for k, v in res["profile"]["share"].items()),
                        flush=True,
                    )
    summary = {ft: {v: aggregate(rs) for v, rs in per.items()} for ft, per in runs.items()}
    checked = {ft: checks(summary, ft) for ft in summary}
    same_work = {ft: c[0] for ft, c in checked.items()}
    failures = [f for c in checked.values() for f in c[1]]
    failures += [
        f"{ft} {v}: {e}"
        for ft, per in summary.items()
        for v, agg in per.items()
        for e in agg.get("mfu", {}).get("errors", [])
    ]
    ratios, table = ratio_table(summary)
    report = {
        "command": "python benchmarks/train_throughput.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "model": args.model,
        "n_conversations": args.n_conversations,
        "batch_size": args.batch_size,
        "max_length": args.max_length,
        "precision": args.precision,
        "gradient_checkpointing": args.gradient_checkpointing,
        "warmup_steps": warmup,
        "timed_steps": steps,
        "repeats": repeats,
        "module_args": args.module_args,
        "dpo_pairs": "final_answer",
        "beta": BETA,
        "lora": _lora_kwargs({"model": args.model}),
        "machine": {
            **machine_info(threads),
            "loadavg_start": [round(x, 2) for x in load_start],
            "loadavg_end": loadavg(),
            "stamp": machine_stamp("bfloat16" if args.precision == "bf16-mixed" else "float32"),
        },
        "wall_s": round(time.time() - t_start, 1),
        "notes": (
            "one subprocess per (mode, variant, repeat), variants interleaved, order reversed on odd repeats; "
            "tokens_per_s = trained tokens (labels != -100; TRL DPO also trains the '\\n' after <|im_end|>, "
            "one more token per sequence than ours) per second of the timed steps, median over repeats; "
            "peak_rss_mb = ru_maxrss of the child (median over repeats); the machine runs other jobs "
            "(see loadavg), so compare variants of the same run only"
        ),
        "results": summary,
        "runs": runs,
        "same_work_checks": same_work,
        "same_work_failures": failures,
        "ratios_ours_over_trl": ratios,
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    existing = json.loads(out.read_text()) if out.exists() else {}
    key = (
        f"{args.model} {args.precision}{' gc' if args.gradient_checkpointing else ''}"
        f"{' profile' if args.profile else ''}{' ' + args.tag if args.tag else ''}"
    )
    existing[key] = report
    out.write_text(json.dumps(existing, indent=1) + "\n")
    print(
        f"\n{args.model}, batch {args.batch_size}, {args.precision}, {threads} threads, "
        f"load {load_start[0]:.2f} -> {os.getloadavg()[0]:.2f}\n{table}\n-> {out}"
    )
    if failures:
        raise SystemExit("same-work checks (or MFU) failed:\n" + "\n".join(failures))
    return report


if __name__ == "__main__":
    main()
