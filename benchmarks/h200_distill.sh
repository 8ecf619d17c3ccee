#!/usr/bin/env bash
# Issue 17 on one H200, in ONE device call (< 8 min): where a distillation step's time goes, before and after the
# speed-ups, at Qwen2-VL-7B shape (random weights, bf16, one 8,258-token sample: 64 frames at 448x448, the
# default 7B recipe's LoRA r64 / dropout 0.05), and whether the new options keep the loss curve on the GPU.
# Run from the repo root with .whl carried (fla-core + mamba-ssm wheels):  bash benchmarks/h200_distill.sh
# Everything lands in $OUT:
#   distill.log, distill_throughput-7b.json   1. benchmarks/distill_throughput.py, one process, one teacher:
#       the baseline (teacher fwd+bwd) and the variants below, each with its per-phase breakdown
#   curves.log, curves_*.json, curves.tar      2. recipes/tiny.yaml on the GPU (bf16): the default recipe twice
#       (the GPU's run-to-run noise) and once with every new option, compared by benchmarks/compare_runs.py
# Variants of part 1 (docs/benchmarks.md, "Distillation at 7B shape"; the ones measured on 2026-12-02 and no longer
# run: before, trimmed_b2 / _b4, e2e_every_other, e2e_mlp_only; their numbers are in results/2026-12-02/session8/):
#   trimmed          fused AdamW, the teacher keeping only what the loss reads, the next sample prefetched,
#                    checkpointing all; stage 3 runs its own (frozen) vision tower, now outside autograd
#   recipe           the 7B recipes' defaults: trimmed + stages 1-2 checkpointing every other layer + stage 3
#                    starting from the teacher's input embeddings (no second vision pass)
#   recipe_fla       recipe on fla's scans, forward and backward (fla's issue-#640 guard lifted at K = 128)
#   candidate        recipe + stage 3 checkpointing every other layer (122 GiB without shared embeddings)
#   candidate_fla    candidate on fla's scans
#   candidate_fla_kltorch  candidate_fla with stage 3's logit KL on the torch formula (candidate_fla runs the fused
#                    Triton kernel, the default on CUDA: linmu_cli.ops.logit_kl)
#   e2e_none         trimmed, stage 3 without checkpointing (expected to run out of memory: recorded as oom)
#   defaults_s1      stage 1 as recipes/qwen2-vl-7b.yaml now runs it (= recipe's stage 1)
#   defaults_s1_fla  defaults_s1 on fla's scans (stage 1's A/B of the scan kernel)
#   defaults_s2      stage 2 as the 7B recipe now runs it: every other layer recomputed, fla's scans
#                    (with candidate_fla for stage 3: ONLY="defaults_s1 defaults_s2 candidate_fla")
#   s1_per_layer     defaults_s1_fla with each layer's backward right after its forward (gradient_checkpointing:
#                    per_layer: nothing recomputed, one layer's activations held; the same gradients bit for bit)
#   s2_per_layer     defaults_s2 the same way
#   s3_none_fla      candidate_fla without checkpointing (121 GiB expected now that the KL holds no temporaries)
#   warm_first       defaults_s2 under another name, to measure first and ignore: with the compiled tower the first
#                    variant after the baseline had a slower student forward (sessions 13-14, docs/benchmarks.md)
# Environment: BUDGET (s for part 1's measurements, default 330; later variants are recorded as skipped and
#   the JSON is rewritten after every stage, so a timeout still leaves everything measured), STEPS (3),
#   ONLY="recipe candidate_fla" (run only the named variants, in that order), SKIP_THROUGHPUT=1 (no part 1), SKIP_CURVES=1,
#   FAST_VISION (part 1's --fast-vision: off (default, transformers' tower) | eager | compiled: the teacher's and
#   the students' vision towers through linmu_cli.vision, the baseline's teacher included),
#   CURVE_RUNS (part 2's runs, default "default default_again new"; also fused, every_other, prefetch, shared:
#   one option of "new" each; vision: fast_vision=true (the teacher's tower through linmu_cli.vision, compile
#   auto; vision_eager: the same with vision_compile=off); fla: model.ssd_backend=fla (fla's scans in every stage);
#   kl_torch / kl_triton: stage 3's logit KL on the torch formula / the Triton kernel (linmu_cli.ops.logit_kl);
#   per_layer: stages 1-2 gradient_checkpointing=per_layer; e2e_none: stage 3 without checkpointing; recipe7b: the new 7B defaults together
#   (new + vision + fla); ~50 s per run on the GPU. fla and recipe7b are GPU-only: fla does not run on the CPU)
#   CURVES_REF=path/curves.tar (the reference and noise runs, default / default_again, from an earlier call's tar),
#   CURVE_EXTRA (overrides added to every curve run, e.g. "teacher=tiny-qwen2.5-vl": Qwen2.5-VL's tower),
#   (part 2 starts only before CURVES_START = 300 s and each of its runs only before CURVES_LAST = 370 s, the
#   the call's first run at most FIRST_TIMEOUT = 240 s (it compiles the kernels: 145 s in session 11), the others TINY_TIMEOUT = 150 s); for a CPU dry run of the whole script: NO_GPU_SETUP=1 ARCH=tiny-qwen2-vl FRAMES=8 RES=112
#   DEVICE=cpu STEPS=1 (validated that way: all parts run, every JSON written, 78 s on an idle CPU).
set -o pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.." || exit 1
[ -n "${NO_GPU_SETUP:-}" ] || source scripts/gpu_setup.sh >/dev/null
export PYTHONPATH="$PWD:$PYTHONPATH" PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 COLUMNS=200
OUT="${OUT:-/tmp/linmu_distill}"; mkdir -p "$OUT"
BUDGET="${BUDGET:-330}"
T0=$SECONDS

