"""Datasets saved with `datasets.save_to_disk` as data sources.

A saved `Dataset` or `DatasetDict` directory is read with `datasets.load_from_disk`, not as a folder of files
(its dataset_info.json is metadata, not records). What it holds decides what happens:

- records in any format (alpaca, chat, sharegpt, text columns): converted and tokenized like a file's records;
  of a DatasetDict, the source's `split` is used (default: train, or the only split there is);
- pre-tokenized rows (`input_ids`, `labels`, and `position_ids` when packed), as `ft preprocess` writes them:
  used as they are (data/pretokenized.py). ft preprocess records the tokenizer's fingerprint beside them
  (stats.json), and training refuses the rows when the recipe's tokenizer has a different vocabulary (the ids
  would mean other tokens). Rows from elsewhere, without that record, are checked only for ids inside the
  vocabulary, with a warning.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from ft_cli.data.formats import Origin
from ft_cli.errors import UserError

PRETOKENIZED_COLUMNS = ("input_ids", "labels")
PREPROCESS_META = "stats.json"  # ft preprocess writes it next to dataset_dict.json
DEFAULT_SPLIT = "train"


def saved_kind(path: Path) -> str | None:
    """"dict" for a saved DatasetDict, "dataset" for a saved Dataset, None for anything else."""
    if (path / "dataset_dict.json").is_file():
        return "dict"
    if (path / "state.json").is_file() and (path / "dataset_info.json").is_file():
        return "dataset"
    return None


def load_saved(path: Path, split: str | None, where: str) -> Any:
    """The `datasets.Dataset` of a saved directory (one split of a DatasetDict)."""
    from datasets import DatasetDict, load_from_disk

    from ft_cli.data.cache import quiet_datasets

    try:
        with quiet_datasets():
            ds = load_from_disk(str(path))
    except Exception as exc:  # a damaged or partly copied directory: datasets raises several types
        raise UserError(f"{where}: cannot read the dataset saved at {path} ({type(exc).__name__}: {exc})") from None
    if isinstance(ds, DatasetDict):
        splits = list(ds)
        if split is None and DEFAULT_SPLIT not in ds and len(splits) == 1:
            split = splits[0]
        name = split or DEFAULT_SPLIT
        if name not in ds:
            raise UserError(f"{where}: {path} has no split {name!r} (splits: {', '.join(splits)}); choose one with "
                            "split: in a data source")
        return ds[name]
    if split not in (None, DEFAULT_SPLIT):
        raise UserError(f"{where}: {path} is a single saved Dataset, it has no split {split!r}")
    return ds


def is_pretokenized(ds: Any) -> bool:
    return "input_ids" in ds.column_names


def records(ds: Any, label: str) -> Iterator[tuple[dict[str, Any], Origin]]:
    for i, record in enumerate(ds):
        yield record, Origin(label, i)


def preprocess_meta(path: Path) -> dict[str, Any] | None:
    """What ft preprocess recorded about the rows at `path` (tokenizer, settings, stats); None when absent."""
    meta_file = path / PREPROCESS_META
    if not meta_file.is_file():
        return None
    try:
        meta = json.loads(meta_file.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return meta if isinstance(meta, dict) else None


def check_pretokenized(ds: Any, path: Path, where: str, tokenizer: Any, meta: dict[str, Any] | None) -> list[str]:
    """Refuse rows this recipe cannot train on as they are; returns warnings about what cannot be checked."""
    import pyarrow.compute as pc

    from ft_cli.data.cache import vocab_digest

    missing = [c for c in PRETOKENIZED_COLUMNS if c not in ds.column_names]
    if missing:
        raise UserError(f"{where}: {path} holds input_ids but no {', '.join(missing)} column; pre-tokenized data "
                        "needs labels too (-100 where a token carries no loss), as ft preprocess writes it")
    warnings: list[str] = []
    recorded = (meta or {}).get("tokenizer_vocab")
    if recorded is not None:
        if recorded != vocab_digest(tokenizer):
            made_with = (meta or {}).get("model") or "another tokenizer"
            raise UserError(f"{where}: {path} was tokenized with a different tokenizer ({made_with}) than this "
                            "recipe's model; its token ids would mean other tokens. Run ft preprocess again with "
                            "this recipe, or point data.train at the raw data")
    else:
        warnings.append(f"{path}: pre-tokenized rows without ft preprocess's record of their tokenizer "
                        f"({PREPROCESS_META}); ft can only check that the ids fit the vocabulary")
    if len(ds):
        top = pc.max(pc.list_flatten(ds.data.column("input_ids"))).as_py()
        if top is not None and top >= len(tokenizer):
            raise UserError(f"{where}: {path} holds token id {top}, but the recipe's tokenizer has {len(tokenizer)} "
                            "tokens; the data was tokenized for another model")
    return warnings


def settings_differences(meta: dict[str, Any] | None, recipe: Any) -> list[str]:
    """Recipe data settings that would have produced other tokens than the saved ones (which are used as is)."""
    saved = (meta or {}).get("settings") or {}
    out = []
    for key in ("format", "columns", "train_on_inputs", "truncation", "text_chunking", "text_overlap",
                "chat_template", "limit"):
        if key in saved and saved[key] != getattr(recipe.data, key):
            out.append(f"data.{key}: {getattr(recipe.data, key)!r} here, {saved[key]!r} when preprocessed")
    return out
