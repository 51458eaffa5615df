#!/usr/bin/env bash
# Groups for N = 2..10 from a trained base model, for each similarity method, and whether
# N = 2 separates vehicles (0, 1, 8, 9) from animals.
#   bash benchmarks/grouping.sh BASE_CKPT [DATA] [OUT_DIR]
set -euo pipefail
cd "$(dirname "$0")/.."
BASE=${1:?usage: grouping.sh BASE_CKPT [DATA] [OUT_DIR]}
DATA=${2:-${PAPM_DATA:-../shared/data/cifar10-jpeg75.tar.xz}}
OUT=${3:-runs/bench-group}
for method in correlation covariance mean-logit-cosine; do
    echo "== $method"
    .venv/bin/papm group --base "$BASE" --data "$DATA" --devices 2-10 --method "$method" \
        --out-dir "$OUT/$method"
    .venv/bin/python - "$OUT/$method/groups.json" <<'PY'
import json, sys
g = json.load(open(sys.argv[1]))["groups"]["2"]
print("N=2 separates vehicles from animals:", sorted(map(sorted, g)) == [[0, 1, 8, 9], [2, 3, 4, 5, 6, 7]])
PY
done
