"""ft merge --combine: several LoRA runs into one PEFT adapter (peft's add_weighted_adapter), and ft eval scoring it
against each input on each input's data. The combined weights are checked against the arithmetic done by hand on
the saved tensors; the output is loaded with plain peft."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file
from typer.testing import CliRunner

from ft_cli.cli import app


def invoke(*args: object):
    result = CliRunner().invoke(app, [str(a) for a in args])
    if result.exception and not isinstance(result.exception, SystemExit):
        raise result.exception
    return result


def combine(runs: list[Path], out: Path, *extra: object):
    result = invoke("merge", *runs, "--out", out, *extra)
    assert result.exit_code == 0, result.output
    return out


def lora_factors(adapter: Path) -> dict[str, tuple[torch.Tensor, torch.Tensor, float]]:
    """{module: (A, B, alpha / r)} read straight from the adapter's files."""
    config = json.loads((adapter / "adapter_config.json").read_text())
    tensors = load_file(adapter / "adapter_model.safetensors")
    out = {}
    for key, a in tensors.items():
        if key.endswith("lora_A.weight"):
            module = key[: -len(".lora_A.weight")]
            out[module] = (a.double(), tensors[module + ".lora_B.weight"].double(),
                           config["lora_alpha"] / config["r"])
    return out


def peft_logits(adapter: Path, prompt_ids: torch.Tensor) -> torch.Tensor:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from ft_cli.builtin_models import resolve_builtin

    base = AutoModelForCausalLM.from_pretrained(resolve_builtin("builtin:tiny-llama"), dtype=torch.float32)
    model = PeftModel.from_pretrained(base, adapter).eval()
    with torch.no_grad():
        return model(input_ids=prompt_ids).logits


PROMPT = torch.tensor([[5, 17, 42, 99, 7, 300, 12]])


