"""The batched generation engine on the tiny random model."""

from __future__ import annotations

import pytest
import torch

from clarify_lit.simulate.engine import GenerationEngine, derive_seed, left_pad


def convs(k: int = 6):
    # prompts of very different lengths, so left padding really happens
    return [[{"role": "system", "content": "You are a student."},
             {"role": "user", "content": "energy water " * (1 + 4 * (i % 3)) + f"question {i}?"}] for i in range(k)]


def test_batched_greedy_equals_one_by_one(tiny):
    model, tok = tiny
    batched = GenerationEngine(model, tok, batch_size=4, max_new_tokens=12).generate(convs(), 0.0, seed=0)
    single = GenerationEngine(model, tok, batch_size=1, max_new_tokens=12).generate(convs(), 0.0, seed=0)
    assert [g.text for g in batched] == [g.text for g in single]
    assert [g.n_tokens for g in batched] == [g.n_tokens for g in single]
    unsorted = GenerationEngine(model, tok, batch_size=4, max_new_tokens=12, sort_by_length=False)
    assert [g.text for g in unsorted.generate(convs(), 0.0, seed=0)] == [g.text for g in single]


def test_sampling_is_seeded_and_leaves_state_alone(tiny):
    model, tok = tiny
    model.train()
    side = tok.padding_side
    torch.manual_seed(123)
    rng_before = torch.get_rng_state()
    eng = GenerationEngine(model, tok, batch_size=3, max_new_tokens=10)
    temps = [0.7, 1.0, 0.0, 0.7, 1.0, 0.0]
    a = eng.generate(convs(), temps, seed=5)
    b = eng.generate(convs(), temps, seed=5)
    c = eng.generate(convs(), temps, seed=6)
    assert [g.text for g in a] == [g.text for g in b]
    assert [g.text for g in a] != [g.text for g in c]
    # greedy rows do not depend on the seed
    assert [a[i].text for i in (2, 5)] == [c[i].text for i in (2, 5)]
    assert model.training, "train mode must be restored"
    assert tok.padding_side == side, "the shared tokenizer must not be changed"
    assert torch.equal(torch.get_rng_state(), rng_before), "the caller's RNG must not move"
    model.eval()
    assert eng.stats.rows == 18 and eng.stats.new_tokens > 0


def test_plan_groups_by_temperature_and_sorts(tiny):
    model, tok = tiny
    eng = GenerationEngine(model, tok, batch_size=2)
    plan = eng.plan([5, 9, 1, 7], [1.0, 0.0, 1.0, 0.0])
    assert plan == [(0.0, [1, 3]), (1.0, [0, 2])]
    with pytest.raises(ValueError):
        eng.plan([1], [-0.1])


def test_generation_strips_end_token(tiny):
    model, tok = tiny
    gens = GenerationEngine(model, tok, max_new_tokens=40).generate(convs(2), 0.0, seed=0)
    for g in gens:
        assert "<|im_end|>" not in g.text and "<|endoftext|>" not in g.text
        assert g.truncated == (g.n_tokens == 40 and g.truncated)


def test_left_pad():
    ids, mask = left_pad([[1, 2, 3], [4]], 0, torch.device("cpu"))
    assert ids.tolist() == [[1, 2, 3], [0, 0, 4]]
    assert mask.tolist() == [[1, 1, 1], [0, 0, 1]]


def test_derive_seed_stable():
    assert derive_seed(0, "chunk", 1) == derive_seed(0, "chunk", 1)
    assert derive_seed(0, "chunk", 1) != derive_seed(0, "chunk", 2)
    assert 0 <= derive_seed("x") < 2**63


def test_next_token_logprobs_match_unpadded(tiny):
    model, tok = tiny
    eng = GenerationEngine(model, tok, batch_size=4)
    prompts = [eng.encode(c) for c in convs(3)]
    batched = eng.next_token_logprobs(prompts)
    for i, p in enumerate(prompts):
        with torch.no_grad():
            ref = torch.log_softmax(model(torch.tensor([p])).logits[0, -1].float(), -1)
        assert torch.allclose(batched[i], ref, atol=1e-4)
