"""Attention capture matches the fused path and respects the masks; the pictures get drawn at
their documented sizes, and bad input or a missing matplotlib fail with one clear error."""

import json
import struct
import sys
from pathlib import Path

import pytest
import torch

from tinyt.config import ModelConfig, load_config
from tinyt.errors import TinytError
from tinyt.model import Transformer
from tinyt.plotting import plot_attention, plot_learning_curves
from tinyt.tokenizer import BOS_ID, EOS_ID, PAD_ID

pytest.importorskip("matplotlib")

VOCAB = 50
CURVES_PIXELS = (1000, 750)
ATTENTION_PIXELS = (1400, 650)


def make_model(**overrides) -> Transformer:
    torch.manual_seed(0)
    config = ModelConfig(d_model=32, n_heads=4, enc_layers=2, dec_layers=3, d_ff=64,
                         dropout=0.0, **overrides)
    return Transformer(config, VOCAB, VOCAB).eval()


def padded_batch() -> tuple[torch.Tensor, torch.Tensor]:
    """src (3, 7) with 0, 2 and 4 padding positions, each row ending in <eos>; tgt_in (3, 6)
    starting with <bos>, the last row padded."""
    generator = torch.Generator().manual_seed(1)
    src = torch.randint(4, VOCAB, (3, 7), generator=generator)
    for row, length in enumerate((7, 5, 3)):
        src[row, length - 1] = EOS_ID
        src[row, length:] = PAD_ID
    tgt = torch.randint(4, VOCAB, (3, 6), generator=generator)
    tgt[:, 0] = BOS_ID
    tgt[2, 4:] = PAD_ID
    return src, tgt


def all_attention(model: Transformer):
    return ([layer.self_attn for layer in model.encoder]
            + [m for layer in model.decoder for m in (layer.self_attn, layer.cross_attn)])


def png_size(path: Path) -> tuple[int, int]:
    """(width, height) from the PNG's IHDR chunk, which always comes first."""
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and data[12:16] == b"IHDR"
    return struct.unpack(">II", data[16:24])


# -- attention capture -----------------------------------------------------------------------


@pytest.mark.parametrize("pre_norm", [True, False])
def test_capture_gives_the_same_outputs_as_sdpa(pre_norm):
    model = make_model(pre_norm=pre_norm)
    src, tgt = padded_batch()
    fused = model(src, tgt)
    modules = all_attention(model)
    for module in modules:
        module.capture = []
    explicit = model(src, tgt)
    for module in modules:
        assert len(module.capture) == 1
        module.capture = None
    torch.testing.assert_close(explicit, fused, rtol=0, atol=1e-5)


def test_capture_during_cached_decoding_matches():
    model = make_model()
    src, tgt = padded_batch()
    uncached = model.start_decoding(src, use_cache=False)
    expected = [model.decode_step(tgt[:, : t + 1], uncached) for t in range(3)]
    for module in all_attention(model):
        module.capture = []
    state = model.start_decoding(src)
    for t in range(3):
        torch.testing.assert_close(model.decode_step(tgt[:, : t + 1], state), expected[t],
                                   rtol=0, atol=1e-5)
    step_maps = model.decoder[0].self_attn.capture
    assert [tuple(p.shape) for p in step_maps] == [(3, 4, 1, t + 1) for t in range(3)]


def test_attention_maps_are_probabilities_with_exact_zeros_at_masks():
    model = make_model()
    model.train()  # attention_maps must switch dropout off and then restore the mode
    src, tgt = padded_batch()
    maps = model.attention_maps(src, tgt)
    assert model.training
    assert all(m.capture is None for m in all_attention(model))
    assert [len(maps[k]) for k in ("encoder_self", "decoder_self", "cross")] == [2, 3, 3]
    for name, shape in (("encoder_self", (3, 4, 7, 7)), ("decoder_self", (3, 4, 6, 6)),
                        ("cross", (3, 4, 6, 7))):
        for probs in maps[name]:
            assert probs.shape == shape and probs.dtype == torch.float32
            assert not probs.requires_grad
            torch.testing.assert_close(probs.sum(-1), torch.ones(shape[:-1]))
    for probs in maps["decoder_self"]:
        future = torch.ones(6, 6, dtype=torch.bool).triu(1)
        assert (probs[..., future] == 0).all()
        assert (probs[..., ~future] > 0).all()
    padding = (src == PAD_ID)[:, None, None, :]  # (B, 1, 1, S)
    for probs in maps["cross"] + maps["encoder_self"]:
        assert (probs.masked_select(padding) == 0).all()
        assert (probs.masked_select(~padding) > 0).all()


def test_attention_maps_leave_the_model_unchanged():
    model = make_model()
    src, tgt = padded_batch()
    before = model(src, tgt)
    model.attention_maps(src, tgt)
    torch.testing.assert_close(model(src, tgt), before, rtol=0, atol=0)


# -- learning curves -------------------------------------------------------------------------


