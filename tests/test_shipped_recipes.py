"""Every recipe ft ships trains with `ft train RECIPE --smoke`, offline, exactly as README.md tells a new user to
try it: their data files are not in the checkout, so --smoke trains on the sample of the same format that ships
inside ft (ft_cli/samples/) and says so."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
from typer.testing import CliRunner

from ft_cli.cli import app
from ft_cli.recipe import load_recipe

runner = CliRunner()
ROOT = Path(__file__).resolve().parents[1]
SHIPPED = sorted(p for p in (ROOT / "recipes").rglob("*.yaml") if "accelerate" not in p.parts)


def test_the_shipped_recipes_are_found() -> None:
    names = {str(p.relative_to(ROOT / "recipes")) for p in SHIPPED}
    assert {"quickstart.yaml", "llama-3.1-8b/qlora.yaml", "qwen2.5-0.5b/full.yaml", "mistral-7b/lora.yaml"} <= names
    assert len(SHIPPED) >= 10


@pytest.mark.slow  # ~3-15 s each on the CPU; run by default, as CI must
@pytest.mark.parametrize("recipe", SHIPPED, ids=lambda p: str(p.relative_to(ROOT / "recipes")))
def test_every_shipped_recipe_smoke_trains(recipe: Path, tmp_path: Path) -> None:
    original = load_recipe(recipe)
    data_missing = not Path(original.data.sources[0].path).exists()
    out = tmp_path / "run"
    result = runner.invoke(app, ["train", str(recipe), "--smoke", "--output-dir", str(out)])
    assert result.exit_code == 0, result.output + repr(result.exception)
    if data_missing:  # the shipped recipes point at the user's data/train.jsonl
        assert f"data.train: {original.data.sources[0].path} is not there" in result.output
        assert f"using ft's {original.data.format} sample instead" in result.output
    manifest = json.loads((out / "run.json").read_text())
    assert manifest["status"] == "completed" and manifest["method"] == original.method
    lines = [json.loads(ln) for ln in (out / "metrics.jsonl").read_text().splitlines()]
    losses = [ln["loss"] for ln in lines if "loss" in ln]
    assert losses and all(math.isfinite(x) for x in losses)
    output = out / ("model" if original.method in ("full", "freeze") else "adapter")
    assert (output / "README.md").is_file() and any(output.glob("*.safetensors"))


def test_smoke_samples_ship_inside_the_package() -> None:
    """The samples are package data (pyproject), so an installed ft has them; one per format, each with enough
    records for a smoke run (and text documents long enough to be split into chunks)."""
    import tomllib

    from ft_cli.data.formats import format_of_record
    from ft_cli.data.sources import read_records
    from ft_cli.smoke import SAMPLE_FILES, SMOKE_ROWS, sample_data

    package_data = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]
    assert {"samples/*.json", "samples/*.jsonl"} <= set(package_data["ft_cli"])
    for fmt in SAMPLE_FILES:
        path = sample_data(fmt)
        assert path.is_relative_to(ROOT / "ft_cli")
        records = [r for r, _ in read_records(path)]
        assert len(records) >= SMOKE_ROWS and {format_of_record(r) for r in records} == {fmt}
    longest = max(len(r["text"]) for r, _ in read_records(sample_data("text")))
    assert longest > 4 * 256  # more characters than a 256-token smoke row holds


def test_smoke_substitutes_the_sample_of_each_sources_format(tmp_path: Path) -> None:
    """A missing file, and a hub dataset (which needs the network), become the sample of their format; data.columns
    that rename the real data's fields do not apply to the sample; data that is there is used."""
    real = tmp_path / "real.jsonl"
    real.write_text("".join(json.dumps({"dialog": [{"role": "user", "content": f"Hi {i}"},
                                                   {"role": "assistant", "content": f"Hello {i}!"}]}) + "\n"
                            for i in range(8)))
    recipe = tmp_path / "r.yaml"
    recipe.write_text(json.dumps({
        "model": {"name_or_path": "Qwen/Qwen2.5-7B-Instruct"}, "method": "lora",
        "data": {"format": "chat", "columns": {"messages": "dialog"}, "train": [
            {"path": str(real)}, {"path": "data/missing.jsonl"},
            {"path": "acme/some-hub-dataset", "format": "sharegpt"}, {"path": "data/docs/*.jsonl", "format": "text"}]},
        "train": {"micro_batch_size": 2}}))
    out = tmp_path / "run"
    result = runner.invoke(app, ["train", str(recipe), "--smoke", "--output-dir", str(out)])
    assert result.exit_code == 0, result.output + repr(result.exception)
    for i, fmt in ((1, "chat"), (2, "sharegpt"), (3, "text")):
        assert f"data.train[{i}]: " in result.output and f"using ft's {fmt} sample instead" in result.output
    assert "data.train[0]" not in result.output  # there: used as it is
    mixed = {Path(s["path"]).name: s["rows"] for s in json.loads((out / "run.json").read_text())["data"]["train"]
             ["sources"]}
    assert mixed["real.jsonl"] >= 7 and {"chat.jsonl", "sharegpt.jsonl", "text.jsonl"} <= set(mixed)
    assert (out / "adapter" / "adapter_config.json").is_file()
