"""The `ft` command line. One function per command; each parses, calls one library function, and maps
errors to exit codes (0 ok, 2 the user's fault, 1 a bug). Heavy imports (torch, transformers) happen inside
the commands so that `ft --help` stays instant.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any

import typer

from ft_cli.errors import FtExit

app = typer.Typer(
    name="ft",
    help="Fine-tune large language models from validated YAML recipes (LoRA, QLoRA, full and more).",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
)

RecipeArg = Annotated[Path, typer.Argument(help="Recipe YAML file.", show_default=False)]
SetOpt = Annotated[
    list[str] | None,
    typer.Option("--set", help="Override a recipe value with a dotted key, e.g. --set train.lr=1e-4 (repeatable)."),
]
RunDirArg = Annotated[Path, typer.Argument(help="A run directory written by ft train.", show_default=False)]
OverwriteOpt = Annotated[
    bool, typer.Option("--overwrite", help="Replace an earlier output of this command at --out (only one ft wrote; "
                       "it says what it removes).")
]


def _guard(fn: Callable[[], Any]) -> Any:
    """Run a command body: a UserError becomes one message on stderr and exit code 2 (see ft_cli.errors)."""
    try:
        return fn()
    except FtExit as exc:
        prefix = "error: " if exc.exit_code == 2 else ""
        typer.echo(f"{prefix}{exc.message}", err=True)
        raise typer.Exit(code=exc.exit_code) from None


@app.command()
def train(
    recipe: RecipeArg,
    set_: SetOpt = None,
    output_dir: Annotated[Path | None, typer.Option("--output-dir", help="Run directory (overrides the recipe).")] = None,
    resume: Annotated[bool, typer.Option("--resume", help="Continue from the newest whole checkpoint.")] = False,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace an earlier run in the run directory (only "
                                            "a directory ft wrote; it says what it removes).")] = False,
    smoke: Annotated[
        bool, typer.Option("--smoke", help="Same recipe on a tiny offline model of the same family, a few steps.")
    ] = False,
) -> None:
    """Train a model from a recipe and write the run directory (adapter, metrics, checkpoints)."""
    from ft_cli.train import train_from_recipe

    _guard(lambda: train_from_recipe(recipe, set_ or [], output_dir=output_dir, resume=resume,
                                     overwrite=overwrite, smoke=smoke))


@app.command()
def validate(
    recipe: RecipeArg,
    set_: SetOpt = None,
    show: Annotated[int, typer.Option("--show", help="Print N rendered samples with trained tokens highlighted.")] = 0,
    no_data: Annotated[bool, typer.Option("--no-data", help="Check the recipe only; skip loading model and data.")] = False,
) -> None:
    """Check a recipe and its data without training: resolved recipe, derived values, dataset audit."""
    from ft_cli.validate import validate_recipe

    _guard(lambda: validate_recipe(recipe, set_ or [], show=show, check_data=not no_data))


@app.command()
def preprocess(
    recipe: RecipeArg,
    out: Annotated[Path, typer.Option("--out", help="Directory for the tokenized dataset (save_to_disk).")],
    set_: SetOpt = None,
    overwrite: OverwriteOpt = False,
) -> None:
    """Tokenize, mask and pack the data exactly as train would, and save it with datasets.save_to_disk."""
    from ft_cli.preprocess import preprocess_to_disk

    _guard(lambda: preprocess_to_disk(recipe, set_ or [], out, overwrite=overwrite))


WhichOpt = Annotated[
    str, typer.Option("--which", help="final: adapter/ or model/ (the last step); best: best/ (best eval_loss).")
]


TargetArg = Annotated[str, typer.Argument(
    help="A run directory (written by ft train), a model directory (e.g. ft merge's output) or a hub model id.",
    show_default=False)]


@app.command(name="eval")
def eval_(
    run_dir: TargetArg,
    data: Annotated[Path | None, typer.Option("--data", help="Evaluate on this data (any supported format).")] = None,
    data_format: Annotated[
        str | None, typer.Option("--format", help="Format of --data (default: the recipe's data.format).")
    ] = None,
    split: Annotated[str, typer.Option("--split", help="Which split of the run to evaluate: eval or train.")] = "eval",
    which: WhichOpt = "final",
    compare_base: Annotated[bool, typer.Option(
        "--compare-base", help="Also score the base model (its loss, and its replies with --generate).")] = False,
    generate: Annotated[int, typer.Option("--generate", help="Generate for N examples and score them.")] = 0,
    max_new_tokens: Annotated[int, typer.Option("--max-new-tokens", min=1, help="Per --generate reply.")] = 256,
    fail_if: Annotated[
        list[str] | None, typer.Option("--fail-if", help="Exit 3 if a metric crosses a threshold, e.g. "
                                       "'perplexity>12' (repeatable; > >= < <= ==; names as in eval.json).")
    ] = None,
    batch_size: Annotated[int, typer.Option("--batch-size", min=1, help="Rows per forward pass.")] = 8,
    name: Annotated[str | None, typer.Option(
        "--name", help="Write RUN_DIR/eval-NAME.json (default: named after --data, --split and --which).")] = None,
    output: Annotated[Path | None, typer.Option(
        "--output", help="Write the result to this JSON file instead (needed to keep results of hub models).")] = None,
) -> None:
    """Evaluate a run, a model directory or a hub model: token-weighted loss and perplexity (and generation
    metrics). A run's own eval split goes to RUN_DIR/eval.json, any other evaluation to RUN_DIR/eval-NAME.json."""
    from ft_cli.evaluate import evaluate_run

    code = _guard(lambda: evaluate_run(run_dir, data=data, split=split, compare_base=compare_base,
                                       generate=generate, fail_if=fail_if or [], batch_size=batch_size,
                                       which=which, data_format=data_format, max_new_tokens=max_new_tokens,
                                       name=name, output=output))
    if code:
        raise typer.Exit(code=code)


