"""Tokenized rows and what is known about them: DataStats per split, the DataBundle build_datasets returns, and
the arrow-backed datasets.Dataset of flat token arrays (input_ids, labels, position_ids when packed). Both the
pipeline and the pre-tokenized reader (pretokenized.py) build on it."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from ft_cli.data.encode import IGNORE_INDEX
from ft_cli.data.packing import packing_efficiency

if TYPE_CHECKING:
    import datasets


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
    split_rows: int = 0  # conversations with assistant turns trained in samples of their own (data.render)
    extra_samples: int = 0  # samples those turns added
    lost_rows: int = 0  # conversations whose assistant text the chat template partly leaves out
    label_counts: dict[str, int] | None = None  # task: classification: examples per label, in class-id order
    unit: str = "records"  # what rows count: "pairs" for preference data (data.format: preference)

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
    notes: list[str] = field(default_factory=list)  # how the data is trained, where it is not the obvious way
    labels: list[str] | None = None  # task: classification: the class names, in id order


def histogram(lengths: np.ndarray, max_seq_len: int, bins: int = 10) -> list[list[int]]:
    edges = np.unique(np.linspace(0, max_seq_len, bins + 1).round().astype(np.int64))
    edges[-1] = max_seq_len + 1  # the last bin includes max_seq_len itself
    counts, _ = np.histogram(lengths, bins=edges)
    return [[int(lo), int(hi), int(c)] for lo, hi, c in zip(edges[:-1], edges[1:], counts, strict=True)]


def to_dataset(ids: np.ndarray, labels: np.ndarray, row_lengths: np.ndarray,
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
    # datasets would otherwise hash every token to make a fingerprint (0.1 s per 6M tokens); a random one is what it
    # uses for data it cannot hash, and ft's own cache key covers the content
    from datasets.fingerprint import generate_random_fingerprint

    return datasets.Dataset(InMemoryTable(pa.table(columns)), fingerprint=generate_random_fingerprint())



def flat_columns(ds: Any) -> tuple[np.ndarray, ...]:
    """Flat numpy columns of tokenized rows: (ids, labels, position_ids or None, row lengths)."""
    import pyarrow.compute as pc

    def flat(name: str) -> np.ndarray:
        return pc.list_flatten(ds.data.column(name)).to_numpy()

    lengths = np.asarray(pc.list_value_length(ds.data.column("input_ids")).to_numpy(), dtype=np.int64)
    pos = flat("position_ids") if "position_ids" in ds.column_names else None
    return flat("input_ids"), flat("labels"), pos, lengths


def unpack_rows(ds: Any) -> Any:
    """Packed rows back into one row per example (evaluation scores examples unpacked)."""
    if "position_ids" not in ds.column_names:
        return ds
    ids, labels, pos, _ = flat_columns(ds)
    starts = np.flatnonzero(pos == 0)
    lengths = np.diff(np.append(starts, len(pos)))
    return to_dataset(ids, labels, lengths)


def stats_of_rows(ds: Any, max_seq_len: int, sources: list[dict[str, Any]]) -> DataStats:
    """DataStats of tokenized rows; for packed rows per example (where position_ids restart)."""
    ids, labels, pos, row_lengths = flat_columns(ds)
    lengths = np.diff(np.append(np.flatnonzero(pos == 0), len(pos))) if pos is not None else row_lengths
    packed = pos is not None
    return DataStats(
        rows_in=len(lengths), rows=len(lengths), dropped_empty=0, dropped_too_long=0, truncated=0,
        tokens=int(lengths.sum()), trained_tokens=int((labels != IGNORE_INDEX).sum()),
        packed_rows=len(row_lengths) if packed else None,
        packing_efficiency=packing_efficiency(lengths, len(row_lengths), max_seq_len) if packed else None,
        max_seq_len=max_seq_len, mean_length=float(lengths.mean()) if len(lengths) else 0.0,
        max_length=int(lengths.max(initial=0)), length_histogram=histogram(lengths, max_seq_len), sources=sources)
