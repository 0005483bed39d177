"""Fine-tuning methods: each turns a loaded base model into one whose trainable parameters are the method's.

One module per method family, each importing its heavy dependencies (peft, bitsandbytes) only when used:

    lora.py        lora, qlora, dora (+ rsLoRA; LoRA+ lives in ft_cli.optim as parameter groups)   peft
    ia3.py         ia3                                                                              peft
    prompt.py      prompt_tuning, prefix_tuning                                                     peft
    bottleneck.py  adapter (Houlsby bottleneck adapters)                                            ft's own
    whole.py       full, freeze                                                                     plain torch

`apply_method` and `save_trained` are the only entry points the rest of ft uses.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ft_cli.errors import UserError
from ft_cli.recipe import WHOLE_MODEL_METHODS, Recipe


def apply_method(model: Any, recipe: Recipe) -> Any:
    m = recipe.method
    if recipe.quantized:
        model = prepare_quantized(model, recipe)
    if m in ("lora", "qlora", "dora"):
        from ft_cli.methods.lora import apply_lora

        return apply_lora(model, recipe)
    if m == "ia3":
        from ft_cli.methods.ia3 import apply_ia3

        return apply_ia3(model, recipe)
    if m == "prompt_tuning":
        from ft_cli.methods.prompt import apply_prompt_tuning

        return apply_prompt_tuning(model, recipe)
    if m == "prefix_tuning":
        from ft_cli.methods.prompt import apply_prefix_tuning

        return apply_prefix_tuning(model, recipe)
    if m == "adapter":
        from ft_cli.methods.bottleneck import apply_bottleneck

        return apply_bottleneck(model, recipe)
    from ft_cli.methods.whole import apply_freeze, apply_full

    return apply_full(model, recipe) if m == "full" else apply_freeze(model, recipe)


def prepare_quantized(model: Any, recipe: Recipe) -> Any:
    """Ready a bitsandbytes-quantized base for adapter training: freeze every base parameter and leave everything
    that is not quantized (embeddings, output head, norms) in model.dtype. ft.loading loads bases the same way, so
    eval scores match the ones logged during training.

    This replaces peft's `prepare_model_for_kbit_training`, which casts every non-quantized parameter to float32.
    bitsandbytes layers return their output in their input's dtype, so float32 embeddings make the whole residual
    stream float32 and the head makes float32 logits. On Llama-3.1-8B (`ft plan recipes/llama-3.1-8b/qlora.yaml`
    at micro-batch 4 x 4096) that is 2 GiB more weights (3.9 instead of 2.0), 1.7x the activations (16.6 instead
    of 9.8 GiB) and float32 logits: 60.8 GiB in all against 47.1 (22.0 against 17.0 at micro-batch 1). The field
    keeps them 16-bit too: axolotl's `embeddings_skip_upcast` skips the embedding upcast, and for LoRA/QLoRA
    axolotl casts norms and embeddings back to the model dtype after peft's preparation ("for flash-attn
    compatibility"); Unsloth keeps embeddings and head in bf16.

    Norms stay 16-bit on evidence, not by analogy. Llama-style RMSNorm already normalises in float32 and casts back
    to its input's dtype before multiplying by its weight, so a float32 weight adds nothing to the normalisation;
    what it does is promote its output (bf16 x fp32 -> fp32). With float32 norms and bf16 embeddings on the tiny
    Llama in bfloat16, the first norm's output, every bitsandbytes output and every block output are float32, and
    the bf16 head then fails ("expected m1 and m2 to have the same dtype"). With this preparation every block
    output and the logits are bfloat16 (tests/test_methods.py checks it with forward hooks).

    Precision stays where it matters: LoRA weights are float32 (autocast_adapter_dtype) and peft runs them on a
    float32 copy of their input, casting only their output back; the loss upcasts the logits to float32.
    Gradient checkpointing is enabled (non-reentrant) by ft.model.build_model, which needs no input-grad hook."""
    model.requires_grad_(False)
    return model


def get_peft_model_for(model: Any, config: Any, field: str) -> Any:
    """get_peft_model, with peft's "target modules not found" turned into a message about the recipe `field`.

    autocast_adapter_dtype keeps adapter weights in float32 even when the base is bf16/fp16."""
    from peft import get_peft_model

    try:
        return get_peft_model(model, config, autocast_adapter_dtype=True)
    except ValueError as exc:
        if "not found in the base model" in str(exc) or "No modules were targeted" in str(exc):
            raise UserError(f"{field}: {exc}") from None
        if "does not support past key values" in str(exc):  # prefix tuning on a model without a KV cache (BERT)
            raise UserError(f"method prefix_tuning: peft feeds the prefix as a KV cache, which this "
                            f"{model.config.model_type} model does not take; use prompt_tuning (or lora)") from None
        raise


def peft_task_type(recipe: Recipe) -> str:
    """peft's task type: SEQ_CLS also trains and saves the classification head (modules_to_save)."""
    return "SEQ_CLS" if recipe.task == "classification" else "CAUSAL_LM"


def save_trained(model: Any, tokenizer: Any, out_dir: Any, recipe: Recipe) -> None:
    """Write what a run produced, plus the tokenizer with the chat template training used:

    - full, freeze: a whole model in the recipe's dtype (`AutoModelForCausalLM.from_pretrained(out_dir)`);
    - adapter: bottleneck weights + ft_adapter_config.json (`bottleneck.load_bottleneck_adapter(base, out_dir)`);
    - every other method: a peft adapter (`PeftModel.from_pretrained(base, out_dir)`)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if recipe.method in WHOLE_MODEL_METHODS:
        from ft_cli.methods.whole import save_whole_model

        save_whole_model(model, out, recipe)
    elif recipe.method == "adapter":
        from ft_cli.methods.bottleneck import save_bottleneck_adapter

        save_bottleneck_adapter(model, out, recipe)
    else:
        model.save_pretrained(out)
    tokenizer.save_pretrained(out)
