"""Resumable checkpoints: trainable weights, optimizer, scheduler, float16 loss scale, every RNG state and the step.

A checkpoint is written into a temporary directory and renamed into place, and `state.json` is written last,
so `checkpoints/step-N/` is either whole or absent. Weights use safetensors; optimizer and scheduler state are
plain tensors and numbers, loaded with `torch.load(weights_only=True)`.
"""

from __future__ import annotations

import json
import os
import random
import shutil
from pathlib import Path
from typing import Any

from ft_cli.errors import UserError
from ft_cli.run_dir import RunDir, write_text_atomic

STATE_FILE = "state.json"
SCALER_FILE = "scaler.pt"


def trainable_state(model: Any) -> dict[str, Any]:
    return {n: p.detach().cpu().contiguous() for n, p in model.named_parameters() if p.requires_grad}


def save_checkpoint(run: RunDir, step: int, *, model: Any, optimizer: Any, scheduler: Any, state: dict[str, Any],
                    accelerator: Any, keep_last: int | None) -> Path:
    """Every rank writes its RNG state; rank 0 writes the rest, then renames the whole directory into place."""
    import torch
    from safetensors.torch import save_file

    final = run.checkpoint(step)
    tmp = run.checkpoints / f".tmp-step-{step}"
    if accelerator.is_main_process:
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir(parents=True)
    accelerator.wait_for_everyone()
    torch.save(_rng_state(), tmp / f"rng-{accelerator.process_index}.pt")
    weights, optim_state = _gather_sharded(model, optimizer) if _sharded(accelerator) else (None, None)
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        if weights is None:
            weights, optim_state = trainable_state(accelerator.unwrap_model(model)), optimizer.state_dict()
        save_file(weights, str(tmp / "trainable.safetensors"))
        torch.save(optim_state, tmp / "optimizer.pt")
        torch.save(scheduler.state_dict(), tmp / "scheduler.pt")
        if accelerator.scaler is not None:  # float16 mixed precision: the loss scale it has settled on
            torch.save(accelerator.scaler.state_dict(), tmp / SCALER_FILE)
        write_text_atomic(tmp / STATE_FILE, json.dumps({**state, "step": step}, indent=2) + "\n")
        if final.exists():  # a stale copy from before a resume: replace it whole
            shutil.rmtree(final)
        os.replace(tmp, final)
        _fsync_dir(run.checkpoints)
        if keep_last:
            for _, old in run.whole_checkpoints()[:-keep_last]:
                shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()
    return final


def load_checkpoint(path: Path, *, model: Any, optimizer: Any, scheduler: Any, accelerator: Any) -> dict[str, Any]:
    import torch
    from safetensors.torch import load_file

    state = json.loads((path / STATE_FILE).read_text())
    weights = load_file(str(path / "trainable.safetensors"))
    unwrapped = accelerator.unwrap_model(model)
    params = {_clean_name(n): p for n, p in unwrapped.named_parameters() if p.requires_grad}
    missing = sorted(set(params) - set(weights))
    if missing:
        raise UserError(f"{path}: checkpoint does not match the model (missing {missing[:3]}...)")
    optim_state = _load_plain(path / "optimizer.pt")
    if _sharded(accelerator):
        _load_sharded(model, optimizer, weights, optim_state)
    else:
        with torch.no_grad():
            for name, p in params.items():
                p.copy_(weights[name].to(p.device, p.dtype))
        optimizer.load_state_dict(optim_state)
    scheduler.load_state_dict(_load_plain(path / "scheduler.pt"))
    if accelerator.scaler is not None and (path / SCALER_FILE).is_file():
        accelerator.scaler.load_state_dict(_load_plain(path / SCALER_FILE))
    rng_file = path / f"rng-{accelerator.process_index}.pt"
    if not rng_file.is_file():
        raise UserError(f"{path}: written by a run with fewer processes (no {rng_file.name}); resume with the same "
                        "number of processes")
    _set_rng_state(_load_plain(rng_file))
    return state


# FSDP: each rank holds a shard of every parameter and of its optimizer state. Checkpoints hold whole tensors
# (gathered to rank 0 with torch.distributed.checkpoint's full state dicts, keyed by parameter name), and every
# rank takes its shards back from them on resume. These gathers are collectives: every rank must call them.

def _sharded(accelerator: Any) -> bool:
    from accelerate.utils import DistributedType

    return accelerator.distributed_type == DistributedType.FSDP


def _clean_name(name: str) -> str:
    """A parameter's name without FSDP1's wrapper modules (FSDP2 and DDP leave names alone)."""
    return name.replace("_fsdp_wrapped_module.", "").replace("_checkpoint_wrapped_module.", "")


def _gather_sharded(model: Any, optimizer: Any) -> tuple[dict[str, Any], dict[str, Any]]:
    """Whole trainable weights and optimizer state on rank 0 (empty dicts elsewhere)."""
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        get_model_state_dict,
        get_optimizer_state_dict,
    )

    full = StateDictOptions(full_state_dict=True, cpu_offload=True, ignore_frozen_params=True)
    weights = get_model_state_dict(model, options=full)
    optim_state = get_optimizer_state_dict(model, optimizer.optimizer, options=full)
    return {k: v.contiguous() for k, v in weights.items()}, optim_state


def _load_sharded(model: Any, optimizer: Any, weights: dict[str, Any], optim_state: dict[str, Any]) -> None:
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        set_model_state_dict,
        set_optimizer_state_dict,
    )

    full = StateDictOptions(full_state_dict=True, strict=False)
    set_model_state_dict(model, weights, options=full)
    set_optimizer_state_dict(model, optimizer.optimizer, optim_state, options=full)


def _load_plain(file: Path) -> Any:
    """A state file of this checkpoint: tensors, numbers and containers only (torch.load weights_only=True), so a
    tampered file cannot run code; one holding anything else is refused."""
    import pickle

    import torch

    try:
        return torch.load(file, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        detail = next((ln.strip() for ln in str(exc).splitlines() if "global" in ln.lower()), "not a tensor file")
        raise UserError(f"{file}: refused to load: it is not plain tensors and numbers as ft writes them ({detail}); "
                        "it was tampered with or not written by ft. Nothing from it was run; remove that checkpoint "
                        "directory to resume from an older one") from None


def recipe_changes(saved: dict[str, Any], current: dict[str, Any]) -> list[str]:
    keys = sorted(set(saved) | set(current))
    return [f"{k}: {saved.get(k)!r} -> {current.get(k)!r}" for k in keys if saved.get(k) != current.get(k)]


def _rng_state() -> dict[str, Any]:
    import numpy as np
    import torch

    np_state = np.random.get_state()
    state = {
        "python": random.getstate(),
        "numpy": [np_state[0], torch.from_numpy(np_state[1].copy()), *np_state[2:]],
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    import numpy as np
    import torch

    random.setstate(tuple(_tuplify(state["python"])))
    kind, keys, *rest = state["numpy"]
    np.random.set_state((kind, keys.numpy(), *rest))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _tuplify(x: Any) -> Any:
    return tuple(_tuplify(v) for v in x) if isinstance(x, (list, tuple)) else x


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError:
        pass
