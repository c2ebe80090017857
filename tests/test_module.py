"""ClarifyModule on the tiny model: target log-probs, gradient accumulation invariance, DPO at policy == reference,
checkpoint round trip and configuration errors."""

from __future__ import annotations

import math
import shutil

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import Callback

from clarify_lit.data.datamodule import ConversationDataModule, PadCollator
from clarify_lit.train.module import ClarifyModule, build_objective, target_logps
from clarify_lit.train.objectives import DPO, SFT, Refit, Swift

pytestmark = pytest.mark.usefixtures("clarify_cache")


def make_module(tiny_model_dir, **kw) -> ClarifyModule:
    kw.setdefault("lora_r", 4)
    kw.setdefault("lora_alpha", 8)
    kw.setdefault("export_on_fit_end", False)
    return ClarifyModule(model_name_or_path=str(tiny_model_dir), **kw)


def make_dm(path, tiny_model_dir, **kw) -> ConversationDataModule:
    kw.setdefault("val_fraction", 0.0)
    kw.setdefault("cache_tokenized", False)
    return ConversationDataModule([str(path)], tokenizer_name_or_path=str(tiny_model_dir), **kw)


def make_trainer(tmp_path, callbacks=(), **kw) -> L.Trainer:
    return L.Trainer(
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        limit_val_batches=0,
        default_root_dir=str(tmp_path),
        callbacks=list(callbacks),
        **kw,
    )


class Recorder(Callback):
    """Records per-batch losses, micro-batch count and the accumulated gradients at each optimizer step."""

    def __init__(self):
        self.losses, self.grads, self.micro_batches = [], [], 0

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.micro_batches += 1

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.losses.append(float(outputs["loss"]))

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        self.grads.append(
            {
                n: p.grad.detach().clone()
                for n, p in pl_module.named_parameters()
                if p.requires_grad and p.grad is not None
            }
        )


def collated(dm, n=3):
    dm.setup("fit")
    return PadCollator(dm.tokenizer.pad_token_id)(dm.train_set.samples[:n])


def full_logits_reference(model, batch):
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1].float()
    targets = batch["labels"][:, 1:]
    mask = targets != -100
    lp = torch.log_softmax(logits, -1).gather(-1, targets.clamp_min(0).unsqueeze(-1)).squeeze(-1)
    return lp * mask, mask


# ------------------------------------------------------------------------------------------------ target log-probs
@pytest.mark.parametrize("use_lora", [False, True])
def test_target_logps_equal_full_log_softmax(records_factory, tiny_model_dir, use_lora):
    torch.manual_seed(0)
    module = make_module(tiny_model_dir, use_lora=use_lora, lora_dropout=0.0)
    if use_lora:  # make the adapter non-trivial (B is zero at init), so its contribution is checked too
        for n, p in module.model.named_parameters():
            if "lora_B" in n:
                torch.nn.init.normal_(p, std=0.5)
    model = module.model.eval()
    batch = collated(make_dm(records_factory(n_tasks=2), tiny_model_dir))
    assert (batch["attention_mask"] == 0).any()  # padded rows are part of the check
    with torch.no_grad():
        ref, ref_mask = full_logits_reference(model, batch)
        for chunk in (1024, 7):
            lp, mask = target_logps(model, batch["input_ids"], batch["attention_mask"], batch["labels"], chunk)
            assert torch.equal(mask, ref_mask) and mask.sum() > 0
            assert torch.allclose(lp, ref, atol=1e-5, rtol=1e-5)
            assert (lp[~mask] == 0).all() and (lp[mask] < 0).all()
    if use_lora:  # the adapter really changes the result
        with torch.no_grad(), model.disable_adapter():
            base, _ = full_logits_reference(model, batch)
        assert not torch.allclose(base, ref, atol=1e-3)


