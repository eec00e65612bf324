"""Validation checkpoints, checkpoint averaging, one-file model bundles, run info and the
Python API, on one tiny run trained once for the whole module."""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from tinyt.bundle import export_bundle, load_bundle
from tinyt.checkpoint import (
    average_checkpoints,
    load_checkpoint,
    load_trained,
    prune_validation_checkpoints,
    validation_checkpoints,
)
from tinyt.config import config_from_dict
from tinyt.errors import TinytError
from tinyt.loading import load_translator, load_weights
from tinyt.run_summary import format_run_info, run_info
from tinyt.training import train
from tinyt.translation import Translator

REPO = Path(__file__).resolve().parents[1]
# valid_every 2 over 12 steps: validations at 2, 4, ..., 12, of which the last 3 are kept.
# checkpoint_every 3 adds periodic saves at steps 3 and 9, which must not add ckpt files.
VALIDATION_STEPS = [2, 4, 6, 8, 10, 12]
KEPT_STEPS = [8, 10, 12]


def tiny_run_config(tiny_config_for, data_dir: Path, run_dir: Path, **train_overrides) -> dict:
    raw = tiny_config_for(data_dir, run_dir)
    raw["train"].update({"valid_bleu": False, "valid_every": 2, "checkpoint_every": 3,
                         "max_steps": 12, "max_epochs": 10, "keep_checkpoints": 3,
                         **train_overrides})
    return raw


@pytest.fixture(scope="module")
def run_dir(module_small_corpus, tiny_config_for, tmp_path_factory) -> Path:
    raw = tiny_run_config(tiny_config_for, module_small_corpus,
                          tmp_path_factory.mktemp("bundle") / "run")
    summary = train(config_from_dict(raw), progress_bars=False)
    assert summary["steps"] == 12
    return Path(raw["run_dir"])


@pytest.fixture(scope="module")
def sentences(module_small_corpus) -> list[str]:
    lines = (module_small_corpus / "val.de").read_text(encoding="utf-8").splitlines()
    return lines[:20]


@pytest.fixture(scope="module")
def bundle(run_dir, tmp_path_factory) -> Path:
    return export_bundle(run_dir, tmp_path_factory.mktemp("export") / "model.tinyt")


@pytest.fixture
def run_copy(run_dir, tmp_path) -> Path:
    """A copy of the module's run that a test may change or delete."""
    return Path(shutil.copytree(run_dir, tmp_path / "run"))


# -- reading and writing bundles by hand ----------------------------------------------------

def bundle_metadata(path: Path) -> dict[str, str]:
    with safe_open(path, "pt") as f:
        return f.metadata()


