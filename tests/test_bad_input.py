"""The bad-input suite: every bad recipe and every bad data file ends the real CLI with exit code 2, ONE precise
message (the field path, or file:line / record and field), no traceback, and nothing written (seconds in all).

Recipe-only problems go through `ft validate` (fast); every data problem, and a representative set of recipe
problems, go through `ft train` with a fresh output_dir that must not exist afterwards. A few run as a real
subprocess to prove that no traceback reaches stderr.
"""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from typer.testing import CliRunner

from ft_cli.cli import app

ROOT = Path(__file__).resolve().parents[1]
ALPACA = ROOT / "examples" / "data" / "quickstart_alpaca.json"
runner = CliRunner()


DROP = object()  # in a change: remove this key


def base_recipe() -> dict[str, Any]:
    """A valid tiny recipe (one optimizer step on the shipped alpaca sample)."""
    return {
        "model": {"name_or_path": "builtin:tiny-llama", "dtype": "float32"},
        "method": "lora",
        "data": {"train": str(ALPACA), "format": "alpaca", "val_split": 0.0, "max_seq_len": 64, "cache": False},
        "train": {"max_steps": 1, "micro_batch_size": 2, "grad_accum": 1, "eval_every": None, "save_every": None},
    }


def merged(change: dict[str, Any]) -> dict[str, Any]:
    """base_recipe() with `change` merged in one level deep (sections are updated, not replaced; DROP removes)."""
    recipe = base_recipe()
    for key, value in change.items():
        if isinstance(value, dict) and isinstance(recipe.get(key), dict):
            recipe[key] = {k: v for k, v in {**recipe[key], **value}.items() if v is not DROP}
        elif value is DROP:
            recipe.pop(key, None)
        else:
            recipe[key] = copy.deepcopy(value)
    return recipe


def snapshot(root: Path) -> set[Path]:
    return set(root.rglob("*"))


def expect_user_error(result: Any, *needles: str) -> str:
    """Exit 2, one `error:` message on stderr holding every needle, no traceback anywhere; returns stderr."""
    detail = f"exit {result.exit_code}\nstdout:\n{result.stdout}\nstderr:\n{result.stderr}\nexc: {result.exception!r}"
    assert result.exit_code == 2, detail
    assert isinstance(result.exception, SystemExit), detail  # not an uncaught exception
    assert "Traceback" not in result.output, detail
    err = result.stderr.strip()
    assert err.startswith("error: "), detail
    assert err.count("error:") == 1 and len(err.splitlines()) == 1, detail  # ONE message
    for needle in needles:
        assert needle in err, f"{needle!r} not in the message\n{detail}"
    return err


@pytest.fixture(scope="module", autouse=True)
def _builtin_model_built() -> None:
    """Build builtin:tiny-llama up front: its one-time build is not what these tests look at."""
    from ft_cli.builtin_models import resolve_builtin

    resolve_builtin("builtin:tiny-llama")


