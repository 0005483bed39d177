"""`ft eval`: score a run on its eval split (or any data) and write RUN_DIR/eval.json.

The loss is token-weighted over the whole set — the sum of per-token cross-entropies over trained tokens
divided by their number, never a mean of batch means — so it does not depend on the batch size and equals the
eval_loss logged during training. perplexity = exp(loss). `--generate N` also generates greedily for N examples
and scores the replies against the references (ft_cli.metrics_text). `--fail-if` turns any metric into a CI gate.
"""

from __future__ import annotations

import math
import operator
import re
import sys
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ft_cli.errors import CheckFailed, UserError
from ft_cli.generation import greedy_generate, stop_token_ids  # noqa: F401 (shared; also imported from here)
from ft_cli.metrics_text import GENERATION_METRICS
from ft_cli.recipe import WHOLE_MODEL_METHODS, Recipe
from ft_cli.run_dir import RunDir, now_iso, write_text_atomic
from ft_cli.scoring import IGNORE

SPLITS = ("eval", "train")


# --fail-if thresholds ----------------------------------------------------------------------------------------------

_OPS: dict[str, Callable[[float, float], bool]] = {
    ">=": operator.ge, "<=": operator.le, "==": operator.eq, ">": operator.gt, "<": operator.lt,
}
_THRESHOLD = re.compile(r"^\s*([A-Za-z_][A-Za-z0-9_]*)\s*(>=|<=|==|>|<)\s*([^\s<>=]+)\s*$")


@dataclass(frozen=True)
class Threshold:
    """`metric op value`: the check fails when the comparison is true, e.g. perplexity>12."""

    metric: str
    op: str
    value: float

    def crossed(self, actual: float) -> bool:
        return _OPS[self.op](actual, self.value)

    def __str__(self) -> str:
        return f"{self.metric}{self.op}{self.value:g}"


def available_metrics(compare_base: bool, generate: int) -> list[str]:
    names = ["loss", "perplexity", "tokens", "examples"]
    if compare_base:
        names += ["base_loss", "base_perplexity", "delta_loss", "delta_perplexity"]
    if generate:
        names += list(GENERATION_METRICS) + ["generated"]
    return names


def parse_thresholds(specs: Sequence[str], allowed: Sequence[str]) -> list[Threshold]:
    out = []
    for spec in specs:
        m = _THRESHOLD.match(spec)
        if not m:
            raise UserError(f"--fail-if {spec!r}: expected METRIC OP NUMBER with OP one of > >= < <= ==, "
                            "e.g. 'perplexity>12'")
        name, op, raw = m.groups()
        try:
            value = float(raw)
        except ValueError:
            raise UserError(f"--fail-if {spec!r}: {raw!r} is not a number") from None
        if name not in allowed:
            hint = ""
            if name.startswith(("base_", "delta_")):
                hint = " (add --compare-base)"
            elif name in GENERATION_METRICS or name == "generated":
                hint = " (add --generate N)"
            raise UserError(f"--fail-if {spec!r}: unknown metric {name!r}{hint}; available: {', '.join(allowed)}")
        out.append(Threshold(name, op, value))
    return out


# The command -------------------------------------------------------------------------------------------------------

