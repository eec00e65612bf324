"""Writing files: atomic replacement, and failed writes as one line that names the path.

Everything tinyt writes goes through here. A whole file (checkpoint, bundle, config,
tokenizer model, translations, picture) is written to a temporary file beside its target,
flushed, fsynced and renamed over the target, so the target is always either the old file or
the complete new one. The temporary name is unique to the writer (`.NAME.XXXXXXXX.tmp`): two
processes saving the same path never write into one file, and a leftover from a killed
writer is recognisable by its leading dot and `.tmp` suffix.

A failed write raises a TinytError that says which path and what to do about it: "no space
left on the device holding runs/x/last.pt; free space there, then ...", "no permission to
write ...". The OSError behind it is found even when a library wrapped it: torch's zip
writer raises a RuntimeError ("unexpected pos") with the OSError only as its context, and
`datasets` wraps OSErrors in its own exceptions.
"""

from __future__ import annotations

import contextlib
import errno
import os
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, BinaryIO

from tinyt.errors import TinytError

# errno values that mean "this path cannot be written here", each with a fix the user can
# make; any other OSError while writing is reported with its own text.
_WRITE_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EACCES, errno.EPERM,
                           errno.EROFS, errno.EISDIR, errno.ENOTDIR, errno.EEXIST,
                           errno.ENAMETOOLONG, errno.ENOENT})


def find_os_error(exc: BaseException | None) -> OSError | None:
    """The first OSError carrying an errno in `exc` or the chain of exceptions behind it
    (`__cause__`, else `__context__`), or None."""
    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, OSError) and exc.errno is not None:
            return exc
        exc = exc.__cause__ or exc.__context__
    return None


def write_failure(exc: BaseException | None) -> OSError | None:
    """The OSError behind `exc` (see `find_os_error`) if it is one a user fixes where the
    file goes (no space, no permission, read-only, a file in the way), else None."""
    found = find_os_error(exc)
    return found if found is not None and found.errno in _WRITE_ERRNOS else None


def write_error(exc: OSError, path: str | Path, then: str = "run the command again",
                note: str = "") -> TinytError:
    """The one-line TinytError for an OSError met while writing `path`: what is wrong, with
    the fix for that cause (`then`: the step after the fix, e.g. "resume the run"); `note`
    is added in parentheses (e.g. that the previous file is intact)."""
    code = exc.errno
    if code in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
        what = {errno.ENOSPC: "no space left on the device holding",
                errno.EDQUOT: "your disk quota is used up on the device holding",
                errno.EFBIG: "the file system cannot hold a file as large as"}[code]
        message = f"{what} {path}; free space there (or choose another location), then {then}"
    elif code in (errno.EACCES, errno.EPERM):
        message = (f"no permission to write {path}; make its folder writable for this user or "
                   f"choose another location, then {then}")
    elif code == errno.EROFS:
        message = f"{path} is on a read-only file system; choose a writable location"
    elif code == errno.EISDIR:
        message = f"{path} is a folder; pass a file path"
    elif code == errno.ENOTDIR:
        message = f"a part of {path} is a file, not a folder; choose another path"
    elif code == errno.EEXIST:
        blocker = exc.filename or path
        message = (f"{blocker} is a file where a folder is needed to write {path}; move it or "
                   "choose another path")
    elif code == errno.ENAMETOOLONG:
        message = f"the name {path} is too long for the file system; choose a shorter path"
    elif code == errno.ENOENT:
        message = f"cannot create {path}: its folder does not exist; check the path"
    else:
        message = (f"could not write {path}: {exc.strerror or exc}; check the device, then "
                   f"{then}")
    return TinytError(message + (f" ({note})" if note else ""))


@contextlib.contextmanager
def writing(path: str | Path, then: str = "run the command again",
            note: str = "") -> Iterator[None]:
    """Turn a failed write inside the block (an OSError with an errno, also one wrapped by a
    library) into `write_error(..., path, ...)`; TinytErrors and other exceptions pass.

    For writes that cannot go through `atomic_write`: appends, caches written by `datasets`
    or pyarrow, folders of files.
    """
    try:
        yield
    except TinytError:
        raise
    except Exception as exc:
        found = write_failure(exc)
        if found is None:
            raise
        raise write_error(found, path, then, note) from exc


class _RecordingFile:
    """A binary file that remembers the OSError of a failed write or flush, for writers
    (torch's zip writer) that replace it with an exception of their own."""

    def __init__(self, f: BinaryIO):
        self._f = f
        self.error: OSError | None = None

    def write(self, data: Any) -> int:
        try:
            return self._f.write(data)
        except OSError as exc:
            self.error = exc
            raise

    def flush(self) -> None:
        try:
            self._f.flush()
        except OSError as exc:
            self.error = exc
            raise

    def __getattr__(self, name: str) -> Any:  # tell, seek, fileno, ... of the real file
        return getattr(self._f, name)


def _new_file_mode() -> int:
    """Permission bits of a newly created file under this process's umask: mkstemp makes
    0600 files, but a checkpoint or config should be as readable as any other new file."""
    try:  # Linux states the umask without changing it (no window for other threads)
        with open("/proc/self/status", encoding="ascii") as status:
            for line in status:
                if line.startswith("Umask:"):
                    return 0o666 & ~int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return 0o666 & ~mask


