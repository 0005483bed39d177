"""Using ft day to day: ft report, ft schema + docs/recipe.md, ft train --smoke, ft plan, trackers (CPU, offline)."""

from __future__ import annotations

import importlib.util
import io
import json
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from ft_cli.cli import app
from ft_cli.errors import UserError
from ft_cli.recipe import Recipe, load_recipe, recipe_from_dict

runner = CliRunner()
ROOT = Path(__file__).resolve().parents[1]
GIB = 2**30
HAS_TENSORBOARD = importlib.util.find_spec("tensorboard") is not None


def alpaca_rows(src: Path, n: int) -> list[dict]:
    return json.loads(src.read_text())[:n]


def write_yaml(path: Path, data: dict) -> Path:
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def metric_lines(run: Path) -> list[dict]:
    return [json.loads(ln) for ln in (run / "metrics.jsonl").read_text().splitlines() if ln.strip()]


# A finished tiny run, shared by the report and tracker tests ---------------------------------------------------

@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory: pytest.TempPathFactory, alpaca_file: Path) -> Path:
    from ft_cli.train import train_from_recipe

    tmp = tmp_path_factory.mktemp("tiny-run")
    data = tmp / "train.json"
    data.write_text(json.dumps(alpaca_rows(alpaca_file, 32)))
    recipe = write_yaml(tmp / "recipe.yaml", {
        "model": {"name_or_path": "builtin:tiny-llama", "dtype": "float32"},
        "method": "lora",
        "lora": {"rank": 4, "alpha": 8, "dropout": 0.0},
        "data": {"train": str(data), "format": "alpaca", "val_split": 0.25, "max_seq_len": 128},
        "train": {"max_steps": 4, "micro_batch_size": 4, "grad_accum": 1, "lr": 1e-2, "warmup_ratio": 0.0,
                  "eval_every": 2, "save_every": 100, "log_every": 1},
        "logging": {"trackers": ["tensorboard"] if HAS_TENSORBOARD else []},
    })
    return train_from_recipe(recipe, [], output_dir=tmp / "run", overwrite=True)


# ft report ---------------------------------------------------------------------------------------------------

def test_report_writes_a_readable_png_and_a_summary(tiny_run: Path) -> None:
    result = runner.invoke(app, ["report", str(tiny_run)])
    assert result.exit_code == 0, result.output
    png, summary = tiny_run / "report" / "loss.png", tiny_run / "report" / "summary.md"
    assert str(png) in result.output and str(summary) in result.output
    blob = png.read_bytes()
    assert blob[:8] == b"\x89PNG\r\n\x1a\n" and len(blob) > 20_000
    import matplotlib.image

    pixels = matplotlib.image.imread(str(png))
    assert pixels.shape[0] > 400 and pixels.shape[1] > 600
    assert pixels.std() > 0.05  # not a blank canvas

    lines = metric_lines(tiny_run)
    final = [ln for ln in lines if "loss" in ln][-1]
    best = min((ln for ln in lines if "eval_loss" in ln), key=lambda ln: ln["eval_loss"])
    text = summary.read_text()
    assert f"| final train loss | {final['loss']:.4f} | {final['step']} |" in text
    assert f"| best eval loss | {best['eval_loss']:.4f} | {best['step']} |" in text
    for expected in ("builtin:tiny-llama", "lora: rank 4, alpha 8", "completed", "tokens/s", "duration", "max_steps 4"):
        assert expected in text, expected


def test_report_includes_eval_json_when_present(tiny_run: Path, tmp_path: Path) -> None:
    import shutil

    run = tmp_path / "run"
    shutil.copytree(tiny_run, run, ignore=shutil.ignore_patterns("adapter", "best", "checkpoints", "report", "run"))
    (run / "eval.json").write_text(json.dumps({"loss": 1.2345, "perplexity": 3.437, "tokens": 321, "split": "eval"}))
    assert runner.invoke(app, ["report", str(run)]).exit_code == 0
    text = (run / "report" / "summary.md").read_text()
    assert "## Evaluation (eval.json)" in text and "| perplexity | 3.4370 |" in text and "| tokens | 321 |" in text


