"""`ft serve --engine vllm`: the same base and adapters, served by vLLM's OpenAI server (continuous batching,
paged attention, multi-LoRA kernels) — the engine for GPUs and many users. ft only builds the command line:

    vllm serve BASE --served-model-name base --enable-lora --lora-modules NAME=ADAPTER_DIR ... \
        --max-lora-rank R --max-loras N --dtype D [--quantization bitsandbytes] --host H --port P

R is the largest adapter rank rounded up to a rank vLLM accepts. vLLM serves LoRA adapters only (no DoRA, IA3 or
prompt tuning), which is checked here so the user gets exit 2 from ft rather than an error from deep in vLLM.
The API key goes to vLLM through VLLM_API_KEY, not the command line (where `ps` would show it).
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import sys

from ft_cli.adapters import BASE_NAME
from ft_cli.errors import UserError

# The values vLLM's LoRAConfig accepts for max_lora_rank (vllm/config/lora.py).
VLLM_LORA_RANKS = (8, 16, 32, 64, 128, 256, 320, 512)


def vllm_command(plan: object, *, host: str, port: int) -> list[str]:
    from ft_cli.serve import ServePlan

    assert isinstance(plan, ServePlan)
    command = ["vllm", "serve", plan.base, "--served-model-name", BASE_NAME, "--host", host, "--port", str(port)]
    recipe = plan.load_recipe
    if recipe is not None:
        command += ["--dtype", recipe.model.dtype]
        if recipe.quantized:
            if recipe.quantization is not None and recipe.quantization.bits != 4:
                raise UserError(f"--engine vllm: {plan.adapters[0].name!r} was trained on an "
                                f"{recipe.quantization.bits}-bit base; vLLM's bitsandbytes support is 4-bit")
            command += ["--quantization", "bitsandbytes"]
        if recipe.model.trust_remote_code:
            command += ["--trust-remote-code"]
        if recipe.model.revision and not plan.whole_run:
            command += ["--revision", recipe.model.revision]
    if plan.adapters:
        for a in plan.adapters:
            if a.peft_type != "LORA" or a.use_dora:
                raise UserError(f"--engine vllm: adapter {a.name!r} is {a.recipe.method}; vLLM serves LoRA adapters "
                                "only (methods lora, qlora); use the transformers engine")
        top = max(a.rank or 0 for a in plan.adapters)
        rank = next((r for r in VLLM_LORA_RANKS if r >= top), None)
        if rank is None:
            raise UserError(f"--engine vllm: adapter rank {top} exceeds vLLM's largest max LoRA rank "
                            f"{VLLM_LORA_RANKS[-1]}")
        command += ["--enable-lora", "--lora-modules", *(f"{a.name}={a.path}" for a in plan.adapters),
                    "--max-lora-rank", str(rank), "--max-loras", str(len(plan.adapters))]
    return command


def exec_vllm(command: list[str], api_key: str | None) -> None:
    """Replace this process with vLLM's server (signals and exit code are then vLLM's own)."""
    if importlib.util.find_spec("vllm") is None:
        raise UserError("--engine vllm: vllm is not installed (pip install vllm; it needs a CUDA GPU); "
                        "the command would be:\n  " + " ".join(command))
    env = dict(os.environ)
    if api_key:
        env["VLLM_API_KEY"] = api_key
    executable = shutil.which("vllm")
    if executable is None:  # installed as a module without its console script on PATH
        command = [sys.executable, "-m", "vllm.entrypoints.cli.main", *command[1:]]
        executable = sys.executable
    print(" ".join(command), flush=True)
    os.execve(executable, command, env)
