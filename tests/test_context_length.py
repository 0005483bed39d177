"""data.max_seq_len above the model's context is refused before anything loads (exit 2), unless the recipe
stretches a RoPE model's context with model.rope_scaling, which then applies wherever ft loads the model."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from ft_cli.cli import app
from tests.test_eval_never_changes_training import write_recipe, write_rows

runner = CliRunner()


@pytest.fixture
def recipe(tmp_path: Path) -> Path:
    return write_recipe(tmp_path, write_rows(tmp_path / "train.json", 16), write_rows(tmp_path / "eval.json", 4),
                        {}, {"max_steps": 2, "eval_every": 2})


def refused(args: list[str], expected: str) -> None:
    result = runner.invoke(app, args)
    assert result.exit_code == 2, result.output
    assert expected in " ".join(result.output.split()) and "Traceback" not in result.output


@pytest.mark.parametrize("command", [["validate", "--no-data"], ["validate"], ["train"]])
def test_max_seq_len_past_a_rope_models_context_is_refused(tmp_path: Path, recipe: Path, command: list[str]) -> None:
    refused([command[0], str(recipe), *command[1:], "--set", "data.max_seq_len=5000"],
            "data.max_seq_len: 5,000 is longer than the llama model's context of 4,096 tokens (config.json): it "
            "would train on positions the model never saw. Use data.max_seq_len <= 4096, or stretch the context "
            "with model.rope_scaling, e.g. {type: linear, factor: 2}")
    assert not (tmp_path / "run").exists()


def test_learned_positions_cannot_be_stretched(recipe: Path) -> None:
    gpt2 = ["--set", "model.name_or_path=builtin:tiny-gpt2"]
    refused(["train", str(recipe), *gpt2, "--set", "data.max_seq_len=4097"],
            "data.max_seq_len: 4,097 is longer than the gpt2 model's context of 4,096 tokens (config.json), and its "
            "positions are learned")
    refused(["validate", str(recipe), "--no-data", *gpt2, "--set", "model.rope_scaling={type: linear, factor: 2}"],
            "model.rope_scaling: the gpt2 model has learned absolute positions")


def test_rope_scaling_allows_a_longer_context_and_is_applied_everywhere(tmp_path: Path, recipe: Path) -> None:
    scaled = ["--set", "model.rope_scaling={type: linear, factor: 2}"]
    refused(["validate", str(recipe), "--no-data", *scaled, "--set", "data.max_seq_len=9000"],
            "x model.rope_scaling.factor 2 = 8,192")
    ok = runner.invoke(app, ["validate", str(recipe), "--no-data", *scaled, "--set", "data.max_seq_len=8192"])
    assert ok.exit_code == 0, ok.output
    trained = runner.invoke(app, ["train", str(recipe), *scaled, "--set", "data.max_seq_len=8192"])
    assert trained.exit_code == 0, trained.output
    run = tmp_path / "run"

    from ft_cli.loading import load_run

    model, _, recipe_of_run = load_run(run)  # as ft eval / generate / merge load it
    assert recipe_of_run.model.rope_scaling.factor == 2
    rope = model.get_base_model().config.rope_parameters
    assert rope["rope_type"] == "linear" and rope["factor"] == 2 and rope["rope_theta"] == 10000.0
    assert runner.invoke(app, ["eval", str(run)]).exit_code == 0
    logged = [json.loads(ln) for ln in (run / "metrics.jsonl").read_text().splitlines() if "eval_loss" in ln][-1]
    assert json.loads((run / "eval.json").read_text())["loss"] == pytest.approx(logged["eval_loss"], rel=1e-5)