def test_target_logps_gradient_flows_to_lora(records_factory, tiny_model_dir):
    module = make_module(tiny_model_dir, lora_dropout=0.0)
    batch = collated(make_dm(records_factory(n_tasks=2), tiny_model_dir))
    lp, mask = target_logps(module.model, batch["input_ids"], batch["attention_mask"], batch["labels"])
    (-lp.sum()).backward()
    grads = {n: p.grad for n, p in module.model.named_parameters() if p.requires_grad}
    assert grads and all("lora_" in n for n in grads)
    assert all(g.abs().sum() > 0 for n, g in grads.items() if "lora_B" in n)
    assert all(p.grad is None for p in module.model.parameters() if not p.requires_grad)


# ------------------------------------------------------------------------------------------------ accumulation
def _one_step_grads(tmp_path, tiny_model_dir, path, batch_size, accumulate):
    torch.manual_seed(0)  # same LoRA init in both runs
    module = make_module(tiny_model_dir, objective=Refit(), lora_dropout=0.0, learning_rate=1e-3)
    dm = make_dm(path, tiny_model_dir, batch_size=batch_size, group_by_length=True)
    rec = Recorder()
    make_trainer(tmp_path, [rec], max_steps=1, accumulate_grad_batches=accumulate).fit(module, datamodule=dm)
    assert len(rec.grads) == 1
    return rec, dm


def test_one_by_eight_equals_eight_by_one(records_factory, tiny_model_dir, tmp_path):
    # 3 tasks × 3 runs with different rewards and lengths: the per-micro-batch token means would differ
    path = records_factory(n_tasks=3, n_runs=3, rewards=lambda t, r: [1.0, 0.0, 0.5, 0.25][(t + r) % 4] + 0.1 * t)
    big, dm = _one_step_grads(tmp_path / "a", tiny_model_dir, path, batch_size=8, accumulate=1)
    small, _ = _one_step_grads(tmp_path / "b", tiny_model_dir, path, batch_size=1, accumulate=8)
    assert (big.micro_batches, small.micro_batches) == (1, 8)
    trained = [s["trained"] for s in dm.train_set.samples]
    assert len(set(trained)) > 1  # unequal token counts: a naive per-micro-batch mean would not match
    g_big, g_small = big.grads[0], small.grads[0]
    assert g_big.keys() == g_small.keys() and any("lora_B" in n for n in g_big)
    flat_big = torch.cat([g_big[n].flatten() for n in sorted(g_big)])
    flat_small = torch.cat([g_small[n].flatten() for n in sorted(g_small)])
    assert flat_big.norm() > 0
    rel = ((flat_big - flat_small).norm() / flat_big.norm()).item()
    assert rel < 1e-6, rel


# ------------------------------------------------------------------------------------------------ DPO reference
@pytest.mark.parametrize("use_lora, mode", [(True, "adapter_disabled"), (False, "frozen_copy")])
def test_dpo_policy_equal_reference_gives_log2(records_factory, tiny_model_dir, tmp_path, use_lora, mode):
    module = make_module(
        tiny_model_dir,
        objective=DPO(beta=0.1),
        use_lora=use_lora,
        learning_rate=1e-2,
        warmup_ratio=0.0,
        lr_schedule="constant",
    )
    assert module._reference_mode() == mode
    dm = make_dm(records_factory(n_tasks=4), tiny_model_dir, batch_size=2)
    rec = Recorder()
    make_trainer(tmp_path, [rec], max_steps=2).fit(module, datamodule=dm)
    # first batch: LoRA B = 0 (adapter off == on), or an exact frozen copy: the DPO argument is 0
    assert abs(rec.losses[0] - math.log(2)) < 1e-6
    # after one update the policy moved away from the reference (which stayed put)
    assert abs(rec.losses[1] - math.log(2)) > 1e-6
    if mode == "frozen_copy":
        ref = module._frozen_reference[0]
        assert all(not p.requires_grad for p in ref.parameters())
        assert not any(k.startswith("_frozen") for k in module.state_dict())  # not saved, not optimised
        ref_ids = {id(p) for p in ref.parameters()}
        assert not ref_ids & {id(p) for p in module.parameters()}
        base = ClarifyModule(model_name_or_path=str(tiny_model_dir), use_lora=False).model
        assert all(torch.equal(a, b) for a, b in zip(ref.state_dict().values(), base.state_dict().values()))


