"""Parallel corpora, from the files people have to the padded tensors the model reads.

The data flows one way, source files -> pairs -> token ids -> batches, one module a step:

    files.py      local corpus files: text (plain or .gz), TSV, JSONL; line-aligned reading
    hub.py        Hugging Face hub datasets, and finding out that the hub is out of reach
    sources.py    `load_split`: one split's pairs in memory (`ParallelText`), from files, the
                  hub, or the run directory (held-out splits)
    corpus.py     `open_corpus`: a split of any size as a memory-mapped Arrow table (`Corpus`)
    pairs.py      `open_training_data`: the training split made fit to train on (normalisation,
                  duplicates dropped, valid/test held out, RUN/data/split.json)
    token_ids.py  `tokenize`, `tokenize_corpus`: pairs -> flat id arrays (`TokenizedText`);
                  `sample_corpus`, `sample_token_ids`: one random segmentation a pair
                  (subword regularization, tokenizer.sampling), cached an epoch at a time
    batches.py    `trainable_indices`, `make_batches`, `collate`: ids -> padded `Batch`es
    streaming.py  `stream_corpus`: pairs -> ids -> batches one window at a time
                  (`StreamingCorpus`, data.streaming)

Small splits (validation, test): `load_split` (from the hub or local files) ->
`normalize_text` -> `tokenize` (compact id arrays, cached in the run directory) ->
`make_batches` (lists of sentence indices, a token budget each) -> `collate`.

The training split, of any size, larger than memory included: `open_training_data`, which is
`open_corpus` (a memory-mapped Arrow table, cached), then exact duplicate pairs dropped
(data.dedup) and validation/test pairs held out (data.holdout, `carve`) and written into the
run directory, where `load_split` finds them again -> `tokenize_corpus` (`datasets.map` in
parallel, then memory-mapped .npy id arrays, cached) -> `trainable_indices` -> `make_batches`
-> `collate`; only the per-pair index arrays of `make_batches` (a few bytes a pair) live in
memory. With data.streaming, `open_training_data` returns `stream_corpus`'s
`StreamingCorpus`, whose `batches` tokenizes and batches the stream a window of
data.stream_buffer pairs at a time.

The names below are the package's interface: import them from `tinyt.data`. Names with a
leading underscore belong to the package's modules, which share them with one another only.
The readers of files.py and hub.py are called through their module (`hub._load_hub_table`), so
a test that fakes the disk or the hub patches the one module that defines the reader.
"""

from tinyt.data.batches import Batch, collate, make_batches, trainable_indices
from tinyt.data.corpus import Corpus, open_corpus
from tinyt.data.pairs import (Carving, carve, describe_split_record, held_out_home,
                              normalize_text, open_training_data, read_split_record)
from tinyt.data.sources import HELD_OUT_DIR, ParallelText, load_split, split_name
from tinyt.data.streaming import StreamingCorpus, stream_corpus
from tinyt.data.token_ids import (TokenizedText, sample_corpus, sample_token_ids, tokenize,
                                  tokenize_corpus)

__all__ = [
    # sources.py
    "ParallelText", "load_split", "split_name", "HELD_OUT_DIR",
    # corpus.py
    "Corpus", "open_corpus",
    # pairs.py
    "open_training_data", "normalize_text", "carve", "Carving", "read_split_record",
    "describe_split_record", "held_out_home",
    # token_ids.py
    "TokenizedText", "tokenize", "tokenize_corpus", "sample_corpus", "sample_token_ids",
    # batches.py
    "trainable_indices", "make_batches", "Batch", "collate",
    # streaming.py
    "StreamingCorpus", "stream_corpus",
]
