#!/usr/bin/env bash
# Issue 17: does each distillation speed-up keep the loss curve? The tiny recipe (recipes/tiny.yaml, all three
# stages, CPU, float32, one thread) before the changes (git ref BEFORE, default 7a18739) and after, with each
# new option on its own, compared by benchmarks/compare_runs.py. Keeps metrics.jsonl / report.json of every run,
# the comparison JSON and the logs under OUT (default benchmarks/results/2026-12-01/distill_cpu).
# The noise run: the same recipe and code on 2 CPU threads (kernels reduce in another order): every comparison's
# tolerance is 2x its per-stage difference (benchmarks/compare_runs.py --noise). Wall time ~10 min on 2 busy cores.
#   bash benchmarks/distill_cpu_compare.sh [OUT] [BEFORE]      (REUSE=1: only the runs OUT does not hold yet)
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-benchmarks/results/2026-12-01/distill_cpu}
BEFORE=${2:-7a18739}
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT
mkdir -p "$OUT"
export OMP_NUM_THREADS=1 LINMU_NUM_THREADS=1 HF_HUB_OFFLINE=1
git archive "$BEFORE" | tar -x -C "$WORK" --one-top-level=before

all() {  # the same override for the three stages
  for s in stage1 stage2 stage3; do printf 'stages.%s.%s ' "$s" "$1"; done
}

run() {  # run NAME CODE_DIR OVERRIDES...   (THREADS=n: another CPU thread count)
  local name=$1 code=$2
  shift 2
  if [ -n "${REUSE:-}" ] && [ -f "$OUT/$name.metrics.jsonl" ]; then  # REUSE=1: keep the runs already in OUT
    mkdir -p "$WORK/runs/$name" && cp "$OUT/$name.metrics.jsonl" "$WORK/runs/$name/metrics.jsonl"
    return
  fi
  local t0=$SECONDS
  OMP_NUM_THREADS=${THREADS:-1} LINMU_NUM_THREADS=${THREADS:-1} PYTHONPATH=$code python -m linmu_cli distill recipes/tiny.yaml "output=$WORK/$name" "$@" \
    >"$OUT/$name.log" 2>&1
  cp "$WORK/$name/metrics.jsonl" "$OUT/$name.metrics.jsonl"
  cp "$WORK/$name/report.json" "$OUT/$name.report.json"
  mkdir -p "$WORK/runs/$name" && cp "$WORK/$name/metrics.jsonl" "$WORK/runs/$name/"
  echo "$name: $((SECONDS - t0)) s" | tee -a "$OUT/wall.txt"
}

[ -n "${REUSE:-}" ] || : >"$OUT/wall.txt"
run before "$WORK/before"
run after "$PWD"
THREADS=2 run noise_threads2 "$PWD"  # the same code and recipe on 2 threads: rounding noise only
# shellcheck disable=SC2046  # word splitting of the overrides is intended
{
  run optimizer_for_loop "$PWD" $(all optimizer=for_loop)
  run optimizer_foreach "$PWD" $(all optimizer=foreach)
  run optimizer_fused "$PWD" $(all optimizer=fused)
  run ckpt_all "$PWD" $(all gradient_checkpointing=all)
  run ckpt_every_other "$PWD" $(all gradient_checkpointing=every_other)
  run ckpt_mlp_only "$PWD" $(all gradient_checkpointing=mlp_only)
  run prefetch2 "$PWD" $(all prefetch=2)
  run share_embeds "$PWD" stages.stage3.share_teacher_embeddings=true
  run combined "$PWD" $(all optimizer=fused) $(all gradient_checkpointing=every_other) $(all prefetch=2) \
    stages.stage3.share_teacher_embeddings=true
}
run hidden_layers_1 "$PWD" "stages.stage3.loss.hidden_layers=[1]"  # a different loss: must differ

REPO=$PWD
OUT=$(cd "$OUT" && pwd)
cd "$WORK/runs"  # the reports name the runs as they are named here
N=(--noise noise_threads2)
cmp() { local name=$1; shift; python "$REPO/benchmarks/compare_runs.py" "$@" --json "$OUT/compare_$name.json" | tee "$OUT/compare_$name.txt"; }
cmp noise after noise_threads2  # the tolerance every comparison below uses (2x these differences)
cmp before_after before after
cmp optimizer after optimizer_* "${N[@]}"
cmp checkpointing after ckpt_* "${N[@]}"
cmp prefetch after prefetch2 "${N[@]}"
cmp share_embeds after share_embeds "${N[@]}"
cmp combined before combined "${N[@]}"
cmp hidden_layers after hidden_layers_1 "${N[@]}"
