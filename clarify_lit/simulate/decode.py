"""A decode step of our own for Llama-family models (issue 28.1), under ``model.generate``.

``generate`` runs one forward of the whole ``transformers`` model per new token. For a one-token step most of its
cost on a CPU is not the matmuls but the machinery around them: the attention mask rebuilt every step, the cache's
Python update per layer, output-recording hooks and keyword plumbing — over a thousand ATen calls per step
(docs/simulate.md, Throughput). :class:`DecodeStep` replaces that forward for one-token steps only (the prompt's
prefill still goes through the model): the same modules (norms, projections, rotary embedding, MLP, LM head) called
in the same order on the same tensors, the new keys/values written straight into the engine's preallocated cache
buffers, and attention as ``transformers``' SDPA path runs it for a one-token query (the query heads of a group
packed as rows when a padding mask is needed, ``enable_gqa`` without one). Everything else — logits processors,
sampling and its random stream, stopping, the cache handed back for the next turn — stays ``generate``'s.

Two modes (``GenerationEngine(decode_step=...)``):

* ``"eager"``: the step as plain PyTorch ops. Same ops as the model's forward on the same inputs, so the same logits
  (tests/test_decode_step.py compares logits and whole 3-turn greedy rollouts with ``generate``'s own forward).
* ``"matmul"``: the same with attention as two matmuls over the key/value heads (the engine's ``gqa`` arithmetic:
  an fp32 softmax between two bf16 matmuls) instead of SDPA's CPU kernel; the text can differ in bf16 near-ties.
* ``"compiled"``: the ``matmul`` step through ``torch.compile`` (inductor, dynamic shapes: one compilation serves every
  batch size and cache length; compiled once per model and process). Fused kernels round differently from eager
  ops, so bf16 greedy text can differ where two tokens nearly tie; the compile itself takes tens of seconds on a
  2-core CPU (benchmarks/rollout_throughput.py ``--decode-step`` measures it and the step).

:func:`supports` says which models qualify (Llama, and architectures sharing its decoder: Mistral, Qwen2 without
sliding windows); others fall back to the model's own forward, as does any step the fast path does not cover (no
cache yet, several tokens, a cache layer that is not a plain preallocated one, training mode).
"""

from __future__ import annotations

import functools
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Literal

import torch
import torch.nn.functional as F

DecodeMode = Literal["model", "eager", "matmul", "compiled"]
DECODE_MODES = ("model", "eager", "matmul", "compiled")

#: ``config.model_type`` values whose decoder layer is Llama's (pre-norm, rotary, GQA SDPA attention, gated MLP)
LLAMA_LIKE = ("llama", "mistral", "qwen2")

#: the class name of the engine's preallocated cache layer (``engine.PreallocatedLayer``, built lazily there)
PREALLOCATED_LAYER = "PreallocatedLayer"
# Room a preallocated cache keeps beyond what it holds: enough for a turn's new tokens and the next teacher message
# before it has to grow again (growing copies the cache once, as every step of a concatenating cache does).
KV_HEADROOM_MIN = 256
KV_HEADROOM_FRACTION = 0.25


def reserve_kv(held: torch.Tensor | None, buffer: torch.Tensor | None, like: torch.Tensor, need: int) -> torch.Tensor:
    """A buffer of at least ``need`` columns (``[batch, heads, columns, dim]``, ``like``'s batch, heads, dtype and
    device) whose leading part is ``held`` (the filled part of a cache layer): ``buffer`` itself when ``held`` is
    its leading part and it has room, else a new one with headroom and ``held`` copied in."""
    n = held.shape[-2] if held is not None and held.dim() == 4 else 0
    fits = (
        buffer is not None
        and buffer.shape[-2] >= need
        and buffer.shape[:2] == like.shape[:2]
        and buffer.dtype == like.dtype
        and buffer.device == like.device
        and (n == 0 or (held.data_ptr() == buffer.data_ptr() and held.stride() == buffer.stride()))
    )
    if fits:
        return buffer
    room = max(KV_HEADROOM_MIN, int(need * KV_HEADROOM_FRACTION))
    fresh = like.new_empty((*like.shape[:2], need + room, like.shape[-1]))
    if n:
        fresh[:, :, :n] = held
    return fresh


