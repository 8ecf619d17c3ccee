#!/usr/bin/env bash
# Issue 11 on one H200: the one-layer profile, then the GPU tests (fast == reference, CUDA-graph capture).
# Usage on the device (after `source scripts/gpu_setup.sh`): bash benchmarks/gpu_issue11.sh [profile|graph|tests|all]
# A fresh machine compiles and autotunes every Triton kernel first (minutes): the timeouts leave room for it.
set -o pipefail
OUT=${OUT:-/tmp/issue11}
mkdir -p "$OUT"
what=${1:-all}
export OMP_NUM_THREADS=4
if [[ $what == profile || $what == all ]]; then
    timeout ${PROFILE_TIMEOUT:-240} python3 benchmarks/mate_layer_profile.py --tokens 65536 --no-decode --repeats 3 \
        --json "$OUT/layer_profile.json" 2>&1 | tee "$OUT/profile.log" | grep -v "^\s*$" | head -150
fi
if [[ $what == graph || $what == all ]]; then
    timeout ${GRAPH_TIMEOUT:-120} python3 -m pytest -q -s -m gpu -p no:cacheprovider -o faulthandler_timeout=30 \
        tests/layers/test_mate_gpu.py -k cuda_graph 2>&1 | tee "$OUT/graph_tests.log" | tail -60
fi
if [[ $what == tests || $what == all ]]; then
    timeout ${TESTS_TIMEOUT:-300} python3 -m pytest -q -s -m gpu -p no:cacheprovider -o faulthandler_timeout=60 \
        tests/layers/test_mate_gpu.py tests/ops/test_ssd_gpu.py 2>&1 | tee "$OUT/gpu_tests.log" | tail -60
fi
