"""The run directory (SPEC.md), and the rules for every directory ft writes: what it may replace, and how.

The rules, in one place (every command that writes a directory goes through `prepare_output_dir`):
- ft replaces or deletes only what it can prove it wrote: a directory whose manifest says ft made it for this kind
  of output (`run.json` for a run directory; `.ft-output.json` for `ft merge --out`, `ft preprocess --out`,
  `ft export --out` and cache entries). Never a regular file, never a directory without that manifest, never one
  that also holds entries ft did not write. Replacing needs `--overwrite`, and ft prints what it removes.
- New outputs are built under a temporary name and renamed into place (ft_cli.atomic): whole or absent.
- One writer per run directory: `ft train` holds an OS lock (flock) on RUN/.ft.lock for as long as it runs
  (ft_cli.run_lock); the kernel drops it when the process dies, so kill -9 leaves no stale lock.
"""

from __future__ import annotations

import contextlib
import errno
import fnmatch
import json
import os
import re
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ft_cli.atomic import (
    discard,
    finish_tree,
    free_bytes,
    is_debris_name,
    is_disk_full,
    remove_debris,
    remove_path,
    swap_in,
    tmp_path,
    tree_bytes,
    write_text_atomic,
)
from ft_cli.errors import UserError
from ft_cli.lock_holder import LOCK_FILE, in_use_error, lock_holder
from ft_cli.progress import format_bytes

__all__ = ["RunDir", "OutputDir", "prepare_output_dir", "remove_output_dir", "output_kind", "check_run_dir",
           "prepare_run_dir", "clear_run_dir", "remove_run_debris", "check_free_space", "write_text_atomic", "now_iso", "MARKER",
           "LOCK_FILE", "KINDS"]

MARKER = ".ft-output.json"  # the manifest of a non-run output: {"kind", "ft_version", "created_at", "entries"}
KINDS = ("run", "merge", "combine", "preprocess", "export", "cache")
# What ft eval and ft report add to a run-like directory (a run, an `ft merge --combine` output) after it was made
WRITTEN_LATER = ("eval*.json", "report")
# What ft train (and ft eval / ft report) write into a run directory; anything else there is the user's.
RUN_LAYOUT = ("recipe.yaml", "metrics.jsonl", "run.json", "adapter", "model", "best", "checkpoints", "wandb",
              "mlruns", LOCK_FILE, *WRITTEN_LATER)
# What ft 0.1 wrote for the other kinds, before .ft-output.json listed the entries
_LEGACY_LAYOUT = {
    "merge": ("config.json", "generation_config.json", "*.safetensors", "model.safetensors.index.json",
              "tokenizer*", "special_tokens_map.json", "added_tokens.json", "vocab.json", "merges.txt",
              "chat_template.jinja", "merge_report.json"),
    "preprocess": ("dataset_dict.json", "train", "eval", "stats.json"),
    "cache": ("dataset", "meta.json",  # a tokenized-data entry; a built-in model (ft_cli.builtin_models):
              "ft_builtin.json", "config.json", "generation_config.json", "*.safetensors", "tokenizer*", "*.jinja",
              "special_tokens_map.json"),
}
_LEGACY_TMP = re.compile(r"^\.(run\.json\.tmp\d+|.+\.tmp|.+\.old|tmp-step-\d+)$")  # names ft 0.1 wrote


