"""Errors that end a command with a message instead of a traceback. The CLI prints `message` on stderr and
exits with `exit_code`:

- 2  UserError: bad recipe, bad data, missing file, refused overwrite (the user's fault).
- 3  CheckFailed: the command ran, but a check it was asked to enforce failed (eval --fail-if, merge parity,
     training diverged to NaN/inf).
- 130 / 143  RunInterrupted: SIGINT / SIGTERM; a checkpoint was written and the message says how to resume.
Anything else is a bug: exit 1 with a traceback.
"""

from __future__ import annotations


class FtExit(Exception):
    exit_code = 1

    def __init__(self, message: str, exit_code: int | None = None):
        super().__init__(message)
        self.message = message
        if exit_code is not None:
            self.exit_code = exit_code

    def __str__(self) -> str:
        return self.message


class UserError(FtExit):
    """The user's fault; `message` may span several lines (e.g. every problem of a recipe at once)."""

    exit_code = 2


class CheckFailed(FtExit):
    exit_code = 3


class RunInterrupted(FtExit):
    exit_code = 130
