"""``ConversationDataModule``: record files → the objective's view → tokenized samples (cached) → batches.

Labels and masks are built once, when the dataset is prepared (``setup``), and cached on disk keyed by the view's
content, the tokenizer and ``max_length``. The collator only pads and stacks.

Loss normalisation across gradient accumulation: the weighted NLL divides by the number of trained tokens of the
whole optimizer step, so 1 × 8 micro-batches and 8 × 1 give the same gradient. The batch sampler knows which
micro-batches form a step and stamps each sample with that step's token count (``step_tokens``).

Resuming: the batch order is a function of ``seed`` and the data epoch alone, and the DataModule counts the training
micro-batches taken; checkpoints store that count (``state_dict``), so ``clarify fit --ckpt_path last`` continues with
the very micro-batch an uninterrupted run would train next, mid-epoch included (docs/reliability.md).
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
from typing import Literal

import lightning as L
import torch
from torch.utils.data import DataLoader, Dataset

from clarify_lit.data.pair_collation import pack_pairs
from clarify_lit.data.records import RecordError, load_records, split_by_task
from clarify_lit.data.tokenization import (
    IGNORE_INDEX,
    ChatTemplateError,
    SystemPrompt,
    TokenizationError,
    tokenize_conversation,
)
from clarify_lit.data.views import (
    DataView,
    ObjectiveDataError,
    PairExample,
    RewardWeightedView,
    WeightedExample,
    check_finite_weights,
)
from clarify_lit.io import atomic_write, cache_dir
from clarify_lit.models import load_tokenizer

log = logging.getLogger(__name__)
CACHE_VERSION = "3"  # 2: end-of-turn after a cut turn is masked; 3: echoed instruction blocks masked


class SampleDataset(Dataset):
    """A list of tokenized samples. Indexing with ``(i, step_tokens)`` (from :class:`StepBatchSampler`) adds the
    step's token count to the sample."""

    def __init__(self, samples: list[dict]):
        self.samples = samples

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, key):
        if isinstance(key, tuple):
            i, step_tokens = key
            return {**self.samples[i], "step_tokens": step_tokens}
        return self.samples[key]


class StepBatchSampler:
    """Yields micro-batches of indices, grouped into optimizer steps of ``accumulate`` micro-batches.

    Each yielded index is ``(i, step_tokens)`` where ``step_tokens`` is the number of trained tokens of this rank's
    share of the step (global step tokens / world size, so that DDP's gradient mean gives the global normalisation).
    ``group_by_length`` sorts each step's samples by length (less padding) before cutting micro-batches; steps are
    shuffled by ``seed + epoch``. Under DDP each rank takes a disjoint slice of every step; a last, incomplete step
    is cut to a multiple of the world size (at most ``world_size − 1`` samples left out of the epoch) so that every
    rank runs the same number of micro-batches (an uneven count would hang DDP's gradient all-reduce).
    """

    def __init__(
        self,
        lengths: list[int],
        trained_tokens: list[int],
        batch_size: int,
        accumulate: int = 1,
        shuffle: bool = True,
        seed: int = 0,
        group_by_length: bool = False,
        rank: int = 0,
        world_size: int = 1,
    ):
        self.lengths, self.trained = lengths, trained_tokens
        self.batch_size, self.accumulate = batch_size, max(1, accumulate)
        self.shuffle, self.seed, self.group_by_length = shuffle, seed, group_by_length
        self.rank, self.world_size = rank, world_size
        self.epoch = 0
        # trainer mode (set by the DataModule): () -> micro-batches the training loop has taken so far in this fit,
        # counted across epochs and restored on resume. Each pass then starts where the data stands: epoch
        # ``done // len(self)``, after its first ``done % len(self)`` micro-batches. The data position is the
        # sampler's own, not Lightning's epoch/batch counters, which drift when a fit restarts (Lightning 2.6).
        self.position = None
        # Lightning calls ``set_epoch`` on ``dataloader.batch_sampler.sampler`` (never on the batch sampler itself)
        self.sampler = _EpochSetter(self)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def _steps(self) -> list[list[int]]:
        n = len(self.lengths)
        if self.shuffle:
            g = torch.Generator().manual_seed(self.seed + self.epoch)
            order = torch.randperm(n, generator=g).tolist()
        else:
            order = list(range(n))
        per_step = self.batch_size * self.accumulate * self.world_size
        steps = [order[s : s + per_step] for s in range(0, n, per_step)]
        if steps and self.world_size > 1:
            steps[-1] = steps[-1][: len(steps[-1]) - len(steps[-1]) % self.world_size]
            if not steps[-1]:
                steps.pop()
        return steps

    def __iter__(self):
        skip = 0
        if self.position is not None and len(self):
            self.epoch, skip = divmod(self.position(), len(self))
        for step in self._steps():
            step_tokens = sum(self.trained[i] for i in step) / self.world_size
            mine = step[self.rank :: self.world_size]
            if self.group_by_length:
                mine = sorted(mine, key=lambda i: self.lengths[i])
            for s in range(0, len(mine), self.batch_size):
                if skip:
                    skip -= 1
                    continue
                yield [(i, step_tokens) for i in mine[s : s + self.batch_size]]

    def __len__(self) -> int:
        return sum(math.ceil(len(step[self.rank :: self.world_size]) / self.batch_size) for step in self._steps())