def spec_checksum(tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> str:
    """A version 3 bundle's checksum as tinyt.bundle documents it, written independently: per
    tensor in name order the JSON line [name, dtype, shape] and its bytes, then per metadata
    entry but the checksum, in key order, the JSON line [key, value]."""
    h = hashlib.sha256()
    for name in sorted(tensors):
        tensor = tensors[name].contiguous()
        dtype = str(tensor.dtype).removeprefix("torch.")
        h.update((json.dumps([name, dtype, list(tensor.shape)]) + "\n").encode())
        h.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    for key in sorted(metadata):
        if key != "checksum":
            h.update((json.dumps([key, metadata[key]]) + "\n").encode())
    return h.hexdigest()


def rewrite_bundle(bundle: Path, out: Path, tensors: dict[str, torch.Tensor] | None = None,
                   reseal: bool = False, drop: tuple[str, ...] = (), **changes: str) -> Path:
    """`bundle` written again to `out` with other `tensors` and metadata `changes`, without the
    metadata keys in `drop`. The old checksum is kept, as damage would keep it; `reseal`
    computes a matching one, as a faulty writer would."""
    tensors = load_file(bundle) if tensors is None else tensors
    metadata = {**bundle_metadata(bundle), **changes}
    metadata = {key: value for key, value in metadata.items() if key not in drop}
    if reseal:
        metadata["checksum"] = spec_checksum(tensors, metadata)
    save_file(tensors, out, metadata=metadata)
    return out


def write_old_bundle(run_dir: Path, path: Path, version: int) -> Path:
    """A bundle in the layout tinyt wrote before version 3: one dict through torch.save, its
    checksum over weights, vocabularies, config and (version 2) every other entry."""
    config, tokenizers, model, payload = load_trained(run_dir)
    weights = model.state_dict()  # both names of the tied embedding, as then
    vocab = tokenizers.src.serialized_model_proto()
    models = {"joint": torch.frombuffer(bytearray(vocab), dtype=torch.uint8).clone()}
    bundle = {"format": "tinyt-bundle", "bundle_version": version, "tinyt_version": "0.1.0",
              "model": weights, "config": config.to_dict(),
              "tokenizer": {"joint": True, "models": models},
              "tokenizer_fingerprint": tokenizers.fingerprint,
              "progress": dict(payload["progress"]),
              "source": {"run_dir": str(run_dir), "checkpoint": "best.pt", "averaged_steps": []},
              "metrics": run_info(run_dir)["validation"]}
    h = hashlib.sha256()
    for group in (weights, models):
        for name in sorted(group):
            tensor = group[name].contiguous()
            h.update(f"{name}:{tensor.dtype}:{tuple(tensor.shape)}\n".encode())
            h.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    h.update(json.dumps(bundle["config"], sort_keys=True).encode())
    if version >= 2:
        metadata = {k: v for k, v in bundle.items() if k not in ("model", "config", "tokenizer")}
        metadata["tokenizer"] = {"joint": True}
        h.update(json.dumps(metadata, sort_keys=True, default=str).encode())
    bundle["checksum"] = h.hexdigest()
    torch.save(bundle, path)
    return path


def assert_damaged(path: Path) -> None:
    """Loading `path` fails with the one-line message that says to export again."""
    with pytest.raises(TinytError, match="is damaged") as info:
        load_bundle(path)
    message = str(info.value)
    assert "\n" not in message and message.endswith("export the bundle again"), message


# -- validation checkpoints -----------------------------------------------------------------

def test_validations_keep_the_last_n_weight_checkpoints(run_dir):
    steps = [json.loads(line)["step"] for line in (run_dir / "metrics.jsonl").open()]
    assert steps == VALIDATION_STEPS
    assert [step for step, _ in validation_checkpoints(run_dir)] == KEPT_STEPS
    for step, path in validation_checkpoints(run_dir):
        payload = load_checkpoint(path)
        assert set(payload) == {"format_version", "model", "progress", "tokenizer_fingerprint",
                                "config"}  # weights only, like best.pt
        assert payload["progress"]["step"] == step
    last, newest = load_checkpoint(run_dir / "last.pt"), load_checkpoint(run_dir / "ckpt-12.pt")
    for name, tensor in last["model"].items():
        assert torch.equal(tensor, newest["model"][name]), name


def test_keep_checkpoints_zero_writes_none(module_small_corpus, tiny_config_for, tmp_path):
    raw = tiny_run_config(tiny_config_for, module_small_corpus, tmp_path / "run",
                          keep_checkpoints=0, max_steps=4)
    train(config_from_dict(raw), progress_bars=False)
    assert validation_checkpoints(tmp_path / "run") == []
    assert (tmp_path / "run" / "best.pt").is_file()


def test_resumed_run_writes_the_same_validation_checkpoints(
        run_dir, module_small_corpus, tiny_config_for, tmp_path):
    raw = tiny_run_config(tiny_config_for, module_small_corpus, tmp_path / "run", max_steps=7)
    config = config_from_dict(raw)
    train(config, progress_bars=False)
    config.train.max_steps = 12
    train(config, resume=True, progress_bars=False)
    assert [step for step, _ in validation_checkpoints(tmp_path / "run")] == KEPT_STEPS
    for step in KEPT_STEPS:
        a = load_checkpoint(run_dir / f"ckpt-{step}.pt")["model"]
        b = load_checkpoint(tmp_path / "run" / f"ckpt-{step}.pt")["model"]
        assert all(torch.equal(a[name], b[name]) for name in a), step


def test_pruning_keeps_the_newest_and_drops_leftovers_from_another_run(tmp_path):
    for step in (5, 50, 100, 200, 1000):  # numeric order differs from name order
        (tmp_path / f"ckpt-{step}.pt").write_bytes(b"x")
    (tmp_path / "ckpt-best.pt").write_bytes(b"not ours")
    prune_validation_checkpoints(tmp_path, keep=2, current_step=200)
    assert [step for step, _ in validation_checkpoints(tmp_path)] == [100, 200]
    assert (tmp_path / "ckpt-best.pt").is_file()


# -- averaging ------------------------------------------------------------------------------

def test_average_equals_the_mean_of_the_last_n_checkpoints(run_copy, sentences):
    path = average_checkpoints(run_copy, 3)
    assert path == run_copy / "averaged.pt"
    averaged = load_checkpoint(path)
    assert averaged["averaged_steps"] == KEPT_STEPS
    states = [load_checkpoint(run_copy / f"ckpt-{step}.pt")["model"] for step in KEPT_STEPS]
    for name, tensor in averaged["model"].items():
        expected = torch.stack([state[name] for state in states]).mean(dim=0)
        assert tensor.dtype == states[0][name].dtype
        torch.testing.assert_close(tensor, expected, rtol=1e-6, atol=1e-7)
    # The tied embedding is averaged once and stored once, as in the checkpoints.
    assert averaged["model"]["src_embed.weight"].data_ptr() == \
        averaged["model"]["tgt_embed.weight"].data_ptr()
    config, tokenizers, model, payload = load_trained(run_copy, "averaged.pt")
    assert payload["progress"]["step"] == 12
    translator = Translator(model, tokenizers, config.decoding, "cpu")
    out = translator.translate(sentences, beam_size=2)
    assert len(out) == len(sentences) and all(isinstance(line, str) for line in out)

    one = load_checkpoint(average_checkpoints(run_copy, 1, "one.pt"))["model"]
    newest = load_checkpoint(run_copy / "ckpt-12.pt")["model"]
    assert all(torch.equal(one[name], newest[name]) for name in newest)


def test_averaging_too_many_or_none_is_a_clear_error(run_copy):
    with pytest.raises(TinytError, match=r"has only 3 .*keep_checkpoints=3"):
        average_checkpoints(run_copy, 4)
    for _, path in validation_checkpoints(run_copy):
        path.unlink()
    with pytest.raises(TinytError, match=r"no validation checkpoints.*keep_checkpoints=3"):
        average_checkpoints(run_copy, 2)
    with pytest.raises(TinytError, match="use a plain file name"):
        average_checkpoints(run_copy, 1, "best.pt")


def test_averaging_refuses_checkpoints_of_another_vocabulary(run_copy):
    path = run_copy / "ckpt-10.pt"
    payload = load_checkpoint(path)
    payload["tokenizer_fingerprint"] = "somebody-else"
    torch.save(payload, path)
    with pytest.raises(TinytError, match="different vocabularies"):
        average_checkpoints(run_copy, 3)


# -- bundles --------------------------------------------------------------------------------

@pytest.mark.parametrize("beam", [1, 3])
def test_bundle_translates_exactly_like_the_run(run_dir, bundle, sentences, beam):
    from_run = load_translator(run_dir, device="cpu").translate(sentences, beam_size=beam)
    from_bundle = load_translator(bundle, device="cpu").translate(sentences, beam_size=beam)
    assert from_bundle == from_run
    assert any(from_run)


def test_bundle_holds_the_run_config_tokenizers_and_weights(run_dir, bundle):
    config, tokenizers, model, payload = load_bundle(bundle)
    run_config, run_tokenizers, run_model, run_payload = load_trained(run_dir)
    assert config.to_dict() == run_config.to_dict()
    assert tokenizers.fingerprint == run_tokenizers.fingerprint
    assert tokenizers.src is tokenizers.tgt  # the run's vocabulary is joint
    assert tokenizers.src.serialized_model_proto() == run_tokenizers.src.serialized_model_proto()
    assert payload["progress"] == run_payload["progress"]
    run_state = run_model.state_dict()
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor, run_state[name]), name
    assert not model.training


