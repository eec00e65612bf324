"""Parallel corpora: loading splits, caching token ids, and length-bucketed token batches.

Flow for small splits (validation, test): `load_split` (raw sentence pairs in memory, from the
hub or local files) -> `tokenize` (compact id arrays, cached in the run directory) ->
`make_batches` (lists of sentence indices, a token budget each) -> `collate` (padded tensors
for the model).

Flow for a training split of any size, larger than memory included: `open_corpus` (a
memory-mapped Arrow table, cached) -> `tokenize_corpus` (`datasets.map` in parallel, then
memory-mapped .npy id arrays, cached) -> `make_batches` -> `collate`; only the per-pair
index arrays of `make_batches` (a few bytes a pair) live in memory. With `data.streaming`,
`stream_corpus` reads the split as a stream and `StreamingCorpus.batches` tokenizes and batches
it a window of `data.stream_buffer` pairs at a time.

`open_training_data` is what training calls: `open_corpus`, then exact duplicate pairs dropped
(`data.dedup`) and validation/test sets held out of the training split (`data.holdout`,
`carve`), written into the run directory, where `load_split` finds them again; the validation
split comes back normalised as `data.normalize` says (`normalize_text`).
"""

from __future__ import annotations

import codecs
import contextlib
import gzip
import hashlib
import itertools
import json
import os
import random
import shutil
import sys
import unicodedata
import warnings
import zlib
from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO

import numpy as np
import torch
from tqdm import tqdm

from tinyt.config import DataConfig, HoldoutConfig
from tinyt.errors import TinytError
from tinyt.tokenizer import BOS_ID, EOS_ID, PAD_ID, Tokenizers
from tinyt.writing import (atomic_torch_save, atomic_write_text, write_error, write_failure,
                           writing)

if TYPE_CHECKING:
    import datasets
    import sentencepiece as spm

# Part of every cache key below: bump it when the layout of a cached file changes.
_CACHE_VERSION = "tinyt-data-1"


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


def _hub_label(config: DataConfig, name: str) -> str:
    return (f"hub dataset {config.hub_name}" + (f" ({config.hub_config})" if config.hub_config
                                                else "") + f" split {name!r}")


def _first_line(exc: BaseException) -> str:
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]


def _hub_error(label: str, exc: BaseException) -> TinytError:
    return TinytError(f"cannot load {label}: {_first_line(exc)}. Offline? Point data.dir at a "
                      "folder with the corpus files (e.g. make train DATA=../shared/data/multi30k)")


# One TCP connection attempt to the hub, DNS lookup included, must succeed within this many
# seconds, or the hub counts as unreachable and datasets are read from the cache only.
_HUB_PROBE_SECONDS = 4.0


def _hub_address() -> tuple[str, int] | None:
    """(host, port) that a request to the hub endpoint (HF_ENDPOINT, by default
    https://huggingface.co) first connects to: the endpoint itself, or the proxy that the
    environment (HTTPS_PROXY, NO_PROXY, ...) names for it. None if the URL makes no sense."""
    from urllib.parse import urlsplit
    from urllib.request import getproxies, proxy_bypass

    import datasets

    try:
        url = urlsplit(datasets.config.HF_ENDPOINT)
        host = url.hostname or ""
        proxy = getproxies().get(url.scheme)
        if proxy and host and not proxy_bypass(host):
            url = urlsplit(proxy if "://" in proxy else f"http://{proxy}")
        port = url.port or {"http": 80, "https": 443}.get(url.scheme, 1080)
    except ValueError:  # a malformed URL or port
        return None
    return (url.hostname, port) if url.hostname else None


def _hub_reachable(timeout: float | None = None) -> bool:
    """Whether one TCP connection to the hub (or its proxy) opens within `timeout` seconds
    (`_HUB_PROBE_SECONDS` by default). A DNS lookup ignores socket timeouts and can hang for
    long, so the attempt runs in a thread that is waited for `timeout` seconds at most. Only a
    connection that cannot even be opened counts as unreachable: whatever happens after it is
    left to `datasets` and its retries."""
    import socket
    import threading

    timeout = _HUB_PROBE_SECONDS if timeout is None else timeout
    address = _hub_address()
    if address is None:
        return True  # nothing to probe: let datasets try, and report its own error
    opened: list[bool] = []

    def connect() -> None:
        try:
            socket.create_connection(address, timeout=timeout).close()
            opened.append(True)
        except Exception:  # no DNS answer, no route, refused, timed out
            opened.append(False)

    attempt = threading.Thread(target=connect, name="tinyt-hub-probe", daemon=True)
    attempt.start()
    attempt.join(timeout)
    return bool(opened) and opened[0]


def _hub_offline_requested() -> bool:
    """HF_HUB_OFFLINE or HF_DATASETS_OFFLINE set to a true value (read now, and as
    huggingface_hub and datasets read them when imported)."""
    import datasets
    from huggingface_hub import constants

    def true(name: str) -> bool:
        return os.environ.get(name, "").strip().upper() in {"1", "ON", "YES", "TRUE"}

    return (true("HF_HUB_OFFLINE") or true("HF_DATASETS_OFFLINE")
            or bool(datasets.config.HF_HUB_OFFLINE) or bool(constants.HF_HUB_OFFLINE))


@contextlib.contextmanager
def _hub_offline_mode() -> Iterator[None]:
    """datasets and huggingface_hub in offline mode for the duration: no request at all, hub
    datasets come from datasets' cache. Both libraries read HF_HUB_OFFLINE/HF_DATASETS_OFFLINE
    into constants when imported, so the constants are switched, and restored afterwards."""
    import datasets
    from huggingface_hub import constants

    saved = (datasets.config.HF_HUB_OFFLINE, datasets.config.HF_DATASETS_OFFLINE,
             constants.HF_HUB_OFFLINE)
    datasets.config.HF_HUB_OFFLINE = datasets.config.HF_DATASETS_OFFLINE = True
    constants.HF_HUB_OFFLINE = True
    try:
        yield
    finally:
        (datasets.config.HF_HUB_OFFLINE, datasets.config.HF_DATASETS_OFFLINE,
         constants.HF_HUB_OFFLINE) = saved


