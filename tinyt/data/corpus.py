"""A split of any size, larger than memory included, as a memory-mapped Arrow table (`Corpus`)
cached in the run directory.

In: the data config, a role or split name, and a cache folder. Out: a `Corpus`: a table of two
string columns, "src" and "tgt", one row a pair in corpus order, that stays on disk (memory
holds only what is read). Local text files are copied line by line into
`cache_dir/corpus-KEY.arrow`; TSV/JSONL files and hub datasets are loaded by `datasets` and
their two configured fields copied into that file. KEY (`_digest`) comes from what the content
depends on, so a later start opens the cached table without reading the source again.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import os
import random
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tqdm import tqdm

from tinyt.config import DataConfig
# The readers of local files and of the hub are called through their modules
# (files._text_files, hub._load_hub_table): a test that fakes the disk or the hub patches
# the one module that defines the reader.
from tinyt.data import files, hub
from tinyt.data.sources import _as_text, _check_fields, split_name
from tinyt.writing import writing

if TYPE_CHECKING:
    import datasets


# Part of every cache key `_digest` makes (for the tables here, and in token_ids.py, pairs.py
# and streaming.py): bump it when the layout of a cached file changes.
_CACHE_VERSION = "tinyt-data-1"
# Pairs per Arrow record batch written while reading text files, and per slice read back.
_CHUNK_PAIRS = 10_000
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
        src_path, tgt_path = files._text_files(config, name)
        key = _digest("text", _file_identity(src_path), _file_identity(tgt_path))
        path = cache_dir / f"corpus-{key}.arrow"
        dataset = _open_arrow(path)
        if dataset is None:
            with writing(path):
                _write_pairs_arrow(files._text_pair_stream(src_path, tgt_path), path,
                                   f"reading {name}")
            dataset = datasets.Dataset.from_file(str(path))
        return Corpus(dataset, f"{src_path} / {tgt_path}", key)
    fields = [config.source_field, config.target_field, config.translation_field]
    fields += [config.columns] if config.columns is not None else []  # how it is parsed
    if config.dir is not None:
        path = files._table_file(config, name)
        label, key = str(path), _digest(config.format, _file_identity(path), *fields)
        cached = _open_arrow(cache_dir / f"corpus-{key}.arrow")
        if cached is not None:  # known before parsing the file: no need to parse it again
            return Corpus(cached, label, key)
        table = files._load_table_file(config, path, cache_dir / "datasets")
    else:
        # Hub downloads go to datasets' shared cache (HF_DATASETS_CACHE), not the run's: a
        # second run, or a second config over the same corpus, must not download it again.
        table = hub._load_hub_table(config, name)
        label, key = hub._hub_label(config, name), _digest("hub", table._fingerprint, *fields)
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
