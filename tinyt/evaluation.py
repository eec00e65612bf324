"""Scores of a model on a split: teacher-forced loss and perplexity, and BLEU/chrF of real
decoded translations (sacrebleu, corpus level)."""

from __future__ import annotations

import math

import sacrebleu
import torch
import torch.nn.functional as F
from tqdm import tqdm

from tinyt.data import TokenizedText, collate, make_batches
from tinyt.hardware import autocast
from tinyt.model import Transformer
from tinyt.tokenizer import PAD_ID


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
            logits = model.logits(model(batch.src, batch.tgt_in))
        total += F.cross_entropy(logits.float().flatten(0, 1), batch.tgt_out.flatten(),
                                 ignore_index=PAD_ID, reduction="sum")
        n_tokens += batch.n_tokens
    model.train(was_training)
    return float(total) / max(n_tokens, 1), n_tokens


def perplexity(nll: float) -> float:
    return math.exp(min(nll, 100.0))


def score_translations(hypotheses: list[str], references: list[str]) -> dict[str, object]:
    """Corpus BLEU (13a tokenization, cased) and chrF with sacrebleu's signatures."""
    bleu = sacrebleu.metrics.BLEU()
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
