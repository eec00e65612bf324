"""A run directory: its layout, its ownership (one writer at a time), what in it counts as a
trained run, what makes it resumable, and the temporary files a killed writer leaves behind.

A run directory holds:
    config.yaml            the resolved config the run was trained with
    tokenizer/             SentencePiece model(s) and meta.json (tinyt.tokenizer)
    data/                  the held-out valid/test splits and their record (tinyt.data)
    cache/                 derived files (the corpus as Arrow, token ids): rebuilt at will
    best.pt, last.pt       checkpoints: best validation loss, latest state (tinyt.checkpoint)
    ckpt-STEP.pt           weights of the last `train.keep_checkpoints` validations
    averaged.pt            their average, written by `tinyt average`
    metrics.jsonl          one JSON line per validation, none after last.pt's step
    tensorboard/           TensorBoard event files, with train.log [jsonl, tensorboard]
    evaluations.jsonl, translations/   what `tinyt evaluate` wrote
It is resumable when last.pt loads, the config keeps the model, vocabulary and data last.pt was
trained with, and the tokenizer that wrote it is still there (`check_resumable`).

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
from typing import Any

from tinyt.checkpoint import load_checkpoint
from tinyt.config import Config
from tinyt.errors import TinytError
from tinyt.tokenizer import Tokenizers
from tinyt.writing import atomic_write_text, write_error

LOCK_NAME = ".tinyt.lock"
# Files and folders that only training, evaluation or averaging produce: any one of them means
# the directory holds a run that a new `tinyt train` must not silently replace.
TRAINED_FILES = ("last.pt", "best.pt", "averaged.pt", "metrics.jsonl", "evaluations.jsonl")
TRAINED_FOLDERS = ("tokenizer", "translations", "tensorboard")


def trained_artefacts(run_dir: Path) -> list[str]:
    """Names of the trained artefacts in `run_dir` (empty: nothing a new run would lose)."""
    found = [name for name in TRAINED_FILES if (run_dir / name).exists()]
    found += sorted(p.name for p in run_dir.glob("ckpt-*.pt"))
    found += [name + "/" for name in TRAINED_FOLDERS
              if (run_dir / name).is_dir() and any((run_dir / name).iterdir())]
    return found


def check_can_train(config: Config, resume: bool, overwrite: bool) -> None:
    """Refuse, before anything is written, a `tinyt train` that would misuse the run in
    `config.run_dir`: a resume needs a resumable run, and a new run a directory without a
    trained run in it, unless --overwrite gives that one up."""
    run_dir = Path(config.run_dir)
    if resume:
        check_resumable(config)
        return
    held = trained_artefacts(run_dir)
    if held and not overwrite:
        raise TinytError(f"run directory {run_dir} already holds a run ({', '.join(held[:4])}"
                         f"{', …' if len(held) > 4 else ''}); pass --resume to continue it, "
                         "--overwrite to start over, or --run-dir for a new one")


def clear_trained_state(run_dir: Path) -> None:
    """--overwrite: remove the old run's results (the tokenizer is kept, and reused when the
    new config and data would train the same one)."""
    for name in TRAINED_FILES:
        (run_dir / name).unlink(missing_ok=True)
    for old in run_dir.glob("ckpt-*.pt"):
        old.unlink()
    shutil.rmtree(run_dir / "translations", ignore_errors=True)
    shutil.rmtree(run_dir / "tensorboard", ignore_errors=True)  # events of the old run's steps


# -- resuming ----------------------------------------------------------------------------------

# What a resumed run may not change: the model's shape, the vocabulary and which pairs it trains
# on. Limits, schedule, decoding and where the data lives (data.dir) may change with --set.
_DATA_KEYS_FREE_ON_RESUME = ("dir", "num_proc", "stream_buffer")


def _changed_on_resume(saved: dict[str, Any], config: Config) -> list[str]:
    """Keys of `config` that differ from the checkpoint's config in what a resume must keep.
    A key the checkpoint's config lacks came with a later tinyt: the run used its default."""
    now = config.to_dict()
    changed = []
    for section in ("model", "tokenizer", "data"):
        before = saved.get(section, {})
        for key in sorted(set(now[section]) & set(before)):
            if section == "data" and key in _DATA_KEYS_FREE_ON_RESUME:
                continue
            if now[section][key] != before[key]:
                changed.append(f"{section}.{key}")
    # Where a fine-tuned run started from is its history, not a setting (tinyt.finetuning); a
    # checkpoint from before these keys existed started from nothing.
    started_from = {"init_from": None, "init_checkpoint": "best.pt", **saved.get("train", {})}
    for key in ("init_from", "init_checkpoint"):
        if now["train"][key] != started_from[key]:
            changed.append(f"train.{key}")
    return changed


