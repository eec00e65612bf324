"""scripts/serve_benchmark.py runs end to end on a small served model: every request is
answered 200 with the offline file's translation, and the numbers it reports hang together.
Never a check on speed: this machine may be busy with other tests."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def test_serve_benchmark_quick_run(served_run: Path, corpus_dir: Path, tmp_path: Path):
    out = tmp_path / "serve.json"
    result = subprocess.run(
        [sys.executable, "scripts/serve_benchmark.py", "--run", str(served_run), "--quick",
         "--data-dir", str(corpus_dir), "--requests", "40", "--clients", "1,4",
         "--json", str(out), "--work-dir", str(tmp_path / "work")],
        cwd=REPO, capture_output=True, text=True, timeout=600, check=False)
    assert result.returncode == 0, result.stderr[-3000:]
    numbers = json.loads(out.read_text(encoding="utf-8"))
    assert numbers["machine"]["cores"] >= 1
    assert numbers["settings"]["requests"] == 40 and numbers["settings"]["clients"] == [1, 4]
    [engine] = numbers["engines"]
    assert engine["name"].startswith("tinyt")
    assert engine["beam"] == 2  # the served run's own beam (tests/conftest.py's tiny config)

    # The offline baseline: the same 40 sentences through the program and the Python API.
    file = engine["file"]
    assert file["sentences"] == 40
    assert file["cli_sentences_per_s"] > 0 and file["decode_sentences_per_s"] > 0
    assert file["cli_wall_s"] > file["decode_s"] > 0  # the program also starts and loads
    assert file["api_differs_from_cli"] == 0
    assert file["in_batches_of"]["4"]["sentences_per_s"] > 0  # the server's batch size, offline
    alone = engine["alone"]
    assert alone["sentences"] == 10
    assert 0 < alone["p50_ms"] <= alone["p99_ms"] <= alone["max_ms"]

    # The server, level by level (the last repeated, for RSS): everything answered, 200, as
    # the file translated it.
    assert [(level["clients"], level["repeat"]) for level in engine["levels"]] == [
        (1, False), (4, False), (4, True)]
    for level in engine["levels"]:
        assert level["requests"] == 40
        assert level["statuses"] == {"200": 40} and level["non_200"] == 0
        assert level["warmup_non_200"] == 0
        assert level["mismatches"] == 0, level["mismatch_examples"]
        assert level["sentences_per_s"] > 0
        assert 0 < level["p50_ms"] <= level["p90_ms"] <= level["p99_ms"] <= level["max_ms"]
        assert level["ratio_to_file_decode"] > 0
        assert level["generator_cpu_s"] >= 0 and level["server_cpu_s"] >= 0
        assert level["rss_mib"]["end"] > 0 and level["rss_mib"]["samples"] >= 1
        assert level["rss_mib"]["peak"] >= level["rss_mib"]["end"]
        # The batcher's records cover exactly this level's requests, one sentence each.
        batching = level["batching"]
        assert batching["requests"] == batching["sentences"] == 40
        assert 1 <= batching["batches"] <= 40
        assert 1 <= batching["max_requests"] <= level["clients"]
    assert engine["levels"][0]["batching"]["max_requests"] == 1  # one client: alone
    # Blank texts: through HTTP and the batcher, never the model.
    for overhead in engine["overhead"].values():
        assert overhead["requests"] == 20 and overhead["non_200"] == 0

    rss = engine["rss"]
    assert rss["start_mib"] > 0 and rss["end_mib"] > 0
    assert rss["after_repeats_mib"] - rss["after_levels_mib"] == pytest.approx(
        rss["repeat_growth_mib"], abs=0.2)
    assert rss["peak_during_load_mib"] >= rss["start_mib"]
    assert rss["process_peak_vmhwm_mib"] >= rss["peak_during_load_mib"]
    # Stopped with SIGTERM: a clean exit, having answered every translation request sent.
    assert engine["server_exit_code"] == 0
    assert engine["server_answered"] == engine["requests_sent"]
    goals = engine["goals"]
    assert goals["throughput_clients"] == 4 and goals["throughput_ratio"] > 0
    assert goals["p50_ratio_at_1"] > 0
    assert "| server, 40 requests | 4 |" in result.stdout  # the table
