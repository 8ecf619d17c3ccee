#!/usr/bin/env bash
# GPU tests one target at a time, each under its own time limit, with the full failure report kept: for a test
# that h200_validate.sh's shared deadline cut before pytest printed why it failed.
# Run from the repo root with .whl carried:
#   TESTS="tests/ops/test_fused_elementwise.py::test_kernels_match_references_on_gpu tests/ops/test_ssd_gpu.py" \
#     bash benchmarks/h200_pytest.sh
# Environment: TESTS (pytest node ids, space-separated; ID@SECONDS gives that target its own limit), EACH
# (seconds per target without one, default 150), OUT.
# Writes $OUT/pytest.log (every target's output, -rA --tb=long, in order) and $OUT/pytest_summary.txt.
set -o pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.." || exit 1
[ -n "${NO_GPU_SETUP:-}" ] || source scripts/gpu_setup.sh >/dev/null
export PYTHONPATH="$PWD:$PYTHONPATH" PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 COLUMNS=200
OUT="${OUT:-/tmp/linmu_pytest}"; mkdir -p "$OUT"
: > "$OUT/pytest_summary.txt"
T0=$SECONDS
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>&1 | tee "$OUT/pytest.log"
for spec in ${TESTS:?set TESTS to the pytest node ids to run}; do
  target=${spec%@*}; limit=${EACH:-150}; [ "$spec" = "$target" ] || limit=${spec##*@}
  echo "== $target (limit $limit s)   ($((SECONDS - T0)) s so far)" | tee -a "$OUT/pytest.log"
  timeout -k 5 "$limit" python3 -m pytest -q -rA --tb=long -p no:cacheprovider "$target" >> "$OUT/pytest.log" 2>&1
  rc=$?
  echo "$target: exit $rc ($((SECONDS - T0)) s so far)" | tee -a "$OUT/pytest.log" "$OUT/pytest_summary.txt"
done
grep -E "^(PASSED|FAILED|ERROR|SKIPPED)" "$OUT/pytest.log" >> "$OUT/pytest_summary.txt"
