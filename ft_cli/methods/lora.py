"""LoRA (Hu et al., 2021), QLoRA (LoRA on a bitsandbytes 4/8-bit base, Dettmers et al., 2023), DoRA (Liu et al.,
2024) and rank-stabilized LoRA (Kalajdzievski, 2023), through peft.

The quantized base is prepared by `ft_cli.methods.prepare_quantized` before this runs; LoRA+ (a larger learning
rate for the B matrices) is an optimizer matter, in `ft_cli.optim.param_groups`.
"""

from __future__ import annotations

from typing import Any

from ft_cli.methods import get_peft_model_for
from ft_cli.recipe import Recipe


def apply_lora(model: Any, recipe: Recipe) -> Any:
    from peft import LoraConfig

    lora = recipe.lora
    assert lora is not None
    config = LoraConfig(
        r=lora.rank,
        lora_alpha=lora.alpha,
        lora_dropout=lora.dropout,
        target_modules=lora.target_modules,
        use_rslora=lora.use_rslora,
        use_dora=recipe.method == "dora",
        modules_to_save=lora.modules_to_save,
        bias="none",
        task_type="CAUSAL_LM",
    )
    return get_peft_model_for(model, config, "lora.target_modules")
