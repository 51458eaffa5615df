#!/usr/bin/env bash
# Run the PAPM protocol on the connected boxes for each device count, then write REPORT.md
# (on the server). Usage: deploy/run.sh BASE.pt OUT_DIR DEVICES [DATA] [PRESET]
#   e.g. deploy/run.sh checkpoints/base.pt runs/boxes 4 /data/cifar10.tar.xz quick
# DEVICES must equal the number of connected boxes. The server needs the data set for the
# public reference, validation and test images. Rerun the same command to carry on.
source "$(dirname "$0")/common.sh"
[ $# -ge 3 ] || die "usage: deploy/run.sh BASE.pt OUT_DIR DEVICES [DATA] [PRESET]"
data="${4:-${PAPM_DATA:-}}"
exec "$PY" "$ROOT/sim.py" --attach "$FEDERATION" --base "$1" --out "$2" --devices "$3" \
  ${data:+--data "$data"} --preset "${5:-auto}"
