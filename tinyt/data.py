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
"""

from __future__ import annotations

import contextlib
import gzip
import hashlib
import itertools
import json
import os
import random
import shutil
import warnings
import zlib
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO

import numpy as np
import torch
from tqdm import tqdm

from tinyt.config import DataConfig
from tinyt.errors import TinytError
from tinyt.tokenizer import BOS_ID, EOS_ID, PAD_ID, Tokenizers

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


def load_split(config: DataConfig, split: str) -> ParallelText:
    """Load one split's sentence pairs, from `config.dir` if set, else from the hub."""
    name = split_name(config, split)
    if config.dir is not None:
        return _load_local(config, name)
    return _load_hub(config, name)


def _hub_label(config: DataConfig, name: str) -> str:
    return (f"hub dataset {config.hub_name}" + (f" ({config.hub_config})" if config.hub_config
                                                else "") + f" split {name!r}")


def _first_line(exc: BaseException) -> str:
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]


def _hub_error(label: str, exc: BaseException) -> TinytError:
    return TinytError(f"cannot load {label}: {_first_line(exc)}. Offline? Point data.dir at a "
                      "folder with the corpus files (e.g. make train DATA=../shared/data/multi30k)")


def _load_hub_table(config: DataConfig, name: str, cache_dir: Path | None = None,
                    streaming: bool = False) -> Any:
    """The hub split as a `datasets.Dataset` (an `IterableDataset` when streaming)."""
    import datasets  # slow to import; only the hub path needs it at this point

    try:
        return datasets.load_dataset(config.hub_name, config.hub_config, split=name,
                                     cache_dir=None if cache_dir is None else str(cache_dir),
                                     streaming=streaming)
    except Exception as exc:  # network, missing dataset or split: all end the same way
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
    line finds exactly the errors decoding the whole file would, the first one first.
    """
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as f:
            for number, raw in enumerate(f, 1):
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
    try:
        return datasets.load_dataset("json" if config.format == "jsonl" else "csv", **options)
    except Exception as exc:
        raise _parse_error(config, path, exc) from None


def _parse_error(config: DataConfig, path: Path, exc: BaseException) -> TinytError:
    return TinytError(f"cannot parse {path} as {config.format.upper()}: {_first_line(exc)}")


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
        cache_path.parent.mkdir(parents=True, exist_ok=True)
        tmp = cache_path.with_suffix(".tmp")
        torch.save(vars(result), tmp)
        tmp.replace(cache_path)
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
    cache_dir.mkdir(parents=True, exist_ok=True)
    name = split_name(config, split)
    if config.dir is not None and config.format == "text":
        src_path, tgt_path = _text_files(config, name)
        key = _digest("text", _file_identity(src_path), _file_identity(tgt_path))
        path = cache_dir / f"corpus-{key}.arrow"
        dataset = _open_arrow(path)
        if dataset is None:
            _write_pairs_arrow(_text_pair_stream(src_path, tgt_path), path, f"reading {name}")
            dataset = datasets.Dataset.from_file(str(path))
        return Corpus(dataset, f"{src_path} / {tgt_path}", key)
    fields = [config.source_field, config.target_field, config.translation_field]
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
    dataset = table.map(
        _pair_columns, batched=True, batch_size=_CHUNK_PAIRS,
        fn_kwargs={"src_field": config.source_field, "tgt_field": config.target_field,
                   "nested": config.translation_field},
        remove_columns=list(table.column_names), features=_pair_features(),
        new_fingerprint=key, cache_file_name=str(cache_dir / f"corpus-{key}.arrow"),
        desc=f"reading {name}")
    return Corpus(dataset, label, key)


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
    cache_dir.mkdir(parents=True, exist_ok=True)
    shutil.rmtree(folder, ignore_errors=True)  # damaged, or half-copied by hand
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
    result = _load_token_arrays(folder)
    if result is None:
        raise TinytError(f"the token ids written to {folder} cannot be read back; check the disk "
                         "and delete the folder")
    return result


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
