"""train.log's sinks: TensorBoard events that match metrics.jsonl, resume and --overwrite
without stale or repeated steps, one-line config errors, and a failing writer that never costs
the run its training."""

from __future__ import annotations

import errno
import json
import shutil
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from tinyt.cli import app
from tinyt.config import ConfigError, config_from_dict
from tinyt.training import train

pytest.importorskip("tensorboard")
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator  # noqa: E402

VALID_TAGS = {"valid/loss": "valid_loss", "valid/ppl": "valid_ppl", "valid/bleu": "valid_bleu"}
TRAIN_TAGS = ("train/loss", "train/lr", "train/tokens_per_s")


@pytest.fixture
def raw(module_small_corpus, tmp_path, tiny_config_for):
    """The tiny config with TensorBoard on: 8 steps, a progress update every 2, a validation
    every 4, no final test evaluation (nothing here needs it)."""
    config = tiny_config_for(module_small_corpus, tmp_path / "run")
    config["train"].update(max_steps=8, valid_every=4, log_every=2, final_eval=False,
                           log=["jsonl", "tensorboard"])
    return config


def events(run_dir: Path, purge: bool = True) -> dict[str, list[tuple[int, float]]]:
    """Every scalar tag's (step, value) pairs, as TensorBoard shows them (purge: True) or as
    the event files hold them, stale events included (purge: False)."""
    accumulator = EventAccumulator(str(run_dir / "tensorboard"), purge_orphaned_data=purge)
    accumulator.Reload()
    return {tag: [(e.step, e.value) for e in accumulator.Scalars(tag)]
            for tag in accumulator.Tags()["scalars"]}


def metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def assert_events_match_metrics(run_dir: Path, progress_steps: list[int]) -> None:
    """Validation scalars are metrics.jsonl's values at its steps; progress scalars come at
    every train.log_every step; no step is there twice."""
    scalars, records = events(run_dir), metrics(run_dir)
    for tag, key in VALID_TAGS.items():
        assert [step for step, _ in scalars[tag]] == [r["step"] for r in records], tag
        for (_, value), record in zip(scalars[tag], records):
            assert value == pytest.approx(record[key], rel=1e-6), (tag, record)  # float32
    for tag in TRAIN_TAGS:
        assert [step for step, _ in scalars[tag]] == progress_steps, tag
        assert all(value > 0 for _, value in scalars[tag]), tag


def test_tensorboard_events_equal_metrics_jsonl(raw):
    train(config_from_dict(raw), progress_bars=False)
    run_dir = Path(raw["run_dir"])
    assert [r["step"] for r in metrics(run_dir)] == [4, 8]
    assert_events_match_metrics(run_dir, progress_steps=[2, 4, 6, 8])


def test_resume_replaces_the_steps_after_the_checkpoint_and_overwrite_clears(raw, tmp_path):
    run_dir = Path(raw["run_dir"])
    train(config_from_dict(raw), progress_bars=False)
    shutil.copy(run_dir / "last.pt", tmp_path / "last-8.pt")
    raw["train"]["max_steps"] = 12
    train(config_from_dict(raw), resume=True, progress_bars=False)
    assert_events_match_metrics(run_dir, progress_steps=[2, 4, 6, 8, 10, 12])

    # A run killed at step 12 after logging but before saving: last.pt is still step 8's, so
    # the resume redoes steps 9-12 and their events are written again. The event files now
    # hold steps 10 and 12 twice; TensorBoard shows each once, the resumed run's.
    shutil.copy(tmp_path / "last-8.pt", run_dir / "last.pt")
    train(config_from_dict(raw), resume=True, progress_bars=False)
    stale = [step for step, _ in events(run_dir, purge=False)["train/loss"]]
    assert stale.count(12) == 2
    assert_events_match_metrics(run_dir, progress_steps=[2, 4, 6, 8, 10, 12])

    # --overwrite starts the events over, and a new run without TensorBoard leaves none.
    raw["train"]["max_steps"] = 4
    train(config_from_dict(raw), overwrite=True, progress_bars=False)
    assert len(list((run_dir / "tensorboard").iterdir())) == 1
    assert_events_match_metrics(run_dir, progress_steps=[2, 4])
    raw["train"]["log"] = ["jsonl"]
    train(config_from_dict(raw), overwrite=True, progress_bars=False)
    assert not (run_dir / "tensorboard").exists()


def test_a_tensorboard_folder_is_a_trained_run(raw):
    train(config_from_dict(raw), progress_bars=False)
    run_dir = Path(raw["run_dir"])
    for name in ("last.pt", "best.pt", "metrics.jsonl"):
        (run_dir / name).unlink()
    shutil.rmtree(run_dir / "tokenizer")
    for old in run_dir.glob("ckpt-*.pt"):
        old.unlink()
    with pytest.raises(Exception, match=r"already holds a run \(tensorboard/\)"):
        train(config_from_dict(raw), progress_bars=False)


