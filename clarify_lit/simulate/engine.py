"""Batched generation for many conversations at once.

:class:`GenerationEngine` takes a list of conversations (chat messages ending with a ``user`` turn) and produces the
next assistant turn of each, in left-padded batches through ``model.generate`` (KV cache on). Rows of different
temperatures share a batch (``mix_temperatures``, default): ``generate`` takes one temperature per call, so a
:class:`RowTemperature` logits processor divides each row's logits by its own temperature (a greedy row keeps only
its arg-max, so it decodes exactly as greedy search would) — with three temperatures per question this fills batches
three times fuller than grouping by temperature. Rows are optionally sorted by prompt length so a batch pads little.
Each ``generate`` call is seeded from ``(seed, temperature or "mixed", batch index)`` inside a forked RNG, so the
same inputs and seed give the same text, and the caller's RNG state is untouched.

The engine never changes the shared tokenizer (padding is done here, by hand) and puts the model back into the
train/eval mode it found.
"""

from __future__ import annotations

import hashlib
import logging
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Literal

import torch

from clarify_lit.data.records import Message
from clarify_lit.simulate.decode import (
    DECODE_MODES,
    PREALLOCATED_LAYER,
    DecodeMode,
    decode_step_for,
    own_decode_step,
    reserve_kv,
)

log = logging.getLogger(__name__)

#: Attention kernel for generation: ``model`` keeps what the model was loaded with (SDPA by default); ``eager`` is
#: transformers' plain matmul-softmax-matmul; ``gqa`` is SDPA for prompts and, for one-token decode steps, two
#: matmuls over the key/value heads (:func:`gqa_decode_attention`). On CPU both decode faster than SDPA at long
#: contexts, but their numerics differ from SDPA's, so greedy text can differ where two tokens nearly tie
#: (docs/simulate.md, Throughput).
Attention = Literal["model", "sdpa", "eager", "gqa"]
GQA_DECODE = "clarify_gqa_decode"  # the name ``gqa`` is registered under in transformers' attention interface


def derive_seed(*parts: object) -> int:
    """A 63-bit seed from any tuple of parts (stable across processes and Python versions, unlike ``hash``)."""
    digest = hashlib.sha256(repr(parts).encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


@dataclass
class Generation:
    """One generated assistant turn."""

    text: str
    n_tokens: int  # generated tokens, the end-of-turn token included
    truncated: bool  # hit max_new_tokens before an end-of-turn token


@dataclass
class GenerationStats:
    """Running totals, for progress bars and summaries."""

    calls: int = 0
    rows: int = 0
    new_tokens: int = 0
    truncated: int = 0
    seconds: float = 0.0
    prompt_tokens: int = 0  # prompt tokens of all rows (what re-encoding every turn would prefill)
    reused_tokens: int = 0  # of those, tokens whose keys/values came from the previous turn's cache
    reuse_misses: int = 0  # rows whose cached history re-tokenized differently (re-prefilled, not reused)
    shared_tokens: int = 0  # prompt tokens of fresh rows served by their batch's common prefix (prefilled once)
    row_steps: int = 0  # rows × decode steps of every generate call: new_tokens / row_steps is the share of the
    # decoded rows that still produced a token (the rest had ended their turn and decoded padding)

    def record(self, results: Sequence[Generation], seconds: float) -> None:
        """Count one ``generate`` call's rows, tokens, truncations and time."""
        self.rows += len(results)
        self.new_tokens += sum(r.n_tokens for r in results)
        self.truncated += sum(r.truncated for r in results)
        self.seconds += seconds

    def add(self, other: GenerationStats) -> None:
        for name in (
            "calls",
            "rows",
            "new_tokens",
            "truncated",
            "seconds",
            "prompt_tokens",
            "reused_tokens",
            "reuse_misses",
            "shared_tokens",
            "row_steps",
        ):
            setattr(self, name, getattr(self, name) + getattr(other, name))


def row_temperatures(n_rows: int, temperatures: float | Sequence[float]) -> list[float]:
    """One temperature per row: a single value is repeated; a list must have one per row."""
    if isinstance(temperatures, int | float):
        return [float(temperatures)] * n_rows
    if len(temperatures) != n_rows:
        raise ValueError(f"{n_rows} conversations but {len(temperatures)} temperatures")
    return [float(t) for t in temperatures]


@contextmanager
def eval_mode(model: torch.nn.Module) -> Iterator[None]:
    """Switch to eval() for the block and restore the previous mode (a training loop may call us mid-epoch)."""
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)