def test_a_bundle_is_a_safetensors_file_with_a_tied_embedding_stored_once(
        run_dir, bundle, sentences):
    tensors = load_file(bundle)  # as any safetensors reader sees it
    metadata = bundle_metadata(bundle)
    assert metadata["format"] == "tinyt-bundle" and metadata["bundle_version"] == "3"
    assert tensors["tokenizer.joint"].dtype == torch.uint8
    _, run_tokenizers, run_model, _ = load_trained(run_dir)
    assert bytes(tensors["tokenizer.joint"].numpy()) == \
        run_tokenizers.src.serialized_model_proto()
    assert json.loads(metadata["tokenizer"]) == {"joint": True,
                                                 "fingerprint": run_tokenizers.fingerprint}
    # The tied embedding is stored once, under the name it has first in the state dict.
    assert "model.src_embed.weight" not in tensors
    assert json.loads(metadata["aliases"]) == {"model.src_embed.weight":
                                               "model.tgt_embed.weight"}
    weights = {name for name in tensors if name.startswith("model.")}
    assert weights == {f"model.{name}" for name in run_model.state_dict()} - \
        {"model.src_embed.weight"}
    assert torch.equal(tensors["model.tgt_embed.weight"], run_model.tgt_embed.weight)
    # The checksum is the one the module documents, over every tensor and metadata entry.
    assert metadata["checksum"] == spec_checksum(tensors, metadata)

    _, _, model, payload = load_bundle(bundle)
    assert model.src_embed is model.tgt_embed  # still tied, not two equal copies
    assert torch.equal(model.src_embed.weight, run_model.src_embed.weight)
    assert payload["bundle_version"] == 3 and payload["format"] == "tinyt-bundle"
    assert payload["tokenizer"]["joint"] and set(payload["tokenizer"]["models"]) == {"joint"}
    assert load_translator(bundle, device="cpu").translate(sentences, beam_size=2) == \
        load_translator(run_dir, device="cpu").translate(sentences, beam_size=2)


