"""The tokenized-data cache: `$FT_CACHE_DIR/data/<key>/` (default ~/.cache/ft), keyed by a content hash.

The key covers everything that changes the tokens: the data files (bytes, or size + mtime for very large
ones), the tokenizer (its vocabulary and merges, special tokens, chat template), the data settings, the seed,
and PIPELINE_VERSION, which must be bumped whenever this package's output changes for the same inputs.
An entry is written to a temporary directory and renamed into place, so it is either whole or absent.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
from pathlib import Path
from typing import Any

PIPELINE_VERSION = "ft-data-2"  # 2: dropped-assistant-text warnings and per-turn samples in the stats
HASH_CONTENT_LIMIT = 2 << 30  # hash file bytes up to 2 GiB of data; above that size + mtime stand in


def cache_root() -> Path:
    from ft_cli.caches import cache_root as root

    return root() / "data"


def files_digest(files: list[Path]) -> list[Any]:
    stats = [(str(f.resolve()), f.stat().st_size, f.stat().st_mtime_ns) for f in files]
    if sum(s[1] for s in stats) > HASH_CONTENT_LIMIT:
        return stats
    out = []
    for f, (path, size, _) in zip(files, stats, strict=True):
        with f.open("rb") as fh:
            out.append((path, size, hashlib.file_digest(fh, "blake2b").hexdigest()))
    return out


def _vocabulary(tokenizer: Any) -> bytes:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        return backend.to_str().encode()
    return json.dumps(sorted(tokenizer.get_vocab().items())).encode()


def _special_tokens(tokenizer: Any) -> bytes:
    return json.dumps(tokenizer.special_tokens_map, sort_keys=True, default=str).encode()


def tokenizer_digest(tokenizer: Any) -> str:
    h = hashlib.blake2b(_vocabulary(tokenizer))
    h.update(type(tokenizer).__name__.encode())
    h.update(_special_tokens(tokenizer))
    h.update(json.dumps(tokenizer.chat_template, sort_keys=True).encode())
    h.update(repr(tokenizer("x").input_ids).encode())  # whether it adds BOS/EOS
    return h.hexdigest()


def vocab_digest(tokenizer: Any) -> str:
    """What token ids mean: the vocabulary, merges, added and special tokens; not the chat template, which only
    decides which ids a conversation becomes. Pre-tokenized data is checked against it."""
    return hashlib.blake2b(_vocabulary(tokenizer) + _special_tokens(tokenizer)).hexdigest()


def make_key(parts: dict[str, Any]) -> str:
    blob = json.dumps({"version": PIPELINE_VERSION, **parts}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:24]


@contextlib.contextmanager
def quiet_datasets():
    """No "Saving the dataset" / "Loading" progress bars from datasets while ft reads and writes its own files."""
    from datasets.utils import are_progress_bars_disabled, disable_progress_bars, enable_progress_bars

    was_disabled = are_progress_bars_disabled()
    disable_progress_bars()
    try:
        yield
    finally:
        if not was_disabled:
            enable_progress_bars()


def load_entry(key: str) -> tuple[Any, dict[str, Any]] | None:
    """(DatasetDict, metadata) of a cache entry, or None when absent or unreadable."""
    path = cache_root() / key
    meta_file = path / "meta.json"
    if not meta_file.is_file():
        return None
    from datasets import load_from_disk

    try:
        meta = json.loads(meta_file.read_text())
        with quiet_datasets():
            dataset = load_from_disk(str(path / "dataset"))
    except Exception:  # a damaged entry is rebuilt, never trusted
        return None
    with contextlib.suppress(OSError):  # last use, for `ft cache clean --older-than`
        os.utime(meta_file)
    return dataset, meta


def save_entry(key: str, dataset_dict: Any, meta: dict[str, Any]) -> None:
    """Write an entry whole or not at all (ft_cli.caches.publish_entry)."""
    from ft_cli.caches import publish_entry

    def write(tmp: Path) -> None:
        with quiet_datasets():
            dataset_dict.save_to_disk(str(tmp / "dataset"))
        (tmp / "meta.json").write_text(json.dumps(meta))

    publish_entry(cache_root() / key, write)
