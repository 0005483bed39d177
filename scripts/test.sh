#!/usr/bin/env bash
# Set up on a fresh machine if needed, then run the test suite (offline, CPU). Extra args go to pytest,
# e.g. scripts/test.sh -m "not slow" or scripts/test.sh tests/test_recipe.py
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
bash scripts/_setup.sh
bash scripts/_setup_export.sh
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
# Keep the user's caches clean: tests build their tiny models and data caches in a throwaway directory.
export FT_CACHE_DIR="${FT_CACHE_DIR:-$(mktemp -d)}"
# --durations=15: the slowest tests, every run, so a test that grows slow is seen.
exec .venv/bin/python -m pytest --durations=15 "$@"
