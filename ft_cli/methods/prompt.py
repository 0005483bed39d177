"""Prompt tuning (Lester et al., 2021) and prefix tuning (Li & Liang, 2021), via peft.

Prompt tuning learns `num_virtual_tokens` input embeddings put before every row; prefix tuning learns a key and
value prefix for every attention layer. Both leave every base weight untouched.
"""

from __future__ import annotations

from typing import Any

from ft_cli.methods.peft_common import get_peft_model_for, peft_task_type
from ft_cli.recipe import Recipe


def apply_prompt_tuning(model: Any, recipe: Recipe) -> Any:
    """Virtual tokens start as the embeddings of `prompt.init_text` (tokenized with the model's tokenizer) or, without
    it, as embeddings of randomly sampled vocabulary tokens: both start at the scale of real inputs, unlike peft's
    N(0, 1) RANDOM init."""
    from peft import PromptTuningConfig, PromptTuningInit

    spec = recipe.prompt
    assert spec is not None
    init: dict[str, Any] = {"prompt_tuning_init": PromptTuningInit.SAMPLE_VOCAB}
    if spec.init_text:
        from ft_cli.model_path import resolve_model_path

        init = {
            "prompt_tuning_init": PromptTuningInit.TEXT,
            "prompt_tuning_init_text": spec.init_text,
            "tokenizer_name_or_path": resolve_model_path(recipe.model),
            "tokenizer_kwargs": {"trust_remote_code": recipe.model.trust_remote_code,
                                 "revision": recipe.model.revision},
        }
    config = PromptTuningConfig(task_type=peft_task_type(recipe), num_virtual_tokens=spec.num_virtual_tokens, **init)
    return get_peft_model_for(model, config, "prompt")


def apply_prefix_tuning(model: Any, recipe: Recipe) -> Any:
    """peft's prefix tuning feeds the prefix as a KV cache, which gradient checkpointing cannot recompute; the recipe
    therefore turns checkpointing off for this method (and refuses an explicit `gradient_checkpointing: true`)."""
    from peft import PrefixTuningConfig

    spec = recipe.prompt
    assert spec is not None
    config = PrefixTuningConfig(task_type=peft_task_type(recipe), num_virtual_tokens=spec.num_virtual_tokens)
    return get_peft_model_for(model, config, "prompt")
