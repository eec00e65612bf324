"""One-file model bundles: export one from a run, load one to translate.

A run directory is what training needs; a bundle is what translating needs, in one file that
can be copied anywhere: the weights of one checkpoint, the run's resolved config, the
SentencePiece model(s), the tokenizer fingerprint, the checkpoint's progress and a summary of
the run's validations.

A bundle is a safetensors file (bundle version 3): tensors and strings only, so loading one
cannot run code, and any safetensors reader opens it (`safetensors.torch.load_file(path)`
gives the tensors, `safe_open(path, "pt").metadata()` the strings):

    tensors   model.NAME        each weight of the model's state dict; a weight shared under
                                several names (tied embeddings) is stored once, see `aliases`
              tokenizer.joint   the SentencePiece model's bytes as uint8; with separate
                                vocabularies tokenizer.src and tokenizer.tgt instead
    metadata  format            "tinyt-bundle"
              bundle_version    "3"
              tinyt_version     the tinyt that wrote it
              config            JSON: the run's resolved config
              tokenizer         JSON: {"joint": true/false, "fingerprint": "..."}
              progress          JSON: the checkpoint's progress (step, epoch, best loss, ...)
              source            JSON: the run directory, checkpoint and averaged steps
              metrics           JSON: best validation loss and BLEU of the run, with steps
              aliases           JSON: {each other name of a tied weight: the name it is
                                stored under}, e.g.
                                {"model.src_embed.weight": "model.tgt_embed.weight"}
              checksum          SHA-256 of all the tensors and all the other metadata
                                (`_contents_checksum`)

The JSON is standard: a number that is not finite (the best loss of a checkpoint saved before
any validation) is written as null. Bundles of versions 1 and 2, a dict written by torch.save,
still load, through `torch.load(weights_only=True)`, which cannot run code either.

    export_bundle("runs/multi30k_de_en", "model.tinyt")
    config, tokenizers, model, payload = load_bundle("model.tinyt")
"""

from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path
from typing import Any

import safetensors.torch
import sentencepiece as spm
import torch
from safetensors import safe_open

from tinyt import __version__
from tinyt.checkpoint import (build_model, load_tensors_safely, load_trained, shared_tensor_names,
                              validation_checkpoints)
from tinyt.config import Config, ConfigError, config_from_dict
from tinyt.errors import TinytError
from tinyt.model import Transformer
from tinyt.rundir import metrics_summary
from tinyt.tokenizer import Tokenizers
from tinyt.writing import atomic_write_bytes

BUNDLE_FORMAT = "tinyt-bundle"  # the marker that tells a bundle from a checkpoint
# Raised whenever a new tinyt writes bundles an older one cannot read. 3: a safetensors file
# whose checksum covers all of it. 2: a torch.save dict whose checksum covers the metadata too
# (progress, metrics, source, versions). 1: the same dict, its checksum over weights,
# vocabularies and config only. Versions 1 and 2 still load.
BUNDLE_VERSION = 3
WEIGHT_PREFIX = "model."  # tensor names: "model." + state-dict name, or "tokenizer." + side
TOKENIZER_PREFIX = "tokenizer."


# -- writing --------------------------------------------------------------------------------

