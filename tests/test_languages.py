"""Any language pair, any corpus: English<->Chinese on a slice of Tatoeba's cmn.txt (one
headerless TSV file with a byte-order mark, no splits), trained, evaluated and used through
the real entry point in both directions, and a held-out split that survives a resume."""

from __future__ import annotations

import gzip
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from tinyt.cli import app

REPO = Path(__file__).resolve().parents[1]
TATOEBA = REPO.parent / "shared" / "data" / "tatoeba" / "cmn-eng.tsv.gz"
N_PAIRS = 600  # every 48th line of the 29,155: short and long sentences alike
HELD_OUT = 40  # valid and test pairs each


@pytest.fixture(scope="module")
def tatoeba_slice(tmp_path_factory) -> Path:
    """A folder with cmn-eng.tsv.gz: N_PAIRS lines of the real file, its byte-order mark and
    attribution column included."""
    if not TATOEBA.is_file():
        pytest.skip(f"Tatoeba corpus not found at {TATOEBA}")
    with gzip.open(TATOEBA, "rb") as f:
        lines = [line for line in f.read().split(b"\n") if line.strip()]
    assert lines[0].startswith(b"\xef\xbb\xbf")
    picked = lines[:: len(lines) // N_PAIRS][:N_PAIRS]
    folder = tmp_path_factory.mktemp("tatoeba")
    with gzip.open(folder / "cmn-eng.tsv.gz", "wb") as f:
        f.write(b"\n".join(picked) + b"\n")
    return folder


def tiny_config(base: Path, src: str, tgt: str, **train) -> Path:
    """The shipped configs/tatoeba_en_zh.yaml with a tiny model and short training, for the
    direction src -> tgt."""
    raw = yaml.safe_load((REPO / "configs" / "tatoeba_en_zh.yaml").read_text(encoding="utf-8"))
    raw["run_dir"] = str(base / "run")
    raw["data"].update(src_lang=src, tgt_lang=tgt, holdout={"valid": HELD_OUT,
                                                              "test": HELD_OUT, "seed": 1})
    raw["tokenizer"]["vocab_size"] = 1000
    raw["model"].update(d_model=32, n_heads=2, enc_layers=1, dec_layers=1, d_ff=64,
                        max_positions=128)
    raw["train"].update({"batch_tokens": 512, "max_minutes": 0, "max_steps": 30,
                         "valid_every": 15, "warmup_steps": 10, "lr": 0.003, "num_threads": 1,
                         **train})
    raw["decoding"].update(beam_size=2, max_len_offset=5)
    path = base / f"tatoeba_{src}_{tgt}.yaml"
    path.write_text(yaml.safe_dump(raw, allow_unicode=True), encoding="utf-8")
    return path


def run_module(*args, cwd=None) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "TINYT_TRACEBACK"}
    return subprocess.run([sys.executable, "-m", "tinyt", *map(str, args)], capture_output=True,
                          text=True, cwd=cwd, env=env, timeout=300)


def invoke(*args):
    return CliRunner().invoke(app, [str(a) for a in args])


@pytest.mark.parametrize("src, tgt, tok, sentence", [
    ("en", "zh", "zh", "I love you."),
    ("zh", "en", "13a", "我爱你。"),
])
def test_train_evaluate_translate(tatoeba_slice, tmp_path, src, tgt, tok, sentence):
    config = tiny_config(tmp_path, src, tgt)
    run = tmp_path / "run"
    trained = run_module("train", "--config", config, "--data-dir", tatoeba_slice)
    assert trained.returncode == 0, trained.stderr[-2000:]
    out = trained.stdout
    assert f"data: {N_PAIRS} pairs in {tatoeba_slice / 'cmn-eng.tsv.gz'}" in out
    assert f"held out {HELD_OUT} valid + {HELD_OUT} test pairs" in out
    assert f"test split ({HELD_OUT} sentences" in out and f"tok:{tok}|" in out
    scripts = "en (Latin) -> zh (Han)" if src == "en" else "zh (Han) -> en (Latin)"

    evaluated = run_module("evaluate", "--run", run, "--split", "test", "--beam", "1")
    assert evaluated.returncode == 0, evaluated.stderr[-2000:]
    assert f"test ({HELD_OUT} sentences" in evaluated.stdout
    assert f"tok:{tok}|" in evaluated.stdout
    hyps = (run / "translations" / f"test.beam1.{tgt}").read_text(encoding="utf-8")
    assert len(hyps.splitlines()) == HELD_OUT

    translated = run_module("translate", "--run", run, sentence, "")
    assert translated.returncode == 0, translated.stderr[-2000:]
    assert len(translated.stdout.split("\n")) == 3 and translated.stdout.endswith("\n\n")

    info = run_module("info", "--run", run)
    assert info.returncode == 0 and scripts in info.stdout, info.stdout
    assert f"held out {HELD_OUT} valid + {HELD_OUT} test" in info.stdout
    assert f"BLEU tokenizer {tok}" in info.stdout


