"""Translating text with a trained model: tokenize, batch by length, search, detokenize."""

from __future__ import annotations

import sys
from collections.abc import Sequence
from pathlib import Path

import torch
from tqdm import tqdm

from tinyt.bundle import load_bundle, load_for_inference
from tinyt.checkpoint import load_trained
from tinyt.config import MAX_BEAM_SIZE, DecodingConfig
from tinyt.errors import TinytError
from tinyt.hardware import amp_dtype, autocast, configure_backends, resolve_device
from tinyt.model import Transformer
from tinyt.search import beam_search, max_output_lengths
from tinyt.tokenizer import EOS_ID, PAD_ID, Tokenizers

# Scores (hypotheses x vocabulary) one decoding batch may hold at a step: 128 MiB of float32.
MAX_DECODE_SCORES = 2**25


class Translator:
    """A trained model with its tokenizers and decoding settings. For example:

        translator = Translator.load("runs/multi30k_de_en")  # or a bundle: "model.tinyt"
        translator.translate(["Ein Hund läuft.", "Zwei Katzen."], beam_size=5)  # two lines
    """

    def __init__(self, model: Transformer, tokenizers: Tokenizers, decoding: DecodingConfig,
                 device: torch.device | str = "cpu", amp: str = "auto"):
        self.device = torch.device(device) if isinstance(device, str) else device
        configure_backends(self.device)
        self.model = model.to(self.device).eval()
        self.tokenizers = tokenizers
        self.decoding = decoding
        self.amp_dtype = amp_dtype(amp, self.device)
        self.max_positions = model.config.max_positions

    @classmethod
    def load(cls, path: str | Path, device: str = "auto", checkpoint: str = "best.pt"
             ) -> Translator:
        """A translator from a run directory (using its `checkpoint`), a bundle file made by
        `tinyt export` or a CTranslate2 model folder made by `tinyt export --format
        ctranslate2` (both hold one checkpoint, so `checkpoint` does not apply)."""
        from tinyt.ctranslate2_model import CTranslate2Translator, is_ctranslate2_dir

        path = Path(path)
        if path.is_dir() and is_ctranslate2_dir(path):
            if checkpoint != "best.pt":
                raise TinytError(f"checkpoint={checkpoint!r} applies to a run directory; "
                                 f"{path} holds the one checkpoint it was exported from")
            return CTranslate2Translator(path, device=resolve_device(device))
        if path.exists():
            run, bundle = (path, None) if path.is_dir() else (None, path)
            config, tokenizers, model, _ = load_for_inference(run, bundle, checkpoint)
            return cls(model, tokenizers, config.decoding, resolve_device(device),
                       config.train.amp)
        raise TinytError(f"{path} does not exist; pass a run directory (runs/NAME) or a model "
                         "bundle file made by `tinyt export`")

    @classmethod
    def from_run(cls, run_dir: str | Path, checkpoint: str = "best.pt",
                 device: str = "auto") -> Translator:
        config, tokenizers, model, _ = load_trained(run_dir, checkpoint)
        return cls(model, tokenizers, config.decoding, resolve_device(device), config.train.amp)

    @classmethod
    def from_bundle(cls, path: str | Path, device: str = "auto") -> Translator:
        config, tokenizers, model, _ = load_bundle(path)
        return cls(model, tokenizers, config.decoding, resolve_device(device), config.train.amp)

    def translate(self, sentences: str | Sequence[str], beam_size: int | None = None,
                  length_penalty: float | None = None, progress: bool = False, *,
                  beam: int | None = None) -> str | list[str]:
        """Translate `sentences`; the output has one line per input, in input order.
        Empty or whitespace-only inputs, and inputs the vocabulary reads as no pieces at all,
        give empty outputs without running the model.

        A single string gives a single string (rather than translating it character by
        character). `beam` is another name for `beam_size`; None uses the decoding config's.
        """
        if beam is not None:
            if beam_size is not None and beam_size != beam:
                raise TypeError(f"translate() got beam_size={beam_size} and beam={beam}; "
                                "pass one of them")
            beam_size = beam
        if isinstance(sentences, str):
            return self.translate([sentences], beam_size, length_penalty, progress)[0]
        sentences = list(sentences)
        real = [i for i, s in enumerate(sentences) if s.strip()]
        src_ids = self.tokenizers.encode_src([sentences[i] for i in real])
        # Text the vocabulary reads as nothing (control characters, zero-width spaces) has
        # nothing to translate either.
        real, src_ids = [i for i, ids in zip(real, src_ids) if ids], [ids for ids in src_ids if ids]
        out_ids = self.translate_ids(src_ids, beam_size, length_penalty, progress)
        texts = self.tokenizers.decode_tgt(out_ids) if out_ids else []
        result = [""] * len(sentences)
        for i, text in zip(real, texts):
            result[i] = text
        return result

    def search_settings(self, beam_size: int | None, length_penalty: float | None
                        ) -> tuple[int, float]:
        """(beam size, length penalty): the arguments, or the decoding config's where None."""
        beam = self.decoding.beam_size if beam_size is None else beam_size
        if not 1 <= beam <= MAX_BEAM_SIZE:
            raise TinytError(f"beam size {beam} is impossible; use 1 (greedy) to "
                             f"{MAX_BEAM_SIZE}")
        penalty = self.decoding.length_penalty if length_penalty is None else length_penalty
        return beam, penalty

    def fit_to_positions(self, src_ids: list[list[int]]) -> list[list[int]]:
        """Sources cut to the model's positions (with room for <eos>), with a warning on
        stderr when any had to be."""
        max_positions = self.max_positions
        too_long = sum(len(ids) + 1 > max_positions for ids in src_ids)
        if too_long:
            print(f"warning: {too_long} input sentence(s) longer than the model's "
                  f"{max_positions - 1} tokens were cut to fit", file=sys.stderr)
        return [ids[: max_positions - 1] for ids in src_ids]

    @torch.no_grad()
    def translate_ids(self, src_ids: list[list[int]], beam_size: int | None = None,
                      length_penalty: float | None = None, progress: bool = False
                      ) -> list[list[int]]:
        """Token ids in (without <eos>), token ids out (without <bos>/<eos>), input order.

        Sentences are decoded longest first in batches of similar length; a source longer than
        the model's positions allow is cut to fit, with a warning on stderr.
        """
        beam, penalty = self.search_settings(beam_size, length_penalty)
        src_ids = self.fit_to_positions(src_ids)
        max_positions = self.model.config.max_positions
        order = sorted(range(len(src_ids)), key=lambda i: -len(src_ids[i]))
        results: list[list[int]] = [[] for _ in src_ids]
        # Beam search scores beam x vocabulary continuations of every sentence at each step:
        # a large beam decodes fewer sentences together, so memory stays bounded.
        vocab = self.tokenizers.tgt_vocab_size
        size = max(1, min(self.decoding.batch_size, MAX_DECODE_SCORES // (beam * vocab)))
        bar = tqdm(total=len(order), desc=f"decoding (beam {beam})", unit="sent", leave=False,
                   disable=not progress, dynamic_ncols=True)
        for start in range(0, len(order), size):
            chunk = order[start: start + size]
            width = len(src_ids[chunk[0]]) + 1
            src = torch.full((len(chunk), width), PAD_ID, dtype=torch.long)
            for row, i in enumerate(chunk):
                src[row, : len(src_ids[i])] = torch.tensor(src_ids[i], dtype=torch.long)
                src[row, len(src_ids[i])] = EOS_ID
            src = src.to(self.device)
            max_len = max_output_lengths(src, self.decoding.max_len_ratio,
                                         self.decoding.max_len_offset, max_positions - 1)
            with autocast(self.device, self.amp_dtype):
                hyps = beam_search(self.model, src, max_len, beam, penalty)
            for i, hyp in zip(chunk, hyps):
                results[i] = hyp
            bar.update(len(chunk))
        bar.close()
        return results
