"""tinyt.tokenizer: SentencePiece training, fixed special ids, reuse, loading errors."""

from __future__ import annotations

import json
import shutil

import pytest

import tinyt.tokenizer as tok_mod
from tinyt.config import TokenizerConfig
from tinyt.errors import TinytError
from tinyt.tokenizer import (BOS_ID, EOS_ID, PAD_ID, UNK_ID, Tokenizers, fingerprint,
                             train_or_load)

SPECIALS = {"pad": PAD_ID, "unk": UNK_ID, "bos": BOS_ID, "eos": EOS_ID}


@pytest.fixture(scope="module")
def pairs(corpus_dir, corpus_lines):
    return (corpus_lines(corpus_dir, "train", "de", 400),
            corpus_lines(corpus_dir, "train", "en", 400))


@pytest.fixture(scope="module")
def joint_dir(pairs, tmp_path_factory):
    directory = tmp_path_factory.mktemp("joint") / "tokenizer"
    train_or_load(TokenizerConfig(vocab_size=200), *pairs, directory, seed=1)
    return directory


def check_special_ids(sp):
    assert (PAD_ID, UNK_ID, BOS_ID, EOS_ID) == (0, 1, 2, 3)
    assert sp.pad_id() == PAD_ID
    assert sp.unk_id() == UNK_ID
    assert sp.bos_id() == BOS_ID
    assert sp.eos_id() == EOS_ID
    assert sp.id_to_piece(PAD_ID) == "<pad>"
    assert sp.id_to_piece(BOS_ID) == "<s>" and sp.id_to_piece(EOS_ID) == "</s>"


def test_joint_model_files_and_ids(joint_dir, pairs):
    assert (joint_dir / "joint.model").is_file()
    assert not (joint_dir / "src.model").exists()
    assert [p.name for p in joint_dir.iterdir() if p.is_dir()] == []  # no temp folder left
    tokenizers = Tokenizers.load(joint_dir)
    assert tokenizers.src is tokenizers.tgt
    check_special_ids(tokenizers.src)
    assert tokenizers.src_vocab_size == tokenizers.tgt_vocab_size == 200
    meta = json.loads((joint_dir / "meta.json").read_text(encoding="utf-8"))
    assert meta["joint"] is True
    assert meta["special_ids"] == SPECIALS
    assert meta["config"]["vocab_size"] == 200
    assert meta["fingerprint"] == fingerprint(TokenizerConfig(vocab_size=200), *pairs)
    assert tokenizers.fingerprint == meta["fingerprint"]


def test_joint_vocabulary_covers_both_languages(joint_dir, pairs):
    tokenizers = Tokenizers.load(joint_dir)
    src, tgt = pairs
    for ids in tokenizers.encode_src(src[:50]) + tokenizers.encode_tgt(tgt[:50]):
        assert UNK_ID not in ids
        assert ids and min(ids) > EOS_ID


def test_second_call_reuses(joint_dir, pairs, monkeypatch):
    model = joint_dir / "joint.model"
    before = model.stat().st_mtime_ns, (joint_dir / "meta.json").stat().st_mtime_ns

    def no_training(*args, **kwargs):
        raise AssertionError("retrained although text and config are unchanged")

    monkeypatch.setattr(tok_mod, "_train_model", no_training)
    tokenizers = train_or_load(TokenizerConfig(vocab_size=200), *pairs, joint_dir, seed=1)
    assert (model.stat().st_mtime_ns, (joint_dir / "meta.json").stat().st_mtime_ns) == before
    assert tokenizers.src_vocab_size == 200


def test_changed_text_retrains(pairs, tmp_path):
    src, tgt = pairs
    first = train_or_load(TokenizerConfig(vocab_size=150), src, tgt, tmp_path).fingerprint
    second = train_or_load(TokenizerConfig(vocab_size=150), src[:-1], tgt[:-1], tmp_path)
    assert second.fingerprint != first
    meta = json.loads((tmp_path / "meta.json").read_text(encoding="utf-8"))
    assert meta["fingerprint"] == second.fingerprint


def test_vocab_size_change_retrains(pairs, tmp_path):
    directory = tmp_path / "tok"
    first = train_or_load(TokenizerConfig(vocab_size=200), *pairs, directory)
    assert first.src_vocab_size == 200
    old_fingerprint = first.fingerprint
    second = train_or_load(TokenizerConfig(vocab_size=120), *pairs, directory)
    assert second.src_vocab_size == 120
    assert second.fingerprint != old_fingerprint
    assert Tokenizers.load(directory).src_vocab_size == 120
    meta = json.loads((directory / "meta.json").read_text(encoding="utf-8"))
    assert meta["config"]["vocab_size"] == 120