def test_holdout_survives_a_resume(tatoeba_slice, tmp_path, monkeypatch):
    import tinyt.training as training

    tokenizers_used = []
    real_score = training.score_translations

    def recording_score(hyps, refs, bleu_tokenize="13a"):
        tokenizers_used.append(bleu_tokenize)
        return real_score(hyps, refs, bleu_tokenize)

    monkeypatch.setattr(training, "score_translations", recording_score)
    config = tiny_config(tmp_path, "en", "zh", max_steps=10, valid_every=5, final_eval=False)
    run = tmp_path / "run"
    first = invoke("train", "--config", config, "--data-dir", tatoeba_slice)
    assert first.exit_code == 0, first.output
    assert tokenizers_used and set(tokenizers_used) == {"zh"}  # validation BLEU, too
    held = {p.name: p.read_bytes() for p in (run / "data").iterdir()}
    assert set(held) == {"split.json", "valid.jsonl", "test.jsonl"}
    tokenizer = (run / "tokenizer" / "tgt.model").read_bytes()

    # Stopped at train.max_steps; continue it further. The held-out splits are read back, not
    # carved again, the tokenizer is the same, and the training split still leaves them out.
    resumed = invoke("train", "--resume", run, "--set", "train.max_steps=20")
    assert resumed.exit_code == 0, resumed.output
    assert {p.name: p.read_bytes() for p in (run / "data").iterdir()} == held
    assert (run / "tokenizer" / "tgt.model").read_bytes() == tokenizer
    steps = [json.loads(line)["step"] for line in
             (run / "metrics.jsonl").read_text(encoding="utf-8").splitlines()]
    assert steps == [5, 10, 15, 20]
    valid_sources = {json.loads(line)["src"] for line in
                     held["valid.jsonl"].decode("utf-8").splitlines()}
    training_corpus = max((run / "cache").glob("corpus-*.arrow"), key=lambda p: p.stat().st_mtime)
    import datasets

    trained_sources = set(datasets.Dataset.from_file(str(training_corpus))["src"])
    assert len(trained_sources) < N_PAIRS - 2 * HELD_OUT + 1
    assert not valid_sources & trained_sources

    # A resume over a changed corpus is refused, with one line, and changes nothing.
    changed = tmp_path / "changed"
    changed.mkdir()
    with gzip.open(tatoeba_slice / "cmn-eng.tsv.gz", "rb") as f:
        lines = f.read().split(b"\n")
    with gzip.open(changed / "cmn-eng.tsv.gz", "wb") as f:
        f.write(b"\n".join(lines[:-20]) + b"\n")
    refused = invoke("train", "--resume", run, "--data-dir", changed, "--set",
                     "train.max_steps=30")
    assert refused.exit_code == 2, refused.output
    assert "error: " in refused.output and "changed since" in refused.output
    assert {p.name: p.read_bytes() for p in (run / "data").iterdir()} == held


def test_evaluate_finds_the_held_out_split_of_a_bundle(tatoeba_slice, tmp_path):
    config = tiny_config(tmp_path, "en", "zh", max_steps=5, valid_every=5, final_eval=False,
                         valid_bleu=False)
    assert invoke("train", "--config", config, "--data-dir", tatoeba_slice).exit_code == 0
    bundle = tmp_path / "model.tinyt"
    assert invoke("export", "--run", tmp_path / "run", "-o", bundle).exit_code == 0
    result = invoke("evaluate", "--model", bundle, "--beam", "1",
                    "--set", "decoding.bleu_tokenize=13a")
    assert result.exit_code == 0, result.output
    assert f"test ({HELD_OUT} sentences" in result.stdout and "tok:13a|" in result.stdout
