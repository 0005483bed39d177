"""Writing files so that no reader, crash, full disk or Ctrl-C ever sees half of one. A leaf: no ft imports.

Every file or directory ft produces is written under a temporary name beside its final path
(`.NAME.ft-tmp-PID-XXXX`), flushed to disk (fsync), given the user's umask, and renamed into place: a rename within
one filesystem is atomic, so the final path holds the old content or the new, never a mix. Temporary names carry
the writer's pid, so debris left by a process that died (kill -9, power loss) is recognised and removed by the next
ft that writes there (`remove_debris`).
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import os
import re
import shutil
import signal
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO, Any

TMP_TAG = ".ft-tmp-"
# .NAME.ft-tmp-PID-XXXX (being written), .NAME.ft-old-PID-XXXX (moved aside while replaced); without -PID-XXXX
# when several processes of one run write it together under the run's lock (checkpoints/.step-N.ft-tmp)
_DEBRIS_NAME = re.compile(r"^\.(?P<name>.+)\.ft-(?P<what>tmp|old)(-(?P<pid>\d+)-[0-9a-f]+)?$")
STALE_AFTER_S = 600  # and a debris without a live writer must be this old: a pid may be another host's
DISK_FULL_ERRNOS = (errno.ENOSPC, errno.EDQUOT)
# A write that fails with less than this free has, for all practical purposes, failed because the disk is full
# (torch.save reports ENOSPC as a RuntimeError that only keeps the OSError as its context).
NEARLY_FULL_BYTES = 1 << 20


def file_mode() -> int:
    """The mode a new file gets under the user's umask (0o644 for the usual 022)."""
    mask = os.umask(0)
    os.umask(mask)
    return 0o666 & ~mask


def tmp_path(path: Path) -> Path:
    """A fresh temporary sibling of `path`, named so that `remove_debris` can tell whose it is."""
    return path.with_name(f".{path.name}{TMP_TAG}{os.getpid()}-{uuid.uuid4().hex[:8]}")


@contextlib.contextmanager
def atomic_file(path: Path, mode: str = "w") -> Iterator[IO[Any]]:
    """Open a temporary sibling of `path` for writing ("w" text, "wb" bytes; created under the user's umask); on a
    clean exit it is fsynced and renamed over `path`. On any error (full disk, Ctrl-C) the temporary file is removed and `path` is untouched."""
    path = Path(path)
    tmp = tmp_path(path)
    try:
        binary = "b" in mode
        with open(tmp, "wb" if binary else "w", **({} if binary else {"encoding": "utf-8"})) as fh:
            yield fh
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise
    fsync_dir(path.parent)


def write_text_atomic(path: Path, text: str) -> None:
    with atomic_file(path, "w") as fh:
        fh.write(text)


def write_bytes_atomic(path: Path, data: bytes) -> None:
    with atomic_file(path, "wb") as fh:
        fh.write(data)


