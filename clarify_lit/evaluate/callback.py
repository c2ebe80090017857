"""``RolloutEvaluation``: roll the policy being trained out on held-out questions during ``fit``.

Every ``every_n_val_epochs`` validation runs (and once at the end of training) the callback plays full conversations
of ``pl_module.model`` with the teacher on a fixed set of held-out questions (greedy by default, seeded), scores them
with the reward, and logs (see below). Fits without validation (``--data.val_fraction 0``, as in ``make demo``) use
``evals_per_epoch`` instead: that many evaluations per training epoch, evenly spaced over its batches; ``at_fit_start``
adds the untrained policy (step 0) as the curve's first point. Two triggers at the same step evaluate once. It logs:

* scalars ``<prefix>/accuracy``, ``<prefix>/accuracy_se``, ``<prefix>/reward``, ``<prefix>/thinking_pct``, … (every
  finite value of :func:`clarify_lit.evaluate.metrics.compute_metrics`) written to every logger at
  ``trainer.global_step`` (the step the files, text and histogram carry); after a validation-time evaluation they
  are also put in ``trainer.callback_metrics`` (``pl_module.log(..., logger=False)``), so
  ``ModelCheckpoint(monitor="rollout/accuracy")`` works;
* TensorBoard text ``<prefix>/conversation_<i>``: the first ``n_text_examples`` conversations rendered as Markdown
  (always the same questions, so the slider shows one conversation evolve over training) and a histogram
  ``<prefix>/reward_hist``;
* files ``<run dir>/rollouts/step_XXXXXX.jsonl`` (``write_records``) and ``step_XXXXXX.metrics.json`` (the format of
  ``clarify evaluate``; ``clarify report`` reads both).

Side effects are contained: the model is put in eval mode and every submodule's train/eval flag is restored after;
the shared tokenizer's padding/truncation sides are restored; torch/Python/NumPy RNG states are forked, so the
seeded rollout neither depends on nor disturbs the training randomness; no gradients are recorded.

Distributed: questions are sharded across ranks (``tasks[rank::world_size]``), each rank rolls out its shard, the
metrics are reduced through :class:`RolloutMetrics` (sum states) so every rank logs the same values, and the records
are gathered (``all_gather_object``) for rank zero, which alone writes files and TensorBoard text. Under FSDP the
rollout runs inside ``summon_full_params``; DeepSpeed ZeRO-3 is not supported (parameters are partitioned).
"""

from __future__ import annotations

import copy
import json
import logging
import math
import random
import time
import warnings
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback

from clarify_lit.data.records import ConversationRecord, write_records
from clarify_lit.data.tasks import QATask
from clarify_lit.environment import environment_stamp
from clarify_lit.evaluate.metrics import RolloutMetrics, final_answer, is_correct, nan_to_none
from clarify_lit.io import atomic_write_text
from clarify_lit.models import DTYPES, DType, DTypeChoice, FrozenModels, resolve_dtype
from clarify_lit.simulate.options import (
    FLAT_ROLLOUT_FLAGS,
    DataOptions,
    RewardOptions,
    RolloutOptions,
    TeacherOptions,
    build_reward,
    build_teacher,
    load_data_tasks,
)
from clarify_lit.simulate.prompts import Mode, Setting, split_instruction
from clarify_lit.simulate.rewards import Reward
from clarify_lit.simulate.rollout import RolloutSpec, rollout_tasks
from clarify_lit.simulate.teachers import Teacher

log = logging.getLogger(__name__)


