"""Kills, signals, bad updates, interrupted saves and hostile input never lose or corrupt work."""

import errno
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import tinyt.checkpoint as checkpoint_module
from tinyt.checkpoint import load_checkpoint, save_checkpoint
from tinyt.config import config_from_dict
from tinyt.errors import TinytError
from tinyt.loading import load_translator
from tinyt.model import Transformer
from tinyt.training import train
from tinyt.translation import Translator

REPO = Path(__file__).resolve().parents[1]


def long_run_config(tiny_config_for, data_dir: Path, run_dir: Path) -> dict:
    """Long enough (a few seconds) to be killed mid-way; a checkpoint every 7 steps."""
    raw = tiny_config_for(data_dir, run_dir)
    raw["train"].update(max_epochs=100, max_steps=240, batch_tokens=256, checkpoint_every=7,
                        valid_every=50, valid_bleu=False, log_every=5)
    return raw


def tinyt_cli(*args, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "tinyt", *map(str, args)], cwd=REPO,
                          capture_output=True, text=True, timeout=600, **kwargs)


def start_training(config_path: Path) -> subprocess.Popen:
    """`tinyt train` in the background, its stdout and stderr going to temporary files (read
    them with `finished_output`). Not pipes: nobody reads a pipe while the test waits for the
    run's progress, and progress bars write on a timer, so on a slow or busy machine the
    output could fill a pipe and block the run before it got where the test waits for it."""
    stdout, stderr = tempfile.TemporaryFile("w+"), tempfile.TemporaryFile("w+")
    proc = subprocess.Popen([sys.executable, "-m", "tinyt", "train", "--config", str(config_path)],
                            cwd=REPO, stdout=stdout, stderr=stderr, text=True)
    proc.output_files = (stdout, stderr)
    return proc


def finished_output(proc: subprocess.Popen, timeout: float = 600) -> tuple[str, str]:
    """Wait for a run from `start_training` to end; its (stdout, stderr)."""
    proc.wait(timeout=timeout)
    texts = []
    for file in proc.output_files:
        file.seek(0)
        texts.append(file.read())
        file.close()
    return texts[0], texts[1]


def checkpoint_step(run_dir: Path) -> int:
    """The step last.pt reports, or -1 before the first one."""
    try:
        return load_checkpoint(run_dir / "last.pt")["progress"]["step"]
    except (FileNotFoundError, TinytError):
        return -1


def freeze_when(proc: subprocess.Popen, condition) -> None:
    """Let the run go on until `condition()` holds, then freeze it with SIGSTOP (the caller
    kills it, or signals it and sends SIGCONT). The moment is set by the run's own progress,
    never by the clock: `condition` is checked again once the process is frozen, so it holds
    while the process stays stopped, however fast or slow the machine."""
    while True:
        if proc.poll() is not None:
            raise AssertionError(f"the run ended before it could be stopped: "
                                 f"{finished_output(proc)}")
        if condition():
            proc.send_signal(signal.SIGSTOP)
            if condition():
                return
            proc.send_signal(signal.SIGCONT)
        time.sleep(0.002)


def same_weights(a: Path, b: Path) -> None:
    ca, cb = load_checkpoint(a), load_checkpoint(b)
    for key in ("step", "epoch", "batch_in_epoch", "best_valid_loss", "best_step"):
        assert ca["progress"][key] == cb["progress"][key], key
    assert ca["model"].keys() == cb["model"].keys()
    for name, tensor in ca["model"].items():
        assert torch.equal(tensor, cb["model"][name]), name
    if "optimizer" in ca:  # last.pt; best.pt holds weights only
        for (_, sa), (_, sb) in zip(sorted(ca["optimizer"]["state"].items()),
                                    sorted(cb["optimizer"]["state"].items())):
            assert torch.equal(sa["exp_avg_sq"], sb["exp_avg_sq"])