def test_separate_vocabularies(pairs, tmp_path):
    tokenizers = train_or_load(TokenizerConfig(vocab_size=150, joint=False), *pairs, tmp_path)
    assert (tmp_path / "src.model").is_file() and (tmp_path / "tgt.model").is_file()
    assert not (tmp_path / "joint.model").exists()
    assert tokenizers.src is not tokenizers.tgt
    check_special_ids(tokenizers.src)
    check_special_ids(tokenizers.tgt)
    assert json.loads((tmp_path / "meta.json").read_text(encoding="utf-8"))["joint"] is False
    # Each model learned its own language: German words are whole pieces only in src.
    src_piece_set = {tokenizers.src.id_to_piece(i) for i in range(tokenizers.src_vocab_size)}
    tgt_piece_set = {tokenizers.tgt.id_to_piece(i) for i in range(tokenizers.tgt_vocab_size)}
    assert "▁Ein" in src_piece_set and "▁Ein" not in tgt_piece_set
    assert "▁The" in tgt_piece_set or "▁the" in tgt_piece_set
    reloaded = Tokenizers.load(tmp_path)
    assert reloaded.encode_src(["Ein Mann."]) == tokenizers.encode_src(["Ein Mann."])
    assert reloaded.encode_tgt(["A man."]) == tokenizers.encode_tgt(["A man."])


def test_bpe_model_type(pairs, tmp_path):
    tokenizers = train_or_load(TokenizerConfig(vocab_size=150, model_type="bpe"), *pairs,
                               tmp_path)
    check_special_ids(tokenizers.src)
    sentence = pairs[1][0]
    assert tokenizers.decode_tgt(tokenizers.encode_tgt([sentence])) == [sentence]


def test_small_corpus_gets_smaller_vocabulary(pairs, tmp_path):
    # A corpus too small for the requested size gives a smaller vocabulary, not a crash.
    src, tgt = pairs
    tokenizers = train_or_load(TokenizerConfig(vocab_size=5000), src[:60], tgt[:60], tmp_path)
    assert 4 < tokenizers.src_vocab_size < 5000
    check_special_ids(tokenizers.src)


def test_tiny_corpus_trains(tmp_path):
    src = ["ein Hund läuft", "eine Katze schläft", "ein Mann isst"] * 10
    tgt = ["a dog runs", "a cat sleeps", "a man eats"] * 10
    tokenizers = train_or_load(TokenizerConfig(vocab_size=5000), src, tgt, tmp_path)
    assert 4 < tokenizers.src_vocab_size < 5000


def test_no_text_is_an_error(tmp_path):
    with pytest.raises(TinytError, match="no text"):
        train_or_load(TokenizerConfig(vocab_size=100), ["", "  "], [""], tmp_path)


def test_encode_decode_round_trip(joint_dir, pairs):
    tokenizers = Tokenizers.load(joint_dir)
    src, tgt = pairs
    # Ordinary sentences (whitespace already normalised) come back unchanged.
    sentences = [s for s in src[:100] + tgt[:100] if " ".join(s.split()) == s][:150]
    assert len(sentences) > 100
    assert tokenizers.decode_tgt(tokenizers.encode_tgt(sentences)) == sentences
    assert tokenizers.src.decode(tokenizers.encode_src(sentences)) == sentences
    assert tokenizers.decode_tgt([[]]) == [""]
    assert tokenizers.encode_src([""]) == [[]]


def test_unknown_characters_map_to_unk(joint_dir):
    tokenizers = Tokenizers.load(joint_dir)
    (ids,) = tokenizers.encode_src(["Ein 漢字 Hund"])
    assert UNK_ID in ids


def test_fingerprint():
    config = TokenizerConfig(vocab_size=100)
    base = fingerprint(config, ["a b"], ["c"])
    assert base == fingerprint(TokenizerConfig(vocab_size=100), ["a b"], ["c"])
    assert base != fingerprint(TokenizerConfig(vocab_size=101), ["a b"], ["c"])
    assert base != fingerprint(config, ["a", "b"], ["c"])  # line boundaries matter
    assert base != fingerprint(config, ["a b", "c"], [])  # so do sides
    assert base != fingerprint(config, ["c"], ["a b"])


# -- loading errors -----------------------------------------------------------------------


def test_load_missing_folder(tmp_path):
    with pytest.raises(TinytError, match="tokenizer missing"):
        Tokenizers.load(tmp_path / "nope")


def test_load_folder_missing_model(joint_dir, tmp_path):
    broken = tmp_path / "tokenizer"
    shutil.copytree(joint_dir, broken)
    (broken / "joint.model").unlink()
    with pytest.raises(TinytError) as info:
        Tokenizers.load(broken)
    assert "joint.model" in str(info.value)


