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
"""

from __future__ import annotations

import json
import math
import re
import sys
from collections import Counter
from collections.abc import Callable, Sequence
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

LABELS_FILE = "ft_classification.json"
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


# Batches, loss, evaluation ------------------------------------------------------------------------------------

def make_collator(tokenizer: Any) -> Callable[[list[dict[str, Any]]], dict[str, Any]]:
    """Right padding to the longest row of the batch (never to max_seq_len); `labels` is one class id per row."""
    import torch

    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0

    def collate(rows: list[dict[str, Any]]) -> dict[str, Any]:
        n = max(len(r["input_ids"]) for r in rows)
        input_ids = torch.full((len(rows), n), pad_id, dtype=torch.long)
        attention_mask = torch.zeros((len(rows), n), dtype=torch.long)
        batch: dict[str, Any] = {"input_ids": input_ids, "attention_mask": attention_mask,
                                 "labels": torch.tensor([int(r["label"]) for r in rows], dtype=torch.long)}
        if "token_type_ids" in rows[0]:
            batch["token_type_ids"] = torch.zeros((len(rows), n), dtype=torch.long)
        for i, r in enumerate(rows):
            k = len(r["input_ids"])
            input_ids[i, :k] = torch.as_tensor(r["input_ids"])
            attention_mask[i, :k] = 1
            if "token_type_ids" in batch:
                batch["token_type_ids"][i, :k] = torch.as_tensor(r["token_type_ids"])
        return batch

    return collate


def model_inputs(batch: dict[str, Any], device: Any) -> dict[str, Any]:
    return {k: v.to(device) for k, v in batch.items() if k in ("input_ids", "attention_mask", "token_type_ids")}


def class_weights(recipe: Recipe, label_counts: dict[str, int]) -> list[float] | None:
    """train.class_weights as one weight per class: `auto` = n / (classes x n_class), the inverse frequency
    scaled so that the weights average 1 over the training examples (a class without examples gets 0)."""
    spec = recipe.train.class_weights
    if spec is None:
        return None
    counts = list(label_counts.values())
    if spec == "auto":
        n, k = sum(counts), sum(c > 0 for c in counts)
        return [n / (k * c) if c else 0.0 for c in counts]
    if len(spec) != len(counts):
        raise UserError(f"train.class_weights: {len(spec)} weights for {len(counts)} classes "
                        f"({', '.join(label_counts)})")
    return [float(w) for w in spec]


class ClassificationLoss:
    """Cross-entropy over the labels, weighted per class, summed; the loop divides by the step's examples."""

    def __init__(self, weights: list[float] | None):
        self.weights = weights
        self._tensor: Any = None

    def __call__(self, logits: Any, labels: Any) -> Any:
        import torch.nn.functional as F

        weight = None
        if self.weights is not None:
            if self._tensor is None or self._tensor.device != logits.device:
                import torch

                self._tensor = torch.tensor(self.weights, dtype=torch.float32, device=logits.device)
            weight = self._tensor
        losses = F.cross_entropy(logits.float(), labels.to(logits.device), reduction="none")
        if weight is not None:
            losses = losses * weight[labels.to(logits.device)]
        return losses.sum()


def forward_logits(model: Any, batch: dict[str, Any], device: Any) -> Any:
    return model(**model_inputs(batch, device)).logits


