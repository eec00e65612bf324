"""Run configuration: typed dataclasses, strict YAML loading and validation.

A config file is a YAML mapping with the sections below. Every key is optional (defaults are
the ones written here); an unknown key, a value of the wrong type or an impossible value stops
with a `ConfigError` naming the key, before any data is read or anything is trained.
"""

from __future__ import annotations

import dataclasses
import math
import os
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from tinyt.errors import TinytError

SPLIT_ROLES = ("train", "valid", "test")


class ConfigError(TinytError):
    """The config file (or an override of it) is wrong; the message names the key."""


@dataclass
class DataConfig:
    """Where the parallel corpus comes from and which pairs are kept.

    With `dir` unset the corpus comes from the Hugging Face hub (`hub_name`, `hub_config`,
    split names from `hub_splits`). With `dir` set it comes from local files in that folder,
    split names from `files`:
      - format `text`: `{dir}/{name}.{lang}` or `{dir}/{name}.{lang}.gz`, one sentence a line,
        the two languages line-aligned (Multi30k's own raw layout);
      - format `tsv`: `{dir}/{name}.tsv[.gz]`, a header row naming the columns;
      - format `jsonl`: `{dir}/{name}.jsonl[.gz]`, one JSON object a line.
    Fields default to the language codes (`{"de": "...", "en": "..."}`); `translation_field`
    handles hub datasets that nest pairs as `{"translation": {"de": ..., "en": ...}}`.

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
               f"is {self.format!r}; use one of text, tsv, jsonl")
        _check(self.max_len >= 1, "data.max_len", f"is {self.max_len}; it must be >= 1")
        _check(self.stream_buffer >= 1, "data.stream_buffer",
               f"is {self.stream_buffer}; it must be >= 1 (pairs per streaming window)")
        _check(self.num_proc >= 0, "data.num_proc",
               f"is {self.num_proc}; it must be >= 0 (0: min(4, CPU cores))")
        for mapping, name in ((self.hub_splits, "data.hub_splits"), (self.files, "data.files")):
            missing = [r for r in ("train", "valid") if r not in mapping]
            _check(not missing, name, f"lacks {', '.join(missing)}; it maps train/valid/test "
                   "to split names")
            unknown = [r for r in mapping if r not in SPLIT_ROLES]
            _check(not unknown, name, f"has unknown role(s) {', '.join(unknown)}; "
                   f"use {', '.join(SPLIT_ROLES)}")
        if check_paths and self.dir is not None:
            _check(Path(self.dir).is_dir(), "data.dir",
                   f"is {self.dir!r}, which is not a folder; point it at the corpus files")

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
class TokenizerConfig:
    """SentencePiece subword vocabulary, trained on the training split only."""

    vocab_size: int = 8000
    model_type: str = "unigram"  # unigram | bpe
    joint: bool = True  # one vocabulary for both languages (needed for tied embeddings)
    character_coverage: float = 1.0
    # Bound on SentencePiece's training text: a seeded random sample of this many pairs of the
    # training split (all of them, in order, when the split is smaller; the first ones when
    # streaming), and at most this many lines per model after that.
    max_sentences: int = 2_000_000

    def validate(self) -> None:
        _check(self.vocab_size >= 16, "tokenizer.vocab_size",
               f"is {self.vocab_size}; it must be >= 16")
        _check(self.model_type in ("unigram", "bpe"), "tokenizer.model_type",
               f"is {self.model_type!r}; use unigram or bpe")
        _check(0.9 <= self.character_coverage <= 1.0, "tokenizer.character_coverage",
               f"is {self.character_coverage}; use a value in [0.9, 1.0]")
        _check(self.max_sentences >= 1, "tokenizer.max_sentences", "must be >= 1")


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
    tie_embeddings: bool = True  # source, target and output embeddings share one matrix
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
               f"is {self.activation!r}; use relu or gelu")
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
    amp: str = "auto"  # auto (bf16 on CUDA, off on CPU) | none | bf16 | fp16
    num_threads: int = 0  # CPU threads for torch; 0: all cores
    compile: bool = False  # torch.compile the model

    def validate(self) -> None:
        _check(self.batch_tokens >= 8, "train.batch_tokens", f"is {self.batch_tokens}; >= 8")
        _check(self.accumulate_steps >= 1, "train.accumulate_steps", "must be >= 1")
        _check(self.max_epochs >= 1, "train.max_epochs", f"is {self.max_epochs}; it must be >= 1")
        _check(self.max_steps >= 0, "train.max_steps", "must be >= 0 (0: no limit)")
        _check(self.max_minutes >= 0, "train.max_minutes", "must be >= 0 (0: no limit)")
        _check(self.lr > 0, "train.lr", f"is {self.lr}; the learning rate must be > 0")
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
               "train.device", f"is {self.device!r}; use auto, cpu, cuda or cuda:N")
        _check(self.amp in ("auto", "none", "bf16", "fp16"), "train.amp",
               f"is {self.amp!r}; use auto, none, bf16 or fp16")
        _check(self.num_threads >= 0, "train.num_threads", "must be >= 0 (0: all cores)")


@dataclass
class DecodingConfig:
    """Search settings for evaluation and translation."""

    beam_size: int = 5  # 1: greedy
    length_penalty: float = 1.0  # hypothesis score = log-prob / length ** length_penalty
    max_len_ratio: float = 1.5  # output may be ratio * source length + offset tokens long
    max_len_offset: int = 10
    batch_size: int = 128  # sentences decoded together

    def validate(self) -> None:
        _check(self.beam_size >= 1, "decoding.beam_size", f"is {self.beam_size}; >= 1")
        _check(self.length_penalty >= 0, "decoding.length_penalty", "must be >= 0")
        _check(self.max_len_ratio > 0, "decoding.max_len_ratio", "must be > 0")
        _check(self.max_len_offset >= 0, "decoding.max_len_offset", "must be >= 0")
        _check(self.batch_size >= 1, "decoding.batch_size", "must be >= 1")


@dataclass
class Config:
    """A whole run: the five sections plus the directory everything is written to."""

    run_dir: str = "runs/default"
    data: DataConfig = field(default_factory=DataConfig)
    tokenizer: TokenizerConfig = field(default_factory=TokenizerConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    decoding: DecodingConfig = field(default_factory=DecodingConfig)

    def validate(self, check_paths: bool = True) -> None:
        """Raise ConfigError for any impossible value; `check_paths` also requires data.dir to
        exist (off when reloading a finished run, whose corpus may have moved)."""
        _check(self.run_dir != "", "run_dir", "must be a non-empty path")
        self.data.validate(check_paths)
        for section in (self.tokenizer, self.model, self.train, self.decoding):
            section.validate()
        _check(self.data.max_len + 1 <= self.model.max_positions, "data.max_len",
               f"is {self.data.max_len}, but sentences plus <bos>/<eos> must fit "
               f"model.max_positions={self.model.max_positions}; lower one or raise the other")
        if self.model.tie_embeddings:
            _check(self.tokenizer.joint, "model.tie_embeddings",
                   "needs tokenizer.joint: true (one vocabulary for both languages); "
                   "set one of them differently")

    def to_dict(self) -> dict[str, Any]:
        raw = dataclasses.asdict(self)
        raw["train"]["betas"] = list(self.train.betas)
        return raw


def _check(ok: bool, key: str, problem: str) -> None:
    if not ok:
        raise ConfigError(f"{key} {problem}")


def _coerce(value: Any, kind: Any, key: str) -> Any:
    """Return `value` as the annotated type `kind`, or raise ConfigError naming `key`."""
    origin = typing.get_origin(kind)
    if origin in (typing.Union, types.UnionType):
        options = typing.get_args(kind)
        if value is None and type(None) in options:
            return None
        (inner,) = [o for o in options if o is not type(None)]
        return _coerce(value, inner, key)
    if dataclasses.is_dataclass(kind):
        return _build(kind, value, key)
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key} must be a mapping, got {value!r}")
        _, vkind = typing.get_args(kind)
        return {str(k): _coerce(v, vkind, f"{key}.{k}") for k, v in value.items()}
    if origin is tuple:
        args = typing.get_args(kind)
        if not isinstance(value, (list, tuple)) or len(value) != len(args):
            raise ConfigError(f"{key} must be a list of {len(args)} numbers, got {value!r}")
        return tuple(_coerce(v, a, f"{key}[{i}]") for i, (v, a) in enumerate(zip(value, args)))
    if kind is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key} must be true or false, got {value!r}")
        return value
    if kind is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key} must be an integer, got {value!r}")
        return value
    if kind is float:
        # PyYAML (YAML 1.1) reads `5e-4` without a dot as a string: accept numeric strings.
        if isinstance(value, str):
            try:
                value = float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key} must be a number, got {value!r}")
        try:
            number = float(value)
        except OverflowError:
            raise ConfigError(f"{key} is too large a number: {str(value)[:20]}...") from None
        if math.isnan(number):
            raise ConfigError(f"{key} must be a number, got NaN")
        return number
    if kind is str:
        if isinstance(value, bool) or not isinstance(value, (str, int, float)):
            raise ConfigError(f"{key} must be a string, got {value!r}")
        return str(value)
    raise AssertionError(f"unhandled config type {kind} for {key}")


def _build(cls: type, raw: Any, prefix: str) -> Any:
    if raw is None:
        raw = {}
    where = f"section {prefix}" if prefix else "the config"
    if not isinstance(raw, dict):
        raise ConfigError(f"{where} must be a mapping of keys to values, got {raw!r}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    unknown = [k for k in raw if k not in names]
    if unknown:
        key = f"{prefix}.{unknown[0]}" if prefix else str(unknown[0])
        raise ConfigError(f"unknown key {key!r}; known keys in {where}: {', '.join(names)}")
    values = {k: _coerce(v, hints[k], f"{prefix}.{k}" if prefix else k) for k, v in raw.items()}
    return cls(**values)


def config_from_dict(raw: Any, check_paths: bool = True) -> Config:
    """Build and validate a Config from a parsed YAML mapping."""
    config = _build(Config, raw, "")
    config.validate(check_paths)
    return config


def load_config(path: str | Path, check_paths: bool = True) -> Config:
    """Read, type-check and validate a YAML config file; any problem raises ConfigError."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {str(path)!r} does not exist; pass an existing YAML file")
    try:
        text = path.read_text(encoding="utf-8")
        raw = yaml.safe_load(text)
    except UnicodeDecodeError:
        raise ConfigError(f"{path}: not UTF-8 text; save the config as UTF-8 YAML") from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(exc, "problem", None) or "invalid YAML"
        raise ConfigError(f"{path}: {problem}{where}; fix the YAML syntax") from None
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
            raise ConfigError(f"--set {item!r}: write it as section.key=value, e.g. train.lr=0.001")
        try:
            value = yaml.safe_load(text) if text.strip() else ""
        except yaml.YAMLError:
            raise ConfigError(f"--set {item!r}: the value is not valid YAML") from None
        node = raw
        for depth, part in enumerate(parts[:-1]):
            if node.get(part) is None:
                node[part] = {}
            if not isinstance(node[part], dict):
                raise ConfigError(f"--set {item!r}: {'.'.join(parts[: depth + 1])} is not a "
                                  "section")
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
        raise ConfigError(f"--set: {exc}") from None


def save_config(config: Config, path: str | Path) -> None:
    Path(path).write_text(yaml.safe_dump(config.to_dict(), sort_keys=False), encoding="utf-8")
