"""DPO pairs packed with their shared prefix (``clarify_lit.data.pair_collation`` collates,
``clarify_lit.train.pair_logprobs`` computes): same sequence log-probs and gradients as two stacked rows, the
attention pattern, trained prefix tokens, and the DataModule switch."""

from __future__ import annotations

import pytest
import torch

from clarify_lit.data.datamodule import ConversationDataModule, PadCollator
from clarify_lit.data.pair_collation import PACKED_KEY, pack_pairs
from clarify_lit.train.losses import sequence_logps
from clarify_lit.train.module import ClarifyModule, target_logps
from clarify_lit.train.objectives import DPO
from clarify_lit.train.pair_logprobs import packed_sequence_logps

pytestmark = pytest.mark.usefixtures("clarify_cache")


def pair_samples(records_factory, tiny_model_dir, pairs, n=3):
    dm = ConversationDataModule(
        [str(records_factory(n_tasks=n))],
        tokenizer_name_or_path=str(tiny_model_dir),
        val_fraction=0.0,
        cache_tokenized=False,
        objective=DPO(pairs=pairs),
    )
    dm.setup("fit")
    return dm.train_set.samples[:n], dm.tokenizer.pad_token_id


def lora_module(tiny_model_dir):
    torch.manual_seed(0)
    module = ClarifyModule(model_name_or_path=str(tiny_model_dir), lora_r=4, lora_dropout=0.0, export_on_fit_end=False)
    with torch.no_grad():  # a non-zero adapter, so that LoRA A and B both get gradients
        for n, p in module.model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.2, generator=torch.Generator().manual_seed(1))
    return module.model.train()


@pytest.mark.parametrize("pairs", ["final_answer", "conversation"])
def test_packed_equals_stacked_logps_and_gradients(records_factory, tiny_model_dir, pairs):
    samples, pad = pair_samples(records_factory, tiny_model_dir, pairs)
    model = lora_module(tiny_model_dir)
    stacked = PadCollator(pad)(samples)
    packed = PadCollator(pad, share_prefix=True)(samples)
    assert PACKED_KEY in packed and PACKED_KEY not in stacked
    assert packed["input_ids"].shape[0] == len(samples) and stacked["input_ids"].shape[0] == 2 * len(samples)
    assert packed["token_mask"].sum() < stacked["attention_mask"].sum()  # the prefix is there once
    # every trained token of both sequences is a target, once
    assert len(packed[PACKED_KEY]) == int((stacked["labels"][:, 1:] != -100).sum())

    results = []
    for batch in (stacked, packed):
        model.zero_grad()
        if PACKED_KEY in batch:
            seq = packed_sequence_logps(model, batch, chunk_size=7)  # several LM-head chunks
        else:
            seq = sequence_logps(*target_logps(model, batch["input_ids"], batch["attention_mask"], batch["labels"]))
        n = len(samples)
        (seq[:n] - 0.5 * seq[n:]).sum().backward()
        results.append((seq.detach(), {k: p.grad.clone() for k, p in model.named_parameters() if p.grad is not None}))
    (a, ga), (b, gb) = results
    assert torch.allclose(a, b, rtol=1e-5, atol=1e-3), (a, b)
    assert ga.keys() == gb.keys() and any("lora_A" in k for k in ga)
    for k in ga:
        assert torch.allclose(ga[k], gb[k], rtol=1e-4, atol=1e-5), k


def test_layout_mask_positions_and_targets():
    # prefix [1 2 3], chosen rest [4 5], rejected rest [6]; the last prefix token (3) is trained in both
    s = {
        "id": "p",
        "chosen_input_ids": [1, 2, 3, 4, 5],
        "chosen_labels": [-100, -100, 3, 4, 5],
        "rejected_input_ids": [1, 2, 3, 6],
        "rejected_labels": [-100, -100, 3, 6],
    }
    b = pack_pairs([s], pad_token_id=0)
    assert b["input_ids"].tolist() == [[1, 2, 3, 4, 5, 6]]
    assert b["position_ids"].tolist() == [[0, 1, 2, 3, 4, 3]]
    m = b["attention_mask"][0, 0].int().tolist()
    assert m[5] == [1, 1, 1, 0, 0, 1]  # rejected sees the prefix and itself, not the chosen rest
    assert m[4] == [1, 1, 1, 1, 1, 0] and m[2] == [1, 1, 1, 0, 0, 0]
    # targets: (predicting position, token, sequence); token 3 counts in chosen (seq 0) and rejected (seq 1)
    got = sorted(zip(b["pair_pos"].tolist(), b[PACKED_KEY].tolist(), b["pair_seq"].tolist()))
    assert got == sorted([(1, 3, 0), (2, 4, 0), (3, 5, 0), (1, 3, 1), (2, 6, 1)])


