"""The `tinyt` command line, end to end: train a tiny model once per module, then evaluate,
translate and break things, through `tinyt.cli.app` (CliRunner) and `python -m tinyt`."""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
from importlib.metadata import version as dist_version
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

import tinyt
from tinyt.cli import app
from tinyt.config import load_config

N_TEST = 50  # sentences in the small corpus's test split


def invoke(*args, input=None):
    runner = CliRunner()
    return runner.invoke(app, [str(a) for a in args], input=input)


def stdout_lines(result) -> list[str]:
    text = result.stdout
    assert text == "" or text.endswith("\n")
    return text.split("\n")[:-1]


def assert_user_error(result, *words):
    """Exit code 2, exactly one `error: ...` line on stderr, no traceback."""
    assert result.exit_code == 2, (result.exit_code, result.output)
    assert isinstance(result.exception, SystemExit)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert "Traceback" not in result.output
    for word in words:
        assert word in lines[0], (word, lines[0])
    return lines[0]


def run_module(*args, input: bytes | None = None, cwd=None, timeout=120):
    env = dict(os.environ)
    env.pop("TINYT_TRACEBACK", None)
    return subprocess.run([sys.executable, "-m", "tinyt", *map(str, args)], input=input,
                          capture_output=True, cwd=cwd, env=env, timeout=timeout)


@pytest.fixture(scope="module")
def trained(module_small_corpus, tmp_path_factory, tiny_config_for, write_config):
    """One tiny training run through `tinyt train` for the whole module."""
    base = tmp_path_factory.mktemp("cli")
    raw = tiny_config_for(module_small_corpus, base / "run")
    config_path = write_config(raw, base / "tiny.yaml")
    result = invoke("train", "--config", config_path)
    assert result.exit_code == 0, result.output
    return {"run": base / "run", "config": config_path, "raw": raw, "result": result,
            "corpus": module_small_corpus}


@pytest.fixture
def run_copy(trained, tmp_path):
    """A private copy of the trained run, free to break."""
    target = tmp_path / "run_copy"
    shutil.copytree(trained["run"], target, ignore=shutil.ignore_patterns("translations"))
    return target


# -- version and help ---------------------------------------------------------------------


def test_version():
    result = invoke("--version")
    assert result.exit_code == 0
    assert result.stdout.strip() == f"tinyt {tinyt.__version__}"
    assert tinyt.__version__ == dist_version("tinyt")


def test_version_subprocess():
    proc = run_module("--version")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.decode().strip() == f"tinyt {tinyt.__version__}"


def test_no_arguments_shows_help():
    result = invoke()
    assert result.exit_code in (0, 2)
    for command in ("train", "evaluate", "translate"):
        assert command in result.output


@pytest.mark.parametrize("command, options", [
    (None, ["train", "evaluate", "translate", "--version"]),
    ("train", ["--config", "--run-dir", "--data-dir", "--resume", "--overwrite",
               "--max-minutes"]),
    ("evaluate", ["--run", "--split", "--beam", "--length-penalty", "--checkpoint",
                  "--data-dir", "--device"]),
    ("translate", ["--run", "--beam", "--input", "--output", "--checkpoint", "--device"]),
])
@pytest.mark.parametrize("flag", ["--help", "-h"])
def test_help(command, options, flag):
    args = ([command] if command else []) + [flag]
    result = invoke(*args)
    assert result.exit_code == 0, result.output
    assert "Usage" in result.stdout
    for option in options:
        assert option in result.stdout, (option, result.stdout)


# -- train --------------------------------------------------------------------------------


def test_train_writes_run(trained):
    run = trained["run"]
    for name in ("best.pt", "last.pt", "config.yaml", "metrics.jsonl"):
        assert (run / name).is_file(), name
    assert (run / "tokenizer" / "joint.model").is_file()
    assert (run / "tokenizer" / "meta.json").is_file()
    assert "done:" in trained["result"].stdout
    # training ends with the test score of best.pt and a hint how to use the run
    assert "test split (" in trained["result"].stdout and "BLEU = " in trained["result"].stdout
    assert f"tinyt translate --run {run}" in trained["result"].stdout


