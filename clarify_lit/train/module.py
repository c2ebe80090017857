"""``ClarifyModule``: one LightningModule for every objective. It runs forwards, logs and steps; the losses live in
``losses.py`` and the data views in ``objectives.py``."""

from __future__ import annotations

import copy
import logging
import math
from pathlib import Path
from typing import Literal

import lightning as L
import torch
import torchmetrics
from jsonargparse import lazy_instance
from torch import Tensor

from clarify_lit.data.tokenization import IGNORE_INDEX
from clarify_lit.models import load_causal_lm, load_tokenizer, resolve_model_path
from clarify_lit.train.losses import dpo_sigmoid_loss, sequence_logps, weighted_nll_loss
from clarify_lit.train.objectives import DPO, Objective, Refit, objective_name, objective_settings

log = logging.getLogger(__name__)


class NonFiniteLossError(RuntimeError):
    """The loss became NaN/inf; the message names the batch's sample ids."""


def target_logps(model, input_ids: Tensor, attention_mask: Tensor, labels: Tensor, chunk_size: int = 1024
                 ) -> tuple[Tensor, Tensor]:
    """Per-token log-probs of the label tokens, ``[B, T-1]`` (0 where not trained), and the mask.

    Only the hidden states at trained positions go through the LM head, in chunks, and only the target's log-prob
    is gathered (``logit[y] − logsumexp(logits)``): no full-vocabulary log-softmax copy over the whole sequence.
    """
    targets = labels[:, 1:]
    mask = targets != IGNORE_INDEX
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    decoder = getattr(base, "model", None)
    head = base.get_output_embeddings() if hasattr(base, "get_output_embeddings") else None
    if decoder is None or head is None:  # unusual architecture: fall back to the full logits
        logits = model(input_ids=input_ids, attention_mask=attention_mask).logits[:, :-1].float()
        lp = logits.gather(-1, targets.clamp_min(0).unsqueeze(-1)).squeeze(-1) - logits.logsumexp(-1)
        return lp * mask, mask
    hidden = decoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state[:, :-1]
    h_sel = hidden[mask]  # [N, H]: trained positions only
    y_sel = targets[mask]
    parts = []
    for s in range(0, h_sel.shape[0], chunk_size):
        logits = head(h_sel[s: s + chunk_size]).float()
        parts.append(logits.gather(-1, y_sel[s: s + chunk_size, None]).squeeze(-1) - logits.logsumexp(-1))
    flat = torch.cat(parts) if parts else h_sel.new_zeros(0, dtype=torch.float32)
    out = torch.zeros(mask.shape, dtype=flat.dtype, device=flat.device)
    out = out.masked_scatter(mask, flat)
    return out, mask


