#!/usr/bin/env bash
# One nvidia-h200-x2 lease (run from the repo root with .whl carried); results in $OUT/small.tar and
# $OUT/teacher.tar.* (the better of two small teachers: cat teacher.tar.* | tar x).
#   phase 1, GPU 0: distillation throughput per stage at Qwen2-VL-7B shape on 1 GPU, with gradient checkpointing
#                   (issue 3; the 1-GPU side of issue 7's scaling)
#            GPU 1: two time-boxed small-teacher trainings for issue 6 (evals/train_teacher.py, lr 1e-3 / 2e-3)
#   phase 2, both:  the same throughput with 2 processes (torchrun, DDP), stages 1 and 3 (issue 7's scaling)
set -o pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
source scripts/gpu_setup.sh >/dev/null
export PYTHONPATH="$PWD:$PYTHONPATH" PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 COLUMNS=200
R=/tmp/linmu_x2b; rm -rf "$R"; mkdir -p "$R"; T0=$SECONDS
TEACH=(--steps 100000 --time-budget "${TEACHER_BUDGET:-230}" --workers 8 --image-batch 24 --video-batch 40
       --eval-every 400 --curriculum 100 700)
for v in a b; do
  lr=$([ $v = a ] && echo 1e-3 || echo 2e-3)
  CUDA_VISIBLE_DEVICES=1 timeout 330 python3 evals/train_teacher.py --out "$R/teacher_$v" "${TEACH[@]}" --lr $lr \
    > "$R/teacher_$v.log" 2>&1 &
done
DT=(python3 benchmarks/distill_throughput.py --arch qwen2-vl-7b --frames 64 --steps 2 --checkpointing)
CUDA_VISIBLE_DEVICES=0 timeout 300 "${DT[@]}" --json "$R/distill_7b_1gpu.json" 2>&1 | grep -v -i warn \
  | tee "$R/distill_7b_1gpu.log"
echo "== waiting for the teachers   ($((SECONDS - T0)) s so far)"; wait
for v in a b; do grep -v "^step" "$R/teacher_$v.log" | tail -6; done
echo "== 2 GPUs, DDP   ($((SECONDS - T0)) s so far)"
timeout 170 torchrun --nproc_per_node 2 "${DT[@]:1}" --strategy ddp --stages stage1,stage3 \
  --json "$R/distill_7b_2gpu_ddp.json" 2>&1 | grep -v -i warn | tee "$R/distill_7b_2gpu_ddp.log"
OUT="$OUT" bash benchmarks/pack_teachers.sh "$R"
echo "done in $((SECONDS - T0)) s"
