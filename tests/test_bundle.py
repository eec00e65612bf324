"""Validation checkpoints, checkpoint averaging, one-file model bundles, run info and the
Python API, on one tiny run trained once for the whole module."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tinyt.bundle import (export_bundle, format_run_info, load_bundle, load_for_inference,
                          run_info)
from tinyt.checkpoint import (average_checkpoints, load_checkpoint, load_trained,
                              prune_validation_checkpoints, validation_checkpoints)
from tinyt.config import config_from_dict
from tinyt.errors import TinytError
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
    from_run = Translator.from_run(run_dir, device="cpu").translate(sentences, beam_size=beam)
    from_bundle = Translator.load(bundle, device="cpu").translate(sentences, beam_size=beam)
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


def test_bundle_loads_with_weights_only(bundle):
    raw = torch.load(bundle, map_location="cpu", weights_only=True)
    assert raw["format"] == "tinyt-bundle" and raw["bundle_version"] == 2
    assert raw["tokenizer"]["models"]["joint"].dtype == torch.uint8


def test_bundle_works_after_the_run_is_deleted(run_dir, run_copy, sentences, tmp_path):
    path = export_bundle(run_copy, tmp_path / "exports" / "copy.tinyt", checkpoint="last.pt")
    shutil.rmtree(run_copy)
    out = Translator.load(path, device="cpu").translate(sentences, beam=2)
    assert out == Translator.from_run(run_dir, "last.pt", device="cpu").translate(sentences,
                                                                                   beam_size=2)


def test_separate_vocabularies_round_trip(module_small_corpus, tiny_config_for, tmp_path,
                                          sentences):
    raw = tiny_run_config(tiny_config_for, module_small_corpus, tmp_path / "run", max_steps=2,
                          keep_checkpoints=1)
    raw["tokenizer"]["joint"] = False
    raw["model"]["tie_embeddings"] = False
    train(config_from_dict(raw), progress_bars=False)
    path = export_bundle(tmp_path / "run", tmp_path / "separate.tinyt")
    _, tokenizers, _, payload = load_bundle(path)
    assert set(payload["tokenizer"]["models"]) == {"src", "tgt"}
    assert tokenizers.src is not tokenizers.tgt
    assert Translator.load(path, device="cpu").translate(sentences[:5], beam_size=1) == \
        Translator.load(tmp_path / "run", device="cpu").translate(sentences[:5], beam_size=1)


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

    raw = torch.load(bundle, weights_only=True)
    name = next(iter(raw["model"]))
    raw["model"][name] = raw["model"][name].clone()
    raw["model"][name].view(-1)[0] += 1.0  # one changed weight: torch.load cannot notice
    flipped = tmp_path / "flipped.tinyt"
    torch.save(raw, flipped)
    with pytest.raises(TinytError, match="damaged .*checksum"):
        load_bundle(flipped)

    raw = torch.load(bundle, weights_only=True)
    raw["bundle_version"] = 99
    future = tmp_path / "future.tinyt"
    torch.save(raw, future)
    with pytest.raises(TinytError, match="newer tinyt .*bundle version 99"):
        load_bundle(future)


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
        translator = Translator.load(source, device="cpu")
        assert translator.translate(sentences[:4], beam=2) == \
            translator.translate(sentences[:4], beam_size=2)
        assert translator.translate(sentences[0], beam=1) == \
            translator.translate([sentences[0]], beam_size=1)[0]
    with pytest.raises(TypeError, match="pass one of them"):
        translator.translate(sentences[:1], beam_size=2, beam=3)
    with pytest.raises(TinytError, match="does not exist"):
        Translator.load(run_dir / "missing", device="cpu")


def test_load_for_inference_takes_a_run_or_a_bundle(run_dir, bundle):
    from_run = load_for_inference(run=run_dir)
    from_bundle = load_for_inference(model=bundle)
    assert from_run[0].to_dict() == from_bundle[0].to_dict()
    with pytest.raises(TinytError, match="not both"):
        load_for_inference(run=run_dir, model=bundle)
    with pytest.raises(TinytError, match="--model"):
        load_for_inference()


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
