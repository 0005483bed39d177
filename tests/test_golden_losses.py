"""Golden losses: the first 10 training losses of tiny float32 CPU runs (LoRA, QLoRA, full), pinned at rtol 1e-5,
as torchtune's recipe tests pin theirs. Relative checks ("the loss falls", "2 processes = 1") pass when an upgrade of
torch, transformers, peft or bitsandbytes moves both sides; these fail, and say by how much.

The runs are fully determined: builtin:tiny-llama (built from a seed), the shipped examples/data/quickstart_alpaca.json,
float32, no dropout, no shuffling randomness beyond the seed. QLoRA runs bitsandbytes' dequantizing CPU path
whatever the host (ft_cli.model.keep_bnb_cpu_path_trainable).

When a change is MEANT to move them (a new loss normalisation, a new default): regenerate with
    FT_PRINT_GOLDEN=1 bash scripts/test.sh tests/test_golden_losses.py -q -s
paste the printed lists below, and say why in the commit message.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from tests.conftest import tiny_recipe, write_recipe_file

GOLDEN = {
    "lora": [8.091439247131348, 7.464615821838379, 7.397298336029053, 7.035550117492676, 6.7712626457214355,
             6.765085220336914, 6.323296546936035, 6.4733147621154785, 6.096742630004883, 6.022618293762207],
    "qlora": [8.04218578338623, 7.333733558654785, 7.454535961151123, 6.990363121032715, 6.780597686767578,
              6.724442481994629, 6.370226860046387, 6.508551120758057, 6.105792999267578, 6.031571388244629],
    "full": [8.091439247131348, 7.490242004394531, 7.4510345458984375, 7.143332481384277, 6.905369758605957,
             6.877836227416992, 6.594036102294922, 6.6954474449157715, 6.330025672912598, 6.268095016479492],
}


def _recipe(method: str, data: Path, out: Path) -> dict:
    return tiny_recipe(data, out, method=method,
                       data={"packing": False, "limit": 80, "cache": False},
                       train={"max_steps": 10, "grad_accum": 2, "lr": 1e-3 if method == "full" else 1e-2, "seed": 7,
                              "gradient_checkpointing": False})


def _losses(run: Path) -> list[float]:
    lines = [json.loads(ln) for ln in (run / "metrics.jsonl").read_text().splitlines()]
    return [ln["loss"] for ln in lines if "loss" in ln and "eval_loss" not in ln]


@pytest.mark.parametrize("method", ["lora", "full"])
def test_first_ten_losses_are_pinned(method: str, tmp_path: Path, alpaca_file: Path) -> None:
    _check(method, tmp_path, alpaca_file)


def test_first_ten_qlora_losses_are_pinned_on_both_bnb_cpu_paths(bnb_cpu_path: bool, tmp_path: Path,
                                                                   alpaca_file: Path) -> None:
    _check("qlora", tmp_path, alpaca_file)


def _check(method: str, tmp_path: Path, alpaca_file: Path) -> None:
    from ft_cli.train import train_from_recipe

    path = write_recipe_file(tmp_path / "recipe.yaml", _recipe(method, alpaca_file, tmp_path / "run"))
    run = Path(train_from_recipe(path, [], overwrite=True))
    losses = _losses(run)
    if os.environ.get("FT_PRINT_GOLDEN"):
        print(f"\n    {method!r}: {losses!r},")
    assert len(losses) == 10
    assert losses == pytest.approx(GOLDEN[method], rel=1e-5, abs=0), (method, losses)
