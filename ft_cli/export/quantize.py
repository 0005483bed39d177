"""int8 / int8-dynamic / int4: quantize the 16-bit merge while transformers loads it, and save the result with its
quantization config, so that a plain `AutoModelForCausalLM.from_pretrained(DIR)` loads it back quantized."""

from __future__ import annotations

from pathlib import Path
from typing import Any


def quantization_config(name: str, dtype16: str, skip: tuple[str, ...] | list[str] = ()) -> Any:
    import torch

    if name == "int4":
        from transformers import BitsAndBytesConfig

        return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                  bnb_4bit_compute_dtype=getattr(torch, dtype16),
                                  bnb_4bit_quant_storage=torch.uint8)
    from torchao.quantization import Int8DynamicActivationInt8WeightConfig, Int8WeightOnlyConfig
    from transformers import TorchAoConfig

    if name == "int8":
        return TorchAoConfig(quant_type=Int8WeightOnlyConfig())
    if name == "int8-dynamic":
        return TorchAoConfig(quant_type=Int8DynamicActivationInt8WeightConfig())
    if name == "int8-dynamic-int4":
        from ft_cli import qat

        return TorchAoConfig(quant_type=qat.base_config(), modules_to_not_convert=["lm_head", *skip])
    raise ValueError(name)


def quantize_transformers(name: str, merged: Path, export_dir: Path, dtype16: str) -> dict[str, Any]:
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    skip: list[str] = []
    if name == "int8-dynamic-int4":  # the layers train.qat leaves out, for the same reason (ft_cli.qat)
        from ft_cli.qat import select_linears

        with torch.device("meta"):
            shape = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(str(merged)))
        skip = select_linears(shape)[1]
    model = AutoModelForCausalLM.from_pretrained(str(merged), dtype=getattr(torch, dtype16),
                                                 quantization_config=quantization_config(name, dtype16, skip),
                                                 device_map={"": "cpu"})
    quantized, plain = quantized_linears(model)
    model.save_pretrained(str(export_dir))
    AutoTokenizer.from_pretrained(str(merged)).save_pretrained(str(export_dir))
    del model
    notes = []
    narrow = [n for n in plain if n in skip]
    if narrow:
        from ft_cli.qat import GROUP_SIZE

        notes.append(f"{len(narrow)} linear layer(s) kept in {dtype16}: input width not a multiple of the int4 "
                     f"group size {GROUP_SIZE} ({', '.join(narrow[:3])}{' ...' if len(narrow) > 3 else ''})")
    others = [n for n in plain if n not in skip]
    if others:
        notes.append(f"{len(others)} linear layer(s) kept in {dtype16} ({', '.join(others[:3])}"
                     f"{' ...' if len(others) > 3 else ''}): transformers does not quantize the output head")
    print(f"quantized {len(quantized)} linear layers to {name}" + "".join(f"; {n}" for n in notes), flush=True)
    return {"artifact": None, "quantized_layers": len(quantized), "unquantized_layers": plain, "notes": notes}


def quantized_linears(model: Any) -> tuple[list[str], list[str]]:
    """(names of linear layers holding quantized weights, names of those left in 16 bits)."""
    import torch

    quantized, plain = [], []
    for name, module in model.named_modules():
        if "bitsandbytes" in type(module).__module__ and hasattr(module, "weight"):
            quantized.append(name)
        elif isinstance(module, torch.nn.Linear):
            is_torchao = "torchao" in type(module.weight).__module__ or "torchao" in type(module.weight.data).__module__
            (quantized if is_torchao else plain).append(name)
    return quantized, plain
