"""ft: fine-tune large language models from validated YAML recipes.

Python API (importing ft_cli loads nothing heavy; torch and peft are imported when a function is called):

    from transformers import AutoModelForCausalLM
    import ft_cli

    base = AutoModelForCausalLM.from_pretrained("Qwen/Qwen2.5-7B-Instruct", dtype="auto")
    model = ft_cli.load_adapter(base, "runs/my-run/adapter")
"""

from __future__ import annotations

import logging as _logging
from pathlib import Path
from typing import Any

__version__ = "0.1.0"

# bitsandbytes 0.50.2 logs "Failed to load CPU gemm_4bit_forward from kernels-community ..." when it is imported on
# a CPU with AVX512-BF16 and the optional `kernels` package is missing. That kernel serves only bitsandbytes' packed
# 4-bit inference path, which ft never uses (ft_cli.model.keep_bnb_cpu_path_trainable, docs/SPEC.md), so the notice
# is noise in every run; `ft doctor` reports the kernel in one line instead. Set here, before anything can import
# bitsandbytes.
BNB_KERNEL_NOTICE = "from kernels-community"
_logging.getLogger("bitsandbytes.backends.cpu.ops").addFilter(
    lambda record: BNB_KERNEL_NOTICE not in record.getMessage())
# transformers imports torchao whenever it is installed (ft's export extra), in every command that loads a model.
# torchao 0.18 then logs that its CUDA-only / other-Python C extensions do not load, and torch 2.13 that torchao
# registers two Enums the old way: noise that says nothing about the user's run (ft export's int8/int4 paths use
# torchao's Python kernels on the CPU; `ft doctor` shows torchao's version).
_logging.getLogger("torchao").addFilter(
    lambda record: not (record.getMessage().startswith("Failed to load") and "torchao/_C" in record.getMessage()))
_logging.getLogger("torch.utils._pytree").addFilter(
    lambda record: "is now natively supported by torch.compile" not in record.getMessage())

__all__ = ["__version__", "load_adapter"]


def load_adapter(base_model: Any, adapter_dir: str | Path) -> Any:
    """Put an adapter that ft trained on `base_model` (a loaded transformers model) and return the model to use,
    frozen (no parameter requires grad) and in eval mode.

    - `method: adapter` (Houlsby bottleneck adapters, `ft_adapter_config.json`): peft has no such method, so ft's
      own layers are added to `base_model` in place and it is returned;
    - every other PEFT method (`adapter_config.json`): `peft.PeftModel.from_pretrained(base_model, adapter_dir)`,
      with the adapter weights kept in float32 on a 16-bit base, as during training (and, for prefix tuning on a
      classifier, the prefix handed to transformers 5 as its KV cache: ft_cli.methods.peft_common.bridge_prefix_cache).

    For a classification run (task: classification) the base is
    `AutoModelForSequenceClassification.from_pretrained(BASE, num_labels=K, pad_token_id=...)`; the trained head is
    in the adapter (peft's modules_to_save, or beside a bottleneck adapter) and replaces the base's new one; the
    label names are in ft_classification.json.

    The base must be the model the adapter was trained on (`base_model_name_or_path` in its config); a bottleneck
    adapter refuses a base of another architecture or size. `adapter_dir` is a run's `adapter/` or `best/`."""
    from ft_cli.errors import UserError

    path = Path(adapter_dir).expanduser()
    from ft_cli.methods.bottleneck import CONFIG_FILE, load_bottleneck_adapter

    if (path / CONFIG_FILE).is_file():
        model = load_bottleneck_adapter(base_model, path)
        from ft_cli.tasks.classify_head import HEAD_FILE, load_head

        if (path / HEAD_FILE).is_file():  # a classification run: its trained head too
            load_head(model, path)
        model.requires_grad_(False)  # frozen for inference, as peft's is_trainable=False leaves a model
        model.eval()
        return model
    if (path / "adapter_config.json").is_file():
        from ft_cli.methods.peft_common import load_peft_adapter

        return load_peft_adapter(base_model, path)
    raise UserError(f"{path}: no {CONFIG_FILE} or adapter_config.json; pass a run's adapter/ or best/ directory "
                    "(full and freeze runs write a whole model to model/: load it with "
                    "AutoModelForCausalLM.from_pretrained)")
