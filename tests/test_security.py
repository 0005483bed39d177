"""Security defaults: no model code runs unless the recipe trusts it, recipes are read with safe YAML, checkpoint
state is unpickled with torch.load(weights_only=True) only, secrets never reach the run directory or the console,
and relative paths in a recipe mean the recipe's directory, not the current one (seconds, CPU, offline).
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import re
import shutil
from pathlib import Path
from typing import Any

import pytest
import yaml
from typer.testing import CliRunner

from ft_cli.cli import app
from ft_cli.recipe import load_recipe
from ft_cli.run_dir import LOCK_FILE

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "ft_cli"
ALPACA = ROOT / "examples" / "data" / "quickstart_alpaca.json"
runner = CliRunner()

SECRETS = {"HF_TOKEN": "hf_SeCrEtToKeN0123456789abcdef", "WANDB_API_KEY": "wandb0123456789SECRETkey9876543210"}


def tiny_recipe(train_data: Path, output_dir: Path, **sections: Any) -> dict[str, Any]:
    recipe: dict[str, Any] = {
        "model": {"name_or_path": "builtin:tiny-llama", "dtype": "float32"},
        "method": "lora",
        "lora": {"rank": 4, "alpha": 8, "dropout": 0.0},
        "data": {"train": str(train_data), "format": "alpaca", "val_split": 0.0, "max_seq_len": 64, "cache": False},
        "train": {"max_steps": 2, "micro_batch_size": 2, "grad_accum": 1, "lr": 1e-3, "eval_every": None,
                  "save_every": 1, "log_every": 1, "seed": 3},
        "output_dir": str(output_dir),
    }
    for key, value in sections.items():
        recipe[key] = {**recipe[key], **value} if isinstance(value, dict) and key in recipe else value
    return recipe


def write_yaml(path: Path, recipe: dict[str, Any]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    return path


def few_alpaca_rows(path: Path, n: int = 8) -> Path:
    rows = json.loads(ALPACA.read_text())[:n]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def tree(root: Path) -> dict[Path, int]:
    """Every path under root with its modification time: proof that nothing was written or touched (but the lock
    file, which says which process last held the run)."""
    return {p: p.stat().st_mtime_ns for p in root.rglob("*") if p.name != LOCK_FILE}


def _update_checksum(ckpt: Path, name: str) -> None:
    from ft_cli.atomic import file_digest

    state = json.loads((ckpt / "state.json").read_text())
    state["files"][name] = {"bytes": (ckpt / name).stat().st_size, "sha256": file_digest(ckpt / name)}
    (ckpt / "state.json").write_text(json.dumps(state))


def package_sources() -> dict[Path, str]:
    return {p: p.read_text() for p in PACKAGE.rglob("*.py")}


# trust_remote_code ------------------------------------------------------------------------------------------------

def test_trust_remote_code_is_off_by_default() -> None:
    from ft_cli.recipe import recipe_from_dict, recipe_json_schema

    recipe = recipe_from_dict({"model": {"name_or_path": "builtin:tiny-llama"}, "data": {"train": "x.jsonl"}})
    assert recipe.model.trust_remote_code is False
    assert recipe_json_schema()["$defs"]["ModelSection"]["properties"]["trust_remote_code"]["default"] is False


def test_package_never_trusts_remote_code_on_its_own() -> None:
    """Every trust_remote_code the package passes is the recipe's (or a parameter defaulting to False)."""
    allowed = {"recipe.model.trust_remote_code", "trust_remote_code", "False"}
    found = []
    for path, text in package_sources().items():
        for value in re.findall(r"trust_remote_code[\"']?\s*=\s*([\w.]+)", text):
            found.append(value)
            assert value in allowed, f"{path}: trust_remote_code={value}"
        assert not re.search(r"trust_remote_code[\"']?\s*[:=]\s*True", text), path
    assert "recipe.model.trust_remote_code" in found


