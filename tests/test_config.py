"""tinyt.config: defaults, YAML round trip, and strict errors that name the offending key."""

from __future__ import annotations

import copy
import dataclasses
import math
from pathlib import Path

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tinyt.config import (MAX_BEAM_SIZE, Config, ConfigError, DataConfig, DecodingConfig,
                          ModelConfig, TokenizerConfig, TrainConfig, apply_overrides,
                          config_from_dict, load_config, override_config, parse_yaml,
                          save_config)
from tinyt.errors import TinytError

REPO = Path(__file__).resolve().parents[1]


def _with(base: dict, dotted: str, value) -> dict:
    """A deep copy of `base` with `value` at the dotted key (sections created as needed)."""
    raw = copy.deepcopy(base)
    node = raw
    *parents, last = dotted.split(".")
    for part in parents:
        node = node.setdefault(part, {})
    node[last] = value
    return raw


def dump_config(raw, path: Path) -> Path:
    path.write_text(yaml.safe_dump(raw, sort_keys=False, allow_unicode=True), encoding="utf-8")
    return path


def _load_error(tmp_path: Path, raw) -> ConfigError:
    path = dump_config(raw, tmp_path / "bad.yaml")
    with pytest.raises(ConfigError) as info:
        load_config(path)
    return info.value


# -- defaults and round trip ---------------------------------------------------------------


def test_config_error_is_a_tinyt_error():
    assert issubclass(ConfigError, TinytError)


def test_defaults_validate():
    config = Config()
    config.validate()
    assert config.model.d_model % config.model.n_heads == 0
    assert config.data.dir is None
    assert config.train.betas == (0.9, 0.98)
    assert config_from_dict({}) == config
    assert config_from_dict(None) == config


def test_empty_file_gives_defaults(tmp_path):
    path = tmp_path / "empty.yaml"
    path.write_text("", encoding="utf-8")
    assert load_config(path) == Config()


def test_shipped_configs_load():
    configs = Path(__file__).resolve().parents[1] / "configs"
    files = sorted(configs.glob("*.yaml"))
    if not files:
        pytest.skip("no configs/ folder")
    for path in files:
        assert isinstance(load_config(path), Config), path


def test_round_trip_defaults(tmp_path):
    config = Config()
    save_config(config, tmp_path / "c.yaml")
    assert load_config(tmp_path / "c.yaml") == config


def test_round_trip_tiny_config(tiny_config_dict, tmp_path):
    original = load_config(dump_config(tiny_config_dict, tmp_path / "tiny.yaml"))
    assert original.model.d_model == 32 and original.tokenizer.vocab_size == 200
    assert original.data.dir == tiny_config_dict["data"]["dir"]
    save_config(original, tmp_path / "again.yaml")
    again = load_config(tmp_path / "again.yaml")
    assert again == original
    assert isinstance(again.train.betas, tuple)
    # The saved file is plain YAML holding every section.
    raw = yaml.safe_load((tmp_path / "again.yaml").read_text(encoding="utf-8"))
    assert set(raw) == {"run_dir", "data", "tokenizer", "model", "train", "decoding"}
    assert raw["train"]["betas"] == [0.9, 0.98]


def test_round_trip_non_default_values(tmp_path, small_corpus):
    config = Config(
        run_dir=str(tmp_path / "r"),
        data=DataConfig(dir=str(small_corpus), format="tsv", src_field="source",
                        tgt_field="target", files={"train": "a", "valid": "b"}),
        tokenizer=TokenizerConfig(vocab_size=123, model_type="bpe", joint=False),
        model=ModelConfig(d_model=48, n_heads=3, activation="gelu", pre_norm=False,
                          tie_embeddings=False),
        train=TrainConfig(lr=0.25, betas=(0.8, 0.9), max_minutes=1.5, valid_bleu=False),
        decoding=DecodingConfig(beam_size=1, length_penalty=0.0),
    )
    config.validate()
    save_config(config, tmp_path / "c.yaml")
    assert load_config(tmp_path / "c.yaml") == config


def test_int_is_accepted_for_float(tmp_path):
    config = load_config(dump_config({"train": {"lr": 1, "max_minutes": 2}}, tmp_path / "c.yaml"))
    assert config.train.lr == 1.0 and isinstance(config.train.lr, float)
    assert isinstance(config.train.max_minutes, float)