def supports(model) -> bool:
    """Whether :class:`DecodeStep` can run ``model``: a Llama-like causal LM (:data:`LLAMA_LIKE`; projection biases
    live in the ``Linear`` layers it calls) with SDPA attention, no sliding window, and the submodules it calls (a
    PEFT-wrapped model is not one: its forward runs)."""
    cfg = getattr(model, "config", None)
    inner = getattr(model, "model", None)
    if cfg is None or inner is None or getattr(cfg, "model_type", None) not in LLAMA_LIKE:
        return False
    if (
        getattr(cfg, "_attn_implementation", "sdpa") != "sdpa"
        or getattr(cfg, "sliding_window", None)
        and getattr(cfg, "use_sliding_window", True)
    ):
        return False
    needed = ("embed_tokens", "layers", "norm", "rotary_emb")
    return all(hasattr(inner, n) for n in needed) and hasattr(model, "lm_head")


class DecodeStep:
    """One-token decode steps of a Llama-like ``model`` (module docstring); ``__call__`` is a drop-in for the model's
    forward on such a step and returns ``(logits [B, 1, V], cache)``."""

    def __init__(self, model, compiled: bool = False, matmul_attention: bool | None = None):
        self.model = model
        # attention as two matmuls over the key/value heads (the engine's gqa kernel) instead of SDPA: what inductor
        # can fuse (scale, mask, softmax) around two batched matmuls; SDPA stays one opaque CPU kernel that is slow
        # for a one-token bf16 query over a long cache. Default: with compilation only (its numerics differ anyway).
        self.matmul_attention = compiled if matmul_attention is None else matmul_attention
        cfg = model.config
        self.heads = cfg.num_attention_heads
        self.kv_heads = getattr(cfg, "num_key_value_heads", None) or self.heads
        self.head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // self.heads
        self.groups = self.heads // self.kv_heads
        self.compiled = compiled
        self._fn = self._step
        if compiled:
            self._fn = torch.compile(self._step, dynamic=True)

    # -- the step: plain tensor code (what torch.compile traces) ----------------------------------------------------

    def _step(
        self,
        input_ids: torch.Tensor,
        position_ids: torch.Tensor,
        mask: torch.Tensor | None,
        n: int,
        keys: list[torch.Tensor],
        values: list[torch.Tensor],
    ) -> torch.Tensor:
        inner = self.model.model
        b = input_ids.shape[0]
        column = torch.full((1,), n, dtype=torch.long, device=input_ids.device)
        hidden = inner.embed_tokens(input_ids)
        cos, sin = inner.rotary_emb(hidden, position_ids)
        cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
        half = self.head_dim // 2
        for i, layer in enumerate(inner.layers):
            attn = layer.self_attn
            residual = hidden
            x = layer.input_layernorm(hidden)
            q = attn.q_proj(x).view(b, 1, -1, self.head_dim).transpose(1, 2)
            k = attn.k_proj(x).view(b, 1, -1, self.head_dim).transpose(1, 2)
            v = attn.v_proj(x).view(b, 1, -1, self.head_dim).transpose(1, 2)
            # transformers' apply_rotary_pos_emb: x·cos + rotate_half(x)·sin
            q = (q * cos) + (torch.cat((-q[..., half:], q[..., :half]), dim=-1) * sin)
            k = (k * cos) + (torch.cat((-k[..., half:], k[..., :half]), dim=-1) * sin)
            keys[i].index_copy_(2, column, k)  # in place, as a static cache writes (compiles without a copy)
            values[i].index_copy_(2, column, v)
            kk, vv = keys[i][:, :, : n + 1], values[i][:, :, : n + 1]
            if self.matmul_attention:
                o = self._matmul_attention(q, kk, vv, mask, attn.scaling)
            elif mask is None:  # no padding: transformers' SDPA path passes no mask and enable_gqa
                o = F.scaled_dot_product_attention(
                    q, kk, vv, attn_mask=None, dropout_p=0.0, scale=attn.scaling, enable_gqa=self.groups > 1
                )
            else:  # a padding mask: the query heads of a group packed as rows (transformers' pack_gqa)
                qg = q.reshape(b, self.kv_heads, self.groups, self.head_dim) if self.groups > 1 else q
                o = F.scaled_dot_product_attention(qg, kk, vv, attn_mask=mask, dropout_p=0.0, scale=attn.scaling)
            o = o.reshape(b, self.heads, 1, self.head_dim).transpose(1, 2).reshape(b, 1, -1).contiguous()
            hidden = residual + attn.o_proj(o)
            residual = hidden
            hidden = residual + layer.mlp(layer.post_attention_layernorm(hidden))
        return self.model.lm_head(inner.norm(hidden))

    def _matmul_attention(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None, scale: float
    ) -> torch.Tensor:
        """A one-token query's attention as two matmuls per key/value head, the group's query heads as rows; softmax
        in fp32 (``engine.gqa_decode_attention``'s arithmetic)."""
        b = q.shape[0]
        scores = torch.matmul(q.reshape(b, self.kv_heads, self.groups, self.head_dim), k.transpose(2, 3)) * scale
        if mask is not None:  # [b, 1, 1, n]: broadcast over the heads and their group rows
            scores = scores.masked_fill(~mask, float("-inf"))
        probs = torch.softmax(scores, dim=-1, dtype=torch.float32).to(v.dtype)
        return torch.matmul(probs, v)

    # -- the Python side: cache buffers in, views out ---------------------------------------------------------------

    def handles(self, input_ids, attention_mask, cache, kwargs: dict) -> bool:
        """Whether this step is one the fast path covers (else the model's own forward runs)."""
        if input_ids is None or input_ids.dim() != 2 or input_ids.shape[1] != 1 or cache is None:
            return False
        if self.model.training or any(
            kwargs.get(k) for k in ("inputs_embeds", "output_attentions", "output_hidden_states", "labels")
        ):
            return False
        layers = getattr(cache, "layers", None)
        if not (
            bool(layers)
            and all(type(layer).__name__ == PREALLOCATED_LAYER for layer in layers)
            and layers[0].keys is not None
            and layers[0].keys.dim() == 4
            and layers[0].keys.shape[-2] > 0
        ):
            return False
        # the mask covers the cached columns and the new token (generate's 2D mask), or there is none
        return attention_mask is None or (
            attention_mask.dim() == 2 and attention_mask.shape[1] == layers[0].keys.shape[-2] + 1
        )

    def __call__(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None, position_ids: torch.Tensor | None, cache
    ) -> torch.Tensor:
        layers = cache.layers
        n = layers[0].keys.shape[-2]
        b = input_ids.shape[0]
        if position_ids is None:  # as generate would build them: the count of real tokens before, per row
            position_ids = (
                (attention_mask.long().cumsum(-1) - 1)[:, -1:]
                if attention_mask is not None
                else torch.full((b, 1), n, dtype=torch.long, device=input_ids.device)
            )
        mask = None
        if attention_mask is not None and not bool(attention_mask.all()):
            mask = attention_mask[:, None, None, :].bool()
        like = torch.empty(
            (b, self.kv_heads, 0, self.head_dim), dtype=layers[0].keys.dtype, device=layers[0].keys.device
        )
        keys, values = [], []
        for layer in layers:
            layer._key_buffer = reserve_kv(layer.keys, layer._key_buffer, like, n + 1)
            layer._value_buffer = reserve_kv(layer.values, layer._value_buffer, like, n + 1)
            keys.append(layer._key_buffer)
            values.append(layer._value_buffer)
        logits = self._fn(input_ids, position_ids, mask, n, keys, values)
        for layer in layers:
            layer.keys, layer.values = layer._key_buffer[:, :, : n + 1], layer._value_buffer[:, :, : n + 1]
        return logits


