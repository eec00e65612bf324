"""Training really learns (a tiny model memorises a small corpus) and resume is exact."""

import gzip
import json
from pathlib import Path

import pytest
import torch

from tinyt.checkpoint import load_checkpoint
from tinyt.config import config_from_dict
from tinyt.evaluation import score_translations
from tinyt.loading import load_translator
from tinyt.training import train

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


def assert_same_last_checkpoint(run_a: str, run_b: str) -> None:
    """The two runs' last.pt hold the same progress and bit-identical weights."""
    a = load_checkpoint(Path(run_a) / "last.pt")
    b = load_checkpoint(Path(run_b) / "last.pt")
    assert a["progress"] == b["progress"]
    for name, tensor in a["model"].items():
        assert torch.equal(tensor, b["model"][name]), name


def train_straight_and_resumed(raw: dict, tmp_path: Path, stop: int) -> None:
    """Train `raw` to its max_steps in one go, and again in tmp_path/b stopped at step `stop`
    and resumed (in this process); the two runs' last.pt must be bit-identical."""
    straight = config_from_dict(raw)
    train(straight, progress_bars=False)
    total = raw["train"]["max_steps"]
    interrupted = config_from_dict({**raw, "run_dir": str(tmp_path / "b"),
                                    "train": {**raw["train"], "max_steps": stop}})
    train(interrupted, progress_bars=False)
    interrupted.train.max_steps = total
    train(interrupted, resume=True, progress_bars=False)
    assert_same_last_checkpoint(straight.run_dir, interrupted.run_dir)


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
    translator = load_translator(config.run_dir)
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

    assert_same_last_checkpoint(straight.run_dir, interrupted.run_dir)
    lines_a = (Path(straight.run_dir) / "metrics.jsonl").read_text().splitlines()
    lines_b = (Path(interrupted.run_dir) / "metrics.jsonl").read_text().splitlines()
    strip = lambda line: {k: v for k, v in json.loads(line).items() if k != "elapsed_s"}
    assert [strip(x) for x in lines_a] == [strip(x) for x in lines_b]


def test_accumulated_gradients_equal_one_big_batch(tmp_path, short_pairs):
    from tinyt.data import collate, load_split, tokenize
    from tinyt.tokenizer import train_or_load
    from tinyt.training import Trainer

    write_pairs(tmp_path, "train", short_pairs[:40])
    write_pairs(tmp_path, "val", short_pairs[40:45])
    # float32: on a CPU with native bf16, amp "auto" trains in bf16, whose rounding differs
    # between one batch of 40 pairs and two of 15 and 25 by more than the tolerances below.
    config = config_from_dict(tiny_config(tmp_path, tmp_path, warmup_steps=0, clip_norm=0.5,
                                          label_smoothing=0.1, amp="none"))
    text = load_split(config.data, "train")
    tokenizers = train_or_load(config.tokenizer, text.src, text.tgt, tmp_path / "tok")
    data = tokenize(text, tokenizers)
    trainers = []
    for _ in range(2):
        torch.manual_seed(0)
        trainer = Trainer(config, tokenizers, data, data, text.tgt, progress_bars=False)
        # Plain SGD makes the weight change equal the (clipped) gradient; Adam's first step is
        # about lr * sign(gradient), which rounding noise in tiny gradients could flip.
        trainer.optimizer = torch.optim.SGD(trainer.model.parameters(), lr=1.0)
        trainers.append(trainer)
    first, second = torch.arange(0, 15), torch.arange(15, 40)
    before = trainers[0].model.tgt_embed.weight.detach().clone()
    loss_a, _ = trainers[0].train_step([collate(data, first), collate(data, second)])
    loss_b, _ = trainers[1].train_step(collate(data, torch.cat([first, second])))
    torch.testing.assert_close(loss_a, loss_b, rtol=1e-5, atol=1e-4)
    for (name, a), b in zip(trainers[0].model.named_parameters(), trainers[1].model.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=name)
    assert not torch.equal(trainers[0].model.tgt_embed.weight, before)  # the update happened


def test_accumulate_steps_in_the_loop(tmp_path, short_pairs):
    write_pairs(tmp_path, "train", short_pairs[:60])
    write_pairs(tmp_path, "val", short_pairs[60:70])
    config = config_from_dict(tiny_config(tmp_path, tmp_path, max_epochs=2, batch_tokens=300,
                                          accumulate_steps=3))
    summary = train(config, progress_bars=False)
    progress = load_checkpoint(Path(config.run_dir) / "last.pt")["progress"]
    assert progress["epoch"] == 2 and progress["batch_in_epoch"] == 0
    from tinyt.data import load_split, make_batches, tokenize, trainable_indices
    from tinyt.tokenizer import Tokenizers

    data = tokenize(load_split(config.data, "train"),
                    Tokenizers.load(Path(config.run_dir) / "tokenizer"))
    per_epoch = [len(make_batches(data, trainable_indices(data, 40), 300,
                                  torch.Generator().manual_seed(3 * 100_003 + epoch)))
                 for epoch in range(2)]
    assert min(per_epoch) > 3
    assert summary["steps"] == sum(-(-n // 3) for n in per_epoch)  # ceil: a short last update


def test_streaming_training_covers_the_stream_and_resumes_exactly(tmp_path, short_pairs):
    """data.streaming: every epoch reads the whole stream (in windows of stream_buffer pairs),
    and a resumed run re-reads the stream up to its position and continues exactly."""
    write_pairs(tmp_path, "train", short_pairs[:60])
    write_pairs(tmp_path, "val", short_pairs[60:70])
    raw = tiny_config(tmp_path / "a", tmp_path, max_steps=24, valid_every=8, batch_tokens=300)
    raw["data"].update(streaming=True, stream_buffer=25)  # 3 windows an epoch
    raw["model"]["dropout"] = 0.2
    summary = train(config_from_dict(raw), progress_bars=False)
    assert summary["steps"] == 24 and summary["epochs"] >= 2 and summary["train_pairs"] is None
    raw["run_dir"] = str(tmp_path / "again")
    train_straight_and_resumed(raw, tmp_path, stop=12)


def test_a_run_ending_by_max_epochs_validates_and_saves_its_last_step(tmp_path, short_pairs):
    # 40 pairs in 400-token batches: a few batches an epoch, so with valid_every 7 the last
    # step of epoch 3 falls between validations; it must still be validated and saved.
    write_pairs(tmp_path, "train", short_pairs[:40])
    write_pairs(tmp_path, "val", short_pairs[40:50])
    config = config_from_dict(tiny_config(tmp_path, tmp_path, max_epochs=3, valid_every=7))
    summary = train(config, progress_bars=False)
    last_step = summary["steps"]
    assert summary["epochs"] == 3 and last_step % 7 != 0, summary
    metrics = [json.loads(line) for line in (Path(config.run_dir) / "metrics.jsonl").open()]
    assert [m["step"] for m in metrics] == [*range(7, last_step, 7), last_step]
    assert load_checkpoint(Path(config.run_dir) / "last.pt")["progress"]["step"] == last_step
