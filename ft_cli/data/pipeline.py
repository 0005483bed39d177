"""Entry points of the data pipeline: `build_datasets` (train/validate), `load_eval_data` (ft eval --data),
`preprocess_to_disk` (ft preprocess), and the collator and template helpers the training loop uses.

build_datasets: read every source -> records become Examples (formats) -> eval split per source (seeded) ->
mix training sources by weight (seeded) -> render, tokenize, mask, truncate (encode) -> pack the training
rows (packing) -> datasets.Dataset. The result is cached under a content hash (cache); with several processes
only the main one builds it while the others wait and then load it.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import sys
import uuid
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from ft_cli.data import cache
from ft_cli.data.encode import IGNORE, Encoded, EncodeSettings, encode_examples
from ft_cli.data.formats import Example, make_converter
from ft_cli.data.packing import gather_packed, pack_sequences, packing_efficiency
from ft_cli.data.sources import LoadedSource, data_files, load_source, mix_counts, sample_rows, split_eval
from ft_cli.data.templates import ChatRenderer, resolve_chat_template, template_warnings
from ft_cli.errors import UserError

if TYPE_CHECKING:
    import datasets

    from ft_cli.recipe import DatasetSource, Recipe

__all__ = ["DataStats", "DataBundle", "build_datasets", "make_collator", "load_eval_data", "preprocess_to_disk",
           "resolve_chat_template"]


def make_collator(tokenizer: Any, *, packed: bool, pad_to_multiple_of: int | None = None) -> Callable:
    """See ft_cli.data.collate (kept there so that importing this module does not import torch)."""
    from ft_cli.data.collate import make_collator as _make

    return _make(tokenizer, packed=packed, pad_to_multiple_of=pad_to_multiple_of)


@dataclass
class DataStats:
    """What happened to one split. rows_in = examples read (after mixing); rows = examples kept."""

    rows_in: int
    rows: int
    dropped_empty: int  # nothing to train on: no assistant answer, blank text
    dropped_too_long: int  # over max_seq_len with truncation: drop, or nothing trained left after truncating
    truncated: int  # kept, but cut to max_seq_len
    tokens: int
    trained_tokens: int  # tokens that carry loss
    packed_rows: int | None
    packing_efficiency: float | None  # tokens / (packed_rows * max_seq_len)
    max_seq_len: int = 0
    mean_length: float = 0.0
    max_length: int = 0
    length_histogram: list[list[int]] = field(default_factory=list)  # [lo, hi, examples] with lo <= length < hi
    padding_efficiency: float | None = None  # real / padded tokens for micro-batches in random order
    sources: list[dict[str, Any]] = field(default_factory=list)  # [{path, rows}] as mixed in
    split_documents: int = 0  # text documents over max_seq_len cut into chunks (data.text_chunking: split)
    text_chunks: int = 0  # the examples they became (counted in rows)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class DataBundle:
    train: datasets.Dataset
    eval: datasets.Dataset | None
    train_stats: DataStats
    eval_stats: DataStats | None
    fingerprint: str
    warnings: list[str] = field(default_factory=list)
    from_cache: bool = False


# build_datasets ----------------------------------------------------------------------------------------------

def build_datasets(recipe: Recipe, tokenizer: Any, *, main_process_first: Callable | None = None) -> DataBundle:
    d = recipe.data
    if d.chat_template:  # usually already done by load_tokenizer; idempotent
        resolve_chat_template(tokenizer, d.chat_template)
    with main_process_first() if main_process_first is not None else contextlib.nullcontext():
        bundle = _pretokenized_bundle(recipe, tokenizer)  # ft preprocess's output: used as is, never cached again
        if bundle is None:
            bundle = _tokenized_bundle(recipe, tokenizer)
    micro = recipe.train.micro_batch_size
    bundle.train_stats.padding_efficiency = _padding_efficiency(bundle.train, micro, recipe.train.seed)
    if bundle.eval is not None and bundle.eval_stats is not None:
        bundle.eval_stats.padding_efficiency = _padding_efficiency(
            bundle.eval, recipe.train.eval_batch_size or micro, recipe.train.seed)
    return bundle


def _tokenized_bundle(recipe: Recipe, tokenizer: Any) -> DataBundle:
    """Raw data tokenized, from the cache when data, tokenizer and settings are unchanged."""
    key = _cache_key(recipe, tokenizer)
    entry = cache.load_entry(key) if recipe.data.cache else None
    if entry is not None:
        return _bundle_from_cache(entry, key)
    bundle = _build(recipe, tokenizer, key)
    if recipe.data.cache:
        try:
            cache.save_entry(key, _dataset_dict(bundle), _meta(bundle))
        except OSError as exc:
            bundle.warnings.append(f"could not write the data cache ({exc}); set data.cache: false to silence this")
    return bundle


def _settings(recipe: Recipe) -> EncodeSettings:
    d = recipe.data
    return EncodeSettings(d.max_seq_len, d.truncation, d.train_on_inputs, d.text_chunking, d.text_overlap)


def _load(sources: list[DatasetSource], recipe: Recipe, field_name: str) -> list[LoadedSource]:
    d = recipe.data
    out = []
    for i, src in enumerate(sources):
        where = _where(recipe, field_name, i)
        convert = make_converter(src.format or d.format, src.columns if src.columns is not None else d.columns)
        loaded = load_source(src.path, src.split, convert, where)
        loaded.weight = src.weight
        if d.limit is not None:  # data.limit: the first N records of each source (ft train --smoke)
            loaded.examples = loaded.examples[:d.limit]
        if not loaded.examples:
            raise UserError(f"{where}: no records in {src.path}")
        out.append(loaded)
    return out


def _where(recipe: Recipe, field_name: str, i: int) -> str:
    """`data.train` for a single path, `data.train[i]` for source i of a list."""
    return field_name if isinstance(getattr(recipe.data, field_name.split(".")[1]), str) else f"{field_name}[{i}]"


def _build(recipe: Recipe, tokenizer: Any, key: str) -> DataBundle:
    d, seed = recipe.data, recipe.train.seed
    train_sources = _load(d.sources, recipe, "data.train")
    eval_examples: list[Example | None] = []
    eval_sources: list[dict[str, Any]] = []
    pools: list[list[Example | None]] = []
    warnings: list[str] = []
    for i, src in enumerate(train_sources):
        if d.eval is None:
            keep, held = split_eval(len(src.examples), d.val_split, seed + i)
            warnings += split_warnings(len(src.examples), len(held), d.val_split, src.label)
            eval_examples += [src.examples[j] for j in held]
            eval_sources.append({"path": src.label, "rows": len(held)})
            pools.append([src.examples[j] for j in keep])
        else:
            pools.append(src.examples)
    if d.eval is not None:
        for src in _load(d.eval_sources, recipe, "data.eval"):
            eval_examples += src.examples
            eval_sources.append({"path": src.label, "rows": len(src.examples)})
    counts = mix_counts([len(p) for p in pools], [s.weight for s in train_sources])
    rng = np.random.default_rng(seed)
    train_examples: list[Example | None] = []
    train_mix = []
    for pool, count, src in zip(pools, counts, train_sources, strict=True):
        train_examples += [pool[j] for j in sample_rows(len(pool), count, rng)]
        train_mix.append({"path": src.label, "rows": count, "available": len(pool), "weight": src.weight})

    settings = _settings(recipe)
    renderer = ChatRenderer(tokenizer) if any(ex is not None and ex.text is None for ex in train_examples) else None
    warnings += _check_template(tokenizer, renderer, train_examples)
    train_enc = _encode(train_examples, tokenizer, settings, renderer, "data.train")
    _require_rows(train_enc, "data.train", d.max_seq_len, d.truncation)
    train_stats = _stats(train_enc, d.max_seq_len, train_mix)
    if d.packing:
        rows = pack_sequences(train_enc.lengths, d.max_seq_len, seed)
        ids, labels, pos, row_lengths = gather_packed(train_enc.ids, train_enc.labels, train_enc.lengths, rows)
        train = _to_dataset(ids, labels, row_lengths, pos)
        train_stats.packed_rows = len(rows)
        train_stats.packing_efficiency = packing_efficiency(train_enc.lengths, len(rows), d.max_seq_len)
    else:
        train = _to_dataset(train_enc.ids, train_enc.labels, train_enc.lengths)

    eval_ds, eval_stats = None, None
    if eval_examples:
        eval_enc = _encode(eval_examples, tokenizer, settings, renderer, "data.eval")
        eval_stats = _stats(eval_enc, d.max_seq_len, eval_sources)
        if len(eval_enc.lengths):
            eval_ds = _to_dataset(eval_enc.ids, eval_enc.labels, eval_enc.lengths)
        else:
            warnings.append(f"every eval example was dropped ({_drop_summary(eval_enc, d.max_seq_len)}); "
                            "training runs without evaluation")
    return DataBundle(train, eval_ds, train_stats, eval_stats, key, warnings)


TOKENIZE_PROGRESS_MIN = 20_000  # examples: below this, tokenizing takes seconds and needs no progress display


def _encode(examples: list[Example | None], tokenizer: Any, settings: EncodeSettings,
            renderer: ChatRenderer | None, label: str) -> Encoded:
    """encode_examples, showing progress on big data (a bar on a terminal, a line per tenth in logs)."""
    live = sum(ex is not None for ex in examples)
    if live < TOKENIZE_PROGRESS_MIN:
        return encode_examples(examples, tokenizer, settings, renderer)
    from ft_cli.progress import CountProgress

    progress = CountProgress(live, f"tokenizing {label} (examples)")
    try:
        return encode_examples(examples, tokenizer, settings, renderer, on_chunk=progress.advance)
    finally:
        progress.close()


def split_warnings(n: int, n_eval: int, val_split: float, label: str, unit: str = "records") -> list[str]:
    """data.val_split holds out at least one row, so on a small dataset the eval share can be far more than asked
    for (1 of 3 rows is 33%), or nothing can be held out at all: say so."""
    if val_split <= 0:
        return []
    if n_eval == 0:
        return [f"data.val_split {val_split:g}: {label} has {n} {unit[:-1] if n == 1 else unit}, too few to hold "
                "any out; training runs without evaluation (set data.eval to evaluate)"]
    share = n_eval / n
    if share > 2 * val_split:
        return [f"data.val_split {val_split:g}: {label} has only {n} {unit}, so the eval split takes {n_eval} of "
                f"them ({share:.0%}, not {val_split:.0%}); add data or set data.eval"]
    return []


def _check_template(tokenizer: Any, renderer: ChatRenderer | None, examples: list[Example | None]) -> list[str]:
    """Once per run, on the first conversation: eos at the end of assistant turns (prefix consistency is checked
    on every conversation while encoding)."""
    if renderer is None:
        return []
    first = next((ex for ex in examples if ex is not None and ex.text is None), None)
    return template_warnings(tokenizer, renderer, first) if first is not None else []


def _require_rows(enc: Encoded, where: str, max_seq_len: int, truncation: str) -> None:
    if enc.rows_in == 0:
        raise UserError(f"{where}: the dataset is empty (0 records)")
    if len(enc.lengths) == 0:
        raise UserError(f"{where}: every example was dropped ({_drop_summary(enc, max_seq_len)}, "
                        f"truncation={truncation}); nothing is left to train on")


def _drop_summary(enc: Encoded, max_seq_len: int) -> str:
    return (f"{enc.rows_in} read: {enc.dropped_empty} with nothing to train on (no assistant answer or blank "
            f"text), {enc.dropped_too_long} too long for max_seq_len={max_seq_len}")


def _stats(enc: Encoded, max_seq_len: int, sources: list[dict[str, Any]]) -> DataStats:
    lengths = enc.lengths
    return DataStats(
        rows_in=enc.rows_in, rows=len(lengths), dropped_empty=enc.dropped_empty,
        dropped_too_long=enc.dropped_too_long, truncated=enc.truncated, tokens=int(lengths.sum()),
        trained_tokens=enc.trained_tokens, packed_rows=None, packing_efficiency=None, max_seq_len=max_seq_len,
        mean_length=float(lengths.mean()) if len(lengths) else 0.0, max_length=int(lengths.max(initial=0)),
        length_histogram=_histogram(lengths, max_seq_len), sources=sources, split_documents=enc.split_documents,
        text_chunks=enc.text_chunks)


def _histogram(lengths: np.ndarray, max_seq_len: int, bins: int = 10) -> list[list[int]]:
    edges = np.unique(np.linspace(0, max_seq_len, bins + 1).round().astype(np.int64))
    edges[-1] = max_seq_len + 1  # the last bin includes max_seq_len itself
    counts, _ = np.histogram(lengths, bins=edges)
    return [[int(lo), int(hi), int(c)] for lo, hi, c in zip(edges[:-1], edges[1:], counts, strict=True)]


def _padding_efficiency(ds: datasets.Dataset, batch_size: int, seed: int) -> float | None:
    import pyarrow.compute as pc

    lengths = np.asarray(pc.list_value_length(ds.data.column("input_ids")).to_numpy(), dtype=np.int64)
    if len(lengths) == 0:
        return None
    lengths = lengths[np.random.default_rng(seed).permutation(len(lengths))]
    pad = (-len(lengths)) % batch_size
    batches = np.concatenate([lengths, np.zeros(pad, np.int64)]).reshape(-1, batch_size)
    return float(lengths.sum() / (batches.max(axis=1) * batch_size).sum())


def _to_dataset(ids: np.ndarray, labels: np.ndarray, row_lengths: np.ndarray,
                position_ids: np.ndarray | None = None) -> datasets.Dataset:
    import datasets
    import pyarrow as pa
    from datasets.table import InMemoryTable

    offsets = np.concatenate([[0], np.cumsum(row_lengths)])
    big = offsets[-1] > np.iinfo(np.int32).max
    make = pa.LargeListArray.from_arrays if big else pa.ListArray.from_arrays
    off = pa.array(offsets.astype(np.int64 if big else np.int32))
    columns = {"input_ids": make(off, pa.array(ids)), "labels": make(off, pa.array(labels))}
    if position_ids is not None:
        columns["position_ids"] = make(off, pa.array(position_ids))
    return datasets.Dataset(InMemoryTable(pa.table(columns)))


# Pre-tokenized data (ft preprocess's output) -------------------------------------------------------------------

def _pretokenized(src: DatasetSource, where: str) -> tuple[Any, Path] | None:
    """(rows, directory) when the source is a saved dataset of input_ids/labels; None otherwise."""
    from ft_cli.data import saved

    p = Path(src.path).expanduser()
    if not (p.is_dir() and saved.saved_kind(p)):
        return None
    ds = saved.load_saved(p, src.split, where)
    return (ds, p) if saved.is_pretokenized(ds) else None


def _pretokenized_bundle(recipe: Recipe, tokenizer: Any) -> DataBundle | None:
    """The training (and eval) rows of a pre-tokenized data.train, checked against the recipe; None when data.train
    is raw data. Rows are used as saved; unpacked rows are packed when data.packing asks for it, and with no eval
    split saved and data.eval null, val_split of the rows is held out as for raw data."""
    from ft_cli.data import saved

    d = recipe.data
    found = [_pretokenized(s, _where(recipe, "data.train", i)) for i, s in enumerate(d.sources)]
    if not any(found):
        return None
    if len(found) > 1:
        raise UserError("data.train: a pre-tokenized dataset (input_ids, labels) must be the only training source; "
                        "mix the raw data sources instead and let ft tokenize them")
    ds, path = found[0]  # type: ignore[misc]
    meta = saved.preprocess_meta(path) or saved.preprocess_meta(path.parent)
    warnings = saved.check_pretokenized(ds, path, "data.train", tokenizer, meta)
    differences = saved.settings_differences(meta, recipe)
    if differences:
        warnings.append(f"{path} is pre-tokenized and used as it is; these recipe settings do not apply to it: "
                        + "; ".join(differences))
    eval_ds = None
    if d.eval is None:
        from datasets import DatasetDict, load_from_disk

        if saved.saved_kind(path) == "dict":
            with cache.quiet_datasets():
                whole = load_from_disk(str(path))
            eval_ds = whole["eval"] if isinstance(whole, DatasetDict) and "eval" in whole else None
        if eval_ds is None and d.val_split > 0:
            keep, held = split_eval(len(ds), d.val_split, recipe.train.seed)
            warnings += split_warnings(len(ds), len(held), d.val_split, str(path), unit="rows")
            ds, eval_ds = ds.select(keep), (ds.select(held) if len(held) else None)
    else:
        eval_ds, more = _eval_rows(recipe, tokenizer)
        warnings += more
    train = _fit_rows(ds, recipe, path, "data.train")
    train_stats = _stats_of_rows(train, d.max_seq_len, [{"path": str(path), "rows": len(train)}])
    if eval_ds is not None:
        eval_ds = _fit_rows(_unpack(eval_ds), recipe, path, "data.eval")
    eval_stats = _stats_of_rows(eval_ds, d.max_seq_len, []) if eval_ds is not None else None
    fingerprint = (meta or {}).get("fingerprint") or cache.make_key({"pretokenized": cache.files_digest(
        sorted(f for f in path.rglob("*") if f.is_file()))})
    return DataBundle(train, eval_ds, train_stats, eval_stats, fingerprint, warnings)


def _eval_rows(recipe: Recipe, tokenizer: Any) -> tuple[Any, list[str]]:
    """data.eval beside a pre-tokenized data.train: pre-tokenized too, or raw data tokenized here."""
    from ft_cli.data import saved

    d = recipe.data
    rows = [_pretokenized(s, _where(recipe, "data.eval", i)) for i, s in enumerate(d.eval_sources)]
    if any(rows):
        if len(rows) > 1:
            raise UserError("data.eval: a pre-tokenized dataset must be the only eval source")
        ds, path = rows[0]  # type: ignore[misc]
        meta = saved.preprocess_meta(path) or saved.preprocess_meta(path.parent)
        return ds, saved.check_pretokenized(ds, path, "data.eval", tokenizer, meta)
    examples = [ex for src in _load(d.eval_sources, recipe, "data.eval") for ex in src.examples]
    enc = encode_examples(examples, tokenizer, _settings(recipe))
    return (_to_dataset(enc.ids, enc.labels, enc.lengths) if len(enc.lengths) else None), []


def _flat(ds: Any) -> tuple[np.ndarray, ...]:
    """Flat numpy columns of tokenized rows: (ids, labels, position_ids or None, row lengths)."""
    import pyarrow.compute as pc

    def flat(name: str) -> np.ndarray:
        return pc.list_flatten(ds.data.column(name)).to_numpy()

    lengths = np.asarray(pc.list_value_length(ds.data.column("input_ids")).to_numpy(), dtype=np.int64)
    pos = flat("position_ids") if "position_ids" in ds.column_names else None
    return flat("input_ids"), flat("labels"), pos, lengths


def _unpack(ds: Any) -> Any:
    """Packed rows back into one row per example (evaluation scores examples unpacked)."""
    if "position_ids" not in ds.column_names:
        return ds
    ids, labels, pos, _ = _flat(ds)
    starts = np.flatnonzero(pos == 0)
    lengths = np.diff(np.append(starts, len(pos)))
    return _to_dataset(ids, labels, lengths)


def _fit_rows(ds: Any, recipe: Recipe, path: Path, where: str) -> Any:
    """Check the rows against max_seq_len and packing; pack unpacked training rows when data.packing is on."""
    d = recipe.data
    ids, labels, pos, lengths = _flat(ds)
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
        return _to_dataset(p_ids, p_labels, row_lengths, p_pos)
    return ds


def _stats_of_rows(ds: Any, max_seq_len: int, sources: list[dict[str, Any]]) -> DataStats:
    """DataStats of tokenized rows; for packed rows per example (where position_ids restart)."""
    ids, labels, pos, row_lengths = _flat(ds)
    lengths = np.diff(np.append(np.flatnonzero(pos == 0), len(pos))) if pos is not None else row_lengths
    packed = pos is not None
    return DataStats(
        rows_in=len(lengths), rows=len(lengths), dropped_empty=0, dropped_too_long=0, truncated=0,
        tokens=int(lengths.sum()), trained_tokens=int((labels != IGNORE).sum()),
        packed_rows=len(row_lengths) if packed else None,
        packing_efficiency=packing_efficiency(lengths, len(row_lengths), max_seq_len) if packed else None,
        max_seq_len=max_seq_len, mean_length=float(lengths.mean()) if len(lengths) else 0.0,
        max_length=int(lengths.max(initial=0)), length_histogram=_histogram(lengths, max_seq_len), sources=sources)


# Cache -----------------------------------------------------------------------------------------------------------

def _cache_key(recipe: Recipe, tokenizer: Any) -> str:
    d = recipe.data

    def describe(src: DatasetSource, where: str) -> dict[str, Any]:
        files = data_files(src.path, where)
        return {"path": src.path, "split": src.split, "format": src.format or d.format,
                "columns": src.columns if src.columns is not None else d.columns, "weight": src.weight,
                "files": cache.files_digest(files) if files is not None else None}

    return cache.make_key({
        "train": [describe(s, _where(recipe, "data.train", i)) for i, s in enumerate(d.sources)],
        "eval": ([describe(s, _where(recipe, "data.eval", i)) for i, s in enumerate(d.eval_sources)]
                 if d.eval is not None else None),
        "tokenizer": cache.tokenizer_digest(tokenizer),
        "settings": {k: getattr(d, k) for k in ("format", "columns", "val_split", "max_seq_len", "truncation",
                                                "packing", "train_on_inputs", "limit", "text_chunking",
                                                "text_overlap")},
        "seed": recipe.train.seed,
    })


def _dataset_dict(bundle: DataBundle) -> Any:
    from datasets import DatasetDict

    splits = {"train": bundle.train}
    if bundle.eval is not None:
        splits["eval"] = bundle.eval
    return DatasetDict(splits)


def _meta(bundle: DataBundle) -> dict[str, Any]:
    return {"fingerprint": bundle.fingerprint, "warnings": bundle.warnings,
            "train_stats": bundle.train_stats.to_dict(),
            "eval_stats": bundle.eval_stats.to_dict() if bundle.eval_stats else None}


def _bundle_from_cache(entry: tuple[Any, dict[str, Any]], key: str) -> DataBundle:
    dsd, meta = entry
    eval_stats = DataStats(**meta["eval_stats"]) if meta["eval_stats"] else None
    return DataBundle(dsd["train"], dsd["eval"] if "eval" in dsd else None, DataStats(**meta["train_stats"]),
                      eval_stats, key, list(meta["warnings"]), from_cache=True)


# ft eval --data, ft preprocess ---------------------------------------------------------------------------------

def load_eval_data(path: str | os.PathLike, recipe: Recipe, tokenizer: Any) -> datasets.Dataset:
    """`path` in the recipe's format and columns, masked as in training, never packed."""
    from ft_cli.recipe import DatasetSource

    d = recipe.data
    if d.chat_template:
        resolve_chat_template(tokenizer, d.chat_template)
    rows = _pretokenized(DatasetSource(path=str(path)), "--data")
    if rows is not None:  # ft preprocess's output
        from ft_cli.data import saved

        ds, where = rows
        meta = saved.preprocess_meta(where) or saved.preprocess_meta(where.parent)
        for w in saved.check_pretokenized(ds, where, "--data", tokenizer, meta):
            print(f"warning: {w}", file=sys.stderr)
        return _unpack(ds)
    convert = make_converter(d.format, d.columns)
    src = load_source(str(path), None, convert, "--data")
    enc = encode_examples(src.examples, tokenizer, _settings(recipe))
    _require_rows(enc, f"--data {path}", d.max_seq_len, d.truncation)
    return _to_dataset(enc.ids, enc.labels, enc.lengths)