@pytest.fixture
def custom_code_model(tmp_path: Path) -> tuple[Path, Path]:
    """A local copy of the built-in tiny Llama whose config.json maps (auto_map) to its own Python files, which
    would create a marker file when run. Returns (model dir, marker)."""
    from ft_cli.builtin_models import resolve_builtin

    model = tmp_path / "custom-model"
    shutil.copytree(resolve_builtin("builtin:tiny-llama"), model)
    marker = tmp_path / "CUSTOM_CODE_RAN"
    config = json.loads((model / "config.json").read_text())
    config.update(model_type="ft_test_custom", architectures=["CustomForCausalLM"],
                  auto_map={"AutoConfig": "configuration_custom.CustomConfig",
                            "AutoModelForCausalLM": "modeling_custom.CustomForCausalLM"})
    (model / "config.json").write_text(json.dumps(config))
    (model / "configuration_custom.py").write_text(
        f"import pathlib\npathlib.Path({str(marker)!r}).write_text('ran')\n"
        "from transformers import LlamaConfig\n\n\n"
        "class CustomConfig(LlamaConfig):\n    model_type = 'ft_test_custom'\n")
    (model / "modeling_custom.py").write_text(
        f"import pathlib\npathlib.Path({str(marker)!r}).write_text('ran')\n"
        "from transformers import LlamaForCausalLM\n\nfrom .configuration_custom import CustomConfig\n\n\n"
        "class CustomForCausalLM(LlamaForCausalLM):\n    config_class = CustomConfig\n")
    return model, marker