@dataclass(frozen=True)
class RunDir:
    root: Path

    @property
    def recipe(self) -> Path:
        return self.root / "recipe.yaml"

    @property
    def metrics(self) -> Path:
        return self.root / "metrics.jsonl"

    @property
    def manifest(self) -> Path:
        return self.root / "run.json"

    @property
    def lock_file(self) -> Path:
        return self.root / LOCK_FILE

    @property
    def adapter(self) -> Path:
        return self.root / "adapter"

    @property
    def model(self) -> Path:
        return self.root / "model"

    @property
    def best(self) -> Path:
        """Copy of the output (adapter/ or model/) at the best eval_loss, when evaluation ran."""
        return self.root / "best"

    @property
    def checkpoints(self) -> Path:
        return self.root / "checkpoints"

    @property
    def eval_json(self) -> Path:
        return self.root / "eval.json"

    def output(self, whole_model: bool) -> Path:
        return self.model if whole_model else self.adapter

    def final_output(self) -> Path:
        """adapter/ or model/, whichever this run wrote."""
        for p in (self.adapter, self.model):
            if p.is_dir():
                return p
        raise UserError(f"{self.root}: no adapter/ or model/ inside; is this a finished ft run directory?")

    # Checkpoints -----------------------------------------------------------------------------------------------
    def checkpoint(self, step: int) -> Path:
        return self.checkpoints / f"step-{step}"

    def whole_checkpoints(self) -> list[tuple[int, Path]]:
        """Checkpoints that were renamed into place (state.json is written last, inside the temporary directory);
        ft_cli.checkpoint.newest_whole_checkpoint also checks their checksums."""
        found = []
        if self.checkpoints.is_dir():
            for p in self.checkpoints.iterdir():
                if p.name.startswith("step-") and (p / "state.json").is_file():
                    try:
                        found.append((int(p.name[5:]), p))
                    except ValueError:
                        continue
        return sorted(found)

    def latest_checkpoint(self) -> Path | None:
        found = self.whole_checkpoints()
        return found[-1][1] if found else None

    # Manifest --------------------------------------------------------------------------------------------------
    def read_manifest(self) -> dict[str, Any]:
        try:
            data = json.loads(self.manifest.read_text())
        except (OSError, ValueError):
            return {}
        return data if isinstance(data, dict) else {}

    def write_manifest(self, data: dict[str, Any]) -> None:
        write_text_atomic(self.manifest, json.dumps(data, indent=2, default=str) + "\n")

    def status(self) -> str:
        """run.json's status, except that "running" with no process holding the run's lock reads "crashed"."""

        status = str(self.read_manifest().get("status", "unknown"))
        if status == "running" and lock_holder(self.root) is None:
            return "crashed"
        return status


# Which directories are ft's ------------------------------------------------------------------------------------

def output_kind(path: Path) -> str | None:
    """The kind of ft output at `path` according to its manifest (one of KINDS), or None: not provably ft's."""
    marker = _read_json(path / MARKER)
    if marker.get("kind") in KINDS:
        return marker["kind"]
    manifest = _read_json(path / "run.json")
    if "status" in manifest and ("recipe_hash" in manifest or "started_at" in manifest):
        return "run"
    # Outputs of ft 0.1, before .ft-output.json existed
    if "parity" in _read_json(path / "merge_report.json"):
        return "merge"
    if "train_stats" in _read_json(path / "stats.json") and (path / "dataset_dict.json").is_file():
        return "preprocess"
    if "fingerprint" in _read_json(path / "meta.json") and (path / "dataset").is_dir():
        return "cache"  # a tokenized-data cache entry (ft_cli.data.cache)
    if str(_read_json(path / "ft_builtin.json").get("name", "")).startswith("builtin:"):
        return "cache"  # a built-in model ft built (ft_cli.builtin_models)
    return None


def _ft_entries(path: Path, kind: str) -> set[str]:
    """The names in `path` that ft wrote there, for a directory whose manifest says it is an ft `kind`."""
    names = set(os.listdir(path))
    marker = _read_json(path / MARKER)
    if kind != "run" and marker:
        ours = names & {MARKER, *(marker.get("entries") or [])}  # exactly what it wrote
        if kind == "combine":
            ours |= {n for n in names if any(fnmatch.fnmatchcase(n, pat) for pat in WRITTEN_LATER)}
    else:
        patterns = (*RUN_LAYOUT, *(_read_json(path / "run.json").get("tracker_dirs") or [])) if kind == "run" \
            else _LEGACY_LAYOUT.get(kind, ())
        ours = {n for n in names if any(fnmatch.fnmatchcase(n, pat) for pat in patterns)}
    return ours | {n for n in names if _is_debris(n)}


