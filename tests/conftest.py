"""Shared test set-up: offline, a throwaway ft cache, tiny data, GPU tests skipped without CUDA."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Built-in models and tokenized-data caches go to one directory per test session unless the caller chose one.
os.environ.setdefault("FT_CACHE_DIR", tempfile.mkdtemp(prefix="ft-test-cache-"))

ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = ROOT.parent / "shared" / "data"

# bitsandbytes picks its 4-bit CPU code path by the host's instruction set (AVX512-BF16 or not). The suite runs as if
# on a CPU that has it - the path that used to break QLoRA - whatever this host has, in this process and in every
# process it starts (tests/bnb_host/sitecustomize.py, TEST-ONLY); tests that take the `bnb_cpu_path` fixture run on
# both paths. FT_TEST_BNB_AVX512BF16=0 (or 1) set by the caller wins.
BNB_HOST_DIR = ROOT / "tests" / "bnb_host"
os.environ.setdefault("FT_TEST_BNB_AVX512BF16", "1")
os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (str(BNB_HOST_DIR), os.environ.get("PYTHONPATH")) if p)


def _install_bnb_host() -> None:
    import importlib.util

    spec = importlib.util.spec_from_file_location("ft_test_bnb_host", BNB_HOST_DIR / "sitecustomize.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    module.install()


_install_bnb_host()


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(params=[True, False], ids=["avx512bf16-cpu", "plain-cpu"])
def bnb_cpu_path(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> bool:
    """Run the test twice: bitsandbytes' 4-bit layers built as on a CPU with AVX512-BF16 (True) and without (False),
    in this process and in the `ft` processes the test starts."""
    import bitsandbytes.nn.modules as bnb_modules

    monkeypatch.setattr(bnb_modules, "has_avx512bf16", lambda: request.param)
    monkeypatch.setenv("FT_TEST_BNB_AVX512BF16", "1" if request.param else "0")
    return request.param


@pytest.fixture(scope="session")
def alpaca_file() -> Path:
    """200 synthetic alpaca rows that ship with ft (examples/data)."""
    return ROOT / "examples" / "data" / "quickstart_alpaca.json"


@pytest.fixture(scope="session")
def chat_file() -> Path:
    return ROOT / "examples" / "data" / "quickstart_chat.jsonl"


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """The public sample data beside the checkout (../shared/data); tests using it skip when it is absent."""
    if not SHARED_DATA.is_dir():
        pytest.skip("../shared/data not present")
    return SHARED_DATA


# Data pipeline (tests/test_data_*.py) ------------------------------------------------------------------------------

@pytest.fixture(scope="session")
def tiny_llama_dir() -> Path:
    """The built-in tiny-llama model directory (ChatML template, eos <|im_end|>, no BOS added on encode)."""
    from ft_cli.builtin_models import resolve_builtin

    return resolve_builtin("builtin:tiny-llama")


@pytest.fixture
def data_tokenizer(tiny_llama_dir):
    """A fresh copy of the built-in tokenizer per test (tests change its chat template)."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_llama_dir)


@pytest.fixture
def bos_tokenizer(tiny_llama_dir):
    """The built-in tokenizer changed to add <|begin_of_text|> on encode, as Llama tokenizers do."""
    from tokenizers import processors
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_llama_dir)
    tok.backend_tokenizer.post_processor = processors.Sequence([
        processors.ByteLevel(trim_offsets=False),
        processors.TemplateProcessing(single=f"{tok.bos_token} $A", special_tokens=[(tok.bos_token, tok.bos_token_id)]),
    ])
    return tok


@pytest.fixture
def data_recipe():
    """make(train, **data_fields) -> Recipe for builtin:tiny-llama; no cache and no eval split unless asked."""
    from ft_cli.recipe import recipe_from_dict

    def make(train, train_section: dict | None = None, **data):
        data = {"train": train, "val_split": 0.0, "cache": False, **data}
        raw = {"model": {"name_or_path": "builtin:tiny-llama"}, "data": data}
        if train_section:
            raw["train"] = train_section
        return recipe_from_dict(raw)

    return make


