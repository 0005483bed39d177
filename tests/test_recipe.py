"""Recipe schema: every shipped recipe validates; bad recipes give precise messages and exit 2 (milliseconds)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from ft_cli.cli import app
from ft_cli.errors import UserError
from ft_cli.recipe import load_recipe, recipe_from_dict, recipe_json_schema

ROOT = Path(__file__).resolve().parents[1]
RECIPES = sorted((ROOT / "recipes").rglob("*.yaml"))
RECIPES = [p for p in RECIPES if "accelerate" not in p.parts]
runner = CliRunner()

BASE = {"model": {"name_or_path": "builtin:tiny-llama"}, "data": {"train": "x.jsonl"}}


def _write(tmp_path: Path, data: dict, name: str = "recipe.yaml") -> Path:
    p = tmp_path / name
    p.write_text(yaml.safe_dump(data))
    return p


@pytest.mark.parametrize("path", RECIPES, ids=[str(p.relative_to(ROOT)) for p in RECIPES])
def test_every_shipped_recipe_validates(path: Path) -> None:
    recipe = load_recipe(path)
    assert recipe.method
    result = runner.invoke(app, ["validate", str(path), "--no-data"])
    assert result.exit_code == 0, result.output


def test_qlora_implies_nf4_double_quant() -> None:
    r = recipe_from_dict({**BASE, "method": "qlora"})
    assert r.quantization is not None
    assert (r.quantization.bits, r.quantization.quant_type, r.quantization.double_quant) == (4, "nf4", True)
    assert r.lora is not None and r.lora.target_modules == "all-linear"


def test_lora_has_no_quantization_by_default() -> None:
    r = recipe_from_dict({**BASE, "method": "lora"})
    assert r.quantization is None and not r.quantized


def test_all_problems_reported_at_once_with_lines_and_did_you_mean(tmp_path: Path) -> None:
    p = tmp_path / "recipe.yaml"
    p.write_text(
        "model:\n  name_or_path: builtin:tiny-llama\n"
        "method: lora\n"
        "lora:\n  rank: 0\n  alhpa: 16\n"
        "data:\n  train: x.jsonl\n  format: alpacca\n"
        "train:\n  lr: -1\n"
    )
    with pytest.raises(UserError) as exc:
        load_recipe(p)
    msg = str(exc.value)
    lines = msg.splitlines()
    assert f"{p}:5: lora.rank: must be greater than 0, got 0" in lines
    assert f"{p}:6: lora.alhpa: unknown key (did you mean 'alpha'?)" in lines
    assert any(line.startswith(f"{p}:9: data.format: must be one of") for line in lines)
    assert any(line.startswith(f"{p}:11: train.lr: must be greater than 0") for line in lines)
    assert len(lines) == 4


@pytest.mark.parametrize(
    ("change", "expected"),
    [
        ({"method": "full", "quantization": {"bits": 4}}, "quantization: cannot be used with method 'full'"),
        ({"method": "lora", "quantization": {"bits": 4}}, "quantization: with method 'lora' means QLoRA"),
        ({"method": "full", "lora": {"rank": 8}}, "lora: is only used by method lora | qlora | dora"),
        ({"method": "lora", "freeze": {"trainable_layers": 1}}, "freeze: is only used by method freeze"),
        ({"method": "qlora", "quantization": {"bits": None}}, "quantization.bits: method qlora needs 4 or 8 bits"),
        ({"method": "lora", "train": {"layerwise_lr_decay": 0.9}}, "train.layerwise_lr_decay: applies to method full"),
        ({"method": "lorra"}, "method: must be one of"),
        ({"modle": {}}, "modle: unknown key (did you mean 'model'?)"),
        ({"data": {"train": "x", "packing": "maybe"}}, "data.packing: must be a valid boolean"),
        ({"train": {"micro_batch_size": 0}}, "train.micro_batch_size: must be greater than 0"),
        ({"data": {"train": "x", "val_split": 1.5}}, "data.val_split: must be less than 1"),
        ({"lora": {"target_modules": 5}, "method": "lora"}, "lora.target_modules:"),
    ],
)
def test_bad_recipe_messages(change: dict, expected: str) -> None:
    with pytest.raises(UserError) as exc:
        recipe_from_dict({**BASE, **change})
    assert expected in str(exc.value)


def test_missing_required_sections() -> None:
    with pytest.raises(UserError) as exc:
        recipe_from_dict({"method": "lora"})
    msg = str(exc.value)
    assert "model: is required" in msg and "data: is required" in msg


def test_set_overrides_and_type_parsing(tmp_path: Path) -> None:
    p = _write(tmp_path, {**BASE, "method": "lora"})
    r = load_recipe(p, ["train.lr=1e-4", "lora.rank=32", "data.packing=true", "lora.target_modules=[q_proj, v_proj]"])
    assert r.train.lr == 1e-4 and r.lora is not None and r.lora.rank == 32
    assert r.data.packing is True and r.lora.target_modules == ["q_proj", "v_proj"]
    with pytest.raises(UserError, match=r"^--set train.lrr=1: unknown key \(did you mean 'lr'\?\)$"):
        load_recipe(p, ["train.lrr=1"])  # the --set item is named, not a line of the recipe file
    with pytest.raises(UserError, match="expected KEY=VALUE"):
        load_recipe(p, ["train.lr"])


def test_relative_paths_resolve_against_recipe_file(tmp_path: Path) -> None:
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "d.jsonl").write_text("{}\n")
    p = _write(tmp_path / "sub", {**BASE, "data": {"train": "d.jsonl", "eval": "./e.jsonl"}})
    r = load_recipe(p)
    assert r.data.train == str((tmp_path / "sub" / "d.jsonl").resolve())
    assert r.data.eval == str((tmp_path / "sub" / "e.jsonl").resolve())
    assert r.output_dir == "runs/recipe"


def test_cli_bad_recipe_exit_2_no_traceback(tmp_path: Path) -> None:
    p = _write(tmp_path, {**BASE, "lora": {"rnak": 8}, "method": "lora"})
    for cmd in (["validate", str(p)], ["train", str(p)]):
        result = runner.invoke(app, cmd)
        assert result.exit_code == 2, result.output
        assert "lora.rnak: unknown key (did you mean 'rank'?)" in result.output
        assert "Traceback" not in result.output
    assert not (tmp_path / "runs").exists()


def test_cli_missing_recipe_and_bad_yaml(tmp_path: Path) -> None:
    result = runner.invoke(app, ["validate", str(tmp_path / "nope.yaml")])
    assert result.exit_code == 2 and "recipe file not found" in result.output
    bad = tmp_path / "bad.yaml"
    bad.write_text("model:\n  name_or_path: [unclosed\n")
    result = runner.invoke(app, ["validate", str(bad)])
    assert result.exit_code == 2 and "invalid YAML" in result.output and f"{bad}:" in result.output


def test_schema_is_valid_json_schema() -> None:
    result = runner.invoke(app, ["schema"])
    assert result.exit_code == 0
    schema = json.loads(result.output)
    assert schema["title"] == "ft recipe"
    assert schema["additionalProperties"] is False
    lora = schema["$defs"]["LoraSection"]["properties"]["rank"]
    assert lora["exclusiveMinimum"] == 0 and "LoRA rank" in lora["description"]
    assert recipe_json_schema()["required"] == ["model", "data"]


def test_help_does_not_import_torch() -> None:
    code = "import sys; from ft_cli.cli import app; assert 'torch' not in sys.modules; " \
           "import ft_cli.recipe; assert 'torch' not in sys.modules and 'transformers' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)
    out = subprocess.run([sys.executable, "-m", "ft_cli.cli", "--help"], capture_output=True, text=True, check=True)
    assert "train" in out.stdout and "validate" in out.stdout


def test_secrets_never_written(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from ft_cli.recipe import dump_recipe

    monkeypatch.setenv("HF_TOKEN", "hf_supersecretvalue123")
    r = recipe_from_dict({**BASE, "logging": {"project": "p-hf_supersecretvalue123"}})
    text = dump_recipe(r)
    assert "supersecret" not in text and "***" in text
