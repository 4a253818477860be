#!/bin/bash
# Paired A/B of `alexnet prepare --workers 1` on the same files: BASE (another checkout's
# src, e.g. a `git worktree add /tmp/base <commit>`) against this checkout, in turn, N rounds.
# Prints each run's images/s per worker (the preparation phase, from prepare's JSON line).
#   BASE=/tmp/base/src bash benchmarks/prepare_ab.sh SRC_FOLDER [N]
set -euo pipefail
SRC=$1; N=${2:-4}; NEW=$(cd "$(dirname "$0")/.." && pwd)/src; OUT=$(mktemp -d)
for i in $(seq "$N"); do
  for v in base new; do
    if [ $v = base ]; then P=$BASE; else P=$NEW; fi
    rm -rf "$OUT/st_$v"
    PYTHONPATH=$P python -m alexnet prepare "$SRC" "$OUT/st_$v" --workers 1 --no-progress 2>/dev/null | tail -1 |
      python -c "import json,sys; d=json.load(sys.stdin); print('$v', round(d['images_per_s_per_worker'],1))"
  done
done
rm -rf "$OUT"
