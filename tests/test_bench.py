"""`scripts/bench.py train` on the tiny model: ft and HF Trainer + peft train the same rows in the same order from
the same LoRA init, so their losses must agree step by step; `bench.py data` prints its ratios with their spread.
Each benchmark prints every ratio it promises. (The numbers themselves are for docs/benchmarks.md, measured on idle cores, never asserted here.)"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[1]


def test_bench_train_matches_hf_trainer_and_prints_ratios(tmp_path: Path, shared_data: Path) -> None:
    out = tmp_path / "bench.json"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "2"}
    proc = subprocess.run([sys.executable, str(ROOT / "scripts" / "bench.py"), "train", "--model", "builtin:tiny-llama",
                           "--steps", "4", "--packed-steps", "3", "--max-seq-len", "256", "--data-dir",
                           str(shared_data), "--json", str(out)],
                          env=env, capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    for text in ("ft packed vs baseline effective tokens/s", "padding waste", "loop overhead", "loss parity",
                 "time to first optimizer step", "ft --help"):
        assert text in proc.stdout, proc.stdout
    result = json.loads(out.read_text())
    ft, base = result["runs"]["ft"][0], result["runs"]["baseline"][0]
    assert len(ft["losses"]) == len(base["losses"]) == 4
    assert ft["losses"] == pytest.approx(base["losses"], rel=1e-4)  # same maths as HF Trainer + peft
    assert ft["losses"][-1] < ft["losses"][0]
    assert result["runs"]["ft-packed"][0]["padding_waste"] < base["padding_waste"]


@pytest.mark.skipif(importlib.util.find_spec("torchao") is None, reason="torchao not installed")
def test_bench_export_compares_qat_with_post_training_int4(tmp_path: Path, shared_data: Path) -> None:
    out = tmp_path / "bench.json"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "2"}
    proc = subprocess.run([sys.executable, str(ROOT / "scripts" / "bench.py"), "export", "--model", "builtin:tiny-llama",
                           "--steps", "2", "--formats", "", "--eval-rows", "8", "--bench-tokens", "4",
                           "--data-dir", str(shared_data), "--out", str(tmp_path / "work"), "--json", str(out)],
                          env=env, capture_output=True, text=True, timeout=900, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    for text in ("QAT vs post-training quantization", "QAT's perplexity gap / PTQ's", "== formats"):
        assert text in proc.stdout, proc.stdout
    reports = json.loads(out.read_text())["reports"]
    for name in ("ptq", "qat"):
        q = reports[name]["int8-dynamic-int4"]["quality"]
        assert q["reference"]["perplexity"] > 1 and q["export"]["perplexity"] > 1
def test_bench_data_prints_every_ratio(shared_data: Path) -> None:
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, str(ROOT / "scripts" / "bench.py"), "data", "--rows", "300", "--repeat", "2",
                           "--pack-rows", "1000", "--data-dir", str(shared_data)],
                          env=env, capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    out = proc.stdout
    for name in ("ft, every inference prompt rendered too", "baseline map, apply_chat_template only",
                 "baseline map, apply_chat_template + prompt mask"):
        assert f"{name:<48} / ft: x" in out and "2 repeats)" in out, out
    assert "ft: 300 examples" in out and "packing efficiency on alpaca_en_demo.json" in out, out


def test_bench_classify_prints_ratios_against_the_trainer_script(shared_data: Path) -> None:
    done = subprocess.run([sys.executable, str(ROOT / "scripts" / "bench.py"), "classify", "--model", "builtin:tiny-bert",
                           "--steps", "2", "--batch", "8", "--max-len", "32"], capture_output=True, text=True,
                          timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    out = done.stdout
    for line in ("train examples/s", "predict examples/s (200)", "held-out accuracy", "ft / trainer: training",
                 "ft / trainer-dynamic: training"):
        assert line in out, out


@pytest.mark.skipif(importlib.util.find_spec("trl") is None, reason="trl not installed")
def test_bench_dpo_matches_trls_loss_curve(tmp_path: Path, shared_data: Path) -> None:
    """ft's DPO loop and TRL's DPOTrainer on the same pairs, order and LoRA: the same losses step by step."""
    out = tmp_path / "bench.json"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "2"}
    proc = subprocess.run([sys.executable, str(ROOT / "scripts" / "bench.py"), "dpo", "--model", "builtin:tiny-llama",
                           "--steps", "3", "--micro", "1", "--max-seq-len", "256", "--lr", "5e-3", "--repeat", "1",
                           "--data-dir", str(shared_data), "--json", str(out)],
                          env=env, capture_output=True, text=True, timeout=900, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    assert "ft / TRL pairs/s" in proc.stdout and "largest relative loss difference" in proc.stdout, proc.stdout
    result = json.loads(out.read_text())
    ft_losses, trl_losses = result["runs"]["ft"][0]["losses"], result["runs"]["trl"][0]["losses"]
    assert len(ft_losses) == len(trl_losses) == 3
    assert ft_losses[0] == pytest.approx(0.693147, abs=1e-5)
    assert ft_losses == pytest.approx(trl_losses, rel=1e-3), (ft_losses, trl_losses)
    assert ft_losses[-1] != pytest.approx(ft_losses[0], abs=1e-3)  # the curve moved: the comparison means something
