#!/usr/bin/env bash
# One nvidia-h200-x2 lease, both GPUs busy (run from the repo root with .whl carried):
#   GPU 0: the issue-5 sweep (benchmarks/h200_sweep.sh, no GPU tests / profile), then the 1-GPU distillation
#          throughput at Qwen2-VL-7B shape with gradient checkpointing (issue 3; the 1-GPU side of issue 7's scaling)
#   GPU 1: two small-teacher trainings for issue 6 side by side (evals/train_teacher.py, time-boxed)
# $OUT gets: small.tar (logs, JSON, plot, both teachers' reports) and teacher.tar.0* (the better teacher, split in
# 15 MiB parts: cat teacher.tar.* | tar x).   Wall time < 9.5 min.
set -o pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
source scripts/gpu_setup.sh >/dev/null
export PYTHONPATH="$PWD:$PYTHONPATH" PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 COLUMNS=200
R=/tmp/linmu_x2a; rm -rf "$R"; mkdir -p "$R"
T0=$SECONDS
TEACH=(--time-budget "${TEACHER_BUDGET:-360}" --workers 8 --image-batch 24 --video-batch 40 --eval-every 1000 --threads 2)
CUDA_VISIBLE_DEVICES=1 timeout 520 python3 evals/train_teacher.py --out "$R/teacher_a" --steps 100000 "${TEACH[@]}" \
  > "$R/teacher_a.log" 2>&1 &
CUDA_VISIBLE_DEVICES=1 timeout 520 python3 evals/train_teacher.py --out "$R/teacher_b" --steps 100000 "${TEACH[@]}" \
  --vision-depth 6 --rope-theta 10000 --lr 1.5e-3 > "$R/teacher_b.log" 2>&1 &

CUDA_VISIBLE_DEVICES=0 OUT="$R" SKIP_GPU_TESTS=1 SKIP_PROFILE=1 BENCH_BUDGET="${BENCH_BUDGET:-270}" \
  bash benchmarks/h200_sweep.sh 2>&1 | tail -60
echo "== distill throughput, 7B shape, 1 GPU, checkpointing   ($((SECONDS - T0)) s so far)"
CUDA_VISIBLE_DEVICES=0 timeout 170 python3 benchmarks/distill_throughput.py --arch qwen2-vl-7b --frames 64 --steps 3 \
  --checkpointing --json "$R/distill_7b_1gpu.json" 2>&1 | grep -v -i warn | tee "$R/distill_7b_1gpu.log"
echo "== waiting for the teachers   ($((SECONDS - T0)) s so far)"
wait
tail -5 "$R"/teacher_*.log
OUT="$OUT" bash benchmarks/pack_teachers.sh "$R"
echo "done in $((SECONDS - T0)) s"
