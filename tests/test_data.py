"""tinyt.data: loading local splits (text, TSV, JSONL), token batches, collation, id cache."""

from __future__ import annotations

import gzip
import json

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from tinyt.config import DataConfig, TokenizerConfig
from tinyt.data import (ParallelText, TokenizedText, collate, load_split, make_batches,
                        split_name, tokenize, trainable_indices)
from tinyt.errors import TinytError
from tinyt.tokenizer import BOS_ID, EOS_ID, PAD_ID, train_or_load


def text_config(directory, **kwargs) -> DataConfig:
    config = DataConfig(dir=str(directory), **kwargs)
    config.validate()
    return config


def write_bytes(path, data: bytes, gz: bool = False):
    """Write `data` to `path`; gzipped to `path` + '.gz' (unless it already ends so)."""
    if gz:
        if path.suffix != ".gz":
            path = path.with_name(path.name + ".gz")
        with gzip.open(path, "wb") as f:
            f.write(data)
    else:
        path.write_bytes(data)
    return path


# -- local plain text and gzipped text ------------------------------------------------------


def test_load_plain_text_split(small_corpus, corpus_dir, corpus_lines):
    assert (small_corpus / "val.de").is_file()  # plain, not gzipped
    text = load_split(text_config(small_corpus), "valid")
    assert isinstance(text, ParallelText)
    assert len(text) == 50
    assert text.src == corpus_lines(corpus_dir, "val", "de", 50)
    assert text.tgt == corpus_lines(corpus_dir, "val", "en", 50)
    assert "val.de" in text.name and "val.en" in text.name


def test_load_gzipped_split(small_corpus, corpus_dir, corpus_lines):
    assert (small_corpus / "train.de.gz").is_file() and not (small_corpus / "train.de").exists()
    text = load_split(text_config(small_corpus), "train")
    assert len(text) == 200
    assert text.src == corpus_lines(corpus_dir, "train", "de", 200)
    assert text.tgt == corpus_lines(corpus_dir, "train", "en", 200)
    assert all("\n" not in s and not s.endswith("\r") for s in text.src + text.tgt)


def test_load_real_corpus_directly(corpus_dir):
    # The shared corpus is read in place (read-only), gzipped, with the default file names.
    text = load_split(text_config(corpus_dir), "test")
    assert len(text) == 1000
    assert text.src[0] and text.tgt[0]


def test_mixed_plain_and_gzipped_sides(tmp_path):
    write_bytes(tmp_path / "s.de", "Ein Hund.\nZwei Katzen.\n".encode())
    write_bytes(tmp_path / "s.en.gz", "A dog.\nTwo cats.\n".encode(), gz=True)
    text = load_split(text_config(tmp_path), "s")
    assert text.src == ["Ein Hund.", "Zwei Katzen."]
    assert text.tgt == ["A dog.", "Two cats."]


def test_other_language_pair(corpus_dir):
    # Any language codes work: files are {name}.{lang}.
    text = load_split(text_config(corpus_dir, src_lang="en", tgt_lang="fr"), "valid")
    assert len(text) == 1014
    assert "val.en" in text.name and "val.fr" in text.name


def test_role_and_split_names(small_corpus):
    config = text_config(small_corpus)
    assert len(load_split(config, "test")) == 50
    # A split name that is not a role is used as given.
    assert load_split(config, "test_2016_flickr").src == load_split(config, "test").src


def test_crlf_and_missing_final_newline(tmp_path):
    write_bytes(tmp_path / "s.de", b"eins\r\nzwei\r\ndrei")
    write_bytes(tmp_path / "s.en", b"one\ntwo\nthree\n")
    text = load_split(text_config(tmp_path), "s")
    assert text.src == ["eins", "zwei", "drei"]
    assert text.tgt == ["one", "two", "three"]


def test_empty_lines_keep_alignment(tmp_path):
    write_bytes(tmp_path / "s.de", b"eins\n\ndrei\n")
    write_bytes(tmp_path / "s.en", b"one\ntwo\n\n")
    text = load_split(text_config(tmp_path), "s")
    assert text.src == ["eins", "", "drei"]
    assert text.tgt == ["one", "two", ""]


@pytest.mark.parametrize("separator", ["\u2028", "\u2029", "\x85", "\x0b", "\x0c", "\x1c",
                                       "\x1e"])
def test_unicode_line_separators_do_not_break_alignment(tmp_path, separator):
    src = ["Erster Satz.", f"Ein{separator}zweiter Satz.", "Dritter Satz."]
    tgt = ["First sentence.", "A second sentence.", "Third sentence."]
    write_bytes(tmp_path / "s.de", "".join(s + "\n" for s in src).encode("utf-8"))
    write_bytes(tmp_path / "s.en", "".join(t + "\n" for t in tgt).encode("utf-8"), gz=True)
    text = load_split(text_config(tmp_path), "s")
    assert text.src == src
    assert text.tgt == tgt


# -- TSV and JSONL ------------------------------------------------------------------------