def load_eval_tasks(data: DataOptions | None = None, n_questions: int | None = None) -> list[QATask]:
    """The held-out questions: the first ``n_questions`` of the **test** part of ``data``.

    ``data`` takes ``clarify simulate``'s data options (dataset, path, columns, seed, n_train, n_test, …), loaded the
    same way, so copying the simulate config's ``data`` block gives the questions that simulation did *not* train
    on. ``data.part`` is always replaced by ``"test"`` (evaluation never runs on the training part) and
    ``data.limit`` must be unset (``n_questions`` says how many).
    """
    data = data or DataOptions()
    if data.limit is not None:
        raise ValueError(f"data.limit={data.limit}: evaluation takes the number of questions from n_questions")
    if data.part != "test":
        log.info("evaluation uses the held-out test part (data.part=%r replaced by 'test')", data.part)
    if n_questions is not None and n_questions < 1:
        raise ValueError(f"n_questions must be >= 1, got {n_questions}")
    tasks = load_data_tasks(replace(data, part="test", limit=None))
    if n_questions is not None:
        if n_questions > len(tasks):
            raise ValueError(
                f"n_questions={n_questions} but only {len(tasks)} held-out questions are available "
                f"(dataset {data.dataset!r}, n_test={data.n_test})"
            )
        tasks = tasks[:n_questions]
    return tasks


def build_teacher_and_reward(
    teacher: TeacherOptions | None,
    reward: RewardOptions | None,
    *,
    base_model: str | None,
    setting: Setting,
    device: torch.device | str,
    batch_size: int = 8,
    mode: Mode = "thinking",
) -> tuple[Teacher, Reward]:
    """The teacher and reward objects, built exactly as ``clarify simulate`` builds them from the same options.

    ``base_model`` (the policy's *base*, never the trained weights) is the default teacher/judge model, so every
    method is evaluated against the same teacher and judge. Teacher and judge share one frozen copy when they are
    the same model.
    """
    models = FrozenModels(device)
    policy = base_model or ""
    return (
        build_teacher(teacher, setting=setting, policy=policy, models=models, batch_size=batch_size, mode=mode),
        build_reward(reward, policy=policy, models=models, batch_size=batch_size, mode=mode),
    )


# ---------------------------------------------------------------------------------------------------------------
# Side-effect-free rollout
# ---------------------------------------------------------------------------------------------------------------
TOKENIZER_STATE = ("padding_side", "truncation_side")


@contextmanager
def isolated(module: torch.nn.Module, tokenizer: Any) -> Iterator[None]:
    """Eval mode, no grad, forked RNGs; on exit every submodule's mode, the tokenizer sides and RNGs are restored.

    Each submodule's flag is restored, not just the root's: a module that was deliberately frozen in eval mode
    (e.g. a reference copy) must not come back in train mode.
    """
    import numpy as np

    modes = [(m, m.training) for m in module.modules()]
    tok_state = {a: getattr(tokenizer, a) for a in TOKENIZER_STATE if hasattr(tokenizer, a)}
    py_state, np_state = random.getstate(), np.random.get_state()
    devices = [torch.cuda.current_device()] if torch.cuda.is_available() and torch.cuda.is_initialized() else []
    try:
        with torch.random.fork_rng(devices=devices), torch.no_grad():
            module.eval()
            yield
    finally:
        for m, was_training in modes:
            m.training = was_training
        for a, v in tok_state.items():
            setattr(tokenizer, a, v)
        random.setstate(py_state)
        np.random.set_state(np_state)


def generation_copy(model: torch.nn.Module, dtype: DType) -> torch.nn.Module:
    """A copy of ``model`` in ``dtype`` with any LoRA adapter merged into its weights — what ``clarify evaluate
    --export_dir … --dtype`` generates with — so the training weights (and their dtype) are left alone."""
    twin = copy.deepcopy(model)
    if hasattr(twin, "merge_and_unload"):  # a peft model: merge, so each decode step runs plain linear layers
        twin = twin.merge_and_unload()
    return twin.to(dtype=DTYPES[dtype]).eval()


