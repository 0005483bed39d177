"""LoRA, QLoRA (LoRA on a bitsandbytes-quantized base) and DoRA, through peft."""

from __future__ import annotations

from typing import Any

from ft_cli.recipe import Recipe


def apply_lora(model: Any, recipe: Recipe) -> Any:
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training

    lora = recipe.lora
    assert lora is not None
    if recipe.quantized:
        # Casts norms/embeddings to fp32 for stable training and turns on checkpointing when asked.
        model = prepare_model_for_kbit_training(
            model,
            use_gradient_checkpointing=recipe.train.gradient_checkpointing,
            gradient_checkpointing_kwargs={"use_reentrant": False},
        )
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
    # autocast_adapter_dtype keeps the adapter weights in fp32 even when the base is bf16/fp16.
    return get_peft_model(model, config, autocast_adapter_dtype=True)
