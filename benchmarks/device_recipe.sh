#!/usr/bin/env bash
# Device fine-tuning recipes compared on one fused system: which epochs / lr / round_to fit
# the quick preset's 30-minute budget best? Each variant prunes and fine-tunes every group
# (`papm prune --preset quick` plus the variant's flags), trains fusion heads with seeds 0
# and 1 (`papm fuse`, selection on validation) and prints the fused validation accuracy.
# Choose on that column. Test figures (`papm eval --split`, the devices' own test accuracy)
# only with TEST=1, for a final table after the choice is made.
#
# Example (the quick base, the quick run's N = 2 groups; one variant per argument):
#   PAPM_DATA=../shared/data/cifar10-jpeg75.tar.xz BASE=runs/quick/base.pt \
#   CLASS_GROUPS="0 1 8 9|2 3 4 5 6 7" bash benchmarks/device_recipe.sh \
#     "--round-to 1 --epochs 2 --lr 0.05" "--round-to 8 --epochs 3 --lr 0.2"
set -euo pipefail
cd "$(dirname "$0")/.."
: "${BASE:?set BASE to a base checkpoint}" "${CLASS_GROUPS:?set CLASS_GROUPS, e.g. \"0 1 8 9|2 3 4 5 6 7\"}"
PY=${PY:-.venv/bin/python}
PRESET=${PRESET:-quick}
OUT=${OUT:-runs/device-recipe}
mkdir -p "$OUT"
IFS='|' read -r -a groups <<< "$CLASS_GROUPS"
TEST=${TEST:-0}
if [ "$TEST" = 1 ]; then
    echo "| variant | prune s | fused val % (seeds 0, 1) | device all-class test % | fused test % (seeds 0, 1) |"
    echo "|---|---|---|---|---|"
else
    echo "| variant | prune s | fused val % (seeds 0, 1) |"
    echo "|---|---|---|"
fi
for variant in "$@"; do
    dir="$OUT/$(echo "$variant" | tr -c 'a-z0-9.\n' '_')"
    mkdir -p "$dir"
    start=$(date +%s)
    ckpts=() device_acc=()
    for g in "${groups[@]}"; do
        # shellcheck disable=SC2086  # the variant and the group are word lists on purpose
        log=$($PY -m papm_core.cli prune --base "$BASE" --preset "$PRESET" --classes $g --out-dir "$dir" $variant)
        ckpts+=("$(echo "$log" | sed -n 's/^saved \(.*\.pt\) and .*/\1/p')")
        device_acc+=("$(echo "$log" | sed -n 's/^test accuracy: all classes \([0-9.]*\)%.*/\1/p')")
    done
    secs=$(( $(date +%s) - start ))
    vals=() tests=()
    for seed in 0 1; do
        head="$dir/fusion_seed$seed.pt"
        vals+=("$($PY -m papm_core.cli fuse --ckpts "${ckpts[@]}" --seed "$seed" --out "$head" \
                  | sed -n 's/.*best val \([0-9.]*\)%.*/\1/p')")
        if [ "$TEST" = 1 ]; then
            $PY -m papm_core.cli eval --split "$head" --json "$dir/eval_seed$seed.json" > /dev/null
            tests+=("$($PY -c "import json,sys; print(f\"{json.load(open(sys.argv[1]))['test_acc']:.2f}\")" \
                       "$dir/eval_seed$seed.json")")
        fi
    done
    if [ "$TEST" = 1 ]; then
        echo "| \`$variant\` | $secs | ${vals[*]} | ${device_acc[*]} | ${tests[*]} |"
    else
        echo "| \`$variant\` | $secs | ${vals[*]} |"
    fi
done
