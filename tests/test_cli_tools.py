"""--set overrides, `tinyt config`, --verbose, streaming translation and the ready configs."""

import io
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from tinyt.cli import _argument_text, app, main, stream_translations
from tinyt.config import ConfigError, apply_overrides, load_config, override_config

REPO = Path(__file__).resolve().parents[1]
runner = CliRunner()


def invoke(*args):
    return runner.invoke(app, [str(a) for a in args])


def test_apply_overrides_types_values_like_yaml():
    raw = apply_overrides({"train": {"lr": 0.1}}, [
        "train.lr=0.001", "model.pre_norm=false", "train.betas=[0.9, 0.99]",
        "data.files={train: a, valid: b}", "run_dir=runs/x"])
    assert raw == {"train": {"lr": 0.001, "betas": [0.9, 0.99]}, "model": {"pre_norm": False},
                   "data": {"files": {"train": "a", "valid": "b"}}, "run_dir": "runs/x"}


@pytest.mark.parametrize("item,words", [
    ("train.lr", "section.key=value"),
    ("=3", "section.key=value"),
    ("train..lr=3", "section.key=value"),
    ("train.lr.x=3", "train.lr is not a section"),
    ("train.lr=[1, 2", "not valid YAML"),
])
def test_malformed_overrides(item, words):
    with pytest.raises(ConfigError, match=words.replace(".", r"\.")):
        apply_overrides({"train": {"lr": 0.1}}, [item])


def test_override_config_is_validated_and_typed():
    config = load_config(REPO / "configs" / "tiny.yaml", check_paths=False)
    changed = override_config(config, ["model.d_model=96", "model.n_heads=3", "train.lr=5e-4"],
                              check_paths=False)
    assert (changed.model.d_model, changed.model.n_heads, changed.train.lr) == (96, 3, 0.0005)
    assert config.model.d_model == 64  # the original is left alone
    for bad, words in [("model.n_heads=5", "does not divide"), ("train.lr=-1", "train.lr"),
                       ("train.nope=1", "unknown key 'train.nope'"),
                       ("model.d_model=big", "model.d_model must be an integer")]:
        with pytest.raises(ConfigError, match=words):
            override_config(config, [bad], check_paths=False)


def test_train_applies_set_and_saves_it(tiny_config_file, tmp_path):
    run_dir = tmp_path / "setrun"
    result = invoke("train", "--config", tiny_config_file, "--run-dir", run_dir,
                    "--set", "train.max_steps=3", "--set", "model.d_ff=48",
                    "--set", "train.valid_bleu=false")
    assert result.exit_code == 0, result.output
    saved = yaml.safe_load((run_dir / "config.yaml").read_text())
    assert saved["model"]["d_ff"] == 48 and saved["train"]["max_steps"] == 3
    # evaluate/translate take --set too: decoding settings of the saved run
    result = invoke("translate", "--run", run_dir, "--set", "decoding.beam_size=2",
                    "--set", "decoding.max_len_offset=2", "Ein Hund.")
    assert result.exit_code == 0, result.output
    result = invoke("evaluate", "--run", run_dir, "--split", "valid",
                    "--set", "decoding.beam_size=1")
    assert result.exit_code == 0, result.output
    assert "beam 1" in result.output


def test_bad_set_exits_2_with_one_line(tiny_config_file):
    result = invoke("train", "--config", tiny_config_file, "--set", "model.n_heads=7")
    assert result.exit_code == 2
    assert result.output.count("\n") == 1 and "model.n_heads is 7" in result.output


def test_config_validate_and_show(tiny_config_file, tmp_path):
    result = invoke("config", "validate", tiny_config_file)
    assert result.exit_code == 0 and "valid" in result.output
    result = invoke("config", "show", tiny_config_file, "--set", "model.d_model=128")
    assert result.exit_code == 0, result.output
    shown = yaml.safe_load(result.output)
    assert shown["model"]["d_model"] == 128
    assert shown["train"]["label_smoothing"] == 0.1  # a default the file never mentions
    assert shown["decoding"]["length_penalty"] == 1.0
    # what `show` prints is itself a valid config
    (tmp_path / "shown.yaml").write_text(result.output)
    assert load_config(tmp_path / "shown.yaml").model.d_model == 128
    result = invoke("config", "validate", tiny_config_file, "--set", "data.dir=/no/such/dir")
    assert result.exit_code == 2 and "data.dir" in result.output


def test_verbose_adds_the_traceback(tiny_config_file):
    quiet = invoke("config", "validate", tiny_config_file, "--set", "model=3")
    loud = invoke("--verbose", "config", "validate", tiny_config_file, "--set", "model=3")
    assert quiet.exit_code == loud.exit_code == 2
    assert "Traceback" not in quiet.output and "Traceback" in loud.output


def test_every_command_has_help_with_an_example():
    for command in (["train"], ["evaluate"], ["translate"], ["config", "validate"],
                    ["config", "show"]):
        result = invoke(*command, "--help")
        assert result.exit_code == 0
        assert "Example: tinyt" in result.output, command


