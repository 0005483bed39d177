"""`ft eval`: score a run on its eval split (or any data), or a model directory / hub model on --data.

The loss is token-weighted over the whole set — the sum of per-token cross-entropies over trained tokens
divided by their number, never a mean of batch means — so it does not depend on the batch size and equals the
eval_loss logged during training. perplexity = exp(loss). `--generate N` also generates greedily for N examples
and scores the replies against the references (ft_cli.metrics_text); `--compare-base` scores the base model's
loss (and replies) too. `--fail-if` turns any metric into a CI gate. Where results go: ft_cli.eval_results.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from ft_cli.errors import UserError
from ft_cli.eval_results import Threshold, add_base, finish, parse_thresholds, result_path
from ft_cli.generation import greedy_generate, stop_token_ids  # noqa: F401 (shared; also imported from here)
from ft_cli.methods.registry import method_spec
from ft_cli.metrics_text import GENERATION_METRICS
from ft_cli.recipe import Recipe
from ft_cli.run_dir import RunDir
from ft_cli.scoring import (  # noqa: F401  (shared with merge --combine and export; also imported from here)
    IGNORE_INDEX,
    count_examples,
    eval_dataset,
    perplexity,
    score,
)

SPLITS = ("eval", "train")


# --fail-if thresholds ----------------------------------------------------------------------------------------------

# Runs trained with objective dpo / orpo / simpo also report these (the loss and perplexity are the chosen replies').
PREFERENCE_METRICS = ("pair_loss", "reward_accuracy", "reward_margin", "pairs")


def available_metrics(compare_base: bool, generate: int) -> list[str]:
    names = ["loss", "perplexity", "tokens", "examples"] + list(PREFERENCE_METRICS)
    if compare_base:
        names += ["base_loss", "base_perplexity", "delta_loss", "delta_perplexity"]
    if generate:
        names += list(GENERATION_METRICS) + ["generated"]
        if compare_base:
            names += [f"{p}_{m}" for m in GENERATION_METRICS for p in ("base", "delta")]
    return names


def evaluate_run(run_dir: Path | str, *, data: Path | None = None, split: str = "eval", compare_base: bool = False,
                 generate: int = 0, fail_if: Sequence[str] = (), batch_size: int = 8, which: str = "final",
                 data_format: str | None = None, max_new_tokens: int = 256, name: str | None = None,
                 output: Path | None = None) -> int:
    """Evaluate a run (or a model directory / hub model on --data), write the result (see `result_path`), print
    a table; raise CheckFailed (exit 3) when a --fail-if threshold is crossed."""
    from ft_cli.compose import combined_inputs
    from ft_cli.loading import resolve_target, run_base_path
    from ft_cli.tasks.classify_run import classification_target, evaluate_classification

    if (classifier := classification_target(run_dir, which)) is not None:  # task: classification (its metrics)
        if generate or data_format not in (None, "labelled"):
            raise UserError("--generate and --format apply to language-model runs; this run classifies text")
        _check_arguments(split, data)
        return evaluate_classification(classifier, data=data, split=split, which=which, compare_base=compare_base,
                                       fail_if=fail_if, batch_size=batch_size, name=name, output=output)
    thresholds = parse_thresholds(fail_if, available_metrics(compare_base, generate))
    _check_arguments(split, data, batch_size=batch_size, generate=generate, max_new_tokens=max_new_tokens)
    if data_format is not None and data is None:
        raise UserError("--format describes the file given with --data; the run's own splits use its recipe")
    target = resolve_target(run_dir, which)  # type: ignore[arg-type]
    if target.kind != "run":
        return _evaluate_model(target, data=data, data_format=data_format, split=split, compare_base=compare_base,
                               generate=generate, thresholds=thresholds, batch_size=batch_size,
                               max_new_tokens=max_new_tokens, name=name, output=output)
    assert target.recipe is not None
    recipe = _with_format(target.recipe, data_format)
    if data is None and (combined := combined_inputs(target.path)) is not None:  # written by ft merge --combine
        from ft_cli.compose import evaluate_combined_run

        return evaluate_combined_run(target.path, combined, split=split, batch_size=batch_size, thresholds=thresholds,
                                     compare_base=compare_base, generate=generate, path=output or result_path(
                                         RunDir(target.path), data=None, split=split, which=which, name=name))

    tokenizer, dataset, model, device, base_path = _load_run(target, recipe, data, split)
    result: dict[str, Any] = {
        "run_dir": str(target.path), "model": str(target.output), "which": which, "method": recipe.method,
        "data": str(data) if data is not None else _data_paths(recipe, split),
        "split": None if data is not None else split, "format": recipe.data.format,
    }
    result.update(score(model, dataset, tokenizer, batch_size, device, label="eval"))
    if recipe.objective != "sft":
        result.update(preference_score(model, dataset, tokenizer, recipe, batch_size, device, base_path))
    if generate:
        result.update(generation_eval(model, tokenizer, recipe, data, split, generate, max_new_tokens, device,
                                      batch_size, scored_rows=dataset))
    if compare_base:
        with base_model(model, recipe, device, base_path or run_base_path(target)) as base:
            scored = score(base, dataset, tokenizer, batch_size, device, label="eval base")
            base_gen = generation_eval(base, tokenizer, recipe, data, split, generate, max_new_tokens, device,
                                       batch_size, scored_rows=dataset, label="base") if generate else None
        add_base(result, scored, base_gen)
    path = output or result_path(RunDir(target.path), data=data, split=split, which=which, name=name)
    return finish(result, thresholds, path)


def _load_run(target: Any, recipe: Recipe, data: Path | None, split: str) -> tuple[Any, Any, Any, Any, str | None]:
    """(tokenizer, the split to score, model, device, base path of an adapter run). Data first: a data problem
    should not wait for the model to load."""
    from ft_cli.loading import default_device, load_run_model, load_run_tokenizer, run_base_path

    tokenizer = load_run_tokenizer(recipe, target.output)
    dataset, source = eval_dataset(recipe, tokenizer, data, split)
    if len(dataset) == 0:
        raise UserError(f"{source}: no example with a trained token to evaluate")
    device = default_device()
    base_path = None if method_spec(recipe.method).whole_model else run_base_path(target)
    model = load_run_model(recipe, target.output, device=device, base_path=base_path)
    return tokenizer, dataset, model, device, base_path


def _check_arguments(split: str, data: Path | None, *, batch_size: int = 1, generate: int = 0,
                     max_new_tokens: int = 1) -> None:
    if split not in SPLITS:
        raise UserError(f"--split: must be one of {', '.join(SPLITS)}, got {split!r}")
    if batch_size < 1 or generate < 0 or max_new_tokens < 1:
        raise UserError("--batch-size and --max-new-tokens must be at least 1, --generate at least 0")
    if data is not None and not Path(data).expanduser().exists():
        raise UserError(f"--data: {data} not found")


def _evaluate_model(target: Any, *, data: Path | None, data_format: str | None, split: str, compare_base: bool,
                    generate: int, thresholds: list[Threshold], batch_size: int, max_new_tokens: int,
                    name: str | None, output: Path | None) -> int:
    """A model directory (e.g. ft merge's output) or a hub model on --data, in the model's own dtype."""
    from ft_cli.loading import default_device, load_model_dir, load_model_dir_tokenizer

    what = "a hub model" if target.kind == "hub" else "a model directory"
    if data is None:
        raise UserError(f"--data: evaluating {what} ({target.path}) needs --data PATH; only a run directory has "
                        "eval and train splits of its own")
    if split != "eval":
        raise UserError(f"--split: applies to run directories; {target.path} is {what}")
    if compare_base:
        raise UserError(f"--compare-base: needs a run directory (its recipe names the base); {target.path} is {what}")
    recipe = model_data_recipe(str(target.output), data, data_format)
    tokenizer = load_model_dir_tokenizer(target.output)
    dataset, source = eval_dataset(recipe, tokenizer, data, split)
    if len(dataset) == 0:
        raise UserError(f"{source}: no example with a trained token to evaluate")
    device = default_device()
    model = load_model_dir(target.output, device=device)
    result: dict[str, Any] = {"run_dir": None, "model": str(target.output), "which": None, "method": None,
                              "data": str(data), "split": None, "format": recipe.data.format}
    result.update(score(model, dataset, tokenizer, batch_size, device, label="eval"))
    if generate:
        result.update(generation_eval(model, tokenizer, recipe, data, split, generate, max_new_tokens, device,
                                      batch_size, scored_rows=dataset))
    if output is None and target.kind == "model" and (Path(target.path) / "merge_report.json").is_file():
        output = result_path(RunDir(Path(target.path)), data=data, split=split, which="final", name=name)
    return finish(result, thresholds, output)


def model_data_recipe(model: str, data: Path, data_format: str | None) -> Recipe:
    """The data settings for scoring a plain model: --format (or the format its records show), max_seq_len 2048."""
    from ft_cli.recipe import recipe_from_dict

    _check_format(data_format)
    fmt = data_format or guess_format(Path(data))
    return recipe_from_dict({"model": {"name_or_path": model}, "method": "full",
                             "data": {"train": str(data), "format": fmt, "val_split": 0, "cache": False}})


def guess_format(data: Path) -> str:
    """The format of a data file from the fields of its first record; --format when they say nothing."""
    from ft_cli.data import saved
    from ft_cli.data.formats import format_of_record
    from ft_cli.data.sources import data_files, read_records

    p = Path(data).expanduser()
    if p.is_dir() and saved.saved_kind(p):
        ds = saved.load_saved(p, None, "--data")
        if saved.is_pretokenized(ds):
            return "alpaca"  # used as tokenized; the format does not apply
        record = ds[0] if len(ds) else {}
    else:
        files = data_files(str(p), "--data") or []
        record = next((r for f in files for r, _ in read_records(f)), {})
    fmt = format_of_record(record)
    if fmt is None:
        raise UserError(f"--format: cannot tell the format of {data} from its fields ({', '.join(record) or 'none'}); "
                        "pass --format alpaca|chat|sharegpt|text")
    print(f"--data {data}: format {fmt} (from its fields; --format to say otherwise)", file=sys.stderr)
    return fmt


def _check_format(data_format: str | None) -> None:
    allowed = ("alpaca", "chat", "sharegpt", "text")
    if data_format is not None and data_format not in allowed:
        raise UserError(f"--format: must be one of {', '.join(allowed)}, got {data_format!r}")


def _with_format(recipe: Recipe, data_format: str | None) -> Recipe:
    if data_format is None or data_format == recipe.data.format:
        return recipe
    _check_format(data_format)
    recipe = recipe.model_copy(deep=True)
    recipe.data.format = data_format  # type: ignore[assignment]
    return recipe


def _data_paths(recipe: Recipe, split: str) -> Any:
    sources = recipe.data.eval_sources if split == "eval" and recipe.data.eval is not None else recipe.data.sources
    paths = [s.path for s in sources]
    return paths[0] if len(paths) == 1 else paths


def preference_score(model: Any, dataset: Any, tokenizer: Any, recipe: Recipe, batch_size: int, device: Any,
                     base_path: str | None) -> dict[str, Any]:
    """For a preference run: the objective's loss over the pairs, the fraction of pairs whose chosen reply gets the
    higher reward, and the mean reward margin - what training logged as eval_*; DPO's reference is the base model
    (the adapter disabled, or the base loaded anew for full/freeze)."""
    from ft_cli.objectives import PreferenceObjective, preference_collator
    from ft_cli.reference import add_reference_logps

    if "rejected_input_ids" not in dataset.column_names:
        raise UserError(f"objective {recipe.objective}: the evaluation data has no rejected replies; give pairs "
                        "(data.format: preference)")
    objective, collate = PreferenceObjective(recipe), preference_collator(tokenizer)
    if objective.needs_reference:
        if recipe.is_peft:  # add_reference_logps disables the adapter itself
            dataset, _ = add_reference_logps(dataset, model, collate, batch_size, device=device,
                                             cache=recipe.data.cache)
        else:
            with base_model(model, recipe, device, base_path) as base:
                dataset, _ = add_reference_logps(dataset, base, collate, batch_size, device=device,
                                                 cache=recipe.data.cache)
    record = objective.eval_record(objective.evaluate(model, dataset, collate, batch_size, device=device))
    return {"pair_loss": record["eval_loss"], "reward_accuracy": record["eval_reward_accuracy"],
            "reward_margin": record["eval_reward_margin"], "pairs": record["eval_pairs"]}


@contextmanager
def base_model(model: Any, recipe: Recipe, device: Any, base_path: str | None = None) -> Iterator[Any]:
    """The base model the run started from: the adapter disabled for PEFT runs, else the base loaded anew."""
    from peft import PeftModel

    if isinstance(model, PeftModel):
        with model.disable_adapter():
            yield model
        return
    from ft_cli.loading import load_base

    base = load_base(recipe, device=device, path=base_path)
    if not recipe.quantized:
        base.to(device)
    base.eval()
    try:
        yield base
    finally:
        del base


# Generation ----------------------------------------------------------------------------------------------------------

def generation_eval(model: Any, tokenizer: Any, recipe: Recipe, data: Path | None, split: str, n: int,
                    max_new_tokens: int, device: Any, batch_size: int, scored_rows: Any = None,
                    label: str = "generate") -> dict[str, Any]:
    from ft_cli.metrics_text import generation_metrics

    if recipe.data.format == "text":
        raise UserError("--generate needs prompt/response data (alpaca, chat, sharegpt); format text has no "
                        "reference replies")
    # Unpacked, response-only labels: the last trained span of each row is the reference reply and everything
    # before it is the prompt, rendered by the chat template up to the assistant header (add_generation_prompt).
    dataset = scored_rows
    if dataset is None or recipe.data.train_on_inputs or "position_ids" in dataset.column_names:
        gen_recipe = recipe.model_copy(deep=True)
        gen_recipe.data.packing = False
        gen_recipe.data.train_on_inputs = False
        dataset, _ = eval_dataset(gen_recipe, tokenizer, data, split)
    pairs = [p for p in (split_prompt(row["input_ids"], row["labels"])
                         for row in dataset.select(range(min(n, len(dataset))))) if p is not None]
    if not pairs:
        raise UserError("--generate: no example has a prompt followed by a reply to compare against")
    prompts = [p for p, _ in pairs]
    references = [tokenizer.decode(r, skip_special_tokens=True).strip() for _, r in pairs]
    room = recipe.data.max_seq_len
    print(f"{label}: {len(prompts)} replies (greedy, at most {max_new_tokens} new tokens each)", file=sys.stderr,
          flush=True)
    predictions = greedy_generate(model, tokenizer, prompts, max_new_tokens=max_new_tokens, device=device,
                                  batch_size=batch_size, max_total=max(room, max(len(p) for p in prompts) + 1),
                                  on_batch=lambda done: print(f"{label}: {done}/{len(prompts)}", file=sys.stderr,
                                                              flush=True))
    samples = [{"prompt": tokenizer.decode(p, skip_special_tokens=False), "reference": r, "prediction": g}
               for p, r, g in zip(prompts, references, predictions, strict=True)]
    return {**generation_metrics(predictions, references), "generated": len(pairs), "samples": samples}


def split_prompt(input_ids: Sequence[int], labels: Sequence[int]) -> tuple[list[int], list[int]] | None:
    """(prompt ids, reference ids): the reference is the last contiguous run of trained tokens, the prompt all
    before it; None when nothing precedes it (position 0 is never trained, so a 1-token "prompt" counts as none)."""
    end = len(labels)
    while end > 0 and labels[end - 1] == IGNORE_INDEX:
        end -= 1
    start = end
    while start > 0 and labels[start - 1] != IGNORE_INDEX:
        start -= 1
    if start <= 1 or end == 0:
        return None
    return list(input_ids[:start]), list(input_ids[start:end])