def export_bundle(run_dir: str | Path, out_path: str | Path, checkpoint: str = "best.pt") -> Path:
    """Write `checkpoint` of the trained run in `run_dir`, with everything needed to translate,
    into the single file `out_path` (atomically; missing parent folders are created)."""
    run_dir, out_path = Path(run_dir), Path(out_path)
    config, tokenizers, model, payload = load_trained(run_dir, checkpoint)
    if out_path.is_dir():
        raise TinytError(f"{out_path} is a folder; pass the bundle's file name, e.g. "
                         f"{out_path / 'model.tinyt'}")
    protected = {(run_dir / name).resolve() for name in ("last.pt", "best.pt", checkpoint)}
    protected.update(path.resolve() for _, path in validation_checkpoints(run_dir))
    if out_path.resolve() in protected:
        raise TinytError(f"writing the bundle to {out_path} would replace a checkpoint of the "
                         "run; choose another file name, e.g. model.tinyt")

    # Tokenizers.load gives a joint vocabulary as one processor serving both sides.
    joint = tokenizers.src is tokenizers.tgt
    sides = {"joint": tokenizers.src} if joint else {"src": tokenizers.src,
                                                      "tgt": tokenizers.tgt}
    tensors = {TOKENIZER_PREFIX + side: _bytes_to_tensor(processor.serialized_model_proto())
               for side, processor in sides.items()}
    # A tied weight appears in the state dict under two names, and safetensors refuses tensors
    # that share memory: store it under its first name only and record the others, which
    # loading fills from it (the rebuilt model is tied by its config).
    weights = model.state_dict()
    aliases = shared_tensor_names(weights)
    tensors.update((WEIGHT_PREFIX + name, tensor.detach().cpu().contiguous())
                   for name, tensor in weights.items() if name not in aliases)
    metadata = {
        "format": BUNDLE_FORMAT,
        "bundle_version": str(BUNDLE_VERSION),
        "tinyt_version": __version__,
        "config": _json_text(config.to_dict()),
        "tokenizer": _json_text({"joint": joint, "fingerprint": tokenizers.fingerprint}),
        "progress": _json_text(dict(payload.get("progress") or {})),
        "source": _json_text({"run_dir": str(run_dir), "checkpoint": checkpoint,
                              "averaged_steps": list(payload.get("averaged_steps") or [])}),
        "metrics": _json_text(metrics_summary(run_dir / "metrics.jsonl")),
        "aliases": _json_text({WEIGHT_PREFIX + alias: WEIGHT_PREFIX + name
                               for alias, name in aliases.items()}),
    }
    metadata["checksum"] = _contents_checksum(tensors, metadata)
    atomic_write_bytes(out_path, safetensors.torch.save(tensors, metadata), then="export again")
    return out_path


def _bytes_to_tensor(data: bytes) -> torch.Tensor:
    # frombuffer shares the bytearray's memory; clone so the tensor owns its storage.
    return torch.frombuffer(bytearray(data), dtype=torch.uint8).clone()


def _tensor_to_bytes(tensor: torch.Tensor) -> bytes:
    return tensor.contiguous().numpy().tobytes()


def _json_text(value: Any) -> str:
    """`value` as standard JSON for a metadata entry, keys sorted. Numbers that are not finite
    become null: JSON has none, and readers other than Python's refuse `Infinity`."""

    def finite(v: Any) -> Any:
        if isinstance(v, float) and not math.isfinite(v):
            return None
        if isinstance(v, dict):
            return {k: finite(item) for k, item in v.items()}
        if isinstance(v, (list, tuple)):
            return [finite(item) for item in v]
        return v

    return json.dumps(finite(value), sort_keys=True, allow_nan=False)


