"""Pictures of a run: learning curves from metrics.jsonl, attention maps of one translation.

matplotlib is an optional extra (`pip install 'tinyt[plot]'`) and is imported only when a
picture is drawn. Figures are built with matplotlib's object-oriented API on the Agg canvas,
never through pyplot: nothing opens a window, and a caller's own pyplot backend and figures
are left alone. Every figure has a fixed size and dpi, so the PNG's pixel size is known.
"""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Any

import torch

from tinyt.errors import TinytError
from tinyt.tokenizer import BOS_ID, EOS_ID
from tinyt.writing import atomic_write_bytes

# (width, height) in inches and dots per inch of each figure: PNGs of 1000x750 and 1400x650.
CURVES_SIZE, CURVES_DPI = (10.0, 7.5), 100
ATTENTION_SIZE, ATTENTION_DPI = (14.0, 6.5), 100

# Keys every metrics.jsonl line has (tinyt.training writes them at each validation);
# valid_bleu is there only when train.valid_bleu is on.
METRIC_KEYS = ("step", "train_loss", "valid_loss", "valid_ppl", "lr")


def _new_figure(size: tuple[float, float], dpi: int):
    """An empty matplotlib Figure on an Agg canvas, or TinytError if matplotlib is missing."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        raise TinytError("drawing pictures needs matplotlib: pip install 'tinyt[plot]'") from None
    fig = Figure(figsize=size, dpi=dpi, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _save(fig, out_png: str | Path) -> Path:
    """Write `fig` to `out_png` (format from the suffix, PNG without one), making its folder.
    No bbox_inches="tight": it would crop the canvas and change the pixel size."""
    out_png = Path(out_png)
    image = io.BytesIO()  # drawn in memory, then written atomically with tinyt.writing
    try:
        fig.savefig(image, dpi=fig.dpi, format=out_png.suffix[1:].lower() or "png")
    except ValueError as exc:  # an unknown format suffix
        raise TinytError(f"could not write {out_png}: {exc}; use a .png file name") from None
    return atomic_write_bytes(out_png, image.getvalue())


def load_metrics(run_dir: str | Path) -> list[dict[str, Any]]:
    """The validation records of run_dir/metrics.jsonl, in step order; TinytError if the file
    is missing, empty, or has a line that is not a complete record."""
    path = Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        raise TinytError(f"{path} not found; metrics are written at every validation, so train "
                         "the run (at least until its first validation) or pick another run")
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise TinytError(f"could not read {path}: {exc}") from None
    records = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
            if not isinstance(record, dict):
                raise ValueError("not a JSON object")
            missing = [key for key in METRIC_KEYS if not isinstance(record.get(key), (int, float))]
            if missing:
                raise ValueError(f"no number for {', '.join(missing)}")
        except ValueError as exc:  # json.JSONDecodeError is a ValueError
            raise TinytError(f"{path} line {number} is damaged ({str(exc)[:80]}); delete that "
                             "line or retrain the run") from None
        records.append(record)
    if not records:
        raise TinytError(f"{path} is empty: the run has not been validated yet; train it "
                         "until its first validation")
    return sorted(records, key=lambda r: r["step"])


def plot_learning_curves(run_dir: str | Path, out_png: str | Path) -> Path:
    """Draw a run's learning curves from run_dir/metrics.jsonl into `out_png`; returns its path.

    A 2x2 figure, all against the training step: training and validation loss (best validation
    marked), validation perplexity (log scale), validation BLEU, learning rate (log scale).
    The PNG is 1000x750 pixels (10x7.5 inches at 100 dpi).
    """
    records = load_metrics(run_dir)
    run_dir = Path(run_dir)
    steps = [r["step"] for r in records]
    best = min(records, key=lambda r: r["valid_loss"])

    fig = _new_figure(CURVES_SIZE, CURVES_DPI)
    (loss_ax, ppl_ax), (bleu_ax, lr_ax) = fig.subplots(2, 2, sharex=True)
    fig.suptitle(f"{run_dir.name}: best valid loss {best['valid_loss']:.3f} "
                 f"(ppl {best['valid_ppl']:.2f}) at step {best['step']}")

    # The two losses are not the same quantity: training loss is label-smoothed and taken
    # with dropout on, validation loss is the plain NLL in eval mode, so train can sit above.
    loss_ax.plot(steps, [r["train_loss"] for r in records], "o-", ms=3,
                 label="train (label-smoothed, dropout)")
    loss_ax.plot(steps, [r["valid_loss"] for r in records], "o-", ms=3, label="valid (NLL)")
    loss_ax.plot([best["step"]], [best["valid_loss"]], "*", ms=12, color="black",
                 label="best valid")
    loss_ax.set(title="loss per target token", ylabel="nats")
    loss_ax.legend()

    ppl_ax.plot(steps, [r["valid_ppl"] for r in records], "o-", ms=3, color="C1")
    ppl_ax.set(title="validation perplexity", yscale="log")

    with_bleu = [r for r in records if isinstance(r.get("valid_bleu"), (int, float))]
    if with_bleu:
        bleu_ax.plot([r["step"] for r in with_bleu], [r["valid_bleu"] for r in with_bleu],
                     "o-", ms=3, color="C2")
    else:
        bleu_ax.text(0.5, 0.5, "no BLEU in metrics.jsonl\n(train.valid_bleu was false)",
                     ha="center", va="center", transform=bleu_ax.transAxes, color="gray")
    bleu_ax.set(title="validation BLEU (greedy)", xlabel="step", ylabel="BLEU")

    lr_ax.plot(steps, [r["lr"] for r in records], "o-", ms=3, color="C3")
    # Log scale: each ReduceLROnPlateau cut (a constant factor) is a step of the same height.
    lr_ax.set(title="learning rate (at each validation)", xlabel="step",
              yscale="log" if all(r["lr"] > 0 for r in records) else "linear")

    for ax in (loss_ax, ppl_ax, bleu_ax, lr_ax):
        ax.grid(True, alpha=0.3)
    return _save(fig, out_png)


def plot_attention(translator, sentence: str, out_png: str | Path, layer: int = -1,
                   head: int = 0, beam_size: int = 1) -> Path:
    """Translate `sentence` and draw where one decoder layer's head attends; returns the path.

    translator: a tinyt.translation.Translator. The translation (beam search of `beam_size`)
    is run back through the model teacher-forced: source `x1 … xn <eos>`, decoder input
    `<bos> y1 … ym`. Two panels share their rows, one per decoder position, labelled with the
    token that position produced (y1 … ym, then <eos>):
      left, cross-attention (m+1, n+1): which source pieces it read;
      right, decoder self-attention (m+1, m+1) over the decoder input `<bos> y1 … ym`; the
      causal mask leaves the upper triangle empty (drawn grey).
    Tick labels are SentencePiece pieces (▁ marks a word start). `layer` counts decoder layers
    from 0, negative from the end (-1: the last); `head` counts from 0.
    The PNG is 1400x650 pixels (14x6.5 inches at 100 dpi).
    """
    model, tokenizers = translator.model, translator.tokenizers
    n_layers, n_heads = model.config.dec_layers, model.config.n_heads
    if not -n_layers <= layer < n_layers:
        raise TinytError(f"layer {layer} does not exist: the model has {n_layers} decoder "
                         f"layers, 0 to {n_layers - 1} (or -1 to -{n_layers} from the end)")
    if not 0 <= head < n_heads:
        raise TinytError(f"head {head} does not exist: the model has {n_heads} attention heads, "
                         f"0 to {n_heads - 1}")
    if beam_size < 1:
        raise TinytError(f"beam size must be at least 1, not {beam_size}")
    layer = layer % n_layers

    seen = translator.attention(sentence, beam_size=beam_size)
    src_ids, out_ids = seen.source_ids, seen.target_ids
    cross = seen.maps["cross"][layer][head]  # (m+1, n+1)
    self_attn = seen.maps["decoder_self"][layer][head]  # (m+1, m+1)

    src_labels = [tokenizers.src.id_to_piece(i) for i in src_ids + [EOS_ID]]
    in_labels = [tokenizers.tgt.id_to_piece(i) for i in [BOS_ID] + out_ids]
    out_labels = [tokenizers.tgt.id_to_piece(i) for i in out_ids + [EOS_ID]]
    translation = tokenizers.decode_tgt([out_ids])[0]

    fig = _new_figure(ATTENTION_SIZE, ATTENTION_DPI)
    # Column widths in proportion to the number of keys, so a cell is as wide in both panels.
    cross_ax, self_ax = fig.subplots(1, 2, sharey=True, width_ratios=[len(src_labels),
                                                                       len(in_labels)])
    title = f"{sentence.strip()}  →  {translation}"
    fig.suptitle(title if len(title) <= 150 else title[:149] + "…")
    # The future is masked, not merely improbable: hide those cells instead of colouring them 0.
    future = torch.ones_like(self_attn, dtype=torch.bool).triu(1)
    self_masked = self_attn.masked_fill(future, float("nan")).numpy()

    # White for probability 0, dark blue for 1; NaN (the masked future) light grey.
    from matplotlib import colormaps

    cmap = colormaps["Blues"].with_extremes(bad="#d9d9d9")
    which = f"layer {layer} of 0-{n_layers - 1}, head {head}"
    image = cross_ax.imshow(cross.numpy(), cmap=cmap, vmin=0.0, vmax=1.0, aspect="auto",
                            interpolation="nearest")
    self_ax.imshow(self_masked, cmap=cmap, vmin=0.0, vmax=1.0, aspect="auto",
                   interpolation="nearest")
    cross_ax.set(title=f"cross-attention, {which}", xlabel="source piece",
                 ylabel="producing target piece")
    self_ax.set(title=f"decoder self-attention, {which}", xlabel="decoder input piece")

    # Long sentences get smaller tick labels, so the fixed canvas still holds them.
    most = max(len(src_labels), len(in_labels))
    fontsize = max(4.0, min(10.0, 300.0 / most))
    for ax, labels in ((cross_ax, src_labels), (self_ax, in_labels)):
        ax.set_xticks(range(len(labels)), labels, rotation=90, fontsize=fontsize)
    cross_ax.set_yticks(range(len(out_labels)), out_labels, fontsize=fontsize)
    fig.colorbar(image, ax=[cross_ax, self_ax], shrink=0.8, label="attention probability")
    return _save(fig, out_png)

