"""`ft cache`: what ft keeps under $FT_CACHE_DIR (default ~/.cache/ft), how big it is, and cleaning it up.

    data/<24 hex>/              tokenized data (ft_cli.data.cache): one entry per data, tokenizer and settings,
                                so it grows with every change of either; rebuilt when needed
    reference/<24 hex>/         DPO reference log-probabilities (ft_cli.reference): one entry per pairs and model,
                                16 bytes a pair; recomputed when needed
    builtin/<name>-<10 hex>/    built-in tiny models (ft_cli.builtin_models); rebuilt in seconds when needed
    data/.<24 hex>.ft-tmp-*, reference/.<24 hex>.ft-tmp-*, builtin/.*.tmp
                                leftovers of a process killed while writing an entry

`ft cache clean` deletes only what ft can show it wrote (`ft_entry_kind`): a directory named the way ft names
its entries AND holding the file ft writes into every one of them (meta.json for data and reference entries,
ft_builtin.json for a built-in), or a leftover named the way ft names its temporary directories and untouched for an hour (younger
ones may be a build in progress). Anything else found in the cache is listed as not ft's and never touched.
"""

from __future__ import annotations

import os
import re
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ft_cli.errors import UserError

KINDS = ("data", "reference", "builtin", "leftover")
LEFTOVER_AGE_S = 3600  # a temporary directory younger than this may belong to a running process
_DATA_ENTRY = re.compile(r"^[0-9a-f]{24}$")
_BUILTIN_ENTRY = re.compile(r"^[a-z0-9][a-z0-9.-]*-[0-9a-f]{10}$")
# .<key>.ft-tmp-PID-XXXX (ft_cli.atomic.tmp_path); .tmp-<key>-PID-XXXX: what ft 0.2 named them
_ENTRY_TMP = re.compile(r"^\.(tmp-[0-9a-f]{24}-\d+-[0-9a-f]{8}|[0-9a-f]{24}\.ft-tmp-\d+-[0-9a-f]+)$")
_KEYED = ("data", "reference")  # directories whose entries are named by a 24-hex key
_BUILTIN_TMP = re.compile(r"^\.[a-z0-9][a-z0-9.-]*-[0-9a-f]{10}\..+\.tmp$")


@dataclass
class Entry:
    kind: str  # data | reference | builtin | leftover
    path: Path
    bytes: int
    last_used: float  # seconds since the epoch: when ft last read or wrote it
    what: str


def cache_root() -> Path:
    return Path(os.environ.get("FT_CACHE_DIR") or Path.home() / ".cache" / "ft").expanduser()


def publish_entry(final: Path, write: Any, *, replace: bool = False) -> None:
    """Write the cache entry `final` (data/<key>, reference/<key>) so that it is whole or absent: `write(tmp)` fills
    a temporary sibling, ft's marker goes in (only entries ft wrote are ever deleted), the files reach the disk, and
    it is renamed into place. Another process's entry that got there first is kept, unless `replace` (the entry there
    failed a check): then it is removed first, if ft provably wrote it. Leftovers of writers that died are removed on
    the way. Raises OSError (a full disk) only when no entry is there afterwards."""
    from ft_cli.atomic import finish_tree, publish_once, remove_debris, tmp_path
    from ft_cli.run_dir import write_marker

    root = final.parent
    root.mkdir(parents=True, exist_ok=True)
    remove_debris(root)  # entries that ft processes which died (kill -9, full disk) left half-written
    tmp = tmp_path(final)
    try:
        tmp.mkdir()
        write(tmp)
        write_marker(tmp, "cache")
        finish_tree(tmp)
        if replace and ft_entry_kind(final) == root.name:
            shutil.rmtree(final)
        publish_once(tmp, final)  # another process may have finished first; its entry is just as good
    except OSError:
        if not final.exists():
            raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def ft_entry_kind(path: Path) -> str | None:
    """data | reference | builtin | leftover when ft provably wrote `path` (its name and ft's own file inside), else None.
    The one rule `ft cache clean` deletes by."""
    if path.is_symlink() or not path.is_dir():
        return None
    name, parent = path.name, path.parent.name
    if parent in _KEYED and _DATA_ENTRY.match(name) and (path / "meta.json").is_file():
        return parent
    if parent == "builtin" and _BUILTIN_ENTRY.match(name) and (path / "ft_builtin.json").is_file():
        return "builtin"
    if (parent in _KEYED and _ENTRY_TMP.match(name)) or (parent == "builtin" and _BUILTIN_TMP.match(name)):
        return "leftover"
    return None


def scan(root: Path | None = None) -> tuple[list[Entry], list[Path]]:
    """(ft's entries, everything else found in the cache)."""
    root = root or cache_root()
    entries: list[Entry] = []
    foreign: list[Path] = []
    if not root.is_dir():
        return entries, foreign
    for top in sorted(root.iterdir()):
        if top.name not in (*_KEYED, "builtin") or top.is_symlink() or not top.is_dir():
            foreign.append(top)
            continue
        for path in sorted(top.iterdir()):
            kind = ft_entry_kind(path)
            if kind is None:
                foreign.append(path)
            else:
                entries.append(Entry(kind, path, _size(path), _last_used(path, kind), _describe(path, kind)))
    return entries, foreign


