"""Local corpus files as they are on disk: line-aligned text files (plain or gzipped) and TSV or
JSONL tables, each problem in them a one-line TinytError that names the file and the fix.

In: the data config and a split name (the file stem: `{name}.{lang}[.gz]`,
`{name}.tsv[.gz]`, `{name}.jsonl[.gz]` in data.dir), or a path. Out: for text files, the
lines of a file and the (source, target) pairs of two aligned files, as lists or lazily; for
a table, a `datasets.Dataset` (an `IterableDataset` when streaming) with the file's own
columns, from which `tinyt.data.sources` and `tinyt.data.corpus` pick the configured fields.
"""

from __future__ import annotations

import codecs
import gzip
import json
import sys
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from tinyt.config import DataConfig
from tinyt.errors import TinytError
from tinyt.writing import write_error, write_failure


def _first_line(exc: BaseException) -> str:
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]


def _find_file(directory: Path, stem: str, what: str) -> Path:
    for candidate in (directory / stem, directory / f"{stem}.gz"):
        if candidate.is_file():
            return candidate
    raise TinytError(f"{what} file {directory / stem}[.gz] not found; check data.dir, the "
                     "split names in data.files and the language codes")


def _text_files(config: DataConfig, name: str) -> tuple[Path, Path]:
    directory = Path(config.dir)
    return (_find_file(directory, f"{name}.{config.src_lang}", "source"),
            _find_file(directory, f"{name}.{config.tgt_lang}", "target"))


def _table_file(config: DataConfig, name: str) -> Path:
    return _find_file(Path(config.dir), f"{name}.{config.format}", config.format.upper())


def _iter_lines(path: Path) -> Iterator[str]:
    """The lines of a text file (gzipped when it ends in .gz), read lazily.

    Lines are split on '\\n' only: str.splitlines would also split on U+2028, U+0085 etc.,
    which occur inside real sentences and would break the alignment of the two files (a binary
    file iterates on b'\\n' alone). A final '\\n' does not start another line; trailing '\\r'
    are dropped. UTF-8 never has a 0x0A byte inside a multi-byte character, so decoding line by
    line finds exactly the errors decoding the whole file would, the first one first. A UTF-8
    byte-order mark at the start of the file is not text and is dropped.
    """
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as f:
            for number, raw in enumerate(f, 1):
                if number == 1:
                    raw = raw.removeprefix(codecs.BOM_UTF8)
                try:
                    line = raw.decode("utf-8")
                except UnicodeDecodeError:
                    raise TinytError(f"{path}: line {number} is not valid UTF-8; re-encode the "
                                     "file as UTF-8") from None
                yield line.removesuffix("\n").rstrip("\r")
    except (OSError, EOFError, zlib.error) as exc:
        raise TinytError(f"cannot read {path}: {exc}; check the file") from None


def _read_lines(path: Path) -> list[str]:
    return list(_iter_lines(path))


def _text_pair_stream(src_path: Path, tgt_path: Path) -> Iterator[tuple[str, str]]:
    """(source, target) lines of two line-aligned files, read lazily; TinytError when one file
    has more lines than the other (raised once the shorter one ends, naming both counts)."""
    src_lines, tgt_lines = _iter_lines(src_path), _iter_lines(tgt_path)
    count = 0
    for src in src_lines:
        tgt = next(tgt_lines, None)
        if tgt is None:
            _raise_unaligned(src_path, count + 1 + sum(1 for _ in src_lines), tgt_path, count)
        count += 1
        yield src, tgt
    extra = sum(1 for _ in tgt_lines)
    if extra:
        _raise_unaligned(src_path, count, tgt_path, count + extra)


def _raise_unaligned(src_path: Path, n_src: int, tgt_path: Path, n_tgt: int) -> None:
    raise TinytError(f"{src_path} has {n_src} lines but {tgt_path} has {n_tgt}; the two sides "
                     "of a split must be line-aligned")


