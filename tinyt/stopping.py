"""When training stops, and why: the run's limits (train.max_steps, max_minutes, max_epochs,
early_stopping) and SIGINT/SIGTERM.

Every rank gets the same answers at the same step. Steps, epochs and validation losses are the
same on every rank already; a signal or the clock can reach the ranks at different moments, so
the ranks agree on those (tinyt.distributed.any_rank) before answering. The reasons are the
lines `tinyt train` prints when it is done.
"""

from __future__ import annotations

import math
import signal
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from tinyt import distributed
from tinyt.config import TrainConfig
from tinyt.distributed import World

if TYPE_CHECKING:
    from tinyt.training import Progress


class TrainingInterrupted(Exception):
    """SIGINT/SIGTERM arrived; the current step was finished and last.pt saved."""

    def __init__(self, signum: int, step: int, run_dir: Path):
        self.signum, self.step, self.run_dir = signum, step, run_dir
        name = signal.Signals(signum).name
        super().__init__(f"{name}: stopped after step {step}, saved {run_dir / 'last.pt'}; "
                         f"continue with: tinyt train --resume {run_dir}")


class _SignalFlag:
    """While active, SIGINT and SIGTERM only set `received`, so the loop can finish its step
    and save before leaving. A second Ctrl-C falls back to the default behaviour."""

    def __init__(self):
        self.received: int | None = None
        self._previous: dict[int, Any] = {}

    def _handle(self, signum, frame):
        if self.received is not None and signum == signal.SIGINT:
            signal.default_int_handler(signum, frame)
        self.received = signum

    def __enter__(self) -> _SignalFlag:
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


class StopConditions:
    """The stopping decisions of one call of the training loop.

    The time budget (train.max_minutes) starts when this is made: a resumed run gets a new
    one. Signals are caught only inside `catching_signals()`. After each update the loop asks
    `after_update`, after each validation `after_validation`, after each complete epoch
    `after_epoch`; each returns the reason to stop, or None to go on. `after_update` also
    settles `interrupted_by`, the signal every rank stops for (None: none arrived).
    """

    def __init__(self, train: TrainConfig, world: World, device: torch.device):
        self.limits = train
        self.world = world
        self.device = device  # where the ranks' votes are reduced
        self.deadline = (time.monotonic() + train.max_minutes * 60 if train.max_minutes
                         else math.inf)
        self.interrupted_by: int | None = None
        self._signals = _SignalFlag()

    def catching_signals(self) -> _SignalFlag:
        """A context manager: inside it, SIGINT and SIGTERM only mark the run interrupted."""
        return self._signals

    # Each reason has one wording, printed by `tinyt train` and written into its summary.
    def _max_steps(self) -> str:
        return f"reached train.max_steps={self.limits.max_steps}"

    def _max_minutes(self) -> str:
        return f"reached train.max_minutes={self.limits.max_minutes:g}"

    def _max_epochs(self) -> str:
        return f"reached train.max_epochs={self.limits.max_epochs}"

    def _early_stopping(self) -> str:
        return (f"no improvement in {self.limits.early_stopping} validations "
                "(train.early_stopping)")

    def _steps_done(self, progress: Progress) -> bool:
        return bool(self.limits.max_steps) and progress.step >= self.limits.max_steps

    def _not_improving(self, progress: Progress) -> bool:
        patience = self.limits.early_stopping
        return bool(patience) and progress.validations_since_best >= patience

    def _out_of_time(self) -> bool:
        return time.monotonic() >= self.deadline

    def limit_reached(self, progress: Progress) -> str | None:
        """Which limit `progress` has reached (steps, epochs, early stopping), if any; the
        clock is not one of them."""
        if self._steps_done(progress):
            return self._max_steps()
        if progress.epoch >= self.limits.max_epochs:
            return self._max_epochs()
        if self._not_improving(progress):
            return self._early_stopping()
        return None

    def before_training(self, progress: Progress) -> str | None:
        """Why a run, resumed with this progress, must not train at all: it had reached a limit
        already (killed during its final evaluation, say). It then trains not one step past
        it and rewrites no checkpoint."""
        reason = self.limit_reached(progress)
        return None if reason is None else f"already finished ({reason}); nothing more to train"

    def after_update(self, progress: Progress) -> str | None:
        """train.max_steps or the clock. Also settles `interrupted_by`. A collective call:
        every rank makes it after every update."""
        signalled, out_of_time = distributed.any_rank(
            self.world, [self._signals.received is not None, self._out_of_time()], self.device)
        if signalled:
            # A rank that caught no signal itself reports SIGTERM.
            self.interrupted_by = self._signals.received or signal.SIGTERM
        if self._steps_done(progress):
            return self._max_steps()
        if out_of_time:
            return self._max_minutes()
        return None

    def after_validation(self, progress: Progress) -> str | None:
        """Early stopping, or the clock ran out while validating: stopping at this step saves
        validating again one step later (two near-identical checkpoints). A collective call,
        made after a validation only when `after_update` found no reason to stop."""
        if self._not_improving(progress):
            return self._early_stopping()
        if distributed.any_rank(self.world, [self._out_of_time()], self.device)[0]:
            return self._max_minutes()
        return None

    def after_epoch(self, progress: Progress) -> str | None:
        """train.max_epochs, once `progress` has completed that many epochs. Asked at an
        epoch's end, after the loop has validated and saved the epoch's last update."""
        return self._max_epochs() if progress.epoch >= self.limits.max_epochs else None
