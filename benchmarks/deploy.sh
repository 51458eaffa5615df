#!/usr/bin/env bash
# Issue 7's measurements on this machine, through Flower's Deployment Engine (a SuperLink and
# one SuperNode process per device, TLS + SuperNode authentication, all on loopback):
#   1. the deployment for N = 2 and N = 5 with a given base model and preset: per-round wall
#      time split into node compute and the rest, per-device latency vs the base model's;
#   2. the fault runs (smoke preset and its own small base model, N = 3): box-1 SIGKILLed in the prune round, box-2
#      SIGSTOPped in the embed round and SIGCONTed after the timeout; then a rerun.
# Example: PAPM_DATA=../shared/data/cifar10-jpeg75.tar.xz bash benchmarks/deploy.sh runs/quick/base.pt quick
set -euo pipefail
base=${1:?usage: benchmarks/deploy.sh BASE.pt [PRESET] [OUT]}
preset=${2:-quick}
out=${3:-runs/deploy-$preset}
cd "$(dirname "$0")/.."
py=.venv/bin/python
summary() {  # one line per N and device, from the run's result files
  $py - "$1" <<'PY'
import json, sys
from pathlib import Path
out = Path(sys.argv[1])
for f in sorted(out.glob("n*/result.json")):
    r = json.loads(f.read_text())
    print(f"N={r['devices']} engine={r['engine']} fused={r['fusion']['test_acc']:.2f}% "
          f"base={r['base']['test_acc']:.2f}% base latency={r['base']['latency_ms']:.2f} ms "
          f"missing={[(m['round'], m['node']) for m in r['missing']]}")
    for rnd, wall in r["rounds"].items():
        comp = max(r["node_compute_s"].get(rnd, {}).values(), default=0.0)
        print(f"  round {rnd}: wall {wall:.1f} s, slowest node compute {comp:.1f} s, other {wall - comp:.1f} s")
    for d in r["per_device"]:
        print(f"  {d['node']} classes {d['classes']} masked={d['masked']} latency={d.get('latency_ms')} ms "
              f"own acc={d.get('test_own_acc')} reused={d.get('reused')}")
PY
}
t0=$(date +%s)
$py sim.py --deployment --preset "$preset" --devices 2,5 --base "$base" --out "$out" --no-progress
echo "deployment N=2,5 ($preset): $(( $(date +%s) - t0 )) s"
summary "$out"

faults="$out-faults"
( while ! grep -qE '"round": "(fuse|evaluate)"' "$faults/progress.json" 2>/dev/null; do sleep 0.5; done
  for p in $(ps -eo pid=,stat= | awk '$2 ~ /^T/ {print $1}'); do
    grep -qz "FLWR_HOME=$(realpath -m "$faults")/.flwr" /proc/$p/environ 2>/dev/null && kill -CONT "$p" || true
  done ) &
PAPM_TEST_BOX_SIGNAL="box-1=prune:KILL,box-2=embed:STOP" $py sim.py --deployment --preset smoke --devices 3 \
  --out "$faults" --no-progress --set sim.prune_timeout=120 --set sim.embed_timeout=30 || true
wait
echo "--- fault run"; summary "$faults"
$py sim.py --deployment --preset smoke --devices 3 --out "$faults" --no-progress \
  --set sim.prune_timeout=120 --set sim.embed_timeout=30
echo "--- rerun with every box back"; summary "$faults"
