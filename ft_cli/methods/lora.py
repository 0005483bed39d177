"""LoRA (Hu et al., 2021), QLoRA (LoRA on a bitsandbytes 4/8-bit base, Dettmers et al., 2023), DoRA (Liu et al.,
2024) and rank-stabilized LoRA (Kalajdzievski, 2023), through peft.

The quantized base is prepared by `ft_cli.methods.apply.prepare_quantized` before this runs; LoRA+ (a larger learning
rate for the B matrices) is an optimizer matter, in `ft_cli.optim.param_groups`.
"""

from __future__ import annotations

from typing import Any

from ft_cli.methods.peft_common import get_peft_model_for, peft_task_type
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
        task_type=peft_task_type(recipe),
    )
    model = get_peft_model_for(model, config, "lora.target_modules")
    check_modules_to_save(model, lora.modules_to_save or [])
    return model


def check_modules_to_save(model: Any, names: list[str]) -> None:
    """Every `lora.modules_to_save` entry must have wrapped a module: peft 0.21.2 skips one that matches nothing
    (a typo such as lm_headd trains nothing extra, silently). peft matches a name by suffix; so does this check."""
    import difflib

    from ft_cli.errors import UserError

    wrapped = [n for n, m in model.named_modules() if type(m).__name__ == "ModulesToSaveWrapper"]
    for name in names:
        if not any(w.endswith(name) for w in wrapped):
            leaves = sorted({n.rsplit(".", 1)[-1] for n, _ in model.get_base_model().named_modules() if n})
            close = difflib.get_close_matches(name, leaves, n=1)
            hint = f"did you mean {close[0]!r}? " if close else ""
            raise UserError(f"lora.modules_to_save: {name!r} matches no module of this model ({hint}module names "
                            f"include {', '.join(leaves[:12])})")
