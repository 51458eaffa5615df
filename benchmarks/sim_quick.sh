#!/usr/bin/env bash
# The quick preset end to end through the Flower simulation runtime, base model included:
# wall time per device count and round, and REPORT.md (issue 6's measurement).
# Example: PAPM_DATA=../shared/data/cifar10-jpeg75.tar.xz bash benchmarks/sim_quick.sh runs/quick
set -euo pipefail
out=${1:-runs/quick}
cd "$(dirname "$0")/.."
start=$(date +%s)
.venv/bin/python sim.py --preset quick --out "$out" --no-progress
echo "wall: $(( $(date +%s) - start )) s"
cat "$out/timings.json"
