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
        return bridge_prefix_cache(get_peft_model(model, config, autocast_adapter_dtype=True))
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
    return bridge_prefix_cache(PeftModel.from_pretrained(base, str(adapter_dir), is_trainable=False,
                                                         autocast_adapter_dtype=True))


def bridge_prefix_cache(model: Any) -> Any:
    """Prefix tuning on a sequence classifier (task classification), made to work: peft 0.21.2's
    PeftModelForSequenceClassification passes the prefix as `past_key_values`, which transformers 5.24 models no
    longer take (the KV cache is now `cache`); it finds neither the classifier's forward nor its backbone's naming it
    and raises "Model does not support past key values". Here the prefix (peft's get_prompt: a DynamicCache of
    num_virtual_tokens keys and values per layer) goes in as `cache`, and every attention layer puts it before the
    row's own keys and values, as peft's causal-LM path does (peft has already extended the attention mask).
    A backbone that takes no cache (DeBERTa-v2, ModernBERT) is refused: it would ignore the prefix, silently.
    Remove this when peft passes the cache under transformers 5's name (tests/test_classification.py fails then)."""
    import inspect

    config = getattr(model, "active_peft_config", None)
    if (getattr(config, "peft_type", None) != "PREFIX_TUNING" or getattr(config, "task_type", None) != "SEQ_CLS"
            or "past_key_values" in inspect.signature(model.base_model.forward).parameters):
        return model
    backbone = model.get_base_model().base_model
    if "cache" not in inspect.signature(backbone.forward).parameters:
        raise UserError(f"method prefix_tuning: peft feeds the prefix as a KV cache, which this "
                        f"{model.config.model_type} model does not take; use prompt_tuning (or lora)")

    def prefix_forward(input_ids: Any = None, inputs_embeds: Any = None, **kwargs: Any) -> Any:
        rows = (input_ids if input_ids is not None else inputs_embeds).shape[0]
        kwargs = {k: v for k, v in kwargs.items() if v is not None}
        return model.base_model(input_ids=input_ids, inputs_embeds=inputs_embeds, cache=model.get_prompt(rows),
                                **kwargs)

    model._prefix_tuning_forward = prefix_forward  # the one method peft's forward calls for prefix tuning
    return model
