# Shared settings of the deploy scripts (sourced, not run).
# FLWR_HOME keeps this federation's CLI connection apart from the user's ~/.flwr.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
export FLWR_HOME="${FLWR_HOME:-$ROOT/deploy/flwr-home}"
export FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION=1  # never uv-sync a fresh env (and torch) per run
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
PY="${PY:-$ROOT/.venv/bin/python}"
BIN="$(dirname "$PY")"
export PATH="$BIN:$PATH"  # Flower starts its helpers (flower-superexec) from PATH
FEDERATION=papm-deploy
die() { echo "deploy: error: $*" >&2; exit 2; }
