"""What a new user runs into on the first try, following README.md command by command: trained tokens visible in
plain text, --set errors that name the --set, model directories without a tokenizer, and the small annoyances
(eval share of tiny datasets, throughput, progress, paths, offline hub, messages, plan, report)."""

from __future__ import annotations

import json
import re
import shutil
import sys
import time
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from ft_cli.cli import app
from ft_cli.errors import UserError
from tests.conftest import tiny_recipe as make_recipe

runner = CliRunner()
ROOT = Path(__file__).resolve().parents[1]


def write_recipe(path: Path, data: dict) -> Path:
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def tiny_recipe(tmp_path: Path, data: Path) -> dict:
    recipe = make_recipe(data, lora={"rank": 4, "alpha": 8}, data={"val_split": 0.1},
                         train={"max_steps": 3, "micro_batch_size": 2, "eval_every": 100, "save_every": 100})
    del recipe["data"]["format"]  # found from the records
    return recipe


@pytest.fixture
def alpaca_small(tmp_path: Path, alpaca_file: Path) -> Path:
    path = tmp_path / "train.json"
    path.write_text(json.dumps(json.loads(alpaca_file.read_text())[:20]))
    return path


# 3. ft validate --show marks trained tokens without colours ----------------------------------------------------

def test_validate_show_marks_trained_tokens_in_plain_text(tmp_path: Path, alpaca_small: Path) -> None:
    recipe = write_recipe(tmp_path / "r.yaml", tiny_recipe(tmp_path, alpaca_small))
    result = runner.invoke(app, ["validate", str(recipe), "--show", "2"])  # not a terminal: like `| less`, CI logs
    assert result.exit_code == 0, result.output
    assert "[[trained tokens]]" in result.output
    trained = [t for t in re.findall(r"\[\[(.*?)\]\]", result.output, flags=re.S) if t != "trained tokens"]
    rows = json.loads(alpaca_small.read_text())
    assert len(trained) == 2 and all(t.rstrip().endswith("<|im_end|>") for t in trained)  # reply + end of turn
    assert any(r["output"] in t for r in rows for t in trained)
    assert not any("<|im_start|>user" in t or "<|im_start|>assistant" in t for t in trained)  # prompts unmarked


def test_markers_on_a_terminal_only_without_colours(tmp_path: Path, alpaca_small: Path, data_tokenizer,
                                                    data_recipe) -> None:
    import io

    from rich.console import Console

    from ft_cli.data.audit import print_data_report
    from ft_cli.data.pipeline import build_datasets

    bundle = build_datasets(data_recipe(str(alpaca_small)), data_tokenizer)
    shown = {}
    for name, no_color in (("colours", False), ("NO_COLOR", True)):
        out = io.StringIO()
        print_data_report(bundle, data_tokenizer, Console(file=out, force_terminal=True, no_color=no_color,
                                                          width=200), show=1)
        shown[name] = out.getvalue()
    assert "]]" not in shown["colours"] and "\x1b[32m" in shown["colours"]  # green, no markers
    assert re.search(r"\[\[[^\[]*<\|im_end\|>\s*\]\]", shown["NO_COLOR"])  # a reply and its end of turn


def test_highlight_keeps_colours_without_markers_on_a_terminal(data_tokenizer) -> None:
    from ft_cli.data.audit import TRAINED_STYLE, highlight_tokens

    ids = data_tokenizer("Hello there, friend.", add_special_tokens=False).input_ids
    labels = [-100] * 2 + ids[2:]
    coloured = highlight_tokens(data_tokenizer, ids, labels)
    marked = highlight_tokens(data_tokenizer, ids, labels, markers=True)
    assert "[[" not in coloured.plain and any(s.style == TRAINED_STYLE for s in coloured.spans)
    assert marked.plain == coloured.plain[:len(data_tokenizer.decode(ids[:2]))] + "[[" + \
        data_tokenizer.decode(ids[2:]) + "]]"


# 5. --set errors name the --set ----------------------------------------------------------------------------------

