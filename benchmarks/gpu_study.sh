#!/usr/bin/env bash
# The original project's whole study in one run: base model, the pruned models of every group
# for N = 2..10, the fusions and the evaluation, through Flower's Deployment Engine (a
# SuperLink and N SuperNode processes sharing the machine; no Ray needed). Writes REPORT.md,
# the CSVs, the plots, timing.log (each stage's start/end) and gpu_util.csv (nvidia-smi,
# sampled every second, where there is a GPU) to $OUT.
#
# On the GPU machine (python3 holds PyTorch; flwr and its missing dependencies travel as
# wheels in .whl/, made by scripts/gpu_wheels.sh; the data travels in .data/):
#   bash benchmarks/gpu_study.sh full            # carry: .whl, .data
# Checked on a CPU first, with the smoke preset:
#   OUT=runs/gpu-study-smoke PY=.venv/bin/python bash benchmarks/gpu_study.sh smoke
set -euo pipefail
cd "$(dirname "$0")/.."
preset=${1:-full}
devices=${DEVICES:-$([ "$preset" = smoke ] && echo 2-3 || echo 2-10)}
out=$(realpath -m "${OUT:-runs/gpu-study-$preset}")
py=${PY:-python3}
mkdir -p "$out"
log="$out/timing.log"
stamp() { echo "$(date +%s.%N | cut -c1-14) $*" | tee -a "$log"; }
stamp "start preset=$preset devices=$devices host=$(hostname)"

# 1. wheels: only where flwr is missing (the GPU machine), into a private site folder
if ! "$py" -c "import flwr" 2>/dev/null; then
  [ -d .whl ] || { echo "gpu_study: flwr is missing and no .whl/ was carried (scripts/gpu_wheels.sh)" >&2; exit 2; }
  "$py" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  # the flower-* scripts land in /tmp/site/bin with this interpreter in their first line
  export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH} PATH=/tmp/site/bin:$PATH
  stamp "wheels installed"
fi
# 2. data: the carried copy, else $PAPM_DATA, else the shared one (CPU machines)
data=${PAPM_DATA:-}
for cand in .data/cifar10-jpeg75.tar.xz ../shared/data/cifar10-jpeg75.tar.xz; do
  [ -n "$data" ] || { [ -f "$cand" ] && data=$(realpath "$cand"); }
done
[ -n "$data" ] || { echo "gpu_study: no data; copy cifar10-jpeg75.tar.xz into .data/" >&2; exit 2; }
export PAPM_CACHE=${PAPM_CACHE:-/tmp/papm-cache}

# 3. GPU utilisation, sampled every second while the study runs
sampler=""
if command -v nvidia-smi >/dev/null; then
  nvidia-smi --query-gpu=timestamp,utilization.gpu,memory.used,power.draw --format=csv -l 1 \
    > "$out/gpu_util.csv" 2>/dev/null &
  sampler=$!
fi
trap '[ -n "$sampler" ] && kill $sampler 2>/dev/null || true' EXIT

# 4. the study: base model (trained inside), every N through the Deployment Engine
stamp "study begins"
"$py" -c "import torch; print('torch', torch.__version__, 'cuda', torch.cuda.is_available())" | tee -a "$log"
"$py" sim.py --deployment --preset "$preset" --devices "$devices" --data "$data" --out "$out/run" --no-progress \
  2>&1 | tee "$out/sim.log"
stamp "study ends"

# 5. per-stage times from the run's own records, and the report beside them
"$py" - "$out" <<'PY' | tee -a "$log"
import json, sys
from pathlib import Path
out = Path(sys.argv[1])
t = json.loads((out / "run" / "timings.json").read_text())
if "base_train_s" in t:
    print(f"stage base-train {t.pop('base_train_s'):.1f} s")
for n, v in sorted(t.items(), key=lambda kv: int(kv[0])):
    print(f"stage N={n} {v['wall_s']:.1f} s " + " ".join(f"{k}={s:.1f}" for k, s in v["rounds"].items()))
PY
if [ -s "$out/gpu_util.csv" ]; then
  awk -F', ' 'NR > 1 {u += $2; n++} END {if (n) printf "gpu utilisation mean %.1f %% over %d samples\n", u / n, n}' \
    "$out/gpu_util.csv" | tee -a "$log"
fi
cp "$out"/run/{REPORT.md,fusion.csv,devices.csv,baseline.csv,*.png} "$out"/ 2>/dev/null || true
stamp "done"
