"""Log-probs of target tokens from hidden states, through the LM head in chunks (no full-vocabulary copy)."""

from __future__ import annotations

import torch
from torch import Tensor
from torch.utils.checkpoint import checkpoint


def _chunk_logps(head, h: Tensor, y: Tensor) -> Tensor:
    logits = head(h).float()
    return logits.gather(-1, y[:, None]).squeeze(-1) - logits.logsumexp(-1)


def chunked_head_logps(
    head, hidden: Tensor, targets: Tensor, chunk_size: int = 1024, recompute: bool = False
) -> Tensor:
    """``log softmax(head(hidden))[targets]`` for ``hidden [N, H]``, ``targets [N]``, ``chunk_size`` rows at a time.

    ``recompute`` (``ClarifyModule(lm_head_recompute=True)``, the default, and always under gradient checkpointing)
    keeps no ``[N, V]`` logits for backward: each chunk's logits are recomputed there, one chunk at a time, by the
    forward's own ops (``torch.utils.checkpoint``: same loss and gradients) — one more LM-head matmul over the
    targets (~4 % of a SmolLM2 LoRA step's FLOPs) against the fp32 logits kept otherwise (4 bytes × N × V) and the
    backward's full-size softmax and gradient buffers (another ~10 bytes × N × V at the start of backward, when every
    other activation is still held). With recomputation the transient is one chunk's: small chunks (256 rows:
    ~0.1 GB at a 49k vocabulary) keep it small.
    """
    parts = []
    grad = recompute and torch.is_grad_enabled() and hidden.requires_grad
    for s in range(0, hidden.shape[0], chunk_size):
        h, y = hidden[s : s + chunk_size], targets[s : s + chunk_size]
        parts.append(checkpoint(_chunk_logps, head, h, y, use_reentrant=False) if grad else _chunk_logps(head, h, y))
    return torch.cat(parts) if parts else hidden.new_zeros(0, dtype=torch.float32)


def uses_gradient_checkpointing(model) -> bool:
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return bool(getattr(base, "is_gradient_checkpointing", False))
