"""Assistant-only labels with the tiny model's ChatML template: what is trained, what is masked, truncation, and the
templates we refuse."""

from __future__ import annotations

import pytest
from conftest import SYSTEM_PROMPT, make_messages

from clarify_lit.data.tokenization import (
    IGNORE_INDEX,
    TokenizationError,
    end_of_turn_id,
    tokenize_conversation,
)
from clarify_lit.models import load_tokenizer

EOT = "<|im_end|>"


def trained_runs(sample) -> list[list[int]]:
    """Contiguous runs of trained positions."""
    runs, cur = [], []
    for t, lab in enumerate(sample.labels):
        if lab != IGNORE_INDEX:
            cur.append(t)
        elif cur:
            runs.append(cur)
            cur = []
    if cur:
        runs.append(cur)
    return runs


def test_labels_are_input_ids_on_assistant_turns_only(tokenizer):
    msgs = make_messages(1, 2)
    s = tokenize_conversation(tokenizer, msgs)
    full = tokenizer.apply_chat_template(msgs, tokenize=False)
    assert s.input_ids == tokenizer(full, add_special_tokens=False)["input_ids"]
    assert len(s.labels) == len(s.input_ids) and s.truncated == 0
    # every label is either masked or the input token itself (no shift: the model shifts)
    assert all(lab in (IGNORE_INDEX, tok) for lab, tok in zip(s.labels, s.input_ids))
    runs = trained_runs(s)
    assistants = [m["content"] for m in msgs if m["role"] == "assistant"]
    assert len(runs) == len(assistants) == 3  # all three assistant turns are trained
    eot = end_of_turn_id(tokenizer)
    assert tokenizer.convert_ids_to_tokens(eot) == EOT
    for run, content in zip(runs, assistants):
        # the turn's text and its end-of-turn token are trained ...
        assert tokenizer.decode([s.input_ids[t] for t in run]) == content + EOT
        assert s.input_ids[run[-1]] == eot
        # ... the template glue after it (ChatML's trailing newline) is not
        after = run[-1] + 1
        assert tokenizer.decode([s.input_ids[after]]) == "\n" and s.labels[after] == IGNORE_INDEX
        # the assistant header before it is template, masked
        start = max(t for t in range(run[0]) if s.input_ids[t] == tokenizer.convert_tokens_to_ids("<|im_start|>"))
        assert tokenizer.decode(s.input_ids[start : run[0]]) == "<|im_start|>assistant\n"
        assert all(s.labels[t] == IGNORE_INDEX for t in range(start, run[0]))
    # decoded trained text == the assistant contents, each followed by the end-of-turn token
    trained_text = tokenizer.decode([i for i, lab in zip(s.input_ids, s.labels) if lab != IGNORE_INDEX])
    assert trained_text == "".join(c + EOT for c in assistants)
    assert s.num_trained == sum(len(r) for r in runs)


def test_system_user_and_template_tokens_are_masked(tokenizer):
    msgs = make_messages(2, 1)
    s = tokenize_conversation(tokenizer, msgs)
    masked_text = tokenizer.decode([i for i, lab in zip(s.input_ids, s.labels) if lab == IGNORE_INDEX])
    trained_text = tokenizer.decode([i for i, lab in zip(s.input_ids, s.labels) if lab != IGNORE_INDEX])
    assert SYSTEM_PROMPT in masked_text and SYSTEM_PROMPT not in trained_text
    for m in msgs:
        if m["role"] == "user":
            assert m["content"] in masked_text and m["content"] not in trained_text
    assert "<|im_start|>" not in trained_text and "user" not in trained_text and "system" not in trained_text
    # the first token is template (<|im_start|>) and never trained
    assert s.labels[0] == IGNORE_INDEX and tokenizer.decode(s.input_ids[:1]) == "<|im_start|>"


def test_only_last_assistant(tokenizer):
    msgs = make_messages(0, 1)
    s = tokenize_conversation(tokenizer, msgs, only_last_assistant=True)
    runs = trained_runs(s)
    assert len(runs) == 1
    assert tokenizer.decode([s.input_ids[t] for t in runs[0]]) == msgs[-1]["content"] + EOT
    full = tokenize_conversation(tokenizer, msgs)
    assert full.input_ids == s.input_ids and trained_runs(full)[-1] == runs[0]


def test_conversation_without_system_prompt(tokenizer):
    """ChatML adds its default system prompt; it is masked like any system text."""
    msgs = make_messages(0, 0, system=False)
    s = tokenize_conversation(tokenizer, msgs)
    assert "helpful AI assistant" in tokenizer.decode(s.input_ids)
    assert tokenizer.decode([i for i, lab in zip(s.input_ids, s.labels) if lab != IGNORE_INDEX]) == "".join(
        m["content"] + EOT for m in msgs if m["role"] == "assistant"
    )


def _long_middle(n_words: int = 60):
    msgs = make_messages(0, 0)
    msgs[3]["content"] = " ".join(["water"] * n_words)  # the second teacher turn is long
    return msgs


