#!/usr/bin/env bash
# Issue 2 on the H200: the fast SSD paths against the reference (ops and a full M-MATE block, forward and
# backward), and the CPU test-suite under the device's transformers release (5.17) for compatibility.
# Run from the repo root on the GPU machine with .whl carried: bash scripts/gpu_issue2.sh
set -o pipefail
source scripts/gpu_setup.sh
export PYTHONPATH="$PWD:$PYTHONPATH" PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
python3 -c "import torch, transformers, triton; print('torch', torch.__version__, 'transformers', transformers.__version__, 'triton', triton.__version__)"
python3 -m linmu_cli doctor
python3 -m pytest -s -q -m gpu tests/ops/test_ssd_gpu.py tests/layers/test_mate_gpu.py 2>&1 | tee "${OUT:-/tmp}/gpu_tests.log"
python3 -m pytest -q -m "not gpu" tests -p no:cacheprovider 2>&1 | tail -25 | tee "${OUT:-/tmp}/cpu_tests_on_device.log"
