"""scripts/bench_gpu.py (`scripts/bench.py gpu`) on the CPU: the tiny shape end to end through ft's setup()/fit(),
the refusal without CUDA, and the pieces the 8B numbers rest on (shape, peak FLOP/s table, packed-example lengths).
The real measurements need a GPU (tests/test_gpu.py runs the tiny shape there)."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "bench_gpu.py"
sys.path.insert(0, str(ROOT / "scripts"))

import bench_gpu  # noqa: E402


def _env() -> dict[str, str]:
    return dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="2", TOKENIZERS_PARALLELISM="false")


def test_tiny_shape_on_cpu_runs_both_methods(tmp_path: Path, shared_data: Path) -> None:
    out_json = tmp_path / "bench.json"
    out = subprocess.run([sys.executable, str(SCRIPT), "--shape", "tiny", "--device", "cpu", "--steps", "3",
                          "--warmup", "1", "--seq", "256", "--data-dir", str(shared_data), "--json", str(out_json)],
                         env=_env(), capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-6000:]
    for method in ("lora", "qlora"):  # a row of numbers per method: tokens/s, s/step, ..., peak GiB
        row = re.search(rf"^{method}\s+([\d,]+)\s+([\d.]+)\s+n/a\s+n/a\s+n/a\s+([\d.]+)\s", out.stdout, re.M)
        assert row, out.stdout
        assert float(row[1].replace(",", "")) > 0 and float(row[2]) > 0 and float(row[3]) > 0
    for text in ("MFU", "GiB", "QLoRA/LoRA throughput", "QLoRA/LoRA peak memory", "torch ", "transformers ",
                 "peft ", "bitsandbytes ", "command: python scripts/bench_gpu.py --shape tiny"):
        assert text in out.stdout, (text, out.stdout)
    report = json.loads(out_json.read_text())
    assert [r["method"] for r in report["results"]] == ["lora", "qlora"]
    for r in report["results"]:
        assert r["timed_steps"] == 3 and 0 < r["timed_tokens"] <= 3 * 256 and r["tokens_per_s"] > 0
        assert r["peak_bytes"] > 0 and r["segments"] >= 3
    assert report["targets"]["qlora_speed"]["value"] > 0


def test_cuda_without_a_gpu_exits_2_with_a_clear_message() -> None:
    if torch.cuda.is_available():
        pytest.skip("a CUDA GPU is present")
    out = subprocess.run([sys.executable, str(SCRIPT), "--shape", "tiny", "--steps", "1"], env=_env(),
                         capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert out.returncode == 2, out.stdout + out.stderr
    assert "no CUDA GPU is available" in out.stderr and "--device cpu" in out.stderr
    assert "Traceback" not in out.stderr


def test_8b_on_cpu_is_refused() -> None:
    out = subprocess.run([sys.executable, str(SCRIPT), "--shape", "8b", "--device", "cpu"], env=_env(),
                         capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert out.returncode == 2 and "--shape tiny" in out.stderr, out.stdout + out.stderr


def test_8b_shape_is_llama_3_1_8b() -> None:
    from transformers import AutoModelForCausalLM

    config, tokenizer, _ = bench_gpu.model_config("8b")
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    assert sum(p.numel() for p in model.parameters()) == 8_030_261_248  # Llama-3.1-8B
    assert config.num_key_value_heads == 8 and config.vocab_size == 128256 and len(tokenizer) < config.vocab_size


def test_peak_flops_by_device_name() -> None:
    assert bench_gpu._peak_flops("NVIDIA H100 80GB HBM3") == 989e12
    assert bench_gpu._peak_flops("NVIDIA H100 PCIe") == 756e12
    assert bench_gpu._peak_flops("NVIDIA H200") == 989e12
    assert bench_gpu._peak_flops("NVIDIA A100-SXM4-80GB") == 312e12
    assert bench_gpu._peak_flops("NVIDIA GeForce RTX 4090") is None


def test_packed_example_lengths_leave_out_padding() -> None:
    pad = 4
    batch = {"input_ids": torch.tensor([[7, 8, 9, 5, 6, pad, pad], [1, 2, 3, 4, 5, 6, 7]]),
             "position_ids": torch.tensor([[0, 1, 2, 0, 1, 0, 1], [0, 1, 2, 3, 0, 1, 2]])}
    assert bench_gpu._segments(batch, pad) == [3, 2, 4, 3]
