"""Issue 28.1: the engine's decode step of our own (``GenerationEngine(decode_step="eager")``,
``clarify_lit.simulate.decode``) against ``generate``'s own forward, tiny random model in float32: the same logits
on a padded and an unpadded step, and token-identical greedy 3-turn rollouts (turn caches continued, rows spliced).
SmolLM2 is checked by ``benchmarks/rollout_throughput.py --paths fast step`` (same text reported)."""

from __future__ import annotations

import pytest
import torch
from test_decode_paths import convs, tasks

from clarify_lit.simulate.decode import DecodeStep, decode_step_for, own_decode_step, supports
from clarify_lit.simulate.engine import GenerationEngine, new_cache
from clarify_lit.simulate.rollout import RolloutSpec, rollout_tasks


def _prefill(model, ids, mask):
    cache = new_cache(model, preallocate=True)
    model(ids[:, :-1], attention_mask=mask[:, :-1], cache=cache, use_cache=True)
    return cache


@pytest.mark.parametrize("padded", [True, False])
def test_step_gives_the_models_logits_and_cache(tiny, padded):
    model, _ = tiny
    assert supports(model)
    ids = torch.randint(0, model.config.vocab_size, (3, 12), generator=torch.Generator().manual_seed(0))
    mask = torch.ones(3, 12, dtype=torch.long)
    if padded:
        mask[0, :4] = 0
        mask[2, :1] = 0
    position = (mask.cumsum(-1) - 1).clamp(min=0)[:, -1:]
    with torch.inference_mode():
        ref_cache = _prefill(model, ids, mask)
        want = model(ids[:, -1:], attention_mask=mask, position_ids=position, cache=ref_cache).logits
        cache = _prefill(model, ids, mask)
        got = DecodeStep(model)(ids[:, -1:], mask, position, cache)
    assert torch.equal(got, want)  # the model's own ops on the same tensors: bit for bit
    for a, b in zip(cache.layers, ref_cache.layers, strict=True):
        assert torch.equal(a.keys, b.keys) and torch.equal(a.values, b.values)
    with torch.inference_mode():  # attention as two matmuls (decode_step="matmul", and "compiled"): float rounding
        cache = _prefill(model, ids, mask)
        matmul = DecodeStep(model, matmul_attention=True)(ids[:, -1:], mask, position, cache)
    assert torch.allclose(matmul, want, rtol=0, atol=1e-5)


def test_forward_is_patched_for_the_block_only(tiny):
    model, _ = tiny
    assert "forward" not in vars(model)
    with own_decode_step(model, decode_step_for(model, "eager")):
        assert "forward" in vars(model)
    assert "forward" not in vars(model)
    assert decode_step_for(model, "model") is None
    with pytest.raises(ValueError, match="decode_step"):
        GenerationEngine(model, tiny[1], decode_step="fast")


def test_fresh_batches_give_the_same_greedy_text(tiny):
    model, tok = tiny
    want = GenerationEngine(model, tok, batch_size=4, max_new_tokens=12).generate(convs(), 0.0, seed=0)
    got = GenerationEngine(model, tok, batch_size=4, max_new_tokens=12, decode_step="eager").generate(
        convs(), 0.0, seed=0
    )
    assert [(g.text, g.n_tokens) for g in got] == [(g.text, g.n_tokens) for g in want]


def test_greedy_rollouts_are_token_identical(tiny, monkeypatch):
    """Whole 3-turn greedy rollouts (KV caches continued across turns, re-tokenization misses spliced in place) give
    the same conversations with and without the decode step, and the step really ran."""
    model, tok = tiny
    calls = []
    original = DecodeStep.__call__

    def counting(self, *a, **k):
        calls.append(1)
        return original(self, *a, **k)

    monkeypatch.setattr(DecodeStep, "__call__", counting)
    spec = RolloutSpec(n_turns=3, temperatures=[0.0], max_new_tokens=10, batch_size=3)
    texts = {}
    for mode in ("model", "eager"):
        engine = GenerationEngine(model, tok, batch_size=3, max_new_tokens=10, decode_step=mode)
        records = rollout_tasks(model, tok, tasks(), spec, engine=engine)
        texts[mode] = [[m["content"] for m in r.messages] for r in records]
        if mode == "model":
            assert not calls
    assert calls and texts["eager"] == texts["model"]
