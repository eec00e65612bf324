"""Translating text with a trained model: tokenize, batch by length, search, detokenize; and
scoring given translations (forced decoding)."""

from __future__ import annotations

import hashlib
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from tqdm import tqdm

from tinyt.config import MAX_BEAM_SIZE, DecodingConfig
from tinyt.errors import TinytError
from tinyt.hardware import amp_dtype, autocast, configure_backends
from tinyt.model import Transformer
from tinyt.search import (beam_search, check_sampling, max_output_lengths, nbest_search,
                          sample_search)
from tinyt.tokenizer import BOS_ID, EOS_ID, PAD_ID, Tokenizers

# Scores (hypotheses x vocabulary) one decoding batch may hold at a step: 128 MiB of float32.
MAX_DECODE_SCORES = 2**25


@dataclass
class Attention:
    """One translation's attention (`Translator.attention`). source_ids: the source's ids
    without <eos>; target_ids: the translation's, without <bos>/<eos>. maps: as
    `Transformer.attention_maps` gives them for the one sentence, without the batch dimension:
    "cross" is dec_layers x (H, m+1, n+1), row i the decoder position that produced target
    token i (<eos> last), column j source token j (<eos> last); "decoder_self" dec_layers x
    (H, m+1, m+1); "encoder_self" enc_layers x (H, n+1, n+1)."""

    source_ids: list[int]
    target_ids: list[int]
    maps: dict[str, list[torch.Tensor]]


