"""StepDPO: branch generation (prefixes, counts, ``clarify simulate --step_branches``), the per-step pairs view, the
loss at policy == reference, and ``clarify fit`` with the preset."""

from __future__ import annotations

import json
import math
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from conftest import make_record

from clarify_lit.data.datamodule import ConversationDataModule, PadCollator
from clarify_lit.data.records import ConversationRecord, load_records, write_records
from clarify_lit.data.tasks import QATask
from clarify_lit.data.views import ObjectiveDataError, PairExample
from clarify_lit.simulate import command
from clarify_lit.simulate.branches import assistant_positions, branch_prefix, branch_rollouts, branch_summary
from clarify_lit.simulate.rollout import RolloutSpec, rollout_tasks
from clarify_lit.train.module import ClarifyModule
from clarify_lit.train.objectives import StepDPO

pytestmark = pytest.mark.usefixtures("clarify_cache")
ROOT = Path(__file__).resolve().parents[1]
FIXTURE = ROOT / "configs" / "simulate" / "tiny-tasks.jsonl"

TASKS = [
    QATask(
        "sciq/1",
        "sciq",
        "What do plants need to make food?",
        ["sunlight", "sand", "salt", "smoke"],
        "A",
        knowledge="Plants make food by photosynthesis, which uses light energy. Sand is made of small rocks.",
    ),
    QATask("obqa/2", "openbookqa", "Which is a source of heat?", ["ice", "fire", "snow", "rain"], "B"),
]


# ------------------------------------------------------------------------------------------------ branches
@pytest.mark.parametrize("setting", ["reasoning", "clarifying"])
def test_branches_share_the_parent_prefix_and_differ_from_step_t(tiny, setting):
    model, tok = tiny
    spec = RolloutSpec(
        setting=setting, mode="thinking", n_turns=3, temperatures=[0.7, 1.0], max_new_tokens=6, batch_size=4, seed=0
    )
    parents = rollout_tasks(model, tok, TASKS, spec, model_name="tiny-random")
    branch_spec = replace(spec, seed=1)
    branches = branch_rollouts(model, tok, TASKS, parents, branch_spec, model_name="tiny-random")
    # one branch per (parent, assistant step), ordered by parent then step
    assert [b.id for b in branches] == [f"{p.id}#step{t}" for p in parents for t in (1, 2, 3)]
    by_id = {p.id: p for p in parents}
    for b in branches:
        p, t = by_id[b.meta["branch_of"]], b.meta["branch_step"]
        at = assistant_positions(p.messages)[t - 1]
        assert b.messages[:at] == p.messages[:at] == branch_prefix(p.messages, t)  # same prefix (x, τ_{t−1})
        assert [m["role"] for m in b.messages] == [m["role"] for m in p.messages]  # completed to the end
        assert b.messages[at]["role"] == "assistant"
        assert (b.task_id, b.run, b.temperature, b.gold) == (p.task_id, p.run, p.temperature, p.gold)
        assert b.meta["n_turns"] == 3 and b.meta["setting"] == setting and b.reward >= 0

    # sampled at temperature ≥ 0.7, most branched actions differ from the logged ones
    def action(r: ConversationRecord, t: int) -> str:
        return r.messages[assistant_positions(r.messages)[t - 1]]["content"]

    differ = [
        action(b, b.meta["branch_step"]) != action(by_id[b.meta["branch_of"]], b.meta["branch_step"]) for b in branches
    ]
    assert sum(differ) >= len(branches) // 2
    # the records are valid ConversationRecords (unique ids, schema) and deterministic in their seed
    assert branch_rollouts(model, tok, TASKS, parents, branch_spec, model_name="tiny-random") == branches
    # only some runs
    some = branch_rollouts(model, tok, TASKS, parents, branch_spec, runs=[1], model_name="tiny-random")
    assert len(some) == 2 * 3 and {b.run for b in some} == {1}


def test_prefix_rollout_checks_its_prefixes(tiny):
    model, tok = tiny
    good = [[{"role": "system", "content": "s"}, {"role": "user", "content": "q"}]]
    with pytest.raises(ValueError, match="roles"):
        rollout_tasks(
            model, tok, TASKS[:1], RolloutSpec(temperatures=[0.0], max_new_tokens=2), prefixes=good, start_turn=2
        )
    with pytest.raises(ValueError, match="needs prefixes"):
        rollout_tasks(model, tok, TASKS[:1], RolloutSpec(temperatures=[0.0], max_new_tokens=2), start_turn=2)