def _load_hub_table(config: DataConfig, name: str, cache_dir: Path | None = None,
                    streaming: bool = False) -> Any:
    """The hub split as a `datasets.Dataset` (an `IterableDataset` when streaming).

    Offline — HF_HUB_OFFLINE or HF_DATASETS_OFFLINE set, or no connection to the hub within
    `_HUB_PROBE_SECONDS` — the split is read from datasets' cache without any request, and a
    dataset missing there is reported at once, not after minutes of retried requests."""
    import datasets  # slow to import; only the hub path needs it at this point

    offline = None
    if _hub_offline_requested():
        offline = "offline mode is on (HF_HUB_OFFLINE/HF_DATASETS_OFFLINE)"
    elif not _hub_reachable():
        offline = f"{datasets.config.HF_ENDPOINT} cannot be reached"
    try:
        with _hub_offline_mode() if offline else contextlib.nullcontext():
            return datasets.load_dataset(config.hub_name, config.hub_config, split=name,
                                         cache_dir=None if cache_dir is None else str(cache_dir),
                                         streaming=streaming)
    except Exception as exc:  # network, missing dataset or split: all end the same way
        if offline and isinstance(exc, ConnectionError):  # offline, and not in the cache
            where = cache_dir or datasets.config.HF_DATASETS_CACHE
            exc = ConnectionError(f"{offline} and it is not in the datasets cache ({where})")
        raise _hub_error(_hub_label(config, name), exc) from None


def _load_hub(config: DataConfig, name: str) -> ParallelText:
    table = _load_hub_table(config, name)
    return _pairs_from_table(table, config, _hub_label(config, name))


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


def _find_file(directory: Path, stem: str, what: str) -> Path:
    for candidate in (directory / stem, directory / f"{stem}.gz"):
        if candidate.is_file():
            return candidate
    raise TinytError(f"{what} file {directory / stem}[.gz] not found; check data.dir, the "
                     "split names in data.files and the language codes")


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


def _load_local(config: DataConfig, name: str) -> ParallelText:
    if config.format == "text":
        src_path, tgt_path = _text_files(config, name)
        src, tgt = _read_lines(src_path), _read_lines(tgt_path)
        if len(src) != len(tgt):
            _raise_unaligned(src_path, len(src), tgt_path, len(tgt))
        return ParallelText(src, tgt, f"{src_path} / {tgt_path}")
    path = _table_file(config, name)
    return _pairs_from_table(_load_table_file(config, path), config, str(path))


def _text_files(config: DataConfig, name: str) -> tuple[Path, Path]:
    directory = Path(config.dir)
    return (_find_file(directory, f"{name}.{config.src_lang}", "source"),
            _find_file(directory, f"{name}.{config.tgt_lang}", "target"))


def _table_file(config: DataConfig, name: str) -> Path:
    return _find_file(Path(config.dir), f"{name}.{config.format}", config.format.upper())


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


@dataclass
class TokenizedText:
    """Token ids of one split as flat arrays: sentence i's source ids are
    src_ids[src_offsets[i]:src_offsets[i+1]] (no <bos>/<eos>); likewise the target."""

    src_ids: torch.Tensor  # (total source tokens,) int32
    src_offsets: torch.Tensor  # (N + 1,) int64
    tgt_ids: torch.Tensor
    tgt_offsets: torch.Tensor

    def __len__(self) -> int:
        return self.src_offsets.numel() - 1

    @property
    def src_lengths(self) -> torch.Tensor:
        return self.src_offsets[1:] - self.src_offsets[:-1]

    @property
    def tgt_lengths(self) -> torch.Tensor:
        return self.tgt_offsets[1:] - self.tgt_offsets[:-1]

    def src_lengths_at(self, indices: torch.Tensor) -> torch.Tensor:
        """(len(indices),) source lengths of those pairs only: per batch, where the whole
        src_lengths would read every offset of the corpus."""
        return self.src_offsets[indices + 1] - self.src_offsets[indices]

    def tgt_lengths_at(self, indices: torch.Tensor) -> torch.Tensor:
        return self.tgt_offsets[indices + 1] - self.tgt_offsets[indices]

    def src(self, i: int) -> torch.Tensor:
        return self.src_ids[self.src_offsets[i]: self.src_offsets[i + 1]]

    def tgt(self, i: int) -> torch.Tensor:
        return self.tgt_ids[self.tgt_offsets[i]: self.tgt_offsets[i + 1]]


