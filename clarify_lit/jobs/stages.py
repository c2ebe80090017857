"""Running a job's stages as ``clarify`` commands (the demo's and ``clarify iterate``'s one runner).

A long job (``python -m clarify_lit.demo``, ``clarify iterate``) is a sequence of ordinary ``clarify`` commands.
:class:`StageRunner` prints each one before it runs (so the job doubles as a recipe), skips it when its output
already exists (so an interrupted job resumes where it stopped), appends it to ``<out>/commands.sh`` and runs it in
a subprocess or, with ``in_process``, through :func:`clarify_lit.cli.main` in this process.

:meth:`StageRunner.run_all` runs a whole job given as :class:`Stage` s with what each one reads: one after another
(``jobs=1``), or up to ``jobs`` independent stages at once (the demo's ``--jobs``; docs/demo.md#parallel-stages says
what it gains and why each stage keeps its thread count).
"""

from __future__ import annotations

import os
import shlex
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from clarify_lit.cli import main as clarify_main


class StageFailed(RuntimeError):
    """A stage run in a subprocess ended with a non-zero status (it printed its own error)."""


@dataclass
class Stage:
    """One ``clarify`` command of a job.

    Args:
        args: the command's arguments (after ``clarify``).
        done: its output exists already (resume): skipped.
        needs: positions, in the job's list, of the stages whose outputs it reads (each earlier than this one).
        then: work done in this process once it has succeeded (or was done already), e.g. archiving its tables.
    """

    args: list[str]
    done: bool = False
    needs: tuple[int, ...] = ()
    then: Callable[[], None] | None = None


