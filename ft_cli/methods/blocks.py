"""Where a causal LM keeps its transformer blocks, and what each block calls its attention and MLP.

Hugging Face models agree on the shape (a ModuleList of identical blocks) but not on the names:

    Llama, Qwen2, Mistral, Phi, Gemma: model.layers.N    .self_attn  .mlp
    GPT-2, Falcon, GPT-J:              transformer.h.N   .attn / .self_attention  .mlp
    GPT-NeoX:                          gpt_neox.layers.N .attention  .mlp
    BERT, RoBERTa (encoders):          bert.encoder.layer.N .attention  .output (feed-forward out + residual + norm)
"""

from __future__ import annotations

from typing import Any

from ft_cli.errors import UserError

BLOCK_LIST_NAMES = ("layers", "h", "blocks", "block", "layer")
ATTENTION_NAMES = ("self_attn", "attn", "self_attention", "attention")
MLP_NAMES = ("mlp", "feed_forward", "ffn", "output")


def transformer_blocks(model: Any) -> tuple[str, Any]:
    """(dotted name, ModuleList) of the model's transformer blocks, e.g. ("model.layers", ModuleList)."""
    import torch

    for name, module in model.named_modules():
        if isinstance(module, torch.nn.ModuleList) and len(module) and name.rsplit(".", 1)[-1] in BLOCK_LIST_NAMES:
            return name, module
    model_type = getattr(getattr(model, "config", None), "model_type", type(model).__name__)
    raise UserError(f"cannot find the transformer blocks of this {model_type} model (a module list named one of "
                    f"{', '.join(BLOCK_LIST_NAMES)}); this method does not support it yet")


def block_part(block: Any, candidates: tuple[str, ...], what: str) -> str:
    """The attribute name under which `block` holds its attention or MLP (the first of `candidates` present)."""
    for name in candidates:
        if hasattr(block, name):
            return name
    children = ", ".join(n for n, _ in block.named_children())
    raise UserError(f"cannot find the {what} of a {type(block).__name__} block (looked for "
                    f"{', '.join(candidates)}; it has {children})")
