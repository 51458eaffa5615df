#!/usr/bin/env bash
# Accuracy and wall time of `papm train --preset quick` (width 0.25, 10 epochs) on the
# shared CIFAR-10 copy, on this machine.
#   bash benchmarks/train_quick.sh [DATA] [OUT_DIR]
set -euo pipefail
cd "$(dirname "$0")/.."
DATA=${1:-${PAPM_DATA:-../shared/data/cifar10-jpeg75.tar.xz}}
OUT=${2:-runs/bench-train-quick}
mkdir -p "$OUT"
start=$(date +%s)
.venv/bin/papm train --preset quick --data "$DATA" --out "$OUT/base.pt" --no-progress | tee "$OUT/train.log"
echo "wall time: $(( $(date +%s) - start )) s" | tee -a "$OUT/train.log"
.venv/bin/papm eval "$OUT/base.pt" --data "$DATA" --json "$OUT/eval.json" | tee "$OUT/eval.log"
