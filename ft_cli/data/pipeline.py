"""Entry points of the data pipeline: `build_datasets` (train/validate), `load_eval_data` (ft eval --data),
`dataset_dict` + `bundle_meta` (what the cache and ft preprocess save), and the collator and template helpers the
training loop uses.

build_datasets: read every source -> records become Examples (formats) -> eval split per source (seeded) ->
mix training sources by weight (seeded) -> render, tokenize, mask, truncate (encode) -> pack the training
rows (packing) -> datasets.Dataset. The result is cached under a content hash (cache); with several processes
only the main one builds it while the others wait and then load it.
"""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import numpy as np

from ft_cli.data import cache
from ft_cli.data.encode import Encoded, EncodeSettings, encode_examples
from ft_cli.data.formats import Example, make_converter
from ft_cli.data.packing import gather_packed, pack_sequences, packing_efficiency
from ft_cli.data.pretokenized import pretokenized_bundle, pretokenized_source, source_field
from ft_cli.data.render import ChatRenderer
from ft_cli.data.rows import DataBundle, DataStats, histogram, to_dataset, unpack_rows
from ft_cli.data.saved import check_pretokenized, preprocess_meta
from ft_cli.data.sources import (
    LoadedSource,
    data_files,
    load_source,
    mix_counts,
    sample_rows,
    split_eval,
    split_warnings,
)
from ft_cli.data.templates import resolve_chat_template, template_warnings
from ft_cli.errors import UserError

if TYPE_CHECKING:
    import datasets

    from ft_cli.recipe import DatasetSource, Recipe

__all__ = ["DataStats", "DataBundle", "build_datasets", "make_collator", "load_eval_data",
           "resolve_chat_template"]


def make_collator(tokenizer: Any, *, packed: bool, pad_to_multiple_of: int | None = None) -> Callable:
    """See ft_cli.data.collate (kept there so that importing this module does not import torch)."""
    from ft_cli.data.collate import make_collator as _make

    return _make(tokenizer, packed=packed, pad_to_multiple_of=pad_to_multiple_of)


# build_datasets ----------------------------------------------------------------------------------------------

def build_datasets(recipe: Recipe, tokenizer: Any, *, main_process_first: Callable | None = None) -> DataBundle:
    d = recipe.data
    if d.chat_template:  # usually already done by load_tokenizer; idempotent
        resolve_chat_template(tokenizer, d.chat_template)
    with main_process_first() if main_process_first is not None else contextlib.nullcontext():
        bundle = pretokenized_bundle(recipe, tokenizer, lambda: _raw_eval(recipe, tokenizer))  # used as saved
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
            cache.save_entry(key, dataset_dict(bundle), bundle_meta(bundle))
        except OSError as exc:
            bundle.warnings.append(f"could not write the data cache ({exc}); set data.cache: false to silence this")
    return bundle


def _settings(recipe: Recipe) -> EncodeSettings:
    d = recipe.data
    return EncodeSettings(d.max_seq_len, d.truncation, d.train_on_inputs, text_chunking=d.text_chunking,
                          text_overlap=d.text_overlap, system_message=d.system_message)


def _load(sources: list[DatasetSource], recipe: Recipe, field_name: str,
          warnings: list[str] | None = None) -> list[LoadedSource]:
    d = recipe.data
    out = []
    for i, src in enumerate(sources):
        where = _where(recipe, field_name, i)
        fmt = src.format or d.format
        convert = make_converter(fmt, src.columns if src.columns is not None else d.columns)
        preference = [0]

        def convert_and_count(record: dict, origin: Any, convert: Callable = convert,
                              preference: list[int] = preference) -> Example | None:
            preference[0] += PREFERENCE_FIELDS <= record.keys()
            return convert(record, origin)

        loaded = load_source(src.path, src.split, convert_and_count, where)
        if preference[0] and warnings is not None and fmt != "preference":
            warnings.append(_preference_warning(where, fmt, preference[0], loaded.examples))
        loaded.weight = src.weight
        if d.limit is not None:  # data.limit: the first N records of each source (ft train --smoke)
            loaded.examples = loaded.examples[:d.limit]
        if not loaded.examples:
            raise UserError(f"{where}: no records in {src.path}")
        out.append(loaded)
    return out


PREFERENCE_FIELDS = {"chosen", "rejected"}


