"""Shared fixtures: a per-session ``$CLARIFY_CACHE``, the tiny random model/tokenizer, and a conversation-records
factory (system prompt + 3 teacher/assistant exchanges, several tasks × runs, rewards chosen by the test).

``$CLARIFY_CACHE`` is set for every test (the autouse ``clarify_cache`` fixture, restored afterwards) to one tmp folder
per session, so tests never read or write the user's cache; the tiny model is built once per session inside it. Tests
that need the network are marked ``network`` and left out of ``make test`` (``make test-full`` runs them).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

import pytest

SYSTEM_PROMPT = "You are an expert at multiple-choice questions."
LETTERS = "ABCD"


@pytest.fixture(scope="session")
def cache_root(tmp_path_factory) -> Path:
    """One clarify cache folder for the whole session (tiny model built once, tokenized samples shared)."""
    return tmp_path_factory.mktemp("clarify_cache")


@pytest.fixture(scope="session", autouse=True)
def single_torch_thread_for_fixtures():
    """One torch thread from the session's start: module- and session-scoped fixtures (a simulation or a fit shared
    by a test file) are set up before the function-scoped ``single_torch_thread`` below runs, and with the default
    thread count they ran several times slower on a loaded 2-core machine (tests/test_rescore.py's ``logged``:
    21 s → 3.4 s)."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(autouse=True)
