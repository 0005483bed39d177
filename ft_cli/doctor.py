"""`ft doctor`: what this environment has, and what that means for recipes."""

from __future__ import annotations

import importlib.util
import os
import re
import shutil
from pathlib import Path

from ft_cli.errors import UserError
from ft_cli.manifest import package_versions

# The versions the suite last passed with (scripts/update_constraints.py), beside the source tree ft runs from.
CONSTRAINTS = Path(__file__).resolve().parents[1] / "constraints.txt"


def run_doctor() -> list[tuple[str, str, str]]:
    """Print a table of checks; returns the rows (name, value, meaning) for tests."""
    from rich.console import Console
    from rich.markup import escape
    from rich.table import Table

    rows = _package_rows() + _device_rows() + _kernel_rows() + _optional_rows() + _environment_rows()
    table = Table(title="ft doctor")
    for col in ("check", "value", "what it means"):
        table.add_column(col)
    for row in rows:
        table.add_row(*(escape(cell) for cell in row))  # "[tensorboard]" is not markup
    Console().print(table)
    return rows


Row = tuple[str, str, str]


def _package_rows() -> list[Row]:
    """The required packages, and how far they are from the versions the suite last passed with."""
    rows: list[Row] = []
    versions = package_versions()
    tested = tested_versions()
    drift = {name: want for name, _, want in version_drift(tested)} if tested is not None else {}
    for name in ("ft-cli", "torch", "transformers", "peft", "accelerate", "bitsandbytes", "datasets"):
        meaning = "" if versions.get(name) else "required: pip install " + name
        if canonical(name) in drift:
            meaning = f"tested with {drift[canonical(name)]} (constraints.txt)"
        rows.append((name, versions.get(name) or "missing", meaning))
    rows.append(drift_row(tested))
    return rows


def _device_rows() -> list[Row]:
    """The torch build, the GPUs (or none), and what the device allows (4-bit, 8-bit optimizers)."""
    import torch

    rows: list[Row] = [("CUDA (torch build)", torch.version.cuda or "none (CPU build)", "")]
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
    rows.append(bnb_cpu_row())
    return rows


def _kernel_rows() -> list[Row]:
    """flash-attn, liger-kernel and torch.compile: what the speed options of a recipe can use here."""
    import torch

    from ft_cli.model import compile_problem

    versions = package_versions()
    flash = importlib.util.find_spec("flash_attn") is not None
    rows: list[Row] = [("flash-attn", versions.get("flash-attn") or "not installed",
                        "attn_implementation flash_attention_2 for packed rows" if flash else "sdpa is used (fine)")]
    liger = versions.get("liger-kernel")
    if liger and torch.cuda.is_available():
        liger_meaning = "train.liger_kernel: true available"
    elif liger:
        liger_meaning = "train.liger_kernel needs a CUDA GPU"
    else:
        liger_meaning = "optional, for train.liger_kernel (CUDA): pip install liger-kernel"
    rows.append(("liger-kernel", liger or "not installed", liger_meaning))
    device = "cuda" if torch.cuda.is_available() else "cpu"
    problem = compile_problem(device)
    rows.append(("torch.compile", f"unavailable on {device}" if problem else f"available on {device}",
                 problem or "train.compile: true compiles the transformer blocks (the first steps are slower)"))
    return rows


def _optional_rows() -> list[Row]:
    """Optional extras (plots, trackers, export) and the GGUF converter."""
    from ft_cli.export.gguf import converter_home, find_converter

    rows: list[Row] = []
    for dist, extra, use in (("matplotlib", "report", "ft report (plots)"),
                             ("tensorboard", "tensorboard", "logging.trackers: [tensorboard]"),
                             ("wandb", "wandb", "logging.trackers: [wandb]"),
                             ("mlflow", "mlflow", "logging.trackers: [mlflow]"),
                             ("torchao", "export", "ft export int8 / int8-dynamic / int8-dynamic-int4, train.qat"),
                             ("gguf", "export", "ft export gguf-* (reading GGUF back)"),
                             ("llama-cpp-python", "llama-cpp", "ft export: GGUF run in llama.cpp, gguf-q4_k_m")):
        version = _version(dist)
        rows.append((dist, version or "not installed",
                     f"{use} available" if version else f"optional, for {use}: pip install 'ft-cli[{extra}]'"))
    try:
        converter = find_converter()
    except UserError as exc:  # FT_GGUF_CONVERTER pointing nowhere: report it, doctor never fails
        converter, problem = None, str(exc)
    else:
        problem = "ft export gguf-* available" if converter else "python -m ft_cli.export.gguf install"
    rows.append(("GGUF converter (llama.cpp)", str(converter) if converter else f"not in {converter_home()}", problem))
    return rows