def run_rollouts(
    model: torch.nn.Module,
    tokenizer: Any,
    tasks: Sequence[QATask],
    spec: RolloutSpec,
    *,
    teacher: Teacher | None = None,
    reward: Reward | None = None,
    progress: bool = False,
    model_name: str = "",
    dtype: DType | None = None,
) -> list[ConversationRecord]:
    """:func:`rollout_tasks` inside :func:`isolated` (no-op for an empty task list); with ``dtype``, on a merged copy
    in that dtype (:func:`generation_copy`)."""
    if not tasks:
        return []
    with isolated(model, tokenizer):
        policy = generation_copy(model, dtype) if dtype is not None else model
        try:
            return rollout_tasks(
                policy,
                tokenizer,
                list(tasks),
                spec,
                teacher=teacher,
                reward=reward,
                progress=progress,
                model_name=model_name,
            )
        finally:
            del policy  # the copy's memory goes back before training resumes


# ---------------------------------------------------------------------------------------------------------------
# Rendering
# ---------------------------------------------------------------------------------------------------------------
ROLE_NAMES = {"system": "System", "user": "Teacher", "assistant": "Assistant"}


def _md_escape(text: str) -> str:
    # TensorBoard renders Markdown and strips raw HTML: escape it so "<thinking>" tags stay visible
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


def _quote(text: str) -> str:
    # blockquote with hard line breaks (two trailing spaces) so the turn's own line structure survives
    return "\n".join("> " + (line + "  " if line.strip() else "") for line in _md_escape(text).splitlines())


def render_markdown(record: ConversationRecord) -> str:
    """A readable Markdown view of one conversation: header (question id, gold, parsed answer, reward), then each
    turn with its role in bold; the per-turn instructions appended to teacher turns are shown apart, in italics."""
    pred = final_answer(record) or "—"
    mark = "correct" if record.gold is not None and is_correct(record) else "wrong"
    lines = [
        f"**{_md_escape(record.task_id)}** (run {record.run}, T={record.temperature:g}) · gold "
        f"**{record.gold}** · parsed **{pred}** ({mark}) · reward **{record.reward:.3f}**",
        "",
    ]
    for m in record.messages:
        text, instruction = split_instruction(m["content"]) if m["role"] == "user" else (m["content"], None)
        lines += [f"**{ROLE_NAMES.get(m['role'], m['role'])}**", "", _quote(text) or "> (empty)", ""]
        if instruction:
            lines += [f"> *instruction: {_md_escape(instruction)}*", ""]
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------------------------
# Distributed helpers
# ---------------------------------------------------------------------------------------------------------------
def _dist_ready() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized()


def gather_records(records: list[ConversationRecord], world_size: int) -> list[ConversationRecord]:
    """All ranks' records on every rank (``all_gather_object``); the local list when not distributed."""
    if world_size <= 1 or not _dist_ready():
        return list(records)
    buckets: list[Any] = [None] * world_size
    torch.distributed.all_gather_object(buckets, [r.to_dict() for r in records])
    return [ConversationRecord(**d) for bucket in buckets for d in bucket]


@contextmanager
def full_params(trainer: L.Trainer) -> Iterator[None]:
    """Gather FSDP-sharded parameters for generation; refuse DeepSpeed ZeRO-3 with a clear message."""
    strategy = getattr(trainer, "strategy", None)
    name = type(strategy).__name__
    if name == "DeepSpeedStrategy" and getattr(strategy, "zero_stage_3", False):
        raise RuntimeError(
            "RolloutEvaluation cannot generate under DeepSpeed ZeRO-3 (parameters are partitioned); "
            "use ZeRO-2, DDP or FSDP, or evaluate the exported model with `clarify evaluate`"
        )
    if name == "FSDPStrategy":
        from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

        with FSDP.summon_full_params(strategy.model, writeback=False, recurse=True):
            yield
        return
    yield


def _hparam(pl_module: L.LightningModule, key: str) -> Any:
    """A saved hyperparameter of the module, or ``None`` (modules without ``save_hyperparameters`` work too)."""
    hp = getattr(pl_module, "hparams", None)
    return hp.get(key) if hasattr(hp, "get") else None


