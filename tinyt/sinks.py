"""Where training's numbers go besides metrics.jsonl: the optional sinks of `train.log`.

metrics.jsonl (written by tinyt.training) is the record `tinyt plot`, `tinyt info` and
--resume read, and is always written. The sinks here are extra copies for a viewer; there is
one, `tensorboard`: event files in RUN/tensorboard/, written by torch's own
`torch.utils.tensorboard.SummaryWriter` (the `tensorboard` package, `pip install
'tinyt[tensorboard]'`).

A sink never costs the run its training: the first error of any of its writes (a full disk, a
file where its folder should be, a broken install) prints one warning line and turns that sink
off for the rest of the run, while metrics.jsonl and the checkpoints carry on.
"""

from __future__ import annotations

import errno
import sys
import threading
from pathlib import Path
from typing import Any

from tqdm import tqdm

from tinyt.config import Config

TENSORBOARD_DIR = "tensorboard"  # the event files' folder in the run directory

# The module of the thread TensorBoard's event writer does its file writes in (see
# `TensorBoardSink._quiet_writer_thread`).
_WRITER_THREAD_MODULE = "tensorboard.summary.writer.event_file_writer"


def _warn(message: str) -> None:
    """One line on stderr, above the progress bar rather than through it."""
    tqdm.write(f"warning: {message}", file=sys.stderr)


def _reason(exc: BaseException) -> str:
    """What went wrong, in a few words on one line: an OSError's own text ("No space left on
    device"), else the exception's message."""
    if isinstance(exc, OSError) and exc.errno in (errno.EEXIST, errno.ENOTDIR):
        text = "a file is where the folder should be"
    elif isinstance(exc, OSError) and exc.strerror:
        text = exc.strerror
    else:
        text = str(exc) or type(exc).__name__
    text = " ".join(text.split())
    return text if len(text) <= 200 else text[:197] + "..."


class TensorBoardSink:
    """TensorBoard scalars of one call of the training loop, written into `folder`.

    `purge_step` is the first step this call trains: an earlier call of the same run (killed
    after its last checkpoint, then resumed) may have written events from that step on, and
    SummaryWriter's purge_step makes TensorBoard discard them, so no step is shown twice.
    Every write is flushed at once: the events are on disk for TensorBoard to show while the
    run goes on, and a write error surfaces here, in the call that caused it.
    """

    def __init__(self, folder: Path, purge_step: int):
        self.folder = folder
        self._writer: Any = None
        # TensorBoard writes in a thread of its own; an error there would print a traceback
        # when that thread dies. The same error is raised again by our next flush and
        # reported as one line (`_fail`), so the thread's traceback is left out.
        self._previous_hook = threading.excepthook
        threading.excepthook = self._quiet_writer_thread
        before = set(threading.enumerate())
        error = None
        try:
            from torch.utils.tensorboard import SummaryWriter

            self._writer = SummaryWriter(log_dir=str(folder), purge_step=purge_step)
            self._writer.flush()
        except Exception as exc:  # whatever it is, it must not stop training: see the module
            error = exc
        # This writer's thread, waited for before the hook is put back (see `_restore_hook`).
        self._threads = [t for t in threading.enumerate()
                         if t not in before and type(t).__module__ == _WRITER_THREAD_MODULE]
        if error is not None:
            self._fail(error)

    def add_scalars(self, step: int, values: dict[str, float]) -> None:
        """Write each tag's value at `step` (tags as "train/loss"), and flush."""
        if self._writer is None:
            return
        try:
            for tag, value in values.items():
                self._writer.add_scalar(tag, value, global_step=step)
            self._writer.flush()
        except Exception as exc:  # see the module docstring: a sink never stops training
            self._fail(exc)

    def close(self) -> None:
        if self._writer is not None:
            writer, self._writer = self._writer, None
            try:
                writer.close()
            except Exception as exc:
                self._warn_off(exc)
        self._restore_hook()

    def _fail(self, exc: Exception) -> None:
        """Warn once and turn the sink off; the writer is closed as far as it still can be."""
        writer, self._writer = self._writer, None
        if writer is not None:
            try:
                writer.close()
            except Exception:
                pass  # the error that brought us here is the one to report
        self._warn_off(exc)
        self._restore_hook()

    def _warn_off(self, exc: BaseException) -> None:
        fix = "; pip install 'tinyt[tensorboard]'" if isinstance(exc, ImportError) else ""
        _warn(f"TensorBoard logging to {self.folder} is off for the rest of this run "
              f"({_reason(exc)}{fix}); training, metrics.jsonl and checkpoints carry on")

    def _quiet_writer_thread(self, args: threading.ExceptHookArgs) -> None:
        if type(args.thread).__module__ == _WRITER_THREAD_MODULE:
            return  # re-raised by the next write or flush, and reported there
        self._previous_hook(args)

    def _restore_hook(self) -> None:
        # A writer thread that failed may still be on its way out, about to call the hook:
        # let it finish under ours. (A closed writer has stopped its thread already.)
        for thread in self._threads:
            thread.join(timeout=1.0)
        self._threads = []
        if threading.excepthook == self._quiet_writer_thread:
            threading.excepthook = self._previous_hook


class LogSinks:
    """The extra sinks of train.log for one call of the training loop, used as a context
    manager that closes them. Rank 0 opens them; on the other ranks (and with train.log
    [jsonl]) there are none, and every call is a no-op.

    Scalars: at every progress update (train.log_every) train/loss (mean per target token
    since the previous update), train/lr and train/tokens_per_s; at every validation
    valid/loss, valid/ppl and, with train.valid_bleu, valid/bleu, at the step of its
    metrics.jsonl line and with its values.
    """

    def __init__(self, sinks: list[TensorBoardSink] | None = None):
        self.sinks = sinks or []

    @classmethod
    def open(cls, config: Config, first_step: int) -> LogSinks:
        """The sinks `config.train.log` names, for a loop whose first update is step
        `first_step` (1 for a new run; the checkpoint's step + 1 when resumed)."""
        sinks = []
        if "tensorboard" in config.train.log:
            sinks.append(TensorBoardSink(Path(config.run_dir) / TENSORBOARD_DIR, first_step))
        return cls(sinks)

    def progress(self, step: int, loss: float | None, lr: float, tokens_per_s: float) -> None:
        """A progress update; `loss` is None when every update since the last one was
        skipped (non-finite), so there is no loss to show."""
        values = {"train/lr": lr, "train/tokens_per_s": tokens_per_s}
        if loss is not None:
            values = {"train/loss": loss, **values}
        for sink in self.sinks:
            sink.add_scalars(step, values)

    def validation(self, record: dict[str, Any]) -> None:
        """A validation's metrics.jsonl record."""
        values = {"valid/loss": record["valid_loss"], "valid/ppl": record["valid_ppl"]}
        if "valid_bleu" in record:
            values["valid/bleu"] = record["valid_bleu"]
        for sink in self.sinks:
            sink.add_scalars(record["step"], values)

    def close(self) -> None:
        for sink in self.sinks:
            sink.close()

    def __enter__(self) -> LogSinks:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