def test_set_errors_name_the_set_argument_not_a_recipe_line(tmp_path: Path, alpaca_small: Path) -> None:
    recipe = write_recipe(tmp_path / "good.yaml", tiny_recipe(tmp_path, alpaca_small))
    cases = {
        "train.lrr=1": "--set train.lrr=1: unknown key (did you mean 'lr'?)",
        "lora.rank=0": "--set lora.rank=0: must be greater than 0, got 0",
        "trian.lr=1": "--set trian.lr=1: trian: unknown key (did you mean 'train'?)",
        "lora={rank: -1}": "--set lora={rank: -1}: lora.rank: must be greater than 0, got -1",
    }
    for item, message in cases.items():
        result = runner.invoke(app, ["validate", str(recipe), "--no-data", "--set", item])
        assert result.exit_code == 2 and message in result.output, (item, result.output)
        assert "good.yaml:" not in result.output, result.output
    bad = tiny_recipe(tmp_path, alpaca_small)
    bad["train"]["lrr"] = 1
    result = runner.invoke(app, ["validate", str(write_recipe(tmp_path / "bad.yaml", bad)), "--no-data",
                                 "--set", "lora.rank=0"])
    assert result.exit_code == 2  # both at once: the file's error at its line, the --set's at the --set
    assert re.search(r"bad\.yaml:\d+: train\.lrr: unknown key", result.output)
    assert "--set lora.rank=0: must be greater than 0" in result.output


# 7. A model directory without tokenizer files ---------------------------------------------------------------------

def test_a_model_dir_without_tokenizer_files_is_a_clear_error(tmp_path: Path, tiny_llama_dir: Path,
                                                               alpaca_small: Path) -> None:
    model = tmp_path / "no-tokenizer"
    model.mkdir()
    for name in ("config.json", "generation_config.json", "model.safetensors"):
        shutil.copy(tiny_llama_dir / name, model / name)
    for fmt in ("alpaca", "text"):
        recipe = tiny_recipe(tmp_path, alpaca_small)
        recipe["model"]["name_or_path"] = str(model)
        recipe["data"]["format"] = fmt
        result = runner.invoke(app, ["train", str(write_recipe(tmp_path / "r.yaml", recipe)), "--output-dir",
                                     str(tmp_path / "run")])
        assert result.exit_code == 2, result.output
        assert re.search(r"r\.yaml:\d+: model\.name_or_path: no tokenizer files in .*no-tokenizer", result.output)
        assert not (tmp_path / "run").exists()
    result = runner.invoke(app, ["generate", str(model), "-p", "Hi"])
    assert result.exit_code == 2 and "no tokenizer files in" in result.output, result.output
    result = runner.invoke(app, ["eval", str(model), "--data", str(alpaca_small)])
    assert result.exit_code == 2 and "no tokenizer files in" in result.output, result.output


# 9. Small annoyances ---------------------------------------------------------------------------------------------

def test_a_tiny_dataset_warns_how_much_the_eval_split_takes(tmp_path: Path, alpaca_file: Path) -> None:
    from ft_cli.data.pipeline import split_warnings

    data = tmp_path / "three.json"
    data.write_text(json.dumps(json.loads(alpaca_file.read_text())[:3]))
    recipe = tiny_recipe(tmp_path, data)
    recipe["data"]["val_split"] = 0.05
    result = runner.invoke(app, ["validate", str(write_recipe(tmp_path / "r.yaml", recipe))])
    assert result.exit_code == 0, result.output
    assert "has only 3 records, so the eval split takes 1 of them (33%, not 5%)" in " ".join(result.output.split())
    result = runner.invoke(app, ["train", str(tmp_path / "r.yaml"), "--output-dir", str(tmp_path / "run")])
    assert result.exit_code == 0 and "(33%, not 5%)" in " ".join(result.output.split())
    assert split_warnings(1000, 50, 0.05, "x") == []
    assert "too few to hold any out" in split_warnings(1, 0, 0.05, "x")[0]