# ---------------------------------------------------------------------------------------------------------------
# The callback
# ---------------------------------------------------------------------------------------------------------------
GREEDY = RolloutOptions(temperatures=[0.0])  # the callback's rollout default (never modified: each use copies it)


class RolloutEvaluation(Callback):
    """Roll the trained policy out on held-out questions during training and log accuracy, reward, Thinking %, ….

    Args:
        data: the questions, with ``clarify simulate``'s data options (``dataset``, ``path``, ``columns``, ``seed``,
            ``n_train``, ``n_test``, …; copy the simulate config's block): its held-out **test** part is used
            (``part`` is overridden). Default: OpenBookQA, seed 0, 400/100.
        n_questions: how many held-out questions to roll out (the first of the test part; fixed across evaluations).
        rollout: how conversations are played and generated (``clarify simulate``'s ``--rollout.*`` options:
            ``setting``, ``mode``, ``n_turns``, ``max_new_tokens``, ``batch_size``, ``seed`` — the same at every
            evaluation —, ``reuse_kv_cache``, …); greedy unless ``temperatures`` says otherwise (default ``[0.0]``,
            also when the block gives other options only).
        teacher: who answers the student (the options of ``clarify simulate``: ``kind`` scripted / retrieval /
            llm, ``backend``, ``model``, ``endpoint``, …); default: scripted (reasoning) or retrieval (clarifying).
            An ``llm`` teacher defaults to the policy's *base* model, the same for every method.
        reward: how a conversation is scored (``clarify simulate``'s options: ``kind`` correct / gold_prob /
            llm_judge / weighted, ``judge_model``, ``backend``, ``endpoint``, ``weights``, …); default: correct.
        every_n_val_epochs: evaluate every N validation runs (sanity checks excluded); 0 = never during validation.
        evals_per_epoch: evaluate this many times per training epoch, after evenly spaced batches (the last at the
            epoch's end), for fits without validation; 0 = off. Under gradient accumulation a point between two
            optimizer steps shows the last step's weights (one evaluation per ``global_step``).
        at_fit_start: also evaluate the untrained policy before the first step (step 0; skipped when resuming).
        at_fit_end: also evaluate when training ends (skipped if the last validation already evaluated that step).
        dtype: generate with a copy of the policy in this dtype, LoRA merged (as ``clarify evaluate --dtype`` loads
            an export); ``auto`` (what ``configs/callbacks/rollout-eval.yaml`` and the demo presets use) resolves on
            the module's device as ``clarify evaluate --dtype auto`` does: bfloat16 where it is native (a CPU with
            avx512_bf16 or amx_bf16: ~2x faster than fp32 there), else float32 (docs/environment.md). ``None``
            (the class default): generate with the training module itself (no copy: the choice for models too large
            to copy, or sharded under FSDP).
        n_text_examples: conversations written to TensorBoard as text at each evaluation.
        log_prefix: prefix of every logged name.
        write_files: write ``rollouts/step_XXXXXX.{jsonl,metrics.json}`` in the run directory.
        progress: show a progress bar for the rollout (rank zero).
        **deprecated: the rollout options given flat (``max_new_tokens=40``; ``temperature=0.0``, one run):
            accepted for one release with a warning; give them in ``rollout``.
    """

    def __init__(
        self,
        data: DataOptions | None = None,
        n_questions: int | None = 20,
        rollout: RolloutOptions = GREEDY,
        teacher: TeacherOptions | None = None,
        reward: RewardOptions | None = None,
        every_n_val_epochs: int = 1,
        evals_per_epoch: int = 0,
        at_fit_start: bool = False,
        at_fit_end: bool = True,
        dtype: DTypeChoice | None = None,
        n_text_examples: int = 3,
        log_prefix: str = "rollout",
        write_files: bool = True,
        progress: bool = False,
        **deprecated: Any,
    ) -> None:
        if every_n_val_epochs < 0:
            raise ValueError(f"every_n_val_epochs must be >= 0, got {every_n_val_epochs}")
        if evals_per_epoch < 0:
            raise ValueError(f"evals_per_epoch must be >= 0, got {evals_per_epoch}")
        rollout = _with_flat_options(rollout, deprecated)
        rollout.check()
        self.data = data or DataOptions()
        self.n_questions = n_questions
        self.spec = RolloutSpec.of(rollout)
        self.teacher_options = teacher
        self.reward_options = reward
        self.every_n_val_epochs = every_n_val_epochs
        self.evals_per_epoch = evals_per_epoch
        self.at_fit_start = at_fit_start
        self.at_fit_end = at_fit_end
        self.dtype = dtype
        self.resolved_dtype: DType | None = None  # `dtype` resolved on the module's device (_ensure_built)
        self.n_text_examples = n_text_examples
        self.prefix = log_prefix.rstrip("/")
        self.write_files = write_files
        self.progress = progress
        self.tasks: list[QATask] | None = None
        self._teacher = None
        self._reward = None
        self.val_runs = 0  # validation runs seen (persisted in checkpoints: "every N" survives a resume)
        self.last_eval_step: int | None = None
        self.last_metrics: dict[str, float] | None = None

    # -- Lightning hooks ----------------------------------------------------------------------------------------
    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        """Load the questions once (every rank: each rolls out its own shard); a bad data config fails here."""
        if self.tasks is None:
            self.tasks = load_eval_tasks(self.data, self.n_questions)

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # not in setup(): the strategy moves the module to its device after setup, and teacher/judge models follow it
        self._ensure_built(pl_module)

    def _ensure_built(self, pl_module: L.LightningModule) -> None:
        """Resolve ``dtype`` and build the teacher and reward once, on the module's device (judge/teacher models load
        here)."""
        if self.dtype is not None and self.resolved_dtype is None:
            self.resolved_dtype = resolve_dtype(self.dtype, pl_module.device)
        if self._teacher is None or self._reward is None:
            self._teacher, self._reward = build_teacher_and_reward(
                self.teacher_options,
                self.reward_options,
                base_model=_hparam(pl_module, "model_name_or_path"),
                setting=self.spec.setting,
                device=pl_module.device,
                batch_size=self.spec.batch_size,
                mode=self.spec.mode,
            )

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # not on_fit_start: a resumed fit's global_step is restored only after it (a resume is never step 0)
        if self.at_fit_start and trainer.global_step == 0 and self.last_eval_step is None:
            self._log_scalars(trainer, self.scalars(self.evaluate(trainer, pl_module)))

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if self.evals_per_epoch == 0 or self.last_eval_step == trainer.global_step:
            return
        if (batch_idx + 1) in self.epoch_marks(trainer.num_training_batches):
            self._log_scalars(trainer, self.scalars(self.evaluate(trainer, pl_module)))

    def epoch_marks(self, n_batches: float) -> set[int]:
        """The batch counts (1-based) within an epoch after which to evaluate: ``evals_per_epoch`` evenly spaced,
        the last at the epoch's end; only the end for an epoch of unknown length (an iterable dataset)."""
        if not math.isfinite(n_batches) or n_batches < 1:
            return set()  # on_train_epoch_end covers it
        n = int(n_batches)
        return {math.ceil(n * k / self.evals_per_epoch) for k in range(1, self.evals_per_epoch + 1)}

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # the epoch-end point when the epoch length was unknown to on_train_batch_end
        if (
            self.evals_per_epoch
            and not math.isfinite(trainer.num_training_batches)
            and self.last_eval_step != trainer.global_step
        ):
            self._log_scalars(trainer, self.scalars(self.evaluate(trainer, pl_module)))

    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.sanity_checking:
            return
        self.val_runs += 1
        if self.every_n_val_epochs == 0 or self.val_runs % self.every_n_val_epochs:
            return
        if self.last_eval_step == trainer.global_step and self.last_metrics is not None:
            # evals_per_epoch already evaluated these weights (the batch end before this validation): reuse it
            pl_module.log_dict(
                self.scalars(self.last_metrics), on_step=False, on_epoch=True, sync_dist=False, logger=False
            )
            return
        values = self.scalars(self.evaluate(trainer, pl_module))
        # callback_metrics only (logger=False), so ModelCheckpoint/EarlyStopping can monitor them; the loggers get
        # them from _log_scalars at trainer.global_step, the step the text, histogram and files also use
        pl_module.log_dict(values, on_step=False, on_epoch=True, sync_dist=False, logger=False)
        self._log_scalars(trainer, values)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # on_train_end, not on_fit_end: the latter runs after strategy teardown (model possibly moved off the GPU)
        if not self.at_fit_end or self.last_eval_step == trainer.global_step:
            return
        self._log_scalars(trainer, self.scalars(self.evaluate(trainer, pl_module)))

    def scalars(self, values: Mapping[str, float]) -> dict[str, float]:
        """The prefixed, finite values (an SE of one sample is NaN: nothing to plot)."""
        return {f"{self.prefix}/{k}": float(v) for k, v in values.items() if math.isfinite(v)}

    @staticmethod
    def _log_scalars(trainer: L.Trainer, values: dict[str, float]) -> None:
        if not trainer.is_global_zero:
            return
        for logger in trainer.loggers:
            logger.log_metrics(values, step=trainer.global_step)
            logger.save()

    def state_dict(self) -> dict[str, Any]:
        return {"val_runs": self.val_runs, "last_eval_step": self.last_eval_step}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.val_runs = int(state_dict.get("val_runs", 0))
        self.last_eval_step = state_dict.get("last_eval_step")

    # -- the evaluation -----------------------------------------------------------------------------------------
    def evaluate(self, trainer: L.Trainer, pl_module: L.LightningModule) -> dict[str, float]:
        """Roll out this rank's shard, reduce the metrics over ranks, write files/text on rank zero; return metrics.

        Must be called on every rank (it holds collectives).
        """
        if self.tasks is None:
            self.setup(trainer, pl_module, "fit")
        self._ensure_built(pl_module)
        assert self.tasks is not None
        world, rank = max(1, trainer.world_size), trainer.global_rank
        shard = self.tasks[rank::world]
        start, cpu_start = time.perf_counter(), time.process_time()
        with full_params(trainer):
            local = run_rollouts(
                pl_module.model,
                pl_module.tokenizer,
                shard,
                self.spec,
                teacher=self._teacher,
                reward=self._reward,
                progress=self.progress and trainer.is_global_zero,
                model_name=str(_hparam(pl_module, "model_name_or_path") or ""),
                dtype=self.resolved_dtype,
            )
        seconds, cpu_seconds = time.perf_counter() - start, time.process_time() - cpu_start
        metric = RolloutMetrics(
            tokenizer=pl_module.tokenizer, setting=self.spec.setting, choices={t.task_id: t.choices for t in self.tasks}
        )
        if pl_module.device.type != "mps":  # NCCL reduces CUDA tensors only; MPS has no float64
            metric = metric.to(pl_module.device)
        metric.update(local)
        values = metric.compute()  # synced over ranks
        values["seconds"] = seconds
        # this process's CPU time (all threads): the evaluation's cost even on a busy machine, where wall time is not
        values["cpu_seconds"] = cpu_seconds
        records = gather_records(local, world)
        order = {t.task_id: i for i, t in enumerate(self.tasks)}
        records.sort(key=lambda r: (order.get(r.task_id, len(order)), r.run))
        # trainer.log_dir is a collective under DDP (a broadcast from rank 0): every rank must ask, not only rank 0
        run_dir = self.run_dir(trainer)
        if trainer.is_global_zero:
            self._write(trainer, pl_module, records, values, run_dir)
        self.last_eval_step = trainer.global_step
        self.last_metrics = values
        return values

    def run_dir(self, trainer: L.Trainer) -> Path:
        """``trainer.log_dir``, else ``default_root_dir``. Call on every rank (``log_dir`` broadcasts under DDP)."""
        return Path(trainer.log_dir or trainer.default_root_dir)

    def _write(
        self,
        trainer: L.Trainer,
        pl_module: L.LightningModule,
        records: list[ConversationRecord],
        values: dict[str, float],
        run_dir: Path,
    ) -> None:
        step = trainer.global_step
        if self.write_files:
            folder = run_dir / "rollouts"
            path = write_records(folder / f"step_{step:06d}.jsonl", records)
            meta = self.run_meta(pl_module, step, path.name)
            atomic_write_text(
                folder / f"step_{step:06d}.metrics.json",
                json.dumps(nan_to_none({"metrics": values, "meta": meta}), indent=2),
            )
        tb = next(
            (
                lg.experiment
                for lg in trainer.loggers
                if type(lg).__name__ == "TensorBoardLogger" and hasattr(lg.experiment, "add_text")
            ),
            None,
        )
        if tb is None:
            return
        for i, rec in enumerate(records[: self.n_text_examples]):
            tb.add_text(f"{self.prefix}/conversation_{i}", render_markdown(rec), global_step=step)
        rewards = [r.reward for r in records if not r.meta.get("reward_missing")]  # not the placeholder zeros
        if rewards:
            import numpy as np

            tb.add_histogram(f"{self.prefix}/reward_hist", np.asarray(rewards), global_step=step)
        tb.flush()

    def run_meta(self, pl_module: L.LightningModule, step: int, rollouts: str) -> dict[str, Any]:
        """The ``meta`` block of ``step_XXXXXX.metrics.json`` (same keys as ``clarify evaluate``)."""
        objective = (_hparam(pl_module, "objective_config") or {}).get("class")
        dtype = self.resolved_dtype or _weights_dtype(pl_module)  # None: generated with the module's own weights
        return {
            "method": objective or type(pl_module).__name__,
            "model": _hparam(pl_module, "model_name_or_path") or "",
            "source": "callback",
            "step": step,
            "n": len(self.tasks or []) * len(self.spec.temperatures),
            "n_questions": len(self.tasks or []),
            "dataset": self.data.label or self.data.dataset,
            "data": asdict(self.data),
            "teacher": self._teacher.describe() if self._teacher else None,
            "reward": self._reward.describe() if self._reward else None,
            "dtype": dtype,
            **self.spec.describe(),
            "rollouts": rollouts,
            "environment": environment_stamp(pl_module.device, dtype),
        }


def _with_flat_options(rollout: RolloutOptions, flat: dict[str, Any]) -> RolloutOptions:
    """``rollout`` with the rollout options given flat to the callback (before the block), each reported in one
    deprecation line; any other unknown keyword is an error."""
    if "temperature" in flat:  # the callback's one temperature, before the block's list
        flat["temperatures"] = [flat.pop("temperature")]
    unknown = sorted(set(flat) - set(FLAT_ROLLOUT_FLAGS))
    if unknown:
        raise TypeError(f"RolloutEvaluation got unexpected options {unknown}")
    for name in flat:
        warnings.warn(
            f"RolloutEvaluation({name}=...) is deprecated, use rollout={{{name!r}: ...}}", FutureWarning, stacklevel=3
        )
    return replace(rollout, **flat)


def _weights_dtype(pl_module: L.LightningModule) -> str | None:
    """The dtype name of the module's first parameter (``float32`` …), None for a module without parameters."""
    param = next(iter(pl_module.parameters()), None)
    return str(param.dtype).removeprefix("torch.") if param is not None else None
