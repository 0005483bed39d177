"""Pre-flight: what `ft train` checks and sets up before anything loads or is written — the accelerator (with the
recipe's precision), launches accelerate would quietly turn into something else, DeepSpeed's constraints, the dtype
and kernels this device can run, and the experiment trackers' packages. Each raises a UserError naming the field.
"""

from __future__ import annotations

import os
import sys
from typing import Any

from ft_cli.errors import UserError
from ft_cli.recipe import Recipe
from ft_cli.run_dir import RunDir


def preflight(recipe: Recipe, run: RunDir, *, resume: bool) -> Any:
    """Every check that needs no model, tokenizer or data; the Accelerator the run will use."""
    from ft_cli.model import check_attn_implementation
    from ft_cli.model_config import check_context_length
    from ft_cli.optim import check_optimizer_supported

    accelerator = make_accelerator(recipe, run)
    check_deepspeed(recipe, accelerator, resume)
    check_optimizer_supported(recipe, accelerator.device.type)
    check_dtype(recipe, accelerator.device.type)
    check_kernels(recipe, accelerator.device.type)
    check_context_length(recipe)
    check_attn_implementation(recipe, accelerator.device.type)
    return accelerator


def make_accelerator(recipe: Recipe, run: RunDir) -> Any:
    """accelerate's Accelerator with the recipe's precision, not `accelerate launch --mixed_precision`'s: autocast
    in model.dtype over float32 master weights (plus a GradScaler for float16) for whole-model mixed precision,
    none otherwise (PEFT methods compute in model.dtype with float32 adapters)."""
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState

    mixed = {"bfloat16": "bf16", "float16": "fp16"}.get(recipe.autocast_dtype or "", "no")
    state = AcceleratorState._shared_state
    if state and state.get("_mixed_precision") != mixed:
        # An earlier run in this process (tests, notebooks) fixed another precision in accelerate's process-wide
        # state, which refuses a change; the distributed setup (PartialState) is kept.
        AcceleratorState._reset_state()
    # dynamo_backend "no": `accelerate launch --dynamo_backend` would wrap the model and rename every weight
    # `_orig_mod.*` in checkpoints; train.compile compiles the blocks in place instead (ft_cli.model.compile_blocks).
    accelerator = Accelerator(log_with=check_trackers(recipe, run), project_dir=str(run.root), mixed_precision=mixed,
                              cpu=cpu_processes(), dynamo_backend="no")
    if accelerator.is_main_process:
        for warning in launch_warnings(accelerator):
            print(f"warning: {warning}", file=sys.stderr)
    return accelerator


def cpu_processes() -> bool:
    """True when launched as several processes (torchrun, `accelerate launch --multi_gpu`) on a machine with no
    GPU: accelerate then needs cpu=True to set up gloo, or every process silently trains alone."""
    import torch

    launched = int(os.environ.get("WORLD_SIZE", "1")) > 1 or "LOCAL_RANK" in os.environ
    return launched and not torch.accelerator.is_available()


def launch_warnings(accelerator: Any) -> list[str]:
    """Launches that accelerate quietly turns into something else than what was asked for."""
    from accelerate.utils import DistributedType

    env, warnings = os.environ, []
    if (accelerator.num_processes == 1 and "MASTER_PORT" in env
            and env.get("ACCELERATE_USE_CPU", "").lower() in ("1", "true", "yes")):
        warnings.append("`accelerate launch --cpu` starts one process unless given an MPI hostfile: this run uses 1 "
                        "process. For several CPU processes: torchrun --nproc_per_node N -m ft_cli.cli train ...")
    dynamo = env.get("ACCELERATE_DYNAMO_BACKEND", "no")
    if dynamo.lower() not in ("no", ""):
        warnings.append(f"accelerate launch --dynamo_backend {dynamo} is ignored (it would rename the saved weights); "
                        "set train.compile: true in the recipe to compile the model")
    if env.get("ACCELERATE_USE_FSDP", "").lower() == "true" and accelerator.distributed_type != DistributedType.FSDP:
        warnings.append(f"FSDP needs GPUs; accelerate runs this as {accelerator.distributed_type.value} (plain data "
                        "parallel: every process holds the whole model)")
    return warnings