class Translator:
    """A trained model with its tokenizers and decoding settings. For example:

        translator = tinyt.load_translator("runs/multi30k_de_en")  # or a bundle: "model.tinyt"
        translator.translate(["Ein Hund läuft.", "Zwei Katzen."], beam_size=5)  # two lines
    """

    def __init__(self, model: Transformer, tokenizers: Tokenizers, decoding: DecodingConfig,
                 device: torch.device | str = "cpu", amp: str = "auto"):
        self.device = torch.device(device) if isinstance(device, str) else device
        configure_backends(self.device)
        self.model = model.to(self.device).eval()
        self.tokenizers = tokenizers
        self.decoding = decoding
        self.amp_dtype = amp_dtype(amp, self.device, "decode")  # search
        self.score_amp_dtype = amp_dtype(amp, self.device, "score")  # teacher-forced passes
        self.max_positions = model.config.max_positions

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
        real, src_ids = self._encode_inputs(sentences)
        out_ids = self.translate_ids(src_ids, beam_size, length_penalty, progress)
        texts = self.tokenizers.decode_tgt(out_ids) if out_ids else []
        result = [""] * len(sentences)
        for i, text in zip(real, texts):
            result[i] = text
        return result

    def translate_nbest(self, sentences: Sequence[str], nbest: int = 1,
                        beam_size: int | None = None, length_penalty: float | None = None,
                        progress: bool = False) -> list[list[tuple[str, float]]]:
        """The `nbest` best translations of each sentence with their scores, best first, one
        list per input in input order. A score is the length-normalised log-probability beam
        search ranks by: sum of token log-probs (<eos> included) / length ** length_penalty,
        <eos> counted in the length. A list may hold fewer than `nbest` when the search
        finished fewer (very short length limits). Inputs `translate` gives "" for (empty, or
        no pieces at all) give [("", 0.0)] without running the model. `nbest` must not exceed
        the beam size (TinytError).
        """
        sentences = list(sentences)
        beam, _ = self.search_settings(beam_size, length_penalty)
        if not 1 <= nbest <= beam:
            raise TinytError(f"{nbest} best translations need a beam of at least {nbest} (the "
                             f"beam is {beam}); raise the beam size (--beam {nbest})")
        real, src_ids = self._encode_inputs(sentences)
        out = self.translate_nbest_ids(src_ids, nbest, beam_size, length_penalty, progress)
        result: list[list[tuple[str, float]]] = [[("", 0.0)] for _ in sentences]
        for i, hyps in zip(real, out):
            texts = self.tokenizers.decode_tgt([ids for ids, _ in hyps])
            result[i] = [(text, score) for text, (_, score) in zip(texts, hyps)]
        return result

    def sample(self, sentences: Sequence[str], n: int = 1, temperature: float = 1.0,
               top_k: int = 0, top_p: float = 1.0, seed: int = 1,
               length_penalty: float | None = None, progress: bool = False, start: int = 0
               ) -> list[list[tuple[str, float]]]:
        """`n` random translations of each sentence, with their scores (as `translate_nbest`
        scores hypotheses), one list per input in input order, in the order drawn: for
        back-translation and data augmentation. See `tinyt.search.sample_search` for
        `temperature`, `top_k` and `top_p`. Draw j of input i comes from a generator seeded by
        (seed, start + i, j): the same inputs and arguments give the same translations,
        however they are batched, and `start` numbers the inputs from there (line `start` of a
        file, translated on its own). Inputs `translate` gives "" for give [("", 0.0)]."""
        check_sampling(temperature, top_k, top_p)
        if n < 1:
            raise TinytError(f"n={n} draws is impossible; use n >= 1")
        sentences = list(sentences)
        _, penalty = self.search_settings(1, length_penalty)
        real, src_ids = self._encode_inputs(sentences)
        # Draw j of input i is row i * n + j, seeded by (seed, i, j).
        seeds = [_draw_seed(seed, start + i, j) for i in real for j in range(n)]
        rows = [ids for ids in src_ids for _ in range(n)]
        out = self._decode(rows, 1, progress, lambda src, max_len, chunk: sample_search(
            self.model, src, max_len, [seeds[k] for k in chunk], temperature, top_k, top_p,
            penalty))
        result: list[list[tuple[str, float]]] = [[("", 0.0)] for _ in sentences]
        texts = self.tokenizers.decode_tgt([ids for ids, _ in out]) if out else []
        for k, i in enumerate(real):
            draws = range(k * n, (k + 1) * n)
            result[i] = [(texts[d], out[d][1]) for d in draws]
        return result

    def _encode_inputs(self, sentences: list[str]) -> tuple[list[int], list[list[int]]]:
        """(indices of the inputs worth translating, their source ids). Empty or
        whitespace-only inputs are left out, and so is text the vocabulary reads as nothing
        (control characters, zero-width spaces): it has nothing to translate either."""
        real = [i for i, s in enumerate(sentences) if s.strip()]
        src_ids = self.tokenizers.encode_src([sentences[i] for i in real])
        return [i for i, ids in zip(real, src_ids) if ids], [ids for ids in src_ids if ids]

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
    def attention(self, sentence: str, translation: str | None = None,
                  beam_size: int | None = None, length_penalty: float | None = None
                  ) -> Attention:
        """Where the model attends while it writes `translation` of `sentence` (default: its
        own translation, beam search with `beam_size`): one teacher-forced pass over source
        `x1 … xn <eos>` and decoder input `<bos> y1 … ym`. Needs tinyt's own Transformer (not
        an ensemble or a CTranslate2 export: TinytError). The source is cut to the model's
        positions as `translate` cuts it; a translation too long for them is a TinytError."""
        if not hasattr(self.model, "attention_maps"):
            raise TinytError("attention weights come from one tinyt model; an ensemble or a "
                             "CTranslate2 export has none to show")
        if not sentence.strip():
            raise TinytError("nothing to translate: the sentence is empty")
        src_ids = self.tokenizers.encode_src([sentence])[0][: self.max_positions - 1]
        if translation is None:
            out_ids = self.translate_ids([src_ids], beam_size, length_penalty)[0]
        else:
            out_ids = self.tokenizers.encode_tgt([translation])[0]
            if len(out_ids) + 1 > self.max_positions:
                raise TinytError(f"the translation has {len(out_ids)} tokens; the model reads "
                                 f"at most {self.max_positions - 1}")
        src = torch.tensor([src_ids + [EOS_ID]], device=self.device)
        tgt_in = torch.tensor([[BOS_ID] + out_ids], device=self.device)
        with autocast(self.device, self.score_amp_dtype):
            maps = self.model.attention_maps(src, tgt_in)
        return Attention(src_ids, out_ids,
                         {name: [m[0].float().cpu() for m in layers]
                          for name, layers in maps.items()})

    @torch.no_grad()
    def translate_ids(self, src_ids: list[list[int]], beam_size: int | None = None,
                      length_penalty: float | None = None, progress: bool = False
                      ) -> list[list[int]]:
        """Token ids in (without <eos>), token ids out (without <bos>/<eos>), input order.

        Sentences are decoded longest first in batches of similar length; a source longer than
        the model's positions allow is cut to fit, with a warning on stderr.
        """
        beam, penalty = self.search_settings(beam_size, length_penalty)
        # beam_search is looked up at each call, so that it can be replaced (in tests).
        return self._decode(src_ids, beam, progress,
                            lambda src, max_len, _: beam_search(self.model, src, max_len, beam,
                                                                penalty))

    @torch.no_grad()
    def translate_nbest_ids(self, src_ids: list[list[int]], nbest: int,
                            beam_size: int | None = None, length_penalty: float | None = None,
                            progress: bool = False) -> list[list[tuple[list[int], float]]]:
        """`translate_ids` with each sentence's `nbest` best hypotheses: (token ids without
        <bos>/<eos>, score) pairs, best first (see `translate_nbest`), in input order."""
        beam, penalty = self.search_settings(beam_size, length_penalty)
        return self._decode(src_ids, beam, progress,
                            lambda src, max_len, _: nbest_search(self.model, src, max_len, beam,
                                                                 nbest, penalty))

    def _decode(self, src_ids: list[list[int]], beam: int, progress: bool,
                search: Callable[[torch.Tensor, torch.Tensor, list[int]], list]) -> list:
        """`search(src (B, S), max_len (B,), indices)`'s per-sentence results for every source
        (indices: each row's place in `src_ids`), in input order: sources cut to the model's
        positions, then decoded longest first in batches of similar length whose beam x
        vocabulary scores stay bounded."""
        src_ids = self.fit_to_positions(src_ids)
        order = sorted(range(len(src_ids)), key=lambda i: -len(src_ids[i]))
        results: list = [[] for _ in src_ids]
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
                                         self.decoding.max_len_offset, self.max_positions - 1)
            with autocast(self.device, self.amp_dtype):
                hyps = search(src, max_len, chunk)
            for i, hyp in zip(chunk, hyps):
                results[i] = hyp
            bar.update(len(chunk))
        bar.close()
        return results

    def score(self, sources: Sequence[str], targets: Sequence[str]
              ) -> list[tuple[list[int], list[float]]]:
        """Forced decoding: for each (source, target) pair, the target's token ids and the
        teacher-forced log-probability of each of them and of the final <eos> (len(ids) + 1
        numbers; an empty target scores <eos> alone). Sources are cut to the model's positions
        (with a warning); a target too long for them is a TinytError naming its line."""
        if len(sources) != len(targets):
            raise TinytError(f"{len(sources)} sources but {len(targets)} targets; give one "
                             "target a source")
        src_ids = self.fit_to_positions(self.tokenizers.encode_src(list(sources)))
        tgt_ids = self.tokenizers.encode_tgt(list(targets))
        room = self.max_positions - 1
        for line, ids in enumerate(tgt_ids, start=1):
            if len(ids) > room:
                raise TinytError(f"target line {line} has {len(ids)} tokens; the model scores "
                                 f"at most {room} (with <eos>, its {self.max_positions} "
                                 "positions)")
        return list(zip(tgt_ids, self.token_log_probs(src_ids, tgt_ids)))

    @torch.no_grad()
    def token_log_probs(self, src_ids: list[list[int]], tgt_ids: list[list[int]],
                        batch_size: int | None = None) -> list[list[float]]:
        """Teacher-forced log-probability of each target token and of the final <eos>
        (len(tgt) + 1 numbers a pair), input order. Ids come without <bos>/<eos> and must fit
        the model's positions with <eos>. Pairs are scored longest first in batches of
        `batch_size` (default: the decoding config's) sentences of similar length, so padding
        stays small; padding changes no score (masked in the source, after the target)."""
        size = batch_size or self.decoding.batch_size
        order = sorted(range(len(src_ids)), key=lambda i: (-len(tgt_ids[i]), -len(src_ids[i])))
        results: list[list[float]] = [[] for _ in src_ids]
        for start in range(0, len(order), size):
            chunk = order[start: start + size]
            src_width = max(len(src_ids[i]) for i in chunk) + 1
            tgt_width = len(tgt_ids[chunk[0]]) + 1
            src = torch.full((len(chunk), src_width), PAD_ID, dtype=torch.long)
            tgt_in = torch.full((len(chunk), tgt_width), PAD_ID, dtype=torch.long)
            tgt_out = torch.full((len(chunk), tgt_width), PAD_ID, dtype=torch.long)
            for row, i in enumerate(chunk):
                s, t = src_ids[i], tgt_ids[i]
                src[row, : len(s) + 1] = torch.tensor(s + [EOS_ID], dtype=torch.long)
                tgt_in[row, : len(t) + 1] = torch.tensor([BOS_ID] + t, dtype=torch.long)
                tgt_out[row, : len(t) + 1] = torch.tensor(t + [EOS_ID], dtype=torch.long)
            src, tgt_in, tgt_out = (x.to(self.device) for x in (src, tgt_in, tgt_out))
            with autocast(self.device, self.score_amp_dtype):
                logp = self.model.log_probs(src, tgt_in)  # (b, T, V)
            logp = logp.float().gather(2, tgt_out[..., None])[..., 0]
            for row, i in enumerate(chunk):
                results[i] = logp[row, : len(tgt_ids[i]) + 1].tolist()
        return results


def _draw_seed(seed: int, sentence: int, draw: int) -> int:
    """A 63-bit generator seed for draw `draw` of input `sentence`, unrelated to the others'."""
    digest = hashlib.sha256(f"{seed}/{sentence}/{draw}".encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1
