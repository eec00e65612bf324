"""One writer per run directory, and a refused or failed command changes nothing in it:
the lock, what counts as a run, resume checks made before any write, finished runs, stale
temporary files, and at most one validation per step."""

from __future__ import annotations

import hashlib
import json
import os
import re
import signal
import subprocess
import sys
import types
from pathlib import Path

import pytest

import tinyt.rundir as rundir_module
import tinyt.stopping as stopping_module
from tinyt.checkpoint import load_checkpoint
from tinyt.config import config_from_dict
from tinyt.errors import TinytError
from tinyt.rundir import LOCK_NAME, RunDirLock, remove_stale_temporaries, trained_artefacts
from tinyt.training import Trainer, train

REPO = Path(__file__).resolve().parents[1]


def tinyt_cli(*args, cwd=REPO) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "tinyt", *map(str, args)], cwd=cwd,
                          capture_output=True, text=True, timeout=600)


def snapshot(folder: Path) -> dict[str, str]:
    """Every file under `folder` (the cache aside: derived, and rebuilt at will) with a hash
    of its bytes: equal snapshots, nothing was written, replaced or removed."""
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*"))
            if p.is_file() and "cache" not in p.relative_to(folder).parts}


def short_run(data_dir: Path, run_dir: Path, tiny_config_for, **train_keys) -> dict:
    raw = tiny_config_for(data_dir, run_dir)
    raw["train"].update({"max_epochs": 100, "max_steps": 12, "valid_every": 6,
                         "valid_bleu": False, "final_eval": False, "batch_tokens": 256,
                         **train_keys})
    return raw


@pytest.fixture(scope="module")
def finished_run(module_small_corpus, tiny_config_for, write_config, tmp_path_factory):
    """A run trained to its train.max_steps (12), and its config file; tests copy it."""
    root = tmp_path_factory.mktemp("finished")
    raw = short_run(module_small_corpus, root / "run", tiny_config_for)
    config = write_config(raw, root / "config.yaml")
    result = tinyt_cli("train", "--config", config)
    assert result.returncode == 0, result.stderr[-2000:]
    return root / "run", raw


@pytest.fixture
def run_copy(finished_run, tmp_path, write_config):
    """A private copy of `finished_run`, with its config file pointing at the copy."""
    source, raw = finished_run
    run_dir = tmp_path / "run"
    subprocess.run(["cp", "-a", str(source), str(run_dir)], check=True)
    text = (run_dir / "config.yaml").read_text(encoding="utf-8")
    (run_dir / "config.yaml").write_text(text.replace(str(source), str(run_dir)), encoding="utf-8")
    config = write_config({**raw, "run_dir": str(run_dir)}, tmp_path / "config.yaml")
    return run_dir, config


# -- the lock ------------------------------------------------------------------------------


def test_a_second_writer_is_refused_naming_the_holder_and_changes_nothing(run_copy):
    run_dir, config = run_copy
    before = snapshot(run_dir)
    with RunDirLock(run_dir, "tinyt train"):
        for args in (["train", "--config", config],
                     ["train", "--config", config, "--overwrite"],
                     ["train", "--resume", run_dir],
                     ["average", "--run", run_dir, "-n", "2"]):
            result = tinyt_cli(*args)
            assert result.returncode == 2, (args, result.stderr)
            line = result.stderr.strip()
            assert line.startswith("error:") and "\n" not in line, result.stderr
            assert f"in use by process {os.getpid()} (tinyt train)" in line
        # Readers go on while a writer holds the run.
        assert tinyt_cli("translate", "--run", run_dir, "Ein Hund.").returncode == 0
        assert tinyt_cli("info", "--run", run_dir).returncode == 0
        evaluated = tinyt_cli("evaluate", "--run", run_dir, "--split", "valid", "--beam", "1")
        assert evaluated.returncode == 0, evaluated.stderr
    after = snapshot(run_dir)
    assert {k: v for k, v in after.items() if not k.startswith(("evaluations", "translations"))} \
        == before
    assert not (run_dir / LOCK_NAME).exists()  # released and removed by its holder


