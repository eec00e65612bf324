"""tinyt models in CTranslate2's format: export a trained model, and translate or score with it.

CTranslate2 is the inference engine that OpenNMT-py, fairseq and Marian models are deployed
with (int8 weights, fast CPU kernels). `export_ctranslate2` writes a model directory it loads:

    model.bin, config.json      CTranslate2's own files, written by its converter
    shared_vocabulary.json      the pieces of a joint vocabulary, in id order (separate ones:
                                source_vocabulary.json and target_vocabulary.json)
    tokenizer/                  the run's SentencePiece model(s) and meta.json, as in a run
    tinyt.json                  the run's resolved config, the checkpoint's progress, the source

The conversion is exact, not approximate. tinyt's layers map one to one onto CTranslate2's
Transformer: each sublayer's LayerNorm (pre- or post-norm), the fused (3D, D) query/key/value
projection of self-attention (CTranslate2 fuses it too), cross-attention split into the query
third and the fused key/value two thirds, the final LayerNorms of a pre-norm stack, √D embedding
scale, tied or separate embeddings and output projection, <eos> appended to the source. tinyt's
sinusoidal table (sin on even, cos on odd dimensions, from position 0) is not CTranslate2's
built-in one, so the table itself is written into the model.

`CTranslate2Translator` decodes with CTranslate2 behind tinyt's `Translator` interface: same
input handling, order, length limits and detokenization. Greedy search gives exactly tinyt's
output. Beam search uses the same rules (2K candidates, a sentence ends with K finished
hypotheses, score / length ** length_penalty with <eos> counted) except at the length limit:
tinyt forces <eos> one token past it, CTranslate2 takes the best hypotheses as they are; only
sentences whose search reaches the limit can differ.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import tempfile
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from tinyt import __version__
from tinyt.checkpoint import load_trained
from tinyt.config import Config, ConfigError, config_from_dict
from tinyt.data import TokenizedText
from tinyt.errors import TinytError
from tinyt.model import Transformer, sinusoidal_positions
from tinyt.rundir import metrics_summary
from tinyt.search import output_length_limits
from tinyt.tokenizer import BOS_ID, EOS_ID, UNK_ID, Tokenizers
from tinyt.translation import Translator
from tinyt.writing import atomic_write_text, write_error

MARKER = "tinyt.json"  # a folder with this file and model.bin is a tinyt CTranslate2 export
EXPORT_FORMAT = "tinyt-ctranslate2"
EXPORT_VERSION = 1
# Weight types CTranslate2's converter writes; None keeps float32.
QUANTIZATIONS = ("int8", "int8_float32", "int8_float16", "int8_bfloat16", "int16", "float16",
                 "bfloat16", "float32")
LAYER_NORM_EPSILON = 1e-5  # torch.nn.LayerNorm's default, which tinyt's LayerNorms use


def import_ctranslate2():
    """The ctranslate2 module, or a TinytError saying how to install it."""
    try:
        import ctranslate2
    except ImportError:
        raise TinytError("CTranslate2 is not installed; install it with: pip install "
                         "'tinyt[ctranslate2]' (or pip install ctranslate2)") from None
    return ctranslate2


def is_ctranslate2_dir(path: str | Path) -> bool:
    path = Path(path)
    return (path / MARKER).is_file() and (path / "model.bin").is_file()


# -- conversion -----------------------------------------------------------------------------

def _array(tensor: torch.Tensor) -> np.ndarray:
    return tensor.detach().to(torch.float32).cpu().contiguous().numpy()


def transformer_spec(model: Transformer, tokenizers: Tokenizers):
    """CTranslate2's `TransformerSpec` holding `model`'s weights and vocabularies."""
    import_ctranslate2()
    from ctranslate2.specs import common_spec
    from ctranslate2.specs import transformer_spec as ts

    c = model.config
    activation = (common_spec.Activation.GELU if c.activation == "gelu"  # erf GELU, as nn.GELU
                  else common_spec.Activation.RELU)
    spec = ts.TransformerSpec(
        ts.TransformerEncoderSpec(c.enc_layers, c.n_heads, pre_norm=c.pre_norm,
                                  activation=activation),
        ts.TransformerDecoderSpec(c.dec_layers, c.n_heads, pre_norm=c.pre_norm,
                                  activation=activation))
    positions = _array(sinusoidal_positions(c.max_positions, c.d_model))  # (max_positions, D)
    # One array object for tied weights: CTranslate2 then stores it once, as an alias.
    tgt_embed = _array(model.tgt_embed.weight)
    src_embed = tgt_embed if model.src_embed is model.tgt_embed else _array(model.src_embed.weight)

    enc, dec = spec.encoder, spec.decoder
    enc.embeddings[0].weight = src_embed
    enc.position_encodings.encodings = positions
    for layer_spec, layer in zip(enc.layer, model.encoder):
        _self_attention(layer_spec.self_attention, layer.self_attn, layer.res_attn.norm)
        _feed_forward(layer_spec.ffn, layer.ffn, layer.res_ffn.norm)
    dec.embeddings.weight = tgt_embed
    dec.position_encodings.encodings = positions
    for layer_spec, layer in zip(dec.layer, model.decoder):
        _self_attention(layer_spec.self_attention, layer.self_attn, layer.res_self.norm)
        _cross_attention(layer_spec.attention, layer.cross_attn, layer.res_cross.norm)
        _feed_forward(layer_spec.ffn, layer.ffn, layer.res_ffn.norm)
    if c.pre_norm:  # post-norm stacks have no final LayerNorm, nor does the spec then
        _layer_norm(enc.layer_norm, model.enc_norm)
        _layer_norm(dec.layer_norm, model.dec_norm)
    dec.projection.weight = tgt_embed if model.output is None else _array(model.output.weight)

    src, tgt = tokenizers.src, tokenizers.tgt
    spec.register_source_vocabulary([src.id_to_piece(i) for i in range(src.get_piece_size())])
    spec.register_target_vocabulary([tgt.id_to_piece(i) for i in range(tgt.get_piece_size())])
    spec.config.unk_token = tgt.id_to_piece(UNK_ID)
    spec.config.bos_token = tgt.id_to_piece(BOS_ID)
    spec.config.eos_token = tgt.id_to_piece(EOS_ID)
    spec.config.decoder_start_token = tgt.id_to_piece(BOS_ID)
    spec.config.add_source_eos = True  # tinyt's sources end with <eos>
    spec.config.layer_norm_epsilon = LAYER_NORM_EPSILON
    return spec


def _layer_norm(spec, norm: torch.nn.LayerNorm) -> None:
    spec.gamma = _array(norm.weight)
    spec.beta = _array(norm.bias)


def _linear(spec, weight: torch.Tensor, bias: torch.Tensor | None) -> None:
    spec.weight = _array(weight)
    if bias is not None:
        spec.bias = _array(bias)


def _self_attention(spec, attn, norm) -> None:
    # CTranslate2's self-attention takes the fused [query; key; value] (3D, D) projection that
    # tinyt's in_proj already is.
    _layer_norm(spec.layer_norm, norm)
    _linear(spec.linear[0], attn.in_proj.weight, attn.in_proj.bias)
    _linear(spec.linear[1], attn.out_proj.weight, attn.out_proj.bias)


def _cross_attention(spec, attn, norm) -> None:
    # Cross-attention: the query third (D, D) apart, keys and values fused (2D, D).
    d = attn.d_model
    _layer_norm(spec.layer_norm, norm)
    _linear(spec.linear[0], attn.in_proj.weight[:d], attn.in_proj.bias[:d])
    _linear(spec.linear[1], attn.in_proj.weight[d:], attn.in_proj.bias[d:])
    _linear(spec.linear[2], attn.out_proj.weight, attn.out_proj.bias)


def _feed_forward(spec, ffn, norm) -> None:
    _layer_norm(spec.layer_norm, norm)
    _linear(spec.linear_0, ffn.fc1.weight, ffn.fc1.bias)
    _linear(spec.linear_1, ffn.fc2.weight, ffn.fc2.bias)


def export_ctranslate2(run_dir: str | Path, out_dir: str | Path, checkpoint: str = "best.pt",
                       quantization: str | None = None) -> Path:
    """Write `checkpoint` of the trained run in `run_dir` as a CTranslate2 model directory
    `out_dir`, weights stored as `quantization` (one of QUANTIZATIONS; None: float32).

    The directory is built beside `out_dir` and moved into place when complete, so a failed
    export leaves `out_dir` as it was. An existing tinyt export there is replaced; any other
    non-empty folder is refused.
    """
    ctranslate2 = import_ctranslate2()
    run_dir, out_dir = Path(run_dir), Path(out_dir)
    if quantization is not None and quantization not in QUANTIZATIONS:
        raise TinytError(f"--quantize {quantization} is not a CTranslate2 weight type; use one "
                         f"of {', '.join(QUANTIZATIONS)}")
    if out_dir.exists() and not out_dir.is_dir():
        raise TinytError(f"{out_dir} is a file; a CTranslate2 model is a folder: pass a folder "
                         "path, e.g. model-ct2")
    if out_dir.is_dir() and any(out_dir.iterdir()) and not is_ctranslate2_dir(out_dir):
        raise TinytError(f"{out_dir} is a folder with other files in it; choose a new or empty "
                         "folder for the CTranslate2 model")
    if out_dir.resolve() == run_dir.resolve() or run_dir.resolve() in out_dir.resolve().parents:
        raise TinytError(f"{out_dir} is inside the run directory {run_dir}; choose a folder "
                         "outside it, e.g. model-ct2")
    config, tokenizers, model, payload = load_trained(run_dir, checkpoint)

    class TinytConverter(ctranslate2.converters.Converter):
        def _load(self):
            return transformer_spec(model, tokenizers)

    then = "export again"
    parent = out_dir.parent
    try:
        parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", suffix=".tmp", dir=parent))
    except OSError as exc:
        raise write_error(exc, out_dir, then) from None
    try:
        model_dir = staging / "model"
        TinytConverter().convert(str(model_dir), quantization=quantization)
        shutil.copytree(run_dir / "tokenizer", model_dir / "tokenizer",
                        ignore=shutil.ignore_patterns(".*"))
        record = {"format": EXPORT_FORMAT, "version": EXPORT_VERSION, "tinyt_version": __version__,
                  "quantization": quantization or "float32",
                  "parameters": model.num_parameters(),
                  "config": config.to_dict(),
                  "tokenizer_fingerprint": tokenizers.fingerprint,
                  "progress": dict(payload.get("progress") or {}),
                  "metrics": metrics_summary(run_dir / "metrics.jsonl"),
                  "source": {"run_dir": str(run_dir), "checkpoint": checkpoint,
                             "averaged_steps": list(payload.get("averaged_steps") or [])}}
        atomic_write_text(model_dir / MARKER, json.dumps(record, indent=2, default=str) + "\n")
        _move_into_place(model_dir, out_dir, staging)
    except OSError as exc:
        raise write_error(exc, out_dir, then) from None
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return out_dir


def _move_into_place(new: Path, out_dir: Path, staging: Path) -> None:
    """Rename the finished `new` folder to `out_dir`; an old export there is moved into
    `staging` first (and deleted with it), so `out_dir` is never a half-written model. Of
    several exports to one folder at once, the one that moves in last is kept, whole."""
    for attempt in range(100):
        try:
            os.rename(new, out_dir)  # replaces nothing, or an empty folder
            return
        except OSError as exc:
            if exc.errno not in (errno.ENOTEMPTY, errno.EEXIST):
                raise
        old = staging / f"old-{attempt}"
        try:
            os.rename(out_dir, old)
        except FileNotFoundError:  # another export moved it away first: try again
            continue
        try:
            os.rename(new, out_dir)
            return
        except OSError as exc:
            if exc.errno in (errno.ENOTEMPTY, errno.EEXIST):  # another export moved in
                continue
            os.rename(old, out_dir)  # put the previous export back
            raise
    raise OSError(errno.EBUSY, "other exports keep replacing the folder", str(out_dir))


# -- loading and decoding -------------------------------------------------------------------

def read_export_record(directory: str | Path) -> dict[str, Any]:
    """tinyt.json of an exported directory; a missing or damaged one raises TinytError."""
    path = Path(directory) / MARKER
    damaged = (f"{path} is missing or damaged, so {directory} is not a usable tinyt CTranslate2 "
               "model; export it again with tinyt export --format ctranslate2")
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        raise TinytError(damaged) from None
    if not isinstance(record, dict) or record.get("format") != EXPORT_FORMAT:
        raise TinytError(damaged)
    version = record.get("version")
    if not isinstance(version, int) or version > EXPORT_VERSION:
        raise TinytError(f"{directory} was exported by a newer tinyt "
                         f"({record.get('tinyt_version')}); upgrade tinyt")
    return record


def load_export(directory: str | Path) -> tuple[Config, Tokenizers, dict[str, Any]]:
    """(config, tokenizers, tinyt.json record) of an exported directory, checked against each
    other; the CTranslate2 model itself is loaded by `CTranslate2Translator`."""
    directory = Path(directory)
    record = read_export_record(directory)
    try:
        config = config_from_dict(record["config"], check_paths=False)
    except (ConfigError, KeyError, TypeError) as exc:
        raise TinytError(f"{directory / MARKER} holds no usable config ({exc}); export the "
                         "model again") from None
    tokenizers = Tokenizers.load(directory / "tokenizer")
    if tokenizers.fingerprint != record.get("tokenizer_fingerprint"):
        raise TinytError(f"{directory / 'tokenizer'} is not the vocabulary the model was "
                         "exported with; export the model again")
    return config, tokenizers, record


def ct2_device(device: torch.device | str) -> str:
    """CTranslate2's name for a torch device: "cuda" or "cpu"."""
    return "cuda" if torch.device(device).type == "cuda" else "cpu"


