"""IA3 (Liu et al., 2022): learned vectors that rescale the keys, values and feed-forward activations, via peft."""

from __future__ import annotations

from typing import Any

from ft_cli.errors import UserError
from ft_cli.methods.peft_common import get_peft_model_for, peft_task_type
from ft_cli.recipe import Recipe


def apply_ia3(model: Any, recipe: Recipe) -> Any:
    from peft import IA3Config
    from peft.utils.constants import (
        TRANSFORMERS_MODELS_TO_IA3_FEEDFORWARD_MODULES_MAPPING as DEFAULT_FEEDFORWARD,
    )
    from peft.utils.constants import TRANSFORMERS_MODELS_TO_IA3_TARGET_MODULES_MAPPING as DEFAULT_TARGETS

    spec = recipe.ia3
    assert spec is not None
    model_type = model.config.model_type
    targets = spec.target_modules or DEFAULT_TARGETS.get(model_type)
    if targets is None:
        names = linear_module_names(model)
        raise UserError(f"ia3.target_modules: peft has no default for model type {model_type!r}; list the modules "
                        f"to rescale (IA3 scales attention keys/values and the MLP's down projection); this model's "
                        f"linear layers are {', '.join(names)}")
    feedforward = spec.feedforward_modules
    if feedforward is None:  # peft's feed-forward defaults, restricted to the modules actually targeted
        feedforward = [m for m in DEFAULT_FEEDFORWARD.get(model_type, []) if m in targets]
    extra = sorted(set(feedforward) - set(targets))
    if extra:
        raise UserError(f"ia3.feedforward_modules: {', '.join(extra)} not in ia3.target_modules "
                        f"({', '.join(targets)}); feed-forward modules must also be targets")
    config = IA3Config(task_type=peft_task_type(recipe), target_modules=list(targets), feedforward_modules=list(feedforward))
    return get_peft_model_for(model, config, "ia3.target_modules")



def linear_module_names(model: Any) -> list[str]:
    """The distinct last names of the model's linear layers (e.g. qkv_proj, o_proj, gate_up_proj, down_proj), in
    the order they first appear, the output head left out."""
    import torch
    from transformers.pytorch_utils import Conv1D

    head = model.get_output_embeddings()
    names: list[str] = []
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear | Conv1D) and module is not head:
            leaf = name.rsplit(".", 1)[-1]
            if leaf not in names:
                names.append(leaf)
    return names
