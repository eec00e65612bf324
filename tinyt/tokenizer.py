"""SentencePiece subword vocabularies: trained on the training split, cached in the run dir.

Special ids are fixed for every vocabulary tinyt makes:
    PAD_ID = 0, UNK_ID = 1, BOS_ID = 2, EOS_ID = 3.
A joint tokenizer (one model for both languages) lives in `{run_dir}/tokenizer/joint.model`;
separate ones in `src.model` and `tgt.model`. `meta.json` beside them records a fingerprint
of the training text and tokenizer config, so a second run over the same data reuses them.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import random
import re
from collections.abc import Iterable
from dataclasses import asdict, replace
from pathlib import Path

import sentencepiece as spm

from tinyt.config import SubwordSamplingConfig, TokenizerConfig
from tinyt.errors import TinytError
from tinyt.writing import atomic_write_bytes, writing

PAD_ID, UNK_ID, BOS_ID, EOS_ID = 0, 1, 2, 3

LONE_SURROGATE = re.compile("[\ud800-\udfff]")


def encodable(text: str) -> str:
    """`text` as UTF-8 (and so SentencePiece) can hold it: a lone surrogate, which a Python
    string can carry (a JSON \\uD800 escape, say), becomes U+FFFD, as undecodable bytes do in
    files and on stdin."""
    return LONE_SURROGATE.sub("\ufffd", text)


def _encode(processor: spm.SentencePieceProcessor, sentences: list[str]) -> list[list[int]]:
    """Ids of `sentences`. SentencePiece refuses a whole batch holding a lone surrogate (a
    TypeError), so such a batch is encoded again with `encodable` text: no cost to the batches
    that have none, the corpus's among them."""
    try:
        return processor.encode(sentences, out_type=int)
    except TypeError:
        return processor.encode([encodable(s) for s in sentences], out_type=int)


class Tokenizers:
    """The source and target SentencePiece models of a run (the same object when joint)."""

    def __init__(self, src: spm.SentencePieceProcessor, tgt: spm.SentencePieceProcessor,
                 fingerprint: str):
        self.src = src
        self.tgt = tgt
        self.fingerprint = fingerprint

    @property
    def src_vocab_size(self) -> int:
        return self.src.get_piece_size()

    @property
    def tgt_vocab_size(self) -> int:
        return self.tgt.get_piece_size()

    def encode_src(self, sentences: list[str]) -> list[list[int]]:
        return _encode(self.src, sentences)

    def encode_tgt(self, sentences: list[str]) -> list[list[int]]:
        return _encode(self.tgt, sentences)

    def sample_src(self, sentences: list[str], sampling: SubwordSamplingConfig,
                   seed: int) -> list[list[int]]:
        """One random segmentation of each sentence (subword regularization); see
        `sample_segmentations`."""
        return sample_segmentations(self.src, sentences, sampling, seed)

    def sample_tgt(self, sentences: list[str], sampling: SubwordSamplingConfig,
                   seed: int) -> list[list[int]]:
        return sample_segmentations(self.tgt, sentences, sampling, seed)

    def decode_tgt(self, ids: list[list[int]]) -> list[str]:
        return self.tgt.decode(ids)

    @classmethod
    def load(cls, directory: str | Path) -> Tokenizers:
        """Load the tokenizer(s) saved in `directory` (a run's `tokenizer/` folder)."""
        directory = Path(directory)
        meta_path = directory / "meta.json"
        try:
            meta = json.loads(meta_path.read_text(encoding="utf-8"))
            if not isinstance(meta, dict):
                raise KeyError("not a mapping")
            key = str(meta["fingerprint"])
            if meta["joint"]:
                src = tgt = _load_model(directory / "joint.model")
            else:
                src, tgt = _load_model(directory / "src.model"), _load_model(directory / "tgt.model")
        except FileNotFoundError as exc:
            raise TinytError(f"tokenizer missing in {directory}: {Path(exc.filename).name} not "
                             "found; retrain the run or copy its tokenizer/ folder back") from None
        except (json.JSONDecodeError, UnicodeDecodeError, KeyError):
            raise TinytError(f"{meta_path} is damaged; retrain the run's tokenizer") from None
        return cls(src, tgt, key)


# SentencePiece takes this seed to mean "seed from the system's entropy".
_SPM_RANDOM_SEED = 2**32 - 1


def sample_segmentations(processor: spm.SentencePieceProcessor, sentences: list[str],
                         sampling: SubwordSamplingConfig, seed: int) -> list[list[int]]:
    """Ids of one random segmentation of each sentence: unigram sampling (alpha, nbest) or
    BPE-dropout (alpha), by the model's type. The same seed and sentences give the same ids,
    in any process: SentencePiece's generator is process-wide, so it is seeded here for the
    call, and one thread encodes the sentences in order."""
    spm.set_random_generator_seed(seed % _SPM_RANDOM_SEED)
    return processor.encode(sentences, out_type=int, enable_sampling=True,
                            alpha=sampling.alpha, nbest_size=sampling.nbest, num_threads=1)


