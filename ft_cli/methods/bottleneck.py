"""Bottleneck adapters: Houlsby et al., 2019, "Parameter-Efficient Transfer Learning for NLP" (ICML).

After the attention and after the MLP of every transformer block (before each adds into the residual stream) a
small residual module is inserted,

    h  ->  h + dropout(up(act(down(h))))        down: hidden -> size,  up: size -> hidden

and only these modules train. `up` starts at zero, so the adapted model first computes exactly what the base model
does; `down` keeps nn.Linear's default init (as LoRA's A does), so gradients reach `up` from the first step.
Unlike the paper, layer norms stay frozen: every base weight is left untouched.

How: each adapter becomes a child named `bottleneck_adapter` of the attention / MLP module it follows, and a forward
hook on that module adds it to the module's output. Base weights keep their names (checkpoints, LoRA-style
`target_modules` and optimizer groups are unaffected); adapter weights are named like
`model.layers.3.mlp.bottleneck_adapter.up.weight`, and are kept in float32 whatever the base dtype.

peft has no bottleneck adapters (and the `adapters` package pins an old transformers), so the run's `adapter/`
holds `adapter_model.safetensors` (adapter weights only) and `ft_adapter_config.json` — deliberately no
`adapter_config.json`, so nothing mistakes it for a peft adapter. `load_bottleneck_adapter` puts it back on a base.

Merging is impossible: `up(act(down(h)))` is nonlinear in h, so no change of the base's linear weights computes
it. `MERGEABLE = False` and `ft merge` refuses these runs; eval and generate load base + adapter instead.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ft_cli.errors import UserError
from ft_cli.methods.blocks import ATTENTION_NAMES, MLP_NAMES, block_part, transformer_blocks
from ft_cli.methods.registry import METHODS
from ft_cli.recipe import Recipe

MERGEABLE = METHODS["adapter"].merges  # the registry is the source; kept as the name tests and docs use
CONFIG_FILE = "ft_adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
ADAPTER_NAME = "bottleneck_adapter"
FORMAT_VERSION = 1
ACTIVATIONS = {"silu": nn.SiLU, "gelu": nn.GELU, "relu": nn.ReLU}
ACTIVATION = "silu"  # the "swish" of AdapterHub's Houlsby configuration


class BottleneckAdapter(nn.Module):
    def __init__(self, hidden_size: int, size: int, dropout: float = 0.0, activation: str = ACTIVATION):
        super().__init__()
        self.down = nn.Linear(hidden_size, size)
        self.act = ACTIVATIONS[activation]()
        self.up = nn.Linear(size, hidden_size)
        self.dropout = nn.Dropout(dropout)
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        delta = self.up(self.act(self.down(hidden.to(self.down.weight.dtype))))
        return hidden + self.dropout(delta).to(hidden.dtype)


def _add_adapter_output(module: nn.Module, args: Any, output: Any) -> Any:
    """Forward hook: attention modules return (hidden, weights, ...), MLPs a tensor; adapt the hidden states."""
    adapter = getattr(module, ADAPTER_NAME)
    if isinstance(output, tuple):
        return (adapter(output[0]), *output[1:])
    return adapter(output)


def add_bottleneck_adapters(model: Any, size: int, dropout: float = 0.0,
                            activation: str = ACTIVATION) -> dict[str, Any]:
    """Insert an adapter after the attention and the MLP of every block; returns where they went."""
    blocks_name, blocks = transformer_blocks(model)
    attention = block_part(blocks[0], ATTENTION_NAMES, "attention")
    mlp = block_part(blocks[0], MLP_NAMES, "MLP")
    hidden = model.get_input_embeddings().embedding_dim
    for block in blocks:
        for part in (attention, mlp):
            module = getattr(block, part)
            if hasattr(module, ADAPTER_NAME):
                raise ValueError(f"{blocks_name}: this model already has bottleneck adapters")
            device = next(module.parameters()).device
            module.add_module(ADAPTER_NAME, BottleneckAdapter(hidden, size, dropout, activation).to(device))
            module.register_forward_hook(_add_adapter_output)
    return {"blocks": blocks_name, "attention": attention, "mlp": mlp, "num_blocks": len(blocks),
            "hidden_size": hidden}


def apply_bottleneck(model: Any, recipe: Recipe) -> Any:
    spec = recipe.bottleneck
    assert spec is not None
    model.requires_grad_(False)
    add_bottleneck_adapters(model, spec.size, spec.dropout)  # new modules: the only trainable parameters
    return model


def adapter_state(model: Any, state_dict: dict[str, Any] | None = None) -> dict[str, torch.Tensor]:
    """The bottleneck weights, from the model or from its whole `state_dict` (gathered from FSDP shards)."""
    items = state_dict.items() if state_dict is not None else model.named_parameters()
    return {name: p.detach().cpu().contiguous() for name, p in items if f".{ADAPTER_NAME}." in name}


def save_bottleneck_adapter(model: Any, out: Path, recipe: Recipe, *,
                            state_dict: dict[str, Any] | None = None) -> None:
    from safetensors.torch import save_file

    spec = recipe.bottleneck
    assert spec is not None
    blocks_name, blocks = transformer_blocks(model)
    config = {
        "ft_method": "bottleneck",
        "format_version": FORMAT_VERSION,
        "reference": "Houlsby et al., 2019, Parameter-Efficient Transfer Learning for NLP",
        "size": spec.size,
        "dropout": spec.dropout,
        "activation": ACTIVATION,
        # Where the base was loaded from (a hub id, or the local directory of a path or built-in), as peft records
        # it, so `ft_cli.load_adapter` users can load it; the recipe's name beside it.
        "base_model_name_or_path": getattr(model.config, "_name_or_path", None) or recipe.model.name_or_path,
        "recipe_model": recipe.model.name_or_path,
        "revision": recipe.model.revision,
        "model_type": model.config.model_type,
        "blocks": blocks_name,
        "attention": block_part(blocks[0], ATTENTION_NAMES, "attention"),
        "mlp": block_part(blocks[0], MLP_NAMES, "MLP"),
        "num_blocks": len(blocks),
        "hidden_size": model.get_input_embeddings().embedding_dim,
    }
    save_file(adapter_state(model, state_dict), str(out / WEIGHTS_FILE), metadata={"format": "pt"})
    (out / CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")


def load_bottleneck_adapter(base_model: Any, adapter_dir: str | Path) -> Any:
    """Put a saved bottleneck adapter on `base_model` (in place; returned for convenience), frozen for inference."""
    from safetensors.torch import load_file

    adapter_dir = Path(adapter_dir)
    config_path = adapter_dir / CONFIG_FILE
    if not config_path.is_file():
        raise UserError(f"{adapter_dir}: no {CONFIG_FILE}; not a bottleneck adapter (or the run is unfinished)")
    config = json.loads(config_path.read_text(encoding="utf-8"))
    model_type = base_model.config.model_type
    if config["model_type"] != model_type:
        raise UserError(f"{adapter_dir}: adapter trained on a {config['model_type']} model, cannot load it on a "
                        f"{model_type} model")
    layout = add_bottleneck_adapters(base_model, config["size"], config["dropout"], config["activation"])
    for key in ("blocks", "attention", "mlp", "num_blocks", "hidden_size"):
        if layout[key] != config[key]:
            raise UserError(f"{adapter_dir}: adapter does not fit this base model ({key}: adapter {config[key]!r}, "
                            f"model {layout[key]!r}); load the base model it was trained on")
    saved = load_file(str(adapter_dir / WEIGHTS_FILE))
    params = {name: p for name, p in base_model.named_parameters() if f".{ADAPTER_NAME}." in name}
    if set(saved) != set(params):
        missing, unexpected = sorted(set(params) - set(saved)), sorted(set(saved) - set(params))
        raise UserError(f"{adapter_dir}/{WEIGHTS_FILE}: weights do not match the adapter layout "
                        f"(missing {missing[:3]}, unexpected {unexpected[:3]})")
    with torch.no_grad():
        for name, p in params.items():
            p.copy_(saved[name].to(p.device, p.dtype))
            p.requires_grad_(False)
    return base_model