def test_two_trainings_started_together_one_runs_one_is_refused(
        module_small_corpus, tiny_config_for, write_config, tmp_path):
    """The first process takes the lock before anything else; the second, started while the
    first is frozen right after taking it, is refused; the first then finishes alone."""
    run_dir = tmp_path / "run"
    config = write_config(short_run(module_small_corpus, run_dir, tiny_config_for),
                          tmp_path / "config.yaml")
    first = subprocess.Popen([sys.executable, "-m", "tinyt", "train", "--config", str(config)],
                             cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    lock = run_dir / LOCK_NAME
    while True:  # frozen once its lock file names it: set by its progress, not by the clock
        assert first.poll() is None, first.communicate()
        try:
            if json.loads(lock.read_text())["pid"] == first.pid:
                break
        except (OSError, ValueError, KeyError):
            pass
    first.send_signal(signal.SIGSTOP)
    second = tinyt_cli("train", "--config", config)
    first.send_signal(signal.SIGCONT)
    out, err = first.communicate(timeout=600)
    assert first.returncode == 0, err[-2000:]
    assert second.returncode == 2 and f"in use by process {first.pid}" in second.stderr
    steps = [json.loads(line)["step"] for line in (run_dir / "metrics.jsonl").open()]
    assert steps == [6, 12]  # one run's lines only


def test_the_kernel_releases_the_lock_of_a_killed_process(tmp_path):
    run_dir = tmp_path / "run"
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time\nfrom tinyt.rundir import RunDirLock\n"
         f"RunDirLock({str(run_dir)!r}, 'holder').__enter__()\nprint('locked', flush=True)\n"
         "time.sleep(600)"], cwd=REPO, stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "locked"
    with pytest.raises(TinytError, match=f"in use by process {holder.pid} \\(holder\\)"):
        RunDirLock(run_dir, "second").__enter__()
    holder.kill()
    holder.wait()
    with RunDirLock(run_dir, "third"):
        pass


def test_run_dir_that_is_a_file_is_one_clear_line(tmp_path, tiny_config_dict, write_config):
    (tmp_path / "run").write_text("not a folder")
    result = tinyt_cli("train", "--config", write_config(tiny_config_dict, tmp_path / "c.yaml"))
    assert result.returncode == 2
    assert "is a file, not a folder" in result.stderr and result.stderr.count("\n") == 1


# -- what counts as a run -----------------------------------------------------------------


@pytest.mark.parametrize("keep", ["best.pt", "ckpt-6.pt", "tokenizer", "metrics.jsonl"])
def test_any_trained_artefact_means_the_directory_holds_a_run(run_copy, keep):
    run_dir, config = run_copy
    for path in list(run_dir.iterdir()):
        if path.name != keep and path.name != "config.yaml":
            subprocess.run(["rm", "-rf", str(path)], check=True)
    assert trained_artefacts(run_dir)
    before = snapshot(run_dir)
    result = tinyt_cli("train", "--config", config)
    assert result.returncode == 2 and "already holds a run" in result.stderr
    assert snapshot(run_dir) == before


# -- checks before writes -----------------------------------------------------------------


@pytest.mark.parametrize("change,named", [
    (["--set", "model.d_model=64", "--set", "model.d_ff=128"], "model.d_ff, model.d_model"),
    (["--set", "tokenizer.vocab_size=150"], "tokenizer.vocab_size"),
])
def test_a_refused_resume_leaves_the_run_exactly_as_it_was(run_copy, change, named):
    run_dir, _ = run_copy
    before = snapshot(run_dir)
    result = tinyt_cli("train", "--resume", run_dir, "--set", "train.max_steps=20", *change)
    assert result.returncode == 2
    assert named in result.stderr and "cannot resume" in result.stderr
    assert snapshot(run_dir) == before


def test_resume_on_changed_training_data_is_refused_and_the_tokenizer_kept(
        run_copy, module_small_corpus, tmp_path):
    run_dir, _ = run_copy
    data = tmp_path / "changed"
    subprocess.run(["cp", "-a", str(module_small_corpus), str(data)], check=True)
    subprocess.run(["gunzip", str(data / "train.en.gz")], check=True)
    lines = (data / "train.en").read_text(encoding="utf-8").splitlines()
    lines[7] = "A line that was not there before."
    (data / "train.en").write_text("\n".join(lines) + "\n", encoding="utf-8")
    before = snapshot(run_dir)
    result = tinyt_cli("train", "--resume", run_dir, "--set", "train.max_steps=20",
                       "--set", f"data.dir={data}")
    assert result.returncode == 2
    # Found by the data record (run/data/split.json) or, in a run without one, by the
    # tokenizer's fingerprint of the training text.
    assert re.search(r"training (file|data).* changed", result.stderr), result.stderr
    assert snapshot(run_dir) == before


def test_overwrite_with_bad_data_keeps_the_old_run(run_copy, module_small_corpus, tmp_path):
    run_dir, config = run_copy
    data = tmp_path / "bad"
    subprocess.run(["cp", "-a", str(module_small_corpus), str(data)], check=True)
    (data / "val.en").write_text("", encoding="utf-8")  # 50 German lines, 0 English ones
    before = snapshot(run_dir)
    result = tinyt_cli("train", "--config", config, "--overwrite", "--data-dir", data)
    assert result.returncode == 2, result.stderr
    assert snapshot(run_dir) == before


def test_a_failed_first_start_leaves_no_run_directory(module_small_corpus, tiny_config_for,
                                                      write_config, tmp_path):
    data = tmp_path / "bad"
    subprocess.run(["cp", "-a", str(module_small_corpus), str(data)], check=True)
    (data / "val.en").write_text("", encoding="utf-8")
    run_dir = tmp_path / "new" / "run"
    config = write_config(short_run(data, run_dir, tiny_config_for), tmp_path / "c.yaml")
    result = tinyt_cli("train", "--config", config)
    assert result.returncode == 2, result.stderr
    assert not run_dir.exists()


