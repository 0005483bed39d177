"""`ft preprocess`: tokenize (and pack) a recipe's data once and save it, for `data.train: <that directory>` later."""

from __future__ import annotations

import json
import os
from pathlib import Path


def preprocess_to_disk(recipe_path: str | os.PathLike, overrides: list[str], out: Path, *,
                       overwrite: bool = False) -> None:
    """`ft preprocess`: a DatasetDict (train, and eval when there is one) saved at `out`, plus stats.json; written
    under a temporary name and renamed into place (an earlier preprocess output is replaced only with --overwrite)."""
    from rich.console import Console

    from ft_cli.data import cache
    from ft_cli.data.pipeline import build_datasets, bundle_meta, dataset_dict
    from ft_cli.data.saved import PREPROCESS_META
    from ft_cli.model import load_tokenizer
    from ft_cli.recipe import load_recipe, recipe_errors
    from ft_cli.run_dir import prepare_output_dir

    out_dir = prepare_output_dir(out, kind="preprocess", overwrite=overwrite)
    out = out_dir.path
    recipe = load_recipe(recipe_path, overrides)
    with recipe_errors(recipe):
        tokenizer = load_tokenizer(recipe)
        bundle = build_datasets(recipe, tokenizer)
    with out_dir.writing() as tmp, cache.quiet_datasets():
        dataset_dict(bundle).save_to_disk(str(tmp))  # into the empty temporary directory
        # What the rows were made with: a recipe that trains on them is checked against it (data/saved.py).
        meta = {**bundle_meta(bundle), "model": recipe.model.name_or_path,
                "tokenizer_vocab": cache.vocab_digest(tokenizer),
                "settings": recipe.data.model_dump(mode="json", include={
                    "format", "columns", "max_seq_len", "packing", "train_on_inputs", "truncation", "text_chunking",
                    "text_overlap", "chat_template", "system_message", "limit"})}
        (tmp / PREPROCESS_META).write_text(json.dumps(meta, indent=2))
    console = Console(highlight=False)
    s = bundle.train_stats
    packed = f", packed into {s.packed_rows} rows ({s.packing_efficiency:.1%} full)" if s.packed_rows else ""
    console.print(f"wrote {out}: train {s.rows} examples, {s.tokens:,} tokens "
                  f"({s.trained_tokens / max(s.tokens, 1):.1%} trained){packed}", markup=False)
    if bundle.eval_stats is not None and bundle.eval is not None:
        console.print(f"  eval {bundle.eval_stats.rows} examples, {bundle.eval_stats.tokens:,} tokens", markup=False)
    for w in bundle.warnings:
        console.print(f"warning: {w}", markup=False, style="yellow")
    for note in bundle.notes:
        console.print(f"note: {note}", markup=False)
