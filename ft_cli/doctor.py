"""`ft doctor`: what this environment has, and what that means for recipes."""

from __future__ import annotations

import importlib.util
import os
import shutil

from ft_cli.errors import UserError
from ft_cli.manifest import package_versions


def run_doctor() -> list[tuple[str, str, str]]:
    """Print a table of checks; returns the rows (name, value, meaning) for tests."""
    import torch
    from rich.console import Console
    from rich.markup import escape
    from rich.table import Table

    rows: list[tuple[str, str, str]] = []
    versions = package_versions()
    for name in ("ft-cli", "torch", "transformers", "peft", "accelerate", "bitsandbytes", "datasets"):
        rows.append((name, versions.get(name) or "missing", "" if versions.get(name) else "required: pip install " + name))
    rows.append(("CUDA (torch build)", torch.version.cuda or "none (CPU build)", ""))
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            props = torch.cuda.get_device_properties(i)
            gib = props.total_memory / 2**30
            cap = f"{props.major}.{props.minor}"
            meaning = "bf16 ok" if torch.cuda.is_bf16_supported() else "no bf16: use model.dtype float16"
            rows.append((f"GPU {i}", f"{props.name}, {gib:.1f} GiB, compute {cap}", meaning))
        rows.append(("qlora / adamw_8bit / paged_adamw_8bit", "available", "bitsandbytes on CUDA"))
    else:
        rows.append(("GPU", "none", "training runs on the CPU: use model.dtype float32, small models (builtin:tiny-llama)"))
        rows.append(("qlora", "available (CPU, slow)", "bitsandbytes 4-bit runs on the CPU"))
        rows.append(("paged_adamw_8bit", "unavailable", "needs CUDA; use adamw_8bit or adamw_torch"))
    flash = importlib.util.find_spec("flash_attn") is not None
    rows.append(("flash-attn", versions.get("flash-attn") or "not installed",
                 "attn_implementation flash_attention_2 for packed rows" if flash else "sdpa is used (fine)"))
    liger = versions.get("liger-kernel")
    if liger and torch.cuda.is_available():
        liger_meaning = "train.liger_kernel: true available"
    elif liger:
        liger_meaning = "train.liger_kernel needs a CUDA GPU"
    else:
        liger_meaning = "optional, for train.liger_kernel (CUDA): pip install liger-kernel"
    rows.append(("liger-kernel", liger or "not installed", liger_meaning))
    from ft_cli.model import compile_problem

    device = "cuda" if torch.cuda.is_available() else "cpu"
    problem = compile_problem(device)
    rows.append(("torch.compile", f"unavailable on {device}" if problem else f"available on {device}",
                 problem or "train.compile: true compiles the transformer blocks (the first steps are slower)"))
    for dist, extra, use in (("matplotlib", "report", "ft report (plots)"),
                             ("tensorboard", "tensorboard", "logging.trackers: [tensorboard]"),
                             ("wandb", "wandb", "logging.trackers: [wandb]"),
                             ("mlflow", "mlflow", "logging.trackers: [mlflow]")):
        version = _version(dist)
        rows.append((dist, version or "not installed",
                     f"{use} available" if version else f"optional, for {use}: pip install 'ft-cli[{extra}]'"))
    for dist, extra, use in (("torchao", "export", "ft export int8 / int8-dynamic / int8-dynamic-int4, train.qat"),
                             ("gguf", "export", "ft export gguf-* (reading GGUF back)"),
                             ("llama-cpp-python", "llama-cpp", "ft export: GGUF run in llama.cpp, gguf-q4_k_m")):
        version = _version(dist)
        rows.append((dist, version or "not installed",
                     f"{use} available" if version else f"optional, for {use}: pip install 'ft-cli[{extra}]'"))
    from ft_cli.export.gguf import converter_home, find_converter

    try:
        converter = find_converter()
    except UserError as exc:  # FT_GGUF_CONVERTER pointing nowhere: report it, doctor never fails
        converter, problem = None, str(exc)
    else:
        problem = "ft export gguf-* available" if converter else "python -m ft_cli.export.gguf install"
    rows.append(("GGUF converter (llama.cpp)", str(converter) if converter else f"not in {converter_home()}", problem))
    rows.append(("HF_HUB_OFFLINE", os.environ.get("HF_HUB_OFFLINE", "unset"),
                 "hub ids must already be cached" if os.environ.get("HF_HUB_OFFLINE") == "1" else ""))
    rows.append(("HF_TOKEN", "set" if os.environ.get("HF_TOKEN") else "unset",
                 "" if os.environ.get("HF_TOKEN") else "gated models (Llama) need it or huggingface-cli login"))
    rows.append(("accelerate launch", "found" if shutil.which("accelerate") else "not on PATH",
                 "multi-process: accelerate launch --num_processes N -m ft_cli.cli train RECIPE"))
    table = Table(title="ft doctor")
    for col in ("check", "value", "what it means"):
        table.add_column(col)
    for row in rows:
        table.add_row(*(escape(cell) for cell in row))  # "[tensorboard]" is not markup
    Console().print(table)
    return rows


def _version(dist: str) -> str | None:
    from importlib import metadata

    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None