def test_train_metrics(trained):
    lines = (trained["run"] / "metrics.jsonl").read_text(encoding="utf-8").splitlines()
    assert len(lines) == 1  # max_epochs 1, validation at the end of every epoch
    for line in lines:
        record = json.loads(line)
        for key in ("valid_loss", "valid_ppl", "valid_bleu", "step", "train_loss"):
            assert key in record, key
        assert 0 < record["valid_loss"] < 20
        assert math.isclose(record["valid_ppl"], math.exp(record["valid_loss"]), rel_tol=1e-3)
        assert 0 <= record["valid_bleu"] <= 100
        assert record["step"] > 0 and record["best"] is True
        # 1 epoch of 200 pairs at 512 tokens: the loss fell below uniform over 200 pieces.
        assert record["valid_loss"] < math.log(200) + 0.5


def test_train_config_and_checkpoint(trained):
    run = trained["run"]
    saved = load_config(run / "config.yaml")
    given = load_config(trained["config"])
    assert saved == given
    payload = torch.load(run / "best.pt", map_location="cpu", weights_only=True)
    assert payload["format_version"] == 1
    assert payload["progress"]["step"] > 0 and payload["progress"]["epoch"] == 1
    assert payload["model"]["tgt_embed.weight"].shape == (200, 32)
    meta = json.loads((run / "tokenizer" / "meta.json").read_text(encoding="utf-8"))
    assert payload["tokenizer_fingerprint"] == meta["fingerprint"]


def test_train_again_needs_resume_or_overwrite(trained, run_copy):
    before = (run_copy / "metrics.jsonl").read_text(encoding="utf-8")
    result = invoke("train", "--config", trained["config"], "--run-dir", run_copy)
    message = assert_user_error(result, "--resume", "--overwrite", str(run_copy))
    assert "already" in message
    assert (run_copy / "metrics.jsonl").read_text(encoding="utf-8") == before


def test_train_overwrite(trained, run_copy):
    best_before = (run_copy / "best.pt").stat().st_mtime_ns
    (run_copy / "translations").mkdir()
    (run_copy / "translations" / "old.en").write_text("stale\n", encoding="utf-8")
    result = invoke("train", "--config", trained["config"], "--run-dir", run_copy,
                    "--overwrite")
    assert result.exit_code == 0, result.output
    lines = (run_copy / "metrics.jsonl").read_text(encoding="utf-8").splitlines()
    assert len(lines) == 1  # the old metrics were removed, not appended to
    assert "valid_bleu" in json.loads(lines[0])
    assert (run_copy / "best.pt").stat().st_mtime_ns != best_before
    # stale hypotheses are gone; only the new run's final evaluation is there
    assert not (run_copy / "translations" / "old.en").exists()
    assert sorted(p.name for p in (run_copy / "translations").iterdir()) == ["test.beam2.en"]
    assert load_config(run_copy / "config.yaml").run_dir == str(run_copy)


def test_train_overwrite_forgets_old_evaluations(trained, run_copy):
    (run_copy / "evaluations.jsonl").write_text('{"split": "test", "bleu": 99.0}\n',
                                                encoding="utf-8")
    result = invoke("train", "--config", trained["config"], "--run-dir", run_copy,
                    "--overwrite")
    assert result.exit_code == 0, result.output
    scores = [json.loads(line) for line in (run_copy / "evaluations.jsonl").open()]
    assert len(scores) == 1 and scores[0]["bleu"] != 99.0  # only the new final evaluation


def test_train_resume_finished_run(run_copy):
    before = (run_copy / "metrics.jsonl").read_text(encoding="utf-8")
    result = invoke("train", "--resume", run_copy)
    assert result.exit_code == 0, result.output
    assert "max_epochs=1" in result.stdout
    assert (run_copy / "metrics.jsonl").read_text(encoding="utf-8") == before


def test_train_resume_with_config_is_an_error(trained, run_copy):
    assert_user_error(invoke("train", "--resume", run_copy, "--config", trained["config"]),
                      "--config")


def test_train_resume_missing_run(tmp_path):
    assert_user_error(invoke("train", "--resume", tmp_path / "nope"), "resume")


def test_train_without_config():
    assert_user_error(invoke("train"), "--config")


# -- bad configs ----------------------------------------------------------------------------


