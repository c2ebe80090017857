"""The ``clarify`` CLI in-process: help, every preset YAML parses, end-to-end ``fit`` for each objective on the tiny
model (what changed, the run tree, the export loads with transformers + peft alone), resume, full fine-tuning."""

from __future__ import annotations

import glob
from pathlib import Path

import pytest
import torch
import yaml
from lightning.pytorch.callbacks import Callback

from clarify_lit.arguments import option_names
from clarify_lit.cli import COMMANDS, ClarifyCLI, lightning_main, main
from clarify_lit.models import CHATML_TEMPLATE

pytestmark = pytest.mark.usefixtures("clarify_cache")

REPO = Path(__file__).resolve().parents[1]
QUIET = ["--trainer.enable_progress_bar=false", "--trainer.enable_model_summary=false"]


def test_help_lists_every_command(capsys):
    main(["--help"])
    out = capsys.readouterr().out
    for name in ("simulate", "fit", "validate", "test", "predict", "evaluate", "report"):
        assert f"  {name} " in out
    main([])
    assert "simulate → fit → evaluate → report" in capsys.readouterr().out


def test_unknown_command_exits_2(capsys):
    with pytest.raises(SystemExit) as e:
        main(["trian"])
    assert e.value.code == 2 and "unknown command 'trian'" in capsys.readouterr().err


@pytest.mark.parametrize("command", ["simulate", "evaluate", "report", "iterate", "export", "rescore", "fit"])
def test_every_command_prints_its_config_and_help(command, capsys):
    """One command-line style: every subcommand is jsonargparse-parsed, with --help and --print_config."""
    with pytest.raises(SystemExit) as e:
        main([command, "--help"])
    assert e.value.code == 0 and "--print_config" in capsys.readouterr().out
    needs = {"report": ["runs/x"], "fit": ["--data.train_files=[r.jsonl]"]}.get(command, [])
    with pytest.raises(SystemExit) as e:
        main([command, *needs, "--print_config"])
    assert e.value.code == 0 and yaml.safe_load(capsys.readouterr().out)


def test_demo_options_and_deprecated_switches(tmp_path, capsys):
    """``python -m clarify_lit.demo`` parses like the clarify commands (underscore options, --print_config); the old
    hyphenated switches still work, with a deprecation message."""
    import typing

    from clarify_lit.evaluate.report import main as report_main
    from clarify_lit.evaluate.report import parse_config
    from clarify_lit.jobs import demo

    assert set(typing.get_args(demo.PresetName)) == set(demo.PRESETS)
    with pytest.raises(SystemExit) as e:
        demo.main(["--preset", "paper", "--print_config"])
    assert e.value.code == 0 and yaml.safe_load(capsys.readouterr().out)["preset"] == "paper"
    demo.main(["--preset", "demo", "--dry-run", "--out", str(tmp_path)])
    captured = capsys.readouterr()
    assert "--dry-run is deprecated, use --dry_run true" in captured.err and "[demo] $ clarify simulate" in captured.out
    assert not (tmp_path / "commands.sh").exists()  # a dry run
    with pytest.raises(FileNotFoundError):
        report_main([str(tmp_path / "none"), "--no-paired"])  # no metrics.json there: the options parsed
    assert "--no-paired is deprecated, use --paired false" in capsys.readouterr().err
    cfg = parse_config(["a", "b", "--order", "X", "Y", "--no_paired", "true"])
    assert cfg.inputs == ["a", "b"] and cfg.order == ["X", "Y"] and cfg.paired is False
    assert "--no_paired is deprecated, use --paired false" in capsys.readouterr().err
    assert parse_config(["a", "--no_paired=false"]).paired is True
    assert parse_config(["a", "--paired", "false"]).paired is False


NON_LIGHTNING = [name for name, (module, _) in COMMANDS.items() if module != "clarify_lit.cli"]


@pytest.mark.parametrize("command", [*NON_LIGHTNING, "demo"])
def test_every_command_is_a_config_dataclass_and_run(command):
    """One command pattern (docs/architecture.md): a config dataclass whose fields are the options, ``run(cfg)``,
    and ``build_parser``/``parse_config``/``main`` from the shared factory in clarify_lit.arguments."""
    import dataclasses
    import importlib
    import inspect

    name = "clarify_lit.jobs.demo" if command == "demo" else COMMANDS[command][0]
    module = importlib.import_module(name)
    configs = [
        v
        for v in vars(module).values()
        if dataclasses.is_dataclass(v)
        and isinstance(v, type)
        and v.__module__ == name
        and v.__name__.endswith("Config")
    ]
    assert len(configs) == 1, configs
    config = configs[0]
    (parameter,) = inspect.signature(module.run).parameters.values()
    assert parameter.annotation in (config.__name__, config)
    for function in ("build_parser", "parse_config", "main"):
        assert callable(getattr(module, function))
    options = set(option_names(module.build_parser()))
    assert {f"--{f.name}" for f in dataclasses.fields(config)} - {"--inputs"} <= options  # report's is positional
    assert "--config" in options and "--print_config" in options


