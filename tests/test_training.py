"""Training really learns (a tiny model memorises a small corpus) and resume is exact."""

import gzip
import json
from pathlib import Path

import pytest
import torch

from tinyt.checkpoint import load_checkpoint
from tinyt.config import config_from_dict
from tinyt.evaluation import score_translations
from tinyt.training import train
from tinyt.translation import Translator

CORPUS = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "multi30k"


def write_pairs(folder: Path, name: str, pairs) -> None:
    (folder / f"{name}.de").write_text("".join(s + "\n" for s, _ in pairs), encoding="utf-8")
    (folder / f"{name}.en").write_text("".join(t + "\n" for _, t in pairs), encoding="utf-8")


@pytest.fixture(scope="module")
def short_pairs():
    if not CORPUS.is_dir():
        pytest.skip("../shared/data/multi30k is not here")
    with gzip.open(CORPUS / "train.de.gz", "rt", encoding="utf-8") as f:
        de = f.read().split("\n")[:3000]
    with gzip.open(CORPUS / "train.en.gz", "rt", encoding="utf-8") as f:
        en = f.read().split("\n")[:3000]
    pairs = [(s, t) for s, t in zip(de, en) if 4 <= len(t.split()) <= 9]
    return pairs


def tiny_config(tmp_path: Path, data_dir: Path, **train_overrides) -> dict:
    train_section = {"seed": 3, "batch_tokens": 400, "max_epochs": 200, "lr": 0.003,
                     "warmup_steps": 30, "label_smoothing": 0.0, "plateau_patience": 50,
                     "valid_bleu": False, "num_threads": 1, "log_every": 5}
    train_section.update(train_overrides)
    return {
        "run_dir": str(tmp_path / "run"),
        "data": {"dir": str(data_dir), "files": {"train": "train", "valid": "val"},
                 "max_len": 40},
        "tokenizer": {"vocab_size": 300},
        "model": {"d_model": 64, "n_heads": 4, "enc_layers": 2, "dec_layers": 2, "d_ff": 128,
                  "dropout": 0.0},
        "train": train_section,
        "decoding": {"beam_size": 1},
    }


def test_tiny_model_overfits_a_small_corpus(tmp_path, short_pairs):
    pairs = short_pairs[:100]
    write_pairs(tmp_path, "train", pairs)
    write_pairs(tmp_path, "val", pairs)
    config = config_from_dict(tiny_config(tmp_path, tmp_path, max_steps=400, valid_every=100))
    summary = train(config, progress_bars=False)
    assert summary["steps"] == 400
    metrics = [json.loads(line) for line in (Path(config.run_dir) / "metrics.jsonl").open()]
    assert [m["step"] for m in metrics] == [100, 200, 300, 400]
    first_loss, last_loss = metrics[0]["train_loss"], metrics[-1]["train_loss"]
    assert last_loss < 0.25 * first_loss, metrics
    assert metrics[-1]["valid_loss"] < 0.5
    translator = Translator.from_run(config.run_dir)
    hyps = translator.translate([s for s, _ in pairs], beam_size=1)
    bleu = score_translations(hyps, [t for _, t in pairs])["bleu"]
    assert bleu > 50, (bleu, hyps[:5])
    assert translator.translate([s for s, _ in pairs[:20]], beam_size=4) != [""] * 20


def test_resume_continues_exactly_where_it_stopped(tmp_path, short_pairs):
    write_pairs(tmp_path, "train", short_pairs[:60])
    write_pairs(tmp_path, "val", short_pairs[60:70])
    # Dropout on, so resuming must also restore the random number generators; 7 batches an
    # epoch and a checkpoint every 10 steps, so the stop falls inside an epoch.
    raw = tiny_config(tmp_path / "a", tmp_path, max_steps=30, valid_every=10, batch_tokens=300)
    raw["model"]["dropout"] = 0.2
    straight = config_from_dict(raw)
    train(straight, progress_bars=False)

    raw["run_dir"] = str(tmp_path / "b")
    raw["train"]["max_steps"] = 20
    interrupted = config_from_dict(raw)
    train(interrupted, progress_bars=False)
    stopped = load_checkpoint(Path(interrupted.run_dir) / "last.pt")["progress"]
    assert stopped["step"] == 20 and stopped["batch_in_epoch"] != 0
    interrupted.train.max_steps = 30
    train(interrupted, resume=True, progress_bars=False)

    a = load_checkpoint(Path(straight.run_dir) / "last.pt")
    b = load_checkpoint(Path(interrupted.run_dir) / "last.pt")
    assert a["progress"] == b["progress"]
    for name, tensor in a["model"].items():
        assert torch.equal(tensor, b["model"][name]), name
    lines_a = (Path(straight.run_dir) / "metrics.jsonl").read_text().splitlines()
    lines_b = (Path(interrupted.run_dir) / "metrics.jsonl").read_text().splitlines()
    strip = lambda line: {k: v for k, v in json.loads(line).items() if k != "elapsed_s"}
    assert [strip(x) for x in lines_a] == [strip(x) for x in lines_b]