# -- errors that name the key --------------------------------------------------------------


def test_unknown_top_level_key(tmp_path, tiny_config_dict):
    exc = _load_error(tmp_path, _with(tiny_config_dict, "modle", {"d_model": 8}))
    assert "modle" in str(exc)
    assert "unknown key" in str(exc)


def test_unknown_nested_key(tmp_path, tiny_config_dict):
    exc = _load_error(tmp_path, _with(tiny_config_dict, "model.d_modle", 64))
    assert "model.d_modle" in str(exc)
    # It lists the keys that do exist, so the typo is easy to fix.
    assert "d_model" in str(exc).replace("d_modle", "")


@pytest.mark.parametrize("key, value, words", [
    ("model.d_model", "abc", ["model.d_model", "integer"]),
    ("model.d_model", "64", ["model.d_model", "integer"]),
    ("model.n_heads", True, ["model.n_heads", "integer"]),
    ("model.d_model", 32.5, ["model.d_model", "integer"]),
    ("train.lr", "fast", ["train.lr", "number"]),
    ("train.lr", False, ["train.lr", "number"]),
    ("train.valid_bleu", "yes please", ["train.valid_bleu", "true or false"]),
    ("train.valid_bleu", 1, ["train.valid_bleu", "true or false"]),
    ("data.files", ["train", "val"], ["data.files", "mapping"]),
    ("data.files", "train", ["data.files", "mapping"]),
    ("train.betas", [0.9], ["train.betas"]),
    ("train.betas", {"a": 1}, ["train.betas"]),
    ("train.betas", [0.9, "x"], ["train.betas[1]"]),
    ("data.src_lang", ["de"], ["data.src_lang", "string"]),
    ("data.src_lang", True, ["data.src_lang", "string"]),
    ("model", 5, ["model", "mapping"]),
    ("model", [1, 2], ["model", "mapping"]),
    ("train", "fast", ["train", "mapping"]),
    ("data.files.train", ["x"], ["data.files.train", "string"]),
])
def test_wrong_types_name_the_key(tmp_path, tiny_config_dict, key, value, words):
    exc = _load_error(tmp_path, _with(tiny_config_dict, key, value))
    for word in words:
        assert word in str(exc), (word, str(exc))


def test_top_level_not_a_mapping(tmp_path):
    path = tmp_path / "list.yaml"
    path.write_text("- 1\n- 2\n", encoding="utf-8")
    with pytest.raises(ConfigError, match="mapping"):
        load_config(path)


@pytest.mark.parametrize("key, value, named", [
    ("model.n_heads", 3, "model.n_heads"),  # 32 % 3 != 0
    ("model.d_model", 30, "model.n_heads"),  # 30 % 2 == 0 but with 4 heads below
    ("train.lr", 0, "train.lr"),
    ("train.lr", -0.001, "train.lr"),
    ("model.dropout", 1.0, "model.dropout"),
    ("model.dropout", 1.5, "model.dropout"),
    ("model.dropout", -0.1, "model.dropout"),
    ("model.attn_dropout", 1, "model.attn_dropout"),
    ("tokenizer.vocab_size", 3, "tokenizer.vocab_size"),
    ("tokenizer.model_type", "wordpiece", "tokenizer.model_type"),
    ("data.format", "csv", "data.format"),
    ("data.max_len", 500, "data.max_len"),  # does not fit model.max_positions
    ("train.amp", "fp8", "train.amp"),
    ("train.device", "tpu", "train.device"),
    ("decoding.beam_size", 0, "decoding.beam_size"),
    ("model.activation", "tanh", "model.activation"),
    ("data.files", {"train": "train"}, "data.files"),  # valid role missing
    ("data.files", {"train": "a", "valid": "b", "dev": "c"}, "data.files"),
    ("data.stream_buffer", 0, "data.stream_buffer"),
    ("data.num_proc", -1, "data.num_proc"),
])
def test_impossible_values_name_the_key(tmp_path, tiny_config_dict, key, value, named):
    raw = _with(tiny_config_dict, key, value)
    if key == "model.d_model":
        raw["model"]["n_heads"] = 4
    exc = _load_error(tmp_path, raw)
    assert named in str(exc), str(exc)