@app.command()
def predict(
    run_dir: TargetArg,
    data: Annotated[Path, typer.Option("--data", help="Texts to classify: a .csv/.tsv/.json/.jsonl/.parquet file in "
                                       "the run's columns (a label column is optional).", show_default=False)],
    out: Annotated[Path, typer.Option("--out", help="Where to write the predictions (JSON lines).",
                                      show_default=False)],
    which: WhichOpt = "final",
    batch_size: Annotated[int, typer.Option("--batch-size", min=1, help="Rows per forward pass.")] = 32,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace an existing --out file.")] = False,
) -> None:
    """Label every text of --data with a classification run: one JSON line per record (label, score, the
    probability of every label); reports examples/s and peak memory."""
    from ft_cli.tasks.classify_run import predict as run_predict

    _guard(lambda: run_predict(run_dir, data=data, out=out, which=which, batch_size=batch_size, overwrite=overwrite))


@app.command()
def merge(
    run_dirs: Annotated[list[Path], typer.Argument(
        help="A run directory; several with --combine.", show_default=False)],
    out: Annotated[Path, typer.Option("--out", help="Directory for the merged model (or combined adapter).")],
    force: Annotated[bool, typer.Option("--force", help="Write the merge even if the parity check fails.")] = False,
    dtype: Annotated[str | None, typer.Option(
        "--dtype", help="Output dtype: bfloat16, float16 or float32 (default: the recipe's model.dtype).")] = None,
    combine: Annotated[str | None, typer.Option(
        "--combine", help="Combine the runs' LoRA adapters into one adapter: linear, cat, ties or dare_ties "
                          "(peft add_weighted_adapter).")] = None,
    weights: Annotated[str | None, typer.Option(
        "--weights", help="With --combine: one weight per run, e.g. 0.6,0.4 (default: equal, summing to 1).")] = None,
    density: Annotated[float | None, typer.Option(
        "--density", help="With --combine ties/dare_ties: fraction of each update kept (default 0.5).")] = None,
    seed: Annotated[int, typer.Option("--seed", help="With --combine dare_ties: seed of the random drop.")] = 0,
    overwrite: OverwriteOpt = False,
) -> None:
    """Merge the adapter into a copy of the base model in the recipe's dtype (16-bit for bfloat16/float16 runs;
    --dtype to choose) and check merged vs adapter logits; or, with --combine, combine several runs' LoRA
    adapters into one adapter."""
    from ft_cli.merge import merge_cli

    _guard(lambda: merge_cli(run_dirs, out, force=force, dtype=dtype, combine=combine, weights=weights,
                             density=density, seed=seed, overwrite=overwrite))


