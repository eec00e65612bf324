"""The training split as people have it, made fit to train on: Unicode normalisation, exact
duplicate pairs dropped, validation and test pairs held out, and the record of what was done.

`open_training_data` is what `tinyt train` calls. In: the data config and the run directory.
Out: the pairs to train on (a `Corpus`, a `StreamingCorpus` when streaming) and the
validation `ParallelText`. The held-out splits and the record go into the run directory
(RUN/data/valid.jsonl, test.jsonl, split.json), where `load_split` and `read_split_record`
find them again. `normalize_text` also serves evaluation: it decides the text that is scored.
"""

from __future__ import annotations

import hashlib
import json
import os
import unicodedata
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from tinyt.config import DataConfig, HoldoutConfig
from tinyt.data.corpus import (_BAR_DELAY, _CHUNK_PAIRS, Corpus, _digest, _open_arrow,
                               open_corpus)
from tinyt.data.sources import (HELD_OUT_DIR, ParallelText, _check_corpus_location,
                                _read_held_out, load_split)
from tinyt.data.streaming import StreamingCorpus, stream_corpus
from tinyt.errors import TinytError
from tinyt.writing import atomic_write_text, writing


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
    `path` (atomically, as corpus.py's `_write_pairs_arrow`), a slice of `_CHUNK_PAIRS` rows at
    a time."""
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
