"""Issue 28.2: the training-memory savers change no number (tiny model, fp32 and bf16 autocast).

* ``memory.BitMaskDropout`` (default ``lora_dropout_bitmask=True``): the same dropout noise from the same random
  stream, kept as bits: forward, gradients and the random state afterwards are bit-identical to ``nn.Dropout``.
* ``lm_head_recompute=True`` (default) with 256-row chunks: the LM-head logits recomputed in backward give the same
  losses and gradients as keeping them (1e-6 in fp32), for Refit's target log-probs and DPO's packed pairs.
"""

from __future__ import annotations

import pytest
import torch

from clarify_lit.data.datamodule import ConversationDataModule, PadCollator
from clarify_lit.train.memory import BitMaskDropout, pack_bits, unpack_bits
from clarify_lit.train.module import ClarifyModule
from clarify_lit.train.objectives import DPO, Refit

pytestmark = pytest.mark.usefixtures("clarify_cache")

OLD = dict(lm_head_recompute=False, lora_dropout_bitmask=False, logprob_chunk_size=1024)  # before issue 28


@pytest.mark.parametrize("n", [1, 7, 8, 13, 64])
def test_pack_bits_round_trip(n):
    mask = torch.rand(n, generator=torch.Generator().manual_seed(n)) > 0.4
    packed = pack_bits(mask.view(-1, 1))
    assert packed.dtype == torch.uint8 and packed.numel() == (n + 7) // 8
    assert torch.equal(unpack_bits(packed, torch.Size([n, 1])), mask.view(-1, 1))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("p", [0.05, 0.5])
def test_bitmask_dropout_is_bit_identical_to_nn_dropout(dtype, p):
    x = torch.randn(3, 17, 24, dtype=dtype, requires_grad=True)
    g = torch.randn(3, 17, 24, dtype=dtype)
    runs = []
    for cls in (torch.nn.Dropout, BitMaskDropout):
        torch.manual_seed(1)
        out = cls(p).train()(x)
        (out * g).sum().backward()
        runs.append((out.detach(), x.grad.clone(), torch.rand(4)))  # the random stream afterwards, too
        x.grad = None
    (a, ga, ra), (b, gb, rb) = runs
    assert torch.equal(a, b) and torch.equal(ga, gb) and torch.equal(ra, rb)
    assert 0 < int((a == 0).sum()) < a.numel()


def test_bitmask_dropout_keeps_bits_not_the_noise():
    x = torch.randn(64, 576, requires_grad=True)
    saved: list[torch.Tensor] = []

    def pack(t):
        saved.append(t)
        return t

    for cls in (torch.nn.Dropout, BitMaskDropout):
        saved.clear()
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            cls(0.05).train()(x)
        nbytes = sum(t.untyped_storage().nbytes() for t in saved)
        if cls is torch.nn.Dropout:
            assert nbytes == x.numel() * 4  # the fp32 noise tensor
        else:
            assert nbytes == x.numel() // 8  # one bit per element
    # eval mode and p = 0 are nn.Dropout's own paths
    assert torch.equal(BitMaskDropout(0.05).eval()(x), x) and torch.equal(BitMaskDropout(0.0).train()(x), x)


def _module(tiny_model_dir, objective=None, **kw) -> ClarifyModule:
    torch.manual_seed(0)
    kw.setdefault("lora_dropout", 0.1)
    module = ClarifyModule(
        model_name_or_path=str(tiny_model_dir),
        objective=objective or Refit(),
        lora_r=4,
        lora_target_modules=["q_proj", "v_proj", "o_proj", "up_proj", "down_proj"],
        export_on_fit_end=False,
        **kw,
    )
    with torch.no_grad():  # a non-zero adapter, so that LoRA A and B both get gradients
        for n, p in module.model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.2, generator=torch.Generator().manual_seed(1))
    module.setup("fit")  # full fine-tuning DPO: the frozen reference copy
    return module.train()


