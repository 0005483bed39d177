"""`task: classification`: labelled text -> AutoModelForSequenceClassification, trained in ft's loop.

Data (format `labelled`): one text (optionally a second text of a pair) and a label per record, from the same
files as every other format (.json/.jsonl/.csv/.tsv/.parquet, saved datasets, hub datasets); `data.columns` maps
the fields `text`, `text_pair`, `label` to the file's columns (SST-2: {text: sentence}). Labels are all integers
(class ids) or all strings (names); `data.labels` names the classes in id order, else they are taken from the
training data. Every problem is a UserError naming the file, the record and the field.

Model: AutoModelForSequenceClassification with the run's labels as id2label. Encoders pool their first ([CLS])
token; decoders (Llama, Qwen2, ...) pool the last token that is not padding, found from config.pad_token_id,
which is set to the tokenizer's pad token (padding is on the right). The head is new and trains with every
method: peft's task_type SEQ_CLS puts it in modules_to_save (saved with the adapter); freeze and ft's bottleneck
adapters unfreeze it here, and a bottleneck adapter saves it beside its own weights.

Loss: cross-entropy over the labels, summed and divided by the number of examples of the whole optimizer step
(like the LM loss is by its trained tokens), optionally weighted per class (train.class_weights; `auto` = n /
(classes x n_class), so the weights average 1 over the training examples).

Each output directory (adapter/, best/, model/) holds `ft_classification.json` with the label names, which
`ft eval`, `ft predict`, `ft merge` and `load_classifier` read.

This module reads and tokenizes the data; classify_head.py holds the model (the head, what each output
directory saves), classify_loss.py the batches, the loss and the evaluation, classify_run.py `ft eval` / `ft predict` /
`ft merge` of a classifier.
"""

from __future__ import annotations

import json
import re
import sys
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from ft_cli.data.formats import Origin, check_columns
from ft_cli.errors import UserError

if TYPE_CHECKING:
    import datasets

    from ft_cli.data.rows import DataBundle
    from ft_cli.recipe import DatasetSource, Recipe

_INT = re.compile(r"^\s*[+-]?\d+\s*$")


# Reading labelled records ------------------------------------------------------------------------------------

@dataclass(slots=True)
class Labelled:
    text: str | None  # None or blank: nothing to classify (counted as dropped_empty)
    pair: str | None
    label: int | str
    origin: Origin


def labelled_converter(columns: dict[str, str] | None) -> Callable[[dict[str, Any], Origin], Labelled]:
    """Record -> Labelled. Integers written as text (every CSV/TSV cell) are integers."""
    col = check_columns("labelled", columns)
    pair_mapped = bool(columns and "text_pair" in columns)

    def missing(record: dict, origin: Origin, field: str) -> UserError:
        hint = "" if columns and field in columns else f"; map your column with data.columns: {{{field}: COLUMN}}"
        return UserError(f"{origin}: missing column {col[field]!r} (the {field} of format labelled; this record has "
                         f"{', '.join(map(repr, record)) or 'no columns'}){hint}")

    def convert(record: dict[str, Any], origin: Origin) -> Labelled:
        if col["text"] not in record:
            raise missing(record, origin, "text")
        if col["label"] not in record:
            raise missing(record, origin, "label")
        if pair_mapped and col["text_pair"] not in record:
            raise missing(record, origin, "text_pair")
        text = record[col["text"]]
        pair = record.get(col["text_pair"])
        for name, value in ((col["text"], text), (col["text_pair"], pair)):
            if value is not None and not isinstance(value, str):
                raise UserError(f"{origin}: column {name!r} must be text, got {type(value).__name__} ({value!r})")
        label = record[col["label"]]
        if isinstance(label, str) and _INT.match(label):
            label = int(label)
        elif isinstance(label, bool) or not isinstance(label, (int, str)) or label == "":
            shown = "an empty cell" if label == "" else f"{type(label).__name__} {label!r}"
            raise UserError(f"{origin}: column {col['label']!r} must be an integer class id or a label name, got "
                            f"{shown}")
        elif isinstance(label, str):
            label = label.strip()
        blank = text is None or not text.strip()
        return Labelled(None if blank else text, pair if pair is not None and pair.strip() else None, label, origin)

    return convert


def read_labelled(sources: list[DatasetSource], recipe: Recipe, field: str) -> list[list[Labelled]]:
    from ft_cli.data.pretokenized import source_field
    from ft_cli.data.sources import load_source

    d = recipe.data
    out = []
    for i, src in enumerate(sources):
        where = source_field(recipe, field, i)
        convert = labelled_converter(src.columns if src.columns is not None else d.columns)
        loaded = load_source(src.path, src.split, convert, where)  # type: ignore[arg-type]
        rows: list[Labelled] = loaded.examples  # type: ignore[assignment]
        if d.limit is not None:
            rows = rows[:d.limit]
        if not rows:
            raise UserError(f"{where}: no records in {src.path}")
        out.append(rows)
    return out


