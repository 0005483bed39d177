"""DPO's reference log-probabilities: computed once per data and model, and kept in ft's cache for the next run.

The reference is the model before training (the adapter disabled for PEFT methods). Its summed reply
log-probabilities of every pair are computed before step 1 in eval mode without grad - split over the processes by
batch, then gathered - and stored with the rows (`ref_chosen_logps`, `ref_rejected_logps`).

Because a sweep (learning rates, betas, epochs) or a resume scores the same pairs with the same model again, the
values go to `$FT_CACHE_DIR/reference/<24 hex>/` (with data.cache), keyed by what decides them:
- the rows themselves (the token ids and labels of both sides, hashed from the Arrow columns),
- the model: a sample of every weight the reference uses (all of them for full/freeze, the frozen ones for PEFT
  methods - the adapter is disabled), with names, shapes and dtypes, and its attention implementation,
- how they are computed: batch size, prompt sharing, device type, and the versions of torch, transformers, peft and
  bitsandbytes (so that a cached run equals an uncached one bit for bit).
Before an entry is used its first batch is computed again and compared; an entry that disagrees is not used (ft
says so) and is replaced by the values computed instead. Entries are written under a temporary name and renamed into place, so they are whole or absent.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from ft_cli.batches import rows_at

REFERENCE_VERSION = "ft-ref-1"
ROW_COLUMNS = ("input_ids", "labels", "rejected_input_ids", "rejected_labels")
SAMPLE_PER_TENSOR = 256  # weights sampled per tensor for the model's part of the key


def cache_root() -> Path:
    from ft_cli.caches import cache_root as root

    return root() / "reference"


# Computing -------------------------------------------------------------------------------------------------------

def reference_logps(model: Any, dataset: Any, collate: Callable, batch_size: int, *, device: Any,
                    share: str | None = None, rank: int = 0, world_size: int = 1,
                    batches: list[int] | None = None) -> tuple[list[float], list[float]]:
    """The reference model's summed reply log-probabilities of every row (chosen, rejected): the model as it is now
    with any PEFT adapter disabled, in eval mode without grad. With several processes each computes every
    `world_size`-th batch and the results are gathered, so every process returns all rows (the batches are the same
    as one process's). `batches`: only these batch indices (the rows they hold), for a check."""
    from ft_cli.objectives import reply_logps

    disable = getattr(model, "disable_adapter", None)
    was_training = model.training
    model.eval()
    count = -(-len(dataset) // batch_size)
    mine: list[tuple[int, list[float], list[float]]] = []
    with torch.no_grad(), (disable() if disable is not None else contextlib.nullcontext()):
        for b in (batches if batches is not None else range(rank, count, world_size)):
            start = b * batch_size
            batch = collate(rows_at(dataset, list(range(start, min(start + batch_size, len(dataset))))))
            logps, _ = reply_logps(model, batch, device, share)
            c, r = logps.double().cpu().chunk(2)
            mine.append((b, c.tolist(), r.tolist()))
    model.train(was_training)
    if world_size > 1 and batches is None:
        from accelerate.utils import gather_object

        mine = sorted(gather_object(mine))
    chosen = [x for _, c, _ in mine for x in c]
    rejected = [x for _, _, r in mine for x in r]
    return chosen, rejected


def with_reference(dataset: Any, chosen: list[float], rejected: list[float]) -> Any:
    for name in ("ref_chosen_logps", "ref_rejected_logps"):
        if name in dataset.column_names:
            dataset = dataset.remove_columns(name)
    return dataset.add_column("ref_chosen_logps", chosen).add_column("ref_rejected_logps", rejected)


def add_reference_logps(dataset: Any, model: Any, collate: Callable, batch_size: int, *, device: Any,
                        share: str | None = None, rank: int = 0, world_size: int = 1, cache: bool = False,
                        is_main: bool = True, label: str | None = None) -> tuple[Any, str]:
    """`dataset` with the reference columns, and where they came from: "computed", "cached" (computed and written to
    the cache) or "from cache". With `cache`, an entry for the same rows, model and settings is used after its
    first batch checks out; otherwise they are computed, and the main process writes the entry."""
    key, entry = None, None
    if cache:
        key = reference_key(dataset, model, batch_size, device=device, share=share)
        entry = load_entry(key, len(dataset))
        if entry is not None:
            problem = _check_first_batch(entry, dataset, model, collate, batch_size, device=device, share=share)
            if problem is None:
                return with_reference(dataset, *entry), "from cache"
            if is_main:
                print(f"dpo: the cached reference log-probabilities ({cache_root() / key}) {problem}; computing them "
                      "again and replacing the entry", file=sys.stderr)
    chosen, rejected = reference_logps(model, dataset, collate, batch_size, device=device, share=share, rank=rank,
                                       world_size=world_size)
    if key is not None and is_main:
        save_entry(key, chosen, rejected, {"model": label or _model_name(model), "pairs": len(dataset)},
                   replace=entry is not None)
    return with_reference(dataset, chosen, rejected), "cached" if key is not None else "computed"


def _check_first_batch(entry: tuple[list[float], list[float]], dataset: Any, model: Any, collate: Callable,
                       batch_size: int, *, device: Any, share: str | None) -> str | None:
    """None when the first batch computed now gives the entry's values, else what differs."""
    from ft_cli.pair_rows import compute_dtype

    chosen, rejected = reference_logps(model, dataset, collate, batch_size, device=device, share=share, batches=[0])
    now = torch.tensor(chosen + rejected, dtype=torch.float64)
    n = len(chosen)
    cached = torch.tensor(entry[0][:n] + entry[1][:n], dtype=torch.float64)
    worst = float(((now - cached).abs() / now.abs().clamp(min=1)).max()) if n else 0.0
    tolerance = 1e-5 if compute_dtype(model) == torch.float32 else 1e-3
    if worst <= tolerance:
        return None
    return f"differ from this model's on the first batch by {worst:.1e} relative (more than {tolerance:g})"


# The key ---------------------------------------------------------------------------------------------------------

def rows_digest(dataset: Any) -> str:
    """A hash of the pairs' token ids and labels, from the Arrow columns (row order included)."""
    import pyarrow.compute as pc

    h = hashlib.blake2b(str(len(dataset)).encode())
    cols = [c for c in ROW_COLUMNS if c in dataset.column_names]
    h.update(json.dumps(cols).encode())
    for table in dataset.select_columns(cols).with_format("arrow").iter(batch_size=4096):
        for name in cols:
            column = table.column(name)
            h.update(pc.list_value_length(column).to_numpy(zero_copy_only=False).tobytes())
            h.update(pc.list_flatten(column).to_numpy(zero_copy_only=False).astype("int64").tobytes())
    return h.hexdigest()


def weights_digest(model: Any) -> str:
    """A hash of what the reference computes with: every weight and buffer's name, shape and dtype, and an evenly
    spaced sample of its values (enough to tell checkpoints, quantizations and initialisations apart; the first
    batch check catches the rest). For PEFT models the adapter's own weights (named `.<adapter>.`) are left out:
    the reference disables them, so a change of rank or adapter seed keeps the entry."""
    adapters = [f".{name}." for name in getattr(model, "peft_config", None) or {}]
    h = hashlib.blake2b()
    tensors = [(n, p) for n, p in model.named_parameters() if not any(a in n for a in adapters)]
    tensors += list(model.named_buffers())
    with torch.no_grad():
        for name, t in tensors:
            h.update(f"{name}:{tuple(t.shape)}:{t.dtype}".encode())
            flat = t.detach().reshape(-1)
            if flat.numel() == 0 or flat.device.type == "meta":
                continue
            idx = torch.linspace(0, flat.numel() - 1, min(flat.numel(), SAMPLE_PER_TENSOR), device=flat.device)
            h.update(flat[idx.long()].float().cpu().numpy().tobytes())
    return h.hexdigest()


def reference_key(dataset: Any, model: Any, batch_size: int, *, device: Any, share: str | None) -> str:
    import importlib.metadata as md

    def version(dist: str) -> str | None:
        try:
            return md.version(dist)
        except md.PackageNotFoundError:
            return None

    config = getattr(model, "config", None)
    parts = {
        "version": REFERENCE_VERSION, "rows": rows_digest(dataset), "weights": weights_digest(model),
        "attention": getattr(config, "_attn_implementation", None), "batch_size": batch_size, "share": share,
        "device": torch.device(device).type,
        "libraries": {d: version(d) for d in ("torch", "transformers", "peft", "bitsandbytes")},
    }
    blob = json.dumps(parts, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:24]


def _model_name(model: Any) -> str:
    config = getattr(model, "config", None)
    return str(getattr(config, "_name_or_path", None) or type(model).__name__)


# The entries -----------------------------------------------------------------------------------------------------

def load_entry(key: str, pairs: int) -> tuple[list[float], list[float]] | None:
    """(chosen, rejected) of an entry with `pairs` rows, or None when absent, unreadable or of another size."""
    import numpy as np

    path = cache_root() / key
    try:
        meta = json.loads((path / "meta.json").read_text())
        values = np.load(path / "logps.npy", allow_pickle=False)
    except (OSError, ValueError):
        return None
    if meta.get("pairs") != pairs or values.shape != (pairs, 2) or values.dtype != np.float64:
        return None
    with contextlib.suppress(OSError):  # last use, for `ft cache clean --older-than`
        (path / "meta.json").touch()
    return values[:, 0].tolist(), values[:, 1].tolist()


def save_entry(key: str, chosen: list[float], rejected: list[float], meta: dict[str, Any], *,
               replace: bool = False) -> None:
    """Write an entry whole or not at all (ft_cli.caches.publish_entry; `replace`: the entry there failed its
    check). A write that fails (a full disk) only costs the next run the computation."""
    import numpy as np

    from ft_cli.caches import publish_entry

    def write(tmp: Path) -> None:
        np.save(tmp / "logps.npy", np.asarray([chosen, rejected], dtype=np.float64).T, allow_pickle=False)
        (tmp / "meta.json").write_text(json.dumps({**meta, "key": key}))

    try:
        publish_entry(cache_root() / key, write, replace=replace)
    except OSError as exc:
        print(f"dpo: could not cache the reference log-probabilities in {cache_root()} ({exc}); the next run "
              "computes them again", file=sys.stderr)
