"""What a task (recipe key `task`) changes in training: the data, the batches, the loss, the evaluation.

The training loop (ft_cli.train) asks `task_for(recipe)` at these seams and is otherwise the same for every task:

    causal_lm       token rows, token-weighted LM loss, eval_loss / perplexity   (ft_cli.data, ft_cli.scoring)
    classification  labelled text, cross-entropy over labels, accuracy / F1       (ft_cli.tasks.classification)
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

from ft_cli.recipe import Recipe


class CausalLM:
    name = "causal_lm"

    def __init__(self, recipe: Recipe):
        self.recipe = recipe

    def build_datasets(self, tokenizer: Any, main_process_first: Callable | None = None) -> Any:
        from ft_cli.data.pipeline import build_datasets

        return build_datasets(self.recipe, tokenizer, main_process_first=main_process_first)

    def collator(self, tokenizer: Any, data: Any) -> Callable:
        from ft_cli.data.pipeline import make_collator

        return make_collator(tokenizer, packed=self.recipe.data.packing)

    def head(self, tokenizer: Any, data: Any) -> Any:
        return None

    def count(self, batch: dict[str, Any]) -> int:
        """What the step's loss is normalised by: trained tokens."""
        from ft_cli.scoring import count_targets

        return count_targets(batch)

    def loss(self, model: Any, batch: dict[str, Any], device: Any, denom: Any) -> Any:
        from ft_cli.scoring import model_inputs

        return model(**model_inputs(batch, device), num_items_in_batch=denom).loss

    def evaluate(self, model: Any, dataset: Any, collate: Callable, batch_size: int, acc: Any,
                 reduce_sum: Callable) -> dict[str, Any]:
        from ft_cli.scoring import token_loss

        loss_sum, tokens = token_loss(model, dataset, collate, batch_size, device=acc.device,
                                      rank=acc.process_index, world_size=acc.num_processes)
        loss_sum, tokens = reduce_sum(acc, loss_sum), int(reduce_sum(acc, tokens))
        eval_loss = loss_sum / max(tokens, 1)
        return {"eval_loss": eval_loss, "eval_perplexity": math.exp(min(eval_loss, 50)), "eval_tokens": tokens}

    def sanity_loss(self, model: Any, rows: Any, collate: Callable, batch_size: int, device: Any) -> float:
        from ft_cli.scoring import token_loss

        loss_sum, tokens = token_loss(model, rows, collate, batch_size, device=device)
        return loss_sum / max(tokens, 1)

    def save_extras(self, model: Any, out: Any, data: Any) -> None:
        pass


class Classification(CausalLM):
    name = "classification"

    def build_datasets(self, tokenizer: Any, main_process_first: Callable | None = None) -> Any:
        from ft_cli.tasks.classification import build_datasets

        return build_datasets(self.recipe, tokenizer, main_process_first=main_process_first)

    def collator(self, tokenizer: Any, data: Any) -> Callable:
        from ft_cli.tasks.classification import ClassificationLoss, class_weights, make_collator

        self.labels = list(data.labels)
        self._loss = ClassificationLoss(class_weights(self.recipe, data.train_stats.label_counts))
        return make_collator(tokenizer)

    def head(self, tokenizer: Any, data: Any) -> Any:
        from ft_cli.tasks.classification import Head

        return Head(list(data.labels), tokenizer.pad_token_id)

    def count(self, batch: dict[str, Any]) -> int:
        return len(batch["labels"])

    def loss(self, model: Any, batch: dict[str, Any], device: Any, denom: Any) -> Any:
        from ft_cli.tasks.classification import forward_logits

        return self._loss(forward_logits(model, batch, device), batch["labels"]) / denom

    def evaluate(self, model: Any, dataset: Any, collate: Callable, batch_size: int, acc: Any,
                 reduce_sum: Callable) -> dict[str, Any]:
        from ft_cli.tasks.classification import eval_record

        return eval_record(model, dataset, collate, batch_size, acc, self.labels)

    def sanity_loss(self, model: Any, rows: Any, collate: Callable, batch_size: int, device: Any) -> float:
        from ft_cli.tasks.classification import log_softmax, predict_batches

        logits, labels = predict_batches(model, rows, collate, batch_size, device)
        return float(-log_softmax(logits)[range(len(labels)), labels].mean())

    def save_extras(self, model: Any, out: Any, data: Any) -> None:
        from ft_cli.tasks.classification import save_extras

        save_extras(model, out, self.recipe, list(data.labels))


def task_for(recipe: Recipe) -> CausalLM:
    return Classification(recipe) if recipe.task == "classification" else CausalLM(recipe)
