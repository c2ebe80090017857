"""The training-step FLOP formula of ``benchmarks/mfu.py`` (issue 16 §3) against what torch counts.

``torch.utils.flop_counter.FlopCounterMode`` counts the matmuls a forward+backward of the tiny LoRA model actually runs
(autograd skips the input gradient of layer 0's q/k/v projections, whose input comes from the frozen embedding); the
formula must give the same FLOPs. Attention runs on SDPA's math backend (the counter does not see the CPU flash
kernel), whose batched matmuls cover all T×T pairs; the formula counts the causal ones, L(L+1)/2 per row: equal after
that conversion."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))

import mfu  # noqa: E402


@pytest.mark.parametrize("use_lora", [True, False])
def test_step_flops_match_torch_flop_counter(tiny_model_dir, use_lora):
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    from clarify_lit.train.module import ClarifyModule, target_logps

    torch.manual_seed(0)
    module = ClarifyModule(str(tiny_model_dir), use_lora=use_lora, lora_r=4,
                           lora_target_modules=["q_proj", "v_proj", "down_proj"], lora_dropout=0.0,
                           export_on_fit_end=False)
    model = module.model
    rows, length = 3, 24
    ids = torch.randint(5, 300, (rows, length))
    labels = ids.clone()
    labels[:, :10] = -100
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}
    with FlopCounterMode(display=False) as counter, sdpa_kernel(SDPBackend.MATH):
        lp, mask = target_logps(model, ids, batch["attention_mask"], labels)
        (-(lp * mask).sum()).backward()
    counted = counter.get_total_flops()

    shapes = mfu.model_shapes(model)
    tokens, visible, trained = mfu.batch_shape(batch)
    assert (tokens, visible, trained) == (rows * length, rows * length * (length + 1) // 2, int(mask.sum()))
    parts = mfu.step_flops(shapes, tokens, visible, trained)
    full_attention = parts["attention"] // visible * rows * length * length  # the math kernel's T×T pairs
    assert parts["linear_fwd"] + parts["linear_bwd"] + parts["lora"] + parts["lm_head"] + full_attention == counted
