"""Packaging: ``python -m build`` makes an sdist and a wheel (built from the sdist), and the wheel installed in a fresh
virtualenv gives a working ``clarify`` console script with a clean ``pip check``.

Offline by construction: the build runs without isolation (the setuptools of this environment), the wheel installs
with ``--no-deps --no-index``, and the fresh venv sees the dependencies of this environment through a ``.pth`` line
(torch, transformers, … are not downloaded again); the ``clarify_lit`` it imports is the wheel's, not the source tree.
Run alone with ``make package-check``.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
import venv
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.slow


def run(cmd: list[str], cwd: Path, timeout: int = 300) -> str:
    """Run ``cmd`` without ``$PYTHONPATH``: a source tree on it (``PYTHONPATH=. pytest``) would shadow the wheel."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    proc = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=timeout, env=env)
    assert proc.returncode == 0, (
        f"{' '.join(cmd)} exited {proc.returncode}:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    )
    return proc.stdout


def source_tree(dest: Path) -> Path:
    """A copy of the files git would ship (tracked and untracked-but-not-ignored): no venv, runs or build leftovers
    of the working tree get into the build, and the build writes nothing into the working tree."""
    listed = (
        subprocess.run(
            ["git", "ls-files", "--cached", "--others", "--exclude-standard", "-z"],
            cwd=REPO,
            capture_output=True,
            check=True,
        )
        .stdout.decode()
        .split("\0")
    )
    for rel in filter(None, listed):
        if (REPO / rel).is_file():
            (dest / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / rel, dest / rel)
    return dest


@pytest.mark.skipif(shutil.which("git") is None, reason="needs git to list the source files")
def test_wheel_installs_in_a_fresh_venv_and_runs(tmp_path):
    pytest.importorskip("build", reason="pip install build (the dev extra)")
    src = source_tree(tmp_path / "src")
    dist = tmp_path / "dist"
    run([sys.executable, "-m", "build", "--no-isolation", "--outdir", str(dist), str(src)], cwd=tmp_path)
    sdists, wheels = list(dist.glob("clarify_lit-*.tar.gz")), list(dist.glob("clarify_lit-*.whl"))
    assert len(sdists) == 1 and len(wheels) == 1
    names = zipfile.ZipFile(wheels[0]).namelist()
    assert "clarify_lit/train/export.py" in names and "clarify_lit/models.py" in names
    assert not any(n.startswith("tests/") for n in names)
    assert any(n.endswith("entry_points.txt") for n in names)

    env = tmp_path / "venv"
    venv.create(env, with_pip=False)  # pip comes from this environment (pip --python): nothing to download
    python = env / "bin" / "python"
    purelib = run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"], cwd=tmp_path)
    Path(purelib.strip(), "_clarify_test_deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    pip = [sys.executable, "-m", "pip", "--python", str(python)]
    run([*pip, "install", "-q", "--no-deps", "--no-index", str(wheels[0])], cwd=tmp_path)

    where = run([str(python), "-c", "import clarify_lit; print(clarify_lit.__file__)"], cwd=tmp_path)
    assert Path(where.strip()).is_relative_to(env)  # the wheel's copy, not the source tree
    clarify = env / "bin" / "clarify"
    assert "simulate → fit → evaluate → report" in run([str(clarify), "--help"], cwd=tmp_path)
    import clarify_lit

    assert run([str(clarify), "--version"], cwd=tmp_path).strip() == f"clarify_lit {clarify_lit.__version__}"
    assert "No broken requirements" in run([*pip, "check"], cwd=tmp_path)
