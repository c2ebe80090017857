"""Chat-template tokenization with assistant-only labels, built once when the dataset is prepared.

Labels are −100 everywhere except the assistant turns; each assistant turn's end-of-turn token is trained (the model
must learn to stop), template glue after it (e.g. ChatML's trailing newline) is not — except after a turn that the
token limit cut off (``cut_turns``): the template closes it anyway, but the policy never chose to stop there, so
that end-of-turn token is masked (training it would teach stopping mid-sentence). System, teacher (``user``) and
template tokens are masked. Text an assistant turn copied from its per-turn instruction block (an *echo*,
:mod:`clarify_lit.data.echoes`) is masked too: the block is conditioning and is never trained on, in the teacher's turn
or copied into the policy's.

How assistant spans are found: the conversation is rendered once; for every assistant turn ``i`` the template is also
rendered for ``messages[:i]`` with the generation prompt and for ``messages[:i+1]``. Both renders must be text
prefixes of the full render (else the template rewrites history, e.g. strips earlier reasoning, and we refuse: a
"prefix mismatch"). Tokens whose first character falls between the two prefix lengths belong to turn ``i``.
"""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass
from typing import Literal

from clarify_lit.data.echoes import turn_echoes

IGNORE_INDEX = -100
#: How a system message reaches the chat template: as is, or folded into the first user turn (templates without a
#: system role, e.g. Gemma's).
SystemPrompt = Literal["keep", "fold"]


class TokenizationError(ValueError):
    """A conversation cannot be turned into a valid training sample; the message names source, record and field."""


class ChatTemplateError(TokenizationError):
    """The tokenizer's chat template raised on a conversation (e.g. "System role not supported")."""


def fold_system_prompt(messages: list[dict[str, str]]) -> list[dict[str, str]]:
    """``messages`` with a leading system message merged into the first user turn (``<system>\n\n<user>``)."""
    if not messages or messages[0]["role"] != "system":
        return messages
    system, rest = messages[0]["content"], list(messages[1:])
    for i, m in enumerate(rest):
        if m["role"] == "user":
            rest[i] = {"role": "user", "content": f"{system}\n\n{m['content']}"}
            return rest
    return [{"role": "user", "content": system}, *rest]


@dataclass
class TokenizedSample:
    input_ids: list[int]
    labels: list[int]
    truncated: int = 0  # tokens cut from the middle
    echo_masked: int = 0  # assistant tokens masked because they echo the instruction block

    @property
    def num_trained(self) -> int:
        return sum(1 for x in self.labels if x != IGNORE_INDEX)


def _render(tokenizer, messages: list[dict], add_generation_prompt: bool, where: str = "<conversation>") -> str:
    try:
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)
    except Exception as e:  # jinja2's TemplateError (raise_exception in the template) and its kin
        if isinstance(e, TokenizationError):
            raise
        problem = " ".join(str(e).split())[:200] or type(e).__name__
        hint = ""
        if messages and messages[0].get("role") == "system" and "system" in problem.lower():
            hint = (
                "; this template accepts no system message: set --data.system_prompt fold to merge it into the "
                "first user turn"
            )
        raise ChatTemplateError(
            f"{where}: field 'messages': the tokenizer's chat template refused the conversation ({problem}){hint}"
        ) from None


def _mask_echoes(
    labels: list[int],
    starts: list[int],
    full: str,
    lo: int,
    hi: int,
    content: str,
    spans: list[tuple[int, int]],
    where: str,
    i: int,
) -> int:
    """Mask (label −100) the tokens of assistant message ``i`` whose first character lies in an echoed span of its
    ``content`` (rendered between ``lo`` and ``hi`` of ``full``); the number masked."""
    at = full.find(content, lo, hi)
    if at < 0:
        raise TokenizationError(
            f"{where}: field 'messages[{i}]': the reply echoes its instruction block, but the chat template rewrites "
            "the reply's text, so the echo cannot be located to be masked; the record is refused"
        )
    masked = 0
    for t, s in enumerate(starts):
        if labels[t] != IGNORE_INDEX and any(at + a <= s < at + b for a, b in spans):
            labels[t] = IGNORE_INDEX
            masked += 1
    return masked


def end_of_turn_id(tokenizer) -> int:
    """The token that closes an assistant turn: the tokenizer's EOS (``<|im_end|>`` in ChatML, ``<|eot_id|>`` in
    Llama-3 instruct tokenizers)."""
    if tokenizer.eos_token_id is None:
        raise TokenizationError("tokenizer has no eos_token: cannot tell which token ends an assistant turn")
    return int(tokenizer.eos_token_id)


