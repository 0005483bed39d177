"""Quantization-aware training (`train.qat`) and the matching export (`ft export --format int8-dynamic-int4`).

One scheme, one definition: torchao's Int8DynamicActivationIntxWeightConfig with int4 weights in groups of 32
("8da4w", what ExecuTorch/XNNPACK run on phones and CPUs). Training wraps the chosen linear layers in torchao's
FakeQuantizedLinear (torchao.quantization.qat.QATConfig, step "prepare", derived from that same config): the
forward rounds weights to int4 and activations to int8 and back, the backward passes gradients straight through.
The export applies the config itself to the merged model, so it rounds exactly as training simulated.

Which layers: every nn.Linear except the output head (transformers never quantizes it either) and LoRA's own
A/B matrices, and only where in_features is a multiple of the group size (torchao asserts otherwise); training
and export use the same selection and say how many layers it leaves out.
"""

from __future__ import annotations

from typing import Any

SCHEMES = ("int8-dynamic-act-int4-weight",)
GROUP_SIZE = 32
_SKIP = ("lm_head", "lora_A", "lora_B", "lora_embedding", "lora_magnitude")


def base_config() -> Any:
    import torch
    from torchao.quantization import Int8DynamicActivationIntxWeightConfig
    from torchao.quantization.granularity import PerGroup

    return Int8DynamicActivationIntxWeightConfig(weight_dtype=torch.int4, weight_granularity=PerGroup(GROUP_SIZE))


def select_linears(model: Any) -> tuple[list[str], list[str]]:
    """(names of the linear layers the scheme quantizes, names of those it cannot: width not a multiple of the
    group size)."""
    import torch

    chosen, skipped = [], []
    for name, module in model.named_modules():
        if type(module) is not torch.nn.Linear or any(part in name.split(".") for part in _SKIP):
            continue
        (chosen if module.in_features % GROUP_SIZE == 0 else skipped).append(name)
    return chosen, skipped


def apply_qat(model: Any) -> tuple[int, list[str]]:
    """Swap the selected linear layers for fake-quantized ones, in place (same weight Parameters, same state-dict
    names). Returns (layers swapped, names skipped)."""
    from torchao.quantization import quantize_
    from torchao.quantization.qat import QATConfig

    chosen, skipped = select_linears(model)
    targets = set(chosen)
    quantize_(model, QATConfig(base_config(), step="prepare"), filter_fn=lambda _m, fqn: fqn in targets)
    return len(chosen), skipped


def skipped_note(skipped: list[str], total: int) -> str:
    shown = ", ".join(skipped[:3]) + (f" and {len(skipped) - 3} more" if len(skipped) > 3 else "")
    return (f"{len(skipped)} of {total} linear layers have an input width that is not a multiple of {GROUP_SIZE} "
            f"and stay unquantized ({shown})")