def _flatten(ids: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
    """(flat ids (total,) int32, offsets (N + 1,) int64) of N id lists, built through numpy
    without an intermediate Python list of every token."""
    offsets = np.zeros(len(ids) + 1, dtype=np.int64)
    np.cumsum(np.fromiter(map(len, ids), dtype=np.int64, count=len(ids)), out=offsets[1:])
    flat = np.fromiter(itertools.chain.from_iterable(ids), dtype=np.int32,
                       count=int(offsets[-1]))
    return torch.from_numpy(flat), torch.from_numpy(offsets)


def _concat_flat(parts: list[tuple[torch.Tensor, torch.Tensor]]) -> tuple[torch.Tensor,
                                                                          torch.Tensor]:
    """Join (flat ids, offsets) pieces of consecutive sentences into one (flat ids, offsets)."""
    if not parts:
        return torch.zeros(0, dtype=torch.int32), torch.zeros(1, dtype=torch.int64)
    ids = torch.cat([flat for flat, _ in parts])
    offsets, shift = [torch.zeros(1, dtype=torch.int64)], 0
    for flat, part_offsets in parts:
        offsets.append(part_offsets[1:] + shift)
        shift += flat.numel()
    return ids, torch.cat(offsets)


def _encode_pairs(tokenizers: Tokenizers, src: list[str], tgt: list[str],
                  bar: tqdm | None = None, chunk: int = 4096) -> TokenizedText:
    """Encode sentence pairs `chunk` at a time, flattening each chunk at once, so the Python
    lists SentencePiece returns (about 36 bytes a token) never hold more than one chunk."""
    src_parts, tgt_parts = [], []
    for start in range(0, len(src), chunk):
        src_parts.append(_flatten(tokenizers.encode_src(src[start: start + chunk])))
        tgt_parts.append(_flatten(tokenizers.encode_tgt(tgt[start: start + chunk])))
        if bar is not None:
            bar.update(min(chunk, len(src) - start))
    return TokenizedText(*_concat_flat(src_parts), *_concat_flat(tgt_parts))


def tokenize(text: ParallelText, tokenizers: Tokenizers, cache_dir: str | Path | None = None,
             desc: str = "tokenizing") -> TokenizedText:
    """Encode both sides with SentencePiece; with `cache_dir`, reuse ids computed before for
    the same text and tokenizer."""
    cache_path = None
    if cache_dir is not None:
        h = hashlib.sha256(tokenizers.fingerprint.encode())
        for lines in (text.src, text.tgt):
            h.update(json.dumps(lines, ensure_ascii=False).encode("utf-8", "surrogatepass"))
        cache_path = Path(cache_dir) / f"ids-{h.hexdigest()[:16]}.pt"
        if cache_path.is_file():
            try:
                return TokenizedText(**torch.load(cache_path, weights_only=True))
            except Exception:
                pass  # a damaged cache is recomputed and rewritten below
    with tqdm(total=len(text), desc=desc, unit="sent", leave=False, dynamic_ncols=True) as bar:
        result = _encode_pairs(tokenizers, text.src, text.tgt, bar)
    if cache_path is not None:
        atomic_torch_save(vars(result), cache_path)
    return result


# -- corpora larger than memory: memory-mapped Arrow tables and id arrays --------------------

# Pairs per Arrow record batch written while reading text files, and per slice read back.
_CHUNK_PAIRS = 10_000
# A tokenizing process costs about a second to start and to hand back its shard, so smaller
# corpora are tokenized in the calling process (its output is the same either way).
MIN_PAIRS_PER_PROCESS = 50_000
_TOKEN_ARRAYS = ("src_ids", "src_offsets", "tgt_ids", "tgt_offsets")
# Seconds before a progress bar of these steps appears: quick ones (small corpora, or an error
# found in the next split) leave nothing on the terminal.
_BAR_DELAY = 1.0


def _digest(*parts: Any) -> str:
    """A cache key (32 hex digits) for JSON-serialisable parts, `_CACHE_VERSION` included."""
    text = json.dumps([_CACHE_VERSION, *parts], ensure_ascii=False, sort_keys=True)
    return hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest()[:32]


def _file_identity(path: Path) -> list[Any]:
    """Path, size and modification time: a rewritten file gets a new cache key without being
    hashed whole (hashing a corpus larger than memory would take as long as reading it)."""
    stat = path.stat()
    return [str(path.resolve()), stat.st_size, stat.st_mtime_ns]


def _chunks(items: Iterable[Any], size: int) -> Iterator[list[Any]]:
    iterator = iter(items)
    while chunk := list(itertools.islice(iterator, size)):
        yield chunk


@dataclass
class Corpus:
    """One split as a memory-mapped `datasets.Dataset` with exactly two string columns, "src"
    and "tgt" (missing values read as ""), in corpus order. Its rows stay on disk: only what is
    read is paged in, and the kernel can drop those pages again.

    `fingerprint` identifies the content: the same for the same input files (path, size and
    modification time) or hub data (the hub table's own fingerprint) and field settings, across
    runs; a changed file changes it.
    """

    dataset: datasets.Dataset
    name: str  # where it came from, for messages
    fingerprint: str

    def __len__(self) -> int:
        return len(self.dataset)

    def sample(self, n: int, seed: int) -> tuple[list[str], list[str]]:
        """(source, target) sentences of at most `n` pairs: all pairs in corpus order when the
        corpus has no more than `n`, else `n` pairs chosen at random (reproducibly, by `seed`)
        and kept in corpus order. Reads slices of at most `_CHUNK_PAIRS` rows in index order,
        so memory holds the sample and one slice, never the corpus."""
        total = len(self.dataset)
        table = self.dataset.with_format("arrow")
        if total <= n:
            keys: Iterable[Any] = (slice(start, start + _CHUNK_PAIRS)
                                   for start in range(0, total, _CHUNK_PAIRS))
        else:
            keys = _chunks(sorted(random.Random(seed).sample(range(total), n)), _CHUNK_PAIRS)
        src: list[str] = []
        tgt: list[str] = []
        for key in keys:
            part = table[key]
            src += part.column("src").to_pylist()
            tgt += part.column("tgt").to_pylist()
        return src, tgt


def open_corpus(config: DataConfig, split: str, cache_dir: str | Path) -> Corpus:
    """One split (a role such as "train", or a split name) as a memory-mapped `Corpus`.

    Local text files are read line by line into `cache_dir/corpus-KEY.arrow`; TSV/JSONL files
    and hub datasets are loaded by `datasets` (its own Arrow cache in `cache_dir/datasets/`)
    and their two fields copied into `corpus-KEY.arrow` by a cached `datasets.map`. A second
    call with unchanged local files opens the cached table without reading them again (hub
    data: `datasets` finds its download in its cache, the map finds its output).
    """
    import datasets

    cache_dir = Path(cache_dir)
    with writing(cache_dir):
        cache_dir.mkdir(parents=True, exist_ok=True)
    name = split_name(config, split)
    if config.dir is not None and config.format == "text":
        src_path, tgt_path = _text_files(config, name)
        key = _digest("text", _file_identity(src_path), _file_identity(tgt_path))
        path = cache_dir / f"corpus-{key}.arrow"
        dataset = _open_arrow(path)
        if dataset is None:
            with writing(path):
                _write_pairs_arrow(_text_pair_stream(src_path, tgt_path), path,
                                   f"reading {name}")
            dataset = datasets.Dataset.from_file(str(path))
        return Corpus(dataset, f"{src_path} / {tgt_path}", key)
    fields = [config.source_field, config.target_field, config.translation_field]
    fields += [config.columns] if config.columns is not None else []  # how it is parsed
    if config.dir is not None:
        path = _table_file(config, name)
        label, key = str(path), _digest(config.format, _file_identity(path), *fields)
        cached = _open_arrow(cache_dir / f"corpus-{key}.arrow")
        if cached is not None:  # known before parsing the file: no need to parse it again
            return Corpus(cached, label, key)
        table = _load_table_file(config, path, cache_dir / "datasets")
    else:
        # Hub downloads go to datasets' shared cache (HF_DATASETS_CACHE), not the run's: a
        # second run, or a second config over the same corpus, must not download it again.
        table = _load_hub_table(config, name)
        label, key = _hub_label(config, name), _digest("hub", table._fingerprint, *fields)
    _check_fields(list(table.column_names), table[0] if len(table) else None, config, label)
    with writing(cache_dir / f"corpus-{key}.arrow"):
        dataset = _copy_pair_columns(table, config, key, cache_dir, name)
    return Corpus(dataset, label, key)


def _copy_pair_columns(table: datasets.Dataset, config: DataConfig, key: str, cache_dir: Path,
                       name: str) -> datasets.Dataset:
    """The configured source and target fields of `table` as a table of two string columns,
    cached in `cache_dir/corpus-KEY.arrow`."""
    return table.map(
        _pair_columns, batched=True, batch_size=_CHUNK_PAIRS,
        fn_kwargs={"src_field": config.source_field, "tgt_field": config.target_field,
                   "nested": config.translation_field},
        remove_columns=list(table.column_names), features=_pair_features(),
        new_fingerprint=key, cache_file_name=str(cache_dir / f"corpus-{key}.arrow"),
        desc=f"reading {name}")


def _pair_features() -> datasets.Features:
    import datasets

    return datasets.Features({"src": datasets.Value("string"), "tgt": datasets.Value("string")})


def _pair_columns(batch: dict[str, list[Any]], src_field: str, tgt_field: str,
                  nested: str | None) -> dict[str, list[str]]:
    """`datasets.map` function: a batch of any table -> {"src": [...], "tgt": [...]} strings."""
    if nested is None:
        src, tgt = batch[src_field], batch[tgt_field]
    else:
        rows = [row or {} for row in batch[nested]]
        src, tgt = [row.get(src_field) for row in rows], [row.get(tgt_field) for row in rows]
    return {"src": [_as_text(s) for s in src], "tgt": [_as_text(t) for t in tgt]}


def _open_arrow(path: Path) -> datasets.Dataset | None:
    """The memory-mapped table cached at `path`, or None when it is missing or unreadable."""
    import datasets

    if not path.is_file():
        return None
    try:
        dataset = datasets.Dataset.from_file(str(path))
    except Exception:  # damaged (e.g. a disk filled up while it was written): rebuilt
        return None
    return dataset if dataset.column_names == ["src", "tgt"] else None


def _write_pairs_arrow(pairs: Iterable[tuple[str, str]], path: Path, desc: str) -> None:
    """Write (source, target) pairs as an Arrow stream file of `_CHUNK_PAIRS`-row record
    batches (the format `datasets.Dataset.from_file` memory-maps), atomically: into a
    temporary file first, so an interrupted write never leaves a truncated table at `path`."""
    import pyarrow as pa

    schema = pa.schema([("src", pa.string()), ("tgt", pa.string())])
    tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}")
    try:
        with pa.OSFile(str(tmp), "wb") as sink, pa.ipc.new_stream(sink, schema) as writer, \
                tqdm(desc=desc, unit="sent", leave=False, dynamic_ncols=True,
                     delay=_BAR_DELAY) as bar:
            for chunk in _chunks(pairs, _CHUNK_PAIRS):
                src, tgt = zip(*chunk)
                writer.write_batch(pa.record_batch(
                    [pa.array(src, pa.string()), pa.array(tgt, pa.string())], schema=schema))
                bar.update(len(chunk))
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def tokenize_corpus(corpus: Corpus, tokenizers: Tokenizers, cache_dir: str | Path,
                    num_proc: int = 1, desc: str = "tokenizing") -> TokenizedText:
    """Token ids of a whole `Corpus` as a `TokenizedText` whose four tensors are read-only
    views of memory-mapped .npy files: src_ids/tgt_ids (total tokens,) int32 and
    src_offsets/tgt_offsets (N + 1,) int64, as `tokenize` returns them (no <bos>/<eos>).

    The pairs are encoded by `datasets.map` in `num_proc` processes (fewer for small corpora,
    see MIN_PAIRS_PER_PROCESS), then copied chunk by chunk into `cache_dir/tokens-KEY/`
    (KEY from the corpus and tokenizer fingerprints), written under a temporary name and
    renamed into place. A second call with the same corpus and tokenizer maps those files
    again without tokenizing. Nothing may write to the tensors (the pages are read-only).
    """
    cache_dir = Path(cache_dir)
    key = _digest("tokens", corpus.fingerprint, tokenizers.fingerprint)
    folder = cache_dir / f"tokens-{key}"
    cached = _load_token_arrays(folder)
    if cached is not None:
        return cached
    with writing(folder):
        cache_dir.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(folder, ignore_errors=True)  # damaged, or half-copied by hand
        _encode_into_arrays(corpus, tokenizers, cache_dir, key, num_proc, desc)
    result = _load_token_arrays(folder)
    if result is None:
        raise TinytError(f"the token ids written to {folder} cannot be read back; check the disk "
                         "and delete the folder")
    return result