def evaluate_run(run_dir: Path, *, data: Path | None = None, split: str = "eval", compare_base: bool = False,
                 generate: int = 0, fail_if: Sequence[str] = (), batch_size: int = 8, which: str = "final",
                 data_format: str | None = None, max_new_tokens: int = 256) -> int:
    """Evaluate, write eval.json, print a table; raise CheckFailed (exit 3) when a --fail-if threshold is crossed."""
    from ft_cli.compose import combined_inputs
    from ft_cli.loading import (
        default_device,
        load_run_model,
        load_run_tokenizer,
        resolve_target,
        run_base_path,
    )

    thresholds = parse_thresholds(fail_if, available_metrics(compare_base, generate))
    if split not in SPLITS:
        raise UserError(f"--split: must be one of {', '.join(SPLITS)}, got {split!r}")
    if batch_size < 1 or generate < 0 or max_new_tokens < 1:
        raise UserError("--batch-size and --max-new-tokens must be at least 1, --generate at least 0")
    target = resolve_target(run_dir, which)  # type: ignore[arg-type]
    if target.kind != "run" or target.recipe is None:
        raise UserError(f"{run_dir}: ft eval needs a run directory written by ft train (with recipe.yaml)")
    if data is not None and not Path(data).exists():
        raise UserError(f"--data: {data} not found")
    if data_format is not None and data is None:
        raise UserError("--format describes the file given with --data; the run's own splits use its recipe")
    recipe = _with_format(target.recipe, data_format)
    if data is None and (combined := combined_inputs(target.path)) is not None:  # written by ft merge --combine
        from ft_cli.compose import evaluate_combined_run

        return evaluate_combined_run(target.path, combined, split=split, batch_size=batch_size, thresholds=thresholds,
                                     compare_base=compare_base, generate=generate)

    # Data first: a data problem should not wait for the model to load.
    tokenizer = load_run_tokenizer(recipe, target.output)
    dataset, source = eval_dataset(recipe, tokenizer, data, split)
    if len(dataset) == 0:
        raise UserError(f"{source}: no example with a trained token to evaluate")
    device = default_device()
    base_path = None if recipe.method in WHOLE_MODEL_METHODS else run_base_path(target)
    model = load_run_model(recipe, target.output, device=device, base_path=base_path)

    result: dict[str, Any] = {
        "run_dir": str(target.path), "model": str(target.output), "which": which, "method": recipe.method,
        "data": str(data) if data is not None else _data_paths(recipe, split),
        "split": None if data is not None else split, "format": recipe.data.format,
    }
    result.update(score(model, dataset, tokenizer, batch_size, device, label="eval"))
    if compare_base:
        with base_model(model, recipe, device, base_path or run_base_path(target)) as base:
            scored = score(base, dataset, tokenizer, batch_size, device, label="eval base")
        result.update(base_loss=scored["loss"], base_perplexity=scored["perplexity"],
                      delta_loss=result["loss"] - scored["loss"],
                      delta_perplexity=result["perplexity"] - scored["perplexity"])
    if generate:
        result.update(generation_eval(model, tokenizer, recipe, data, split, generate, max_new_tokens, device,
                                      batch_size, scored_rows=dataset))
    failed = [t for t in thresholds if t.crossed(float(result[t.metric]))]
    result.update(evaluated_at=now_iso(), fail_if=[str(t) for t in thresholds], failed=[str(t) for t in failed])
    run = RunDir(target.path)
    write_json(run.eval_json, result)
    print_result(result, run.eval_json)
    if failed:
        lines = [f"  {t.metric} = {result[t.metric]:.6g} crosses {t}" for t in failed]
        raise CheckFailed("eval check failed (--fail-if):\n" + "\n".join(lines))
    return 0


def _with_format(recipe: Recipe, data_format: str | None) -> Recipe:
    if data_format is None or data_format == recipe.data.format:
        return recipe
    allowed = ("alpaca", "chat", "sharegpt", "text")
    if data_format not in allowed:
        raise UserError(f"--format: must be one of {', '.join(allowed)}, got {data_format!r}")
    recipe = recipe.model_copy(deep=True)
    recipe.data.format = data_format  # type: ignore[assignment]
    return recipe


def _data_paths(recipe: Recipe, split: str) -> Any:
    sources = recipe.data.eval_sources if split == "eval" and recipe.data.eval is not None else recipe.data.sources
    paths = [s.path for s in sources]
    return paths[0] if len(paths) == 1 else paths


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


# Scoring -------------------------------------------------------------------------------------------------------------

