"""The faster decode paths of the generation engine (preallocated KV cache, a batch's common prompt prefix prefilled
once) give the same greedy tokens as the plain path, on the tiny random model in float32. (In bfloat16 the shared
prefix can flip a greedy near-tie, which is why it is an option; the preallocated cache holds the same values.)"""

from __future__ import annotations

import torch

from clarify_lit.data.tasks import QATask
from clarify_lit.simulate.engine import GenerationEngine, _append_kv, common_prefix, new_cache
from clarify_lit.simulate.rollout import RolloutSpec, rollout_tasks

PLAIN = dict(preallocate_kv=False, share_prefix=False)
FAST = dict(preallocate_kv=True, share_prefix=True)


def tasks(n: int = 7) -> list[QATask]:
    # questions of different lengths, so rows are padded and the common prefix ends at different places
    return [
        QATask(
            f"t/{i}",
            "arc_easy",
            "energy water " * (1 + 3 * (i % 4)) + f"question {i}?",
            ["sun", "sand", "salt", "smoke"],
            "ABCD"[i % 4],
        )
        for i in range(n)
    ]


def convs(k: int = 6):
    return [
        [
            {"role": "system", "content": "You are a student who thinks before answering. " * 3},
            {"role": "user", "content": "energy water " * (1 + 4 * (i % 3)) + f"question {i}?"},
        ]
        for i in range(k)
    ]


def test_common_prefix():
    assert common_prefix([[1, 2, 3], [1, 2, 4], [1, 2]]) == 2
    assert common_prefix([[5], [6]]) == 0
    assert common_prefix([[1, 2, 3]]) == 3


def test_append_kv_writes_into_the_buffer_and_re_adopts_replaced_tensors():
    a, b = torch.randn(2, 3, 4, 5), torch.randn(2, 3, 1, 5)
    held, buf = _append_kv(torch.tensor([]), None, a)
    assert torch.equal(held, a) and buf.shape[-2] > 4
    held2, buf2 = _append_kv(held, buf, b)
    assert buf2 is buf and held2.data_ptr() == buf.data_ptr()  # no copy of what was held
    assert torch.equal(held2, torch.cat([a, b], -2))
    picked = held2[torch.tensor([1])]  # batch_select_indices replaces the tensor: a new buffer adopts it
    held3, buf3 = _append_kv(picked, buf2, b[:1])
    assert buf3 is not buf2 and torch.equal(held3, torch.cat([a[1:], b[1:], b[:1]], -2))


def test_fresh_batches_match_the_plain_path(tiny):
    model, tok = tiny
    plain = GenerationEngine(model, tok, batch_size=4, max_new_tokens=12, **PLAIN)
    fast = GenerationEngine(model, tok, batch_size=4, max_new_tokens=12, **FAST)
    want = plain.generate(convs(), 0.0, seed=0)
    got = fast.generate(convs(), 0.0, seed=0)
    assert fast.stats.shared_tokens > 0  # the system prompt really was prefilled once per batch
    assert [g.text for g in got] == [g.text for g in want]
    assert [g.n_tokens for g in got] == [g.n_tokens for g in want]


def test_greedy_rollouts_match_the_plain_path_token_for_token(tiny):
    """Whole 3-turn rollouts (turn caches continued, rows re-prefilled in place where their text re-tokenizes
    differently) give the same token ids, old path vs new."""
    model, tok = tiny
    spec = RolloutSpec(n_turns=3, temperatures=[0.0], max_new_tokens=10, batch_size=3)
    seen: dict[str, list] = {}
    stats = {}
    for name, options in (("plain", PLAIN), ("fast", FAST)):
        engine = GenerationEngine(model, tok, batch_size=3, max_new_tokens=10, **options)
        ids: list[list[int]] = []
        original = model.generate

        def record(*args, _ids=ids, _original=original, **kwargs):
            out = _original(*args, **kwargs)
            seqs = out.sequences if hasattr(out, "sequences") else out
            prompt = kwargs["input_ids"].shape[1]
            _ids.extend(row[prompt:].tolist() for row in seqs)
            return out

        model.generate = record
        try:
            records = rollout_tasks(model, tok, tasks(), spec, engine=engine)
        finally:
            del model.generate
        seen[name] = ids
        stats[name] = engine.stats
        seen[name + " text"] = [[m["content"] for m in r.messages] for r in records]
    assert stats["fast"].shared_tokens > 0 and stats["plain"].shared_tokens == 0
    assert stats["fast"].reuse_misses > 0  # the in-place re-prefill of a row ran on preallocated layers too
    assert seen["fast"] == seen["plain"]
    assert seen["fast text"] == seen["plain text"]


def test_new_cache_preallocates_plain_layers(tiny):
    model, _ = tiny
    cache = new_cache(model, preallocate=True)
    assert all(type(layer).__name__ == "PreallocatedLayer" for layer in cache.layers)
    assert all(type(layer).__name__ == "DynamicLayer" for layer in new_cache(model, preallocate=False).layers)


def test_gqa_decode_attention_matches_sdpa_and_restores_the_model(tiny):
    """``attention="gqa"``: a decode step over a padded cache gives SDPA's logits (to float rounding), prompts go
    through SDPA itself, and the model gets its own kernel back afterwards."""
    from clarify_lit.simulate.engine import attention_kernel

    model, tok = tiny
    ids = torch.randint(0, model.config.vocab_size, (3, 12), generator=torch.Generator().manual_seed(0))
    mask = torch.ones(3, 12, dtype=torch.long)
    mask[0, :4] = 0  # a left-padded row
    logits = {}
    with torch.inference_mode():
        for kernel in ("sdpa", "gqa"):
            with attention_kernel(model, kernel):
                prompt = model(ids[:, :11], attention_mask=mask[:, :11], use_cache=True)
                step = model(ids[:, 11:], attention_mask=mask, cache=prompt.cache)
                logits[kernel] = (prompt.logits, step.logits)
    assert torch.equal(logits["gqa"][0], logits["sdpa"][0])  # the prompt: SDPA itself
    assert torch.allclose(logits["gqa"][1], logits["sdpa"][1], atol=1e-5)
    assert model.config._attn_implementation == "sdpa"
    plain = GenerationEngine(model, tok, batch_size=4, max_new_tokens=12).generate(convs(), 0.0, seed=0)
    gqa = GenerationEngine(model, tok, batch_size=4, max_new_tokens=12, attention="gqa").generate(convs(), 0.0, seed=0)
    assert [g.text for g in gqa] == [g.text for g in plain]  # no near-ties on this model in float32