def test_labels_that_differ_end_the_prefix_and_padding_rows():
    a = {
        "id": "a",
        "chosen_input_ids": [1, 2, 3],
        "chosen_labels": [-100, 2, 3],
        "rejected_input_ids": [1, 2, 3],
        "rejected_labels": [-100, -100, 3],
    }  # same tokens, other labels
    c = {
        "id": "c",
        "chosen_input_ids": [1, 2, 3, 4, 5, 6, 7],
        "chosen_labels": [-100, -100, -100, 4, 5, 6, 7],
        "rejected_input_ids": [1, 2, 3, 8],
        "rejected_labels": [-100, -100, -100, 8],
    }
    b = pack_pairs([a, c], pad_token_id=0)
    assert b["input_ids"][0].tolist()[:5] == [1, 2, 3, 2, 3]  # the labels differ at token 2: prefix [1] only
    assert b["token_mask"].tolist() == [[1] * 5 + [0] * 3, [1] * 8]
    m = b["attention_mask"][0, 0]
    assert all(m[q].sum() == 1 and m[q, q] for q in range(5, 8))  # padding attends to itself alone
    seqs = b["pair_seq"].tolist()
    assert sorted(seqs) == sorted([0, 0, 2] + [1] * 4 + [3])  # pair a: chosen 2 targets, rejected 1


def test_eager_attention_takes_the_packed_mask(records_factory, tiny_model_dir):
    samples, pad = pair_samples(records_factory, tiny_model_dir, "conversation", n=2)
    model = lora_module(tiny_model_dir).eval()
    packed = pack_pairs(samples, pad)
    with torch.no_grad():
        sdpa = packed_sequence_logps(model, packed)
        model.get_base_model().set_attn_implementation("eager")
        eager = packed_sequence_logps(model, packed)
    assert torch.allclose(sdpa, eager, rtol=1e-5, atol=1e-3)


def test_datamodule_packs_dpo_pairs_by_default(records_factory, tiny_model_dir):
    path = str(records_factory(n_tasks=3))
    for share, packed in ((True, True), (False, False)):
        dm = ConversationDataModule(
            [path],
            tokenizer_name_or_path=str(tiny_model_dir),
            val_fraction=0.0,
            cache_tokenized=False,
            objective=DPO(),
            share_pair_prefix=share,
        )
        dm.setup("fit")
        batch = next(iter(dm.train_dataloader()))
        assert (PACKED_KEY in batch) == packed and "step_tokens" in batch and batch["n_pairs"] == len(batch["ids"])


def test_gradient_checkpointing_keeps_packed_logps_and_gradients(records_factory, tiny_model_dir):
    """Under gradient checkpointing the LM-head chunks are recomputed in backward: same values and gradients."""
    samples, pad = pair_samples(records_factory, tiny_model_dir, "conversation")
    batch = pack_pairs(samples, pad)
    results = []
    for gc in (False, True):
        model = lora_module(tiny_model_dir)
        if gc:
            model.get_base_model().gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        seq = packed_sequence_logps(model, batch, chunk_size=5)
        seq.sum().backward()
        results.append((seq.detach(), {k: p.grad.clone() for k, p in model.named_parameters() if p.grad is not None}))
    (a, ga), (b, gb) = results
    assert torch.allclose(a, b, atol=1e-5) and ga.keys() == gb.keys()
    assert all(torch.allclose(ga[k], gb[k], rtol=1e-4, atol=1e-6) for k in ga)


@pytest.mark.parametrize("share", [False, True])
def test_padding_to_a_multiple_changes_no_logp(records_factory, tiny_model_dir, share):
    samples, pad = pair_samples(records_factory, tiny_model_dir, "conversation")
    model = lora_module(tiny_model_dir).eval()
    tight, padded = PadCollator(pad, share, 1)(samples), PadCollator(pad, share, 64)(samples)
    assert padded["input_ids"].shape[1] % 64 == 0 and padded["input_ids"].shape[1] > tight["input_ids"].shape[1]

    def seq(batch):
        if PACKED_KEY in batch:
            return packed_sequence_logps(model, batch)
        return sequence_logps(*target_logps(model, batch["input_ids"], batch["attention_mask"], batch["labels"]))

    with torch.no_grad():
        assert torch.allclose(seq(tight), seq(padded), rtol=1e-5, atol=1e-3)


def test_datamodule_pads_to_a_multiple_of_16_by_default(records_factory, tiny_model_dir):
    dm = ConversationDataModule(
        [str(records_factory(n_tasks=2))],
        tokenizer_name_or_path=str(tiny_model_dir),
        val_fraction=0.0,
        cache_tokenized=False,
    )
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))
    assert batch["input_ids"].shape[1] % 16 == 0
    assert batch["attention_mask"].sum(1).max() > batch["input_ids"].shape[1] - 16  # no whole block of padding