@pytest.fixture(scope="module")
def reference_run(module_small_corpus, tiny_config_for, write_config, tmp_path_factory):
    """The uninterrupted run every interrupted one must reproduce bit for bit."""
    root = tmp_path_factory.mktemp("reference")
    raw = long_run_config(tiny_config_for, module_small_corpus, root / "run")
    result = tinyt_cli("train", "--config", write_config(raw, root / "config.yaml"))
    assert result.returncode == 0, result.stderr[-2000:]
    return root / "run"


@pytest.mark.parametrize("seed", [0, 1])
def test_sigkill_at_a_random_moment_then_resume_gives_the_same_weights(
        seed, reference_run, module_small_corpus, tiny_config_for, write_config, tmp_path):
    run_dir = tmp_path / "run"
    config = write_config(long_run_config(tiny_config_for, module_small_corpus, run_dir),
                          tmp_path / "config.yaml")
    # Killed wherever it is once a checkpoint at or after a random step has been written
    # (a save cut short midway is test_interrupted_save_leaves_the_previous_checkpoint_loadable).
    target = random.Random(seed).randint(1, 150)
    proc = start_training(config)
    freeze_when(proc, lambda: checkpoint_step(run_dir) >= target)
    proc.kill()
    finished_output(proc)
    assert proc.returncode == -signal.SIGKILL
    killed_at = load_checkpoint(run_dir / "last.pt")["progress"]["step"]
    assert 0 < killed_at < 240
    result = tinyt_cli("train", "--resume", run_dir)
    assert result.returncode == 0, result.stderr[-2000:]
    same_weights(reference_run / "last.pt", run_dir / "last.pt")
    same_weights(reference_run / "best.pt", run_dir / "best.pt")
    steps = [json.loads(line)["step"] for line in (run_dir / "metrics.jsonl").open()]
    assert steps == [50, 100, 150, 200, 240]