def single_torch_thread():
    """Every test runs torch on one thread, restored afterwards: the tiny model's ops are too small to gain from
    threads, and on a loaded 2-core machine OpenMP threads only spin (3–20× slower measured)."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(autouse=True)
def attribute_docstrings_off():
    """Every test starts as a fresh ``clarify`` process does, with jsonargparse's attribute-docstring parsing off.
    A dataclass command's parser turns it on for the whole process (``arguments.dataclass_parser``, for its
    ``--help``); left on, every later LightningCLI parser of the same pytest process parses every docstring it meets
    (``clarify fit --print_config``: 0.2 s in a fresh process, about 2 s after any simulate/demo/iterate parser)."""
    from jsonargparse import set_parsing_settings

    set_parsing_settings(docstring_parse_attribute_docstrings=False)
    yield
    set_parsing_settings(docstring_parse_attribute_docstrings=False)


@pytest.fixture(autouse=True)
def cpu_without_native_bf16(monkeypatch):
    """Every test in this process sees a CPU without native bf16, so ``dtype: auto`` and ``precision: auto`` resolve
    to float32 / 32-true on every machine: the suite's numbers do not depend on the CPU it runs on (the tests of
    ``auto`` itself patch the flags they need; tests/test_environment.py)."""
    from clarify_lit import environment

    monkeypatch.setattr(environment, "cpu_flags", lambda: frozenset({"avx512f"}))


@pytest.fixture(autouse=True)
def clarify_cache(cache_root, monkeypatch, request) -> Path:
    """Every test: ``$CLARIFY_CACHE`` is the session cache (never the user's), and — unless the test is marked
    ``network`` (``make test-full``) — pip cannot reach a package index (``PIP_NO_INDEX``), so a test that would
    download a model or a data package fails at once instead of fetching it."""
    monkeypatch.setenv("CLARIFY_CACHE", str(cache_root))
    if request.node.get_closest_marker("network") is None:
        monkeypatch.setenv("PIP_NO_INDEX", "1")
    return cache_root


@pytest.fixture(scope="session")
def tiny_model_dir(cache_root) -> Path:
    """The ``tiny-random`` model folder, built once per session inside the session cache."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("CLARIFY_CACHE", str(cache_root))
        from clarify_lit.models import ensure_tiny_random

        path = ensure_tiny_random()
    assert (path / "config.json").exists() and path.is_relative_to(cache_root)
    return path


@pytest.fixture(scope="module")
def tiny(tiny_model_dir):
    """``(model, tokenizer)`` of the session's tiny-random folder, loaded once per test module."""
    from clarify_lit.models import load_causal_lm, load_tokenizer

    return load_causal_lm(str(tiny_model_dir)), load_tokenizer(str(tiny_model_dir))


@pytest.fixture(scope="session")
def tokenizer(tiny_model_dir):
    from clarify_lit.models import load_tokenizer

    return load_tokenizer(str(tiny_model_dir))


def make_messages(
    task: int, run: int, n_exchanges: int = 3, system: bool = True, final_answer: str | None = None
) -> list[dict[str, str]]:
    """A conversation: [system], then ``n_exchanges`` × (teacher ``user``, ``assistant``). Lengths vary with
    task and run so token counts differ between samples."""
    msgs = [{"role": "system", "content": SYSTEM_PROMPT}] if system else []
    for k in range(n_exchanges):
        if k == 0:
            user = f"Question {task}: which of the options is correct? " + "Why might some options be incorrect? " * (
                task % 3
            )
        elif k == n_exchanges - 1:
            user = "Give your final answer."
        else:
            user = "The answer names a physical property." + " water" * (run % 2)
        if k == n_exchanges - 1:
            assistant = final_answer or f"The answer is {LETTERS[run % 4]}."
        else:
            assistant = f"Is it about energy{' and plants' * (run + k)}?"
        msgs += [{"role": "user", "content": user}, {"role": "assistant", "content": assistant}]
    return msgs


def make_record(task: int, run: int, reward: float, **overrides) -> dict:
    """A raw (dict) conversation record (task ``t{task}``, id ``t{task}-r{run}``) as written to a JSONL file."""
    task_id = f"t{task}"
    rec = {
        "id": f"{task_id}-r{run}",
        "task_id": task_id,
        "dataset": "toy",
        "run": run,
        "temperature": 0.5 * run,
        "reward": reward,
        "messages": make_messages(task, run),
        "reward_components": {"correct": float(isinstance(reward, int | float) and reward >= 1.0), "judge": None},
        "gold": "A",
        "prediction": LETTERS[run % 4],
        "meta": {"question_prompt": f"Question {task_id} as first asked"},
    }
    rec.update(overrides)
    return rec


def default_reward(task: int, run: int) -> float:
    """Non-negative rewards with spread in every task (run 0 best), so every objective has data."""
    return [1.0, 0.0, 0.5, 0.25][run % 4]


@pytest.fixture
def records_factory(tmp_path) -> Callable[..., Path]:
    """``make(n_tasks=4, n_runs=3, rewards=None, name="records.jsonl", extra=())`` writes records and returns the
    path. ``rewards`` is a ``{task_index: [r_run0, ...]}`` mapping or a ``(task, run) -> reward`` callable; the file
    format follows the suffix (``.jsonl`` or ``.parquet``) via ``write_records``."""
    from clarify_lit.data.records import write_records

    def make(
        n_tasks: int = 4,
        n_runs: int = 3,
        rewards: dict | Callable | None = None,
        name: str = "records.jsonl",
        extra: Sequence[dict] = (),
    ) -> Path:
        rows = []
        for t in range(n_tasks):
            for r in range(n_runs):
                if rewards is None:
                    reward = default_reward(t, r)
                elif callable(rewards):
                    reward = rewards(t, r)
                else:
                    reward = rewards[t][r]
                rows.append(make_record(t, r, reward))
        rows += list(extra)
        return write_records(tmp_path / name, rows)

    return make


def tiny_lora_fit(folder: Path, cache_root: Path, tiny_model_dir: Path) -> Path:
    """A 2-step Refit LoRA fit of the tiny model on 9 records (run folder ``folder/run``: ``checkpoints/last.ckpt`` and
    ``export/``), for the export tests."""
    from clarify_lit.cli import lightning_main
    from clarify_lit.data.records import write_records

    rows = [make_record(t, r, [1.0, 0.0, 0.5][r]) for t in range(3) for r in range(3)]
    records = write_records(folder / "conversations.jsonl", rows)
    root = folder / "run"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("CLARIFY_CACHE", str(cache_root))
        lightning_main(
            [
                "fit",
                "--trainer.enable_progress_bar=false",
                "--trainer.enable_model_summary=false",
                f"--model.model_name_or_path={tiny_model_dir}",
                f"--data.train_files=[{records}]",
                "--data.batch_size=2",
                "--data.val_fraction=0",
                "--trainer.max_steps=2",
                f"--trainer.default_root_dir={root}",
                "--model.learning_rate=5e-2",
                "--model.lora_dropout=0.0",
            ]
        )
    return root
