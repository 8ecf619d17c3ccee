#!/usr/bin/env bash
# Issue 12, served-teacher decode attention on one H200, in one device call (< 10 min): the split-KV Triton
# kernel (`triton_split_kv`, linmu_cli/ops/decode_attention/) timed alone (first: it records a failing config as
# a result), checked by the GPU tests, then the bench at 512 frames, where `choose_kernel` picks among all kernels
# by CUDA-graph timing. Files land in $OUT:
#   gpu_tests.log       pytest -m gpu: the kernel at the 7B shape + CUDA-graph replay, the served teacher with
#                       every kernel against transformers, the kernels agreeing at the 7B shape
#   decode_attention.json / .log   benchmarks/decode_attention_kernels.py: every kernel and the Triton sweep,
#                       ms per layer call, bytes/s, fraction of the copy bandwidth, at batch 1 / 16 / 32
#   bench.json / bench.log         linmu bench --frames 512: decode.*.attention_kernel.trials_bytes_per_s and
#                       trials_of_copy_bandwidth per candidate, of_copy_bandwidth of the whole step
# Run from the repo root with .whl carried:  bash benchmarks/gpu_check_tdecode.sh
set -o pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.." || exit 1
source scripts/gpu_setup.sh >/dev/null
export PYTHONPATH="$PWD:$PYTHONPATH" PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 COLUMNS=200
OUT="${OUT:-/tmp/linmu_tdecode}"; mkdir -p "$OUT"
T0=$SECONDS
status=0

echo "== 1. decode attention kernels alone"
timeout -k 5 170 python3 benchmarks/decode_attention_kernels.py --json "$OUT/decode_attention.json" \
  2>&1 | tee "$OUT/decode_attention.log" | tail -80
[ "${PIPESTATUS[0]}" -ne 0 ] && status=1

echo "== 2. GPU tests ($((SECONDS - T0)) s so far)"
timeout -k 5 150 python3 -m pytest -s -q -m gpu -p no:cacheprovider tests/ops/test_decode_attention.py \
  tests/bench/test_bench_gpu.py -k "triton or served or decode_kernels" 2>&1 | tee "$OUT/gpu_tests.log" | tail -25
[ "${PIPESTATUS[0]}" -ne 0 ] && status=2

left=$((570 - (SECONDS - T0)))
echo "== 3. linmu bench --frames 512 ($((SECONDS - T0)) s so far, $left s left)"
if [ "$left" -gt 200 ]; then
  timeout -k 10 $((left - 10)) python3 -m linmu_cli bench --arch qwen2-vl-7b --frames 512 --resolution 448 \
    --dtype bf16 --device cuda --json "$OUT/bench.json" --time-budget $((left - 90)) --decode-seconds 0.5 \
    2>&1 | tee "$OUT/bench.log" | tail -40
  rc=${PIPESTATUS[0]}
  if [ "$rc" -eq 124 ] || [ "$rc" -eq 137 ]; then rc=3; fi  # not the device call's own timeout
  [ "$rc" -ne 0 ] && status=$rc
  python3 - "$OUT/bench.json" <<'EOF' 2>&1 | tee -a "$OUT/bench.log"
import json, sys
res = json.load(open(sys.argv[1]))
for row in res["results"]:
    for key, entry in row["teacher"]["decode"].items():
        if entry.get("status") != "ok":
            print(row["frames"], key, entry.get("status"))
            continue
        k = entry["attention_kernel"]
        trials = {n: f"{100 * f:.0f}%" for n, f in k.get("trials_of_copy_bandwidth", {}).items()}
        print(f"{row['frames']} frames {key} b={entry['batch']}: step {entry['step_ms']:.2f} ms, "
              f"{100 * entry['of_copy_bandwidth']:.0f}% of copy; picked {k['name']}; trials (of copy) {trials}")
EOF
else
  echo "bench skipped: only $left s left"
fi
echo "done in $((SECONDS - T0)) s, status $status"
exit $status