def _preference_warning(where: str, fmt: str, count: int, examples: list[Example | None]) -> str:
    """Preference (DPO-style) records read by an SFT format: their chosen/rejected replies are never trained."""
    dropped = sum(ex is None for ex in examples)
    lost = f"; {dropped} of them have no assistant reply left and are dropped" if dropped else ""
    return (f"{where}: {count} of {len(examples)} records have 'chosen' and 'rejected' fields (preference data, "
            f"as for DPO), which format {fmt} does not read: their chosen replies are not trained{lost}. To train on "
            "the pairs: data.format: preference with objective: dpo (or orpo, simpo); to train on the chosen replies "
            "only, put each in as the last assistant turn")


def _where(recipe: Recipe, field_name: str, i: int) -> str:
    return source_field(recipe, field_name, i)


def _raw_eval(recipe: Recipe, tokenizer: Any) -> datasets.Dataset | None:
    """data.eval tokenized (beside a pre-tokenized data.train)."""
    examples = [ex for src in _load(recipe.data.eval_sources, recipe, "data.eval") for ex in src.examples]
    enc = encode_examples(examples, tokenizer, _settings(recipe))
    return to_dataset(enc.ids, enc.labels, enc.lengths) if len(enc.lengths) else None


def _build(recipe: Recipe, tokenizer: Any, key: str) -> DataBundle:
    d, seed = recipe.data, recipe.train.seed
    notes: list[str] = []
    train_sources = _load(d.sources, recipe, "data.train", notes)
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
        for src in _load(d.eval_sources, recipe, "data.eval", notes):
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
    conversations = any(ex is not None and ex.text is None for ex in train_examples)
    renderer = ChatRenderer(tokenizer, d.system_message) if conversations else None
    warnings += notes + _check_template(tokenizer, renderer, train_examples)
    if d.format == "preference":  # chosen/rejected pairs (objective dpo, orpo, simpo)
        from ft_cli.data.preference import pair_bundle

        assert renderer is not None
        return pair_bundle(recipe, tokenizer, key, settings, renderer, train_examples, eval_examples, train_mix,
                           eval_sources, warnings)
    train_enc = _encode(train_examples, tokenizer, settings, renderer, "data.train")
    _require_rows(train_enc, "data.train", d.max_seq_len, d.truncation)
    warnings += _lost_text_warnings(train_enc)
    notes = _split_notes(train_enc)
    train_stats = _stats(train_enc, d.max_seq_len, train_mix)
    train = _train_rows(train_enc, recipe, train_stats)

    eval_ds, eval_stats = None, None
    if eval_examples:
        eval_enc = _encode(eval_examples, tokenizer, settings, renderer, "data.eval")
        eval_stats = _stats(eval_enc, d.max_seq_len, eval_sources)
        if len(eval_enc.lengths):
            eval_ds = to_dataset(eval_enc.ids, eval_enc.labels, eval_enc.lengths)
        else:
            warnings.append(f"every eval example was dropped ({_drop_summary(eval_enc, d.max_seq_len)}); "
                            "training runs without evaluation")
    return DataBundle(train, eval_ds, train_stats, eval_stats, key, warnings, notes=notes)


def _train_rows(train_enc: Encoded, recipe: Recipe, train_stats: DataStats) -> Any:
    """The training dataset: one row per example, or (data.packing) examples packed into max_seq_len rows, which
    `train_stats` then counts."""
    d = recipe.data
    if not d.packing:
        return to_dataset(train_enc.ids, train_enc.labels, train_enc.lengths)
    rows = pack_sequences(train_enc.lengths, d.max_seq_len, recipe.train.seed)
    ids, labels, pos, row_lengths = gather_packed(train_enc.ids, train_enc.labels, train_enc.lengths, rows)
    train_stats.packed_rows = len(rows)
    train_stats.packing_efficiency = packing_efficiency(train_enc.lengths, len(rows), d.max_seq_len)
    return to_dataset(ids, labels, row_lengths, pos)


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


def _check_template(tokenizer: Any, renderer: ChatRenderer | None, examples: list[Example | None]) -> list[str]:
    """Once per run, on the first conversation: eos at the end of assistant turns (prefix consistency is checked
    on every conversation while encoding)."""
    if renderer is None:
        return []
    first = next((ex for ex in examples if ex is not None and ex.text is None), None)
    if first is None:
        return []
    sample = renderer.conversation(first).samples[0]
    return template_warnings(tokenizer, sample.text, sample.spans)


def _lost_text_warnings(enc: Encoded) -> list[str]:
    """Say when the chat template leaves assistant text out of the training text, and how often."""
    if not enc.lost_rows:
        return []
    hint = ("DeepSeek-R1's template strips everything up to </think> from assistant messages; to train the "
            "reasoning, set data.chat_template to a template that keeps it (a .jinja file, e.g. TRL's "
            "trl/chat_templates/deepseek_r1_distill_training.jinja)"
            if "</think>" in (enc.lost_first or "") else
            "check that data.chat_template renders every field your assistant messages use")
    return [f"the chat template leaves part of the assistant text out of the training text in {enc.lost_rows:,} of "
            f"{enc.rows_in:,} conversations (first: {enc.lost_first}); that text is never trained. {hint}"]


