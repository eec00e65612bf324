#!/usr/bin/env bash
# Train and evaluate the Multi30k configs end to end, then print a results table.
#   scripts/reproduce_multi30k.sh [DATA_DIR] [CONFIG ...]
# DATA_DIR: Multi30k's raw files (default ../shared/data/multi30k). CONFIGS default to the CPU
# budget config, then de->en and en->de (the GPU-sized recipes; slow on a CPU). Each run
# ends with beam search on test_2016_flickr (train.final_eval), and the other Multi30k test sets
# are scored when DATA_DIR has them. Then the last 5 validation checkpoints are averaged and
# scored too.
set -euo pipefail
cd "$(dirname "$0")/.."
DATA=${1:-../shared/data/multi30k}
shift || true
CONFIGS=("$@")
[ ${#CONFIGS[@]} -gt 0 ] || CONFIGS=(configs/multi30k_de_en_cpu.yaml configs/multi30k_de_en.yaml configs/multi30k_en_de.yaml)
make setup >/dev/null
TINYT=.venv/bin/tinyt
RUNS=()
for config in "${CONFIGS[@]}"; do
  run=runs/$(basename "$config" .yaml)
  RUNS+=("$run")
  $TINYT train --config "$config" --data-dir "$DATA" --run-dir "$run" --overwrite
  src=$(.venv/bin/python -c "import yaml,sys; print(yaml.safe_load(open('$run/config.yaml'))['data']['src_lang'])")
  for extra in test_2017_flickr test_2017_mscoco test_2018_flickr; do
    if ls "$DATA/$extra.$src"* >/dev/null 2>&1; then
      $TINYT evaluate --run "$run" --split "$extra"
    fi
  done
  if $TINYT average --run "$run" -n 5; then
    $TINYT evaluate --run "$run" --checkpoint averaged.pt --split test
  fi
done
.venv/bin/python scripts/results_table.py "${RUNS[@]}"