@pytest.mark.slow
def test_simulate_step_branches_writes_branches_and_resumes(tmp_path):
    out = tmp_path / "sim"
    argv = [
        "--config",
        str(ROOT / "configs/simulate/tiny-clarifying.yaml"),
        "--data.path",
        str(FIXTURE),
        "--output",
        str(out),
        "--progress",
        "false",
        "--data.limit",
        "2",
        "--chunk_size",
        "1",
        "--rollout.max_new_tokens",
        "4",
        "--step_branches",
        "true",
    ]
    command.main(argv)
    records, _ = load_records(out / "conversations.jsonl")
    branches, _ = load_records(out / "branches.jsonl")
    assert len(records) == 2 * 3 and len(branches) == 2 * 3 * 3
    assert sorted(p.name for p in (out / "shards").iterdir()) == [
        "branches-00000.jsonl",
        "branches-00001.jsonl",
        "shard-00000.jsonl",
        "shard-00001.jsonl",
    ]
    summary = json.loads((out / "summary.json").read_text())
    sb = summary["step_branches"]
    assert sb["branches"] == 18 and sb["per_step"] == {"1": 6, "2": 6, "3": 6}
    assert sb["branch_better"] + sb["parent_better"] + sb["ties"] + sb["same_action"] == 18
    assert summary["timing"]["branch_conversations"] == 18
    # both files load together (unique ids) and give StepDPO pairs
    both, _ = load_records([out / "conversations.jsonl", out / "branches.jsonl"])
    assert len(both) == 24
    # resume of a finished run changes nothing; other branch options are refused
    before = (out / "branches.jsonl").read_bytes()
    command.main([*argv, "--resume", "true"])
    assert (out / "branches.jsonl").read_bytes() == before
    with pytest.raises(ValueError, match="branch_runs"):
        command.main([*argv, "--resume", "true", "--branch_runs", "[0]"])
    # branching added to a finished simulation on --resume: the same records, the same branches
    later = tmp_path / "later"
    plain = [a if a != str(out) else str(later) for a in argv[:-2]]
    command.main(plain)
    assert not (later / "branches.jsonl").exists()
    logged = (later / "conversations.jsonl").read_bytes()
    command.main([*plain, "--step_branches", "true", "--resume", "true"])
    assert (later / "conversations.jsonl").read_bytes() == logged == (out / "conversations.jsonl").read_bytes()
    assert (later / "branches.jsonl").read_bytes() == before


# ------------------------------------------------------------------------------------------------ the pairs view
def _branch(parent: ConversationRecord, step: int, action: str, reward: float) -> ConversationRecord:
    at = assistant_positions(parent.messages)[step - 1]
    msgs = [dict(m) for m in parent.messages]
    msgs[at] = {"role": "assistant", "content": action}
    for k in range(at + 1, len(msgs)):  # a different continuation after step t
        if msgs[k]["role"] == "assistant":
            msgs[k] = {"role": "assistant", "content": f"continued {k}"}
    return ConversationRecord(
        id=f"{parent.id}#step{step}",
        task_id=parent.task_id,
        messages=msgs,
        reward=reward,
        run=parent.run,
        meta={"branch_of": parent.id, "branch_step": step},
    )


def _family() -> list[ConversationRecord]:
    p0 = ConversationRecord(**make_record(0, 0, 1.0))
    p1 = ConversationRecord(**make_record(0, 1, 0.0))
    at = assistant_positions(p0.messages)
    return [
        p0,
        p1,
        _branch(p0, 1, "A new first thought.", 0.0),  # parent better: chosen = parent's action
        _branch(p0, 2, "Another second turn.", 1.0),  # tie: dropped
        _branch(p1, 3, "The answer is A.", 0.5),  # branch better: chosen = branch's action
        _branch(p1, 2, p1.messages[at[1]]["content"], 1.0),  # same action: dropped
    ]