@pytest.mark.parametrize("change, words", [
    (lambda raw: raw.update(modle={"d_model": 8}), ["unknown key", "modle"]),
    (lambda raw: raw["model"].update(d_modle=8), ["model.d_modle"]),
    (lambda raw: raw["model"].update(n_heads=3), ["model.n_heads", "d_model=32"]),
    (lambda raw: raw["data"].update(dir="/nonexistent/corpus"), ["data.dir", "/nonexistent"]),
    (lambda raw: raw["train"].update(lr=0), ["train.lr"]),
    (lambda raw: raw["tokenizer"].update(joint=False), ["model.tie_embeddings"]),
])
def test_train_bad_config(tiny_config_dict, tmp_path, write_config, change, words):
    change(tiny_config_dict)
    path = write_config(tiny_config_dict, tmp_path / "bad.yaml")
    message = assert_user_error(invoke("train", "--config", path), *words)
    assert "bad.yaml" in message
    assert not Path(tiny_config_dict["run_dir"]).exists()  # nothing was started


def test_train_bad_yaml(tmp_path):
    path = tmp_path / "broken.yaml"
    path.write_text("model:\n  d_model: [32\n", encoding="utf-8")
    assert_user_error(invoke("train", "--config", path), "broken.yaml", "line")


def test_train_missing_config_file(tmp_path):
    assert_user_error(invoke("train", "--config", tmp_path / "nope.yaml"), "nope.yaml")


def test_train_data_dir_override_missing(tiny_config_file, tmp_path):
    assert_user_error(invoke("train", "--config", tiny_config_file, "--data-dir",
                             tmp_path / "nope"), "data.dir")


def test_train_missing_split_file(tiny_config_dict, tmp_path, write_config):
    corpus = Path(tiny_config_dict["data"]["dir"])
    (corpus / "val.en").unlink()
    path = write_config(tiny_config_dict, tmp_path / "c.yaml")
    assert_user_error(invoke("train", "--config", path), "val.en")
    assert not (Path(tiny_config_dict["run_dir"]) / "metrics.jsonl").exists()


def test_bad_config_subprocess(tiny_config_dict, tmp_path, write_config):
    tiny_config_dict["model"]["n_heads"] = 5
    path = write_config(tiny_config_dict, tmp_path / "bad.yaml")
    proc = run_module("train", "--config", path, cwd=tmp_path)
    assert proc.returncode == 2
    assert proc.stdout == b""
    stderr = proc.stderr.decode()
    assert stderr.count("\n") == 1 and stderr.startswith("error: ")
    assert "model.n_heads" in stderr and "Traceback" not in stderr


# -- evaluate -----------------------------------------------------------------------------


def test_evaluate(trained):
    run = trained["run"]
    result = invoke("evaluate", "--run", run, "--split", "test", "--beam", "2")
    assert result.exit_code == 0, result.output
    out = result.stdout
    assert f"({N_TEST} sentences" in out and "beam 2" in out
    assert "BLEU = " in out and "chrF2 " in out
    assert "BLEU signature: nrefs:1|" in out and "version:" in out
    assert out.count("signature: ") == 2
    hyp_path = run / "translations" / "test.beam2.en"
    assert f"hypotheses: {hyp_path}" in out
    hyps = hyp_path.read_text(encoding="utf-8")
    assert hyps.count("\n") == N_TEST and hyps.endswith("\n")
    records = [json.loads(x) for x in
               (run / "evaluations.jsonl").read_text(encoding="utf-8").splitlines()]
    last = records[-1]
    assert last["split"] == "test" and last["beam"] == 2 and last["sentences"] == N_TEST
    assert 0 <= last["bleu"] <= 100 and 0 <= last["chrf"] <= 100
    assert last["hypotheses"] == str(hyp_path)
    assert math.isclose(last["ppl"], math.exp(last["loss"]), rel_tol=1e-3)


def test_evaluate_split_name_and_greedy(trained):
    result = invoke("evaluate", "--run", trained["run"], "--split", "val", "--beam", "1")
    assert result.exit_code == 0, result.output
    assert (trained["run"] / "translations" / "val.beam1.en").read_text(
        encoding="utf-8").count("\n") == 50


