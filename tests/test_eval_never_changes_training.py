"""Evaluation never changes training: a run that evaluates every step (plus the sanity evaluation before step 1)
has exactly the losses, gradient norms and final trained weights of the same run without evaluation - for every
method, on both bitsandbytes 4-bit CPU paths, and where a library switches kernels or caches behind eval mode
(bitsandbytes 4-bit and 8-bit, peft's DoRA caches, torch.compile, liger-kernel).

Evaluation data comes from its own file, so both runs train on the same rows; dropout is on, so an evaluation
that consumed random numbers would show too.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch

from ft_cli.recipe import load_recipe
from tests.conftest import tiny_recipe, write_recipe_file

WORDS = ["apple", "river", "lamp", "cloud", "stone", "green", "seven", "music"]
COLOURS = ["red", "blue", "yellow", "purple"]

# name: recipe sections (on top of LoRA-family defaults where the method takes a lora section)
METHODS: dict[str, dict[str, Any]] = {
    "lora": {},
    "qlora-8bit": {"method": "qlora", "quantization": {"bits": 8, "compute_dtype": "float32"}},
    "dora": {"method": "dora"},
    "ia3": {"method": "ia3"},
    "prompt_tuning": {"method": "prompt_tuning", "prompt": {"num_virtual_tokens": 4}},
    "prefix_tuning": {"method": "prefix_tuning", "prompt": {"num_virtual_tokens": 4}},
    "adapter": {"method": "adapter", "bottleneck": {"size": 8, "dropout": 0.1}},
    "full": {"method": "full"},
    "freeze": {"method": "freeze", "freeze": {"trainable_layers": 1, "trainable_modules": ["lm_head"]}},
}
FOUR_BIT: dict[str, dict[str, Any]] = {
    "qlora-nf4": {"method": "qlora", "quantization": {"bits": 4, "compute_dtype": "float32"}},
    "qlora-fp4-bf16": {"method": "qlora", "model": {"dtype": "bfloat16"},
                       "quantization": {"bits": 4, "quant_type": "fp4", "compute_dtype": "bfloat16"}},
    "dora-4bit": {"method": "dora", "quantization": {"bits": 4, "compute_dtype": "float32"}},
}


def write_rows(path: Path, n: int, offset: int = 0) -> Path:
    rows = [{"instruction": f"Which colour goes with the {WORDS[(i + offset) % 8]}?", "input": "",
             "output": COLOURS[(i + offset) % 4]} for i in range(n)]
    path.write_text(json.dumps(rows))
    return path


def write_recipe(tmp: Path, train: Path, eval_file: Path | None, sections: dict[str, Any],
                 train_section: dict[str, Any] | None = None) -> Path:
    recipe = tiny_recipe(train, tmp / "run", base={
        "lora": {"rank": 4, "alpha": 8, "dropout": 0.1} if sections.get("method", "lora") in LORA else None,
        "data": {"eval": str(eval_file) if eval_file else None, "max_seq_len": 64},
        "train": {"max_steps": 5, "eval_every": 1 if eval_file else None, "seed": 5, **(train_section or {})}},
        **sections)
    return write_recipe_file(tmp / "recipe.yaml", recipe)


LORA = ("lora", "qlora", "dora")


@dataclass
class Trained:
    losses: list[float]
    grad_norms: list[float]
    evals: list[float]
    weights: dict[str, torch.Tensor]  # every trainable parameter after the last step


def train(recipe_path: Path) -> Trained:
    from ft_cli.train import fit, setup

    session = setup(load_recipe(recipe_path), recipe_path, resume=False, overwrite=True)
    run = fit(session)
    model = session.accelerator.unwrap_model(session.model)
    lines = [json.loads(ln) for ln in (run / "metrics.jsonl").read_text().splitlines()]
    return Trained([ln["loss"] for ln in lines if "loss" in ln], [ln["grad_norm"] for ln in lines if "loss" in ln],
                   [ln["eval_loss"] for ln in lines if "eval_loss" in ln],
                   {n: p.detach().float().clone() for n, p in model.named_parameters() if p.requires_grad})


def assert_same_training(with_eval: Trained, without: Trained, steps: int = 5) -> None:
    assert len(with_eval.evals) == steps and not without.evals  # the first run really evaluated, every step
    assert len(with_eval.losses) == len(without.losses) == steps
    assert with_eval.losses == pytest.approx(without.losses, rel=1e-6, abs=1e-6)
    assert with_eval.grad_norms == pytest.approx(without.grad_norms, rel=1e-6, abs=1e-6)
    assert with_eval.weights.keys() == without.weights.keys()
    diff = max((with_eval.weights[k] - without.weights[k]).abs().max().item() for k in without.weights)
    assert diff <= 1e-6, diff


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    tmp = tmp_path_factory.mktemp("data")
    return write_rows(tmp / "train.json", 24), write_rows(tmp / "eval.json", 6, offset=3)


def compare(tmp: Path, data: tuple[Path, Path], sections: dict[str, Any], **train_section: Any) -> None:
    train_file, eval_file = data
    with_eval = train(write_recipe(tmp / "eval", train_file, eval_file, sections, train_section))
    without = train(write_recipe(tmp / "plain", train_file, None, sections, train_section))
    assert_same_training(with_eval, without)


@pytest.mark.parametrize("name", METHODS)
def test_evaluating_every_step_changes_nothing(tmp_path: Path, data: tuple[Path, Path], name: str) -> None:
    compare(tmp_path, data, METHODS[name])


@pytest.mark.parametrize("name", FOUR_BIT)
def test_4bit_evaluating_every_step_changes_nothing_on_both_cpu_paths(tmp_path: Path, data: tuple[Path, Path],
                                                                      name: str, bnb_cpu_path: bool) -> None:
    compare(tmp_path, data, FOUR_BIT[name])


def test_dora_with_peft_weight_norm_caching_changes_nothing(tmp_path: Path, data: tuple[Path, Path]) -> None:
    """peft caches DoRA's weight norm in eval mode when caching is on (peft.helpers.DoraCaching); the cache must be
    dropped when training resumes, or the next steps would use the norm of the weights at evaluation time."""
    from peft.helpers import DoraCaching

    with DoraCaching(True):
        compare(tmp_path, data, METHODS["dora"])


@pytest.mark.slow
def test_compiled_blocks_evaluating_every_step_change_nothing(tmp_path: Path, data: tuple[Path, Path]) -> None:
    """train.compile: evaluation (eval mode, no grad) compiles a second graph; training must go on with the first."""
    from ft_cli.model import compile_problem

    if compile_problem("cpu"):
        pytest.skip(compile_problem("cpu"))
    compare(tmp_path, data, METHODS["lora"], compile=True)


@pytest.mark.gpu
def test_liger_kernel_evaluating_every_step_changes_nothing(tmp_path: Path, data: tuple[Path, Path]) -> None:
    """train.liger_kernel: training uses liger's fused linear cross-entropy, evaluation (eval mode) the logits."""
    pytest.importorskip("liger_kernel")
    compare(tmp_path, data, METHODS["lora"], liger_kernel=True)
