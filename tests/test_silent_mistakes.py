"""Mistakes ft used to accept without a word: each is now exit 2 naming the field (and nothing is written), or an
explicit warning with counts."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from ft_cli.cli import app
from tests.test_eval_never_changes_training import write_recipe, write_rows

runner = CliRunner()


@pytest.fixture
def recipe(tmp_path: Path) -> Path:
    return write_recipe(tmp_path, write_rows(tmp_path / "train.json", 16), None, {})


def refused(args: list[str], *expected: str) -> str:
    result = runner.invoke(app, args)
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output
    for text in expected:
        assert text in result.output, (text, result.output)
    return result.output


def test_duplicate_yaml_keys_are_refused(tmp_path: Path, recipe: Path) -> None:
    text = recipe.read_text().replace("  lr: 0.01\n", "  lr: 0.01\n  max_steps: 9\n  lr: 0.5\n")
    recipe.write_text(text)
    lines = text.splitlines()
    first = next(i for i, ln in enumerate(lines, 1) if ln.strip() == "lr: 0.01")
    second = next(i for i, ln in enumerate(lines, 1) if ln.strip() == "lr: 0.5")
    refused(["validate", str(recipe), "--no-data"],
            f"{recipe}:{second}: train.lr: duplicate key (first set on line {first})")
    refused(["train", str(recipe)], "duplicate key")
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize(("override", "field"), [
    ("lora.rank=true", "lora.rank"), ("train.lr=false", "train.lr"), ("train.max_steps=yes", "train.max_steps"),
    ("data.max_seq_len=true", "data.max_seq_len"),
])
def test_a_boolean_is_not_a_number(recipe: Path, override: str, field: str) -> None:
    value = "false" if override.endswith("false") else "true"
    # A --set error names the --set item (which starts with the field), not a line of the recipe file.
    assert override.startswith(f"{field}=")
    refused(["validate", str(recipe), "--no-data", "--set", override], f"--set {override}: must be a number, got {value}")


def test_booleans_and_numbers_still_go_where_they_belong(recipe: Path) -> None:
    result = runner.invoke(app, ["validate", str(recipe), "--no-data", "--set", "train.compile=true",
                                 "--set", "lora.rank=32", "--set", "train.lr=1e-4", "--set", "lora.use_rslora=yes"])
    assert result.exit_code == 0, result.output
    raw = yaml.safe_load(recipe.read_text())
    raw["lora"]["rank"] = True
    recipe.write_text(yaml.safe_dump(raw))
    refused(["validate", str(recipe), "--no-data"], "lora.rank: must be a number, got true")


def test_a_typo_in_modules_to_save_is_refused(tmp_path: Path, recipe: Path) -> None:
    args = ["--set", "lora.modules_to_save=[lm_headd]"]
    refused(["validate", str(recipe), *args],
            "lora.modules_to_save: 'lm_headd' matches no module of this model (did you mean 'lm_head'?")
    refused(["train", str(recipe), *args], "lora.modules_to_save: 'lm_headd'")
    assert not (tmp_path / "run").exists()
    result = runner.invoke(app, ["validate", str(recipe), "--set", "lora.modules_to_save=[lm_head]"])
    assert result.exit_code == 0, result.output


def test_more_trainable_layers_than_the_model_has_is_refused(tmp_path: Path, recipe: Path) -> None:
    args = ["--set", "method=freeze", "--set", "lora=null", "--set", "freeze.trainable_layers=99"]
    refused(["validate", str(recipe), *args],
            "freeze.trainable_layers: 99, but the llama model has 2 transformer blocks; at most 2")
    refused(["train", str(recipe), *args], "freeze.trainable_layers: 99")
    assert not (tmp_path / "run").exists()
    ok = runner.invoke(app, ["validate", str(recipe), *args[:-2], "--set", "freeze.trainable_layers=2"])
    assert ok.exit_code == 0, ok.output


def test_preference_data_fed_as_sharegpt_says_what_it_drops(tmp_path: Path, shared_data: Path) -> None:
    """dpo_en_demo.json has conversations + chosen + rejected: as sharegpt, the chosen replies are never trained and
    every conversation without an earlier assistant turn has nothing left to train on."""
    data = shared_data / "dpo_en_demo.json"
    rows = json.loads(data.read_text())
    no_reply = sum(not any(t["from"] == "gpt" and t["value"].strip() for t in r["conversations"]) for r in rows)
    assert 0 < no_reply < len(rows)
    path = write_recipe(tmp_path, data, None, {"data": {"format": "sharegpt", "max_seq_len": 4096, "cache": False}},
                        {"max_steps": 1})
    warning = (f"data.train: {len(rows)} of {len(rows)} records have 'chosen' and 'rejected' fields (preference "
               f"data, as for DPO), which format sharegpt does not read: their chosen replies are not trained; "
               f"{no_reply} of them have no assistant reply left and are dropped")
    validated = runner.invoke(app, ["validate", str(path)])
    assert validated.exit_code == 0, validated.output
    assert warning in " ".join(validated.output.split())
    trained = runner.invoke(app, ["train", str(path)])
    assert trained.exit_code == 0, trained.output
    assert (f"data: {no_reply} of {len(rows)} training records dropped: nothing to train on (no assistant reply "
            "with content, or blank text)") in trained.output
    assert f"warning: {warning}" in trained.output


def test_train_says_how_many_examples_it_truncated(tmp_path: Path) -> None:
    path = write_recipe(tmp_path, write_rows(tmp_path / "train.json", 8), None, {"data": {"max_seq_len": 12, "train_on_inputs": True}},
                        {"max_steps": 1})
    result = runner.invoke(app, ["train", str(path)])
    assert result.exit_code == 0, result.output
    assert "data: 8 of 8 training examples truncated to data.max_seq_len=12" in result.output
