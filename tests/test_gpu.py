"""GPU tier: skipped without CUDA (conftest), run whenever a GPU is there.

QLoRA and LoRA in bfloat16 on one GPU; FSDP2 through the shipped config on one GPU (wrapping, gathered checkpoints,
resume); FSDP2 and DeepSpeed ZeRO through the shipped accelerate configs on two or more GPUs (the 2-process runs must compute what 1 process with twice the micro-batch computes, as on the CPU in
tests/test_distributed.py); the GPU benchmark's code path on the tiny shape.
"""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.test_distributed import child_env, free_port
from tests.test_train import metrics, train, write_recipe

pytestmark = pytest.mark.gpu
ROOT = Path(__file__).resolve().parents[1]
two_gpus = pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 CUDA GPUs")


def _loss_falls(run: Path, steps: int) -> None:
    lines, _ = metrics(run)
    assert [ln["step"] for ln in lines] == list(range(1, steps + 1))
    first = sum(ln["loss"] for ln in lines[:3]) / 3
    last = sum(ln["loss"] for ln in lines[-3:]) / 3
    assert last < 0.7 * first, (first, last)


def _loads_in_peft(run: Path, dtype: torch.dtype = torch.bfloat16) -> None:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from ft_cli.builtin_models import resolve_builtin

    base = AutoModelForCausalLM.from_pretrained(resolve_builtin("builtin:tiny-llama"), dtype=dtype).cuda()
    model = PeftModel.from_pretrained(base, run / "adapter")
    assert model(input_ids=torch.tensor([[5, 6, 7]], device="cuda")).logits.isfinite().all()


def test_qlora_bf16_on_cuda_loss_falls(tmp_path: Path, alpaca_file: Path) -> None:
    recipe = write_recipe(tmp_path, alpaca_file, method="qlora", model={"name_or_path": "builtin:tiny-llama",
                          "dtype": "bfloat16"}, quantization={"bits": 4, "compute_dtype": "bfloat16"},
                          data={"packing": True},
                          train={"max_steps": 30, "micro_batch_size": 8, "eval_every": 10, "save_every": 10,
                                 "log_every": 1, "lr": 1e-2, "optimizer": "paged_adamw_8bit"})
    run = train(recipe)
    _loss_falls(run, 30)
    manifest = json.loads((run / "run.json").read_text())
    assert manifest["environment"]["device"].startswith("cuda")
    quantized = [n for n, p in torch.load(run / "checkpoints" / "step-30" / "optimizer.pt", weights_only=True,
                                          map_location="cpu")["state"].items()]
    assert quantized  # paged 8-bit optimizer state was written and reloads
    _loads_in_peft(run)


def test_lora_bf16_on_cuda_loss_falls(tmp_path: Path, alpaca_file: Path) -> None:
    recipe = write_recipe(tmp_path, alpaca_file, model={"name_or_path": "builtin:tiny-llama", "dtype": "bfloat16"},
                          train={"max_steps": 30, "micro_batch_size": 8, "eval_every": 10, "save_every": 10,
                                 "log_every": 1, "lr": 1e-2})
    run = train(recipe)
    _loss_falls(run, 30)
    _loads_in_peft(run)


def _train_subprocess(recipe: Path, out_dir: Path) -> subprocess.CompletedProcess:
    """`ft train` in its own process: liger-kernel patches transformers' modeling code process-wide, and compiled
    code stays cached in a process; neither may leak into the other tests."""
    out = subprocess.run([sys.executable, "-m", "ft_cli.cli", "train", str(recipe), "--output-dir", str(out_dir)],
                         env=child_env(), capture_output=True, text=True, timeout=900, cwd=ROOT)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-6000:]
    return out