def _load_model(path: Path) -> spm.SentencePieceProcessor:
    if not path.is_file():
        raise FileNotFoundError(2, "missing", str(path))
    try:
        return spm.SentencePieceProcessor(model_file=str(path))
    except (RuntimeError, OSError):
        raise TinytError(f"{path} is not a valid SentencePiece model; retrain the tokenizer "
                         "(delete the run's tokenizer/ folder and train again)") from None


def settled(config: TokenizerConfig) -> TokenizerConfig:
    """`config` with `joint` left to auto (None) decided as it is when no languages are known:
    joint. A `Config` decides it from its languages before it gets here
    (tinyt.config.Config._resolve_auto); this covers a TokenizerConfig made on its own. An
    auto character coverage stays None: each model takes it from its text (`auto_coverage`)."""
    return replace(config, joint=config.joint is not False)


# Code points of the scripts with thousands of characters: CJK ideographs (with extensions and
# compatibility ideographs), kana, hangul jamo and syllables.
_CJK_RANGES = ((0x1100, 0x11FF), (0x3040, 0x30FF), (0x3130, 0x318F), (0x31F0, 0x31FF),
               (0x3400, 0x4DBF), (0x4E00, 0x9FFF), (0xAC00, 0xD7AF), (0xF900, 0xFAFF),
               (0xFF66, 0xFF9F), (0x20000, 0x323AF))
# A vocabulary's text counts as CJK when this share of its letters are CJK characters (a
# joint English-Chinese vocabulary has about 25 %; English with a few Chinese names, < 1 %).
_CJK_SHARE = 0.1
_COVERAGE_SAMPLE = 10_000  # lines whose letters decide