def test_bundle_works_after_the_run_is_deleted(run_dir, run_copy, sentences, tmp_path):
    path = export_bundle(run_copy, tmp_path / "exports" / "copy.tinyt", checkpoint="last.pt")
    shutil.rmtree(run_copy)
    out = load_translator(path, device="cpu").translate(sentences, beam=2)
    assert out == load_translator(run_dir, checkpoint="last.pt", device="cpu").translate(sentences,
                                                                                   beam_size=2)


def test_separate_vocabularies_round_trip(module_small_corpus, tiny_config_for, tmp_path,
                                          sentences):
    raw = tiny_run_config(tiny_config_for, module_small_corpus, tmp_path / "run", max_steps=2,
                          keep_checkpoints=1)
    raw["tokenizer"]["joint"] = False
    raw["model"]["tie_embeddings"] = False
    train(config_from_dict(raw), progress_bars=False)
    path = export_bundle(tmp_path / "run", tmp_path / "separate.tinyt")
    tensors, metadata = load_file(path), bundle_metadata(path)
    assert {"tokenizer.src", "tokenizer.tgt", "model.src_embed.weight",
            "model.tgt_embed.weight", "model.output.weight"} <= set(tensors)
    assert "tokenizer.joint" not in tensors and json.loads(metadata["aliases"]) == {}
    _, tokenizers, model, payload = load_bundle(path)
    assert set(payload["tokenizer"]["models"]) == {"src", "tgt"}
    assert tokenizers.src is not tokenizers.tgt
    assert model.src_embed is not model.tgt_embed
    assert tokenizers.src.serialized_model_proto() == bytes(tensors["tokenizer.src"].numpy())
    assert tokenizers.tgt.serialized_model_proto() == bytes(tensors["tokenizer.tgt"].numpy())
    assert load_translator(path, device="cpu").translate(sentences[:5], beam_size=1) == \
        load_translator(tmp_path / "run", device="cpu").translate(sentences[:5], beam_size=1)


