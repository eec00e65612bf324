"""Fine-tuning (`tinyt train --init-from runs/R`, tinyt.finetuning): a run that starts from a
trained run's weights and vocabulary learns the new domain without forgetting the old one,
starts exactly from R (R's tokenizer files, R's weights, a fresh optimizer), resumes from its
own last.pt without R, and every bad start is one error line that changes nothing.

R is a tiny model trained on general Multi30k captions (no dogs); the new domain is captions
about dogs, from the same corpus."""

from __future__ import annotations

import hashlib
import json
import shutil
import sys
from pathlib import Path

import pytest
import torch
import yaml
from test_cli_tools import run_main
from test_training import assert_same_last_checkpoint

from tinyt.checkpoint import load_checkpoint, load_trained
from tinyt.cli import main
from tinyt.config import config_from_dict
from tinyt.data import ParallelText, tokenize
from tinyt.errors import TinytError
from tinyt.evaluation import teacher_forced_nll
from tinyt.loading import load_translator

START_STEPS = 200  # R's training
TUNE_STEPS = 60  # a fine-tuning run's


def snapshot(folder: Path) -> dict[str, str]:
    """Every file under `folder` with a hash of its bytes."""
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def write_split(folder: Path, name: str, pairs) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"{name}.de").write_text("".join(s + "\n" for s, _ in pairs), encoding="utf-8")
    (folder / f"{name}.en").write_text("".join(t + "\n" for _, t in pairs), encoding="utf-8")


@pytest.fixture(scope="module")
def domains(corpus_dir, corpus_lines, tmp_path_factory):
    """Two corpus folders (train 400/200 pairs, val 50) and held-out pairs of each domain:
    "general" captions without dogs, "dogs" captions about dogs."""
    de = corpus_lines(corpus_dir, "train", "de", 8000)
    en = corpus_lines(corpus_dir, "train", "en", 8000)
    dogs = [(s, t) for s, t in zip(de, en) if "dog" in t.lower()]
    general = [(s, t) for s, t in zip(de, en) if "dog" not in t.lower()]
    root = tmp_path_factory.mktemp("domains")
    for name, pairs, n_train in (("general", general, 400), ("dogs", dogs, 200)):
        write_split(root / name, "train", pairs[:n_train])
        write_split(root / name, "val", pairs[n_train:n_train + 50])
    return {"root": root, "general": root / "general", "dogs": root / "dogs",
            "general_held_out": general[450:550], "dogs_held_out": dogs[250:350]}


def tiny_config(tiny_config_for, data_dir: Path, run_dir: Path, **train) -> dict:
    raw = tiny_config_for(data_dir, run_dir)
    raw["data"]["files"] = {"train": "train", "valid": "val"}
    raw["train"].update({"max_epochs": 100, "valid_bleu": False, "final_eval": False,
                         "warmup_steps": 10, **train})
    return raw


@pytest.fixture(scope="module")
def start_run(domains, tiny_config_for, write_config):
    """R: the tiny model trained on the general domain, without dropout."""
    run = domains["root"] / "R"
    raw = tiny_config(tiny_config_for, domains["general"], run, max_steps=START_STEPS,
                      valid_every=START_STEPS, lr=0.003)
    raw["model"]["dropout"] = 0.0
    config = write_config(raw, domains["root"] / "r.yaml")
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(sys, "stdout", sys.stdout)
        with pytest.raises(SystemExit) as info:
            main(["train", "--config", str(config)])
    assert info.value.code == 0
    return run


def tune_config(tiny_config_for, write_config, domains, folder: Path, run_dir: Path,
                **train) -> Path:
    """A fine-tuning config on the dog captions: dropout 0.1 (R had none: allowed) and a
    tokenizer section unlike R's (replaced by R's)."""
    raw = tiny_config(tiny_config_for, domains["dogs"], run_dir, lr=0.001, warmup_steps=5,
                      **{"max_steps": TUNE_STEPS, "valid_every": TUNE_STEPS, **train})
    raw["tokenizer"] = {"vocab_size": 8000, "model_type": "bpe"}
    folder.mkdir(parents=True, exist_ok=True)
    return write_config(raw, folder / "tune.yaml")


@pytest.fixture(scope="module")
def fine_tuned(start_run, domains, tiny_config_for, write_config):
    """F: R fine-tuned on the dog captions through `tinyt train --init-from`, and its output."""
    run = domains["root"] / "F"
    config = tune_config(tiny_config_for, write_config, domains, domains["root"], run)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(sys, "stdout", sys.stdout)
        with pytest.raises(SystemExit) as info:
            main(["train", "--config", str(config), "--init-from", str(start_run)])
    assert info.value.code == 0
    return run


