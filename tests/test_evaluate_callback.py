"""RolloutEvaluation: side-effect freedom, files/TensorBoard output, scheduling, DDP sharding, and `clarify fit`."""

from __future__ import annotations

import glob
import json
import os
import random
import tempfile
from datetime import timedelta
from pathlib import Path
from types import SimpleNamespace

import lightning as L
import pytest
import torch
import yaml
from lightning.pytorch.loggers import TensorBoardLogger

from clarify_lit.data.records import load_records
from clarify_lit.evaluate.callback import RolloutEvaluation, isolated, load_eval_tasks, render_markdown
from clarify_lit.evaluate.metrics import compute_metrics, nan_to_none
from clarify_lit.simulate.options import DataOptions, RolloutOptions

REPO = Path(__file__).resolve().parents[1]
TINY_TASKS = REPO / "configs" / "simulate" / "tiny-tasks.jsonl"
COLUMNS = {"question": "question", "choices": "choices", "answer": "answer", "id": "id", "knowledge": "knowledge"}


def tiny_data() -> DataOptions:
    """The 8 local toy questions: 4 held out (test part), 4 train."""
    return DataOptions(dataset="local", path=str(TINY_TASKS), label="tiny", columns=dict(COLUMNS), n_train=4, n_test=4)


def greedy(max_new_tokens: int) -> RolloutOptions:
    """One greedy run per question, ``max_new_tokens`` per turn."""
    return RolloutOptions(temperatures=[0.0], max_new_tokens=max_new_tokens)


class TinyPolicy(L.LightningModule):
    """A minimal module with the attributes the callback uses: ``model`` (HF causal LM) and ``tokenizer``."""

    def __init__(self, model_dir: str):
        super().__init__()
        from clarify_lit.models import load_causal_lm, load_tokenizer

        self.model = load_causal_lm(model_dir).train()
        self.tokenizer = load_tokenizer(model_dir)

    def training_step(self, batch, batch_idx):
        return self.model(input_ids=batch[0], labels=batch[0]).loss

    def validation_step(self, batch, batch_idx):
        self.log("val_loss", self.model(input_ids=batch[0], labels=batch[0]).loss)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=1e-3)

    def _loader(self):
        data = torch.utils.data.TensorDataset(torch.randint(3, 100, (4, 8), generator=torch.Generator().manual_seed(0)))
        return torch.utils.data.DataLoader(data, batch_size=2)

    train_dataloader = _loader
    val_dataloader = _loader


class FakeTrainer(SimpleNamespace):
    """What ``RolloutEvaluation.evaluate`` reads from a trainer, without running one. Like Lightning's,
    ``log_dir`` is a collective under DDP (a broadcast from rank 0): asking on one rank only deadlocks."""

    @property
    def log_dir(self) -> str:
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            box = [self.root]
            torch.distributed.broadcast_object_list(box, src=0)
            return box[0]
        return self.root


def fake_trainer(root: Path, step: int = 7, logger: bool = True, world_size: int = 1, rank: int = 0):
    loggers = [TensorBoardLogger(str(root), name="", version="")] if logger else []
    return FakeTrainer(
        world_size=world_size,
        global_rank=rank,
        is_global_zero=rank == 0,
        global_step=step,
        loggers=loggers,
        root=str(root),
        default_root_dir=str(root),
        sanity_checking=False,
        strategy=None,
    )