@pytest.mark.parametrize("sig,code", [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_signal_finishes_the_step_saves_and_exits(
        sig, code, module_small_corpus, tiny_config_for, write_config, tmp_path):
    run_dir = tmp_path / "run"
    raw = long_run_config(tiny_config_for, module_small_corpus, run_dir)
    raw["train"]["checkpoint_every"] = 1000  # only the signal and validations save
    raw["train"]["valid_every"] = 20
    config = write_config(raw, tmp_path / "config.yaml")
    proc = start_training(config)
    freeze_when(proc, lambda: checkpoint_step(run_dir) >= 1)
    first = checkpoint_step(run_dir)
    proc.send_signal(sig)  # delivered when the frozen process goes on
    proc.send_signal(signal.SIGCONT)
    _, stderr = finished_output(proc, timeout=60)
    assert proc.returncode == code, stderr[-2000:]
    assert f"tinyt train --resume {run_dir}" in stderr
    stopped = load_checkpoint(run_dir / "last.pt")["progress"]["step"]
    assert first <= stopped < 240
    result = tinyt_cli("train", "--resume", run_dir)
    assert result.returncode == 0, result.stderr[-2000:]
    final = load_checkpoint(run_dir / "last.pt")
    assert final["progress"]["step"] == 240


def small_trainer_config(data_dir: Path, run_dir: Path, tiny_config_for, **train) -> object:
    raw = tiny_config_for(data_dir, run_dir)
    raw["train"].update({"max_epochs": 100, "valid_bleu": False, "valid_every": 1000, **train})
    return config_from_dict(raw)


def poison_logits(monkeypatch, bad_steps):
    """Make the model's training-mode logits NaN on the given (1-based) training steps."""
    calls = {"n": 0}
    original = Transformer.logits

    def logits(self, hidden):
        out = original(self, hidden)
        if self.training:
            calls["n"] += 1
            if bad_steps(calls["n"]):
                out = out * float("nan")
        return out

    monkeypatch.setattr(Transformer, "logits", logits)


def test_nonfinite_updates_are_skipped_and_counted(small_corpus, tiny_config_for, tmp_path,
                                                   monkeypatch):
    config = small_trainer_config(small_corpus, tmp_path / "run", tiny_config_for, max_steps=30)
    poison_logits(monkeypatch, lambda step: step in (5, 6, 7))
    summary = train(config, progress_bars=False)
    assert summary["steps"] == 30 and summary["nonfinite_steps"] == 3
    last = load_checkpoint(tmp_path / "run" / "last.pt")
    assert last["progress"]["nonfinite_steps"] == 3
    assert all(torch.isfinite(t).all() for t in last["model"].values())
    for state in last["optimizer"]["state"].values():
        assert torch.isfinite(state["exp_avg"]).all() and torch.isfinite(state["exp_avg_sq"]).all()
    metrics = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").open()]
    assert metrics[-1]["nonfinite_steps"] == 3 and metrics[-1]["valid_loss"] < 100


def test_persistent_nonfinite_loss_stops_and_keeps_the_last_good_checkpoint(
        small_corpus, tiny_config_for, tmp_path, monkeypatch):
    config = small_trainer_config(small_corpus, tmp_path / "run", tiny_config_for,
                                  max_steps=100, checkpoint_every=5, max_nonfinite_steps=4)
    poison_logits(monkeypatch, lambda step: step > 12)
    with pytest.raises(TinytError, match="non-finite"):
        train(config, progress_bars=False)
    last = load_checkpoint(tmp_path / "run" / "last.pt")
    assert last["progress"]["step"] == 15  # the checkpoint at step 15 had 3 bad steps: allowed
    assert all(torch.isfinite(t).all() for t in last["model"].values())


def test_interrupted_save_leaves_the_previous_checkpoint_loadable(tmp_path, monkeypatch):
    path = tmp_path / "last.pt"
    save_checkpoint({"model": {"w": torch.ones(3)}, "progress": {"step": 1}}, path)
    real_save = torch.save

    def save_half_then_die(obj, f):
        f.write(b"PK\x03\x04 half a checkpoint")
        raise KeyboardInterrupt  # as if killed mid-write

    monkeypatch.setattr(checkpoint_module.torch, "save", save_half_then_die)
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint({"model": {"w": torch.zeros(3)}, "progress": {"step": 2}}, path)
    monkeypatch.setattr(checkpoint_module.torch, "save", real_save)
    loaded = load_checkpoint(path)
    assert loaded["progress"]["step"] == 1 and torch.equal(loaded["model"]["w"], torch.ones(3))


def test_disk_full_is_a_clear_error_and_keeps_the_old_checkpoint(tmp_path, monkeypatch):
    path = tmp_path / "best.pt"
    save_checkpoint({"model": {"w": torch.ones(2)}, "progress": {"step": 1}}, path)

    def disk_full(obj, f):
        f.write(b"partial")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(checkpoint_module.torch, "save", disk_full)
    with pytest.raises(TinytError, match="no space left on the device holding .*best.pt.*intact"):
        save_checkpoint({"model": {"w": torch.zeros(2)}, "progress": {"step": 2}}, path)
    assert not list(tmp_path.glob(".*.tmp"))
    monkeypatch.undo()
    assert load_checkpoint(path)["progress"]["step"] == 1


def test_truncated_foreign_and_future_checkpoints_are_clear_errors(tmp_path):
    good = tmp_path / "good.pt"
    save_checkpoint({"model": {"w": torch.randn(1000)}, "progress": {"step": 3}}, good)
    data = good.read_bytes()
    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(data[: len(data) // 2])
    with pytest.raises(TinytError, match="damaged"):
        load_checkpoint(truncated)
    future = tmp_path / "future.pt"
    torch.save({"format_version": 99, "model": {}}, future)
    with pytest.raises(TinytError, match="format version 99"):
        load_checkpoint(future)
    foreign = tmp_path / "foreign.pt"
    torch.save([1, 2, 3], foreign)
    with pytest.raises(TinytError, match="not a tinyt checkpoint"):
        load_checkpoint(foreign)


class Evil:
    def __reduce__(self):
        return (os.system, ("touch /tmp/tinyt-pwned",))


def test_a_checkpoint_cannot_execute_code(tmp_path):
    path = tmp_path / "evil.pt"
    torch.save({"format_version": 1, "model": {}, "payload": Evil()}, path)
    with pytest.raises(TinytError, match="damaged or not a tinyt checkpoint"):
        load_checkpoint(path)
    assert not Path("/tmp/tinyt-pwned").exists()


def translator_run_dir(translator) -> Path:
    return translator.run_dir


@pytest.fixture(scope="module")
def translator(module_small_corpus, tiny_config_for, tmp_path_factory):
    raw = tiny_config_for(module_small_corpus, tmp_path_factory.mktemp("tr") / "run")
    raw["model"]["max_positions"] = 64
    raw["data"]["max_len"] = 40
    raw["train"]["valid_bleu"] = False
    config = config_from_dict(raw)
    train(config, progress_bars=False)
    translator = load_translator(config.run_dir, device="cpu")
    translator.run_dir = Path(config.run_dir)
    return translator


line = st.text(alphabet=st.characters(codec="utf-8"), max_size=80)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(lines=st.lists(st.one_of(line, st.sampled_from(["", " ", "\t \t", "\x00\x07\x1b[31m",
                                                        "🐕🐕 ∂∑ 中文 ‮evil‬", "a\u2028b"])),
                      max_size=6))
def test_translate_never_fails_and_keeps_alignment(translator, lines):
    out = translator.translate(lines, beam_size=2)
    assert len(out) == len(lines)
    for src, hyp in zip(lines, out):
        assert isinstance(hyp, str) and "\n" not in hyp
        if not src.strip():
            assert hyp == ""


def test_translate_overlong_input_is_cut_with_a_warning(translator, capsys):
    long_line = " ".join(["Ein großer Hund läuft schnell"] * 200)
    out = translator.translate([long_line, "Ein Hund."], beam_size=2)
    assert len(out) == 2
    assert "cut to fit" in capsys.readouterr().err


def test_translate_thousands_of_lines(translator):
    lines = [f"Ein Mann mit {i} Hunden." if i % 7 else "" for i in range(3000)]
    out = translator.translate(lines, beam_size=1)
    assert len(out) == 3000
    assert all(out[i] == "" for i in range(0, 3000, 7))


def test_resume_trims_metrics_written_after_the_last_checkpoint(
        small_corpus, tiny_config_for, tmp_path):
    config = small_trainer_config(small_corpus, tmp_path / "run", tiny_config_for,
                                  max_steps=10, valid_every=5)
    train(config, progress_bars=False)
    metrics = tmp_path / "run" / "metrics.jsonl"
    # as if killed after logging a validation at step 15 but before its checkpoint was saved
    with open(metrics, "a") as f:
        f.write(json.dumps({"step": 15, "valid_loss": 1.0}) + "\n" + '{"step": 2')
    config.train.max_steps = 15
    train(config, resume=True, progress_bars=False)
    steps = [json.loads(x)["step"] for x in metrics.read_text().splitlines()]
    assert steps == [5, 10, 15]


def test_yaml_cannot_construct_python_objects(tmp_path):
    from tinyt.config import ConfigError, load_config

    path = tmp_path / "evil.yaml"
    path.write_text("run_dir: !!python/object/apply:os.system ['touch /tmp/tinyt-yaml-pwned']\n")
    with pytest.raises(ConfigError):
        load_config(path)
    assert not Path("/tmp/tinyt-yaml-pwned").exists()


def test_evaluate_on_a_misaligned_split_names_both_files(translator, tmp_path):
    from typer.testing import CliRunner

    from tinyt.cli import app

    (tmp_path / "bad.de").write_text("Ein Hund.\nZwei Hunde.\n", encoding="utf-8")
    (tmp_path / "bad.en").write_text("A dog.\n", encoding="utf-8")
    run_dir = translator_run_dir(translator)
    result = CliRunner().invoke(app, ["evaluate", "--run", str(run_dir), "--split", "bad",
                                      "--data-dir", str(tmp_path)])
    assert result.exit_code == 2
    assert "bad.de has 2 lines but" in result.output and "bad.en has 1" in result.output


# -- failed writes and impossible numbers lose nothing (see also tests/test_errors.py) -------


def test_weights_that_become_nonfinite_are_never_saved(small_corpus, tiny_config_for,
                                                       tmp_path, monkeypatch):
    """An update whose loss and gradients were finite can still leave infinite weights (a
    learning rate far too high): the next save refuses, and last.pt keeps the good weights."""
    config = small_trainer_config(small_corpus, tmp_path / "run", tiny_config_for,
                                  max_steps=6, checkpoint_every=1)
    real_step = torch.optim.Adam.step
    calls = {"n": 0}

    def overflowing_step(self, *args, **kwargs):
        result = real_step(self, *args, **kwargs)
        calls["n"] += 1
        if calls["n"] == 3:
            with torch.no_grad():
                self.param_groups[0]["params"][0].mul_(float("inf"))
        return result

    monkeypatch.setattr(torch.optim.Adam, "step", overflowing_step)
    with pytest.raises(TinytError, match="NaN or infinite by step 3.*lower train.lr"):
        train(config, progress_bars=False)
    last = load_checkpoint(tmp_path / "run" / "last.pt")
    assert last["progress"]["step"] == 2
    assert all(torch.isfinite(t).all() for t in last["model"].values())


def test_evaluate_into_an_unwritable_place_fails_before_decoding(translator, tmp_path,
                                                                monkeypatch):
    from tinyt.checkpoint import load_trained
    from tinyt.evaluation import evaluate_split

    config, tokenizers, model, _ = load_trained(translator_run_dir(translator))
    in_the_way = tmp_path / "results"
    in_the_way.write_text("a file where the results folder should go")

    def never(*args, **kwargs):
        raise AssertionError("decoded before checking where the results go")

    monkeypatch.setattr(Translator, "translate", never)
    with pytest.raises(TinytError, match="results.* is a file"):
        evaluate_split(config, tokenizers, model, "valid", torch.device("cpu"), in_the_way,
                       progress=False)


def test_a_large_beam_decodes_fewer_sentences_at_once(translator, monkeypatch):
    import tinyt.translation as translation_module

    sizes = []
    real_search = translation_module.beam_search

    def recording(model, src, *args, **kwargs):
        sizes.append(src.size(0))
        return real_search(model, src, *args, **kwargs)

    monkeypatch.setattr(translation_module, "beam_search", recording)
    vocab = translator.tokenizers.tgt_vocab_size
    monkeypatch.setattr(translation_module, "MAX_DECODE_SCORES", 4 * 8 * vocab)
    out = translator.translate([f"Ein Hund Nummer {i}." for i in range(10)], beam_size=8)
    assert len(out) == 10 and max(sizes) == 4 and sum(sizes) == 10
    with pytest.raises(TinytError, match="beam size 10000 is impossible"):
        translator.translate(["Ein Hund."], beam_size=10000)


def test_translate_arguments_with_invalid_utf8_become_replacement_characters(translator):
    proc = subprocess.run([sys.executable.encode(), b"-m", b"tinyt", b"translate", b"--run",
                           str(translator_run_dir(translator)).encode(), b"--beam", b"1",
                           b"Ein Hund \xff l\xe4uft.", b"Zwei Katzen."],
                          cwd=REPO, capture_output=True, timeout=600)
    assert proc.returncode == 0, proc.stderr.decode(errors="replace")[-2000:]
    assert len(proc.stdout.decode("utf-8").splitlines()) == 2
