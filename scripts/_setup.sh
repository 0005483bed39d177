#!/usr/bin/env bash
# Shared set-up for quickstart.sh and test.sh: make .venv if missing, install the right torch, then ft.
# Idempotent: a second run with everything in place only checks and returns.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${FT_VENV:-$ROOT/.venv}"
PY="${PYTHON:-python3.11}"
command -v "$PY" >/dev/null 2>&1 || PY=python3

if [ ! -x "$VENV/bin/python" ]; then
  echo "[setup] creating $VENV"
  "$PY" -m venv "$VENV"
fi
VPY="$VENV/bin/python"
export PIP_DISABLE_PIP_VERSION_CHECK=1

stamp="$VENV/.ft-installed"
want="$(cat "$ROOT/pyproject.toml" | sha256sum | cut -c1-16)"
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ] && "$VPY" -c "import ft_cli, torch" 2>/dev/null; then
  exit 0
fi

# torch first: an unpinned torch would pull the newest CUDA build (several GB). With no NVIDIA GPU we pin
# the CPU build; with one, we let pip choose the default (CUDA) build.
if ! "$VPY" -c "import torch" 2>/dev/null; then
  if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
    echo "[setup] NVIDIA GPU found: installing torch (CUDA build)"
    "$VPY" -m pip install -q "torch>=2.4"
  else
    echo "[setup] no GPU: installing the CPU build torch==${FT_TORCH_VERSION:-2.13.0}"
    "$VPY" -m pip install -q "torch==${FT_TORCH_VERSION:-2.13.0}"

  fi
fi
echo "[setup] installing ft and its dependencies into $VENV"
"$VPY" -m pip install -q -e "$ROOT[dev]"
echo "$want" > "$stamp"