def test_step_dpo_view_pairs_actions_from_the_same_prefix():
    records = _family()
    orphan = _branch(ConversationRecord(**make_record(5, 0, 1.0)), 1, "x", 0.0)
    examples, stats = StepDPO().build_view([*records, orphan])
    p0, p1 = records[0], records[1]
    assert [e.id for e in examples] == ["t0-r0#step1#stepdpo", "t0-r1#step3#stepdpo"]
    assert stats.excluded == {"ties": 1, "same_action": 1, "no_parent": 1} and stats.examples == 2
    reward = {
        r.messages[assistant_positions(r.messages)[r.meta.get("branch_step", 1) - 1]]["content"]: r.reward
        for r in records
    }
    for e, (parent, step) in zip(examples, [(p0, 1), (p1, 3)]):
        assert isinstance(e, PairExample) and e.only_last_assistant
        at = assistant_positions(parent.messages)[step - 1]
        prefix = parent.messages[:at]
        assert e.chosen[:-1] == prefix == e.rejected[:-1]  # prompt = the prefix (x, τ_{t−1})
        assert e.chosen[-1]["role"] == e.rejected[-1]["role"] == "assistant"  # one action each
        assert e.chosen[-1]["content"] != e.rejected[-1]["content"]
    # the chosen action is the one whose completed conversation scored higher
    assert examples[0].chosen[-1] == p0.messages[assistant_positions(p0.messages)[0]]
    assert examples[0].rejected[-1]["content"] == "A new first thought."
    assert examples[1].chosen[-1]["content"] == "The answer is A."
    assert reward["The answer is A."] > 0.0


def test_step_dpo_view_errors_name_the_problem():
    plain = [ConversationRecord(**make_record(0, r, 1.0)) for r in range(2)]
    with pytest.raises(ObjectiveDataError, match="step_branches"):
        StepDPO().build_view(plain)
    tie = [plain[0], _branch(plain[0], 1, "other", 1.0)]
    with pytest.raises(ObjectiveDataError, match="1 ties"):
        StepDPO().build_view(tie)
    bad = _branch(plain[0], 2, "other", 0.0)
    bad.messages[1] = {"role": "user", "content": "a different question"}
    with pytest.raises(ObjectiveDataError, match="prefix"):
        StepDPO().build_view([plain[0], bad])
    with pytest.raises(ValueError, match="min_gap"):
        StepDPO(min_gap=0)


# ------------------------------------------------------------------------------------------------ training
def _family_file(tmp_path, n_tasks: int = 3) -> tuple[Path, Path]:
    parents, branches = [], []
    for t in range(n_tasks):
        ps = [ConversationRecord(**make_record(t, r, float(r == 0))) for r in range(2)]
        parents += ps
        branches += [
            _branch(ps[0], 1, f"Branch thought {t}.", 0.0),
            _branch(ps[1], 3, "The answer is A.", 1.0),
            _branch(ps[1], 2, "Maybe energy?", 0.0),
        ]  # the last ties with its parent (0 vs 0)
    return write_records(tmp_path / "conv.jsonl", parents), write_records(tmp_path / "branches.jsonl", branches)


def test_step_dpo_loss_is_log2_when_policy_equals_reference(tiny_model_dir, tmp_path):
    conv, br = _family_file(tmp_path)
    objective = StepDPO(beta=0.1)
    dm = ConversationDataModule(
        [str(conv), str(br)],
        tokenizer_name_or_path=str(tiny_model_dir),
        val_fraction=0.0,
        cache_tokenized=False,
        objective=objective,
    )
    dm.setup("fit")
    assert len(dm.train_set.samples) == 2 * 3
    s = dm.train_set.samples[0]
    # labels on the step-t action alone (one contiguous run of trained tokens), prompt = the prefix
    for key in ("chosen_labels", "rejected_labels"):
        labels = s[key]
        assert sum(1 for a, b in zip([-100] + labels, labels) if a == -100 and b != -100) == 1
    module = ClarifyModule(
        model_name_or_path=str(tiny_model_dir), objective=objective, lora_r=4, lora_alpha=8, export_on_fit_end=False
    )
    batch = PadCollator(dm.tokenizer.pad_token_id)(dm.train_set.samples[:4])
    with torch.no_grad():
        loss, metrics = module._step(batch, "val")  # LoRA B = 0: policy == reference (adapter disabled)
    assert abs(loss.item() - math.log(2)) < 1e-6 and metrics["rewards/margins"].item() == 0.0