def test_load_folder_missing_meta(joint_dir, tmp_path):
    broken = tmp_path / "tokenizer"
    shutil.copytree(joint_dir, broken)
    (broken / "meta.json").unlink()
    with pytest.raises(TinytError, match="meta.json"):
        Tokenizers.load(broken)




@pytest.mark.parametrize("content", [
    '{"joint": tr', '{"fingerprint": "x"}', "",
    "[]", '{"joint": true}',
])
def test_load_damaged_meta(joint_dir, tmp_path, content):
    broken = tmp_path / "tokenizer"
    shutil.copytree(joint_dir, broken)
    (broken / "meta.json").write_text(content, encoding="utf-8")
    with pytest.raises(TinytError, match="meta.json"):
        Tokenizers.load(broken)


@pytest.mark.parametrize("garbage", [b"", b"junk", bytes(range(256)) * 10])
def test_load_corrupt_model(joint_dir, tmp_path, garbage):
    broken = tmp_path / "tokenizer"
    shutil.copytree(joint_dir, broken)
    (broken / "joint.model").write_bytes(garbage)
    with pytest.raises(TinytError) as info:
        Tokenizers.load(broken)
    assert "joint.model" in str(info.value)


def test_damaged_meta_is_retrained(pairs, tmp_path):
    config = TokenizerConfig(vocab_size=120)
    train_or_load(config, *pairs, tmp_path)
    (tmp_path / "meta.json").write_text("{not json", encoding="utf-8")
    tokenizers = train_or_load(config, *pairs, tmp_path)
    assert tokenizers.fingerprint == fingerprint(config, *pairs)
    assert json.loads((tmp_path / "meta.json").read_text(encoding="utf-8"))["joint"] is True


# -- settings fit for the script: joint or separate vocabularies, character coverage ----------

import gzip  # noqa: E402
import unicodedata  # noqa: E402
from pathlib import Path  # noqa: E402

from tinyt.config import config_from_dict, load_config  # noqa: E402
from tinyt.tokenizer import auto_coverage  # noqa: E402

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
TATOEBA = Path(__file__).resolve().parents[2] / "shared" / "data" / "tatoeba" / "cmn-eng.tsv.gz"
# What every Multi30k config's tokenizer section meant before the auto settings existed: the
# fingerprint (and so the reuse of a trained tokenizer) depends on exactly these values.
OLD_MULTI30K_TOKENIZERS = {
    "multi30k_de_en.yaml": {"vocab_size": 8000, "model_type": "unigram", "joint": True,
                            "character_coverage": 1.0, "max_sentences": 2_000_000},
    "multi30k_de_en_cpu.yaml": {"vocab_size": 6000, "model_type": "unigram", "joint": True,
                                "character_coverage": 1.0, "max_sentences": 2_000_000},
    "tiny.yaml": {"vocab_size": 1000, "model_type": "unigram", "joint": True,
                  "character_coverage": 1.0, "max_sentences": 2_000_000},
}


@pytest.mark.parametrize("name", sorted(OLD_MULTI30K_TOKENIZERS))
def test_multi30k_configs_keep_their_tokenizer(name):
    from dataclasses import asdict

    config = load_config(CONFIGS / name, check_paths=False)
    assert config.tokenizer.sampling is None  # how training text is cut: not in the fingerprint
    assert asdict(config.tokenizer) == {**OLD_MULTI30K_TOKENIZERS[name], "sampling": None}
    assert config.model.tie_embeddings is True and config.decoding.bleu_tokenize == "13a"
    assert fingerprint(config.tokenizer, ["a"], ["b"]) == fingerprint(
        TokenizerConfig(**OLD_MULTI30K_TOKENIZERS[name]), ["a"], ["b"])


@pytest.mark.parametrize("src, tgt, joint, coverage, tied", [
    ("de", "en", True, 1.0, True),
    ("en", "ru", True, 1.0, True),
    ("en", "zh", False, None, False),  # None: each vocabulary by its text
    ("zh", "en", False, None, False),
    ("zh", "ja", True, None, True),
    ("cmn", "yue", True, None, True),
])
def test_auto_tokenizer_settings_follow_the_languages(src, tgt, joint, coverage, tied):
    config = config_from_dict({"data": {"src_lang": src, "tgt_lang": tgt},
                               "decoding": {"bleu_tokenize": "13a"}}, check_paths=False)
    assert config.tokenizer.joint is joint and config.tokenizer.character_coverage == coverage
    assert config.model.tie_embeddings is tied
    saved = config.to_dict()
    assert saved["tokenizer"]["joint"] == "auto" and saved["model"]["tie_embeddings"] is True


