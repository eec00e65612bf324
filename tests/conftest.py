"""Shared fixtures: the real Multi30k corpus (read-only, outside the repo), small slices of it
copied into pytest's tmp folders, and a tiny, fast training config."""

from __future__ import annotations

import gzip
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import yaml

REPO_ROOT = Path(__file__).resolve().parents[1]
# ../shared/data/multi30k from the repository root; never copied into the repo.
CORPUS_DIR = REPO_ROOT.parent / "shared" / "data" / "multi30k"

# (split name, number of lines kept, written gzipped?)
SMALL_SLICES = (("train", 200, True), ("val", 50, False), ("test_2016_flickr", 50, True))
LANGS = ("de", "en")


def read_corpus_lines(corpus_dir: Path, split: str, lang: str, n: int | None = None) -> list[str]:
    """The first `n` lines (all with None) of `{split}.{lang}[.gz]` in the real corpus."""
    path = corpus_dir / f"{split}.{lang}.gz"
    if not path.is_file():
        path = corpus_dir / f"{split}.{lang}"
    opener = gzip.open if path.suffix == ".gz" else open
    lines: list[str] = []
    with opener(path, "rt", encoding="utf-8", newline="\n") as f:
        for line in f:
            if n is not None and len(lines) >= n:
                break
            lines.append(line.rstrip("\n").rstrip("\r"))
    return lines


def write_lines(path: Path, lines: list[str], gz: bool = False) -> Path:
    """Write `lines` ('\\n'-terminated, UTF-8) to `path`, gzipped (path + '.gz') when asked."""
    data = "".join(line + "\n" for line in lines).encode("utf-8")
    if gz:
        path = path.with_name(path.name + ".gz")
        with gzip.open(path, "wb") as f:
            f.write(data)
    else:
        path.write_bytes(data)
    return path


def dump_config(config: dict[str, Any], path: Path) -> Path:
    """Write a config dict as a YAML file and return its path."""
    path = Path(path)
    path.write_text(yaml.safe_dump(config, sort_keys=False, allow_unicode=True), encoding="utf-8")
    return path


def make_small_corpus(corpus_dir: Path, target: Path) -> Path:
    target.mkdir(parents=True, exist_ok=True)
    for split, n, gz in SMALL_SLICES:
        for lang in LANGS:
            write_lines(target / f"{split}.{lang}", read_corpus_lines(corpus_dir, split, lang, n),
                        gz=gz)
    return target


def make_tiny_config(data_dir: Path, run_dir: Path) -> dict[str, Any]:
    return {
        "run_dir": str(run_dir),
        "data": {
            "src_lang": "de",
            "tgt_lang": "en",
            "dir": str(data_dir),
            "format": "text",
            "files": {"train": "train", "valid": "val", "test": "test_2016_flickr"},
            "max_len": 64,
        },
        "tokenizer": {"vocab_size": 200, "model_type": "unigram", "joint": True},
        "model": {
            "d_model": 32,
            "n_heads": 2,
            "enc_layers": 1,
            "dec_layers": 1,
            "d_ff": 64,
            "dropout": 0.1,
            "tie_embeddings": True,
            "max_positions": 128,
        },
        "train": {
            "seed": 1,
            "batch_tokens": 512,
            "max_epochs": 1,
            "warmup_steps": 5,
            "lr": 0.002,
            "valid_bleu": True,
            "device": "cpu",
            "num_threads": 1,
        },
        "decoding": {"beam_size": 2, "batch_size": 64, "max_len_offset": 5},
    }


@pytest.fixture(scope="session")
def corpus_dir() -> Path:
    if not (CORPUS_DIR / "val.de.gz").is_file():
        pytest.skip(f"Multi30k corpus not found at {CORPUS_DIR}")
    return CORPUS_DIR


@pytest.fixture
def small_corpus(corpus_dir: Path, tmp_path: Path) -> Path:
    """A folder with train (200 lines, gzipped), val (50, plain) and test_2016_flickr (50,
    gzipped) slices of Multi30k, de and en."""
    return make_small_corpus(corpus_dir, tmp_path / "corpus")


