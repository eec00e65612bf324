"""A split read as a stream (`StreamingCorpus`): the whole flow, pairs to token ids to batches,
one window of data.stream_buffer pairs at a time; for hub datasets too large to download, or
any corpus with data.streaming: true.

In: the data config and a role or split name. Out: a `StreamingCorpus`, whose `batches`
yields one epoch of training `Batch`es: each window is read from the source (files.py,
hub.py), tokenized (token_ids.py) and batched (batches.py) in memory. Nothing is cached on
disk, and memory holds one window.
"""

from __future__ import annotations

import hashlib
import itertools
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch

from tinyt.config import DataConfig, SubwordSamplingConfig
# The readers of local files and of the hub are called through their modules
# (files._text_files, hub._load_hub_table): a test that fakes the disk or the hub patches
# the one module that defines the reader.
from tinyt.data import files, hub
from tinyt.data.batches import Batch, collate, make_batches, trainable_indices
from tinyt.data.corpus import _chunks, _digest, _file_identity
from tinyt.data.sources import _as_text, _check_fields, split_name
from tinyt.data.token_ids import _encode_pairs, sample_token_ids
from tinyt.errors import TinytError
from tinyt.tokenizer import Tokenizers


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
                epoch: int, sampling: SubwordSamplingConfig | None = None) -> Iterator[Batch]:
        """One epoch of training batches: the stream is read `buffer` pairs at a time; each
        window is tokenized, its pairs outside 1..max_len tokens dropped (as
        `trainable_indices`), and its pairs length-bucketed by `make_batches` with a generator
        seeded from (seed, epoch, window number), so shuffling happens within a window and the
        same arguments give the same batches (a resumed run re-iterates and skips). Memory
        holds one window's text and ids. With `sampling` (subword regularization) each window
        is segmented at random, seeded as its batches are."""
        for window, pairs in enumerate(_chunks(self.pairs(), self.buffer)):
            src, tgt = [s for s, _ in pairs], [t for _, t in pairs]
            del pairs
            window_seed = _window_seed(seed, epoch, window)
            data = (_encode_pairs(tokenizers, src, tgt) if sampling is None
                    else sample_token_ids(tokenizers, src, tgt, sampling, window_seed, max_len))
            del src, tgt  # the window's text is no longer needed once it is encoded
            generator = torch.Generator().manual_seed(window_seed)
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
        src_path, tgt_path = files._text_files(config, name)
        return StreamingCorpus(
            f"{src_path} / {tgt_path}",
            _digest("text-stream", _file_identity(src_path), _file_identity(tgt_path)),
            config.stream_buffer, lambda: files._text_pair_stream(src_path, tgt_path))
    if config.dir is not None:
        path = files._table_file(config, name)
        rows = files._load_table_file(config, path, streaming=True)
        label, key = str(path), _digest(f"{config.format}-stream", _file_identity(path), *fields)

        def wrap(exc: BaseException) -> TinytError:
            return files._parse_error(config, path, exc)
    else:
        rows = hub._load_hub_table(config, name, streaming=True)
        label = hub._hub_label(config, name)
        key = _digest("hub-stream", config.hub_name, config.hub_config, name, *fields)

        def wrap(exc: BaseException) -> TinytError:
            return hub._hub_error(label, exc)
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