def test_evaluate_missing_run(tmp_path):
    assert_user_error(invoke("evaluate", "--run", tmp_path / "no_run", "--split", "test"),
                      "no_run")


def test_evaluate_missing_split(trained):
    assert_user_error(invoke("evaluate", "--run", trained["run"], "--split", "test_2099"),
                      "test_2099")


def test_evaluate_bad_beam(trained):
    result = invoke("evaluate", "--run", trained["run"], "--beam", "0")
    assert result.exit_code == 2
    assert "Traceback" not in result.output


def test_evaluate_corrupt_checkpoint(run_copy):
    (run_copy / "best.pt").write_bytes(b"\x00not a checkpoint" * 100)
    assert_user_error(invoke("evaluate", "--run", run_copy), "best.pt")


def test_evaluate_missing_checkpoint(run_copy):
    (run_copy / "best.pt").unlink()
    assert_user_error(invoke("evaluate", "--run", run_copy), "best.pt")


# -- translate ----------------------------------------------------------------------------


def test_translate_arguments(trained):
    sentences = ["Ein Hund läuft über die Wiese.", "Zwei Männer spielen Fußball.",
                 "Eine Frau liest ein Buch."]
    result = invoke("translate", "--run", trained["run"], "--beam", "2", *sentences)
    assert result.exit_code == 0, result.output
    lines = stdout_lines(result)
    assert len(lines) == len(sentences)
    # Deterministic: the same input gives the same output.
    again = invoke("translate", "--run", trained["run"], "--beam", "2", *sentences)
    assert stdout_lines(again) == lines
    # Translating one by one gives what the batch gave.
    single = invoke("translate", "--run", trained["run"], "--beam", "2", sentences[1])
    assert stdout_lines(single) == [lines[1]]


def test_translate_stdin(trained):
    data = ("Ein Hund läuft.\n\nZwei Kinder spielen.\n   \n"
            "Ein Mann.\r\n").encode() + b"Ung\xfcltig \xff\xfe Bytes\n" + b"Letzte Zeile"
    result = invoke("translate", "--run", trained["run"], "--beam", "1", input=data)
    assert result.exit_code == 0, result.output
    lines = stdout_lines(result)
    assert len(lines) == 7
    assert lines[1] == "" and lines[3] == ""


def test_translate_stdin_dash(trained):
    result = invoke("translate", "--run", trained["run"], "-", input=b"Ein Hund.\n\n")
    assert result.exit_code == 0, result.output
    lines = stdout_lines(result)
    assert len(lines) == 2 and lines[1] == ""


def test_translate_empty_stdin(trained):
    result = invoke("translate", "--run", trained["run"], input=b"")
    assert result.exit_code == 0, result.output
    assert result.stdout == ""


def test_translate_files(trained, tmp_path):
    src = tmp_path / "in.de"
    src.write_bytes("Ein Hund läuft.\n\nEine Katze schläft.\nDrei Vögel.\n".encode()
                    + b"kaputt \xc3\x28 hier\n")
    out = tmp_path / "out.en"
    result = invoke("translate", "--run", trained["run"], "--input", src, "--output", out)
    assert result.exit_code == 0, result.output
    assert result.stdout == ""
    text = out.read_text(encoding="utf-8")
    lines = text.split("\n")[:-1]
    assert text.endswith("\n") and len(lines) == 5
    assert lines[1] == ""
    # The same sentences as arguments give the same translations.
    args = invoke("translate", "--run", trained["run"], "Ein Hund läuft.", "Drei Vögel.")
    assert stdout_lines(args) == [lines[0], lines[3]]


def test_translate_input_and_arguments(trained, tmp_path):
    src = tmp_path / "in.de"
    src.write_text("Ein Hund.\n", encoding="utf-8")
    assert_user_error(invoke("translate", "--run", trained["run"], "--input", src, "Hallo"),
                      "--input")


def test_translate_missing_input_file(trained, tmp_path):
    assert_user_error(invoke("translate", "--run", trained["run"], "--input",
                             tmp_path / "nope.de"), "nope.de")


