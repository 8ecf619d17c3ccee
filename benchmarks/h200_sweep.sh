#!/usr/bin/env bash
# Issue 12 on one H200: `linmu bench` at Qwen2-VL-7B shape (random weights, bf16, 448x448 frames) over
# 64,128,256,512,1024,2048 frames against the served teacher (static KV cache + CUDA graph; transformers'
# generate() path as teacher_hf), both models on the fast vision tower; then the vision tower alone
# (transformers vs linmu_cli.vision) at 512 frames for both tower families. Everything lands in $OUT (<= 8 files):
#   bench.log, bench.json, bench.png, bench.md (tables + targets), vision.log, vision.json [, gpu_tests.log]
# Run from the repo root with .whl carried (fla-core + mamba-ssm wheels):  bash benchmarks/h200_sweep.sh
# Environment: FRAMES (default 64,...,2048), BENCH_BUDGET (s from the bench start, default 420: build + warm-up
#   take ~100 s on a fresh machine (Triton / inductor compiles); later measurements are "skipped"), VISION_FRAMES (512), GPU_TESTS=1 (also run tests/bench/test_bench_gpu.py first, ~60 s),
#   SKIP_VISION=1, PROFILE_LAYER=1 (also benchmarks/mate_layer_profile.py, another ~50 s).
# Wall time: ~5-6 min bench (hard timeout BUDGET + 80 s; the JSON is rewritten after every frame count, so a
#   timeout still leaves every finished frame count) + ~1 min vision (at most 90 s, and only while the script is
#   under 560 s) + report (at most 30 s): < 10 min in every case.
set -o pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.." || exit 1
source scripts/gpu_setup.sh >/dev/null
export PYTHONPATH="$PWD:$PYTHONPATH" PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 COLUMNS=200
OUT="${OUT:-/tmp/linmu_bench}"; mkdir -p "$OUT"
FRAMES="${FRAMES:-64,128,256,512,1024,2048}"
BUDGET="${BENCH_BUDGET:-420}"
T0=$SECONDS
status=0

{
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
  python3 -c "import torch, transformers, triton; print('torch', torch.__version__, 'transformers', transformers.__version__, 'triton', triton.__version__)"
} 2>&1 | tee "$OUT/bench.log"

if [ -n "${GPU_TESTS:-}" ]; then
  echo "== 0. GPU tests: decode fast paths, served teacher, fast vision tower in bf16, tiny bench"
  timeout 150 python3 -m pytest -s -q -m gpu tests/bench/test_bench_gpu.py -p no:cacheprovider 2>&1 | tee "$OUT/gpu_tests.log" | tail -15
  echo "gpu tests exit code ${PIPESTATUS[0]} ($((SECONDS - T0)) s so far)"
fi

echo "== 1. linmu bench --arch qwen2-vl-7b --frames $FRAMES   ($((SECONDS - T0)) s so far)" | tee -a "$OUT/bench.log"
PLOT=(--plot "$OUT/bench.png")
python3 -c "import matplotlib" 2>/dev/null || { echo "matplotlib missing: no plot"; PLOT=(); }
timeout -k 10 $((BUDGET + 80)) python3 -m linmu_cli bench --arch qwen2-vl-7b --frames "$FRAMES" --resolution 448 \
  --dtype bf16 --device cuda --json "$OUT/bench.json" "${PLOT[@]}" --time-budget "$BUDGET" --decode-seconds 0.5 \
  2>&1 | tee -a "$OUT/bench.log"
rc=${PIPESTATUS[0]}
# 124 / 137 (its own hard timeout) would read as the device call timing out: report it as 3
if [ "$rc" -eq 124 ] || [ "$rc" -eq 137 ]; then echo "bench hit its hard timeout ($((BUDGET + 80)) s)"; rc=3; fi
echo "bench exit code $rc ($((SECONDS - T0)) s so far)" | tee -a "$OUT/bench.log"
[ "$rc" -ne 0 ] && status=$rc

VISION_LEFT=$((560 - (SECONDS - T0)))  # keep the whole script under 10 minutes: the tower profile gets what is left
[ "$VISION_LEFT" -gt 90 ] && VISION_LEFT=90
if [ -z "${SKIP_VISION:-}" ] && [ "$VISION_LEFT" -lt 30 ]; then
  echo "== 2. vision tower profile skipped: only $VISION_LEFT s left of the 10-minute budget"
elif [ -z "${SKIP_VISION:-}" ]; then
  echo "== 2. vision tower alone: transformers vs linmu fast tower, ${VISION_FRAMES:-512} frames   ($((SECONDS - T0)) s so far)"
  timeout -k 5 "$VISION_LEFT" python3 benchmarks/vision_profile.py --frames "${VISION_FRAMES:-512}" --repeats "${VISION_REPEATS:-1}" \
    --json "$OUT/vision.json" \
    2>&1 | tee "$OUT/vision.log" | tail -40
  rc=${PIPESTATUS[0]}; { [ "$rc" -eq 124 ] || [ "$rc" -eq 137 ]; } && rc=4; [ "$rc" -ne 0 ] && status=$rc
fi

if [ -f "$OUT/bench.json" ]; then  # also after a timeout: tables, targets, markdown and plot from the partial JSON
  echo "== report   ($((SECONDS - T0)) s so far)"
  timeout 30 python3 benchmarks/bench_report.py "$OUT/bench.json" --markdown "$OUT/bench.md" --plot "$OUT/bench.png" \
    --vision "$OUT/vision.json" 2>&1 | tee -a "$OUT/bench.log" | tail -70
fi

if [ -n "${PROFILE_LAYER:-}" ]; then
  echo "== 3. one M-MATE layer vs the teacher's attention at 64k tokens   ($((SECONDS - T0)) s so far)"
  timeout 55 python3 benchmarks/mate_layer_profile.py --tokens 65536 2>&1 | tee -a "$OUT/vision.log" | head -60
fi
echo "done in $((SECONDS - T0)) s (exit $status)"
exit $status