def preprocess_to_disk(recipe_path: str | os.PathLike, overrides: list[str], out: Path) -> None:
    """`ft preprocess`: a DatasetDict (train, and eval when there is one) saved at `out`, plus stats.json."""
    import json

    from rich.console import Console

    from ft_cli.data.saved import PREPROCESS_META
    from ft_cli.model import load_tokenizer
    from ft_cli.recipe import load_recipe, recipe_errors

    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise UserError(f"--out {out}: already exists and is not empty; choose a new directory or remove it")
    recipe = load_recipe(recipe_path, overrides)
    with recipe_errors(recipe):
        tokenizer = load_tokenizer(recipe)
        bundle = build_datasets(recipe, tokenizer)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.tmp-{uuid.uuid4().hex[:8]}"
    try:
        with cache.quiet_datasets():
            _dataset_dict(bundle).save_to_disk(str(tmp))
        # What the rows were made with: a recipe that trains on them is checked against it (data/saved.py).
        meta = {**_meta(bundle), "model": recipe.model.name_or_path,
                "tokenizer_vocab": cache.vocab_digest(tokenizer),
                "settings": recipe.data.model_dump(mode="json", include={
                    "format", "columns", "max_seq_len", "packing", "train_on_inputs", "truncation", "text_chunking",
                    "text_overlap", "chat_template", "limit"})}
        (tmp / PREPROCESS_META).write_text(json.dumps(meta, indent=2))
        if out.exists():
            out.rmdir()  # empty, checked above
        os.rename(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    console = Console(highlight=False)
    s = bundle.train_stats
    packed = f", packed into {s.packed_rows} rows ({s.packing_efficiency:.1%} full)" if s.packed_rows else ""
    console.print(f"wrote {out}: train {s.rows} examples, {s.tokens:,} tokens "
                  f"({s.trained_tokens / max(s.tokens, 1):.1%} trained){packed}", markup=False)
    if bundle.eval_stats is not None and bundle.eval is not None:
        console.print(f"  eval {bundle.eval_stats.rows} examples, {bundle.eval_stats.tokens:,} tokens", markup=False)
    for w in bundle.warnings:
        console.print(f"warning: {w}", markup=False, style="yellow")
