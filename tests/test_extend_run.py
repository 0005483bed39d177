"""Extending a finished run (`ft train RECIPE --resume --set train.max_steps=N` or `train.epochs`): the learning-rate
schedule is re-planned for the new length, so the added steps train (they used to run at lr 0 and change nothing),
the steps already taken stay as they were, and a resume that would train at (nearly) no learning rate says so."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

from ft_cli.cli import app
from ft_cli.optim import LrSchedule
from tests.test_eval_never_changes_training import METHODS, write_recipe, write_rows

runner = CliRunner()
LR = 1e-2


def lines(run: Path) -> list[dict]:
    return [json.loads(ln) for ln in (run / "metrics.jsonl").read_text().splitlines() if '"loss"' in ln]


def adapter(run: Path) -> dict[str, torch.Tensor]:
    return load_file(run / "adapter" / "adapter_model.safetensors")


@pytest.fixture
def finished(tmp_path: Path) -> tuple[Path, Path]:
    """An 8-step cosine LoRA run, finished, with its last-step checkpoint."""
    data = write_rows(tmp_path / "train.json", 24)
    recipe = write_recipe(tmp_path, data, None, METHODS["lora"],
                          {"max_steps": 8, "save_every": 4, "scheduler": "cosine", "lr": LR})
    result = runner.invoke(app, ["train", str(recipe)])
    assert result.exit_code == 0, result.output
    return recipe, tmp_path / "run"


def test_extending_max_steps_re_plans_the_schedule_and_trains(finished: tuple[Path, Path]) -> None:
    recipe, run = finished
    before, weights = lines(run), adapter(run)
    assert before[-1]["lr"] == 0.0  # a finished cosine run ends at lr 0
    result = runner.invoke(app, ["train", str(recipe), "--resume", "--set", "train.max_steps=12"])
    assert result.exit_code == 0, result.output
    assert "planned for 8 steps and now has 12" in result.output
    after = lines(run)
    assert after[:8] == before  # the steps already taken are untouched
    plan = LrSchedule("cosine", 0, 12)
    assert [ln["step"] for ln in after[8:]] == [9, 10, 11, 12]
    assert [ln["lr"] for ln in after[8:]] == pytest.approx([LR * plan(s) for s in (9, 10, 11, 12)])
    assert all(ln["lr"] > 0 for ln in after[8:11])
    changed = adapter(run)
    assert max((changed[k] - weights[k]).abs().max().item() for k in weights) > 1e-4  # the added steps trained
    assert "would train" not in result.output  # lr up to 15% of train.lr: no warning


def test_extending_epochs_re_plans_the_schedule_and_trains(tmp_path: Path) -> None:
    data = write_rows(tmp_path / "train.json", 16)
    recipe = write_recipe(tmp_path, data, None, METHODS["lora"],
                          {"max_steps": None, "epochs": 1, "save_every": 2, "scheduler": "linear", "lr": LR})
    assert runner.invoke(app, ["train", str(recipe)]).exit_code == 0
    run = tmp_path / "run"
    assert [ln["step"] for ln in lines(run)] == [1, 2, 3, 4] and lines(run)[-1]["lr"] == 0.0
    result = runner.invoke(app, ["train", str(recipe), "--resume", "--set", "train.epochs=2"])
    assert result.exit_code == 0, result.output
    after = lines(run)
    assert [ln["step"] for ln in after] == list(range(1, 9))
    assert [ln["lr"] for ln in after[4:]] == pytest.approx([LR * LrSchedule("linear", 0, 8)(s) for s in (5, 6, 7, 8)])
    assert after[4]["lr"] == pytest.approx(LR * 3 / 8)


def test_an_extension_that_would_barely_train_warns(finished: tuple[Path, Path]) -> None:
    recipe, run = finished
    result = runner.invoke(app, ["train", str(recipe), "--resume", "--set", "train.max_steps=9"])
    assert result.exit_code == 0, result.output
    assert "warning: steps 9-9 would train at lr" in result.output and "of train.lr" in result.output
    assert "extend by more steps" in result.output


def test_resuming_an_interrupted_run_keeps_its_schedule(finished: tuple[Path, Path]) -> None:
    """Same max_steps: re-planning changes nothing (the kill -9 tests check the whole run is reproduced)."""
    import shutil

    recipe, run = finished
    reference = lines(run)
    for name in ("checkpoints/step-8", "adapter", "best"):
        shutil.rmtree(run / name, ignore_errors=True)
    result = runner.invoke(app, ["train", str(recipe), "--resume"])
    assert result.exit_code == 0, result.output
    assert "re-planned" not in result.output and "would train" not in result.output
    assert [ln["lr"] for ln in lines(run)] == pytest.approx([ln["lr"] for ln in reference], rel=1e-12)
    assert [ln["loss"] for ln in lines(run)] == pytest.approx([ln["loss"] for ln in reference], rel=1e-6)
