"""`ft validate`: check a recipe and its data without training, and show what training would do."""

from __future__ import annotations

import os
from pathlib import Path

from ft_cli.recipe import Recipe, dump_recipe, load_recipe, recipe_errors


def validate_recipe(recipe_path: Path, overrides: list[str], *, show: int = 0, check_data: bool = True) -> Recipe:
    recipe = load_recipe(recipe_path, overrides)
    with recipe_errors(recipe):
        return _validate(recipe, recipe_path, show=show, check_data=check_data)


def _validate(recipe: Recipe, recipe_path: Path, *, show: int, check_data: bool) -> Recipe:
    from rich.console import Console
    from rich.syntax import Syntax
    from rich.table import Table

    from ft_cli.model_config import check_context_length

    check_context_length(recipe)
    console = Console(highlight=False)
    console.print(f"[bold green]recipe OK[/]: {recipe_path}")
    console.print(Syntax(dump_recipe(recipe), "yaml", theme="ansi_dark", background_color="default"))

    t = recipe.train
    world = int(os.environ.get("WORLD_SIZE", "1"))
    derived = Table(title="derived values", show_header=False)
    derived.add_row("effective batch (rows per optimizer step)",
                    f"{t.micro_batch_size * t.grad_accum * world} = micro_batch_size {t.micro_batch_size} "
                    f"x grad_accum {t.grad_accum} x processes {world}")
    derived.add_row("precision", precision_summary(recipe))
    for field_path, why in recipe.derived.items():
        derived.add_row(field_path, why)
    if recipe.quantized:
        q = recipe.quantization
        assert q is not None
        derived.add_row("quantization", f"{q.bits}-bit {q.quant_type if q.bits == 4 else 'int8'}"
                        f"{' + double quant' if q.double_quant and q.bits == 4 else ''}, compute {q.compute_dtype}")
    if not check_data:
        console.print(derived)
        return recipe

    from ft_cli.batches import micro_batches_per_epoch, total_steps
    from ft_cli.data.audit import print_data_report
    from ft_cli.model import load_tokenizer, resolve_model_path
    from ft_cli.tasks import task_for

    path = resolve_model_path(recipe.model)
    tokenizer = load_tokenizer(recipe, path)
    bundle = task_for(recipe).build_datasets(tokenizer)
    per_epoch = micro_batches_per_epoch(len(bundle.train), t.micro_batch_size, world)
    steps = total_steps(t.max_steps, t.epochs, per_epoch, t.grad_accum)
    derived.add_row("optimizer steps", f"{steps}" + ("" if t.max_steps else f" ({t.epochs:g} epochs x "
                                                                         f"{per_epoch} micro-batches / {t.grad_accum})"))
    trainable, total = count_trainable(recipe, path, num_labels=len(bundle.labels) if bundle.labels else None)
    derived.add_row("trainable parameters", f"{trainable:,} of {total:,} ({100 * trainable / max(total, 1):.3f}%)")
    console.print(derived)
    print_data_report(bundle, tokenizer, console, show=show)
    return recipe


def precision_summary(recipe: Recipe) -> str:
    """What training holds and computes in, in one line."""
    dtype = recipe.model.dtype
    if recipe.autocast_dtype:
        return f"float32 master weights, forward/backward under {dtype} autocast; saved in {dtype}"
    if recipe.is_peft:
        return f"base in {dtype}, trained adapters in float32"
    if dtype != "float32":
        return f"weights trained in {dtype} directly (train.mixed_precision: false)"
    return "float32"


def count_trainable(recipe: Recipe, path: str, num_labels: int | None = None) -> tuple[int, int]:
    """Trainable/total parameters from the config alone, counted as ft plan counts them (on the meta device).
    task classification: AutoModelForSequenceClassification with `num_labels` classes, its head trained."""
    from transformers import AutoConfig

    extra = {"num_labels": num_labels} if recipe.task == "classification" and num_labels else {}
    config = AutoConfig.from_pretrained(path, trust_remote_code=recipe.model.trust_remote_code,
                                        revision=recipe.model.revision, **extra)
    if recipe.task != "classification":
        from ft_cli.plan import count_params

        counts = count_params(config, recipe)
        return sum(n for n, _ in counts.trainable), counts.total + counts.added
    import torch
    from transformers import AutoModelForSequenceClassification

    from ft_cli.methods.apply import apply_method
    from ft_cli.model import count_parameters
    from ft_cli.tasks.classify_head import train_head

    with torch.device("meta"):
        model = AutoModelForSequenceClassification.from_config(config, trust_remote_code=recipe.model.trust_remote_code)
    meta_recipe = recipe.model_copy(update={"quantization": None}, deep=True)
    model = apply_method(model, meta_recipe)
    train_head(model, meta_recipe)
    return count_parameters(model)