def test_compile_on_cuda_trains_like_eager(tmp_path: Path, alpaca_file: Path) -> None:
    """train.compile: true with inductor/triton: the eager run's losses, and an adapter with the same keys."""
    section = {"max_steps": 20, "micro_batch_size": 8, "eval_every": 10, "save_every": 10, "log_every": 1,
               "lr": 1e-2}
    model = {"name_or_path": "builtin:tiny-llama", "dtype": "float32"}
    recipe = write_recipe(tmp_path, alpaca_file, model=model, train={**section, "compile": True})
    out = _train_subprocess(recipe, tmp_path / "compiled")
    assert "train.compile: 2 transformer blocks" in out.stderr
    eager = train(write_recipe(tmp_path / "eager", alpaca_file, model=model, train=section))
    _loss_falls(tmp_path / "compiled", 20)
    losses = [x["loss"] for x in metrics(tmp_path / "compiled")[0]]
    assert losses == pytest.approx([x["loss"] for x in metrics(eager)[0]], rel=1e-3)
    a, b = load_file(tmp_path / "compiled" / "adapter" / "adapter_model.safetensors"), \
        load_file(eager / "adapter" / "adapter_model.safetensors")
    assert a.keys() == b.keys()
    _loads_in_peft(tmp_path / "compiled", torch.float32)


@pytest.mark.skipif(importlib.util.find_spec("liger_kernel") is None, reason="liger-kernel is not installed")
@pytest.mark.parametrize("compile_", [False, True], ids=["eager", "compiled"])
def test_liger_kernel_on_cuda_trains_like_without(compile_: bool, tmp_path: Path, alpaca_file: Path) -> None:
    """train.liger_kernel: true: liger's RMSNorm, SwiGLU, RoPE and fused linear cross-entropy (no adapter on lm_head)
    on the tiny Llama, with and without train.compile; float32, so the losses must match the plain run's closely
    (the fused loss is the same token-normalised sum / num_items_in_batch); the adapter loads in plain peft."""
    section = {"max_steps": 30, "micro_batch_size": 8, "eval_every": 10, "save_every": 10, "log_every": 1,
               "lr": 1e-2, "compile": compile_}
    model = {"name_or_path": "builtin:tiny-llama", "dtype": "float32"}
    recipe = write_recipe(tmp_path, alpaca_file, model=model, train={**section, "liger_kernel": True})
    out = _train_subprocess(recipe, tmp_path / "liger")
    assert "train.liger_kernel: liger-kernel rope, rms_norm, swiglu, fused_linear_cross_entropy" in out.stderr
    plain = _train_subprocess(write_recipe(tmp_path / "plain", alpaca_file, model=model, train=section),
                              tmp_path / "plain")
    assert "liger" not in plain.stderr
    run = tmp_path / "liger"
    _loss_falls(run, 30)
    (lines, evals), (want, want_evals) = metrics(run), metrics(tmp_path / "plain")
    assert [x["loss"] for x in lines] == pytest.approx([x["loss"] for x in want], rel=1e-3)
    assert [x["eval_loss"] for x in evals] == pytest.approx([x["eval_loss"] for x in want_evals], rel=1e-3)
    _loads_in_peft(run, torch.float32)


def _launch(config: str, recipe: Path, out_dir: Path, *extra: str, processes: int = 2) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
           str(ROOT / "recipes" / "accelerate" / config), "--num_processes", str(processes), "--main_process_port",
           str(free_port()), "-m", "ft_cli.cli", "train", str(recipe), "--output-dir", str(out_dir), *extra]
    out = subprocess.run(cmd, env=child_env(), capture_output=True, text=True, timeout=900, cwd=ROOT)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-6000:]
    return out