# -- finished runs, stale temporaries -------------------------------------------------------


def test_resuming_a_finished_run_trains_no_further(run_copy):
    run_dir, _ = run_copy
    before = snapshot(run_dir)
    result = tinyt_cli("train", "--resume", run_dir)
    assert result.returncode == 0, result.stderr
    assert "already finished (reached train.max_steps=12)" in result.stdout
    assert snapshot(run_dir) == before
    # A higher limit continues it.
    result = tinyt_cli("train", "--resume", run_dir, "--set", "train.max_steps=18")
    assert result.returncode == 0, result.stderr
    assert load_checkpoint(run_dir / "last.pt")["progress"]["step"] == 18
    steps = [json.loads(line)["step"] for line in (run_dir / "metrics.jsonl").open()]
    assert steps == [6, 12, 18]


def test_temporary_files_of_a_killed_writer_are_removed_on_the_next_run(run_copy):
    run_dir, _ = run_copy
    left = [run_dir / ".last.pt.k3j2.tmp", run_dir / "cache" / "tmpa1b2c3d4",
            run_dir / "cache" / "corpus-x.arrow.tmp-4242", run_dir / "tokenizer" / "tmpq9w8e7"]
    for path in left[:3]:
        path.parent.mkdir(exist_ok=True)
        path.write_bytes(b"half written")
    left[3].mkdir()
    (left[3] / "joint.model").write_bytes(b"half")
    result = tinyt_cli("train", "--resume", run_dir, "--set", "train.max_steps=13")
    assert result.returncode == 0, result.stderr
    assert not any(os.path.lexists(p) for p in left)
    assert (run_dir / "tokenizer" / "meta.json").is_file() and (run_dir / "last.pt").is_file()


def test_stale_temporaries_spare_the_run_itself(tmp_path):
    (tmp_path / "cache" / "tokens-ab").mkdir(parents=True)
    (tmp_path / "cache" / "tokens-ab" / "src_ids.npy").write_bytes(b"x")
    (tmp_path / "best.pt").write_bytes(b"x")
    (tmp_path / "cache" / "tokens-cd.tmp-77").mkdir()
    removed = remove_stale_temporaries(tmp_path)
    assert [p.name for p in removed] == ["tokens-cd.tmp-77"]
    assert (tmp_path / "cache" / "tokens-ab" / "src_ids.npy").is_file()


# -- one validation per step ---------------------------------------------------------------


def test_time_budget_running_out_during_a_validation_stops_at_that_step(
        small_corpus, tiny_config_for, tmp_path, monkeypatch):
    """The clock is driven by the run: it jumps past train.max_minutes while the first
    validation runs. Training stops at that step, validated and saved once, not again one
    step later."""
    raw = short_run(small_corpus, tmp_path / "run", tiny_config_for, max_steps=0,
                    max_minutes=1.0, valid_every=5, keep_checkpoints=5)
    clock = {"now": 0.0}
    monkeypatch.setattr(stopping_module, "time",
                        types.SimpleNamespace(monotonic=lambda: clock["now"]))
    validate = Trainer.validate

    def slow_validation(self):
        clock["now"] += 120.0
        return validate(self)

    monkeypatch.setattr(Trainer, "validate", slow_validation)
    summary = train(config_from_dict(raw), progress_bars=False)
    assert summary["steps"] == 5 and "max_minutes" in summary["stop_reason"]
    steps = [json.loads(line)["step"] for line in (tmp_path / "run" / "metrics.jsonl").open()]
    assert steps == [5]
    assert sorted(p.name for p in (tmp_path / "run").glob("ckpt-*.pt")) == ["ckpt-5.pt"]


def test_resume_checks_only_what_the_checkpoint_config_had(tiny_config_dict):
    """A run saved before a data/model key existed resumed with that key at its default; a
    changed model or data key, and only such a key, blocks a resume."""
    config = config_from_dict(tiny_config_dict)
    saved = config.to_dict()
    assert rundir_module._changed_on_resume(saved, config) == []
    older = {section: dict(values) if isinstance(values, dict) else values
             for section, values in saved.items()}
    del older["data"]["holdout"], older["data"]["columns"], older["model"]["max_positions"]
    assert rundir_module._changed_on_resume(older, config) == []
    saved["train"]["lr"] = 1.0
    saved["data"]["dir"] = "/elsewhere"
    assert rundir_module._changed_on_resume(saved, config) == []
    saved["data"]["max_len"] = 3
    saved["model"]["n_heads"] = 1
    assert rundir_module._changed_on_resume(saved, config) == ["model.n_heads", "data.max_len"]