class CTranslate2Translator(Translator):
    """`Translator` whose model is a CTranslate2 export. For example:

        translator = tinyt.load_translator("model-ct2")   # a folder made by tinyt export
        translator.translate(["Ein Hund läuft."], beam_size=5)
    """

    def __init__(self, directory: str | Path, config: Config | None = None,
                 device: torch.device | str = "cpu", compute_type: str = "default"):
        ctranslate2 = import_ctranslate2()
        self.directory = Path(directory)
        saved_config, tokenizers, self.record = load_export(self.directory)
        config = config or saved_config
        self.config = config
        self.device = torch.device(device)
        self.model = None  # no torch model: CTranslate2 holds the weights
        self.tokenizers = tokenizers
        self.decoding = config.decoding
        self.amp_dtype = self.score_amp_dtype = None
        self.max_positions = config.model.max_positions
        # Throughput over latency on a CPU: one batch per thread, decoded in parallel (on 2
        # cores, 1.2x the sentences/s of one batch on 2 threads at beam 5), with as many
        # sentences in flight as tinyt's own search has (decoding.batch_size).
        threads = torch.get_num_threads() if self.device.type == "cpu" else 1
        self.workers = threads
        self.batch_size = max(1, config.decoding.batch_size // threads)
        try:
            self.engine = ctranslate2.Translator(
                str(self.directory), device=ct2_device(self.device), compute_type=compute_type,
                inter_threads=threads, intra_threads=1)
        except (RuntimeError, ValueError, OSError) as exc:
            reason = " ".join(str(exc).split())[:200]
            raise TinytError(f"CTranslate2 cannot load {self.directory} on {self.device.type} "
                             f"({reason}); export the model again, or use --device cpu"
                             ) from None

    def sample(self, sentences: Sequence[str], n: int = 1, temperature: float = 1.0,
               top_k: int = 0, top_p: float = 1.0, seed: int = 1,
               length_penalty: float | None = None, progress: bool = False
               ) -> list[list[tuple[str, float]]]:
        """Not offered for exports: tinyt's sampling draws each sentence from its own seeded
        generator, which CTranslate2's one process-wide generator cannot reproduce."""
        raise TinytError(f"sampling is done by tinyt's own search, not by CTranslate2: sample "
                         f"with the run or bundle {self.directory} was exported from")

    def _pieces(self, src_ids: Sequence[list[int]]) -> list[list[str]]:
        return [self.tokenizers.src.id_to_piece(ids) for ids in src_ids]

    def _ids(self, pieces: list[str]) -> list[int]:
        return [self.tokenizers.tgt.piece_to_id(piece) for piece in pieces]

    def translate_ids(self, src_ids: list[list[int]], beam_size: int | None = None,
                      length_penalty: float | None = None, progress: bool = False
                      ) -> list[list[int]]:
        """As `Translator.translate_ids`, decoded by CTranslate2.

        tinyt's length limit depends on each source's length; CTranslate2's is one number a
        call. A limit of L tokens (with <eos>) allows L - 1 tokens before <eos> in tinyt's
        search, so a sentence's own CTranslate2 limit is L - 1. Sentences are decoded together
        under the largest limit first, asking for all K hypotheses: a search ends at the step
        that finishes its K-th hypothesis, and one of the hypotheses returned was finished at
        that step (those finished last are the last to be dropped only when more than K
        finish), so the longest returned hypothesis tells how far the search went. Where it
        stopped before the sentence's own last step, the search never met its own limit and
        the result is what decoding under that limit gives; the few others are decoded again
        in groups of equal limit.
        """
        beam, penalty = self.search_settings(beam_size, length_penalty)
        return [hyps[0][0] for hyps in self._decode_limited(src_ids, beam, penalty, progress)]

    def translate_nbest_ids(self, src_ids: list[list[int]], nbest: int,
                            beam_size: int | None = None, length_penalty: float | None = None,
                            progress: bool = False) -> list[list[tuple[list[int], float]]]:
        """As `Translator.translate_nbest_ids`, decoded by CTranslate2 (`num_hypotheses`,
        `return_scores`): its scores are tinyt's, the log-probability with <eos> over length
        ** length_penalty with <eos> counted, when searched as `_search` searches."""
        beam, penalty = self.search_settings(beam_size, length_penalty)
        if not 1 <= nbest <= beam:
            raise TinytError(f"{nbest} best hypotheses need a beam of at least {nbest} (the "
                             f"beam is {beam}); raise the beam size")
        return [hyps[:nbest] for hyps in self._decode_limited(src_ids, beam, penalty, progress)]

    def _decode_limited(self, src_ids: list[list[int]], beam: int, penalty: float,
                        progress: bool) -> list[list[tuple[list[int], float]]]:
        """Each source's K hypotheses as (ids without <eos>, score), best first, in input
        order, each sentence under its own length limit (see `translate_ids`)."""
        src_ids = self.fit_to_positions(src_ids)
        lengths = torch.tensor([len(ids) + 1 for ids in src_ids])  # with <eos>, as tinyt counts
        # (N,) CTranslate2's max_decoding_length of each sentence; 0 (a tinyt limit of 1, room
        # for <eos> alone) is an empty output.
        limits = (output_length_limits(lengths, self.decoding.max_len_ratio,
                                       self.decoding.max_len_offset, self.max_positions - 1)
                  - 1).tolist()
        results: list[list[tuple[list[int], float]]] = [[] for _ in src_ids]
        todo = sorted((i for i in range(len(src_ids)) if limits[i] > 0),
                      key=lambda i: len(src_ids[i]))
        # An empty output is <eos> alone: its score is the log-probability of <eos> first.
        empty = [i for i in range(len(src_ids)) if limits[i] <= 0]
        for i, logp in zip(empty, self.token_log_probs([src_ids[i] for i in empty],
                                                       [[] for _ in empty])):
            results[i] = [([], logp[0])]
        bar = tqdm(total=len(src_ids), desc=f"decoding (CTranslate2, beam {beam})",
                   unit="sent", leave=False, disable=not progress, dynamic_ncols=True)
        bar.update(len(src_ids) - len(todo))
        redo: dict[int, list[int]] = defaultdict(list)
        chunk = 8 * self.decoding.batch_size  # a progress update every few batches
        for start in range(0, len(todo), chunk):
            members = todo[start: start + chunk]
            outputs = self._search([src_ids[i] for i in members], beam, penalty,
                                   max(limits[i] for i in members))
            for i, hypotheses in zip(members, outputs):
                if max(len(pieces) for pieces, _ in hypotheses) < limits[i]:
                    results[i] = self._output_hypotheses(hypotheses)
                else:
                    redo[limits[i]].append(i)
            bar.update(len(members))
        for limit, members in redo.items():
            outputs = self._search([src_ids[i] for i in members], beam, penalty, limit)
            for i, hypotheses in zip(members, outputs):
                results[i] = self._output_hypotheses(hypotheses)
        bar.close()
        return results

    def _search(self, src_ids: list[list[int]], beam: int, penalty: float, limit: int
                ) -> list[list[tuple[list[str], float]]]:
        """CTranslate2's K best hypotheses as (pieces, score), best first, <eos> kept where
        there is one, for each source, searched as tinyt searches: <eos> counted in the length
        penalty, an empty output allowed, no input cut (tinyt cuts to its positions)."""
        # A call with fewer sentences than the workers' batches add up to is split evenly over
        # the workers, not given whole to one: on 2 cores, 32 sentences decode at 213 instead
        # of 153 sentences/s (tinyt serve's batches are this size).
        per_worker = max(1, min(self.batch_size, -(-len(src_ids) // self.workers)))
        outputs = self.engine.translate_batch(
            self._pieces(src_ids), max_batch_size=per_worker, beam_size=beam,
            num_hypotheses=beam, length_penalty=penalty, return_end_token=True,
            max_decoding_length=limit, min_decoding_length=0, max_input_length=0,
            return_scores=True)
        return [list(zip(output.hypotheses, output.scores)) for output in outputs]

    def _output_hypotheses(self, hypotheses: list[tuple[list[str], float]]
                           ) -> list[tuple[list[int], float]]:
        """(pieces, score) pairs as (ids without <eos>, score) pairs."""
        out = []
        for pieces, score in hypotheses:
            ids = self._ids(pieces)
            out.append((ids[:-1] if ids and ids[-1] == EOS_ID else ids, float(score)))
        return out

    def token_log_probs(self, src_ids: list[list[int]], tgt_ids: list[list[int]],
                        batch_size: int = 64) -> list[list[float]]:
        """Teacher-forced log-probability of each target token and of the final <eos>
        (len(tgt) + 1 numbers a pair), as CTranslate2 computes them."""
        if not src_ids:
            return []
        # CTranslate2 scores an empty target as <eos> alone, as tinyt does.
        outputs = self.engine.score_batch(
            self._pieces(src_ids), [self.tokenizers.tgt.id_to_piece(ids) for ids in tgt_ids],
            max_batch_size=batch_size, max_input_length=0)
        return [list(output.log_probs) for output in outputs]

    def teacher_forced_nll(self, data: TokenizedText, batch_tokens: int,
                           progress: bool = False) -> tuple[float, int]:
        """Mean negative log-likelihood per target token (<eos> included) and the number of
        target tokens, over every pair of `data` that fits the model's positions: the same
        quantity as tinyt.evaluation.teacher_forced_nll."""
        limit = self.max_positions
        fits = ((data.src_lengths + 1 <= limit) & (data.tgt_lengths + 1 <= limit))
        indices = fits.nonzero().flatten().tolist()
        total, n_tokens = 0.0, 0
        chunk = 256
        for start in tqdm(range(0, len(indices), chunk), desc="scoring (CTranslate2)",
                          unit="batch", leave=False, disable=not progress, dynamic_ncols=True):
            part = indices[start: start + chunk]
            scores = self.token_log_probs([data.src(i).tolist() for i in part],
                                          [data.tgt(i).tolist() for i in part])
            for token_scores in scores:
                total -= sum(token_scores)
                n_tokens += len(token_scores)
        return total / max(n_tokens, 1), n_tokens