{
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
  python3 -c "import torch, transformers, triton; print('torch', torch.__version__, 'transformers', transformers.__version__, 'triton', triton.__version__)"
} 2>&1 | tee "$OUT/distill.log"
python3 -c "import linmu_cli; print('linmu_cli from', linmu_cli.__file__)" 2>&1 | tee -a "$OUT/distill.log"

T="ckpt=all,optimizer=fused,teacher_keep=used,prefetch=1"
ALL_VARIANTS=(
  "trimmed:$T,ckpt_e2e=all"
  "recipe:$T,ckpt=every_other,ckpt_e2e=all,share_embeds=1"
  "recipe_fla:$T,ckpt=every_other,ckpt_e2e=all,share_embeds=1,ssd=fla"
  "candidate:$T,ckpt=every_other,ckpt_e2e=every_other,share_embeds=1,stages=stage3"
  "candidate_fla:$T,ckpt=every_other,ckpt_e2e=every_other,share_embeds=1,stages=stage3,ssd=fla"
  "candidate_fla_kltorch:$T,ckpt=every_other,ckpt_e2e=every_other,share_embeds=1,stages=stage3,ssd=fla,kl=torch"
  "e2e_none:$T,ckpt_e2e=none,stages=stage3"
  "defaults_s1:$T,ckpt=every_other,stages=stage1"
  "defaults_s1_fla:$T,ckpt=every_other,stages=stage1,ssd=fla"
  "defaults_s2:$T,ckpt=every_other,stages=stage2,ssd=fla"
  "warm_first:$T,ckpt=every_other,stages=stage2,ssd=fla"
  "s1_per_layer:$T,ckpt=per_layer,stages=stage1,ssd=fla"
  "s2_per_layer:$T,ckpt=per_layer,stages=stage2,ssd=fla"
  "s3_none_fla:$T,ckpt_e2e=none,share_embeds=1,stages=stage3,ssd=fla"
)
ARGS=()
if [ -z "${ONLY:-}" ]; then
  for v in "${ALL_VARIANTS[@]}"; do ARGS+=(--variant "$v"); done
else  # in ONLY's order: what the budget cuts is the end of the list as the user wrote it
  for name in $ONLY; do
    for v in "${ALL_VARIANTS[@]}"; do [ "${v%%:*}" = "$name" ] && ARGS+=(--variant "$v"); done
  done
