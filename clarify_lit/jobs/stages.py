"""Running a job's stages as ``clarify`` commands (the demo's and ``clarify iterate``'s one runner).

A long job (``python -m clarify_lit.demo``, ``clarify iterate``) is a sequence of ordinary ``clarify`` commands.
:class:`StageRunner` prints each one before it runs (so the job doubles as a recipe), skips it when its output
already exists (so an interrupted job resumes where it stopped), appends it to ``<out>/commands.sh`` and runs it in
a subprocess or, with ``in_process``, through :func:`clarify_lit.cli.main` in this process.
"""

from __future__ import annotations

import os
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

from clarify_lit.cli import main as clarify_main


class StageFailed(RuntimeError):
    """A stage run in a subprocess ended with a non-zero status (it printed its own error)."""


class StageRunner:
    """Runs ``clarify <args>`` unless its output exists; logs every command run to ``<out>/commands.sh``.

    Args:
        out: the job's output folder (``commands.sh``, ``stage-times.tsv``).
        tag: the prefix of the printed lines (``[demo]``, ``[iterate]``).
        dry_run: print the commands, run nothing.
        in_process: run the commands in this process (faster start; tests) instead of a subprocess each.
        stage_times: append each stage's wall time and the machine's load to ``<out>/stage-times.tsv`` (the
            README's timing claims come from it).
    """

    def __init__(
        self, out: Path, *, tag: str, dry_run: bool = False, in_process: bool = False, stage_times: bool = False
    ):
        self.out, self.tag, self.dry_run, self.in_process = Path(out), tag, dry_run, in_process
        self.stage_times = stage_times
        self.ran: list[list[str]] = []

    def run(self, args: list[str], done: bool = False) -> None:
        """Run ``clarify <args>``, unless ``done`` (its output exists: resume) or a dry run."""
        shown = "clarify " + " ".join(shlex.quote(a) for a in args)
        if done:
            print(f"[{self.tag}] skip (done): {shown}", flush=True)
            return
        print(f"\n[{self.tag}] $ {shown}", flush=True)
        if self.dry_run:
            return
        self.out.mkdir(parents=True, exist_ok=True)
        with (self.out / "commands.sh").open("a", encoding="utf-8") as f:
            f.write(shown + "\n")
        start = time.time()
        if self.in_process:
            clarify_main(list(args))
        else:
            code = subprocess.run([sys.executable, "-m", "clarify_lit.cli", *args]).returncode
            if code == 130 or code == -signal.SIGINT:  # the stage was stopped by Ctrl-C (it said what it kept)
                raise KeyboardInterrupt
            if code != 0:
                raise StageFailed(
                    f"stage `{shown}` failed (exit {code}; its error is above); fix the cause and "
                    "run the same command again: finished stages are skipped, an interrupted one "
                    "resumes"
                )
        took = time.time() - start
        self.ran.append(list(args))
        print(f"[{self.tag}] done in {took:.0f} s", flush=True)
        if self.stage_times:
            load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
            with (self.out / "stage-times.tsv").open("a", encoding="utf-8") as f:
                f.write(f"{took:.0f}\t{load:.1f}\t{args[0]}\t{shown}\n")