# Labels ---------------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class LabelSet:
    """Class names in id order, and how a label of the data becomes a class id."""

    names: list[str]
    by_value: dict[Any, int]  # data label (int or str) -> class id

    def class_id(self, row: Labelled, where: str) -> int:
        found = self.by_value.get(row.label)
        if found is None:
            shown = ", ".join(self.names[:20]) + (" ..." if len(self.names) > 20 else "")
            what = "class id" if isinstance(row.label, int) and all(isinstance(k, int) for k in self.by_value) \
                else "label"
            raise UserError(f"{row.origin}: {what} {row.label!r} is not one of the training labels ({shown}) "
                            f"[{where}]; fix the record, or list every class in data.labels")
        return found


def resolve_labels(train: list[Labelled], declared: list[str] | list[int] | None, where: str) -> LabelSet:
    kinds: dict[type, Labelled] = {}
    for row in train:
        kinds.setdefault(type(row.label), row)
        if len(kinds) == 2:
            a, b = kinds[int], kinds[str]
            raise UserError(f"{where}: labels must be all integers (class ids) or all strings (names), not both: "
                            f"{a.origin} has {a.label!r}, {b.origin} has {b.label!r}")
    ints = int in kinds
    if declared is not None:
        names = [str(x) for x in declared]
        if all(isinstance(x, int) for x in declared):  # integer labels listed as values, e.g. [-1, 1]
            by_value: dict[Any, int] = {v: i for i, v in enumerate(declared)}
        elif ints:  # integer labels are class ids into the declared names
            by_value = {i: i for i in range(len(names))}
        else:
            by_value = {n: i for i, n in enumerate(names)}
        return LabelSet(names, by_value)
    values = sorted({row.label for row in train})  # type: ignore[type-var]
    if ints and values[0] >= 0 and values[-1] < 2 * len(values) + 8:  # class ids 0..K-1 (a few may be unused)
        return LabelSet([str(i) for i in range(values[-1] + 1)], {i: i for i in range(values[-1] + 1)})
    return LabelSet([str(v) for v in values], {v: i for i, v in enumerate(values)})


