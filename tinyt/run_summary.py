"""A summary of a run directory, a model bundle or a CTranslate2 export, for `tinyt info`.

`run_info` gives the same keys for all three: the model's size and vocabularies, languages, the
data it trained on, the main model and training settings, the best validation loss and BLEU
with their steps, the validation checkpoints kept and file sizes; `format_run_info` turns that
into a few lines. Bundles and CTranslate2 exports store `tinyt.rundir.metrics_summary` of
their run when they are written, so they still know their run's best scores once the run
directory is gone.

    print(format_run_info(run_info("runs/multi30k_de_en")))
"""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path
from typing import Any

from tinyt.bundle import load_bundle
from tinyt.checkpoint import build_model, load_run_config, validation_checkpoints
from tinyt.config import Config
from tinyt.ctranslate2_model import is_ctranslate2_dir, load_export
from tinyt.data import read_split_record
from tinyt.rundir import metrics_summary, no_validations
from tinyt.tokenizer import Tokenizers


def _describe_config(config: Config, tokenizers: Tokenizers, parameters: int) -> dict[str, Any]:
    m, t = config.model, config.train
    return {
        "parameters": parameters,
        "languages": {"src": config.data.src_lang, "tgt": config.data.tgt_lang},
        "vocab": {"joint": tokenizers.src is tokenizers.tgt,
                  "src_size": tokenizers.src_vocab_size, "tgt_size": tokenizers.tgt_vocab_size,
                  "model_type": config.tokenizer.model_type,
                  "sampling": (dataclasses.asdict(config.tokenizer.sampling)
                               if config.tokenizer.sampling is not None else None)},
        "model": {"d_model": m.d_model, "n_heads": m.n_heads, "enc_layers": m.enc_layers,
                  "dec_layers": m.dec_layers, "d_ff": m.d_ff, "activation": m.activation,
                  "pre_norm": m.pre_norm, "tie_embeddings": m.tie_embeddings,
                  "max_positions": m.max_positions, "dropout": m.dropout},
        "train": {"batch_tokens": t.batch_tokens, "lr": t.lr, "warmup_steps": t.warmup_steps,
                  "max_epochs": t.max_epochs, "max_steps": t.max_steps,
                  "label_smoothing": t.label_smoothing, "seed": t.seed,
                  "keep_checkpoints": t.keep_checkpoints, "init_from": t.init_from,
                  "init_checkpoint": t.init_checkpoint if t.init_from else None},
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


def _exported_checkpoint(source: dict[str, Any], progress: dict[str, Any],
                         tinyt_version: Any) -> dict[str, Any]:
    """Which checkpoint of which run a bundle or a CTranslate2 export holds."""
    return {"name": source.get("checkpoint"), "step": progress.get("step"),
            "epoch": progress.get("epoch"), "averaged_steps": source.get("averaged_steps") or [],
            "run_dir": source.get("run_dir"), "tinyt_version": tinyt_version}


def run_info(path: str | Path) -> dict[str, Any]:
    """A summary of a run directory, a model bundle or a CTranslate2 export: size of the model
    and its vocabularies, languages, the main model and training settings, the best validation loss
    and BLEU with their steps, the validation checkpoints kept, and file sizes in bytes.

    All three give the same keys; `kind` says which it was. Values a source cannot know
    (e.g. BLEU when validation BLEU was off) are None.
    """
    path = Path(path)
    if path.is_dir() and is_ctranslate2_dir(path):
        config, tokenizers, record = load_export(path)
        progress, source = record.get("progress") or {}, record.get("source") or {}
        files = [p for p in path.rglob("*") if p.is_file()]
        return {"kind": f"CTranslate2 model ({record.get('quantization')} weights)",
                "path": str(path),
                **_describe_config(config, tokenizers, int(record.get("parameters") or 0)),
                "data": _describe_data(config, None),
                "validation": record.get("metrics") or no_validations(),
                "checkpoint": _exported_checkpoint(source, progress,
                                                   record.get("tinyt_version")),
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
    validation = payload.get("metrics") or no_validations()
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
            "checkpoint": _exported_checkpoint(source, progress, payload.get("tinyt_version")),
            "validation_checkpoints": [],
            "sizes": {path.name: path.stat().st_size, "total": path.stat().st_size}}


def _format_extras(info: dict[str, Any]) -> str:
    """The train line's tail for subword sampling and fine-tuning, when a run has them."""
    extras = ""
    sampling = info["vocab"].get("sampling")
    if sampling:
        extras += (f", subword sampling (alpha {sampling['alpha']:g}"
                   + (f", nbest {sampling['nbest']}" if info["vocab"]["model_type"] == "unigram"
                      else "") + ")")
    if info["train"].get("init_from"):
        extras += (f", fine-tuned from {info['train']['init_from']}/"
                   f"{info['train']['init_checkpoint']}")
    return extras


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
        f"{info['train']['label_smoothing']:g}" + _format_extras(info),
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
