"""What a run hands to the world: adapter/ (and best/, model/) with a real model card, and `ft_cli.load_adapter`,
which loads every method's adapter outside ft — including `method: adapter`, which peft cannot load."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from typer.testing import CliRunner

from ft_cli.cli import app

runner = CliRunner()


def train(tmp: Path, method: str, data: Path, **sections) -> Path:
    recipe = tmp / f"{method}.yaml"
    recipe.write_text(yaml.safe_dump({
        "model": {"name_or_path": "builtin:tiny-llama", "dtype": "float32"}, "method": method,
        "data": {"train": str(data), "max_seq_len": 128, "val_split": 0.2},
        "train": {"max_steps": 4, "micro_batch_size": 4, "grad_accum": 1, "lr": 2e-2, "warmup_ratio": 0.0,
                  "eval_every": 2, "save_every": 100, "log_every": 1}, **sections}))
    run = tmp / f"run-{method}"
    result = runner.invoke(app, ["train", str(recipe), "--output-dir", str(run)])
    assert result.exit_code == 0, result.output
    return run


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory, alpaca_file: Path) -> dict[str, Path]:
    tmp = tmp_path_factory.mktemp("adapter-outputs")
    data = tmp / "train.json"
    data.write_text(json.dumps(json.loads(alpaca_file.read_text())[:40]))
    return {"lora": train(tmp, "lora", data, lora={"rank": 4, "alpha": 8, "dropout": 0.0}),
            "adapter": train(tmp, "adapter", data, bottleneck={"size": 8})}


def card(path: Path) -> tuple[dict, str]:
    text = path.read_text()
    assert text.startswith("---\n")
    _, front, body = text.split("---\n", 2)
    return yaml.safe_load(front), body


def test_the_adapter_readme_is_a_model_card(runs: dict[str, Path]) -> None:
    run = runs["lora"]
    manifest = json.loads((run / "run.json").read_text())
    evals = [json.loads(ln) for ln in (run / "metrics.jsonl").read_text().splitlines() if "eval_loss" in ln]
    meta, body = card(run / "adapter" / "README.md")
    assert meta["library_name"] == "peft" and meta["pipeline_tag"] == "text-generation" and "lora" in meta["tags"]
    assert "base_model" not in meta  # a built-in is not a hub id the hub could link to
    assert "[More Information Needed]" not in body  # not peft's empty template
    for fact in ("`builtin:tiny-llama`", "lora: rank 4, alpha 8, dropout 0", "step 4 of 4 — the last step",
                 f"final eval loss | {evals[-1]['eval_loss']:.4f} (step {evals[-1]['step']})",
                 f"best eval loss | {manifest['best_eval_loss']:.4f} (step {manifest['best_step']})",
                 f"`{manifest['data']['fingerprint']}`", "`train.json` (format alpaca), 32 examples",
                 "ft 0.1.0 (transformers", "PeftModel.from_pretrained(base,", "method: lora"):
        assert fact in body, fact
    assert str(run.parent) not in body  # local paths are cut to their last part
    recipe = yaml.safe_load(body.split("```yaml\n")[1].split("```")[0])
    assert recipe["lora"]["rank"] == 4 and recipe["data"]["train"] == "train.json"
    _, best = card(run / "best" / "README.md")
    assert f"step {manifest['best_step']} of 4 — the lowest eval loss of the run" in best


def test_a_hub_base_model_is_named_in_the_card_metadata() -> None:
    from ft_cli.model_card import render_model_card
    from ft_cli.recipe import recipe_from_dict

    recipe = recipe_from_dict({"model": {"name_or_path": "Qwen/Qwen2.5-7B-Instruct"}, "method": "qlora",
                               "data": {"train": "/home/someone/secret/train.jsonl"}, "output_dir": "runs/q"})
    text = render_model_card(recipe, {}, {}, step=10, best=False)
    meta = yaml.safe_load(text.split("---\n")[1])
    assert meta["base_model"] == "Qwen/Qwen2.5-7B-Instruct" and meta["library_name"] == "peft"
    assert "/home/someone" not in text and "`train.jsonl` (format alpaca)" in text
    assert "4-bit nf4 base (bitsandbytes)" in text and "none during training" in text


def test_bottleneck_adapter_card_says_how_to_load_it(runs: dict[str, Path]) -> None:
    meta, body = card(runs["adapter"] / "adapter" / "README.md")
    assert meta["library_name"] == "ft-cli" and "ft_cli.load_adapter(base," in body
    assert "Houlsby bottleneck adapters of size 8" in body


LOAD_OUTSIDE_FT = """
import json, sys
import torch
from transformers import AutoModelForCausalLM
import ft_cli

results = {}
for adapter_dir, config_file in json.loads(sys.argv[1]):
    ids = json.loads(sys.argv[2])
    config = json.load(open(adapter_dir + "/" + config_file))
    base = AutoModelForCausalLM.from_pretrained(config["base_model_name_or_path"], dtype=torch.float32)
    with torch.no_grad():
        before = base(torch.tensor([ids])).logits[0].tolist()
    model = ft_cli.load_adapter(base, adapter_dir)
    with torch.no_grad():
        after = model(torch.tensor([ids])).logits[0].tolist()
    results[adapter_dir] = {"before": before, "after": after, "type": type(model).__name__,
                            "trainable": sum(p.requires_grad for p in model.parameters())}
results["ft_modules"] = sorted(m for m in sys.modules if m.startswith("ft_cli"))
print(json.dumps(results))
"""


def test_load_adapter_in_a_fresh_python_process(runs: dict[str, Path]) -> None:
    """Outside ft (a new interpreter, only `import ft_cli` and transformers): the adapter changes the base's
    logits to exactly those of the trained model as ft evaluates it — for ft's bottleneck adapter, which peft
    cannot load, and for a peft adapter."""
    from ft_cli.loading import load_run

    cases = {"adapter": "ft_adapter_config.json", "lora": "adapter_config.json"}
    expected, ids = {}, None
    for method in cases:
        model, tokenizer, _ = load_run(runs[method])
        ids = tokenizer("Add the two numbers. 3 and 4")["input_ids"]
        with torch.no_grad():
            expected[method] = model(torch.tensor([ids])).logits[0]
    pairs = [[str(runs[m] / "adapter"), config] for m, config in cases.items()]
    proc = subprocess.run([sys.executable, "-c", LOAD_OUTSIDE_FT, json.dumps(pairs), json.dumps(ids)],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    for method in cases:
        got = out[str(runs[method] / "adapter")]
        after, before = torch.tensor(got["after"]), torch.tensor(got["before"])
        assert torch.allclose(after, expected[method], atol=1e-5, rtol=1e-5), method
        assert (after - before).abs().max() > 1e-3  # the adapter does something
        assert got["trainable"] == 0
        assert got["type"] == ("LlamaForCausalLM" if method == "adapter" else "PeftModelForCausalLM")
    assert "ft_cli.train" not in out["ft_modules"] and "ft_cli.cli" not in out["ft_modules"]


def test_load_adapter_refuses_what_is_not_an_adapter(runs: dict[str, Path], tmp_path: Path) -> None:
    import ft_cli
    from ft_cli.errors import UserError

    with pytest.raises(UserError, match="no ft_adapter_config.json or adapter_config.json"):
        ft_cli.load_adapter(torch.nn.Linear(2, 2), tmp_path)
