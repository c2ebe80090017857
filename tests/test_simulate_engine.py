"""The batched generation engine on the tiny random model."""

from __future__ import annotations

import pytest
import torch

from clarify_lit.simulate.engine import GenerationEngine, derive_seed, left_pad


def convs(k: int = 6):
    # prompts of very different lengths, so left padding really happens
    return [
        [
            {"role": "system", "content": "You are a student."},
            {"role": "user", "content": "energy water " * (1 + 4 * (i % 3)) + f"question {i}?"},
        ]
        for i in range(k)
    ]


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
    eng = GenerationEngine(model, tok, batch_size=2, mix_temperatures=False)
    plan = eng.plan([5, 9, 1, 7], [1.0, 0.0, 1.0, 0.0])
    assert plan == [(0.0, [1, 3]), (1.0, [0, 2])]
    mixed = GenerationEngine(model, tok, batch_size=2).plan([5, 9, 1, 7], [1.0, 0.0, 1.0, 0.0])
    assert mixed == [(None, [1, 3]), (None, [0, 2])]  # one group, longest first
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


def test_row_temperature_processor_on_hand_computed_scores():
    from clarify_lit.simulate.engine import RowTemperature

    scores = torch.tensor([[2.0, 1.0, 0.0], [2.0, 1.0, 0.0], [0.0, 3.0, 1.0]])
    out = RowTemperature([0.5, 2.0, 0.0])(None, scores)
    assert out[0].tolist() == [4.0, 2.0, 0.0]  # / 0.5
    assert out[1].tolist() == [1.0, 0.5, 0.0]  # / 2
    assert out[2].tolist() == [float("-inf"), 0.0, float("-inf")]  # greedy: the arg-max alone survives


def test_mixed_temperature_batches_match_grouped_ones(tiny):
    """Greedy rows decode the same text in a mixed batch as alone; a mixed batch of one temperature is the grouped
    batch itself (same seed, same text); sampled rows in a mixed batch are seeded (same seed → same text)."""
    model, tok = tiny
    temps = [0.0, 1.0, 0.7, 0.0, 1.0, 0.7]
    mixed = GenerationEngine(model, tok, batch_size=6, max_new_tokens=12)
    grouped = GenerationEngine(model, tok, batch_size=6, max_new_tokens=12, mix_temperatures=False)
    a, b = mixed.generate(convs(), temps, seed=3), grouped.generate(convs(), temps, seed=3)
    assert mixed.stats.calls == 1 and grouped.stats.calls == 3
    assert [a[i].text for i in (0, 3)] == [b[i].text for i in (0, 3)]  # greedy rows: exact
    assert [g.text for g in a] == [g.text for g in mixed.generate(convs(), temps, seed=3)]
    one = [0.7] * 6
    assert [g.text for g in mixed.generate(convs(), one, seed=4)] == [
        g.text for g in grouped.generate(convs(), one, seed=4)
    ]


def test_simulate_fingerprint_keeps_old_runs_resumable():
    """``--rollout.mix_temperatures false`` (the behaviour before the option) fingerprints like older runs did, so
    their ``--resume`` still matches; the new default is part of the fingerprint (it changes the sampled text)."""
    from clarify_lit.simulate.command import SimulateConfig, run_fingerprint
    from clarify_lit.simulate.options import RolloutOptions

    old = SimulateConfig(rollout=RolloutOptions(mix_temperatures=False))
    assert "mix_temperatures" not in run_fingerprint(old, ["t"])["config"]
    assert run_fingerprint(SimulateConfig(), ["t"])["config"]["mix_temperatures"] is True


def test_fingerprint_leaves_out_options_that_cannot_change_the_records():
    """The retrieval teacher's hide_mode and the rubric's settings are part of the fingerprint only where they act, so
    a scripted-teacher / `correct` run made before they existed resumes (e.g. to add StepDPO branches); where they act
    (retrieval teacher, rubric reward) a change is refused."""
    from clarify_lit.simulate.command import SimulateConfig, run_fingerprint
    from clarify_lit.simulate.options import RewardOptions, RolloutOptions, TeacherOptions

    plain = run_fingerprint(SimulateConfig(), ["t"])["config"]
    assert "hide_mode" not in plain["teacher"] and "rubric_accuracy" not in plain["reward"]
    assert "word_limit" not in plain["reward"] and "rubric_weights" not in plain["reward"]
    old_run = run_fingerprint(SimulateConfig(teacher=TeacherOptions(hide_mode="drop")), ["t"])
    assert old_run == run_fingerprint(SimulateConfig(), ["t"])
    retrieval = [
        run_fingerprint(SimulateConfig(teacher=TeacherOptions(kind="retrieval", hide_mode=m)), ["t"])
        for m in ("blank", "drop")
    ]
    assert retrieval[0] != retrieval[1] and retrieval[0]["config"]["teacher"]["hide_mode"] == "blank"
    rubric = [
        run_fingerprint(SimulateConfig(reward=RewardOptions(kind="rubric", word_limit=w)), ["t"]) for w in (60, 30)
    ]
    assert rubric[0] != rubric[1] and rubric[0]["config"]["reward"]["rubric_accuracy"] == "correct"
    # the clarifying setting's default teacher is the retrieval one: there hide_mode acts
    clarifying = SimulateConfig(rollout=RolloutOptions(setting="clarifying"))
    assert "hide_mode" in run_fingerprint(clarifying, ["t"])["config"]["teacher"]


def test_turn_cache_continues_batches_exactly(tiny):
    """Turn 2 from the turn-1 caches (only the new tokens run through the model) gives the same greedy tokens as
    prefilling the whole history; a row whose history changed is re-prefilled inside its batch (no extra generate
    call); a finished row leaves its batch."""
    from clarify_lit.simulate.engine import TurnCache

    model, tok = tiny
    eng = GenerationEngine(model, tok, batch_size=3, max_new_tokens=5)
    first = [eng.encode(c) for c in convs(6)]
    session = TurnCache()
    eng.generate_ids(first, [0.0] * 6, seed=1, session=session, keys=list(range(6)))
    assert sorted(k for b in session.batches for k in b.keys) == list(range(6))
    history = {k: t for b in session.batches for k, t in zip(b.keys, b.tokens, strict=True)}
    tail = tok("<|im_start|>user\nand then? " * 2 + "<|im_start|>assistant\n", add_special_tokens=False)["input_ids"]
    keys = [0, 1, 2, 4, 5]  # conversation 3 is over
    second = [history[k] + tail[: 5 + 3 * k] for k in keys]
    second[-1] = [tail[0]] + second[-1]  # conversation 5's history changed: no longer starts with its cache
    calls_before = eng.stats.calls
    reused = eng.generate_ids(second, [0.0] * 5, seed=2, session=session, keys=keys)
    assert eng.stats.reuse_misses == 1
    assert eng.stats.reused_tokens == sum(len(history[k]) for k in keys[:-1])
    assert eng.stats.calls - calls_before == 2  # the two turn-1 batches continued, row 5 re-prefilled in its own
    fresh = GenerationEngine(model, tok, batch_size=3, max_new_tokens=5).generate_ids(second, [0.0] * 5, seed=2)
    assert [g.text for g in reused] == [g.text for g in fresh]
    assert [g.n_tokens for g in reused] == [g.n_tokens for g in fresh]
    assert sorted(k for b in session.batches for k in b.keys) == keys
    with pytest.raises(ValueError, match="one distinct key per conversation"):
        eng.generate_ids(second, [0.0] * 5, seed=2, session=session, keys=[0, 0, 1, 2, 3])