def test_report_refuses_what_is_not_a_run(tmp_path: Path) -> None:
    result = runner.invoke(app, ["report", str(tmp_path / "nope")])
    assert result.exit_code == 2 and "no such run directory" in result.output
    result = runner.invoke(app, ["report", str(tmp_path)])
    assert result.exit_code == 2 and "no metrics.jsonl" in result.output and "Traceback" not in result.output
    (tmp_path / "metrics.jsonl").write_text("\n")
    result = runner.invoke(app, ["report", str(tmp_path)])
    assert result.exit_code == 2 and "nothing to report" in result.output
    assert not (tmp_path / "report").exists()


def test_report_ignores_a_torn_last_line(tmp_path: Path) -> None:
    from ft_cli.report import read_metrics
    from ft_cli.run_dir import RunDir

    (tmp_path / "metrics.jsonl").write_text('{"step": 1, "loss": 2.0, "lr": 0.1}\n{"step": 2, "lo')
    assert [r["step"] for r in read_metrics(RunDir(tmp_path)).train] == [1]
    (tmp_path / "metrics.jsonl").write_text('{"step": 1, "lo\n{"step": 2, "loss": 2.0}\n')
    with pytest.raises(UserError, match=r"metrics.jsonl:1"):
        read_metrics(RunDir(tmp_path))


# Trackers ----------------------------------------------------------------------------------------------------

@pytest.mark.skipif(not HAS_TENSORBOARD, reason="tensorboard is not installed (pip install 'ft-cli[tensorboard]')")
def test_tensorboard_tracker_writes_events_in_the_run_dir(tiny_run: Path) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = sorted(tiny_run.rglob("events.out.tfevents.*"))
    assert events, "no tensorboard event file under the run directory"
    tags: set[str] = set()
    for f in events:
        acc = EventAccumulator(str(f))
        acc.Reload()
        tags |= set(acc.Tags()["scalars"])
    assert {"loss", "lr", "eval_loss"} <= tags


def test_missing_tracker_package_fails_before_training(tmp_path: Path, alpaca_file: Path,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else real(name, *a))
    recipe = write_yaml(tmp_path / "r.yaml", {
        "model": {"name_or_path": "builtin:tiny-llama", "dtype": "float32"},
        "data": {"train": str(alpaca_file)}, "logging": {"trackers": ["wandb"]},
        "output_dir": str(tmp_path / "run"),
    })
    result = runner.invoke(app, ["train", str(recipe)])
    assert result.exit_code == 2, result.output
    assert "logging.trackers: wandb is not installed" in result.output and "ft-cli[wandb]" in result.output
    assert not (tmp_path / "run").exists()


# ft schema and docs/recipe.md --------------------------------------------------------------------------------

def _walk_properties(schema: dict):
    for section in [schema, *schema.get("$defs", {}).values()]:
        yield from section.get("properties", {}).items()


def test_schema_prints_a_valid_json_schema() -> None:
    result = runner.invoke(app, ["schema"])
    assert result.exit_code == 0
    schema = json.loads(result.output)
    assert schema["$schema"].endswith("2020-12/schema") and schema["type"] == "object"
    assert {"model", "data"} <= set(schema["required"]) and schema["additionalProperties"] is False
    for name, prop in _walk_properties(schema):
        assert prop.get("description"), f"{name} has no description"
    example = yaml.safe_load((ROOT / "recipes" / "quickstart.yaml").read_text())
    try:
        import jsonschema
    except ImportError:  # structural checks only: every $ref resolves
        refs = {m for m in json.dumps(schema).split('"$ref": "#/$defs/')[1:]}
        assert all(r.split('"')[0] in schema["$defs"] for r in refs)
        return
    jsonschema.Draft202012Validator.check_schema(schema)
    jsonschema.validate(example, schema)
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate({**example, "lora": {"rnak": 8}}, schema)


def test_every_recipe_field_has_a_description() -> None:
    from ft_cli.schema_docs import _collect_sections

    missing = [f"{paths[0]}.{name}".lstrip(".") for model, paths in _collect_sections(Recipe, "")
               for name, field in model.model_fields.items() if not field.description]
    assert not missing, f"fields without Field(description=...): {missing}"


