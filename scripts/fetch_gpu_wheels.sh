#!/usr/bin/env bash
# Download, here, the wheels the lent GPU machine lacks into .whl/ (git-ignored), slim bitsandbytes to its CUDA 13
# libraries, add the benchmark data, and check that all that travels fits in 64 MiB (scripts/gpu_wheels.py).
#   bash scripts/fetch_gpu_wheels.sh [--bnb-cuda 13] [--with-pyarrow] [--python-version 3.12]
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
PY="${PYTHON:-$ROOT/.venv/bin/python}"   # its package versions are the ones fetched (ft's tested stack)
[ -x "$PY" ] || PY=python3
exec "$PY" scripts/gpu_wheels.py "$@"
