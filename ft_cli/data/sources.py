"""Where records come from: local files and directories, or hub datasets; how sources mix and eval splits off.

Mixing policy (sources with a `weight`): the mixed set has as many rows as all sources together, and source i
fills the share weight_i / sum(weights) of it. A source with enough rows is sampled without replacement; one
with too few contributes every row k times plus a seeded random remainder (sampling with replacement, but
never leaving a row out). Sources without a weight count as weight 1. Without any weight every row is used
once. The eval split (val_split) is taken from each source before mixing, so no row is in both splits.
"""

from __future__ import annotations

import csv
import glob
import json
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ft_cli.data.formats import Converter, Example, Origin
from ft_cli.errors import UserError
from ft_cli.hub import hub_offline

EXTENSIONS = (".json", ".jsonl", ".csv", ".tsv", ".parquet")
_HUB_ID = re.compile(r"^[\w.-]+(/[\w.-]+)?$")


@dataclass
class LoadedSource:
    label: str  # the path or hub id, for messages and stats
    examples: list[Example | None]  # None: a record with nothing to train on (counted as dropped_empty)
    weight: float | None = None
    files: list[Path] = field(default_factory=list)


def data_files(path: str, where: str) -> list[Path] | None:
    """The local files of a source (for a dataset saved with save_to_disk: every file it is made of), or None when
    `path` is a hub dataset id. A glob (data/*.jsonl, data/**/*.json) matches files; `~` is the home directory."""
    from ft_cli.data.saved import saved_kind

    p = Path(path).expanduser()
    if glob.has_magic(path) and not p.exists():
        matched = sorted(Path(f) for f in glob.glob(str(p), recursive=True))
        files = [f for f in matched if f.is_file() and f.suffix.lower() in EXTENSIONS]
        if not files:
            found = f" (it matches {len(matched)} paths, none a {', '.join(EXTENSIONS)} file)" if matched else ""
            raise UserError(f"{where}: no file matches {p}{found}")
        return files
    if p.is_dir() and saved_kind(p):
        return sorted(f for f in p.rglob("*") if f.is_file())
    if p.is_file():
        if p.suffix.lower() not in EXTENSIONS:
            raise UserError(f"{where}: {p}: unsupported file type {p.suffix!r} (use {', '.join(EXTENSIONS)})")
        return [p]
    if p.is_dir():
        files = sorted(f for f in p.rglob("*") if f.is_file() and f.suffix.lower() in EXTENSIONS
                       and not any(part.startswith(".") for part in f.relative_to(p).parts))
        if not files:
            raise UserError(f"{where}: directory {p} holds no {', '.join(EXTENSIONS)} files")
        return files
    if path.startswith(("/", "./", "../", "~")) or p.suffix.lower() in EXTENSIONS or not _HUB_ID.match(path):
        raise UserError(f"{where}: file not found: {p}")
    return None


def load_source(path: str, split: str | None, convert: Converter, where: str) -> LoadedSource:
    from ft_cli.data import saved

    files = data_files(path, where)
    if files is None:
        return LoadedSource(path, [convert(r, o) for r, o in _hub_records(path, split, where)])
    p = Path(path).expanduser()
    if p.is_dir() and saved.saved_kind(p):
        ds = saved.load_saved(p, split, where)
        if saved.is_pretokenized(ds):
            raise UserError(f"{where}: {p} holds pre-tokenized rows (input_ids), which are used as they are only as "
                            "the one data.train source (or data.eval); mix the raw data instead")
        label = f"{p}[{split}]" if split else str(p)
        return LoadedSource(path, [convert(r, o) for r, o in saved.records(ds, label)], files=files)
    examples: list[Example | None] = []
    for f in files:
        examples.extend(convert(r, o) for r, o in read_records(f))
    return LoadedSource(path, examples, files=files)


def read_records(path: Path) -> Iterator[tuple[dict[str, Any], Origin]]:
    suffix = path.suffix.lower()
    try:
        if suffix == ".jsonl":
            yield from _jsonl(path, path.read_text(encoding="utf-8-sig"))
        elif suffix == ".json":
            yield from _json(path)
        elif suffix == ".csv":
            yield from _csv(path)
        elif suffix == ".tsv":
            yield from _tsv(path)
        else:
            yield from _parquet(path)
    except UnicodeDecodeError:
        raise _not_utf8(path) from None


def _not_utf8(path: Path) -> UserError:
    data = path.read_bytes()
    try:
        data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = data.count(b"\n", 0, exc.start) + 1
        return UserError(f"{path}:{line}: not valid UTF-8 (byte 0x{data[exc.start]:02x}); save the file as UTF-8")
    return UserError(f"{path}: not valid UTF-8; save the file as UTF-8")


def _json(path: Path) -> Iterator[tuple[dict[str, Any], Origin]]:
    text = path.read_text(encoding="utf-8-sig")
    if not text.strip():
        return  # an empty file has no records (reported as such by the caller)
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        if exc.msg == "Extra data" and text.lstrip().startswith("{"):  # JSON lines in a .json file
            yield from _jsonl(path, text)
            return
        raise UserError(f"{path}:{exc.lineno}: invalid JSON: {exc.msg} (column {exc.colno})") from None
    if isinstance(data, dict):
        data = [data]
    if not isinstance(data, list):
        raise UserError(f"{path}: expected a JSON array of records (or one JSON object per line), "
                        f"got {type(data).__name__}")
    label = str(path)
    for i, record in enumerate(data):
        origin = Origin(label, i)
        if not isinstance(record, dict):
            raise UserError(f"{origin}: expected a JSON object, got {type(record).__name__}")
        yield record, origin