def test_custom_code_model_is_refused_naming_trust_remote_code(tmp_path: Path, custom_code_model: tuple[Path, Path],
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    model, marker = custom_code_model
    monkeypatch.chdir(tmp_path)
    recipe = write_yaml(tmp_path / "recipe.yaml",
                        tiny_recipe(few_alpaca_rows(tmp_path / "d.jsonl"), tmp_path / "out",
                                    model={"name_or_path": "custom-model"}))
    before = tree(tmp_path)
    for command in ("validate", "train"):
        result = runner.invoke(app, [command, str(recipe)])
        assert result.exit_code == 2, result.output
        err = result.stderr.strip()
        # the field, after the recipe line of its section (model.trust_remote_code is not written in it)
        assert err.startswith(f"error: {recipe}:1: model.trust_remote_code:") and len(err.splitlines()) == 1, err
        assert str(model) in err and "model.trust_remote_code: true" in err
        assert "Traceback" not in result.output
    assert not marker.exists(), "the model's own code ran without model.trust_remote_code"
    assert tree(tmp_path) == before  # no run directory, nothing else


def test_the_refusal_is_the_flag_at_work(custom_code_model: tuple[Path, Path]) -> None:
    """The control: with model.trust_remote_code: true the same model passes ft's check (transformers then runs its
    code), so the refusal above comes from the flag, not from a broken model directory."""
    from ft_cli.errors import UserError
    from ft_cli.model import resolve_model_path
    from ft_cli.recipe import ModelSection

    model, marker = custom_code_model
    assert resolve_model_path(ModelSection(name_or_path=str(model), trust_remote_code=True)) == str(model)
    with pytest.raises(UserError, match=r"^model\.trust_remote_code: "):
        resolve_model_path(ModelSection(name_or_path=str(model)))
    assert not marker.exists()


# Safe YAML --------------------------------------------------------------------------------------------------------

def test_python_tags_in_a_recipe_are_refused_not_executed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    marker = tmp_path / "YAML_CODE_RAN"
    payloads = {
        "apply-os-system": f"!!python/object/apply:os.system ['touch {marker}']",
        "apply-subprocess": f"!!python/object/apply:subprocess.call [['touch', '{marker}']]",
        "new-object": f"!!python/object/new:pathlib.Path ['{marker}']",
        "name": "!!python/name:os.system",
    }
    before = None
    for name, payload in payloads.items():
        recipe = tmp_path / f"{name}.yaml"
        recipe.write_text(f"model:\n  name_or_path: {payload}\ndata:\n  train: x.jsonl\n")
        before = before or tree(tmp_path)
        for command in ("validate", "train"):
            result = runner.invoke(app, [command, str(recipe)])
            assert result.exit_code == 2, (name, result.output)
            assert f"{recipe}:2: invalid YAML: could not determine a constructor for the tag" in result.stderr
            assert "Traceback" not in result.output
        assert not marker.exists(), name
    # --set values are YAML too: a tag there is not executed either (the value stays an inert string)
    ok = write_yaml(tmp_path / "ok.yaml", {"model": {"name_or_path": "builtin:tiny-llama"},
                                           "data": {"train": "x.jsonl"}})
    result = runner.invoke(app, ["validate", str(ok), "--no-data", "--set",
                                 f"logging.project=!!python/object/apply:os.system ['touch {marker}']"])
    assert not marker.exists()
    assert "Traceback" not in result.output


def test_package_loads_yaml_safely_only() -> None:
    unsafe = re.compile(r"yaml\.(load|load_all|unsafe_load|full_load)\s*\(|Loader\s*=\s*yaml\.(Loader|FullLoader|"
                        r"UnsafeLoader)|\b(Unsafe|Full)Loader\b")
    for path, text in package_sources().items():
        assert not unsafe.search(text), f"{path}: {unsafe.search(text)}"


# Checkpoints are unpickled with weights_only=True only --------------------------------------------------------------

def test_package_unpickles_with_weights_only() -> None:
    for path, text in package_sources().items():
        for call in re.finditer(r"torch\.load\(", text):
            args = text[call.end(): text.index(")", call.end()) + 1]
            assert "weights_only=True" in args, f"{path}: torch.load({args}"
        assert not re.search(r"\b(pickle|cPickle|dill|joblib|marshal)\.loads?\(|import (dill|joblib|marshal)\b|"
                             r"\bpd\.read_pickle\b|\bnp\.load\([^)]*allow_pickle=True", text), path


class _RunsCode:
    """Pickles to a call of os.system: what a malicious optimizer.pt would hold."""

    def __init__(self, command: str):
        self.command = command

    def __reduce__(self) -> tuple[Any, ...]:
        return (os.system, (self.command,))


@pytest.fixture(scope="module")
def secret_run(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """A tiny training run (2 steps, a checkpoint per step) with secrets in the environment and one leaked into a
    recipe string; returns the recipe, the run directory and everything printed while it trained."""
    from ft_cli.train import train_from_recipe

    tmp = tmp_path_factory.mktemp("secret-run")
    recipe = write_yaml(tmp / "recipe.yaml", tiny_recipe(few_alpaca_rows(tmp / "d.jsonl"), tmp / "run",
                                                         logging={"project": f"proj-{SECRETS['HF_TOKEN']}"}))
    out, err = io.StringIO(), io.StringIO()
    with pytest.MonkeyPatch.context() as mp:
        for key, value in SECRETS.items():
            mp.setenv(key, value)
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            run = train_from_recipe(recipe, [])
    return {"recipe": recipe, "run": Path(run), "console": out.getvalue() + err.getvalue()}


def test_secrets_never_reach_the_run_directory_or_console(secret_run: dict[str, Any]) -> None:
    run: Path = secret_run["run"]
    for name in ("recipe.yaml", "metrics.jsonl", "run.json"):
        assert (run / name).is_file(), name
    assert "done: 2 steps" in secret_run["console"]
    assert "proj-***" in (run / "recipe.yaml").read_text()  # the leaked value is redacted, the rest kept
    texts = {"console": secret_run["console"]}
    texts.update({str(p): p.read_bytes().decode("utf-8", "replace") for p in run.rglob("*") if p.is_file()})
    for where, text in texts.items():
        for key, secret in SECRETS.items():
            assert secret not in text, f"{key} leaked into {where}"


def test_validate_does_not_print_secrets(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    for key, value in SECRETS.items():
        monkeypatch.setenv(key, value)
    recipe = write_yaml(tmp_path / "r.yaml", tiny_recipe(ALPACA, tmp_path / "out",
                                                         logging={"project": f"x-{SECRETS['WANDB_API_KEY']}"}))
    result = runner.invoke(app, ["validate", str(recipe), "--no-data"])
    assert result.exit_code == 0, result.output
    assert "x-***" in result.output and all(s not in result.output for s in SECRETS.values())


def test_malicious_optimizer_state_is_refused_on_resume(secret_run: dict[str, Any], tmp_path: Path) -> None:
    import torch

    run = tmp_path / "run"
    shutil.copytree(secret_run["run"], run)
    ckpt = max((run / "checkpoints").glob("step-*"), key=lambda p: int(p.name.split("-")[1]))
    marker = tmp_path / "PICKLE_CODE_RAN"
    good = torch.load(ckpt / "optimizer.pt", weights_only=True)
    torch.save({**good, "extra": _RunsCode(f"touch {marker}")}, ckpt / "optimizer.pt")
    # Whoever can replace the file can also rewrite its checksum in state.json (else resume skips it as corrupt):
    # weights_only is what stands between the file and code execution.
    _update_checksum(ckpt, "optimizer.pt")
    before = tree(run)
    result = runner.invoke(app, ["train", str(secret_run["recipe"]), "--resume", "--output-dir", str(run),
                                 "--set", "train.max_steps=3"])
    assert result.exit_code == 2, result.output + repr(result.exception)
    err = result.stderr.strip().splitlines()[-1]
    assert err.startswith(f"error: {ckpt / 'optimizer.pt'}: refused to load"), result.stderr
    assert "posix.system" in err or "os.system" in err
    assert "Traceback" not in result.output
    assert not marker.exists(), "unpickling the checkpoint ran code"
    assert tree(run) == before  # the run directory is left exactly as it was
    # The control: the same checkpoint with its real optimizer state resumes (weights_only loads what ft writes).
    torch.save(good, ckpt / "optimizer.pt")
    _update_checksum(ckpt, "optimizer.pt")
    result = runner.invoke(app, ["train", str(secret_run["recipe"]), "--resume", "--output-dir", str(run),
                                 "--set", "train.max_steps=3"])
    assert result.exit_code == 0, result.output + repr(result.exception)
    assert json.loads((run / "metrics.jsonl").read_text().splitlines()[-1])["step"] == 3


# Relative paths ---------------------------------------------------------------------------------------------------

def test_relative_paths_resolve_against_the_recipe_not_the_cwd(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from ft_cli.builtin_models import resolve_builtin

    project = tmp_path / "project"
    shutil.copytree(resolve_builtin("builtin:tiny-llama"), project / "models" / "tiny")
    few_alpaca_rows(project / "data" / "train.jsonl", 6)
    few_alpaca_rows(project / "data" / "eval.jsonl", 2)
    recipe = write_yaml(project / "recipes" / "r.yaml", tiny_recipe(
        Path("../data/train.jsonl"), Path("../runs/r"), model={"name_or_path": "../models/tiny"},
        data={"eval": "../data/eval.jsonl"}))
    # The current directory has decoys at the same relative paths: reading any of them would fail.
    elsewhere = tmp_path / "elsewhere" / "cwd"
    (elsewhere.parent / "data").mkdir(parents=True)
    elsewhere.mkdir()
    (elsewhere.parent / "data" / "train.jsonl").write_text("not json\n")
    (elsewhere.parent / "models" / "tiny").mkdir(parents=True)
    monkeypatch.chdir(elsewhere)
    relative = os.path.relpath(recipe, elsewhere)
    result = runner.invoke(app, ["validate", relative])  # loads the tokenizer, the data and the model's config
    assert result.exit_code == 0, result.output + repr(result.exception)
    resolved = load_recipe(relative)
    assert resolved.model.name_or_path == str(project / "models" / "tiny")
    assert resolved.data.train == str(project / "data" / "train.jsonl")
    assert resolved.data.eval == str(project / "data" / "eval.jsonl")
    assert not (elsewhere / "runs").exists() and not (project / "runs").exists()