@pytest.fixture(scope="module")
def module_small_corpus(corpus_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The same slices as `small_corpus`, shared by every test of a module."""
    return make_small_corpus(corpus_dir, tmp_path_factory.mktemp("corpus"))


@pytest.fixture
def tiny_config_dict(small_corpus: Path, tmp_path: Path) -> dict[str, Any]:
    """A very small, fast config over `small_corpus`, run_dir under tmp_path."""
    return make_tiny_config(small_corpus, tmp_path / "run")


@pytest.fixture
def tiny_config_file(tiny_config_dict: dict[str, Any], tmp_path: Path) -> Path:
    return dump_config(tiny_config_dict, tmp_path / "tiny.yaml")


@pytest.fixture(scope="session")
def write_config():
    """`write_config(dict, path) -> path`: dump a config dict to a YAML file."""
    return dump_config


@pytest.fixture(scope="session")
def tiny_config_for():
    """`tiny_config_for(data_dir, run_dir) -> dict`: the tiny config over any folder, for
    module-scoped fixtures that cannot use the function-scoped `tiny_config_dict`."""
    return make_tiny_config


@pytest.fixture(scope="session")
def corpus_lines():
    """`corpus_lines(corpus_dir, split, lang, n=None) -> list[str]` from the real corpus."""
    return read_corpus_lines


@pytest.fixture
def hub_offline(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """The Hugging Face hub switched off and an empty datasets cache, so a hub load fails at
    once (whatever this machine's own cache holds)."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    # The variables are read when huggingface_hub/datasets are imported, which an earlier test
    # may have done: set their flags and the cache path too (tinyt reads the variables itself).
    import datasets
    import huggingface_hub

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf" / "datasets")


def train_overfit_run(data_dir: Path, run_dir: Path, d_model: int, layers: int,
                      steps: int) -> Path:
    """Train the tiny config, widened to `d_model` (FFN 2 x d_model) with `layers` encoder and
    decoder layers and no dropout, for `steps` updates over the small corpus's 200 training
    pairs: long enough to translate them. Returns the run directory."""
    from tinyt.config import config_from_dict
    from tinyt.training import train

    raw = make_tiny_config(data_dir, run_dir)
    raw["model"].update(d_model=d_model, d_ff=2 * d_model, enc_layers=layers,
                        dec_layers=layers, dropout=0.0)
    raw["train"].update(max_epochs=200, max_steps=steps, valid_every=steps, valid_bleu=False,
                        batch_tokens=1024, lr=0.003)
    train(config_from_dict(raw), progress_bars=False)
    return run_dir


@pytest.fixture(scope="session")
def overfit_run():
    """`overfit_run(data_dir, run_dir, d_model, layers, steps) -> run_dir`: see
    `train_overfit_run`, for module-scoped fixtures of a small trained model."""
    return train_overfit_run


# -- a served model (tinyt serve) ---------------------------------------------------------------

@pytest.fixture(scope="session")
def served_run(corpus_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small model (d_model 48, 2+2 layers, 2 heads) trained once for every server test:
    120 updates over the small corpus, enough to translate its captions recognisably."""
    data = make_small_corpus(corpus_dir, tmp_path_factory.mktemp("served-corpus"))
    return train_overfit_run(data, tmp_path_factory.mktemp("served") / "run", 48, 2, 120)


class ServerProcess:
    """A `tinyt serve` child process; its stdout and stderr go to a file (a pipe nobody reads
    could fill up and block it)."""

    def __init__(self, process: subprocess.Popen, log: Path):
        self.process = process
        self.log = log
        self.url = ""

    def output(self) -> str:
        return self.log.read_text(encoding="utf-8", errors="replace")

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 120) -> int:
        """Send `sig` and wait for the process to end; its exit status."""
        if self.process.poll() is None:
            self.process.send_signal(sig)
        return self.process.wait(timeout)


def start_server(*args: str, log_dir: Path, env: dict[str, str] | None = None,
                 wait: bool = True, program: list[str] | None = None) -> ServerProcess:
    """Start `tinyt serve --port 0 ARGS` (`program serve ...`, default `python -m tinyt`)
    and, with `wait`, return once it prints the address it listens on (`ServerProcess.url`);
    if it exits first, fail with its output."""
    log = log_dir / f"serve-{len(list(log_dir.glob('serve-*.log')))}.log"
    full_env = {**os.environ, "TQDM_DISABLE": "1", **(env or {})}
    with open(log, "wb") as out:
        program = program or [sys.executable, "-m", "tinyt"]
        process = subprocess.Popen([*program, "serve", "--port", "0", *args],
                                   stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                   env=full_env, cwd=REPO_ROOT)
    server = ServerProcess(process, log)
    if not wait:
        return server
    deadline = time.monotonic() + 300  # a fail-safe against a hung start, not a speed check
    while time.monotonic() < deadline:
        match = re.search(r"open (http://\S+?)/ in a browser", server.output())
        if match:
            server.url = match.group(1)
            return server
        if process.poll() is not None:
            raise AssertionError(f"tinyt serve exited with {process.returncode}:\n"
                                 f"{server.output()}")
        time.sleep(0.05)
    server.stop(signal.SIGKILL)
    raise AssertionError(f"tinyt serve did not start:\n{server.output()}")


@pytest.fixture(scope="session")
def serve_process():
    """`start_server(*args, log_dir=..., env=None, wait=True, program=None) -> ServerProcess`."""
    return start_server