# The recipe factory of the suite ------------------------------------------------------------------------------------

def tiny_recipe(train_file: Path | str | None = None, out: Path | None = None, *,
                base: dict[str, Any] | None = None, **sections: Any) -> dict[str, Any]:
    """A recipe (a dict, as recipe.yaml holds it) for builtin:tiny-llama in float32: method lora (rank 8, alpha 16,
    no dropout; the lora section goes when another method does not use it), alpaca data at `train_file`, no eval
    split, one log line per step, no eval or checkpoint unless asked, output_dir `out`.

    `base` (a test module's own defaults) and then `sections` (one test's changes) are applied in turn: a dict is
    merged into its section, anything else replaces the key, None removes it."""
    from ft_cli.methods.registry import METHODS

    recipe: dict[str, Any] = {
        "model": {"name_or_path": "builtin:tiny-llama", "dtype": "float32"},
        "method": "lora",
        "lora": {"rank": 8, "alpha": 16, "dropout": 0.0},
        "data": {"train": str(train_file), "format": "alpaca", "val_split": 0.0, "max_seq_len": 128},
        "train": {"max_steps": 6, "micro_batch_size": 4, "grad_accum": 1, "lr": 1e-2, "warmup_ratio": 0.0,
                  "eval_every": None, "save_every": None, "log_every": 1},
    }
    if train_file is None:
        del recipe["data"]["train"]
    if out is not None:
        recipe["output_dir"] = str(out)
    lora_given = "lora" in (base or {}) or "lora" in sections
    for changes in (base or {}, sections):
        for key, value in changes.items():
            if value is None:
                recipe.pop(key, None)
            elif isinstance(value, dict) and isinstance(recipe.get(key), dict):
                recipe[key] = {**recipe[key], **value}
            else:
                recipe[key] = value
    spec = METHODS.get(recipe.get("method", "lora"))
    if not lora_given and spec is not None and spec.section != "lora":
        recipe.pop("lora", None)
    return recipe


def write_recipe_file(path: Path, recipe: dict[str, Any]) -> Path:
    """recipe.yaml with its keys sorted (yaml.safe_dump's default): tests that edit the text rely on that order."""
    import yaml

    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(recipe))
    return path


# Several adapters on one base (tests/test_serve.py, tests/test_compose.py) ------------------------------------------

def train_tiny_lora(tmp: Path, name: str, rows: list[dict], seed: int, **sections: Any) -> Path:
    """A 6-step LoRA run (rank 8, float32) of builtin:tiny-llama on `rows`, with a high learning rate; `sections`
    override top-level recipe keys (a dict is merged into the section)."""
    import json

    from ft_cli.train import train_from_recipe

    (tmp / f"{name}.json").write_text(json.dumps(rows))
    recipe = tiny_recipe(tmp / f"{name}.json", tmp / name, base={
        "data": {"val_split": 0.2, "packing": False},
        "train": {"lr": 2e-2, "seed": seed, "gradient_checkpointing": False}}, **sections)
    return Path(train_from_recipe(write_recipe_file(tmp / f"{name}.yaml", recipe), [], overwrite=True))


@pytest.fixture(scope="session")
def lora_runs(tmp_path_factory: pytest.TempPathFactory, alpaca_file: Path) -> dict[str, Path]:
    """Three LoRA runs on builtin:tiny-llama (alpha, beta, gamma), each on other rows with a high learning rate,
    so they answer differently (a mix-up between adapters shows)."""
    import json

    tmp = tmp_path_factory.mktemp("lora-runs")
    rows = json.loads(alpaca_file.read_text())
    return {name: train_tiny_lora(tmp, name, rows[i * 40:(i + 1) * 40], seed=i)
            for i, name in enumerate(["alpha", "beta", "gamma"])}
