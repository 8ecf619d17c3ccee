#!/usr/bin/env bash
# Issue 11 on one H200: the GPU equivalence tests (fast == reference, CUDA-graph capture) and the one-layer
# profile. Usage on the device (after `source scripts/gpu_setup.sh`): bash benchmarks/gpu_issue11.sh [tests|profile|all]
set -o pipefail
OUT=${OUT:-/tmp/issue11}
mkdir -p "$OUT"
what=${1:-all}
export OMP_NUM_THREADS=4
if [[ $what == tests || $what == all ]]; then
    timeout 200 python3 -m pytest -q -s -m gpu -p no:cacheprovider tests/test_mate_gpu.py tests/test_ssd_gpu.py 2>&1 \
        | tee "$OUT/gpu_tests.log" | tail -60
fi
if [[ $what == profile || $what == all ]]; then
    timeout ${PROFILE_TIMEOUT:-240} python3 benchmarks/mate_layer_profile.py --tokens 65536 --no-decode \
        --json "$OUT/layer_profile.json" 2>&1 | tee "$OUT/profile.log" | grep -v "^\s*$" | head -150
fi
