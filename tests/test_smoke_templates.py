"""`ft train --smoke` trains with the recipe model's own chat template and special tokens where ft ships them
(ft_cli/builtin_chat), so rendering, masking and the end-of-turn token are the real run's - and says so plainly
where it does not."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from ft_cli.chat_profiles import PROFILES, chat_profile_for
from ft_cli.cli import app
from tests.test_eval_never_changes_training import write_rows

runner = CliRunner()
ROOT = Path(__file__).resolve().parents[1]
CONVERSATION = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello there"}]


def smoke(tmp: Path, model: str, data: Path, **data_section) -> tuple[str, Path]:
    recipe = {"model": {"name_or_path": model, "dtype": "bfloat16"}, "method": "lora",
              "data": {"train": str(data), "format": "alpaca", "val_split": 0.2, **data_section},
              "train": {"max_steps": 4, "seed": 1}, "output_dir": str(tmp / "run")}
    path = tmp / "recipe.yaml"
    tmp.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(recipe))
    result = runner.invoke(app, ["train", str(path), "--smoke"])
    assert result.exit_code == 0, result.output
    return result.output, tmp / "run-smoke"


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_rows(tmp_path_factory.mktemp("data") / "train.json", 24)


def trained_texts(run: Path) -> list[str]:
    """The trained spans of the smoke run's first rows, decoded with its own tokenizer, special tokens kept."""
    from ft_cli.data.pipeline import build_datasets
    from ft_cli.loading import read_run_recipe
    from ft_cli.model import load_tokenizer
    from ft_cli.run_dir import RunDir

    recipe = read_run_recipe(RunDir(run))
    tok = load_tokenizer(recipe, str(run / "adapter"))
    rows = build_datasets(recipe, tok).train.select(range(3))
    return [tok.decode([t for t, label in zip(r["input_ids"], r["labels"], strict=True) if label != -100])
            for r in rows]


@pytest.mark.parametrize(("model", "family", "profile", "turn_end"), [
    ("meta-llama/Llama-3.1-8B-Instruct", "llama", "llama-3.1-instruct", "<|eot_id|>"),
    ("mistralai/Mistral-7B-Instruct-v0.3", "mistral", "mistral-instruct-v0.3", "</s>"),
    ("Qwen/Qwen2.5-7B-Instruct", "qwen2", "qwen2.5-instruct", "<|im_end|>"),
])
def test_smoke_trains_with_the_real_models_template_and_special_tokens(tmp_path: Path, data: Path, model: str,
                                                                      family: str, profile: str,
                                                                      turn_end: str) -> None:
    from transformers import AutoTokenizer

    chat = PROFILES[profile]
    assert chat_profile_for(model) is chat
    output, run = smoke(tmp_path, model, data)
    assert f"chat template and special tokens: {chat.source}'s own" in output
    tok = AutoTokenizer.from_pretrained(run / "adapter")
    assert tok.chat_template == chat.template and tok.eos_token == chat.eos_token
    for token in chat.special_tokens:  # one token each, as in the real tokenizer
        assert tok.convert_ids_to_tokens(tok.convert_tokens_to_ids(token)) == token
        assert len(tok(token, add_special_tokens=False)["input_ids"]) == 1
    config = json.loads((run / "adapter" / "adapter_config.json").read_text())
    assert Path(config["base_model_name_or_path"]).name.startswith(f"tiny-{family}+{profile}-")
    texts = trained_texts(run)
    assert all(text.rstrip("\n").endswith(turn_end) for text in texts), texts  # the real end-of-turn token is what trains
    assert not any("<|im_start|>" in text for text in texts)


def test_shipped_templates_render_as_the_models_do() -> None:
    """The documented prompt formats of the three models, rendered by the shipped copies."""
    from transformers import AutoTokenizer

    from ft_cli.builtin_models import tiny_model_dir_for

    expected = {
        "llama-3.1-instruct": "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nCutting Knowledge "
                              "Date: December 2023\nToday Date: 26 Jul 2024\n\n<|eot_id|><|start_header_id|>user"
                              "<|end_header_id|>\n\nHi<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n"
                              "Hello there<|eot_id|>",
        "mistral-instruct-v0.3": "<s>[INST] Hi[/INST] Hello there</s>",
        "qwen2.5-instruct": "<|im_start|>system\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant."
                            "<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\nHello there"
                            "<|im_end|>\n",
    }
    for name, family in (("llama-3.1-instruct", "llama"), ("mistral-instruct-v0.3", "mistral"),
                         ("qwen2.5-instruct", "qwen2")):
        tok = AutoTokenizer.from_pretrained(tiny_model_dir_for(family, chat=PROFILES[name]))
        assert tok.apply_chat_template(CONVERSATION, tokenize=False) == expected[name], name


def test_mistral_and_llama_smoke_runs_differ(tmp_path: Path, data: Path) -> None:
    """They used to train bit-identical losses: same tiny weights, same ChatML."""
    _, llama = smoke(tmp_path / "llama", "meta-llama/Llama-3.1-8B-Instruct", data)
    _, mistral = smoke(tmp_path / "mistral", "mistralai/Mistral-7B-Instruct-v0.3", data)
    losses = [[json.loads(ln)["loss"] for ln in (run / "metrics.jsonl").read_text().splitlines() if '"loss"' in ln]
              for run in (llama, mistral)]
    assert len(losses[0]) == len(losses[1]) == 4 and losses[0] != losses[1]


def test_smoke_says_when_it_cannot_use_the_models_template(tmp_path: Path, data: Path) -> None:
    output, run = smoke(tmp_path / "gemma", "google/gemma-2-9b-it", data)
    flat = " ".join(output.split())
    assert "ft ships no copy of google/gemma-2-9b-it's own template and special tokens" in flat
    assert "NOT exercised" in flat and "chat template and special tokens:" not in flat
    output, _ = smoke(tmp_path / "override", "google/gemma-2-9b-it", data, chat_template="llama3")
    assert "chat template: the recipe's data.chat_template, with ChatML special tokens" in " ".join(output.split())