def stratified_split(ids: np.ndarray, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(keep, held) row indices: `fraction` of each class held out (rounded; at least one of a class that has two
    or more rows when fraction > 0), seeded; both sorted."""
    rng = np.random.default_rng(seed)
    held: list[int] = []
    for c in np.unique(ids):
        rows = np.flatnonzero(ids == c)
        k = int(round(fraction * len(rows)))
        if fraction > 0 and k == 0 and len(rows) >= 2:
            k = 1
        held += rng.permutation(rows)[:k].tolist()
    held_arr = np.array(sorted(held), dtype=np.int64)
    keep = np.setdiff1d(np.arange(len(ids)), held_arr)
    return keep, held_arr


# Tokenizing -----------------------------------------------------------------------------------------------------

@dataclass
class EncodedSplit:
    dataset: datasets.Dataset | None
    rows_in: int
    dropped_empty: int
    dropped_too_long: int
    truncated: int
    lengths: np.ndarray
    label_counts: dict[str, int]


def encode(rows: list[Labelled], class_ids: list[int], tokenizer: Any, names: list[str], max_seq_len: int,
           truncation: str) -> EncodedSplit:
    """Tokenize text (and text_pair) with the tokenizer's special tokens ([CLS] ... [SEP] for BERT, bos for Llama);
    over-long examples are cut to max_seq_len (data.truncation: truncate; the second text of a pair is cut first
    when it is the longer one, as transformers' longest_first does) or dropped, and counted either way."""
    import datasets

    keep = [i for i, r in enumerate(rows) if r.text is not None]
    texts = [rows[i].text for i in keep]
    pairs = [rows[i].pair for i in keep]
    has_pair = any(p is not None for p in pairs)
    if has_pair and any(p is None for p in pairs):
        first = next(rows[i] for i, p in zip(keep, pairs, strict=True) if p is None)
        raise UserError(f"{first.origin}: text_pair is empty; every record of a pair dataset needs both texts")
    kwargs: dict[str, Any] = {"add_special_tokens": True, "return_attention_mask": False, "verbose": False}
    full = tokenizer(texts, pairs if has_pair else None, **kwargs) if texts else {"input_ids": []}
    long = [j for j, ids in enumerate(full["input_ids"]) if len(ids) > max_seq_len]
    dropped_too_long = 0
    if long and truncation == "truncate":
        cut = tokenizer([texts[j] for j in long], [pairs[j] for j in long] if has_pair else None,
                        truncation=True, max_length=max_seq_len, **kwargs)
        for key in full:
            for j, value in zip(long, cut[key], strict=True):
                full[key][j] = value
    elif long:
        dropped_too_long = len(long)
    gone = set(long) if truncation == "drop" else set()
    use = [j for j in range(len(keep)) if j not in gone]
    columns: dict[str, Any] = {"input_ids": [full["input_ids"][j] for j in use],
                               "label": [class_ids[keep[j]] for j in use]}
    if "token_type_ids" in full and has_pair:
        columns["token_type_ids"] = [full["token_type_ids"][j] for j in use]
    lengths = np.array([len(x) for x in columns["input_ids"]], dtype=np.int64)
    counts = Counter(columns["label"])
    dataset = datasets.Dataset.from_dict(columns) if use else None
    return EncodedSplit(dataset, len(rows), len(rows) - len(keep), dropped_too_long,
                        len(long) if truncation == "truncate" else 0, lengths,
                        {names[c]: counts.get(c, 0) for c in range(len(names))})


def _stats(enc: EncodedSplit, max_seq_len: int, sources: list[dict[str, Any]]) -> Any:
    from ft_cli.data.rows import DataStats, histogram

    lengths = enc.lengths
    return DataStats(
        rows_in=enc.rows_in, rows=len(lengths), dropped_empty=enc.dropped_empty,
        dropped_too_long=enc.dropped_too_long, truncated=enc.truncated, tokens=int(lengths.sum()),
        trained_tokens=len(lengths), packed_rows=None, packing_efficiency=None, max_seq_len=max_seq_len,
        mean_length=float(lengths.mean()) if len(lengths) else 0.0, max_length=int(lengths.max(initial=0)),
        length_histogram=histogram(lengths, max_seq_len), sources=sources, label_counts=enc.label_counts)


def build_datasets(recipe: Recipe, tokenizer: Any, *, main_process_first: Callable | None = None) -> DataBundle:
    """Train and eval splits of labelled data, tokenized. Not cached: tokenizing labelled text is fast (SST-2's
    67k rows take seconds), and every process reads it the same way."""
    from ft_cli.data.rows import DataBundle

    d, seed = recipe.data, recipe.train.seed
    train_sources = read_labelled(d.sources, recipe, "data.train")
    train_rows = [r for rows in train_sources for r in rows]
    labels = resolve_labels(train_rows, d.labels, "data.train")
    warnings: list[str] = []
    eval_rows: list[Labelled] = []
    eval_sources: list[dict[str, Any]] = []
    train_keep: list[Labelled] = []
    train_mix: list[dict[str, Any]] = []
    for i, (rows, src) in enumerate(zip(train_sources, d.sources, strict=True)):
        ids = np.array([labels.class_id(r, "data.train") for r in rows], dtype=np.int64)
        if d.eval is None and d.val_split > 0:
            keep, held = stratified_split(ids, d.val_split, seed + i)
            eval_rows += [rows[j] for j in held]
            eval_sources.append({"path": src.path, "rows": len(held), "stratified": True})
        else:
            keep = np.arange(len(rows))
        train_keep += [rows[j] for j in keep]
        if src.weight is not None:
            warnings.append(f"data.train[{i}].weight is not used by task classification (every row is used once)")
        train_mix.append({"path": src.path, "rows": len(keep), "available": len(keep), "weight": None})
    if d.eval is not None:
        for src, rows in zip(d.eval_sources, read_labelled(d.eval_sources, recipe, "data.eval"), strict=True):
            eval_rows += rows
            eval_sources.append({"path": src.path, "rows": len(rows)})
    train_ids = [labels.class_id(r, "data.train") for r in train_keep]
    present = sorted(set(train_ids))
    if len(present) < 2:
        only = labels.names[present[0]] if present else "none"
        raise UserError(f"data.train: every training example has the label {only!r}; a classifier needs examples of "
                        "at least two classes (check the label column, data.columns and data.limit)")
    absent = [labels.names[c] for c in range(len(labels.names)) if c not in present]
    if absent:
        warnings.append(f"{len(absent)} of {len(labels.names)} classes have no training example: "
                        f"{', '.join(absent[:10])}; the model can never learn to predict them")
    eval_ids = [labels.class_id(r, "data.eval") for r in eval_rows]
    train_enc = encode(train_keep, train_ids, tokenizer, labels.names, d.max_seq_len, d.truncation)
    if train_enc.dataset is None:
        raise UserError(f"data.train: every example was dropped ({train_enc.dropped_empty} with a blank text, "
                        f"{train_enc.dropped_too_long} longer than max_seq_len={d.max_seq_len}); nothing to train on")
    eval_ds, eval_stats = None, None
    if eval_rows:
        eval_enc = encode(eval_rows, eval_ids, tokenizer, labels.names, d.max_seq_len, d.truncation)
        eval_ds, eval_stats = eval_enc.dataset, _stats(eval_enc, d.max_seq_len, eval_sources)
        if eval_ds is None:
            warnings.append("every eval example was dropped; training runs without evaluation")
    import hashlib

    fingerprint = hashlib.sha256(json.dumps([labels.names, len(train_keep), len(eval_rows), d.max_seq_len,
                                             [r.origin.source for r in train_sources[0][:1]]]).encode()).hexdigest()
    bundle = DataBundle(train_enc.dataset, eval_ds, _stats(train_enc, d.max_seq_len, train_mix), eval_stats,
                        fingerprint[:16], warnings, labels=labels.names)
    bundle.train_stats.padding_efficiency = _padding_efficiency(train_enc.lengths, recipe.train.micro_batch_size, seed)
    return bundle


def _padding_efficiency(lengths: np.ndarray, batch_size: int, seed: int) -> float | None:
    if not len(lengths):
        return None
    lengths = lengths[np.random.default_rng(seed).permutation(len(lengths))]
    pad = (-len(lengths)) % batch_size
    batches = np.concatenate([lengths, np.zeros(pad, np.int64)]).reshape(-1, batch_size)
    return float(lengths.sum() / (batches.max(axis=1) * batch_size).sum())


def load_labelled_file(path: str | Path, recipe: Recipe, tokenizer: Any, names: list[str], *,
                       need_labels: bool = True) -> tuple[Any, list[Labelled]]:
    """`ft eval --data` / `ft predict --data`: a labelled file in the run's columns, tokenized. Without
    `need_labels` (predict), records without a label column are read too (label -1)."""
    from ft_cli.data.sources import load_source

    d = recipe.data
    convert = labelled_converter(d.columns)
    col = check_columns("labelled", d.columns)

    def read(record: dict[str, Any], origin: Origin) -> Labelled:
        if not need_labels and col["label"] not in record and col["text"] in record:
            record = {**record, col["label"]: -1}
        return convert(record, origin)

    rows: list[Labelled] = load_source(str(path), None, read, f"--data {path}").examples  # type: ignore[assignment]
    if not rows:
        raise UserError(f"--data {path}: no records")
    if need_labels:
        labels = LabelSet(names, _by_value(names, rows, d.labels))
        ids = [labels.class_id(r, f"--data {path}") for r in rows]
    else:
        ids = [-1] * len(rows)
    enc = encode(rows, ids, tokenizer, names, d.max_seq_len, d.truncation)
    if enc.dropped_empty or enc.dropped_too_long or enc.truncated:
        print(f"--data {path}: {enc.dropped_empty} records with a blank text and {enc.dropped_too_long} over-long "
              f"ones are skipped; {enc.truncated} are cut to max_seq_len={d.max_seq_len}", file=sys.stderr)
    if enc.dataset is None:
        raise UserError(f"--data {path}: every record was dropped (blank text or too long)")
    kept = [r for r in rows if r.text is not None]
    if d.truncation == "drop":
        kept = [r for r, n in zip(kept, _full_lengths(kept, tokenizer), strict=True) if n <= d.max_seq_len]
    return enc.dataset, kept


def _full_lengths(rows: list[Labelled], tokenizer: Any) -> list[int]:
    has_pair = any(r.pair is not None for r in rows)
    enc = tokenizer([r.text for r in rows], [r.pair for r in rows] if has_pair else None)
    return [len(x) for x in enc["input_ids"]]


def _by_value(names: list[str], rows: list[Labelled], declared: list | None) -> dict[Any, int]:
    """A trained run's label mapping for new data: integer labels are class ids (or declared integer values),
    strings are names."""
    if declared is not None and all(isinstance(x, int) for x in declared):
        return {v: i for i, v in enumerate(declared)}
    by_value: dict[Any, int] = {n: i for i, n in enumerate(names)}
    if any(isinstance(r.label, int) for r in rows):
        numeric = all(_INT.match(n) for n in names)
        by_value.update({(int(n) if numeric else i): i for i, n in enumerate(names)})
    return by_value
