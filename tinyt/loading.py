"""Loading trained models for inference: the one place the command line, the Python API and
the server (`tinyt serve`) get a `Translator` from.

A model comes from one of four places, and each ends as an engine behind `Translator`'s
interface (translate, translate_nbest, sample, score, token_log_probs):

    a run directory (runs/NAME, one of its checkpoints)   Translator over tinyt's Transformer
    a bundle file made by `tinyt export`                  the same
    a folder made by `tinyt export --format ctranslate2`  CTranslate2Translator (CTranslate2
                                                          decodes and scores)
    several runs and bundles                              Translator over an Ensemble, their
                                                          log-probabilities averaged

This module sits above all of them (checkpoint, bundle, ctranslate2_model, ensemble,
translation) and nothing below imports it, so loading adds no import circle.

    translator = load_translator("runs/multi30k_de_en")             # or "model.tinyt", "model-ct2"
    ensemble = load_translator(["runs/a", "runs/b"], device="cpu")
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from tinyt.bundle import load_bundle
from tinyt.checkpoint import load_trained
from tinyt.config import Config, override_config
from tinyt.ctranslate2_model import (CTranslate2Translator, is_ctranslate2_dir, load_export)
from tinyt.ensemble import Ensemble, check_same_vocabularies
from tinyt.errors import TinytError
from tinyt.hardware import resolve_device
from tinyt.model import Transformer
from tinyt.tokenizer import Tokenizers
from tinyt.translation import Translator


@dataclass
class LoadedModel:
    """A model ready to translate, with what it was loaded from.

    kind: "run", "bundle", "ctranslate2" or "ensemble"; `run` is the run directory of a run
    (the first run of an ensemble), `model_file` the bundle or export folder otherwise (the
    first bundle of an ensemble without runs). `payload` holds the checkpoint's "progress"
    (its "step") and "source" (its "checkpoint"); an ensemble's also names its "members".
    """

    translator: Translator
    config: Config
    tokenizers: Tokenizers
    payload: dict[str, Any]
    kind: str
    run: Path | None = None
    model_file: Path | None = None

    @property
    def name(self) -> str:
        """What the model was loaded from, for messages: a path, or the members joined."""
        if "members" in self.payload:
            return " + ".join(self.payload["members"])
        return str(self.run if self.run is not None else self.model_file)


def load_weights(run: str | Path | None = None, model: str | Path | None = None,
                 checkpoint: str = "best.pt"
                 ) -> tuple[Config, Tokenizers, Transformer, dict[str, Any]]:
    """(config, tokenizers, model, payload) of tinyt's own model from a run directory (`run`,
    with `checkpoint`) or a bundle file (`model`): exactly one of the two."""
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


def load_ensemble(runs: Sequence[str | Path], bundles: Sequence[str | Path] = (),
                  checkpoint: str = "best.pt"
                  ) -> tuple[Config, Tokenizers, Ensemble, dict[str, Any]]:
    """(config, tokenizers, ensemble, payload) of several runs (each with `checkpoint`) and
    bundle files, checked to translate one language pair with the same vocabularies. The
    config and tokenizers are the first member's; the payload names the members."""
    members = [(Path(r), None) for r in runs] + [(None, Path(b)) for b in bundles]
    loaded, names = [], []
    for run, bundle in members:
        if bundle is not None and bundle.is_dir():
            raise TinytError(f"{bundle} is a folder (a CTranslate2 export?); an ensemble is made "
                             "of runs (--run) and bundle files (--model FILE.tinyt)")
        loaded.append(load_weights(run, bundle, checkpoint))
        names.append(str(run if run is not None else bundle))
    pairs = {(c.data.src_lang, c.data.tgt_lang) for c, _, _, _ in loaded}
    if len(pairs) > 1:
        raise TinytError(f"the ensemble's models translate different languages ("
                         f"{', '.join(f'{s}->{t}' for s, t in sorted(pairs))}); give runs of "
                         "one language pair")
    check_same_vocabularies([tokenizers for _, tokenizers, _, _ in loaded], names)
    config, tokenizers, _, _ = loaded[0]
    payload = {"progress": {"step": None}, "source": {"checkpoint": None},
               "members": [f"{name}/{checkpoint}" if run is not None else name
                           for name, (run, _) in zip(names, members)]}
    return config, tokenizers, Ensemble([model for _, _, model, _ in loaded]), payload


