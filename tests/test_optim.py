"""Optimizer and schedule: LoRA+ and layer-wise learning rates through parameter groups, weight-decay groups,
the learning-rate schedule, bitsandbytes 8-bit AdamW training on CPU, and the paged optimizer refused on CPU."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest
import torch
from typer.testing import CliRunner

from ft_cli.cli import app
from ft_cli.errors import UserError
from ft_cli.methods.apply import apply_method
from ft_cli.optim import LrSchedule, check_optimizer_supported, param_groups
from ft_cli.recipe import load_recipe, recipe_from_dict
from tests.conftest import tiny_recipe, write_recipe_file


def recipe(**sections: Any) -> Any:
    return recipe_from_dict({"model": {"name_or_path": "builtin:tiny-llama", "dtype": "float32"},
                             "data": {"train": "x.jsonl"}, **sections})


def tiny_model(model_type: str = "llama", layers: int = 4) -> Any:
    from transformers import AutoConfig, AutoModelForCausalLM

    if model_type == "gpt2":
        config = AutoConfig.for_model("gpt2", n_embd=32, n_layer=layers, n_head=4, vocab_size=128, n_positions=32)
    else:
        config = AutoConfig.for_model(model_type, hidden_size=32, num_hidden_layers=layers, num_attention_heads=4,
                                      num_key_value_heads=2, intermediate_size=64, vocab_size=128)
    return AutoModelForCausalLM.from_config(config)


def lr_by_name(model: Any, r: Any) -> dict[str, float]:
    groups = param_groups(model, r)
    lr_of = {id(p): g["lr"] for g in groups for p in g["params"]}
    return {n: lr_of[id(p)] for n, p in model.named_parameters() if id(p) in lr_of}


def test_loraplus_b_matrices_get_ratio_times_the_lr() -> None:
    r = recipe(method="lora", lora={"loraplus_lr_ratio": 8}, train={"lr": 1e-3})
    lrs = lr_by_name(apply_method(tiny_model(), r), r)
    assert lrs and all(".lora_A." in n or ".lora_B." in n for n in lrs)
    for name, lr in lrs.items():
        assert lr == pytest.approx(8e-3 if ".lora_B." in name else 1e-3), name
    plain = recipe(method="lora", train={"lr": 1e-3})
    assert set(lr_by_name(apply_method(tiny_model(), plain), plain).values()) == {1e-3}


@pytest.mark.parametrize(("model_type", "block", "embeddings", "top"), [
    ("llama", "model.layers.{}.", ("model.embed_tokens.",), ("model.norm.", "lm_head.")),
    ("gpt2", "transformer.h.{}.", ("transformer.wte.", "transformer.wpe."), ("transformer.ln_f.",)),
])
def test_layerwise_decay_for_full_gives_block_i_lr_times_decay_to_the_L_minus_1_minus_i(
        model_type: str, block: str, embeddings: tuple[str, ...], top: tuple[str, ...]) -> None:
    L, decay = 4, 0.5
    r = recipe(method="full", train={"lr": 1.0, "layerwise_lr_decay": decay})
    lrs = lr_by_name(apply_method(tiny_model(model_type, L), r), r)
    seen = set()
    for name, lr in lrs.items():
        i = next((i for i in range(L) if name.startswith(block.format(i))), None)
        if i is not None:
            expected = decay ** (L - 1 - i)
        elif name.startswith(embeddings):
            expected = decay ** L  # below the first block (a tied head shares this weight)
        else:
            assert name.startswith(top), name
            expected = 1.0
        assert lr == pytest.approx(expected), name
        seen.add(i)
    assert seen >= set(range(L))


def test_layerwise_decay_for_freeze_covers_only_the_trained_blocks() -> None:
    r = recipe(method="freeze", freeze={"trainable_layers": 2, "trainable_modules": ["lm_head"]},
               train={"lr": 1.0, "layerwise_lr_decay": 0.5})
    lrs = lr_by_name(apply_method(tiny_model("llama", 4), r), r)
    assert {n.split(".")[2] for n in lrs if n.startswith("model.layers.")} == {"2", "3"}
    assert {lr for n, lr in lrs.items() if n.startswith("model.layers.2.")} == {0.5}
    assert {lr for n, lr in lrs.items() if n.startswith("model.layers.3.")} == {1.0}
    assert lrs["lm_head.weight"] == 1.0


def test_no_weight_decay_on_biases_and_norms() -> None:
    r = recipe(method="full", train={"weight_decay": 0.1})
    model = apply_method(tiny_model("gpt2", 2), r)
    wd_of = {id(p): g["weight_decay"] for g in param_groups(model, r) for p in g["params"]}
    for name, p in model.named_parameters():
        no_decay = name.endswith(".bias") or ".ln_" in name
        assert wd_of[id(p)] == (0.0 if no_decay else 0.1), name


def test_lr_schedule_warms_up_then_decays() -> None:
    cosine, linear, constant = (LrSchedule(kind, warmup=2, total=10) for kind in ("cosine", "linear", "constant"))
    assert [round(cosine(s), 4) for s in (0, 1, 2)] == [round(1 / 3, 4), round(2 / 3, 4), 1.0]
    assert cosine(6) == pytest.approx(0.5 * (1 + math.cos(math.pi * 0.5)))
    assert cosine(10) == pytest.approx(0.0) and linear(6) == pytest.approx(0.5) and linear(10) == 0.0
    assert constant(9) == 1.0


@pytest.mark.parametrize(("kind", "hf_name"), [("cosine", "cosine"), ("linear", "linear"),
                                              ("constant", "constant_with_warmup")])
def test_lr_schedule_is_transformers_after_the_warm_up_and_pinned_during_it(kind: str, hf_name: str) -> None:
    """ft's schedule is transformers' get_scheduler except in the warm-up, on purpose (LrSchedule's docstring):
    transformers starts at lr 0 (step / warmup), ft at lr / (warmup + 1) ((step + 1) / (warmup + 1))."""
    from transformers import get_scheduler

    warmup, total = 4, 20
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    hf = get_scheduler(hf_name, opt, num_warmup_steps=warmup, num_training_steps=total)
    hf_factors = [fn(step) for fn in hf.lr_lambdas for step in range(total + 1)]
    ours = LrSchedule(kind, warmup=warmup, total=total)
    assert [ours(step) for step in range(warmup, total + 1)] == pytest.approx(hf_factors[warmup:], abs=1e-12)
    assert [ours(step) for step in range(warmup)] == pytest.approx([0.2, 0.4, 0.6, 0.8])  # pinned: ft's warm-up
    assert hf_factors[:warmup] == pytest.approx([0.0, 0.25, 0.5, 0.75])  # transformers' (first step at lr 0)


def test_paged_optimizer_needs_cuda_8bit_runs_anywhere() -> None:
    paged = recipe(train={"optimizer": "paged_adamw_8bit"})
    with pytest.raises(UserError, match="paged_adamw_8bit .* needs a CUDA GPU .* use adamw_8bit or adamw_torch"):
        check_optimizer_supported(paged, "cpu")
    check_optimizer_supported(paged, "cuda")
    check_optimizer_supported(recipe(train={"optimizer": "adamw_8bit"}), "cpu")


# End to end on the built-in tiny Llama --------------------------------------------------------------------------

def write_recipe(tmp: Path, **train: Any) -> Path:
    rows = [{"instruction": f"Name colour number {i % 4}.", "output": ["red", "blue", "yellow", "purple"][i % 4]}
            for i in range(32)]
    (tmp / "train.json").write_text(json.dumps(rows))
    recipe = tiny_recipe(tmp / "train.json", tmp / "run", method="full", data={"max_seq_len": 64},
                         train={"max_steps": 12, "lr": 1e-3, **train})
    return write_recipe_file(tmp / "recipe.yaml", recipe)


def test_adamw_8bit_trains_with_8bit_state(tmp_path: Path) -> None:
    import bitsandbytes as bnb

    from ft_cli.train import fit, setup

    path = write_recipe(tmp_path, optimizer="adamw_8bit")
    session = setup(load_recipe(path), path, resume=False, overwrite=True)
    optimizer = session.optimizer.optimizer if hasattr(session.optimizer, "optimizer") else session.optimizer
    assert isinstance(optimizer, bnb.optim.AdamW8bit)
    run = fit(session)
    losses = [json.loads(line)["loss"] for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert len(losses) == 12 and sum(losses[-3:]) < sum(losses[:3]) - 1.5, losses
    # bitsandbytes keeps tensors of 4096+ elements (the embeddings, the head) in 8-bit blockwise state
    dtypes = {s["state1"].dtype for s in optimizer.state.values() if "state1" in s}
    assert torch.uint8 in dtypes


def test_paged_adamw_8bit_on_cpu_exits_2_before_any_model_loads(tmp_path: Path,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    import ft_cli.model

    def no_loading(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("a model or tokenizer was loaded")

    for fn in ("load_tokenizer", "load_base_model", "build_model", "resolve_model_path"):
        monkeypatch.setattr(ft_cli.model, fn, no_loading)
    path = write_recipe(tmp_path, optimizer="paged_adamw_8bit")
    result = CliRunner().invoke(app, ["train", str(path)])
    assert result.exit_code == 2, result.output
    assert "train.optimizer: paged_adamw_8bit" in result.output and "use adamw_8bit" in result.output
    assert "Traceback" not in result.output and not (tmp_path / "run").exists()