@pytest.mark.parametrize("path", sorted((REPO / "configs").glob("*.yaml")), ids=lambda p: p.name)
def test_ready_configs_validate_and_say_what_they_are_for(path):
    assert path.read_text().startswith("# "), "header comment missing"
    config = load_config(path, check_paths=False)
    assert config.run_dir.startswith("runs/")


class FakeTranslator:
    def __init__(self):
        self.seen = []

    def translate(self, lines, beam_size=None, length_penalty=None):
        self.seen.extend(lines)
        return [line.upper() for line in lines]


def test_interactive_translations_come_out_before_the_next_line_is_read():
    out = io.StringIO()
    translator = FakeTranslator()

    def typed():
        for line in ["ein hund", "", "zwei katzen"]:
            yield line
            # by the time the person types the next line, the last one is already printed
            assert out.getvalue().endswith(line.upper() + "\n")

    stream_translations(translator, typed(), out, beam=None, length_penalty=None)
    assert out.getvalue() == "EIN HUND\n\nZWEI KATZEN\n"


def test_shell_completion_offers_commands():
    import os
    import subprocess
    import sys

    env = dict(os.environ, COMP_WORDS="tinyt e", COMP_CWORD="1", _TINYT_COMPLETE="complete_bash")
    code = "import sys; sys.argv[0] = 'tinyt'; from tinyt.cli import main; main()"
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                         timeout=60)
    assert out.stdout.split() == ["evaluate", "export"], out.stdout + out.stderr


# -- every problem outside a command is one line too ---------------------------------------


def run_main(monkeypatch, capsys, *args) -> tuple[int, str, str]:
    """`tinyt ARGS` in this process: (exit code, stdout, stderr)."""
    monkeypatch.setattr(sys, "stdout", sys.stdout)  # main() wraps it; put it back afterwards
    with pytest.raises(SystemExit) as info:
        main([str(a) for a in args])
    out, err = capsys.readouterr()
    return info.value.code, out, err


@pytest.mark.parametrize("args,words", [
    (["evaluate", "--beam", "0"], "--beam"),
    (["translate", "--beam", "abc", "x"], "--beam"),
    (["translate", "--beam", "10000", "x"], "--beam"),
    (["translate", "--length-penalty", "-1", "x"], "--length-penalty"),
    (["average", "-n", "0"], "--last"),
    (["train", "--no-such-option"], "--no-such-option"),
])
def test_usage_errors_are_one_line_with_exit_code_2(monkeypatch, capsys, args, words):
    code, out, err = run_main(monkeypatch, capsys, *args)
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1, err
    assert lines[0].startswith("error: ") and words in lines[0]
    assert "╭" not in err and "Usage:" not in err


def test_an_unexpected_error_outside_a_command_is_one_line_with_exit_code_1(monkeypatch,
                                                                              capsys):
    import tinyt.cli as cli

    def broken(*args, **kwargs):
        raise ValueError("something nobody expected")

    monkeypatch.setattr(cli, "app", broken)
    monkeypatch.delenv("TINYT_TRACEBACK", raising=False)
    code, _, err = run_main(monkeypatch, capsys, "info")
    assert code == 1 and err.strip() == ("error: unexpected ValueError: something nobody "
                                         "expected (run with --verbose for the traceback, and "
                                         "please report it)")


def test_arguments_with_invalid_utf8_become_replacement_characters():
    raw = b"Ein Hund \xff\xfe l\xc3\xa4uft"
    arg = raw.decode("utf-8", "surrogateescape")  # what Python puts in sys.argv
    assert _argument_text(arg) == "Ein Hund \ufffd\ufffd läuft"
    assert _argument_text("plain") == "plain"


def tinyt_process(*args, **kwargs) -> subprocess.CompletedProcess:
    env = dict(os.environ)
    env.pop("TINYT_TRACEBACK", None)
    return subprocess.run([sys.executable, "-m", "tinyt", *args], cwd=REPO, env=env,
                          capture_output=False, timeout=120, **kwargs)


@pytest.mark.skipif(not Path("/dev/full").exists(), reason="needs /dev/full")
@pytest.mark.parametrize("args", [["--version"], ["config", "validate", "configs/tiny.yaml"]])
def test_a_full_stdout_is_one_line_with_exit_code_2(args):
    with open("/dev/full", "w") as full:
        result = tinyt_process(*args, stdout=full, stderr=subprocess.PIPE, text=True)
    assert result.returncode == 2, result.stderr
    assert result.stderr.strip().splitlines() == [
        "error: no space left on the device holding standard output; free space there (or "
        "choose another location), then run the command again"]


def test_a_closed_pipe_on_stdout_ends_quietly():
    read_end, write_end = os.pipe()
    os.close(read_end)  # the reader is gone before anything is written: EPIPE, every time
    try:
        result = tinyt_process("config", "validate", "configs/tiny.yaml", stdout=write_end,
                               stderr=subprocess.PIPE, text=True)
    finally:
        os.close(write_end)
    assert result.returncode == 1 and result.stderr == ""