def tokenize_conversation(
    tokenizer,
    messages: list[dict[str, str]],
    max_length: int | None = None,
    where: str = "<conversation>",
    only_last_assistant: bool = False,
    cut_turns: Collection[int] = (),
    system_prompt: SystemPrompt = "keep",
) -> TokenizedSample:
    """Tokenize ``messages`` with the chat template; train on assistant turns only.

    ``cut_turns``: assistant turns (1-based, counted in ``messages``) that hit the generation limit; their text is
    trained, their end-of-turn token is not.

    ``only_last_assistant`` trains the final assistant turn alone (DPO's final-answer pairs). Over-long samples keep
    the system prompt and lose tokens from the left of the middle; if that would cut into the final assistant turn a
    :class:`TokenizationError` is raised (the final answer is what the reward scored). ``where`` names the source
    and record id in every error. ``system_prompt="fold"`` merges a system message into the first user turn first
    (:func:`fold_system_prompt`); a template that raises gives :class:`ChatTemplateError`.
    """
    if system_prompt == "fold":
        messages = fold_system_prompt(messages)
    full = _render(tokenizer, messages, add_generation_prompt=False, where=where)
    enc = tokenizer(full, add_special_tokens=False, return_offsets_mapping=True)
    ids: list[int] = list(enc["input_ids"])
    starts = [s for s, _ in enc["offset_mapping"]]
    labels = [IGNORE_INDEX] * len(ids)
    eot = end_of_turn_id(tokenizer)

    assistant_idx = [i for i, m in enumerate(messages) if m["role"] == "assistant"]
    if not assistant_idx:
        raise TokenizationError(f"{where}: field 'messages': no assistant turn to train on")
    cut_idx = {assistant_idx[t - 1] for t in cut_turns if 1 <= t <= len(assistant_idx)}
    if only_last_assistant:
        assistant_idx = assistant_idx[-1:]
    final_start = len(ids)
    echoes = turn_echoes(messages)
    echo_masked = 0
    for i in assistant_idx:
        before = _render(tokenizer, messages[:i], add_generation_prompt=True, where=where)
        through = _render(tokenizer, messages[: i + 1], add_generation_prompt=False, where=where)
        if not through.startswith(before) or not full.startswith(through):
            raise TokenizationError(
                f"{where}: field 'messages[{i}]': chat template prefix mismatch — rendering the conversation up to "
                "this turn is not a prefix of the full rendering (the template rewrites earlier turns); "
                "per-turn assistant-only labels cannot be built"
            )
        lo, hi = len(before), len(through)
        span = [t for t in range(len(ids)) if lo <= starts[t] < hi]
        eot_pos = [t for t in span if ids[t] == eot]
        if not eot_pos:
            raise TokenizationError(
                f"{where}: field 'messages[{i}]': the chat template puts no end-of-turn token "
                f"({tokenizer.convert_ids_to_tokens(eot)!r}) inside the assistant turn, so the model would never "
                "learn to stop; fix the template or the tokenizer's eos_token"
            )
        for t in span:
            if t < eot_pos[-1] or (t == eot_pos[-1] and i not in cut_idx):
                labels[t] = ids[t]
        if i in echoes:
            echo_masked += _mask_echoes(labels, starts, full, lo, hi, messages[i]["content"], echoes[i], where, i)
        final_start = span[0] if span else final_start

    truncated = 0
    if max_length is not None and len(ids) > max_length:
        excess = len(ids) - max_length
        head = 0
        if messages[0]["role"] == "system":
            sys_end = len(_render(tokenizer, messages[:1], add_generation_prompt=False, where=where))
            head = sum(1 for s in starts if s < sys_end)
        if head + excess > final_start:
            raise TokenizationError(
                f"{where}: field 'messages': {len(ids)} tokens exceed max_length={max_length} and cutting the "
                f"middle would truncate the final assistant turn (system prompt {head} tokens, final turn starts at "
                f"token {final_start}); raise max_length or shorten the conversation"
            )
        ids = ids[:head] + ids[head + excess :]
        labels = labels[:head] + labels[head + excess :]
        truncated = excess
    sample = TokenizedSample(ids, labels, truncated, echo_masked)
    if sample.num_trained == 0:
        raise TokenizationError(f"{where}: field 'messages': no trainable (assistant) tokens left")
    return sample