@pytest.fixture
def work(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A fresh current directory (so a default runs/... would be seen) holding the recipe and data files."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return tmp_path


def write_recipe(work: Path, recipe: dict[str, Any] | str | bytes, name: str = "recipe.yaml") -> Path:
    path = work / name
    if isinstance(recipe, bytes):
        path.write_bytes(recipe)
    elif isinstance(recipe, str):
        path.write_text(recipe)
    else:
        recipe = {**recipe, "output_dir": recipe.get("output_dir", str(work / "out"))}
        path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    return path


def run_ft(work: Path, command: str, recipe: Path, *args: str) -> Any:
    """Run `ft COMMAND RECIPE ARGS` and check that it wrote nothing at all under `work`."""
    before = snapshot(work)
    result = runner.invoke(app, [command, str(recipe), *args])
    assert snapshot(work) == before, f"{command} wrote {sorted(map(str, snapshot(work) - before))}"
    assert not (work / "out").exists() and not (work / "runs").exists()
    return result


# Bad recipes -----------------------------------------------------------------------------------------------------
# (id, change merged into base_recipe(), text every message must hold). {R} stands for the recipe path.

RECIPE_CASES: list[tuple[str, dict[str, Any], list[str]]] = [
    # wrong types
    ("type-model-section", {"model": "builtin:tiny-llama"}, ["{R}:1: model: must be a valid dictionary"]),
    ("type-lora-rank", {"lora": {"rank": "big"}}, ["lora.rank: must be a valid integer", "'big'"]),
    ("type-train-lr", {"train": {"lr": "fast"}}, ["train.lr: must be a valid number", "'fast'"]),
    ("type-trust-remote-code", {"model": {"trust_remote_code": "maybe"}},
     ["model.trust_remote_code: must be a valid boolean"]),
    ("type-target-modules", {"lora": {"target_modules": {"q_proj": 1}}}, ["lora.target_modules:"]),
    ("type-data-train", {"data": {"train": 42}}, ["data.train:"]),
    ("type-logging-trackers", {"logging": {"trackers": "wandb"}}, ["logging.trackers: must be a valid list"]),
    # unknown keys at every level, each with a "did you mean"
    ("unknown-top", {"traning": {}}, ["traning: unknown key (did you mean 'train'?)"]),
    ("unknown-model", {"model": {"name_or_path": "builtin:tiny-llama", "d_type": "float32"}},
     ["model.d_type: unknown key (did you mean 'dtype'?)"]),
    ("unknown-lora", {"lora": {"dropuot": 0.1}}, ["lora.dropuot: unknown key (did you mean 'dropout'?)"]),
    ("unknown-freeze", {"method": "freeze", "freeze": {"trainable_layer": 1}},
     ["freeze.trainable_layer: unknown key (did you mean 'trainable_layers'?)"]),
    ("unknown-prompt", {"method": "prompt_tuning", "prompt": {"num_virtual_token": 4}},
     ["prompt.num_virtual_token: unknown key (did you mean 'num_virtual_tokens'?)"]),
    ("unknown-bottleneck", {"method": "adapter", "bottleneck": {"sise": 8}},
     ["bottleneck.sise: unknown key (did you mean 'size'?)"]),
    ("unknown-ia3", {"method": "ia3", "ia3": {"target_module": ["q_proj"]}},
     ["ia3.target_module: unknown key (did you mean 'target_modules'?)"]),
    ("unknown-quantization", {"method": "qlora", "quantization": {"bit": 4}},
     ["quantization.bit: unknown key (did you mean 'bits'?)"]),
    ("unknown-data", {"data": {"max_seq_length": 64}},
     ["data.max_seq_length: unknown key (did you mean 'max_seq_len'?)"]),
    ("unknown-data-train-item", {"data": {"train": [{"path": str(ALPACA), "wieght": 2}]}},
     ["data.train.0.wieght: unknown key (did you mean 'weight'?)"]),
    ("unknown-train", {"train": {"epoch": 1}}, ["train.epoch: unknown key (did you mean 'epochs'?)"]),
    ("unknown-logging", {"logging": {"tracker": ["wandb"]}},
     ["logging.tracker: unknown key (did you mean 'trackers'?)"]),
    # bad enums
    ("enum-method", {"method": "qlora4"}, ["method: must be one of", "'qlora4'"]),
    ("enum-dtype", {"model": {"dtype": "fp8"}}, ["model.dtype: must be one of", "'bfloat16'", "'fp8'"]),
    ("enum-format", {"data": {"format": "openai"}}, ["data.format: must be one of", "'openai'"]),
    ("enum-scheduler", {"train": {"scheduler": "cosine_with_restarts"}}, ["train.scheduler: must be one of"]),
    ("enum-optimizer", {"train": {"optimizer": "sgd"}}, ["train.optimizer: must be one of", "'sgd'"]),
    ("enum-quant-type", {"method": "qlora", "quantization": {"quant_type": "int4"}},
     ["quantization.quant_type: must be one of"]),
    ("enum-truncation", {"data": {"truncation": "left"}}, ["data.truncation: must be one of"]),
    ("enum-tracker", {"logging": {"trackers": ["comet"]}}, ["logging.trackers.0: must be one of", "'comet'"]),
    # out-of-range numbers
    ("range-lora-dropout", {"lora": {"dropout": 1.0}}, ["lora.dropout: must be less than 1.0, got 1.0"]),
    ("range-max-seq-len", {"data": {"max_seq_len": 0}}, ["data.max_seq_len: must be greater than 0, got 0"]),
    ("range-warmup-ratio", {"train": {"warmup_ratio": 2}}, ["train.warmup_ratio: must be at most 1.0, got 2"]),
    ("range-grad-accum", {"train": {"grad_accum": -1}}, ["train.grad_accum: must be greater than 0, got -1"]),
    ("range-seed", {"train": {"seed": -1}}, ["train.seed: must be at least 0, got -1"]),
    ("range-bits", {"method": "qlora", "quantization": {"bits": 3}}, ["quantization.bits: must be one of", "3"]),
    ("range-epochs", {"train": {"epochs": 0, "max_steps": None}}, ["train.epochs: must be greater than 0"]),
    # incompatible combinations
    ("combo-quantization-freeze", {"method": "freeze", "quantization": {"bits": 8}},
     ["quantization: cannot be used with method 'freeze'"]),
    ("combo-lora-with-ia3", {"method": "ia3", "lora": {"rank": 4}},
     ["lora: is only used by method lora | qlora | dora, not 'ia3'"]),
    ("combo-qlora-bits-null", {"method": "qlora", "quantization": {"bits": None}},
     ["quantization.bits: method qlora needs 4 or 8 bits"]),
    ("combo-packing-prompt-tuning", {"method": "prompt_tuning", "data": {"packing": True}},
     ["data.packing: cannot be used with prompt_tuning"]),
    ("combo-prefix-checkpointing", {"method": "prefix_tuning", "train": {"gradient_checkpointing": True}},
     ["train.gradient_checkpointing: does not work with prefix_tuning"]),
    ("combo-init-text-prefix", {"method": "prefix_tuning", "prompt": {"init_text": "hi"}},
     ["prompt.init_text: only applies to prompt_tuning"]),
    ("combo-bottleneck-with-lora", {"bottleneck": {"size": 8}}, ["bottleneck: is only used by method adapter"]),
    ("combo-freeze-trains-nothing", {"method": "freeze", "freeze": {"trainable_layers": 0}},
     ["freeze: trains nothing"]),
    ("combo-ia3-feedforward",
     {"method": "ia3", "ia3": {"target_modules": ["q_proj"], "feedforward_modules": ["up_proj"]}},
     ["ia3.feedforward_modules: up_proj not in ia3.target_modules"]),
    ("combo-mixed-precision-lora", {"train": {"mixed_precision": False}},
     ["train.mixed_precision: applies to method full or freeze"]),
    # missing required fields
    ("missing-model", {"model": DROP}, ["model: is required"]),
    ("missing-name-or-path", {"model": {"name_or_path": DROP}}, ["model.name_or_path: is required"]),
    ("missing-data-train", {"data": {"train": DROP}}, ["data.train: is required"]),
]


@pytest.mark.parametrize(("change", "needles"), [c[1:] for c in RECIPE_CASES], ids=[c[0] for c in RECIPE_CASES])
def test_bad_recipe_validate(work: Path, change: dict[str, Any], needles: list[str]) -> None:
    recipe = write_recipe(work, merged(change))
    err = expect_user_error(run_ft(work, "validate", recipe), *(n.replace("{R}", str(recipe)) for n in needles))
    assert err.startswith(f"error: {recipe}:")  # the recipe file, and the line where a key is given


@pytest.mark.parametrize("case", ["unknown-lora", "enum-format", "range-max-seq-len", "combo-qlora-bits-null",
                                  "combo-packing-prompt-tuning", "missing-data-train"])
def test_bad_recipe_train_writes_nothing(work: Path, case: str) -> None:
    _, change, needles = next(c for c in RECIPE_CASES if c[0] == case)
    recipe = write_recipe(work, merged(change))
    expect_user_error(run_ft(work, "train", recipe), *needles)


def test_unknown_key_error_names_the_line(work: Path) -> None:
    recipe = write_recipe(work, "model:\n  name_or_path: builtin:tiny-llama\ndata:\n  train: x.jsonl\n"
                                "train:\n  max_steps: 1\n  lerning_rate: 0.1\n")
    expect_user_error(run_ft(work, "validate", recipe), f"{recipe}:7: train.lerning_rate: unknown key")


# Recipe files that are not recipes, and --set ---------------------------------------------------------------------

FILE_CASES: list[tuple[str, str | bytes, list[str]]] = [
    ("empty-file", "", ["{R}: the recipe is empty"]),
    ("only-comments", "# nothing here\n", ["{R}: the recipe is empty"]),
    ("yaml-list", "- model\n- data\n", ["a recipe is a YAML mapping"]),
    ("yaml-scalar", "just a string\n", ["a recipe is a YAML mapping"]),
    ("invalid-yaml-indent", "model:\n  name_or_path: builtin:tiny-llama\n data:\n  train: x.jsonl\n",
     ["{R}:3: invalid YAML"]),
    ("invalid-yaml-tab", "model:\n\tname_or_path: x\n", ["{R}:2: invalid YAML"]),
    ("invalid-yaml-unclosed-quote", "model:\n  name_or_path: builtin:tiny-llama\ndata:\n  train: \"x.jsonl\n",
     ["{R}:", "invalid YAML"]),
    ("non-utf8", b"model:\n  name_or_path: caf\xe9\ndata:\n  train: x.jsonl\n", ["{R}:2: not valid UTF-8 (byte 0xe9)"]),
]


@pytest.mark.parametrize(("text", "needles"), [c[1:] for c in FILE_CASES], ids=[c[0] for c in FILE_CASES])
def test_bad_recipe_file(work: Path, text: str | bytes, needles: list[str]) -> None:
    recipe = write_recipe(work, text)
    for command in ("validate", "train"):
        expect_user_error(run_ft(work, command, recipe), *(n.replace("{R}", str(recipe)) for n in needles))


def test_recipe_path_is_a_directory(work: Path) -> None:
    (work / "recipes").mkdir()
    expect_user_error(run_ft(work, "validate", work / "recipes"), "recipes: is a directory, not a recipe file")


SET_CASES: list[tuple[str, list[str], list[str]]] = [
    ("no-equals", ["train.lr"], ["--set train.lr: expected KEY=VALUE"]),
    ("empty-key", ["=1"], ["--set =1: bad key"]),
    ("empty-part", ["train..lr=1"], ["--set train..lr=1: bad key 'train..lr'"]),
    ("into-a-value", ["model.name_or_path.x=1"], ["--set model.name_or_path.x=1: name_or_path is not a section"]),
    ("wrong-type", ["train.lr=abc"], ["--set train.lr=abc: must be a valid number", "'abc'"]),
    ("unknown-key", ["lora.rnak=8"], ["--set lora.rnak=8: unknown key (did you mean 'rank'?)"]),
    ("bad-enum", ["method=lorra"], ["--set method=lorra: must be one of", "'lorra'"]),
    ("out-of-range", ["lora.rank=0"], ["--set lora.rank=0: must be greater than 0, got 0"]),
    ("incompatible", ["method=full", "quantization.bits=4"], ["quantization: cannot be used with method 'full'"]),
]


@pytest.mark.parametrize(("sets", "needles"), [c[1:] for c in SET_CASES], ids=[c[0] for c in SET_CASES])
def test_bad_set(work: Path, sets: list[str], needles: list[str]) -> None:
    recipe = write_recipe(work, base_recipe())
    args = [a for s in sets for a in ("--set", s)]
    expect_user_error(run_ft(work, "validate", recipe, *args), *needles)


def test_set_on_a_recipe_that_is_not_a_mapping(work: Path) -> None:
    recipe = write_recipe(work, "- a\n- b\n")
    expect_user_error(run_ft(work, "validate", recipe, "--set", "train.lr=1"), "a recipe is a YAML mapping")


# The model: missing paths, no config.json, unknown built-in, hub offline ------------------------------------------

def test_missing_local_model_dir(work: Path) -> None:
    recipe = write_recipe(work, merged({"model": {"name_or_path": "./models/nope"}}))
    for command in ("validate", "train"):
        expect_user_error(run_ft(work, command, recipe), "model.name_or_path: local model directory not found",
                          str(work / "models" / "nope"))


def test_model_dir_without_config_json(work: Path) -> None:
    (work / "half-model").mkdir()
    (work / "half-model" / "tokenizer.json").write_text("{}")
    recipe = write_recipe(work, merged({"model": {"name_or_path": "half-model"}}))
    for command in ("validate", "train"):
        expect_user_error(run_ft(work, command, recipe), "model.name_or_path:", "has no config.json")


def test_unknown_builtin_model_says_did_you_mean(work: Path) -> None:
    recipe = write_recipe(work, merged({"model": {"name_or_path": "builtin:tiny-lama"}}))
    for command, args in (("validate", ["--no-data"]), ("validate", []), ("train", [])):
        expect_user_error(run_ft(work, command, recipe, *args), "model.name_or_path:",
                          "did you mean builtin:tiny-llama?")


def test_unreachable_hub_model_offline(work: Path) -> None:
    recipe = write_recipe(work, merged({"model": {"name_or_path": "no-such-org/no-such-model"}}))
    expect_user_error(run_ft(work, "validate", recipe), "model.name_or_path: 'no-such-org/no-such-model'",
                      "HF_HUB_OFFLINE")


def test_missing_data_path(work: Path) -> None:
    recipe = write_recipe(work, merged({"data": {"train": [{"path": str(ALPACA)}, {"path": "more/missing.jsonl"}]}}))
    expect_user_error(run_ft(work, "validate", recipe), "data.train[1]: file not found",
                      str(work / "more" / "missing.jsonl"))


def test_missing_eval_path(work: Path) -> None:
    recipe = write_recipe(work, merged({"data": {"eval": "held_out.jsonl"}}))
    expect_user_error(run_ft(work, "train", recipe), "data.eval: file not found", str(work / "held_out.jsonl"))


def test_unknown_chat_template_name(work: Path) -> None:
    recipe = write_recipe(work, merged({"data": {"chat_template": "chatmll"}}))
    expect_user_error(run_ft(work, "train", recipe), "data.chat_template: unknown built-in template 'chatmll'")


def test_unknown_column_mapping(work: Path) -> None:
    recipe = write_recipe(work, merged({"data": {"columns": {"question": "instruction"}}}))
    expect_user_error(run_ft(work, "train", recipe), "data.columns: 'question' is not a field of format alpaca")


def test_float16_on_cpu(work: Path) -> None:
    recipe = write_recipe(work, merged({"model": {"name_or_path": "builtin:tiny-llama", "dtype": "float16"}}))
    expect_user_error(run_ft(work, "train", recipe), "model.dtype: float16 training is not supported on the CPU")


def test_liger_kernel_not_installed(work: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "liger_kernel", None)  # not importable, even where it is installed
    recipe = write_recipe(work, merged({"train": {"liger_kernel": True}}))
    expect_user_error(run_ft(work, "train", recipe),
                      "train.liger_kernel: liger-kernel is not installed; pip install liger-kernel")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without CUDA")
def test_liger_kernel_needs_cuda(work: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import importlib.machinery
    import types

    installed = types.ModuleType("liger_kernel")  # as if installed: the device is checked next
    installed.__spec__ = importlib.machinery.ModuleSpec("liger_kernel", None)
    monkeypatch.setitem(sys.modules, "liger_kernel", installed)
    recipe = write_recipe(work, merged({"train": {"liger_kernel": True}}))
    expect_user_error(run_ft(work, "train", recipe), "train.liger_kernel:", "need a CUDA GPU", "on the cpu")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU backend's requirement")
def test_compile_without_a_cxx_compiler(work: Path) -> None:
    from torch._inductor import config

    recipe = write_recipe(work, merged({"train": {"compile": True}}))
    # config.patch, not monkeypatch: undoing a monkeypatch deletes the setting from torch's config module
    with config.patch({"cpp.cxx": (None, str(work / "no-such-c++"))}):
        result = run_ft(work, "train", recipe)
    expect_user_error(result, "train.compile: torch.compile on the CPU needs a C++ compiler", "train.compile: false")


# Bad data files (all through ft train) -----------------------------------------------------------------------------

def _alpaca(i: int) -> dict[str, str]:
    return {"instruction": f"Say {i}.", "input": "", "output": f"{i}"}


def _jsonl(*records: Any) -> str:
    return "".join(json.dumps(r) + "\n" for r in records)


# (id, file name, contents (str, bytes, or None for a directory), extra data settings, message parts; {F} = the path)
DATA_CASES: list[tuple[str, str, str | bytes | None, dict[str, Any], list[str]]] = [
    ("json-array-malformed", "d.json",
     '[\n  {"instruction": "a", "output": "b"},\n  {"instruction": "c" "output": 1}\n]\n',
     {}, ["{F}:3: invalid JSON: Expecting ',' delimiter"]),
    ("jsonl-line-malformed", "d.jsonl", _jsonl(_alpaca(0)) + '{"instruction": "x", "output": }\n' + _jsonl(_alpaca(2)),
     {}, ["{F}:2: invalid JSON"]),
    ("jsonl-line-not-object", "d.jsonl", _jsonl(_alpaca(0), ["a", "b"]), {},
     ["{F}:2: expected one JSON object per line, got list"]),
    ("json-not-array", "d.json", '"hello"', {}, ["{F}: expected a JSON array of records"]),
    ("missing-field", "d.jsonl", _jsonl(_alpaca(0), _alpaca(1), {"instruction": "no answer"}), {},
     ["{F}:record 2 (line 3): missing field 'output' (format alpaca"]),
    ("output-is-number", "d.json", json.dumps([_alpaca(0), {"instruction": "2+2", "output": 4}]), {},
     ["{F}:record 1: field 'output' must be a string, got int"]),
    ("messages-not-list", "d.jsonl", _jsonl({"messages": "hello"}), {"format": "chat"},
     ["{F}:record 0 (line 1): field 'messages' must be a list", "format chat"]),
    ("content-not-string", "d.jsonl", _jsonl({"messages": [{"role": "user", "content": ["hi"]},
                                                        {"role": "assistant", "content": "yo"}]}),
     {"format": "chat"}, ["{F}:record 0 (line 1): field 'messages[0].content' must be a string, got list"]),
    ("unknown-chat-role", "d.jsonl", _jsonl({"messages": [{"role": "human", "content": "hi"},
                                                       {"role": "assistant", "content": "yo"}]}),
     {"format": "chat"}, ["{F}:record 0 (line 1): messages[0].role: unknown role 'human'", "allowed: system, user"]),
    ("sharegpt-unknown-from", "d.json", json.dumps([{"conversations": [{"from": "bot", "value": "x"}]}]),
     {"format": "sharegpt"}, ["{F}:record 0: conversations[0].from: unknown role 'bot'"]),
    ("sharegpt-no-assistant", "d.json", json.dumps([{"conversations": [{"from": "human", "value": "hi"}]}] * 3),
     {"format": "sharegpt"}, ["data.train: every example was dropped", "3 read: 3 with nothing to train on"]),
    ("text-not-string", "d.jsonl", _jsonl({"text": None}, {"text": 3}), {"format": "text"},
     ["{F}:record 0 (line 1): missing field 'text'"]),
    ("empty-jsonl", "d.jsonl", "", {}, ["data.train: no records in {F}"]),
    ("blank-lines-jsonl", "d.jsonl", "\n\n  \n", {}, ["data.train: no records in {F}"]),
    ("empty-json-file", "d.json", "", {}, ["data.train: no records in {F}"]),
    ("empty-json-array", "d.json", "[]", {}, ["data.train: no records in {F}"]),
    ("all-too-long-dropped", "d.jsonl", _jsonl(*[{"instruction": "word " * 50, "output": "long " * 50}] * 4),
     {"truncation": "drop", "max_seq_len": 16},
     ["data.train: every example was dropped (4 read: 0 with nothing to train on", "4 too long for max_seq_len=16",
      "truncation=drop"]),
    ("csv-missing-columns", "d.csv", "question,answer\nWhat?,That.\n", {},
     ["{F}:record 0 (line 2): missing field 'instruction'"]),
    ("csv-extra-cells", "d.csv", "instruction,output\nq,a\nq,a,extra\n", {}, ["{F}:3: more cells than the header"]),
    ("csv-header-only", "d.csv", "instruction,output\n", {}, ["data.train: no records in {F}"]),
    ("directory-without-data", "datadir", None, {}, ["data.train: directory {F} holds no .json, .jsonl"]),
    ("unsupported-suffix", "d.txt", "hello\n", {}, ["data.train: {F}: unsupported file type '.txt'"]),
    ("non-utf8-jsonl", "d.jsonl", b'{"instruction": "caf\xe9", "output": "x"}\n', {},
     ["{F}:1: not valid UTF-8 (byte 0xe9)"]),
    ("corrupt-parquet", "d.parquet", b"PAR1 not really parquet", {}, ["{F}: cannot read parquet"]),
]


@pytest.mark.parametrize(("name", "content", "data", "needles"), [c[1:] for c in DATA_CASES],
                         ids=[c[0] for c in DATA_CASES])
def test_bad_data_train_writes_nothing(work: Path, name: str, content: str | bytes | None, data: dict[str, Any],
                                       needles: list[str]) -> None:
    path = work / name
    if content is None:
        path.mkdir()
        (path / "notes.txt").write_text("not data")
    elif isinstance(content, bytes):
        path.write_bytes(content)
    else:
        path.write_text(content)
    recipe = write_recipe(work, merged({"data": {"train": name, **data}}))
    expect_user_error(run_ft(work, "train", recipe), *(n.replace("{F}", str(path.resolve())) for n in needles))


def test_bad_eval_data_names_data_eval(work: Path) -> None:
    (work / "eval.jsonl").write_text(_jsonl({"instruction": "q"}))
    recipe = write_recipe(work, merged({"data": {"eval": "eval.jsonl"}}))
    expect_user_error(run_ft(work, "train", recipe), f"{work / 'eval.jsonl'}:record 0 (line 1): missing field 'output'")


# The real process: no traceback reaches stderr ---------------------------------------------------------------------

@pytest.mark.parametrize(("command", "recipe_text", "needle"), [
    ("validate", b"model:\n  name_or_path: \xff\xfe\n", "UTF-8"),
    ("validate", "model: !!python/object/apply:os.getcwd []\ndata:\n  train: x.jsonl\n", "invalid YAML"),
    ("train", None, "missing field 'output'"),
], ids=["non-utf8-recipe", "python-tag", "bad-data-train"])
def test_subprocess_has_no_traceback(work: Path, command: str, recipe_text: str | bytes | None, needle: str) -> None:
    if recipe_text is None:
        (work / "d.jsonl").write_text(_jsonl(_alpaca(0), {"instruction": "q"}))
        recipe_text = yaml.safe_dump(merged({"data": {"train": "d.jsonl"}, "output_dir": str(work / "out")}))
    recipe = write_recipe(work, recipe_text)
    before = snapshot(work)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "ft_cli.cli", command, str(recipe)], capture_output=True, text=True,
                          env=env, cwd=work, timeout=120)
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr and "Traceback" not in proc.stdout
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and needle in lines[0], proc.stderr
    assert snapshot(work) == before
