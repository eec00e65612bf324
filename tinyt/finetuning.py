"""Fine-tuning: a new run that starts from a trained run's weights and vocabulary
(`train.init_from`, which `tinyt train --init-from runs/R` sets).

The new run trains on its own data, encoded with R's SentencePiece models: no vocabulary is
learned, R's tokenizer/ files are copied byte for byte into the new run's tokenizer/, so the
new run is self-contained (it resumes, evaluates and exports without R). Its model starts from
the weights of one of R's checkpoints (best.pt, or `train.init_checkpoint`); the optimizer,
the learning-rate schedule and the progress start afresh, at step 0.

What has to agree with R: the languages (data.src_lang/tgt_lang) and the architecture (the
model section; the dropout rates may differ, they are how training regularises, not what the
weights are). The config's tokenizer section is replaced by R's, except `tokenizer.sampling`,
which is how the training text is cut, not what the vocabulary is.

`open_init_source` reads and checks all of that before anything is written, so a refused start
leaves everything as it was. A resumed fine-tuned run continues from its own last.pt and never
reads R again.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from tinyt.checkpoint import _other_checkpoints, load_trained
from tinyt.config import Config, ConfigError, config_from_dict
from tinyt.errors import TinytError
from tinyt.tokenizer import TOKENIZER_FILES, Tokenizers, write_tokenizer_files

# Model settings a fine-tuned run may set differently from the run it starts from.
FREE_MODEL_KEYS = ("dropout", "attn_dropout", "act_dropout")


@dataclass
class InitSource:
    """What a fine-tuned run takes from the run it starts from, read and checked."""

    run_dir: Path
    checkpoint: str  # the checkpoint's file name in run_dir
    step: int | None  # the training step the checkpoint was saved at
    weights: dict[str, torch.Tensor]  # the checkpoint's model state dict
    tokenizer_files: dict[str, bytes]  # name -> bytes of each file of run_dir/tokenizer/
    announcement: str  # the line training prints once it starts: from where, which vocabulary


def _values(values: list[Any]) -> str:
    return ", ".join(str(v) for v in values)


def open_init_source(config: Config) -> InitSource:
    """Read and check the run `config.train.init_from` names, for a new run of `config`:
    its config, tokenizer and checkpoint load and belong together, its languages and model
    architecture are `config`'s. Then replace `config`'s tokenizer section by the run's, in
    place (revalidated); the returned `announcement` says so. Any problem raises TinytError
    naming the run; nothing is written."""
    run = Path(config.train.init_from or "")
    label = f"--init-from {run}"
    if not run.exists():
        raise TinytError(f"{label}: no such run directory; pass the directory of a run trained "
                         "by tinyt train, e.g. runs/multi30k_de_en")
    if not run.is_dir():
        raise TinytError(f"{label}: {run} is a file, not a run directory; pass the directory "
                         "of a run trained by tinyt train")
    if not (run / "config.yaml").is_file():
        raise TinytError(f"{label}: {run} is not a run directory (it has no config.yaml); pass "
                         "the directory of a run trained by tinyt train")
    if run.resolve() == Path(config.run_dir).resolve():
        raise TinytError(f"{label} is this run's own directory; fine-tune into a new run "
                         "directory (--run-dir runs/NEW)")
    name = config.train.init_checkpoint
    path = run / name
    if not path.is_file():
        others = _other_checkpoints(path)
        fix = (f"it has {', '.join(others)}: pick one with --checkpoint NAME" if others
               else "it has no checkpoint yet: train it first, or pick another run")
        raise TinytError(f"{label}: checkpoint {path} not found; {fix}")
    try:
        source_config, tokenizers, model, payload = load_trained(run, name)
    except TinytError as exc:
        raise TinytError(f"{label}: {exc}") from exc
    del model  # built only to check that the weights fit the run's config

    languages = (source_config.data.src_lang, source_config.data.tgt_lang)
    if languages != (config.data.src_lang, config.data.tgt_lang):
        raise TinytError(
            f"{label}: that run translates {languages[0]}→{languages[1]}, this config "
            f"{config.data.src_lang}→{config.data.tgt_lang}; fine-tuning keeps the language "
            f"pair: set data.src_lang: {languages[0]} and data.tgt_lang: {languages[1]} (with "
            "data.src_field/tgt_field if the corpus names its columns otherwise)")
    mine, theirs = dataclasses.asdict(config.model), dataclasses.asdict(source_config.model)
    differ = [key for key in mine if key not in FREE_MODEL_KEYS and mine[key] != theirs.get(key)]
    if differ:
        keys = ", ".join(f"model.{key}" for key in differ)
        verb, them = ("differs", "it") if len(differ) == 1 else ("differ", "them")
        there, here = _values([theirs.get(k) for k in differ]), _values([mine[k] for k in differ])
        raise TinytError(
            f"{label}: {keys} {verb} from {run}'s config ({there}; this config has {here}); "
            f"a fine-tuned model keeps the architecture it starts from: set {them} as "
            f"{run}/config.yaml has {them} (only the dropout rates may differ)")

    files = _read_tokenizer_files(run / "tokenizer", tokenizers.src is tokenizers.tgt,
                                  tokenizers.fingerprint)
    replaced = _take_tokenizer_section(config, source_config, label)
    step = (payload.get("progress") or {}).get("step")
    pieces = (f"{tokenizers.src_vocab_size:,} pieces" if tokenizers.src is tokenizers.tgt
              else f"{tokenizers.src_vocab_size:,} + {tokenizers.tgt_vocab_size:,} pieces")
    changes = f" ({'; '.join(replaced)})" if replaced else ""
    announcement = (f"fine-tuning from {path} (step {step}) with {run}'s vocabulary "
                    f"({pieces}): this config's tokenizer section is replaced by "
                    f"{run}'s{changes}")
    return InitSource(run_dir=run, checkpoint=name, step=step, weights=payload["model"],
                      tokenizer_files=files, announcement=announcement)


def _read_tokenizer_files(folder: Path, joint: bool, fingerprint: str) -> dict[str, bytes]:
    """The bytes of the files that make up the tokenizer in `folder` (the model(s), their
    .vocab listings when present, meta.json), read now so that what is copied later is what
    was checked: the tokenizer whose `fingerprint` the checkpoint was trained with.

    meta.json is read last: a retraining of that run removes it before it writes new models
    and writes it back after them, so a meta.json that still holds `fingerprint` once the
    models are read vouches for them."""
    sides = ("joint",) if joint else ("src", "tgt")
    names = [name for name in TOKENIZER_FILES if name.split(".")[0] in sides] + ["meta.json"]
    files = {}
    for name in names:
        try:
            files[name] = (folder / name).read_bytes()
        except FileNotFoundError:
            if name.endswith(".vocab"):  # a listing for people; tinyt never reads it
                continue
            files[name] = b""  # found wanting below
        except OSError as exc:
            raise TinytError(f"cannot read {folder / name}: {exc.strerror or exc}; check the "
                             "file's permissions") from None
    try:
        unchanged = json.loads(files["meta.json"])["fingerprint"] == fingerprint
    except (ValueError, TypeError, KeyError):
        unchanged = False
    if not unchanged or not all(files[f"{side}.model"] for side in sides):
        raise TinytError(f"{folder} changed while it was read (is that run being trained "
                         "again?); run the command again once it is not")
    return files


def _take_tokenizer_section(config: Config, source: Config, label: str) -> list[str]:
    """Replace `config`'s tokenizer section by `source`'s as its config.yaml has it (auto
    settings stay auto), keeping `config`'s own tokenizer.sampling; returns what changed, as
    "tokenizer.KEY a -> b" items. `config` is changed in place, so that a caller's Config
    object is the run's (and resumes it) afterwards."""
    before = config.tokenizer
    raw = config.to_dict()
    raw["tokenizer"] = {**source.to_dict()["tokenizer"], "sampling": raw["tokenizer"]["sampling"]}
    try:
        rebuilt = config_from_dict(raw, check_paths=False)
    except ConfigError as exc:
        raise TinytError(f"{label}: with that run's tokenizer section, {exc}") from None
    vars(config).update(vars(rebuilt))  # the sections and the record of auto settings
    return [f"tokenizer.{field.name} {getattr(before, field.name)} -> "
            f"{getattr(config.tokenizer, field.name)}"
            for field in dataclasses.fields(before) if field.name != "sampling"
            and getattr(before, field.name) != getattr(config.tokenizer, field.name)]


def copy_tokenizer(source: InitSource, folder: Path) -> Tokenizers:
    """Write the start run's tokenizer files into `folder` (the new run's tokenizer/), byte
    for byte, removing any other tokenizer files there (left by an --overwrite'n run), and
    load them."""
    write_tokenizer_files(folder, source.tokenizer_files,
                          remove=[name for name in TOKENIZER_FILES
                                  if name not in source.tokenizer_files])
    return Tokenizers.load(folder)
