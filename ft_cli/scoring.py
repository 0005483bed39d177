"""Token-weighted loss: the sum of per-token losses over trained tokens divided by their count — over a whole
set, never a mean of batch means. Shared by in-training evaluation and `ft eval`."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

IGNORE = -100


def count_targets(batch: dict[str, Any]) -> int:
    """Tokens that carry loss: a label at position t is predicted from position t-1, so position 0 never is."""
    return int((batch["labels"][:, 1:] != IGNORE).sum())


def real_tokens(batch: dict[str, Any]) -> int:
    """Tokens that are not padding: packed batches carry their count (num_tokens), padded ones an attention mask."""
    if "num_tokens" in batch:
        return int(batch["num_tokens"])
    if "attention_mask" in batch:
        return int(batch["attention_mask"].sum())
    return int(batch["input_ids"].numel())


def model_inputs(batch: dict[str, Any], device: Any) -> dict[str, Any]:
    """The model's keyword arguments for a collated batch. use_cache=False always: transformers only derives the
    block-diagonal mask of packed rows from position_ids when no KV cache is in play (else examples would attend
    to each other), and training/scoring never needs the cache."""
    inputs = {k: v.to(device) for k, v in batch.items() if k in ("input_ids", "attention_mask", "position_ids", "labels")}
    inputs["use_cache"] = False
    return inputs


def token_loss(model: Any, dataset: Any, collate: Callable, batch_size: int, *, device: Any,
               rank: int = 0, world_size: int = 1, on_batch: Callable[[int], None] | None = None) -> tuple[float, int]:
    """(sum of token losses, number of trained tokens) over this rank's share of `dataset`.
    `on_batch(rows)` is called after each batch (progress bars)."""
    import torch

    was_training = model.training
    model.eval()
    total = torch.zeros((), dtype=torch.float64)
    tokens = 0
    indices = list(range(rank, len(dataset), world_size))
    with torch.no_grad():
        for start in range(0, len(indices), batch_size):
            rows = dataset[indices[start:start + batch_size]]
            batch = collate([dict(zip(rows, vals, strict=True)) for vals in zip(*rows.values(), strict=True)])
            n = count_targets(batch)
            if on_batch is not None:
                on_batch(len(batch["input_ids"]))
            if n == 0:
                continue
            # num_items_in_batch=1 makes the model's loss the plain sum over trained tokens.
            out = model(**model_inputs(batch, device), num_items_in_batch=1)
            total += out.loss.detach().double().cpu()
            tokens += n
    model.train(was_training)
    return float(total), tokens