fi
# shellcheck disable=SC2086  # ONLY is a list of names
if [ -n "${ONLY:-}" ] && [ $((${#ARGS[@]} / 2)) -ne "$(echo $ONLY | wc -w)" ]; then
  echo "ONLY=\"$ONLY\" names a variant this script does not have; its variants: ${ALL_VARIANTS[*]%%:*}" >&2; exit 2
fi
CURVE_NAMES=" default default_again new fused every_other prefetch shared vision vision_eager fla kl_torch kl_triton per_layer e2e_none recipe7b "
FAST_VISION="${FAST_VISION:-off}"
case $FAST_VISION in off|eager|compiled) ;; *) echo "FAST_VISION=$FAST_VISION: choose off, eager or compiled" >&2; exit 2 ;; esac
for run in ${CURVE_RUNS:-}; do  # checked before anything runs, not when the loop reaches it
  [[ "$CURVE_NAMES" == *" $run "* ]] || { echo "CURVE_RUNS names $run; its runs:$CURVE_NAMES" >&2; exit 2; }
done
if [ -z "${SKIP_THROUGHPUT:-}" ]; then
  echo "== 1. distill_throughput.py --arch qwen2-vl-7b, per-phase breakdown   ($((SECONDS - T0)) s so far)" | tee -a "$OUT/distill.log"
  timeout -k 10 $((BUDGET + 90)) python3 benchmarks/distill_throughput.py --arch "${ARCH:-qwen2-vl-7b}" \
    --frames "${FRAMES:-64}" --resolution "${RES:-448}" --steps "${STEPS:-3}" --lora-rank 64 --lora-dropout 0.05 --time-budget "$BUDGET" \
    --fast-vision "$FAST_VISION" --out "$OUT" --label 7b "${ARGS[@]}" 2>&1 | tee -a "$OUT/distill.log"
  echo "distill_throughput exit code ${PIPESTATUS[0]} ($((SECONDS - T0)) s so far)" | tee -a "$OUT/distill.log"
fi

if [ -z "${SKIP_CURVES:-}" ] && [ $((SECONDS - T0)) -lt "${CURVES_START:-300}" ]; then
  echo "== 2. loss curves on the GPU: recipes/tiny.yaml, runs: ${CURVE_RUNS:-default default_again new}   ($((SECONDS - T0)) s so far)" | tee "$OUT/curves.log"
  R=/tmp/linmu_curves; rm -rf "$R"; mkdir -p "$R"
  each_stage() { for s in stage1 stage2 stage3; do printf ' stages.%s.%s' "$s" "$1"; done; }
  FUSED=$(each_stage optimizer=fused); EVERY=$(each_stage gradient_checkpointing=every_other)
  PREFETCH=$(each_stage prefetch=2); SHARED=" stages.stage3.share_teacher_embeddings=true"
  VISION=" fast_vision=true"; FLA=" model.ssd_backend=fla"  # top-level / model keys: every stage at once
  # compare every finished run with the first default one and tar them all, after each run: a call's time limit
  # that cuts a later run leaves everything measured before it (session 14 lost two finished runs that way)
  # CURVES_REF=a curves.tar of an earlier call (its default and default_again runs): the reference and the noise
  # run come from there, so a call can spend its time on the runs that changed (the first run still compiles)
  REF_DIR=$R
  if [ -n "${CURVES_REF:-}" ]; then
    REF_DIR=/tmp/linmu_curves_ref; rm -rf "$REF_DIR"; mkdir -p "$REF_DIR"
    tar xf "$CURVES_REF" -C "$REF_DIR" ./default ./default_again || { echo "CURVES_REF=$CURVES_REF: no default runs in it" >&2; exit 2; }
  fi
  report_curves() {
    local noise=() other
    [ -f "$REF_DIR/default_again/metrics.jsonl" ] && noise=(--noise "$REF_DIR/default_again")
    [ -f "$REF_DIR/default/metrics.jsonl" ] || { echo "no reference curve: the first default run did not finish" | tee -a "$OUT/curves.log"; return; }
    for other in "$R"/*/metrics.jsonl; do
      other=$(basename "$(dirname "$other")"); [ "$other" = default ] && [ -z "${CURVES_REF:-}" ] && continue
      python3 benchmarks/compare_runs.py "$REF_DIR/default" "$R/$other" "${noise[@]}" --json "$OUT/curves_$other.json" \
        > "$R/compare_$other.txt" 2>&1
    done
    (cd "$R" && tar cf "$OUT/curves.tar" ./*.log ./*.txt ./*/metrics.jsonl ./*/report.json 2>/dev/null)
  }
  FLA_COMPILED=""
  for run in ${CURVE_RUNS:-default default_again new}; do
    [ $((SECONDS - T0)) -lt "${CURVES_LAST:-370}" ] || { echo "$run: skipped (time)" | tee -a "$OUT/curves.log"; continue; }
    case $run in  # the options of "new", together or one at a time
      default|default_again) extra="" ;;
      new) extra="$FUSED$EVERY$PREFETCH$SHARED" ;;
      fused) extra=$FUSED ;; every_other) extra=$EVERY ;; prefetch) extra=$PREFETCH ;; shared) extra=$SHARED ;;
      vision) extra=$VISION ;; fla) extra=$FLA ;; vision_eager) extra="$VISION vision_compile=off" ;;
      kl_torch) extra=" stages.stage3.loss.kl_backend=torch" ;; kl_triton) extra=" stages.stage3.loss.kl_backend=triton" ;;
      per_layer) extra=" stages.stage1.gradient_checkpointing=per_layer stages.stage2.gradient_checkpointing=per_layer" ;;
      e2e_none) extra=" stages.stage3.gradient_checkpointing=none" ;;
      recipe7b) extra="$FUSED$EVERY$PREFETCH$SHARED$VISION$FLA" ;;  # the 7B recipes' new defaults together
    esac
    # the first run compiles the kernels, and so does the first on fla's scans (more than 150 s in session 14)
    limit="${TINY_TIMEOUT:-150}"; [ -z "${FIRST_DONE:-}" ] && limit="${FIRST_TIMEOUT:-240}"; FIRST_DONE=1
    if [[ "$extra" == *"$FLA"* ]] && [ -z "$FLA_COMPILED" ]; then limit="${FLA_TIMEOUT:-300}"; FLA_COMPILED=1; fi
    # shellcheck disable=SC2086  # the overrides are words
    # the compiled tower's recompilations are logged (session 15: 3 steps in 150 s on the tiny recipe's shapes)
    [ "$run" = vision ] && export TORCH_LOGS=recompiles || unset TORCH_LOGS
    timeout -k 5 "$limit" python3 -m linmu_cli distill recipes/tiny.yaml "device=${DEVICE:-cuda}" output=$R/$run $extra ${CURVE_EXTRA:-} \
      > "$R/$run.log" 2>&1
    echo "$run: exit $? ($((SECONDS - T0)) s so far)" | tee -a "$OUT/curves.log"
    report_curves
  done
  cat "$R"/compare_*.txt 2>/dev/null | tee -a "$OUT/curves.log"
fi
echo "done in $((SECONDS - T0)) s" | tee -a "$OUT/distill.log"