def _jsonl(path: Path, text: str) -> Iterator[tuple[dict[str, Any], Origin]]:
    label, index, loads = str(path), 0, json.loads
    for lineno, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = loads(line)
        except json.JSONDecodeError as exc:
            raise UserError(f"{path}:{lineno}: invalid JSON: {exc.msg} (column {exc.colno})") from None
        if not isinstance(record, dict):
            raise UserError(f"{path}:{lineno}: expected one JSON object per line, got {type(record).__name__}")
        yield record, Origin(label, index, lineno)
        index += 1


def _csv(path: Path) -> Iterator[tuple[dict[str, Any], Origin]]:
    label = str(path)
    with path.open(newline="", encoding="utf-8-sig") as fh:
        reader = csv.DictReader(fh)
        try:
            for i, row in enumerate(reader):
                if None in row:
                    raise UserError(f"{path}:{reader.line_num}: more cells than the header has columns")
                yield row, Origin(label, i, reader.line_num)
        except csv.Error as exc:
            raise UserError(f"{path}:{reader.line_num}: invalid CSV: {exc}") from None


def _tsv(path: Path) -> Iterator[tuple[dict[str, Any], Origin]]:
    """Tab-separated, one record per line, with quoting off (csv.QUOTE_NONE): a `"` is an ordinary character, as
    in GLUE's TSV files (SST-2), where a quote-aware reader would join lines or drop quote marks."""
    label = str(path)
    with path.open(newline="", encoding="utf-8-sig") as fh:
        lines = iter(enumerate(fh, 1))
        header = next(((n, line) for n, line in lines if line.strip()), None)
        if header is None:
            return
        columns = header[1].rstrip("\r\n").split("\t")
        index = 0
        for lineno, line in lines:
            line = line.rstrip("\r\n")
            if not line.strip():
                continue
            cells = line.split("\t")
            if len(cells) > len(columns):
                raise UserError(f"{path}:{lineno}: {len(cells)} tab-separated cells, but the header has "
                                f"{len(columns)} columns ({', '.join(columns)})")
            yield dict(zip(columns, cells + [None] * (len(columns) - len(cells)), strict=True)), \
                Origin(label, index, lineno)
            index += 1


def _parquet(path: Path) -> Iterator[tuple[dict[str, Any], Origin]]:
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(path)
    except Exception as exc:  # pyarrow raises several types for a corrupt file
        raise UserError(f"{path}: cannot read parquet: {exc}") from None
    label = str(path)
    for i, record in enumerate(table.to_pylist()):
        yield record, Origin(label, i)


def _hub_records(repo_id: str, split: str | None, where: str) -> Iterator[tuple[dict[str, Any], Origin]]:
    """Rows of a hub dataset. Offline fails at once; online, an unreachable hub fails within seconds."""
    hint = "download it first, or point the recipe at a local .json/.jsonl/.csv/.parquet file"
    if hub_offline(datasets=True):
        raise UserError(f"{where}: {repo_id!r} is not a local file or directory, and as a hub dataset it needs the "
                        f"network, but the hub is offline (HF_HUB_OFFLINE=1); {hint}")
    import datasets
    from huggingface_hub import HfApi

    try:
        HfApi().dataset_info(repo_id, timeout=10)
    except Exception as exc:
        reason = type(exc).__name__
        if "NotFound" in reason or "404" in str(exc):
            raise UserError(f"{where}: {repo_id!r} is neither a local file or directory nor a hub dataset") from None
        raise UserError(f"{where}: cannot reach the hub for dataset {repo_id!r} ({reason}); {hint}") from None
    try:
        ds = datasets.load_dataset(repo_id, split=split or "train")
    except Exception as exc:
        raise UserError(f"{where}: cannot load hub dataset {repo_id!r} (split {split or 'train'}): {exc}") from None
    label = f"hub:{repo_id}"
    for i, record in enumerate(ds):
        yield record, Origin(label, i)


# Mixing and splitting -------------------------------------------------------------------------------------------

def split_eval(n: int, val_split: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(train indices, eval indices) of n rows: a seeded shuffle, eval = round(n * val_split), at least 1."""
    if val_split <= 0 or n < 2:
        return np.arange(n), np.arange(0)
    n_eval = min(n - 1, max(1, round(n * val_split)))
    order = np.random.default_rng(seed).permutation(n)
    return np.sort(order[n_eval:]), np.sort(order[:n_eval])


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


def mix_counts(sizes: list[int], weights: list[float | None]) -> list[int]:
    """Rows each source contributes (see the module docstring)."""
    if all(w is None for w in weights):
        return list(sizes)
    w = np.array([1.0 if x is None else x for x in weights])
    share = sum(sizes) * w / w.sum()
    counts = np.floor(share).astype(int)
    # Largest remainders get the rows that rounding down left over, so the counts add up exactly.
    for i in np.argsort(-(share - counts), kind="stable")[: sum(sizes) - counts.sum()]:
        counts[i] += 1
    return [int(c) if size else 0 for c, size in zip(counts, sizes, strict=True)]


def sample_rows(n: int, count: int, rng: np.random.Generator) -> np.ndarray:
    """`count` row indices out of n: a random subset, or every row count // n times plus a random remainder."""
    if n == 0 or count == 0:
        return np.arange(0)
    repeats, rest = divmod(count, n)
    parts = [np.arange(n)] * repeats + [np.sort(rng.permutation(n)[:rest])]
    return np.concatenate(parts)