def gqa_decode_attention(
    module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """Attention for ``attention="gqa"``: a one-token query (a decode step) is two matmuls over the key/value heads,
    the query heads of a group stacked as rows — no copy of the cache per query head (transformers' eager
    ``repeat_kv``), and none of the tiling SDPA's CPU kernel spends on a one-token query. Prompts (and training) go
    to SDPA unchanged. Masks are SDPA's (boolean, or none)."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    if query.shape[2] != 1 or module.training:
        return sdpa_attention_forward(
            module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs
        )
    b, heads, _, dim = query.shape
    groups = key.shape[1]
    scores = torch.matmul(query.reshape(b, groups, heads // groups, dim), key.transpose(2, 3))
    scores = scores * (dim**-0.5 if scaling is None else scaling)
    if attention_mask is not None:  # (b, 1, 1, kv_len): broadcast over groups and their heads
        mask = attention_mask[..., : key.shape[-2]]
        scores = scores.masked_fill(~mask, float("-inf")) if mask.dtype == torch.bool else scores + mask
    probs = torch.softmax(scores, dim=-1, dtype=torch.float32).to(value.dtype)
    return torch.matmul(probs, value).reshape(b, heads, 1, dim).transpose(1, 2).contiguous(), None


def attention_implementation(attention: Attention) -> str:
    """transformers' name of an :data:`Attention` choice (registering ``gqa`` on first use)."""
    if attention != "gqa":
        return attention
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(GQA_DECODE, gqa_decode_attention)
    AttentionMaskInterface.register(GQA_DECODE, sdpa_mask)
    return GQA_DECODE


@contextmanager
def attention_kernel(model: torch.nn.Module, attention: Attention) -> Iterator[None]:
    """Run the block with ``attention`` as the model's attention implementation and restore the one it had."""
    before = getattr(getattr(model, "config", None), "_attn_implementation", None)
    switch = attention != "model" and before is not None and before != attention_implementation(attention)
    if switch:
        model.set_attn_implementation(attention_implementation(attention))
    try:
        yield
    finally:
        if switch:
            model.set_attn_implementation(before)


@contextmanager
def seeded(seed: int) -> Iterator[None]:
    """Seed torch inside a forked RNG so the caller's random state (e.g. a training loop's) is not disturbed."""
    devices = list(range(torch.cuda.device_count())) if torch.cuda.is_available() else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        yield


def model_device(model: torch.nn.Module) -> torch.device:
    try:
        return next(model.parameters()).device
    except StopIteration:  # a parameter-less stub
        return torch.device("cpu")


def end_token_ids(tokenizer, model=None) -> list[int]:
    """Token ids that end an assistant turn: EOS, ``<|im_end|>`` if the vocabulary has it, the model's EOS list."""
    ids: list[int] = []
    candidates: list[int | None] = [tokenizer.eos_token_id]
    im_end = tokenizer.convert_tokens_to_ids("<|im_end|>") if "<|im_end|>" in tokenizer.get_vocab() else None
    candidates.append(im_end)
    gen_eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    candidates.extend(gen_eos if isinstance(gen_eos, list) else [gen_eos])
    for i in candidates:
        if isinstance(i, int) and i not in ids:
            ids.append(i)
    if not ids:
        raise ValueError("tokenizer has no EOS token; set tokenizer.eos_token so generation can stop")
    return ids


def left_pad(rows: Sequence[Sequence[int]], pad_id: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """``(input_ids, attention_mask)`` with every row right-aligned (padding on the left, mask 0 there)."""
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        if len(r):
            ids[i, width - len(r) :] = torch.tensor(list(r), dtype=torch.long)
            mask[i, width - len(r) :] = 1
    return ids.to(device), mask.to(device)


# A batch's common prompt prefix is prefilled once only from this many tokens (below it the extra forward costs more
# than it saves).
MIN_SHARED_PREFIX = 8


def _append_kv(held: torch.Tensor, buffer: torch.Tensor | None, new: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``held`` + ``new`` along the sequence axis, written into ``buffer`` when ``held`` is its leading part and it
    has room (else into a new buffer with headroom, :func:`~clarify_lit.simulate.decode.reserve_kv`); returns the
    view of the filled part and the buffer."""
    n = held.shape[-2] if held.dim() == 4 else 0
    need = n + new.shape[-2]
    buffer = reserve_kv(held, buffer, new, need)
    buffer[:, :, n:need] = new
    return buffer[:, :, :need], buffer


def _preallocated_layer_class() -> type:
    """:class:`PreallocatedLayer` on top of transformers' ``DynamicLayer`` (built on first use: transformers is
    imported lazily in this module)."""
    from transformers.cache_utils import DynamicLayer

    global _PREALLOCATED_LAYER
    if _PREALLOCATED_LAYER is None:
        _PREALLOCATED_LAYER = type(
            PREALLOCATED_LAYER,
            (DynamicLayer,),
            {"__doc__": PREALLOCATED_DOC, "update": _preallocated_update, "_key_buffer": None, "_value_buffer": None},
        )
    return _PREALLOCATED_LAYER


PREALLOCATED_DOC = """A ``DynamicLayer`` whose keys/values live in a buffer with room to grow, ``keys``/``values`` being
views of its filled part: a decode step writes one column instead of ``torch.cat`` copying the whole cache (at batch
50 and 600 cached tokens that copy moves more bytes per step than the weights). Same values as the concatenating
layer; ``crop``, ``batch_select_indices`` and in-place writes to ``keys``/``values`` (``_splice``) keep working (a
layer whose tensors were replaced re-adopts them on its next append)."""
_PREALLOCATED_LAYER: type | None = None


def _preallocated_update(
    self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs
) -> tuple[torch.Tensor, torch.Tensor]:
    if not self.is_initialized:
        self.lazy_initialization(key_states, value_states)
    self.keys, self._key_buffer = _append_kv(self.keys, self._key_buffer, key_states)
    self.values, self._value_buffer = _append_kv(self.values, self._value_buffer, value_states)
    return self.keys, self.values


def plain_cache_layers(cache) -> bool:
    """Whether every layer of ``cache`` is a plain per-token one (no sliding window, no quantization)."""
    from transformers.cache_utils import DynamicLayer

    layers = getattr(cache, "layers", None)
    return bool(layers) and all(type(layer) in (DynamicLayer, _preallocated_layer_class()) for layer in layers)


def new_cache(model, preallocate: bool):
    """An empty ``DynamicCache`` for ``model``; with ``preallocate`` its plain per-token layers are
    ``PreallocatedLayer``s (sliding-window or other special layers stay as transformers builds them)."""
    from transformers import DynamicCache
    from transformers.cache_utils import DynamicLayer

    cache = DynamicCache(config=model.config)
    if preallocate:
        cache.layers = [
            _preallocated_layer_class()() if type(layer) is DynamicLayer else layer for layer in cache.layers
        ]
    return cache


def common_prefix(rows: Sequence[Sequence[int]]) -> int:
    """Length of the longest token prefix all rows share."""
    first, n = rows[0], min(len(r) for r in rows)
    for r in rows[1:]:
        k = 0
        while k < n and r[k] == first[k]:
            k += 1
        n = k
    return n


@dataclass
class _CachedBatch:
    """One generate batch kept for the next turn: its rows' keys, the full token ids and attention mask (padding,
    and the filler after a row's end-of-turn token, masked out), each row's real tokens, and the KV cache."""

    keys: list
    ids: torch.Tensor
    mask: torch.Tensor
    tokens: list[list[int]]
    cache: object

    def keep(self, positions: list[int]) -> None:
        if len(positions) == len(self.keys):
            return
        index = torch.tensor(positions, dtype=torch.long, device=self.ids.device)
        self.cache.batch_select_indices(index)
        self.keys = [self.keys[p] for p in positions]
        self.tokens = [self.tokens[p] for p in positions]
        self.ids, self.mask = self.ids[index], self.mask[index]


class TurnCache:
    """KV caches carried from one assistant turn to the next of the same conversations (``generate(...,
    session=TurnCache(), keys=...)``). A conversation's next prompt is its previous prompt + the generated turn + the
    teacher's message, so only that new part needs a forward pass: each cached batch is continued with the new
    tokens appended after a masked gap (rows' new parts differ in length), positions following the real tokens.
    A row whose re-encoded history does not start with the tokens it actually generated (text that re-tokenizes
    differently) is re-prefilled inside its batch (its cache row rewritten) — counted in
    ``GenerationStats.reuse_misses``."""

    def __init__(self) -> None:
        self.batches: list[_CachedBatch] = []


class RowTemperature:
    """A ``LogitsProcessor`` with one temperature per batch row: ``scores / t`` for ``t > 0``; for ``t == 0`` all but
    the row's arg-max are set to ``-inf``, so sampling picks the arg-max (greedy). ``generate`` applies it before its
    own top-k/top-p warpers (and with ``temperature=1`` adds no temperature warper of its own), so every row samples
    from exactly the distribution a one-temperature batch would give it."""

    def __init__(self, temperatures: Sequence[float]):
        self.temperatures = torch.tensor([float(t) for t in temperatures])

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        t = self.temperatures.to(scores.device, scores.dtype)
        greedy = t <= 0
        out = scores / torch.where(greedy, torch.ones_like(t), t).unsqueeze(1)
        if greedy.any():
            keep_best = torch.full_like(scores, float("-inf")).scatter_(1, scores.argmax(-1, keepdim=True), 0.0)
            out = torch.where(greedy.unsqueeze(1), keep_best, out)
        return out


class GenerationEngine:
    """Next-assistant-turn generation for many conversations, batched and left-padded.

    ``batch_size`` rows per ``generate`` call; ``mix_temperatures`` lets rows of different temperatures share a
    batch (else one temperature per batch); ``sort_by_length`` orders rows by prompt length before batching (less
    padding, same greedy text); ``top_p``/``top_k`` apply when sampling (defaults: plain temperature sampling).
    ``min_new_tokens=1`` keeps a turn from ending before it starts. ``reuse_kv_cache`` tells multi-turn callers
    (``rollout_tasks``) to carry each batch's KV cache to the next turn (:class:`TurnCache`) instead of re-encoding
    whole conversations. ``preallocate_kv`` keeps the KV cache in buffers with room to grow (no per-step copy of the
    whole cache; same values, same text); ``share_prefix`` prefills a fresh batch's common prompt prefix (the system
    prompt) once and shares its keys/values across the rows (off by default: a batch-1 prefill rounds differently in
    bfloat16, so greedy text can differ); ``attention`` picks the attention kernel for generation
    (:data:`Attention`). ``decode_step`` runs ``generate``'s one-token steps through a decode step of our own
    (:mod:`clarify_lit.simulate.decode`; Llama-like models, the preallocated cache): ``"eager"`` (the model's
    own ops, the same logits), ``"matmul"`` (attention as two matmuls, not SDPA), ``"compiled"`` (``torch.compile``d
    ``matmul``: fused kernels round differently) or ``"model"`` (the model's forward).
    """

    def __init__(
        self,
        model,
        tokenizer,
        *,
        batch_size: int = 8,
        max_new_tokens: int = 64,
        sort_by_length: bool = True,
        top_p: float = 1.0,
        top_k: int = 0,
        min_new_tokens: int = 1,
        mix_temperatures: bool = True,
        reuse_kv_cache: bool = True,
        preallocate_kv: bool = True,
        share_prefix: bool = False,
        attention: Attention = "model",
        decode_step: DecodeMode = "model",
    ):
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
        self.model = model
        self.tokenizer = tokenizer
        self.batch_size = batch_size
        self.max_new_tokens = max_new_tokens
        self.sort_by_length = sort_by_length
        self.top_p = top_p
        self.top_k = top_k
        self.min_new_tokens = min_new_tokens
        self.mix_temperatures = mix_temperatures
        self.reuse_kv_cache = reuse_kv_cache  # read by multi-turn callers (rollout_tasks) to open a TurnCache
        self.preallocate_kv = preallocate_kv
        self.share_prefix = share_prefix
        if attention not in ("model", "sdpa", "eager", "gqa"):
            raise ValueError(f"attention must be model, sdpa, eager or gqa, got {attention!r}")
        self.attention = attention
        if decode_step not in DECODE_MODES:
            raise ValueError(f"decode_step must be one of {', '.join(DECODE_MODES)}, got {decode_step!r}")
        self.decode_step = decode_step
        self.end_ids = end_token_ids(tokenizer, model)
        pad = tokenizer.pad_token_id
        self.pad_id = pad if pad is not None else self.end_ids[0]
        self.stats = GenerationStats()

    # -- encoding ---------------------------------------------------------------------------------------------

    def encode(self, messages: Sequence[Message], assistant_prefix: str = "") -> list[int]:
        """Token ids of a chat prompt ending with the assistant header (plus an optional forced prefix)."""
        try:
            text = self.tokenizer.apply_chat_template(list(messages), tokenize=False, add_generation_prompt=True)
        except Exception as e:  # jinja2's TemplateError (raise_exception in the template), not a stack trace
            problem = " ".join(str(e).split())[:200] or type(e).__name__
            name = getattr(self.tokenizer, "name_or_path", "") or "the policy"
            hint = (
                " — this model's template accepts no system message; records from such a model can be trained "
                "with --data.system_prompt fold, but the rollout prompts themselves start with one"
                if messages and messages[0].get("role") == "system" and "system" in problem.lower()
                else ""
            )
            raise ValueError(f"the chat template of {name} refused the conversation ({problem}){hint}") from None
        return list(self.tokenizer(text + assistant_prefix, add_special_tokens=False)["input_ids"])

    # -- generation -------------------------------------------------------------------------------------------

    def _config(self, temperature: float, max_new_tokens: int, return_dict: bool = False):
        from transformers import GenerationConfig

        common = dict(
            max_new_tokens=max_new_tokens,
            min_new_tokens=min(self.min_new_tokens, max_new_tokens),
            eos_token_id=self.end_ids,
            pad_token_id=self.pad_id,
            use_cache=True,
            return_dict_in_generate=return_dict,
        )
        if temperature <= 0:
            return GenerationConfig(do_sample=False, **common)
        return GenerationConfig(
            do_sample=True, temperature=float(temperature), top_p=self.top_p, top_k=self.top_k, **common
        )

    def plan(self, lengths: Sequence[int], temperatures: Sequence[float]) -> list[tuple[float | None, list[int]]]:
        """The batches as ``(temperature, row indices)``: by temperature (ascending) unless ``mix_temperatures``
        (then one group, temperature ``None``), then optionally by length."""
        groups: dict[float | None, list[int]] = {}
        for i, t in enumerate(temperatures):
            if t < 0:
                raise ValueError(f"temperature must be >= 0, got {t}")
            groups.setdefault(None if self.mix_temperatures else float(t), []).append(i)
        batches = []
        for t in sorted(groups, key=lambda k: -1.0 if k is None else k):
            rows = groups[t]
            if self.sort_by_length:
                rows = sorted(rows, key=lambda i: -lengths[i])  # stable: ties keep input order
            batches.extend((t, rows[k : k + self.batch_size]) for k in range(0, len(rows), self.batch_size))
        return batches

    def generate(
        self,
        conversations: Sequence[Sequence[Message]],
        temperatures: float | Sequence[float],
        *,
        seed: int,
        max_new_tokens: int | None = None,
        session: TurnCache | None = None,
        keys: Sequence | None = None,
        assistant_prefixes: Sequence[str] | None = None,
    ) -> list[Generation]:
        """The next assistant turn of every conversation, in input order. With ``session`` (and one stable ``key``
        per conversation), the KV caches of the previous turn's batches are continued instead of re-encoding the
        whole conversation (see :class:`TurnCache`). ``assistant_prefixes`` (one per conversation, "" = none) force
        the start of a reply (seeded exploration): the returned text begins with it, the token budget counts only
        the generated tokens."""
        temperatures = row_temperatures(len(conversations), temperatures)
        if not conversations:
            return []
        forced = list(assistant_prefixes) if assistant_prefixes is not None else [""] * len(conversations)
        if len(forced) != len(conversations):
            raise ValueError(f"{len(forced)} assistant prefixes for {len(conversations)} conversations")
        prompts = [self.encode(c, assistant_prefix=f) for c, f in zip(conversations, forced, strict=True)]
        return self.generate_ids(
            prompts,
            temperatures,
            seed=seed,
            max_new_tokens=max_new_tokens,
            session=session,
            keys=keys,
            text_prefixes=forced,
        )

    def generate_ids(
        self,
        prompts: Sequence[Sequence[int]],
        temperatures: Sequence[float],
        *,
        seed: int,
        max_new_tokens: int | None = None,
        session: TurnCache | None = None,
        keys: Sequence | None = None,
        text_prefixes: Sequence[str] | None = None,
    ) -> list[Generation]:
        """Like :meth:`generate` for already-encoded prompts; ``text_prefixes`` (the forced starts already encoded at
        the end of the prompts) are put back in front of the decoded replies."""
        from transformers import LogitsProcessorList

        if session is not None and (keys is None or len(keys) != len(prompts) or len(set(keys)) != len(keys)):
            raise ValueError("generate(session=...) needs one distinct key per conversation")
        text_prefixes = list(text_prefixes) if text_prefixes is not None else [""] * len(prompts)
        max_new = max_new_tokens or self.max_new_tokens
        results: list[Generation | None] = [None] * len(prompts)
        device = model_device(self.model)
        start = time.perf_counter()
        self.stats.prompt_tokens += sum(len(p) for p in prompts)
        with (
            eval_mode(self.model),
            attention_kernel(self.model, self.attention),
            torch.inference_mode(),
            own_decode_step(self.model, decode_step_for(self.model, self.decode_step)),
        ):
            jobs: list[tuple[float | None, list[int], _CachedBatch | None]] = []
            fresh = list(range(len(prompts)))
            if session is not None:
                continued, fresh = self._continuations(session, prompts, keys)
                jobs += [(None, rows, batch) for rows, batch in continued]
            lengths = [len(p) for p in prompts]
            fresh_plan = self.plan([lengths[i] for i in fresh], [temperatures[i] for i in fresh])
            jobs += [(t, [fresh[j] for j in rows], None) for t, rows in fresh_plan]
            kept: list[_CachedBatch] = []
            for b, (temp, rows, cached) in enumerate(jobs):
                cache = cached.cache if cached is not None else None
                if cached is not None:
                    ids, mask = self._continue_inputs(cached, [prompts[i] for i in rows], device)
                elif self.preallocate_kv or self.share_prefix:
                    cache = new_cache(self.model, self.preallocate_kv)
                    ids, mask = self._fresh_inputs([prompts[i] for i in rows], cache, device)
                else:
                    ids, mask = left_pad([prompts[i] for i in rows], self.pad_id, device)
                row_temps = {float(temperatures[i]) for i in rows}
                processors = LogitsProcessorList()
                if temp is None and len(row_temps) == 1:  # a batch of one temperature
                    temp = row_temps.pop()
                if temp is None:  # several temperatures: sample at t=1 from logits scaled per row
                    processors.append(RowTemperature([temperatures[i] for i in rows]))
                extra = {} if cache is None else {"cache": cache}
                with seeded(derive_seed(seed, "mixed" if temp is None else temp, b)):
                    out = self.model.generate(
                        input_ids=ids,
                        attention_mask=mask,
                        logits_processor=processors,
                        generation_config=self._config(
                            1.0 if temp is None else temp, max_new, return_dict=session is not None
                        ),
                        **extra,
                    )
                seqs = out.sequences if session is not None else out
                new = seqs[:, ids.shape[1] :].tolist()
                self.stats.row_steps += len(rows) * len(new[0])
                for i, toks in zip(rows, new, strict=True):
                    results[i] = self._decode(toks, max_new, text_prefixes[i])
                if session is not None:
                    kept.append(self._cached_batch([keys[i] for i in rows], seqs, mask, new, out.cache))
                self.stats.calls += 1
            if session is not None:
                session.batches = kept
        self.stats.record(results, time.perf_counter() - start)  # type: ignore[arg-type]
        return results  # type: ignore[return-value]

    def _fresh_inputs(
        self, rows: list[Sequence[int]], cache, device: torch.device
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """A fresh batch's ``(input_ids, attention_mask)``, left-padded. With ``share_prefix`` and a common prefix
        of ``MIN_SHARED_PREFIX``+ tokens (the system prompt), that prefix is prefilled once into ``cache`` (one
        batch-1 forward, then repeated across the rows) and the rows' remaining tokens follow it after a masked gap,
        as a continued turn does (positions follow the mask, so they are the plain left-padded batch's)."""
        # keep one token of every row out of the prefix: generate needs a real last column to predict from
        n = min(common_prefix(rows), min(len(r) for r in rows) - 1) if self.share_prefix and len(rows) > 1 else 0
        if n < MIN_SHARED_PREFIX or not plain_cache_layers(cache):
            return left_pad(rows, self.pad_id, device)
        prefix = torch.tensor([list(rows[0][:n])], dtype=torch.long, device=device)
        self.model(input_ids=prefix, cache=cache, use_cache=True)
        cache.batch_repeat_interleave(len(rows))
        self.stats.shared_tokens += n * (len(rows) - 1)
        ids, mask = left_pad([r[n:] for r in rows], self.pad_id, device)
        return (
            torch.cat([prefix.expand(len(rows), -1), ids], 1),
            torch.cat([torch.ones((len(rows), n), dtype=mask.dtype, device=device), mask], 1),
        )

    # -- turn-to-turn KV reuse (TurnCache) ---------------------------------------------------------------------

    def _continuations(
        self, session: TurnCache, prompts: Sequence[Sequence[int]], keys: Sequence
    ) -> tuple[list[tuple[list[int], _CachedBatch]], list[int]]:
        """Which rows continue which cached batch (rows in batch order), and the rows to prefill afresh.

        A row whose new prompt does not start with its cached tokens (its turn re-tokenized differently) is a miss:
        it is re-prefilled inside its batch (:meth:`_splice`) where the cache allows, else in a fresh batch — a
        separate ``generate`` call whose decoding steps cost as much as the whole batch's."""
        where = {k: i for i, k in enumerate(keys)}
        continued, placed = [], set()
        for batch in session.batches:
            positions, rows, misses = [], [], []
            for pos, (k, toks) in enumerate(zip(batch.keys, batch.tokens, strict=True)):
                i = where.get(k)
                if i is None:
                    continue  # this conversation is over (or not in this call)
                p = prompts[i]
                if len(p) > len(toks) and list(p[: len(toks)]) == toks:
                    positions.append(pos)
                    rows.append(i)
                    continue
                self.stats.reuse_misses += 1
                if self._can_splice(batch, p):
                    misses.append(len(rows))
                    positions.append(pos)
                    rows.append(i)
            if rows:
                batch.keep(positions)
                for r in misses:
                    self._splice(batch, r, prompts[rows[r]])
                continued.append((rows, batch))
                placed.update(rows)
                self.stats.reused_tokens += sum(len(t) for r, t in enumerate(batch.tokens) if r not in misses)
        return continued, [i for i in range(len(prompts)) if i not in placed]

    @staticmethod
    def _can_splice(batch: _CachedBatch, prompt: Sequence[int]) -> bool:
        """Plain per-token caches only (no sliding-window or quantized layers), and a prompt of 2+ tokens."""
        return (
            len(prompt) >= 2
            and plain_cache_layers(batch.cache)
            and batch.cache.get_seq_length() == batch.ids.shape[1] - 1
        )

    def _splice(self, batch: _CachedBatch, r: int, prompt: Sequence[int]) -> None:
        """Re-prefill row ``r`` of a cached batch with ``prompt``: the KV of its first ``h`` tokens (one batch-1
        forward) goes into the row's last ``h`` cache columns, everything before is masked, and the rest of the
        prompt becomes the row's new tail. Positions follow the mask, so they run 0..h-1 as in that forward."""
        width = batch.ids.shape[1] - 1  # cache columns (the last id has not been through the model yet)
        h = min(width, len(prompt) - 1)
        head = torch.tensor([list(prompt[:h])], dtype=torch.long, device=batch.ids.device)
        row_cache = self.model(input_ids=head, use_cache=True).cache
        for dst, src in zip(batch.cache.layers, row_cache.layers, strict=True):
            dst.keys[r, :, width - h : width] = src.keys[0]
            dst.values[r, :, width - h : width] = src.values[0]
        batch.ids[r] = self.pad_id
        batch.ids[r, width - h : width] = head[0]
        batch.mask[r] = 0
        batch.mask[r, width - h : width] = 1
        batch.tokens[r] = list(prompt[:h])

    def _continue_inputs(
        self, batch: _CachedBatch, prompts: list[Sequence[int]], device: torch.device
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The cached ids + each row's new tokens, right-aligned after a masked gap."""
        tails = [list(p[len(t) :]) for p, t in zip(prompts, batch.tokens, strict=True)]
        ids, mask = left_pad(tails, self.pad_id, device)
        return torch.cat([batch.ids, ids], 1), torch.cat([batch.mask, mask], 1)

    def _cached_batch(
        self, keys: list, seqs: torch.Tensor, mask: torch.Tensor, new: list[list[int]], cache
    ) -> _CachedBatch:
        """Keep a finished generate call for the next turn: generated tokens after a row's end token are filler
        (masked out); each row's real tokens are its unmasked ids."""
        gen_mask = torch.zeros((len(new), seqs.shape[1] - mask.shape[1]), dtype=mask.dtype, device=mask.device)
        for r, toks in enumerate(new):
            end = next((k for k, t in enumerate(toks) if t in self.end_ids), len(toks) - 1)
            gen_mask[r, : end + 1] = 1
        full = torch.cat([mask, gen_mask], 1)
        tokens = [seqs[r][full[r].bool()].tolist() for r in range(len(new))]
        return _CachedBatch(keys=list(keys), ids=seqs, mask=full, tokens=tokens, cache=cache)

    def _decode(self, toks: list[int], max_new: int, prefix: str = "") -> Generation:
        """Cut at the first end-of-turn token and decode without special tokens (after a forced ``prefix``, whose
        continuation keeps its leading space: "What does option C" + " mean?")."""
        end = next((k for k, t in enumerate(toks) if t in self.end_ids), None)
        body = toks if end is None else toks[:end]
        text = (prefix + self.tokenizer.decode(body, skip_special_tokens=True)).strip()
        n = len(toks) if end is None else end + 1
        return Generation(text=text, n_tokens=n, truncated=end is None and len(toks) >= max_new)

    # -- scoring ----------------------------------------------------------------------------------------------

    def next_token_logprobs(self, prompts: Sequence[Sequence[int]]) -> torch.Tensor:
        """Log-probabilities of the next token after each prompt, shape ``(len(prompts), vocab)`` (float32, CPU)."""
        device = model_device(self.model)
        outs = []
        with eval_mode(self.model), torch.inference_mode():
            order = sorted(range(len(prompts)), key=lambda i: -len(prompts[i]))
            chunks = [order[k : k + self.batch_size] for k in range(0, len(order), self.batch_size)]
            for rows in chunks:
                ids, mask = left_pad([prompts[i] for i in rows], self.pad_id, device)
                position_ids = (mask.cumsum(-1) - 1).clamp(min=0)
                logits = self.model(input_ids=ids, attention_mask=mask, position_ids=position_ids).logits[:, -1]
                outs.append((rows, torch.log_softmax(logits.float(), dim=-1).cpu()))
            vocab = outs[0][1].shape[-1] if outs else 0
            scores = torch.empty((len(prompts), vocab))
            for rows, lp in outs:
                scores[rows] = lp
        return scores
