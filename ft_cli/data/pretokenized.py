"""ft preprocess's output (or other pre-tokenized rows saved with save_to_disk) as the training data: the rows are
used as they are, after the checks in data/saved.py; they are never tokenized or cached again."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from ft_cli.data.cache import files_digest, make_key
from ft_cli.data.packing import gather_packed, pack_sequences
from ft_cli.data.rows import DataBundle, flat_columns, stats_of_rows, to_dataset, unpack_rows
from ft_cli.data.saved import (
    check_pretokenized,
    is_pretokenized,
    load_saved,
    preprocess_meta,
    saved_kind,
    settings_differences,
)
from ft_cli.data.sources import split_eval, split_warnings
from ft_cli.errors import UserError


def source_field(recipe: Any, field_name: str, i: int) -> str:
    """`data.train` for a single path, `data.train[i]` for source i of a list (for messages)."""
    return field_name if isinstance(getattr(recipe.data, field_name.split(".")[1]), str) else f"{field_name}[{i}]"


def pretokenized_source(path: str, split: str | None, where: str) -> tuple[Any, Path] | None:
    """(rows, directory) when `path` is a saved dataset of input_ids/labels; None otherwise."""
    p = Path(path).expanduser()
    if not (p.is_dir() and saved_kind(p)):
        return None
    ds = load_saved(p, split, where)
    return (ds, p) if is_pretokenized(ds) else None


def _pretokenized(src: Any, where: str) -> tuple[Any, Path] | None:
    return pretokenized_source(src.path, src.split, where)


def pretokenized_bundle(recipe: Any, tokenizer: Any, raw_eval: Callable[[], Any]) -> DataBundle | None:
    """The training (and eval) rows of a pre-tokenized data.train, checked against the recipe; None when data.train
    is raw data. Rows are used as saved; unpacked rows are packed when data.packing asks for it, and with no eval
    split saved and data.eval null, val_split of the rows is held out as for raw data. `raw_eval()` tokenizes a
    raw data.eval (the pipeline's job)."""
    d = recipe.data
    found = [_pretokenized(s, source_field(recipe, "data.train", i)) for i, s in enumerate(d.sources)]
    if not any(found):
        return None
    if len(found) > 1:  # one pre-tokenized source among others
        raise UserError("data.train: a pre-tokenized dataset (input_ids, labels) must be the only training source; "
                        "mix the raw data sources instead and let ft tokenize them")
    ds, path = found[0]  # type: ignore[misc]
    meta = preprocess_meta(path) or preprocess_meta(path.parent)
    warnings = check_pretokenized(ds, path, "data.train", tokenizer, meta)
    differences = settings_differences(meta, recipe)
    if differences:
        warnings.append(f"{path} is pre-tokenized and used as it is; these recipe settings do not apply to it: "
                        + "; ".join(differences))
    eval_ds = None
    if d.eval is None:
        if saved_kind(path) == "dict" and (path / "eval").is_dir():  # ft preprocess's eval split
            eval_ds = load_saved(path, "eval", "data.train")
        if eval_ds is None and d.val_split > 0:
            keep, held = split_eval(len(ds), d.val_split, recipe.train.seed)
            warnings += split_warnings(len(ds), len(held), d.val_split, str(path), unit="rows")
            ds, eval_ds = ds.select(keep), (ds.select(held) if len(held) else None)
    else:
        eval_ds, more = _eval_rows(recipe, tokenizer, raw_eval)
        warnings += more
    train = fit_rows(ds, recipe, path, "data.train")
    train_stats = stats_of_rows(train, d.max_seq_len, [{"path": str(path), "rows": len(train)}])
    if eval_ds is not None:
        eval_ds = fit_rows(unpack_rows(eval_ds), recipe, path, "data.eval")
    eval_stats = stats_of_rows(eval_ds, d.max_seq_len, []) if eval_ds is not None else None
    fingerprint = (meta or {}).get("fingerprint") or make_key({"pretokenized": files_digest(
        sorted(f for f in path.rglob("*") if f.is_file()))})
    return DataBundle(train, eval_ds, train_stats, eval_stats, fingerprint, warnings)


def _eval_rows(recipe: Any, tokenizer: Any, raw_eval: Callable[[], Any]) -> tuple[Any, list[str]]:
    """data.eval beside a pre-tokenized data.train: pre-tokenized too, or raw data the pipeline tokenizes."""
    d = recipe.data
    rows = [_pretokenized(s, source_field(recipe, "data.eval", i)) for i, s in enumerate(d.eval_sources)]
    if any(rows):
        if len(rows) > 1:
            raise UserError("data.eval: a pre-tokenized dataset must be the only eval source")
        ds, path = rows[0]  # type: ignore[misc]
        meta = preprocess_meta(path) or preprocess_meta(path.parent)
        return ds, check_pretokenized(ds, path, "data.eval", tokenizer, meta)
    return raw_eval(), []


def fit_rows(ds: Any, recipe: Any, path: Path, where: str) -> Any:
    """Check the rows against max_seq_len and packing; pack unpacked training rows when data.packing is on."""
    d = recipe.data
    ids, labels, pos, lengths = flat_columns(ds)
    if len(lengths) and int(lengths.max()) > d.max_seq_len:
        raise UserError(f"data.max_seq_len: {d.max_seq_len} is shorter than the rows of {path} (the longest has "
                        f"{int(lengths.max())} tokens); raise it, or run ft preprocess with this max_seq_len")
    if where != "data.train":
        return ds
    if pos is not None and not d.packing:
        raise UserError(f"data.packing: {path} holds packed rows (position_ids); set data.packing: true to train on "
                        "them, or run ft preprocess with packing: false")
    if pos is None and d.packing:
        rows = pack_sequences(lengths, d.max_seq_len, recipe.train.seed)
        p_ids, p_labels, p_pos, row_lengths = gather_packed(ids, labels, lengths, rows)
        return to_dataset(p_ids, p_labels, row_lengths, p_pos)
    return ds