def _split_notes(enc: Encoded) -> list[str]:
    """Say which conversations train some turns in samples of their own (render, case 3), and what that means."""
    if not enc.split_rows:
        return []
    return [f"{enc.split_rows:,} of {enc.rows_in:,} conversations have assistant turns that the chat template renders "
            "differently once later messages follow (Qwen3 drops the <think> block of earlier turns): each such turn "
            f"trains in a sample of its own (+{enc.extra_samples:,} samples), exactly as the model reads and writes "
            "it at that position, with the earlier turns as its history shows them; every other turn trains in the "
            "whole conversation. `ft validate --show N` shows the tokens that carry loss in each sample."]


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
        length_histogram=histogram(lengths, max_seq_len), sources=sources, split_documents=enc.split_documents,
        text_chunks=enc.text_chunks, split_rows=enc.split_rows, extra_samples=enc.extra_samples,
        lost_rows=enc.lost_rows)


def _padding_efficiency(ds: datasets.Dataset, batch_size: int, seed: int) -> float | None:
    import pyarrow.compute as pc

    lengths = np.asarray(pc.list_value_length(ds.data.column("input_ids")).to_numpy(), dtype=np.int64)
    if len(lengths) == 0:
        return None
    lengths = lengths[np.random.default_rng(seed).permutation(len(lengths))]
    pad = (-len(lengths)) % batch_size
    batches = np.concatenate([lengths, np.zeros(pad, np.int64)]).reshape(-1, batch_size)
    return float(lengths.sum() / (batches.max(axis=1) * batch_size).sum())


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
                                                "text_overlap", "system_message")},
        "seed": recipe.train.seed,
    })


def dataset_dict(bundle: DataBundle) -> Any:
    from datasets import DatasetDict

    splits = {"train": bundle.train}
    if bundle.eval is not None:
        splits["eval"] = bundle.eval
    return DatasetDict(splits)


def bundle_meta(bundle: DataBundle) -> dict[str, Any]:
    return {"fingerprint": bundle.fingerprint, "warnings": bundle.warnings, "notes": bundle.notes,
            "train_stats": bundle.train_stats.to_dict(),
            "eval_stats": bundle.eval_stats.to_dict() if bundle.eval_stats else None}


def _bundle_from_cache(entry: tuple[Any, dict[str, Any]], key: str) -> DataBundle:
    dsd, meta = entry
    eval_stats = DataStats(**meta["eval_stats"]) if meta["eval_stats"] else None
    return DataBundle(dsd["train"], dsd["eval"] if "eval" in dsd else None, DataStats(**meta["train_stats"]),
                      eval_stats, key, list(meta["warnings"]), from_cache=True, notes=list(meta.get("notes", [])))


# ft eval --data, ft preprocess ---------------------------------------------------------------------------------

def load_eval_data(path: str | os.PathLike, recipe: Recipe, tokenizer: Any) -> datasets.Dataset:
    """`path` in the recipe's format and columns, masked as in training, never packed."""
    d = recipe.data
    if d.chat_template:
        resolve_chat_template(tokenizer, d.chat_template)
    rows = pretokenized_source(str(path), None, "--data")
    if rows is not None:  # ft preprocess's output
        ds, where = rows
        meta = preprocess_meta(where) or preprocess_meta(where.parent)
        for w in check_pretokenized(ds, where, "--data", tokenizer, meta):
            print(f"warning: {w}", file=sys.stderr)
        return unpack_rows(ds)
    convert = make_converter(d.format, d.columns)
    src = load_source(str(path), None, convert, "--data")
    if d.format == "preference":  # pairs: the chosen side scores as `labels`, the rejected one beside it
        from ft_cli.data.preference import encode_pairs, pair_dataset

        pairs = encode_pairs(src.examples, tokenizer, _settings(recipe), ChatRenderer(tokenizer, d.system_message))
        if not pairs.chosen_ids:
            raise UserError(f"--data {path}: no preference pair fits data.max_seq_len={d.max_seq_len}")
        return pair_dataset(pairs)
    enc = encode_examples(src.examples, tokenizer, _settings(recipe))
    _require_rows(enc, f"--data {path}", d.max_seq_len, d.truncation)
    return to_dataset(enc.ids, enc.labels, enc.lengths)
