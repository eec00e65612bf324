"""The learning-rate schedule: linear warmup, then ReduceLROnPlateau, and its checkpointed state."""

import pytest
import torch

from tinyt.config import TrainConfig
from tinyt.schedule import LearningRateSchedule


def schedule_for(**train) -> LearningRateSchedule:
    optimizer = torch.optim.Adam([torch.nn.Parameter(torch.zeros(2))], lr=train.get("lr", 1e-3))
    return LearningRateSchedule(optimizer, TrainConfig(**train))


def test_warmup_rises_linearly_to_the_peak_then_leaves_the_rate_alone():
    schedule = schedule_for(lr=0.01, warmup_steps=4)
    assert schedule.lr == pytest.approx(0.0025)  # update 1's rate, before it is taken
    rates = []
    for step in range(1, 7):
        schedule.start_update(step)
        rates.append(schedule.lr)
    assert rates == pytest.approx([0.0025, 0.005, 0.0075, 0.01, 0.01, 0.01])


def test_without_warmup_the_rate_starts_at_the_peak():
    schedule = schedule_for(lr=0.01, warmup_steps=0)
    schedule.start_update(1)
    assert schedule.lr == 0.01


def test_the_plateau_lowers_the_rate_only_after_warmup_and_never_below_min_lr():
    schedule = schedule_for(lr=0.01, warmup_steps=4, plateau_patience=1, plateau_factor=0.5,
                            min_lr=0.004)
    for step in range(1, 5):
        schedule.start_update(step)
        schedule.validated(step, 5.0)  # no improvement, but still warming up: not counted
    assert schedule.lr == 0.01
    losses = [3.0, 3.0, 3.0, 3.0, 3.0, 3.0]  # the first improves, the rest do not
    rates = []
    for step, loss in enumerate(losses, start=5):
        schedule.start_update(step)
        schedule.validated(step, loss)
        rates.append(schedule.lr)
    assert rates == pytest.approx([0.01, 0.01, 0.005, 0.005, 0.004, 0.004])


def test_state_round_trip_continues_the_same_schedule():
    first = schedule_for(lr=0.01, warmup_steps=2, plateau_patience=0)
    for step, loss in enumerate([4.0, 3.9, 3.0, 3.5], start=1):  # warmup, warmup, best, worse
        first.start_update(step)
        first.validated(step, loss)
    second = schedule_for(lr=0.01, warmup_steps=2, plateau_patience=0)
    second.optimizer.load_state_dict(first.optimizer.state_dict())  # the rate lives there
    second.load_state_dict(first.state_dict())
    assert second.state_dict() == first.state_dict() and second.lr == pytest.approx(0.005)
    for schedule in (first, second):
        schedule.start_update(5)
        schedule.validated(5, 3.4)  # worse than the best, 3.0, again
    assert second.lr == first.lr == pytest.approx(0.0025)