_COMPILED: dict[int, DecodeStep] = {}  # one compiled step per model object (compiling costs tens of seconds)


def decode_step_for(model, mode: DecodeMode) -> DecodeStep | None:
    """The :class:`DecodeStep` of ``mode`` for ``model`` (``None`` for ``"model"`` or a model it does not support);
    compiled steps are kept per model, so a process compiles once."""
    if mode == "model" or not supports(model):
        return None
    if mode == "compiled":
        step = _COMPILED.get(id(model))
        if step is None or step.model is not model:
            step = _COMPILED[id(model)] = DecodeStep(model, compiled=True)
        return step
    return DecodeStep(model, matmul_attention=mode == "matmul")


@contextmanager
def own_decode_step(model, step: DecodeStep | None) -> Iterator[None]:
    """Within the block, ``model``'s forward runs ``step`` on the one-token decode steps it covers and the model's
    own forward on everything else; the instance's forward is restored afterwards."""
    if step is None:
        yield
        return
    from transformers.modeling_outputs import CausalLMOutputWithPast

    original = model.forward

    @functools.wraps(original)
    def forward(input_ids=None, attention_mask=None, position_ids=None, cache=None, **kwargs):
        if step.handles(input_ids, attention_mask, cache, kwargs):
            logits = step(input_ids, attention_mask, position_ids, cache)
            return CausalLMOutputWithPast(logits=logits, cache=cache)
        return original(
            input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, cache=cache, **kwargs
        )

    had_own = "forward" in vars(model)
    model.forward = forward
    try:
        yield
    finally:
        if had_own:
            model.forward = original
        else:
            del model.forward