def test_data_scaling_keys(tmp_path, tiny_config_dict, monkeypatch):
    defaults = DataConfig()
    assert (defaults.streaming, defaults.stream_buffer, defaults.num_proc) == (False, 100_000, 0)
    raw = _with(_with(_with(tiny_config_dict, "data.streaming", True), "data.stream_buffer", 7),
                "data.num_proc", 3)
    config = load_config(dump_config(raw, tmp_path / "c.yaml"))
    assert (config.data.streaming, config.data.stream_buffer, config.data.num_proc) == (True, 7, 3)
    assert config.data.tokenize_processes == 3
    # 0: min(4, CPU cores)
    monkeypatch.setattr("os.cpu_count", lambda: 16)
    assert DataConfig(num_proc=0).tokenize_processes == 4
    monkeypatch.setattr("os.cpu_count", lambda: 2)
    assert DataConfig(num_proc=0).tokenize_processes == 2
    monkeypatch.setattr("os.cpu_count", lambda: None)
    assert DataConfig(num_proc=0).tokenize_processes == 1
    exc = _load_error(tmp_path, _with(tiny_config_dict, "data.streaming", "yes"))
    assert "data.streaming" in str(exc) and "true or false" in str(exc)
    exc = _load_error(tmp_path, _with(tiny_config_dict, "data.stream_buffer", 0))
    assert "data.stream_buffer is 0; it must be >= 1" in str(exc)
    exc = _load_error(tmp_path, _with(tiny_config_dict, "data.num_proc", 1.5))
    assert "data.num_proc must be an integer" in str(exc)


def test_d_model_not_divisible_by_heads_message(tmp_path, tiny_config_dict):
    raw = _with(_with(tiny_config_dict, "model.d_model", 30), "model.n_heads", 4)
    exc = _load_error(tmp_path, raw)
    assert "model.n_heads" in str(exc) and "model.d_model=30" in str(exc)


def test_missing_data_dir(tmp_path, tiny_config_dict):
    missing = tmp_path / "no_such_corpus"
    exc = _load_error(tmp_path, _with(tiny_config_dict, "data.dir", str(missing)))
    assert "data.dir" in str(exc) and "no_such_corpus" in str(exc)


def test_data_dir_that_is_a_file(tmp_path, tiny_config_dict):
    file = tmp_path / "corpus.txt"
    file.write_text("x\n", encoding="utf-8")
    exc = _load_error(tmp_path, _with(tiny_config_dict, "data.dir", str(file)))
    assert "data.dir" in str(exc)


def test_tied_embeddings_need_joint_vocabulary(tmp_path, tiny_config_dict):
    raw = _with(tiny_config_dict, "tokenizer.joint", False)
    exc = _load_error(tmp_path, raw)
    assert "model.tie_embeddings" in str(exc) and "tokenizer.joint" in str(exc)
    # Untying the embeddings makes the same config valid.
    raw["model"]["tie_embeddings"] = False
    config = load_config(dump_config(raw, tmp_path / "ok.yaml"))
    assert not config.tokenizer.joint and not config.model.tie_embeddings


def test_error_message_names_the_file(tmp_path, tiny_config_dict):
    exc = _load_error(tmp_path, _with(tiny_config_dict, "model.d_modle", 1))
    assert "bad.yaml" in str(exc)


def test_invalid_yaml_reports_line(tmp_path):
    path = tmp_path / "broken.yaml"
    path.write_text("run_dir: runs/x\nmodel:\n  d_model: 32\n  n_heads: [2\ntrain:\n  lr: 1\n",
                    encoding="utf-8")
    with pytest.raises(ConfigError) as info:
        load_config(path)
    message = str(info.value)
    assert "broken.yaml" in message
    assert "line " in message
    line = int(message.split("line ")[1].split(",")[0])
    assert 4 <= line <= 6, message
    assert "\n" not in message


def test_invalid_yaml_tab_indentation(tmp_path):
    path = tmp_path / "tabs.yaml"
    path.write_text("model:\n\td_model: 32\n", encoding="utf-8")
    with pytest.raises(ConfigError, match=r"line 2"):
        load_config(path)