def _sync_folder(folder: Path) -> None:
    """fsync a folder so that a rename inside it survives a power cut (best effort)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _rename_target(path: Path) -> Path | None:
    """The path a new file may be renamed to in place of `path`: `path` itself when it is a
    regular file or does not exist; through a symbolic link, the regular file it points to
    (renaming over the link would turn it into a file); None for anything else: a folder, a
    device, a pipe, or a link to one (/dev/stdout is a link to /proc/self/fd/1)."""
    if path.is_symlink():
        resolved = Path(os.path.realpath(path))
        if resolved.parts[:2] in (("/", "proc"), ("/", "dev")) or not resolved.is_file():
            return None
        return resolved
    if path.exists() and not path.is_file():
        return None
    return path


def atomic_write(path: str | Path, write: Callable[[BinaryIO], None],
                 then: str = "run the command again", note: str = "") -> Path:
    """Write `path` atomically: `write(f)` fills a temporary binary file beside it, which is
    flushed, fsynced and renamed over `path` (missing parent folders are created).

    `path`, if it exists, must be a regular file or a link to one (then that file is
    replaced and the link kept): renaming over a device such as /dev/full, a folder or a pipe
    would replace it rather than write into it. Any failure removes the temporary file; a
    failed write raises `write_error` (`then` and `note` as there), other exceptions (a bug in
    `write`, Ctrl-C) pass unchanged. Returns `path`.
    """
    shown = Path(path)  # what messages name: the path the user knows
    path = _rename_target(shown)
    if path is None:
        kind = "a folder" if shown.is_dir() else "not a regular file"
        raise TinytError(f"{shown} is {kind}; pass the path of a file to write")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp_name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    except OSError as exc:
        raise write_error(exc, shown, then, note) from None
    tmp = Path(tmp_name)
    f = os.fdopen(fd, "wb")
    recorder = _RecordingFile(f)
    try:
        with f:
            os.fchmod(f.fileno(), _new_file_mode())
            write(recorder)  # type: ignore[arg-type]
            recorder.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as exc:
        tmp.unlink(missing_ok=True)
        if not isinstance(exc, Exception) or isinstance(exc, TinytError):
            raise
        found = recorder.error or find_os_error(exc)
        if found is not None:
            raise write_error(found, shown, then, note) from exc
        if isinstance(exc, RuntimeError) and "inline_container" in str(exc):
            # torch's zip writer failed without a Python OSError behind it (it wrote through
            # its own file handle): a write failure all the same.
            raise TinytError(f"could not write {shown}: the write failed part way; check free "
                             f"space and the device, then {then}"
                             + (f" ({note})" if note else "")) from exc
        raise
    _sync_folder(path.parent)
    return shown


def atomic_write_bytes(path: str | Path, data: bytes, then: str = "run the command again",
                       note: str = "") -> Path:
    """`atomic_write` of `data`."""
    return atomic_write(path, lambda f: f.write(data), then, note)


def atomic_write_text(path: str | Path, text: str, then: str = "run the command again",
                      note: str = "") -> Path:
    """`atomic_write` of `text` as UTF-8."""
    return atomic_write_bytes(path, text.encode("utf-8"), then, note)


def atomic_torch_save(obj: Any, path: str | Path, then: str = "run the command again",
                      note: str = "") -> Path:
    """`torch.save(obj)` through `atomic_write`: `path` is always either the old file or the
    complete new one."""
    import torch  # slow to import; the text writers above do not need it

    return atomic_write(path, lambda f: torch.save(obj, f), then, note)


def append_text(path: str | Path, text: str, then: str = "run the command again") -> None:
    """Append `text` (UTF-8) to `path`, creating it. Not atomic: a full disk can cut the last
    line short, which readers of tinyt's .jsonl files skip; the failure itself is reported as
    `write_error`."""
    path = Path(path)
    with writing(path, then):
        with open(path, "a", encoding="utf-8") as f:
            f.write(text)
            f.flush()


def check_writable_dir(path: str | Path, then: str = "run the command again",
                       create: bool = True) -> Path:
    """Make sure `path` is a folder this process can create files in, creating it (and its
    parents) if missing and `create` is set; else raise a TinytError naming the problem. Call
    it before long work whose results go there, so a bad location costs nothing.

    The test is real: a temporary file is created and removed, so it also catches a
    read-only mount, and a permission only root would bypass is not assumed.
    """
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise TinytError(f"{path} is a file, not a folder; choose a folder path (or move the "
                         "file away)")
    if not create and not path.is_dir():
        raise TinytError(f"folder {path} does not exist; create it or choose another path")
    try:
        path.mkdir(parents=True, exist_ok=True)
        fd, name = tempfile.mkstemp(dir=path, prefix=".tinyt-write-check.", suffix=".tmp")
        os.close(fd)
        os.unlink(name)
    except OSError as exc:
        raise write_error(exc, path, then) from None
    return path
