#!/usr/bin/env bash
# One H200 call for the core issues: (1) a full M-MATE block, fast SSD path vs reference, forward and backward;
# (2) the CPU test-suite under the device's transformers release (5.17: compatibility); (3) distillation
# throughput per stage at Qwen2-VL-7B shape. Logs and JSON land in $OUT.
#   bash scripts/gpu_check.sh        (repo root, .whl carried)
set -o pipefail
source scripts/gpu_setup.sh >/dev/null
export PYTHONPATH="$PWD:$PYTHONPATH" PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
OUT="${OUT:-/tmp/linmu_out}"; mkdir -p "$OUT"
python3 -c "import torch, transformers, triton; print('torch', torch.__version__, 'transformers', transformers.__version__, 'triton', triton.__version__, torch.cuda.get_device_name(0))"
echo "== 1. M-MATE block: fast path vs reference"
timeout 200 python3 -m pytest -s -q -m gpu tests/layers/test_mate_gpu.py -p no:cacheprovider 2>&1 | tee "$OUT/gpu_block.log" | tail -15
echo "== 2. CPU suite under this transformers"
timeout 240 python3 -m pytest -q -m "not gpu" tests -x -p no:cacheprovider --ignore=tests/evaluation/test_eval.py \
  --ignore=tests/bench/test_bench.py -k "not manifest" 2>&1 | tee "$OUT/cpu_suite.log" | tail -15
echo "== 3. distillation throughput at 7B shape"
timeout 240 python3 benchmarks/distill_throughput.py --arch qwen2-vl-7b --frames 64 --steps 3 --json "$OUT/distill_7b.json" 2>&1 | tee "$OUT/distill_7b.log" | tail -12
