"""plot, attention, export, average, info and --model through the real `tinyt` entry point."""

import json
import struct
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from tinyt.cli import app

REPO = Path(__file__).resolve().parents[1]
runner = CliRunner()


def invoke(*args):
    return runner.invoke(app, [str(a) for a in args])


def png_size(path: Path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    return struct.unpack(">II", data[16:24])


@pytest.fixture(scope="module")
def run(module_small_corpus, tiny_config_for, write_config, tmp_path_factory):
    root = tmp_path_factory.mktemp("models")
    raw = tiny_config_for(module_small_corpus, root / "run")
    raw["model"]["dec_layers"] = 2
    raw["train"].update(max_epochs=4, valid_every=5, keep_checkpoints=3)
    result = invoke("train", "--config", write_config(raw, root / "config.yaml"))
    assert result.exit_code == 0, result.output
    return root / "run"


SENTENCES = ["Ein Mann fährt Fahrrad.", "Zwei Hunde spielen im Schnee.", "", "Eine Frau liest."]


def test_plot_writes_the_learning_curves(run, tmp_path):
    result = invoke("plot", "--run", run, "-o", tmp_path / "curves.png")
    assert result.exit_code == 0, result.output
    assert png_size(tmp_path / "curves.png") == (1000, 750)
    assert invoke("plot", "--run", run).exit_code == 0
    assert (run / "curves.png").stat().st_size > 10_000


def test_attention_writes_the_picture(run, tmp_path):
    result = invoke("attention", "Ein Hund läuft.", "--run", run, "-o", tmp_path / "a.png",
                    "--layer", "-1", "--head", "1")
    assert result.exit_code == 0, result.output
    assert png_size(tmp_path / "a.png") == (1400, 650)
    bad = invoke("attention", "Ein Hund läuft.", "--run", run, "--layer", "5")
    assert bad.exit_code == 2 and "layer" in bad.output


def test_export_then_translate_gives_the_same_output_as_the_run(run, tmp_path):
    bundle = tmp_path / "model.tinyt"
    result = invoke("export", "--run", run, "-o", bundle)
    assert result.exit_code == 0, result.output
    from_run = invoke("translate", "--run", run, "--beam", "2", *SENTENCES)
    from_bundle = invoke("translate", "--model", bundle, "--beam", "2", *SENTENCES)
    assert from_run.exit_code == from_bundle.exit_code == 0
    assert from_run.output == from_bundle.output
    assert len(from_bundle.output.splitlines()) == len(SENTENCES)
    # evaluate from the bundle writes beside it
    result = invoke("evaluate", "--model", bundle, "--split", "test", "--beam", "1")
    assert result.exit_code == 0, result.output
    assert (tmp_path / "model.tinyt.eval" / "evaluations.jsonl").is_file()


def test_bundle_in_a_fresh_process_needs_nothing_else(run, tmp_path):
    bundle = tmp_path / "model.tinyt"
    assert invoke("export", "--run", run, "-o", bundle).exit_code == 0
    code = ("import tinyt; t = tinyt.load_translator(%r, device='cpu'); "
            "print(t.translate(['Ein Mann fährt Fahrrad.'], beam=2)[0])" % str(bundle))
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         cwd=tmp_path, timeout=120)
    assert out.returncode == 0, out.stderr
    expected = invoke("translate", "--run", run, "--beam", "2", "Ein Mann fährt Fahrrad.")
    assert out.stdout == expected.output


def test_average_then_evaluate(run):
    kept = sorted(run.glob("ckpt-*.pt"))
    assert len(kept) == 3
    result = invoke("average", "--run", run, "-n", "3")
    assert result.exit_code == 0, result.output
    assert (run / "averaged.pt").is_file()
    result = invoke("evaluate", "--run", run, "--checkpoint", "averaged.pt", "--split", "valid",
                    "--beam", "1")
    assert result.exit_code == 0, result.output
    too_many = invoke("average", "--run", run, "-n", "9")
    assert too_many.exit_code == 2 and "keep_checkpoints" in too_many.output


def test_info_for_run_and_bundle(run, tmp_path):
    bundle = tmp_path / "model.tinyt"
    assert invoke("export", "--run", run, "-o", bundle).exit_code == 0
    for args in (["--run", run], ["--model", bundle]):
        result = invoke("info", *args)
        assert result.exit_code == 0, result.output
        assert "parameters" in result.output.lower()
    from_run = json.loads(invoke("info", "--run", run, "--json").output)
    from_bundle = json.loads(invoke("info", "--model", bundle, "--json").output)
    assert from_run["parameters"] == from_bundle["parameters"] > 0
    assert from_run["vocab"] == from_bundle["vocab"]
    assert from_run["validation"]["best_valid_loss"] is not None


def test_model_errors_are_one_line(run, tmp_path):
    junk = tmp_path / "junk.tinyt"
    junk.write_bytes(b"not a bundle at all")
    for args in (["translate", "--model", junk, "Hallo."],
                 ["translate", "--model", tmp_path / "missing.tinyt", "Hallo."],
                 ["translate", "--model", junk, "--run", run, "Hallo."],
                 ["info", "--model", junk]):
        result = invoke(*args)
        assert result.exit_code == 2, (args, result.output)
        assert result.output.startswith("error: ") and result.output.count("\n") == 1


def test_new_commands_have_help_with_an_example():
    for command in ("plot", "attention", "export", "average", "info"):
        result = invoke(command, "--help")
        assert result.exit_code == 0 and "Example: tinyt" in result.output, command
