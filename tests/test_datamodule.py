"""ConversationDataModule: labels built once in setup (and cached), the collator only pads, the task-level val
split, dropped samples, and the step-aware batch sampler (token counts per optimizer step, DDP shards)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from conftest import make_record

import clarify_lit.data.datamodule as dm_mod
from clarify_lit.data.datamodule import ConversationDataModule, PadCollator, StepBatchSampler
from clarify_lit.data.records import load_records, split_by_task
from clarify_lit.data.tokenization import (
    IGNORE_INDEX,
    TokenizationError,
    end_of_turn_id,
    tokenize_conversation,
)
from clarify_lit.train.objectives import DPO, SFT, Refit, Swift

pytestmark = pytest.mark.usefixtures("clarify_cache")


def make_dm(path, tiny_model_dir, **kw) -> ConversationDataModule:
    kw.setdefault("objective", Refit())
    kw.setdefault("batch_size", 2)
    return ConversationDataModule(train_files=[str(path)], tokenizer_name_or_path=str(tiny_model_dir), **kw)


@pytest.fixture
def own_cache(tmp_path, monkeypatch):
    """An empty cache just for this test (the tokenizer is given by path, so the tiny model is not rebuilt)."""
    cache = tmp_path / "cache"
    monkeypatch.setenv("CLARIFY_CACHE", str(cache))
    return cache


# ------------------------------------------------------------------------------------------------ setup
def test_setup_builds_labels_and_splits_by_task(records_factory, tiny_model_dir, tokenizer):
    path = records_factory(n_tasks=8, n_runs=3)
    dm = make_dm(path, tiny_model_dir, val_fraction=0.25, cache_tokenized=False)
    dm.setup("fit")
    records, _ = load_records(path)
    train_recs, val_recs = split_by_task(records, 0.25, 0)
    assert [s["id"] for s in dm.train_set.samples] == [r.id for r in train_recs]
    assert [s["id"] for s in dm.val_set.samples] == [r.id for r in val_recs]
    train_tasks = {s["id"].split("-")[0] for s in dm.train_set.samples}
    val_tasks = {s["id"].split("-")[0] for s in dm.val_set.samples}
    assert len(val_tasks) == 2 and not train_tasks & val_tasks and len(train_tasks | val_tasks) == 8
    by_id = {r.id: r for r in records}
    for s in dm.train_set.samples:
        expect = tokenize_conversation(tokenizer, by_id[s["id"]].messages, 1024)
        assert s["input_ids"] == expect.input_ids and s["labels"] == expect.labels  # labels made here, once
        assert s["weight"] == by_id[s["id"]].reward  # Refit
        assert s["length"] == len(s["input_ids"]) and s["trained"] == expect.num_trained
    assert dm.stats["data/train_examples"] == 18 and dm.stats["data/val_examples"] == 6
    assert dm.stats["data/skipped_records"] == 0 and dm.stats["data/train_dropped_samples"] == 0


def test_view_follows_the_module_objective(records_factory, tiny_model_dir):
    path = records_factory(n_tasks=3, n_runs=3)
    dm = ConversationDataModule(
        [str(path)], tokenizer_name_or_path=str(tiny_model_dir), val_fraction=0.0, cache_tokenized=False
    )
    dm.trainer = SimpleNamespace(lightning_module=SimpleNamespace(objective=DPO()))
    dm.setup("fit")
    assert dm.val_set is None
    assert len(dm.train_set) == 3 and {"chosen_input_ids", "rejected_labels"} <= set(dm.train_set.samples[0])
    dm2 = ConversationDataModule(
        [str(path)], tokenizer_name_or_path=str(tiny_model_dir), val_fraction=0.0, cache_tokenized=False
    )
    dm2.trainer = SimpleNamespace(lightning_module=SimpleNamespace(objective=SFT()))
    dm2.setup("fit")
    assert [s["weight"] for s in dm2.train_set.samples] == [1.0] * 3


def test_swift_weights_reach_the_samples(records_factory, tiny_model_dir):
    path = records_factory(n_tasks=2, n_runs=3, rewards={0: [1.0, 0.0, 0.0], 1: [0.0, 0.0, 0.0]})
    dm = make_dm(path, tiny_model_dir, objective=Swift(), val_fraction=0.0, cache_tokenized=False)
    dm.setup("fit")
    assert [s["weight"] for s in dm.train_set.samples] == pytest.approx([2**0.5, -(2**-0.5), -(2**-0.5)])
    assert dm.stats["data/train_excluded_zero_std_groups"] == 1


def test_tokenized_cache_is_read_back_without_retokenizing(records_factory, tiny_model_dir, own_cache, monkeypatch):
    path = records_factory(n_tasks=4, n_runs=3)
    dm = make_dm(path, tiny_model_dir, val_fraction=0.25)
    dm.setup("fit")
    files = sorted((own_cache / "tokenized").glob("*.pt"))
    assert len(files) == 2  # train and val
    first = [dict(s) for s in dm.train_set.samples]

    def boom(*a, **k):
        raise AssertionError("tokenization re-ran despite a cached dataset")

    monkeypatch.setattr(dm_mod, "tokenize_conversation", boom)
    again = make_dm(path, tiny_model_dir, val_fraction=0.25)
    again.setup("fit")
    assert again.train_set.samples == first and len(again.val_set) == len(dm.val_set)

    # a different max_length is a different cache entry: tokenization runs again
    calls = []
    monkeypatch.setattr(
        dm_mod, "tokenize_conversation", lambda *a, **k: calls.append(1) or tokenize_conversation(*a, **k)
    )
    other = make_dm(path, tiny_model_dir, val_fraction=0.25, max_length=512)
    other.setup("fit")
    assert len(calls) == 12 and len(list((own_cache / "tokenized").glob("*.pt"))) == 4
    # and a different objective view (other weights) is another entry too
    calls.clear()
    make_dm(path, tiny_model_dir, val_fraction=0.25, objective=Swift()).setup("fit")
    assert len(calls) == 12


def test_cache_off_writes_nothing(records_factory, tiny_model_dir, own_cache):
    dm = make_dm(records_factory(), tiny_model_dir, cache_tokenized=False)
    dm.setup("fit")
    assert not (own_cache / "tokenized").exists()


def test_setup_is_idempotent(records_factory, tiny_model_dir, monkeypatch):
    dm = make_dm(records_factory(), tiny_model_dir, cache_tokenized=False)
    dm.setup("fit")
    ds = dm.train_set
    monkeypatch.setattr(dm_mod, "load_records", lambda *a, **k: pytest.fail("setup ran twice"))
    dm.setup("validate")
    assert dm.train_set is ds


def test_val_files_must_not_share_tasks(records_factory, tiny_model_dir, tmp_path):
    train = records_factory(n_tasks=3, name="train.jsonl")
    from clarify_lit.data.records import write_records

    val = write_records(tmp_path / "val.jsonl", [make_record(2, r, 1.0, id=f"v{r}") for r in range(2)])
    dm = make_dm(train, tiny_model_dir, val_files=[str(val)], cache_tokenized=False)
    with pytest.raises(ValueError, match="'t2'"):
        dm.setup("fit")
    ok = write_records(tmp_path / "val_ok.jsonl", [make_record(9, r, 1.0) for r in range(2)])
    dm = make_dm(train, tiny_model_dir, val_files=[str(ok)], cache_tokenized=False)
    dm.setup("fit")
    assert len(dm.train_set) == 9 and [s["id"] for s in dm.val_set.samples] == ["t9-r0", "t9-r1"]


def test_skip_invalid_records_counted(records_factory, tiny_model_dir):
    bad = make_record(7, 0, "oops")
    path = records_factory(n_tasks=2, extra=[bad])
    with pytest.raises(Exception, match="'reward'"):
        make_dm(path, tiny_model_dir, cache_tokenized=False, val_fraction=0.0).setup("fit")
    dm = make_dm(path, tiny_model_dir, cache_tokenized=False, val_fraction=0.0, skip_invalid_records=True)
    dm.setup("fit")
    assert dm.stats["data/skipped_records"] == 1 and len(dm.train_set) == 6


def test_on_invalid_sample_drop_counts(records_factory, tiny_model_dir, tokenizer, own_cache):
    long_final = [make_record(5, r, 1.0 - r / 2) for r in range(2)]
    for rec in long_final:
        rec["messages"][-1]["content"] = "The answer is A because " + "water " * 80
    path = records_factory(n_tasks=3, n_runs=2, extra=long_final)
    max_length = 120
    records, _ = load_records(path)
    cannot = []
    for r in records:
        try:
            tokenize_conversation(tokenizer, r.messages, max_length)
        except TokenizationError:
            cannot.append(r.id)
    assert cannot == ["t5-r0", "t5-r1"]
    with pytest.raises(TokenizationError, match="t5-r0"):
        make_dm(path, tiny_model_dir, max_length=max_length, val_fraction=0.0, cache_tokenized=False).setup("fit")
    for attempt in ("tokenized", "read from the cache"):
        dm = make_dm(path, tiny_model_dir, max_length=max_length, val_fraction=0.0, on_invalid_sample="drop")
        dm.setup("fit")
        assert dm.stats["data/train_dropped_samples"] == 2, attempt
        assert [s["id"] for s in dm.train_set.samples] == [r.id for r in records if r.id not in cannot]
        assert all(len(s["input_ids"]) <= max_length for s in dm.train_set.samples)
    with pytest.raises(ValueError, match="on_invalid_sample"):
        make_dm(path, tiny_model_dir, on_invalid_sample="ignore")


# ------------------------------------------------------------------------------------------------ collator
def test_collator_only_pads_and_stacks(records_factory, tiny_model_dir, tokenizer):
    dm = make_dm(records_factory(n_tasks=2), tiny_model_dir, val_fraction=0.0, cache_tokenized=False)
    dm.setup("fit")
    samples = dm.train_set.samples[:3]
    assert len({len(s["input_ids"]) for s in samples}) > 1  # needs padding
    batch = PadCollator(tokenizer.pad_token_id)(samples)
    width = max(len(s["input_ids"]) for s in samples)
    assert batch["input_ids"].shape == batch["labels"].shape == batch["attention_mask"].shape == (3, width)
    for i, s in enumerate(samples):
        n = len(s["input_ids"])
        assert batch["input_ids"][i, :n].tolist() == s["input_ids"]
        assert batch["labels"][i, :n].tolist() == s["labels"]  # labels untouched: they were built in setup
        assert (batch["input_ids"][i, n:] == tokenizer.pad_token_id).all()
        assert (batch["labels"][i, n:] == IGNORE_INDEX).all()
        assert batch["attention_mask"][i].tolist() == [1] * n + [0] * (width - n)
    assert batch["weights"].tolist() == [s["weight"] for s in samples] and batch["ids"] == [s["id"] for s in samples]
    assert "step_tokens" not in batch


def test_collator_pairs_chosen_then_rejected(records_factory, tiny_model_dir, tokenizer):
    dm = make_dm(records_factory(n_tasks=2), tiny_model_dir, objective=DPO(), val_fraction=0.0, cache_tokenized=False)
    dm.setup("fit")
    samples = dm.train_set.samples
    batch = PadCollator(tokenizer.pad_token_id)(samples)
    assert batch["n_pairs"] == 2 and batch["input_ids"].shape[0] == 4
    order = [s["chosen_input_ids"] for s in samples] + [s["rejected_input_ids"] for s in samples]
    for row, ids in zip(batch["input_ids"], order):
        assert row[: len(ids)].tolist() == ids
    samples_ref = [{**s, "ref_chosen_logps": -1.0, "ref_rejected_logps": -2.0} for s in samples]
    batch = PadCollator(tokenizer.pad_token_id)(samples_ref)
    assert batch["ref_chosen_logps"].tolist() == [-1.0, -1.0] and batch["ref_rejected_logps"].tolist() == [-2.0] * 2


# ------------------------------------------------------------------------------------------------ batch sampler
LENGTHS = [10, 30, 20, 50, 40, 60, 15, 25, 35, 45, 55, 5]
TRAINED = [3, 7, 2, 11, 5, 13, 1, 4, 6, 8, 9, 12]


def test_step_batch_sampler_stamps_step_tokens():
    sampler = StepBatchSampler(LENGTHS, TRAINED, batch_size=2, accumulate=3, seed=0)
    batches = list(sampler)
    assert len(batches) == len(sampler) == 6
    for step in (batches[:3], batches[3:]):  # 3 micro-batches form one optimizer step
        idx = [i for b in step for i, _ in b]
        stamps = {t for b in step for _, t in b}
        assert stamps == {sum(TRAINED[i] for i in idx)}
    assert sorted(i for b in batches for i, _ in b) == list(range(12))


def test_step_batch_sampler_group_by_length_and_epochs():
    s = StepBatchSampler(LENGTHS, TRAINED, batch_size=2, accumulate=3, seed=0, group_by_length=True)
    plain = StepBatchSampler(LENGTHS, TRAINED, batch_size=2, accumulate=3, seed=0)
    grouped, ungrouped = list(s), list(plain)
    for k in (0, 3):  # same step contents, sorted by length inside the step
        g = [i for b in grouped[k : k + 3] for i, _ in b]
        u = [i for b in ungrouped[k : k + 3] for i, _ in b]
        assert sorted(g) == sorted(u) and [LENGTHS[i] for i in g] == sorted(LENGTHS[i] for i in g)
    assert list(s) == grouped  # deterministic
    s.set_epoch(1)
    assert [i for b in list(s) for i, _ in b] != [i for b in grouped for i, _ in b]  # reshuffled per epoch
    fixed = StepBatchSampler(LENGTHS, TRAINED, batch_size=5, shuffle=False)
    assert [[i for i, _ in b] for b in fixed] == [[0, 1, 2, 3, 4], [5, 6, 7, 8, 9], [10, 11]]


def test_lightning_sets_the_sampler_epoch(records_factory, tiny_model_dir):
    """Lightning calls ``set_epoch`` on ``dataloader.batch_sampler.sampler`` every epoch; the order must change."""
    from lightning.fabric.utilities.data import _set_sampler_epoch

    dm = make_dm(records_factory(n_tasks=4), tiny_model_dir, val_fraction=0.0, cache_tokenized=False)
    dm.setup("fit")
    loader = dm.train_dataloader()
    order = [[i for i, _ in b] for b in loader.batch_sampler]
    _set_sampler_epoch(loader, 1)
    assert [[i for i, _ in b] for b in loader.batch_sampler] != order
    _set_sampler_epoch(loader, 0)
    assert [[i for i, _ in b] for b in loader.batch_sampler] == order


@pytest.mark.parametrize("n, batch_size, accumulate", [(12, 2, 3), (20, 3, 2), (9, 2, 1), (7, 2, 2), (5, 4, 1)])
def test_ddp_shards_are_disjoint_and_step_aligned(n, batch_size, accumulate):
    lengths, trained = (LENGTHS * 2)[:n], (TRAINED * 2)[:n]
    kw = dict(batch_size=batch_size, accumulate=accumulate, seed=3, group_by_length=True, world_size=2)
    r0, r1 = StepBatchSampler(lengths, trained, rank=0, **kw), StepBatchSampler(lengths, trained, rank=1, **kw)
    b0, b1 = list(r0), list(r1)
    i0 = [i for b in b0 for i, _ in b]
    i1 = [i for b in b1 for i, _ in b]
    assert not set(i0) & set(i1)
    assert len(i0) == len(set(i0)) and len(i1) == len(set(i1))
    assert len(set(i0) | set(i1)) >= n - 1  # at most world_size − 1 samples left out of an epoch
    # every rank runs the same number of micro-batches (else DDP's gradient all-reduce hangs) ...
    assert len(b0) == len(b1) == len(r0) == len(r1)
    # ... and the k-th micro-batches of both ranks belong to the same optimizer step, normalised by the
    # global step token count / world size (DDP averages the ranks' gradients)
    for x, y in zip(b0, b1):
        assert x[0][1] == y[0][1]
    per_step = batch_size * accumulate * 2
    steps = [
        i0[k : k + batch_size * accumulate] + i1[k : k + batch_size * accumulate]
        for k in range(0, len(i0), batch_size * accumulate)
    ]
    if n % per_step == 0:
        micro = accumulate
        for s, step in enumerate(steps):
            for b in b0[s * micro : (s + 1) * micro]:
                assert b[0][1] == sum(trained[i] for i in step) / 2


def test_dataloader_uses_trainer_rank_and_accumulation(records_factory, tiny_model_dir):
    dm = make_dm(
        records_factory(n_tasks=4, n_runs=3), tiny_model_dir, val_fraction=0.0, cache_tokenized=False, batch_size=1
    )
    dm.setup("fit")
    dm.trainer = SimpleNamespace(accumulate_grad_batches=3, global_rank=1, world_size=2, lightning_module=None)
    sampler = dm.train_dataloader().batch_sampler
    assert (sampler.accumulate, sampler.rank, sampler.world_size) == (3, 1, 2)
    dm.trainer = SimpleNamespace(accumulate_grad_batches=3, global_rank=0, world_size=2, lightning_module=None)
    other = [i for b in dm.train_dataloader().batch_sampler for i, _ in b]
    mine = [i for b in sampler for i, _ in b]
    assert set(mine).isdisjoint(other) and sorted(mine + other) == list(range(12))
    # validation never accumulates and is not shuffled
    val_sampler = dm._loader(dm.train_set, train=False).batch_sampler
    assert val_sampler.accumulate == 1 and not val_sampler.shuffle


def test_train_batches_carry_step_tokens(records_factory, tiny_model_dir):
    dm = make_dm(records_factory(n_tasks=4), tiny_model_dir, val_fraction=0.0, cache_tokenized=False, batch_size=3)
    dm.setup("fit")
    batches = list(dm.train_dataloader())
    assert len(batches) == 4
    for b in batches:  # accumulate 1: the step is the micro-batch
        assert b["step_tokens"].item() == (b["labels"] != IGNORE_INDEX).sum().item()
        assert b["input_ids"].dtype == torch.long and b["weights"].dtype == torch.float32
    assert dm.val_dataloader() == []


def test_records_with_missing_rewards_are_dropped_and_counted(tiny_model_dir, tmp_path):
    """A judge that never answered leaves reward 0 + meta.reward_missing; training must not take that 0 as real."""
    import json

    rows = [make_record(t, r, 1.0 if r == 0 else 0.0) for t in range(2) for r in range(3)]
    rows[1]["meta"] = {"reward_missing": True}
    path = tmp_path / "missing.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    dm = ConversationDataModule(
        [str(path)],
        tokenizer_name_or_path=str(tiny_model_dir),
        val_fraction=0.0,
        objective=Refit(),
        cache_tokenized=False,
    )
    dm.setup("fit")
    assert dm.stats["data/reward_missing_records"] == 1
    assert rows[1]["id"] not in {s["id"] for s in dm.train_set.samples}
    assert len(dm.train_set) == 5


@pytest.mark.parametrize("mode", ["mask_end", "drop"])
def test_cut_turns_masked_or_dropped_and_counted(tiny_model_dir, tmp_path, mode):
    """A turn cut by max_new_tokens never trains the end-of-turn token the template adds after the cut."""
    import json

    rows = [make_record(t, r, 1.0) for t in range(2) for r in range(2)]
    rows[0]["meta"] = {"truncated_turns": [1, 3]}
    rows[1]["meta"] = {"truncated_turns": 2}  # an old record: a count only
    path = tmp_path / "cut.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    dm = ConversationDataModule(
        [str(path)],
        tokenizer_name_or_path=str(tiny_model_dir),
        val_fraction=0.0,
        objective=Refit(),
        cache_tokenized=False,
        truncated_turns=mode,
    )
    dm.setup("fit")
    samples = {s["id"]: s for s in dm.train_set.samples}
    assert dm.stats["data/truncated_records"] == 2
    eot = end_of_turn_id(dm.tokenizer)
    if mode == "drop":
        assert set(samples) == {rows[2]["id"], rows[3]["id"]}
        assert dm.stats["data/truncated_records_dropped"] == 2
        return
    trained_ends = {
        k: sum(i == eot and lab != IGNORE_INDEX for i, lab in zip(s["input_ids"], s["labels"]))
        for k, s in samples.items()
    }
    assert trained_ends == {rows[0]["id"]: 1, rows[1]["id"]: 3, rows[2]["id"]: 3, rows[3]["id"]: 3}