def test_tokens_per_s_counts_training_time_only(tmp_path: Path, alpaca_small: Path,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    """An evaluation (and a checkpoint) that takes 1000 s of (fake) time does not enter tokens_per_s."""
    import ft_cli.train as train_mod

    offset = [0.0]

    class Clock:
        @staticmethod
        def perf_counter() -> float:
            return time.perf_counter() + offset[0]

        time = staticmethod(time.time)  # metrics.jsonl's wall_time: the real clock

    real_evaluate = train_mod._evaluate

    def slow_evaluate(*args, **kwargs):
        offset[0] += 1000.0
        return real_evaluate(*args, **kwargs)

    monkeypatch.setattr(train_mod, "time", Clock)
    monkeypatch.setattr(train_mod, "_evaluate", slow_evaluate)
    recipe = tiny_recipe(tmp_path, alpaca_small)
    recipe["train"].update(max_steps=4, eval_every=1, log_every=2)
    result = runner.invoke(app, ["train", str(write_recipe(tmp_path / "r.yaml", recipe)), "--output-dir",
                                 str(tmp_path / "run")])
    assert result.exit_code == 0, result.output
    lines = [json.loads(ln) for ln in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
             if "tokens_per_s" in ln]
    tps = [ln["tokens_per_s"] for ln in lines]
    assert len(tps) == 2 and min(tps) > 10, tps  # with the 1000 s inside, it would be ~0.1 tokens/s
    step_time = [ln["step_time_s"] for ln in lines]  # likewise: seconds per step of training, not 500+
    assert all(0 < t < 100 for t in step_time), step_time
    assert all("peak_mem_gib" not in ln for ln in lines)  # CUDA only


def test_tokenizing_big_data_shows_progress(tmp_path: Path, data_tokenizer, data_recipe,
                                            monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    from ft_cli.data import encode, pipeline

    monkeypatch.setattr(pipeline, "TOKENIZE_PROGRESS_MIN", 50)  # "big" for the test
    monkeypatch.setattr(encode, "CHUNK", 16)
    path = tmp_path / "d.jsonl"
    path.write_text("".join(json.dumps({"instruction": f"q {i}", "output": f"a {i}"}) + "\n" for i in range(100)))
    pipeline.build_datasets(data_recipe(str(path)), data_tokenizer)
    lines = [ln for ln in capsys.readouterr().err.splitlines() if ln.startswith("tokenizing data.train")]
    assert len(lines) >= 5 and lines[-1] == "tokenizing data.train (examples): 100/100"
    pipeline.build_datasets(data_recipe(str(path), max_seq_len=64), data_tokenizer)
    monkeypatch.setattr(pipeline, "TOKENIZE_PROGRESS_MIN", 1000)
    pipeline.build_datasets(data_recipe(str(path), max_seq_len=32), data_tokenizer)
    assert "tokenizing" not in capsys.readouterr().err.split("100/100")[-1]  # small data: no progress lines


def test_home_and_globs_in_data_paths(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, data_tokenizer) -> None:
    from ft_cli.data.pipeline import build_datasets
    from ft_cli.recipe import load_recipe

    home = tmp_path / "home"
    (home / "data").mkdir(parents=True)
    for name, n in (("a.jsonl", 3), ("b.jsonl", 4)):
        (home / "data" / name).write_text("".join(json.dumps({"instruction": f"{name} {i}", "output": "x"}) + "\n"
                                                  for i in range(n)))
    (home / "data" / "notes.txt").write_text("not data")
    monkeypatch.setenv("HOME", str(home))
    recipes = tmp_path / "recipes"
    recipes.mkdir()
    base = {"model": {"name_or_path": "builtin:tiny-llama"}, "data": {"val_split": 0, "cache": False}}
    for train in ("~/data/*.jsonl", "../home/data/*.jsonl", "~/data"):
        recipe = load_recipe(write_recipe(recipes / "r.yaml", {**base, "data": {**base["data"], "train": train}}))
        assert not recipe.data.train.startswith("~")
        assert build_datasets(recipe, data_tokenizer).train_stats.rows == 7, train
    with pytest.raises(UserError, match=r"data.train: no file matches .*\*.parquet"):
        build_datasets(load_recipe(write_recipe(recipes / "r.yaml", {**base, "data": {
            **base["data"], "train": "~/data/*.parquet"}})), data_tokenizer)


def test_a_directory_given_as_the_recipe(tmp_path: Path) -> None:
    (tmp_path / "lora.yaml").write_text("model: {name_or_path: builtin:tiny-llama}\n")
    result = runner.invoke(app, ["train", str(tmp_path)])
    assert result.exit_code == 2
    assert f"{tmp_path}: is a directory, not a recipe file" in result.output and "lora.yaml" in result.output


def test_plan_fails_as_fast_as_train_without_a_network(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Offline without HF_HUB_OFFLINE: one metadata request fails at once, as in ft train; no download (which
    retries for ~25 s) is attempted."""
    import huggingface_hub

    for var in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
        monkeypatch.delenv(var, raising=False)

    class ConnectError(Exception):
        pass

    def no_network(*args, **kwargs):
        raise ConnectError("[Errno -2] Name or service not known")

    downloads: list[tuple] = []
    monkeypatch.setattr(huggingface_hub.HfApi, "model_info", no_network)
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", lambda *a, **k: downloads.append(a) or no_network())
    recipe = write_recipe(tmp_path / "r.yaml", {"model": {"name_or_path": "acme/never-downloaded-7b"},
                                                "data": {"train": "x.jsonl"}})
    result = runner.invoke(app, ["plan", str(recipe)])
    assert result.exit_code == 2, result.output
    assert "cannot reach the hub for 'acme/never-downloaded-7b' (ConnectError)" in result.output
    assert re.search(r"r\.yaml:\d+: model\.name_or_path:", result.output)
    assert downloads == []


def test_ia3_on_phi3_names_the_modules_phi3_has(tmp_path: Path) -> None:
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from ft_cli.builtin_models import resolve_builtin
    from ft_cli.methods.ia3 import apply_ia3
    from ft_cli.recipe import recipe_from_dict

    config = AutoConfig.from_pretrained(resolve_builtin("builtin:tiny-phi3"))
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    recipe = recipe_from_dict({"model": {"name_or_path": "builtin:tiny-phi3"}, "method": "ia3",
                               "data": {"train": "x.jsonl"}})
    with pytest.raises(UserError) as err:
        apply_ia3(model, recipe)
    message = err.value.message
    assert "no default for model type 'phi3'" in message
    listed = set(message.split("this model's linear layers are ")[1].split(", "))
    assert listed == {"qkv_proj", "o_proj", "gate_up_proj", "down_proj"}  # not k_proj, v_proj: phi3 has none


def test_flash_attention_and_missing_model_errors_name_the_field_and_line(tmp_path: Path,
                                                                         alpaca_small: Path) -> None:
    import importlib.util

    recipe = tiny_recipe(tmp_path, alpaca_small)
    recipe["model"]["attn_implementation"] = "flash_attention_2"
    path = write_recipe(tmp_path / "r.yaml", recipe)
    result = runner.invoke(app, ["train", str(path), "--output-dir", str(tmp_path / "run")])
    assert result.exit_code == 2, result.output
    line = next(i for i, ln in enumerate(path.read_text().splitlines(), 1) if "attn_implementation" in ln)
    why = "runs on CUDA GPUs only" if importlib.util.find_spec("flash_attn") else "needs the flash-attn package"
    assert f"r.yaml:{line}: model.attn_implementation: flash_attention_2 {why}" in " ".join(result.output.split())
    recipe = tiny_recipe(tmp_path, alpaca_small)
    recipe["model"]["name_or_path"] = "./no-such-model"
    path = write_recipe(tmp_path / "r.yaml", recipe)
    result = runner.invoke(app, ["train", str(path), "--output-dir", str(tmp_path / "run")])
    assert result.exit_code == 2
    assert "r.yaml:2: model.name_or_path: local model directory not found" in result.output, result.output
    result = runner.invoke(app, ["train", str(path), "--set", "model.name_or_path=./other"])
    assert "--set model.name_or_path=./other: model.name_or_path: local model directory not found" in result.output
    assert not (tmp_path / "run").exists()


def test_plan_suggestion_keeps_the_effective_batch() -> None:
    from transformers import LlamaConfig

    from ft_cli.plan import _plan, estimate_memory, suggest_micro_batch
    from ft_cli.recipe import recipe_from_dict

    config = LlamaConfig(hidden_size=512, intermediate_size=1376, num_hidden_layers=4, num_attention_heads=8,
                         num_key_value_heads=8, vocab_size=32000)
    recipe = recipe_from_dict({"model": {"name_or_path": "x"}, "method": "lora", "data": {"train": "x"},
                               "train": {"micro_batch_size": 4, "grad_accum": 4}})
    plan = estimate_memory(config, recipe)
    seven, eight = (_plan(recipe, plan.shape, plan.counts, b).total for b in (7, 8))
    suggestion = suggest_micro_batch(plan, (seven + eight) / 2)  # 7 fits, 8 does not: 7 x 3 would be 21 rows
    assert (suggestion.micro_batch_size, suggestion.grad_accum, suggestion.effective_batch) == (4, 4, 16)
    assert "effective batch 16, as the recipe's" in suggestion.note


def test_top_p_help_and_check_agree() -> None:
    help_text = " ".join(runner.invoke(app, ["generate", "--help"]).output.split())
    assert "0 < P <= 1" in help_text and "0.0<=x<=1.0" not in help_text
    result = runner.invoke(app, ["generate", "somewhere", "-p", "hi", "--top-p", "0"])
    assert result.exit_code == 2 and "must be in (0, 1]" in result.output
    result = runner.invoke(app, ["generate", "somewhere", "-p", "hi", "--top-p", "1.5"])
    assert result.exit_code == 2 and "must be in (0, 1]" in result.output


def test_report_draws_a_single_point_and_marks_resumes(tmp_path: Path) -> None:
    from ft_cli.report import plot_curves, read_metrics, resume_steps, write_report
    from ft_cli.run_dir import RunDir

    run = tmp_path / "run"
    run.mkdir()
    (run / "metrics.jsonl").write_text(json.dumps({"step": 1, "loss": 2.5, "lr": 1e-4}) + "\n")
    (run / "run.json").write_text(json.dumps({"status": "completed", "resumes": [{"at": "t", "step": 1}]}))
    write_report(run)
    assert (run / "report" / "loss.png").stat().st_size > 1000
    assert "| resumed | t (from step 1) |" in (run / "report" / "summary.md").read_text()
    fig = plot_curves(read_metrics(RunDir(run)), tmp_path / "x.png", resumed_at=resume_steps({"resumes": [
        {"step": 1}], "resumed_from_step": 1}))
    loss_ax, lr_ax = fig.axes
    (lr_line,) = [ln for ln in lr_ax.lines if ln.get_linestyle() != "--"]
    assert lr_line.get_marker() == "o" and lr_line.get_xydata().tolist() == [[1.0, 0.0001]]  # a visible point
    assert any(ln.get_linestyle() == "--" and list(ln.get_xdata()) == [1, 1] for ln in loss_ax.lines)
    assert "resumed" in [t.get_text() for t in loss_ax.get_legend().get_texts()]
    assert resume_steps({"resumed_from_step": 40}) == [40]  # runs from before "resumes" was recorded


def test_the_resume_is_recorded_for_the_report(tmp_path: Path, alpaca_small: Path) -> None:
    recipe = tiny_recipe(tmp_path, alpaca_small)
    recipe["train"].update(max_steps=2, save_every=1)
    path = write_recipe(tmp_path / "r.yaml", recipe)
    run = tmp_path / "run"
    assert runner.invoke(app, ["train", str(path), "--output-dir", str(run)]).exit_code == 0
    result = runner.invoke(app, ["train", str(path), "--output-dir", str(run), "--resume", "--set",
                                 "train.max_steps=3"])
    assert result.exit_code == 0, result.output
    assert [r["step"] for r in json.loads((run / "run.json").read_text())["resumes"]] == [2]


if sys.platform == "win32":  # pragma: no cover
    pytest.skip("POSIX paths", allow_module_level=True)