def test_missing_file(tmp_path):
    with pytest.raises(ConfigError) as info:
        load_config(tmp_path / "nope.yaml")
    assert "nope.yaml" in str(info.value) and "does not exist" in str(info.value)


def test_directory_instead_of_file(tmp_path):
    with pytest.raises(ConfigError):
        load_config(tmp_path)


def test_non_utf8_file(tmp_path):
    path = tmp_path / "latin1.yaml"
    path.write_bytes("run_dir: runs/Übersetzung\n".encode("latin-1"))
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert "UTF-8" in str(info.value) and "latin1.yaml" in str(info.value)


def test_huge_integer_for_float_key(tmp_path):
    path = tmp_path / "big.yaml"
    path.write_text("train:\n  lr: " + "1" * 400 + "\n", encoding="utf-8")
    with pytest.raises(ConfigError, match="train.lr"):
        load_config(path)


def test_exponent_without_dot_is_a_number(tmp_path):
    path = tmp_path / "exp.yaml"
    path.write_text("train:\n  lr: 5e-4\n  min_lr: 1e-6\n", encoding="utf-8")
    config = load_config(path)
    assert math.isclose(config.train.lr, 5e-4)


def test_exponent_without_dot_at_least_names_the_key(tmp_path):
    # Whatever the fix above, this spelling must never be silently misread.
    path = tmp_path / "exp.yaml"
    path.write_text("train:\n  lr: 5e-4\n", encoding="utf-8")
    try:
        config = load_config(path)
    except ConfigError as exc:
        assert "train.lr" in str(exc)
    else:
        assert math.isclose(config.train.lr, 5e-4)


# -- property: junk under known keys gives a Config or a ConfigError, nothing else ----------


def _known_keys() -> list[str]:
    """Every top-level key and every `section.key` of Config."""
    keys = []
    for section in dataclasses.fields(Config):
        keys.append(section.name)
        default = (section.default_factory() if section.default_factory is not dataclasses.MISSING
                   else section.default)
        if dataclasses.is_dataclass(default):
            keys += [f"{section.name}.{f.name}" for f in dataclasses.fields(default)]
    return keys


KNOWN_KEYS = _known_keys()

# Integers stay within +-2**62: bigger ones hit the OverflowError bug pinned above.
scalars = st.one_of(
    st.none(), st.booleans(), st.integers(min_value=-(2 ** 62), max_value=2 ** 62),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(alphabet=st.characters(blacklist_categories=("Cs",)), max_size=12),
    st.sampled_from(["cuda", "cuda:7", "cpu", "auto", "bf16", "fp16", "bpe", "gelu", "tsv",
                     "jsonl", "train", "valid", "test", ".", "/", "runs/x", ""]),
)
junk = st.recursive(
    scalars,
    lambda children: st.one_of(
        st.lists(children, max_size=3),
        st.dictionaries(st.one_of(st.sampled_from(["train", "valid", "test", "x"]),
                                  st.text(max_size=5)), children, max_size=3),
    ),
    max_leaves=6,
)


def test_known_keys_cover_every_section():
    assert "model.d_model" in KNOWN_KEYS and "decoding.beam_size" in KNOWN_KEYS
    assert "data.files" in KNOWN_KEYS and "train.betas" in KNOWN_KEYS
    assert len(KNOWN_KEYS) > 50


