#!/usr/bin/env bash
# Last H200 call of the first session (about 7 minutes of device time were left): the decode fast-path checks,
# a shortened bench sweep (64..1024 frames) and the per-stage distillation throughput with checkpointing.
#   bash scripts/gpu_final.sh   (repo root, .whl carried)
set -o pipefail
source scripts/gpu_setup.sh >/dev/null
export PYTHONPATH="$PWD:$PYTHONPATH" PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 COLUMNS=200
OUT="${OUT:-/tmp/linmu_out}"; mkdir -p "$OUT"; T0=$SECONDS
echo "== decode fast path checks"
timeout 60 python3 -m pytest -s -q -m gpu tests/bench/test_bench_gpu.py -p no:cacheprovider 2>&1 | tee "$OUT/gpu_tests.log" | tail -8
echo "== bench ($((SECONDS - T0)) s)"
timeout 190 python3 -m linmu_cli bench --arch qwen2-vl-7b --frames "${FRAMES:-64,256,512,1024}" --resolution 448 \
  --dtype bf16 --device cuda --json "$OUT/bench.json" --plot "$OUT/bench.png" --time-budget 150 --decode-seconds 0.5 \
  2>&1 | tee "$OUT/bench.log" | tail -45
[ -f "$OUT/bench.json" ] && python3 benchmarks/bench_report.py "$OUT/bench.json" --markdown "$OUT/bench.md" 2>&1 | tail -30
echo "== distill throughput ($((SECONDS - T0)) s)"
timeout 75 python3 benchmarks/distill_throughput.py --arch qwen2-vl-7b --frames 64 --steps 2 --checkpointing \
  --json "$OUT/distill_7b.json" 2>&1 | tee "$OUT/distill_7b.log" | tail -8
echo "done in $((SECONDS - T0)) s"