def loss(run: Path, pairs) -> float:
    """Teacher-forced loss per token of the run's best.pt on these pairs."""
    _, tokenizers, model, _ = load_trained(run)
    text = ParallelText([s for s, _ in pairs], [t for _, t in pairs], "held out")
    nll, _ = teacher_forced_nll(model, tokenize(text, tokenizers), 2048, torch.device("cpu"))
    return nll


# -- what fine-tuning is for -----------------------------------------------------------------


def test_fine_tuning_learns_the_new_domain_and_keeps_the_old(start_run, fine_tuned, domains):
    dogs, general = domains["dogs_held_out"], domains["general_held_out"]
    before, after = loss(start_run, dogs), loss(fine_tuned, dogs)
    assert after < before - 0.1, (before, after)
    old_before, old_after = loss(start_run, general), loss(fine_tuned, general)
    assert old_after < old_before + 0.5, (old_before, old_after)  # not forgotten
    hyps = load_translator(fine_tuned).translate([s for s, _ in general[:10]], beam_size=2)
    assert all(h.strip() for h in hyps), hyps


# -- it starts exactly from R ----------------------------------------------------------------


def test_the_vocabulary_is_r_s_and_the_config_records_where_it_started(start_run, fine_tuned):
    assert snapshot(fine_tuned / "tokenizer") == snapshot(start_run / "tokenizer")
    saved = yaml.safe_load((fine_tuned / "config.yaml").read_text(encoding="utf-8"))
    assert saved["train"]["init_from"] == str(start_run)
    assert saved["train"]["init_checkpoint"] == "best.pt"
    r_saved = yaml.safe_load((start_run / "config.yaml").read_text(encoding="utf-8"))
    assert saved["tokenizer"] == r_saved["tokenizer"]  # 8000/bpe in the file, replaced
    assert saved["model"]["dropout"] == 0.1 and r_saved["model"]["dropout"] == 0.0
    last = load_checkpoint(fine_tuned / "last.pt")
    assert last["progress"]["step"] == TUNE_STEPS  # counted from 0, not from R's 200
    assert last["tokenizer_fingerprint"] == load_checkpoint(
        start_run / "best.pt")["tokenizer_fingerprint"]
    from tinyt.run_summary import format_run_info, run_info

    assert f"fine-tuned from {start_run}/best.pt" in format_run_info(run_info(fine_tuned))
    assert "fine-tuned" not in format_run_info(run_info(start_run))


def test_it_says_the_tokenizer_section_is_replaced(start_run, domains, tiny_config_for,
                                                    write_config, tmp_path, monkeypatch,
                                                    capsys):
    config = tune_config(tiny_config_for, write_config, domains, tmp_path, tmp_path / "run",
                         max_steps=1, valid_every=1)
    code, out, _ = run_main(monkeypatch, capsys, "train", "--config", config, "--init-from",
                            start_run, "--checkpoint", "last.pt")
    assert code == 0
    said = [line for line in out.splitlines() if "tokenizer section is replaced" in line]
    assert len(said) == 1 and f"{start_run}/last.pt" in said[0], out
    assert "tokenizer.vocab_size 8000 -> 200" in said[0]
    assert "tokenizer.model_type bpe -> unigram" in said[0]


def test_overwrite_replaces_the_old_run_s_vocabulary_by_r_s_exactly(
        start_run, fine_tuned, domains, tiny_config_for, write_config, tmp_path, monkeypatch,
        capsys):
    run = tmp_path / "run"
    shutil.copytree(fine_tuned, run)
    for name in ("src.model", "tgt.model", "src.vocab"):  # as a run with two vocabularies has
        (run / "tokenizer" / name).write_bytes(b"an older run's vocabulary")
    (run / "tokenizer" / "meta.json").write_text('{"fingerprint": "older", "joint": false}')
    config = tune_config(tiny_config_for, write_config, domains, tmp_path, run, max_steps=1,
                         valid_every=1)
    code, out, err = run_main(monkeypatch, capsys, "train", "--config", config, "--init-from",
                              start_run, "--overwrite")
    assert code == 0, err
    assert snapshot(run / "tokenizer") == snapshot(start_run / "tokenizer")
    assert load_checkpoint(run / "last.pt")["progress"]["step"] == 1