def test_tsv_split(tmp_path):
    rows = [
        "de\ten",
        'Ein "Hund" läuft über die Wiese.\tA "dog" runs across the meadow.',
        "Ein Satz ohne Tabulator",  # a tab-free line: no target column
        "Ein \"unbalanced quote.\tAn \"unbalanced quote.",
        "Zwei Frauen.\tTwo women.",
    ]
    (tmp_path / "val.tsv").write_text("\n".join(rows) + "\n", encoding="utf-8")
    text = load_split(text_config(tmp_path, format="tsv"), "valid")
    assert text.src == ['Ein "Hund" läuft über die Wiese.', "Ein Satz ohne Tabulator",
                        'Ein "unbalanced quote.', "Zwei Frauen."]
    assert text.tgt == ['A "dog" runs across the meadow.', "", 'An "unbalanced quote.',
                        "Two women."]
    assert "val.tsv" in text.name


def test_tsv_custom_fields_and_gzip(tmp_path):
    rows = ["id\tsource\ttarget", "1\tHallo Welt.\tHello world.", "2\tNA\tnull", "3\t\"\"\tx"]
    write_bytes(tmp_path / "val.tsv.gz", ("\n".join(rows) + "\n").encode(), gz=True)
    config = text_config(tmp_path, format="tsv", src_field="source", tgt_field="target")
    text = load_split(config, "valid")
    # NA/null are words here, not missing values; quotes are text.
    assert text.src == ["Hallo Welt.", "NA", '""']
    assert text.tgt == ["Hello world.", "null", "x"]


def test_tsv_missing_column(tmp_path):
    (tmp_path / "val.tsv").write_text("de\tfr\nHallo\tBonjour\n", encoding="utf-8")
    with pytest.raises(TinytError) as info:
        load_split(text_config(tmp_path, format="tsv"), "valid")
    assert "'en'" in str(info.value) and "val.tsv" in str(info.value)


