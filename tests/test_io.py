"""``clarify_lit.io``: atomic file and folder writes (the guarantee every "stage done" marker relies on)."""

from __future__ import annotations

import os
import subprocess

import pytest

from clarify_lit.io import atomic_folder, atomic_write, atomic_write_text, download_wheel


def test_atomic_write_replaces_whole_or_not_at_all(tmp_path):
    path = tmp_path / "eval" / "metrics.json"
    atomic_write_text(path, '{"done": 1}')
    assert path.read_text() == '{"done": 1}'
    with pytest.raises(RuntimeError, match="killed mid-write"), atomic_write(path) as f:
        f.write('{"done": 2, "trunc')
        raise RuntimeError("killed mid-write")
    assert path.read_text() == '{"done": 1}'  # the old marker, never a truncated one
    assert [p.name for p in path.parent.iterdir()] == ["metrics.json"]  # the temp file is gone
    with atomic_write(path, "wb") as f:
        f.write(b"\x00bytes")
    assert path.read_bytes() == b"\x00bytes"
    umask = os.umask(0)
    os.umask(umask)
    assert path.stat().st_mode & 0o777 == 0o666 & ~umask  # a plain file's permissions, not mkstemp's 0600


def test_stale_temp_files_are_cleared_on_request(tmp_path):
    path = tmp_path / "last.ckpt"
    stale = tmp_path / ".last.ckpt.abc123.partial"
    stale.write_bytes(b"half")
    with atomic_write(path, "wb", suffix=".partial", clear_stale=True) as f:
        f.write(b"whole")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.ckpt"]


def test_atomic_folder_builds_once_and_never_leaves_half_a_folder(tmp_path):
    target = tmp_path / "models" / "m"
    built = []

    def build(folder):
        built.append(folder)
        (folder / "weights").write_text("w")
        (folder / "config.json").write_text("{}")

    def done(t):
        return (t / "config.json").exists()

    assert atomic_folder(target, build, done) == target and (target / "weights").read_text() == "w"
    atomic_folder(target, build, done)
    assert len(built) == 1

    def crash(folder):
        (folder / "weights").write_text("partial")
        raise OSError("disk full")

    other = tmp_path / "models" / "n"
    with pytest.raises(OSError, match="disk full"):
        atomic_folder(other, crash, done)
    assert sorted(p.name for p in (tmp_path / "models").iterdir()) == ["m"]


def test_download_wheel_names_the_command_when_it_fails(tmp_path, monkeypatch):
    monkeypatch.setattr(subprocess, "run", lambda cmd, **kw: subprocess.CompletedProcess(cmd, 1, "", "ERROR: offline"))
    with pytest.raises(RuntimeError, match=r"pip download --no-deps .*pkg==1\.0.*exited 1.*offline"):
        download_wheel("pkg==1.0", tmp_path / "d")
