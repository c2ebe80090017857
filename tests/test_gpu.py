"""GPU checks (issue 16 §5), run by ``benchmarks/gpu_check.sh`` on a machine with a CUDA GPU: the tiny model trained
with ``accelerator=gpu`` for every objective (Refit, Swift, SFT, DPO with the reference computed in the step and
precomputed, StepDPO, STaR-GATE-D), rolled out, simulated, evaluated and exported on the GPU.

Marked ``gpu`` and skipped, with the reason, where ``torch.cuda.is_available()`` is false: ``make test`` on a CPU
machine runs none of them. ``pytest -m gpu tests/test_gpu.py`` runs them alone (~1-2 min on a GPU).
"""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
from conftest import make_record
from lightning.pytorch.callbacks import Callback

from clarify_lit.cli import lightning_main, main
from clarify_lit.data.records import ConversationRecord, load_records, write_records
from clarify_lit.data.tasks import QATask
from clarify_lit.models import random_model
from clarify_lit.simulate.branches import assistant_positions
from clarify_lit.simulate.engine import GenerationEngine
from clarify_lit.simulate.rollout import RolloutSpec, rollout_tasks

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (torch.cuda.is_available() is false)"),
    pytest.mark.usefixtures("clarify_cache"),
]
REPO = Path(__file__).resolve().parents[1]
QUIET = ["--trainer.enable_progress_bar=false", "--trainer.enable_model_summary=false"]
GPU = ["--trainer.accelerator=gpu", "--trainer.devices=1", "--trainer.precision=bf16-mixed"]
TASKS = [
    QATask(
        f"gpu/{i}",
        "sciq",
        "What do plants need to make food?" + " Why?" * i,
        ["sunlight", "sand", "salt", "smoke"],
        "A",
    )
    for i in range(6)
]


class Probe(Callback):
    """Where training ran: the module's parameters and the batch's tensors at every step, the trained parameters at
    the start (to check they moved) and the step losses."""

    def __init__(self):
        self.devices: set[str] = set()
        self.losses: list[float] = []

    def on_train_start(self, trainer, pl_module):
        self.initial = {n: p.detach().cpu().clone() for n, p in pl_module.named_parameters() if p.requires_grad}

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.devices.add(next(p for p in pl_module.parameters() if p.requires_grad).device.type)
        self.devices.update(v.device.type for v in batch.values() if isinstance(v, torch.Tensor))
        self.losses.append(float(outputs["loss"]))


def gpu_fit(args: list[str], root: Path, monkeypatch) -> tuple:
    """``clarify fit`` on the GPU (bf16-mixed), 2 steps and a validation pass; returns ``(cli, probe)``."""
    from clarify_lit.cli import ClarifyCLI

    probe = Probe()
    orig = ClarifyCLI._instantiate_trainer
    monkeypatch.setattr(ClarifyCLI, "_instantiate_trainer", lambda self, config, cbs: orig(self, config, [*cbs, probe]))
    cli = lightning_main(
        [
            "fit",
            *QUIET,
            *GPU,
            "--config",
            str(REPO / "configs/model/tiny.yaml"),
            *args,
            "--model.model_name_or_path=tiny-random",
            "--data.batch_size=2",
            "--trainer.max_steps=2",
            "--trainer.val_check_interval=2",
            "--data.val_fraction=0.2",
            "--trainer.log_every_n_steps=1",
            f"--trainer.default_root_dir={root}",
        ]
    )
    monkeypatch.setattr(ClarifyCLI, "_instantiate_trainer", orig)
    return cli, probe


def assert_trained_on_gpu(cli, probe: Probe, root: Path, tiny_model_dir: Path) -> None:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    assert cli.trainer.global_step == 2 and probe.devices == {"cuda"}, probe.devices
    assert all(torch.isfinite(torch.tensor(x)) for x in probe.losses)
    assert torch.isfinite(cli.trainer.callback_metrics["val/loss"])
    module = cli.model.cpu().eval()
    params = {n: p.detach() for n, p in module.named_parameters()}
    assert probe.initial and any(not torch.equal(params[n], v) for n, v in probe.initial.items())
    # the export (written at fit end from the GPU-trained module) gives the module's logits on the CPU
    export = root / "export"
    loaded = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(str(tiny_model_dir)), str(export)).eval()
    ids = torch.tensor([[5, 17, 42, 99, 7, 3]])
    with torch.no_grad():
        assert torch.allclose(loaded(input_ids=ids).logits, module.model(input_ids=ids).logits, atol=1e-5)


OBJECTIVES = {
    "refit": [],
    "swift": [],
    "sft": [],
    "dpo": [],
    "dpo-precomputed": ["--model.objective.reference=precomputed", "--model.reference_cache=false"],
}