def test_docs_recipe_md_is_up_to_date() -> None:
    from ft_cli.schema_docs import DOCS_PATH, render_recipe_docs

    current = (ROOT / DOCS_PATH).read_text(encoding="utf-8")
    assert current == render_recipe_docs(), "docs/recipe.md is stale: run python scripts/gen_docs.py"
    for key in ("`lora.rank`", "`data.train[].weight`", "`train.gradient_checkpointing`", "`quantization.bits`",
                "`logging.trackers`", "`data.limit`"):
        assert key in current
    assert "| `lora.rank` | integer | `16` | > 0 | LoRA rank r. |" in current
    assert runner.invoke(app, ["schema", "--markdown"]).output == current


# ft train --smoke --------------------------------------------------------------------------------------------

def _llama_qlora_recipe(tmp_path: Path, data: Path) -> Path:
    """A copy of the shipped Llama 3.1 8B QLoRA recipe with its data pointed at a small file."""
    shipped = ROOT / "recipes" / "llama-3.1-8b" / "qlora.yaml"
    if shipped.is_file():
        recipe = yaml.safe_load(shipped.read_text())
    else:  # the shipped recipe's essentials
        recipe = {"model": {"name_or_path": "meta-llama/Llama-3.1-8B-Instruct", "dtype": "bfloat16"},
                  "method": "qlora", "lora": {"rank": 16, "alpha": 32, "dropout": 0.05},
                  "quantization": {"bits": 4, "quant_type": "nf4", "double_quant": True, "compute_dtype": "bfloat16"},
                  "data": {"format": "alpaca", "val_split": 0.02, "max_seq_len": 4096, "packing": True},
                  "train": {"epochs": 3, "micro_batch_size": 4, "grad_accum": 4, "optimizer": "paged_adamw_8bit"}}
    recipe["data"]["train"] = str(data)
    recipe["output_dir"] = str(tmp_path / "runs" / "llama-qlora")
    return write_yaml(tmp_path / "qlora.yaml", recipe)


def test_smoke_runs_a_real_model_recipe_offline(tmp_path: Path, alpaca_file: Path) -> None:
    data = tmp_path / "train.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in alpaca_rows(alpaca_file, 100)))
    recipe_path = _llama_qlora_recipe(tmp_path, data)
    original = yaml.safe_load(recipe_path.read_text())
    assert original["model"]["name_or_path"] == "meta-llama/Llama-3.1-8B-Instruct"

    result = runner.invoke(app, ["train", str(recipe_path), "--smoke"])
    assert result.exit_code == 0, result.output + repr(result.exception)
    assert "smoke: qlora on a tiny random llama" in result.output and "model.dtype" in result.output
    run = tmp_path / "runs" / "llama-qlora-smoke"
    saved = yaml.safe_load((run / "recipe.yaml").read_text())
    config = json.loads((Path(saved["model"]["name_or_path"]) / "config.json").read_text())
    assert config["model_type"] == "llama" and config["num_hidden_layers"] == 2
    assert saved["method"] == "qlora"
    assert saved["quantization"] == {**original["quantization"], "compute_dtype": "float32"}
    assert {k: saved["lora"][k] for k in original["lora"]} == original["lora"]
    resolved = load_recipe(recipe_path).data
    for key in ("format", "packing", "train_on_inputs", "chat_template", "truncation", "val_split"):
        assert saved["data"][key] == getattr(resolved, key), key
    assert saved["data"]["limit"] == 64 and saved["data"]["max_seq_len"] == 256
    assert saved["train"]["max_steps"] <= 5 and saved["train"]["micro_batch_size"] <= 2
    manifest = json.loads((run / "run.json").read_text())
    assert manifest["status"] == "completed" and manifest["final_step"] == saved["train"]["max_steps"]
    assert manifest["data"]["train"]["rows"] <= 64
    assert (run / "adapter" / "adapter_config.json").is_file()
    assert any("eval_loss" in ln for ln in metric_lines(run))


def test_smoke_with_bad_data_is_the_normal_data_error(tmp_path: Path) -> None:
    """Data that is there is used, and checked as in a real run (missing data is replaced by ft's sample:
    tests/test_shipped_recipes.py)."""
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"instruction": "Hi", "output": "Hello"}\n{"instruction": "Hi"}\n')
    recipe_path = _llama_qlora_recipe(tmp_path, bad)
    result = runner.invoke(app, ["train", str(recipe_path), "--smoke"])
    assert result.exit_code == 2, result.output
    assert "bad.jsonl:record 1 (line 2)" in result.output and "missing field 'output'" in result.output
    assert "Traceback" not in result.output and "sample instead" not in result.output


