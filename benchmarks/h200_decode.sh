#!/usr/bin/env bash
# Issue 13 (and 11/12) on one H200, in ONE device call of < 10 min: the fused decode kernels' GPU tests, the decode
# step of both models kernel by kernel, generate() against the bench's step, and the 2048-frame prefill check.
# Run from the repo root with .whl carried (fla-core + mamba-ssm wheels):  bash benchmarks/h200_decode.sh
# Each part has a deadline (seconds from the start) so that a slow part cannot starve the ones after it; everything
# lands in $OUT (8 files):
#   tests_decode.log    the new decode kernels against their references (rms_norm / silu_mul, the Flex-MA step and
#                       conv kernels, Local-Swin's rotary and ring attention, generate()'s loop) + the gated norm past
#                       int32 offsets                                                       deadline 270 s
#   decode_step.{json,log}   benchmarks/decode_step_profile.py at 7B shape, batch 1 and 16    deadline 380 s
#   layer_262k.{json,log}    one M-MATE layer forward at 262,181 tokens (2048 frames): runs, finite  deadline 440 s
#   generate_speed.{json,log} generate(cache_implementation="static") against the bench's step     deadline 525 s
#   tests_graphs.log    the graph recorder, the bench GPU tests, the fast block fwd+bwd and its prefill capture  deadline 590 s
set -o pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.." || exit 1
[ -n "${NO_GPU_SETUP:-}" ] || source scripts/gpu_setup.sh >/dev/null
export PYTHONPATH="$PWD:$PYTHONPATH" PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 COLUMNS=200 OMP_NUM_THREADS=4
OUT="${OUT:-/tmp/linmu_decode}"; mkdir -p "$OUT"
T0=$SECONDS
left() { local t=$(( $1 - (SECONDS - T0) )); [ "$t" -gt 5 ] && echo "$t" || echo 5; }
PYTEST=(python3 -m pytest -v -s -m gpu -p no:cacheprovider -o faulthandler_timeout=120)

echo "== 1. decode kernels vs references ($((SECONDS - T0)) s)"
timeout -k 5 "$(left 270)" "${PYTEST[@]}" tests/ops/test_flex_decode.py tests/ops/test_rms_norm.py \
  tests/test_decode_layer.py tests/ops/test_swin_kernels.py tests/layers/test_local_swin_gpu.py tests/models/test_hf_gpu.py \
  tests/layers/test_mate_gpu.py::test_gated_norm_past_int32_offsets_equals_reference 2>&1 | tee "$OUT/tests_decode.log" \
  | grep -E "PASS|FAIL|ERROR|SKIP|error|passed|failed" | tail -60

echo "== 2. decode step profile, 7B shape ($((SECONDS - T0)) s)"
timeout -k 5 "$(left 380)" python3 benchmarks/decode_step_profile.py --arch qwen2-vl-7b --batch 1,16 --norm-mlp auto \
  --json "$OUT/decode_step.json" 2>&1 | tee "$OUT/decode_step.log" | tail -40

echo "== 3. one M-MATE layer at 262,181 tokens (2048 frames) ($((SECONDS - T0)) s)"
timeout -k 5 "$(left 440)" python3 benchmarks/mate_layer_profile.py --tokens 262144 --no-decode --repeats 1 --forward-only \
  --json "$OUT/layer_262k.json" 2>&1 | tee "$OUT/layer_262k.log" | tail -12

echo "== 4. generate() against the bench's step ($((SECONDS - T0)) s)"
timeout -k 5 "$(left 525)" python3 benchmarks/generate_speed.py --arch qwen2-vl-7b --batches 1,16 --short 16 --long 112 \
  --repeats 2 --skip-default --json "$OUT/generate_speed.json" 2>&1 | tee "$OUT/generate_speed.log" | tail -8

echo "== 5. graph recorder, bench GPU tests (served teacher, static decoder), the fast block fwd+bwd ($((SECONDS - T0)) s)"
timeout -k 5 "$(left 590)" "${PYTEST[@]}" tests/test_cuda_graphs.py tests/bench/test_bench_gpu.py tests/layers/test_mate_gpu.py \
  2>&1 | tee "$OUT/tests_graphs.log" | grep -E "PASS|FAIL|ERROR|passed|failed" | tail -40
echo "done in $((SECONDS - T0)) s"