@pytest.mark.parametrize("checkpoint", ["best.pt", "ckpt-200.pt"])
def test_step_0_has_r_s_weights_and_a_fresh_optimizer(start_run, domains, tiny_config_for,
                                                       tmp_path, monkeypatch, checkpoint):
    from tinyt.training import Trainer, train

    seen = {}

    def look_at_step_0(trainer: Trainer) -> dict:
        seen.update(weights={k: v.clone() for k, v in trainer.model.state_dict().items()},
                    optimizer=trainer.optimizer.state_dict(), step=trainer.progress.step,
                    lr=trainer.schedule.lr, plateau=trainer.schedule.state_dict())
        return {}

    monkeypatch.setattr(Trainer, "train", look_at_step_0)
    raw = tiny_config(tiny_config_for, domains["dogs"], tmp_path / "run", warmup_steps=5,
                      lr=0.001)
    raw["train"].update(init_from=str(start_run), init_checkpoint=checkpoint)
    train(config_from_dict(raw), progress_bars=False)

    r_weights = load_checkpoint(start_run / checkpoint)["model"]
    assert seen["weights"].keys() == r_weights.keys()
    for name, tensor in r_weights.items():
        assert torch.equal(seen["weights"][name], tensor), name
    assert seen["step"] == 0
    assert seen["optimizer"]["state"] == {}  # no Adam moments carried over
    assert seen["lr"] == pytest.approx(0.001 / 5)  # warmup's first step, not R's rate
    assert seen["plateau"]["best"] == float("inf")


# -- resume ----------------------------------------------------------------------------------


def test_a_fine_tuned_run_resumes_from_its_own_last_pt_without_r(
        start_run, domains, tiny_config_for, write_config, tmp_path, monkeypatch, capsys):
    def fine_tune(start: Path, name: str, max_steps: int) -> Path:
        run = tmp_path / name
        config = tune_config(tiny_config_for, write_config, domains, tmp_path / f"{name}-config",
                             run, max_steps=max_steps, valid_every=20)
        code, _, err = run_main(monkeypatch, capsys, "train", "--config", config, "--init-from",
                                start)
        assert code == 0, err
        return run

    # Fine-tune from a copy of R, then delete the copy: resume must need only the run itself.
    copy_of_r = tmp_path / "R"
    shutil.copytree(start_run, copy_of_r)
    interrupted = fine_tune(copy_of_r, "interrupted", 40)
    shutil.rmtree(copy_of_r)
    code, out, err = run_main(monkeypatch, capsys, "train", "--resume", interrupted,
                              "--set", "train.max_steps=60")
    assert code == 0, err
    assert "tokenizer section" not in out  # R is not read again

    straight = fine_tune(start_run, "straight", 60)
    assert_same_last_checkpoint(interrupted, straight)
    assert load_checkpoint(interrupted / "last.pt")["progress"]["step"] == 60
    steps = [json.loads(line)["step"] for line in (interrupted / "metrics.jsonl").open()]
    assert steps == [20, 40, 60]


# -- every bad start is one line and changes nothing ------------------------------------------


def assert_refused(code: int, out: str, err: str, *words: str) -> str:
    """Exit code 2, one `error: ...` line naming `words`, and training never began."""
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and lines[0].startswith("error: "), err
    assert "Traceback" not in err and "fine-tuning from" not in out
    for word in words:
        assert word in lines[0], (word, lines[0])
    return lines[0]