def _recipe(name: str, **sections) -> Recipe:
    raw = {"model": {"name_or_path": name, "dtype": "bfloat16"}, "data": {"train": "x.jsonl"}, **sections}
    return recipe_from_dict(raw)


@pytest.mark.parametrize("name, family", [
    ("meta-llama/Llama-3.1-8B-Instruct", "llama"), ("Qwen/Qwen2.5-7B-Instruct", "qwen2"), ("Qwen/Qwen3-8B", "qwen3"),
    ("mistralai/Mistral-7B-v0.3", "mistral"), ("google/gemma-2-9b-it", "gemma2"), ("google/gemma-7b", "gemma"),
    ("microsoft/Phi-3-mini-4k-instruct", "phi3"), ("openai-community/gpt2", "gpt2"),
])
def test_smoke_family_from_the_name_when_no_config_is_cached(name: str, family: str) -> None:
    from ft_cli.smoke import model_family

    assert model_family(_recipe(name))[0] == family


def test_smoke_family_from_a_cached_or_local_config(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import huggingface_hub.constants

    from ft_cli.smoke import model_family

    snapshot = tmp_path / "hub" / "models--acme--Assistant-7B" / "snapshots" / ("a" * 40)
    snapshot.mkdir(parents=True)
    (snapshot / "config.json").write_text(json.dumps({"model_type": "qwen2"}))
    (tmp_path / "hub" / "models--acme--Assistant-7B" / "refs").mkdir()
    (tmp_path / "hub" / "models--acme--Assistant-7B" / "refs" / "main").write_text("a" * 40)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    family, how = model_family(_recipe("acme/Assistant-7B"))
    assert family == "qwen2" and "Hugging Face cache" in how
    local = tmp_path / "local-model"
    local.mkdir()
    (local / "config.json").write_text(json.dumps({"model_type": "mixtral"}))
    family, how = model_family(_recipe(str(local)))
    assert family == "mistral" and "local directory" in how
    with pytest.raises(UserError, match="cannot tell the architecture"):
        model_family(_recipe("acme/Unknown-7B"))


def test_smoke_recipe_swaps_size_and_keeps_the_method(tmp_path: Path) -> None:
    from ft_cli.smoke import smoke_recipe

    recipe = _recipe("mistralai/Mistral-7B-Instruct-v0.3", method="qlora",
                     data={"train": "x.jsonl", "format": "chat", "packing": True, "train_on_inputs": True,
                           "chat_template": "chatml", "max_seq_len": 8192},
                     train={"micro_batch_size": 16, "grad_accum": 8, "optimizer": "paged_adamw_8bit",
                            "compile": True, "liger_kernel": True},
                     logging={"trackers": ["wandb"]}, output_dir=str(tmp_path / "big"))
    lines: list[str] = []
    smoked = smoke_recipe(recipe, echo=lines.append)
    assert json.loads((Path(smoked.model.name_or_path) / "config.json").read_text())["model_type"] == "mistral"
    assert smoked.method == "qlora" and smoked.quantization is not None
    assert (smoked.quantization.bits, smoked.quantization.quant_type, smoked.quantization.double_quant) == (4, "nf4", True)
    d, t = smoked.data, smoked.train
    assert (d.format, d.packing, d.train_on_inputs, d.chat_template) == ("chat", True, True, "chatml")
    assert (d.max_seq_len, d.limit) == (256, 64)
    assert (t.max_steps, t.micro_batch_size, t.grad_accum, t.eval_every, t.save_every) == (4, 2, 1, 2, 2)
    assert smoked.model.dtype == "float32" and t.optimizer == "adamw_8bit" and smoked.logging.trackers == []
    assert smoked.output_dir == str(tmp_path / "big") + "-smoke"
    assert recipe.model.name_or_path == "mistralai/Mistral-7B-Instruct-v0.3"  # the input is not modified
    assert any("train.micro_batch_size: 16 -> 2" in ln for ln in lines)
    import torch

    if not torch.cuda.is_available():  # liger-kernel is CUDA only; compile stays wherever it can run
        from ft_cli.model import compile_problem

        assert not t.liger_kernel and t.compile == (compile_problem("cpu") is None)


# ft plan -----------------------------------------------------------------------------------------------------

def _llama_8b_config():
    from transformers import LlamaConfig

    return LlamaConfig(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                       num_key_value_heads=8, vocab_size=128256, tie_word_embeddings=False,
                       max_position_embeddings=131072)


@pytest.mark.parametrize("dtype, nbytes", [("float32", 4), ("bfloat16", 2)])
def test_plan_weights_match_the_real_tiny_model(dtype: str, nbytes: int) -> None:
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from ft_cli.builtin_models import resolve_builtin
    from ft_cli.methods.apply import apply_method
    from ft_cli.plan import estimate_memory

    path = resolve_builtin("builtin:tiny-llama")
    recipe = recipe_from_dict({"model": {"name_or_path": str(path), "dtype": dtype}, "method": "lora",
                               "lora": {"rank": 8, "alpha": 16}, "data": {"train": "x.jsonl", "max_seq_len": 64}})
    plan = estimate_memory(AutoConfig.from_pretrained(path), recipe)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=getattr(torch, dtype))
    params = list(model.parameters())
    assert plan.weights_bytes() == sum(p.numel() for p in params) * nbytes
    assert plan.counts.total == sum(p.numel() for p in params)
    peft_model = apply_method(model, recipe)
    trainable = sum(p.numel() for p in peft_model.parameters() if p.requires_grad)
    assert plan.counts.trainable_count == trainable == plan.counts.added
    rows = {r.name: r.bytes for r in plan.rows}
    assert rows["gradients"] == 4 * trainable and rows["optimizer state"] == 8 * trainable  # fp32 adapters