def _is_debris(name: str) -> bool:
    return is_debris_name(name) or bool(_LEGACY_TMP.match(name))


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def write_marker(directory: Path, kind: str) -> None:
    """Mark `directory` (being built under a temporary name) as an ft output of `kind`, listing its entries."""
    from ft_cli import __version__

    assert kind in KINDS, kind
    entries = sorted(n for n in os.listdir(directory) if n != MARKER)
    data = {"kind": kind, "ft_version": __version__, "created_at": now_iso(), "entries": entries}
    write_text_atomic(directory / MARKER, json.dumps(data, indent=2) + "\n")


# Preparing an output directory ---------------------------------------------------------------------------------

@dataclass
class OutputDir:
    """Where a command will write a directory of one kind, checked by `prepare_output_dir`.

    `replaces` lists what is there now and will be removed (an earlier output of the same kind, --overwrite);
    `writing()` builds the new directory under a temporary name and puts it in place."""

    path: Path
    kind: str
    option: str = "--out"
    replaces: list[str] = field(default_factory=list)
    overwrite: bool = False

    @contextlib.contextmanager
    def writing(self) -> Iterator[Path]:
        """Yield an empty temporary directory beside `path` to write into. On success it gets the manifest, the
        user's umask and an fsync, and replaces `path` (printing what it removes); on any error, full disk or
        Ctrl-C included, it is removed and `path` is as it was. A full disk is reported as one message (exit 2)."""
        parent = self.path.parent
        try:
            parent.mkdir(parents=True, exist_ok=True)
            remove_debris(parent)  # temporaries of ft processes that died (kill -9) while writing here
            tmp = tmp_path(self.path)
            tmp.mkdir()
        except OSError as exc:
            raise _not_writable(self.option, self.path, exc) from None
        try:
            yield tmp
            write_marker(tmp, self.kind)
            finish_tree(tmp)
            self._put_in_place(tmp)
        except BaseException as exc:
            remove_path(tmp)
            if isinstance(exc, Exception) and is_disk_full(exc, parent):

                raise UserError(f"{self.option} {self.path}: disk full while writing it ({_strerror(exc)}); nothing "
                                f"was written there and the partial copy was removed. Free space (about "
                                f"{format_bytes(free_bytes(parent) or 0)} free now) and run the command again") from None
            raise

    def _put_in_place(self, tmp: Path) -> None:
        # Checked again now: another process may have written here while this one worked.
        again = prepare_output_dir(self.path, kind=self.kind, overwrite=self.overwrite, option=self.option)
        if again.replaces:
            _say(f"{self.option} {self.path}: replacing the previous {self.kind} output: {_names(again.replaces, self.path)}")
        swap_in(tmp, self.path)  # what was there (an earlier output, or an empty directory) is removed after


def prepare_output_dir(path: Path | str, *, kind: str, overwrite: bool = False, option: str = "--out") -> OutputDir:
    """Check that a command may write a directory of `kind` at `path`, before it does any work; UserError (exit 2)
    otherwise. Call it first thing, then write with `prepare_output_dir(...).writing()`:

        out = prepare_output_dir(args.out, kind="export", overwrite=args.overwrite)
        ...                                     # load, convert, check
        with out.writing() as tmp:              # a temporary sibling of args.out
            save_everything_into(tmp)           # on success it becomes args.out, whole

    Refused: `path` is a file (or a broken link), its parent cannot be created or written, it holds entries ft
    did not write (ft never deletes them), it holds another kind of ft output, or it holds an earlier output of
    this kind and `overwrite` is false."""
    assert kind in KINDS, kind
    path = Path(path).expanduser()
    if path.is_symlink():
        if not path.exists():
            raise UserError(f"{option} {path}: a symbolic link to nowhere; ft does not replace links")
        path = path.resolve()  # write where the link points; the link itself is the user's
    if path.exists() and not path.is_dir():
        raise UserError(f"{option} {path}: is a file, not a directory; ft never replaces a file. Choose another "
                        "path")
    if not path.exists():
        _check_creatable(path, option)
        return OutputDir(path, kind, option, overwrite=overwrite)
    try:
        names = sorted(os.listdir(path))
    except OSError as exc:
        raise _not_writable(option, path, exc) from None
    if not os.access(path, os.W_OK | os.X_OK):
        raise _not_writable(option, path, OSError(errno.EROFS, "read-only file system") if _read_only_fs(path)
                            else PermissionError(errno.EACCES, "permission denied"))
    if all(_is_debris(n) or n == LOCK_FILE for n in names):
        return OutputDir(path, kind, option, overwrite=overwrite)  # empty, but for what an ft process that died left
    found = output_kind(path)
    if found is None:
        raise UserError(f"{option} {path} already exists and is not empty, and holds files ft did not write "
                        f"({_names(names, path)}); ft never deletes them. Choose a new directory, or empty this one "
                        "yourself")
    if found != kind:
        raise UserError(f"{option} {path} holds an ft {found} output, not a {kind}; ft replaces an output only with "
                        "one of the same kind. Choose another directory")
    ours = _ft_entries(path, kind)
    foreign = [n for n in names if n not in ours]
    if not overwrite:
        raise UserError(f"{option} {path} already exists and is not empty: it holds an earlier ft {kind} output; "
                        "use --overwrite to replace it, or choose a new directory")
    if foreign:
        raise UserError(f"{option} {path}: --overwrite would replace an earlier ft {kind} output, but the directory "
                        f"also holds {len(foreign)} entries ft did not write ({_names(foreign, path)}); ft never deletes "
                        "them. Move them out and run the command again")
    replaces = [n for n in names if n not in (LOCK_FILE, MARKER) and not _is_debris(n)]
    return OutputDir(path, kind, option, replaces, overwrite)


