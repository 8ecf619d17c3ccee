#!/usr/bin/env bash
# Issue 15, item 2 on one H200: the quality study on teacher 2 (evals/study.py --tasks grid --device cuda), split
# over device calls by PART. evals/teacher2 is tracked (it travels with the working tree); carry the wheels:
#   run with carry [".whl"]:
#   PART=pipeline bash benchmarks/h200_study2.sh                          # teacher, conversion, stages, length
#   PART=ablations ONLY="flex_only swin_only no_backward" bash benchmarks/h200_study2.sh
# Then, on this machine: python evals/study.py --from-json A/study.json B/study.json ... --markdown OUT.md
# Everything lands in $OUT: study.json (rewritten after every row, so a cut call keeps what finished), study.log,
# commit.txt. Environment: TEACHER (default evals/teacher2), PART (pipeline | ablations), ONLY (the ablations of
# PART=ablations, evals/study.py's names), BUDGET (s, default 540: the study is stopped then), EXTRA (more
# evals/study.py flags, e.g. "--n 100" or "--set stages.stage1.steps=600"), OUT.
# CPU dry run (validated that way): NO_GPU_SETUP=1 DEVICE=cpu BUDGET=900 EXTRA="--n 2 --set stages.stage1.steps=2
#   --set stages.stage2.steps=2 --set stages.stage3.steps=2 --frames 4" ... bash ...
set -o pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.." || exit 1
[ -n "${NO_GPU_SETUP:-}" ] || source scripts/gpu_setup.sh >/dev/null 2>&1
export PYTHONPATH="$PWD:$PYTHONPATH" PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
OUT="${OUT:-/tmp/linmu_study2}"; mkdir -p "$OUT"
TEACHER="${TEACHER:-evals/teacher2}"; PART="${PART:-pipeline}"; BUDGET="${BUDGET:-540}"
[ -f "$TEACHER/model.safetensors" ] || { echo "no teacher at $TEACHER: carry it (see the header)" >&2; exit 2; }
case $PART in
  pipeline) SELECT=(--only none) ;;
  ablations) [ -n "${ONLY:-}" ] || { echo "PART=ablations needs ONLY=\"name ...\"" >&2; exit 2; }
             # shellcheck disable=SC2206  # ONLY is a list of names
             SELECT=(--ablations-only --only $ONLY) ;;
  *) echo "PART=$PART: choose pipeline or ablations" >&2; exit 2 ;;
esac
echo "code at $(git rev-parse --short HEAD 2>/dev/null || echo unknown); PART=$PART ONLY=${ONLY:-} EXTRA=${EXTRA:-}" > "$OUT/commit.txt"
# shellcheck disable=SC2086  # EXTRA is a list of flags
timeout -k 10 "$BUDGET" python3 evals/study.py --teacher "$TEACHER" --tasks grid --set data.size=224 \
  --device "${DEVICE:-cuda}" --out /tmp/study2_runs --json "$OUT/study.json" "${SELECT[@]}" ${EXTRA:-} 2>&1 | tee "$OUT/study.log"
echo "study exit code ${PIPESTATUS[0]} (124: stopped at BUDGET; study.json keeps every finished row)" | tee -a "$OUT/study.log"