@settings(max_examples=250, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(entries=st.lists(st.tuples(st.sampled_from(KNOWN_KEYS), junk), min_size=1, max_size=4))
def test_junk_values_give_config_or_config_error(tmp_path, entries):
    raw: dict = {}
    for key, value in entries:
        section, _, name = key.partition(".")
        if name:
            if not isinstance(raw.get(section), dict):
                raw[section] = {}
            raw[section][name] = value
        else:
            raw[section] = value
    path = tmp_path / "junk.yaml"
    path.write_text(yaml.safe_dump(raw, allow_unicode=True), encoding="utf-8")
    try:
        config = load_config(path)
    except ConfigError as exc:
        message = str(exc)
        assert message and "junk.yaml" in message
    else:
        assert isinstance(config, Config)
        config.validate()  # a returned config is a validated one
        assert isinstance(config.model.d_model, int) and not isinstance(config.model.d_model,
                                                                         bool)
        assert isinstance(config.train.lr, float) and config.train.lr > 0
        assert isinstance(config.train.betas, tuple) and len(config.train.betas) == 2


# -- numbers the machine cannot handle, hostile YAML ---------------------------------------


def test_a_billion_laughs_config_is_refused_at_once(tmp_path):
    lines = ["a: &a [x, x, x, x, x, x, x, x, x, x]"]
    for i in range(1, 10):
        name, prev = chr(97 + i), chr(96 + i)
        lines.append(f"{name}: &{name} [{', '.join(['*' + prev] * 10)}]")
    path = tmp_path / "laughs.yaml"
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(ConfigError, match="aliases expand to more than"):
        load_config(path)
    with pytest.raises(ConfigError, match="aliases expand"):
        apply_overrides({}, ["run_dir=" + "; ".join(lines).replace("; ", "\n")])


def test_duplicate_keys_are_refused_with_their_line(tmp_path):
    path = tmp_path / "dup.yaml"
    path.write_text("train:\n  lr: 0.001\n  seed: 3\n  lr: 0.1\n")
    with pytest.raises(ConfigError,
                       match=r"duplicate key 'lr' \(first given at line 2\) at line 4"):
        load_config(path)
    # a merge key may be overridden by an explicit key
    assert parse_yaml("base: &b {x: 1}\nm:\n  <<: *b\n  x: 2\n")["m"] == {"x": 2}


@pytest.mark.parametrize("text", ["a: &a [*a]", "[" * 5000 + "]" * 5000])
def test_endless_and_absurdly_deep_yaml_is_one_line(text):
    with pytest.raises(ConfigError):
        parse_yaml(text)


def test_values_quoted_in_errors_are_cut_short():
    config = load_config(REPO / "configs" / "tiny.yaml", check_paths=False)
    for override in ("train.device=" + "y" * 100_000, "model.d_model=[" + "1," * 50_000 + "1]",
                     "train.nope" + "x" * 10_000 + "=1"):
        with pytest.raises(ConfigError) as info:
            override_config(config, [override], check_paths=False)
        assert "x" * 100 not in str(info.value) and "y" * 100 not in str(info.value)
        assert len(str(info.value)) < 600  # the known keys are listed, the value is cut


@pytest.mark.parametrize("override,words", [
    ("model.d_model=1000000000000", "more than this machine's"),
    ("model.max_positions=100000000000", "lower model.max_positions"),
    ("decoding.max_len_offset=100000000000000000000", "decoding.max_len_offset"),
    ("train.lr=.inf", "train.lr must be a finite number"),
    ("train.lr=.nan", "train.lr must be a finite number"),
    ("train.eps=.inf", "train.eps must be a finite number"),
    ("train.lr=100.0", "use a learning rate in (0, 10]"),
    ("train.max_minutes=.inf", "train.max_minutes"),
    ("decoding.beam_size=10000", f"use a value in [1, {MAX_BEAM_SIZE}]"),
    ("train.num_threads=1000000000", "train.num_threads"),
    ("train.batch_tokens=1099511627776", "train.batch_tokens"),
    ("tokenizer.vocab_size=1000000000", "tokenizer.vocab_size"),
])
def test_numbers_the_machine_cannot_handle_are_refused_before_work(override, words):
    config = load_config(REPO / "configs" / "tiny.yaml", check_paths=False)
    with pytest.raises(ConfigError) as info:
        override_config(config, [override], check_paths=False)
    assert words in str(info.value)


def test_seeds_are_what_every_random_number_generator_takes():
    config = load_config(REPO / "configs" / "tiny.yaml", check_paths=False)
    for seed in (-1, 2**32):  # SentencePiece's seed is an unsigned 32-bit number
        with pytest.raises(ConfigError, match=f"train.seed is {seed}; use a value in"):
            override_config(config, [f"train.seed={seed}"], check_paths=False)
    assert override_config(config, ["train.seed=4294967295"], check_paths=False).train.seed == \
        2**32 - 1


def test_config_that_is_a_folder(tmp_path):
    with pytest.raises(ConfigError, match="is a folder, not a file"):
        load_config(tmp_path)
