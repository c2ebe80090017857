"""Reliability, secrets (docs/reliability.md §7): an API key never reaches a file or the terminal. Keys come from
environment variables only; every command refuses a key given as an option or config value — abbreviations of
``api_key_env`` included — before it writes anything, without repeating it."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from clarify_lit.cli import main

REPO = Path(__file__).resolve().parents[1]
TINY = str(REPO / "configs/simulate/tiny-reasoning.yaml")
KEY = "sk-clarifyPLANTEDkey0123456789abcdefXYZ"
RANDOM_KEY = "Zq8Jx3Lk9Vb2Nw7Rt5Hy1Fp4"  # no provider prefix: caught as a random-looking token in a *_env field
SMALL_SIM = [
    "--data.limit",
    "2",
    "--rollout.temperatures",
    "[0.0]",
    "--rollout.max_new_tokens",
    "4",
    "--progress",
    "false",
]


def written_files(root: Path, planted: Path | None = None) -> list[Path]:
    return [p for p in root.rglob("*") if p.is_file() and p != planted]


def assert_key_nowhere(root: Path, texts: list[str], planted: Path | None = None, key: str = KEY) -> None:
    for text in texts:
        assert key not in text, text[-2000:]
    for p in written_files(root, planted):
        assert key.encode() not in p.read_bytes(), p


def command(name: str, out: Path, records: Path) -> list[str]:
    """A command line of ``name`` that would run (on the tiny model) but for the key added to it."""
    return {
        "simulate": ["simulate", "--config", TINY, "--output", str(out), *SMALL_SIM],
        "fit": [
            "fit",
            f"--data.train_files=[{records}]",
            "--trainer.max_steps=1",
            f"--trainer.default_root_dir={out}",
            "--trainer.enable_progress_bar=false",
        ],
        "evaluate": ["evaluate", "--model", "tiny-random", "--out_dir", str(out), "--progress", "false"],
        "iterate": [
            "iterate",
            "--output",
            str(out),
            "--model",
            "tiny-random",
            "--rounds",
            "1",
            "--model_config",
            str(REPO / "configs/model/tiny.yaml"),
            "--trainer_config",
            str(REPO / "configs/trainer/cpu.yaml"),
            "--objective_config",
            str(REPO / "configs/objective/refit.yaml"),
        ],
    }[name]


def plant(name: str, how: str, tmp_path: Path) -> tuple[list[str], Path | None]:
    """The extra arguments that put the key where it must never go, and the config file holding it (if any)."""
    if how == "abbreviated option":  # once taken for --…api_key_env, the key then landed in every config file
        option = "--model.api_key" if name == "fit" else "--teacher.endpoint.api_key"
        return [option, KEY], None
    if how == "key as the variable name":
        if name == "fit":  # the rollout-evaluation callback takes the same endpoint options
            cfg = tmp_path / "planted.yaml"
            cfg.write_text(
                yaml.safe_dump(
                    {
                        "trainer": {
                            "callbacks": [
                                {
                                    "class_path": "clarify_lit.evaluate.callback.RolloutEvaluation",
                                    "init_args": {"teacher": {"endpoint": {"api_key_env": RANDOM_KEY}}},
                                }
                            ]
                        }
                    }
                )
            )
            return ["--config", str(cfg)], cfg
        return ["--reward.endpoint.api_key_env", RANDOM_KEY], None
    # a key inside a config file (for iterate: inside the extra fit arguments it passes on)
    cfg = tmp_path / "planted.yaml"
    values = (
        {"fit_args": ["--model.learning_rate=1e-4", KEY]}
        if name == "iterate"
        else {
            "trainer": {
                "callbacks": [
                    {
                        "class_path": "clarify_lit.evaluate.callback.RolloutEvaluation",
                        "init_args": {"reward": {"endpoint": {"api_key_env": KEY}}},
                    }
                ]
            }
        }
        if name == "fit"
        else {"teacher": {"endpoint": {"api_key_env": KEY}}}
    )
    cfg.write_text(yaml.safe_dump(values))
    return ["--config", str(cfg)], cfg


@pytest.mark.parametrize("how", ["abbreviated option", "key as the variable name", "key in a config file"])
@pytest.mark.parametrize("name", ["simulate", "fit", "evaluate", "iterate"])
def test_a_key_given_as_an_option_or_config_value_is_refused_unwritten_and_unechoed(
    name, how, tmp_path, capfd, caplog, records_factory
):
    records = records_factory()
    out = tmp_path / "out"
    extra, planted = plant(name, how, tmp_path)
    with pytest.raises(SystemExit) as e:
        main([*command(name, out, records), *extra])
    assert e.value.code in (1, 2)
    captured = capfd.readouterr()
    err = captured.err
    key = RANDOM_KEY if how == "key as the variable name" else KEY
    assert_key_nowhere(tmp_path, [captured.out, err, caplog.text], planted, key)
    assert not out.exists() or not written_files(out), sorted(written_files(out))  # refused before writing
    if how == "abbreviated option":
        assert "unrecognized arguments" in err.lower() and "<redacted>" in err
    else:
        assert "error:" in err and "not shown" in err and "Traceback" not in err


@pytest.mark.parametrize("how", ["key as the variable name", "key in a config file"])
@pytest.mark.parametrize("name", ["simulate", "fit", "evaluate", "iterate"])
def test_print_config_checks_for_secrets_before_printing(name, how, tmp_path, capfd, records_factory):
    """``--print_config`` is printed while the command line is parsed, before the command's own secret check: it
    echoed a key with status 0 (and ``--print_config > run.yaml`` wrote it to disk). Now refused, in one line."""
    out = tmp_path / "out"
    extra, planted = plant(name, how, tmp_path)
    with pytest.raises(SystemExit) as e:
        main([*command(name, out, records_factory()), *extra, "--print_config"])
    captured = capfd.readouterr()
    key = RANDOM_KEY if how == "key as the variable name" else KEY
    assert_key_nowhere(tmp_path, [captured.out, captured.err], planted, key)
    assert e.value.code == 1 and captured.out == "", captured.out[-2000:]
    lines = [line for line in captured.err.splitlines() if line.startswith("clarify")]
    assert len(lines) == 1 and "not shown" in lines[0] and "Traceback" not in captured.err, captured.err[-2000:]
    assert ".init_args." not in lines[0]  # the field is named as it is spelled on the command line


@pytest.mark.parametrize("name", ["simulate", "fit", "evaluate", "iterate"])
def test_print_config_without_secrets_prints_and_redacts(name, tmp_path, capfd, records_factory):
    """The variable's name is printed as given."""
    names = ["--reward.endpoint.api_key_env", "CLARIFY_PLANTED_KEY"] if name != "fit" else []
    with pytest.raises(SystemExit) as e:
        main([*command(name, tmp_path / "out", records_factory()), *names, "--print_config"])
    printed = capfd.readouterr().out
    assert e.value.code == 0 and yaml.safe_load(printed)
    if names:
        assert "api_key_env: CLARIFY_PLANTED_KEY" in printed


