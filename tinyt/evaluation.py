"""Scores of a model on a split: teacher-forced loss and perplexity, and BLEU/chrF of real
decoded translations (sacrebleu, corpus level)."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import sacrebleu
import torch
import torch.nn.functional as F
from tqdm import tqdm

from tinyt.config import Config
from tinyt.config import check_bleu_tokenizer_installed
from tinyt.data import (TokenizedText, collate, held_out_home, load_split, make_batches,
                        normalize_text, tokenize)
from tinyt.errors import TinytError
from tinyt.hardware import autocast
from tinyt.model import Transformer
from tinyt.tokenizer import PAD_ID, Tokenizers
from tinyt.translation import Translator
from tinyt.writing import append_text, atomic_write_text, check_writable_dir


@torch.no_grad()
def teacher_forced_nll(model: Transformer, data: TokenizedText, batch_tokens: int,
                       device: torch.device, amp: torch.dtype | None = None,
                       progress: bool = False) -> tuple[float, int]:
    """Mean negative log-likelihood per target token (<eos> included, no label smoothing) and
    the number of target tokens, over every pair of `data` that fits the model's positions."""
    was_training = model.training
    model.eval()
    limit = model.config.max_positions
    fits = (data.src_lengths + 1 <= limit) & (data.tgt_lengths + 1 <= limit)
    indices = fits.nonzero().flatten()
    total = torch.zeros((), dtype=torch.float64, device=device)
    n_tokens = 0
    for idx in tqdm(make_batches(data, indices, batch_tokens), desc="scoring", unit="batch",
                    leave=False, disable=not progress, dynamic_ncols=True):
        batch = collate(data, idx).to(device)
        with autocast(device, amp):
            logp = model.log_probs(batch.src, batch.tgt_in)  # (B, T, V)
        total += F.nll_loss(logp.float().flatten(0, 1), batch.tgt_out.flatten(),
                            ignore_index=PAD_ID, reduction="sum")
        n_tokens += batch.n_tokens
    model.train(was_training)
    return float(total) / max(n_tokens, 1), n_tokens


def perplexity(nll: float) -> float:
    return math.exp(min(nll, 100.0))


def bleu_metric(tokenize: str = "13a") -> sacrebleu.metrics.BLEU:
    """sacreBLEU's corpus BLEU (cased) with tokenizer `tokenize` (decoding.bleu_tokenize as a
    Config decides it: zh, ja-mecab, ko-mecab or 13a by the target language). A tokenizer
    whose packages are missing is a TinytError naming the pip extra."""
    check_bleu_tokenizer_installed(tokenize)
    try:
        return sacrebleu.metrics.BLEU(tokenize=tokenize)
    except (RuntimeError, ImportError, OSError) as exc:  # MeCab without its dictionary, ...
        reason = " ".join(str(exc).split())[:200]
        raise TinytError(f"sacreBLEU cannot use the BLEU tokenizer {tokenize} ({reason}); "
                         "install what it needs or set decoding.bleu_tokenize, e.g. char") from None


def score_translations(hypotheses: list[str], references: list[str],
                       bleu_tokenize: str = "13a") -> dict[str, object]:
    """Corpus BLEU (cased, tokenized by `bleu_tokenize`) and chrF with sacrebleu's signatures,
    which name the tokenizer (e.g. tok:zh)."""
    bleu = bleu_metric(bleu_tokenize)
    chrf = sacrebleu.metrics.CHRF()
    bleu_score = bleu.corpus_score(hypotheses, [references])
    chrf_score = chrf.corpus_score(hypotheses, [references])
    return {
        "bleu": round(bleu_score.score, 2),
        "chrf": round(chrf_score.score, 2),
        "bleu_detail": str(bleu_score),
        "bleu_signature": str(bleu.get_signature()),
        "chrf_signature": str(chrf.get_signature()),
    }