def test_explicit_settings_win():
    raw = {"data": {"src_lang": "en", "tgt_lang": "zh"}, "decoding": {"bleu_tokenize": "13a"},
           "tokenizer": {"joint": True, "character_coverage": 0.9998}}
    config = config_from_dict(raw, check_paths=False)
    assert config.tokenizer.joint and config.tokenizer.character_coverage == 0.9998
    assert config.model.tie_embeddings  # a joint vocabulary can be tied
    raw["tokenizer"] = {"joint": False}
    with pytest.raises(TinytError, match="model.tie_embeddings needs tokenizer.joint"):
        config_from_dict(raw, check_paths=False)
    raw["model"] = {"tie_embeddings": False}
    assert not config_from_dict(raw, check_paths=False).tokenizer.joint


def test_auto_coverage_by_script():
    english = ["Tom likes Zoe's 4 quizzes.", "Where is the café?"] * 50
    chinese = ["汤姆喜欢咖啡。", "你在哪儿？"] * 50
    assert auto_coverage(english) == 1.0
    assert auto_coverage(chinese) == 0.9995
    assert auto_coverage(["日本語のテキストです。"]) == auto_coverage(["한국어 문장입니다."]) == 0.9995
    assert auto_coverage(english + chinese) == 0.9995  # a joint vocabulary with Chinese
    assert auto_coverage(english + ["汤姆。"]) == 1.0  # a few Chinese names in English text
    assert auto_coverage([]) == 1.0


@pytest.fixture(scope="module")
def tatoeba_pairs():
    if not TATOEBA.is_file():
        pytest.skip(f"Tatoeba corpus not found at {TATOEBA}")
    with gzip.open(TATOEBA, "rt", encoding="utf-8-sig") as f:
        rows = [line.rstrip("\n").split("\t") for line in f if line.strip()]
    rows = rows[::10]  # 2,900 pairs across the length range
    return [r[0] for r in rows], [r[1] for r in rows]


def test_separate_vocabularies_fit_each_script(tatoeba_pairs, tmp_path):
    config = config_from_dict({"data": {"src_lang": "en", "tgt_lang": "zh"},
                               "tokenizer": {"vocab_size": 2500}}, check_paths=False)
    english, chinese = tatoeba_pairs
    tokenizers = train_or_load(config.tokenizer, english, chinese, tmp_path)
    assert tokenizers.src is not tokenizers.tgt
    assert (tmp_path / "src.model").is_file() and (tmp_path / "tgt.model").is_file()
    # Full coverage of English: every letter and digit has a piece (0.9995 would drop some).
    assert not any(UNK_ID in ids for ids in tokenizers.encode_src(english))
    # 0.9995 for Chinese: the rarest characters are left unknown instead of taking pieces.
    unknown = sum(ids.count(UNK_ID) for ids in tokenizers.encode_tgt(chinese))
    assert 0 < unknown < 0.002 * sum(map(len, chinese))
    assert tokenizers.tgt.decode(tokenizers.encode_tgt(["你好。"])) == ["你好。"]


def test_sentencepiece_reads_nfkc_text(tatoeba_pairs, tmp_path):
    """data.normalize need not touch what a model reads: SentencePiece's own normalisation
    (nmt_nfkc) gives full-width, compatibility and NFKC-normalised text the same pieces, at
    training and at translation alike."""
    english, chinese = tatoeba_pairs
    tokenizers = train_or_load(TokenizerConfig(vocab_size=2500, joint=False), english, chinese,
                               tmp_path)
    for text in ["Ｔｏｍ ｌｉｋｅｓ ｃｏｆｆｅｅ！", "ﬁne\u00a0day", "Tom\u3000is here"]:
        nfkc = unicodedata.normalize("NFKC", text)
        assert tokenizers.encode_src([text]) == tokenizers.encode_src([nfkc])
    for text in ["你好！", "汤姆，你呢？", "２０２４年"]:
        nfkc = unicodedata.normalize("NFKC", text)
        assert tokenizers.encode_tgt([text]) == tokenizers.encode_tgt([nfkc])
        assert tokenizers.decode_tgt(tokenizers.encode_tgt([text])) == [nfkc]


def test_vocabulary_smaller_than_the_characters(tatoeba_pairs, tmp_path):
    with pytest.raises(TinytError) as info:
        train_or_load(TokenizerConfig(vocab_size=300, joint=False), *tatoeba_pairs, tmp_path)
    message = str(info.value)
    assert "tokenizer.vocab_size 300 is smaller than" in message
    assert "raise tokenizer.vocab_size" in message and "\n" not in message
