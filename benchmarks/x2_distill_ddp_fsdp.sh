#!/usr/bin/env bash
# Issue 7 on nvidia-h200-x2: `linmu distill` itself with 2 processes (accelerate launch), DDP and FSDP, against a
# 1-GPU run of the same global batch; FSDP is killed (SIGKILL, both ranks) after its first stage-2 checkpoint and
# resumed. Real Qwen2-VL-2B shape with random weights (`teacher=random:qwen2-vl-2b`; 7B checkpoints of ~40 GB per
# stage would not fit the time), built-in synthetic data at 448x448. Output: $OUT/ddp_fsdp.tar (metrics, reports,
# compare.json from benchmarks/compare_runs.py, logs). Wall time ~9 min (the 1-GPU run alone took 185 s).
# Session 2 ran only its 1-GPU and DDP parts (device time); the FSDP kill/resume part is untested on GPUs.
set -o pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
source scripts/gpu_setup.sh >/dev/null
export PYTHONPATH="$PWD:$PYTHONPATH" PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 COLUMNS=160
R=/tmp/linmu_x2c; rm -rf "$R"; mkdir -p "$R"; T0=$SECONDS
df -h /tmp /dev/shm | tee "$R/df.log"
S=""; for st in stage1 stage2 stage3; do
  S="$S stages.$st.steps=${STEPS:-8} stages.$st.save_every=4 stages.$st.warmup_steps=2 stages.$st.log_every=1"
done
COMMON="teacher=random:qwen2-vl-2b data.source=synthetic data.size=448 data.frames=16 data.heldout=1 $S"
ACC=(accelerate launch --num_processes 2 --num_machines 1 --mixed_precision no --dynamo_backend no -m linmu_cli)
slim() { find "$1" -name '*.safetensors' -delete; find "$1" -name 'train_state.pt' -delete; }  # keep the listing

echo "== 1 GPU, grad_accum 2   ($((SECONDS - T0)) s)"
G2="stages.stage1.grad_accum=2 stages.stage2.grad_accum=2 stages.stage3.grad_accum=2"
G1="stages.stage1.grad_accum=1 stages.stage2.grad_accum=1 stages.stage3.grad_accum=1"
CUDA_VISIBLE_DEVICES=0 timeout 200 python3 -m linmu_cli distill recipes/qwen2-vl-7b.yaml $COMMON $G2 output=$R/one \
  > "$R/one.log" 2>&1; echo "exit $?"
tail -3 "$R/one.log"; slim "$R/one"
echo "== 2 GPUs DDP   ($((SECONDS - T0)) s)"
timeout 200 "${ACC[@]}" distill recipes/qwen2-vl-7b.yaml $COMMON $G1 output=$R/ddp > "$R/ddp.log" 2>&1; echo "exit $?"; tail -3 "$R/ddp.log"; slim "$R/ddp"
echo "== 2 GPUs FSDP, SIGKILL after the first stage-2 checkpoint, then --resume   ($((SECONDS - T0)) s)"
setsid "${ACC[@]}" distill recipes/qwen2-vl-7b.yaml $COMMON $G1 output=$R/fsdp distributed.strategy=fsdp \
  > "$R/fsdp.log" 2>&1 & PG=$!
for _ in $(seq 1 400); do [ -f "$R/fsdp/checkpoints/stage2/step-0000004/train_state.pt" ] && break; sleep 0.5; done
kill -9 -- -$PG 2>/dev/null; sleep 3; pkill -9 -f "output=$R/fsdp" 2>/dev/null; sleep 2
echo "killed at: $(ls $R/fsdp/checkpoints/stage2 2>/dev/null | tr '\n' ' ')"; cp "$R/fsdp/metrics.jsonl" "$R/fsdp_before_kill.jsonl"
timeout 200 "${ACC[@]}" distill recipes/qwen2-vl-7b.yaml $COMMON $G1 output=$R/fsdp distributed.strategy=fsdp \
  --resume > "$R/fsdp_resume.log" 2>&1; echo "exit $?"; tail -3 "$R/fsdp_resume.log"; slim "$R/fsdp"
python3 benchmarks/compare_runs.py "$R/one" "$R/ddp" "$R/fsdp" --json "$R/compare.json"
(cd "$R" && tar cf "$OUT/ddp_fsdp.tar" *.log *.json */metrics.jsonl */report.json */stage*/stage.json 2>/dev/null)
echo "done in $((SECONDS - T0)) s"
