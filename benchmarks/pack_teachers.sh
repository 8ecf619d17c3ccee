#!/usr/bin/env bash
# Pack what a GPU run left in directory R for the trip back through $OUT (at most 8 files of 16 MiB):
#   $OUT/small.tar    every *.log / *.json / *.md / *.png in R, plus each R/teacher_*/train_teacher.json as
#                     R/teacher_*.json
#   $OUT/teacher.tar.*  the best R/teacher_*/ (highest worst-task held-out accuracy, then highest sum), in 15 MiB
#                     parts: cat teacher.tar.* | tar x
# Usage: OUT=... bash benchmarks/pack_teachers.sh R
set -o pipefail
R="$1"; : "${OUT:?OUT must name the folder that comes back}"
best=$(python3 - "$R" <<'PY'
import json, sys, pathlib
root = pathlib.Path(sys.argv[1]); scores = {}
for d in sorted(root.glob("teacher_*/")):
    acc = [v for per in json.loads((d / "train_teacher.json").read_text())["heldout_accuracy"].values()
           for v in per.values()]
    scores[d.name] = (min(acc), sum(acc))
print(max(scores, key=scores.get) if scores else "")
print("(worst task, sum) held-out accuracy per teacher:", scores, file=sys.stderr)
PY
)
(cd "$R" && for d in teacher_*/; do cp "$d/train_teacher.json" "${d%/}.json" 2>/dev/null; done
 tar cf "$OUT/small.tar" $(ls *.log *.json *.md *.png 2>/dev/null))
[ -n "$best" ] && (cd "$R" && tar cf - "$best" | split -b 15M - "$OUT/teacher.tar.") && echo "best teacher: $best"
ls -la "$OUT"
