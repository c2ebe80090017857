"""``clarify fit`` with ``strategy=ddp, accelerator=cpu, devices=2`` on the tiny model: both ranks train, on disjoint
shards that together cover the data every epoch (an odd count neither hangs nor crashes the export on rank 0), stay
in sync (same weights at the end), and logged metrics are reduced across ranks (each rank reports the global value,
not its own)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]


def run_ddp_fit(cmd: list[str], cache_root: Path, probe: Path) -> list[dict]:
    """Run a two-process ``clarify fit``; return each rank's probe record (tests/ddp_probe.py)."""
    env = {
        **os.environ,
        "CLARIFY_CACHE": str(cache_root),
        "OMP_NUM_THREADS": "1",
        "PYTHONPATH": os.pathsep.join([str(REPO / "tests"), os.environ.get("PYTHONPATH", "")]),
    }
    proc = subprocess.Popen(
        cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True
    )
    try:
        out, _ = proc.communicate(timeout=300)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        pytest.fail("DDP fit hung")
    assert proc.returncode == 0, out[-4000:]
    return [json.loads((probe / f"rank{r}.json").read_text()) for r in (0, 1)]


@pytest.mark.slow
def test_ddp_ranks_train_disjoint_shards_and_reduce_metrics(records_factory, cache_root, tmp_path):
    """``configs/trainer/cpu-ddp.yaml``: 9 training conversations over 2 ranks (odd: the last step cannot be split
    evenly) must neither hang (uneven micro-batch counts) nor crash at the end (export on rank 0 alone); both ranks
    train on disjoint shards in lockstep, stay in sync, and report validation metrics reduced across ranks."""
    records = records_factory(n_tasks=5, n_runs=3)  # 15 conversations: 2 tasks (6) held out, 9 trained
    root, probe = tmp_path / "ddp", tmp_path / "probe"
    callback = json.dumps({"class_path": "ddp_probe.ShardProbe", "init_args": {"out_dir": str(probe)}})
    cmd = [
        sys.executable,
        "-m",
        "clarify_lit.cli",
        "fit",
        "--config",
        str(REPO / "configs/trainer/cpu-ddp.yaml"),
        f"--data.train_files=[{records}]",
        "--data.val_fraction=0.34",
        "--data.batch_size=2",
        "--model.model_name_or_path=tiny-random",
        "--model.learning_rate=1e-2",
        "--trainer.max_epochs=2",
        f"--trainer.default_root_dir={root}",
        f"--trainer.callbacks+={callback}",
        "--trainer.enable_progress_bar=false",
        "--trainer.enable_model_summary=false",
    ]
    ranks = run_ddp_fit(cmd, cache_root, probe)
    assert [r["world_size"] for r in ranks] == [2, 2]

    # both ranks trained, every epoch on disjoint shards of equal size: 8 of the 9 training conversations (the last,
    # incomplete step cut to a multiple of the world size) = 2 steps of 2 per rank × 2 ranks
    for epoch in range(2):
        a, b = (set(r["train_ids"][epoch]) for r in ranks)
        assert a and b and not a & b
        assert len(a | b) == 8 and len(a) == len(b)
    assert ranks[0]["trainable_hash"] == ranks[1]["trainable_hash"]  # gradients were all-reduced
    ckpt = torch.load(root / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    assert ckpt["global_step"] == 4 and ckpt["epoch"] == 2  # every rank stepped in lockstep
    assert (root / "export" / "adapter_model.safetensors").exists()  # the export on rank 0 alone did not hang

    # metrics were reduced: each rank reports the mean over both ranks' validation batches, not its own
    local = [r["val_losses"] for r in ranks]
    assert local[0] and local[1]
    global_mean = sum(local[0] + local[1]) / len(local[0] + local[1])
    own = [sum(x) / len(x) for x in local]
    for r in ranks:
        assert r["metrics"]["val/loss"] == pytest.approx(global_mean, rel=1e-5)
    assert abs(own[0] - own[1]) > 1e-6  # the shards differ, so a local value would have been told apart
    # the sync_dist-logged validation metrics agree on both ranks too
    shared = [k for k in ranks[0]["metrics"] if k.startswith("val/")]
    assert "val/nll" in shared
    for k in shared:
        assert ranks[0]["metrics"][k] == pytest.approx(ranks[1]["metrics"][k], rel=1e-6), k


@pytest.mark.slow
def test_ddp_precomputed_reference_is_split_across_ranks(records_factory, cache_root, tmp_path, tiny_model_dir):
    """DPO with ``reference=precomputed`` under DDP: each rank computes half of the pairs' reference log-probs and
    both end up holding all of them, equal to a one-process computation."""
    records = records_factory(n_tasks=8, n_runs=3)
    root, probe = tmp_path / "ddp", tmp_path / "probe"
    callback = json.dumps({"class_path": "ddp_probe.ShardProbe", "init_args": {"out_dir": str(probe)}})
    cmd = [
        sys.executable,
        "-m",
        "clarify_lit.cli",
        "fit",
        "--config",
        str(REPO / "configs/trainer/cpu-ddp.yaml"),
        "--config",
        str(REPO / "configs/objective/dpo.yaml"),
        "--model.objective.reference=precomputed",
        "--model.reference_cache=false",
        f"--data.train_files=[{records}]",
        "--data.val_fraction=0",
        "--data.batch_size=2",
        f"--model.model_name_or_path={tiny_model_dir}",
        "--trainer.max_steps=1",
        f"--trainer.default_root_dir={root}",
        f"--trainer.callbacks+={callback}",
        "--trainer.enable_progress_bar=false",
        "--trainer.enable_model_summary=false",
    ]
    ranks = run_ddp_fit(cmd, cache_root, probe)
    n_pairs = len(ranks[0]["ref_logps"])
    assert n_pairs >= 4
    assert ranks[0]["ref_logps"] == ranks[1]["ref_logps"]  # both ranks hold every pair's values
    assert [r["reference_pairs_computed"] for r in ranks] == [(n_pairs + 1) // 2, n_pairs // 2]

    # the same values as one process computing them all (configs/objective/dpo.yaml: final-answer pairs)
    import lightning as L

    from clarify_lit.data.datamodule import ConversationDataModule
    from clarify_lit.train.module import ClarifyModule
    from clarify_lit.train.objectives import DPO

    dm = ConversationDataModule(
        [str(records)],
        tokenizer_name_or_path=str(tiny_model_dir),
        objective=DPO(pairs="final_answer"),
        val_fraction=0.0,
        batch_size=2,
        cache_tokenized=False,
    )
    module = ClarifyModule(
        model_name_or_path=str(tiny_model_dir),
        objective=DPO(pairs="final_answer", reference="precomputed"),
        reference_cache=False,
        export_on_fit_end=False,
    )
    L.Trainer(
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        max_steps=0,
        default_root_dir=str(tmp_path),
    ).fit(module, datamodule=dm)
    assert module.reference_pairs_computed == n_pairs
    one = {s["id"]: [s["ref_chosen_logps"], s["ref_rejected_logps"]] for s in dm.train_set.samples}
    assert one.keys() == ranks[0]["ref_logps"].keys()
    for key, values in one.items():
        assert ranks[0]["ref_logps"][key] == pytest.approx(values, abs=1e-5), key


@pytest.mark.slow
def test_ddp_zero_weight_skip_keeps_the_trajectory(records_factory, cache_root, tmp_path):
    """Under DDP (2 ranks, accumulation 2) skipping weight-0 conversations leaves the trained parameters as they were:
    a rank whose micro-batch is all zeros still joins the gradient all-reduce with an exact zero gradient."""
    nonzero = {(0, 1): 1.0, (3, 0): 0.5, (5, 2): 1.0}
    records = records_factory(n_tasks=6, n_runs=3, rewards=lambda t, r: nonzero.get((t, r), 0.0))
    params = {}
    for skip in (False, True):
        root, probe = tmp_path / f"ddp-{skip}", tmp_path / f"probe-{skip}"
        callback = json.dumps({"class_path": "ddp_probe.ShardProbe", "init_args": {"out_dir": str(probe)}})
        cmd = [
            sys.executable,
            "-m",
            "clarify_lit.cli",
            "fit",
            "--config",
            str(REPO / "configs/trainer/cpu-ddp.yaml"),
            f"--data.train_files=[{records}]",
            "--data.val_fraction=0",
            "--data.batch_size=1",
            "--model.model_name_or_path=tiny-random",
            "--model.learning_rate=1e-2",
            "--model.lora_dropout=0",
            f"--model.skip_zero_weight={str(skip).lower()}",
            "--trainer.max_steps=4",
            "--trainer.accumulate_grad_batches=2",
            f"--trainer.default_root_dir={root}",
            f"--trainer.callbacks+={callback}",
            "--trainer.enable_progress_bar=false",
            "--trainer.enable_model_summary=false",
            "--model.export_on_fit_end=false",
        ]
        ranks = run_ddp_fit(cmd, cache_root, probe)
        assert ranks[0]["trainable_hash"] == ranks[1]["trainable_hash"]
        params[skip] = torch.load(probe / "rank0.pt")
    assert params[False].keys() == params[True].keys()
    assert max(p.abs().max().item() for n, p in params[False].items() if "lora_B" in n) > 1e-3
    for n, p in params[False].items():
        assert torch.allclose(p, params[True][n], atol=1e-6, rtol=0), n
