#!/usr/bin/env bash
# The whole GPU check of ft in one command (scripts/gpu_check.py says what it runs; docs/benchmarks.md says how
# to run it on the lent GPU machine). On a bare GPU machine it installs the wheels carried in .whl/
# (scripts/fetch_gpu_wheels.sh) and writes gpu_check.{md,json,log} to $OUT (or --out).
#   bash scripts/gpu_check.sh                                    # everything, ~8 minutes on an H200
#   bash scripts/gpu_check.sh --only bench --budget 200          # rerun one stage
#   PYTHON=.venv/bin/python bash scripts/gpu_check.sh --device cpu --shape tiny   # the CPU dry run
set -uo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
exec "${PYTHON:-python3}" scripts/gpu_check.py "$@"