def test_fit_help_shows_model_and_data_options(capsys):
    with pytest.raises(SystemExit) as e:
        main(["fit", "--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert "--model.objective" in out and "--data.train_files" in out and "--model.use_lora" in out


PRESETS = sorted(
    glob.glob(str(REPO / "configs" / "model" / "*.yaml"))
    + glob.glob(str(REPO / "configs" / "objective" / "*.yaml"))
    + glob.glob(str(REPO / "configs" / "trainer" / "*.yaml"))
)


def _flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict) and not (set(v) <= {"class_path", "init_args"} and "init_args" not in v):
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def test_presets_found():
    assert {Path(p).parent.name for p in PRESETS} == {"model", "objective", "trainer"}
    assert {Path(p).stem for p in PRESETS} >= {"tiny", "refit", "swift", "sft", "dpo", "dpo-conversation", "cpu"}


@pytest.mark.parametrize("preset", PRESETS, ids=lambda p: "/".join(Path(p).parts[-2:]))
def test_every_preset_parses(preset, capsys):
    with pytest.raises(SystemExit) as e:
        main(["fit", "--config", preset, "--data.train_files=[records.jsonl]", "--print_config"])
    assert e.value.code in (0, None)
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["data"]["train_files"] == ["records.jsonl"]
    # every value of the preset is in the resolved config
    flat = _flatten(printed)
    for key, value in _flatten(yaml.safe_load(Path(preset).read_text())).items():
        assert key in flat, key
        assert flat[key] == value, (key, flat[key], value)
    # the tokenizer is linked to the model: one source of truth
    assert (
        printed["data"].get("tokenizer_name_or_path", printed["model"]["model_name_or_path"])
        == printed["model"]["model_name_or_path"]
    )


def test_objective_shorthand(capsys):
    with pytest.raises(SystemExit):
        main(
            [
                "fit",
                "--data.train_files=[r.jsonl]",
                "--model.objective=Swift",
                "--model.objective.zero_std=epsilon",
                "--print_config",
            ]
        )
    objective = yaml.safe_load(capsys.readouterr().out)["model"]["objective"]
    # jsonargparse writes the shortest import path: the package exports the objectives (clarify_lit.Swift)
    assert objective["class_path"] == "clarify_lit.Swift"
    assert objective["init_args"]["zero_std"] == "epsilon"


# ------------------------------------------------------------------------------------------------ end to end
class Snapshot(Callback):
    """Keeps the parameters as they were when training started, and the module that trained."""

    def on_train_start(self, trainer, pl_module):
        self.module = pl_module
        self.initial = {n: p.detach().clone() for n, p in pl_module.named_parameters()}
        self.trainable = {n for n, p in pl_module.named_parameters() if p.requires_grad}


@pytest.fixture
def run_fit(monkeypatch):
    """Run ``clarify fit`` in-process; returns ``(cli, snapshot)``."""

    def run(args: list[str]):
        snap = Snapshot()
        orig = ClarifyCLI._instantiate_trainer

        def with_snapshot(self, config, callbacks):
            return orig(self, config, [*callbacks, snap])

        monkeypatch.setattr(ClarifyCLI, "_instantiate_trainer", with_snapshot)
        cli = lightning_main(["fit", *QUIET, *args])
        monkeypatch.setattr(ClarifyCLI, "_instantiate_trainer", orig)
        return cli, snap

    return run


def _base_weights(tiny_model_dir) -> dict[str, torch.Tensor]:
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(tiny_model_dir)).state_dict()


def _probe(tokenizer):
    msgs = [
        {"role": "system", "content": "You are an expert."},
        {"role": "user", "content": "Which is correct?"},
        {"role": "assistant", "content": "The answer is A."},
    ]
    text = tokenizer.apply_chat_template(msgs, tokenize=False)
    return tokenizer(text, return_tensors="pt", add_special_tokens=False)["input_ids"]


OBJECTIVES = {
    "refit": ("Refit", None),
    "swift": ("Swift", None),
    "sft": ("SFT", None),
    "dpo-conversation": ("DPO", "conversation"),
    "dpo": ("DPO", "final_answer"),
}


