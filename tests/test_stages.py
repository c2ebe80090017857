"""StageRunner.run_all: a job's stages one after another, or up to ``jobs`` at once in the order their inputs allow.

The stages here are tiny Python scripts instead of ``clarify`` commands (``runner.command``): each appends its name,
"start"/"end" and a clock reading to a shared file, so the tests read what ran when and with which environment.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import pytest

from clarify_lit.jobs import demo
from clarify_lit.jobs.stages import Stage, StageFailed, StageRunner

# argv: [name, seconds to run, exit code, events file]
SCRIPT = """
import os, sys, time
name, secs, code, events = sys.argv[1], float(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
def note(what):
    with open(events, "a") as f:
        f.write(f"{name} {what} {time.time():.4f} {os.environ.get('OMP_WAIT_POLICY', '-')}\\n")
note("start")
time.sleep(secs)
print(f"{name} says goodbye")
note("end")
sys.exit(code)
"""


def runner(tmp_path: Path, **kw) -> StageRunner:
    r = StageRunner(tmp_path / "job", tag="t", **kw)
    r.command = [sys.executable, "-c", SCRIPT]
    return r


def stage(tmp_path: Path, name: str, secs: float = 0.0, code: int = 0, **kw) -> Stage:
    return Stage([name, str(secs), str(code), str(tmp_path / "events")], **kw)


def events(tmp_path: Path) -> dict[tuple[str, str], tuple[float, str]]:
    out = {}
    for line in (tmp_path / "events").read_text().splitlines():
        name, what, at, threads = line.split()
        out[name, what] = (float(at), threads)
    return out


def test_one_job_runs_the_list_in_order_with_the_console_and_calls_then(tmp_path, capfd):
    done = []
    stages = [
        stage(tmp_path, "a", then=lambda: done.append("a")),
        stage(tmp_path, "b", done=True, then=lambda: done.append("b")),
        stage(tmp_path, "c", needs=(0,)),
    ]
    r = runner(tmp_path)
    r.run_all(stages, jobs=1)
    ev = events(tmp_path)
    assert set(ev) == {("a", "start"), ("a", "end"), ("c", "start"), ("c", "end")}  # b was done: skipped
    assert ev["a", "end"][0] <= ev["c", "start"][0]
    assert done == ["a", "b"]  # a finished archive of a done stage still runs (its tables may be missing)
    out = capfd.readouterr().out
    assert "a says goodbye" in out and "[t] skip (done): clarify b" in out  # the stage's output on the console
    assert [a[0] for a in r.ran] == ["a", "c"]
    assert (tmp_path / "job" / "commands.sh").read_text().splitlines() == [
        f"clarify a 0.0 0 {tmp_path / 'events'}",
        f"clarify c 0.0 0 {tmp_path / 'events'}",
    ]


def test_two_jobs_overlap_independent_stages_and_wait_for_what_a_stage_reads(tmp_path, monkeypatch, capfd):
    monkeypatch.delenv("OMP_WAIT_POLICY", raising=False)
    stages = [
        stage(tmp_path, "sim", 0.6),
        stage(tmp_path, "base", 0.6),  # independent of sim: runs beside it
        stage(tmp_path, "fit", 0.2, needs=(0,)),
        stage(tmp_path, "eval", 0.0, needs=(2,)),
        stage(tmp_path, "report", 0.0, needs=(0, 1, 2, 3)),
    ]
    r = StageRunner(tmp_path / "job", tag="t", stage_times=True)
    r.command = [sys.executable, "-c", SCRIPT]
    r.run_all(stages, jobs=2)
    ev = events(tmp_path)
    assert ev["base", "start"][0] < ev["sim", "end"][0]  # ran at the same time
    assert ev["fit", "start"][0] >= ev["sim", "end"][0]
    assert ev["eval", "start"][0] >= ev["fit", "end"][0]
    assert ev["report", "start"][0] >= max(ev[n, "end"][0] for n in ("sim", "base", "fit", "eval"))
    assert {policy for _, policy in ev.values()} == {"PASSIVE"}  # a waiting thread gives up its core
    # each stage's output went to its log, not the console; its time to stage-times.tsv
    out = capfd.readouterr().out
    assert "says goodbye" not in out and "up to 2 stages at once" in out
    assert (tmp_path / "job" / "logs" / "001-base.log").read_text().strip() == "base says goodbye"
    rows = (tmp_path / "job" / "stage-times.tsv").read_text().splitlines()
    assert sorted(row.split("\t")[2] for row in rows) == ["base", "eval", "fit", "report", "sim"]


def test_a_wait_policy_set_by_the_user_is_kept(tmp_path, monkeypatch):
    monkeypatch.setenv("OMP_WAIT_POLICY", "ACTIVE")
    runner(tmp_path).run_all([stage(tmp_path, "a"), stage(tmp_path, "b")], jobs=2)
    assert {policy for _, policy in events(tmp_path).values()} == {"ACTIVE"}


def test_a_failed_stage_stops_new_ones_lets_running_ones_finish_and_names_its_log(tmp_path, capfd):
    stages = [
        stage(tmp_path, "slow", 0.8),
        stage(tmp_path, "bad", 0.0, code=3),
        stage(tmp_path, "after_bad", needs=(1,)),
        stage(tmp_path, "later", 0.0),  # independent, but queued behind the failure: not started
    ]
    r = runner(tmp_path)
    with pytest.raises(StageFailed) as e:
        r.run_all(stages, jobs=2)
    ev = events(tmp_path)
    assert ("slow", "end") in ev  # the running stage finished (its output counts on the next run)
    assert not any(name in ("after_bad", "later") for name, _ in ev)
    log = tmp_path / "job" / "logs" / "001-bad.log"
    assert "stage `clarify bad 0.0 3" in str(e.value) and f"exit 3; its output is in {log}" in str(e.value)
    err = capfd.readouterr().err
    assert f"the last 1 lines of {log}" in err and "bad says goodbye" in err


def test_stages_may_need_only_earlier_ones_and_jobs_is_positive(tmp_path):
    with pytest.raises(ValueError, match=r"stage 0 \(`clarify a`\) needs \(1,\): only earlier stages"):
        runner(tmp_path).run_all([stage(tmp_path, "a", needs=(1,)), stage(tmp_path, "b")], jobs=2)
    with pytest.raises(ValueError, match="jobs must be ≥ 1, got 0"):
        runner(tmp_path).run_all([stage(tmp_path, "a")], jobs=0)
    with pytest.raises(SystemExit):
        demo.main(["--preset", "demo", "--dry_run", "true", "--out", str(tmp_path / "d"), "--jobs", "0"])


def test_ctrl_c_reaches_the_running_stages_and_is_raised_once_they_exit(tmp_path, monkeypatch):
    """A KeyboardInterrupt in the scheduler (a kill of the job only, not the terminal's whole group) is passed on as
    SIGINT to each running stage, which is waited for."""
    calls = {"n": 0}
    real_sleep = time.sleep

    def sleep_then_interrupt(secs):
        calls["n"] += 1
        if calls["n"] == 5:  # both stages are running by now
            raise KeyboardInterrupt
        real_sleep(secs)

    monkeypatch.setattr("clarify_lit.jobs.stages.time.sleep", sleep_then_interrupt)
    with pytest.raises(KeyboardInterrupt):
        runner(tmp_path).run_all([stage(tmp_path, "a", 30), stage(tmp_path, "b", 30)], jobs=2)
    ev = events(tmp_path)
    assert ("a", "start") in ev and ("b", "start") in ev
    assert ("a", "end") not in ev and ("b", "end") not in ev  # stopped by the SIGINT, not run to the end


def test_reproduce_stage_graph(tmp_path):
    """What each stage of `make reproduce` waits for: a fit its cell's simulation (STaR-GATE-D also the cell's SFT
    fit), an evaluation its fit, the Base evaluation nothing, a report every stage of its experiment."""
    p = demo.PRESETS["reproduce"]
    stages = demo.preset_stages(p, tmp_path, dry_run=True)
    n_cells = len(p.experiments) * len(p.seeds)
    assert sum(s.args[0] == "simulate" for s in stages) == n_cells
    assert sum(s.args[0] == "report" for s in stages) == len(p.experiments)

    def arg(s: Stage, flag: str) -> str:
        return s.args[s.args.index(flag) + 1]

    for s in stages:
        kind = s.args[0]
        needed = [stages[n] for n in s.needs]
        if kind == "simulate" or (kind == "evaluate" and "--model" in s.args):
            assert s.needs == ()
        elif kind == "fit":
            root = s.args[s.args.index("--trainer.default_root_dir") + 1]
            cell = Path(root).parent.parent
            assert needed[0].args[0] == "simulate" and Path(needed[0].args[needed[0].args.index("--output") + 1]) == (
                cell / "simulate"
            )
            if root.endswith("STaR-GATE-D"):
                assert arg(needed[1], "--trainer.default_root_dir") == str(cell / "fit" / "SFT")
            else:
                assert len(needed) == 1
        elif kind == "evaluate":
            export = s.args[s.args.index("--export_dir") + 1]
            assert [n.args[0] for n in needed] == ["fit"]
            assert needed[0].args[needed[0].args.index("--trainer.default_root_dir") + 1] + "/export" == export
        else:
            assert kind == "report"
            runs = Path(s.args[1])
            assert (
                all(str(runs) in " ".join(n.args) for n in needed)
                and len(needed) == len(stages) // len(p.experiments) - 1
            )