@pytest.mark.parametrize("mode", ["frozen_copy", "precomputed"])
def test_full_finetuning_dpo_resume_keeps_the_original_reference(records_factory, tiny_model_dir, tmp_path, mode):
    """A resumed full-fine-tuning DPO fit must keep the starting model as its reference, not the resumed policy
    (Lightning loads the checkpoint before on_fit_start, so the copy is taken in setup)."""
    from lightning.pytorch.callbacks import ModelCheckpoint

    records = records_factory(n_tasks=4)
    kw = dict(
        objective=DPO(beta=0.1, reference=mode),
        use_lora=False,
        learning_rate=1e-2,
        warmup_ratio=0.0,
        lr_schedule="constant",
    )
    first = make_module(tiny_model_dir, **kw)
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True)
    L.Trainer(
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        limit_val_batches=0,
        callbacks=[ckpt],
        max_steps=2,
        default_root_dir=str(tmp_path),
    ).fit(first, datamodule=make_dm(records, tiny_model_dir, batch_size=2))
    dm = make_dm(records, tiny_model_dir, batch_size=2)
    resumed = make_module(tiny_model_dir, **kw)
    seen = {}

    class Peek(Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            if mode == "frozen_copy":
                ref = pl_module._frozen_reference[0]
                seen["ref"] = {k: v.clone() for k, v in ref.state_dict().items()}
            seen["policy"] = {k: v.clone() for k, v in pl_module.model.state_dict().items()}

    make_trainer(tmp_path, [Peek()], max_steps=3).fit(
        resumed, datamodule=dm, ckpt_path=str(tmp_path / "ckpt" / "last.ckpt")
    )
    base = ClarifyModule(model_name_or_path=str(tiny_model_dir), use_lora=False).model.state_dict()
    assert any(not torch.equal(seen["policy"][k], base[k]) for k in base)  # the resumed policy has moved
    if mode == "frozen_copy":
        assert all(torch.equal(seen["ref"][k], base[k]) for k in base)  # the reference has not
    else:  # reference log-probs of the starting weights: recompute them with a fresh (untrained) module
        fresh_dm = make_dm(records, tiny_model_dir, batch_size=2)
        make_trainer(tmp_path / "fresh", max_steps=0).fit(make_module(tiny_model_dir, **kw), datamodule=fresh_dm)
        got = sorted(s["ref_chosen_logps"] for s in dm.train_set.samples)
        want = sorted(s["ref_chosen_logps"] for s in fresh_dm.train_set.samples)
        assert got == pytest.approx(want, abs=1e-6)
        assert resumed._frozen_reference is None  # the copy is dropped after the precomputation


def test_dpo_precomputed_reference(records_factory, tiny_model_dir, tmp_path):
    module = make_module(tiny_model_dir, objective=DPO(reference="precomputed"))
    dm = make_dm(records_factory(n_tasks=4), tiny_model_dir, batch_size=2, val_fraction=0.25)
    rec = Recorder()
    make_trainer(tmp_path, [rec], max_steps=1).fit(module, datamodule=dm)
    # reference log-probs were computed once, before training, for train and val samples
    for ds in (dm.train_set, dm.val_set):
        assert all(s["ref_chosen_logps"] < 0 and s["ref_rejected_logps"] < 0 for s in ds.samples)
    assert module.objective.reference == "precomputed"
    # at init the policy equals the reference (LoRA B = 0); batches differ in padding only
    assert abs(rec.losses[0] - math.log(2)) < 1e-5


def test_dpo_step_on_a_real_batch_without_trainer(records_factory, tiny_model_dir):
    module = make_module(tiny_model_dir, objective=DPO(beta=0.5))
    batch = collated(make_dm(records_factory(n_tasks=3), tiny_model_dir, objective=DPO()), n=3)
    assert batch["n_pairs"] == 3 and batch["input_ids"].shape[0] == 6
    with torch.no_grad():
        loss, metrics = module._step(batch, "val")
    assert abs(loss.item() - math.log(2)) < 1e-6
    assert metrics["rewards/margins"].item() == 0.0 and metrics["logps/chosen"].item() < 0


def test_dpo_reference_mode_checks(tiny_model_dir):
    with pytest.raises(ValueError, match="use_lora"):
        make_module(tiny_model_dir, objective=DPO(reference="adapter_disabled"), use_lora=False)._reference_mode()


# ------------------------------------------------------------------------------------------------ checkpoints
def test_from_checkpoint_restores_objective_and_adapter(records_factory, tiny_model_dir, tmp_path):
    objective = Swift(zero_std="epsilon", epsilon=1e-3, min_weight=-1.0)
    module = make_module(tiny_model_dir, objective=objective, learning_rate=1e-2, lora_r=2)
    dm = make_dm(records_factory(n_tasks=3), tiny_model_dir, batch_size=4)
    trainer = make_trainer(tmp_path, max_steps=1)
    trainer.fit(module, datamodule=dm)
    path = tmp_path / "m.ckpt"
    trainer.save_checkpoint(path)
    ckpt = torch.load(path, map_location="cpu", weights_only=False)
    assert ckpt["hyper_parameters"]["objective_config"] == {
        "class": "Swift",
        "zero_std": "epsilon",
        "min_std": 1e-6,
        "epsilon": 1e-3,
        "min_weight": -1.0,
    }
    assert all("lora_" in k for k in ckpt["state_dict"] if k.startswith("model."))  # adapter only under LoRA

    restored = ClarifyModule.from_checkpoint(path)
    assert isinstance(restored.objective, Swift) and vars(restored.objective) == vars(objective)
    assert restored.hparams.lora_r == 2
    trained = module.state_dict()
    for k, v in restored.state_dict().items():
        assert torch.equal(v, trained[k]), k

    # a plain dict round trip for the other objectives
    for obj in (Refit(), SFT(top_k=2, min_reward=0.5), DPO(beta=0.3, pairs="final_answer", min_gap=0.2)):
        config = {"class": type(obj).__name__, **vars(obj)}
        again = build_objective(config)
        assert type(again) is type(obj) and vars(again) == vars(obj)
    with pytest.raises(ValueError, match="unknown objective"):
        build_objective({"class": "PPO"})


def test_hparams_record_the_objective(tiny_model_dir):
    module = make_module(tiny_model_dir, objective=DPO(beta=0.2, pairs="final_answer"))
    assert module.hparams.objective_config == {
        "class": "DPO",
        "beta": 0.2,
        "pairs": "final_answer",
        "min_gap": 1e-6,
        "reference": "auto",
    }
    assert module.is_dpo and not make_module(tiny_model_dir).is_dpo


# ------------------------------------------------------------------------------------------------ configuration errors
def test_missing_lora_target_module_is_named(tiny_model_dir):
    with pytest.raises(ValueError) as e:
        make_module(tiny_model_dir, lora_target_modules=["q_proj", "qkv_proj"])
    msg = str(e.value)
    assert "qkv_proj" in msg and "not found" in msg and "q_proj" in msg and "down_proj" in msg  # lists what exists


def test_tokenizer_without_chat_template_is_refused(tiny_model_dir, tmp_path):
    bare = tmp_path / "no-template"
    shutil.copytree(tiny_model_dir, bare)
    (bare / "chat_template.jinja").unlink()
    with pytest.raises(ValueError, match="no chat template"):
        ClarifyModule(model_name_or_path=str(bare))


def test_lora_freezes_base_and_full_finetuning_trains_all(tiny_model_dir):
    lora = make_module(tiny_model_dir, lora_target_modules=["q_proj", "v_proj", "down_proj"])
    trainable = [n for n, p in lora.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    assert {n.split(".lora_A")[0].rsplit(".", 1)[-1] for n in trainable if "lora_A" in n} == {
        "q_proj",
        "v_proj",
        "down_proj",
    }
    full = make_module(tiny_model_dir, use_lora=False)
    assert all(p.requires_grad for p in full.parameters())
    assert lora.model.training and full.model.training


def test_default_lazy_objective_is_recorded_by_its_real_name(tiny_model_dir):
    """The CLI's default ``lazy_instance(Refit)`` must be stored as 'Refit' so from_checkpoint can rebuild it."""
    from clarify_lit.train.module import ClarifyModule, build_objective
    from clarify_lit.train.objectives import Refit

    module = ClarifyModule(str(tiny_model_dir))
    assert module.hparams["objective_config"] == {"class": "Refit"}
    assert type(build_objective(module.hparams["objective_config"])) is Refit


# ------------------------------------------------------------------------------------------------ zero-weight skip
class BatchWeights(Callback):
    """The weights of every trained micro-batch."""

    def __init__(self):
        self.weights: list[list[float]] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.weights.append(batch["weights"].tolist())


def _train_params(
    tmp_path, tiny_model_dir, path, skip: bool, steps: int, batch_size: int, accumulate: int, monkeypatch
):
    """Train ``steps`` optimizer steps; return the trainable parameters, the rows that went through the model and
    the micro-batches' weights."""
    import clarify_lit.train.module as module_mod

    seen = []
    real = module_mod.target_logps

    def counting(model, input_ids, *args, **kw):
        seen.append(input_ids.shape[0])
        return real(model, input_ids, *args, **kw)

    monkeypatch.setattr(module_mod, "target_logps", counting)
    torch.manual_seed(0)
    module = make_module(
        tiny_model_dir,
        objective=Refit(),
        lora_dropout=0.0,
        learning_rate=1e-2,
        skip_zero_weight=skip,
        warmup_ratio=0.0,
        lr_schedule="constant",
    )
    dm = make_dm(path, tiny_model_dir, batch_size=batch_size, group_by_length=True)
    rec = BatchWeights()
    make_trainer(tmp_path, [rec], max_steps=steps, accumulate_grad_batches=accumulate).fit(module, datamodule=dm)
    params = {n: p.detach().clone() for n, p in module.named_parameters() if p.requires_grad}
    return params, sum(seen), rec.weights


@pytest.mark.parametrize("batch_size, accumulate", [(2, 1), (2, 3)])
def test_zero_weight_skip_keeps_the_trajectory(
    records_factory, tiny_model_dir, tmp_path, monkeypatch, batch_size, accumulate
):
    """Refit with most rewards 0: skipping the weight-0 conversations gives the same parameters after k steps
    (AdamW moments included: all-zero micro-batches still step with an exact zero gradient), computing only the
    non-zero rows."""
    nonzero = {(0, 1): 1.0, (2, 0): 0.5, (3, 2): 1.0}
    path = records_factory(n_tasks=5, n_runs=3, rewards=lambda t, r: nonzero.get((t, r), 0.0))
    steps = 5
    before, rows_before, weights = _train_params(
        tmp_path / "a", tiny_model_dir, path, False, steps, batch_size, accumulate, monkeypatch
    )
    after, rows_after, weights_after = _train_params(
        tmp_path / "b", tiny_model_dir, path, True, steps, batch_size, accumulate, monkeypatch
    )
    assert weights_after == weights  # the same micro-batches in the same order
    assert rows_before == sum(len(w) for w in weights)
    assert rows_after == sum(x != 0 for w in weights for x in w) < rows_before
    assert any(all(x == 0 for x in w) for w in weights)  # the all-zero path ran
    assert max(p.abs().max().item() for n, p in before.items() if "lora_B" in n) > 1e-3  # training moved B
    for n in before:
        assert torch.allclose(before[n], after[n], atol=1e-6, rtol=0), n