def score(model: Any, dataset: Any, tokenizer: Any, batch_size: int, device: Any, label: str = "eval") \
        -> dict[str, Any]:
    """loss (token-weighted mean over the whole set), perplexity = exp(loss), tokens, examples."""
    from ft_cli.data.pipeline import make_collator
    from ft_cli.progress import Reporter
    from ft_cli.scoring import token_loss

    packed = "position_ids" in dataset.column_names
    collate = make_collator(tokenizer, packed=packed)
    total = len(dataset)
    # A live bar on a terminal; on CI, a plain line per tenth of the set.
    reporter = Reporter(total, description=label, enabled=sys.stderr.isatty())
    done = [0]
    every = max(1, total // 10)

    def advance(rows: int) -> None:
        before, done[0] = done[0], done[0] + rows
        if reporter.tty:
            reporter.update(done[0])
        elif done[0] // every != before // every or done[0] == total:
            print(f"{label}: {done[0]}/{total} rows", file=sys.stderr, flush=True)

    try:
        loss_sum, tokens = token_loss(model, dataset, collate, batch_size, device=device, on_batch=advance)
    finally:
        reporter.close()
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
                    max_new_tokens: int, device: Any, batch_size: int, scored_rows: Any = None) -> dict[str, Any]:
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
    print(f"generating {len(prompts)} replies (greedy, at most {max_new_tokens} new tokens each)", file=sys.stderr,
          flush=True)
    predictions = greedy_generate(model, tokenizer, prompts, max_new_tokens=max_new_tokens, device=device,
                                  batch_size=batch_size, max_total=max(room, max(len(p) for p in prompts) + 1),
                                  on_batch=lambda done: print(f"generate: {done}/{len(prompts)}", file=sys.stderr,
                                                              flush=True))
    samples = [{"prompt": tokenizer.decode(p, skip_special_tokens=False), "reference": r, "prediction": g}
               for p, r, g in zip(prompts, references, predictions, strict=True)]
    return {**generation_metrics(predictions, references), "generated": len(pairs), "samples": samples}


def split_prompt(input_ids: Sequence[int], labels: Sequence[int]) -> tuple[list[int], list[int]] | None:
    """(prompt ids, reference ids): the reference is the last contiguous run of trained tokens, the prompt all
    before it; None when nothing precedes it (position 0 is never trained, so a 1-token "prompt" counts as none)."""
    end = len(labels)
    while end > 0 and labels[end - 1] == IGNORE:
        end -= 1
    start = end
    while start > 0 and labels[start - 1] != IGNORE:
        start -= 1
    if start <= 1 or end == 0:
        return None
    return list(input_ids[:start]), list(input_ids[start:end])


# Output --------------------------------------------------------------------------------------------------------------

def write_json(path: Path, data: dict[str, Any]) -> None:
    import json

    write_text_atomic(path, json.dumps(data, indent=2, default=str) + "\n")


def print_result(result: dict[str, Any], path: Path) -> None:
    from rich.console import Console
    from rich.table import Table

    compared = "base_loss" in result
    where = result["data"] if result["split"] is None else f"{result['split']} split of {result['data']}"
    table = Table(title=f"ft eval: {result['model']} on {where}")
    table.add_column("metric")
    table.add_column("run", justify="right")
    if compared:
        table.add_column("base", justify="right")
        table.add_column("delta (run - base)", justify="right")
    for name in ("loss", "perplexity"):
        row = [name, f"{result[name]:.4f}"]
        if compared:
            row += [f"{result['base_' + name]:.4f}", f"{result['delta_' + name]:+.4f}"]
        table.add_row(*row)
    for name in ("tokens", "examples"):
        table.add_row(name, f"{result[name]:,}", *([""] * 2 if compared else []))
    if "generated" in result:
        table.add_row("generated", str(result["generated"]), *([""] * 2 if compared else []))
        for name, scale in (("exact_match", "0-1"), ("rouge_l", "0-1"), ("bleu", "0-100"), ("chrf", "0-100")):
            table.add_row(f"{name} ({scale})", f"{result[name]:.4f}", *([""] * 2 if compared else []))
    console = Console(highlight=False)
    console.print(table)
    for failed in result.get("failed", []):
        console.print(f"[bold red]FAILED[/] --fail-if {failed}")
    console.print(f"wrote {path}")
