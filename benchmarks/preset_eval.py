"""A preset's Base evaluation as a ``clarify evaluate`` command, for the benchmarks that time real work.

The arguments come from the demo's own builder (:func:`clarify_lit.jobs.demo.evaluate_args`), so a benchmark runs
exactly the evaluation its preset runs; only the number of questions and the dtype are the benchmark's.
"""

from __future__ import annotations

from pathlib import Path

from clarify_lit.jobs.demo import PRESETS, evaluate_args


def base_evaluation_args(preset: str, out: Path, n_questions: int, dtype: str = "auto") -> list[str]:
    """``clarify evaluate`` arguments (after ``clarify``) of ``preset``'s first cell's Base row at seed 0, on the first
    ``n_questions`` of its test questions, generating in ``dtype``, writing to ``out``."""
    p = PRESETS[preset]
    args = evaluate_args(p, p.experiments[0], 0, "Base", out, None)
    for flag, value in (("--n_questions", str(n_questions)), ("--dtype", dtype)):
        args[args.index(flag) + 1] = value
    return args
