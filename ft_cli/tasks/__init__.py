"""What a task (recipe key `task`) changes in training: the data, the batches, the loss, the evaluation.

The training loop (ft_cli.train) asks `task_for(recipe)` at these seams and is otherwise the same for every task:

    causal_lm       token rows, token-weighted LM loss, eval_loss / perplexity   (ft_cli.data, ft_cli.scoring)
    classification  labelled text, cross-entropy over labels, accuracy / F1       (ft_cli.tasks.classification)
    causal_lm with objective dpo / orpo / simpo: preference pairs, the pair loss, reward accuracy / margin
                                                                                  (ft_cli.objectives)
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

    def prepare(self, model: Any, data: Any, collate: Callable, accelerator: Any) -> None:
        """After the model is built, before a resume loads its checkpoint (DPO's reference log-probabilities)."""

    def begin_step(self, micro: list[dict[str, Any]], acc: Any, reduce_sum: Callable) -> None:
        """Before the micro-batches of an optimizer step run (a second normaliser: ORPO's chosen tokens)."""

    def train_metrics(self, acc: Any, reduce_sum: Callable) -> dict[str, float]:
        """More keys for a metrics.jsonl train line, over the steps since the last one."""
        return {}

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
        from ft_cli.tasks.classify_loss import ClassificationLoss, class_weights, make_collator

        self.labels = list(data.labels)
        self._loss = ClassificationLoss(class_weights(self.recipe, data.train_stats.label_counts))
        return make_collator(tokenizer)

    def head(self, tokenizer: Any, data: Any) -> Any:
        from ft_cli.tasks.classify_head import Head

        return Head(list(data.labels), tokenizer.pad_token_id)

    def count(self, batch: dict[str, Any]) -> int:
        return len(batch["labels"])

    def loss(self, model: Any, batch: dict[str, Any], device: Any, denom: Any) -> Any:
        from ft_cli.tasks.classify_loss import forward_logits

        return self._loss(forward_logits(model, batch, device), batch["labels"]) / denom

    def evaluate(self, model: Any, dataset: Any, collate: Callable, batch_size: int, acc: Any,
                 reduce_sum: Callable) -> dict[str, Any]:
        from ft_cli.tasks.classify_loss import eval_record

        return eval_record(model, dataset, collate, batch_size, acc, self.labels)

    def sanity_loss(self, model: Any, rows: Any, collate: Callable, batch_size: int, device: Any) -> float:
        from ft_cli.tasks.classify_loss import log_softmax, predict_batches

        logits, labels = predict_batches(model, rows, collate, batch_size, device)
        return float(-log_softmax(logits)[range(len(labels)), labels].mean())

    def save_extras(self, model: Any, out: Any, data: Any) -> None:
        from ft_cli.tasks.classify_head import save_extras

        save_extras(model, out, self.recipe, list(data.labels))


class Preference(CausalLM):
    """objective dpo / orpo / simpo on preference pairs (data.format: preference): ft_cli.objectives."""

    name = "preference"

    def collator(self, tokenizer: Any, data: Any) -> Callable:
        from ft_cli.objectives import PreferenceObjective, preference_collator

        self.objective = PreferenceObjective(self.recipe)
        self.window: dict[str, float] = {}
        self.token_denom = 1.0
        return preference_collator(tokenizer)

    def prepare(self, model: Any, data: Any, collate: Callable, accelerator: Any) -> None:
        import sys
        import time

        from ft_cli.batches import rows_at
        from ft_cli.reference import add_reference_logps

        t = self.recipe.train
        size, device = t.eval_batch_size or t.micro_batch_size, accelerator.device
        if self.recipe.preference.share_prompt:
            first = collate(rows_at(data.train, list(range(min(len(data.train), t.micro_batch_size)))))
            note = self.objective.choose_sharing(model, first, device)
            if note and accelerator.is_main_process:
                print(note, file=sys.stderr)
        if not self.objective.needs_reference:
            return
        t0 = time.perf_counter()
        sources = []
        for split in ("train", "eval"):
            if getattr(data, split) is None:
                continue
            dataset, source = add_reference_logps(
                getattr(data, split), model, collate, size, device=device, share=self.objective.share,
                rank=accelerator.process_index, world_size=accelerator.num_processes, cache=self.recipe.data.cache,
                is_main=accelerator.is_main_process, label=self.recipe.model.name_or_path)
            setattr(data, split, dataset)
            sources.append(source)
        if accelerator.is_main_process:
            pairs = len(data.train) + (len(data.eval) if data.eval is not None else 0)
            how = ("read from ft's cache, its first batch checked against the model" if set(sources) == {"from cache"}
                   else f"computed in {time.perf_counter() - t0:.1f} s")
            kept = "; kept in ft's cache for the next run" if "cached" in sources else ""
            what = "the model before training" + (", adapter disabled" if self.recipe.is_peft else "")
            print(f"dpo: reference log-probabilities of {pairs:,} pairs ({what}) {how}{kept}", file=sys.stderr)

    def count(self, batch: dict[str, Any]) -> int:
        return int(batch["pairs"])

    def begin_step(self, micro: list[dict[str, Any]], acc: Any, reduce_sum: Callable) -> None:
        tokens = reduce_sum(acc, sum(self.objective.units(b)[1] for b in micro))
        self.token_denom = max(tokens, 1) / acc.num_processes

    def loss(self, model: Any, batch: dict[str, Any], device: Any, denom: Any) -> Any:
        loss, stats = self.objective.loss(model, batch, device, denom, self.token_denom)
        for k, v in stats.items():
            self.window[k] = self.window.get(k, 0.0) + v
        return loss

    def train_metrics(self, acc: Any, reduce_sum: Callable) -> dict[str, float]:
        from ft_cli.objectives import step_metrics

        sums = {k: reduce_sum(acc, v) for k, v in sorted(self.window.items())}
        self.window = {}
        return step_metrics(sums) if sums else {}

    def evaluate(self, model: Any, dataset: Any, collate: Callable, batch_size: int, acc: Any,
                 reduce_sum: Callable) -> dict[str, Any]:
        sums = self.objective.evaluate(model, dataset, collate, batch_size, device=acc.device,
                                       rank=acc.process_index, world_size=acc.num_processes)
        return self.objective.eval_record({k: reduce_sum(acc, v) for k, v in sorted(sums.items())})

    def sanity_loss(self, model: Any, rows: Any, collate: Callable, batch_size: int, device: Any) -> float:
        return self.objective.eval_record(self.objective.evaluate(model, rows, collate, batch_size,
                                                                  device=device))["eval_loss"]


def task_for(recipe: Recipe) -> CausalLM:
    if recipe.task == "classification":
        return Classification(recipe)
    return Preference(recipe) if recipe.objective != "sft" else CausalLM(recipe)
