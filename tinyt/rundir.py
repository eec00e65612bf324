"""A run directory's ownership: one writer at a time, what in it counts as a trained run,
and the temporary files a killed writer leaves behind.

Commands that write a run's state (`tinyt train`, `tinyt average`) hold an exclusive
`fcntl.flock` on `RUN/.tinyt.lock` for as long as they run. The kernel releases it when the
process ends, however it ends (SIGKILL and power loss included), so a lock is never stale and
nothing has to be cleaned up by hand. A second writer is refused at once with one line naming
the process that holds the lock. Readers (translate, evaluate, info, plot) take no lock: every
file a writer replaces is renamed into place whole, so a reader sees the old or the new file.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import shutil
import socket
import time
from pathlib import Path

from tinyt.errors import TinytError
from tinyt.writing import write_error

LOCK_NAME = ".tinyt.lock"
# Files and folders that only training, evaluation or averaging produce: any one of them means
# the directory holds a run that a new `tinyt train` must not silently replace.
TRAINED_FILES = ("last.pt", "best.pt", "averaged.pt", "metrics.jsonl", "evaluations.jsonl")
TRAINED_FOLDERS = ("tokenizer", "translations")


def trained_artefacts(run_dir: Path) -> list[str]:
    """Names of the trained artefacts in `run_dir` (empty: nothing a new run would lose)."""
    found = [name for name in TRAINED_FILES if (run_dir / name).exists()]
    found += sorted(p.name for p in run_dir.glob("ckpt-*.pt"))
    found += [name + "/" for name in TRAINED_FOLDERS
              if (run_dir / name).is_dir() and any((run_dir / name).iterdir())]
    return found


def _is_temporary(name: str) -> bool:
    """Names tinyt, SentencePiece's staging folder and `datasets` write before renaming:
    `.last.pt.XXXX.tmp`, `ids.tmp`, `corpus.arrow.tmp-PID`, `tmpXXXXXXXX`."""
    return name.endswith(".tmp") or ".tmp-" in name or name.startswith("tmp")


def remove_stale_temporaries(run_dir: Path) -> list[Path]:
    """Delete the temporary files and folders a killed writer left in the run directory, its
    cache/ and its tokenizer/ (call it with the lock held: no live writer owns them then).
    Returns what was removed."""
    removed = []
    candidates = [p for p in run_dir.glob("*") if _is_temporary(p.name) and p.name != LOCK_NAME]
    candidates += list(run_dir.glob(".*.tmp"))
    for folder in ("cache", "tokenizer"):
        if (run_dir / folder).is_dir():
            candidates += [p for p in (run_dir / folder).rglob("*") if _is_temporary(p.name)]
    for path in sorted(set(candidates), key=lambda p: len(p.parts)):
        if not os.path.lexists(path):
            continue  # inside a folder removed just before
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)
        removed.append(path)
    return removed


def _holder(lock_path: Path) -> str:
    """Who holds the lock, as the holder wrote it: 'process 1234 (tinyt train) on HOST since
    12:00:00', or a vaguer line when it has not written it yet."""
    try:
        info = json.loads(lock_path.read_text(encoding="utf-8"))
        since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(float(info["started"])))
        where = "" if info.get("host") == socket.gethostname() else f" on {info.get('host')}"
        return f"process {int(info['pid'])} ({info['command']}){where}, since {since}"
    except (OSError, ValueError, KeyError, TypeError):
        return "another process"


class RunDirLock:
    """Exclusive ownership of a run directory for one command, as a context manager.

    Entering creates the directory if needed and takes the lock without waiting; a directory
    held by another process raises TinytError naming that process. `created` tells whether
    this command made the directory, so a command that fails before writing anything can
    leave no trace (`discard`).
    """

    def __init__(self, run_dir: str | Path, command: str, create: bool = True):
        self.run_dir = Path(run_dir)
        self.command = command
        self.create = create
        self.created = False
        self._fd: int | None = None

    def __enter__(self) -> RunDirLock:
        run_dir = self.run_dir
        if run_dir.exists() and not run_dir.is_dir():
            raise TinytError(f"run directory {run_dir} is a file, not a folder; pass another "
                             "--run-dir (or set run_dir in the config)")
        if not self.create and not run_dir.is_dir():
            raise TinytError(f"run directory {run_dir} does not exist; pass --run with a "
                             "trained run")
        self.created = not run_dir.exists()
        lock_path = run_dir / LOCK_NAME
        while True:
            try:
                run_dir.mkdir(parents=True, exist_ok=True)
                fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o644)
            except OSError as exc:
                raise write_error(exc, run_dir, then="start again") from None
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as exc:
                os.close(fd)
                if exc.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                    raise write_error(exc, run_dir, then="start again") from None
                raise TinytError(f"run directory {run_dir} is in use by {_holder(lock_path)}; "
                                 "wait for it to finish (or stop it), or use another --run-dir"
                                 ) from None
            # The holder before us unlinks the lock file as it lets go: if what we locked is
            # no longer the file at lock_path, lock the new one instead.
            try:
                if os.stat(lock_path).st_ino == os.fstat(fd).st_ino:
                    break
            except FileNotFoundError:
                pass
            os.close(fd)
        self._fd = fd
        info = {"pid": os.getpid(), "command": self.command, "host": socket.gethostname(),
                "started": time.time()}
        try:
            os.ftruncate(fd, 0)
            os.pwrite(fd, json.dumps(info).encode(), 0)
        except OSError:
            pass  # a full disk: the lock holds all the same, only the holder's name is missing
        return self

    def __exit__(self, *exc) -> None:
        if self._fd is not None:
            # Unlinked while still held, so no one can lock this file after us while a newer
            # process locks a new one; closing the descriptor releases the flock.
            try:
                (self.run_dir / LOCK_NAME).unlink()
            except OSError:
                pass
            os.close(self._fd)
            self._fd = None

    def discard(self) -> None:
        """Remove the directory if this command created it (call on failure, lock held):
        a refused or failed first command leaves the file system as it was."""
        if self.created:
            shutil.rmtree(self.run_dir, ignore_errors=True)
