"""Who holds a run directory's lock (RUN/.ft.lock), probed without taking it. A leaf below run_dir.py and
run_lock.py (which takes the lock; its docstring says how the lock works)."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from ft_cli.errors import UserError

try:
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None  # type: ignore[assignment]

LOCK_FILE = ".ft.lock"


def lock_holder(root: Path) -> dict[str, Any] | None:
    """Who holds the run directory's lock ({"pid", "host", "since", "command"}), or None when nobody does. Probes
    with a shared lock, so two processes probing at once do not see each other."""
    if fcntl is None:
        return None
    try:
        fd = os.open(Path(root) / LOCK_FILE, os.O_RDONLY)
    except OSError:
        return None  # no lock file (or unreadable): nobody can be holding it
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            return read_holder(fd)
        fcntl.flock(fd, fcntl.LOCK_UN)
        return None
    finally:
        os.close(fd)


def in_use_error(root: Path, holder: dict[str, Any]) -> UserError:
    who = f"pid {holder.get('pid', '?')} on {holder.get('host', '?')}"
    since = f", since {holder['since']}" if holder.get("since") else ""
    return UserError(f"output_dir {root} is in use by another ft process ({who}{since}: "
                     f"{holder.get('command') or 'ft train'}); one process at a time writes a run directory. Wait "
                     "for it to finish or stop it, or use --output-dir for a new run")


def read_holder(fd: int) -> dict[str, Any]:
    try:
        data = json.loads(os.pread(fd, 4096, 0) or b"{}")
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}
