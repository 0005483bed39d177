"""Token-weighted loss: the sum of per-token losses over trained tokens divided by their count — over a whole
set, never a mean of batch means. Shared by in-training evaluation, `ft eval`, `ft merge --combine` and `ft export`:
`eval_dataset` gives the rows of a split (or of --data) and `score` their loss."""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ft_cli.data.encode import IGNORE_INDEX
from ft_cli.errors import UserError

if TYPE_CHECKING:
    from ft_cli.recipe import Recipe



def count_targets(batch: dict[str, Any]) -> int:
    """Tokens that carry loss: a label at position t is predicted from position t-1, so position 0 never is."""
    return int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())


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


def eval_dataset(recipe: Recipe, tokenizer: Any, data: Path | None, split: str) -> tuple[Any, str]:
    """Tokenized rows (input_ids, labels masked as in training) to score, and a name for messages."""
    if data is not None:
        from ft_cli.data.pipeline import load_eval_data

        return load_eval_data(Path(data), recipe, tokenizer), str(data)
    from ft_cli.data.pipeline import build_datasets

    bundle = build_datasets(recipe, tokenizer)
    if split == "train":
        return bundle.train, "the run's train split"
    if bundle.eval is None:
        raise UserError("the run has no eval split (data.eval is null and data.val_split is 0); "
                        "use --split train or --data PATH")
    return bundle.eval, "the run's eval split"


def score(model: Any, dataset: Any, tokenizer: Any, batch_size: int, device: Any, label: str = "eval") \
        -> dict[str, Any]:
    """loss (token-weighted mean over the whole set), perplexity = exp(loss), tokens, examples."""
    from ft_cli.data.pipeline import make_collator
    from ft_cli.progress import CountProgress

    packed = "position_ids" in dataset.column_names
    collate = make_collator(tokenizer, packed=packed)
    progress = CountProgress(len(dataset), f"{label} (rows)")
    try:
        loss_sum, tokens = token_loss(model, dataset, collate, batch_size, device=device, on_batch=progress.advance)
    finally:
        progress.close()
    if tokens == 0:
        raise UserError("no trained tokens in the evaluation data (every label is masked)")
    loss = loss_sum / tokens
    return {"loss": loss, "perplexity": perplexity(loss), "tokens": tokens, "examples": count_examples(dataset)}


def perplexity(loss: float) -> float:
    try:
        return math.exp(loss)
    except OverflowError:
        return float("inf")


def count_examples(dataset: Any) -> int:
    """Rows, or for packed rows the examples inside them (each starts where position_ids restart at 0)."""
    if "position_ids" not in dataset.column_names:
        return len(dataset)
    return sum(sum(1 for p in row if p == 0) for row in dataset["position_ids"])
