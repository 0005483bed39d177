"""`scripts/bench.py serve` on the tiny model, small: it runs end to end and prints every ratio it promises (the
numbers themselves are for docs/benchmarks.md, never asserted)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[1]


def test_bench_serve_prints_ratios_against_ft_generate(tmp_path: Path) -> None:
    out = tmp_path / "bench.json"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "2"}
    proc = subprocess.run([sys.executable, str(ROOT / "scripts" / "bench.py"), "serve", "--requests", "6",
                           "--concurrency", "3", "--baseline-requests", "1", "--max-new-tokens", "4", "--batch", "3", "--repeat", "1",
                           "--json", str(out)], env=env, capture_output=True, text=True, timeout=900, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    for text in ("ft generate per request (baseline)", "ft serve, 1 adapter", "ft serve, 3 adapters",
                 "ft serve vs ft generate per request", "3 adapters vs 1 adapter", "--max-batch 3 vs one request at a time",
                 "concurrency policy, in-process"):
        assert text in proc.stdout, proc.stdout
    result = json.loads(out.read_text())
    assert result["serve"]["1 adapter"]["requests"] == result["serve"]["3 adapters"]["requests"] == 6
    assert result["serve"]["3 adapters, --max-batch 3"]["requests"] == 6
    assert result["baseline"]["requests"] == 1 and result["batching"]["prompts"] == 3
    for scenario in (result["baseline"], result["serve"]["1 adapter"], result["serve"]["3 adapters"]):
        assert scenario["rps"] > 0 and 0 < scenario["p50_s"] <= scenario["p95_s"]
