"""How a training run ends other than by finishing: a signal (SIGINT/SIGTERM finish the step and checkpoint; a
second Ctrl-C exits at once), a diverged loss, a full disk or any other failure. Each ends with run.json saying
so, nothing half-written kept, and one message naming the last whole checkpoint and the resume command."""

from __future__ import annotations

import contextlib
import math
import os
import signal
from typing import Any

from ft_cli.atomic import is_disk_full
from ft_cli.errors import CheckFailed, RunInterrupted, UserError
from ft_cli.manifest import finish_manifest
from ft_cli.run_dir import remove_run_debris


class StopSignals:
    """SIGINT/SIGTERM ask the loop to finish the current step and checkpoint; a second SIGINT stops at once
    (fit then says which whole checkpoint is the last)."""

    def __init__(self, announce: bool = True) -> None:
        self.signum: int | None = None
        self.announce = announce
        self._old: dict[int, Any] = {}
        try:
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._old[sig] = signal.signal(sig, self._handle)
        except ValueError:  # not the main thread (e.g. a notebook worker): keep default handling
            self._old.clear()

    def _handle(self, signum: int, frame: Any) -> None:
        if self.signum is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.signum = signum
        if self.announce:  # os.write: print() is not safe inside a signal handler
            name = signal.Signals(signum).name
            more = "; Ctrl-C again exits at once, without one" if signum == signal.SIGINT else ""
            os.write(2, f"\n{name}: stopping after this step to write a checkpoint{more}\n".encode())

    def restore(self) -> None:
        for sig, handler in self._old.items():
            signal.signal(sig, handler)


def ended_by(s: Any, step: int, exc: BaseException) -> BaseException:
    """How a run that stopped with `exc` ends: run.json says so, nothing half-written stays (a checkpoint, best/
    or adapter/ being written), and a full disk or a second Ctrl-C becomes one message instead of a traceback."""
    main = s.accelerator.is_main_process
    if main:
        with contextlib.suppress(OSError):
            remove_run_debris(s.run)  # frees the space a half-written checkpoint took, before run.json is written
    if isinstance(exc, RunInterrupted):
        return exc  # run.json was written by interrupted
    last = s.run.latest_checkpoint()
    kept = f"the last whole checkpoint is step {last.name[5:]}" if last else "no checkpoint had been written yet"
    resume = f"ft train {s.recipe_path} --resume --output-dir {s.run.root}"
    if isinstance(exc, KeyboardInterrupt):
        message = f"interrupted again: exiting without a checkpoint; {kept}"
        finish_run(s, "interrupted", step, error=message, quiet=True)
        return RunInterrupted(message + (f".\nResume with: {resume}" if last else ""), exit_code=130)
    if isinstance(exc, Exception) and is_disk_full(exc, s.run.root):
        finish_run(s, "failed", step, error=f"disk full: {exc}", quiet=True)
        return UserError(f"disk full while writing to {s.run.root} after step {step} ({exc}); nothing half-written "
                         f"was kept and {kept}.\nFree space, then resume with: {resume}")
    finish_run(s, "failed", step, error=f"{type(exc).__name__}: {exc}", quiet=True)  # exc is what counts
    return exc


def interrupted(s: Any, step: int, signum: int) -> RunInterrupted:
    name = signal.Signals(signum).name
    finish_run(s, "interrupted", step)
    cmd = f"ft train {s.recipe_path} --resume" + (f" --output-dir {s.run.root}" if s.run.root else "")
    return RunInterrupted(f"{name}: stopped after step {step}; checkpoint written to {s.run.checkpoint(step)}.\n"
                          f"Resume with: {cmd}", exit_code=128 + int(signum))


def diverged(s: Any, step: int, loss: float, grad_norm: float | None) -> CheckFailed:
    last = s.run.latest_checkpoint()
    keep = f"the last good checkpoint is {last}" if last else "no checkpoint had been written yet"
    what = "loss" if not math.isfinite(loss) else "gradient norm"
    hints = ["lower train.lr"]
    if s.recipe.model.dtype == "float16":
        hints.append("use model.dtype: bfloat16 (float16 overflows easily)")
    if s.recipe.train.max_grad_norm is None:
        hints.append("set train.max_grad_norm: 1.0")
    hints.append("check the data for empty or garbage examples (ft validate --show 5)")
    return CheckFailed(f"training diverged at step {step}: {what} is {loss if what == 'loss' else grad_norm} "
                       f"(loss {loss}, grad_norm {grad_norm}); the optimizer step was skipped and {keep}.\n"
                       f"Likely causes: " + "; ".join(hints))


def finish_run(s: Any, status: str, step: int, error: str | None = None, quiet: bool = False) -> None:
    if s.accelerator.is_main_process:
        finish_manifest(s.run, s.manifest, status, step, best_eval_loss=s.state.best_eval_loss,
                        best_step=s.state.best_step, error=error, quiet=quiet)
