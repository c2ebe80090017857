"""``clarify iterate`` end to end on the tiny model (2 rounds, in-process): round folders, round 1 simulated with round
0's exported policy and trained from its adapter, the by-round report, resume, the config lock; the demo's opt-in
iterate step; a LoRA export as ``clarify simulate --model`` and as ``--model.init_adapter``."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from clarify_lit.data.records import load_records
from clarify_lit.jobs.iterate import main as iterate_main

pytestmark = pytest.mark.usefixtures("clarify_cache")

REPO = Path(__file__).resolve().parents[1]
QUIET_FIT = [
    "--trainer.max_steps=2",
    "--trainer.enable_progress_bar=false",
    "--trainer.enable_model_summary=false",
    "--data.batch_size=3",
    "--model.lora_dropout=0.0",
    "--trainer.logger=false",
]


def iterate_args(out: Path, *extra: str) -> list[str]:
    return [
        "--rounds",
        "2",
        "--output",
        str(out),
        "--model",
        "tiny-random",
        "--in_process",
        "true",
        "--model_config",
        str(REPO / "configs/model/tiny.yaml"),
        "--trainer_config",
        str(REPO / "configs/trainer/cpu.yaml"),
        "--objective_config",
        str(REPO / "configs/objective/refit.yaml"),
        "--fit_args",
        json.dumps(QUIET_FIT),
        "--data.dataset",
        "local",
        "--data.path",
        str(REPO / "configs/simulate/tiny-tasks.jsonl"),
        "--data.label",
        "tiny",
        "--data.columns",
        '{"question": "question", "choices": "choices", "answer": "answer", "id": "id"}',
        "--data.n_train",
        "3",
        "--data.n_test",
        "2",
        "--rollout.n_turns",
        "2",
        "--rollout.temperatures",
        "[0.0, 1.0]",
        "--reward.kind",
        "gold_prob",
        "--rollout.max_new_tokens",
        "4",
        "--progress",
        "false",
        *extra,
    ]


@pytest.mark.slow
def test_iterate_two_rounds_end_to_end(tmp_path, capsys):
    out = tmp_path / "it"
    iterate_main(iterate_args(out))
    r0, r1 = out / "round_000", out / "round_001"
    for folder in (r0, r1):
        assert (folder / "simulate" / "conversations.jsonl").is_file()
        assert (folder / "fit" / "export" / "adapter_config.json").is_file()
        assert (folder / "eval" / "metrics.json").is_file() and (folder / "eval" / "rollouts.jsonl").is_file()
    assert (out / "base" / "eval" / "metrics.json").is_file()

    # round 0 simulated with the base model, round 1 with round 0's exported policy
    export0 = r0 / "fit" / "export"
    rec0, _ = load_records(r0 / "simulate" / "conversations.jsonl")
    rec1, _ = load_records(r1 / "simulate" / "conversations.jsonl")
    assert {r.meta["model"] for r in rec0} == {"tiny-random"}
    assert {r.meta["model"] for r in rec1} == {str(export0)}
    assert len(rec1) == 3 * 2 and all(r.reward > 0 for r in rec1)  # gold_prob: dense rewards
    # ... with the base model still judging (gold_prob), not the trained policy
    assert (
        json.loads((r1 / "simulate" / "run_config.json").read_text())["config"]["reward"]["judge_model"]
        == "tiny-random"
    )
    # round 1 trained from round 0's adapter (init=continue) on round 1's conversations only
    import yaml

    fit1 = yaml.safe_load((r1 / "fit" / "config.yaml").read_text())
    assert fit1["model"]["init_adapter"] == str(export0)
    assert fit1["data"]["train_files"] == [str(r1 / "simulate" / "conversations.jsonl")]
    assert yaml.safe_load((r0 / "fit" / "config.yaml").read_text())["model"]["init_adapter"] is None
    evals = [
        json.loads((d / "metrics.json").read_text())["meta"] for d in (out / "base" / "eval", r0 / "eval", r1 / "eval")
    ]
    assert [m["method"] for m in evals] == ["Base", "round 0", "round 1"]
    assert evals[2]["model"] == str(r1 / "fit" / "export") and evals[2]["base_model"].endswith("tiny-random")

    # the report: by-round table, every metric, JSON and plot
    text = (out / "report.md").read_text()
    assert "## Reward and accuracy by round" in text
    for label in ("Base", "round 0", "round 1"):
        assert f"| {label} |" in text
    letters = text.split("## Final-answer letters")[1]  # each policy's letter spread + the constant-answer row
    assert all(f"| {label} |" in letters for label in ("Base", "round 0", "round 1")), letters
    assert "| *accuracy of always answering X* |" in letters
    assert "## Environment" in text and "different machines" not in text  # every row: one machine, one dtype
    segments = json.loads((r0 / "fit" / "run_info.json").read_text())["segments"]  # the fit's stamp
    assert len(segments) == 1 and segments[0]["environment"]["dtype"] in ("32-true", "bf16-mixed")
    summary = json.loads((out / "report.json").read_text())
    rows = summary["rows"]
    assert [r["label"] for r in rows] == ["Base", "round 0", "round 1"]
    assert rows[0]["data"]["n"] == 6 and rows[1]["data"]["n"] == 6 and rows[2]["data"] is None
    assert rows[0]["paired_vs_previous"] is None and rows[1]["paired_vs_previous"]["accuracy"]["n"] == 2
    base_reward = json.loads((out / "base/eval/metrics.json").read_text())["metrics"]["reward"]
    assert rows[0]["eval"]["reward"] == pytest.approx(base_reward)
    assert (out / "report.png").stat().st_size > 1000
    commands = (out / "commands.sh").read_text().splitlines()
    assert len(commands) == 7 and commands[0].startswith("clarify evaluate")
    assert "--model.init_adapter" in commands[5] and "--model.init_adapter" not in commands[2]

    # the LoRA export of round 0 seeds round 1's adapter exactly (the starting point of round 1 = round 0's policy)
    from peft import load_peft_weights

    from clarify_lit.train.module import ClarifyModule

    module = ClarifyModule("tiny-random", lora_r=4, lora_alpha=8, init_adapter=str(export0))
    saved = load_peft_weights(str(export0))
    params = dict(module.model.named_parameters())
    lora = {n: p for n, p in params.items() if "lora_B" in n}
    assert lora and any(p.abs().sum() > 0 for p in lora.values())  # B starts at 0 in a fresh adapter
    for name, weight in saved.items():
        key = next(n for n in params if n.replace(".default", "").endswith(name.replace("base_model.model.", "")))
        assert torch.equal(params[key], weight), name
    with pytest.raises(ValueError, match="does not match"):
        ClarifyModule("tiny-random", lora_r=8, init_adapter=str(export0))

    # clarify simulate --model <export> runs the merged policy; its judge/teacher default to the adapter's base
    from clarify_lit.models import FrozenModels, policy_base

    # the adapter's base as clarify resolved it for training (clarify_export.json), not its portable name
    assert policy_base(str(export0)) == "tiny-random"
    policy, _ = FrozenModels("cpu").get(str(export0), "float32")
    base, _ = FrozenModels("cpu").get("tiny-random", "float32")
    assert not hasattr(policy, "peft_config")  # merged
    q = "model.layers.0.self_attn.q_proj.weight"
    assert not torch.equal(policy.state_dict()[q], base.state_dict()[q])

    # resume: a rerun skips every stage; other options are refused; more rounds would extend the run
    capsys.readouterr()
    iterate_main(iterate_args(out))
    log = capsys.readouterr().out
    assert log.count("skip (done)") == 7 and len((out / "commands.sh").read_text().splitlines()) == 7
    with pytest.raises(ValueError, match="differ in: max_new_tokens"):
        iterate_main(iterate_args(out, "--rollout.max_new_tokens", "5"))


def test_iterate_dry_run_and_cli(tmp_path, capsys):
    from clarify_lit.cli import main

    main(["--help"])
    assert "  iterate " in capsys.readouterr().out
    main(["iterate", *iterate_args(tmp_path / "dry", "--dry_run", "true", "--rounds", "3", "--init", "base")])
    shown = capsys.readouterr().out
    assert shown.count("$ clarify simulate") == 3 and shown.count("$ clarify fit") == 3
    assert "init_adapter" not in shown  # --init base: every round trains a fresh adapter on the base model
    assert not (tmp_path / "dry" / "iterate_config.json").exists() and not (tmp_path / "dry" / "commands.sh").exists()
    sim2 = (tmp_path / "dry" / "round_002" / "simulate.yaml").read_text()
    assert str(tmp_path / "dry" / "round_001" / "fit" / "export") in sim2 and "seed: 2" in sim2


def test_demo_iterate_step_is_opt_in(tmp_path, capsys):
    from clarify_lit.jobs import demo
    from clarify_lit.jobs.demo import main as demo_main

    demo_main(["--preset", "demo", "--dry_run", "true", "--out", str(tmp_path)])
    assert "clarify iterate" not in capsys.readouterr().out  # make demo is unchanged
    demo_main(
        ["--preset", "demo", "--dry_run", "true", "--out", str(tmp_path), "--iterate", "2", "--iterate_only", "true"]
    )
    shown = capsys.readouterr().out
    assert shown.count("[demo] $ clarify ") == 1 and "clarify iterate --rounds 2" in shown
    assert "--model embedded:smollm2-135m-instruct" in shown and "--data.dataset sciq" in shown
    # the command parses (a dry run only prints it): every option the demo passes is one clarify iterate takes
    import shlex

    from clarify_lit.jobs.iterate import parse_config

    line = next(ln for ln in shown.splitlines() if ln.startswith("[demo] $ clarify iterate"))
    cfg = parse_config(shlex.split(line)[4:])
    assert cfg.rounds == 2 and cfg.simulate_args == ["--chunk_size", "32", *demo.OPEN_EXPLORE_OPTIONS]
    assert cfg.data.dataset == "sciq" and cfg.rollout.mode == "open" and cfg.rollout.n_turns == 2
