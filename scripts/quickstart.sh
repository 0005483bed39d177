#!/usr/bin/env bash
# Set up on a fresh machine (a .venv with the right torch and ft, at the tested versions: constraints.txt) and train
# the quickstart recipe: QLoRA on the built-in tiny Llama, offline. Re-running starts a fresh run. Exits non-zero
# when the loss did not fall (scripts/quickstart_summary.py), so CI (.ci/run) catches a quickstart that stopped
# learning.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
bash scripts/_setup.sh
export HF_HUB_OFFLINE="${HF_HUB_OFFLINE:-1}"
.venv/bin/ft train recipes/quickstart.yaml --overwrite "$@"
.venv/bin/python scripts/quickstart_summary.py runs/quickstart
