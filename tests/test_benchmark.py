"""scripts/benchmark.py runs end to end and reports real, consistent numbers."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def test_benchmark_runs_on_a_tiny_config(module_small_corpus, tiny_config_for, write_config,
                                         tmp_path):
    raw = tiny_config_for(module_small_corpus, tmp_path / "unused")
    config = write_config(raw, tmp_path / "tiny.yaml")
    out = tmp_path / "bench.json"
    result = subprocess.run(
        [sys.executable, "scripts/benchmark.py", "--config", str(config), "--data-dir",
         str(module_small_corpus), "--cache-dir", str(tmp_path / "cache"), "--warmup-steps", "1",
         "--train-steps", "2", "--json", str(out)],
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