def check_resumable(config: Config) -> dict[str, Any]:
    """Everything a resume needs, checked before anything is written: last.pt loads, the
    config keeps the model, vocabulary and data it was trained with, and the tokenizer that
    wrote the checkpoint is still there. Returns last.pt's payload."""
    run_dir = Path(config.run_dir)
    last = run_dir / "last.pt"
    if not last.is_file():
        raise TinytError(f"cannot resume: {last} does not exist (a run saves it at its first "
                         "validation or train.checkpoint_every); start over with --overwrite")
    payload = load_checkpoint(last)
    changed = _changed_on_resume(payload.get("config", {}), config)
    if changed:
        raise TinytError(f"cannot resume {run_dir} with {', '.join(changed)} changed: last.pt was "
                         "trained with other values; resume without changing them, or start a "
                         "new run (--run-dir, or --overwrite)")
    tokenizers = Tokenizers.load(run_dir / "tokenizer")
    if payload.get("tokenizer_fingerprint") != tokenizers.fingerprint:
        raise TinytError(f"{last} was trained with another vocabulary than {run_dir / 'tokenizer'};"
                         " restore the run's original tokenizer/ folder, or start over")
    return payload


def trim_metrics(path: Path, step: int) -> None:
    """Drop metrics lines after `step`: a run killed between logging a validation and saving
    its checkpoint redoes that validation on resume and must not log it twice."""
    if not path.is_file():
        return
    kept = []
    for number, raw in enumerate(path.read_bytes().split(b"\n"), 1):
        try:
            line = raw.decode("utf-8")
        except UnicodeDecodeError:  # tinyt writes ASCII JSON: this is damage, not a kill
            raise TinytError(f"{path} line {number} is not UTF-8 text (the file is damaged); "
                             "delete that line, then resume") from None
        try:
            if json.loads(line)["step"] <= step:
                kept.append(line)
        except (json.JSONDecodeError, KeyError, TypeError):
            continue  # a line cut short by the kill
    atomic_write_text(path, "".join(line + "\n" for line in kept))


# -- temporary files and the lock ---------------------------------------------------------------


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


# -- metrics.jsonl ----------------------------------------------------------------------------

def no_validations() -> dict[str, Any]:
    """`metrics_summary` of a run that has not validated yet."""
    return {"validations": 0, "last_step": None,
            "best_valid_loss": None, "best_valid_loss_step": None,
            "best_valid_bleu": None, "best_valid_bleu_step": None}


def metrics_summary(path: Path) -> dict[str, Any]:
    """Best validation loss and BLEU, and their steps, from a run's metrics.jsonl (lines that
    cannot be read, e.g. one cut short by a kill, are skipped)."""
    summary = no_validations()
    if not path.is_file():
        return summary
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        try:
            record = json.loads(line)
            step, loss = int(record["step"]), float(record["valid_loss"])
        except (json.JSONDecodeError, KeyError, TypeError, ValueError):
            continue
        summary["validations"] += 1
        summary["last_step"] = step
        if summary["best_valid_loss"] is None or loss < summary["best_valid_loss"]:
            summary["best_valid_loss"], summary["best_valid_loss_step"] = loss, step
        bleu = record.get("valid_bleu")
        if isinstance(bleu, (int, float)) and (summary["best_valid_bleu"] is None
                                               or bleu > summary["best_valid_bleu"]):
            summary["best_valid_bleu"], summary["best_valid_bleu_step"] = float(bleu), step
    return summary
