"""The on-disk cache of precomputed DPO reference log-probs (hit, miss, invalidation on data or weight change), the
precomputed reference under full fine-tuning and mixed precision, and gradient checkpointing's equivalence."""

from __future__ import annotations

import json
import math

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import Callback

from clarify_lit.data.datamodule import ConversationDataModule, PadCollator
from clarify_lit.train.module import ClarifyModule
from clarify_lit.train.objectives import DPO, Refit
from clarify_lit.train.reference_cache import (
    ReferenceCache,
    fingerprint_parameters,
    pair_key,
    reference_parameters,
)


@pytest.fixture
def own_cache(tmp_path, monkeypatch):
    """An empty ``$CLARIFY_CACHE`` for this test (the tiny model is given by path, so it is not rebuilt)."""
    cache = tmp_path / "cache"
    monkeypatch.setenv("CLARIFY_CACHE", str(cache))
    return cache


@pytest.fixture
def cache_stats(monkeypatch):
    """Records ``(hits, misses, path)`` of every ``ReferenceCache.save`` call."""
    seen = []
    orig = ReferenceCache.save

    def save(self):
        seen.append((self.hits, self.misses, self.path))
        orig(self)

    monkeypatch.setattr(ReferenceCache, "save", save)
    return seen


class Losses(Callback):
    def __init__(self):
        self.losses = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.losses.append(float(outputs["loss"]))


def fit_dpo(tiny_model_dir, records, tmp_path, *, use_lora=True, precision="32-true", max_steps=1, **kw):
    torch.manual_seed(0)
    module = ClarifyModule(
        model_name_or_path=str(tiny_model_dir),
        objective=DPO(reference="precomputed"),
        use_lora=use_lora,
        lora_r=4,
        lora_alpha=8,
        export_on_fit_end=False,
        **kw,
    )
    dm = ConversationDataModule(
        [str(records)],
        tokenizer_name_or_path=str(tiny_model_dir),
        val_fraction=0.0,
        batch_size=2,
        cache_tokenized=False,
    )
    rec = Losses()
    L.Trainer(
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        limit_val_batches=0,
        max_steps=max_steps,
        precision=precision,
        default_root_dir=str(tmp_path),
        callbacks=[rec],
    ).fit(module, datamodule=dm)
    return module, dm, rec


def ref_values(dm):
    return {s["id"]: (s["ref_chosen_logps"], s["ref_rejected_logps"]) for s in dm.train_set.samples}


def test_second_fit_reads_the_cache(records_factory, tiny_model_dir, tmp_path, own_cache, cache_stats):
    records = records_factory(n_tasks=4)
    _, dm1, _ = fit_dpo(tiny_model_dir, records, tmp_path / "a")
    assert cache_stats[-1][:2] == (0, 4)  # cold: every pair computed
    path = cache_stats[-1][2]
    assert path.exists() and path.is_relative_to(own_cache / "reference_logps")
    _, dm2, rec = fit_dpo(tiny_model_dir, records, tmp_path / "b")
    assert cache_stats[-1][:2] == (4, 0)  # warm: every pair read back, none computed
    assert ref_values(dm1) == ref_values(dm2)
    assert abs(rec.losses[0] - math.log(2)) < 1e-6


def test_changed_pair_is_recomputed_and_others_hit(records_factory, tiny_model_dir, tmp_path, own_cache, cache_stats):
    records = records_factory(n_tasks=4)
    _, dm1, _ = fit_dpo(tiny_model_dir, records, tmp_path / "a")
    rows = [json.loads(line) for line in records.read_text().splitlines()]
    changed = next(
        r
        for r in rows
        if r["task_id"] == "t1" and r["reward"] == max(x["reward"] for x in rows if x["task_id"] == "t1")
    )
    changed["messages"][-1]["content"] = "The answer is D, because of energy."  # t1's chosen final answer
    records.write_text("".join(json.dumps(r) + "\n" for r in rows))
    _, dm2, _ = fit_dpo(tiny_model_dir, records, tmp_path / "b")
    assert cache_stats[-1][:2] == (3, 1)
    before, after = ref_values(dm1), ref_values(dm2)
    assert after["t1#dpo"] != before["t1#dpo"]
    assert {k: v for k, v in after.items() if k != "t1#dpo"} == {k: v for k, v in before.items() if k != "t1#dpo"}


