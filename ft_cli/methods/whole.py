"""Whole-model methods: `full` trains every weight, `freeze` only the last blocks and named modules.

Both write a standalone model directory (not an adapter) that `AutoModelForCausalLM.from_pretrained` loads.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ft_cli.errors import UserError
from ft_cli.methods.blocks import transformer_blocks
from ft_cli.recipe import Recipe


def apply_full(model: Any, recipe: Recipe) -> Any:
    model.requires_grad_(True)
    return model


def apply_freeze(model: Any, recipe: Recipe) -> Any:
    """Train the last `freeze.trainable_layers` blocks and every module whose dotted name contains one of
    `freeze.trainable_modules`; freeze everything else. More layers than the model has is refused (a recipe written
    for another model would otherwise train everything without a word).

    Modules are matched rather than parameters so that a head tied to the input embeddings (GPT-2, Qwen2.5-0.5B)
    is found by `lm_head` although its one weight is named after the embeddings."""
    spec = recipe.freeze
    assert spec is not None
    model.requires_grad_(False)
    if spec.trainable_layers:
        _, blocks = transformer_blocks(model)
        if spec.trainable_layers > len(blocks):
            model_type = getattr(model.config, "model_type", "this")
            raise UserError(f"freeze.trainable_layers: {spec.trainable_layers}, but the {model_type} model has "
                            f"{len(blocks)} transformer blocks; at most {len(blocks)} (all of them), or method: full")
        for block in list(blocks)[-spec.trainable_layers:]:
            block.requires_grad_(True)
    names = [name for name, _ in model.named_modules() if name]
    for pattern in spec.trainable_modules:
        matched = [name for name in names if pattern in name]
        if not matched:
            top = sorted({n.split(".")[0] for n in names} | {n for n in names if n.count(".") == 1})
            raise UserError(f"freeze.trainable_modules: {pattern!r} matches no module of this model; module names "
                            f"look like {', '.join(top[:12])}")
        for name in matched:
            model.get_submodule(name).requires_grad_(True)
    return model


def save_whole_model(model: Any, out: Path, recipe: Recipe, *, state_dict: dict[str, Any] | None = None) -> None:
    """safetensors in the recipe's dtype, with `use_cache` back on (training turned it off for checkpointing).

    Under mixed precision the trained weights are float32 master weights: they are written in model.dtype, cast
    tensor by tensor on the CPU, so the trained model is untouched and no second copy is made on the GPU."""
    from ft_cli.precision import torch_dtype

    dtype = torch_dtype(recipe.model.dtype)
    state = state_dict
    if any(p.is_floating_point() and p.dtype != dtype for p in model.parameters()):
        cast: dict[tuple, Any] = {}  # tied weights (one tensor under two names) stay one tensor

        def to_dtype(t: Any) -> Any:
            if not t.is_floating_point():
                return t
            key = (t.data_ptr(), t.shape, t.stride())
            if key not in cast:
                cast[key] = t.detach().to("cpu", dtype)
            return cast[key]

        source = state_dict if state_dict is not None else model.state_dict()
        state = {name: to_dtype(t) for name, t in source.items()}
    use_cache, config_dtype = model.config.use_cache, model.config.dtype
    model.config.use_cache = True
    try:
        model.save_pretrained(out, state_dict=state, safe_serialization=True)
        if state is not None and state is not state_dict:  # save_pretrained records the in-memory dtype
            model.config.dtype = dtype
            model.config.save_pretrained(out)
    finally:
        model.config.use_cache, model.config.dtype = use_cache, config_dtype