@pytest.fixture(scope="module")
def llama_8b_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("llama-8b-config")
    _llama_8b_config().save_pretrained(path)
    return path


def test_plan_llama_8b_qlora_vs_bf16(llama_8b_dir: Path, tmp_path: Path) -> None:
    from rich.console import Console

    from ft_cli.plan import estimate_memory, plan_recipe, suggest_micro_batch

    recipe_path = write_yaml(tmp_path / "qlora.yaml", {
        "model": {"name_or_path": str(llama_8b_dir), "dtype": "bfloat16"}, "method": "qlora",
        "lora": {"rank": 16, "alpha": 32, "dropout": 0.05},
        "data": {"train": "train.jsonl", "max_seq_len": 2048},
        "train": {"micro_batch_size": 4, "grad_accum": 4, "gradient_checkpointing": True},
    })
    out = io.StringIO()
    qlora = plan_recipe(recipe_path, [], gpu_memory=24, console=Console(file=out, width=200))
    text = out.getvalue()
    for expected in ("base weights, 4-bit", "adapter weights", "optimizer state", "activations", "logits",
                     "total (estimate)", "estimates", "fits in 24 GiB: micro_batch_size"):
        assert expected in text, expected

    c = qlora.counts
    assert c.total == 8_030_261_248 and c.quantizable == 6_979_321_856  # Llama 3.1 8B; all but embed + head
    assert c.added == c.trainable_count == 41_943_040  # rank 16 on all 7 linears of 32 blocks
    rows = {r.name: r.bytes for r in qlora.rows}
    nf4 = rows["base weights, 4-bit"]
    assert 3.2 * GIB < nf4 < 3.5 * GIB  # 0.5 byte + double-quantized constants per param
    other = c.total - c.quantizable
    assert rows["base weights, not quantized"] == 2 * other  # embeddings, head, norms stay bf16: no fp32 upcast
    assert 4.5 * GIB < qlora.weights_bytes() < 5.5 * GIB  # "NF4 8B" as usually quoted
    assert rows["adapter weights"] == rows["gradients"] == 4 * c.added and rows["optimizer state"] == 8 * c.added
    # bf16 logits + the loss's float32 log-softmax and the two float32 gradients of its backward
    assert rows["logits and loss"] == 4 * 2048 * 128256 * 14
    assert qlora.total_other_checkpointing > 2 * qlora.total  # no checkpointing: every block's activations

    lora_recipe = recipe_from_dict({**yaml.safe_load(recipe_path.read_text()), "method": "lora", "quantization": None})
    bf16 = estimate_memory(_llama_8b_config(), lora_recipe)
    assert bf16.weights_bytes() == 2 * c.total and 14.5 * GIB < bf16.weights_bytes() < 16 * GIB
    assert bf16.counts.added == c.added
    assert bf16.logits.bytes == qlora.logits.bytes
    # The quantized base changes the weights, not the activations: bf16 stream, fp32 LoRA, as without quantization.
    assert bf16.activations.bytes == qlora.activations.bytes
    assert qlora.weights_bytes() < bf16.weights_bytes() / 2

    # Activations and logits scale with the micro-batch; the largest micro-batch that fits is suggested.
    double = estimate_memory(_llama_8b_config(), qlora.recipe, counts=c, micro_batch_size=8)
    assert double.activations.bytes == 2 * qlora.activations.bytes and double.logits.bytes == 2 * qlora.logits.bytes
    s = suggest_micro_batch(qlora, 24 * GIB)
    assert s.micro_batch_size is not None and s.total <= 24 * GIB
    effective = 16  # micro_batch_size x grad_accum in the recipe: the suggestion keeps it exactly
    bigger = next(b for b in range(s.micro_batch_size + 1, effective + 1) if effective % b == 0)
    above = estimate_memory(_llama_8b_config(), qlora.recipe, counts=c, micro_batch_size=bigger)
    assert above.total > 24 * GIB
    assert s.micro_batch_size * s.grad_accum == effective
    assert suggest_micro_batch(qlora, 8 * GIB).micro_batch_size is None  # weights ~5.3 GiB, logits ~3.4 GiB