def check_deepspeed(recipe: Recipe, accelerator: Any, resume: bool) -> None:
    """Launched with a DeepSpeed config: DeepSpeed steps the optimizer inside each backward and partitions the
    optimizer state, so ft's own gradient accumulation and resumable checkpoints are refused (FSDP has both), and
    the micro-batch and clipping it needs are taken from the recipe."""
    from accelerate.utils import DistributedType

    if accelerator.distributed_type != DistributedType.DEEPSPEED:
        return
    t = recipe.train
    fsdp = "or launch with recipes/accelerate/fsdp.yaml, which supports it"
    if t.grad_accum != 1:
        raise UserError(f"train.grad_accum: must be 1 under DeepSpeed (got {t.grad_accum}); raise micro_batch_size, "
                        f"use more GPUs, {fsdp}")
    if t.save_every or resume:
        raise UserError(f"train.save_every: resumable checkpoints are not supported under DeepSpeed yet; set "
                        f"save_every: null (the final adapter is still written), {fsdp}")
    config = accelerator.state.deepspeed_plugin.deepspeed_config
    config["train_micro_batch_size_per_gpu"] = t.micro_batch_size
    config["gradient_accumulation_steps"] = 1
    config["gradient_clipping"] = t.max_grad_norm or 0.0


def check_kernels(recipe: Recipe, device_type: str) -> None:
    """train.compile and train.liger_kernel: refuse, before anything loads or is written, what cannot run here."""
    import importlib.util

    t = recipe.train
    if t.liger_kernel:
        if importlib.util.find_spec("liger_kernel") is None:
            raise UserError("train.liger_kernel: liger-kernel is not installed; pip install liger-kernel (or set "
                            "train.liger_kernel: false)")
        if device_type != "cuda":
            raise UserError(f"train.liger_kernel: liger-kernel's Triton kernels need a CUDA GPU and this run is on "
                            f"the {device_type}; set train.liger_kernel: false")
        try:
            import liger_kernel.transformers  # noqa: F401
        except ImportError as exc:  # e.g. a liger-kernel too old or too new for this transformers
            raise UserError(f"train.liger_kernel: liger-kernel does not load here ({exc}); upgrade liger-kernel or "
                            "set train.liger_kernel: false") from None
    if t.compile:
        from ft_cli.model import compile_problem

        problem = compile_problem(device_type)
        if problem:
            raise UserError(f"train.compile: {problem}; or set train.compile: false")


def check_dtype(recipe: Recipe, device_type: str) -> None:
    import torch

    if device_type == "cuda" and recipe.model.dtype == "bfloat16" and not torch.cuda.is_bf16_supported():
        raise UserError("model.dtype: bfloat16 is not supported by this GPU; use float16 or float32")
    if device_type == "cpu" and recipe.model.dtype == "float16":
        raise UserError("model.dtype: float16 training is not supported on the CPU; use float32 or bfloat16")


# logging.trackers entry -> (importable modules, any of which works; the pip extra that installs one)
TRACKER_PACKAGES = {"tensorboard": (("tensorboard", "tensorboardX"), "tensorboard"),
                     "wandb": (("wandb",), "wandb"), "mlflow": (("mlflow",), "mlflow")}


def check_trackers(recipe: Recipe, run: RunDir) -> list[str] | None:
    import importlib.util

    trackers = list(recipe.logging.trackers)
    for name in trackers:  # fail before the model loads, not after the first logged step
        modules, extra = TRACKER_PACKAGES[name]
        if not any(importlib.util.find_spec(m) for m in modules):
            raise UserError(f"logging.trackers: {name} is not installed; pip install 'ft-cli[{extra}]' "
                            f"(or pip install {modules[0]}), or remove {name} from logging.trackers")
    if "wandb" in trackers:
        os.environ.setdefault("WANDB_MODE", "offline")  # offline-safe unless the user opts in
        os.environ.setdefault("WANDB_DIR", str(run.root))
    if "mlflow" in trackers:
        os.environ.setdefault("MLFLOW_TRACKING_URI", (run.root / "mlruns").resolve().as_uri())
    return trackers or None
