"""The one rollout options block (``--rollout.*``): every rollout command takes it whole, a new field is one edit,
the flat options of before still parse (deprecated), and fingerprints of runs made before the block still match."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
from dataclasses import fields
from pathlib import Path

import pytest

from clarify_lit.simulate.options import FLAT_ROLLOUT_FLAGS, RolloutOptions

REPO = Path(__file__).resolve().parents[1]
OLD_FINGERPRINTS = Path(__file__).parent / "data" / "fingerprints_before_rollout_block.json"

# the one edit: a field appended to the block in simulate/options.py
NEW_FIELD = '''    repetition_penalty: float = 1.0
    """Test-only: a generation option added to the block."""
'''
ANCHOR = '''    sort_by_length: bool = True
    """Order rows by prompt length before batching (less padding)."""
'''

PROBE = textwrap.dedent("""
    import json, sys, tempfile
    from pathlib import Path

    import yaml
    from jsonargparse import ArgumentParser

    from clarify_lit.arguments import option_names
    from clarify_lit.evaluate.callback import RolloutEvaluation
    from clarify_lit.evaluate.command import build_parser as evaluate_parser, parse_config as evaluate_config_of
    from clarify_lit.jobs.iterate import evaluate_config, parse_config as iterate_config_of, simulate_config
    from clarify_lit.simulate.command import build_parser as simulate_parser, parse_config as simulate_config_of
    from clarify_lit.simulate.command import run_fingerprint
    from clarify_lit.simulate.rollout import RolloutSpec

    flag = ["--rollout.repetition_penalty", "1.3"]
    got = {}
    sim = simulate_config_of(flag)
    got["simulate"] = sim.rollout_spec(0).repetition_penalty
    got["simulate --help"] = "--rollout.repetition_penalty" in option_names(simulate_parser())
    got["simulate fingerprint"] = run_fingerprint(sim, ["t"])["config"]["repetition_penalty"]
    got["evaluate"] = RolloutSpec.of(evaluate_config_of(flag).rollout).repetition_penalty
    got["evaluate --help"] = "--rollout.repetition_penalty" in option_names(evaluate_parser())
    # iterate hands the block to its stages as YAML: each stage's own parser reads it back
    it = iterate_config_of(flag)
    folder = Path(tempfile.mkdtemp())
    (folder / "sim.yaml").write_text(yaml.safe_dump(simulate_config(it, folder, 0)))
    (folder / "eval.yaml").write_text(yaml.safe_dump(evaluate_config(it, folder / "eval", "Base", model="m")))
    got["iterate -> simulate"] = simulate_config_of(["--config", str(folder / "sim.yaml")]).rollout.repetition_penalty
    got["iterate -> evaluate"] = evaluate_config_of(["--config", str(folder / "eval.yaml")]).rollout.repetition_penalty
    # the callback as LightningCLI builds it (--trainer.callbacks.init_args.rollout.repetition_penalty)
    parser = ArgumentParser(exit_on_error=False)
    parser.add_class_arguments(RolloutEvaluation, "cb")
    callback = parser.instantiate(parser.parse_args(["--cb.rollout.repetition_penalty", "1.3"])).cb
    got["callback"] = callback.spec.repetition_penalty
    got["callback stays greedy"] = callback.spec.temperatures
    print(json.dumps(got))
