"""Sentence pairs as token ids (`TokenizedText`): one flat id array a side, with offsets.

In: the SentencePiece `Tokenizers` and pairs, either a `ParallelText` in memory (`tokenize`,
cached as one .pt file when given a folder) or a `Corpus` on disk (`tokenize_corpus`: encoded
by `datasets.map` in parallel, then cached as memory-mapped .npy arrays). Out: a
`TokenizedText` of src_ids/tgt_ids (total tokens,) int32 and src_offsets/tgt_offsets
(N + 1,) int64, without <bos>/<eos> (`tinyt.data.batches.collate` adds them); the same pairs
give the same ids either way.
"""

from __future__ import annotations

import contextlib
import hashlib
import itertools
import json
import os
import shutil
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, BinaryIO

import numpy as np
import torch
from tqdm import tqdm

from tinyt.config import SubwordSamplingConfig
from tinyt.data.corpus import _BAR_DELAY, Corpus, _digest
from tinyt.data.sources import ParallelText
from tinyt.errors import TinytError
from tinyt.tokenizer import Tokenizers
from tinyt.writing import atomic_torch_save, writing

if TYPE_CHECKING:
    import datasets
    import sentencepiece as spm


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


def sample_token_ids(tokenizers: Tokenizers, src: list[str], tgt: list[str],
                     sampling: SubwordSamplingConfig, seed: int, max_len: int) -> TokenizedText:
    """Sentence pairs as ids of one random segmentation each (subword regularization,
    tokenizer.sampling), for a streamed window or a batch of `sample_corpus`: the same `seed`
    gives the same ids within one process (not in another: SentencePiece salts its generator
    per process). A sampled side longer than `max_len` tokens (sampling cuts words into more
    pieces) takes its best segmentation instead, so a pair that trains without sampling trains
    with it."""
    src_ids, tgt_ids = _sampled_ids(tokenizers, src, tgt, sampling, seed, max_len)
    return TokenizedText(*_flatten(src_ids), *_flatten(tgt_ids))


def _sampled_ids(tokenizers: Tokenizers, src: list[str], tgt: list[str],
                 sampling: SubwordSamplingConfig, seed: int, max_len: int
                 ) -> tuple[list[list[int]], list[list[int]]]:
    """`sample_token_ids`'s (source, target) ids as lists, one list a sentence."""
    src_seed, tgt_seed = _side_seeds(seed)
    sides = (tokenizers.sample_src(src, sampling, src_seed),
             tokenizers.sample_tgt(tgt, sampling, tgt_seed))
    for ids, text, encode in zip(sides, (src, tgt), (tokenizers.encode_src, tokenizers.encode_tgt)):
        overlong = [i for i, sentence in enumerate(ids) if len(sentence) > max_len]
        for i, best in zip(overlong, encode([text[i] for i in overlong]) if overlong else []):
            ids[i] = best
    return sides


def _side_seeds(seed: int) -> tuple[int, int]:
    """Two 32-bit seeds, for the source and the target side, unrelated to other seeds'."""
    digest = hashlib.sha256(f"subword-sampling/{seed}".encode()).digest()
    return int.from_bytes(digest[:4], "little"), int.from_bytes(digest[4:8], "little")


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


# A tokenizing process costs about a second to start and to hand back its shard, so smaller
# corpora are tokenized in the calling process (its output is the same either way).
MIN_PAIRS_PER_PROCESS = 50_000
_TOKEN_ARRAYS = ("src_ids", "src_offsets", "tgt_ids", "tgt_offsets")


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
    key = _digest("tokens", corpus.fingerprint, tokenizers.fingerprint)
    return _cached_token_arrays(corpus, Path(cache_dir), f"tokens-{key}", num_proc, desc,
                                _encode_columns, {"src": tokenizers.src, "tgt": tokenizers.tgt})