def _top_p_in_range(value: float) -> float:
    if not 0 < value <= 1:
        raise typer.BadParameter(f"must be in (0, 1] (0 < P <= 1), got {value:g}")
    return value


@app.command()
def export(
    run_dir: RunDirArg,
    format_: Annotated[str, typer.Option(
        "--format", help="int8 | int8-dynamic | int8-dynamic-int4 | int4 (transformers loads them as is) | gguf-f16 | gguf-q8_0 | "
        "gguf-q4_k_m (llama.cpp).", show_default=False)],
    out: Annotated[Path, typer.Option("--out", help="Directory for the export (new or empty).", show_default=False)],
    max_ppl_increase: Annotated[str, typer.Option(
        "--max-ppl-increase", help="Refuse (exit 3, nothing written) when eval perplexity rises more than this "
        "over the 16-bit model, e.g. 5%.")] = "10%",
    force: Annotated[bool, typer.Option("--force", help="Write the export even if the quality check fails.")] = False,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace an earlier ft export at --out.")] = False,
    eval_rows: Annotated[int, typer.Option("--eval-rows", min=1, help="Eval rows the quality check scores.")] = 256,
    bench_tokens: Annotated[int, typer.Option(
        "--bench-tokens", min=1, help="Tokens each prompt of the speed workload generates.")] = 32,
) -> None:
    """Quantize a run's merged model for deployment and check size, quality and speed against the 16-bit model."""
    from ft_cli.export import export_run

    _guard(lambda: export_run(run_dir, out, format_, max_ppl_increase=max_ppl_increase, force=force,
                              overwrite=overwrite, eval_rows=eval_rows, bench_tokens=bench_tokens))


@app.command()
def generate(
    target: TargetArg,
    prompt: Annotated[str, typer.Option("--prompt", "-p", help="The user message.")],
    system: Annotated[str | None, typer.Option("--system", help="An optional system message.")] = None,
    max_new_tokens: Annotated[int, typer.Option("--max-new-tokens", min=1)] = 256,
    temperature: Annotated[float, typer.Option("--temperature", min=0.0, help="0 = greedy.")] = 0.7,
    top_p: Annotated[float, typer.Option(
        "--top-p", callback=_top_p_in_range,
        help="Nucleus sampling: sample from the most likely tokens whose probabilities add up to P; "
             "0 < P <= 1 (1: all tokens).")] = 0.9,
    seed: Annotated[int | None, typer.Option("--seed", help="Seed for sampling.")] = None,
    which: WhichOpt = "final",
    raw: Annotated[bool | None, typer.Option(
        "--raw/--chat", help="--raw: continue the prompt as plain text, no chat template (the default for runs "
        "trained on format text); --chat: use the chat template (the default otherwise).",
        show_default=False)] = None,
) -> None:
    """Generate a reply with the fine-tuned model, using its chat template (or --raw); streams tokens to stdout."""
    from ft_cli.generate import generate_cli

    _guard(lambda: generate_cli(target, prompt, system=system, max_new_tokens=max_new_tokens,
                                temperature=temperature, top_p=top_p, seed=seed, which=which, raw=raw))


@app.command()
def serve(
    base_or_run: Annotated[str, typer.Argument(
        help="A run directory (its base, and its adapter named after the directory), a model directory, "
             "builtin:NAME or a hub id.", show_default=False)],
    adapter: Annotated[list[str] | None, typer.Option(
        "--adapter", help="NAME=RUN_DIR: serve this run's adapter as model NAME on the same base (repeatable).")] = None,
    host: Annotated[str, typer.Option("--host", help="Address to bind; the default answers this machine only.")]
        = "127.0.0.1",
    port: Annotated[int, typer.Option("--port")] = 8000,
    api_key: Annotated[str | None, typer.Option(
        "--api-key", envvar="FT_API_KEY", show_envvar=True,
        help="Require Authorization: Bearer KEY on every request (prefer the env var: argv is visible in ps).")]
        = None,
    engine: Annotated[str, typer.Option(
        "--engine", help="transformers (in ft) or vllm (vLLM's OpenAI server, for GPUs and many users).")]
        = "transformers",
    which: WhichOpt = "final",
    print_command: Annotated[bool, typer.Option(
        "--print-command", help="With --engine vllm: print the vLLM command instead of running it.")] = False,
    max_batch: Annotated[int, typer.Option(
        "--max-batch", help="Decode up to N queued requests for one adapter together (faster; replies may differ "
                            "from ft generate's in the last bits). 1: one at a time, exactly ft generate's.")] = 1,
) -> None:
    """Serve a base model and adapters over an OpenAI-compatible HTTP API; the request's model picks the adapter."""
    from ft_cli.serve import serve_cli

    _guard(lambda: serve_cli(base_or_run, adapter or [], host=host, port=port, api_key=api_key, engine=engine,
                             which=which, print_command=print_command, max_batch=max_batch))


