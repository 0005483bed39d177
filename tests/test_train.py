"""ft train end to end on the built-in tiny Llama (seconds each, CPU, offline)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml
from typer.testing import CliRunner

from ft_cli.cli import app
from ft_cli.recipe import load_recipe
from tests.conftest import tiny_recipe, write_recipe_file

runner = CliRunner()


def write_recipe(tmp_path: Path, data_file: Path, name: str = "recipe.yaml", **sections) -> Path:
    recipe = tiny_recipe(data_file, tmp_path / "run", base={
        "data": {"val_split": 0.2}, "train": {"max_steps": 12, "eval_every": 6, "save_every": 6, "seed": 7}},
        **sections)
    return write_recipe_file(tmp_path / name, recipe)


def metrics(run: Path) -> tuple[list[dict], list[dict]]:
    lines = [json.loads(ln) for ln in (run / "metrics.jsonl").read_text().splitlines()]
    return [ln for ln in lines if "loss" in ln], [ln for ln in lines if "eval_loss" in ln]


def train(recipe: Path, *args: str) -> Path:
    result = runner.invoke(app, ["train", str(recipe), *args])
    assert result.exit_code == 0, result.output + repr(result.exception)
    return Path(load_recipe(recipe).output_dir or "")


@pytest.fixture(scope="module")
def qlora_run(tmp_path_factory: pytest.TempPathFactory, alpaca_file: Path) -> Path:
    tmp = tmp_path_factory.mktemp("qlora")
    recipe = write_recipe(tmp, alpaca_file, method="qlora",
                          quantization={"bits": 4, "compute_dtype": "float32"},
                          train={"max_steps": 30, "micro_batch_size": 8, "eval_every": 10, "save_every": 10,
                                 "log_every": 1, "lr": 1e-2})
    return train(recipe)


def test_qlora_loss_falls_and_run_dir_follows_spec(qlora_run: Path) -> None:
    train_lines, eval_lines = metrics(qlora_run)
    assert [ln["step"] for ln in train_lines] == list(range(1, 31))
    first = sum(ln["loss"] for ln in train_lines[:3]) / 3
    last = sum(ln["loss"] for ln in train_lines[-3:]) / 3
    assert last < 0.7 * first, (first, last)
    assert [ln["step"] for ln in eval_lines] == [10, 20, 30]
    assert eval_lines[-1]["eval_loss"] < eval_lines[0]["eval_loss"]
    for key in ("epoch", "lr", "grad_norm", "tokens_per_s", "step_time_s"):
        assert key in train_lines[0]
    adapter = qlora_run / "adapter"
    assert (adapter / "adapter_config.json").is_file() and (adapter / "adapter_model.safetensors").is_file()
    assert "im_start" in json.loads((adapter / "tokenizer_config.json").read_text()).get("chat_template", "") or \
        (adapter / "chat_template.jinja").is_file()
    assert sorted(p.name for p in (qlora_run / "checkpoints").iterdir()) == ["step-20", "step-30"]
    manifest = json.loads((qlora_run / "run.json").read_text())
    assert manifest["status"] == "completed" and manifest["final_step"] == 30
    assert manifest["environment"]["packages"]["bitsandbytes"]
    saved = yaml.safe_load((qlora_run / "recipe.yaml").read_text())
    assert saved["quantization"]["quant_type"] == "nf4" and saved["quantization"]["double_quant"] is True
    assert (qlora_run / "best" / "adapter_config.json").is_file()


def test_qlora_adapter_loads_in_peft_and_changes_logits(qlora_run: Path) -> None:
    import bitsandbytes as bnb
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    from ft_cli.builtin_models import resolve_builtin

    base_dir = resolve_builtin("builtin:tiny-llama")
    qconf = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                               bnb_4bit_compute_dtype=torch.float32, bnb_4bit_quant_storage=torch.float32)
    base = AutoModelForCausalLM.from_pretrained(base_dir, quantization_config=qconf, device_map={"": "cpu"},
                                                dtype=torch.float32)
    assert any(isinstance(m, bnb.nn.Linear4bit) for m in base.modules())
    # tiny-llama's widths (176) break bitsandbytes' packed AVX512-BF16 CPU kernel; ft turns it off when it loads
    from ft_cli.model import keep_bnb_cpu_path_trainable

    keep_bnb_cpu_path_trainable(base)
    ids = torch.tensor([[1, 5, 9, 20, 33, 47]])
    with torch.no_grad():
        before = base(ids).logits.clone()
        model = PeftModel.from_pretrained(base, qlora_run / "adapter")
        after = model(ids).logits
    assert (after - before).abs().max() > 1e-3


def test_qlora_really_uses_bitsandbytes_linear4bit(tmp_path: Path, alpaca_file: Path) -> None:
    import bitsandbytes as bnb
    from peft.tuners.lora.bnb import Linear4bit as LoraLinear4bit

    from ft_cli.model import build_model

    recipe = load_recipe(write_recipe(tmp_path, alpaca_file, method="qlora"))
    built = build_model(recipe)
    lora_layers = [m for m in built.model.modules() if isinstance(m, LoraLinear4bit)]
    assert len(lora_layers) == 2 * 7  # every linear of 2 blocks: q k v o gate up down
    assert all(isinstance(m.base_layer, bnb.nn.Linear4bit) for m in lora_layers)
    assert all(m.base_layer.weight.quant_type == "nf4" for m in lora_layers)
    assert built.trainable_params < 0.1 * built.total_params


def test_only_lora_parameters_change(tmp_path: Path, alpaca_file: Path) -> None:
    from ft_cli.train import fit, setup

    recipe_path = write_recipe(tmp_path, alpaca_file, train={"max_steps": 3, "eval_every": None, "save_every": None})
    session = setup(load_recipe(recipe_path), recipe_path, resume=False, overwrite=False)
    before = {k: v.clone() for k, v in session.model.state_dict().items()}
    fit(session)
    after = session.model.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed and all("lora_" in k for k in changed)
    assert {k for k in before if "lora_B" in k} <= changed  # B starts at zero and must move


def test_metrics_count_each_steps_tokens_and_a_dataloader_worker_changes_nothing(tmp_path: Path,
                                                                                  alpaca_file: Path) -> None:
    """Each train line's `tokens` / `padded_tokens` / `targets` are the step's real input tokens, input positions
    with padding, and trained tokens, counted here from the step's rows; a run whose batches come from a
    DataLoader worker (train.dataloader_workers: 1) trains exactly the same steps."""
    from ft_cli.batches import rows_at
    from ft_cli.train import fit, setup

    runs = {}
    for workers in (0, 1):
        recipe_path = write_recipe(tmp_path / str(workers), alpaca_file, train={
            "max_steps": 3, "micro_batch_size": 3, "grad_accum": 2, "eval_every": None, "save_every": None,
            "log_every": 1, "dataloader_workers": workers})
        session = setup(load_recipe(recipe_path), recipe_path, resume=False, overwrite=False)
        fit(session)
        runs[workers] = metrics(Path(session.run.root))[0]
    lines = runs[0]
    for step, line in enumerate(lines):
        rows = [rows_at(session.data.train, session.batches.indices(m)) for m in (2 * step, 2 * step + 1)]
        lengths = [[len(r["input_ids"]) for r in micro] for micro in rows]
        assert line["tokens"] == sum(map(sum, lengths))
        assert line["padded_tokens"] == sum(max(n) * len(n) for n in lengths) > line["tokens"]
        assert line["targets"] == sum(sum(t != -100 for t in r["labels"][1:]) for micro in rows for r in micro)
        assert line["step_time_s"] > 0 and line["wall_time"] > 0
    assert [x["loss"] for x in runs[1]] == [x["loss"] for x in lines]
    assert [x["grad_norm"] for x in runs[1]] == [x["grad_norm"] for x in lines]
    assert [(x["tokens"], x["padded_tokens"]) for x in runs[1]] == [(x["tokens"], x["padded_tokens"]) for x in lines]


def test_grad_accum_equals_bigger_micro_batch(tmp_path: Path, alpaca_file: Path) -> None:
    """Loss is normalised by the trained tokens of the whole optimizer step: 4x2 == 8x1 exactly."""
    a = train(write_recipe(tmp_path / "a", alpaca_file, train={"micro_batch_size": 8, "grad_accum": 1, "max_steps": 4}))
    b = train(write_recipe(tmp_path / "b", alpaca_file, train={"micro_batch_size": 4, "grad_accum": 2, "max_steps": 4}))
    la, lb = metrics(a)[0], metrics(b)[0]
    assert len(la) == len(lb) == 4
    for x, y in zip(la, lb, strict=True):
        assert x["loss"] == pytest.approx(y["loss"], rel=1e-5)
    from safetensors.torch import load_file

    wa, wb = load_file(a / "adapter" / "adapter_model.safetensors"), load_file(b / "adapter" / "adapter_model.safetensors")
    # Adam divides by sqrt(v): float summation-order noise (different padding) grows to ~1e-4 in 4 steps at lr 1e-2.
    assert max((wa[k] - wb[k]).abs().max().item() for k in wa) < 1e-3


def test_same_seed_same_run(tmp_path: Path, alpaca_file: Path) -> None:
    a = train(write_recipe(tmp_path / "a", alpaca_file, train={"max_steps": 5}))
    b = train(write_recipe(tmp_path / "b", alpaca_file, train={"max_steps": 5}))
    assert [x["loss"] for x in metrics(a)[0]] == [x["loss"] for x in metrics(b)[0]]


def test_refuses_to_overwrite_a_finished_run(tmp_path: Path, alpaca_file: Path) -> None:
    recipe = write_recipe(tmp_path, alpaca_file, train={"max_steps": 2, "eval_every": None, "save_every": None})
    run = train(recipe)
    snapshot = {p: p.stat().st_mtime_ns for p in run.rglob("*")}
    result = runner.invoke(app, ["train", str(recipe)])
    assert result.exit_code == 2
    assert "already holds a run (status: completed)" in result.output and "--overwrite" in result.output
    assert {p: p.stat().st_mtime_ns for p in run.rglob("*")} == snapshot
    train(recipe, "--overwrite")


def test_bad_data_path_writes_nothing(tmp_path: Path) -> None:
    recipe = write_recipe(tmp_path, tmp_path / "missing.jsonl")
    result = runner.invoke(app, ["train", str(recipe)])
    assert result.exit_code == 2, result.output
    assert "missing.jsonl" in result.output and "Traceback" not in result.output
    assert not (tmp_path / "run").exists()


def test_unreachable_hub_model_fails_fast(tmp_path: Path, alpaca_file: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    recipe = write_recipe(tmp_path, alpaca_file, model={"name_or_path": "some-org/not-a-cached-model"})
    result = runner.invoke(app, ["train", str(recipe)])
    assert result.exit_code == 2
    assert "some-org/not-a-cached-model" in result.output and "HF_HUB_OFFLINE" in result.output


def test_paged_optimizer_on_cpu_is_refused_before_loading(tmp_path: Path, alpaca_file: Path) -> None:
    recipe = write_recipe(tmp_path, alpaca_file, train={"optimizer": "paged_adamw_8bit"})
    result = runner.invoke(app, ["train", str(recipe)])
    assert result.exit_code == 2 and "needs a CUDA GPU" in result.output and "adamw_8bit" in result.output


def test_compile_blocks_in_place_keeps_every_name(tmp_path: Path, alpaca_file: Path) -> None:
    """train.compile compiles the transformer blocks in place (lazily: nothing compiles here), so checkpoints and the
    adapter keep their key names; torch.compile(model) would prefix them all with `_orig_mod.`."""
    from ft_cli.model import build_model, compile_blocks

    model = build_model(load_recipe(write_recipe(tmp_path, alpaca_file, train={"compile": True}))).model
    names = list(model.state_dict())
    assert compile_blocks(model) == 2
    assert list(model.state_dict()) == names and not any("_orig_mod" in n for n in names)
    layers = model.get_base_model().model.layers
    assert all(layer._compiled_call_impl is not None for layer in layers)


@pytest.mark.parametrize(("method", "section", "adapted"), [
    ("lora", {}, False),  # all-linear leaves the output layer out
    ("lora", {"target_modules": ["q_proj", "lm_head"]}, True),
    ("lora", {"modules_to_save": ["lm_head"]}, True),
    ("lora", {"modules_to_save": ["embed_tokens"]}, False),  # not tied to lm_head in tiny-llama
    ("ia3", {"target_modules": ["lm_head"], "feedforward_modules": []}, True),
    ("full", {}, False),
])
def test_liger_fused_loss_is_left_out_when_an_adapter_wraps_lm_head(tmp_path: Path, alpaca_file: Path, method: str,
                                                                     section: dict, adapted: bool) -> None:
    """liger's fused linear cross-entropy reads lm_head.weight itself and would skip an adapter on the head."""
    from ft_cli.model import _output_head_adapted, load_base_model, resolve_model_path

    sections = {"lora": section} if method == "lora" else {"lora": None, **({method: section} if section else {})}
    recipe = load_recipe(write_recipe(tmp_path, alpaca_file, method=method, **sections))
    base = load_base_model(recipe, resolve_model_path(recipe.model))
    assert _output_head_adapted(base, recipe) is adapted


