"""Base model and tokenizer: where the weights come from, quantization, dtype, and the method's adapter."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ft_cli.errors import UserError
from ft_cli.recipe import ModelSection, Recipe

if TYPE_CHECKING:
    import torch


def torch_dtype(name: str) -> torch.dtype:
    import torch

    return {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}[name]


def resolve_model_path(model: ModelSection) -> str:
    """A local directory for built-ins and paths; the hub id otherwise (checked so offline fails fast)."""
    from ft_cli.builtin_models import is_builtin, resolve_builtin

    name = model.name_or_path
    if is_builtin(name):
        return str(resolve_builtin(name))
    path = Path(name).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise UserError(f"model.name_or_path: {path} is a directory but has no config.json (not a model directory)")
        _check_model_config(path / "config.json", model)
        return str(path)
    if path.exists() or name.startswith(("/", "./", "../", "~")):
        raise UserError(f"model.name_or_path: local model directory not found: {path}")
    cached = _check_hub_reachable(name, model.revision)
    if cached is not None:
        _check_model_config(Path(cached), model)
    return name


def remote_code_refused(path: str) -> UserError:
    return UserError(f"model.trust_remote_code: {path} ships its own Python code (auto_map in config.json), which "
                     "ft does not run unless the recipe says model.trust_remote_code: true; set it only if you "
                     "trust the model's author")


def _check_model_config(config_file: Path, model: ModelSection) -> None:
    """Fail before the tokenizer and the data load when transformers could not load this config: invalid JSON, a
    model_type it does not know, or custom code (auto_map) without model.trust_remote_code."""
    try:
        config = json.loads(config_file.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise UserError(f"model.name_or_path: {config_file} is not valid JSON ({exc})") from None
    model_type = config.get("model_type") if isinstance(config, dict) else None
    if not isinstance(model_type, str):
        return  # transformers guesses the architecture from the name; let it try
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    if model_type in CONFIG_MAPPING:
        return  # built into transformers: loads without running the model's own code, auto_map or not
    if config.get("auto_map"):
        if not model.trust_remote_code:
            raise remote_code_refused(str(config_file.parent))
        return
    import transformers

    raise UserError(f"model.name_or_path: {config_file} has model_type {model_type!r}, which transformers "
                    f"{transformers.__version__} does not know; upgrade transformers or check the model directory")


def _check_hub_reachable(repo_id: str, revision: str | None) -> str | None:
    """Fail fast, with a clear message, when a hub id is neither cached nor downloadable; the cached config.json,
    if any."""
    from huggingface_hub import try_to_load_from_cache

    cached = try_to_load_from_cache(repo_id, "config.json", revision=revision)
    if isinstance(cached, str):
        return cached
    offline = os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes")
    hint = ("download it first (huggingface-cli download) or point model.name_or_path at a local directory; "
            "builtin:tiny-llama needs no network")
    if offline:
        raise UserError(f"model.name_or_path: {repo_id!r} is not in the local Hugging Face cache and HF_HUB_OFFLINE=1 "
                        f"forbids downloading it; {hint}")
    from huggingface_hub import HfApi

    try:
        HfApi().model_info(repo_id, revision=revision, timeout=10)
    except Exception as exc:  # network down, DNS failure, 401/404: all mean we cannot load it
        reason = type(exc).__name__
        if "404" in str(exc) or "RepositoryNotFound" in reason:
            raise UserError(f"model.name_or_path: {repo_id!r} is not a local directory and not a model on the hub") from None
        raise UserError(f"model.name_or_path: cannot reach the hub for {repo_id!r} ({reason}); {hint}") from None


def load_tokenizer(recipe: Recipe, path: str | None = None):
    """The model's tokenizer, with a pad token and the recipe's chat template applied."""
    from transformers import AutoTokenizer

    path = path or resolve_model_path(recipe.model)
    try:
        tok = AutoTokenizer.from_pretrained(path, trust_remote_code=recipe.model.trust_remote_code,
                                            revision=recipe.model.revision)
    except ValueError as exc:
        if "trust_remote_code" in str(exc):
            raise remote_code_refused(path) from None
        raise
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token if tok.eos_token is not None else tok.unk_token
    tok.padding_side = "right"
    if recipe.data.format != "text" or recipe.data.chat_template:
        from ft_cli.data.pipeline import resolve_chat_template

        resolve_chat_template(tok, recipe.data.chat_template)
    return tok


@dataclass
class BuiltModel:
    model: Any  # torch.nn.Module: a PeftModel for PEFT methods
    base_path: str
    trainable_params: int
    total_params: int


def load_base_model(recipe: Recipe, path: str, device: Any = None, quantize: bool = True, dtype: str | None = None):
    """The pretrained base model in the recipe's dtype (or `dtype`), quantized with bitsandbytes when the recipe
    says so."""
    from transformers import AutoModelForCausalLM

    kwargs: dict[str, Any] = {
        "dtype": torch_dtype(dtype or recipe.model.dtype),
        "trust_remote_code": recipe.model.trust_remote_code,
        "revision": recipe.model.revision,
    }
    if recipe.model.attn_implementation:
        kwargs["attn_implementation"] = recipe.model.attn_implementation
    if quantize and recipe.quantized:
        kwargs["quantization_config"] = bnb_config(recipe)
        kwargs["device_map"] = {"": device if device is not None else "cpu"}
    try:
        model = AutoModelForCausalLM.from_pretrained(path, **kwargs)
    except ValueError as exc:
        if "trust_remote_code" in str(exc):
            raise remote_code_refused(path) from None
        raise
    except ImportError as exc:
        raise UserError(f"cannot load {path}: {exc}") from None
    # The pad token must be known to the model (generation, and models that mask pads themselves).
    return model


def bnb_config(recipe: Recipe):
    from transformers import BitsAndBytesConfig

    q = recipe.quantization
    assert q is not None and q.bits is not None
    if q.bits == 8:
        return BitsAndBytesConfig(load_in_8bit=True)
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=q.quant_type,
        bnb_4bit_use_double_quant=q.double_quant,
        bnb_4bit_compute_dtype=torch_dtype(q.compute_dtype),
        bnb_4bit_quant_storage=torch_dtype(recipe.model.dtype),
    )


def build_model(recipe: Recipe, device: Any = None) -> BuiltModel:
    """Base model + the recipe's method (adapter, freezing, ...), ready to train."""
    from ft_cli.methods import apply_method

    path = resolve_model_path(recipe.model)
    # float32 master weights under mixed precision (train.py runs them under autocast), model.dtype otherwise
    model = load_base_model(recipe, path, device=device, dtype=recipe.weights_dtype)
    if recipe.train.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.config.use_cache = False
    model = apply_method(model, recipe)
    trainable, total = count_parameters(model)
    if trainable == 0:
        raise UserError(f"method {recipe.method}: no parameter is trainable (check target_modules / trainable_modules)")
    return BuiltModel(model=model, base_path=path, trainable_params=trainable, total_params=total)


def count_parameters(model) -> tuple[int, int]:
    trainable = total = 0
    for p in model.parameters():
        n = p.numel()
        # bitsandbytes packs two 4-bit values per byte
        if p.__class__.__name__ == "Params4bit":
            n *= 2
        total += n
        if p.requires_grad:
            trainable += n
    return trainable, total