def auto_coverage(lines: list[str]) -> float:
    """SentencePiece's character_coverage for a vocabulary of this text, as its authors advise:
    0.9995 for Chinese, Japanese or Korean text (the rarest of thousands of characters are
    better left <unk> than given a piece each), 1.0 for an alphabet (every letter kept).
    Decided on the letters of up to `_COVERAGE_SAMPLE` lines spread over `lines`."""
    letters = cjk = 0
    for line in lines[:: max(1, len(lines) // _COVERAGE_SAMPLE)]:
        for char in line:
            if char.isalpha():
                letters += 1
                code = ord(char)
                cjk += any(low <= code <= high for low, high in _CJK_RANGES)
    return 0.9995 if letters and cjk >= _CJK_SHARE * letters else 1.0


def fingerprint(config: TokenizerConfig, src_lines: list[str], tgt_lines: list[str]) -> str:
    """Hash of the tokenizer config and the training text: equal hash, reusable tokenizer."""
    settings = asdict(settled(config))
    del settings["sampling"]  # how training text is cut, not what the vocabulary is
    h = hashlib.sha256(json.dumps(settings, sort_keys=True).encode())
    for lines in (src_lines, tgt_lines):
        h.update(str(len(lines)).encode())
        for line in lines:
            h.update(line.encode("utf-8", "surrogatepass"))
            h.update(b"\n")
    return h.hexdigest()[:16]


def _train_model(lines: list[str], config: TokenizerConfig, seed: int) -> bytes:
    """A SentencePiece model trained on `lines`, as the bytes of its .model file.

    SentencePiece writes into memory here, not to files: writing files itself, it ignores a
    failed write and leaves a truncated model behind (a full disk); tinyt writes the bytes.
    """
    lines = [line for line in lines if line.strip()]
    if not lines:
        raise TinytError("the training split has no text to learn a vocabulary from")
    if len(lines) > config.max_sentences:
        lines = random.Random(seed).sample(lines, config.max_sentences)
    coverage = (auto_coverage(lines) if config.character_coverage is None
                else config.character_coverage)
    spm.set_random_generator_seed(seed)
    model = io.BytesIO()
    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=iter(lines),
            model_writer=model,
            vocab_size=config.vocab_size,
            model_type=config.model_type,
            character_coverage=coverage,
            pad_id=PAD_ID, unk_id=UNK_ID, bos_id=BOS_ID, eos_id=EOS_ID,
            # A corpus too small for the requested size gets a smaller vocabulary, not a crash.
            hard_vocab_limit=False,
            input_sentence_size=0,  # all of `lines`, which are already a bounded sample
            max_sentence_length=1 << 16,
            num_threads=os.cpu_count() or 1,
            minloglevel=2,
        )
    except RuntimeError as exc:
        chars = re.search(r"smaller than required_chars\. \d+ vs (\d+)", str(exc))
        if chars:  # e.g. a small vocabulary for Chinese text, with thousands of characters
            raise TinytError(f"tokenizer.vocab_size {config.vocab_size} is smaller than the "
                             f"{int(chars.group(1)):,} characters the training text needs at "
                             f"character_coverage {coverage}; raise tokenizer.vocab_size or "
                             "lower tokenizer.character_coverage") from None
        raise TinytError(f"SentencePiece could not train a {config.vocab_size}-piece vocabulary "
                         f"({str(exc).strip().splitlines()[-1]}); lower tokenizer.vocab_size "
                         "or use more training data") from None
    return model.getvalue()


def _vocab_listing(model: bytes) -> str:
    """The .vocab file SentencePiece writes beside a model: each piece and its score, a line
    each (for people; tinyt reads only the .model)."""
    processor = spm.SentencePieceProcessor(model_proto=model)
    return "".join(f"{processor.id_to_piece(i)}\t{processor.get_score(i):g}\n"
                   for i in range(processor.get_piece_size()))


def _saved_fingerprint(meta_path: Path) -> str | None:
    """The fingerprint recorded in a tokenizer folder's meta.json; None when the file is
    missing or damaged (not UTF-8, not JSON, not an object): the tokenizer is then retrained
    and the file rewritten."""
    try:
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None
    return str(meta.get("fingerprint")) if isinstance(meta, dict) else None


def train_or_load(config: TokenizerConfig, src_lines: list[str], tgt_lines: list[str],
                  directory: str | Path, seed: int = 1) -> Tokenizers:
    """Tokenizers for this training text: reused from `directory` when the fingerprint matches,
    else trained afresh (joint: on source and target text together) and saved there."""
    directory = Path(directory)
    config = settled(config)
    key = fingerprint(config, src_lines, tgt_lines)
    meta_path = directory / "meta.json"
    if _saved_fingerprint(meta_path) == key:
        return Tokenizers.load(directory)
    names = ["joint"] if config.joint else ["src", "tgt"]
    texts = [src_lines + tgt_lines] if config.joint else [src_lines, tgt_lines]
    models = {name: _train_model(lines, config, seed) for name, lines in zip(names, texts)}
    files = {}
    for name, model in models.items():
        files[f"{name}.model"] = model
        files[f"{name}.vocab"] = _vocab_listing(model).encode("utf-8")
    meta = {"fingerprint": key, "joint": config.joint, "config": asdict(config),
            "special_ids": {"pad": PAD_ID, "unk": UNK_ID, "bos": BOS_ID, "eos": EOS_ID}}
    files["meta.json"] = json.dumps(meta, indent=2).encode("utf-8")
    write_tokenizer_files(directory, files)
    return Tokenizers.load(directory)


# Every file a tokenizer folder may hold: meta.json, and a model and its .vocab listing for
# the joint vocabulary or for each side.
TOKENIZER_FILES = ("meta.json",) + tuple(f"{side}.{kind}" for side in ("joint", "src", "tgt")
                                        for kind in ("model", "vocab"))


def write_tokenizer_files(directory: Path, files: dict[str, bytes],
                          remove: Iterable[str] = ()) -> None:
    """Write a tokenizer folder's `files` (name -> bytes, meta.json among them).

    meta.json vouches for the models beside it: it goes first and comes back last, so an
    interrupted or failed write never leaves it vouching for other models; the files named in
    `remove` go while it is gone. Each file is written atomically, so none is ever a
    truncated model."""
    meta_path = directory / "meta.json"
    with writing(meta_path):
        meta_path.unlink(missing_ok=True)
        for name in remove:
            (directory / name).unlink(missing_ok=True)
    for name, data in files.items():
        if name != "meta.json":
            atomic_write_bytes(directory / name, data)
    atomic_write_bytes(meta_path, files["meta.json"])


def saved_tokenizers(config: TokenizerConfig, src_lines: list[str], tgt_lines: list[str],
                     directory: str | Path) -> Tokenizers:
    """The tokenizers saved in `directory`, checked against this config and training text but
    never retrained (a resumed run's weights belong to them): a mismatch raises TinytError."""
    directory = Path(directory)
    tokenizers = Tokenizers.load(directory)
    if tokenizers.fingerprint != fingerprint(config, src_lines, tgt_lines):
        raise TinytError(f"the training data (or tokenizer settings) changed since {directory} "
                         "was trained, so this run cannot continue on it; restore the original "
                         "data, or start a new run (--run-dir, or --overwrite)")
    return tokenizers
