"""A split's sentence pairs in memory (`ParallelText`), read from wherever the split lives.

`load_split` takes a role (train, valid, test) or a split name and reads the split from the
corpus folder (data.dir, see `tinyt.data.files`) or from the hub (`tinyt.data.hub`); a role
that data.holdout carves out of the training split comes from the run directory, where
training wrote it (`HELD_OUT_DIR`, see `tinyt.data.pairs`). The configured source and target
fields of a table (TSV, JSONL, hub dataset) are picked out here (`_check_fields`). Out: a
`ParallelText` of two line-aligned lists of strings, as read (`normalize_text` normalises).
Meant for splits that fit in memory: `tinyt.data.corpus` opens a training split of any size.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tinyt.config import DataConfig
# The readers of local files and of the hub are called through their modules
# (files._text_files, hub._load_hub_table): a test that fakes the disk or the hub patches
# the one module that defines the reader.
from tinyt.data import files, hub
from tinyt.errors import TinytError


@dataclass
class ParallelText:
    """Line-aligned sentence pairs of one split."""

    src: list[str]
    tgt: list[str]
    name: str  # where it came from, for messages

    def __len__(self) -> int:
        return len(self.src)


def split_name(config: DataConfig, split: str) -> str:
    """A role (train/valid/test) maps to the source's split name; anything else is taken as a
    split name itself (e.g. `test_2017_flickr` for a local Multi30k folder)."""
    mapping = config.files if config.dir is not None else config.hub_splits
    return mapping.get(split, split)


def load_split(config: DataConfig, split: str, run_dir: str | Path | None = None
               ) -> ParallelText:
    """Load one split's sentence pairs, from `config.dir` if set, else from the hub; a role
    that data.holdout carves out of the training split (valid, test) from `run_dir`, where
    training wrote it (see `open_training_data`). The text is as read: `normalize_text`
    applies data.normalize."""
    if split in config.held_out_roles:
        return _read_held_out(config, split, run_dir)
    _check_corpus_location(config)
    name = split_name(config, split)
    if config.dir is not None:
        return _load_local(config, name)
    return _load_hub(config, name)


def _check_corpus_location(config: DataConfig) -> None:
    """A corpus without a hub copy (data.hub_name: "") needs its folder: TinytError if unset."""
    if config.dir is None and config.hub_name == "":
        raise TinytError("data.dir is unset and data.hub_name is empty (the corpus has no hub "
                         "copy): give its folder with --data-dir DIR (make train DATA=DIR) or "
                         "data.dir")


def _load_local(config: DataConfig, name: str) -> ParallelText:
    if config.format == "text":
        src_path, tgt_path = files._text_files(config, name)
        src, tgt = files._read_lines(src_path), files._read_lines(tgt_path)
        if len(src) != len(tgt):
            files._raise_unaligned(src_path, len(src), tgt_path, len(tgt))
        return ParallelText(src, tgt, f"{src_path} / {tgt_path}")
    path = files._table_file(config, name)
    return _pairs_from_table(files._load_table_file(config, path), config, str(path))


def _load_hub(config: DataConfig, name: str) -> ParallelText:
    table = hub._load_hub_table(config, name)
    return _pairs_from_table(table, config, hub._hub_label(config, name))


def _check_fields(columns: list[str], first_row: dict[str, Any] | None, config: DataConfig,
                  label: str) -> None:
    """Raise TinytError unless a table with these columns (and this first row, None for an
    empty table) holds the configured source and target fields."""
    if config.translation_field is not None:
        if config.translation_field not in columns:
            raise TinytError(f"{label} has no field {config.translation_field!r} "
                             f"(data.translation_field); it has {', '.join(columns)}")
        if first_row is None:
            return
        nested = first_row[config.translation_field]
        keys = list(nested.keys()) if isinstance(nested, dict) else []
        for want in (config.source_field, config.target_field):
            if want not in keys:
                raise TinytError(f"{label}: {config.translation_field!r} has no language "
                                 f"{want!r}; it has {', '.join(keys) or 'none'}")
    else:
        for want, key in ((config.source_field, "src"), (config.target_field, "tgt")):
            if want not in columns:
                raise TinytError(f"{label} has no field {want!r} (data.{key}_lang or "
                                 f"data.{key}_field); it has {', '.join(columns)}")


def _as_text(value: Any) -> str:
    return "" if value is None else str(value)


def _pairs_from_table(table, config: DataConfig, label: str) -> ParallelText:
    columns = list(table.column_names)
    _check_fields(columns, table[0] if len(table) else None, config, label)
    if config.translation_field is not None:
        rows = table[config.translation_field]
        src = [r[config.source_field] for r in rows]
        tgt = [r[config.target_field] for r in rows]
    else:
        src, tgt = table[config.source_field], table[config.target_field]
    return ParallelText([_as_text(s) for s in src], [_as_text(t) for t in tgt], label)


# The folder of a run directory that holds what training carved out of the training split:
# valid.jsonl and test.jsonl (data.holdout) and split.json, the record of how it was made.
HELD_OUT_DIR = "data"


def _read_held_out(config: DataConfig, role: str, run_dir: str | Path | None) -> ParallelText:
    """A split that training carved out of the training file, from `run_dir/data/ROLE.jsonl`."""
    if run_dir is None:
        raise TinytError(f"split {role!r} is held out of the training file (data.holdout) and "
                         "kept in the run directory that trained on it; evaluate that run "
                         "(--run runs/NAME)")
    path = Path(run_dir) / HELD_OUT_DIR / f"{role}.jsonl"
    src: list[str] = []
    tgt: list[str] = []
    try:
        with open(path, encoding="utf-8") as f:
            for line in f:
                record = json.loads(line)
                src.append(str(record["src"]))
                tgt.append(str(record["tgt"]))
    except FileNotFoundError:
        raise TinytError(f"{path} is missing: the {role} split that training held out of the "
                         "training file (data.holdout) is kept there; restore it, or train the "
                         "run again") from None
    except (OSError, ValueError, KeyError, TypeError):
        raise TinytError(f"{path} is damaged; restore it, or train the run again") from None
    return ParallelText(src, tgt, str(path))
