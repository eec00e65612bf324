"""When training stops and why: limits, the clock, early stopping and signals, in one process
(tests/test_distributed.py covers agreement between ranks)."""

import os
import signal
import types
from pathlib import Path

import pytest
import torch

import tinyt.stopping as stopping_module
from tinyt.config import TrainConfig
from tinyt.distributed import World
from tinyt.stopping import StopConditions, TrainingInterrupted
from tinyt.training import Progress

CPU = torch.device("cpu")


def stops_for(**train) -> StopConditions:
    return StopConditions(TrainConfig(**train), World(), CPU)


@pytest.fixture
def clock(monkeypatch):
    """A clock the test moves by hand: `clock["now"] += seconds`."""
    now = {"now": 0.0}
    monkeypatch.setattr(stopping_module, "time",
                        types.SimpleNamespace(monotonic=lambda: now["now"]))
    return now


def test_a_run_that_reached_a_limit_is_finished_before_training():
    assert (stops_for(max_steps=12).before_training(Progress(step=12))
            == "already finished (reached train.max_steps=12); nothing more to train")
    assert stops_for(max_steps=12).before_training(Progress(step=11)) is None
    assert (stops_for(max_epochs=2).before_training(Progress(epoch=2))
            == "already finished (reached train.max_epochs=2); nothing more to train")
    assert (stops_for(early_stopping=3).limit_reached(Progress(validations_since_best=3))
            == "no improvement in 3 validations (train.early_stopping)")
    assert stops_for().before_training(Progress(step=10**6, validations_since_best=99)) is None


def test_max_steps_comes_before_the_clock(clock):
    stops = stops_for(max_steps=5, max_minutes=1.0)
    assert stops.after_update(Progress(step=4)) is None
    clock["now"] = 61.0
    assert stops.after_update(Progress(step=4)) == "reached train.max_minutes=1"
    assert stops.after_update(Progress(step=5)) == "reached train.max_steps=5"
    assert stops.interrupted_by is None


def test_the_time_budget_starts_with_the_stop_conditions(clock):
    clock["now"] = 1000.0  # a resumed run gets a new budget
    stops = stops_for(max_minutes=0.5)
    clock["now"] = 1029.0
    assert stops.after_update(Progress(step=1)) is None
    clock["now"] = 1030.0
    assert stops.after_update(Progress(step=2)) == "reached train.max_minutes=0.5"


def test_after_a_validation_early_stopping_then_the_clock(clock):
    stops = stops_for(early_stopping=2, max_minutes=1.0)
    assert stops.after_validation(Progress(validations_since_best=1)) is None
    clock["now"] = 60.0  # ran out while validating
    assert (stops.after_validation(Progress(validations_since_best=1))
            == "reached train.max_minutes=1")
    assert (stops.after_validation(Progress(validations_since_best=2))
            == "no improvement in 2 validations (train.early_stopping)")


def test_epochs_end_the_run_only_when_all_are_done():
    stops = stops_for(max_epochs=3)
    assert stops.after_epoch(Progress(epoch=2)) is None
    assert stops.after_epoch(Progress(epoch=3)) == "reached train.max_epochs=3"


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_a_signal_marks_the_run_interrupted_and_the_handlers_come_back(sig):
    before = signal.getsignal(sig)
    stops = stops_for(max_steps=100)
    with stops.catching_signals():
        assert stops.after_update(Progress(step=1)) is None and stops.interrupted_by is None
        os.kill(os.getpid(), sig)  # handled at once: the main thread is running Python code
        assert stops.after_update(Progress(step=2)) is None
        assert stops.interrupted_by == sig
    assert signal.getsignal(sig) is before


def test_training_interrupted_says_how_to_continue():
    message = str(TrainingInterrupted(signal.SIGTERM, 7, Path("runs/x")))
    assert message == ("SIGTERM: stopped after step 7, saved runs/x/last.pt; "
                       "continue with: tinyt train --resume runs/x")
