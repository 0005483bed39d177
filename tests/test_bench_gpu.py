"""scripts/bench_gpu.py (`scripts/bench.py gpu`) on the CPU: the refusal without CUDA, and the pieces the 8B
numbers rest on (shapes, peak FLOP/s table, packed-example lengths, the targets). The tiny shape end to end on the
CPU runs as the bench stage of the GPU check's dry run (tests/test_gpu_check.py); the real measurements need a GPU
(tests/test_gpu.py runs the tiny shape there)."""

from __future__ import annotations

import argparse
import os
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


def test_0_5b_shape_is_qwen2_5_0_5b() -> None:
    from transformers import AutoModelForCausalLM

    config, tokenizer, _ = bench_gpu.model_config("0.5b")
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    assert sum(p.numel() for p in model.parameters()) == 494_032_768  # Qwen2.5-0.5B (tied embeddings)
    assert config.model_type == "qwen2" and config.tie_word_embeddings and config.num_key_value_heads == 2
    assert model.model.layers[0].self_attn.q_proj.bias is not None and len(tokenizer) < config.vocab_size


def _args(**kw: object) -> argparse.Namespace:
    base = dict(shape="8b", seq=2048, micro_batch=1, steps=20, warmup=5, device="cuda", peak_tflops=None,
                attn=None, no_grad_ckpt=False, compile=False, liger=False)
    return argparse.Namespace(**{**base, **kw})


def _result(method: str, tokens_per_s: float, peak: float, device_peak: float, plan: float) -> dict:
    return {"method": method, "tokens_per_s": tokens_per_s, "timed_s": 10.0, "sum_l_l1": 0, "peak_bytes": peak,
            "device_peak_bytes": device_peak, "plan_bytes": plan, "device_name": "NVIDIA H200"}


def test_summary_targets_are_the_issues() -> None:
    """bf16 LoRA MFU >= 40 %, QLoRA >= 0.9x LoRA tokens/s at <= 0.5x its peak, ft plan within 10 % of each peak."""
    model = {"parameters": 8_030_261_248, "matmul_parameters": 7_504_924_672, "layers": 32, "heads": 32,
             "head_dim": 128}
    n4 = 4 * model["matmul_parameters"]
    lora_tps = 0.40 * 989e12 / n4  # exactly 40 % MFU
    results = [_result("lora", lora_tps, 20.0, 21.0, 22.0), _result("qlora", 0.9 * lora_tps, 10.0, 10.0, 9.5)]
    report = bench_gpu.summarize(_args(), results, model, "cmd")
    t = report["targets"]
    assert t["lora_mfu"]["value"] == pytest.approx(0.40) and t["lora_mfu"]["pass"]
    assert t["qlora_speed"]["value"] == pytest.approx(0.9) and t["qlora_speed"]["pass"]
    assert t["qlora_memory"]["value"] == pytest.approx(0.5) and t["qlora_memory"]["pass"]
    assert t["plan_error"]["value"] == pytest.approx(0.05) and t["plan_error"]["pass"]
    assert report["results"][0]["plan_ratio"] == pytest.approx(22 / 21)
    results[1].update(tokens_per_s=0.89 * lora_tps, peak_bytes=10.5, plan_bytes=11.2)
    t = bench_gpu.summarize(_args(), results, model, "cmd")["targets"]
    assert not t["qlora_speed"]["pass"] and not t["qlora_memory"]["pass"] and not t["plan_error"]["pass"]


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
