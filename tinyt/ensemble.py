"""Ensembles: several trained models decoding as one, their log-probabilities averaged at every
step (`tinyt translate --run R1 --run R2`).

An `Ensemble` offers the interface search and scoring use on a `Transformer` (`start_decoding`,
`decode_step`, `log_probs`, `config.max_positions`), so greedy, beam and n-best search, sampling,
forced decoding and evaluation run on it unchanged. Its log-probability of token y is the mean
of the members': log p(y) = (1/M) sum_m log p_m(y), a product of experts that is not
renormalised, as Marian and OpenNMT combine models. The members must share their vocabularies
(`check_same_vocabularies`): each step compares their scores of the same token ids.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch
from torch import nn

from tinyt.errors import TinytError
from tinyt.model import DecoderState, Transformer
from tinyt.tokenizer import Tokenizers


@dataclass
class EnsembleState:
    """Each member's `DecoderState` for the same N hypotheses (row i is hypothesis i in all)."""

    members: list[DecoderState]

    def select(self, rows: torch.Tensor, cross: bool = True) -> EnsembleState:
        """Keep/reorder hypotheses in every member's state (see `DecoderState.select`)."""
        return EnsembleState([state.select(rows, cross) for state in self.members])


class Ensemble(nn.Module):
    """M models with the same vocabularies, decoding as one."""

    def __init__(self, models: list[Transformer]):
        super().__init__()
        if len(models) < 2:
            raise ValueError("an ensemble needs at least two models")
        vocab = {(m.src_vocab_size, m.tgt_vocab_size) for m in models}
        if len(vocab) > 1:
            raise TinytError("the ensemble's models have vocabularies of different sizes "
                             f"({', '.join(f'{s}/{t}' for s, t in sorted(vocab))}); ensemble "
                             "runs trained with the same tokenizer")
        self.members = nn.ModuleList(models)
        # The positions every member has: sources and outputs are cut to the shortest.
        self.config = replace(models[0].config,
                              max_positions=min(m.config.max_positions for m in models))

    def num_parameters(self) -> int:
        return sum(m.num_parameters() for m in self.members)

    def log_probs(self, src: torch.Tensor, tgt_in: torch.Tensor) -> torch.Tensor:
        """src (B, S), tgt_in (B, T) -> (B, T, V): the members' teacher-forced
        log-probabilities, averaged."""
        return torch.stack([m.log_probs(src, tgt_in) for m in self.members]).mean(dim=0)

    def start_decoding(self, src: torch.Tensor, use_cache: bool = True) -> EnsembleState:
        """Encode src (B, S) with every member."""
        return EnsembleState([m.start_decoding(src, use_cache) for m in self.members])

    def decode_step(self, prefix: torch.Tensor, state: EnsembleState) -> torch.Tensor:
        """prefix (N, t) -> (N, V): the members' log-probabilities of token t+1, averaged."""
        steps = [m.decode_step(prefix, s) for m, s in zip(self.members, state.members)]
        return torch.stack(steps).mean(dim=0)


def check_same_vocabularies(tokenizers: list[Tokenizers], names: list[str]) -> None:
    """Raise TinytError unless every member encodes and decodes with the same SentencePiece
    models (compared byte for byte): an ensemble averages scores of the same token ids."""
    def models(t: Tokenizers) -> tuple[bytes, bytes]:
        return t.src.serialized_model_proto(), t.tgt.serialized_model_proto()

    first = models(tokenizers[0])
    for other, name in zip(tokenizers[1:], names[1:]):
        theirs = models(other)
        if theirs != first:
            side = "source" if theirs[0] != first[0] else "target"
            raise TinytError(f"{name} has another {side} vocabulary than {names[0]}; an "
                             "ensemble needs runs trained with the same tokenizer (the same "
                             "data and tokenizer settings, or fine-tuned with --init-from)")

