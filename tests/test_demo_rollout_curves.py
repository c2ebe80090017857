"""Rollout curves in the preset fits (docs/demo.md#rollout-curves): the demo, reproduce and clarify fits add the
``RolloutEvaluation`` callback on held-out *test* questions of their cell's split, it can be turned off, and it does not
perturb training — a fit with it ends with the same parameters as one without."""

from __future__ import annotations

import json
import shlex
from contextlib import contextmanager, nullcontext
from pathlib import Path

import pytest
import torch

from clarify_lit.cli import main
from clarify_lit.jobs import demo

REPO = Path(__file__).resolve().parents[1]
TINY_TASKS = REPO / "configs" / "simulate" / "tiny-tasks.jsonl"
CB = demo.CALLBACK


def commands(preset: str, out: Path, capsys, *flags: str) -> list[list[str]]:
    """The ``clarify`` commands a preset runs (dry run), as argument lists."""
    demo.main(["--preset", preset, "--dry_run", "true", "--out", str(out), *flags])
    lines = [ln.split("$ ", 1)[1] for ln in capsys.readouterr().out.splitlines() if ln.startswith("[demo] $ ")]
    return [shlex.split(ln)[1:] for ln in lines]


def flag_values(args: list[str], prefix: str) -> dict[str, str]:
    """``--<prefix>key=value`` and ``--<prefix>key value`` flags of one command, keyed without the prefix."""
    found = {}
    for i, a in enumerate(args):
        if a.startswith(prefix):
            key, eq, value = a[len(prefix) :].partition("=")
            found[key] = value if eq else args[i + 1]
    return found


def cell_of(args: list[str], flag: str) -> Path:
    """The ``<cell>/seed<s>`` folder a command writes to."""
    path = Path(args[args.index(flag) + 1])
    return next(p for p in [path, *path.parents] if p.name.startswith("seed"))


@pytest.mark.parametrize("preset", ["demo", "demo-mc", "reproduce", "clarify"])
def test_preset_fits_roll_out_test_questions_of_their_cell(preset, tmp_path, capsys):
    p = demo.PRESETS[preset]
    cmds = commands(preset, tmp_path / preset, capsys)
    sims = {cell_of(c, "--output"): c for c in cmds if c[0] == "simulate"}
    evals = {cell_of(c, "--out_dir"): c for c in cmds if c[0] == "evaluate"}
    fits = [c for c in cmds if c[0] == "fit"]
    assert len(fits) == len(p.experiments) * len(p.seeds) * len(p.objectives)
    for fit in fits:
        assert fit[fit.index(demo.ROLLOUT_EVAL) - 1] == "--config"
        assert fit.count(demo.ROLLOUT_EVAL) == 1
        cb = flag_values(fit, CB)
        cell = cell_of(fit, "--trainer.default_root_dir")
        sim = flag_values(sims[cell], "--")
        assert sim["data.part"] == "train"  # what the fit trains on …
        # … and the callback: the same split (dataset, sizes, split seed), its test part, the first few questions
        # of the ones `clarify evaluate` scores, with the cell's setting, teacher, reward and token cap
        assert cb["data.part"] == "test"
        ev = flag_values(evals[cell], "--")
        for key in ("data.dataset", "data.n_train", "data.n_test", "data.seed", "teacher.kind", "reward.kind"):
            assert cb[key] == sim[key] == ev[key], (preset, key)
        # one rollout block, handed over whole to each command
        rollouts = [json.loads(flags["rollout"]) for flags in (cb, sim, ev)]
        for key in ("setting", "mode", "n_turns", "max_new_tokens", "seed", "reuse_kv_cache"):
            assert rollouts[0][key] == rollouts[1][key] == rollouts[2][key], (preset, key)
        assert rollouts[0]["temperatures"] == [0.0] and "temperatures" not in rollouts[2]  # greedy evaluations
        assert 0 < int(cb["n_questions"]) == p.rollout_questions <= int(sim["data.n_test"])
        assert cb["evals_per_epoch"] == str(p.rollout_evals_per_epoch) and cb["at_fit_start"] == "true"
        # the cell's extra teacher/reward flags reach the callback's teacher/reward too
        for key, value in flag_values(sims[cell], "--teacher.").items():
            if key != "kind":
                assert cb[f"teacher.{key}"] == value