@pytest.mark.parametrize("name", list(OBJECTIVES))
def test_fit_each_objective_on_the_gpu(name, records_factory, tiny_model_dir, tmp_path, monkeypatch):
    preset = name.split("-")[0]
    records = records_factory(n_tasks=5, n_runs=3)
    root = tmp_path / "run"
    cli, probe = gpu_fit(
        [
            "--config",
            str(REPO / f"configs/objective/{preset}.yaml"),
            f"--data.train_files=[{records}]",
            *OBJECTIVES[name],
        ],
        root,
        monkeypatch,
    )
    assert_trained_on_gpu(cli, probe, root, tiny_model_dir)
    if name == "dpo":
        assert abs(probe.losses[0] - 0.6931471805599453) < 1e-3  # policy == reference at step 1 (bf16 autocast)


def _step_dpo_files(tmp_path: Path, n_tasks: int = 5) -> tuple[Path, Path]:
    """Parents (rewards 1 and 0) and one branch per assistant step with the opposite reward: a StepDPO pair each."""
    parents, branches = [], []
    for t in range(n_tasks):
        for run, reward in ((0, 1.0), (1, 0.0)):
            p = ConversationRecord(**make_record(t, run, reward))
            parents.append(p)
            for step, at in enumerate(assistant_positions(p.messages), start=1):
                msgs = [dict(m) for m in p.messages]
                msgs[at] = {"role": "assistant", "content": f"A different action at step {step}."}
                branches.append(
                    ConversationRecord(
                        id=f"{p.id}#step{step}",
                        task_id=p.task_id,
                        messages=msgs,
                        reward=1.0 - reward,
                        run=p.run,
                        meta={"branch_of": p.id, "branch_step": step},
                    )
                )
    return write_records(tmp_path / "conv.jsonl", parents), write_records(tmp_path / "branches.jsonl", branches)


def test_fit_step_dpo_on_the_gpu(tiny_model_dir, tmp_path, monkeypatch):
    conv, br = _step_dpo_files(tmp_path)
    root = tmp_path / "run"
    cli, probe = gpu_fit(
        ["--config", str(REPO / "configs/objective/step-dpo.yaml"), f"--data.train_files=[{conv},{br}]"],
        root,
        monkeypatch,
    )
    assert type(cli.model.objective).__name__ == "StepDPO"
    assert_trained_on_gpu(cli, probe, root, tiny_model_dir)


def test_fit_star_gate_d_on_the_gpu(records_factory, tiny_model_dir, tmp_path, monkeypatch):
    """SFT on the GPU, then its export as the teacher of STaR-GATE-D, also on the GPU (the teacher follows the
    module's device)."""
    records = records_factory(n_tasks=5, n_runs=3)
    sft_root = tmp_path / "sft"
    gpu_fit(
        ["--config", str(REPO / "configs/objective/sft.yaml"), f"--data.train_files=[{records}]"], sft_root, monkeypatch
    )
    root = tmp_path / "distill"
    cli, probe = gpu_fit(
        [
            "--config",
            str(REPO / "configs/objective/star-gate-d.yaml"),
            f"--data.train_files=[{records}]",
            f"--model.objective.teacher={sft_root / 'export'}",
            "--model.learning_rate=1e-2",
        ],
        root,
        monkeypatch,
    )
    assert type(cli.model.objective).__name__ == "Distill" and cli.model._teacher is not None
    assert cli.trainer.callback_metrics["val/kl"].item() > 0  # the teacher is the SFT policy, not the base
    assert_trained_on_gpu(cli, probe, root, tiny_model_dir)


def test_export_command_from_a_gpu_run(records_factory, tiny_model_dir, tmp_path, monkeypatch):
    """``clarify export --merge`` from the checkpoint of a GPU run (saved from CUDA tensors) gives the run's logits."""
    from transformers import AutoModelForCausalLM

    records = records_factory(n_tasks=5, n_runs=3)
    root = tmp_path / "run"
    cli, _ = gpu_fit(
        [
            "--config",
            str(REPO / "configs/objective/refit.yaml"),
            f"--data.train_files=[{records}]",
            "--model.learning_rate=5e-2",
        ],
        root,
        monkeypatch,
    )
    main(["export", "--run_dir", str(root), "--merge", "true", "--out_dir", str(tmp_path / "merged")])
    merged = AutoModelForCausalLM.from_pretrained(str(tmp_path / "merged")).eval()
    ids = torch.tensor([[5, 17, 42, 99, 7, 3]])
    with torch.no_grad():
        want = cli.model.cpu().eval().model(input_ids=ids).logits
        assert torch.allclose(merged(input_ids=ids).logits, want, atol=1e-4)


# ------------------------------------------------------------------------------------------------ rollouts
def test_random_model_is_built_on_the_gpu():
    before = torch.cuda.memory_allocated()
    model = random_model("smollm2-135m", "bfloat16", device="cuda")
    assert {p.device.type for p in model.parameters()} == {"cuda"} and next(model.parameters()).dtype == torch.bfloat16
    assert torch.cuda.memory_allocated() - before >= 134_515_008 * 2
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([[1, 2, 3]], device="cuda")).logits
    assert logits.shape == (1, 3, 49152) and torch.isfinite(logits).all()


