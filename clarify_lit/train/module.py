"""``ClarifyModule``: one LightningModule for every objective. It runs forwards, logs and steps; the losses live in
``losses.py`` and the data views in ``objectives.py``."""

from __future__ import annotations

import copy
import logging
import math
from pathlib import Path
from typing import Any, Literal

import lightning as L
import torch
import torchmetrics
from jsonargparse import lazy_instance
from torch import Tensor

from clarify_lit.data.datamodule import PadCollator
from clarify_lit.data.tokenization import IGNORE_INDEX
from clarify_lit.models import (
    DType,
    export_base,
    load_causal_lm,
    load_export,
    load_tokenizer,
    resolve_model_path,
)
from clarify_lit.train import objectives
from clarify_lit.train.export import export_merged, write_export
from clarify_lit.train.logprobs import chunked_head_logps, uses_gradient_checkpointing
from clarify_lit.train.losses import distillation_loss, dpo_sigmoid_loss, sequence_logps, weighted_nll_loss
from clarify_lit.train.memory import lighten_lora_dropout
from clarify_lit.train.objectives import DPO, Distill, Objective, Refit, objective_name, objective_settings
from clarify_lit.train.pair_logprobs import PACKED_KEY, packed_sequence_logps
from clarify_lit.train.reference_cache import ReferenceCache

log = logging.getLogger(__name__)


class NonFiniteLossError(RuntimeError):
    """The loss became NaN/inf; the message names the batch's sample ids."""


def target_logps(
    model,
    input_ids: Tensor,
    attention_mask: Tensor,
    labels: Tensor,
    chunk_size: int = 1024,
    recompute: bool | None = None,
) -> tuple[Tensor, Tensor]:
    """Per-token log-probs of the label tokens, ``[B, T-1]`` (0 where not trained), and the mask.

    Only the hidden states at trained positions go through the LM head, in chunks, and only the target's log-prob
    is gathered (``logit[y] − logsumexp(logits)``): no full-vocabulary log-softmax copy over the whole sequence.
    ``recompute``: recompute each chunk's logits in backward instead of keeping them (``chunked_head_logps``;
    ``None``: only under gradient checkpointing).
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
    # trained positions only; under gradient checkpointing the chunks' logits are recomputed in backward too
    if recompute is None:
        recompute = uses_gradient_checkpointing(base)
    flat = chunked_head_logps(head, hidden[mask], targets[mask], chunk_size, recompute)
    out = torch.zeros(mask.shape, dtype=flat.dtype, device=flat.device)
    out = out.masked_scatter(mask, flat)
    return out, mask


def _decoder_and_head(model):
    """``(decoder, lm_head)`` of a causal LM (through a PEFT wrapper); ``None`` parts for unusual architectures."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    head = base.get_output_embeddings() if hasattr(base, "get_output_embeddings") else None
    return getattr(base, "model", None), head


