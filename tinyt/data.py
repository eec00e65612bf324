"""Parallel corpora: loading splits, caching token ids, and length-bucketed token batches.

Flow: `load_split` (raw sentence pairs, from the hub or local files) -> `tokenize` (compact
id arrays, cached in the run directory) -> `make_batches` (lists of sentence indices, a token
budget each) -> `collate` (padded tensors for the model).
"""

from __future__ import annotations

import gzip
import hashlib
import json
import zlib
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm import tqdm

from tinyt.config import DataConfig
from tinyt.errors import TinytError
from tinyt.tokenizer import BOS_ID, EOS_ID, PAD_ID, Tokenizers


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


def _load_hub(config: DataConfig, name: str) -> ParallelText:
    import datasets  # slow to import; only the hub path needs it at this point

    label = f"hub dataset {config.hub_name}" + (f" ({config.hub_config})" if config.hub_config
                                                 else "") + f" split {name!r}"
    try:
        table = datasets.load_dataset(config.hub_name, config.hub_config, split=name)
    except Exception as exc:  # network, missing dataset or split: all end the same way
        reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]
        raise TinytError(f"cannot load {label}: {reason}. Offline? Point data.dir at a folder "
                         "with the corpus files (e.g. make train DATA=../shared/data/multi30k)"
                         ) from None
    return _pairs_from_table(table, config, label)


def _pairs_from_table(table, config: DataConfig, label: str) -> ParallelText:
    columns = list(table.column_names)
    if config.translation_field is not None:
        if config.translation_field not in columns:
            raise TinytError(f"{label} has no field {config.translation_field!r} "
                             f"(data.translation_field); it has {', '.join(columns)}")
        rows = table[config.translation_field]
        keys = rows[0].keys() if rows else []
        for want in (config.source_field, config.target_field):
            if rows and want not in keys:
                raise TinytError(f"{label}: {config.translation_field!r} has no language "
                                 f"{want!r}; it has {', '.join(keys)}")
        src = [r[config.source_field] for r in rows]
        tgt = [r[config.target_field] for r in rows]
    else:
        for want, key in ((config.source_field, "src"), (config.target_field, "tgt")):
            if want not in columns:
                raise TinytError(f"{label} has no field {want!r} (data.{key}_lang or "
                                 f"data.{key}_field); it has {', '.join(columns)}")
        src, tgt = table[config.source_field], table[config.target_field]
    src = ["" if s is None else str(s) for s in src]
    tgt = ["" if t is None else str(t) for t in tgt]
    return ParallelText(src, tgt, label)


def _find_file(directory: Path, stem: str, what: str) -> Path:
    for candidate in (directory / stem, directory / f"{stem}.gz"):
        if candidate.is_file():
            return candidate
    raise TinytError(f"{what} file {directory / stem}[.gz] not found; check data.dir, the "
                     "split names in data.files and the language codes")


def _read_lines(path: Path) -> list[str]:
    """Lines split on '\\n' only: str.splitlines would also split on U+2028, U+0085 etc.,
    which occur inside real sentences and would break the alignment of the two files."""
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as f:
            data = f.read()
    except (OSError, EOFError, zlib.error) as exc:
        raise TinytError(f"cannot read {path}: {exc}; check the file") from None
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = data[: exc.start].count(b"\n") + 1
        raise TinytError(f"{path}: line {line} is not valid UTF-8; re-encode the file as "
                         "UTF-8") from None
    lines = text.split("\n")
    if lines and lines[-1] == "":
        lines.pop()
    return [line.rstrip("\r") for line in lines]


def _load_local(config: DataConfig, name: str) -> ParallelText:
    directory = Path(config.dir)
    if config.format == "text":
        src_path = _find_file(directory, f"{name}.{config.src_lang}", "source")
        tgt_path = _find_file(directory, f"{name}.{config.tgt_lang}", "target")
        src, tgt = _read_lines(src_path), _read_lines(tgt_path)
        if len(src) != len(tgt):
            raise TinytError(f"{src_path} has {len(src)} lines but {tgt_path} has {len(tgt)}; "
                             "the two sides of a split must be line-aligned")
        return ParallelText(src, tgt, f"{src_path} / {tgt_path}")

    import datasets

    path = _find_file(directory, f"{name}.{config.format}", config.format.upper())
    try:
        if config.format == "jsonl":
            table = datasets.load_dataset("json", data_files=str(path), split="train")
        else:
            # quoting=3 (csv.QUOTE_NONE): quotes inside sentences are text, not CSV syntax.
            table = datasets.load_dataset("csv", data_files=str(path), split="train",
                                          delimiter="\t", quoting=3, keep_default_na=False)
    except Exception as exc:
        reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]
        raise TinytError(f"cannot parse {path} as {config.format.upper()}: {reason}") from None
    return _pairs_from_table(table, config, str(path))


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

    def src(self, i: int) -> torch.Tensor:
        return self.src_ids[self.src_offsets[i]: self.src_offsets[i + 1]]

    def tgt(self, i: int) -> torch.Tensor:
        return self.tgt_ids[self.tgt_offsets[i]: self.tgt_offsets[i + 1]]


def _flatten(ids: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
    lengths = torch.tensor([len(x) for x in ids], dtype=torch.int64)
    offsets = torch.zeros(len(ids) + 1, dtype=torch.int64)
    torch.cumsum(lengths, 0, out=offsets[1:])
    flat = torch.tensor([t for x in ids for t in x], dtype=torch.int32)
    return flat, offsets


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
    src_ids: list[list[int]] = []
    tgt_ids: list[list[int]] = []
    chunk = 4096
    with tqdm(total=len(text), desc=desc, unit="sent", leave=False, dynamic_ncols=True) as bar:
        for start in range(0, len(text), chunk):
            src_ids += tokenizers.encode_src(text.src[start: start + chunk])
            tgt_ids += tokenizers.encode_tgt(text.tgt[start: start + chunk])
            bar.update(min(chunk, len(text) - start))
    s, so = _flatten(src_ids)
    t, to = _flatten(tgt_ids)
    result = TokenizedText(s, so, t, to)
    if cache_path is not None:
        cache_path.parent.mkdir(parents=True, exist_ok=True)
        tmp = cache_path.with_suffix(".tmp")
        torch.save({"src_ids": s, "src_offsets": so, "tgt_ids": t, "tgt_offsets": to}, tmp)
        tmp.replace(cache_path)
    return result


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
    src_len, tgt_len = data.src_lengths[indices], data.tgt_lengths[indices]
    src = _gather_padded(data.src_ids, data.src_offsets[indices], src_len, int(src_len.max()) + 1)
    src[rows, src_len] = EOS_ID
    # body: y1 … yn then padding, one column wider than the longest target
    body = _gather_padded(data.tgt_ids, data.tgt_offsets[indices], tgt_len, int(tgt_len.max()) + 1)
    tgt_in = torch.cat([torch.full((rows.numel(), 1), BOS_ID, dtype=torch.long), body[:, :-1]], 1)
    body[rows, tgt_len] = EOS_ID
    return Batch(src, tgt_in, body, int(tgt_len.sum()) + rows.numel())