def test_jsonl_split(tmp_path):
    rows = [{"de": 'Ein "Hund".', "en": 'A "dog".', "id": 1},
            {"de": "Zeile\u2028mit Trenner\tund Tab", "en": "line\twith tab", "id": 2},
            {"de": "Drei", "en": "Three", "id": 3}]
    (tmp_path / "val.jsonl").write_text(
        "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    text = load_split(text_config(tmp_path, format="jsonl"), "valid")
    assert text.src == [r["de"] for r in rows]
    assert text.tgt == [r["en"] for r in rows]


def test_jsonl_translation_field(tmp_path):
    rows = [{"translation": {"de": "Hallo", "en": "Hello"}},
            {"translation": {"de": "Tschüss", "en": "Bye"}}]
    write_bytes(tmp_path / "val.jsonl.gz",
                "".join(json.dumps(r) + "\n" for r in rows).encode(), gz=True)
    text = load_split(text_config(tmp_path, format="jsonl", translation_field="translation"),
                      "valid")
    assert text.src == ["Hallo", "Tschüss"] and text.tgt == ["Hello", "Bye"]


def test_jsonl_missing_file(tmp_path):
    with pytest.raises(TinytError, match=r"val\.jsonl"):
        load_split(text_config(tmp_path, format="jsonl"), "valid")


# -- errors -------------------------------------------------------------------------------


def test_unequal_line_counts_name_both_files(tmp_path):
    write_bytes(tmp_path / "s.de", b"a\nb\nc\n")
    write_bytes(tmp_path / "s.en", b"a\nb\n", gz=True)
    with pytest.raises(TinytError) as info:
        load_split(text_config(tmp_path), "s")
    message = str(info.value)
    assert str(tmp_path / "s.de") in message
    assert str(tmp_path / "s.en.gz") in message
    assert "3" in message and "2" in message


def test_missing_file(small_corpus):
    (small_corpus / "val.en").unlink()
    with pytest.raises(TinytError) as info:
        load_split(text_config(small_corpus), "valid")
    assert "val.en" in str(info.value)


def test_missing_split(small_corpus):
    with pytest.raises(TinytError, match="test_2017_flickr"):
        load_split(text_config(small_corpus), "test_2017_flickr")


@pytest.mark.parametrize("gz", [False, True])
def test_invalid_utf8_names_the_line(tmp_path, gz):
    write_bytes(tmp_path / "s.de", b"eins\nzwei\ndr\xe4i\nvier\n", gz=gz)
    write_bytes(tmp_path / "s.en", b"one\ntwo\nthree\nfour\n")
    with pytest.raises(TinytError) as info:
        load_split(text_config(tmp_path), "s")
    message = str(info.value)
    assert "line 3" in message
    assert "s.de" in message and "UTF-8" in message


def test_truncated_gzip(tmp_path):
    data = gzip.compress(b"".join(b"Zeile %d\n" % i for i in range(500)))
    write_bytes(tmp_path / "s.de.gz", data[: len(data) // 2])
    write_bytes(tmp_path / "s.en", b"".join(b"line %d\n" % i for i in range(500)))
    with pytest.raises(TinytError, match=r"s\.de\.gz"):
        load_split(text_config(tmp_path), "s")


def test_plain_file_named_gz(tmp_path):
    write_bytes(tmp_path / "s.de.gz", b"not gzip at all\n")
    write_bytes(tmp_path / "s.en", b"x\n")
    with pytest.raises(TinytError, match=r"s\.de\.gz"):
        load_split(text_config(tmp_path), "s")


def test_corrupt_gzip_stream(tmp_path):
    data = bytearray(gzip.compress(b"".join(b"Zeile %d\n" % i for i in range(2000))))
    data[10] ^= 0x5A  # first byte of the deflate stream: invalid block type
    write_bytes(tmp_path / "s.de.gz", bytes(data))
    write_bytes(tmp_path / "s.en", b"x\n")
    with pytest.raises(TinytError, match=r"s\.de\.gz"):
        load_split(text_config(tmp_path), "s")


# -- split names --------------------------------------------------------------------------


def test_split_name_local_roles(tmp_path):
    config = text_config(tmp_path, files={"train": "tr", "valid": "dev", "test": "tst"})
    assert split_name(config, "train") == "tr"
    assert split_name(config, "valid") == "dev"
    assert split_name(config, "test") == "tst"
    assert split_name(config, "test_2017_flickr") == "test_2017_flickr"
    assert split_name(config, "validation") == "validation"


def test_split_name_hub_roles():
    config = DataConfig()  # no dir: the hub's split names
    assert split_name(config, "train") == "train"
    assert split_name(config, "valid") == "validation"
    assert split_name(config, "test") == "test"
    assert split_name(config, "test_2018") == "test_2018"


def test_split_name_without_test_role(tmp_path):
    config = text_config(tmp_path, files={"train": "a", "valid": "b"})
    assert split_name(config, "test") == "test"


# -- tokenized data, batches, collation -----------------------------------------------------


@pytest.fixture(scope="module")
def corpus_2000(corpus_dir, corpus_lines):
    src = corpus_lines(corpus_dir, "train", "de", 2000)
    tgt = corpus_lines(corpus_dir, "train", "en", 2000)
    return ParallelText(src, tgt, "train[:2000]")


@pytest.fixture(scope="module")
def tokenizers(corpus_2000, tmp_path_factory):
    return train_or_load(TokenizerConfig(vocab_size=500), corpus_2000.src, corpus_2000.tgt,
                         tmp_path_factory.mktemp("tok"))


@pytest.fixture(scope="module")
def data_2000(corpus_2000, tokenizers) -> TokenizedText:
    return tokenize(corpus_2000, tokenizers)


def synthetic(src_lengths, tgt_lengths) -> TokenizedText:
    """Token ids 4..: sentence i's tokens are all 4 + i % 100, so rows are recognisable."""
    def flat(lengths):
        ids = [[4 + i % 100] * n for i, n in enumerate(lengths)]
        offsets = torch.zeros(len(ids) + 1, dtype=torch.int64)
        torch.cumsum(torch.tensor(lengths, dtype=torch.int64), 0, out=offsets[1:])
        return torch.tensor([t for x in ids for t in x], dtype=torch.int32), offsets
    s, so = flat(src_lengths)
    t, to = flat(tgt_lengths)
    return TokenizedText(s, so, t, to)


def test_tokenized_shapes(data_2000, corpus_2000, tokenizers):
    assert len(data_2000) == 2000
    assert data_2000.src_ids.dtype == torch.int32 and data_2000.src_offsets.dtype == torch.int64
    assert data_2000.src_offsets[0] == 0 and data_2000.src_offsets[-1] == data_2000.src_ids.numel()
    assert data_2000.src(7).tolist() == tokenizers.encode_src([corpus_2000.src[7]])[0]
    assert data_2000.tgt(1999).tolist() == tokenizers.encode_tgt([corpus_2000.tgt[1999]])[0]
    specials = torch.tensor([PAD_ID, BOS_ID, EOS_ID], dtype=torch.int32)
    for ids in (data_2000.src_ids, data_2000.tgt_ids):  # no <pad>/<bos>/<eos> in stored ids
        assert not torch.isin(ids, specials).any()


def check_batches(data, indices, batches, budget):
    seen = torch.cat(batches).tolist() if batches else []
    assert sorted(seen) == sorted(indices.tolist())  # every index exactly once
    for batch in batches:
        assert batch.numel() >= 1
        n = batch.numel()
        longest = max(int((data.src_lengths[batch] + 1).max()),
                      int((data.tgt_lengths[batch] + 1).max()))
        assert n == 1 or n * longest <= budget, (n, longest, budget)


@pytest.mark.parametrize("budget", [64, 512, 4096])
def test_make_batches_real(data_2000, budget):
    indices = torch.arange(len(data_2000))
    for generator in (None, torch.Generator().manual_seed(3)):
        batches = make_batches(data_2000, indices, budget, generator)
        check_batches(data_2000, indices, batches, budget)


def test_make_batches_subset_of_indices(data_2000):
    indices = trainable_indices(data_2000, 20)
    assert 0 < indices.numel() < len(data_2000)
    batches = make_batches(data_2000, indices, 300, torch.Generator().manual_seed(0))
    check_batches(data_2000, indices, batches, 300)


def test_make_batches_overlong_pair_alone():
    data = synthetic([3, 50, 2, 4], [2, 60, 3, 1])
    batches = make_batches(data, torch.arange(4), 16)
    check_batches(data, torch.arange(4), batches, 16)
    assert [b.tolist() for b in batches if 1 in b.tolist()] == [[1]]


def test_make_batches_empty():
    assert make_batches(synthetic([1], [1]), torch.tensor([], dtype=torch.long), 100) == []


def test_make_batches_seeds(data_2000):
    indices = torch.arange(len(data_2000))

    def run(seed):
        gen = None if seed is None else torch.Generator().manual_seed(seed)
        return [b.tolist() for b in make_batches(data_2000, indices, 512, gen)]

    assert run(5) == run(5)
    assert run(5) != run(6)
    assert run(None) == run(None)
    # The batches themselves (not only their order) differ between epochs' seeds.
    assert sorted(map(sorted, run(5))) != sorted(map(sorted, run(6)))


@settings(max_examples=150, deadline=None)
@given(lengths=st.lists(st.tuples(st.integers(0, 40), st.integers(0, 40)), min_size=1,
                        max_size=120),
       budget=st.integers(8, 300), seed=st.one_of(st.none(), st.integers(0, 2 ** 31)))
def test_make_batches_property(lengths, budget, seed):
    data = synthetic([s for s, _ in lengths], [t for _, t in lengths])
    indices = torch.arange(len(lengths))
    gen = None if seed is None else torch.Generator().manual_seed(seed)
    check_batches(data, indices, make_batches(data, indices, budget, gen), budget)


def padding_share(data, batches) -> float:
    real = padded = 0
    for idx in batches:
        batch = collate(data, idx)
        for tensor in (batch.src, batch.tgt_out):
            real += int((tensor != PAD_ID).sum())
            padded += int((tensor == PAD_ID).sum())
    return padded / (real + padded)


def test_padding_share_is_small(data_2000):
    indices = trainable_indices(data_2000, 100)
    batches = make_batches(data_2000, indices, 1024, torch.Generator().manual_seed(1))
    share = padding_share(data_2000, batches)
    assert share < 0.15, share
    # Far better than batching in corpus order.
    naive = list(torch.arange(len(data_2000)).split(len(data_2000) // len(batches)))
    assert share < padding_share(data_2000, naive) / 2


def test_collate(data_2000):
    idx = torch.tensor([5, 17, 3, 1999, 42])
    batch = collate(data_2000, idx)
    src_len = (data_2000.src_lengths[idx] + 1).tolist()
    tgt_len = (data_2000.tgt_lengths[idx] + 1).tolist()
    assert batch.src.shape == (5, max(src_len))
    assert batch.tgt_in.shape == batch.tgt_out.shape == (5, max(tgt_len))
    assert batch.src.dtype == batch.tgt_in.dtype == batch.tgt_out.dtype == torch.long
    assert batch.n_tokens == sum(tgt_len) == int((batch.tgt_out != PAD_ID).sum())
    for row, i in enumerate(idx.tolist()):
        s, t = data_2000.src(i).tolist(), data_2000.tgt(i).tolist()
        n_s, n_t = len(s), len(t)
        assert batch.src[row, :n_s].tolist() == s
        assert batch.src[row, n_s] == EOS_ID
        assert (batch.src[row, n_s + 1:] == PAD_ID).all()
        assert batch.tgt_in[row, 0] == BOS_ID
        assert batch.tgt_in[row, 1: n_t + 1].tolist() == t
        assert (batch.tgt_in[row, n_t + 1:] == PAD_ID).all()
        assert batch.tgt_out[row, :n_t].tolist() == t
        assert batch.tgt_out[row, n_t] == EOS_ID
        assert (batch.tgt_out[row, n_t + 1:] == PAD_ID).all()
        # Teacher forcing: the input is the output shifted right by one.
        assert batch.tgt_in[row, 1: n_t + 1].tolist() == batch.tgt_out[row, :n_t].tolist()
    real = batch.tgt_in[:, 1:] != PAD_ID
    assert torch.equal(batch.tgt_in[:, 1:][real], batch.tgt_out[:, :-1][real])
    for tensor in (batch.src, batch.tgt_in, batch.tgt_out):  # padding only on the right
        assert not ((tensor == PAD_ID).int().diff(dim=1) < 0).any()


def test_collate_empty_sentence():
    data = synthetic([0, 3], [2, 0])
    batch = collate(data, torch.tensor([0, 1]))
    assert batch.src.tolist() == [[EOS_ID, PAD_ID, PAD_ID, PAD_ID], [5, 5, 5, EOS_ID]]
    assert batch.tgt_in.tolist() == [[BOS_ID, 4, 4], [BOS_ID, PAD_ID, PAD_ID]]
    assert batch.tgt_out.tolist() == [[4, 4, EOS_ID], [EOS_ID, PAD_ID, PAD_ID]]
    assert batch.n_tokens == 4


def test_trainable_indices():
    data = synthetic([0, 3, 10, 5, 1], [2, 0, 3, 11, 1])
    assert trainable_indices(data, 10).tolist() == [2, 4]
    assert trainable_indices(data, 11).tolist() == [2, 3, 4]


# -- the id cache -------------------------------------------------------------------------


def test_tokenize_cache_is_reused(corpus_2000, tokenizers, tmp_path, monkeypatch):
    text = ParallelText(corpus_2000.src[:300], corpus_2000.tgt[:300], "slice")
    first = tokenize(text, tokenizers, cache_dir=tmp_path / "cache")
    files = list((tmp_path / "cache").glob("ids-*.pt"))
    assert len(files) == 1
    mtime = files[0].stat().st_mtime_ns

    def no_encoding(*args, **kwargs):
        raise AssertionError("the tokenizer was called although the ids are cached")

    monkeypatch.setattr(tokenizers, "encode_src", no_encoding)
    monkeypatch.setattr(tokenizers, "encode_tgt", no_encoding)
    second = tokenize(text, tokenizers, cache_dir=tmp_path / "cache")
    for name in ("src_ids", "src_offsets", "tgt_ids", "tgt_offsets"):
        assert torch.equal(getattr(first, name), getattr(second, name)), name
    assert files[0].stat().st_mtime_ns == mtime
    monkeypatch.undo()
    # Uncached, the ids are the same too.
    third = tokenize(text, tokenizers)
    assert torch.equal(third.tgt_ids, first.tgt_ids)


def test_tokenize_cache_depends_on_text(corpus_2000, tokenizers, tmp_path):
    a = ParallelText(corpus_2000.src[:20], corpus_2000.tgt[:20], "a")
    b = ParallelText(corpus_2000.src[:20], corpus_2000.tgt[1:21], "b")
    ta = tokenize(a, tokenizers, cache_dir=tmp_path)
    tb = tokenize(b, tokenizers, cache_dir=tmp_path)
    assert len(list(tmp_path.glob("ids-*.pt"))) == 2
    assert torch.equal(ta.src_ids, tb.src_ids) and not torch.equal(ta.tgt_ids, tb.tgt_ids)


def test_tokenize_damaged_cache_is_rebuilt(corpus_2000, tokenizers, tmp_path):
    text = ParallelText(corpus_2000.src[:20], corpus_2000.tgt[:20], "a")
    good = tokenize(text, tokenizers, cache_dir=tmp_path)
    (path,) = tmp_path.glob("ids-*.pt")
    path.write_bytes(b"garbage")
    again = tokenize(text, tokenizers, cache_dir=tmp_path)
    assert torch.equal(good.src_ids, again.src_ids)
    assert path.stat().st_size > 100  # rewritten


def test_tokenize_empty_text(tokenizers, tmp_path):
    data = tokenize(ParallelText([], [], "empty"), tokenizers, cache_dir=tmp_path)
    assert len(data) == 0
    assert make_batches(data, torch.arange(0), 100) == []


# -- the hub path (the hub is unreachable here: its failure, and its table handling) -------


def test_hub_unreachable_is_a_clear_error(hub_offline):
    with pytest.raises(TinytError, match=r"cannot load hub dataset bentrevett/multi30k.*data\.dir"):
        load_split(DataConfig(), "train")


def test_hub_style_tables_flat_and_nested():
    import datasets

    from tinyt.data.sources import _pairs_from_table

    flat = datasets.Dataset.from_dict({"de": ["Ein Hund.", None], "en": ["A dog.", "Two."]})
    pairs = _pairs_from_table(flat, DataConfig(), "flat")
    assert pairs.src == ["Ein Hund.", ""] and pairs.tgt == ["A dog.", "Two."]
    nested = datasets.Dataset.from_dict(
        {"translation": [{"de": "Ein Hund.", "en": "A dog."}, {"de": "Zwei.", "en": "Two."}]})
    config = DataConfig(translation_field="translation")
    pairs = _pairs_from_table(nested, config, "nested")
    assert pairs.src == ["Ein Hund.", "Zwei."] and pairs.tgt == ["A dog.", "Two."]
    with pytest.raises(TinytError, match="no language 'fr'"):
        _pairs_from_table(nested, DataConfig(translation_field="translation", tgt_lang="fr"), "x")
    with pytest.raises(TinytError, match="no field 'fr'.*it has de, en"):
        _pairs_from_table(flat, DataConfig(tgt_lang="fr"), "x")


# -- corpora as people have them: headerless TSV, byte-order marks, normalisation, duplicates,
#    held-out splits ------------------------------------------------------------------------

from tinyt.config import ConfigError, HoldoutConfig, config_from_dict  # noqa: E402
from tinyt.data import (HELD_OUT_DIR, normalize_text, open_corpus,  # noqa: E402
                        open_training_data, read_split_record)

BOM = "\ufeff"


def tatoeba_rows(groups: int = 60) -> list[str]:
    """Lines shaped like Tatoeba's cmn.txt: English, Chinese, attribution, no header; every
    third English sentence has a second translation, every fifth pair is repeated exactly, and
    one pair differs from another only by full-width punctuation and spacing (equal after
    NFKC)."""
    rows = []
    for i in range(groups):
        rows.append(f"Sentence number {i}.\t第{i}句。\tCC-BY 2.0 (France) #{i}")
        if i % 3 == 0:
            rows.append(f"Sentence number {i}.\t这是第{i}句。\tCC-BY 2.0 (France) #{i}b")
        if i % 5 == 0:
            rows.append(rows[-1])
    rows.append("Sentence  number 7 !\t第7句！\tCC-BY #dup-by-nfkc")
    rows.append("Sentence number 7 !\t第7句!\tCC-BY #dup-by-nfkc")
    return rows


def write_tatoeba(directory, rows, name="cmn-eng", bom=True, gz=True):
    directory.mkdir(parents=True, exist_ok=True)
    data = ((BOM if bom else "") + "\n".join(rows) + "\n").encode("utf-8")
    return write_bytes(directory / f"{name}.tsv", data, gz=gz)


def tatoeba_config(directory, holdout=None, **data) -> DataConfig:
    files = {"train": "cmn-eng"} if holdout else {"train": "cmn-eng", "valid": "cmn-eng"}
    raw = {"src_lang": "en", "tgt_lang": "zh", "dir": str(directory), "format": "tsv",
           "files": files, "columns": ["en", "zh", "attribution"], "hub_name": "", **data}
    if holdout is not None:
        raw["holdout"] = holdout
    return config_from_dict({"data": raw}).data


def sources_of(corpus) -> list[str]:
    return corpus.dataset["src"]


def key(sentence: str) -> str:
    import unicodedata

    return " ".join(unicodedata.normalize("NFKC", sentence).split())


def test_headerless_tsv_with_extra_columns_and_bom(tmp_path):
    rows = ["Hi.\t嗨。\tCC-BY #1", "Run.\t你用跑的。\tCC-BY #2", 'Say "cheese".\t"茄子"。\tx']
    write_tatoeba(tmp_path, rows)
    for columns in (["en", "zh", "attribution"], ["en", "zh"]):
        config = tatoeba_config(tmp_path, columns=columns)
        text = load_split(config, "train")
        assert text.src == ["Hi.", "Run.", 'Say "cheese".'] and text.src[0][0] != BOM
        assert text.tgt == ["嗨。", "你用跑的。", '"茄子"。']
        corpus = open_corpus(config, "train", tmp_path / f"cache-{len(columns)}")
        assert corpus.dataset["src"] == text.src and corpus.dataset["tgt"] == text.tgt
    # The column names may put the languages anywhere; other names are ignored.
    config = tatoeba_config(tmp_path, columns=["source", "target", "note"], src_field="target",
                            tgt_field="source", src_lang="zh", tgt_lang="en")
    assert load_split(config, "train").src[0] == "嗨。"


def test_tsv_with_a_header_still_reads_its_header(tmp_path):
    write_bytes(tmp_path / "val.tsv", (BOM + "de\ten\nHallo.\tHello.\n").encode("utf-8"))
    text = load_split(text_config(tmp_path, format="tsv"), "valid")
    assert text.src == ["Hallo."] and text.tgt == ["Hello."]


def test_tsv_with_fewer_columns_than_named(tmp_path):
    write_tatoeba(tmp_path, ["Hi.\t嗨。", "Run.\t跑。"])
    config = tatoeba_config(tmp_path)
    for call in (lambda: load_split(config, "train"),
                 lambda: open_corpus(config, "train", tmp_path / "cache")):
        with pytest.raises(TinytError) as info:
            call()
        message = str(info.value)
        assert "2 tab-separated column(s)" in message and "names 3" in message
        assert "cmn-eng.tsv.gz" in message and "\n" not in message


@pytest.mark.parametrize("change, words", [
    ({"format": "jsonl"}, ["data.columns", "data.format"]),
    ({"columns": ["english", "chinese"]}, ["data.columns", "'en'"]),
    ({"columns": ["en", "zh", "en"]}, ["data.columns", "distinct"]),
    ({"columns": "en zh"}, ["data.columns", "must be a list"]),
    ({"normalize": "bogus"}, ["data.normalize", "nfkc, nfc, none"]),
    ({"holdout": {"valid": 0, "test": 0}}, ["data.holdout", "holds nothing out"]),
    ({"holdout": {"valid": -1, "test": 5}}, ["data.holdout", ">= 0"]),
    ({"holdout": {"test": 5, "tset": 5}}, ["data.holdout.tset"]),
    ({"holdout": {"test": 5}, "streaming": True}, ["data.holdout", "data.streaming"]),
    ({"holdout": {"valid": 5}, "files": {"train": "cmn-eng", "valid": "dev"}},
     ["data.files", "valid", "data.holdout.valid: 0"]),
])
def test_bad_corpus_settings_are_config_errors(tmp_path, change, words):
    raw = {"src_lang": "en", "tgt_lang": "zh", "dir": str(tmp_path), "format": "tsv",
           "files": {"train": "cmn-eng"}, "columns": ["en", "zh"], "hub_name": "",
           "holdout": {"valid": 5, "test": 5}, **change}
    with pytest.raises(ConfigError) as info:
        config_from_dict({"data": raw})
    for word in words:
        assert word in str(info.value), (word, str(info.value))


def test_holdout_needs_train_only_and_valid_when_not_held_out(tmp_path):
    raw = {"dir": str(tmp_path), "files": {"train": "t"}, "holdout": {"valid": 5, "test": 5},
           "hub_splits": {"train": "train"}}
    assert config_from_dict({"data": raw}).data.held_out_roles == ["valid", "test"]
    # Only test held out: valid must come from a file.
    raw["holdout"] = {"test": 5}
    with pytest.raises(ConfigError, match="lacks valid"):
        config_from_dict({"data": raw})
    raw["files"] = raw["hub_splits"] = {"train": "t", "valid": "v"}
    assert config_from_dict({"data": raw}).data.has_split("test")


def test_byte_order_mark_dropped_from_text_and_jsonl(tmp_path):
    write_bytes(tmp_path / "val.de", (BOM + "Hallo.\nZwei.\n").encode("utf-8"), gz=True)
    write_bytes(tmp_path / "val.en", (BOM + "Hello.\nTwo.\n").encode("utf-8"))
    text = load_split(text_config(tmp_path), "valid")
    assert text.src == ["Hallo.", "Zwei."] and text.tgt == ["Hello.", "Two."]
    corpus = open_corpus(text_config(tmp_path, files={"train": "val", "valid": "val"}),
                         "train", tmp_path / "cache")
    assert corpus.dataset["src"] == ["Hallo.", "Zwei."]
    rows = [{"de": "Hallo.", "en": "Hello."}, {"de": "Zwei.", "en": "Two."}]
    write_bytes(tmp_path / "val.jsonl",
                (BOM + "".join(json.dumps(r) + "\n" for r in rows)).encode("utf-8"))
    text = load_split(text_config(tmp_path, format="jsonl"), "valid")
    assert text.src == ["Hallo.", "Zwei."]


def test_normalize_text():
    text = ParallelText(["Ｈｅｌｌｏ！ ﬁne", "e\u0301"], ["你好！", "２０２４"], "x")
    nfkc = normalize_text(text, "nfkc")
    assert nfkc.src == ["Hello! fine", "é"] and nfkc.tgt == ["你好!", "2024"]
    nfc = normalize_text(text, "nfc")
    assert nfc.src == ["Ｈｅｌｌｏ！ ﬁne", "é"] and nfc.tgt == text.tgt
    assert normalize_text(text, "none") is text


@pytest.fixture(scope="module")
def tatoeba_dir(tmp_path_factory):
    directory = tmp_path_factory.mktemp("tatoeba")
    write_tatoeba(directory, tatoeba_rows())
    return directory


def carve_into(run_dir, directory, holdout, **data):
    config = tatoeba_config(directory, holdout, **data)
    lines: list[str] = []
    corpus, valid = open_training_data(config, run_dir, report=lines.append)
    return config, corpus, valid, lines


def test_holdout_is_deterministic_disjoint_and_written(tatoeba_dir, tmp_path):
    holdout = {"valid": 6, "test": 8, "seed": 3}
    config, corpus, valid, lines = carve_into(tmp_path / "a", tatoeba_dir, holdout)
    test = load_split(config, "test", tmp_path / "a")
    assert len(valid) == 6 and len(test) == 8
    held_sources = {key(s) for s in valid.src + test.src}
    assert len(held_sources) == 14  # distinct source sentences
    training_sources = {key(s) for s in sources_of(corpus)}
    assert not held_sources & training_sources
    assert all(s and t for s, t in zip(valid.src + test.src, valid.tgt + test.tgt))
    # The same seed in another run directory: the same split, byte for byte.
    _, corpus_b, valid_b, _ = carve_into(tmp_path / "b", tatoeba_dir, holdout)
    for role in ("valid", "test"):
        assert ((tmp_path / "a" / HELD_OUT_DIR / f"{role}.jsonl").read_bytes()
                == (tmp_path / "b" / HELD_OUT_DIR / f"{role}.jsonl").read_bytes())
    assert sources_of(corpus_b) == sources_of(corpus)
    # Another seed: another split.
    config_c, _, valid_c, _ = carve_into(tmp_path / "c", tatoeba_dir, {**holdout, "seed": 4})
    assert (valid_c.src, load_split(config_c, "test", tmp_path / "c").src) != (valid.src, test.src)
    # Counted and reported: 12 exact repeats + 1 equal after NFKC and spacing.
    record = read_split_record(tmp_path / "a")
    total = len(tatoeba_rows())
    assert record["pairs"] == total and record["duplicates"] == 13
    assert record["held_out"] == {"valid": 6, "test": 8}
    assert record["train_pairs"] == len(corpus) == total - 13 - 14 - record["held_out_mates"]
    assert record["scripts"] == {"src": ["Latin"], "tgt": ["Han"]}
    assert lines == [lines[0]] and "13 exact duplicates dropped" in lines[0]
    assert "held out 6 valid + 8 test" in lines[0]


def test_training_part_keeps_one_of_each_pair(tatoeba_dir, tmp_path):
    _, corpus, _, _ = carve_into(tmp_path, tatoeba_dir, None)
    pairs = [(key(s), key(t)) for s, t in zip(corpus.dataset["src"], corpus.dataset["tgt"])]
    assert len(pairs) == len(set(pairs)) == len(tatoeba_rows()) - 13
    assert read_split_record(tmp_path)["held_out"] == {"valid": 0, "test": 0}
    # dedup off and nothing held out: the corpus as open_corpus reads it, nothing copied.
    config = tatoeba_config(tatoeba_dir, dedup=False)
    corpus, _ = open_training_data(config, tmp_path / "plain")
    assert corpus.fingerprint == open_corpus(config, "train", tmp_path / "plain" / "cache").fingerprint
    assert len(corpus) == len(tatoeba_rows())


def test_held_out_splits_are_read_back_and_resume_checks_the_corpus(tmp_path):
    directory = tmp_path / "corpus"
    write_tatoeba(directory, tatoeba_rows())
    holdout = {"valid": 5, "test": 5}
    config, corpus, valid, _ = carve_into(tmp_path / "run", directory, holdout)
    files = {p.name: p.read_bytes() for p in (tmp_path / "run" / HELD_OUT_DIR).iterdir()}
    # A resume (or another rank) reads them back and changes nothing.
    corpus_again, valid_again = open_training_data(config, tmp_path / "run", resume=True)
    assert valid_again.src == valid.src and corpus_again.fingerprint == corpus.fingerprint
    assert files == {p.name: p.read_bytes() for p in (tmp_path / "run" / HELD_OUT_DIR).iterdir()}
    # A changed corpus is refused on resume, before anything is rewritten.
    write_tatoeba(directory, tatoeba_rows()[:-5])
    with pytest.raises(TinytError, match="changed since this run was started"):
        open_training_data(config, tmp_path / "run", resume=True)
    assert files == {p.name: p.read_bytes() for p in (tmp_path / "run" / HELD_OUT_DIR).iterdir()}
    # So are changed settings.
    write_tatoeba(directory, tatoeba_rows())
    other = tatoeba_config(directory, {"valid": 5, "test": 6})
    with pytest.raises(TinytError, match="data settings changed"):
        open_training_data(other, tmp_path / "run", resume=True)
    # Without the run directory a held-out split has nowhere to come from.
    with pytest.raises(TinytError, match="held out of the training file"):
        load_split(config, "test")
    (tmp_path / "run" / HELD_OUT_DIR / "test.jsonl").unlink()
    with pytest.raises(TinytError, match="test.jsonl is missing"):
        load_split(config, "test", tmp_path / "run")


@pytest.mark.parametrize("rows, holdout, words", [
    (["Hi.\t嗨。\tx", "Run.\t跑。\tx", "Stop!\t住手!\tx"], {"valid": 2, "test": 2},
     ["2 valid + 2 test", "only 3 distinct source sentences", "lower data.holdout"]),
    ([f"Hi.\t嗨{i}。\tx" for i in range(50)], {"test": 1},
     ["only 1 distinct source sentences", "(in 50 pairs"]),
    (["Hi.\t\tx", "\t嗨。\tx", "Run.\t跑。\tx"], {"test": 1},
     ["only 1 distinct source sentences", "(in 1 pairs with text on both sides)"]),
])
def test_holdout_larger_than_the_corpus(tmp_path, rows, holdout, words):
    write_tatoeba(tmp_path / "corpus", rows)
    with pytest.raises(TinytError) as info:
        carve_into(tmp_path / "run", tmp_path / "corpus", holdout,
                   files={"train": "cmn-eng", "valid": "cmn-eng"} if "valid" not in holdout
                   else {"train": "cmn-eng"})
    message = str(info.value)
    assert "\n" not in message
    for word in words:
        assert word in message, (word, message)
    assert not (tmp_path / "run" / HELD_OUT_DIR).exists()  # nothing written


def test_empty_lines_are_never_held_out(tmp_path):
    rows = [f"S{i}.\t句{i}。\tx" for i in range(20)] + ["\t\tx", "Only English.\t\tx"]
    write_tatoeba(tmp_path / "corpus", rows[:10] + [""] * 3 + rows[10:])
    config, _, valid, _ = carve_into(tmp_path / "run", tmp_path / "corpus",
                                     {"valid": 10, "test": 9})
    test = load_split(config, "test", tmp_path / "run")
    assert all(s and t for s, t in zip(valid.src + test.src, valid.tgt + test.tgt))


def test_holdout_config_round_trip():
    config = config_from_dict({"data": {"holdout": {"test": 3}, "files": {"train": "t",
                                                                             "valid": "v"}}},
                              check_paths=False)
    assert config.data.holdout == HoldoutConfig(valid=0, test=3, seed=1)
    again = config_from_dict(config.to_dict(), check_paths=False)
    assert again == config and again.data.held_out_roles == ["test"]
