"""SentencePiece subword vocabularies: trained on the training split, cached in the run dir.

Special ids are fixed for every vocabulary tinyt makes:
    PAD_ID = 0, UNK_ID = 1, BOS_ID = 2, EOS_ID = 3.
A joint tokenizer (one model for both languages) lives in `{run_dir}/tokenizer/joint.model`;
separate ones in `src.model` and `tgt.model`. `meta.json` beside them records a fingerprint
of the training text and tokenizer config, so a second run over the same data reuses them.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import tempfile
from dataclasses import asdict
from pathlib import Path

import sentencepiece as spm

from tinyt.config import TokenizerConfig
from tinyt.errors import TinytError

PAD_ID, UNK_ID, BOS_ID, EOS_ID = 0, 1, 2, 3


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
        return self.src.encode(sentences, out_type=int)

    def encode_tgt(self, sentences: list[str]) -> list[list[int]]:
        return self.tgt.encode(sentences, out_type=int)

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


def _load_model(path: Path) -> spm.SentencePieceProcessor:
    if not path.is_file():
        raise FileNotFoundError(2, "missing", str(path))
    try:
        return spm.SentencePieceProcessor(model_file=str(path))
    except (RuntimeError, OSError):
        raise TinytError(f"{path} is not a valid SentencePiece model; retrain the tokenizer "
                         "(delete the run's tokenizer/ folder and train again)") from None


def fingerprint(config: TokenizerConfig, src_lines: list[str], tgt_lines: list[str]) -> str:
    """Hash of the tokenizer config and the training text: equal hash, reusable tokenizer."""
    h = hashlib.sha256(json.dumps(asdict(config), sort_keys=True).encode())
    for lines in (src_lines, tgt_lines):
        h.update(str(len(lines)).encode())
        for line in lines:
            h.update(line.encode("utf-8", "surrogatepass"))
            h.update(b"\n")
    return h.hexdigest()[:16]


def _train_model(lines: list[str], prefix: Path, config: TokenizerConfig, seed: int) -> None:
    lines = [line for line in lines if line.strip()]
    if not lines:
        raise TinytError("the training split has no text to learn a vocabulary from")
    if len(lines) > config.max_sentences:
        lines = random.Random(seed).sample(lines, config.max_sentences)
    spm.set_random_generator_seed(seed)
    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=iter(lines),
            model_prefix=str(prefix),
            vocab_size=config.vocab_size,
            model_type=config.model_type,
            character_coverage=config.character_coverage,
            pad_id=PAD_ID, unk_id=UNK_ID, bos_id=BOS_ID, eos_id=EOS_ID,
            # A corpus too small for the requested size gets a smaller vocabulary, not a crash.
            hard_vocab_limit=False,
            input_sentence_size=0,  # all of `lines`, which are already a bounded sample
            max_sentence_length=1 << 16,
            num_threads=os.cpu_count() or 1,
            minloglevel=2,
        )
    except RuntimeError as exc:
        raise TinytError(f"SentencePiece could not train a {config.vocab_size}-piece vocabulary "
                         f"({str(exc).strip().splitlines()[-1]}); lower tokenizer.vocab_size "
                         "or use more training data") from None


def train_or_load(config: TokenizerConfig, src_lines: list[str], tgt_lines: list[str],
                  directory: str | Path, seed: int = 1) -> Tokenizers:
    """Tokenizers for this training text: reused from `directory` when the fingerprint matches,
    else trained afresh (joint: on source and target text together) and saved there."""
    directory = Path(directory)
    key = fingerprint(config, src_lines, tgt_lines)
    meta_path = directory / "meta.json"
    if meta_path.is_file():
        try:
            cached = json.loads(meta_path.read_text(encoding="utf-8"))
        except json.JSONDecodeError:
            cached = {}
        if cached.get("fingerprint") == key:
            return Tokenizers.load(directory)
    directory.mkdir(parents=True, exist_ok=True)
    # Train into a temporary folder and move into place, so an interrupted training never
    # leaves a half-written model beside a meta.json that vouches for it.
    with tempfile.TemporaryDirectory(dir=directory) as tmp:
        names = ["joint"] if config.joint else ["src", "tgt"]
        texts = [src_lines + tgt_lines] if config.joint else [src_lines, tgt_lines]
        for name, lines in zip(names, texts):
            _train_model(lines, Path(tmp) / name, config, seed)
        for name in names:
            os.replace(Path(tmp) / f"{name}.model", directory / f"{name}.model")
            os.replace(Path(tmp) / f"{name}.vocab", directory / f"{name}.vocab")
    meta = {"fingerprint": key, "joint": config.joint, "config": asdict(config),
            "special_ids": {"pad": PAD_ID, "unk": UNK_ID, "bos": BOS_ID, "eos": EOS_ID}}
    meta_path.write_text(json.dumps(meta, indent=2), encoding="utf-8")
    return Tokenizers.load(directory)
