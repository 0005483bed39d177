#!/usr/bin/env bash
# Shared set-up for quickstart.sh and test.sh: make .venv if missing, install the right torch, then ft.
# Idempotent: a second run with everything in place only checks and returns.
#
# Versions: everything is installed with `-c constraints.txt`, the versions the suite last passed with, so a new
# release of transformers, peft or bitsandbytes does not change what a fresh clone does. FT_UNPINNED=1 installs the
# newest versions pyproject.toml allows instead; FT_TORCH_VERSION=X picks another torch. Regenerate the pins with
# `.venv/bin/python scripts/update_constraints.py` (README, Development).
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

CONSTRAINTS="$ROOT/constraints.txt"
PIN=()
if [ "${FT_UNPINNED:-0}" = "1" ] || [ ! -f "$CONSTRAINTS" ]; then
  CONSTRAINTS=""
elif [ -n "${FT_TORCH_VERSION:-}" ]; then
  # the torch asked for wins over the tested one; every other pin stays
  grep -v '^torch==' "$ROOT/constraints.txt" > "$VENV/.ft-constraints.txt"
  PIN=(-c "$VENV/.ft-constraints.txt")
else
  PIN=(-c "$CONSTRAINTS")
fi
TESTED_TORCH="$( [ -n "$CONSTRAINTS" ] && sed -n 's/^torch==//p' "$CONSTRAINTS" || true)"
TORCH_VERSION="${FT_TORCH_VERSION:-${TESTED_TORCH:-2.13.0}}"

stamp="$VENV/.ft-installed"
want="$( { cat "$ROOT/pyproject.toml"; [ -z "$CONSTRAINTS" ] || cat "$CONSTRAINTS";
           echo "unpinned=${FT_UNPINNED:-0} torch=${FT_TORCH_VERSION:-}"; } | sha256sum | cut -c1-16)"
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ] && "$VPY" -c "import ft_cli, torch" 2>/dev/null; then
  exit 0
fi
if [ -n "$CONSTRAINTS" ]; then
  echo "[setup] pinned to the tested versions in constraints.txt (FT_UNPINNED=1 for the newest allowed)"
else
  echo "[setup] FT_UNPINNED=1 (or no constraints.txt): the newest versions pyproject.toml allows, not the tested ones"
fi

# torch first: an unpinned torch would pull the newest CUDA build (several GB). With no NVIDIA GPU we pin
# the CPU build; with one, we let pip choose the default (CUDA) build of the tested version.
if ! "$VPY" -c "import torch" 2>/dev/null; then
  if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
    echo "[setup] NVIDIA GPU found: installing torch (CUDA build)"
    if [ -n "$CONSTRAINTS" ] || [ -n "${FT_TORCH_VERSION:-}" ]; then
      "$VPY" -m pip install -q "torch==$TORCH_VERSION" ${PIN[@]+"${PIN[@]}"}
    else
      "$VPY" -m pip install -q "torch>=2.4"
    fi
  else
    echo "[setup] no GPU: installing the CPU build torch==$TORCH_VERSION"
    "$VPY" -m pip install -q "torch==$TORCH_VERSION" ${PIN[@]+"${PIN[@]}"}
  fi
fi
echo "[setup] installing ft and its dependencies into $VENV"
"$VPY" -m pip install -q -e "$ROOT[dev]" ${PIN[@]+"${PIN[@]}"}
echo "$want" > "$stamp"