def test_truncation_keeps_system_cuts_middle_keeps_final_turn(tokenizer):
    msgs = _long_middle()
    full = tokenize_conversation(tokenizer, msgs)
    head = len(
        tokenizer(tokenizer.apply_chat_template(msgs[:1], tokenize=False), add_special_tokens=False)["input_ids"]
    )
    first_turn_end = trained_runs(full)[0][-1] + 2  # through the first assistant turn's eot and newline
    excess = first_turn_end - head + 10  # ... and into the long teacher turn after it
    max_length = len(full.input_ids) - excess
    cut = tokenize_conversation(tokenizer, msgs, max_length=max_length)
    assert len(cut.input_ids) == max_length and cut.truncated == excess
    # system prompt intact, a contiguous block right after it removed, the rest (final turn included) intact
    assert cut.input_ids == full.input_ids[:head] + full.input_ids[head + excess :]
    assert cut.labels == full.labels[:head] + full.labels[head + excess :]
    assert SYSTEM_PROMPT in tokenizer.decode(cut.input_ids[:head])
    final_run = trained_runs(cut)[-1]
    assert tokenizer.decode([cut.input_ids[t] for t in final_run]) == msgs[-1]["content"] + EOT
    # the cut hit the middle: the first exchange (question + first assistant turn) is gone, the final two stay
    assert len(trained_runs(cut)) == 2 and cut.num_trained < full.num_trained
    assert tokenizer.decode(cut.input_ids).count("water") < tokenizer.decode(full.input_ids).count("water")


def test_truncation_never_cuts_the_final_turn(tokenizer):
    msgs = make_messages(0, 0)
    msgs[-1]["content"] = "The answer is A. " * 30  # a final turn longer than max_length allows
    full = tokenize_conversation(tokenizer, msgs)
    n, final_len = len(full.input_ids), len(trained_runs(full)[-1])
    assert final_len > 60
    with pytest.raises(TokenizationError, match="final assistant turn") as e:
        tokenize_conversation(tokenizer, msgs, max_length=final_len - 10, where="f.jsonl:line 3 (id='x')")
    assert "f.jsonl:line 3 (id='x')" in str(e.value) and "max_length" in str(e.value)
    # fits exactly: no truncation
    assert tokenize_conversation(tokenizer, msgs, max_length=n).truncated == 0


def _tokenizer_with(tiny_model_dir, template: str):
    tok = load_tokenizer(str(tiny_model_dir))
    tok.chat_template = template
    return tok


def test_template_without_end_of_turn_in_assistant_span_raises(tiny_model_dir):
    # assistant turns end with a bare newline: the model would never learn to stop
    template = (
        "{% for message in messages %}"
        "{% if message['role'] == 'assistant' %}{{ '<|im_start|>assistant\n' + message['content'] + '\n' }}"
        "{% else %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}{% endif %}"
        "{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
    )
    tok = _tokenizer_with(tiny_model_dir, template)
    with pytest.raises(TokenizationError, match="end-of-turn") as e:
        tokenize_conversation(tok, make_messages(0, 0), where="recs.jsonl:line 1 (id='t0-r0')")
    assert "messages[2]" in str(e.value) and "recs.jsonl:line 1" in str(e.value) and EOT in str(e.value)


def test_template_that_rewrites_history_raises(tiny_model_dir):
    # earlier assistant turns are shortened (like templates that strip past reasoning): prefixes stop matching
    template = (
        "{% for message in messages %}"
        "{% set content = message['content'][:3] if (message['role'] == 'assistant' and not loop.last)"
        " else message['content'] %}"
        "{{ '<|im_start|>' + message['role'] + '\n' + content + '<|im_end|>\n' }}"
        "{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
    )
    tok = _tokenizer_with(tiny_model_dir, template)
    with pytest.raises(TokenizationError, match="prefix mismatch") as e:
        tokenize_conversation(tok, make_messages(0, 1), where="recs.jsonl:line 2 (id='t0-r1')")
    assert "messages[2]" in str(e.value) and "recs.jsonl:line 2" in str(e.value)
    # a single-turn conversation has no history to rewrite and still works
    single = [{"role": "user", "content": "Hi?"}, {"role": "assistant", "content": "The answer is A."}]
    assert tokenize_conversation(tok, single).num_trained > 0


def test_no_assistant_turn_raises(tokenizer):
    with pytest.raises(TokenizationError, match="no assistant turn"):
        tokenize_conversation(tokenizer, [{"role": "user", "content": "hello"}], where="w")


def test_cut_turn_trains_its_text_but_not_its_end_of_turn(tokenizer):
    """A turn the token limit cut off: the template closes it, but the policy never chose to stop there."""
    msgs = make_messages(1, 2)
    full = tokenize_conversation(tokenizer, msgs)
    cut = tokenize_conversation(tokenizer, msgs, cut_turns=[2])
    assert cut.input_ids == full.input_ids
    eot = end_of_turn_id(tokenizer)
    ends = [t for t, (i, lab) in enumerate(zip(full.input_ids, full.labels)) if i == eot and lab != IGNORE_INDEX]
    assert len(ends) == 3
    diff = [t for t, (a, b) in enumerate(zip(full.labels, cut.labels)) if a != b]
    assert diff == [ends[1]] and cut.labels[ends[1]] == IGNORE_INDEX  # only turn 2's end-of-turn is masked
    assert cut.num_trained == full.num_trained - 1
    assistants = [m["content"] for m in msgs if m["role"] == "assistant"]
    trained = tokenizer.decode([i for i, lab in zip(cut.input_ids, cut.labels) if lab != IGNORE_INDEX])
    assert trained == assistants[0] + EOT + assistants[1] + assistants[2] + EOT
    # the final-answer view numbers turns within what it trains: turn 1 is its only assistant turn
    only_last = tokenize_conversation(tokenizer, msgs, only_last_assistant=True, cut_turns=[3])
    assert eot not in [i for i, lab in zip(only_last.input_ids, only_last.labels) if lab != IGNORE_INDEX]
