"""Apply, save and load a method, by asking its registry entry (ft_cli.methods.registry)."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from ft_cli.methods.registry import method_spec

if TYPE_CHECKING:
    from ft_cli.recipe import Recipe


def apply_method(model: Any, recipe: Recipe) -> Any:
    if recipe.quantized:
        model = prepare_quantized(model, recipe)
    return method_spec(recipe.method).apply_fn()(model, recipe)


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


def save_trained(model: Any, tokenizer: Any, out_dir: Any, recipe: Recipe, *,
                 state_dict: dict[str, Any] | None = None) -> None:
    """Write what a run produced, plus the tokenizer with the chat template training used:

    - full, freeze: a whole model in the recipe's dtype (`AutoModelForCausalLM.from_pretrained(out_dir)`);
    - adapter: bottleneck weights + ft_adapter_config.json (`bottleneck.load_bottleneck_adapter(base, out_dir)`);
    - every other method: a peft adapter (`PeftModel.from_pretrained(base, out_dir)`).

    `state_dict`: the model's whole state dict when the model in memory holds only shards of it (FSDP, ZeRO-3:
    gathered by the caller); the weights are taken from it instead of from the model."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    saves = method_spec(recipe.method).saves
    if saves == "model":
        from ft_cli.methods.whole import save_whole_model

        save_whole_model(model, out, recipe, state_dict=state_dict)
    elif saves == "ft_adapter":
        from ft_cli.methods.bottleneck import save_bottleneck_adapter

        save_bottleneck_adapter(model, out, recipe, state_dict=state_dict)
    else:  # peft keeps the adapter's weights of a whole state dict
        model.save_pretrained(out, state_dict=state_dict)
    tokenizer.save_pretrained(out)


def load_trained(base: Any, output: Path, recipe: Recipe) -> Any:
    """The adapter a run wrote (in `output`) on `base`: a peft adapter or ft's bottleneck adapter. Whole-model runs
    have no adapter: load their output directory as a model instead."""
    saves = method_spec(recipe.method).saves
    assert saves != "model", "a whole-model run has no adapter to load"
    if saves == "ft_adapter":
        from ft_cli.methods.bottleneck import load_bottleneck_adapter

        return load_bottleneck_adapter(base, output)
    from ft_cli.methods.peft_common import load_peft_adapter

    return load_peft_adapter(base, output)