def test_missing_foreign_truncated_damaged_and_future_bundles_are_clear_errors(
        run_dir, bundle, tmp_path):
    with pytest.raises(TinytError, match="not found"):
        load_bundle(tmp_path / "nope.tinyt")
    with pytest.raises(TinytError, match="is a folder"):
        load_bundle(run_dir)
    with pytest.raises(TinytError, match="training checkpoint, not a model bundle"):
        load_bundle(run_dir / "best.pt")

    noise = tmp_path / "noise.tinyt"
    noise.write_bytes(bytes(range(256)) * 40)
    with pytest.raises(TinytError, match="damaged or not a tinyt model bundle"):
        load_bundle(noise)
    foreign = tmp_path / "foreign.tinyt"
    torch.save({"weights": torch.ones(3)}, foreign)
    with pytest.raises(TinytError, match="not a tinyt model bundle"):
        load_bundle(foreign)

    data = bundle.read_bytes()
    truncated = tmp_path / "truncated.tinyt"
    truncated.write_bytes(data[: len(data) // 2])
    with pytest.raises(TinytError, match="damaged"):
        load_bundle(truncated)

    tensors = load_file(bundle)
    tensors["model.tgt_embed.weight"].view(-1)[0] += 1.0  # one changed weight
    flipped = rewrite_bundle(bundle, tmp_path / "flipped.tinyt", tensors=tensors)
    with pytest.raises(TinytError, match="damaged .*checksum"):
        load_bundle(flipped)

    future = rewrite_bundle(bundle, tmp_path / "future.tinyt", bundle_version="99")
    with pytest.raises(TinytError, match="newer tinyt .*bundle version 99"):
        load_bundle(future)

    foreign = tmp_path / "foreign.safetensors"
    save_file({"weight": torch.ones(3)}, foreign, metadata={"format": "pt"})
    with pytest.raises(TinytError, match="not a tinyt model bundle"):
        load_bundle(foreign)


def test_a_flipped_byte_in_a_weight_is_found(bundle, tmp_path):
    data = bytearray(bundle.read_bytes())
    header_size = int.from_bytes(data[:8], "little")
    header = json.loads(data[8: 8 + header_size])
    begin, end = header["model.tgt_embed.weight"]["data_offsets"]
    data[8 + header_size + (begin + end) // 2] ^= 0x10  # one bit of one weight
    flipped = tmp_path / "flipped.tinyt"
    flipped.write_bytes(bytes(data))
    assert load_file(flipped).keys() == load_file(bundle).keys()  # safetensors cannot notice
    assert_damaged(flipped)


def test_a_changed_metadata_value_is_found(bundle, tmp_path):
    metrics = json.loads(bundle_metadata(bundle)["metrics"])
    metrics["best_valid_loss"] /= 2  # a better score than the run had, under the old checksum
    assert_damaged(rewrite_bundle(bundle, tmp_path / "metrics.tinyt",
                                  metrics=json.dumps(metrics, sort_keys=True)))
    # One byte of the header itself, its length unchanged: the source checkpoint "best.pt" ->
    # "bast.pt".
    data = bundle.read_bytes()
    source = b'\\"checkpoint\\": \\"best.pt'
    assert data.count(source) == 1
    edited = tmp_path / "source.tinyt"
    edited.write_bytes(data.replace(source, source.replace(b"best.pt", b"bast.pt")))
    assert_damaged(edited)
    assert_damaged(rewrite_bundle(bundle, tmp_path / "checksum.tinyt", checksum="0" * 64))


@pytest.mark.parametrize("keep", [9, 100, 0.5, -1])
def test_a_truncated_bundle_is_one_line_damaged(bundle, tmp_path, keep):
    data = bundle.read_bytes()
    cut = tmp_path / "cut.tinyt"
    cut.write_bytes(data[: int(len(data) * keep) if isinstance(keep, float) else keep])
    with pytest.raises(TinytError, match="damaged") as info:
        load_bundle(cut)
    assert "\n" not in str(info.value) and "export" in str(info.value)


def test_a_header_that_is_not_json_is_damaged(bundle, tmp_path):
    data = bytearray(bundle.read_bytes())
    data[9] = ord("!")  # right after the opening brace
    broken = tmp_path / "broken.tinyt"
    broken.write_bytes(bytes(data))
    assert_damaged(broken)


def test_a_consistent_but_incomplete_or_misshapen_bundle_is_damaged(bundle, tmp_path):
    # Checksums that match, as a faulty writer would make them: the loader's own checks hold.
    assert_damaged(rewrite_bundle(bundle, tmp_path / "no-aliases.tinyt", reseal=True,
                                  drop=("aliases",)))
    assert_damaged(rewrite_bundle(bundle, tmp_path / "no-tokenizer.tinyt", reseal=True,
                                  drop=("tokenizer",)))
    assert_damaged(rewrite_bundle(bundle, tmp_path / "no-checksum.tinyt", drop=("checksum",)))
    assert_damaged(rewrite_bundle(bundle, tmp_path / "bad-json.tinyt", reseal=True,
                                  progress="{step: 1"))
    assert_damaged(rewrite_bundle(bundle, tmp_path / "old-version.tinyt", reseal=True,
                                  bundle_version="2"))
    tensors = load_file(bundle)
    del tensors["tokenizer.joint"]
    assert_damaged(rewrite_bundle(bundle, tmp_path / "no-vocab.tinyt", tensors, reseal=True))
    tensors = load_file(bundle)
    tensors["model.tgt_embed.weight"] = tensors["model.tgt_embed.weight"][:-1].clone()
    assert_damaged(rewrite_bundle(bundle, tmp_path / "shape.tinyt", tensors, reseal=True))
    config = json.loads(bundle_metadata(bundle)["config"])
    config["model"]["d_ff"] *= 2  # weights no longer fit the config
    assert_damaged(rewrite_bundle(bundle, tmp_path / "config.tinyt", reseal=True,
                                  config=json.dumps(config)))


def test_a_bundle_from_a_newer_tinyt_is_refused(bundle, tmp_path):
    future = rewrite_bundle(bundle, tmp_path / "future.tinyt", reseal=True,
                            bundle_version="4", tinyt_version="9.0.0")
    with pytest.raises(TinytError, match=r"newer tinyt \(9\.0\.0, bundle version 4\).*"
                                         r"reads version 3: upgrade tinyt"):
        load_bundle(future)
    # The version is read before anything else: a future layout need not match this checksum.
    future = rewrite_bundle(bundle, tmp_path / "future2.tinyt", bundle_version="4",
                            drop=("aliases", "checksum"))
    with pytest.raises(TinytError, match="newer tinyt"):
        load_bundle(future)


@pytest.mark.parametrize("version", [1, 2])
def test_bundles_of_versions_1_and_2_still_load(run_dir, sentences, tmp_path, version):
    path = write_old_bundle(run_dir, tmp_path / "old.tinyt", version)
    assert path.read_bytes()[:2] == b"PK"  # a torch.save zip file
    config, tokenizers, model, payload = load_bundle(path)
    assert payload["bundle_version"] == version
    assert model.src_embed is model.tgt_embed and not model.training
    run_config, _, _, run_payload = load_trained(run_dir)
    assert config.to_dict() == run_config.to_dict()
    assert payload["progress"] == run_payload["progress"]
    assert load_translator(path, device="cpu").translate(sentences, beam_size=2) == \
        load_translator(run_dir, device="cpu").translate(sentences, beam_size=2)
    assert run_info(path)["validation"] == run_info(run_dir)["validation"]

    raw = torch.load(path, weights_only=True)
    raw["model"]["tgt_embed.weight"].view(-1)[0] += 1.0
    torch.save(raw, tmp_path / "changed.tinyt")
    with pytest.raises(TinytError, match="damaged .*checksum"):
        load_bundle(tmp_path / "changed.tinyt")
    if version == 2:  # version 2's checksum covers the metadata too
        raw = torch.load(path, weights_only=True)
        raw["progress"]["step"] += 1
        torch.save(raw, tmp_path / "changed.tinyt")
        with pytest.raises(TinytError, match="damaged .*checksum"):
            load_bundle(tmp_path / "changed.tinyt")


def test_an_old_layout_claiming_a_newer_version_is_refused(run_dir, tmp_path):
    path = write_old_bundle(run_dir, tmp_path / "old.tinyt", 2)
    raw = torch.load(path, weights_only=True)
    raw["bundle_version"] = 99
    torch.save(raw, tmp_path / "future.tinyt")
    with pytest.raises(TinytError, match="newer tinyt .*bundle version 99"):
        load_bundle(tmp_path / "future.tinyt")
    raw["bundle_version"] = 3  # version 3 is a safetensors file, never a torch.save one
    torch.save(raw, tmp_path / "three.tinyt")
    assert_damaged(tmp_path / "three.tinyt")


def test_metadata_is_standard_json_even_for_an_infinite_loss(run_copy, tmp_path):
    # A checkpoint saved before any validation has best_valid_loss inf.
    payload = load_checkpoint(run_copy / "last.pt")
    payload["progress"]["best_valid_loss"] = float("inf")
    torch.save(payload, run_copy / "early.pt")
    path = export_bundle(run_copy, tmp_path / "early.tinyt", checkpoint="early.pt")

    def refuse(constant: str):
        raise ValueError(f"not standard JSON: {constant}")

    metadata = bundle_metadata(path)
    for key in ("config", "tokenizer", "progress", "source", "metrics", "aliases"):
        json.loads(metadata[key], parse_constant=refuse)
    assert json.loads(metadata["progress"])["best_valid_loss"] is None
    _, _, _, loaded = load_bundle(path)
    assert loaded["progress"]["best_valid_loss"] is None
    assert loaded["progress"]["step"] == payload["progress"]["step"]
    assert loaded["source"]["checkpoint"] == "early.pt"


def test_export_refuses_to_replace_a_checkpoint_of_the_run(run_dir, tmp_path):
    before = (run_dir / "best.pt").read_bytes()
    with pytest.raises(TinytError, match="would replace a checkpoint"):
        export_bundle(run_dir, run_dir / "best.pt")
    with pytest.raises(TinytError, match="is a folder"):
        export_bundle(run_dir, tmp_path)
    assert (run_dir / "best.pt").read_bytes() == before


# -- run info and the Python API ------------------------------------------------------------

def test_run_info_of_a_run_and_its_bundle_agree(run_dir, bundle):
    run, packed = run_info(run_dir), run_info(bundle)
    assert run["kind"] == "run" and packed["kind"] == "bundle"
    for key in ("parameters", "vocab", "languages", "model", "train", "validation"):
        assert run[key] == packed[key], key
    _, _, model, _ = load_trained(run_dir)
    assert run["parameters"] == model.num_parameters()
    assert run["vocab"]["joint"] and run["vocab"]["src_size"] == run["vocab"]["tgt_size"]
    assert run["languages"] == {"src": "de", "tgt": "en"}
    assert run["model"]["d_model"] == 32 and run["model"]["n_heads"] == 2

    metrics = [json.loads(line) for line in (run_dir / "metrics.jsonl").open()]
    best = min(metrics, key=lambda m: m["valid_loss"])
    assert run["validation"]["validations"] == len(VALIDATION_STEPS)
    assert run["validation"]["best_valid_loss"] == best["valid_loss"]
    assert run["validation"]["best_valid_loss_step"] == best["step"]
    assert run["validation"]["best_valid_bleu"] is None  # valid_bleu was off

    assert run["validation_checkpoints"] == KEPT_STEPS
    assert run["sizes"]["best.pt"] == (run_dir / "best.pt").stat().st_size
    assert packed["checkpoint"]["name"] == "best.pt"
    assert packed["checkpoint"]["step"] == load_checkpoint(run_dir / "best.pt")["progress"]["step"]
    assert packed["sizes"][bundle.name] == bundle.stat().st_size
    for info in (run, packed):
        text = format_run_info(info)
        assert f"{info['parameters']:,} parameters" in text and "best valid loss" in text


def test_translator_load_and_translate_options(run_dir, bundle, sentences):
    for source in (run_dir, str(bundle)):
        translator = load_translator(source, device="cpu")
        assert translator.translate(sentences[:4], beam=2) == \
            translator.translate(sentences[:4], beam_size=2)
        assert translator.translate(sentences[0], beam=1) == \
            translator.translate([sentences[0]], beam_size=1)[0]
    with pytest.raises(TypeError, match="pass one of them"):
        translator.translate(sentences[:1], beam_size=2, beam=3)
    with pytest.raises(TinytError, match="does not exist"):
        load_translator(run_dir / "missing", device="cpu")


def test_load_for_inference_takes_a_run_or_a_bundle(run_dir, bundle):
    from_run = load_weights(run=run_dir)
    from_bundle = load_weights(model=bundle)
    assert from_run[0].to_dict() == from_bundle[0].to_dict()
    with pytest.raises(TinytError, match="not both"):
        load_weights(run=run_dir, model=bundle)
    with pytest.raises(TinytError, match="--model"):
        load_weights()


def test_import_tinyt_does_not_import_torch():
    code = "import sys, tinyt; print('torch' in sys.modules, tinyt.__version__)"
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True,
                            text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split()[0] == "False"
    code = "import sys, tinyt; tinyt.Translator; print('torch' in sys.modules)"
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True,
                            text=True, timeout=60)
    assert result.stdout.strip() == "True", result.stderr
