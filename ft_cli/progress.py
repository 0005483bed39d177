"""What a user sees while training, and what is written down: a rich progress bar on a terminal, plain
log lines otherwise (CI logs), and metrics.jsonl always. Only the main process reports."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Any

from ft_cli.atomic import write_text_atomic


def fmt_duration(seconds: float) -> str:
    seconds = int(max(seconds, 0))
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"


class MetricsWriter:
    """Append-only metrics.jsonl, flushed per line so a killed run keeps what it logged."""

    def __init__(self, path: Path, keep_until_step: int | None = None, redo_eval: bool = False):
        self.path = path
        if keep_until_step is not None and path.exists():
            # Resuming: drop lines logged after the checkpoint, so the curve continues exactly once; with
            # `redo_eval` also the checkpoint step's own evaluation, which the resumed run does again.
            def keep(line: dict[str, Any]) -> bool:
                step = line.get("step", 0)
                return step < keep_until_step or (step == keep_until_step and not (redo_eval and "eval_loss" in line))

            kept = [ln for ln in path.read_text().splitlines() if ln.strip() and keep(json.loads(ln))]
            write_text_atomic(path, "".join(ln + "\n" for ln in kept))  # killed meanwhile: the old lines stay
        self._f = path.open("a", encoding="utf-8")

    def write(self, record: dict[str, Any]) -> None:
        self._f.write(json.dumps(record) + "\n")
        self._f.flush()

    def close(self) -> None:
        self._f.close()


class Reporter:
    """Progress for a loop of `total` steps. `enabled=False` on non-main ranks makes every call a no-op."""

    def __init__(self, total: int, *, start: int = 0, enabled: bool = True, description: str = "train",
                 stream=None):
        self.total, self.start, self.enabled = total, start, enabled
        self.stream = stream or sys.stderr
        self.t0 = time.perf_counter()
        self.tty = enabled and self.stream.isatty()
        self._progress = None
        if self.tty:
            from rich.console import Console
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

            self._progress = Progress(
                TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                TextColumn("{task.fields[info]}"), TimeRemainingColumn(),
                console=Console(file=self.stream), transient=False,
            )
            self._task = self._progress.add_task(description, total=total, completed=start, info="")
            self._progress.start()

    def eta(self, step: int) -> float:
        done = step - self.start
        elapsed = time.perf_counter() - self.t0
        return elapsed / done * (self.total - step) if done > 0 else float("nan")

    def update(self, step: int, info: str = "", log_line: bool = False) -> None:
        if not self.enabled:
            return
        if self._progress is not None:
            self._progress.update(self._task, completed=step, info=info)
        elif log_line:
            eta = self.eta(step)
            eta_s = fmt_duration(eta) if eta == eta else "?"
            print(f"step {step}/{self.total} {info} eta {eta_s}", file=self.stream, flush=True)

    def message(self, text: str) -> None:
        if not self.enabled:
            return
        if self._progress is not None:
            self._progress.console.print(text, markup=False, highlight=False)
        else:
            print(text, file=self.stream, flush=True)

    def close(self) -> None:
        if self._progress is not None:
            self._progress.stop()
            self._progress = None


class CountProgress:
    """Progress through `total` items of a long preparation (tokenizing, scoring): a live bar on a terminal, and
    elsewhere (CI logs) a plain line at every tenth, so a long step never looks hung."""

    def __init__(self, total: int, label: str, stream=None):
        self.total, self.label, self.done = total, label, 0
        self.stream = stream or sys.stderr
        self.every = max(1, total // 10)
        self.reporter = Reporter(total, description=label, stream=self.stream,
                                 enabled=self.stream.isatty())

    def advance(self, count: int) -> None:
        before, self.done = self.done, self.done + count
        if self.reporter.tty:
            self.reporter.update(self.done)
        elif self.done // self.every != before // self.every or self.done == self.total:
            print(f"{self.label}: {self.done:,}/{self.total:,}", file=self.stream, flush=True)

    def close(self) -> None:
        self.reporter.close()


def format_bytes(n: float) -> str:
    for unit, size in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= 0.1 * size or unit == "KiB":
            return f"{n / size:.2f} {unit}"
    return f"{n} B"  # pragma: no cover
