#!/usr/bin/env bash
# Set up (or refresh) the project's virtual environment in .venv.
# Idempotent: a second run only checks that everything is installed.
#
#   bash scripts/setup.sh            # creates .venv and installs papm + test deps
#
# torch/torchvision are pinned here to the wheels this project is developed and
# tested with (pip finds them on local disk on the dev/CI machines); the package
# metadata in pyproject.toml stays a range so other machines get a fitting build.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
TORCH_PIN=${PAPM_TORCH_PIN:-"torch==2.14.1 torchvision==0.29.1"}

if [ ! -x .venv/bin/python ]; then
    echo "[setup] creating .venv with $($PY --version)"
    "$PY" -m venv .venv
fi
VPY=.venv/bin/python

stamp=.venv/.papm-setup-$(cat pyproject.toml scripts/setup.sh | sha256sum | cut -c1-16)
if [ -f "$stamp" ]; then
    echo "[setup] .venv is up to date"
    exit 0
fi
echo "[setup] installing $TORCH_PIN"
# shellcheck disable=SC2086
"$VPY" -m pip install -q $TORCH_PIN
echo "[setup] installing papm and its dependencies"
"$VPY" -m pip install -q -e ".[test]"
rm -f .venv/.papm-setup-*
touch "$stamp"
echo "[setup] done: $("$VPY" -c 'import torch, flwr; print("torch", torch.__version__, "| flwr", flwr.__version__)')"
