"""The pieces of a merge's parity check that ft merge and a classification run's merge (ft_cli.tasks.classify_run)
share: the tolerance per output dtype, folding an adapter in, checking the result is a plain model, and comparing
logits. A leaf below both, so neither imports the other."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

# Refuse when mean |merged - reference| / mean |reference| exceeds this. A correct merge differs only by rounding
# its weights to the output dtype (bf16 keeps 8 bits of mantissa, fp16 11); a wrong one differs by the adapter.
TOLERANCE = {"float32": 1e-4, "float16": 5e-3, "bfloat16": 2e-2}

@dataclass
class Parity:
    samples: int
    tokens: int
    compute_dtype: str
    max_abs_diff: float
    mean_abs_diff: float
    relative_mean_diff: float
    top1_agreement: float

    def line(self) -> str:
        return (f"max |diff| {self.max_abs_diff:.3g}, mean |diff| {self.mean_abs_diff:.3g} "
                f"(relative {self.relative_mean_diff:.3g}), top-1 agreement {self.top1_agreement:.1%}")


def merge_adapter(model: Any) -> Any:
    """Fold the adapter into the base weights; a whole model (full/freeze) is returned as it is."""
    from peft import PeftModel

    if isinstance(model, PeftModel):
        return model.merge_and_unload(safe_merge=True)
    if hasattr(model, "merge_and_unload"):  # e.g. a mergeable bottleneck adapter
        return model.merge_and_unload()
    return model


def check_plain_model(model: Any, dtype: Any) -> None:
    """The merged model must be a plain transformers model: no adapter, no quantized layers, one dtype."""
    bad = [name for name, mod in model.named_modules()
           if "bitsandbytes" in type(mod).__module__ or "peft" in type(mod).__module__]
    if bad:
        raise RuntimeError(f"merged model still holds adapter/quantized modules: {bad[:3]}")
    dtypes = {p.dtype for p in model.parameters() if p.is_floating_point()}
    if dtypes != {dtype}:
        raise RuntimeError(f"merged model has dtypes {dtypes}, expected {dtype}")


def compare(candidate: list[Any], reference: list[Any], compute_dtype: str) -> Parity:
    import torch

    diff = torch.cat([(c - r).abs().flatten() for c, r in zip(candidate, reference, strict=True)])
    scale = torch.cat([r.abs().flatten() for r in reference]).mean().clamp_min(1e-12)
    agree = torch.cat([c.argmax(-1) == r.argmax(-1) for c, r in zip(candidate, reference, strict=True)]).float().mean()
    return Parity(samples=len(reference), tokens=sum(len(r) for r in reference), compute_dtype=compute_dtype,
                  max_abs_diff=float(diff.max()), mean_abs_diff=float(diff.mean()),
                  relative_mean_diff=float(diff.mean() / scale), top1_agreement=float(agree))
