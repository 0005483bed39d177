"""A model's config.json without its weights: what `ft plan` sizes and `ft train --smoke` takes the architecture from.

Looked up offline first: a built-in, a local model directory, or the Hugging Face cache (a config.json that a
previous download left there). Nothing here imports torch.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ft_cli.errors import UserError
from ft_cli.hub import hub_offline
from ft_cli.recipe import ModelSection


@dataclass(frozen=True)
class FoundConfig:
    path: Path  # the config.json file
    source: str  # "built-in", "local directory", "Hugging Face cache" or "downloaded"
    data: dict[str, Any]

    @property
    def model_type(self) -> str | None:
        return self.data.get("model_type")


def find_model_config(model: ModelSection, *, download: bool = False) -> FoundConfig | None:
    """The config.json of the recipe's model from a built-in, a local directory or the HF cache; with
    `download=True` and the hub allowed (HF_HUB_OFFLINE unset), a hub id's config.json is fetched (a few KB).
    None when it cannot be had without the network."""
    from ft_cli.model_path import local_model_dir

    local = local_model_dir(model)
    if local is not None:
        return _read(local[0] / "config.json", local[1])
    name = model.name_or_path
    from huggingface_hub import try_to_load_from_cache

    try:
        cached = try_to_load_from_cache(name, "config.json", revision=model.revision)
    except ValueError:  # not a valid repo id
        cached = None
    if isinstance(cached, str):
        return _read(Path(cached), "Hugging Face cache")
    if not download or hub_offline():
        return None
    from huggingface_hub import hf_hub_download

    from ft_cli.model_path import check_hub_reachable

    check_hub_reachable(name, model.revision)  # as ft train does: no network fails in a second, not after retries

    try:
        fetched = hf_hub_download(name, "config.json", revision=model.revision)
    except Exception as exc:  # offline, gated without a token, no such repo: all mean "not available"
        raise UserError(f"model.name_or_path: cannot get the config of {name!r} from the hub "
                        f"({type(exc).__name__}); download the model first or use a local directory") from None
    return _read(Path(fetched), "downloaded")


def _read(path: Path, source: str) -> FoundConfig:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise UserError(f"{path}: cannot read the model config ({type(exc).__name__})") from None
    if not isinstance(data, dict):
        raise UserError(f"{path}: a model config is a JSON object")
    return FoundConfig(path=path, source=source, data=data)


# The context a model was trained for -------------------------------------------------------------------------------

_CONTEXT_KEYS = ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length", "n_ctx")
# Families with rotary position embeddings whose config.json may not say so (older saves have no rope_* key).
_ROPE_MODEL_TYPES = {"llama", "mistral", "mixtral", "qwen2", "qwen2_moe", "qwen3", "qwen3_moe", "gemma", "gemma2",
                     "gemma3", "gemma3_text", "phi", "phi3", "phimoe", "falcon", "gpt_neox", "gptj", "olmo", "olmo2",
                     "stablelm", "starcoder2", "cohere", "granite", "deepseek_v2", "deepseek_v3"}


def context_length(config: dict[str, Any]) -> int | None:
    for key in _CONTEXT_KEYS:
        if isinstance(config.get(key), int):
            return config[key]
    return None


def uses_rope(config: dict[str, Any]) -> bool:
    return any("rope" in key for key in config) or config.get("model_type") in _ROPE_MODEL_TYPES


def check_context_length(recipe: Any) -> None:
    """data.max_seq_len must fit the model's context (max_position_embeddings / n_positions in its config.json):
    past it a model with learned positions (gpt2) fails with an IndexError mid-training, and a RoPE model trains on
    positions it never saw. Allowed with model.rope_scaling, up to context x factor. Checked offline before anything
    loads; skipped when the config cannot be had without the network (the model load says why)."""
    from ft_cli.builtin_models import MODEL_MAX_LENGTH, builtin_spec, is_builtin

    if is_builtin(recipe.model.name_or_path):  # from the spec: no need to build the model to know
        spec = builtin_spec(recipe.model.name_or_path)
        context_key = "n_positions" if spec.model_type == "gpt2" else "max_position_embeddings"
        found = FoundConfig(Path("config.json"), "built-in", {"model_type": spec.model_type,
                                                              context_key: MODEL_MAX_LENGTH})
    else:
        found = find_model_config(recipe.model)
    if found is None:
        return
    context = context_length(found.data)
    scaling = recipe.model.rope_scaling
    model_type = found.model_type or "this"
    rope = uses_rope(found.data)
    if scaling is not None and not rope:
        raise UserError(f"model.rope_scaling: the {model_type} model has learned absolute positions, not rotary "
                        "position embeddings; remove rope_scaling")
    n = recipe.data.max_seq_len
    if context is None or n <= context:
        return
    where = f"the {model_type} model's context of {context:,} tokens ({found.path.name})"
    if not rope:
        raise UserError(f"data.max_seq_len: {n:,} is longer than {where}, and its positions are learned: use "
                        f"data.max_seq_len <= {context}")
    if scaling is None:
        raise UserError(f"data.max_seq_len: {n:,} is longer than {where}: it would train on positions the model never "
                        f"saw. Use data.max_seq_len <= {context}, or stretch the context with model.rope_scaling, "
                        f"e.g. {{type: linear, factor: {-(-n // context)}}}")
    if n > context * scaling.factor:
        raise UserError(f"data.max_seq_len: {n:,} is longer than {where} x model.rope_scaling.factor "
                        f"{scaling.factor:g} = {int(context * scaling.factor):,}; raise the factor or shorten "
                        "max_seq_len")
