#!/usr/bin/env bash
# Issue 11 on one H200: the one-layer profile, then the GPU tests (every GPU test file: fast == reference, CUDA graphs).
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
    # every GPU test file, named (collecting all of tests/ runs the CPU suite's imports too); a cold machine
    # autotunes for ~2 minutes first
    timeout ${TESTS_TIMEOUT:-420} python3 -m pytest -v -s -m gpu -p no:cacheprovider -o faulthandler_timeout=120 \
        --durations=20 tests/bench/test_bench_gpu.py tests/layers/test_mate_gpu.py tests/models/test_hf_gpu.py \
        tests/ops/test_decode_attention.py tests/ops/test_ssd_gpu_paths.py tests/ops/test_ssd_gpu.py tests/test_cuda_graphs.py \
        2>&1 | tee "$OUT/gpu_tests.log" | grep -E "PASS|FAIL|ERROR|rel\. error|passed|failed" | tail -80
fi
