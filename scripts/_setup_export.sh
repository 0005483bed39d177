#!/usr/bin/env bash
# What the export tests need beyond `pip install -e .[dev]` (run by test.sh after _setup.sh):
# - llama.cpp's GGUF converter, unpacked from llama-cpp-python's source release on PyPI (python -m ft_cli.export.gguf
#   install; skipped when already there);
# - llama-cpp-python itself, where CI is set or FT_WITH_LLAMA_CPP=1: pip compiles llama.cpp from source (about 8
#   CPU-minutes, ~4-5 min on 2 idle cores; pip caches the built wheel). Without it the llama.cpp tests skip.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VPY="${FT_VENV:-$ROOT/.venv}/bin/python"
LLAMA_CPP_PYTHON="0.3.36"  # keep in step with pyproject.toml's llama-cpp extra and ft_cli/export/gguf.py
export PIP_DISABLE_PIP_VERSION_CHECK=1

if [ -n "${CI:-}" ] || [ "${FT_WITH_LLAMA_CPP:-0}" = "1" ]; then
  if ! "$VPY" -c "import llama_cpp" 2>/dev/null; then
    echo "[setup] building llama-cpp-python==$LLAMA_CPP_PYTHON (compiles llama.cpp; a few minutes)"
    "$VPY" -m pip install -q "llama-cpp-python==$LLAMA_CPP_PYTHON"
  fi
fi
"$VPY" -m ft_cli.export.gguf install "$LLAMA_CPP_PYTHON" >/dev/null
