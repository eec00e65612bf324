"""scripts/benchmark.py runs end to end and reports real, consistent numbers."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tinyt.allocator import reuse_freed_memory

REPO = Path(__file__).resolve().parents[1]


def test_benchmark_runs_on_a_tiny_config(module_small_corpus, tiny_config_for, write_config,
                                         tmp_path):
    raw = tiny_config_for(module_small_corpus, tmp_path / "unused")
    config = write_config(raw, tmp_path / "tiny.yaml")
    out = tmp_path / "bench.json"
    result = subprocess.run(
        [sys.executable, "scripts/benchmark.py", "--config", str(config), "--data-dir",
         str(module_small_corpus), "--cache-dir", str(tmp_path / "cache"), "--warmup-steps", "1",
         "--train-steps", "2", "--profile", "2", "--json", str(out)],
        cwd=REPO, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    numbers = json.loads(out.read_text())
    assert numbers["train_steps_timed"] == 2
    assert numbers["train_tgt_tokens_per_s"] > 0
    assert numbers["train_src_tgt_tokens_per_s"] > numbers["train_tgt_tokens_per_s"]
    assert 0 <= numbers["padding_share"] < 0.5
    assert numbers["greedy_sentences_per_s"] > 0 and numbers["beam5_sentences_per_s"] > 0
    assert numbers["peak_rss_mib"] > 100
    assert "training tgt tokens/s" in result.stdout  # the table
    assert numbers["malloc"] == ("freed memory reused" if reuse_freed_memory()
                                 else "system default")
    # --profile: real operators of real steps, the costliest first, matmuls among them.
    profiled = numbers["profile"]
    assert profiled["steps"] == 2 and profiled["ms_per_step"] > 0
    shares = [row["share"] for row in profiled["top"]]
    assert shares == sorted(shares, reverse=True) and 0 < sum(shares) <= 1.0001
    assert 0 < profiled["matmul_share"] < 1
    assert {"aten::mm", "aten::addmm"} & {row["op"] for row in profiled["top"]}
    assert "matrix multiplies" in result.stdout


def test_benchmark_reports_the_matmul_bound_and_compares_decoding_engines(
        module_small_corpus, tiny_config_for, write_config, tmp_path):
    pytest.importorskip("ctranslate2")
    from tinyt.config import config_from_dict
    from tinyt.training import train

    raw = tiny_config_for(module_small_corpus, tmp_path / "run")
    raw["train"].update(max_steps=6, valid_bleu=False, final_eval=False)
    train(config_from_dict(raw), progress_bars=False)
    config = write_config(raw, tmp_path / "tiny.yaml")
    out = tmp_path / "bench.json"
    result = subprocess.run(
        [sys.executable, "scripts/benchmark.py", "--config", str(config), "--data-dir",
         str(module_small_corpus), "--cache-dir", str(tmp_path / "cache"), "--warmup-steps", "1",
         "--train-steps", "2", "--run", str(tmp_path / "run"), "--json", str(out)],
        cwd=REPO, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    numbers = json.loads(out.read_text())
    assert numbers["gemm_bound_gflops_float32"] > 0.1
    # A step does more than its linear layers, so it cannot beat their bound by much.
    assert 0 < numbers["train_share_of_gemm_bound"] < 1.5
    engines = numbers["engines"]
    assert [e["engine"] for e in engines] == ["tinyt float32", "CTranslate2 float32",
                                              "CTranslate2 int8"]
    for e in engines:
        assert e["greedy_sentences_per_s"] > 0 and e["beam5_sentences_per_s"] > 0
        assert e["peak_rss_mib"] > 50
    # float32 CTranslate2 decodes greedily exactly as tinyt does: the same BLEU.
    assert engines[0]["greedy_bleu"] == engines[1]["greedy_bleu"]
    assert "CTranslate2 int8" in result.stdout and "share of that bound" in result.stdout


def compare_settings_on_cpu(data_dir, tiny_config_for, monkeypatch, tmp_path,
                            native_bf16: bool) -> tuple[list, dict, list, list]:
    """scripts/benchmark.py's compare_settings on the tiny config, on a CPU with or without
    bf16 instructions, with a preset fp32 bound of 50 GFLOP/s. torch.compile is replaced by a
    recorder (compiling takes minutes on 2 cores). Returns (rows, results, what each Trainer
    built was asked for and got as (train.amp, Trainer.amp), the modules compiled)."""
    import importlib.util

    import torch

    from tinyt.config import config_from_dict
    from tinyt.data import load_split, tokenize
    from tinyt.tokenizer import train_or_load

    spec = importlib.util.spec_from_file_location("benchmark", REPO / "scripts" / "benchmark.py")
    benchmark = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(benchmark)
    compiled, built = [], []
    monkeypatch.setattr(torch, "compile", lambda module: compiled.append(module) or module)
    monkeypatch.setattr(benchmark, "cpu_has_native_bf16", lambda: native_bf16)
    real_trainer = benchmark.Trainer

    def trainer(config, *args, **kwargs):
        made = real_trainer(config, *args, **kwargs)
        built.append((config.train.amp, made.amp))
        return made

    monkeypatch.setattr(benchmark, "Trainer", trainer)
    raw = tiny_config_for(data_dir, tmp_path / "run")
    raw["train"]["device"] = "cpu"
    config = config_from_dict(raw)
    train, valid = (load_split(config.data, split) for split in ("train", "valid"))
    tokenizers = train_or_load(config.tokenizer, train.src, train.tgt, tmp_path / "tok")
    results = {"gemm_bound_gflops_float32": 50.0}
    rows = benchmark.compare_settings(config, tokenizers, tokenize(train, tokenizers),
                                      tokenize(valid, tokenizers), valid.tgt, 1, 2, results)
    return rows, results, built, compiled


def test_compare_settings_times_each_precision_and_compilation(module_small_corpus,
                                                                tiny_config_for, monkeypatch,
                                                                tmp_path):
    """--compare-settings on a CPU with bf16 instructions: one row each for fp32/bf16 x
    compile off/on, each a fresh Trainer with those settings, its share taken of its own
    precision's matmul bound."""
    import torch

    rows, results, built, compiled = compare_settings_on_cpu(
        module_small_corpus, tiny_config_for, monkeypatch, tmp_path, native_bf16=True)
    amps = [amp for _, amp in built]
    assert [(r["amp"], r["compile"]) for r in rows] == [
        ("none", False), ("none", True), ("bf16", False), ("bf16", True)]
    assert amps == [None, None, torch.bfloat16, torch.bfloat16]
    assert len(compiled) == 2
    assert results["gemm_bound_gflops_bfloat16"] > 0  # measured for the bf16 rows
    for row in rows:
        assert row["tgt_tokens_per_s"] > 0
        bound = results["gemm_bound_gflops_" + ("bfloat16" if row["amp"] == "bf16"
                                                 else "float32")]
        assert row["share_of_bound"] == pytest.approx(row["tflops"] * 1000 / bound, abs=0.01)


def test_compare_settings_skips_bf16_on_a_cpu_without_it(module_small_corpus, tiny_config_for,
                                                         monkeypatch, tmp_path):
    """Emulated bf16 is dozens of times slower than fp32: its rows say so instead of taking
    most of an hour, and no trainer is built for them."""
    rows, results, built, _ = compare_settings_on_cpu(
        module_small_corpus, tiny_config_for, monkeypatch, tmp_path, native_bf16=False)
    built = [asked for asked, _ in built]
    assert built == ["none", "none"]
    assert [r["tgt_tokens_per_s"] > 0 for r in rows[:2]] == [True, True]
    assert all("no bf16 instructions" in r["skipped"] for r in rows[2:]) and len(rows) == 4
    assert "gemm_bound_gflops_bfloat16" not in results
