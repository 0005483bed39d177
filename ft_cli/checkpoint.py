"""Resumable checkpoints: trainable weights, optimizer, scheduler, float16 loss scale, every RNG state and the step.

A checkpoint is written into a temporary directory (checkpoints/.step-N.ft-tmp), flushed to disk, and renamed
into place; `state.json` is written last and holds the size and SHA-256 of every other file, so
`checkpoints/step-N/` is either whole or absent, and "whole" can be checked (`newest_whole_checkpoint`): a
checkpoint damaged later (a bad disk, a copy cut short) is skipped with a warning on resume. When a write fails (a
full disk) on any process, every process raises, the temporary directory is removed and the previous checkpoint
stays the newest whole one. Weights use safetensors; optimizer and scheduler state are plain tensors and numbers,
loaded with `torch.load(weights_only=True)`.
"""

from __future__ import annotations

import hashlib
import json
import random
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ft_cli.atomic import discard, file_digest, finish_tree, fsync_dir, remove_path, swap_in
from ft_cli.errors import UserError
from ft_cli.run_dir import RunDir

STATE_FILE = "state.json"
SCALER_FILE = "scaler.pt"
REQUIRED_FILES = ("trainable.safetensors", "optimizer.pt", "scheduler.pt")


def trainable_state(model: Any) -> dict[str, Any]:
    return {n: p.detach().cpu().contiguous() for n, p in model.named_parameters() if p.requires_grad}


def save_checkpoint(run: RunDir, step: int, *, model: Any, optimizer: Any, scheduler: Any, state: dict[str, Any],
                    accelerator: Any, keep_last: int | None) -> Path:
    """Every rank writes its RNG state; rank 0 writes the rest, then renames the whole directory into place."""
    from safetensors.torch import save_file

    final = run.checkpoint(step)
    tmp = run.checkpoints / f".step-{step}.ft-tmp"
    main = accelerator.is_main_process
    digests: dict[str, str] = {}

    def start() -> None:
        remove_path(tmp)
        tmp.mkdir(parents=True)

    def finish() -> None:
        nonlocal weights, optim_state
        if weights is None:
            weights, optim_state = trainable_state(accelerator.unwrap_model(model)), optimizer.state_dict()
        save_file(weights, str(tmp / "trainable.safetensors"))
        _save_plain(optim_state, tmp / "optimizer.pt", digests)
        _save_plain(scheduler.state_dict(), tmp / "scheduler.pt", digests)
        if accelerator.scaler is not None:  # float16 mixed precision: the loss scale it has settled on
            _save_plain(accelerator.scaler.state_dict(), tmp / SCALER_FILE, digests)
        files = {}
        for file in sorted(tmp.iterdir()):  # rng-<rank>.pt of every process, and the files above
            digest = digests.get(file.name) or file_digest(file)
            files[file.name] = {"bytes": file.stat().st_size, "sha256": digest}
        (tmp / STATE_FILE).write_text(json.dumps({**state, "step": step, "files": files}, indent=2) + "\n")
        finish_tree(tmp)  # the user's umask, and every byte on disk before the rename makes it a checkpoint
        swap_in(tmp, final)  # a stale step-N from before a resume is replaced whole
        fsync_dir(run.checkpoints)
        if keep_last:
            for _, old in run.whole_checkpoints()[:-keep_last]:
                discard(old)

    _together(accelerator, start if main else None, tmp)
    _together(accelerator, lambda: _save_plain(_rng_state(), tmp / f"rng-{accelerator.process_index}.pt", digests),
              tmp)
    weights, optim_state = _gather_sharded(model, optimizer) if _sharded(accelerator) else (None, None)
    _together(accelerator, finish if main else None, tmp)
    return final