@pytest.mark.parametrize("preset", list(OBJECTIVES))
def test_fit_end_to_end(preset, run_fit, records_factory, tiny_model_dir, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    cls_name, pairs = OBJECTIVES[preset]
    records = records_factory(n_tasks=5, n_runs=3)
    root = tmp_path / "run"
    cli, snap = run_fit(
        [
            "--config",
            str(REPO / "configs" / "model" / "tiny.yaml"),
            "--config",
            str(REPO / "configs" / "objective" / f"{preset}.yaml"),
            f"--data.train_files=[{records}]",
            "--model.model_name_or_path=tiny-random",
            "--data.batch_size=2",
            "--trainer.max_steps=2",
            f"--trainer.default_root_dir={root}",
            "--trainer.log_every_n_steps=1",
            "--trainer.val_check_interval=2",
            "--data.val_fraction=0.2",
            "--model.lora_dropout=0.0",
        ]
    )
    module = cli.model
    assert snap.module is module and cli.trainer.global_step == 2
    # a validation pass ran on the held-out task with the same objective
    metrics = cli.trainer.callback_metrics
    assert cli.datamodule.val_set is not None and torch.isfinite(metrics["val/loss"])
    assert ("val/rewards/margins" in metrics) == (cls_name == "DPO") and ("val/nll" in metrics) != (cls_name == "DPO")
    assert type(module.objective).__name__ == cls_name
    if pairs is not None:
        assert module.objective.pairs == pairs
        sample = cli.datamodule.train_set.samples[0]
        labels = sample["chosen_labels"]
        runs = sum(1 for a, b in zip([-100] + labels, labels) if a == -100 and b != -100)
        assert runs == (1 if pairs == "final_answer" else 3)  # final answer alone vs every assistant turn

    # trainable (LoRA) parameters changed; the base weights did not
    params = dict(module.named_parameters())
    assert snap.trainable and all("lora_" in n for n in snap.trainable)
    changed = [n for n in snap.trainable if not torch.equal(params[n], snap.initial[n])]
    # B starts at 0 and moves at step 1; A gets a gradient once B ≠ 0, so after 2 steps every adapter tensor moved
    assert sorted(changed) == sorted(snap.trainable)
    assert all(torch.equal(params[n], snap.initial[n]) for n in params if n not in snap.trainable)
    base = _base_weights(tiny_model_dir)
    merged_free = module.model.get_base_model().state_dict()
    for k, v in base.items():
        key = k if k in merged_free else k.replace(".weight", ".base_layer.weight")
        assert torch.equal(merged_free[key], v), k

    # the run tree
    assert (root / "config.yaml").exists()
    saved = yaml.safe_load((root / "config.yaml").read_text())
    assert saved["model"]["objective"]["class_path"].endswith(cls_name)
    assert (root / "checkpoints" / "last.ckpt").exists()
    assert list(root.rglob("events.out.tfevents.*"))
    export = root / "export"
    for name in ("adapter_config.json", "adapter_model.safetensors", "tokenizer.json", "chat_template.jinja"):
        assert (export / name).exists(), name
    ckpt = torch.load(root / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    assert ckpt["global_step"] == 2 and ckpt["hyper_parameters"]["objective_config"]["class"] == cls_name
    assert ckpt["state_dict"] and all("lora_" in k for k in ckpt["state_dict"])

    # the export loads with transformers + peft alone and gives the trained module's logits
    tok = AutoTokenizer.from_pretrained(str(export))
    assert tok.chat_template == CHATML_TEMPLATE
    loaded = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(str(tiny_model_dir)), str(export)).eval()
    ids = _probe(tok)
    module.model.eval()
    with torch.no_grad():
        want = module.model(input_ids=ids).logits
        got = loaded(input_ids=ids).logits
        base_logits = AutoModelForCausalLM.from_pretrained(str(tiny_model_dir))(input_ids=ids).logits
    assert torch.allclose(got, want, atol=1e-5)
    assert not torch.allclose(got, base_logits, atol=1e-6)  # the adapter is really in the export


def test_resume_continues_the_global_step(run_fit, records_factory, tmp_path):
    records = records_factory(n_tasks=4, n_runs=3)
    root = tmp_path / "run"
    common = [
        f"--data.train_files=[{records}]",
        "--model.model_name_or_path=tiny-random",
        "--data.batch_size=2",
        f"--trainer.default_root_dir={root}",
        "--model.lora_r=4",
        "--model.learning_rate=1e-3",
    ]
    first, _ = run_fit([*common, "--trainer.max_steps=2"])
    after_first = {n: p.detach().clone() for n, p in first.model.named_parameters() if p.requires_grad}
    ckpt1 = torch.load(root / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    assert ckpt1["global_step"] == 2

    second, snap = run_fit([*common, "--trainer.max_steps=4", "--ckpt_path", "last"])
    # training resumed from the first run's weights, not from a fresh adapter
    assert all(torch.equal(snap.initial[n], after_first[n]) for n in after_first)
    assert second.trainer.global_step == 4
    ckpt2 = torch.load(root / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    assert ckpt2["global_step"] == 4
    steps = {float(s["step"]) for s in ckpt2["optimizer_states"][0]["state"].values()}
    assert steps == {4.0}  # AdamW's step count continued from 2
    sched = ckpt2["lr_schedulers"][0]
    assert sched["last_epoch"] == 4 and sched["_step_count"] == 5


def test_full_finetuning_changes_base_weights(run_fit, records_factory, tiny_model_dir, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    records = records_factory(n_tasks=4, n_runs=3)
    root = tmp_path / "run"
    cli, snap = run_fit(
        [
            f"--data.train_files=[{records}]",
            "--model.model_name_or_path=tiny-random",
            "--model.use_lora=false",
            "--model.learning_rate=1e-3",
            "--data.batch_size=2",
            "--trainer.max_steps=1",
            f"--trainer.default_root_dir={root}",
        ]
    )
    module = cli.model
    assert snap.trainable == set(snap.initial)  # everything trains
    params = dict(module.named_parameters())
    changed = [n for n in params if not torch.equal(params[n], snap.initial[n])]
    assert "model.model.layers.0.self_attn.q_proj.weight" in changed and "model.lm_head.weight" in changed
    export = root / "export"
    assert (export / "config.json").exists() and (export / "model.safetensors").exists()
    assert not (export / "adapter_config.json").exists()
    tok = AutoTokenizer.from_pretrained(str(export))
    loaded = AutoModelForCausalLM.from_pretrained(str(export)).eval()
    ids = _probe(tok)
    module.model.eval()
    with torch.no_grad():
        assert torch.allclose(loaded(input_ids=ids).logits, module.model(input_ids=ids).logits, atol=1e-5)
    ckpt = torch.load(root / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    assert "model.model.layers.0.self_attn.q_proj.weight" in ckpt["state_dict"]  # full weights saved


def test_demo_experiment_filter_and_iterate_use_the_cells_options(tmp_path, capsys):
    """``--experiments`` picks cells by name or tag (unknown ones refused by name); --iterate runs on the first
    picked cell with that cell's reward and teacher flags, not the preset's defaults."""
    from clarify_lit.jobs import demo

    demo.main(
        [
            "--preset",
            "clarify",
            "--experiments",
            "rubric-dense",
            "--seeds",
            "0",
            "--objectives",
            "Refit",
            "--iterate",
            "2",
            "--dry_run",
            "true",
            "--out",
            str(tmp_path),
        ]
    )
    out = capsys.readouterr().out
    commands = [line for line in out.splitlines() if line.startswith("[demo] $ clarify")]
    assert commands and all("sciq-clarifying-thinking-rubric-dense" in c for c in commands if "simulate" in c)
    assert not any("sciq-clarifying-thinking-correct" in c or "thinking-rubric/" in c for c in commands)
    iterate = [c for c in commands if c.startswith("[demo] $ clarify iterate")]
    assert len(iterate) == 1 and "--reward.kind rubric" in iterate[0]
    assert "--reward.rubric_accuracy gold_prob" in iterate[0] and "--teacher.hide_mode blank" in iterate[0]
    with pytest.raises(SystemExit):
        demo.main(["--preset", "clarify", "--experiments", "nope", "--dry_run", "true", "--out", str(tmp_path)])
    assert "has no experiments ['nope']" in capsys.readouterr().err


def test_export_refuses_a_secret_in_its_options(tmp_path):
    """``clarify export`` parses like every command, so a key pasted into an option is refused (not echoed) before
    any checkpoint is read."""
    from clarify_lit.arguments import SecretInConfigError
    from clarify_lit.train.export_command import main as export_main

    key = "sk-" + "A1b2C3d4" * 4
    with pytest.raises(SecretInConfigError) as e:
        export_main(["--run_dir", str(tmp_path), "--out_dir", key])
    assert key not in str(e.value)


@pytest.mark.parametrize(
    "shim,job", [("clarify_lit.demo", "clarify_lit.jobs.demo"), ("clarify_lit.iterate", "clarify_lit.jobs.iterate")]
)
def test_python_m_shims_run_the_jobs(shim, job, monkeypatch, capsys):
    """``python -m clarify_lit.demo`` / ``.iterate`` (the spellings the Makefile and README quote) run the jobs."""
    import runpy

    monkeypatch.setattr("sys.argv", [shim, "--help"])
    with pytest.raises(SystemExit) as e:
        runpy.run_module(shim, run_name="__main__")
    assert e.value.code == 0 and "--print_config" in capsys.readouterr().out
    assert runpy.run_module(shim)["main"].__module__ == job