def broken_copy(start_run: Path, folder: Path, damage: str) -> Path:
    run = folder / "R"
    shutil.copytree(start_run, run)
    if damage == "no tokenizer":
        shutil.rmtree(run / "tokenizer")
    elif damage == "no tokenizer model":
        (run / "tokenizer" / "joint.model").unlink()
    elif damage == "damaged checkpoint":
        data = (run / "best.pt").read_bytes()
        (run / "best.pt").write_bytes(data[: len(data) // 2])
    elif damage == "no config":
        (run / "config.yaml").unlink()
    return run


@pytest.mark.parametrize("damage,words", [
    ("missing", ["no such run directory"]),
    ("a file", ["not a run directory"]),
    ("no config", ["not a run directory", "no config.yaml"]),
    ("no tokenizer", ["tokenizer missing", "meta.json not found"]),
    ("no tokenizer model", ["tokenizer missing", "joint.model not found"]),
    ("damaged checkpoint", ["best.pt is damaged"]),
])
def test_a_bad_start_run_is_one_line_and_creates_nothing(
        start_run, domains, tiny_config_for, write_config, tmp_path, monkeypatch, capsys,
        damage, words):
    if damage == "missing":
        source = tmp_path / "nowhere"
    elif damage == "a file":
        source = tmp_path / "file"
        source.write_text("not a run\n", encoding="utf-8")
    else:
        source = broken_copy(start_run, tmp_path, damage)
    before = snapshot(tmp_path)
    run = tmp_path / "new" / "run"
    config = tune_config(tiny_config_for, write_config, domains, tmp_path / "cfg", run)
    code, out, err = run_main(monkeypatch, capsys, "train", "--config", config,
                            "--init-from", source)
    assert_refused(code, out, err, f"--init-from {source}", *words)
    assert not run.exists() and not run.parent.exists()
    after = snapshot(tmp_path)
    del after["cfg/tune.yaml"]
    assert after == before


@pytest.mark.parametrize("args,settings,words", [
    (["--checkpoint", "averaged.pt"], [], ["averaged.pt not found", "best.pt", "last.pt",
                                           "--checkpoint"]),
    ([], ["model.d_model=64", "model.n_heads=4"],
     ["model.d_model, model.n_heads differ", "(32, 2; this config has 64, 4)"]),
    ([], ["model.activation=gelu"], ["model.activation differs", "(relu; "]),
    ([], ["data.src_lang=en", "data.tgt_lang=de"], ["de→en", "en→de", "data.src_lang: de"]),
])
def test_a_start_run_that_does_not_fit_is_one_line_and_creates_nothing(
        start_run, domains, tiny_config_for, write_config, tmp_path, monkeypatch, capsys,
        args, settings, words):
    before = snapshot(start_run)
    run = tmp_path / "run"
    config = tune_config(tiny_config_for, write_config, domains, tmp_path, run)
    overrides = [x for s in settings for x in ("--set", s)]
    code, out, err = run_main(monkeypatch, capsys, "train", "--config", config, "--init-from",
                            start_run, *args, *overrides)
    assert_refused(code, out, err, f"--init-from {start_run}", *words)
    assert not run.exists()
    assert snapshot(start_run) == before


def test_a_start_run_retrained_while_its_tokenizer_is_read_is_refused(start_run):
    from tinyt.finetuning import _read_tokenizer_files
    from tinyt.tokenizer import Tokenizers

    folder = start_run / "tokenizer"
    files = _read_tokenizer_files(folder, True, Tokenizers.load(folder).fingerprint)
    assert sorted(files) == ["joint.model", "joint.vocab", "meta.json"]
    with pytest.raises(TinytError, match="changed while it was read"):
        _read_tokenizer_files(folder, True, "a vocabulary from before")


def test_misused_options_are_one_line_and_change_nothing(
        start_run, fine_tuned, domains, tiny_config_for, write_config, tmp_path, monkeypatch,
        capsys):
    run = tmp_path / "run"
    config = tune_config(tiny_config_for, write_config, domains, tmp_path, run)
    r_before, f_before = snapshot(start_run), snapshot(fine_tuned)

    # --checkpoint alone: a checkpoint of which run?
    code, out, err = run_main(monkeypatch, capsys, "train", "--config", config, "--checkpoint",
                            "averaged.pt")
    assert_refused(code, out, err, "--checkpoint averaged.pt", "--init-from")
    # Not a file name inside R.
    code, out, err = run_main(monkeypatch, capsys, "train", "--config", config, "--init-from",
                            start_run, "--checkpoint", "../R/best.pt")
    assert_refused(code, out, err, "train.init_checkpoint")
    # Into a directory that holds a run.
    code, out, err = run_main(monkeypatch, capsys, "train", "--config", config, "--init-from",
                              start_run, "--run-dir", fine_tuned)
    assert_refused(code, out, err, "already holds a run")
    # Fine-tuning a run into its own directory.
    code, out, err = run_main(monkeypatch, capsys, "train", "--config", config, "--init-from",
                            start_run, "--run-dir", start_run, "--overwrite")
    assert_refused(code, out, err, "own directory")
    assert not run.exists()

    # --init-from with --resume of a run that was not started from another run.
    code, out, err = run_main(monkeypatch, capsys, "train", "--resume", start_run,
                            "--init-from", fine_tuned)
    assert_refused(code, out, err, f"--resume {start_run}", "not started from another run")
    code, out, err = run_main(monkeypatch, capsys, "train", "--resume", start_run,
                            "--set", f"train.init_from={fine_tuned}")
    assert_refused(code, out, err, "cannot resume", "train.init_from changed")
    # ... or of a fine-tuned run, naming another start than its own.
    code, out, err = run_main(monkeypatch, capsys, "train", "--resume", fine_tuned,
                            "--init-from", fine_tuned)
    assert_refused(code, out, err, f"started from {start_run / 'best.pt'}")
    code, out, err = run_main(monkeypatch, capsys, "train", "--resume", fine_tuned,
                            "--checkpoint", "last.pt")
    assert_refused(code, out, err, "--checkpoint last.pt", f"started from {start_run / 'best.pt'}")

    assert snapshot(start_run) == r_before and snapshot(fine_tuned) == f_before
