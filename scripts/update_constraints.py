"""Regenerate constraints.txt: the exact versions of every package in the environment this Python runs in.

    .venv/bin/python scripts/update_constraints.py

scripts/_setup.sh installs with `pip install -c constraints.txt` (FT_UNPINNED=1 skips it), so the README's two
commands reproduce the environment the suite last passed in, and `ft doctor` reports any drift from it. After
adding or changing a dependency in pyproject.toml: `bash scripts/_setup.sh` (installs the new package; if a pin
blocks it, `FT_UNPINNED=1 bash scripts/_setup.sh`), run the suite, then this script, and commit constraints.txt.

ft itself (an editable install) is left out, and local version labels are dropped (torch 2.13.0+cpu is pinned as
2.13.0: the CPU and CUDA builds share a version, and _setup.sh picks the build).
"""

from __future__ import annotations

import platform
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
OWN = "ft-cli"
HEADER = """\
# The versions the test suite last passed with (Python {python}). scripts/_setup.sh installs with
# `pip install -c constraints.txt`; FT_UNPINNED=1 bash scripts/_setup.sh installs the newest versions pyproject.toml
# allows instead. `ft doctor` reports installed versions that differ from these.
# Regenerate (one command, from the environment the suite passed in): .venv/bin/python scripts/update_constraints.py
"""
_PIN = re.compile(r"^([A-Za-z0-9][A-Za-z0-9._-]*)==([^\s;#]+)$")


def canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def constraints_from_freeze(freeze: str) -> list[str]:
    """`name==version` lines from `pip freeze` output: no comments, editable or URL installs, nor ft itself; local
    version labels (+cpu) dropped; sorted by name."""
    pins: dict[str, str] = {}
    for line in freeze.splitlines():
        match = _PIN.match(line.strip())
        if not match or canonical(match.group(1)) == OWN:
            continue
        name, version = match.groups()
        pins[name] = version.split("+", 1)[0]
    return [f"{name}=={pins[name]}" for name in sorted(pins, key=canonical)]


def main() -> None:
    freeze = subprocess.run([sys.executable, "-m", "pip", "freeze", "--exclude-editable"], check=True,
                            capture_output=True, text=True).stdout
    lines = constraints_from_freeze(freeze)
    out = ROOT / "constraints.txt"
    out.write_text(HEADER.format(python=platform.python_version()) + "\n".join(lines) + "\n")
    print(f"wrote {out} ({len(lines)} packages, from {sys.executable})")


if __name__ == "__main__":
    main()