def _same_as_one_process(config: str, tmp_path: Path, alpaca_file: Path, *, resume: bool = True,
                         processes: int = 2) -> None:
    """2 GPUs under `config`, micro-batch 2 = 1 GPU with micro-batch 4 (float32, so differences are reduction
    order only); then resume the 2-GPU run from its middle checkpoint and end in the same place. processes=1:
    `config`'s wrapping on one GPU at micro-batch 4 against plain ft at micro-batch 4."""
    train_section = {"max_steps": 8, "micro_batch_size": 4 // processes, "grad_accum": 2, "save_every": 4,
                     "eval_every": 4, "log_every": 1, "lr": 1e-2, "keep_last": None}
    if not resume:  # DeepSpeed: no ft-side accumulation, no resumable checkpoints
        train_section.update(grad_accum=1, save_every=None)
    lora = {"rank": 8, "alpha": 16, "dropout": 0.0}
    recipe = write_recipe(tmp_path, alpaca_file, train=train_section, data={"val_split": 0.1}, lora=lora)
    out = _launch(config, recipe, tmp_path / "two", processes=processes)
    assert "warning:" not in out.stderr
    one = train(write_recipe(tmp_path / "one", alpaca_file, train={**train_section, "micro_batch_size": 4},
                             data={"val_split": 0.1}, lora=lora))
    (two_lines, two_eval), (one_lines, one_eval) = metrics(tmp_path / "two"), metrics(one)
    assert [x["loss"] for x in two_lines] == pytest.approx([x["loss"] for x in one_lines], rel=1e-3)
    assert [x["eval_loss"] for x in two_eval] == pytest.approx([x["eval_loss"] for x in one_eval], rel=1e-3)
    a = load_file(tmp_path / "two" / "adapter" / "adapter_model.safetensors")
    b = load_file(one / "adapter" / "adapter_model.safetensors")
    assert a.keys() == b.keys() and all(a[k].shape == b[k].shape for k in a)  # whole tensors, not shards
    assert max((a[k] - b[k]).abs().max().item() for k in a) < 1e-3
    if not resume:
        return
    ckpt = load_file(tmp_path / "two" / "checkpoints" / "step-4" / "trainable.safetensors")
    want = load_file(one / "checkpoints" / "step-4" / "trainable.safetensors")
    assert ckpt.keys() == want.keys() and all(ckpt[k].shape == want[k].shape for k in ckpt)

    # resume from step 4: drop the later checkpoint and the outputs, as if the run had been killed after step 4
    import shutil

    resumed = tmp_path / "resumed"
    shutil.copytree(tmp_path / "two", resumed)
    for name in ("checkpoints/step-8", "adapter", "best"):
        shutil.rmtree(resumed / name, ignore_errors=True)
    _launch(config, recipe, resumed, "--resume", processes=processes)
    (res_lines, _), (want_lines, _) = metrics(resumed), metrics(tmp_path / "two")
    assert [x["loss"] for x in res_lines] == pytest.approx([x["loss"] for x in want_lines], rel=1e-4)


@two_gpus
def test_ddp_two_gpus(tmp_path: Path, alpaca_file: Path) -> None:
    _same_as_one_process("ddp.yaml", tmp_path, alpaca_file)


@two_gpus
def test_fsdp2_two_gpus(tmp_path: Path, alpaca_file: Path) -> None:
    _same_as_one_process("fsdp.yaml", tmp_path, alpaca_file)


def test_fsdp2_on_one_gpu_trains_like_plain(tmp_path: Path, alpaca_file: Path) -> None:
    """What of the FSDP2 path fits on one GPU: accelerate's fully_shard wrapping of ft's PEFT model, the whole
    tensors gathered for checkpoints and the adapter, and resume, against plain ft on the same batches."""
    _same_as_one_process("fsdp.yaml", tmp_path, alpaca_file, processes=1)


@two_gpus
@pytest.mark.skipif(importlib.util.find_spec("deepspeed") is None, reason="deepspeed is not installed")
@pytest.mark.parametrize("config", ["deepspeed_zero2.yaml", "deepspeed_zero3.yaml"])
def test_deepspeed_two_gpus(config: str, tmp_path: Path, alpaca_file: Path) -> None:
    _same_as_one_process(config, tmp_path, alpaca_file, resume=False)


def test_gpu_benchmark_runs_on_the_tiny_shape(shared_data: Path) -> None:
    """`scripts/bench.py gpu` end to end on the tiny shape (the 8B numbers are for docs/benchmarks.md)."""
    out = subprocess.run([sys.executable, str(ROOT / "scripts" / "bench.py"), "gpu", "--shape", "tiny", "--steps",
                          "6", "--warmup", "2", "--seq", "512", "--data-dir", str(shared_data)],
                         env=child_env(), capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-6000:]
    assert "qlora" in out.stdout and "MFU" in out.stdout and "GiB" in out.stdout
