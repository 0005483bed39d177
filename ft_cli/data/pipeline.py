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
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from ft_cli.data import cache
from ft_cli.data.encode import Encoded, EncodeSettings, encode_examples
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
    key = _cache_key(recipe, tokenizer)
    with main_process_first() if main_process_first is not None else contextlib.nullcontext():
        entry = cache.load_entry(key) if d.cache else None
        if entry is not None:
            bundle = _bundle_from_cache(entry, key)
        else:
            bundle = _build(recipe, tokenizer, key)
            if d.cache:
                try:
                    cache.save_entry(key, _dataset_dict(bundle), _meta(bundle))
                except OSError as exc:
                    bundle.warnings.append(f"could not write the data cache ({exc}); set data.cache: false to "
                                           "silence this")
    micro = recipe.train.micro_batch_size
    bundle.train_stats.padding_efficiency = _padding_efficiency(bundle.train, micro, recipe.train.seed)
    if bundle.eval is not None and bundle.eval_stats is not None:
        bundle.eval_stats.padding_efficiency = _padding_efficiency(
            bundle.eval, recipe.train.eval_batch_size or micro, recipe.train.seed)
    return bundle


def _settings(recipe: Recipe) -> EncodeSettings:
    d = recipe.data
    return EncodeSettings(d.max_seq_len, d.truncation, d.train_on_inputs)


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
    for i, src in enumerate(train_sources):
        if d.eval is None:
            keep, held = split_eval(len(src.examples), d.val_split, seed + i)
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
    warnings = _check_template(tokenizer, renderer, train_examples)
    train_enc = encode_examples(train_examples, tokenizer, settings, renderer)
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
        eval_enc = encode_examples(eval_examples, tokenizer, settings, renderer)
        eval_stats = _stats(eval_enc, d.max_seq_len, eval_sources)
        if len(eval_enc.lengths):
            eval_ds = _to_dataset(eval_enc.ids, eval_enc.labels, eval_enc.lengths)
        else:
            warnings.append(f"every eval example was dropped ({_drop_summary(eval_enc, d.max_seq_len)}); "
                            "training runs without evaluation")
    return DataBundle(train, eval_ds, train_stats, eval_stats, key, warnings)


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
        length_histogram=_histogram(lengths, max_seq_len), sources=sources)


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
                                                "packing", "train_on_inputs", "limit")},
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
    d = recipe.data
    if d.chat_template:
        resolve_chat_template(tokenizer, d.chat_template)
    convert = make_converter(d.format, d.columns)
    src = load_source(str(path), None, convert, "--data")
    enc = encode_examples(src.examples, tokenizer, _settings(recipe))
    _require_rows(enc, f"--data {path}", d.max_seq_len, d.truncation)
    return _to_dataset(enc.ids, enc.labels, enc.lengths)


def preprocess_to_disk(recipe_path: str | os.PathLike, overrides: list[str], out: Path, *,
                       overwrite: bool = False) -> None:
    """`ft preprocess`: a DatasetDict (train, and eval when there is one) saved at `out`, plus stats.json; written
    under a temporary name and renamed into place (an earlier preprocess output is replaced only with --overwrite)."""
    import json

    from rich.console import Console

    from ft_cli.model import load_tokenizer
    from ft_cli.recipe import load_recipe
    from ft_cli.run_dir import prepare_output_dir

    out_dir = prepare_output_dir(out, kind="preprocess", overwrite=overwrite)
    out = out_dir.path
    recipe = load_recipe(recipe_path, overrides)
    tokenizer = load_tokenizer(recipe)
    bundle = build_datasets(recipe, tokenizer)
    with out_dir.writing() as tmp, cache.quiet_datasets():
        _dataset_dict(bundle).save_to_disk(str(tmp))  # into the empty temporary directory
        (tmp / "stats.json").write_text(json.dumps(_meta(bundle), indent=2))
    console = Console(highlight=False)
    s = bundle.train_stats
    packed = f", packed into {s.packed_rows} rows ({s.packing_efficiency:.1%} full)" if s.packed_rows else ""
    console.print(f"wrote {out}: train {s.rows} examples, {s.tokens:,} tokens "
                  f"({s.trained_tokens / max(s.tokens, 1):.1%} trained){packed}", markup=False)
    if bundle.eval_stats is not None and bundle.eval is not None:
        console.print(f"  eval {bundle.eval_stats.rows} examples, {bundle.eval_stats.tokens:,} tokens", markup=False)
    for w in bundle.warnings:
        console.print(f"warning: {w}", markup=False, style="yellow")