def load_model(runs: Sequence[str | Path] = (), model_files: Sequence[str | Path] = (),
               checkpoint: str = "best.pt", overrides: Sequence[str] = (),
               device: str | torch.device = "auto") -> LoadedModel:
    """The model of `runs` (run directories) and `model_files` (bundle files or CTranslate2
    export folders), ready to translate on `device`, with the --set `overrides` applied to its
    config (decoding settings, say) before its translator is made. One run or file is one
    model; several runs and bundles decode as an ensemble."""
    runs, model_files = [Path(r) for r in runs], [Path(m) for m in model_files]
    device = resolve_device(device) if isinstance(device, str) else device
    if len(runs) + len(model_files) > 1:
        config, tokenizers, model, payload = load_ensemble(runs, model_files, checkpoint)
        config = override_config(config, list(overrides), check_paths=False)
        translator = Translator(model, tokenizers, config.decoding, device, config.train.amp)
        return LoadedModel(translator, config, tokenizers, payload, "ensemble",
                           runs[0] if runs else None, None if runs else model_files[0])
    if not runs and not model_files:
        raise TinytError("pass a run directory (--run runs/NAME) or a model (--model FILE)")
    run = runs[0] if runs else None
    model_file = model_files[0] if model_files else None
    if model_file is not None and model_file.is_dir():
        return _load_export(model_file, checkpoint, overrides, device)
    if run is not None and not run.exists():
        raise TinytError(f"{run} does not exist; pass a run directory (runs/NAME), a model "
                         "bundle file or a folder made by `tinyt export`")
    if model_file is not None and not model_file.exists():
        raise TinytError(f"{model_file} does not exist; pass a model bundle file or a folder "
                         "made by `tinyt export`, or a run directory as --run")
    config, tokenizers, model, payload = load_weights(run, model_file, checkpoint)
    config = override_config(config, list(overrides), check_paths=False)
    translator = Translator(model, tokenizers, config.decoding, device, config.train.amp)
    return LoadedModel(translator, config, tokenizers, payload,
                       "run" if run is not None else "bundle", run, model_file)


def _load_export(folder: Path, checkpoint: str, overrides: Sequence[str],
                 device: torch.device) -> LoadedModel:
    """A CTranslate2 export folder's model (see `load_model`)."""
    if not is_ctranslate2_dir(folder):
        raise TinytError(f"{folder} is a folder but not a model exported by tinyt (it has no "
                         "tinyt.json and model.bin); pass a bundle file, a folder made by "
                         "tinyt export --format ctranslate2, or a run as --run")
    if checkpoint != "best.pt":
        raise TinytError(f"--checkpoint {checkpoint} applies to a run directory; {folder} "
                         "holds the one checkpoint it was exported from")
    config, tokenizers, record = load_export(folder)
    config = override_config(config, list(overrides), check_paths=False)
    translator = CTranslate2Translator(folder, config, device)
    payload = {"progress": record.get("progress") or {"step": None},
               "source": record.get("source") or {"checkpoint": None}}
    return LoadedModel(translator, config, tokenizers, payload, "ctranslate2", None, folder)


def load_translator(path: str | Path | Sequence[str | Path], *, checkpoint: str = "best.pt",
                    device: str = "auto") -> Translator:
    """The Python API's way in: a translator for a run directory (with its `checkpoint`), a
    bundle file, a CTranslate2 export folder, or a list of runs and bundles decoding as an
    ensemble (they must share their language pair and vocabularies). For example:

        load_translator("runs/multi30k_de_en").translate(["Ein Hund läuft."], beam_size=5)
    """
    paths = [Path(path)] if isinstance(path, (str, Path)) else [Path(p) for p in path]
    if not paths:
        raise TinytError("load_translator needs a path: a run directory, a bundle file or a "
                         "CTranslate2 export folder")
    for p in paths:
        if not p.exists():
            raise TinytError(f"{p} does not exist; pass a run directory (runs/NAME), a model "
                             "bundle file made by `tinyt export` or a CTranslate2 export folder")
    runs = [p for p in paths if p.is_dir() and not is_ctranslate2_dir(p)]
    files = [p for p in paths if not (p.is_dir() and not is_ctranslate2_dir(p))]
    return load_model(runs, files, checkpoint, device=device).translator
