"""ft eval and ft generate on what users point them at: run directories, model directories (ft merge's output),
hub ids (offline: a clear exit 2); raw completion for format text; --compare-base for generations; one result
file per evaluation; and what ft merge writes by default (CPU, offline, seconds)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from ft_cli.cli import app

runner = CliRunner()
ROOT = Path(__file__).resolve().parents[1]


def invoke(*args) -> object:
    return runner.invoke(app, [str(a) for a in args])


def train(tmp: Path, name: str, data: Path, fmt: str = "alpaca", steps: int = 4) -> Path:
    recipe = tmp / f"{name}.yaml"
    recipe.write_text(yaml.safe_dump({
        "model": {"name_or_path": "builtin:tiny-llama", "dtype": "float32"}, "method": "lora",
        "lora": {"rank": 4, "alpha": 8, "dropout": 0.0},
        "data": {"train": str(data), "format": fmt, "max_seq_len": 128, "val_split": 0.2},
        "train": {"max_steps": steps, "micro_batch_size": 4, "grad_accum": 1, "lr": 2e-2, "warmup_ratio": 0.0,
                  "eval_every": 2, "save_every": 100, "log_every": 1}}))
    run = tmp / name
    result = invoke("train", recipe, "--output-dir", run)
    assert result.exit_code == 0, result.output
    return run


@pytest.fixture(scope="module")
def work(tmp_path_factory: pytest.TempPathFactory, alpaca_file: Path) -> dict[str, Path]:
    tmp = tmp_path_factory.mktemp("eval-targets")
    rows = json.loads(alpaca_file.read_text())
    (tmp / "train.json").write_text(json.dumps(rows[:40]))
    (tmp / "held.json").write_text(json.dumps(rows[150:156]))
    (tmp / "docs.jsonl").write_text("".join(json.dumps({"text": f"The {r['output']} {r['instruction']}"}) + "\n"
                                            for r in rows[:30]))
    run = train(tmp, "run", tmp / "train.json")
    merged = tmp / "merged"
    result = invoke("merge", run, "--out", merged)
    assert result.exit_code == 0, result.output
    return {"tmp": tmp, "run": run, "merged": merged, "held": tmp / "held.json",
            "text_run": train(tmp, "text-run", tmp / "docs.jsonl", fmt="text", steps=2)}


# Model directories and hub ids -----------------------------------------------------------------------------------

def test_eval_a_merged_model_directory(work: dict[str, Path]) -> None:
    run, merged, held = work["run"], work["merged"], work["held"]
    result = invoke("eval", merged, "--data", held)
    assert result.exit_code == 0, result.output
    assert "format alpaca (from its fields" in result.output
    of_merged = json.loads((merged / "eval-held.json").read_text())  # ft wrote merged/: the result goes there
    assert invoke("eval", run, "--data", held).exit_code == 0
    of_run = json.loads((run / "eval-held.json").read_text())
    assert of_merged["loss"] == pytest.approx(of_run["loss"], rel=1e-4)  # merged = base + adapter
    assert of_merged["tokens"] == of_run["tokens"] and of_merged["model"] == str(merged)


def test_eval_a_model_directory_ft_did_not_write(work: dict[str, Path], tmp_path: Path) -> None:
    model = tmp_path / "someones-model"
    shutil.copytree(work["merged"], model, ignore=shutil.ignore_patterns("merge_report.json", "eval-*.json"))
    result = invoke("eval", model, "--data", work["held"], "--format", "alpaca")
    assert result.exit_code == 0, result.output
    assert "not saved" in result.output and sorted(p.name for p in model.glob("eval*")) == []  # nothing written
    out = tmp_path / "results" / "held.json"
    assert invoke("eval", model, "--data", work["held"], "--output", out).exit_code == 0
    assert json.loads(out.read_text())["examples"] == 6
    for args, message in (([], "needs --data PATH"), (["--data", work["held"], "--compare-base"], "--compare-base"),
                          (["--data", work["held"], "--which", "best"], "--which best: applies to run directories")):
        result = invoke("eval", model, *args)
        assert result.exit_code == 2 and message in result.output, (args, result.output)


def test_hub_ids_offline_are_a_clear_error(work: dict[str, Path]) -> None:
    for command in (["eval", "acme/not-cached-7b", "--data", work["held"]], ["generate", "acme/not-cached-7b",
                                                                              "-p", "Hi"]):
        result = invoke(*command)
        assert result.exit_code == 2, result.output
        assert "acme/not-cached-7b: no such directory, and as a hub model id:" in result.output
        assert "HF_HUB_OFFLINE=1" in result.output and "Traceback" not in result.output


def test_a_cached_hub_id_generates_like_its_directory(work: dict[str, Path], tmp_path: Path) -> None:
    """A hub id whose files are in the Hugging Face cache loads offline (a fresh process: the cache location is
    read when huggingface_hub is imported)."""
    repo = tmp_path / "hub" / "models--acme--tiny-merged"
    snapshot = repo / "snapshots" / ("0" * 40)
    shutil.copytree(work["merged"], snapshot)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("0" * 40)
    env = {**os.environ, "HF_HUB_CACHE": str(tmp_path / "hub"), "HF_HUB_OFFLINE": "1"}
    args = ["-p", "What color is the cat?", "--temperature", "0", "--max-new-tokens", "6"]
    proc = subprocess.run([sys.executable, "-m", "ft_cli.cli", "generate", "acme/tiny-merged", *args], env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    local = runner.invoke(app, ["generate", str(work["merged"]), *args])
    assert local.exit_code == 0, local.output
    assert proc.stdout.strip() and proc.stdout.strip() == local.stdout.strip()


# --raw, --compare-base ------------------------------------------------------------------------------------------

def test_generate_is_raw_for_text_runs_and_chat_otherwise(work: dict[str, Path], monkeypatch) -> None:
    import ft_cli.generation as gen  # render_prompt: shared by ft generate and ft serve

    seen: list[bool] = []
    real = gen.render_prompt

    def spy(tokenizer, prompt, system=None, raw=False):
        seen.append(raw)
        ids = real(tokenizer, prompt, system, raw=raw)
        if raw:
            assert ids == tokenizer(prompt)["input_ids"]  # the text itself, as format text trained on it
        else:
            assert tokenizer.decode(ids).endswith("<|im_start|>assistant\n")
        return ids

    monkeypatch.setattr(gen, "render_prompt", spy)
    args = ["-p", "The cat", "--temperature", "0", "--max-new-tokens", "4"]
    result = invoke("generate", work["text_run"], *args)
    assert result.exit_code == 0 and "raw completion: the run trained on format text" in result.output
    assert invoke("generate", work["text_run"], *args, "--chat").exit_code == 0
    assert invoke("generate", work["run"], *args).exit_code == 0
    assert invoke("generate", work["run"], *args, "--raw").exit_code == 0
    assert seen == [True, False, False, True]
    result = invoke("generate", work["run"], *args, "--raw", "--system", "Be brief.")
    assert result.exit_code == 2 and "--system needs the chat template" in result.output


def test_compare_base_scores_the_base_models_generations(work: dict[str, Path], tmp_path: Path) -> None:
    from ft_cli.builtin_models import resolve_builtin

    run, held = work["run"], work["held"]
    result = invoke("eval", run, "--data", held, "--compare-base", "--generate", "3", "--max-new-tokens", "8",
                    "--name", "cmp", "--fail-if", "delta_rouge_l<-100")
    assert result.exit_code == 0, result.output
    report = json.loads((run / "eval-cmp.json").read_text())
    base_out = tmp_path / "base.json"
    result = invoke("eval", resolve_builtin("builtin:tiny-llama"), "--data", held, "--generate", "3",
                    "--max-new-tokens", "8", "--output", base_out)
    assert result.exit_code == 0, result.output
    base = json.loads(base_out.read_text())  # the base model evaluated on its own
    assert report["base_loss"] == pytest.approx(base["loss"], rel=1e-5)
    for metric in ("exact_match", "rouge_l", "bleu", "chrf"):
        assert report[f"base_{metric}"] == pytest.approx(base[metric], abs=1e-9)
        assert report[f"delta_{metric}"] == pytest.approx(report[metric] - base[metric], abs=1e-9)
    assert [s["base_prediction"] for s in report["samples"]] == [s["prediction"] for s in base["samples"]]


# Result files ---------------------------------------------------------------------------------------------------

def test_each_evaluation_gets_its_own_file_and_eval_json_stays_the_runs_own(work: dict[str, Path]) -> None:
    run, held = work["run"], work["held"]
    for p in run.glob("eval*.json"):
        p.unlink()
    assert invoke("eval", run).exit_code == 0
    own = json.loads((run / "eval.json").read_text())
    assert invoke("eval", run, "--data", held).exit_code == 0
    assert invoke("eval", run, "--split", "train").exit_code == 0
    assert invoke("eval", run, "--which", "best").exit_code == 0
    assert invoke("eval", run, "--data", held, "--name", "v2 held out").exit_code == 0
    assert sorted(p.name for p in run.glob("eval*.json")) == [
        "eval-best.json", "eval-held.json", "eval-train.json", "eval-v2-held-out.json", "eval.json"]
    assert json.loads((run / "eval.json").read_text()) == own  # not overwritten by the others
    assert json.loads((run / "eval-train.json").read_text())["split"] == "train"


def test_a_crossed_threshold_is_reported_once(work: dict[str, Path]) -> None:
    result = invoke("eval", work["run"], "--name", "gate", "--fail-if", "perplexity>1")
    assert result.exit_code == 3
    assert result.output.count("perplexity>1") == 1 and "eval check failed" in result.output


# ft merge's dtype --------------------------------------------------------------------------------------------------

def test_merge_writes_the_recipes_dtype_and_says_so(work: dict[str, Path], tmp_path: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM

    report = json.loads((work["merged"] / "merge_report.json").read_text())
    assert (report["dtype"], report["dtype_from"]) == ("float32", "model.dtype")
    out = tmp_path / "bf16"
    result = invoke("merge", work["run"], "--out", out, "--dtype", "bfloat16")
    assert result.exit_code == 0, result.output
    assert "(bfloat16: --dtype)" in result.output
    assert json.loads((out / "merge_report.json").read_text())["dtype_from"] == "--dtype"
    assert {p.dtype for p in AutoModelForCausalLM.from_pretrained(out).parameters()} == {torch.bfloat16}


def test_spec_and_readme_say_what_merge_writes() -> None:
    spec = (ROOT / "docs" / "SPEC.md").read_text()
    row = next(ln for ln in spec.splitlines() if ln.startswith("| `ft merge RUN_DIR --out DIR` |"))
    assert "16-bit copy of the base model |" not in row and "model.dtype" in row and "--dtype" in row
    readme = (ROOT / "README.md").read_text()
    assert "# 16-bit merge (QLoRA" not in readme
