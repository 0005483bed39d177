"""What the peft-based methods share (lora.py, ia3.py, prompt.py). Imports peft only when called."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ft_cli.errors import UserError


def get_peft_model_for(model: Any, config: Any, field: str) -> Any:
    """get_peft_model, with peft's "target modules not found" turned into a message about the recipe `field`.

    autocast_adapter_dtype keeps adapter weights in float32 even when the base is bf16/fp16."""
    from peft import get_peft_model

    from ft_cli.tasks.classify_head import extra_head_names

    if config.task_type == "SEQ_CLS" and extra_head_names(model):  # peft adds classifier and score itself
        config.modules_to_save = [*(config.modules_to_save or []), *extra_head_names(model)]
    try:
        return get_peft_model(model, config, autocast_adapter_dtype=True)
    except ValueError as exc:
        if "not found in the base model" in str(exc) or "No modules were targeted" in str(exc):
            raise UserError(f"{field}: {exc}") from None
        if "does not support past key values" in str(exc):  # prefix tuning on a model without a KV cache (BERT)
            raise UserError(f"method prefix_tuning: peft feeds the prefix as a KV cache, which this "
                            f"{model.config.model_type} model does not take; use prompt_tuning (or lora)") from None
        raise


def peft_task_type(recipe: Any) -> str:
    """peft's task type: SEQ_CLS also trains and saves the classification head (modules_to_save)."""
    return "SEQ_CLS" if recipe.task == "classification" else "CAUSAL_LM"


def load_peft_adapter(base: Any, adapter_dir: Path) -> Any:
    from peft import PeftModel

    if not (adapter_dir / "adapter_config.json").is_file():
        raise UserError(f"{adapter_dir}: no adapter_config.json; is the run finished?")
    # autocast_adapter_dtype keeps the adapter in fp32 on a 16-bit base, as during training.
    return PeftModel.from_pretrained(base, str(adapter_dir), is_trainable=False, autocast_adapter_dtype=True)