def _contents_checksum(tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> str:
    """SHA-256 of a version 3 bundle: for each tensor in name order, the JSON line
    `[name, dtype, shape]` (dtype as torch names it, without "torch.": "float32", "uint8")
    followed by the tensor's bytes (C order, little-endian, as safetensors stores them); then
    for each metadata entry but `checksum` in key order, the JSON line `[key, value]`.

    safetensors checks that the header and the data fit together, not the bytes themselves:
    a flipped bit in a weight or a metadata value would silently give a worse model or wrong
    information. Checked against this hash, it is a clear error instead.
    """
    h = hashlib.sha256()
    for name in sorted(tensors):
        tensor = tensors[name].detach().cpu().contiguous()
        dtype = str(tensor.dtype).removeprefix("torch.")
        h.update((json.dumps([name, dtype, list(tensor.shape)]) + "\n").encode())
        h.update(tensor.reshape(-1).view(torch.uint8).numpy())  # no copy of the bytes
    for key in sorted(metadata):
        if key != "checksum":
            h.update((json.dumps([key, metadata[key]]) + "\n").encode())
    return h.hexdigest()


def _metadata(bundle: dict[str, Any]) -> dict[str, Any]:
    """Everything in a version 1 or 2 bundle but the weights, the vocabularies' bytes, the
    config and the checksum itself: versions, progress, metrics, source, tokenizer fingerprint
    and layout."""
    meta = {k: v for k, v in bundle.items() if k not in ("model", "config", "checksum",
                                                           "tokenizer")}
    meta["tokenizer"] = {k: v for k, v in bundle["tokenizer"].items() if k != "models"}
    return meta


def _checksum(weights: dict[str, torch.Tensor], spm_models: dict[str, torch.Tensor],
              config: dict[str, Any], metadata: dict[str, Any] | None = None) -> str:
    """SHA-256 of a version 1 or 2 bundle: weights, tokenizer bytes, config and (version 2)
    metadata.

    torch.load notices a truncated file but not flipped bits inside a tensor or a string,
    which would silently give a worse model or wrong information; this hash makes such damage
    a clear error instead.
    """
    h = hashlib.sha256()
    for group in (weights, spm_models):
        for name in sorted(group):
            tensor = group[name].detach().cpu().contiguous()
            h.update(f"{name}:{tensor.dtype}:{tuple(tensor.shape)}\n".encode())
            h.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    h.update(json.dumps(config, sort_keys=True).encode())
    if metadata is not None:
        h.update(json.dumps(metadata, sort_keys=True, default=str).encode())
    return h.hexdigest()


# -- reading --------------------------------------------------------------------------------

def load_bundle(path: str | Path) -> tuple[Config, Tokenizers, Transformer, dict[str, Any]]:
    """Config, tokenizers and model (in eval mode, on the CPU) rebuilt from a bundle, and the
    bundle's payload: format, bundle_version (an int), tinyt_version, model (the weights as a
    state dict), config (a dict), tokenizer ({"joint", "models": uint8 tensors}),
    tokenizer_fingerprint, progress, source, metrics and checksum, for every bundle version.
    A missing, foreign, damaged or too new file raises TinytError."""
    path = Path(path)
    if path.is_dir():
        raise TinytError(f"{path} is a folder, not a model bundle; pass a run directory as "
                         "--run (or export it with `tinyt export`)")
    if not path.is_file():
        raise TinytError(f"model bundle {path} not found; make one with "
                         f"`tinyt export --run runs/NAME -o {path}`")
    if _is_safetensors(path):
        config, tokenizers, model, payload = _load_safetensors_bundle(path)
    else:  # a bundle of version 1 or 2, a checkpoint, or a file that is neither
        config, tokenizers, model, payload = _load_torch_bundle(path)
    model.eval()
    return config, tokenizers, model, payload


def _damaged(path: Path) -> str:
    return (f"{path} is damaged (its contents do not match its checksum or are incomplete); "
            "export the bundle again")


def _is_safetensors(path: Path) -> bool:
    """Whether `path` is laid out as a safetensors file, from its first 9 bytes (nothing is
    loaded): its header's length (8 bytes, little-endian), then the header, a JSON object.

    A file written by torch.save is a zip archive: "PK\\x03\\x04", two bytes of version, two of
    flags, then the compression method (0 or 8) at byte 8, never "{". The other way round,
    a header's length may well start with the bytes "PK", so they are not what decides.
    """
    try:
        with open(path, "rb") as f:
            start = f.read(9)
    except OSError as exc:
        raise TinytError(f"cannot read {path}: {exc.strerror or exc}; check the file's "
                         "permissions") from exc
    return len(start) == 9 and start[8:9] == b"{"


def _load_safetensors_bundle(path: Path
                             ) -> tuple[Config, Tokenizers, Transformer, dict[str, Any]]:
    """`load_bundle` of a version 3 bundle (a safetensors file), model not yet in eval mode."""
    damaged = _damaged(path)
    try:
        with safe_open(path, framework="pt", device="cpu") as f:
            metadata = f.metadata() or {}
            # Marker and version first: a foreign file or a future layout is not "damaged",
            # and a large foreign file is refused before its tensors are read.
            text = metadata.get("bundle_version") or ""
            version = int(text) if text.isdecimal() else text
            _check_marker(path, {**metadata, "bundle_version": version})
            if version != BUNDLE_VERSION:  # versions 1 and 2 were torch.save files
                raise TinytError(damaged)
            tensors = {name: f.get_tensor(name) for name in f.keys()}
    except TinytError:
        raise
    except OSError as exc:
        raise TinytError(f"cannot read {path}: {exc.strerror or exc}; check the file's "
                         "permissions") from exc
    except Exception as exc:  # safetensors' own error: truncated, header not JSON, ...
        raise TinytError(damaged) from exc
    if metadata.get("checksum") != _contents_checksum(tensors, metadata):
        raise TinytError(damaged)
    try:
        config_dict = json.loads(metadata["config"])
        tokenizer = json.loads(metadata["tokenizer"])
        sides = ("joint",) if tokenizer["joint"] else ("src", "tgt")
        spm_models = {side: tensors[TOKENIZER_PREFIX + side] for side in sides}
        config = config_from_dict(config_dict, check_paths=False)
        tokenizers = _tokenizers(spm_models, tokenizer["joint"], tokenizer["fingerprint"])
        model = build_model(config, tokenizers)
        # Every name of a tied weight gets the stored tensor; the model, built from the config,
        # already ties them, so both copies land in the one parameter.
        stored = dict(tensors)
        for alias, name in json.loads(metadata["aliases"]).items():
            stored[alias] = tensors[name]
        model.load_state_dict({name.removeprefix(WEIGHT_PREFIX): tensor
                               for name, tensor in stored.items()
                               if name.startswith(WEIGHT_PREFIX)})
        payload = {
            "format": metadata["format"],
            "bundle_version": version,
            "tinyt_version": metadata["tinyt_version"],
            # The model's own state dict: the weights as loaded, without a second copy.
            "model": model.state_dict(),
            "config": config_dict,
            "tokenizer": {"joint": bool(tokenizer["joint"]), "models": spm_models},
            "tokenizer_fingerprint": tokenizers.fingerprint,
            "progress": json.loads(metadata["progress"]),
            "source": json.loads(metadata["source"]),
            "metrics": json.loads(metadata["metrics"]),
            "checksum": metadata["checksum"],
        }
    except ConfigError as exc:
        raise TinytError(f"{path} holds an invalid config ({exc}); export the bundle "
                         "again") from None
    except (KeyError, TypeError, ValueError, AttributeError, RuntimeError):
        raise TinytError(damaged) from None
    return config, tokenizers, model, payload


def _load_torch_bundle(path: Path) -> tuple[Config, Tokenizers, Transformer, dict[str, Any]]:
    """`load_bundle` of a version 1 or 2 bundle (a dict written by torch.save), model not yet
    in eval mode; a checkpoint or any other file gets the message that says what it is."""
    payload = load_tensors_safely(path, f"{path} is damaged or not a tinyt model bundle; "
                                        "export the bundle again")
    _check_marker(path, payload)
    damaged = _damaged(path)
    if payload["bundle_version"] >= 3:  # from version 3 a bundle is a safetensors file
        raise TinytError(damaged)
    try:
        tok = payload["tokenizer"]
        spm_models = tok["models"]
        metadata = _metadata(payload) if payload["bundle_version"] >= 2 else None
        if payload["checksum"] != _checksum(payload["model"], spm_models, payload["config"],
                                            metadata):
            raise TinytError(damaged)
        config = config_from_dict(payload["config"], check_paths=False)
        tokenizers = _tokenizers(spm_models, tok["joint"], payload["tokenizer_fingerprint"])
        model = build_model(config, tokenizers)
        model.load_state_dict(payload["model"])
    except TinytError:
        raise
    except ConfigError as exc:
        raise TinytError(f"{path} holds an invalid config ({exc}); export the bundle "
                         "again") from None
    except (KeyError, TypeError, ValueError, AttributeError, RuntimeError):
        raise TinytError(damaged) from None
    return config, tokenizers, model, payload


def _check_marker(path: Path, payload: Any) -> None:
    """Tell a bundle from a checkpoint or anything else, and refuse bundles from the future."""
    if not isinstance(payload, dict) or payload.get("format") != BUNDLE_FORMAT:
        if isinstance(payload, dict) and "model" in payload and "format_version" in payload:
            raise TinytError(f"{path} is a training checkpoint, not a model bundle; use its run "
                             "directory (--run), or make a bundle with `tinyt export`")
        raise TinytError(f"{path} is not a tinyt model bundle; make one with "
                         "`tinyt export --run runs/NAME -o model.tinyt`")
    version = payload.get("bundle_version")
    if not isinstance(version, int) or isinstance(version, bool) or version < 1:
        raise TinytError(f"{path} is damaged (bundle version {version!r}); export it again")
    if version > BUNDLE_VERSION:
        raise TinytError(f"{path} was written by a newer tinyt ({payload.get('tinyt_version')}, "
                         f"bundle version {version}); this tinyt {__version__} reads version "
                         f"{BUNDLE_VERSION}: upgrade tinyt")


def _tokenizers(spm_models: dict[str, torch.Tensor], joint: bool, fingerprint: Any
                ) -> Tokenizers:
    """The bundle's tokenizers from its SentencePiece models' bytes: "joint" (one processor
    serving both sides, as Tokenizers.load gives it), or "src" and "tgt"."""
    if joint:
        src = tgt = _processor(spm_models["joint"])
    else:
        src, tgt = _processor(spm_models["src"]), _processor(spm_models["tgt"])
    return Tokenizers(src, tgt, str(fingerprint))


def _processor(model_bytes: torch.Tensor) -> spm.SentencePieceProcessor:
    if not isinstance(model_bytes, torch.Tensor) or model_bytes.dtype != torch.uint8:
        raise TypeError("tokenizer model is not a byte tensor")
    return spm.SentencePieceProcessor(model_proto=_tensor_to_bytes(model_bytes))

