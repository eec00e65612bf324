"""Checkpoints and run directories: atomic saves, safe loads, rebuilding a trained model.

A run directory holds:
    config.yaml            the resolved config the run was trained with
    tokenizer/             SentencePiece model(s) and meta.json (tinyt.tokenizer)
    best.pt, last.pt       checkpoints: best validation loss, latest state
    metrics.jsonl          one JSON line per validation
A checkpoint is a dict of tensors, numbers, strings, lists and dicts only, so it loads with
`torch.load(weights_only=True)`: nothing in it can execute code.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

from tinyt.config import Config, ConfigError, load_config
from tinyt.errors import TinytError
from tinyt.model import Transformer
from tinyt.tokenizer import Tokenizers

FORMAT_VERSION = 1


def save_checkpoint(payload: dict[str, Any], path: str | Path) -> None:
    """Write `payload` so that `path` is always either the old file or the complete new one:
    write a temporary file beside it, flush and fsync it, then rename it over `path`."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        with open(tmp, "wb") as f:
            torch.save({"format_version": FORMAT_VERSION, **payload}, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise TinytError(f"could not save checkpoint {path}: {exc.strerror or exc}; the previous "
                         "checkpoint is intact (free disk space, then resume)") from None
    try:  # make the rename itself durable
        fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError:
        pass


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """Load a checkpoint safely; a missing, damaged or foreign file raises TinytError."""
    path = Path(path)
    if not path.is_file():
        raise TinytError(f"checkpoint {path} not found; train the run first or pick another run")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:120]
        raise TinytError(f"checkpoint {path} is damaged or not a tinyt checkpoint ({reason}); "
                         "use another checkpoint (e.g. last.pt) or retrain") from None
    if not isinstance(payload, dict) or "model" not in payload:
        raise TinytError(f"{path} is not a tinyt checkpoint")
    version = payload.get("format_version")
    if version != FORMAT_VERSION:
        raise TinytError(f"checkpoint {path} has format version {version}, this tinyt reads "
                         f"version {FORMAT_VERSION}; use the tinyt release that wrote it")
    return payload


def load_run_config(run_dir: str | Path) -> Config:
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise TinytError(f"run directory {run_dir} does not exist; pass --run with a trained run")
    try:
        return load_config(run_dir / "config.yaml", check_paths=False)
    except ConfigError as exc:
        raise TinytError(f"run {run_dir} has no usable config.yaml ({exc})") from None


def build_model(config: Config, tokenizers: Tokenizers) -> Transformer:
    return Transformer(config.model, tokenizers.src_vocab_size, tokenizers.tgt_vocab_size)


def load_trained(run_dir: str | Path, checkpoint: str = "best.pt"
                 ) -> tuple[Config, Tokenizers, Transformer, dict[str, Any]]:
    """Config, tokenizers and model (weights from `checkpoint`, in eval mode, on the CPU) of a
    trained run, checked against each other."""
    run_dir = Path(run_dir)
    config = load_run_config(run_dir)
    tokenizers = Tokenizers.load(run_dir / "tokenizer")
    payload = load_checkpoint(run_dir / checkpoint)
    if payload.get("tokenizer_fingerprint") != tokenizers.fingerprint:
        raise TinytError(f"{run_dir / checkpoint} was trained with a different vocabulary than "
                         f"{run_dir / 'tokenizer'}; restore the run's own tokenizer folder")
    model = build_model(config, tokenizers)
    try:
        model.load_state_dict(payload["model"])
    except (RuntimeError, KeyError) as exc:
        first = str(exc).strip().splitlines()[0][:160]
        raise TinytError(f"{run_dir / checkpoint} does not fit the model in its config.yaml "
                         f"({first}); was config.yaml edited after training?") from None
    model.eval()
    return config, tokenizers, model, payload
