"""Where a recipe's base model comes from: a built-in, a local directory or a hub id, checked before anything loads.

A leaf below ft_cli.model (which re-exports these names): the methods and ft plan resolve paths without importing
the model loader.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING

from ft_cli.errors import UserError
from ft_cli.hub import hub_offline

if TYPE_CHECKING:
    from ft_cli.recipe import ModelSection


def resolve_model_path(model: ModelSection) -> str:
    """A local directory for built-ins and paths; the hub id otherwise (checked so offline fails fast)."""
    local = local_model_dir(model)
    if local is not None:
        path, kind = local
        if kind == "local directory":
            _check_model_config(path / "config.json", model)
        return str(path)
    cached = check_hub_reachable(model.name_or_path, model.revision)
    if cached is not None:
        _check_model_config(Path(cached), model)
    return model.name_or_path


def local_model_dir(model: ModelSection) -> tuple[Path, str] | None:
    """(directory, "built-in" | "local directory") when model.name_or_path names one; None for a hub id. A path
    that is not a model directory is refused here, for every command that locates a model (train, plan, ...)."""
    from ft_cli.builtin_models import is_builtin, resolve_builtin

    name = model.name_or_path
    if is_builtin(name):
        return Path(resolve_builtin(name)), "built-in"
    path = Path(name).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise UserError(f"model.name_or_path: {path} is a directory but has no config.json (not a model directory)")
        return path, "local directory"
    if path.exists() or name.startswith(("/", "./", "../", "~")):
        raise UserError(f"model.name_or_path: local model directory not found: {path}")
    return None


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


def check_hub_reachable(repo_id: str, revision: str | None) -> str | None:
    """Fail fast, with a clear message, when a hub id is neither cached nor downloadable; the cached config.json,
    if any. One metadata request with a 10 s timeout: without a network it fails at once, where a download would
    retry for half a minute."""
    from huggingface_hub import try_to_load_from_cache

    cached = try_to_load_from_cache(repo_id, "config.json", revision=revision)
    if isinstance(cached, str):
        return cached
    offline = hub_offline()
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