class StageRunner:
    """Runs ``clarify <args>`` unless its output exists; logs every command run to ``<out>/commands.sh``.

    Args:
        out: the job's output folder (``commands.sh``, ``stage-times.tsv``, ``logs/`` of parallel stages).
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
        self.command = [sys.executable, "-m", "clarify_lit.cli"]  # what runs a stage in a subprocess

    def run(self, args: list[str], done: bool = False) -> None:
        """Run ``clarify <args>``, unless ``done`` (its output exists: resume) or a dry run."""
        shown = self._announce(args, done)
        if shown is None:
            return
        start = time.time()
        if self.in_process:
            clarify_main(list(args))
        else:
            code = subprocess.run([*self.command, *args]).returncode
            self._check_exit(code, shown)
        self._finished(args, shown, time.time() - start)

    def run_all(self, stages: list[Stage], jobs: int = 1) -> None:
        """Run a job's stages: in order with ``jobs=1`` (each as :meth:`run`), else up to ``jobs`` at once.

        In parallel, a stage starts once every stage it ``needs`` has succeeded (earlier stages first), runs in a
        subprocess and writes its output to ``<out>/logs/<position>-<command>.log`` instead of the console. Each
        stage keeps the torch thread count it has alone, because greedy bf16 text depends on it (5 of 50 reproduce
        evaluations changed from 2 threads to 1); ``OMP_WAIT_POLICY=PASSIVE`` (unless set already) makes a thread
        that waits give its core to the other stage instead of spinning on it. When one fails, no
        new stage starts, the running ones finish (their outputs count on the next run) and :class:`StageFailed`
        names the failed command and its log; Ctrl-C is passed on to the running stages, which keep what they
        finished, and is raised once they have exited.
        """
        for i, stage in enumerate(stages):
            if any(not 0 <= n < i for n in stage.needs):
                raise ValueError(f"stage {i} (`clarify {stage.args[0]}`) needs {stage.needs}: only earlier stages")
        if jobs < 1:
            raise ValueError(f"jobs must be ≥ 1, got {jobs}")
        if jobs == 1 or self.dry_run or self.in_process:
            for stage in stages:
                self.run(stage.args, stage.done)
                if stage.then is not None and not self.dry_run:
                    stage.then()
            return
        self._run_parallel(stages, jobs)

    def _run_parallel(self, stages: list[Stage], jobs: int) -> None:
        env = {**os.environ}
        env.setdefault("OMP_WAIT_POLICY", "PASSIVE")
        print(f"[{self.tag}] up to {jobs} stages at once (OMP_WAIT_POLICY={env['OMP_WAIT_POLICY']})", flush=True)
        (self.out / "logs").mkdir(parents=True, exist_ok=True)
        succeeded: set[int] = set()
        pending = list(range(len(stages)))
        running: dict[int, tuple[subprocess.Popen, float, str, Path]] = {}
        failed: list[str] = []
        try:
            while pending or running:
                if not failed:
                    for i in [i for i in pending if all(n in succeeded for n in stages[i].needs)]:
                        if stages[i].done:
                            pending.remove(i)
                            self._announce(stages[i].args, True)
                            self._then(stages[i], succeeded, i)
                        elif len(running) < jobs:
                            pending.remove(i)
                            running[i] = self._launch(i, stages[i].args, env)
                if not running:
                    if pending and not failed:  # unreachable for a list checked above; never spin silently
                        raise RuntimeError(f"stages {pending} wait on stages that cannot run")
                    break
                time.sleep(0.2)
                for i, (proc, start, shown, log) in list(running.items()):
                    code = proc.poll()
                    if code is None:
                        continue
                    del running[i]
                    if code == 0:
                        self._finished(stages[i].args, shown, time.time() - start, log)
                        self._then(stages[i], succeeded, i)
                    elif code == 130 or code == -signal.SIGINT:
                        raise KeyboardInterrupt
                    else:
                        failed.append(f"stage `{shown}` failed (exit {code}; its output is in {log}")
                        self._show_tail(log)
                        if running:
                            print(f"[{self.tag}] a stage failed: waiting for the {len(running)} running", flush=True)
        except KeyboardInterrupt:
            for proc, *_ in running.values():  # a terminal's Ctrl-C reached them already; a kill did not
                if proc.poll() is None:
                    proc.send_signal(signal.SIGINT)
            for proc, *_ in running.values():
                proc.wait()
            raise
        if failed:
            raise StageFailed(
                "; ".join(failed) + "); fix the cause and run the same command again: finished stages are skipped, "
                "an interrupted one resumes"
            )

    def _launch(self, i: int, args: list[str], env: dict[str, str]) -> tuple[subprocess.Popen, float, str, Path]:
        shown = self._announce(args, False)
        log = self.out / "logs" / f"{i:03d}-{args[0]}.log"
        print(f"[{self.tag}] (stage {i} started; its output: {log})", flush=True)
        with log.open("w", encoding="utf-8") as f:  # the child keeps its own copy of the descriptor
            proc = subprocess.Popen([*self.command, *args], stdout=f, stderr=subprocess.STDOUT, env=env)
        return proc, time.time(), shown, log

    def _then(self, stage: Stage, succeeded: set[int], i: int) -> None:
        if stage.then is not None:
            stage.then()
        succeeded.add(i)

    def _show_tail(self, log: Path, lines: int = 30) -> None:
        tail = log.read_text(encoding="utf-8", errors="replace").splitlines()[-lines:]
        print(f"[{self.tag}] the last {len(tail)} lines of {log}:", file=sys.stderr)
        print("\n".join(tail), file=sys.stderr, flush=True)

    def _announce(self, args: list[str], done: bool) -> str | None:
        """Print the command (a skip when ``done``) and log it to ``commands.sh``; ``None`` when it is not to run."""
        shown = "clarify " + " ".join(shlex.quote(a) for a in args)
        if done:
            print(f"[{self.tag}] skip (done): {shown}", flush=True)
            return None
        print(f"\n[{self.tag}] $ {shown}", flush=True)
        if self.dry_run:
            return None
        self.out.mkdir(parents=True, exist_ok=True)
        with (self.out / "commands.sh").open("a", encoding="utf-8") as f:
            f.write(shown + "\n")
        return shown

    def _check_exit(self, code: int, shown: str) -> None:
        if code == 130 or code == -signal.SIGINT:  # the stage was stopped by Ctrl-C (it said what it kept)
            raise KeyboardInterrupt
        if code != 0:
            raise StageFailed(
                f"stage `{shown}` failed (exit {code}; its error is above); fix the cause and "
                "run the same command again: finished stages are skipped, an interrupted one "
                "resumes"
            )

    def _finished(self, args: list[str], shown: str, took: float, log: Path | None = None) -> None:
        self.ran.append(list(args))
        where = f": {shown[:100]}… (log {log})" if log is not None else ""
        print(f"[{self.tag}] done in {took:.0f} s{where}", flush=True)
        if self.stage_times:
            load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
            with (self.out / "stage-times.tsv").open("a", encoding="utf-8") as f:
                f.write(f"{took:.0f}\t{load:.1f}\t{args[0]}\t{shown}\n")