""")


@pytest.mark.slow  # a copy of the package and one subprocess per command
def test_a_field_added_to_the_block_reaches_every_command(tmp_path):
    """One edit — a field appended to ``RolloutOptions`` in a copy of the package — and simulate, evaluate, iterate
    (through the YAML it writes for its stages) and the rollout callback all accept ``--rollout.<field>`` and carry
    it into the :class:`RolloutSpec` the engine is built from."""
    package = tmp_path / "clarify_lit"
    shutil.copytree(REPO / "clarify_lit", package, ignore=shutil.ignore_patterns("__pycache__"))
    options = package / "simulate" / "options.py"
    source = options.read_text(encoding="utf-8")
    assert source.count(ANCHOR) == 1
    options.write_text(source.replace(ANCHOR, ANCHOR + NEW_FIELD), encoding="utf-8")

    env = {**os.environ, "PYTHONPATH": str(tmp_path)}
    done = subprocess.run(
        [sys.executable, "-c", PROBE], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=1200
    )
    assert done.returncode == 0, done.stderr[-3000:]
    got = json.loads(done.stdout.strip().splitlines()[-1])
    assert got == {
        "simulate": 1.3,
        "simulate --help": True,
        "simulate fingerprint": 1.3,
        "evaluate": 1.3,
        "evaluate --help": True,
        "iterate -> simulate": 1.3,
        "iterate -> evaluate": 1.3,
        "callback": 1.3,
        "callback stays greedy": [0.0],
    }


def test_every_command_takes_the_whole_block():
    """simulate, evaluate and iterate offer each field of the block as ``--rollout.<field>`` (none of them left
    out, none added beside it), and the callback takes the block itself."""
    import inspect

    from clarify_lit.arguments import option_names
    from clarify_lit.evaluate.callback import RolloutEvaluation
    from clarify_lit.evaluate.command import build_parser as evaluate_parser
    from clarify_lit.jobs.iterate import build_parser as iterate_parser
    from clarify_lit.simulate.command import build_parser as simulate_parser

    block = {f"--rollout.{f.name}" for f in fields(RolloutOptions)}
    for parser in (simulate_parser(), evaluate_parser(), iterate_parser()):
        names = set(option_names(parser))
        assert block <= names
        assert not {f"--{f.name}" for f in fields(RolloutOptions)} & names  # no flat copy beside the block
    parameters = inspect.signature(RolloutEvaluation).parameters
    assert parameters["rollout"].annotation in ("RolloutOptions", RolloutOptions)
    assert not set(FLAT_ROLLOUT_FLAGS) & set(parameters)


@pytest.mark.parametrize("command", ["simulate", "evaluate", "iterate"])
def test_flat_flags_still_parse_with_one_deprecation_line(command, capsys):
    from clarify_lit.evaluate.command import parse_config as evaluate_config_of
    from clarify_lit.jobs.iterate import parse_config as iterate_config_of
    from clarify_lit.simulate.command import parse_config as simulate_config_of

    parse = {"simulate": simulate_config_of, "evaluate": evaluate_config_of, "iterate": iterate_config_of}[command]
    old = parse(["--max_new_tokens", "7", "--temperatures=[0.5]", "--seed", "3"])
    new = parse(["--rollout.max_new_tokens", "7", "--rollout.temperatures=[0.5]", "--rollout.seed", "3"])
    assert old == new and old.rollout.max_new_tokens == 7 and old.rollout.temperatures == [0.5]
    lines = capsys.readouterr().err.strip().splitlines()
    assert lines == [
        f"clarify {command}: --{name} is deprecated, use --rollout.{name}"
        for name in ("max_new_tokens", "temperatures", "seed")
    ]


def test_the_callbacks_flat_options_still_work_with_a_warning():
    from clarify_lit.cli import moved_callback_flags
    from clarify_lit.evaluate.callback import RolloutEvaluation

    with pytest.warns(FutureWarning, match=r"max_new_tokens=\.\.\.\) is deprecated"):
        cb = RolloutEvaluation(max_new_tokens=5, temperature=0.5)
    assert cb.spec.max_new_tokens == 5 and cb.spec.temperatures == [0.5]
    with pytest.raises(TypeError, match="unexpected options"):
        RolloutEvaluation(max_new_token=5)
    prefix = "--trainer.callbacks.init_args."
    assert moved_callback_flags([f"{prefix}max_new_tokens=5", f"{prefix}temperature=0.5", "--data.batch_size=2"]) == [
        f"{prefix}rollout.max_new_tokens=5",
        f"{prefix}rollout.temperatures=[0.5]",
        "--data.batch_size=2",
    ]


def test_fingerprints_of_runs_made_before_the_block_are_unchanged():
    """``run_config.json`` (simulate) and ``iterate_config.json`` written before the block (fixtures made with the
    code before it) equal the new fingerprints of the same options: those runs still resume."""
    from clarify_lit.jobs.iterate import IterateConfig
    from clarify_lit.jobs.iterate import fingerprint as iterate_fingerprint
    from clarify_lit.simulate.command import SimulateConfig, run_fingerprint

    old = json.loads(OLD_FINGERPRINTS.read_text(encoding="utf-8"))
    every = RolloutOptions(
        setting="clarifying",
        adaptive=True,
        discount=0.9,
        mix_temperatures=False,
        reuse_kv_cache=False,
        share_prefix=True,
        attention="eager",
        top_p=0.9,
        sort_by_length=False,
    )
    new = {
        "simulate_default": run_fingerprint(SimulateConfig(), ["t1"]),
        "simulate_all_set": run_fingerprint(
            SimulateConfig(rollout=every, explore_runs=[1], explore_prefixes={1: "What"}), ["t1"]
        ),
        "iterate_default": iterate_fingerprint(IterateConfig()),
        "iterate_set": iterate_fingerprint(
            IterateConfig(
                rollout=RolloutOptions(
                    setting="clarifying",
                    n_turns=2,
                    temperatures=[0.5],
                    max_new_tokens=9,
                    batch_size=3,
                    seed=4,
                    adaptive=True,
                    discount=0.8,
                )
            )
        ),
    }
    assert json.loads(json.dumps(new)) == old


@pytest.mark.parametrize(
    "bad,message",
    [
        (dict(temperatures=[]), "names no run"),
        (dict(temperatures=[-1.0]), "finite number >= 0"),
        (dict(discount=1.5), "discount"),
        (dict(top_p=0.0), "top_p"),
        (dict(max_new_tokens=0), "max_new_tokens"),
        (dict(n_turns=0), "n_turns"),
    ],
)
def test_bad_rollout_options_are_refused_by_name(bad, message):
    with pytest.raises(ValueError, match=message):
        RolloutOptions(**bad).check()


def test_dataclass_parser_leaves_docstring_parsing_as_it_found_it():
    """Building a command's parser turns jsonargparse's (slow, global) attribute-docstring parsing on only while it
    reads the fields' documentation: LightningCLI parses after it (clarify iterate --in_process) stay fast."""
    from jsonargparse._optionals import get_docstring_parse_options

    from clarify_lit.simulate.command import build_parser

    before = get_docstring_parse_options()["attribute_docstrings"]
    parser = build_parser()
    assert get_docstring_parse_options()["attribute_docstrings"] == before
    assert "Token budget of each assistant turn" in parser.format_help()