def evaluate_split(config: Config, tokenizers: Tokenizers, model: Transformer | Translator,
                   split: str, device: torch.device, out_dir: Path, beam_size: int | None = None,
                   length_penalty: float | None = None, progress: bool = True,
                   checkpoint: str = "best.pt", step: int | None = None) -> dict[str, object]:
    """Score `model` on a split of the config's corpus, as `tinyt evaluate` does. `model` is
    a Transformer, an Ensemble of them (tinyt.ensemble), or a Translator (tinyt.loading's):
    over either of those, or a CTranslate2 export's, which scores and decodes with CTranslate2.

    Teacher-forced loss and perplexity, then beam search (beam_size, default the config's),
    BLEU (tokenized by decoding.bleu_tokenize) and chrF. Sources and references are normalised
    as data.normalize says; a split held out of the training file (data.holdout) is read from
    the run directory: `out_dir`, or the config's run_dir when `out_dir` is a bundle's folder.
    Hypotheses go to `out_dir/translations/SPLIT.beamK.LANG` and the scores are appended to
    `out_dir/evaluations.jsonl`; the returned dict holds both.
    """
    bleu_metric(config.decoding.bleu_tokenize)  # a missing tokenizer fails before decoding
    hyp_dir = check_writable_dir(out_dir / "translations")  # so does an unwritable out_dir
    run_dir = held_out_home(out_dir, Path(config.run_dir))
    text = normalize_text(load_split(config.data, split, run_dir), config.data.normalize)
    if len(text) == 0:
        raise TinytError(f"split {split!r} ({text.name}) is empty")
    data = tokenize(text, tokenizers, desc=f"tokenizing {split}")
    translator = (model if isinstance(model, Translator)
                  else Translator(model, tokenizers, config.decoding, device, config.train.amp))
    if translator.model is not None:  # tinyt's own model, or an Ensemble of them
        nll, n_tokens = teacher_forced_nll(translator.model, data, config.train.batch_tokens,
                                           translator.device, translator.score_amp_dtype,
                                           progress=progress)
    else:  # a CTranslate2 export's translator (tinyt.ctranslate2_model) scores and decodes
        nll, n_tokens = translator.teacher_forced_nll(data, config.train.batch_tokens,
                                                      progress=progress)
    beam = beam_size or config.decoding.beam_size
    hyps = translator.translate(text.src, beam_size=beam, length_penalty=length_penalty,
                                progress=progress)
    scores = score_translations(hyps, text.tgt, config.decoding.bleu_tokenize)
    # best.pt's hypotheses are SPLIT.beamK.LANG; another checkpoint's name goes in too, so
    # evaluating averaged.pt does not overwrite them.
    stem = checkpoint[:-3] if checkpoint.endswith(".pt") else checkpoint
    tag = "" if checkpoint == "best.pt" else "." + re.sub(r"[^\w-]+", "_", stem)
    hyp_path = hyp_dir / f"{split}.beam{beam}{tag}.{config.data.tgt_lang}"
    atomic_write_text(hyp_path, "".join(h + "\n" for h in hyps))
    result = {"split": split, "sentences": len(text), "checkpoint": checkpoint, "step": step,
              "beam": beam, "loss": round(nll, 4),
              "ppl": round(perplexity(nll), 3), "target_tokens": n_tokens, **scores,
              "hypotheses": str(hyp_path)}
    append_text(out_dir / "evaluations.jsonl", json.dumps(result) + "\n")
    return result


def format_evaluation(result: dict[str, object]) -> str:
    """The lines `tinyt evaluate` prints for a result of evaluate_split."""
    return "\n".join([
        f"  loss {result['loss']:.4f}  ppl {result['ppl']:.2f}",
        f"  {result['bleu_detail']}",
        f"  BLEU signature: {result['bleu_signature']}",
        f"  chrF2 {result['chrf']:.2f}  signature: {result['chrf_signature']}",
        f"  hypotheses: {result['hypotheses']}",
    ])