@pytest.fixture(scope="module")
def cat_dir(lora_runs, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("combine") / "cat"
    return combine([lora_runs["alpha"], lora_runs["beta"]], out, "--combine", "cat", "--weights", "0.6,0.4")


def test_cat_is_the_weighted_sum_of_the_updates(lora_runs, cat_dir) -> None:
    combined = lora_factors(cat_dir / "adapter")
    a, b = lora_factors(lora_runs["alpha"] / "adapter"), lora_factors(lora_runs["beta"] / "adapter")
    assert combined.keys() == a.keys() == b.keys() and combined
    for module, (ca, cb, cs) in combined.items():
        assert ca.shape[0] == 16  # rank 8 + 8
        want = 0.6 * a[module][2] * a[module][1] @ a[module][0] + 0.4 * b[module][2] * b[module][1] @ b[module][0]
        torch.testing.assert_close(cs * cb @ ca, want, rtol=1e-5, atol=1e-7)
    # The output is a run-like directory: recipe, manifest, report, tokenizer beside the adapter.
    manifest = json.loads((cat_dir / "run.json").read_text())
    assert manifest["status"] == "completed" and manifest["combined"]["combine"] == "cat"
    assert [i["weight"] for i in manifest["combined"]["inputs"]] == [0.6, 0.4]
    report = json.loads((cat_dir / "merge_report.json").read_text())
    assert report["reload_check"]["max_abs_diff"] == 0.0
    assert yaml.safe_load((cat_dir / "recipe.yaml").read_text())["lora"]["rank"] == 16
    assert (cat_dir / "adapter" / "tokenizer_config.json").is_file()


def test_linear_with_one_weight_reproduces_that_adapter(lora_runs, tmp_path) -> None:
    out = combine([lora_runs["alpha"], lora_runs["beta"]], tmp_path / "lin", "--combine", "linear",
                  "--weights", "1,0")
    torch.testing.assert_close(peft_logits(out / "adapter", PROMPT),
                               peft_logits(lora_runs["alpha"] / "adapter", PROMPT), rtol=1e-5, atol=1e-5)


def test_ties_and_dare_ties_load_and_dare_is_seeded(lora_runs, tmp_path) -> None:
    runs = [lora_runs["alpha"], lora_runs["beta"], lora_runs["gamma"]]
    ties = combine(runs, tmp_path / "ties", "--combine", "ties", "--density", "0.4")
    dare1 = combine(runs, tmp_path / "dare1", "--combine", "dare_ties", "--seed", "5")
    dare2 = combine(runs, tmp_path / "dare2", "--combine", "dare_ties", "--seed", "5")
    dare3 = combine(runs, tmp_path / "dare3", "--combine", "dare_ties", "--seed", "6")
    assert json.loads((ties / "run.json").read_text())["combined"]["density"] == 0.4
    assert json.loads((dare1 / "run.json").read_text())["combined"]["weights"] == pytest.approx([1 / 3] * 3)
    t1, t2, t3 = (load_file(d / "adapter" / "adapter_model.safetensors") for d in (dare1, dare2, dare3))
    assert all(torch.equal(t1[k], t2[k]) for k in t1)
    assert not all(torch.equal(t1[k], t3[k]) for k in t1)
    alpha = peft_logits(lora_runs["alpha"] / "adapter", PROMPT)
    for d in (ties, dare1):
        logits = peft_logits(d / "adapter", PROMPT)
        assert torch.isfinite(logits).all() and not torch.allclose(logits, alpha)


def test_eval_scores_the_combination_against_each_input(lora_runs, cat_dir) -> None:
    result = invoke("eval", cat_dir)
    assert result.exit_code == 0, result.output
    report = json.loads((cat_dir / "eval.json").read_text())
    assert [Path(r["input"]) for r in report["inputs"]] == [lora_runs["alpha"], lora_runs["beta"]]
    for row, name in zip(report["inputs"], ("alpha", "beta"), strict=True):
        alone = invoke("eval", lora_runs[name])
        assert alone.exit_code == 0, alone.output
        own = json.loads((lora_runs[name] / "eval.json").read_text())
        assert row["input_loss"] == pytest.approx(own["loss"], rel=1e-6)  # same data, same adapter as ft eval
        assert row["tokens"] == own["tokens"] and row["loss"] != pytest.approx(own["loss"], rel=1e-6)
    tokens = sum(r["tokens"] for r in report["inputs"])
    assert report["loss"] == pytest.approx(sum(r["loss"] * r["tokens"] for r in report["inputs"]) / tokens)
    assert invoke("eval", cat_dir, "--fail-if", "loss>0").exit_code == 3
    refused = invoke("eval", cat_dir, "--compare-base")
    assert refused.exit_code == 2 and "--data" in refused.output


def test_combined_adapter_generates_and_serves(cat_dir) -> None:
    from ft_cli.serve import plan_serve

    result = invoke("generate", cat_dir, "--prompt", "Hi", "--temperature", "0", "--max-new-tokens", "4")
    assert result.exit_code == 0, result.output
    plan = plan_serve(str(cat_dir), [])
    assert [a.name for a in plan.adapters] == ["cat"] and plan.adapters[0].rank == 16


def _copy(run: Path, dest: Path, recipe_changes: dict | None = None, config_changes: dict | None = None) -> Path:
    shutil.copytree(run, dest, ignore=shutil.ignore_patterns("checkpoints"))
    if recipe_changes:
        recipe = yaml.safe_load((dest / "recipe.yaml").read_text())
        for section, values in recipe_changes.items():
            recipe[section] = {**recipe[section], **values} if isinstance(values, dict) else values
        (dest / "recipe.yaml").write_text(yaml.safe_dump(recipe))
    if config_changes:
        config = json.loads((dest / "adapter" / "adapter_config.json").read_text())
        (dest / "adapter" / "adapter_config.json").write_text(json.dumps({**config, **config_changes}))
    return dest


def test_bad_combinations_exit_2_and_write_nothing(lora_runs, tmp_path) -> None:
    a, b = lora_runs["alpha"], lora_runs["beta"]
    rank4 = _copy(b, tmp_path / "rank4", config_changes={"r": 4})
    bf16 = _copy(b, tmp_path / "bf16", recipe_changes={"model": {"dtype": "bfloat16"}})
    dora = _copy(b, tmp_path / "dora", recipe_changes={"method": "dora"}, config_changes={"use_dora": True})
    full = tmp_path / "full-out"
    full.mkdir()
    (full / "keep.txt").write_text("mine")
    cases = [
        ((a, "--combine", "cat"), "at least two run directories"),
        ((a, b, "--combine", "svd"), "--combine: must be one of linear, cat, ties, dare_ties"),
        ((a, b, "--combine", "linear", "--weights", "0.5"), "1 weights for 2 runs"),
        ((a, b, "--combine", "linear", "--weights", "x,y"), "comma-separated numbers"),
        ((a, rank4, "--combine", "linear"), "needs adapters of one rank"),
        ((a, rank4, "--combine", "ties"), "use --combine cat"),
        ((a, bf16, "--combine", "cat"), "need different bases: model.dtype"),
        ((a, dora, "--combine", "cat"), "needs runs of one method"),
        ((a, b, "--combine", "cat", "--density", "0.3"), "--density applies to --combine ties or dare_ties"),
        ((a, b, "--combine", "ties", "--density", "1.5"), "--density: must be in (0, 1]"),
        ((a, b, "--combine", "cat", "--dtype", "float16"), "--force and --dtype apply to merging"),
        ((a, b), "add --combine"),
    ]
    for args, message in cases:
        result = invoke("merge", *args, "--out", tmp_path / "out")
        assert result.exit_code == 2, (args, result.output)
        assert message in result.output, (args, result.output)
        assert "Traceback" not in result.output
        assert not (tmp_path / "out").exists()
    result = invoke("merge", a, b, "--combine", "cat", "--out", full)
    assert result.exit_code == 2 and "not empty" in result.output
    assert sorted(p.name for p in full.iterdir()) == ["keep.txt"]


def test_combine_out_replaces_only_an_earlier_combination(lora_runs, cat_dir, tmp_path) -> None:
    """ft_cli.run_dir's rule for --out: an earlier combination (with the eval.json and report/ that ft eval and
    ft report add to it) is replaced with --overwrite, saying what goes; anything else of the user's, never."""
    out = tmp_path / "cat"
    shutil.copytree(cat_dir, out)
    (out / "eval.json").write_text("{}")
    (out / "report").mkdir()
    runs = [lora_runs["alpha"], lora_runs["beta"]]
    result = invoke("merge", *runs, "--combine", "cat", "--out", out)
    assert result.exit_code == 2 and "earlier ft combine output; use --overwrite" in result.output
    result = invoke("merge", *runs, "--combine", "cat", "--out", out, "--overwrite")
    assert result.exit_code == 0, result.output
    assert (f"--out {out}: replacing the previous combine output: adapter/, eval.json, merge_report.json, "
            "recipe.yaml, report/, run.json") in result.output
    assert not (out / "eval.json").exists() and (out / "adapter" / "adapter_model.safetensors").is_file()
    (out / "notes.md").write_text("mine")
    result = invoke("merge", *runs, "--combine", "cat", "--out", out, "--overwrite")
    assert result.exit_code == 2 and "1 entries ft did not write (notes.md)" in result.output
    assert (out / "notes.md").read_text() == "mine"
    from ft_cli.run_dir import prepare_output_dir

    # a combination is not a run: ft train --overwrite leaves it alone
    with pytest.raises(Exception, match="holds an ft combine output, not a run"):
        prepare_output_dir(out, kind="run", overwrite=True)