def distill_logits_loss(
    student,
    teacher,
    input_ids: Tensor,
    attention_mask: Tensor,
    labels: Tensor,
    *,
    alpha: float,
    temperature: float,
    num_tokens: Tensor | float | None = None,
    chunk_size: int = 1024,
) -> tuple[Tensor, dict[str, Tensor]]:
    """STaR-GATE-D's :func:`~clarify_lit.train.losses.distillation_loss` over the trained (label ≠ −100) positions.

    Both decoders run once; the hidden states at trained positions go through the two LM heads ``chunk_size``
    positions at a time. Each chunk's loss is activation-checkpointed, so backward keeps the hidden states alone and
    recomputes one chunk's logits at a time: at no point do the ``[N, V]`` fp32 logits of both models (49k vocabulary)
    exist for the whole batch. The teacher runs under ``no_grad``.
    """
    from torch.utils.checkpoint import checkpoint

    targets = labels[:, 1:]
    mask = targets != IGNORE_INDEX
    y = targets[mask]
    n = mask.sum() if num_tokens is None else num_tokens
    s_dec, s_head = _decoder_and_head(student)
    t_dec, t_head = _decoder_and_head(teacher)
    if s_dec is None or s_head is None or t_dec is None or t_head is None:  # unusual architecture: full logits
        s_logits = student(input_ids=input_ids, attention_mask=attention_mask).logits[:, :-1][mask]
        with torch.no_grad():
            t_logits = teacher(input_ids=input_ids, attention_mask=attention_mask).logits[:, :-1][mask]
        loss, metrics = distillation_loss(s_logits, t_logits, y, alpha, temperature, n)
        return loss, {**metrics, "tokens": mask.sum().detach()}
    h_s = s_dec(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state[:, :-1][mask]
    with torch.no_grad():
        h_t = t_dec(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state[:, :-1][mask]

    def chunk(hs: Tensor, ht: Tensor, yc: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        with torch.no_grad():
            t_logits = t_head(ht)
        loss, m = distillation_loss(s_head(hs), t_logits, yc, alpha, temperature, n)
        return loss, m["kl"], m["nll"]

    loss = h_s.sum() * 0.0  # keeps the graph connected when a batch has no trained position
    kl = nll = torch.zeros((), device=h_s.device)
    for s in range(0, y.shape[0], chunk_size):
        part = (h_s[s : s + chunk_size], h_t[s : s + chunk_size], y[s : s + chunk_size])
        if torch.is_grad_enabled() and h_s.requires_grad:
            c_loss, c_kl, c_nll = checkpoint(chunk, *part, use_reentrant=False)
        else:
            c_loss, c_kl, c_nll = chunk(*part)
        loss, kl, nll = loss + c_loss, kl + c_kl, nll + c_nll
    return loss, {"kl": kl.detach(), "nll": nll.detach(), "tokens": mask.sum().detach()}


def load_teacher(source: str, dtype: str = "float32"):
    """The frozen teacher of :class:`~clarify_lit.train.objectives.Distill`: a ``ClarifyModule`` checkpoint file,
    an exported folder (a PEFT adapter applied to the base model it names and merged, or full weights), or a model
    name/path for ``load_causal_lm``."""
    path = Path(source)
    if path.is_file():
        model = load_checkpoint(path, merge_lora=True)[0]
    elif path.is_dir() and ((path / "adapter_config.json").is_file() or (path / "config.json").is_file()):
        model = load_export(path, dtype, merge_lora=True)[0]
    elif path.is_absolute() or source.startswith(".") or path.name == "export" or path.suffix == ".ckpt":
        raise FileNotFoundError(
            f"Distill teacher {source!r} not found: give the teacher run's export folder "
            "(e.g. runs/sft/export), its checkpoint or a model name"
        )
    else:
        model = load_causal_lm(source, dtype)
    model.eval()
    model.requires_grad_(False)
    return model


def load_checkpoint(ckpt_path: str | Path, merge_lora: bool = True) -> tuple[Any, Any, str, str]:
    """Load a ``ClarifyModule`` checkpoint: ``(model, tokenizer, base model name, objective name)``.

    Here rather than in ``clarify_lit.models`` (which loads every other kind of model): only the training layer knows
    the module a checkpoint holds."""
    path = Path(ckpt_path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    module = ClarifyModule.from_checkpoint(path)
    model = module.model
    if merge_lora and hasattr(model, "merge_and_unload"):
        model = model.merge_and_unload()
    objective = (module.hparams.get("objective_config") or {}).get("class") or "checkpoint"
    return model, module.tokenizer, str(module.hparams.get("model_name_or_path", "")), objective


class ClarifyModule(L.LightningModule):
    """Fine-tunes a causal LM on simulated conversations with Refit, Swift, SFT, DPO, StepDPO or Distill.

    Args:
        model_name_or_path: hub id, local folder, ``embedded:smollm2-135m-instruct`` or ``tiny-random``.
        objective: the training objective (``Refit``, ``Swift``, ``SFT``, ``DPO``, ``StepDPO``, ``Distill``); its
            data view follows.
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
        gradient_checkpointing: recompute activations in backward (less memory, ~30% slower); the LM-head chunks of
            the target log-probs are recomputed too (no ``[tokens, vocab]`` logits kept for backward).
        logprob_chunk_size: trained positions per LM-head chunk when gathering log-probs.
        lm_head_recompute: in training, keep no LM-head logits for backward: each chunk's logits are recomputed
            there (``logprobs.chunked_head_logps``; always on under gradient checkpointing). Same loss and gradients
            (the recomputation repeats the forward's ops); one more LM-head matmul per trained token against
            ``~10 bytes × chunk × vocabulary`` of logits and their gradients (hundreds of MB at a 49k vocabulary).
        lora_dropout_bitmask: LoRA dropout keeps a bit mask for backward instead of the scaled fp32 noise tensor
            (``memory.BitMaskDropout``): bit-identical forward, gradients and random stream; ~0.45 MB less per token
            position on SmolLM2-135M with adapters on all linears.
        on_nonfinite_loss: ``raise`` stops training naming the batch ids; ``skip`` skips the batch and counts it.
        export_on_fit_end: write an HF/PEFT folder (adapter or weights + tokenizer + chat template + model card)
            to ``<run>/export`` at fit end (``clarify_lit.train.export``).
        export_merged: at fit end also write ``<run>/export_merged``: the LoRA merged into the base weights, a
            standalone ``transformers`` folder (no peft needed), in ``export_dtype``.
        export_dtype: dtype of the merged export; ``None`` keeps the training ``dtype``.
        init_adapter: start the LoRA adapter from an exported adapter folder (``<run>/export``) instead of zeros —
            training continues from that policy (``clarify iterate --init continue``). Its rank, alpha, target
            modules and base model must match this module's; the optimizer and schedule start fresh.
        reference_cache: with ``DPO(reference=precomputed)``, keep the reference log-probs on disk
            (``$CLARIFY_CACHE/reference_logps``, keyed by the reference weights, the precision and each pair's
            tokens) so that a later fit on the same model and data does not compute them again.
        skip_zero_weight: weighted objectives (Refit, Swift, SFT): in training, conversations whose weight is
            exactly 0 get no forward or backward pass — they add nothing to the gradient. The objective is unchanged:
            the loss is still normalised by the optimizer step's trained tokens counted over *all* its conversations,
            and a micro-batch of only zero weights still feeds the optimizer an exact zero gradient, so the step (and
            AdamW's moments) happen as before. ``train/nll`` then covers the computed conversations only.
    """

    def __init__(
        self,
        model_name_or_path: str = "tiny-random",
        objective: Objective = lazy_instance(Refit),
        dtype: DType = "float32",
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
        logprob_chunk_size: int = 256,
        lm_head_recompute: bool = True,
        lora_dropout_bitmask: bool = True,
        on_nonfinite_loss: Literal["raise", "skip"] = "raise",
        export_on_fit_end: bool = True,
        export_merged: bool = False,
        export_dtype: DType | None = None,
        init_adapter: str | None = None,
        reference_cache: bool = True,
        skip_zero_weight: bool = True,
    ):
        super().__init__()
        self.save_hyperparameters(ignore=["objective"])
        self.objective = objective if objective is not None else Refit()
        # the objective is a plain object; its settings are kept as data so checkpoints stay weights-only loadable
        self.hparams["objective_config"] = {
            "class": objective_name(self.objective),
            **objective_settings(self.objective),
        }
        self.tokenizer = load_tokenizer(model_name_or_path)
        model = load_causal_lm(model_name_or_path, dtype)
        if gradient_checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
            model.config.use_cache = False
        if use_lora:
            model = self._add_lora(model, lora_target_modules or ["q_proj", "v_proj"])
            if lora_dropout_bitmask:
                lighten_lora_dropout(model)
            if init_adapter:
                load_adapter_weights(model, init_adapter, model_name_or_path)
            # with LoRA the checkpoint holds the adapter alone; the base weights come from model_name_or_path
            self.strict_loading = False
        elif init_adapter:
            raise ValueError(
                "init_adapter needs use_lora=true; to continue full fine-tuning, pass the previous "
                "export folder as model_name_or_path"
            )
        # from_pretrained returns eval mode; training mode makes LoRA dropout active
        self.model = model.train()
        self._frozen_reference = None  # full fine-tuning + DPO: a frozen copy, kept out of state_dict/optimizer
        self._teacher = None  # Distill: [frozen teacher], loaded on first use, kept out of state_dict/optimizer
        self.nonfinite_skipped = 0
        self.reference_pairs_computed = 0  # DPO precomputed reference: pairs this process computed (not cached)
        self.train_loss = torchmetrics.MeanMetric()
        self.val_loss = torchmetrics.MeanMetric()

    def _add_lora(self, model, targets: list[str]):
        from peft import LoraConfig, get_peft_model

        names = {n.rsplit(".", 1)[-1] for n, _ in model.named_modules()}
        missing = [t for t in targets if t not in names]
        if missing:
            linear = sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)})
            raise ValueError(
                f"lora_target_modules {missing} not found in {self.hparams.model_name_or_path!r}; "
                f"its linear layers are {linear}"
            )
        cfg = LoraConfig(
            r=self.hparams.lora_r,
            lora_alpha=self.hparams.lora_alpha,
            lora_dropout=self.hparams.lora_dropout,
            target_modules=targets,
            task_type="CAUSAL_LM",
        )
        return get_peft_model(model, cfg)

    @classmethod
    def from_checkpoint(cls, path: str | Path, **overrides) -> ClarifyModule:
        """``load_from_checkpoint`` that also restores the objective saved in ``objective_config``."""
        ckpt = torch.load(path, map_location="cpu", weights_only=False)
        config = dict(ckpt.get("hyper_parameters", {}).get("objective_config") or {"class": "Refit"})
        overrides.setdefault("objective", build_objective(config))
        # the checkpoint's state dict holds the trained adapter: the folder it started from is not needed again
        if "init_adapter" in ckpt.get("hyper_parameters", {}):
            overrides.setdefault("init_adapter", None)
        return cls.load_from_checkpoint(path, map_location="cpu", **overrides)

    # ------------------------------------------------------------------------------------------------ reference
    @property
    def is_dpo(self) -> bool:
        return isinstance(self.objective, DPO)

    @property
    def is_distill(self) -> bool:
        return isinstance(self.objective, Distill)

    def teacher_model(self):
        """Distill's frozen teacher (loaded from ``objective.teacher`` on first use, on this module's device)."""
        if self._teacher is None:
            source = self.objective.teacher
            if not source:
                raise ValueError(
                    "Distill needs a teacher: --model.objective.teacher=<the SFT run's export folder or checkpoint>"
                )
            teacher = load_teacher(source, self.hparams.dtype)
            vocab = (
                teacher.get_output_embeddings().weight.shape[0],
                self.model.get_output_embeddings().weight.shape[0],
            )
            if vocab[0] != vocab[1]:
                raise ValueError(
                    f"Distill teacher {source!r} has a {vocab[0]}-token vocabulary, the student "
                    f"{self.hparams.model_name_or_path!r} {vocab[1]}: they must share the tokenizer"
                )
            self._teacher = [teacher.to(self.device)]  # a list hides it from nn.Module registration
            log.info("Distill: teacher %s loaded", source)
        return self._teacher[0]

    def _distill_step(self, batch: dict, stage: str) -> tuple[Tensor, dict[str, Tensor]]:
        num_tokens = None
        if stage == "train" and "step_tokens" in batch:
            num_tokens = batch["step_tokens"] / self.trainer.accumulate_grad_batches
        loss, metrics = distill_logits_loss(
            self.model,
            self.teacher_model(),
            batch["input_ids"],
            batch["attention_mask"],
            batch["labels"],
            alpha=self.objective.alpha,
            temperature=self.objective.temperature,
            num_tokens=num_tokens,
            chunk_size=self.hparams.logprob_chunk_size,
        )
        for k, v in metrics.items():
            self.log(
                f"{stage}/{k}",
                v,
                batch_size=len(batch["ids"]),
                on_step=stage == "train",
                on_epoch=True,
                sync_dist=stage != "train",
            )
        return loss, metrics

    def _reference_mode(self) -> str:
        mode = self.objective.reference
        if mode == "auto":
            return "adapter_disabled" if self.hparams.use_lora else "frozen_copy"
        if mode == "adapter_disabled" and not self.hparams.use_lora:
            raise ValueError("DPO reference='adapter_disabled' needs use_lora=true")
        return mode

    def setup(self, stage: str) -> None:
        # Full fine-tuning DPO: the reference is the model this fit starts from. Lightning restores a resumed
        # checkpoint after setup() and before on_fit_start(), so the copy is taken here; taken later, a resumed fit
        # would use the resumed (trained) policy as its reference. With LoRA the reference is the adapter-free model.
        if (
            stage == "fit"
            and self.is_dpo
            and not self.hparams.use_lora
            and self._frozen_reference is None
            and self._reference_mode() in ("frozen_copy", "precomputed")
        ):
            ref = copy.deepcopy(self.model).eval()
            for p in ref.parameters():
                p.requires_grad_(False)
            self._frozen_reference = [ref]  # a list hides it from nn.Module registration (not saved, not optimised)

    def on_fit_start(self) -> None:
        if self.is_distill:
            self.teacher_model()  # load now: a bad teacher path fails before the first step
        if self._frozen_reference is not None:
            self._frozen_reference = [self._frozen_reference[0].to(self.device)]
        if self.is_dpo and self._reference_mode() == "precomputed":
            self._precompute_reference()
            self._frozen_reference = None  # full fine-tuning: the copy served the precomputation only
        dm = getattr(self.trainer, "datamodule", None)
        if dm is not None and getattr(dm, "stats", None) and self.logger is not None:
            self.logger.log_metrics(dm.stats, step=0)

    def _pair_logps(self, model, batch: dict) -> Tensor:
        """Sequence log-probs ``[2n]`` (chosen, then rejected) of a pair batch, stacked or packed
        (``pair_logprobs``)."""
        if PACKED_KEY in batch:
            return packed_sequence_logps(model, batch, self.hparams.logprob_chunk_size, self._head_recompute())
        return sequence_logps(
            *target_logps(
                model,
                batch["input_ids"],
                batch["attention_mask"],
                batch["labels"],
                self.hparams.logprob_chunk_size,
                self._head_recompute(),
            )
        )

    def _head_recompute(self) -> bool | None:
        """``lm_head_recompute`` (``.get``: absent from older checkpoints' hyper-parameters); ``None`` leaves it to
        gradient checkpointing (``target_logps``)."""
        return True if self.hparams.get("lm_head_recompute", False) else None

    def _reference_logps(self, batch: dict) -> Tensor:
        mode = self._reference_mode()
        with torch.no_grad():
            if mode == "frozen_copy":
                return self._pair_logps(self._frozen_reference[0], batch)
            with self.model.disable_adapter():
                return self._pair_logps(self.model, batch)

    def _precompute_reference(self) -> None:
        """Reference log-probs once per sample, before training, stored on the in-memory dataset samples and, with
        ``reference_cache``, on disk (``reference_cache.py``), so a later fit on the same weights and data reads them
        back. The reference is the model the fit started from (LoRA: adapter disabled; full fine-tuning: the copy
        taken in
        ``setup``, before a resumed checkpoint is loaded).
        Computed under the trainer's precision (the training forward's autocast: policy == reference gives exactly
        log 2 at step 0), in batches of similar length (less padding)."""
        dm = self.trainer.datamodule
        collate = PadCollator(
            dm.tokenizer.pad_token_id, getattr(dm, "share_pair_prefix", False), getattr(dm, "pad_to_multiple_of", 1)
        )
        # LoRA: the policy with its adapter disabled; full fine-tuning: the copy of the starting weights (setup())
        ref_model = self.model if self.hparams.use_lora else self._frozen_reference[0]
        cache = (
            ReferenceCache.for_model(ref_model, str(self.trainer.precision)) if self.hparams.reference_cache else None
        )
        was_training = self.model.training
        self.model.eval()
        try:
            for ds in (dm.train_set, dm.val_set):
                if ds is None:
                    continue
                todo = [s for s in ds.samples if "ref_chosen_logps" not in s]
                if cache is not None:
                    todo = cache.fill(todo)
                todo.sort(key=lambda s: s["length"])  # the same order on every rank (same data, stable sort)
                # DDP: each rank computes every world_size-th pair, then all ranks exchange their results
                world, rank = self.trainer.world_size, self.trainer.global_rank
                mine = todo[rank::world]
                for i in range(0, len(mine), dm.batch_size):
                    chunk = mine[i : i + dm.batch_size]
                    b = {k: (v.to(self.device) if isinstance(v, Tensor) else v) for k, v in collate(chunk).items()}
                    with torch.no_grad(), self.trainer.precision_plugin.forward_context():
                        if self.hparams.use_lora:
                            with self.model.disable_adapter():
                                ref = self._pair_logps(self.model, b).float().cpu()
                        else:
                            ref = self._pair_logps(ref_model, b).float().cpu()
                    for j, s in enumerate(chunk):
                        s["ref_chosen_logps"] = float(ref[j])
                        s["ref_rejected_logps"] = float(ref[len(chunk) + j])
                self.reference_pairs_computed += len(mine)
                if world > 1:
                    self._share_reference_logps(todo, world)
                if cache is not None:
                    cache.add(todo)
        finally:
            self.model.train(was_training)
        if cache is not None and self.trainer.is_global_zero:  # one writer for the shared cache file
            cache.save()
            log.info(
                "DPO reference log-probs: %d pairs from the cache, %d computed (%s)",
                cache.hits,
                cache.misses,
                cache.path,
            )

    def _share_reference_logps(self, todo: list[dict], world: int) -> None:
        """After each rank computed ``todo[rank::world]``: gather every rank's values so all ranks hold all."""
        import torch.distributed as dist

        rank = self.trainer.global_rank
        own = [
            (rank + world * k, s["ref_chosen_logps"], s["ref_rejected_logps"]) for k, s in enumerate(todo[rank::world])
        ]
        gathered: list[list[tuple[int, float, float]] | None] = [None] * world
        dist.all_gather_object(gathered, own)
        for part in gathered:
            for pos, chosen, rejected in part or []:
                todo[pos]["ref_chosen_logps"], todo[pos]["ref_rejected_logps"] = chosen, rejected
        missing = [s.get("id") for s in todo if "ref_chosen_logps" not in s]
        if missing:
            raise RuntimeError(f"DPO precomputed reference: no log-probs gathered for samples {missing[:5]}")

    # ------------------------------------------------------------------------------------------------ steps
    def _step(self, batch: dict, stage: str) -> tuple[Tensor, dict[str, Tensor]]:
        if self.is_distill:
            return self._distill_step(batch, stage)
        if self.is_dpo:
            seq = self._pair_logps(self.model, batch)
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
            loss, metrics = self._weighted_step(
                batch, num_tokens, skip_zero=stage == "train" and self.hparams.skip_zero_weight
            )
        bs = len(batch["ids"])
        for k, v in metrics.items():
            self.log(
                f"{stage}/{k}", v, batch_size=bs, on_step=stage == "train", on_epoch=True, sync_dist=stage != "train"
            )
        return loss, metrics

    def _weighted_step(
        self, batch: dict, num_tokens: Tensor | None, skip_zero: bool
    ) -> tuple[Tensor, dict[str, Tensor]]:
        """Refit/Swift/SFT on one micro-batch; with ``skip_zero`` the weight-0 rows are left out of the forward.

        Leaving a row out changes nothing but cost: its term ``w·Σ log π`` is 0, and ``num_tokens`` (the step's
        token count, computed by the sampler over every conversation) keeps it in the denominator.
        """
        weights = batch["weights"]
        keep = weights != 0 if skip_zero else torch.ones_like(weights, dtype=torch.bool)
        all_tokens = (batch["labels"][:, 1:] != IGNORE_INDEX).sum()
        if num_tokens is None:  # no step count from the sampler: this micro-batch's tokens, all rows counted
            num_tokens = all_tokens
        if not keep.any():
            # nothing to compute, but the optimizer step must still see an exact zero gradient on every trained
            # parameter (as a forward of zero-weight rows would give): AdamW's moments decay and its step count moves
            loss = sum(p.sum() for p in self.model.parameters() if p.requires_grad) * 0.0
            return loss, {
                "weight_mean": weights.float().mean(),
                "tokens": all_tokens.float(),
                "rows_computed": torch.tensor(0.0),
            }
        rows = {k: batch[k] for k in ("input_ids", "attention_mask", "labels")}
        if not keep.all():
            width = int(batch["attention_mask"][keep].sum(dim=1).max())  # right padding: trailing columns are pad
            rows = {k: v[keep][:, :width] for k, v in rows.items()}
        lp, mask = target_logps(
            self.model,
            rows["input_ids"],
            rows["attention_mask"],
            rows["labels"],
            self.hparams.logprob_chunk_size,
            self._head_recompute(),
        )
        loss, metrics = weighted_nll_loss(lp, mask, weights[keep].to(lp), num_tokens)
        # weight_mean and tokens describe the whole micro-batch, as without skipping
        metrics.update(
            weight_mean=weights.float().mean(),
            tokens=all_tokens.to(metrics["tokens"]),
            rows_computed=keep.sum().float(),
        )
        return loss, metrics

    def training_step(self, batch: dict, batch_idx: int):
        loss, _ = self._step(batch, "train")
        if not torch.isfinite(loss):
            if self.hparams.on_nonfinite_loss == "raise":
                raise NonFiniteLossError(
                    f"non-finite training loss {loss.item()} at global step "
                    f"{self.global_step}, batch {batch_idx}; sample ids: {batch['ids']}"
                )
            self.nonfinite_skipped += 1
            self.log("train/nonfinite_skipped", float(self.nonfinite_skipped))
            return None  # Lightning skips the optimizer step for this batch
        self.train_loss(loss.detach())
        self.log(
            "train/loss", self.train_loss, on_step=True, on_epoch=True, prog_bar=True, batch_size=len(batch["ids"])
        )
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
            checkpoint["state_dict"] = {
                k: v for k, v in checkpoint["state_dict"].items() if k in trainable or not k.startswith("model.")
            }

    def on_fit_end(self) -> None:
        merged = self.hparams.get("export_merged")  # .get: absent from checkpoints of older versions
        if self.hparams.export_on_fit_end or merged:
            # trainer.log_dir broadcasts from rank 0 under DDP: every rank must call it, not rank 0 alone
            root = Path(self.trainer.log_dir or self.trainer.default_root_dir)
            if self.trainer.is_global_zero:
                if self.hparams.export_on_fit_end:
                    export_model(self, root / "export", run_dir=root)
                if merged:
                    export_merged(
                        self,
                        root / "export_merged",
                        self.hparams.get("export_dtype"),
                        run_dir=root,
                        trainer=self.trainer,
                    )


def load_adapter_weights(model, folder: str | Path, model_name_or_path: str) -> None:
    """Copy the LoRA weights of an exported adapter folder into ``model`` (a fresh PEFT model of the same shape)."""
    import json

    from peft import load_peft_weights, set_peft_model_state_dict

    folder = Path(folder)
    config_file = folder / "adapter_config.json"
    if not config_file.is_file():
        raise FileNotFoundError(
            f"init_adapter {str(folder)!r}: no adapter_config.json (expected a LoRA export "
            "folder such as runs/<run>/export)"
        )
    saved = json.loads(config_file.read_text(encoding="utf-8"))
    ours = model.peft_config["default"]
    diff = {k: (saved.get(k), getattr(ours, k)) for k in ("r", "lora_alpha") if saved.get(k) != getattr(ours, k)}
    if set(saved.get("target_modules") or []) != set(ours.target_modules or []):
        diff["target_modules"] = (sorted(saved.get("target_modules") or []), sorted(ours.target_modules or []))
    base = saved.get("base_model_name_or_path")
    if base:  # a portable name (the embedded model's hub id) maps back to what was trained on (clarify_export.json)
        base = resolve_model_path(export_base(folder, base))
    if base and str(Path(base).resolve()) != str(Path(resolve_model_path(model_name_or_path)).resolve()):
        diff["base_model_name_or_path"] = (base, resolve_model_path(model_name_or_path))
    if diff:
        raise ValueError(f"init_adapter {str(folder)!r} does not match this model (saved vs here): {diff}")
    result = set_peft_model_state_dict(model, load_peft_weights(str(folder), device="cpu"))
    if getattr(result, "unexpected_keys", None):
        raise ValueError(
            f"init_adapter {str(folder)!r}: weights the model has no place for: {result.unexpected_keys[:5]}"
        )
    log.info("LoRA adapter initialised from %s", folder)


def build_objective(config: dict) -> Objective:
    """Rebuild an objective from ``{"class": name, **settings}`` (as stored in checkpoints)."""
    config = dict(config)
    name = config.pop("class")
    cls = getattr(objectives, name, None)
    if not (isinstance(cls, type) and issubclass(cls, Objective)):
        raise ValueError(f"unknown objective {name!r}; choose Refit, Swift, SFT, DPO, StepDPO or Distill")
    return cls(**config)


def export_model(module: ClarifyModule, folder: str | Path, run_dir: Path | None = None) -> Path:
    """Write an HF folder loadable with ``transformers``/``peft`` alone: adapter (LoRA) or full weights, the
    tokenizer with its chat template, a model card and ``clarify_export.json``; the adapter names its base portably
    (the embedded SmolLM2 by its hub id). See :mod:`clarify_lit.train.export`."""
    trainer = module._trainer  # None outside a fit: the card then describes the module alone
    if run_dir is None and trainer is not None:
        run_dir = Path(
            trainer.default_root_dir
        )  # not trainer.log_dir: a collective under DDP, and rank 0 is alone here
    return write_export(module, folder, run_dir=run_dir, trainer=trainer)