def write_metrics(run_dir: Path, bleu: bool = True) -> Path:
    """A metrics.jsonl like tinyt.training writes: warmup, then one plateau cut of the lr."""
    run_dir.mkdir(parents=True, exist_ok=True)
    rows = [(123, 8.15, 6.25, 0.01, 6.15e-05), (246, 6.02, 4.92, 2.95, 1.23e-04),
            (369, 5.31, 4.29, 3.71, 1.85e-04), (492, 4.87, 3.81, 7.20, 2.46e-04),
            (615, 4.54, 3.83, 6.90, 1.23e-04)]
    lines = []
    for epoch, (step, train_loss, valid_loss, valid_bleu, lr) in enumerate(rows, start=1):
        record = {"step": step, "epoch": epoch, "train_loss": train_loss,
                  "valid_loss": valid_loss, "valid_ppl": round(2.718281828 ** valid_loss, 3)}
        if bleu:
            record["valid_bleu"] = valid_bleu
        record.update(lr=lr, elapsed_s=250.0 * epoch, best=epoch < 5)
        lines.append(json.dumps(record) + "\n")
    (run_dir / "metrics.jsonl").write_text("".join(lines), encoding="utf-8")
    return run_dir


@pytest.mark.parametrize("bleu", [True, False])
def test_learning_curves_png(tmp_path, bleu):
    run_dir = write_metrics(tmp_path / "run", bleu=bleu)
    out = plot_learning_curves(run_dir, tmp_path / "pictures" / "curves.png")
    assert out == tmp_path / "pictures" / "curves.png"
    assert out.stat().st_size > 10_000
    assert png_size(out) == CURVES_PIXELS


@pytest.mark.parametrize("content, message", [
    (None, "not found"),
    ("", "is empty"),
    ("\n\n", "is empty"),
    ('{"step": 123, "epoch": 1, "train_loss": 8.1, "valid_lo', "line 1 is damaged"),
    ('{"step": 1, "train_loss": 8.1, "valid_loss": 6.2, "valid_ppl": 500.0, "lr": 1e-4}\n'
     "[1, 2, 3]\n", "line 2 is damaged"),
    ('{"step": 1, "train_loss": 8.1, "valid_loss": 6.2, "valid_ppl": 500.0}\n', "lr"),
    ('{"step": "one", "train_loss": 8.1, "valid_loss": 6.2, "valid_ppl": 500.0, "lr": 1}\n',
     "step"),
])
def test_learning_curves_reject_missing_or_damaged_metrics(tmp_path, content, message):
    if content is not None:
        (tmp_path / "metrics.jsonl").write_text(content, encoding="utf-8")
    with pytest.raises(TinytError, match=message):
        plot_learning_curves(tmp_path, tmp_path / "curves.png")
    assert not (tmp_path / "curves.png").exists()


def test_missing_matplotlib_is_a_clear_error(tmp_path, monkeypatch):
    run_dir = write_metrics(tmp_path / "run")
    # None in sys.modules makes `import matplotlib` (and its submodules) raise ImportError.
    for name in [m for m in sys.modules if m == "matplotlib" or m.startswith("matplotlib.")]:
        monkeypatch.setitem(sys.modules, name, None)
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    with pytest.raises(TinytError, match=r"matplotlib: pip install 'tinyt\[plot\]'"):
        plot_learning_curves(run_dir, tmp_path / "curves.png")


# -- attention pictures of a trained run -----------------------------------------------------


@pytest.fixture(scope="module")
def translator(module_small_corpus, tiny_config_for, write_config, tmp_path_factory):
    """A Translator over a tiny model trained for one epoch on 200 Multi30k pairs."""
    from tinyt.loading import load_translator
    from tinyt.training import train

    raw = tiny_config_for(module_small_corpus, tmp_path_factory.mktemp("plot") / "run")
    raw["model"]["dec_layers"] = 2
    raw["train"]["valid_bleu"] = False
    path = write_config(raw, tmp_path_factory.mktemp("config") / "tiny.yaml")
    summary = train(load_config(path), progress_bars=False)
    return load_translator(summary["run_dir"], device="cpu")


@pytest.mark.parametrize("layer, head, beam", [(-1, 0, 1), (0, 1, 2)])
def test_attention_png(translator, tmp_path, layer, head, beam):
    out = plot_attention(translator, "Ein Hund läuft über die Wiese.", tmp_path / "attn.png",
                         layer=layer, head=head, beam_size=beam)
    assert out.stat().st_size > 10_000
    assert png_size(out) == ATTENTION_PIXELS


@pytest.mark.parametrize("kwargs, message", [
    ({"layer": 2}, "layer 2 does not exist"),
    ({"layer": -3}, "layer -3 does not exist"),
    ({"head": 2}, "head 2 does not exist"),
    ({"head": -1}, "head -1 does not exist"),
    ({"beam_size": 0}, "beam size"),
    ({"sentence": "   "}, "sentence is empty"),
])
def test_attention_rejects_bad_arguments(translator, tmp_path, kwargs, message):
    sentence = kwargs.pop("sentence", "Ein Hund läuft.")
    with pytest.raises(TinytError, match=message):
        plot_attention(translator, sentence, tmp_path / "attn.png", **kwargs)
    assert not (tmp_path / "attn.png").exists()