def test_rollout_curves_can_be_turned_off(tmp_path, capsys):
    off = commands("demo", tmp_path / "off", capsys, "--rollout_questions", "0")
    assert [c for c in off if c[0] == "fit"] and not any(demo.ROLLOUT_EVAL in c for c in off)
    two = commands("demo", tmp_path / "two", capsys, "--rollout_questions", "2")
    assert all(flag_values(c, CB)["n_questions"] == "2" for c in two if c[0] == "fit")
    assert not any(demo.ROLLOUT_EVAL in c for c in commands("paper", tmp_path / "paper", capsys))
    with pytest.raises(SystemExit):  # more than the cell's test questions: refused, no training question is used
        demo.main(["--preset", "demo", "--dry_run", "true", "--out", str(tmp_path / "x"), "--rollout_questions", "49"])


# --- the callback does not perturb training -------------------------------------------------------------------------
def tiny_fit(records: Path, root: Path, callback: bool) -> dict[str, torch.Tensor]:
    """A two-epoch tiny Refit fit without validation (as the demo's), with LoRA dropout (training draws from the global
    RNG); with ``callback`` the rollout-eval config rolls out 2 held-out questions *sampling* at T = 1 (generation
    draws from the RNG too) at step 0 and twice per epoch. Returns the trained parameters."""
    cb = []
    if callback:
        cb = [
            "--config",
            str(REPO / demo.ROLLOUT_EVAL),
            f"{CB}data.dataset=local",
            f"{CB}data.path={TINY_TASKS}",
            f'{CB}data.columns={{"question": "question", "choices": "choices", "answer": "answer", "id": "id"}}',
            f"{CB}data.n_train=4",
            f"{CB}data.n_test=4",
            f"{CB}n_questions=2",
            f"{CB}rollout.max_new_tokens=4",
            f"{CB}rollout.temperatures=[1.0]",
            f"{CB}evals_per_epoch=2",
            f"{CB}at_fit_start=true",
        ]
    main(
        [
            "fit",
            "--config",
            str(REPO / "configs/trainer/cpu.yaml"),
            "--config",
            str(REPO / "configs/model/tiny.yaml"),
            "--model.lora_dropout",
            "0.2",
            "--data.train_files",
            f"[{records}]",
            "--data.val_fraction",
            "0",
            "--data.batch_size",
            "2",
            "--seed_everything",
            "0",
            "--trainer.max_epochs",
            "2",
            "--trainer.default_root_dir",
            str(root),
            "--trainer.enable_progress_bar",
            "false",
            "--trainer.enable_model_summary",
            "false",
            "--model.export_on_fit_end",
            "false",
            *cb,
        ]
    )
    state = torch.load(root / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)["state_dict"]
    return {k: v for k, v in state.items() if "lora_" in k}


@pytest.mark.slow
def test_callback_leaves_the_trained_parameters_unchanged(clarify_cache, records_factory, tmp_path, monkeypatch):
    import clarify_lit.evaluate.callback as callback
    import clarify_lit.simulate.engine as engine

    records = records_factory(n_tasks=4, n_runs=2)
    plain = tiny_fit(records, tmp_path / "plain", callback=False)
    with_cb = tiny_fit(records, tmp_path / "cb", callback=True)
    steps = sorted(int(f.name[5:11]) for f in (tmp_path / "cb" / "rollouts").glob("step_*.metrics.json"))
    assert steps[0] == 0 and len(steps) == 5, steps  # step 0, then twice in each of the 2 epochs
    assert plain.keys() == with_cb.keys() and plain
    assert all(torch.equal(plain[k], with_cb[k]) for k in plain), "the rollout callback changed training"

    # the control: the same rollouts drawing their samples from the global RNG (no fork in the callback, none around
    # each generate call) change the trained weights (dropout masks move), so the equality above is the isolation
    # at work, not a test that cannot fail
    @contextmanager
    def shared_rng(module, tokenizer):
        modes = [(m, m.training) for m in module.modules()]
        with torch.no_grad():
            module.eval()
            yield
        for m, was_training in modes:
            m.training = was_training

    monkeypatch.setattr(callback, "isolated", shared_rng)
    monkeypatch.setattr(engine, "seeded", lambda seed: nullcontext())
    leaky = tiny_fit(records, tmp_path / "leaky", callback=True)
    assert not all(torch.equal(plain[k], leaky[k]) for k in plain)