def remove_output_dir(path: Path | str, *, kind: str) -> list[str]:
    """Delete a directory that ft wrote as an output of `kind` (e.g. a cache entry for `ft cache clean`); UserError
    for anything else: no ft manifest of that kind, or entries ft did not write. Returns the names removed."""
    path = Path(path).expanduser()
    if not path.is_dir() or path.is_symlink():
        raise UserError(f"{path}: not a directory ft wrote; ft removes only its own output directories")
    found = output_kind(path)
    if found != kind:
        raise UserError(f"{path}: not an ft {kind} output ({'no ft manifest' if found is None else found}); "
                        "ft does not delete it")
    if kind == "run":

        holder = lock_holder(path)
        if holder is not None:
            raise in_use_error(path, holder)
    names = sorted(os.listdir(path))
    foreign = [n for n in names if n not in _ft_entries(path, kind)]
    if foreign:
        raise UserError(f"{path}: holds entries ft did not write ({_names(foreign, path)}); ft does not delete it")
    remove_path(path)
    return names


# The run directory ---------------------------------------------------------------------------------------------

def check_run_dir(run: RunDir, *, resume: bool, overwrite: bool, probe_lock: bool = True) -> None:
    """Refuse to clobber an existing run unless told to (--resume continues it, --overwrite replaces it), and to
    touch one that an ft process is running in. Read-only, so that every process of a multi-process run can check
    before any of them changes anything."""

    root = run.root
    if resume and overwrite:
        raise UserError("--resume and --overwrite contradict each other; pick one")
    if root.exists() and not root.is_dir():
        raise UserError(f"output_dir {root}: is a file, not a directory; ft never replaces a file")
    if probe_lock and root.is_dir():
        holder = lock_holder(root)
        if holder is not None:
            raise in_use_error(root, holder)
    if resume:
        if not root.is_dir():
            raise UserError(f"--resume: run directory {root} does not exist")
        if run.latest_checkpoint() is None:
            raise UserError(f"--resume: {root} has no whole checkpoint to resume from (checkpoints/step-N/)")
        return
    try:
        prepare_output_dir(root, kind="run", overwrite=overwrite, option="output_dir")
    except UserError as exc:
        if root.is_dir() and output_kind(root) == "run" and not overwrite:
            status = run.status()
            if status == "crashed":
                status = "crashed: run.json says running, but no ft process holds its lock"
            raise UserError(f"output_dir {root} already holds a run (status: {status}); use --resume to continue "
                            "it, --overwrite to replace it, or --output-dir for a new one") from None
        raise exc from None


def prepare_run_dir(run: RunDir, *, resume: bool) -> None:
    """Main process, lock held, model loaded: make the run directory ready to write into. --resume: remove what a
    crash left half-written; otherwise remove an earlier run (--overwrite, allowed by check_run_dir)."""
    if resume:
        remove_run_debris(run)
    else:
        clear_run_dir(run)