def _environment_rows() -> list[Row]:
    return [("HF_HUB_OFFLINE", os.environ.get("HF_HUB_OFFLINE", "unset"),
             "hub ids must already be cached" if os.environ.get("HF_HUB_OFFLINE") == "1" else ""),
            ("HF_TOKEN", "set" if os.environ.get("HF_TOKEN") else "unset",
             "" if os.environ.get("HF_TOKEN") else "gated models (Llama) need it or huggingface-cli login"),
            ("accelerate launch", "found" if shutil.which("accelerate") else "not on PATH",
             "multi-process: accelerate launch --num_processes N -m ft_cli.cli train RECIPE")]


def _version(dist: str) -> str | None:
    from importlib import metadata

    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


# Tested versions ---------------------------------------------------------------------------------------------------

def canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def tested_versions(path: Path | None = None) -> dict[str, str] | None:
    """{package: version} pinned in constraints.txt; None when there is none (ft installed from a wheel)."""
    path = path or CONSTRAINTS
    if not path.is_file():
        return None
    pins = {}
    for line in path.read_text(encoding="utf-8").splitlines():
        name, sep, version = line.split("#", 1)[0].strip().partition("==")
        if sep:
            pins[canonical(name)] = version.strip()
    return pins


def version_drift(tested: dict[str, str] | None) -> list[tuple[str, str, str]]:
    """(package, installed, tested) for every installed package whose version is not the tested one (local labels
    such as +cpu ignored); packages that are not installed (optional extras) are not drift."""
    from importlib import metadata

    if not tested:
        return []
    installed = {canonical(d.metadata["Name"]): d.version for d in metadata.distributions() if d.metadata["Name"]}
    return sorted((name, installed[name], want) for name, want in tested.items()
                  if name in installed and installed[name].split("+", 1)[0] != want)


def drift_row(tested: dict[str, str] | None) -> tuple[str, str, str]:
    name = "tested versions"
    if tested is None:
        return name, "unknown", "no constraints.txt beside ft (installed from a wheel?): versions are not checked"
    drift = version_drift(tested)
    if not drift:
        return name, f"all match constraints.txt ({len(tested)} pinned)", ""
    shown = ", ".join(f"{n} {have} (tested {want})" for n, have, want in drift[:6])
    more = f" and {len(drift) - 6} more" if len(drift) > 6 else ""
    return (name, f"{len(drift)} of {len(tested)} differ from constraints.txt",
            f"{shown}{more}; bash scripts/_setup.sh installs the tested ones")


def bnb_cpu_row() -> tuple[str, str, str]:
    """bitsandbytes' CPU kernels: one line instead of the notice bitsandbytes logs at import (see ft_cli/__init__)."""
    try:
        from bitsandbytes.functional import has_avx512bf16

        avx = "yes" if has_avx512bf16() else "no"
    except Exception as exc:  # bitsandbytes missing or broken: its own row says so
        return "bitsandbytes on the CPU", "unknown", f"{type(exc).__name__}: {exc}"
    kernels = "installed" if importlib.util.find_spec("kernels") else "not installed"
    return ("bitsandbytes on the CPU", f"AVX512-BF16: {avx}; kernels-community gemm_4bit_forward: {kernels}",
            "ft keeps every 4-bit layer on the dequantizing path (bitsandbytes' packed AVX512-BF16 inference kernel "
            "is never used), so results do not depend on the CPU and the optional kernel is not needed")
