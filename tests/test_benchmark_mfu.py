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
    module = ClarifyModule(
        str(tiny_model_dir),
        use_lora=use_lora,
        lora_r=4,
        lora_target_modules=["q_proj", "v_proj", "down_proj"],
        lora_dropout=0.0,
        export_on_fit_end=False,
    )
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


def test_peak_dtype_is_the_steps_matmul_dtype():
    """bf16 autocast runs its matmuls in bf16; ``32-true`` in the weights' dtype: the peak is measured in that one."""
    assert mfu.matmul_dtype("bf16-mixed") == "bfloat16"
    assert mfu.matmul_dtype("32-true") == "float32"
    assert mfu.matmul_dtype("32-true", "bfloat16") == "bfloat16"
    with pytest.raises(ValueError, match="unknown precision"):
        mfu.matmul_dtype("fp8")
    peak = mfu.matmul_peak(n=64, repeats=2, dtype=mfu.matmul_dtype("32-true"))
    assert peak["dtype"] == "float32" and peak["gflops_cpu_best"] > 0


def test_utilisation_refuses_above_100_percent():
    assert mfu.utilisation(50.0, 200.0) == pytest.approx(0.25)
    assert mfu.utilisation(200.0, 200.0) == 1.0
    # issue 28: an fp32 step against the (emulated, slow) bf16 peak of a CPU without native bf16 read 187.6 %
    with pytest.raises(mfu.MFUError, match=r"187\.6%.*bug"):
        mfu.utilisation(187.6, 100.0, " (bfloat16, CPU time)")
    with pytest.raises(mfu.MFUError, match="peak"):
        mfu.utilisation(1.0, 0.0)


def test_train_throughput_reports_the_refusal_not_the_figure():
    """The benchmark's MFU entry holds the error instead of a figure above 100 %, its progress line says so, and the
    aggregate turns it into a failure (the run exits non-zero after writing its JSON)."""
    import train_throughput as tt

    timed = {"seconds": 2.0, "cpu_s_per_step": 1.0, "timed_steps": 2}
    flops = [{"linear_fwd": 1.5e11, "total": 1.5e11}, {"linear_fwd": 1.5e11, "total": 1.5e11}]
    peak = {"dtype": "bfloat16", "gflops_wall_best": 200.0, "gflops_cpu_best": 200.0}
    ok = tt._mfu(timed, flops, peak)
    assert ok["mfu_cpu"] == 0.75 and ok["mfu_wall"] == 0.75 and "error" not in ok
    assert "MFU 75.0% of the bfloat16 matmul peak" in tt.mfu_line(ok)
    bad = tt._mfu(timed, flops, {**peak, "gflops_wall_best": 100.0, "gflops_cpu_best": 100.0})
    assert "mfu_cpu" not in bad and "mfu_wall" not in bad and "150.0%" in bad["error"]
    assert tt.mfu_line(bad).startswith("  MFU refused:")
    run = {
        "tokens_per_s": 1.0,
        "input_tokens_per_s": 1.0,
        "peak_rss_mb": 1.0,
        "s_per_step": 1.0,
        "rss_before_train_mb": 1.0,
        "setup_s": None,
        "tokens_per_cpu_s": 1.0,
        "cpu_s_per_step": 1.0,
        "step0_loss": 0.5,
        "step_losses": [0.5],
        "data_tokens": {},
        "mfu": bad,
    }
    assert tt.aggregate([run])["mfu"] == {"errors": [bad["error"]]}