def test_fit_step_dpo_preset_two_steps(tiny_model_dir, tmp_path):
    from clarify_lit.cli import lightning_main

    conv, br = _family_file(tmp_path, n_tasks=5)
    root = tmp_path / "run"
    cli = lightning_main(
        [
            "fit",
            "--trainer.enable_progress_bar=false",
            "--trainer.enable_model_summary=false",
            "--config",
            str(ROOT / "configs/model/tiny.yaml"),
            "--config",
            str(ROOT / "configs/objective/step-dpo.yaml"),
            f"--data.train_files=[{conv},{br}]",
            "--model.model_name_or_path=tiny-random",
            "--data.batch_size=2",
            "--trainer.max_steps=2",
            f"--trainer.default_root_dir={root}",
            "--data.val_fraction=0.2",
            "--trainer.val_check_interval=2",
        ]
    )
    assert type(cli.model.objective).__name__ == "StepDPO" and cli.trainer.global_step == 2
    metrics = cli.trainer.callback_metrics
    assert torch.isfinite(metrics["val/loss"]) and "train/rewards/margins" in metrics
    assert (root / "export" / "adapter_model.safetensors").exists()
    ckpt = torch.load(root / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    assert ckpt["hyper_parameters"]["objective_config"] == {
        "class": "StepDPO",
        "beta": 0.1,
        "min_gap": 1e-6,
        "reference": "auto",
    }


def test_branch_summary_counts():
    records = _family()
    summary = branch_summary(records[:2], records[2:])
    assert (summary["parent_better"], summary["branch_better"], summary["ties"], summary["same_action"]) == (1, 1, 1, 1)
    assert summary["pairs"] == 2 and summary["per_step"] == {"1": 1, "2": 2, "3": 1}


def test_presets_branch_only_when_they_train_step_dpo(tmp_path, capsys):
    from clarify_lit.jobs import demo

    assert demo.PRESETS["demo"].objectives == ["Refit", "Swift", "SFT", "DPO"]
    assert not demo.PRESETS["demo"].step_branches
    demo.run_preset(demo.PRESETS["demo"], tmp_path / "d", dry_run=True)
    out = capsys.readouterr().out
    assert "--step_branches" not in out and "STaR-GATE-D" not in out and "StepDPO" not in out
    rep = demo.PRESETS["reproduce"]
    assert rep.step_branches and rep.objectives.index("SFT") < rep.objectives.index("STaR-GATE-D")
    demo.run_preset(rep, tmp_path / "r", dry_run=True)
    lines = [ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("[demo] $ clarify")]
    sims = [ln for ln in lines if " simulate " in ln]
    assert sims and all("--step_branches true" in ln for ln in sims)
    cell = tmp_path / "r" / "sciq-reasoning-standard" / "seed0"
    distill = next(ln for ln in lines if "star-gate-d.yaml" in ln and str(cell) in ln)
    assert f"--model.objective.teacher {cell / 'fit' / 'SFT' / 'export'}" in distill
    step = next(ln for ln in lines if "step-dpo.yaml" in ln and str(cell) in ln)
    assert f"{cell / 'simulate' / 'branches.jsonl'}]" in step
    # the report shows the paper's seven rows in its order; the SFT row under the paper's name
    report = next(ln for ln in lines if " report " in ln)
    assert "--order Base Refit Swift STaR-GATE STaR-GATE-D DPO StepDPO --rename SFT=STaR-GATE" in report
    # seeds run separately: Base is evaluated in the first seed's cell only, never twice
    demo.run_preset(rep, tmp_path / "r", dry_run=True, only_seeds=[1])
    seed1 = [ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("[demo] $ clarify")]
    assert seed1 and not any("--method Base" in ln for ln in seed1) and all("seed0" not in ln for ln in seed1)
    with pytest.raises(ValueError, match=r"seeds \[7\] are not among"):
        demo.run_preset(rep, tmp_path / "r", dry_run=True, only_seeds=[7])
    with pytest.raises(ValueError, match="SFT must come before"):
        demo.Preset(
            name="x", model="m", experiments=[], n_train=1, n_test=1, seeds=[0], objectives=["STaR-GATE-D", "SFT"]
        )