def convs(k: int = 6):
    return [
        [
            {"role": "system", "content": "You are a student."},
            {"role": "user", "content": "energy water " * (1 + 4 * (i % 3)) + f"question {i}?"},
        ]
        for i in range(k)
    ]


def test_greedy_generation_on_the_gpu_is_batch_independent_and_matches_the_cpu(tiny):
    model, tok = tiny
    on_gpu = model.to("cuda")
    try:
        batched = GenerationEngine(on_gpu, tok, batch_size=4, max_new_tokens=12).generate(convs(), 0.0, seed=0)
        single = GenerationEngine(on_gpu, tok, batch_size=1, max_new_tokens=12).generate(convs(), 0.0, seed=0)
        assert [g.text for g in batched] == [g.text for g in single]
        # the same padded batch's logits on both devices (fp32; no TF32 by default)
        ids = torch.tensor([[0, 0, 5, 17, 42], [9, 8, 7, 6, 5]])
        mask = (ids != 0).long()
        with torch.no_grad():
            gpu_logits = on_gpu(input_ids=ids.cuda(), attention_mask=mask.cuda()).logits.cpu()
            cpu_logits = on_gpu.cpu()(input_ids=ids, attention_mask=mask).logits
        assert torch.allclose(gpu_logits[mask.bool()], cpu_logits[mask.bool()], atol=1e-4)
    finally:
        model.cpu()


def test_rollout_tasks_on_the_gpu_kv_reuse_equals_reencoding(tiny):
    model, tok = tiny
    model.to("cuda")
    try:
        spec = RolloutSpec(
            setting="reasoning", mode="thinking", n_turns=3, temperatures=[0.0, 1.0], max_new_tokens=6, seed=0
        )
        runs = {
            reuse: rollout_tasks(
                model,
                tok,
                TASKS,
                spec,
                engine=GenerationEngine(model, tok, batch_size=4, max_new_tokens=6, reuse_kv_cache=reuse),
            )
            for reuse in (True, False)
        }
        greedy = [i for i, r in enumerate(runs[False]) if r.temperature == 0.0]
        assert greedy and [runs[True][i].messages for i in greedy] == [runs[False][i].messages for i in greedy]
        assert len(runs[True]) == 2 * len(TASKS) and all(r.reward is not None for r in runs[True])
        # bf16 on the GPU runs too (the benchmarks' precision), on a copy: the module-scoped model stays fp32
        bf16 = rollout_tasks(copy.deepcopy(model).to(torch.bfloat16), tok, TASKS[:2], spec)
        assert len(bf16) == 4 and all(len(r.messages) == 7 for r in bf16)
    finally:
        model.cpu()


def test_simulate_command_on_the_gpu(tmp_path):
    from clarify_lit.simulate import command

    out = tmp_path / "sim"
    command.main(
        [
            "--config",
            str(REPO / "configs/simulate/tiny-reasoning.yaml"),
            "--data.path",
            str(REPO / "configs/simulate/tiny-tasks.jsonl"),
            "--output",
            str(out),
            "--progress",
            "false",
            "--data.limit",
            "2",
            "--rollout.max_new_tokens",
            "4",
            "--device",
            "cuda",
        ]
    )
    records, _ = load_records(out / "conversations.jsonl")
    assert len(records) == 2 * 3 and all(r.messages[-1]["role"] == "assistant" for r in records)


def test_evaluate_on_the_gpu_gives_the_cpu_numbers(tmp_path):
    import json

    from clarify_lit.evaluate.command import main as evaluate

    data = [
        "--data.dataset",
        "local",
        "--data.path",
        str(REPO / "configs/simulate/tiny-tasks.jsonl"),
        "--data.label",
        "tiny",
        "--data.n_train",
        "4",
        "--data.n_test",
        "4",
        "--data.columns",
        '{"question": "question", "choices": "choices", "answer": "answer", "id": "id"}',
        "--rollout.max_new_tokens",
        "3",
        "--progress",
        "false",
        "--model",
        "tiny-random",
    ]
    evaluate([*data, "--device", "cuda", "--out_dir", str(tmp_path / "gpu")])
    evaluate([*data, "--device", "cpu", "--out_dir", str(tmp_path / "cpu")])
    gpu = json.loads((tmp_path / "gpu" / "metrics.json").read_text())
    cpu = json.loads((tmp_path / "cpu" / "metrics.json").read_text())
    assert gpu["meta"]["device"].startswith("cuda") and cpu["meta"]["device"] == "cpu"
    gpu_recs, _ = load_records(tmp_path / "gpu" / "rollouts.jsonl")
    cpu_recs, _ = load_records(tmp_path / "cpu" / "rollouts.jsonl")
    assert [r.messages for r in gpu_recs] == [r.messages for r in cpu_recs]
    assert gpu["metrics"]["accuracy"] == cpu["metrics"]["accuracy"]