def test_translate_stdin_subprocess(trained, tmp_path):
    data = b"Ein Hund.\n\nUng\xfcltig \xff\n  \nZwei Frauen.\n"
    proc = run_module("translate", "--run", trained["run"], "--beam", "1", input=data,
                      cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr.decode(errors="replace")
    out = proc.stdout.decode("utf-8")
    lines = out.split("\n")
    assert lines[-1] == "" and len(lines[:-1]) == 5
    assert lines[1] == "" and lines[3] == ""
    # Same output as in-process.
    in_process = invoke("translate", "--run", trained["run"], "--beam", "1", input=data)
    assert in_process.stdout == out


def test_translate_missing_tokenizer(run_copy):
    shutil.rmtree(run_copy / "tokenizer")
    message = assert_user_error(invoke("translate", "--run", run_copy, "Ein Hund."),
                                "tokenizer")
    assert str(run_copy) in message


def test_translate_corrupt_tokenizer_model(run_copy):
    (run_copy / "tokenizer" / "joint.model").write_bytes(b"garbage")
    assert_user_error(invoke("translate", "--run", run_copy, "Ein Hund."), "joint.model")


@pytest.mark.parametrize("damage", ["garbage", "truncate", "empty"])
def test_translate_corrupt_checkpoint(run_copy, damage):
    best = run_copy / "best.pt"
    if damage == "garbage":
        best.write_bytes(os.urandom(4096))
    elif damage == "truncate":
        best.write_bytes(best.read_bytes()[:5000])
    else:
        best.write_bytes(b"")
    assert_user_error(invoke("translate", "--run", run_copy, "Ein Hund."), "best.pt")
    # The other checkpoint still works.
    result = invoke("translate", "--run", run_copy, "--checkpoint", "last.pt", "Ein Hund.")
    assert result.exit_code == 0, result.output
    assert len(stdout_lines(result)) == 1


def test_translate_foreign_checkpoint(run_copy):
    # A checkpoint that loads but is no tinyt checkpoint.
    torch.save({"weights": torch.zeros(3)}, run_copy / "best.pt")
    assert_user_error(invoke("translate", "--run", run_copy, "Ein Hund."), "best.pt")


def test_translate_missing_run(tmp_path):
    assert_user_error(invoke("translate", "--run", tmp_path / "gone", "Ein Hund."), "gone")


def test_translate_latest_run_by_default(trained, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert_user_error(invoke("translate", "Ein Hund."), "--run")  # no ./runs yet
    shutil.copytree(trained["run"], tmp_path / "runs" / "mine")
    result = invoke("translate", "Ein Hund.", "Eine Katze.")
    assert result.exit_code == 0, result.output
    assert len(stdout_lines(result)) == 2
    assert "using run runs/mine" in result.stderr


def test_translate_output_in_missing_folder(trained, tmp_path):
    result = invoke("translate", "--run", trained["run"], "--output",
                    tmp_path / "no_such_dir" / "out.en", "Ein Hund.")
    assert_user_error(result, "no_such_dir")


# -- a run whose training corpus is gone ----------------------------------------------------


@pytest.fixture
def run_without_corpus(trained, tmp_path):
    """A copy of the trained run whose config.yaml points at a corpus folder that is gone."""
    corpus = tmp_path / "corpus_moved_later"
    shutil.copytree(trained["corpus"], corpus)
    run = tmp_path / "run"
    shutil.copytree(trained["run"], run, ignore=shutil.ignore_patterns("translations"))
    config = (run / "config.yaml").read_text(encoding="utf-8")
    assert str(trained["corpus"]) in config
    (run / "config.yaml").write_text(config.replace(str(trained["corpus"]), str(corpus)),
                                     encoding="utf-8")
    assert invoke("translate", "--run", run, "Ein Hund.").exit_code == 0  # works while there
    moved = tmp_path / "corpus_new_place"
    corpus.rename(moved)
    return run, moved




def test_translate_after_corpus_moved(run_without_corpus):
    run, _ = run_without_corpus
    result = invoke("translate", "--run", run, "Ein Hund.")
    assert result.exit_code == 0, result.output


def test_evaluate_with_data_dir_after_corpus_moved(run_without_corpus):
    run, moved = run_without_corpus
    result = invoke("evaluate", "--run", run, "--split", "test", "--beam", "1",
                    "--data-dir", moved)
    assert result.exit_code == 0, result.output
