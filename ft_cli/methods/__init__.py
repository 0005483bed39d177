"""Fine-tuning methods: each turns a loaded base model into one whose trainable parameters are the method's.

One module per method family; `apply_method` is the only entry point the rest of ft uses.
"""

from __future__ import annotations

from typing import Any

from ft_cli.recipe import Recipe


def apply_method(model: Any, recipe: Recipe) -> Any:
    m = recipe.method
    if m in ("lora", "qlora", "dora"):
        from ft_cli.methods.lora import apply_lora

        return apply_lora(model, recipe)
    raise NotImplementedError(f"method {m!r} is not implemented yet")


def save_trained(model: Any, tokenizer: Any, out_dir: Any, recipe: Recipe) -> None:
    """Write what a run produced: a PEFT adapter dir, or a whole model (full/freeze), plus the tokenizer with the
    chat template that training used."""
    from pathlib import Path

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if recipe.method in ("full", "freeze"):
        model.save_pretrained(out, safe_serialization=True)
    else:
        model.save_pretrained(out)
    tokenizer.save_pretrained(out)