def read_events(folder: Path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    files = sorted(glob.glob(str(folder / "**" / "events.out.tfevents.*"), recursive=True))
    assert files, f"no TensorBoard event file under {folder}"
    accs = []
    for f in files:
        ea = EventAccumulator(f, size_guidance={"scalars": 0, "tensors": 0, "histograms": 0})
        ea.Reload()
        accs.append(ea)
    return accs


def scalar_steps(accs, tag: str) -> list[int]:
    return sorted(e.step for ea in accs if tag in ea.Tags()["scalars"] for e in ea.Scalars(tag))


# --- held-out questions ---------------------------------------------------------------------------------------------
def test_eval_tasks_are_the_test_part():
    data = tiny_data()
    data.part = "train"  # a copied simulate block: evaluation must still take the test part
    tasks = load_eval_tasks(data, n_questions=3)
    assert len(tasks) == 3 and all(t.meta["part"] == "test" for t in tasks)
    assert [t.task_id for t in tasks] == [t.task_id for t in load_eval_tasks(tiny_data())][:3]  # fixed, ordered
    with pytest.raises(ValueError, match="only 4 held-out"):
        load_eval_tasks(tiny_data(), n_questions=5)
    with pytest.raises(ValueError, match="data.limit"):
        load_eval_tasks(DataOptions(limit=3))


# --- side effects ---------------------------------------------------------------------------------------------------
def test_isolated_restores_modes_tokenizer_and_rng(tiny_model_dir):
    policy = TinyPolicy(str(tiny_model_dir))
    frozen = policy.model.model.layers[0]
    frozen.eval()  # a submodule deliberately in eval mode inside a training module
    policy.tokenizer.padding_side = "right"
    torch.manual_seed(123)
    random.seed(5)
    before = torch.get_rng_state().clone(), random.getstate()
    with isolated(policy, policy.tokenizer):
        assert not policy.training and not policy.model.training
        policy.tokenizer.padding_side = "left"
        torch.manual_seed(0)
        torch.rand(3)
        random.random()
        assert not torch.is_grad_enabled()
    assert policy.training and policy.model.training and not frozen.training
    assert policy.tokenizer.padding_side == "right"
    assert torch.equal(torch.get_rng_state(), before[0]) and random.getstate() == before[1]


def test_evaluate_writes_files_and_tensorboard_without_side_effects(tiny_model_dir, tmp_path):
    policy = TinyPolicy(str(tiny_model_dir))
    policy.model.model.layers[1].eval()
    policy.tokenizer.padding_side = "right"
    modes = {n: m.training for n, m in policy.named_modules()}
    rng = torch.get_rng_state().clone()
    cb = RolloutEvaluation(data=tiny_data(), n_questions=3, rollout=greedy(4), n_text_examples=2)
    trainer = fake_trainer(tmp_path, step=7)
    cb.setup(trainer, policy, "fit")
    values = cb.evaluate(trainer, policy)

    assert {n: m.training for n, m in policy.named_modules()} == modes
    assert policy.tokenizer.padding_side == "right"
    assert torch.equal(torch.get_rng_state(), rng)
    records, _ = load_records(tmp_path / "rollouts" / "step_000007.jsonl")
    assert [r.task_id for r in records] == [t.task_id for t in cb.tasks]
    expected = compute_metrics(records, policy.tokenizer, setting="reasoning")
    assert values["n"] == 3 and values["accuracy"] == expected["accuracy"]
    assert values["tokens_per_turn"] == pytest.approx(expected["tokens_per_turn"])
    saved = json.loads((tmp_path / "rollouts" / "step_000007.metrics.json").read_text())
    assert saved["meta"]["rollouts"] == "step_000007.jsonl" and saved["meta"]["step"] == 7
    assert saved["metrics"]["accuracy"] == values["accuracy"]
    trainer.loggers[0].experiment.flush()
    (ea,) = read_events(tmp_path)
    assert {"rollout/conversation_0/text_summary", "rollout/conversation_1/text_summary"} <= set(ea.Tags()["tensors"])
    assert "rollout/conversation_2/text_summary" not in ea.Tags()["tensors"]  # n_text_examples=2
    assert ea.Histograms("rollout/reward_hist")[0].step == 7

    # same seed, same questions: a second evaluation repeats the first exactly (greedy, seeded, isolated)
    trainer.global_step = 8
    assert cb.evaluate(trainer, policy) == {
        **values,
        "seconds": cb.last_metrics["seconds"],
        "cpu_seconds": cb.last_metrics["cpu_seconds"],
    }
    again, _ = load_records(tmp_path / "rollouts" / "step_000008.jsonl")
    assert [r.messages for r in again] == [r.messages for r in records]


def test_render_markdown_marks_roles_and_keeps_tags_visible(tiny_model_dir):
    from clarify_lit.data.records import ConversationRecord

    rec = ConversationRecord(
        id="x",
        task_id="tiny/q1",
        gold="A",
        reward=1.0,
        messages=[
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "Q?\n\n[Instructions for your reply: one line]"},
            {"role": "assistant", "content": "The answer is A <thinking>because</thinking>"},
        ],
    )
    text = render_markdown(rec)
    assert "**System**" in text and "**Teacher**" in text and "**Assistant**" in text
    assert "&lt;thinking&gt;because&lt;/thinking&gt;" in text  # escaped, so TensorBoard shows the tags
    assert "*instruction: one line*" in text and "parsed **A** (correct)" in text