def _load_table_file(config: DataConfig, path: Path, cache_dir: Path | None = None,
                     streaming: bool = False) -> Any:
    """A TSV or JSONL file as a `datasets.Dataset` (memory-mapped from `cache_dir`, or from
    datasets' default cache without one), or as an `IterableDataset` when streaming."""
    import datasets

    options: dict[str, Any] = {"data_files": str(path), "split": "train", "streaming": streaming,
                               "cache_dir": None if cache_dir is None else str(cache_dir)}
    if config.format == "tsv":
        # quoting=3 (csv.QUOTE_NONE): quotes inside sentences are text, not CSV syntax.
        options.update(delimiter="\t", quoting=3, keep_default_na=False)
        if config.columns is not None:
            # No header row: the names come from the config. usecols keeps the named columns
            # and ignores later ones (with fewer names than columns, pandas would otherwise
            # turn the first columns into an index).
            _check_tsv_columns(config.columns, path)
            options.update(column_names=list(config.columns),
                           usecols=list(range(len(config.columns))))
        if not streaming:
            _check_tsv_tabs(path, has_header=config.columns is None)
    try:
        return datasets.load_dataset("json" if config.format == "jsonl" else "csv", **options)
    except Exception as exc:
        raise _table_error(config, path, exc, cache_dir) from None


def _check_tsv_tabs(path: Path, has_header: bool) -> None:
    """Warn (on stderr) about lines of a TSV file that have no tab: the parser reads each as a
    source sentence with an empty target, which training leaves out and scoring compares with
    an empty reference. A file where no line has a tab is a TinytError (not a TSV file, or
    another separator)."""
    rows, missing, first = 0, 0, []
    for number, line in enumerate(_iter_lines(path), 1):
        if (has_header and number == 1) or not line.strip():
            continue
        rows += 1
        if "\t" not in line:
            missing += 1
            if len(first) < 5:
                first.append(number)
    if not missing:
        return
    where = ", ".join(map(str, first)) + (", ..." if missing > len(first) else "")
    if missing == rows:
        raise TinytError(f"no line of {path} has a tab (lines {where}); a TSV file separates "
                         "the source and target columns with a tab character")
    print(f"warning: {missing} line(s) of {path} have no tab (lines {where}); each is read as "
          "a source sentence with an empty target", file=sys.stderr)


def _check_tsv_columns(columns: list[str], path: Path) -> None:
    """Raise TinytError when the first non-empty line of a headerless TSV file has fewer
    columns than data.columns names (pandas would report only that generating failed)."""
    first = next((line for line in _iter_lines(path) if line.strip()), None)
    found = 0 if first is None else first.count("\t") + 1
    if first is not None and found < len(columns):
        raise TinytError(f"{path} has {found} tab-separated column(s) in its first line, but "
                         f"data.columns names {len(columns)} ({', '.join(columns)}); name the "
                         "file's columns in order (later ones may be left out)")


def _parse_error(config: DataConfig, path: Path, exc: BaseException) -> TinytError:
    """A TinytError for a table file `datasets` could not parse: for JSONL the first line
    that is not a JSON object, found by reading the file again (`datasets` names only a
    position inside a block); otherwise the parser's own first line."""
    if config.format == "jsonl":
        bad = _first_bad_json_line(path)
        if bad is not None:
            number, reason = bad
            return TinytError(f"{path} line {number} is not a JSON object ({reason}); fix or "
                              "delete that line")
    return TinytError(f"cannot parse {path} as {config.format.upper()}: {_first_line(exc)}")


def _first_bad_json_line(path: Path) -> tuple[int, str] | None:
    """(line number, what is wrong) of the first non-blank line of a JSONL file that is not a
    JSON object, or None if every line is one."""
    for number, line in enumerate(_iter_lines(path), 1):
        if not line.strip():
            continue
        try:
            value = json.loads(line)
        except ValueError as exc:
            return number, str(exc).split(":")[0][:80]
        if not isinstance(value, dict):
            return number, f"a JSON {type(value).__name__}, not an object"
    return None


def _table_error(config: DataConfig, path: Path, exc: BaseException,
                 cache_dir: Path | None) -> TinytError:
    """A TinytError for a failure of `datasets.load_dataset` on a table file: a cache it
    could not write is named as such (with datasets' own cache, how to move it), not blamed
    on the file; anything else is a parse error of the file."""
    found = write_failure(exc)
    if found is not None and found.filename and Path(found.filename) != path:
        note = (f"the cache used to read {path}" if cache_dir is not None else
                f"datasets' cache, used to read {path}: or set HF_DATASETS_CACHE (or HF_HOME) "
                "to a writable folder")
        return write_error(found, found.filename, note=note)
    return _parse_error(config, path, exc)
