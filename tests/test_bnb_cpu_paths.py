"""bitsandbytes' two 4-bit CPU code paths, whatever this host has (tests/bnb_host forces the switch).

bitsandbytes 0.50.2 on a CPU with AVX512-BF16 repacks a 4-bit weight in place the first time its layer runs in eval
mode without grad, for a packed inference kernel: the repack asserts on widths that are not multiples of 32/64, and
where it succeeds every later training forward of that layer takes the packed kernel, whose output differs and
passes no gradient back. ft keeps every layer on the dequantizing path (ft_cli.model.keep_bnb_cpu_path_trainable),
so evaluation, `ft eval`, `ft merge` and `ft generate` give the same numbers on every CPU and never change training.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from ft_cli.cli import app
from tests.test_eval_never_changes_training import (
    FOUR_BIT,
    assert_same_training,
    train,
    write_recipe,
    write_rows,
)

runner = CliRunner()
WORKED_AROUND = "0.50.2"  # the bitsandbytes release whose behaviour keep_bnb_cpu_path_trainable works around


def linear4bit(in_features: int, out_features: int):
    import bitsandbytes as bnb

    torch.manual_seed(0)
    layer = bnb.nn.Linear4bit(in_features, out_features, bias=False, compute_dtype=torch.float32, quant_type="nf4")
    layer.weight = bnb.nn.Params4bit(torch.randn(out_features, in_features) * 0.05, requires_grad=False,
                                     quant_type="nf4")
    return layer.to("cpu")  # quantizes


@pytest.fixture(scope="module")
def aligned_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """tiny-llama with every quantized width a multiple of 64 (intermediate 192, not 176): bitsandbytes' repack
    succeeds here, so a layer left on the packed path would silently train wrong instead of failing."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from ft_cli.builtin_models import resolve_builtin

    source = resolve_builtin("builtin:tiny-llama")
    out = tmp_path_factory.mktemp("aligned") / "model"
    config = AutoConfig.from_pretrained(source)
    config.intermediate_size = 192
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).save_pretrained(out)
    for f in source.iterdir():
        if f.name.startswith(("tokenizer", "special_tokens", "chat_template")):
            shutil.copy(f, out / f.name)
    return out


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    tmp = tmp_path_factory.mktemp("data")
    return write_rows(tmp / "train.json", 24), write_rows(tmp / "eval.json", 6, offset=3)


# The switch itself ----------------------------------------------------------------------------------------------

