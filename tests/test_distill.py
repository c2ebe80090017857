"""STaR-GATE-D: the distillation loss on hand-computed numbers, its chunked module form against full logits, zero KL
for teacher == student, the teacher loaded from an SFT run's export, and ``clarify fit`` with the preset."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from conftest import make_record

from clarify_lit.data.datamodule import ConversationDataModule, PadCollator
from clarify_lit.data.records import ConversationRecord
from clarify_lit.train.losses import distillation_loss
from clarify_lit.train.module import ClarifyModule, distill_logits_loss
from clarify_lit.train.objectives import SFT, Distill

pytestmark = pytest.mark.usefixtures("clarify_cache")
ROOT = Path(__file__).resolve().parents[1]
QUIET = ["--trainer.enable_progress_bar=false", "--trainer.enable_model_summary=false"]


# ------------------------------------------------------------------------------------------------ the pure loss
def test_distillation_loss_hand_computed():
    # the docstring's example: p = (3/4, 1/4), q = (1/2, 1/2) at T = 2
    loss, m = distillation_loss(
        torch.tensor([[0.0, 0.0]]),
        torch.tensor([[2 * math.log(3), 0.0]]),
        torch.tensor([0]),
        alpha=0.5,
        temperature=2.0,
    )
    kl = 0.75 * math.log(1.5) + 0.25 * math.log(0.5)
    assert abs(kl - 0.130812) < 1e-6
    assert abs(m["kl"].item() - kl) < 1e-6 and abs(m["nll"].item() - math.log(2)) < 1e-6
    assert abs(loss.item() - 0.608198) < 1e-6
    # two positions, α = 0.25, T = 1, N = 4 tokens in the optimizer step: student (ln 3, 0) → q = (3/4, 1/4);
    # teacher (0, 0) → p = (1/2, 1/2); KL(p‖q) = ½ ln(2/3) + ½ ln 2 = ½ ln(4/3) = 0.143841 per position;
    # CE: target 0 → −ln(3/4) = 0.287682, target 1 → −ln(1/4) = 1.386294;
    # loss = (0.25·1·2·0.143841 + 0.75·(0.287682 + 1.386294)) / 4 = (0.071921 + 1.255482) / 4 = 0.331851
    student = torch.tensor([[math.log(3), 0.0], [math.log(3), 0.0]], requires_grad=True)
    loss, m = distillation_loss(
        student, torch.zeros(2, 2), torch.tensor([0, 1]), alpha=0.25, temperature=1.0, num_tokens=4
    )
    assert abs(loss.item() - 0.331851) < 1e-6
    assert abs(m["kl"].item() - 2 * 0.143841 / 4) < 1e-6
    # gradient wrt the student logits: [α·T·(q_T − p_T) + (1 − α)·(softmax − onehot)] / N
    loss.backward()
    q, p = torch.tensor([0.75, 0.25]), torch.tensor([0.5, 0.5])
    want = (
        torch.stack(
            [
                0.25 * (q - p) + 0.75 * (q - torch.tensor([1.0, 0.0])),
                0.25 * (q - p) + 0.75 * (q - torch.tensor([0.0, 1.0])),
            ]
        )
        / 4
    )
    assert torch.allclose(student.grad, want, atol=1e-6)


def test_distillation_loss_edges():
    logits = torch.randn(5, 7)
    y = torch.randint(0, 7, (5,))
    # teacher == student: KL 0; α = 0 is plain CE (the SFT loss)
    loss, m = distillation_loss(logits, logits, y, alpha=1.0, temperature=2.0)
    assert abs(loss.item()) < 1e-6 and abs(m["kl"].item()) < 1e-6
    ce = torch.nn.functional.cross_entropy(logits, y)
    assert torch.allclose(distillation_loss(logits, torch.randn(5, 7), y, alpha=0.0)[0], ce, atol=1e-6)
    # additive over chunks when N is the whole count
    teacher = torch.randn(5, 7)
    whole = distillation_loss(logits, teacher, y, num_tokens=5)[0]
    parts = sum(
        distillation_loss(logits[s : s + 2], teacher[s : s + 2], y[s : s + 2], num_tokens=5)[0] for s in range(0, 5, 2)
    )
    assert torch.allclose(whole, parts, atol=1e-6)
    with pytest.raises(ValueError, match="vocabulary"):
        distillation_loss(logits, torch.randn(5, 8), y)


# ------------------------------------------------------------------------------------------------ module
def _records(n_tasks: int = 3) -> list[ConversationRecord]:
    return [ConversationRecord(**make_record(t, r, [1.0, 0.0, 0.5][r])) for t in range(n_tasks) for r in range(3)]


def _batch(tiny_model_dir, records_factory, objective, n=3):
    dm = ConversationDataModule(
        [str(records_factory(n_tasks=n))],
        tokenizer_name_or_path=str(tiny_model_dir),
        val_fraction=0.0,
        cache_tokenized=False,
        objective=objective,
    )
    dm.setup("fit")
    return PadCollator(dm.tokenizer.pad_token_id)(dm.train_set.samples[:n])


def test_distill_view_is_the_sft_view():
    records = _records()
    got, stats = Distill(teacher="x").build_view(records)
    want, _ = SFT().build_view(records)
    assert (
        [(e.id, e.weight) for e in got]
        == [(e.id, e.weight) for e in want]
        == [("t0-r0", 1.0), ("t1-r0", 1.0), ("t2-r0", 1.0)]
    )
    for bad in (dict(alpha=1.5), dict(temperature=0.0)):
        with pytest.raises(ValueError):
            Distill(teacher="x", **bad)


def test_chunked_module_loss_equals_full_logits(tiny_model_dir, records_factory):
    from clarify_lit.models import load_causal_lm

    objective = Distill(teacher=str(tiny_model_dir))
    batch = _batch(tiny_model_dir, records_factory, objective)
    student = ClarifyModule(
        model_name_or_path=str(tiny_model_dir), lora_r=4, lora_dropout=0.0, export_on_fit_end=False
    ).model
    with torch.no_grad():  # move the adapter off zero so student and teacher differ
        for n, p in student.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.5)
    teacher = load_causal_lm(str(tiny_model_dir)).eval()
    ids, att, labels = batch["input_ids"], batch["attention_mask"], batch["labels"]
    loss, metrics = distill_logits_loss(
        student, teacher, ids, att, labels, alpha=0.5, temperature=2.0, chunk_size=7
    )  # several chunks, activation-checkpointed
    loss.backward()
    chunked = {n: p.grad.clone() for n, p in student.named_parameters() if p.grad is not None}
    student.zero_grad()
    mask = labels[:, 1:] != -100
    s_logits = student(input_ids=ids, attention_mask=att).logits[:, :-1][mask]
    with torch.no_grad():
        t_logits = teacher(input_ids=ids, attention_mask=att).logits[:, :-1][mask]
    want, want_m = distillation_loss(s_logits, t_logits, labels[:, 1:][mask], alpha=0.5, temperature=2.0)
    want.backward()
    assert torch.allclose(loss, want, atol=1e-5) and metrics["kl"].item() > 1e-4
    assert torch.allclose(metrics["nll"], want_m["nll"], atol=1e-5) and metrics["tokens"] == mask.sum()
    assert chunked and all(
        torch.allclose(chunked[n], p.grad, atol=1e-5) for n, p in student.named_parameters() if p.grad is not None
    )
    assert all(p.grad is None for p in teacher.parameters())


def test_teacher_equal_to_student_and_alpha_one_gives_zero(tiny_model_dir, records_factory):
    # teacher = the base model; student = base + fresh LoRA (B = 0): the same distribution
    module = ClarifyModule(
        model_name_or_path=str(tiny_model_dir),
        objective=Distill(teacher=str(tiny_model_dir), alpha=1.0),
        lora_r=4,
        export_on_fit_end=False,
    )
    batch = _batch(tiny_model_dir, records_factory, module.objective)
    loss, metrics = module._step(batch, "val")
    assert abs(loss.item()) < 1e-6 and abs(metrics["kl"].item()) < 1e-6 and metrics["nll"].item() > 0
    loss.backward()
    assert all(p.grad is None or p.grad.abs().max() < 1e-6 for p in module.parameters())
    # the frozen teacher is no parameter, no state_dict entry
    teacher = module.teacher_model()
    assert not {id(p) for p in teacher.parameters()} & {id(p) for p in module.parameters()}
    assert not any("teacher" in k for k in module.state_dict())


def test_teacher_errors_are_clear(tiny_model_dir, tmp_path):
    module = ClarifyModule(model_name_or_path=str(tiny_model_dir), objective=Distill(), export_on_fit_end=False)
    with pytest.raises(ValueError, match="--model.objective.teacher"):
        module.teacher_model()
    module.objective.teacher = str(tmp_path / "runs" / "sft" / "export")
    with pytest.raises(FileNotFoundError, match="export folder"):
        module.teacher_model()


def test_fit_star_gate_d_from_an_sft_export(tiny_model_dir, records_factory, tmp_path):
    """SFT 1 step → its export is the teacher of a 2-step STaR-GATE-D fit with the preset (LoRA r 8, all
    projections)."""
    from clarify_lit.cli import lightning_main

    records = records_factory(n_tasks=5, n_runs=3)
    model = ["--config", str(ROOT / "configs/model/tiny.yaml")]
    common = [f"--data.train_files=[{records}]", "--model.model_name_or_path=tiny-random", "--data.batch_size=2"]
    sft_root = tmp_path / "sft"
    lightning_main(
        [
            "fit",
            *QUIET,
            *model,
            "--config",
            str(ROOT / "configs/objective/sft.yaml"),
            *common,
            "--trainer.max_steps=1",
            "--data.val_fraction=0",
            f"--trainer.default_root_dir={sft_root}",
        ]
    )
    export = sft_root / "export"
    assert (export / "adapter_config.json").exists()

    root = tmp_path / "distill"
    cli = lightning_main(
        [
            "fit",
            *QUIET,
            *model,
            "--config",
            str(ROOT / "configs/objective/star-gate-d.yaml"),
            *common,
            f"--model.objective.teacher={export}",
            "--model.learning_rate=1e-2",
            "--trainer.max_steps=2",
            "--data.val_fraction=0.2",
            "--trainer.val_check_interval=2",
            f"--trainer.default_root_dir={root}",
        ]
    )
    module = cli.model
    assert isinstance(module.objective, Distill) and cli.trainer.global_step == 2
    hp = module.hparams
    assert (hp.lora_r, hp.lora_alpha, hp.lora_dropout) == (8, 16, 0.05)
    assert set(hp.lora_target_modules) == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
    metrics = cli.trainer.callback_metrics
    assert torch.isfinite(metrics["val/loss"]) and "train/kl" in metrics and "val/nll" in metrics
    # the teacher is the SFT policy (its adapter merged), not the base model: KL > 0 from the first step
    assert metrics["val/kl"].item() > 0
    ckpt = torch.load(root / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    assert ckpt["hyper_parameters"]["objective_config"] == {
        "class": "Distill",
        "teacher": str(export),
        "alpha": 0.5,
        "temperature": 2.0,
        "top_k": 1,
        "min_reward": None,
    }
    assert all("lora_" in k for k in ckpt["state_dict"])  # no teacher weights in the checkpoint
    assert (root / "export" / "adapter_model.safetensors").exists()
    # a checkpoint of the distilled run reloads without loading its teacher
    again = ClarifyModule.from_checkpoint(root / "checkpoints" / "last.ckpt")
    assert isinstance(again.objective, Distill) and again._teacher is None
