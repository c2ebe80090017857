"""The GPU check on a machine without a GPU (issue 16 §5): ``benchmarks/gpu_check.sh`` and ``benchmarks/gpu_bench.py``
skip cleanly (one line, exit 0), the random-weight architectures are the real ones, and ``gpu_bench.py --cpu_smoke``
runs the whole measurement code path on the CPU (tiny architecture, tiny batches, in-process: seconds)."""

from __future__ import annotations

import importlib.util
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from clarify_lit.models import ARCHITECTURES, load_causal_lm, load_tokenizer, random_model

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))

import gpu_bench  # noqa: E402


@pytest.mark.slow
def test_gpu_check_script_skips_without_a_gpu(tmp_path):
    env = {**os.environ, "PYTHON": sys.executable, "CUDA_VISIBLE_DEVICES": "", "OUT": str(tmp_path)}
    proc = subprocess.run(
        ["bash", str(REPO / "benchmarks" / "gpu_check.sh")], env=env, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines() == [
        "gpu_check: skipped: no CUDA GPU here (torch.cuda.is_available() is false, or torch is missing)"
    ]
    assert not list(tmp_path.iterdir())  # nothing ran, nothing written


def test_gpu_bench_skips_without_a_gpu(monkeypatch, capsys, tmp_path):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    out = tmp_path / "gpu.json"
    assert gpu_bench.main(["--out", str(out)]) == 0
    assert capsys.readouterr().out.splitlines() == [gpu_bench.NO_GPU]
    assert not out.exists()


def test_random_models_have_the_real_architectures():
    smol = random_model("smollm2-135m", device="meta")
    llama = random_model("llama-3.1-8b", device="meta")
    # parameter counts of HuggingFaceTB/SmolLM2-135M-Instruct and meta-llama/Llama-3.1-8B-Instruct
    assert sum(p.numel() for p in smol.parameters()) == 134_515_008
    assert sum(p.numel() for p in llama.parameters()) == 8_030_261_248
    assert next(llama.parameters()).dtype == torch.bfloat16 and next(llama.parameters()).device.type == "meta"
    c = llama.config
    assert (
        c.hidden_size,
        c.num_hidden_layers,
        c.num_attention_heads,
        c.num_key_value_heads,
        c.intermediate_size,
        c.vocab_size,
    ) == (4096, 32, 32, 8, 14336, 128256)
    rope = c.rope_parameters
    assert rope["rope_type"] == "llama3" and rope["rope_theta"] == 500000.0 and rope["factor"] == 8.0
    assert smol.config.tie_word_embeddings and not c.tie_word_embeddings
    with pytest.raises(ValueError, match="unknown architecture"):
        random_model("gpt-5")


def test_random_names_load_without_files_and_leave_the_rng_alone(clarify_cache):
    state = torch.random.get_rng_state()
    a, b = load_causal_lm("random:tiny", "float32"), random_model("tiny", "float32")
    assert torch.equal(torch.random.get_rng_state(), state)
    assert all(torch.equal(x, y) for x, y in zip(a.parameters(), b.parameters()))  # seeded: the same weights
    assert not a.training and a.config.vocab_size == ARCHITECTURES["tiny"]["vocab_size"]
    tok = load_tokenizer("random:llama-3.1-8b")  # the tiny tokenizer: its ids are valid in every vocabulary
    assert len(tok) <= min(arch["vocab_size"] for arch in ARCHITECTURES.values())
    assert not any((clarify_cache / "models").glob("random*"))


@pytest.mark.slow
def test_cpu_smoke_runs_the_whole_measurement_path(tmp_path, capsys):
    out = tmp_path / "gpu.json"
    assert gpu_bench.main(["--cpu_smoke", "--out", str(out)]) == 0
    assert f"-> {out}" in capsys.readouterr().out
    report = json.loads(out.read_text())
    assert report["gpu"].startswith("none") and report["date"] and report["versions"]["torch"] == torch.__version__
    assert report["settings"]["tokens_per_conversation"]["tiny"]["vocab"] == 320
    assert report["device"]["bf16_matmul_tflops"] >= 0 and report["device"]["copy_gb_per_s_read_plus_write"] > 0
    results = report["results"]["tiny"]
    for variant in ("ours_refit", "ours_dpo"):
        r = results[variant]
        assert r["timed_steps"] == 1 and r["tokens_per_s"] > 0 and r["step_ms"] > 0, r
        assert r["peak_gpu_mem_gb"] is None and r["peak_rss_mb"] > 0  # no GPU: no GPU memory figure
    roll = results["rollout"]
    assert roll["conversations"] == 4 and roll["new_tokens"] == 4 * 3 * 4  # every turn exactly --new_tokens
    assert roll["decode_step_ms"] > 0 and roll["decode_step_bound_ms"] > 0 and roll["weight_bytes"] > 0
    checks = report["same_work_checks"]["tiny"]["values"]
    assert abs(checks["dpo_step0_ours_dpo"]["loss"] - math.log(2)) < 1e-4
    if importlib.util.find_spec("trl") is None:
        assert "not importable" in results["trl_sft_weighted"]["skipped"] and "skipped" in results["trl_dpo"]
    else:
        assert results["trl_sft_weighted"]["tokens_per_s"] > 0 and results["trl_dpo"]["tokens_per_s"] > 0
        assert set(report["ratios_ours_over_trl"]["tiny"]) == {"ours_refit_vs_trl_sft_weighted", "ours_dpo_vs_trl_dpo"}
