"""`task: classification`, in the loop: batches (right-padded, one class id per row), the weighted cross-entropy,
prediction by length-sorted batches and the in-training evaluation (ft_cli/tasks/classification.py describes the
task; the data is read there, the head is in classify_head.py)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from ft_cli.errors import UserError

if TYPE_CHECKING:
    from ft_cli.recipe import Recipe


def make_collator(tokenizer: Any) -> Callable[[list[dict[str, Any]]], dict[str, Any]]:
    """Right padding to the longest row of the batch (never to max_seq_len); `labels` is one class id per row."""
    import torch

    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0

    def collate(rows: list[dict[str, Any]]) -> dict[str, Any]:
        n = max(len(r["input_ids"]) for r in rows)
        input_ids = torch.full((len(rows), n), pad_id, dtype=torch.long)
        attention_mask = torch.zeros((len(rows), n), dtype=torch.long)
        batch: dict[str, Any] = {"input_ids": input_ids, "attention_mask": attention_mask,
                                 "labels": torch.tensor([int(r["label"]) for r in rows], dtype=torch.long)}
        if "token_type_ids" in rows[0]:
            batch["token_type_ids"] = torch.zeros((len(rows), n), dtype=torch.long)
        for i, r in enumerate(rows):
            k = len(r["input_ids"])
            input_ids[i, :k] = torch.as_tensor(r["input_ids"])
            attention_mask[i, :k] = 1
            if "token_type_ids" in batch:
                batch["token_type_ids"][i, :k] = torch.as_tensor(r["token_type_ids"])
        return batch

    return collate


def model_inputs(batch: dict[str, Any], device: Any) -> dict[str, Any]:
    return {k: v.to(device) for k, v in batch.items() if k in ("input_ids", "attention_mask", "token_type_ids")}


def class_weights(recipe: Recipe, label_counts: dict[str, int]) -> list[float] | None:
    """train.class_weights as one weight per class: `auto` = n / (classes x n_class), the inverse frequency
    scaled so that the weights average 1 over the training examples (a class without examples gets 0)."""
    spec = recipe.train.class_weights
    if spec is None:
        return None
    counts = list(label_counts.values())
    if spec == "auto":
        n, k = sum(counts), sum(c > 0 for c in counts)
        return [n / (k * c) if c else 0.0 for c in counts]
    if len(spec) != len(counts):
        raise UserError(f"train.class_weights: {len(spec)} weights for {len(counts)} classes "
                        f"({', '.join(label_counts)})")
    return [float(w) for w in spec]


class ClassificationLoss:
    """Cross-entropy over the labels, weighted per class, summed; the loop divides by the step's examples."""

    def __init__(self, weights: list[float] | None):
        self.weights = weights
        self._tensor: Any = None

    def __call__(self, logits: Any, labels: Any) -> Any:
        import torch.nn.functional as F

        weight = None
        if self.weights is not None:
            if self._tensor is None or self._tensor.device != logits.device:
                import torch

                self._tensor = torch.tensor(self.weights, dtype=torch.float32, device=logits.device)
            weight = self._tensor
        losses = F.cross_entropy(logits.float(), labels.to(logits.device), reduction="none")
        if weight is not None:
            losses = losses * weight[labels.to(logits.device)]
        return losses.sum()


def forward_logits(model: Any, batch: dict[str, Any], device: Any) -> Any:
    return model(**model_inputs(batch, device)).logits


def predict_batches(model: Any, dataset: Any, collate: Callable, batch_size: int, device: Any, *,
                    rank: int = 0, world_size: int = 1, on_batch: Callable[[int], None] | None = None,
                    order: Sequence[int] | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(float32 logits [n, classes], class ids [n]) of this rank's share of `dataset`, in `order` (default: the
    dataset's); rows are batched by length (longest first) so little padding is computed, and put back in order."""
    import torch

    indices = list(order) if order is not None else list(range(rank, len(dataset), world_size))
    lengths = [len(dataset[i]["input_ids"]) for i in indices] if len(indices) < 4096 else None
    if lengths is None:
        import pyarrow.compute as pc

        all_lengths = pc.list_value_length(dataset.data.column("input_ids")).to_numpy()
        lengths = [int(all_lengths[i]) for i in indices]
    by_length = sorted(range(len(indices)), key=lambda j: -lengths[j])
    logits_out: list[Any] = [None] * len(indices)
    was_training = model.training
    model.eval()
    with torch.no_grad():
        for start in range(0, len(by_length), batch_size):
            chunk = by_length[start:start + batch_size]
            rows = dataset[[indices[j] for j in chunk]]
            batch = collate([dict(zip(rows, vals, strict=True)) for vals in zip(*rows.values(), strict=True)])
            logits = forward_logits(model, batch, device).float().cpu().numpy()
            for j, row in zip(chunk, logits, strict=True):
                logits_out[j] = row
            if on_batch is not None:
                on_batch(len(chunk))
    model.train(was_training)
    labels = np.array([int(dataset[i]["label"]) for i in indices], dtype=np.int64)
    return np.stack(logits_out) if logits_out else np.zeros((0, 0), np.float32), labels


def log_softmax(logits: np.ndarray) -> np.ndarray:
    shifted = logits - logits.max(axis=-1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(axis=-1, keepdims=True))


def eval_record(model: Any, dataset: Any, collate: Callable, batch_size: int, accelerator: Any,
                names: list[str]) -> dict[str, Any]:
    """In-training evaluation: eval_loss (mean cross-entropy, unweighted) and the classification metrics, over every
    process's share together (the confusion matrix and loss are summed across processes)."""
    import torch

    from ft_cli.tasks.metrics import classification_metrics, confusion_matrix

    logits, labels = predict_batches(model, dataset, collate, batch_size, accelerator.device,
                                     rank=accelerator.process_index, world_size=accelerator.num_processes)
    k = len(names)
    counts = confusion_matrix(labels, logits.argmax(-1) if len(logits) else labels, k) if len(labels) else \
        np.zeros((k, k), np.int64)
    nll = float(-log_softmax(logits)[np.arange(len(labels)), labels].sum()) if len(labels) else 0.0
    if accelerator.num_processes > 1:
        packed = torch.tensor(np.concatenate([counts.ravel().astype(np.float64), [nll]]), device=accelerator.device,
                              dtype=torch.float64)
        packed = accelerator.reduce(packed, reduction="sum").cpu().numpy()
        counts, nll = packed[:-1].round().astype(np.int64).reshape(k, k), float(packed[-1])
    n = int(counts.sum())
    metrics = classification_metrics(counts, names)
    record = {"eval_loss": nll / max(n, 1), "eval_examples": n}
    record.update({f"eval_{m}": metrics[m] for m in ("accuracy", "f1_macro", "f1_micro", "f1_weighted")})
    record["eval_confusion_matrix"] = metrics["confusion_matrix"]["counts"]
    return record




def probabilities(logits: np.ndarray) -> np.ndarray:
    return np.exp(log_softmax(logits))
