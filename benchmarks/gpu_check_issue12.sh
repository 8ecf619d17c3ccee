#!/usr/bin/env bash
# One short H200 call (< 270 s) validating issue 12 before the lead's full sweep: the sweep script itself at
# 64 and 512 frames (served teacher + fast vision in the bench, vision tower profile at 512 frames, report), then
# the new GPU tests (served teacher vs transformers in bf16 with every kernel and the graph replay, decode kernels
# at the 7B shape, the fast tower at both real shapes in bf16). Files land in $OUT (7). BENCH_BUDGET counts from
# the bench start: build + warm-up take ~100 s on a fresh machine (2026-12-01: 55 s skipped every measurement).
set -o pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.." || exit 1
T0=$SECONDS
FRAMES=64,512 BENCH_BUDGET=150 VISION_FRAMES=512 VISION_REPEATS=1 timeout -k 5 230 bash benchmarks/h200_sweep.sh \
  2>&1 | tail -120
echo "== GPU tests ($((SECONDS - T0)) s so far)"
source scripts/gpu_setup.sh >/dev/null
export PYTHONPATH="$PWD:$PYTHONPATH" PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
left=$((250 - (SECONDS - T0)))
[ "$left" -gt 20 ] && timeout -k 5 "$left" python3 -m pytest -s -q -m gpu tests/bench/test_bench_gpu.py -p no:cacheprovider \
  -k "served or decode_kernels or fast_vision" 2>&1 | tee "$OUT/gpu_tests.log" | tail -25
echo "check done in $((SECONDS - T0)) s"