def clear_run_dir(run: RunDir) -> list[str]:
    """--overwrite, once the model has loaded: remove the previous run's files (checked by check_run_dir, with the
    run's lock held), saying what goes. The lock file stays: it is what this process holds."""
    root = run.root
    names = [n for n in sorted(os.listdir(root)) if n != LOCK_FILE]
    shown = [n for n in names if not _is_debris(n)]
    if shown:
        _say(f"--overwrite: removing the previous run in {root}: {_names(shown, root, limit=20)}")
    # Each entry vanishes at once (renamed, then deleted), and run.json last: killed half way, the directory is
    # still recognisably ft's run.
    for name in sorted(names, key=lambda n: n == "run.json"):
        entry = root / name
        if entry.is_dir() and not entry.is_symlink():
            discard(entry)
        else:
            remove_path(entry)
    return names


def remove_run_debris(run: RunDir) -> list[str]:
    """With the run's lock held: everything ft left half-written in the run directory (a checkpoint, best/, a
    manifest being replaced when the process died or the disk filled) is removed, or put back when it was an old
    copy moved aside for a replacement that never arrived."""
    removed = []
    for directory in (run.root, run.checkpoints):
        removed += remove_debris(directory, include_live=True)
        if directory.is_dir():
            for entry in directory.iterdir():
                if _LEGACY_TMP.match(entry.name):
                    remove_path(entry)
                    removed.append(entry.name)
    return removed


# Free space ----------------------------------------------------------------------------------------------------

def check_free_space(path: Path, need: int, detail: str, *, reusable: int = 0, option: str = "output_dir") -> None:
    """UserError when the filesystem that holds (or will hold) `path` has less than `need` bytes free, counting
    `reusable` bytes that the command itself will free (an old run being replaced)."""

    free = free_bytes(path)
    if free is None or free + reusable >= need:
        return
    raise UserError(f"{option} {path}: not enough free disk space: {format_bytes(free)} free"
                    + (f" (+{format_bytes(reusable)} this run replaces)" if reusable >= 2**20 else "")
                    + f", and it will write about {format_bytes(need)} ({detail}). Free space, keep fewer checkpoints "
                    "(train.keep_last), or choose an --output-dir on another disk")


def existing_bytes(path: Path) -> int:
    return tree_bytes(path) if path.is_dir() else 0


# Messages ------------------------------------------------------------------------------------------------------

def _check_creatable(path: Path, option: str) -> None:
    ancestor = path.absolute()
    while not ancestor.exists() and ancestor != ancestor.parent:
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        raise UserError(f"{option} {path}: {ancestor} is a file, not a directory")
    if not os.access(ancestor, os.W_OK | os.X_OK):
        reason = "read-only file system" if _read_only_fs(ancestor) else "permission denied"
        raise UserError(f"{option} {path}: cannot be created: {ancestor} is not writable ({reason})")


def _read_only_fs(path: Path) -> bool:
    try:
        return bool(os.statvfs(path).f_flag & os.ST_RDONLY)
    except (OSError, AttributeError):
        return False


def _not_writable(option: str, path: Path, exc: OSError) -> UserError:
    if isinstance(exc, NotADirectoryError) or isinstance(exc, FileExistsError):
        return UserError(f"{option} {path}: a part of this path is a file, not a directory")
    if is_disk_full(exc):
        return UserError(f"{option} {path}: disk full ({_strerror(exc)}); free space and run the command again")
    return UserError(f"{option} {path}: not writable ({_strerror(exc)})")


def _strerror(exc: BaseException) -> str:
    return (exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)).strip()


def _names(names: list[str], directory: Path, limit: int = 8) -> str:
    """"a, b/, c (3 files)": what is in `directory`, directories marked with a slash."""
    shown = [n + "/" if (directory / n).is_dir() else n for n in names[:limit]]
    more = f", and {len(names) - limit} more" if len(names) > limit else ""
    return ", ".join(shown) + more


def _say(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


def now_iso() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S%z")
