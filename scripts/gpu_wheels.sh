#!/usr/bin/env bash
# Fetch the wheels the GPU machine lacks (it has PyTorch but no flwr; nothing can be
# downloaded there) into .whl/, for Python 3.12 on manylinux x86_64, at the versions this
# project is tested with (read from .venv). Ray is not needed: the GPU study runs Flower's
# Deployment Engine, not the simulation runtime. uv is left out: it only serves Flower's
# runtime dependency installation, which the project always disables.
# Usage: bash scripts/gpu_wheels.sh   (then carry .whl with the device run)
set -euo pipefail
cd "$(dirname "$0")/.."
grep -qx '/.whl/' .gitignore || echo '/.whl/' >> .gitignore
names="flwr alembic cryptography cffi pycparser fastapi pydantic pydantic_core annotated-types
typing-inspection starlette grpcio grpcio-health-checking iterators prompt_toolkit wcwidth
pycryptodome SQLAlchemy greenlet tomli tomli_w uvicorn Mako protobuf typer click rich"
pins=()
for n in $names; do
  v=$(.venv/bin/pip show "$n" 2>/dev/null | awk '/^Version:/ {print $2}')
  [ -n "$v" ] || { echo "gpu_wheels: $n is not installed in .venv; run scripts/setup.sh" >&2; exit 2; }
  pins+=("$n==$v")
done
mkdir -p .whl
plats=""
for p in manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_24_x86_64 manylinux_2_17_x86_64 \
         manylinux2014_x86_64 manylinux1_x86_64 manylinux_2_34_x86_64 manylinux_2_31_x86_64; do
  plats="$plats --platform $p"
done
# shellcheck disable=SC2086
.venv/bin/python -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  $plats -d .whl "${pins[@]}"
du -sh .whl
ls .whl