def test_the_suite_sets_the_bitsandbytes_cpu_path_in_this_and_child_processes(bnb_cpu_path: bool) -> None:
    assert linear4bit(64, 64).support_avx512bf16_for_cpu is bnb_cpu_path
    code = ("import torch, bitsandbytes as bnb; "
            "print(bnb.nn.Linear4bit(64, 64, quant_type='nf4').support_avx512bf16_for_cpu)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split()[-1] == str(bnb_cpu_path)


def test_bitsandbytes_still_repacks_4bit_weights_when_evaluating_on_avx512bf16_cpus(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """The behaviour ft works around, pinned: when this fails, bitsandbytes changed it - check whether
    keep_bnb_cpu_path_trainable (ft_cli/model.py) and the SPEC's note on the packed kernel still apply."""
    import bitsandbytes as bnb
    import bitsandbytes.nn.modules as bnb_modules

    monkeypatch.setattr(bnb_modules, "has_avx512bf16", lambda: True)
    changed = (f"bitsandbytes {bnb.__version__} changed the behaviour ft works around (written against "
               f"{WORKED_AROUND}): ")
    layer = linear4bit(128, 64)
    assert layer.support_avx512bf16_for_cpu, changed + "the per-layer switch is gone"
    shape = tuple(layer.weight.shape)
    x = torch.randn(2, 5, 128, requires_grad=True)
    layer.train()
    layer(x).sum().backward()
    assert x.grad is not None  # the dequantizing path: gradients reach the input
    layer.eval()
    with torch.no_grad():
        layer(x.detach())
    assert getattr(layer.weight.quant_state, "packing_format_for_cpu", False), changed + "no repack in eval mode"
    assert tuple(layer.weight.shape) != shape, changed + "the weight keeps its layout"
    layer.train()
    x.grad = None
    with pytest.warns(UserWarning, match="autograd kernel was not registered"):
        layer(x).sum().backward()
    assert x.grad is None, changed + "training after an evaluation passes gradients again"
    odd = linear4bit(176, 176)  # tiny-llama's MLP width
    odd.eval()
    with pytest.raises(AssertionError, match="divisible"), torch.no_grad():
        odd(torch.randn(1, 3, 176))


def test_ft_keeps_every_4bit_layer_on_the_dequantizing_path(tmp_path: Path, data: tuple[Path, Path],
                                                             bnb_cpu_path: bool) -> None:
    from ft_cli.loading import load_base
    from ft_cli.model import build_model
    from ft_cli.recipe import load_recipe

    recipe = load_recipe(write_recipe(tmp_path, data[0], None, FOUR_BIT["qlora-nf4"]))
    for model in (build_model(recipe).model, load_base(recipe)):  # training; ft eval / merge / generate
        flags = [m.support_avx512bf16_for_cpu for m in model.modules() if hasattr(m, "support_avx512bf16_for_cpu")]
        assert len(flags) == 14 and not any(flags)


# Training ------------------------------------------------------------------------------------------------------

def test_qlora_on_widths_bitsandbytes_can_repack_trains_the_same_with_evaluation(
        tmp_path: Path, data: tuple[Path, Path], aligned_model: Path, bnb_cpu_path: bool) -> None:
    sections = {**FOUR_BIT["qlora-nf4"], "model": {"name_or_path": str(aligned_model)}}
    with_eval = train(write_recipe(tmp_path / "eval", *data, sections))
    without = train(write_recipe(tmp_path / "plain", data[0], None, sections))
    assert_same_training(with_eval, without)


def test_without_ft_s_switch_an_evaluation_silently_changes_qlora_training(
        tmp_path: Path, data: tuple[Path, Path], aligned_model: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Negative control for the test above: on a CPU with AVX512-BF16 and widths the repack accepts, nothing fails
    - the losses just drift once the first evaluation has repacked the weights."""
    import bitsandbytes.nn.modules as bnb_modules

    import ft_cli.model

    monkeypatch.setattr(bnb_modules, "has_avx512bf16", lambda: True)
    monkeypatch.setattr(ft_cli.model, "keep_bnb_cpu_path_trainable", lambda model: 0)
    sections = {**FOUR_BIT["qlora-nf4"], "model": {"name_or_path": str(aligned_model)}}
    with_eval = train(write_recipe(tmp_path / "eval", *data, sections))
    without = train(write_recipe(tmp_path / "plain", data[0], None, sections))
    assert len(with_eval.losses) == len(without.losses) == 5
    assert with_eval.losses != pytest.approx(without.losses, rel=1e-6, abs=1e-6)


# ft eval, ft merge, ft generate on tiny-llama's odd widths (176) ----------------------------------------------

def test_eval_merge_generate_on_odd_widths_match_training(tmp_path: Path, data: tuple[Path, Path],
                                                          bnb_cpu_path: bool) -> None:
    recipe = write_recipe(tmp_path, *data, FOUR_BIT["qlora-nf4"], {"eval_every": 5})
    result = runner.invoke(app, ["train", str(recipe)])
    assert result.exit_code == 0, result.output
    run = tmp_path / "run"
    logged = [json.loads(ln) for ln in (run / "metrics.jsonl").read_text().splitlines() if "eval_loss" in ln]
    assert [e["step"] for e in logged] == [5]

    result = runner.invoke(app, ["eval", str(run), "--generate", "2", "--max-new-tokens", "4"])
    assert result.exit_code == 0, result.output
    report = json.loads((run / "eval.json").read_text())
    assert report["loss"] == pytest.approx(logged[0]["eval_loss"], rel=1e-5)
    assert report["generated"] == 2

    result = runner.invoke(app, ["merge", str(run), "--out", str(tmp_path / "merged")])
    assert result.exit_code == 0, result.output
    merge_report = json.loads((tmp_path / "merged" / "merge_report.json").read_text())
    assert merge_report["parity_ok"] and "vs_quantized_training_model" in merge_report

    args = ["-p", "Which colour goes with the lamp?", "--temperature", "0", "--max-new-tokens", "6"]
    from_run = runner.invoke(app, ["generate", str(run), *args])
    assert from_run.exit_code == 0, from_run.output
    again = runner.invoke(app, ["generate", str(run), *args])
    assert again.stdout == from_run.stdout  # the first call changed nothing (no repack between calls)
