"""The run directory (SPEC.md): where every artifact of a run lives, and the rules for reusing one."""

from __future__ import annotations

import json
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ft_cli.errors import UserError


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
        """Checkpoints that were completely written (they hold state.json, written last before the rename)."""
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
            return json.loads(self.manifest.read_text())
        except (OSError, ValueError):
            return {}

    def write_manifest(self, data: dict[str, Any]) -> None:
        write_text_atomic(self.manifest, json.dumps(data, indent=2, default=str) + "\n")


def check_run_dir(run: RunDir, *, resume: bool, overwrite: bool) -> None:
    """Refuse to clobber an existing run unless told to (--resume continues it, --overwrite replaces it).
    Read-only, so every process of a multi-process run can check before any of them changes anything."""
    root = run.root
    if resume and overwrite:
        raise UserError("--resume and --overwrite contradict each other; pick one")
    if resume:
        if not root.is_dir():
            raise UserError(f"--resume: run directory {root} does not exist")
        if run.latest_checkpoint() is None:
            raise UserError(f"--resume: {root} has no whole checkpoint to resume from (checkpoints/step-N/)")
    elif root.exists() and (not root.is_dir() or any(root.iterdir())) and not overwrite:
        status = run.read_manifest().get("status", "unknown")
        raise UserError(f"output_dir {root} already holds a run (status: {status}); use --resume to continue it, "
                        "--overwrite to replace it, or --output-dir for a new one")


def prepare_run_dir(run: RunDir, *, resume: bool) -> None:
    """Make the directory a run writes into (after check_run_dir): a new one, or the old one cleared."""
    root = run.root
    if not resume and root.exists():
        if root.is_dir():
            shutil.rmtree(root)
        else:
            root.unlink()
    root.mkdir(parents=True, exist_ok=True)


def write_text_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def now_iso() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S%z")