# -- config errors ----------------------------------------------------------------------------


@pytest.mark.parametrize("log, words", [
    (["jsonl", "wandb"], ["train.log", "unknown sink 'wandb'", "jsonl, tensorboard"]),
    (["tensorboard"], ["train.log", "without jsonl", "add jsonl"]),
    ([], ["train.log", "without jsonl"]),
    (["jsonl", "tensorboard", "jsonl"], ["train.log", "jsonl twice"]),
    ("tensorboard", ["train.log must be a list"]),
])
def test_bad_log_lists_are_one_line_config_errors(raw, log, words):
    raw["train"]["log"] = log
    with pytest.raises(ConfigError) as caught:
        config_from_dict(raw)
    message = str(caught.value)
    assert "\n" not in message
    for word in words:
        assert word in message, (word, message)


def test_default_log_is_jsonl_alone(raw):
    del raw["train"]["log"]
    assert config_from_dict(raw).train.log == ["jsonl"]


def test_tensorboard_missing_is_a_config_error_before_anything_is_written(
        raw, tmp_path, monkeypatch, write_config):
    # A None entry in sys.modules is how Python spells "not installed": find_spec gives None
    # and an import raises ImportError.
    monkeypatch.setitem(sys.modules, "tensorboard", None)
    with pytest.raises(ConfigError, match=r"pip install 'tinyt\[tensorboard\]'"):
        config_from_dict(raw)
    # A finished run's config still loads where TensorBoard is missing (translate, info).
    assert config_from_dict(raw, check_paths=False).train.log == ["jsonl", "tensorboard"]

    path = write_config(raw, tmp_path / "tb.yaml")
    for args in (["config", "validate", path], ["train", "--config", path]):
        result = CliRunner().invoke(app, [str(a) for a in args])
        assert result.exit_code == 2, result.output
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
        assert "train.log" in lines[0] and "pip install 'tinyt[tensorboard]'" in lines[0]
    assert not Path(raw["run_dir"]).exists()


# -- a failing writer -------------------------------------------------------------------------


def assert_run_complete(run_dir: Path) -> None:
    assert [r["step"] for r in metrics(run_dir)] == [4, 8]
    for name in ("last.pt", "best.pt", "ckpt-4.pt", "ckpt-8.pt"):
        assert (run_dir / name).is_file(), name


def warnings_in(stderr: str) -> list[str]:
    assert "Traceback" not in stderr, stderr
    return [line for line in stderr.splitlines() if line.startswith("warning:")]


def test_a_failing_add_scalar_warns_once_and_training_carries_on(raw, monkeypatch, capsys):
    from torch.utils.tensorboard import SummaryWriter

    calls = []

    def add_scalar(self, tag, value, global_step=None, **kwargs):
        calls.append(global_step)
        if global_step >= 4:
            raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(SummaryWriter, "add_scalar", add_scalar)
    train(config_from_dict(raw), progress_bars=False)
    assert_run_complete(Path(raw["run_dir"]))
    (warning,) = warnings_in(capsys.readouterr().err)
    assert "is off for the rest of this run" in warning and "No space left on device" in warning
    assert max(calls) == 4  # nothing written after the failure


@pytest.mark.filterwarnings("error::pytest.PytestUnhandledThreadExceptionWarning")
def test_a_full_disk_in_tensorboards_writer_thread_warns_without_a_traceback(
        raw, monkeypatch, capsys):
    # TensorBoard writes its records in a thread of its own: the disk filling up there kills
    # that thread, which must be one warning line, not a thread's traceback.
    from tensorboard.summary.writer.record_writer import RecordWriter

    real_write, written = RecordWriter.write, []

    def write(self, data):
        written.append(data)
        if len(written) > 6:  # past the writer's opening events and a few scalars
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_write(self, data)

    monkeypatch.setattr(RecordWriter, "write", write)
    train(config_from_dict(raw), progress_bars=False)
    assert_run_complete(Path(raw["run_dir"]))
    (warning,) = warnings_in(capsys.readouterr().err)
    assert "No space left on device" in warning


def test_a_file_in_place_of_the_event_folder_warns_and_trains(raw, capsys):
    run_dir = Path(raw["run_dir"])
    run_dir.mkdir()
    (run_dir / "tensorboard").write_text("not a folder")
    train(config_from_dict(raw), progress_bars=False)
    assert_run_complete(run_dir)
    (warning,) = warnings_in(capsys.readouterr().err)
    assert "is off for the rest of this run" in warning and str(run_dir / "tensorboard") in warning
