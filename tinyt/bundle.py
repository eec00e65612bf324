"""One-file model bundles, and a summary of a trained run or bundle.

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
from tinyt.checkpoint import (build_model, load_run_config, load_tensors_safely, load_trained,
                              shared_tensor_names, validation_checkpoints)
from tinyt.config import Config, ConfigError, config_from_dict
from tinyt.data import read_split_record
from tinyt.errors import TinytError
from tinyt.model import Transformer
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
        if tokenizer["joint"]:
            src = tgt = _processor(spm_models["joint"])
        else:
            src, tgt = _processor(spm_models["src"]), _processor(spm_models["tgt"])
        tokenizers = Tokenizers(src, tgt, str(tokenizer["fingerprint"]))
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
        if tok["joint"]:
            src = tgt = _processor(spm_models["joint"])
        else:
            src, tgt = _processor(spm_models["src"]), _processor(spm_models["tgt"])
        tokenizers = Tokenizers(src, tgt, str(payload["tokenizer_fingerprint"]))
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


def _processor(model_bytes: torch.Tensor) -> spm.SentencePieceProcessor:
    if not isinstance(model_bytes, torch.Tensor) or model_bytes.dtype != torch.uint8:
        raise TypeError("tokenizer model is not a byte tensor")
    return spm.SentencePieceProcessor(model_proto=_tensor_to_bytes(model_bytes))


def load_for_inference(run: str | Path | None = None, model: str | Path | None = None,
                       checkpoint: str = "best.pt"
                       ) -> tuple[Config, Tokenizers, Transformer, dict[str, Any]]:
    """(config, tokenizers, model, payload) from a run directory (`run`, with `checkpoint`)
    or a bundle file (`model`): exactly one of the two."""
    if run is not None and model is not None:
        raise TinytError("pass either a run directory (--run) or a model bundle (--model), "
                         "not both")
    if run is None and model is None:
        raise TinytError("pass a run directory (--run runs/NAME) or a model bundle "
                         "(--model FILE)")
    if model is not None:
        if checkpoint != "best.pt":
            raise TinytError(f"--checkpoint {checkpoint} applies to a run directory; a model "
                             "bundle holds the one checkpoint it was exported from")
        return load_bundle(model)
    return load_trained(run, checkpoint)


# -- summaries ------------------------------------------------------------------------------

def _no_validations() -> dict[str, Any]:
    return {"validations": 0, "last_step": None,
            "best_valid_loss": None, "best_valid_loss_step": None,
            "best_valid_bleu": None, "best_valid_bleu_step": None}


def metrics_summary(path: Path) -> dict[str, Any]:
    """Best validation loss and BLEU, and their steps, from a run's metrics.jsonl (lines that
    cannot be read, e.g. one cut short by a kill, are skipped)."""
    summary = _no_validations()
    if not path.is_file():
        return summary
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        try:
            record = json.loads(line)
            step, loss = int(record["step"]), float(record["valid_loss"])
        except (json.JSONDecodeError, KeyError, TypeError, ValueError):
            continue
        summary["validations"] += 1
        summary["last_step"] = step
        if summary["best_valid_loss"] is None or loss < summary["best_valid_loss"]:
            summary["best_valid_loss"], summary["best_valid_loss_step"] = loss, step
        bleu = record.get("valid_bleu")
        if isinstance(bleu, (int, float)) and (summary["best_valid_bleu"] is None
                                               or bleu > summary["best_valid_bleu"]):
            summary["best_valid_bleu"], summary["best_valid_bleu_step"] = float(bleu), step
    return summary


def _describe_config(config: Config, tokenizers: Tokenizers, parameters: int) -> dict[str, Any]:
    m, t = config.model, config.train
    return {
        "parameters": parameters,
        "languages": {"src": config.data.src_lang, "tgt": config.data.tgt_lang},
        "vocab": {"joint": tokenizers.src is tokenizers.tgt,
                  "src_size": tokenizers.src_vocab_size, "tgt_size": tokenizers.tgt_vocab_size,
                  "model_type": config.tokenizer.model_type},
        "model": {"d_model": m.d_model, "n_heads": m.n_heads, "enc_layers": m.enc_layers,
                  "dec_layers": m.dec_layers, "d_ff": m.d_ff, "activation": m.activation,
                  "pre_norm": m.pre_norm, "tie_embeddings": m.tie_embeddings,
                  "max_positions": m.max_positions, "dropout": m.dropout},
        "train": {"batch_tokens": t.batch_tokens, "lr": t.lr, "warmup_steps": t.warmup_steps,
                  "max_epochs": t.max_epochs, "max_steps": t.max_steps,
                  "label_smoothing": t.label_smoothing, "seed": t.seed,
                  "keep_checkpoints": t.keep_checkpoints},
        "decoding": {"beam_size": config.decoding.beam_size,
                     "length_penalty": config.decoding.length_penalty},
    }


def _describe_data(config: Config, record: dict[str, Any] | None) -> dict[str, Any]:
    """The data a run trained on: languages, the scripts of their text, pairs, duplicates
    dropped, held-out sizes. From the run's data/split.json (`record`) where there is one;
    a bundle, or a run trained before tinyt kept that record, gives what its config says."""
    d, record = config.data, record or {}
    held = record.get("held_out") or {role: getattr(d.holdout, role) if d.holdout else 0
                                       for role in ("valid", "test")}
    return {"languages": {"src": d.src_lang, "tgt": d.tgt_lang},
            "scripts": record.get("scripts"), "source": record.get("source"),
            "pairs": record.get("pairs"), "duplicates": record.get("duplicates"),
            "held_out": held if any(held.values()) else None,
            "train_pairs": record.get("train_pairs"), "normalize": d.normalize,
            "bleu_tokenize": config.decoding.bleu_tokenize}


def run_info(path: str | Path) -> dict[str, Any]:
    """A summary of a run directory, a model bundle or a CTranslate2 export: size of the model
    and its vocabularies, languages, the main model and training settings, the best validation loss
    and BLEU with their steps, the validation checkpoints kept, and file sizes in bytes.

    Both kinds give the same keys; `kind` says which it was. Values a source cannot know
    (e.g. BLEU when validation BLEU was off) are None.
    """
    from tinyt.ctranslate2_model import is_ctranslate2_dir, load_export

    path = Path(path)
    if path.is_dir() and is_ctranslate2_dir(path):
        config, tokenizers, record = load_export(path)
        progress, source = record.get("progress") or {}, record.get("source") or {}
        files = [p for p in path.rglob("*") if p.is_file()]
        return {"kind": f"CTranslate2 model ({record.get('quantization')} weights)",
                "path": str(path),
                **_describe_config(config, tokenizers, int(record.get("parameters") or 0)),
                "data": _describe_data(config, None),
                "validation": record.get("metrics") or _no_validations(),
                "checkpoint": {"name": source.get("checkpoint"), "step": progress.get("step"),
                               "epoch": progress.get("epoch"),
                               "averaged_steps": source.get("averaged_steps") or [],
                               "run_dir": source.get("run_dir"),
                               "tinyt_version": record.get("tinyt_version")},
                "validation_checkpoints": [],
                "sizes": {"model.bin": (path / "model.bin").stat().st_size,
                          "total": sum(p.stat().st_size for p in files)}}
    if path.is_dir():
        config = load_run_config(path)
        tokenizers = Tokenizers.load(path / "tokenizer")
        # The parameter count of the model the config describes; no checkpoint is needed, so
        # this works while a run is still training.
        parameters = build_model(config, tokenizers).num_parameters()
        ckpts = validation_checkpoints(path)
        files = sorted(p for p in path.glob("*.pt") if p.is_file())
        sizes = {p.name: p.stat().st_size for p in files}
        sizes["total"] = sum(p.stat().st_size for p in path.rglob("*") if p.is_file())
        return {"kind": "run", "path": str(path),
                **_describe_config(config, tokenizers, parameters),
                "data": _describe_data(config, read_split_record(path)),
                "validation": metrics_summary(path / "metrics.jsonl"),
                "checkpoint": None,
                "validation_checkpoints": [step for step, _ in ckpts],
                "sizes": sizes}
    config, tokenizers, model, payload = load_bundle(path)
    progress = payload.get("progress") or {}
    validation = payload.get("metrics") or _no_validations()
    if validation["best_valid_loss"] is None:  # a bundle made without metrics.jsonl
        best = progress.get("best_valid_loss")
        if isinstance(best, (int, float)) and math.isfinite(best):
            validation = {**validation, "best_valid_loss": best,
                          "best_valid_loss_step": progress.get("best_step")}
    source = payload.get("source") or {}
    return {"kind": "bundle", "path": str(path),
            **_describe_config(config, tokenizers, model.num_parameters()),
            "data": _describe_data(config, None),
            "validation": validation,
            "checkpoint": {"name": source.get("checkpoint"), "step": progress.get("step"),
                           "epoch": progress.get("epoch"),
                           "averaged_steps": source.get("averaged_steps") or [],
                           "run_dir": source.get("run_dir"),
                           "tinyt_version": payload.get("tinyt_version")},
            "validation_checkpoints": [],
            "sizes": {path.name: path.stat().st_size, "total": path.stat().st_size}}


def _format_data(data: dict[str, Any]) -> str:
    """The data line of `format_run_info`: e.g. `data: en (Latin) -> zh (Han), 29,155 pairs in
    cmn-eng.tsv.gz: 114 duplicates dropped, held out 1,000 valid + 1,000 test; ...`."""
    scripts = data["scripts"] or {}

    def side(name: str) -> str:
        names = scripts.get(name)
        return data["languages"][name] + (f" ({', '.join(names)})" if names else "")

    parts = [f"  data: {side('src')} -> {side('tgt')}"]
    if data["pairs"] is not None:
        parts[0] += f", {data['pairs']:,} pairs in {data['source']}"
    if data["duplicates"] is not None:
        parts.append(f"{data['duplicates']:,} duplicates dropped")
    if data["held_out"]:
        parts.append(f"held out {data['held_out']['valid']:,} valid + "
                     f"{data['held_out']['test']:,} test")
    if data["train_pairs"] is not None:
        parts.append(f"{data['train_pairs']:,} training pairs")
    parts.append(f"normalize {data['normalize']}, BLEU tokenizer {data['bleu_tokenize']}")
    return "; ".join(parts)


def format_run_info(info: dict[str, Any]) -> str:
    """`run_info`'s summary as a few human-readable lines."""

    def size(n: int) -> str:
        for unit in ("B", "KiB", "MiB", "GiB"):
            if n < 1024 or unit == "GiB":
                return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
            n /= 1024
        return str(n)

    m, v, val = info["model"], info["vocab"], info["validation"]
    vocab = (f"joint {v['src_size']:,}" if v["joint"]
             else f"{v['src_size']:,} source + {v['tgt_size']:,} target")
    lines = [
        f"{info['kind']} {info['path']}",
        f"  {info['languages']['src']} -> {info['languages']['tgt']}, "
        f"{info['parameters']:,} parameters, {vocab} {v['model_type']} vocabulary",
        _format_data(info["data"]),
        f"  model: d_model {m['d_model']}, {m['n_heads']} heads, {m['enc_layers']}+"
        f"{m['dec_layers']} layers, FFN {m['d_ff']} ({m['activation']}, "
        f"{'pre' if m['pre_norm'] else 'post'}-norm"
        f"{', tied embeddings' if m['tie_embeddings'] else ''})",
        f"  train: batch {info['train']['batch_tokens']} tokens, lr {info['train']['lr']:g}, "
        f"warmup {info['train']['warmup_steps']}, label smoothing "
        f"{info['train']['label_smoothing']:g}",
    ]
    if val["best_valid_loss"] is not None:
        line = (f"  best valid loss {val['best_valid_loss']:.4f} (step "
                f"{val['best_valid_loss_step']})")
        if val["best_valid_bleu"] is not None:
            line += f", best valid BLEU {val['best_valid_bleu']:.2f} (step " \
                    f"{val['best_valid_bleu_step']})"
        lines.append(line + f"; {val['validations']} validations")
    else:
        lines.append("  no validation yet")
    if info["checkpoint"]:
        c = info["checkpoint"]
        averaged = (f", average of steps {', '.join(map(str, c['averaged_steps']))}"
                    if c["averaged_steps"] else "")
        lines.append(f"  from {c['name']} (step {c['step']}{averaged}) of {c['run_dir']}")
    if info["kind"] == "run":
        steps = info["validation_checkpoints"]
        lines.append(f"  validation checkpoints: {len(steps)}"
                     + (f" (steps {', '.join(map(str, steps))})" if steps else ""))
    lines.append("  sizes: " + ", ".join(f"{name} {size(n)}" for name, n in info["sizes"].items()))
    return "\n".join(lines)
