#!/usr/bin/env bash
# One short H200 call (< 7 min on a fresh machine) that validates kernels changed since their last GPU run and
# re-measures what they touch. Run from the repo root with .whl carried (fla-core + mamba-ssm wheels):
#
#   TESTS="tests/ops/test_x.py::test_a tests/layers/test_y.py" bash benchmarks/h200_validate.sh
#
# Each part has a deadline (seconds from the start, scaled by TOTAL, default 380) so that a slow part cannot starve
# the ones after it. Everything lands in $OUT (<= 8 files):
#   tests.log              pytest -m gpu on $TESTS (the new kernels against their references)     deadline 0.36 TOTAL
#   decode_bf16.{json,log} LinMU's decode step with a bf16 SSM state at its largest batches
#                          (decode_step_profile.py --runners linmu --ssm-dtype bfloat16)          deadline 0.44 TOTAL
#   layer_65k.{json,log}   one M-MATE layer at 65,573 tokens (512 frames), with the kernel table  deadline 0.76 TOTAL
#   layer_8k.{json,log}    one M-MATE layer at 8,229 tokens (64 frames), with the kernel table    deadline TOTAL
# Environment: TESTS (pytest node ids, default: the layer GPU tests), DECODE_BATCHES (default 1024,1536), TOTAL.
set -o pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.." || exit 1
[ -n "${NO_GPU_SETUP:-}" ] || source scripts/gpu_setup.sh >/dev/null
export PYTHONPATH="$PWD:$PYTHONPATH" PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 COLUMNS=200 OMP_NUM_THREADS=4
OUT="${OUT:-/tmp/linmu_validate}"; mkdir -p "$OUT"
TOTAL="${TOTAL:-380}"
TESTS="${TESTS:-tests/layers/test_mate_gpu.py}"
T0=$SECONDS
left() { local t=$(( $1 * TOTAL / 100 - (SECONDS - T0) )); [ "$t" -gt 5 ] && echo "$t" || echo 5; }

echo "== 1. GPU tests: $TESTS ($((SECONDS - T0)) s)"
# shellcheck disable=SC2086  # TESTS is a list of node ids
timeout -k 5 "$(left 36)" python3 -m pytest -v -s -m gpu -p no:cacheprovider -o faulthandler_timeout=120 $TESTS \
  2>&1 | tee "$OUT/tests.log" | grep -E "PASS|FAIL|ERROR|SKIP|passed|failed|rel|err" | tail -40

echo "== 2. LinMU decode step, bf16 SSM state, batch ${DECODE_BATCHES:-1024,1536} ($((SECONDS - T0)) s)"
timeout -k 5 "$(left 44)" python3 benchmarks/decode_step_profile.py --arch qwen2-vl-7b --runners linmu \
  --batch "${DECODE_BATCHES:-1024,1536}" --ssm-dtype bfloat16 --norm-mlp auto --json "$OUT/decode_bf16.json" \
  2>&1 | tee "$OUT/decode_bf16.log" | grep -v Warning | tail -14

echo "== 3. one M-MATE layer at 65,573 tokens ($((SECONDS - T0)) s)"
timeout -k 5 "$(left 76)" python3 benchmarks/mate_layer_profile.py --tokens 65536 --no-decode --repeats 3 \
  --json "$OUT/layer_65k.json" 2>&1 | tee "$OUT/layer_65k.log" | grep -E "^[a-z_]+ +[0-9.]+ ms|floor:" | head -24

echo "== 4. one M-MATE layer at 8,229 tokens ($((SECONDS - T0)) s)"
timeout -k 5 "$(left 100)" python3 benchmarks/mate_layer_profile.py --tokens 8192 --no-decode --repeats 3 \
  --json "$OUT/layer_8k.json" 2>&1 | tee "$OUT/layer_8k.log" | grep -E "^[a-z_]+ +[0-9.]+ ms|floor:" | head -24
echo "done in $((SECONDS - T0)) s"
