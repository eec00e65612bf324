#!/usr/bin/env python
"""Print a results table (BLEU, chrF, perplexity, training minutes, parameters) for runs.

    python scripts/results_table.py runs/multi30k_de_en runs/multi30k_en_de ...

For each run: the newest test-split line of evaluations.jsonl for each checkpoint evaluated,
training minutes from the last line of metrics.jsonl, parameters from the run's best.pt.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tinyt.run_summary import run_info  # noqa: E402


def rows_for(run: Path) -> list[list[str]]:
    evaluations = run / "evaluations.jsonl"
    metrics = run / "metrics.jsonl"
    if not evaluations.is_file() or not metrics.is_file():
        return [[run.name, "-", "-", "-", "-", "-", "-", "not trained/evaluated"]]
    minutes = json.loads(metrics.read_text().splitlines()[-1])["elapsed_s"] / 60
    params = run_info(run)["parameters"]
    newest: dict[tuple[str, int], dict] = {}
    for line in evaluations.read_text().splitlines():
        result = json.loads(line)
        if result["split"].startswith("test"):
            newest[(f"{result['split']} {result.get('checkpoint', 'best.pt')}", result["beam"])] = result
    return [[run.name, key[0], str(key[1]), f"{r['bleu']:.2f}", f"{r['chrf']:.2f}",
             f"{r['ppl']:.2f}", f"{minutes:.1f}", f"{params / 1e6:.2f} M"]
            for key, r in sorted(newest.items())]


def main() -> None:
    header = ["run", "split / checkpoint", "beam", "BLEU", "chrF2", "ppl", "train min", "params"]
    rows = [header] + [row for run in sys.argv[1:] for row in rows_for(Path(run))]
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    for i, row in enumerate(rows):
        print(" | ".join(cell.ljust(w) for cell, w in zip(row, widths)))
        if i == 0:
            print("-|-".join("-" * w for w in widths))


if __name__ == "__main__":
    main()