def _loss_and_grads(module, batch, autocast: bool):
    torch.manual_seed(123)  # the dropout masks
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        loss, _ = module._step(batch, "val")  # "val": no Lightning logging needs a trainer here
    loss.backward()
    grads = {n: p.grad.detach().clone() for n, p in module.model.named_parameters() if p.grad is not None}
    return loss.detach(), grads


def _batch(records_factory, tiny_model_dir, objective, n=4):
    dm = ConversationDataModule(
        [str(records_factory(n_tasks=3))],
        tokenizer_name_or_path=str(tiny_model_dir),
        val_fraction=0.0,
        cache_tokenized=False,
        objective=objective,
    )
    dm.setup("fit")
    return PadCollator(dm.tokenizer.pad_token_id, dm.share_pair_prefix, dm.pad_to_multiple_of)(dm.train_set.samples[:n])


@pytest.fixture
def log_calls(monkeypatch):
    monkeypatch.setattr(ClarifyModule, "log", lambda self, *a, **k: None)


@pytest.mark.parametrize("autocast", [False, True])
def test_lighter_lora_dropout_gives_identical_losses_and_gradients(
    records_factory, tiny_model_dir, log_calls, autocast
):
    batch = _batch(records_factory, tiny_model_dir, Refit())
    plain = _module(tiny_model_dir, lora_dropout_bitmask=False)
    light = _module(tiny_model_dir, lora_dropout_bitmask=True)
    assert sum(isinstance(m, BitMaskDropout) for m in light.modules()) == 2 * 5  # 2 layers × 5 adapters
    assert not any(isinstance(m, BitMaskDropout) for m in plain.modules())
    (la, ga), (lb, gb) = _loss_and_grads(plain, batch, autocast), _loss_and_grads(light, batch, autocast)
    assert torch.equal(la, lb) and ga.keys() == gb.keys() and len(ga) > 0
    assert all(torch.equal(ga[k], gb[k]) for k in ga)


@pytest.mark.parametrize("objective", [Refit(), DPO(beta=0.1, pairs="final_answer")], ids=["refit", "dpo-packed"])
@pytest.mark.parametrize("use_lora", [True, False])
def test_defaults_match_the_step_before_issue_28(records_factory, tiny_model_dir, log_calls, objective, use_lora):
    """The new defaults (head recompute, 256-row chunks, bit-mask dropout) against the old step, fp32: 1e-6."""
    batch = _batch(records_factory, tiny_model_dir, objective)
    kw = dict(use_lora=use_lora, lora_dropout=0.1 if use_lora else 0.0)
    old = _module(tiny_model_dir, objective, **OLD, **kw)
    new = _module(tiny_model_dir, objective, logprob_chunk_size=3, **kw)  # several chunks on the tiny batch
    assert new.hparams.lm_head_recompute and new.hparams.lora_dropout_bitmask
    (la, ga), (lb, gb) = _loss_and_grads(old, batch, False), _loss_and_grads(new, batch, False)
    assert torch.allclose(la, lb, rtol=0, atol=1e-6) and ga.keys() == gb.keys() and len(ga) > 0
    for k in ga:
        assert torch.allclose(ga[k], gb[k], rtol=1e-6, atol=1e-6), k


def test_head_recompute_keeps_no_logits_for_backward(records_factory, tiny_model_dir, log_calls):
    """What the training forward keeps for backward: without recomputation the fp32 ``[N, V]`` logits are among it;
    with it, nothing vocabulary-wide is."""
    batch = _batch(records_factory, tiny_model_dir, Refit())
    vocab = None
    widths = {}
    for recompute in (False, True):
        module = _module(tiny_model_dir, lm_head_recompute=recompute)
        vocab = module.model.get_output_embeddings().weight.shape[0]
        kept: list[torch.Size] = []

        def pack(t, kept=kept):
            if not isinstance(t, torch.nn.Parameter):
                kept.append(t.shape)
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            module._step(batch, "val")
        widths[recompute] = [s for s in kept if len(s) == 2 and s[-1] == vocab]
    assert widths[False] and not widths[True]
