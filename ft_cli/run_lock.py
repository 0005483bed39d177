"""One writer per run directory: an exclusive flock on RUN/.ft.lock, held by the main process of `ft train` from
before the model loads until it exits.

flock is an OS lock on the open file, not a file that says "locked": the kernel releases it when the process ends
in any way (kill -9, a crash, a power cut), so no stale lock can outlive its holder, and a run.json still saying
"running" with nobody holding the lock is a crashed run. The lock file also records who holds it (pid, host, start
time), for the message that turns a second writer away. The file itself is never deleted: a process that locked
a deleted file would not exclude one that creates a new one.
On network filesystems flock is as good as the server's lock support (NFSv4 has it); without fcntl (Windows) runs
are not locked.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import time
import weakref
from pathlib import Path

from ft_cli.errors import UserError
from ft_cli.lock_holder import LOCK_FILE, in_use_error, lock_holder  # noqa: F401  (imported from here too)
from ft_cli.lock_holder import read_holder as _read_holder
from ft_cli.run_dir import RunDir, check_run_dir, now_iso

try:
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None  # type: ignore[assignment]

ACQUIRE_TRIES = 20  # a reader probing the lock (ft report, a second ft train) holds it shared for microseconds
ACQUIRE_WAIT_S = 0.05


class RunLock:
    """The held lock of one run directory. `release()` when the run ends; `abandon()` when setup fails before the
    run began, which also removes what taking the lock created (the lock file, directories made for the run)."""

    def __init__(self, run: RunDir, fd: int | None, created: list[Path], lock_created: bool):
        self.run, self._fd, self._created, self._lock_created = run, fd, created, lock_created
        if fd is not None and hasattr(os, "register_at_fork"):  # every forked child lets go: see close_in_child
            ref = weakref.ref(self)
            os.register_at_fork(after_in_child=lambda: (lock := ref()) is not None and lock.close_in_child())

    @property
    def held(self) -> bool:
        return self._fd is not None

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing the last descriptor releases the flock
            self._fd = None

    def close_in_child(self) -> None:
        """In a process forked from the holder (a DataLoader worker, a tokenizing worker; every fork runs this): close
        this process's copy of the descriptor.
        The flock belongs to the open file, shared across fork, so a child that kept it would hold the run directory
        after the holder was killed (kill -9 then resume would be turned away until the child noticed)."""
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def abandon(self) -> None:
        if self._fd is None:
            return
        with contextlib.suppress(OSError):
            if self._lock_created and _only_entry(self.run.root, LOCK_FILE):
                self.run.lock_file.unlink()
        _remove_created(self._created)
        self.release()


def acquire_run_lock(run: RunDir, *, resume: bool, overwrite: bool, command: str = "ft train") -> RunLock:
    """Main process only: create the run directory if needed, take its lock (exit 2 naming the holder when another
    process has it), and check the directory again with the lock held, so that nothing can change it between the
    check and the run."""
    root = run.root
    missing = []
    p = root.absolute()
    while not p.exists() and p != p.parent:
        missing.append(p)
        p = p.parent
    try:
        root.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise _cannot_write(root, exc) from None
    created = [d for d in missing if d.is_dir()]  # deepest first
    lock_created = not run.lock_file.exists()
    try:
        fd = os.open(run.lock_file, os.O_RDWR | os.O_CREAT, 0o666)
    except OSError as exc:
        _remove_created(created)
        raise _cannot_write(root, exc) from None
    lock = RunLock(run, fd, created, lock_created)
    try:
        _lock(fd, root)
        _write_holder(fd, command)
        check_run_dir(run, resume=resume, overwrite=overwrite, probe_lock=False)
    except BaseException:
        lock.abandon()
        raise
    return lock


def _lock(fd: int, root: Path) -> None:
    if fcntl is None:
        return
    for attempt in range(ACQUIRE_TRIES):
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return
        except BlockingIOError:
            if attempt == ACQUIRE_TRIES - 1:
                raise in_use_error(root, _read_holder(fd)) from None
            time.sleep(ACQUIRE_WAIT_S)  # perhaps only a probe (a shared lock for microseconds)


def _write_holder(fd: int, command: str) -> None:
    info = {"pid": os.getpid(), "host": socket.gethostname(), "since": now_iso(), "command": command}
    with contextlib.suppress(OSError):  # who holds it is for messages only; a full disk must not stop the lock
        os.ftruncate(fd, 0)
        os.pwrite(fd, (json.dumps(info) + "\n").encode(), 0)
        os.fsync(fd)


def _remove_created(created: list[Path]) -> None:
    """Directories made for a run that never began, deepest first, each only if still empty."""
    for directory in created:
        try:
            directory.rmdir()
        except OSError:
            return


def _only_entry(directory: Path, name: str) -> bool:
    try:
        return os.listdir(directory) == [name]
    except OSError:
        return False


def _cannot_write(root: Path, exc: OSError) -> UserError:
    from ft_cli.atomic import is_disk_full

    if isinstance(exc, (NotADirectoryError, FileExistsError)):
        return UserError(f"output_dir {root}: a part of this path is a file, not a directory")
    if is_disk_full(exc):
        return UserError(f"output_dir {root}: disk full ({exc.strerror}); free space, or choose an --output-dir "
                         "on another disk")
    return UserError(f"output_dir {root}: not writable ({exc.strerror or exc})")