@pytest.mark.slow
def test_compile_trains_like_eager_and_resumes(tmp_path: Path, alpaca_file: Path) -> None:
    """train.compile: true (CPU inductor here) gives the eager run's losses for the same seed, writes an adapter and
    checkpoints with the same keys that peft loads, and --resume from its checkpoint ends where it did."""
    import shutil

    from peft import PeftModel
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    from ft_cli.builtin_models import resolve_builtin

    section = {"max_steps": 4, "micro_batch_size": 2, "eval_every": 2, "save_every": 2, "keep_last": None}
    data = {"max_seq_len": 64}
    recipe = write_recipe(tmp_path / "compiled", alpaca_file, train={**section, "compile": True}, data=data)
    compiled = train(recipe)
    eager = train(write_recipe(tmp_path / "eager", alpaca_file, train=section, data=data))
    (c_lines, c_eval), (e_lines, e_eval) = metrics(compiled), metrics(eager)
    assert [x["loss"] for x in c_lines] == pytest.approx([x["loss"] for x in e_lines], rel=1e-4)
    assert [x["eval_loss"] for x in c_eval] == pytest.approx([x["eval_loss"] for x in e_eval], rel=1e-4)
    for file in ("adapter/adapter_model.safetensors", "checkpoints/step-2/trainable.safetensors"):
        a, b = load_file(compiled / file), load_file(eager / file)
        assert a.keys() == b.keys(), file
        # Gradients agree to ~1e-6, but Adam moves each weight by about lr whatever its gradient's size, so elements
        # whose gradient is near zero can step either way: compare whole tensors.
        assert max(((a[k] - b[k]).norm() / b[k].norm()).item() for k in a) < 2e-2, file

    base = AutoModelForCausalLM.from_pretrained(resolve_builtin("builtin:tiny-llama"), dtype=torch.float32)
    ids = torch.tensor([[1, 5, 9, 20, 33, 47]])
    with torch.no_grad():
        before = base(ids).logits.clone()
        after = PeftModel.from_pretrained(base, compiled / "adapter")(ids).logits
    assert (after - before).abs().max() > 1e-3

    resumed = tmp_path / "resumed"  # as if killed after the step-2 checkpoint
    shutil.copytree(compiled, resumed)
    for name in ("checkpoints/step-4", "adapter", "best"):
        shutil.rmtree(resumed / name)
    train(recipe, "--resume", "--output-dir", str(resumed))
    assert [x["loss"] for x in metrics(resumed)[0]] == pytest.approx([x["loss"] for x in c_lines], rel=1e-5)
    a, b = load_file(resumed / "adapter/adapter_model.safetensors"), load_file(compiled / "adapter/adapter_model.safetensors")
    assert max((a[k] - b[k]).abs().max().item() for k in a) < 1e-5
