#!/usr/bin/env bash
# The quick study over device seeds with one fixed base model: for each seed, sim.py on the
# device counts given (N = 1 always included) with prune.seed = SEED (head seeds follow it),
# one run folder per seed; then benchmarks/val_table.py prints their validation figures, and
# with TEST=1 benchmarks/seed_table.py the final test table (once every choice is fixed).
#
#   PAPM_DATA=../shared/data/cifar10-jpeg75.tar.xz BASE=runs/quick/base.pt \
#     bash benchmarks/seeds.sh runs/seeds "2,5,10" 0 1 2
set -euo pipefail
cd "$(dirname "$0")/.."
: "${BASE:?set BASE to the base checkpoint every seed shares}"
OUT=${1:?run folder}; DEVICES=${2:?device counts, e.g. 2,5,10}; shift 2
PY=${PY:-.venv/bin/python}
folders=()
for seed in "$@"; do
    start=$(date +%s)
    $PY sim.py --no-progress --preset "${PRESET:-quick}" --base "$BASE" --devices "$DEVICES" \
        --set "prune.seed=$seed" --out "$OUT/seed$seed"
    echo "seed $seed: $(( $(date +%s) - start )) s"
    folders+=("$OUT/seed$seed")
done
$PY benchmarks/val_table.py "${folders[@]}"
if [ "${TEST:-0}" = 1 ]; then
    $PY benchmarks/seed_table.py "${folders[@]}"
fi
