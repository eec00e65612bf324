"""scripts/benchmark.py runs end to end and reports real, consistent numbers."""

import json
import subprocess
import sys
from pathlib import Path

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
