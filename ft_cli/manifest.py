"""run.json: what `ft train` records when a run starts and how it ended, and the facts about the environment it
used (also shown by `ft doctor`)."""

from __future__ import annotations

import platform
import sys
from importlib import metadata
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from ft_cli.recipe import Recipe
    from ft_cli.run_dir import RunDir

PACKAGES = ("ft-cli", "torch", "transformers", "peft", "accelerate", "bitsandbytes", "datasets", "tokenizers",
            "safetensors", "flash-attn", "liger-kernel")


def package_versions() -> dict[str, str | None]:
    out: dict[str, str | None] = {}
    for name in PACKAGES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = None
    return out


def environment_info(device: str) -> dict[str, Any]:
    import torch

    info: dict[str, Any] = {
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "device": device,
        "packages": package_versions(),
        "cuda": torch.version.cuda,
    }
    if torch.cuda.is_available():
        info["gpus"] = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
    return info


def start_manifest(run: RunDir, recipe: Recipe, built: Any, data: Any, accelerator: Any, *, start_step: int,
                   total_steps: int, resumed: bool) -> dict[str, Any]:
    """run.json at the start of a run (a resume keeps what the earlier starts recorded, and adds itself)."""
    from ft_cli.run_dir import now_iso

    previous = run.read_manifest() if resumed else {}
    return {
        **previous,
        "status": "running",
        "started_at": previous.get("started_at", now_iso()),
        "resumed_at": now_iso() if resumed else None,
        "resumed_from_step": start_step if resumed else None,
        # every resume, for ft report to mark on the curves
        "resumes": previous.get("resumes", []) + ([{"at": now_iso(), "step": start_step}] if resumed else []),
        "recipe_hash": recipe.fingerprint_hash(),
        "seed": recipe.train.seed,
        "method": recipe.method,
        "base_model": recipe.model.name_or_path,
        "base_model_path": built.base_path,
        "trainable_params": built.trainable_params,
        "total_params": built.total_params,
        "total_steps": total_steps,
        "num_processes": accelerator.num_processes,
        "data": {"fingerprint": data.fingerprint, "train": data.train_stats.to_dict(),
                 "eval": data.eval_stats.to_dict() if data.eval_stats else None},
        "environment": environment_info(str(accelerator.device)),
        "tracker_dirs": tracker_dirs(recipe, run),  # written by the trackers: ft's, for --overwrite
    }


def tracker_dirs(recipe: Recipe, run: RunDir) -> list[str]:
    """Directories inside the run that logging.trackers write (accelerate's tensorboard writes PROJECT/)."""
    names = {"tensorboard": recipe.logging.project or run.root.name, "wandb": "wandb", "mlflow": "mlruns"}
    return sorted({names[t] for t in recipe.logging.trackers if t in names})


def finish_manifest(run: RunDir, manifest: dict[str, Any], status: str, step: int, *, best_eval_loss: float | None,
                    best_step: int | None, error: str | None = None, quiet: bool = False) -> None:
    """Record how the run ended in run.json; `quiet`: while handling another error, a failure to write it (a full
    disk) is not raised. A run.json left saying "running" then reads "crashed" once this process has exited."""
    from ft_cli.run_dir import now_iso

    manifest.update(status=status, finished_at=now_iso(), final_step=step, best_eval_loss=best_eval_loss,
                    best_step=best_step)
    if error:
        manifest["error"] = error[:2000]
    try:
        run.write_manifest(manifest)
    except OSError:
        if not quiet:
            raise