# --- inside a real Trainer ----------------------------------------------------------------------------------------
def quiet_trainer(root: Path, cb: RolloutEvaluation, **kwargs) -> L.Trainer:
    """A Trainer with the callback, TensorBoard in ``root``, no progress bar, summary or checkpoints."""
    return L.Trainer(
        default_root_dir=str(root),
        callbacks=[cb],
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        logger=TensorBoardLogger(str(root), name="", version=""),
        log_every_n_steps=1,
        **kwargs,
    )


def test_trainer_schedule_and_tensorboard_scalars(tiny_model_dir, tmp_path):
    policy = TinyPolicy(str(tiny_model_dir))
    cb = RolloutEvaluation(data=tiny_data(), n_questions=2, rollout=greedy(3), every_n_val_epochs=2)
    trainer = quiet_trainer(tmp_path, cb, max_epochs=3, num_sanity_val_steps=1)
    trainer.fit(policy)
    # 3 validation epochs (steps 2, 4, 6) → evaluated at the 2nd (step 4); at fit end (step 6) once more
    assert sorted(p.name for p in (tmp_path / "rollouts").glob("*.jsonl")) == ["step_000004.jsonl", "step_000006.jsonl"]
    accs = read_events(tmp_path)
    assert scalar_steps(accs, "rollout/accuracy") == [4, 6]
    assert scalar_steps(accs, "rollout/accuracy_se") == [4, 6]
    assert "rollout/accuracy" in trainer.callback_metrics  # monitorable by ModelCheckpoint
    assert cb.state_dict() == {"val_runs": 3, "last_eval_step": 6}


def test_train_progress_schedule_without_validation(tiny_model_dir, tmp_path):
    """evals_per_epoch + at_fit_start (fits without validation, as the demo's): step 0, then evenly spaced batches."""
    policy = TinyPolicy(str(tiny_model_dir))
    cb = RolloutEvaluation(data=tiny_data(), n_questions=2, rollout=greedy(3), evals_per_epoch=2, at_fit_start=True)
    trainer = quiet_trainer(tmp_path, cb, max_epochs=2, limit_val_batches=0)
    trainer.fit(policy)
    # 2 batches per epoch, 2 evaluations per epoch: after every step; the fit-end evaluation repeats step 4: skipped
    assert scalar_steps(read_events(tmp_path), "rollout/accuracy") == [0, 1, 2, 3, 4]
    assert cb.epoch_marks(10) == {5, 10} and cb.epoch_marks(3) == {2, 3} and cb.epoch_marks(float("inf")) == set()


def test_train_progress_and_validation_at_one_step_evaluate_once(tiny_model_dir, tmp_path):
    policy = TinyPolicy(str(tiny_model_dir))
    cb = RolloutEvaluation(data=tiny_data(), n_questions=2, rollout=greedy(3), evals_per_epoch=1)
    trainer = quiet_trainer(tmp_path, cb, max_epochs=1, num_sanity_val_steps=0)
    trainer.fit(policy)
    assert [p.name for p in (tmp_path / "rollouts").glob("*.jsonl")] == ["step_000002.jsonl"]
    assert "rollout/accuracy" in trainer.callback_metrics  # the validation still exposes it for ModelCheckpoint


def test_dtype_generates_with_a_merged_copy(tiny_model_dir, tmp_path):
    from peft import LoraConfig, get_peft_model

    from clarify_lit.evaluate.callback import generation_copy

    policy = TinyPolicy(str(tiny_model_dir))
    policy.model = get_peft_model(policy.model, LoraConfig(r=2, target_modules=["q_proj"], task_type="CAUSAL_LM"))
    before = {k: v.clone() for k, v in policy.model.state_dict().items()}
    twin = generation_copy(policy.model, "bfloat16")
    assert not hasattr(twin, "peft_config") and next(twin.parameters()).dtype == torch.bfloat16 and not twin.training
    cb = RolloutEvaluation(data=tiny_data(), n_questions=2, rollout=greedy(3), dtype="bfloat16")
    trainer = fake_trainer(tmp_path, step=3)
    values = cb.evaluate(trainer, policy)
    assert values["n"] == 2 and values["cpu_seconds"] > 0
    after = policy.model.state_dict()  # the training weights: untouched, still fp32, adapter still separate
    assert after.keys() == before.keys() and all(torch.equal(before[k], after[k]) for k in before)
    meta = json.loads((tmp_path / "rollouts" / "step_000003.metrics.json").read_text())["meta"]
    assert meta["dtype"] == "bfloat16" and meta["environment"]["dtype"] == "bfloat16"  # the environment stamp