@app.command()
def report(run_dir: RunDirArg) -> None:
    """Plot loss, eval loss and learning rate, and write a summary of the run into RUN_DIR."""
    from ft_cli.report import write_report

    _guard(lambda: write_report(run_dir))


@app.command()
def schema(
    markdown: Annotated[
        bool, typer.Option("--markdown", help="Print the Markdown reference of every key (docs/recipe.md) instead.")
    ] = False,
) -> None:
    """Print the recipe's JSON Schema (for editor completion)."""
    if markdown:
        from ft_cli.schema_docs import render_recipe_docs

        typer.echo(render_recipe_docs(), nl=False)
        return
    import json

    from ft_cli.recipe import recipe_json_schema

    typer.echo(json.dumps(recipe_json_schema(), indent=2))


@app.command()
def plan(
    recipe: RecipeArg,
    set_: SetOpt = None,
    gpu_memory: Annotated[
        float | None, typer.Option("--gpu-memory", help="GPU memory in GiB to suggest a micro-batch for.")
    ] = None,
) -> None:
    """Estimate peak memory of a recipe before training (weights, adapter, optimizer, activations)."""
    from ft_cli.plan import plan_recipe

    _guard(lambda: plan_recipe(recipe, set_ or [], gpu_memory=gpu_memory))


cache_app = typer.Typer(
    help="ft's caches (tokenized data, built-in models) under $FT_CACHE_DIR, default ~/.cache/ft: list, size, clean.",
    no_args_is_help=True)
app.add_typer(cache_app, name="cache")
CacheKindOpt = Annotated[list[str] | None, typer.Option(
    "--kind", help="Only entries of this kind: data, reference, builtin or leftover (repeatable; default: all).")]


@cache_app.command("list")
def cache_list() -> None:
    """Every entry ft keeps in its cache: kind, size, last use, what it holds."""
    from ft_cli.caches import list_cache

    _guard(list_cache)


@cache_app.command("size")
def cache_size() -> None:
    """How much disk ft's cache takes, per kind."""
    from ft_cli.caches import cache_size as size

    _guard(size)


@cache_app.command("clean")
def cache_clean(
    kind: CacheKindOpt = None,
    older_than: Annotated[float | None, typer.Option(
        "--older-than", help="Only entries not used for this many days.")] = None,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Say what would be deleted; delete nothing.")] = False,
) -> None:
    """Delete cache entries ft wrote (never anything else); they are rebuilt when needed."""
    from ft_cli.caches import clean_cache

    _guard(lambda: clean_cache(kinds=kind or None, older_than_days=older_than, dry_run=dry_run))


@app.command()
def doctor() -> None:
    """Report library versions, the GPU and what the environment supports."""
    from ft_cli.doctor import run_doctor

    _guard(run_doctor)


@app.callback(invoke_without_command=True)
def _root(
    version: Annotated[bool, typer.Option("--version", help="Print the version and exit.")] = False,
) -> None:
    if version:
        from ft_cli import __version__

        typer.echo(f"ft {__version__}")
        raise typer.Exit()


def quiet_libraries() -> None:
    """ft shows its own progress; the libraries' per-file progress bars and deprecation notices are noise to a
    user (they go to the developers of ft). Set before those libraries are imported; the user's settings win."""
    import os
    import warnings

    for var, value in (("HF_HUB_DISABLE_PROGRESS_BARS", "1"), ("HF_DATASETS_DISABLE_PROGRESS_BARS", "1"),
                       ("TRANSFORMERS_VERBOSITY", "error"), ("TOKENIZERS_PARALLELISM", "false")):
        os.environ.setdefault(var, value)
    warnings.filterwarnings("ignore", category=FutureWarning)


def main() -> None:
    quiet_libraries()
    app(prog_name="ft")


if __name__ == "__main__":
    sys.exit(main())