def sample_corpus(corpus: Corpus, tokenizers: Tokenizers, cache_dir: str | Path,
                  sampling: SubwordSamplingConfig, seed: int, max_len: int, name: str,
                  num_proc: int = 1, desc: str = "sampling subwords") -> TokenizedText:
    """One random segmentation of every pair of `corpus` (subword regularization: one epoch's
    worth), as `tokenize_corpus` returns ids, pair for pair in the same order. A sampled side
    longer than `max_len` tokens takes its best segmentation (as `sample_token_ids`).

    The ids are kept in `cache_dir/NAME-KEY/` (KEY from the corpus, tokenizer, sampling
    settings, `seed` and `max_len`), and a second call returns them unchanged: that is what
    makes a resumed run train on the same segmentations. Sampling again would not repeat them,
    because SentencePiece salts its generator in every process. Folders under other names are
    the caller's to remove.
    """
    key = _digest("sampled-tokens", corpus.fingerprint, tokenizers.fingerprint,
                  [sampling.alpha, sampling.nbest], seed, max_len)
    return _cached_token_arrays(corpus, Path(cache_dir), f"{name}-{key}", num_proc, desc,
                                _sample_columns,
                                {"tokenizers": tokenizers, "sampling": sampling, "seed": seed,
                                 "max_len": max_len}, with_indices=True)


def _cached_token_arrays(corpus: Corpus, cache_dir: Path, name: str, num_proc: int,
                         desc: str, function, fn_kwargs: dict, with_indices: bool = False
                         ) -> TokenizedText:
    """The ids `function` (a `datasets.map` function, see `_encode_columns`) makes of
    `corpus`, cached in `cache_dir/NAME/` as memory-mapped .npy arrays; read back when there."""
    folder = cache_dir / name
    cached = _load_token_arrays(folder)
    if cached is not None:
        return cached
    with writing(folder):
        cache_dir.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(folder, ignore_errors=True)  # damaged, or half-copied by hand
        _encode_into_arrays(corpus, cache_dir, name, num_proc, desc, function, fn_kwargs,
                            with_indices)
    result = _load_token_arrays(folder)
    if result is None:
        raise TinytError(f"the token ids written to {folder} cannot be read back; check the disk "
                         "and delete the folder")
    return result


def _encode_into_arrays(corpus: Corpus, cache_dir: Path, name: str, num_proc: int, desc: str,
                        function, fn_kwargs: dict, with_indices: bool) -> None:
    """Tokenize `corpus` with `datasets.map` and copy the ids into `cache_dir/NAME/`."""
    folder = cache_dir / name
    processes = max(1, min(num_proc, len(corpus) // MIN_PAIRS_PER_PROCESS))
    encoded = corpus.dataset.map(
        function, batched=True, num_proc=processes if processes > 1 else None,
        # SentencePiece processors pickle (as their model bytes) to reach worker processes;
        # the explicit fingerprint spares datasets from hashing them.
        fn_kwargs=fn_kwargs, with_indices=with_indices,
        remove_columns=list(corpus.dataset.column_names), features=_token_features(),
        new_fingerprint=name, cache_file_name=str(cache_dir / f"{name}.arrow"), desc=desc)
    _write_token_arrays(encoded, folder, desc)
    del encoded
    # The map's Arrow files (one a process) duplicate the .npy arrays: free the disk.
    for path in cache_dir.glob(f"{name}*.arrow"):
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


def _sample_columns(batch: dict[str, list[str]], indices: list[int], tokenizers: Tokenizers,
                    sampling: SubwordSamplingConfig, seed: int, max_len: int
                    ) -> dict[str, list[list[int]]]:
    """`datasets.map` function: {"src", "tgt"} sentences -> {"src_ids", "tgt_ids"}, one random
    segmentation each; each map batch draws from its own seed (from `seed` and its first row),
    so batches are not cut alike."""
    src_ids, tgt_ids = _sampled_ids(tokenizers, batch["src"], batch["tgt"], sampling,
                                    seed * 1_000_003 + (indices[0] if indices else 0), max_len)
    return {"src_ids": src_ids, "tgt_ids": tgt_ids}


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
