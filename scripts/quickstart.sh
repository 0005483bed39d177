#!/usr/bin/env bash
# Set up on a fresh machine (a .venv with the right torch and ft) and train the quickstart recipe:
# QLoRA on the built-in tiny Llama, offline. Re-running starts a fresh run.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
bash scripts/_setup.sh
export HF_HUB_OFFLINE="${HF_HUB_OFFLINE:-1}"
.venv/bin/ft train recipes/quickstart.yaml --overwrite "$@"
.venv/bin/python - <<'PY'
import json
lines = [json.loads(l) for l in open("runs/quickstart/metrics.jsonl")]
train = [l for l in lines if "loss" in l]
evals = [l for l in lines if "eval_loss" in l]
print(f"\ntrain loss: {train[0]['loss']:.3f} (step {train[0]['step']}) -> {train[-1]['loss']:.3f} (step {train[-1]['step']})")
if evals:
    print(f"eval loss:  {evals[0]['eval_loss']:.3f} (step {evals[0]['step']}) -> {evals[-1]['eval_loss']:.3f} (step {evals[-1]['step']})")
print("adapter:    runs/quickstart/adapter  (loads with peft.PeftModel.from_pretrained)")
PY
