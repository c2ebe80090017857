"""Training-memory savers that change no number: what autograd keeps for backward, stored smaller.

* :class:`BitMaskDropout` — LoRA's dropout (``peft`` puts an ``nn.Dropout`` on each adapter's input). On the CPU,
  torch's dropout is ``input * noise`` with ``noise = bernoulli(1 − p) / (1 − p)`` in the input's dtype, and autograd
  keeps ``noise`` for backward: 4 bytes per element of every adapted linear's fp32 input (q, k, v, gate and up read
  the fp32 norm output), 2 bytes for the bf16 inputs of o and down. This one draws the same noise from the same
  random stream with the same two ops, returns the same product, keeps the mask as bits (1/8 byte per element) and
  rebuilds ``noise`` in backward with the same two ops: forward, gradients and the random state afterwards are
  bit-identical (tests/test_train_memory.py). On SmolLM2-135M with rank-16 adapters on all seven linears this is
  ~0.45 MB per token position less than autograd's ~1 MB.
* :func:`lighten_lora_dropout` swaps it into a ``peft`` model in place (eval mode and ``p = 0`` are untouched).

The other saver, the LM-head chunks recomputed in backward, lives with the head (``logprobs.chunked_head_logps``).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn


def pack_bits(mask: Tensor) -> Tensor:
    """A bool tensor as ``uint8`` bytes, 8 elements per byte. Planar: the flattened mask (zero-padded to ``8k``
    elements) is cut into 8 contiguous planes of ``k``, and bit ``i`` of byte ``j`` is element ``i·k + j`` — seven
    vectorised shift-or passes over ``k`` bytes (a per-byte layout would need a strided reduction, ~6× slower)."""
    flat = mask.reshape(-1).view(torch.uint8)
    n = flat.numel()
    k = (n + 7) // 8
    if n != 8 * k:
        flat = torch.cat([flat, flat.new_zeros(8 * k - n)])
    planes = flat.view(8, k)
    packed = planes[0].clone()
    for i in range(1, 8):
        packed |= planes[i] << i
    return packed


def unpack_bits(packed: Tensor, shape: torch.Size) -> Tensor:
    """The bool tensor of ``shape`` that :func:`pack_bits` packed."""
    k = packed.numel()
    out = torch.empty((8, k), dtype=torch.uint8, device=packed.device)
    for i in range(8):
        torch.bitwise_and(packed >> i, 1, out=out[i])
    n = 1
    for d in shape:
        n *= d
    return out.view(-1)[:n].view(torch.bool).view(shape)


class _BitMaskDropout(torch.autograd.Function):
    """``x * noise`` keeping ``noise`` as a bit mask; the ops are those of ATen's CPU ``dropout`` (``_dropout_impl``):
    ``noise = empty_like(x).bernoulli_(1 − p); noise.div_(1 − p); x * noise``, and in backward ``grad * noise``
    (autograd's ``mul`` backward), with ``noise`` rebuilt from the bits by the same ``div_``."""

    @staticmethod
    def forward(ctx, x: Tensor, p: float) -> Tensor:
        noise = torch.empty_like(x).bernoulli_(1 - p)
        ctx.save_for_backward(pack_bits(noise.bool()))
        ctx.p, ctx.shape, ctx.dtype = p, noise.shape, noise.dtype
        noise.div_(1 - p)
        return x * noise

    @staticmethod
    def backward(ctx, grad: Tensor):
        (packed,) = ctx.saved_tensors
        noise = unpack_bits(packed, ctx.shape).to(ctx.dtype)
        noise.div_(1 - ctx.p)
        return grad * noise, None


class BitMaskDropout(nn.Dropout):
    """``nn.Dropout`` whose backward keeps a bit mask instead of the scaled noise tensor (module docstring). Falls
    back to ``nn.Dropout`` itself where torch would not run the CPU kernel mirrored here (another device, ``p`` of 0
    or 1, in-place, eval mode)."""

    def forward(self, x: Tensor) -> Tensor:
        if not self.training or self.inplace or not 0.0 < self.p < 1.0 or x.device.type != "cpu" or x.numel() == 0:
            return super().forward(x)
        return _BitMaskDropout.apply(x, self.p)


def lighten_lora_dropout(model: nn.Module) -> int:
    """Replace each LoRA adapter's ``nn.Dropout`` (``peft``'s ``lora_dropout`` entries) by :class:`BitMaskDropout`
    with the same ``p``, in place; returns how many were replaced. Saves memory, changes no number."""
    n = 0
    for mod in model.modules():
        drops = getattr(mod, "lora_dropout", None)
        if not isinstance(drops, nn.ModuleDict):
            continue
        for key, drop in list(drops.items()):
            if type(drop) is nn.Dropout:
                light = BitMaskDropout(p=drop.p, inplace=drop.inplace)
                light.train(drop.training)
                drops[key] = light
                n += 1
    return n