def test_other_weights_or_precision_use_another_entry(tiny_model_dir, own_cache):
    module = ClarifyModule(model_name_or_path=str(tiny_model_dir), lora_r=4, export_on_fit_end=False)
    a = ReferenceCache.for_model(module.model, "32-true").path
    assert ReferenceCache.for_model(module.model, "bf16-mixed").path != a
    # the adapter is not part of the reference (it is disabled): training it keeps the entry
    with torch.no_grad():
        next(p for n, p in module.model.named_parameters() if "lora_B" in n).add_(1.0)
    assert ReferenceCache.for_model(module.model, "32-true").path == a
    with torch.no_grad():
        next(p for n, p in module.model.named_parameters() if "lora_" not in n).add_(1e-3)
    assert ReferenceCache.for_model(module.model, "32-true").path != a
    names = [n for n, _ in reference_parameters(module.model)]
    assert names and not any("lora_" in n for n in names)
    full = ClarifyModule(model_name_or_path=str(tiny_model_dir), use_lora=False, export_on_fit_end=False)
    assert len(reference_parameters(full.model)) == len(list(full.model.parameters()))
    assert fingerprint_parameters([("x", torch.ones(2))]) != fingerprint_parameters([("x", torch.ones(3))])


def test_pair_key_follows_tokens():
    s = {
        "chosen_input_ids": [1, 2],
        "chosen_labels": [-100, 2],
        "rejected_input_ids": [1, 3],
        "rejected_labels": [-100, 3],
        "id": "a",
    }
    assert pair_key(s) == pair_key({**s, "id": "b"})
    assert pair_key(s) != pair_key({**s, "rejected_labels": [-100, -100]})


def test_unreadable_cache_is_a_miss(tmp_path):
    bad = tmp_path / "x.pt"
    bad.write_bytes(b"not a torch file")
    cache = ReferenceCache(bad)
    assert cache.table == {}


def test_cache_off_writes_nothing(records_factory, tiny_model_dir, tmp_path, own_cache):
    fit_dpo(tiny_model_dir, records_factory(n_tasks=3), tmp_path, reference_cache=False)
    assert not (own_cache / "reference_logps").exists()


@pytest.mark.parametrize("use_lora, precision", [(False, "32-true"), (True, "bf16-mixed")])
def test_precomputed_reference_is_the_policy_at_step_0(
    records_factory, tiny_model_dir, tmp_path, own_cache, use_lora, precision
):
    """Full fine-tuning works with a precomputed reference (the model itself at fit start), and the reference is
    computed under the training forward's precision: DPO's first loss is log 2 exactly, also under bf16 autocast."""
    _, dm, rec = fit_dpo(
        tiny_model_dir,
        records_factory(n_tasks=4),
        tmp_path,
        use_lora=use_lora,
        precision=precision,
        max_steps=2,
        learning_rate=1e-2,
    )
    assert all(s["ref_chosen_logps"] < 0 for s in dm.train_set.samples)
    # bf16: batches padded differently round differently (~1e-6); an fp32 reference would be ~1e-4 off
    assert abs(rec.losses[0] - math.log(2)) < (1e-5 if precision == "bf16-mixed" else 1e-6)
    assert abs(rec.losses[1] - math.log(2)) > 1e-6  # the policy moved, the reference stayed


@pytest.mark.parametrize("use_lora", [True, False])
def test_gradient_checkpointing_gives_the_same_loss_and_gradients(records_factory, tiny_model_dir, use_lora):
    dm = ConversationDataModule(
        [str(records_factory(n_tasks=2))],
        tokenizer_name_or_path=str(tiny_model_dir),
        val_fraction=0.0,
        cache_tokenized=False,
        objective=Refit(),
    )
    dm.setup("fit")
    batch = PadCollator(dm.tokenizer.pad_token_id)(dm.train_set.samples[:4])
    results = []
    for gc in (False, True):
        torch.manual_seed(0)
        module = ClarifyModule(
            model_name_or_path=str(tiny_model_dir),
            use_lora=use_lora,
            lora_r=4,
            lora_dropout=0.0,
            gradient_checkpointing=gc,
            export_on_fit_end=False,
        )
        if use_lora:  # non-zero B so that the adapter carries gradient to A as well
            with torch.no_grad():
                for n, p in module.model.named_parameters():
                    if "lora_B" in n:
                        p.normal_(0, 0.1, generator=torch.Generator().manual_seed(1))
        module.model.train()
        base = module.model.get_base_model() if use_lora else module.model
        assert base.is_gradient_checkpointing == gc
        loss, _ = module._step(batch, "val")
        loss.backward()
        grads = {n: p.grad.clone() for n, p in module.model.named_parameters() if p.grad is not None}
        results.append((loss.detach(), grads))
    (l0, g0), (l1, g1) = results
    assert g0 and g0.keys() == g1.keys()
    assert torch.allclose(l0, l1, atol=1e-6)
    assert all(torch.allclose(g0[n], g1[n], atol=1e-6, rtol=1e-4) for n in g0)