def test_a_printed_config_is_redacted(capfd):
    """A value the secret check lets through (a long random token in a field not named ``*_env``) is printed as
    ``<redacted>``; ordinary values are printed as they are."""
    from jsonargparse import ActionConfigFile

    from clarify_lit.arguments import ClarifyParser

    parser = ClarifyParser()
    parser.add_argument("--config", action=ActionConfigFile)
    parser.add_argument("--note", type=str)
    parser.add_argument("--token", type=str)
    with pytest.raises(SystemExit):  # a value refuse_secrets lets through (a long random token) is still redacted
        parser.parse_args(["--note", "free text", "--token", "Q7x" * 12, "--print_config"])
    printed = capfd.readouterr().out
    assert "note: free text" in printed and "Q7x" not in printed and "token: <redacted>" in printed


@pytest.mark.slow
def test_a_key_in_the_environment_appears_in_no_file_any_command_writes(
    tmp_path, monkeypatch, capfd, caplog, records_factory
):
    """The supported way: the key in an environment variable, its NAME in ``api_key_env``. simulate, fit, evaluate
    and iterate (dry run: its per-round configs) run on the tiny presets; no file they write and nothing they print
    holds the key."""
    monkeypatch.setenv("CLARIFY_PLANTED_KEY", KEY)
    names = [
        "--teacher.endpoint.api_key_env",
        "CLARIFY_PLANTED_KEY",
        "--reward.endpoint.api_key_env",
        "CLARIFY_PLANTED_KEY",
    ]
    main(["simulate", "--config", TINY, "--output", str(tmp_path / "sim"), *SMALL_SIM, *names])
    main(
        [
            "fit",
            f"--data.train_files=[{records_factory()}]",
            "--trainer.max_steps=1",
            "--data.val_fraction=0",
            f"--trainer.default_root_dir={tmp_path / 'fit'}",
            "--trainer.enable_progress_bar=false",
        ]
    )
    eval_cfg = tmp_path / "evaluate.yaml"  # the tiny preset's questions
    eval_cfg.write_text(yaml.safe_dump({"data": {**yaml.safe_load(Path(TINY).read_text())["data"], "part": "test"}}))
    main(
        [
            "evaluate",
            "--config",
            str(eval_cfg),
            "--model",
            "tiny-random",
            "--out_dir",
            str(tmp_path / "eval"),
            "--progress",
            "false",
            "--n_questions",
            "1",
            "--rollout.max_new_tokens",
            "4",
            *names,
        ]
    )
    main(
        [
            "iterate",
            "--output",
            str(tmp_path / "it"),
            "--model",
            "tiny-random",
            "--rounds",
            "2",
            "--dry_run",
            "true",
            "--model_config",
            str(REPO / "configs/model/tiny.yaml"),
            "--trainer_config",
            str(REPO / "configs/trainer/cpu.yaml"),
            "--objective_config",
            str(REPO / "configs/objective/refit.yaml"),
            *names,
        ]
    )
    captured = capfd.readouterr()
    files = written_files(tmp_path)
    assert {"run_config.json", "summary.json", "config.yaml", "metrics.json", "simulate.yaml", "evaluate.yaml"} <= {
        p.name for p in files
    }
    assert (
        json.loads((tmp_path / "sim/run_config.json").read_text())["config"]["teacher"]["endpoint"]["api_key_env"]
        == "CLARIFY_PLANTED_KEY"
    )  # the name is recorded, the key is not
    assert_key_nowhere(tmp_path, [captured.out, captured.err, caplog.text])