FLAT_YAML = "max_new_tokens: 40\ntemperatures: [0.3, 0.7]\nseed: 3\n"
NESTED_YAML = "rollout:\n  max_new_tokens: 40\n  temperatures: [0.3, 0.7]\n  seed: 3\n"


def _parse(command):
    from clarify_lit.evaluate.command import parse_config as evaluate_config_of
    from clarify_lit.jobs.iterate import parse_config as iterate_config_of
    from clarify_lit.simulate.command import parse_config as simulate_config_of

    return {"simulate": simulate_config_of, "evaluate": evaluate_config_of, "iterate": iterate_config_of}[command]


@pytest.mark.parametrize("command", ["simulate", "evaluate", "iterate"])
def test_flat_keys_in_a_config_file_still_parse_with_one_deprecation_line(command, tmp_path, capsys):
    """A config file written before the block (``max_new_tokens: 40`` at top level) gives the same configuration as
    the nested one, with one line per old key naming the file and the new spelling."""
    parse = _parse(command)
    flat, nested = tmp_path / "flat.yaml", tmp_path / "nested.yaml"
    flat.write_text(FLAT_YAML)
    nested.write_text(NESTED_YAML)
    new = parse(["--config", str(nested)])
    assert capsys.readouterr().err == ""  # a config without old keys: nothing to say
    old = parse(["--config", str(flat)])
    assert old == new and old.rollout.max_new_tokens == 40 and old.rollout.temperatures == [0.3, 0.7]
    assert capsys.readouterr().err.strip().splitlines() == [
        f"clarify {command}: {flat}: {name} is deprecated, use rollout.{name}"
        for name in ("max_new_tokens", "temperatures", "seed")
    ]
    assert parse([f"--config={flat}"]) == new  # the = spelling too
    from clarify_lit.arguments import moved_config_keys
    from clarify_lit.simulate.options import ROLLOUT_MOVES

    argv = ["--config", str(nested), f"--config={nested}"]
    assert moved_config_keys(argv, ROLLOUT_MOVES, "p", print) == argv  # no old keys: the arguments untouched