def _together(accelerator: Any, write: Callable[[], None] | None, tmp: Path) -> None:
    """Run this process's part of a checkpoint write, then agree with every process that all parts succeeded
    (a barrier as well). If any failed, the temporary directory goes and every process raises: the failing one its
    own error (a full disk, a Ctrl-C), the others a UserError, rather than waiting forever at the next barrier."""
    error: BaseException | None = None
    try:
        if write is not None:
            write()
    except BaseException as exc:  # noqa: BLE001 - re-raised below, after the other processes have heard of it
        error = exc
    if _all_ok(accelerator, error is None) and error is None:
        return
    if accelerator.is_main_process:
        remove_path(tmp)
    if error is not None:
        raise error
    raise UserError(f"another process failed while writing checkpoint {tmp.name}; see its message")


def _all_ok(accelerator: Any, ok: bool) -> bool:
    import torch
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return ok
    device = getattr(accelerator, "device", None)
    if device is None or dist.get_backend() != "nccl":
        device = "cpu"
    flag = torch.tensor([0 if ok else 1], dtype=torch.int32, device=device)
    dist.all_reduce(flag)
    return int(flag.item()) == 0


def _save_plain(obj: Any, file: Path, digests: dict[str, str]) -> None:
    """torch.save through a file object that hashes what it writes (no second read of a large optimizer state)
    and lets a full disk surface as the OSError it is."""
    import torch

    with open(file, "wb") as fh:
        writer = _HashingWriter(fh)
        torch.save(obj, writer)
    digests[file.name] = writer.sha256.hexdigest()


class _HashingWriter:
    def __init__(self, fh: Any):
        self.fh, self.sha256 = fh, hashlib.sha256()

    def write(self, data: Any) -> int:
        self.sha256.update(data)
        return self.fh.write(data)

    def flush(self) -> None:
        self.fh.flush()


def checkpoint_problem(path: Path) -> str | None:
    """None if checkpoint `path` is whole: every file that state.json lists has its size and SHA-256. Otherwise
    what is wrong with it. Checkpoints of ft 0.1 (no checksums) are checked for their files only."""
    try:
        state = json.loads((path / STATE_FILE).read_text())
        files = state.get("files")
    except (OSError, ValueError, AttributeError) as exc:
        return f"{STATE_FILE} unreadable ({exc})"
    if files is None:
        missing = [f for f in REQUIRED_FILES if not (path / f).is_file()]
        return f"missing {', '.join(missing)}" if missing else None
    for name, want in sorted(files.items()):
        file = path / name
        if not file.is_file():
            return f"{name} is missing"
        size = file.stat().st_size
        if size != want.get("bytes"):
            return f"{name} has {size} bytes, {want.get('bytes')} were written"
        if file_digest(file) != want.get("sha256"):
            return f"{name} does not match its checksum"
    return None


def newest_whole_checkpoint(run: RunDir, warn: Callable[[str], None] | None = None) -> tuple[Path, dict] | None:
    """The newest checkpoint that passes `checkpoint_problem`, with its state; damaged ones newer than it are
    skipped, each with a warning naming it."""
    for _, path in reversed(run.whole_checkpoints()):
        problem = checkpoint_problem(path)
        if problem is None:
            return path, json.loads((path / STATE_FILE).read_text())
        if warn is not None:
            warn(f"warning: checkpoint {path} is corrupt or partial ({problem}); skipping it and resuming from an "
                 "older one")
    return None


def warn_on_stderr(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


def load_checkpoint(path: Path, *, model: Any, optimizer: Any, scheduler: Any, accelerator: Any) -> dict[str, Any]:
    import torch
    from safetensors.torch import load_file

    state = json.loads((path / STATE_FILE).read_text())
    try:
        weights = load_file(str(path / "trainable.safetensors"))
    except Exception as exc:  # SafetensorError: a checkpoint of ft 0.1 (no checksums) damaged since
        raise UserError(f"{path / 'trainable.safetensors'}: cannot be read ({exc}); remove {path} to resume from "
                        "an older checkpoint") from None
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