def _size(path: Path) -> int:
    total = 0
    for dirpath, _, files in os.walk(path):
        for f in files:
            try:
                total += os.lstat(os.path.join(dirpath, f)).st_size
            except OSError:
                pass
    return total


def _last_used(path: Path, kind: str) -> float:
    marker = path / ("ft_builtin.json" if kind == "builtin" else "meta.json")
    try:
        return (marker if marker.exists() else path).stat().st_mtime  # ft touches the marker on every use
    except OSError:
        return 0.0


def _describe(path: Path, kind: str) -> str:
    import json

    try:
        if kind == "data":
            meta = json.loads((path / "meta.json").read_text())
            stats = meta.get("train_stats") or {}
            sources = ", ".join(str(s.get("path")) for s in stats.get("sources") or [])
            return f"tokenized data: {sources or '?'} ({stats.get('rows', '?')} train examples)"
        if kind == "reference":
            meta = json.loads((path / "meta.json").read_text())
            return f"DPO reference log-probabilities: {meta.get('model', '?')} on {meta.get('pairs', '?')} pairs"
        if kind == "builtin":
            marker = json.loads((path / "ft_builtin.json").read_text())
            return f"built-in model {marker.get('name', '?')}"
    except (OSError, ValueError, AttributeError):
        return f"{kind} entry (unreadable description)"
    return "left by an interrupted write"


def select(entries: list[Entry], kinds: list[str], older_than_days: float | None) -> list[Entry]:
    now = time.time()
    chosen = []
    for e in entries:
        if e.kind not in kinds:
            continue
        if e.kind == "leftover" and now - e.last_used < LEFTOVER_AGE_S:
            continue
        if older_than_days is not None and now - e.last_used < older_than_days * 86400:
            continue
        chosen.append(e)
    return chosen


# The commands ----------------------------------------------------------------------------------------------------

def list_cache(console: Any = None) -> list[Entry]:
    """One line per entry (newest use first), plain so it greps and never wraps in a log."""
    console = console or _console()
    root = cache_root()
    entries, foreign = scan(root)
    console.print(f"ft cache: {root}", markup=False)
    for e in sorted(entries, key=lambda e: -e.last_used):
        console.print(f"{e.kind:<8} {human_bytes(e.bytes):>10}  {_when(e.last_used)}  {e.path.name}  {e.what}",
                      markup=False, soft_wrap=True)
    console.print(f"{len(entries)} entries, {human_bytes(sum(e.bytes for e in entries))}", markup=False)
    _print_foreign(console, foreign)
    return entries


def cache_size(console: Any = None) -> dict[str, int]:
    console = console or _console()
    root = cache_root()
    entries, foreign = scan(root)
    sizes = {k: sum(e.bytes for e in entries if e.kind == k) for k in KINDS}
    for kind in KINDS:
        count = sum(e.kind == kind for e in entries)
        console.print(f"{kind:<9} {human_bytes(sizes[kind]):>10}  ({count} entries)", markup=False)
    console.print(f"{'total':<9} {human_bytes(sum(sizes.values())):>10}  in {root}", markup=False)
    _print_foreign(console, foreign)
    return sizes


def clean_cache(*, kinds: list[str] | None = None, older_than_days: float | None = None, dry_run: bool = False,
                console: Any = None) -> list[Entry]:
    """Delete ft's entries of `kinds` (default: all) not used for `older_than_days`; returns what was (or, with
    `dry_run`, would be) deleted."""
    bad = [k for k in kinds or [] if k not in KINDS]
    if bad:
        raise UserError(f"--kind: must be one of {', '.join(KINDS)}, got {', '.join(map(repr, bad))}")
    console = console or _console()
    if older_than_days is not None and older_than_days < 0:
        raise UserError(f"--older-than: must be at least 0 days, got {older_than_days:g}")
    root = cache_root()
    entries, foreign = scan(root)
    chosen = select(entries, kinds or list(KINDS), older_than_days)
    verb = "would delete" if dry_run else "deleted"
    freed = 0
    for e in chosen:
        if not dry_run:
            if ft_entry_kind(e.path) != e.kind:  # changed since the scan: leave it alone
                continue
            shutil.rmtree(e.path)
        freed += e.bytes
        console.print(f"{verb} {e.kind} {e.path.name} ({human_bytes(e.bytes)}): {e.what}", markup=False,
                      soft_wrap=True)
    kept = len(entries) - len(chosen)
    console.print(f"{verb} {len(chosen)} entries, {human_bytes(freed)}; kept {kept} in {root}", markup=False)
    _print_foreign(console, foreign)
    return chosen


def _print_foreign(console: Any, foreign: list[Path]) -> None:
    if foreign:
        names = ", ".join(str(p) for p in foreign[:5]) + (f" and {len(foreign) - 5} more" if len(foreign) > 5 else "")
        console.print(f"not ft's, left alone: {names}", markup=False, soft_wrap=True)


def _console() -> Any:
    from rich.console import Console

    return Console(highlight=False)


def human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GiB"  # pragma: no cover


def _when(t: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M", time.localtime(t)) if t else "?"
