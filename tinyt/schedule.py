"""The learning-rate schedule: linear warmup, then ReduceLROnPlateau on the validation loss.

This is the one place that sets the optimizer's learning rate. Updates are numbered from 1.
Update t <= train.warmup_steps runs at train.lr * t / warmup_steps, so the last warmup update
runs at train.lr itself. From then on the rate only falls: torch's ReduceLROnPlateau multiplies
it by train.plateau_factor (never below train.min_lr) once the validation loss has not
improved for more than train.plateau_patience validations. Validations during warmup are not
shown to the plateau: a rate that is still rising is not stuck.
"""

from __future__ import annotations

from typing import Any

import torch

from tinyt.config import TrainConfig


class LearningRateSchedule:
    """Warmup then plateau for one optimizer (every parameter group gets the same rate).

    Its state (`state_dict`) is the plateau scheduler's: where warmup stands follows from the
    step, and the rate itself lives in the optimizer's state.
    """

    def __init__(self, optimizer: torch.optim.Optimizer, train: TrainConfig):
        self.optimizer = optimizer
        self.peak_lr = train.lr
        self.warmup_steps = train.warmup_steps
        if self.warmup_steps:
            # The rate of update 1 from the start, before the plateau scheduler records the
            # optimizer's rates (its state, saved in checkpoints, holds them).
            self._set(self._warmup_lr(1))
        self.plateau = torch.optim.lr_scheduler.ReduceLROnPlateau(
            optimizer, mode="min", factor=train.plateau_factor, patience=train.plateau_patience,
            min_lr=train.min_lr)

    def _warmup_lr(self, step: int) -> float:
        return self.peak_lr * step / self.warmup_steps

    def in_warmup(self, step: int) -> bool:
        return step <= self.warmup_steps

    def _set(self, lr: float) -> None:
        for group in self.optimizer.param_groups:
            group["lr"] = lr

    def start_update(self, step: int) -> None:
        """Set the rate of update `step` (1-based), before it is taken."""
        if self.in_warmup(step):
            self._set(self._warmup_lr(step))

    def validated(self, step: int, valid_loss: float) -> None:
        """Tell the plateau scheduler the validation loss after update `step`."""
        if not self.in_warmup(step):
            self.plateau.step(valid_loss)

    @property
    def lr(self) -> float:
        """The rate the optimizer uses now."""
        return self.optimizer.param_groups[0]["lr"]

    def state_dict(self) -> dict[str, Any]:
        return self.plateau.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.plateau.load_state_dict(state)
