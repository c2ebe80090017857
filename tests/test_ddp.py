"""``clarify fit`` with ``strategy=ddp, accelerator=cpu, devices=2`` on the tiny model: both ranks train, on disjoint
shards that together cover the data every epoch, stay in sync (same weights at the end), and logged metrics are
reduced across ranks (each rank reports the global value, not its own)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_ddp_ranks_train_disjoint_shards_and_reduce_metrics(records_factory, cache_root, tmp_path):
    records = records_factory(n_tasks=6, n_runs=3)  # 18 conversations: 2 tasks (6) held out, 12 trained
    root, probe = tmp_path / "ddp", tmp_path / "probe"
    callback = json.dumps({"class_path": "ddp_probe.ShardProbe", "init_args": {"out_dir": str(probe)}})
    cmd = [sys.executable, "-m", "clarify_lit.cli", "fit", "--config", str(REPO / "configs/trainer/cpu-ddp.yaml"),
           f"--data.train_files=[{records}]", "--data.val_fraction=0.34", "--data.batch_size=2",
           "--model.model_name_or_path=tiny-random", "--model.learning_rate=1e-2", "--trainer.max_epochs=2",
           f"--trainer.default_root_dir={root}", f"--trainer.callbacks+={callback}",
           "--trainer.enable_progress_bar=false", "--trainer.enable_model_summary=false"]
    env = {**os.environ, "CLARIFY_CACHE": str(cache_root), "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([str(REPO / "tests"), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    try:
        out, _ = proc.communicate(timeout=300)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        pytest.fail("DDP fit hung")
    assert proc.returncode == 0, out[-4000:]
    ranks = [json.loads((probe / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert [r["world_size"] for r in ranks] == [2, 2]

    # both ranks trained, every epoch on disjoint shards that together cover the 12 training conversations
    for epoch in range(2):
        a, b = (set(r["train_ids"][epoch]) for r in ranks)
        assert a and b and not a & b
        assert len(a | b) == 12 and len(a) == len(b)
    assert ranks[0]["trainable_hash"] == ranks[1]["trainable_hash"]  # gradients were all-reduced

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