def _encode_into_arrays(corpus: Corpus, tokenizers: Tokenizers, cache_dir: Path, key: str,
                        num_proc: int, desc: str) -> None:
    """Tokenize `corpus` with `datasets.map` and copy the ids into `cache_dir/tokens-KEY/`."""
    folder = cache_dir / f"tokens-{key}"
    processes = max(1, min(num_proc, len(corpus) // MIN_PAIRS_PER_PROCESS))
    encoded = corpus.dataset.map(
        _encode_columns, batched=True, num_proc=processes if processes > 1 else None,
        # SentencePiece processors pickle (as their model bytes) to reach worker processes;
        # the explicit fingerprint spares datasets from hashing them.
        fn_kwargs={"src": tokenizers.src, "tgt": tokenizers.tgt},
        remove_columns=list(corpus.dataset.column_names), features=_token_features(),
        new_fingerprint=key, cache_file_name=str(cache_dir / f"tokens-{key}.arrow"), desc=desc)
    _write_token_arrays(encoded, folder, desc)
    del encoded
    # The map's Arrow files (one a process) duplicate the .npy arrays: free the disk.
    for path in cache_dir.glob(f"tokens-{key}*.arrow"):
        path.unlink(missing_ok=True)


def _token_features() -> datasets.Features:
    import datasets

    ids = datasets.Sequence(datasets.Value("int32"))
    return datasets.Features({"src_ids": ids, "tgt_ids": ids})


def _encode_columns(batch: dict[str, list[str]], src: spm.SentencePieceProcessor,
                    tgt: spm.SentencePieceProcessor) -> dict[str, list[list[int]]]:
    """`datasets.map` function: {"src", "tgt"} sentences -> {"src_ids", "tgt_ids"} ids."""
    return {"src_ids": src.encode(batch["src"], out_type=int),
            "tgt_ids": tgt.encode(batch["tgt"], out_type=int)}


def _write_token_arrays(encoded: datasets.Dataset, folder: Path, desc: str) -> None:
    """Copy the list<int32> columns src_ids/tgt_ids of `encoded` into the flat .npy layout of
    `TokenizedText`, one record batch at a time: a first pass over the list lengths sizes the
    .npy headers, a second appends the data. Plain appends, not a writable memory map: the
    written pages then never count towards this process's resident memory."""
    import pyarrow.compute as pc

    table = encoded.data  # the memory-mapped Arrow table (no indices mapping after a map)
    totals = {"src": 0, "tgt": 0}
    for batch in table.to_batches(max_chunksize=1 << 16):
        for side in totals:
            lengths = pc.list_value_length(batch.column(f"{side}_ids"))
            totals[side] += int(pc.sum(lengths).as_py() or 0)
    tmp = folder.with_name(f"{folder.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        with contextlib.ExitStack() as stack, tqdm(total=len(encoded), unit="sent", leave=False,
                                                    desc=f"{desc} (saving ids)",
                                                    dynamic_ncols=True, delay=_BAR_DELAY) as bar:
            files = {}
            for side, total in totals.items():
                files[f"{side}_ids"] = stack.enter_context(
                    _open_npy(tmp / f"{side}_ids.npy", np.int32, total))
                files[f"{side}_offsets"] = stack.enter_context(
                    _open_npy(tmp / f"{side}_offsets.npy", np.int64, len(encoded) + 1))
                files[f"{side}_offsets"].write(np.zeros(1, dtype=np.int64).tobytes())
            tokens = {"src": 0, "tgt": 0}  # tokens written so far, per side
            for batch in table.to_batches(max_chunksize=1 << 16):
                for side in tokens:
                    column = batch.column(f"{side}_ids")
                    # flatten() and list_value_length respect the batch's slice of the
                    # shared values buffer; .values and .offsets would not.
                    values = column.flatten().to_numpy(zero_copy_only=False)
                    lengths = pc.list_value_length(column).to_numpy(zero_copy_only=False)
                    ends = tokens[side] + np.cumsum(lengths, dtype=np.int64)
                    files[f"{side}_ids"].write(values.astype(np.int32, copy=False).tobytes())
                    files[f"{side}_offsets"].write(ends.tobytes())
                    tokens[side] += len(values)
                bar.update(batch.num_rows)
        try:
            os.rename(tmp, folder)
        except OSError:  # another process (e.g. another rank) finished the same folder first
            if _load_token_arrays(folder) is None:
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _open_npy(path: Path, dtype: type, length: int) -> BinaryIO:
    """`path` opened for writing a 1-D .npy array of `length` items: the header is written,
    the caller appends the data."""
    f = open(path, "wb")
    header = {"descr": np.lib.format.dtype_to_descr(np.dtype(dtype)), "fortran_order": False,
              "shape": (length,)}
    np.lib.format.write_array_header_1_0(f, header)
    return f


def _load_token_arrays(folder: Path) -> TokenizedText | None:
    """The cached id arrays in `folder` as tensors over read-only memory maps, or None when
    they are missing or inconsistent (then they are rebuilt)."""
    try:
        arrays = {name: np.load(folder / f"{name}.npy", mmap_mode="r") for name in _TOKEN_ARRAYS}
    except (OSError, ValueError, EOFError):
        return None
    for side in ("src", "tgt"):
        ids, offsets = arrays[f"{side}_ids"], arrays[f"{side}_offsets"]
        if (ids.dtype != np.int32 or offsets.dtype != np.int64 or ids.ndim != 1
                or offsets.ndim != 1 or len(offsets) != len(arrays["src_offsets"])
                or len(offsets) == 0 or offsets[0] != 0 or offsets[-1] != len(ids)):
            return None
    with warnings.catch_warnings():
        # torch warns that it cannot mark a read-only array read-only; nothing writes to it.
        warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
        return TokenizedText(**{name: torch.from_numpy(array) for name, array in arrays.items()})


def trainable_indices(data: TokenizedText, max_len: int) -> torch.Tensor:
    """Indices of pairs with 1..max_len tokens on both sides (empty or overlong ones are
    dropped from training)."""
    src_len, tgt_len = data.src_lengths, data.tgt_lengths
    keep = (src_len >= 1) & (tgt_len >= 1) & (src_len <= max_len) & (tgt_len <= max_len)
    return keep.nonzero().flatten()


def make_batches(data: TokenizedText, indices: torch.Tensor, batch_tokens: int,
                 generator: torch.Generator | None = None) -> list[torch.Tensor]:
    """Split `indices` into batches of similar-length pairs, each with at most `batch_tokens`
    padded tokens on its larger side (a single overlong pair still gets a batch of its own).

    With a generator, ties in length are broken randomly and the batch order is shuffled, so
    every epoch sees different batches; without one, the result is deterministic (evaluation).
    """
    if indices.numel() == 0:
        return []
    src_len = data.src_lengths[indices] + 1  # + <eos>
    tgt_len = data.tgt_lengths[indices] + 1  # + <bos> (decoder input) or <eos> (target)
    order = (torch.randperm(indices.numel(), generator=generator) if generator is not None
             else torch.arange(indices.numel()))
    # Sort by the longer side (what the budget counts), then target, then source length; the
    # stable sorts keep the random order of exact ties.
    longer = torch.maximum(src_len, tgt_len)
    for key in (src_len, tgt_len, longer):
        order = order[torch.sort(key[order], stable=True).indices]
    src_sorted, tgt_sorted = src_len[order].tolist(), tgt_len[order].tolist()
    batches: list[torch.Tensor] = []
    start, max_s, max_t = 0, 0, 0
    for i, (s, t) in enumerate(zip(src_sorted, tgt_sorted)):
        new_s, new_t = max(max_s, s), max(max_t, t)
        if i > start and (i - start + 1) * max(new_s, new_t) > batch_tokens:
            batches.append(indices[order[start:i]])
            start, new_s, new_t = i, s, t
        max_s, max_t = new_s, new_t
    batches.append(indices[order[start:]])
    if generator is not None:
        shuffle = torch.randperm(len(batches), generator=generator).tolist()
        batches = [batches[i] for i in shuffle]
    return batches


@dataclass
class Batch:
    """Padded tensors for one batch (padding id 0, on the right).

    src: (B, S) source ids + <eos>; tgt_in: (B, T) <bos> + target ids; tgt_out: (B, T) target
    ids + <eos>; n_tokens: number of non-padding positions in tgt_out.
    """

    src: torch.Tensor
    tgt_in: torch.Tensor
    tgt_out: torch.Tensor
    n_tokens: int

    def to(self, device: torch.device, non_blocking: bool = False) -> Batch:
        return Batch(self.src.to(device, non_blocking=non_blocking),
                     self.tgt_in.to(device, non_blocking=non_blocking),
                     self.tgt_out.to(device, non_blocking=non_blocking), self.n_tokens)

    def pin_memory(self) -> Batch:
        return Batch(self.src.pin_memory(), self.tgt_in.pin_memory(), self.tgt_out.pin_memory(),
                     self.n_tokens)


def _gather_padded(flat: torch.Tensor, starts: torch.Tensor, lengths: torch.Tensor,
                   width: int) -> torch.Tensor:
    """(B, width) int64: row b holds flat[starts[b]: starts[b] + lengths[b]], then padding.
    One gather for the whole batch: a Python loop over sentences costs more than a GPU step."""
    if flat.numel() == 0:
        return torch.full((starts.numel(), width), PAD_ID, dtype=torch.long)
    positions = torch.arange(width)
    real = positions[None, :] < lengths[:, None]
    index = (starts[:, None] + positions[None, :]).clamp_(max=flat.numel() - 1)
    return torch.where(real, flat[index].long(), PAD_ID)


def collate(data: TokenizedText, indices: torch.Tensor) -> Batch:
    """Build the padded tensors for the pairs `indices` of `data`."""
    rows = torch.arange(indices.numel())
    src_len, tgt_len = data.src_lengths_at(indices), data.tgt_lengths_at(indices)
    src = _gather_padded(data.src_ids, data.src_offsets[indices], src_len, int(src_len.max()) + 1)
    src[rows, src_len] = EOS_ID
    # body: y1 … yn then padding, one column wider than the longest target
    body = _gather_padded(data.tgt_ids, data.tgt_offsets[indices], tgt_len, int(tgt_len.max()) + 1)
    tgt_in = torch.cat([torch.full((rows.numel(), 1), BOS_ID, dtype=torch.long), body[:, :-1]], 1)
    body[rows, tgt_len] = EOS_ID
    return Batch(src, tgt_in, body, int(tgt_len.sum()) + rows.numel())


# -- streaming: corpora read as a stream, tokenized and batched one window at a time ---------


@dataclass
class StreamingCorpus:
    """One split read as a stream of (source, target) pairs, never stored whole: for hub
    datasets too large to download, or any corpus with `data.streaming: true`.

    `fingerprint` comes from the config (hub name, config and split, or the files' paths,
    sizes and modification times), since the content cannot be hashed without reading it all.
    """

    name: str  # where it comes from, for messages
    fingerprint: str
    buffer: int  # pairs a window holds (data.stream_buffer)
    open_pairs: Callable[[], Iterator[tuple[str, str]]] = field(repr=False)

    def pairs(self) -> Iterator[tuple[str, str]]:
        """Every (source, target) pair in stream order, read afresh from the start."""
        return self.open_pairs()

    def sample(self, n: int, seed: int) -> tuple[list[str], list[str]]:
        """(source, target) sentences of the first `n` pairs. `seed` is unused: a random sample
        of a stream would need a pass over all of it, so the head of the stream stands in."""
        src: list[str] = []
        tgt: list[str] = []
        for s, t in itertools.islice(self.pairs(), n):
            src.append(s)
            tgt.append(t)
        return src, tgt

    def batches(self, tokenizers: Tokenizers, batch_tokens: int, max_len: int, seed: int,
                epoch: int) -> Iterator[Batch]:
        """One epoch of training batches: the stream is read `buffer` pairs at a time; each
        window is tokenized, its pairs outside 1..max_len tokens dropped (as
        `trainable_indices`), and its pairs length-bucketed by `make_batches` with a generator
        seeded from (seed, epoch, window number), so shuffling happens within a window and the
        same arguments give the same batches (a resumed run re-iterates and skips). Memory
        holds one window's text and ids."""
        for window, pairs in enumerate(_chunks(self.pairs(), self.buffer)):
            data = _encode_pairs(tokenizers, [s for s, _ in pairs], [t for _, t in pairs])
            del pairs  # the window's text is no longer needed once it is encoded
            generator = torch.Generator().manual_seed(_window_seed(seed, epoch, window))
            for indices in make_batches(data, trainable_indices(data, max_len), batch_tokens,
                                        generator):
                yield collate(data, indices)


def _window_seed(seed: int, epoch: int, window: int) -> int:
    """A 63-bit generator seed for one window of one epoch, unrelated to its neighbours'."""
    digest = hashlib.sha256(f"{seed}/{epoch}/{window}".encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


def stream_corpus(config: DataConfig, split: str) -> StreamingCorpus:
    """One split (a role such as "train", or a split name) as a `StreamingCorpus`: hub data
    through `datasets.load_dataset(..., streaming=True)`, local text files through a lazy line
    reader over both files, local TSV/JSONL files through `datasets` streaming. Missing local
    files and unreachable hub datasets are reported here, problems inside the data while
    reading."""
    name = split_name(config, split)
    fields = [config.source_field, config.target_field, config.translation_field]
    fields += [config.columns] if config.columns is not None else []  # how it is parsed
    if config.dir is not None and config.format == "text":
        src_path, tgt_path = _text_files(config, name)
        return StreamingCorpus(
            f"{src_path} / {tgt_path}",
            _digest("text-stream", _file_identity(src_path), _file_identity(tgt_path)),
            config.stream_buffer, lambda: _text_pair_stream(src_path, tgt_path))
    if config.dir is not None:
        path = _table_file(config, name)
        rows = _load_table_file(config, path, streaming=True)
        label, key = str(path), _digest(f"{config.format}-stream", _file_identity(path), *fields)

        def wrap(exc: BaseException) -> TinytError:
            return _parse_error(config, path, exc)
    else:
        rows = _load_hub_table(config, name, streaming=True)
        label = _hub_label(config, name)
        key = _digest("hub-stream", config.hub_name, config.hub_config, name, *fields)

        def wrap(exc: BaseException) -> TinytError:
            return _hub_error(label, exc)
    return StreamingCorpus(label, key, config.stream_buffer,
                           lambda: _row_pairs(rows, config, label, wrap))


def _row_pairs(rows: Iterable[dict[str, Any]], config: DataConfig, label: str,
               wrap: Callable[[BaseException], TinytError]) -> Iterator[tuple[str, str]]:
    """(source, target) strings of each row of a streamed table; the first row is checked for
    the configured fields; errors of the reader (network, parsing) become `wrap(exc)`."""
    checked = False
    for row in _reader_errors(rows, wrap):
        if not checked:
            _check_fields(list(row.keys()), row, config, label)
            checked = True
        if config.translation_field is not None:
            row = row.get(config.translation_field) or {}
        yield _as_text(row.get(config.source_field)), _as_text(row.get(config.target_field))


def _reader_errors(rows: Iterable[Any], wrap: Callable[[BaseException], TinytError]
                   ) -> Iterator[Any]:
    """`rows`, with any exception of the reader but a TinytError turned into `wrap(exc)` (the
    consumer's own exceptions never pass through here)."""
    try:
        yield from rows
    except TinytError:
        raise
    except Exception as exc:
        raise wrap(exc) from None


# -- corpora as people have them: normalisation, duplicates, held-out splits -----------------

# The folder of a run directory that holds what training carved out of the training split:
# valid.jsonl and test.jsonl (data.holdout) and split.json, the record of how it was made.
HELD_OUT_DIR = "data"
_MANIFEST = "split.json"
_MANIFEST_FORMAT = "tinyt-split-1"
# Letters of this many training pairs name each side's scripts (`tinyt info`).
_SCRIPT_SAMPLE = 2000


def normalize_text(text: ParallelText, form: str) -> ParallelText:
    """Both sides of `text` in Unicode normal form `form` (data.normalize: nfkc or nfc; none
    leaves the text as read).

    SentencePiece normalises whatever it encodes with its own NFKC-based rule (nmt_nfkc), at
    training and at translation alike, so this does not change what a model reads; it decides
    the text tinyt compares and scores: validation and test sources and references (the
    model writes NFKC text, e.g. "," for Chinese "，"), duplicates and held-out sources.
    """
    if form == "none":
        return text
    return ParallelText([unicodedata.normalize(form.upper(), s) for s in text.src],
                        [unicodedata.normalize(form.upper(), t) for t in text.tgt], text.name)


def _comparison_key(sentence: str, form: str) -> str:
    """What two sentences share when they count as the same: the text in normal form `form`,
    runs of whitespace as one space and none at the ends (SentencePiece reads them so too)."""
    if form != "none":
        sentence = unicodedata.normalize(form.upper(), sentence)
    return " ".join(sentence.split())


def _hash64(text: str) -> int:
    return int.from_bytes(hashlib.blake2b(text.encode("utf-8", "surrogatepass"),
                                          digest_size=8).digest(), "little")


def _pair_hashes(corpus: Corpus, form: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(source hash, pair hash, usable), one entry per corpus row: 64-bit hashes of the
    comparison keys of the source and of the whole pair, and whether both sides have text.
    Reads the table `_CHUNK_PAIRS` rows at a time; memory holds 17 bytes a pair."""
    total = len(corpus)
    src_hash = np.zeros(total, dtype=np.uint64)
    pair_hash = np.zeros(total, dtype=np.uint64)
    usable = np.zeros(total, dtype=bool)
    table = corpus.dataset.with_format("arrow")
    with tqdm(total=total, desc="finding duplicates", unit="sent", leave=False,
              dynamic_ncols=True, delay=_BAR_DELAY) as bar:
        for start in range(0, total, _CHUNK_PAIRS):
            part = table[start: start + _CHUNK_PAIRS]
            keys = [(_comparison_key(s or "", form), _comparison_key(t or "", form))
                    for s, t in zip(part.column("src").to_pylist(),
                                    part.column("tgt").to_pylist())]
            end = start + len(keys)
            src_hash[start:end] = [_hash64(s) for s, _ in keys]
            # The keys hold no tab (whitespace became single spaces): a safe separator.
            pair_hash[start:end] = [_hash64(f"{s}\t{t}") for s, t in keys]
            usable[start:end] = [bool(s) and bool(t) for s, t in keys]
            bar.update(len(keys))
    return src_hash, pair_hash, usable


@dataclass
class Carving:
    """Which rows of a training split stay for training, and which were held out."""

    keep: np.ndarray  # (N,) bool: the row stays in the training split
    held_out: dict[str, np.ndarray]  # role (valid, test) -> its rows, in corpus order
    duplicates: int  # pairs dropped as exact repeats of an earlier pair (data.dedup)
    mates: int  # further pairs dropped because their source sentence was held out


def carve(src_hash: np.ndarray, pair_hash: np.ndarray, usable: np.ndarray,
          holdout: HoldoutConfig | None, dedup: bool, label: str) -> Carving:
    """Drop exact duplicate pairs (the first of each is kept) when `dedup`, and hold out
    `holdout.valid` + `holdout.test` pairs with distinct source sentences.

    Held out are whole source groups: the pairs are grouped by source hash, the groups (in
    hash order, so independent of the file's line order) shuffled by `holdout.seed`, the first
    `test` groups go to test and the next `valid` to valid, each represented by its first pair;
    every other pair of those groups leaves training, so no held-out source sentence is
    trained on. Only pairs with text on both sides count. A 64-bit hash collision (odds about
    N² / 2^65) could merge two groups, or drop one distinct pair as a duplicate.
    """
    keep = np.ones(len(src_hash), dtype=bool)
    rows = np.flatnonzero(usable)
    duplicates = 0
    if dedup:
        _, first = np.unique(pair_hash[rows], return_index=True)
        repeat = np.ones(len(rows), dtype=bool)
        repeat[first] = False
        keep[rows[repeat]] = False
        duplicates = int(repeat.sum())
    held_out: dict[str, np.ndarray] = {}
    mates = 0
    if holdout is not None:
        groups, first = np.unique(src_hash[rows], return_index=True)
        wanted = holdout.valid + holdout.test
        if len(groups) <= wanted:
            raise TinytError(
                f"data.holdout asks for {holdout.valid:,} valid + {holdout.test:,} test pairs "
                f"with distinct source sentences, but {label} has only {len(groups):,} distinct "
                f"source sentences (in {len(rows):,} pairs with text on both sides), and "
                "training needs some too; lower data.holdout.valid/test")
        order = np.random.default_rng(holdout.seed).permutation(len(groups))
        picks = {"test": order[: holdout.test], "valid": order[holdout.test: wanted]}
        held_out = {role: np.sort(rows[first[p]]) for role, p in picks.items() if len(p)}
        in_held_groups = np.isin(src_hash, groups[order[:wanted]])
        mates = int((in_held_groups & keep).sum()) - wanted
        keep &= ~in_held_groups
    return Carving(keep, held_out, duplicates, mates)


def _write_kept_rows(corpus: Corpus, keep: np.ndarray, path: Path) -> None:
    """Write the rows of `corpus` where `keep` is true, in order, as an Arrow stream file at
    `path` (atomically, as `_write_pairs_arrow`), a slice of `_CHUNK_PAIRS` rows at a time."""
    import pyarrow as pa

    schema = pa.schema([("src", pa.string()), ("tgt", pa.string())])
    table = corpus.dataset.with_format("arrow")
    tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}")
    try:
        with pa.OSFile(str(tmp), "wb") as sink, pa.ipc.new_stream(sink, schema) as writer:
            for start in range(0, len(keep), _CHUNK_PAIRS):
                part = table[start: start + _CHUNK_PAIRS].select(["src", "tgt"])
                part = part.filter(pa.array(keep[start: start + len(part)])).cast(schema)
                for batch in part.to_batches():
                    writer.write_batch(batch)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def _script_names(lines: Iterable[str]) -> list[str]:
    """Unicode scripts of the letters in `lines`, most used first, those with at least 5 % of
    the letters: e.g. ["Latin"], ["Han"], ["Han", "Katakana", "Hiragana"]."""
    counts: dict[str, int] = {}
    for line in lines:
        for char in line:
            if char.isalpha():
                words = unicodedata.name(char, "UNKNOWN").replace("-", " ").split()
                if words[0] in ("FULLWIDTH", "HALFWIDTH") and len(words) > 1:
                    words = words[1:]
                script = "Han" if words[0] == "CJK" else words[0].title()
                counts[script] = counts.get(script, 0) + 1
    total = sum(counts.values())
    return [name for name, n in sorted(counts.items(), key=lambda item: -item[1])
            if n >= 0.05 * total]


def read_split_record(run_dir: str | Path) -> dict[str, Any] | None:
    """The record training wrote of its data (`RUN/data/split.json`): source, pair counts,
    duplicates dropped, held-out sizes, scripts; None when there is none (or it is damaged)."""
    try:
        record = json.loads((Path(run_dir) / HELD_OUT_DIR / _MANIFEST).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return record if isinstance(record, dict) and record.get("format") == _MANIFEST_FORMAT \
        else None


def held_out_home(out_dir: Path, run_dir: Path) -> Path:
    """The run directory whose data/ holds the held-out splits: `out_dir` when it has them (a
    run evaluated in place), else `run_dir` (a bundle's config names the run it came from)."""
    return out_dir if (out_dir / HELD_OUT_DIR / _MANIFEST).is_file() else run_dir


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


def open_training_data(config: DataConfig, run_dir: str | Path, resume: bool = False,
                       report: Callable[[str], None] | None = None
                       ) -> tuple[Corpus | StreamingCorpus, ParallelText]:
    """The training split, ready for the tokenizer and training, and the validation split
    (normalised by data.normalize), as `tinyt train` opens them in `run_dir`.

    Without data.dedup and data.holdout (and when streaming) the training split is
    `open_corpus`'s (or `stream_corpus`'s) as it is. Otherwise one pass over it hashes every
    pair (`carve`): exact duplicate pairs are dropped, `holdout.valid`/`holdout.test` pairs are
    held out, and the pairs that stay are copied into a second Arrow table in the run's cache,
    which training then tokenizes (a corpus too large for memory costs that pass at every
    start, 3.5 s a million short pairs on the 2-core development machine, and the copy on disk;
    memory holds 17 bytes a pair).

    The held-out splits go to `run_dir/data/valid.jsonl` and `test.jsonl`, as read (no
    normalisation), and `run_dir/data/split.json` records the counts and a digest of the
    training file's content. A later start (a resume, another rank, `tinyt evaluate`) reads
    the splits back from there. A resume whose training file or data settings changed since
    is refused. Nothing is written before every check has passed. `report` receives a line
    saying what was dropped and held out.
    """
    run_dir = Path(run_dir)
    _check_corpus_location(config)
    held_roles = config.held_out_roles
    valid = None
    if "valid" not in held_roles:  # small, and quick to fail on a missing file
        valid = normalize_text(load_split(config, "valid"), config.normalize)
    if config.streaming:
        return stream_corpus(config, "train"), valid
    corpus = open_corpus(config, "train", run_dir / "cache")
    scripts = {side: _script_names(lines) for side, lines in
               zip(("src", "tgt"), corpus.sample(min(_SCRIPT_SAMPLE, len(corpus)), seed=0))}
    settings = {"normalize": config.normalize, "dedup": config.dedup,
                "holdout": None if config.holdout is None else asdict(config.holdout)}
    record: dict[str, Any] = {
        "format": _MANIFEST_FORMAT, "source": corpus.name, "content": None,
        "settings": settings, "languages": {"src": config.src_lang, "tgt": config.tgt_lang},
        "scripts": scripts, "pairs": len(corpus), "duplicates": None,
        "held_out": {role: 0 for role in ("valid", "test")}, "held_out_mates": 0,
        "train_pairs": len(corpus)}
    carving = None
    if config.dedup or held_roles:
        src_hash, pair_hash, usable = _pair_hashes(corpus, config.normalize)
        record["content"] = _digest("content", config.normalize,
                                    hashlib.sha256(pair_hash.tobytes()).hexdigest())
        carving = carve(src_hash, pair_hash, usable, config.holdout, config.dedup, corpus.name)
        del src_hash, pair_hash, usable
        record.update(duplicates=carving.duplicates if config.dedup else None,
                      held_out={role: len(carving.held_out.get(role, ()))
                                for role in ("valid", "test")},
                      held_out_mates=carving.mates, train_pairs=int(carving.keep.sum()))
        if record["train_pairs"] == 0 and len(corpus):
            raise TinytError(f"no training pair of {corpus.name} is left after dropping "
                             "duplicates and held-out pairs; check the file and data.holdout")
    folder = run_dir / HELD_OUT_DIR
    before = read_split_record(run_dir)
    if resume and before is not None and (before.get("content"), before.get("settings")) != (
            record["content"], record["settings"]):
        raise TinytError(f"the training file ({corpus.name}) or the data settings changed since "
                         f"this run was started ({folder / _MANIFEST} differs), so its held-out "
                         "splits and training pairs would differ; resume with the original file "
                         "and settings, or start a new run (--run-dir, or --overwrite)")

    train: Corpus = corpus
    if carving is not None and not carving.keep.all():
        key = _digest("carved", corpus.fingerprint, record["content"], settings)
        path = run_dir / "cache" / f"corpus-{key}.arrow"
        dataset = _open_arrow(path)
        if dataset is None:
            with writing(path):
                _write_kept_rows(corpus, carving.keep, path)
            dataset = _open_arrow(path)
        train = Corpus(dataset, f"{corpus.name} (training part)", key)

    # Every check has passed: write what is new (a resume, or another rank, finds it there).
    if before != record or any(not (folder / f"{role}.jsonl").is_file() for role in held_roles):
        with writing(folder):
            folder.mkdir(parents=True, exist_ok=True)
        held_out = carving.held_out if carving is not None else {}
        table = corpus.dataset.with_format("arrow")
        for role in ("valid", "test"):
            target = folder / f"{role}.jsonl"
            if role not in held_out:  # left from an earlier start with other settings
                target.unlink(missing_ok=True)
                continue
            # "row": the pair's row in the training file's table (from 0; blank lines of a
            # TSV file are skipped).
            part = table[held_out[role].tolist()]
            lines = [json.dumps({"src": s, "tgt": t, "row": int(r)}, ensure_ascii=False) + "\n"
                     for s, t, r in zip(part.column("src").to_pylist(),
                                        part.column("tgt").to_pylist(), held_out[role])]
            atomic_write_text(target, "".join(lines))
        atomic_write_text(folder / _MANIFEST, json.dumps(record, indent=2, ensure_ascii=False))
    if valid is None:
        valid = normalize_text(_read_held_out(config, "valid", run_dir), config.normalize)
    if report is not None:
        report(describe_split_record(record))
    return train, valid


def describe_split_record(record: dict[str, Any]) -> str:
    """One line on what `open_training_data` did with the training file."""
    parts = [f"data: {record['pairs']:,} pairs in {record['source']}"]
    if record.get("duplicates") is not None:
        parts.append(f"{record['duplicates']:,} exact duplicates dropped")
    held = record.get("held_out") or {}
    if any(held.values()):
        mates = record.get("held_out_mates") or 0
        parts.append(f"held out {held.get('valid', 0):,} valid + {held.get('test', 0):,} test "
                     "pairs with distinct source sentences" + (
                         f" ({mates:,} more pairs sharing their sources left out)" if mates
                         else ""))
    parts.append(f"{record['train_pairs']:,} training pairs")
    return "; ".join(parts)