# --- DDP: shards, reduced metrics, rank-zero files ------------------------------------------------------------------
def _ddp_evaluate(rank: int, world: int, init_file: str, root: str, model_dir: str) -> None:
    torch.set_num_threads(1)  # forked child: stay out of the parent's OpenMP pool
    torch.distributed.init_process_group(
        "gloo", init_method=f"file://{init_file}", rank=rank, world_size=world, timeout=timedelta(seconds=60)
    )  # a collective bug fails, not hangs
    try:
        policy = TinyPolicy(model_dir)
        cb = RolloutEvaluation(data=tiny_data(), n_questions=3, rollout=greedy(3))
        trainer = fake_trainer(Path(root), step=5, logger=False, world_size=world, rank=rank)
        values = cb.evaluate(trainer, policy)
        torch.save(values, os.path.join(root, f"rank{rank}.pt"))
    finally:
        torch.distributed.destroy_process_group()


def test_ddp_sharded_rollout_gathers_on_rank_zero(tiny_model_dir):
    import torch.multiprocessing as mp

    with tempfile.TemporaryDirectory() as tmp:
        method = "fork" if "fork" in mp.get_all_start_methods() else "spawn"
        mp.start_processes(
            _ddp_evaluate,
            args=(2, os.path.join(tmp, "init"), tmp, str(tiny_model_dir)),
            nprocs=2,
            join=True,
            start_method=method,
        )
        v0, v1 = (torch.load(os.path.join(tmp, f"rank{r}.pt")) for r in range(2))
        records, _ = load_records(Path(tmp) / "rollouts" / "step_000005.jsonl")
    # 3 questions over 2 ranks (2 + 1): all gathered, in question order, and both ranks logged the same metrics
    assert [r.task_id for r in records] == [t.task_id for t in load_eval_tasks(tiny_data(), 3)]
    for v in (v0, v1):
        v.pop("seconds"), v.pop("cpu_seconds")
    assert nan_to_none(v0) == nan_to_none(v1) and v0["n"] == 3
    assert v0["words_per_turn"] == pytest.approx(compute_metrics(records)["words_per_turn"])


# --- `clarify fit` with the callback --------------------------------------------------------------------------------
def test_clarify_fit_with_callback_logs_rollout_accuracy(clarify_cache, records_factory, tmp_path):
    from clarify_lit.cli import main

    records = records_factory(n_tasks=4, n_runs=2)
    cfg = tmp_path / "callback.yaml"
    cfg.write_text(
        yaml.safe_dump(
            {
                "trainer": {
                    "callbacks": [
                        {
                            "class_path": "clarify_lit.evaluate.callback.RolloutEvaluation",
                            "init_args": {
                                "data": {**vars(tiny_data())},
                                "n_questions": 2,
                                "rollout": {"max_new_tokens": 3},
                                "reward": {"kind": "correct"},
                            },
                        }
                    ]
                }
            }
        )
    )
    root = tmp_path / "run"
    main(
        [
            "fit",
            "--config",
            str(REPO / "configs/trainer/cpu.yaml"),
            "--config",
            str(REPO / "configs/model/tiny.yaml"),
            "--config",
            str(cfg),
            "--data.train_files",
            f"[{records}]",
            "--data.val_fraction",
            "0.25",
            "--trainer.max_epochs",
            "1",
            "--trainer.default_root_dir",
            str(root),
            "--trainer.enable_progress_bar",
            "false",
            "--model.export_on_fit_end",
            "false",
        ]
    )
    accs = read_events(root)
    steps = scalar_steps(accs, "rollout/accuracy")
    assert len(steps) == 1  # validation at epoch end; the fit-end evaluation is skipped (same step)
    files = list((root / "rollouts").glob("step_*.metrics.json"))
    meta = json.loads(files[0].read_text())["meta"]
    assert meta["method"] == "Refit" and meta["model"] == "tiny-random" and meta["step"] == steps[0]