def test_flat_keys_in_a_config_file_keep_the_usual_order(tmp_path):
    """Later arguments override earlier ones, as for any config file: a flag after the file wins, the file wins over
    a flag before it."""
    parse = _parse("simulate")
    flat = tmp_path / "flat.yaml"
    flat.write_text(FLAT_YAML)
    assert parse(["--config", str(flat), "--rollout.max_new_tokens", "7"]).rollout.max_new_tokens == 7
    assert parse(["--config", str(flat), "--max_new_tokens", "7"]).rollout.max_new_tokens == 7  # flat flag too
    assert parse(["--rollout.max_new_tokens", "7", "--config", str(flat)]).rollout.max_new_tokens == 40
    second = tmp_path / "second.yaml"
    second.write_text("rollout:\n  seed: 9\n")
    both = parse(["--config", str(flat), "--config", str(second)]).rollout
    assert (both.seed, both.max_new_tokens) == (9, 40)


def test_flat_keys_in_a_config_file_give_the_same_fingerprint(tmp_path):
    """A run configured with the old keys is the same run (resume finds it): same ``run_fingerprint``."""
    from clarify_lit.simulate.command import run_fingerprint

    parse = _parse("simulate")
    flat, nested = tmp_path / "flat.yaml", tmp_path / "nested.yaml"
    flat.write_text(FLAT_YAML)
    nested.write_text(NESTED_YAML)
    assert run_fingerprint(parse(["--config", str(flat)]), ["t"]) == run_fingerprint(
        parse(["--config", str(nested)]), ["t"]
    )


@pytest.mark.parametrize("both", ["rollout:\n  max_new_tokens: 5\n", "rollout.max_new_tokens: 5\n"])
def test_a_key_given_flat_and_nested_in_one_config_file_is_an_error(both, tmp_path, capsys):
    from clarify_lit.cli import main

    config = tmp_path / "x.yaml"
    config.write_text("max_new_tokens: 40\n" + both)
    with pytest.raises(SystemExit) as e:
        main(["evaluate", "--config", str(config), "--model", "tiny-random"])
    err = capsys.readouterr().err
    assert e.value.code == 2 and len(err.strip().splitlines()) == 1, err
    assert (
        f"clarify evaluate: error: {config}: max_new_tokens is given both flat and as rollout.max_new_tokens; "
        "keep only rollout.max_new_tokens" in err
    ), err


def test_an_unknown_key_beside_a_flat_one_is_still_refused(tmp_path, capsys):
    config = tmp_path / "x.yaml"
    config.write_text("max_new_tokens: 40\nn_turn: 3\n")
    with pytest.raises(SystemExit) as e:
        _parse("simulate")(["--config", str(config)])
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 2 and err[0].endswith("max_new_tokens is deprecated, use rollout.max_new_tokens")
    assert len(err) == 2 and "Option 'n_turn' is not accepted; did you mean --rollout.n_turns?" in err[1], err