def test_plan_counts_liger_fused_loss_chunks_not_whole_logits(llama_8b_dir: Path) -> None:
    """train.liger_kernel: the fused linear cross-entropy never holds the 4 x 2048 x 128k logits (13.7 GiB at 14
    bytes each); unless an adapter sits on lm_head, where ft keeps the plain loss and plan must count it."""
    from ft_cli.plan import estimate_memory

    base = {"model": {"name_or_path": str(llama_8b_dir), "dtype": "bfloat16"}, "method": "qlora",
            "data": {"train": "train.jsonl", "max_seq_len": 2048}, "train": {"micro_batch_size": 4}}
    plain = estimate_memory(_llama_8b_config(), recipe_from_dict(base))
    fused = estimate_memory(_llama_8b_config(), recipe_from_dict({**base, "train": {"micro_batch_size": 4,
                                                                                     "liger_kernel": True}}))
    assert fused.logits.name == "logits and loss (liger fused)"
    assert fused.logits.bytes == 4 * 2048 * 4096 * (16 + 2) and fused.logits.bytes < plain.logits.bytes / 20
    assert fused.total < plain.total - 3 * GIB
    on_head = estimate_memory(_llama_8b_config(), recipe_from_dict(
        {**base, "lora": {"modules_to_save": ["lm_head"]}, "train": {"micro_batch_size": 4, "liger_kernel": True}}))
    assert on_head.logits.bytes == plain.logits.bytes


def test_shipped_llama_8b_qlora_recipe_fits_the_gpu_its_comment_names(llama_8b_dir: Path) -> None:
    """recipes/llama-3.1-8b/qlora.yaml says it fits one 24 GB GPU; ft plan must agree, at the recipe's own
    micro-batch and sequence length. (Under peft's float32 upcast it needed 43.9 GiB at micro-batch 4.)"""
    from rich.console import Console

    from ft_cli.plan import plan_recipe

    shipped = ROOT / "recipes" / "llama-3.1-8b" / "qlora.yaml"
    assert "Fits one 24 GB GPU" in shipped.read_text()
    plan = plan_recipe(shipped, [f"model.name_or_path={llama_8b_dir}"], console=Console(file=io.StringIO()))
    assert plan.seq_len == 4096 and plan.micro_batch_size == plan.recipe.train.micro_batch_size
    assert plan.total < 23 * GIB  # a 24 GB card has 24 GiB; leave room for what the estimate misses
    rows = {r.name: r.bytes for r in plan.rows}
    assert rows["base weights, not quantized"] == 2 * (plan.counts.total - plan.counts.quantizable)


