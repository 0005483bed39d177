"""Load what `ft export` wrote. The transformers formats load with a plain `AutoModelForCausalLM.from_pretrained`;
this adds only what ft's own checks need on top (the tokenizer, one place that handles bitsandbytes' CPU kernel)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

# bitsandbytes 0.50.2 (`Linear4bit.forward`): on a CPU with AVX512-BF16 the first inference forward repacks each
# 4-bit weight for a packed kernel, which asserts unless out_features % 32 == 0 and fails unless
# in_features % 64 == 0 (real models' widths pass; ft's tiny built-ins, 176 wide, do not).
PACKED_OUT_MULTIPLE = 32
PACKED_IN_MULTIPLE = 64


def load_export(path: str | Path, device: Any = "cpu") -> tuple[Any, Any, list[str]]:
    """(model, tokenizer, notes) for an int8 / int8-dynamic / int4 export directory."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = Path(path)
    model = AutoModelForCausalLM.from_pretrained(str(path), device_map={"": torch.device(device)})
    model.eval()
    tokenizer = AutoTokenizer.from_pretrained(str(path))
    notes = []
    note = fit_bnb_cpu_kernel(model)
    if note:
        notes.append(note)
    return model, tokenizer, notes


def fit_bnb_cpu_kernel(model: Any) -> str | None:
    """Keep bitsandbytes' packed AVX512-BF16 CPU kernel where every 4-bit layer's widths allow it (it is the fast
    path a user gets), else turn it off on all of them (the dequantizing path) and say why."""
    layers = [m for m in model.modules() if hasattr(m, "support_avx512bf16_for_cpu")]
    if not layers or not any(m.support_avx512bf16_for_cpu for m in layers):
        return None
    bad = [m for m in layers
           if m.out_features % PACKED_OUT_MULTIPLE or m.in_features % PACKED_IN_MULTIPLE]
    if not bad:
        return None
    for m in layers:
        m.support_avx512bf16_for_cpu = False
    example = bad[0]
    return (f"this CPU has AVX512-BF16, where bitsandbytes runs 4-bit layers through a packed kernel that needs "
            f"out_features % {PACKED_OUT_MULTIPLE} == 0 and in_features % {PACKED_IN_MULTIPLE} == 0; {len(bad)} of "
            f"{len(layers)} layers are not (e.g. {example.in_features}->{example.out_features}), so ft measured on "
            "the dequantizing path (support_avx512bf16_for_cpu = False on every Linear4bit). A plain from_pretrained "
            "of this model on such a CPU fails at its first forward unless you do the same "
            "(ft_cli.export.load_export does it for you).")