class ClarifyModule(L.LightningModule):
    """Fine-tunes a causal LM on simulated conversations with Refit, Swift, SFT or DPO.

    Args:
        model_name_or_path: hub id, local folder, ``embedded:smollm2-135m-instruct`` or ``tiny-random``.
        objective: the training objective (``Refit``, ``Swift``, ``SFT``, ``DPO``); its data view follows.
        dtype: dtype the weights are loaded in (use ``trainer.precision`` for mixed precision).
        use_lora: train LoRA adapters (peft) instead of all weights.
        lora_r: LoRA rank.
        lora_alpha: LoRA scaling numerator.
        lora_dropout: dropout on the LoRA branch.
        lora_target_modules: module names that get adapters (must exist in the model).
        learning_rate: AdamW peak learning rate.
        weight_decay: AdamW weight decay.
        warmup_ratio: share of the total optimizer steps spent in linear warmup.
        lr_schedule: decay after warmup.
        gradient_checkpointing: recompute activations in backward (less memory, ~30% slower).
        logprob_chunk_size: trained positions per LM-head chunk when gathering log-probs.
        on_nonfinite_loss: ``raise`` stops training naming the batch ids; ``skip`` skips the batch and counts it.
        export_on_fit_end: write an HF/PEFT folder (adapter or weights + tokenizer + chat template) at fit end.
    """

    def __init__(
        self,
        model_name_or_path: str = "tiny-random",
        objective: Objective = lazy_instance(Refit),
        dtype: Literal["float32", "bfloat16", "float16"] = "float32",
        use_lora: bool = True,
        lora_r: int = 8,
        lora_alpha: int = 16,
        lora_dropout: float = 0.05,
        lora_target_modules: list[str] | None = None,
        learning_rate: float = 3e-5,
        weight_decay: float = 0.0,
        warmup_ratio: float = 0.05,
        lr_schedule: Literal["cosine", "linear", "constant"] = "cosine",
        gradient_checkpointing: bool = False,
        logprob_chunk_size: int = 1024,
        on_nonfinite_loss: Literal["raise", "skip"] = "raise",
        export_on_fit_end: bool = True,
    ):
        super().__init__()
        self.save_hyperparameters(ignore=["objective"])
        self.objective = objective if objective is not None else Refit()
        # the objective is a plain object; its settings are kept as data so checkpoints stay weights-only loadable
        self.hparams["objective_config"] = {"class": objective_name(self.objective),
                                            **objective_settings(self.objective)}
        self.tokenizer = load_tokenizer(model_name_or_path)
        model = load_causal_lm(model_name_or_path, dtype)
        if gradient_checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
            model.config.use_cache = False
        if use_lora:
            model = self._add_lora(model, lora_target_modules or ["q_proj", "v_proj"])
            # with LoRA the checkpoint holds the adapter alone; the base weights come from model_name_or_path
            self.strict_loading = False
        # from_pretrained returns eval mode; training mode makes LoRA dropout active
        self.model = model.train()
        self._frozen_reference = None  # full fine-tuning + DPO: a frozen copy, kept out of state_dict/optimizer
        self.nonfinite_skipped = 0
        self.train_loss = torchmetrics.MeanMetric()
        self.val_loss = torchmetrics.MeanMetric()

    def _add_lora(self, model, targets: list[str]):
        from peft import LoraConfig, get_peft_model

        names = {n.rsplit(".", 1)[-1] for n, _ in model.named_modules()}
        missing = [t for t in targets if t not in names]
        if missing:
            linear = sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)})
            raise ValueError(f"lora_target_modules {missing} not found in {self.hparams.model_name_or_path!r}; "
                             f"its linear layers are {linear}")
        cfg = LoraConfig(r=self.hparams.lora_r, lora_alpha=self.hparams.lora_alpha,
                         lora_dropout=self.hparams.lora_dropout, target_modules=targets, task_type="CAUSAL_LM")
        return get_peft_model(model, cfg)

    @classmethod
    def from_checkpoint(cls, path: str | Path, **overrides) -> ClarifyModule:
        """``load_from_checkpoint`` that also restores the objective saved in ``objective_config``."""
        ckpt = torch.load(path, map_location="cpu", weights_only=False)
        config = dict(ckpt.get("hyper_parameters", {}).get("objective_config") or {"class": "Refit"})
        overrides.setdefault("objective", build_objective(config))
        return cls.load_from_checkpoint(path, map_location="cpu", **overrides)

    # ------------------------------------------------------------------------------------------------ reference
    @property
    def is_dpo(self) -> bool:
        return isinstance(self.objective, DPO)

    def _reference_mode(self) -> str:
        mode = self.objective.reference
        if mode == "auto":
            return "adapter_disabled" if self.hparams.use_lora else "frozen_copy"
        if mode == "adapter_disabled" and not self.hparams.use_lora:
            raise ValueError("DPO reference='adapter_disabled' needs use_lora=true")
        return mode

    def on_fit_start(self) -> None:
        if self.is_dpo and self._reference_mode() == "frozen_copy" and self._frozen_reference is None:
            ref = copy.deepcopy(self.model).eval()
            for p in ref.parameters():
                p.requires_grad_(False)
            self._frozen_reference = [ref.to(self.device)]  # a list hides it from nn.Module registration
        if self.is_dpo and self._reference_mode() == "precomputed":
            self._precompute_reference()
        dm = getattr(self.trainer, "datamodule", None)
        if dm is not None and getattr(dm, "stats", None) and self.logger is not None:
            self.logger.log_metrics(dm.stats, step=0)

    def _reference_logps(self, batch: dict) -> Tensor:
        mode = self._reference_mode()
        with torch.no_grad():
            if mode == "frozen_copy":
                lp, mask = target_logps(self._frozen_reference[0], batch["input_ids"], batch["attention_mask"],
                                        batch["labels"], self.hparams.logprob_chunk_size)
            else:
                with self.model.disable_adapter():
                    lp, mask = target_logps(self.model, batch["input_ids"], batch["attention_mask"],
                                            batch["labels"], self.hparams.logprob_chunk_size)
        return sequence_logps(lp, mask)

    def _precompute_reference(self) -> None:
        """Reference log-probs once per sample, stored on the in-memory dataset samples for this fit (not written to
        the tokenized cache: a new fit computes them again)."""
        from clarify_lit.data.datamodule import PadCollator

        dm = self.trainer.datamodule
        collate = PadCollator(dm.tokenizer.pad_token_id)
        saved = self.objective.reference
        self.objective.reference = "auto"
        was_training = self.model.training
        self.model.eval()
        try:
            for ds in (dm.train_set, dm.val_set):
                if ds is None:
                    continue
                todo = [s for s in ds.samples if "ref_chosen_logps" not in s]
                for i in range(0, len(todo), dm.batch_size):
                    chunk = todo[i: i + dm.batch_size]
                    b = {k: (v.to(self.device) if isinstance(v, Tensor) else v) for k, v in collate(chunk).items()}
                    ref = self._reference_logps(b).float().cpu()
                    for j, s in enumerate(chunk):
                        s["ref_chosen_logps"] = float(ref[j])
                        s["ref_rejected_logps"] = float(ref[len(chunk) + j])
        finally:
            self.objective.reference = saved
            self.model.train(was_training)

    # ------------------------------------------------------------------------------------------------ steps
    def _step(self, batch: dict, stage: str) -> tuple[Tensor, dict[str, Tensor]]:
        lp, mask = target_logps(self.model, batch["input_ids"], batch["attention_mask"], batch["labels"],
                                self.hparams.logprob_chunk_size)
        if self.is_dpo:
            seq = sequence_logps(lp, mask)
            n = batch["n_pairs"]
            if "ref_chosen_logps" in batch:
                ref_c, ref_r = batch["ref_chosen_logps"].to(seq), batch["ref_rejected_logps"].to(seq)
            else:
                ref = self._reference_logps(batch).to(seq)
                ref_c, ref_r = ref[:n], ref[n:]
            loss, metrics = dpo_sigmoid_loss(seq[:n], seq[n:], ref_c, ref_r, self.objective.beta)
        else:
            num_tokens = None
            if stage == "train" and "step_tokens" in batch:
                # normalise by the whole optimizer step's tokens; Lightning divides by accumulate afterwards
                num_tokens = batch["step_tokens"] / self.trainer.accumulate_grad_batches
            loss, metrics = weighted_nll_loss(lp, mask, batch["weights"].to(lp), num_tokens)
        bs = len(batch["ids"])
        for k, v in metrics.items():
            self.log(f"{stage}/{k}", v, batch_size=bs, on_step=stage == "train", on_epoch=True,
                     sync_dist=stage != "train")
        return loss, metrics

    def training_step(self, batch: dict, batch_idx: int):
        loss, _ = self._step(batch, "train")
        if not torch.isfinite(loss):
            if self.hparams.on_nonfinite_loss == "raise":
                raise NonFiniteLossError(f"non-finite training loss {loss.item()} at global step "
                                         f"{self.global_step}, batch {batch_idx}; sample ids: {batch['ids']}")
            self.nonfinite_skipped += 1
            self.log("train/nonfinite_skipped", float(self.nonfinite_skipped))
            return None  # Lightning skips the optimizer step for this batch
        self.train_loss(loss.detach())
        self.log("train/loss", self.train_loss, on_step=True, on_epoch=True, prog_bar=True,
                 batch_size=len(batch["ids"]))
        return loss

    def validation_step(self, batch: dict, batch_idx: int):
        loss, metrics = self._step(batch, "val")
        self.val_loss(loss)
        self.log("val/loss", self.val_loss, on_epoch=True, prog_bar=True, batch_size=len(batch["ids"]))
        return loss

    # ------------------------------------------------------------------------------------------------ optim
    def configure_optimizers(self):
        params = [p for p in self.model.parameters() if p.requires_grad]
        opt = torch.optim.AdamW(params, lr=self.hparams.learning_rate, weight_decay=self.hparams.weight_decay)
        total = max(1, int(self.trainer.estimated_stepping_batches))
        warmup = int(self.hparams.warmup_ratio * total)
        schedule = self.hparams.lr_schedule

        def factor(step: int) -> float:
            if step < warmup:
                return (step + 1) / (warmup + 1)
            if schedule == "constant":
                return 1.0
            progress = min(1.0, (step - warmup) / max(1, total - warmup))
            return 0.5 * (1 + math.cos(math.pi * progress)) if schedule == "cosine" else 1.0 - progress

        sched = torch.optim.lr_scheduler.LambdaLR(opt, factor)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    # ------------------------------------------------------------------------------------------------ checkpoints
    def on_save_checkpoint(self, checkpoint: dict) -> None:
        if self.hparams.use_lora:
            trainable = {n for n, p in self.named_parameters() if p.requires_grad}
            checkpoint["state_dict"] = {k: v for k, v in checkpoint["state_dict"].items()
                                        if k in trainable or not k.startswith("model.")}

    def on_fit_end(self) -> None:
        if self.hparams.export_on_fit_end:
            # trainer.log_dir broadcasts from rank 0 under DDP: every rank must call it, not rank 0 alone
            root = Path(self.trainer.log_dir or self.trainer.default_root_dir)
            if self.trainer.is_global_zero:
                export_model(self, root / "export")


def build_objective(config: dict) -> Objective:
    """Rebuild an objective from ``{"class": name, **settings}`` (as stored in checkpoints)."""
    from clarify_lit.train import objectives

    config = dict(config)
    name = config.pop("class")
    cls = getattr(objectives, name, None)
    if not (isinstance(cls, type) and issubclass(cls, Objective)):
        raise ValueError(f"unknown objective {name!r}; choose Refit, Swift, SFT or DPO")
    return cls(**config)


def export_model(module: ClarifyModule, folder: str | Path) -> Path:
    """Write an HF folder loadable with ``transformers``/``peft`` alone: adapter (LoRA) or full weights, plus the
    tokenizer with its chat template. The adapter's ``base_model_name_or_path`` is the resolved base model."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    model = module.model
    if hasattr(model, "peft_config"):
        for cfg in model.peft_config.values():
            cfg.base_model_name_or_path = resolve_model_path(module.hparams.model_name_or_path)
    model.save_pretrained(folder)
    module.tokenizer.save_pretrained(folder)
    log.info("exported %s to %s", "adapter" if hasattr(model, "peft_config") else "model", folder)
    return folder