def test_plan_mixed_precision_counts_float32_master_weights(llama_8b_dir: Path) -> None:
    """full in bf16 with train.mixed_precision: float32 weights, gradients and AdamW state (16 bytes a parameter,
    against 8 in pure bf16), a float32 residual stream, autocast's bf16 copies of the linear weights, and
    float32 logits (accelerate converts autocast outputs)."""
    from ft_cli.plan import ModelShape, estimate_memory, model_shape

    def plan(mixed: bool):
        recipe = recipe_from_dict({"model": {"name_or_path": str(llama_8b_dir), "dtype": "bfloat16"}, "method": "full",
                                   "data": {"train": "x.jsonl", "max_seq_len": 1024},
                                   "train": {"micro_batch_size": 1, "mixed_precision": mixed}})
        return estimate_memory(_llama_8b_config(), recipe)

    mixed, pure = plan(True), plan(False)
    n = mixed.counts.total
    rows = {r.name: r.bytes for r in mixed.rows}
    assert (rows["base weights"], rows["gradients"], rows["optimizer state"]) == (4 * n, 4 * n, 8 * n)
    rows = {r.name: r.bytes for r in pure.rows}
    assert (rows["base weights"], rows["gradients"], rows["optimizer state"]) == (2 * n, 2 * n, 4 * n)
    shape: ModelShape = model_shape(_llama_8b_config())
    tokens, h = 1024, shape.hidden
    copies = 2 * (mixed.counts.quantizable + shape.vocab * h)  # bf16 copies of every linear weight and the head
    stream = (shape.layers + 2 + 2) * tokens * h * 2  # block inputs, 2 norm inputs, 2 outside: 4 bytes, not 2
    assert mixed.activations.bytes - pure.activations.bytes == copies + stream
    assert (mixed.logits.bytes, pure.logits.bytes) == (tokens * shape.vocab * 16, tokens * shape.vocab * 14)


def test_plan_activation_formula_matches_korthikanti() -> None:
    """A GPT-style block (MLP 4h, full attention, no GQA), 16-bit, eager attention: 32 s b h kept per block plus
    the attention probabilities; Korthikanti et al. count 34 s b h + 5 a s^2 b with dropout masks."""
    from ft_cli.plan import ModelShape, ParamCounts, activation_bytes

    shape = ModelShape("gpt2", hidden=1024, layers=1, heads=16, kv_heads=16, head_dim=64, intermediate=4096,
                       vocab=50257, gated_mlp=False)
    recipe = recipe_from_dict({"model": {"name_or_path": "x", "dtype": "bfloat16", "attn_implementation": "eager"},
                               "method": "full", "data": {"train": "x.jsonl"},
                               "train": {"mixed_precision": False}})  # all 16-bit, as the paper counts
    counts = ParamCounts(total=0, quantizable=0, quantizable_rows=0, base_bytes=0)
    s, b, h, a = 1024, 2, 1024, 16
    full = activation_bytes(shape, counts, recipe, b, s, checkpointing=False)
    outside = 2 * s * b * h * 2
    assert full - outside == s * b * h * 32 + a * s * s * b * 6
    korthikanti = s * b * h * (34 + 5 * a * s / h)
    assert abs((full - outside) / korthikanti - 1) < 0.15
    sdpa = recipe.model_copy(deep=True)
    sdpa.model.attn_implementation = "sdpa"
    assert activation_bytes(shape, counts, sdpa, b, s, checkpointing=False) - outside == s * b * h * 32
    ckpt = activation_bytes(shape, counts, sdpa, b, s, checkpointing=True)
    assert ckpt == s * b * h * 2 + s * b * h * 32 + outside  # block inputs + one block recomputed


def test_plan_cli_on_the_builtin_model_and_offline_hub_ids(tmp_path: Path) -> None:
    result = runner.invoke(app, ["plan", str(ROOT / "recipes" / "quickstart.yaml"), "--gpu-memory", "16"])
    assert result.exit_code == 0, result.output
    assert "total (estimate)" in result.output and "fits in 16 GiB: micro_batch_size 8" in result.output
    recipe = write_yaml(tmp_path / "r.yaml", {"model": {"name_or_path": "acme/never-downloaded-7b"},
                                              "data": {"train": "x.jsonl"}})
    result = runner.invoke(app, ["plan", str(recipe)])
    assert result.exit_code == 2 and "not in the local Hugging Face cache" in result.output
    result = runner.invoke(app, ["plan", str(ROOT / "recipes" / "quickstart.yaml"), "--gpu-memory", "0"])
    assert result.exit_code == 2 and "--gpu-memory" in result.output