def fsync_dir(path: Path) -> None:
    """Make a rename or a new entry in `path` durable (a no-op where directories cannot be opened)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def finish_tree(root: Path) -> None:
    """Before a directory written under a temporary name is renamed into place: every file gets the user's umask
    (safetensors writes 0600 through its own temporary file) and reaches the disk, then the directories do."""
    mode = file_mode()
    for dirpath, _, files in os.walk(root):
        for name in files:
            file = os.path.join(dirpath, name)
            if os.path.islink(file):
                continue
            if os.stat(file).st_mode & 0o777 != mode:
                os.chmod(file, mode)
            fd = os.open(file, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        fsync_dir(Path(dirpath))


@contextlib.contextmanager
def signals_deferred() -> Iterator[None]:
    """Hold SIGINT and SIGTERM back (they are delivered on exit) while a few renames must happen together."""
    sigs = {signal.SIGINT, signal.SIGTERM}
    try:
        old = signal.pthread_sigmask(signal.SIG_BLOCK, sigs)
    except (AttributeError, ValueError, OSError):  # no pthread_sigmask here: nothing to defer with
        yield
        return
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old)


def write_dir(target: Path, write: Callable[[Path], Any]) -> None:
    """Build a directory with `write(tmp)` under a temporary name, then put it at `target`, replacing an old copy
    (the caller has decided it may). Readers see the old directory or the new one, whole; if `write` fails, the old
    one is kept and the partial one removed."""
    target = Path(target)
    tmp = tmp_path(target)
    try:
        tmp.mkdir()
        write(tmp)
        finish_tree(tmp)
        swap_in(tmp, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def swap_in(tmp: Path, target: Path) -> None:
    """Rename the finished directory `tmp` to `target`; an existing `target` is moved aside first and removed after.
    No signal can land between the two renames; a crash there leaves the old copy under `.NAME.ft-old-PID-XXXX`,
    which `remove_debris` puts back."""
    old = None
    with signals_deferred():
        if target.exists() or target.is_symlink():
            old = target.with_name(f".{target.name}.ft-old-{os.getpid()}-{uuid.uuid4().hex[:8]}")
            os.replace(target, old)
        os.replace(tmp, target)
    fsync_dir(target.parent)
    if old is not None:
        remove_path(old)


def publish_once(tmp: Path, target: Path, complete: Callable[[Path], bool] = Path.exists) -> bool:
    """Rename the finished directory `tmp` to `target` unless a complete `target` is there already: for caches,
    where another process may publish an identical entry first (theirs is kept). True when `tmp` went in."""
    if complete(target):
        return False
    try:
        os.rename(tmp, target)  # fails when target exists and is not empty: someone else published first
    except OSError:
        if not complete(target):
            raise
        return False
    fsync_dir(target.parent)
    return True


def discard(path: Path) -> None:
    """Remove a directory so that it is gone at once: renamed to a temporary name first, then deleted (a kill
    during the deletion leaves debris that remove_debris recognises, not a directory missing half its files)."""
    doomed = tmp_path(path)
    try:
        os.replace(path, doomed)
    except FileNotFoundError:
        return
    remove_path(doomed)


def remove_path(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()


def _pid_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's live process
        return True
    return True


def is_debris_name(name: str) -> bool:
    """Whether `name` is one ft gives a temporary file or directory (or an old copy moved aside)."""
    return _DEBRIS_NAME.match(name) is not None


def remove_debris(directory: Path, *, include_live: bool = False) -> list[str]:
    """Remove what ft processes that are no longer running left half-written in `directory` (temporaries named by
    `tmp_path` whose pid is gone and which are older than STALE_AFTER_S), and put back a copy that was moved aside
    for a replacement that never finished. With `include_live`, the caller holds the lock of the directory (a run
    directory) and every ft temporary there is debris. Returns the names removed."""
    removed: list[str] = []
    try:
        entries = list(Path(directory).iterdir())
    except OSError:
        return removed
    now = time.time()
    for entry in entries:
        match = _DEBRIS_NAME.match(entry.name)
        if match is None:
            continue
        if not include_live:
            try:
                age = now - entry.lstat().st_mtime
            except OSError:
                continue
            if match["pid"] is None or _pid_alive(int(match["pid"])) or age < STALE_AFTER_S:
                continue
        original = entry.with_name(match["name"])
        if match["what"] == "old" and not original.exists():
            os.replace(entry, original)  # the replacement never arrived: the old copy is the real one
            continue
        remove_path(entry)
        removed.append(entry.name)
    return removed


def is_disk_full(exc: BaseException, where: Path | None = None) -> bool:
    """Whether `exc` (or an error it was raised from) means the disk or the user's quota is full. safetensors and
    torch report it in their own exception types; as a last resort, a failed write with (almost) no free space
    left at `where` counts."""
    seen: set[int] = set()
    e: BaseException | None = exc
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if isinstance(e, OSError) and e.errno in DISK_FULL_ERRNOS:
            return True
        text = str(e)
        if "No space left on device" in text or "Disk quota exceeded" in text or "os error 28" in text:
            return True
        e = e.__cause__ or e.__context__
    if where is not None and isinstance(exc, (OSError, RuntimeError)):
        free = free_bytes(where)
        return free is not None and free < NEARLY_FULL_BYTES
    return False


def free_bytes(path: Path) -> int | None:
    """Free bytes for an unprivileged user on the filesystem that holds `path` (or would: its nearest existing
    ancestor); None when that cannot be told."""
    p = Path(path).absolute()
    while not p.exists() and p != p.parent:
        p = p.parent
    try:
        return shutil.disk_usage(p).free
    except OSError:
        return None


def tree_bytes(path: Path) -> int:
    total = 0
    for dirpath, _, files in os.walk(path):
        for name in files:
            with contextlib.suppress(OSError):
                total += os.lstat(os.path.join(dirpath, name)).st_size
    return total


def file_digest(path: Path) -> str:
    with open(path, "rb") as fh:
        return hashlib.file_digest(fh, "sha256").hexdigest()
