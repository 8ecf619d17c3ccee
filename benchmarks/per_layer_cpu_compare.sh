#!/usr/bin/env bash
# Issue 17: gradient_checkpointing per_layer (stages 1-2) against the default (none) on the CPU: recipes/tiny.yaml,
# all three stages, float32, one thread, compared by benchmarks/compare_runs.py (identical means every loss of
# every step is the same bits). ~4 min on two busy cores.
#   bash benchmarks/per_layer_cpu_compare.sh [OUT]    (default benchmarks/results/2026-12-04/session17/distill_cpu)
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-benchmarks/results/2026-12-04/session17/distill_cpu}
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT
mkdir -p "$OUT"
export OMP_NUM_THREADS=1 LINMU_NUM_THREADS=1 HF_HUB_OFFLINE=1
for run in default per_layer; do
  extra=()
  [ "$run" = per_layer ] && extra=(stages.stage1.gradient_checkpointing=per_layer stages.stage2.gradient_checkpointing=per_layer)
  t0=$SECONDS
  python -m linmu_cli distill recipes/tiny.yaml device=cpu "output=$WORK/$run" "${extra[@]}" >"$OUT/$run.log" 2>&1
  cp "$WORK/$run/metrics.jsonl" "$OUT/$run.metrics.jsonl"
  echo "$run: $((SECONDS - t0)) s" | tee -a "$OUT/wall.txt"
done
python benchmarks/compare_runs.py "$WORK/default" "$WORK/per_layer" --json "$OUT/compare_per_layer.json" | tee "$OUT/compare_per_layer.txt"