def predict_batches(model: Any, dataset: Any, collate: Callable, batch_size: int, device: Any, *,
                    rank: int = 0, world_size: int = 1, on_batch: Callable[[int], None] | None = None,
                    order: Sequence[int] | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(float32 logits [n, classes], class ids [n]) of this rank's share of `dataset`, in `order` (default: the
    dataset's); rows are batched by length (longest first) so little padding is computed, and put back in order."""
    import torch

    indices = list(order) if order is not None else list(range(rank, len(dataset), world_size))
    lengths = [len(dataset[i]["input_ids"]) for i in indices] if len(indices) < 4096 else None
    if lengths is None:
        import pyarrow.compute as pc

        all_lengths = pc.list_value_length(dataset.data.column("input_ids")).to_numpy()
        lengths = [int(all_lengths[i]) for i in indices]
    by_length = sorted(range(len(indices)), key=lambda j: -lengths[j])
    logits_out: list[Any] = [None] * len(indices)
    was_training = model.training
    model.eval()
    with torch.no_grad():
        for start in range(0, len(by_length), batch_size):
            chunk = by_length[start:start + batch_size]
            rows = dataset[[indices[j] for j in chunk]]
            batch = collate([dict(zip(rows, vals, strict=True)) for vals in zip(*rows.values(), strict=True)])
            logits = forward_logits(model, batch, device).float().cpu().numpy()
            for j, row in zip(chunk, logits, strict=True):
                logits_out[j] = row
            if on_batch is not None:
                on_batch(len(chunk))
    model.train(was_training)
    labels = np.array([int(dataset[i]["label"]) for i in indices], dtype=np.int64)
    return np.stack(logits_out) if logits_out else np.zeros((0, 0), np.float32), labels


def log_softmax(logits: np.ndarray) -> np.ndarray:
    shifted = logits - logits.max(axis=-1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(axis=-1, keepdims=True))


def eval_record(model: Any, dataset: Any, collate: Callable, batch_size: int, accelerator: Any,
                names: list[str]) -> dict[str, Any]:
    """In-training evaluation: eval_loss (mean cross-entropy, unweighted) and the classification metrics, over every
    process's share together (the confusion matrix and loss are summed across processes)."""
    import torch

    from ft_cli.tasks.metrics import classification_metrics, confusion_matrix

    logits, labels = predict_batches(model, dataset, collate, batch_size, accelerator.device,
                                     rank=accelerator.process_index, world_size=accelerator.num_processes)
    k = len(names)
    counts = confusion_matrix(labels, logits.argmax(-1) if len(logits) else labels, k) if len(labels) else \
        np.zeros((k, k), np.int64)
    nll = float(-log_softmax(logits)[np.arange(len(labels)), labels].sum()) if len(labels) else 0.0
    if accelerator.num_processes > 1:
        packed = torch.tensor(np.concatenate([counts.ravel().astype(np.float64), [nll]]), device=accelerator.device,
                              dtype=torch.float64)
        packed = accelerator.reduce(packed, reduction="sum").cpu().numpy()
        counts, nll = packed[:-1].round().astype(np.int64).reshape(k, k), float(packed[-1])
    n = int(counts.sum())
    metrics = classification_metrics(counts, names)
    record = {"eval_loss": nll / max(n, 1), "eval_examples": n}
    record.update({f"eval_{m}": metrics[m] for m in ("accuracy", "f1_macro", "f1_micro", "f1_weighted")})
    record["eval_confusion_matrix"] = metrics["confusion_matrix"]["counts"]
    return record


# Model -------------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Head:
    """What the classification head needs to know when the model loads."""

    labels: list[str]
    pad_token_id: int | None


def model_kwargs(head: Head) -> dict[str, Any]:
    """from_pretrained keyword arguments for AutoModelForSequenceClassification."""
    kwargs: dict[str, Any] = {"num_labels": len(head.labels), "id2label": dict(enumerate(head.labels)),
                              "label2id": {n: i for i, n in enumerate(head.labels)},
                              "problem_type": "single_label_classification"}
    if head.pad_token_id is not None:
        kwargs["pad_token_id"] = head.pad_token_id
    return kwargs


HEAD_NAMES = ("classifier", "score")  # what transformers calls the head (peft's SEQ_CLS modules_to_save)


def head_modules(model: Any) -> list[tuple[str, Any]]:
    """(name, module) of the classification head of a transformers model (or a model inside a peft wrapper)."""
    out = [(n, m) for n, m in model.named_modules() if n.rsplit(".", 1)[-1] in HEAD_NAMES and "." not in n]
    if not out:
        raise UserError(f"cannot find the classification head of this {type(model).__name__} (a module named "
                        f"{' or '.join(HEAD_NAMES)})")
    return out


def train_head(model: Any, recipe: Recipe) -> None:
    """freeze and ft's bottleneck adapters freeze what they do not train: the new head must train all the same
    (peft methods get it through task_type SEQ_CLS; full trains everything). The head trains in float32."""
    if recipe.method not in ("freeze", "adapter"):
        return
    import torch

    for _, module in head_modules(model):
        module.requires_grad_(True)
        if recipe.method == "adapter":
            module.to(torch.float32)
            _cast_head_input(module)


def _cast_head_input(module: Any) -> None:
    """A float32 head on a 16-bit base: feed it its own dtype (its output stays float32 for the loss)."""
    def pre(mod: Any, args: tuple) -> tuple:
        dtype = next(mod.parameters()).dtype
        return tuple(a.to(dtype) if hasattr(a, "is_floating_point") and a.is_floating_point() else a for a in args)

    module.register_forward_pre_hook(pre)


def head_state(model: Any) -> dict[str, Any]:
    return {f"{name}.{k}": v.detach().cpu().contiguous() for name, module in head_modules(model)
            for k, v in module.state_dict().items()}


HEAD_FILE = "classifier_head.safetensors"


def save_extras(model: Any, out: Path, recipe: Recipe, labels: list[str]) -> None:
    """Beside what the method saved: the label names (every method) and, for ft's bottleneck adapters, the head."""
    if recipe.method == "adapter":
        from safetensors.torch import save_file

        save_file(head_state(model), str(out / HEAD_FILE), metadata={"format": "pt"})
    (out / LABELS_FILE).write_text(json.dumps({"task": "classification", "labels": labels}, indent=2) + "\n",
                                   encoding="utf-8")


def load_head(model: Any, adapter_dir: Path) -> None:
    """Put a bottleneck run's saved head into `model` (load_adapter calls this)."""
    import torch
    from safetensors.torch import load_file

    saved = load_file(str(adapter_dir / HEAD_FILE))
    for name, module in head_modules(model):
        own = {k[len(name) + 1:]: v for k, v in saved.items() if k.startswith(name + ".")}
        module.to(torch.float32)
        module.load_state_dict(own)
        _cast_head_input(module)


def run_labels(output: Path) -> list[str]:
    path = Path(output) / LABELS_FILE
    if not path.is_file():
        raise UserError(f"{output}: no {LABELS_FILE}; not the output of a classification run")
    return list(json.loads(path.read_text(encoding="utf-8"))["labels"])


def probabilities(logits: np.ndarray) -> np.ndarray:
    return np.exp(log_softmax(logits))


def describe_label_counts(counts: dict[str, int]) -> str:
    total = sum(counts.values())
    return ", ".join(f"{name} {n} ({n / max(total, 1):.1%})" for name, n in counts.items())


def is_better(metric: str, value: float, best: float | None) -> bool:
    if best is None or math.isnan(best):
        return True
    return value < best if metric == "eval_loss" else value > best