class ResumableDataLoader(DataLoader):
    """The training DataLoader. Its position (micro-batches trained, see :class:`StepBatchSampler`) is saved in every
    checkpoint by the DataModule; ``state_dict``/``load_state_dict`` here make Lightning treat it as resumable."""

    datamodule = None  # set by the DataModule that made it

    def state_dict(self) -> dict:
        return self.datamodule.state_dict()["train_loader"]

    def load_state_dict(self, state: dict) -> None:
        self.datamodule.load_state_dict({"train_loader": state})


class _EpochSetter:
    """Forwards Lightning's per-epoch ``set_epoch`` call to the :class:`StepBatchSampler` that owns it."""

    def __init__(self, owner: StepBatchSampler):
        self.owner = owner

    def set_epoch(self, epoch: int) -> None:
        self.owner.set_epoch(epoch)


def _pad(seqs: list[list[int]], value: int, multiple: int = 1) -> torch.Tensor:
    width = -(-max(len(s) for s in seqs) // multiple) * multiple
    return torch.tensor([s + [value] * (width - len(s)) for s in seqs], dtype=torch.long)


class PadCollator:
    """Right-pads and stacks. Pairwise samples become one batch ``[chosen_1..B, rejected_1..B]`` so DPO needs one
    forward for both; with ``share_prefix`` each pair is one row whose shared prefix is computed once
    (``clarify_lit.data.pair_collation``). The length is padded up to a multiple of ``pad_to_multiple_of``."""

    def __init__(self, pad_token_id: int, share_prefix: bool = False, pad_to_multiple_of: int = 1):
        self.pad_token_id, self.share_prefix = pad_token_id, share_prefix
        self.multiple = max(1, int(pad_to_multiple_of))

    def __call__(self, samples: list[dict]) -> dict:
        if "chosen_input_ids" in samples[0] and self.share_prefix:
            batch = pack_pairs(samples, self.pad_token_id, self.multiple)
            if "ref_chosen_logps" in samples[0]:
                batch["ref_chosen_logps"] = torch.tensor([s["ref_chosen_logps"] for s in samples])
                batch["ref_rejected_logps"] = torch.tensor([s["ref_rejected_logps"] for s in samples])
            batch["ids"] = [s["id"] for s in samples]
            if "step_tokens" in samples[0]:
                batch["step_tokens"] = torch.tensor(float(samples[0]["step_tokens"]))
            return batch
        if "chosen_input_ids" in samples[0]:
            ids = [s["chosen_input_ids"] for s in samples] + [s["rejected_input_ids"] for s in samples]
            labels = [s["chosen_labels"] for s in samples] + [s["rejected_labels"] for s in samples]
            batch = {"n_pairs": len(samples)}
            if "ref_chosen_logps" in samples[0]:
                batch["ref_chosen_logps"] = torch.tensor([s["ref_chosen_logps"] for s in samples])
                batch["ref_rejected_logps"] = torch.tensor([s["ref_rejected_logps"] for s in samples])
        else:
            ids = [s["input_ids"] for s in samples]
            labels = [s["labels"] for s in samples]
            batch = {"weights": torch.tensor([s["weight"] for s in samples], dtype=torch.float32)}
        batch["input_ids"] = _pad(ids, self.pad_token_id, self.multiple)
        batch["labels"] = _pad(labels, IGNORE_INDEX, self.multiple)
        batch["attention_mask"] = _pad([[1] * len(s) for s in ids], 0, self.multiple)
        batch["ids"] = [s["id"] for s in samples]
        if "step_tokens" in samples[0]:
            batch["step_tokens"] = torch.tensor(float(samples[0]["step_tokens"]))
        return batch


class ConversationDataModule(L.LightningDataModule):
    """Batches of conversation records for the module's objective.

    Args:
        train_files: record files (JSONL, Parquet or ``datasets`` folders) to train on.
        val_files: record files for validation; if empty, ``val_fraction`` of the tasks of ``train_files`` are held
            out (split by ``task_id``, never by row).
        val_fraction: share of tasks held out when ``val_files`` is empty (0 disables validation).
        split_seed: seed of the task-level split.
        tokenizer_name_or_path: linked from ``model.model_name_or_path`` by the CLI (no double specification).
        max_length: longest sample in tokens; longer ones lose tokens from the middle (never the final turn).
        batch_size: conversations (or preference pairs) per micro-batch.
        group_by_length: sort samples by length inside each optimizer step (less padding, same step contents).
        share_pair_prefix: DPO pairs as one row each, their shared prefix (prompt) computed once instead of twice
            (``clarify_lit.train.pair_logprobs``; same log-probs, ~35 % fewer tokens for final-answer pairs). Needs
            ``sdpa`` or ``eager`` attention.
        pad_to_multiple_of: pad each batch's length up to a multiple of this (1: no extra padding). Fewer distinct
            shapes let CPU bf16 kernels (oneDNN) be reused instead of built per length: over a 96-step epoch of the
            tiny model, 16 gave 830 vs 1380 MB RSS and 5-10 % less CPU time; no measurable change with SmolLM2
            over 16 steps (4.7-4.8 GB, 135-150 CPU-s either way).
        num_workers: DataLoader workers.
        on_invalid_sample: ``raise`` on a sample that cannot be trained (no assistant tokens left, final turn cut);
            ``drop`` skips and counts it.
        truncated_turns: what to do with assistant turns the simulator's ``max_new_tokens`` cut off
            (``meta.truncated_turns``): ``mask_end`` trains their text but not the end-of-turn token the chat
            template adds after the cut (the policy never chose to stop there); ``drop`` leaves out every conversation
            with a cut turn (counted as ``data/truncated_records_dropped``). Records from before per-turn marks
            (a count only) cannot be masked: they are counted and, under ``mask_end``, trained as written.
        skip_invalid_records: skip (and count) records that fail validation instead of raising.
        max_record_chars: the longest conversation accepted, in characters of message text (``None``: no limit). A
            longer record is refused naming it (skipped and counted under ``skip_invalid_records``) before it is
            tokenized: one 30 MB line took 12.9 GB to tokenize.
        system_prompt: ``keep`` renders the system message as the chat template does; ``fold`` merges it into the
            first user turn (``<system>\n\n<user>``) for templates that refuse a system role (Gemma's "System role not
            supported").
        cache_tokenized: cache tokenized samples under ``$CLARIFY_CACHE/tokenized``.
        seed: shuffling seed (the epoch is added each epoch).
        objective: normally left unset: the LightningModule's objective is used, so the view follows the objective
            (any object with ``build_view``/``describe``: :class:`~clarify_lit.data.views.DataView`); with neither,
            Refit's reward-weighted view.
    """

    def __init__(
        self,
        train_files: list[str],
        val_files: list[str] | None = None,
        val_fraction: float = 0.1,
        split_seed: int = 0,
        tokenizer_name_or_path: str = "tiny-random",
        max_length: int = 1024,
        batch_size: int = 4,
        group_by_length: bool = True,
        share_pair_prefix: bool = True,
        pad_to_multiple_of: int = 16,
        num_workers: int = 0,
        on_invalid_sample: Literal["raise", "drop"] = "raise",
        truncated_turns: Literal["mask_end", "drop"] = "mask_end",
        skip_invalid_records: bool = False,
        max_record_chars: int | None = 1_000_000,
        system_prompt: SystemPrompt = "keep",
        cache_tokenized: bool = True,
        seed: int = 0,
        objective: DataView | None = None,
    ):
        super().__init__()
        if not train_files:
            raise ValueError("data.train_files is empty: give at least one record file")
        for name, files in (("train_files", train_files), ("val_files", val_files or [])):
            for f in files:
                if not os.path.exists(f):
                    raise FileNotFoundError(f"data.{name}: record file not found: {f}")
        if on_invalid_sample not in ("raise", "drop"):
            raise ValueError(f"on_invalid_sample must be 'raise' or 'drop', got {on_invalid_sample!r}")
        for name, value, least in (
            ("batch_size", batch_size, 1),
            ("max_length", max_length, 1),
            ("pad_to_multiple_of", pad_to_multiple_of, 1),
            ("num_workers", num_workers, 0),
            ("max_record_chars", max_record_chars, 1),
        ):
            if value is not None and (not isinstance(value, int) or value < least):
                raise ValueError(f"data.{name} must be an integer >= {least}, got {value!r}")
        if system_prompt not in ("keep", "fold"):
            raise ValueError(f"system_prompt must be 'keep' or 'fold', got {system_prompt!r}")
        self.train_files, self.val_files = list(train_files), list(val_files or [])
        self.val_fraction, self.split_seed = val_fraction, split_seed
        self.tokenizer_name_or_path, self.max_length = tokenizer_name_or_path, max_length
        self.batch_size, self.group_by_length, self.num_workers = batch_size, group_by_length, num_workers
        self.share_pair_prefix, self.pad_to_multiple_of = share_pair_prefix, pad_to_multiple_of
        if truncated_turns not in ("mask_end", "drop"):
            raise ValueError(f"truncated_turns must be 'mask_end' or 'drop', got {truncated_turns!r}")
        self.on_invalid_sample, self.skip_invalid_records = on_invalid_sample, skip_invalid_records
        self.truncated_turns = truncated_turns
        self.max_record_chars, self.system_prompt = max_record_chars, system_prompt
        self.cache_tokenized, self.seed = cache_tokenized, seed
        self.objective = objective
        self.tokenizer = None
        self.train_set: SampleDataset | None = None
        self.val_set: SampleDataset | None = None
        self.stats: dict[str, float] = {}
        self._train_loader: ResumableDataLoader | None = None
        self._consumed = 0  # training micro-batches taken since the fit began (restored from checkpoints)

    # ----------------------------------------------------------------------------------------------- preparation
    def _resolve_objective(self) -> DataView:
        if self.objective is not None:
            return self.objective
        trainer = getattr(self, "trainer", None)
        module = trainer.lightning_module if trainer is not None else None
        if module is not None and getattr(module, "objective", None) is not None:
            return module.objective
        return RewardWeightedView()

    def setup(self, stage: str | None = None) -> None:
        if stage in (None, "fit"):
            self._consumed = 0  # a new fit starts at the data's beginning; --ckpt_path restores it after this hook
        if self.train_set is not None:
            return
        objective = self._resolve_objective()
        self.tokenizer = load_tokenizer(self.tokenizer_name_or_path)
        records, summary = load_records(self.train_files, skip_invalid=self.skip_invalid_records)
        records = self._within_size_limit(records, summary)
        log.info(summary.line())
        self.stats["data/skipped_records"] = float(summary.skipped)
        if self.val_files:
            train, _ = records, None
            val, vsum = load_records(self.val_files, skip_invalid=self.skip_invalid_records)
            val = self._within_size_limit(val, vsum)
            self.stats["data/skipped_records"] += vsum.skipped
            overlap = {r.task_id for r in train} & {r.task_id for r in val}
            if overlap:
                raise ValueError(
                    f"val_files share {len(overlap)} task_id(s) with train_files (e.g. "
                    f"{sorted(overlap)[0]!r}); validation must hold out whole questions"
                )
        else:
            train, val = split_by_task(records, self.val_fraction, self.split_seed)
        train, val = self._without_missing_rewards(train), self._without_missing_rewards(val or [])
        train, val = self._handle_truncated(train), self._handle_truncated(val)
        self.train_set = self._prepare(objective, train, "train")
        self.val_set = self._prepare(objective, val, "val") if val else None

    def _within_size_limit(self, records, summary):
        """Refuse (or, under ``skip_invalid_records``, skip and count) records longer than ``max_record_chars``."""
        if self.max_record_chars is None:
            return records
        kept = []
        for r in records:
            chars = sum(len(m["content"]) for m in r.messages)
            if chars <= self.max_record_chars:
                kept.append(r)
                continue
            file, _, where = r.source.rpartition(":") if r.source.count(":") else (r.source, "", "")
            err = RecordError(
                file or "<memory>",
                where or "record",
                r.id,
                "messages",
                f"{chars} characters of message text exceed data.max_record_chars="
                f"{self.max_record_chars} (raise it to train on such conversations)",
            )
            if not self.skip_invalid_records:
                raise err
            summary.add_skip(err)
            summary.read -= 1
        return kept

    def _without_missing_rewards(self, records):
        """Drop (and count) records whose reward could not be obtained (``meta.reward_missing``, e.g. a judge that
        never answered): their stored reward is a placeholder, and training on it would pass a 0 off as real."""
        kept = [r for r in records if not r.meta.get("reward_missing")]
        missing = len(records) - len(kept)
        if missing:
            log.warning("dropped %d record(s) whose reward is missing (meta.reward_missing)", missing)
        self.stats["data/reward_missing_records"] = self.stats.get("data/reward_missing_records", 0.0) + missing
        return kept

    def _handle_truncated(self, records):
        """Count the conversations with turns cut by the token limit; drop them under ``truncated_turns=drop``."""
        counts = [r.truncated_turns() for r in records]
        cut = [r for r, (n, _) in zip(records, counts) if n > 0]
        unknown = sum(turns is None for n, turns in counts if n > 0)
        self.stats["data/truncated_records"] = self.stats.get("data/truncated_records", 0.0) + len(cut)
        if unknown and self.truncated_turns == "mask_end":
            log.warning(
                "%d record(s) hold only a count of cut turns (written before per-turn marks): their "
                "end-of-turn tokens after the cut cannot be masked — re-simulate, or set "
                "data.truncated_turns=drop",
                unknown,
            )
        if self.truncated_turns == "drop" and cut:
            log.warning(
                "dropped %d of %d record(s) with a turn cut by the token limit (truncated_turns=drop)",
                len(cut),
                len(records),
            )
            self.stats["data/truncated_records_dropped"] = self.stats.get("data/truncated_records_dropped", 0.0) + len(
                cut
            )
            return [r for r, (n, _) in zip(records, counts) if n == 0]
        return records

    def _prepare(self, objective: DataView, records, split: str) -> SampleDataset:
        examples, stats = objective.build_view(records)
        log.info(stats.line(f"{objective.describe()} {split}"))
        self.stats[f"data/{split}_examples"] = float(stats.examples)
        for k, v in stats.excluded.items():
            self.stats[f"data/{split}_excluded_{k}"] = float(v)
        if examples and isinstance(examples[0], WeightedExample):
            check_finite_weights(examples)
            if split == "train" and all(e.weight == 0 for e in examples):
                files = ", ".join(self.train_files)
                raise ObjectiveDataError(
                    f"{objective.describe()}: all {len(examples)} training conversations in {files} have weight 0 "
                    f"(every reward is 0): nothing to learn, the fit would leave the policy as it is; simulate "
                    "data in which some conversations earn a reward (more turns or tokens, another reward kind)"
                )
        key = self._cache_key(examples)
        path = cache_dir() / "tokenized" / f"{key}.pt"
        if self.cache_tokenized and path.exists():
            samples = torch.load(path, weights_only=False)
            # each example became one sample or was dropped (on_invalid_sample=drop is part of the cache key)
            self.stats[f"data/{split}_dropped_samples"] = float(len(examples) - len(samples))
        else:
            samples = self._tokenize(examples, split)
            if self.cache_tokenized:
                # a private temp name: DDP ranks prepare the same data at once and each replaces atomically
                with atomic_write(path, "wb") as f:
                    torch.save(samples, f)
        if not samples:
            raise ValueError(f"{split}: no trainable samples left after tokenization")
        return SampleDataset(samples)

    def _cache_key(self, examples) -> str:
        h = hashlib.sha256()
        tok = self.tokenizer
        h.update(
            json.dumps(
                [
                    CACHE_VERSION,
                    self.tokenizer_name_or_path,
                    tok.chat_template,
                    len(tok),
                    self.max_length,
                    self.on_invalid_sample,
                ]
                + ([self.system_prompt] if self.system_prompt != "keep" else [])
            ).encode()
        )
        for e in examples:
            h.update(json.dumps(e.__dict__, sort_keys=True, default=str).encode())
        return h.hexdigest()[:32]

    def _tokenize(self, examples, split: str) -> list[dict]:
        samples, dropped, cut = [], 0, []
        opts = {"system_prompt": self.system_prompt}
        for e in examples:
            try:
                if isinstance(e, PairExample):
                    c = tokenize_conversation(
                        self.tokenizer,
                        e.chosen,
                        self.max_length,
                        e.where,
                        e.only_last_assistant,
                        e.chosen_cut_turns,
                        **opts,
                    )
                    r = tokenize_conversation(
                        self.tokenizer,
                        e.rejected,
                        self.max_length,
                        e.where,
                        e.only_last_assistant,
                        e.rejected_cut_turns,
                        **opts,
                    )
                    samples.append(
                        {
                            "id": e.id,
                            "chosen_input_ids": c.input_ids,
                            "chosen_labels": c.labels,
                            "rejected_input_ids": r.input_ids,
                            "rejected_labels": r.labels,
                            "length": len(c.input_ids) + len(r.input_ids),
                            "trained": c.num_trained + r.num_trained,
                        }
                    )
                    cut += [x.truncated for x in (c, r) if x.truncated]
                else:
                    s = tokenize_conversation(
                        self.tokenizer, e.messages, self.max_length, e.where, cut_turns=e.cut_turns, **opts
                    )
                    samples.append(
                        {
                            "id": e.id,
                            "input_ids": s.input_ids,
                            "labels": s.labels,
                            "weight": e.weight,
                            "length": len(s.input_ids),
                            "trained": s.num_trained,
                        }
                    )
                    cut += [s.truncated] if s.truncated else []
            except ChatTemplateError:
                raise  # the template refuses every conversation alike: dropping would drop them all
            except TokenizationError:
                if self.on_invalid_sample == "raise":
                    raise
                dropped += 1
        if dropped:
            log.warning(
                "%s: dropped %d of %d samples that could not be trained (on_invalid_sample=drop)",
                split,
                dropped,
                len(examples),
            )
        if cut:
            log.warning(
                "%s: %d of %d samples were cut to max_length=%d (%d tokens removed from their middles, at "
                "most %d from one)",
                split,
                len(cut),
                len(examples),
                self.max_length,
                sum(cut),
                max(cut),
            )
        self.stats[f"data/{split}_dropped_samples"] = float(dropped)
        self.stats[f"data/{split}_truncated_samples"] = float(len(cut))
        return samples

    # ----------------------------------------------------------------------------------------------- loaders
    def _loader(self, ds: SampleDataset, train: bool) -> DataLoader:
        trainer = getattr(self, "trainer", None)
        accumulate = trainer.accumulate_grad_batches if (trainer is not None and train) else 1
        rank = trainer.global_rank if trainer is not None else 0
        world = trainer.world_size if trainer is not None else 1
        sampler = StepBatchSampler(
            [s["length"] for s in ds.samples],
            [s["trained"] for s in ds.samples],
            self.batch_size,
            accumulate,
            shuffle=train,
            seed=self.seed,
            group_by_length=self.group_by_length,
            rank=rank,
            world_size=world,
        )
        collate = PadCollator(self.tokenizer.pad_token_id, self.share_pair_prefix, self.pad_to_multiple_of)
        # a private generator: creating an iterator then never draws from the global torch RNG, so dropout sees the
        # same random stream whether or not the run was interrupted and resumed
        kwargs = dict(
            batch_sampler=sampler,
            collate_fn=collate,
            num_workers=self.num_workers,
            generator=torch.Generator().manual_seed(self.seed),
        )
        if not train:
            return DataLoader(ds, **kwargs)
        loader = ResumableDataLoader(ds, **kwargs)
        loader.datamodule = self
        if trainer is not None:
            sampler.position = lambda: self._consumed
        self._train_loader = loader
        return loader

    # ----------------------------------------------------------------------------------------------- resuming
    # Lightning saves ``state_dict`` in every checkpoint and hands it back to ``load_state_dict`` on ``--ckpt_path``
    # (before it asks for the train loader, except under DeepSpeed). The sampler reads the count when a pass starts.
    def on_before_batch_transfer(self, batch, dataloader_idx: int):
        # called once per batch the training loop takes (after the fetcher's prefetch, before the training step)
        trainer = self.trainer
        if trainer is not None and trainer.training and not trainer.sanity_checking:
            self._consumed += 1
        return batch

    def state_dict(self) -> dict:
        if self._train_loader is None:
            return {}
        sampler = self._train_loader.batch_sampler
        return {"train_loader": {"micro_batches": self._consumed, "per_epoch": len(sampler), "seed": sampler.seed}}

    def load_state_dict(self, state: dict) -> None:
        saved = state.get("train_loader") or {}
        if "micro_batches" not in saved:
            return
        self._consumed = int(saved["micro_batches"])
        sampler = self._train_loader.batch_sampler if self._train_loader is not None else None
        if sampler is not None and (saved.get("per_epoch") != len(sampler) or saved.get("seed") != sampler.seed):
            log.warning(
                "resuming: the training data changed since the checkpoint (%s micro-batches per epoch and seed "
                "%s then, %d and %s now); the batch order will not match an uninterrupted run",
                saved.get("per_epoch"),
                saved.get("seed"),
                len(sampler),
                sampler.seed,
            )
        log.info("resuming the training data after %d micro-batches", self._consumed)

    def train_dataloader(self) -> DataLoader:
        return self._loader(self.train_set, train=True)

    def val_dataloader(self):
        return self._loader(self.val_set, train=False) if self.val_set is not None else []
