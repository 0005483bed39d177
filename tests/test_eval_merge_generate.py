"""ft eval / ft merge / ft generate and early stopping, on tiny runs of the built-in Llama (CPU, offline).

The numbers are checked against independent computations with plain transformers + peft: eval loss against a
hand-written per-token cross-entropy loop, merged logits against the unmerged adapter.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from ft_cli.cli import app
from tests.conftest import tiny_recipe, write_recipe_file

runner = CliRunner()


def write_rows(path: Path, rows: list[dict]) -> Path:
    path.write_text(json.dumps(rows))
    return path


def write_recipe(tmp: Path, data_file: Path, **sections) -> Path:
    recipe = tiny_recipe(data_file, tmp / "run", base={
        "data": {"val_split": 0.25, "packing": False},
        "train": {"max_steps": 8, "eval_every": 4, "seed": 3, "gradient_checkpointing": False}}, **sections)
    return write_recipe_file(tmp / "recipe.yaml", recipe)


def train(recipe: Path) -> Path:
    from ft_cli.train import train_from_recipe

    return Path(train_from_recipe(recipe, [], overwrite=True))


def invoke(*args: str):
    result = runner.invoke(app, [str(a) for a in args])
    if result.exception and not isinstance(result.exception, SystemExit):
        raise result.exception
    return result


@pytest.fixture(scope="module")
def rows(alpaca_file: Path) -> list[dict]:
    return json.loads(alpaca_file.read_text())[:48]


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory: pytest.TempPathFactory, rows: list[dict]) -> Path:
    tmp = tmp_path_factory.mktemp("lora")
    return train(write_recipe(tmp, write_rows(tmp / "train.json", rows)))


@pytest.fixture(scope="module")
def merged_dir(tmp_path_factory: pytest.TempPathFactory, lora_run: Path) -> Path:
    out = tmp_path_factory.mktemp("merged") / "model"
    result = invoke("merge", lora_run, "--out", out)
    assert result.exit_code == 0, result.output
    return out


def base_dir() -> Path:
    from ft_cli.builtin_models import resolve_builtin

    return resolve_builtin("builtin:tiny-llama")


def run_eval_rows(run: Path, split: str = "eval"):
    """The rows ft eval scores, built by the data pipeline from the run's recipe (the same split as training)."""
    from ft_cli.data.pipeline import build_datasets
    from ft_cli.loading import read_run_recipe, resolve_target
    from ft_cli.model import load_tokenizer
    from ft_cli.run_dir import RunDir

    recipe = read_run_recipe(RunDir(run))
    tok = load_tokenizer(recipe, str(resolve_target(run).output))
    bundle = build_datasets(recipe, tok)
    return bundle.eval if split == "eval" else bundle.train


def hand_loss(model, dataset) -> tuple[float, int]:
    """Per-token cross-entropy over labels != -100, one row at a time, summed and divided by the count."""
    total, count = 0.0, 0
    model.eval()
    with torch.no_grad():
        for row in dataset:
            ids = torch.tensor([row["input_ids"]])
            labels = torch.tensor(row["labels"])
            logits = model(input_ids=ids).logits[0].double()
            targets = labels[1:]
            keep = targets != -100
            ce = torch.nn.functional.cross_entropy(logits[:-1][keep], targets[keep], reduction="sum")
            total += float(ce)
            count += int(keep.sum())
    return total / count, count


def peft_model(adapter: Path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(base_dir(), dtype=torch.float32)
    return PeftModel.from_pretrained(base, adapter)


# ft eval -----------------------------------------------------------------------------------------------------------

def test_eval_loss_equals_hand_computation(lora_run: Path) -> None:
    result = invoke("eval", lora_run, "--batch-size", "3")
    assert result.exit_code == 0, result.output
    report = json.loads((lora_run / "eval.json").read_text())
    expected, count = hand_loss(peft_model(lora_run / "adapter"), run_eval_rows(lora_run))
    assert report["loss"] == pytest.approx(expected, rel=1e-4)
    assert report["tokens"] == count
    assert report["perplexity"] == pytest.approx(math.exp(report["loss"]), rel=1e-9)
    assert report["split"] == "eval" and report["examples"] == len(run_eval_rows(lora_run))
    # The same number training logged at its last step, and independent of the batch size.
    last_eval = [json.loads(ln) for ln in (lora_run / "metrics.jsonl").read_text().splitlines()
                 if "eval_loss" in ln][-1]
    assert report["loss"] == pytest.approx(last_eval["eval_loss"], rel=1e-4)
    assert invoke("eval", lora_run, "--batch-size", "1").exit_code == 0
    assert json.loads((lora_run / "eval.json").read_text())["loss"] == pytest.approx(report["loss"], rel=1e-5)
    for word in ("loss", "perplexity", "tokens"):
        assert word in result.output


def test_eval_on_data_with_compare_base(lora_run: Path, rows: list[dict], tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM

    data = write_rows(tmp_path / "extra.json", rows[:6])
    result = invoke("eval", lora_run, "--data", data, "--compare-base")
    assert result.exit_code == 0, result.output
    report = json.loads((lora_run / "eval-extra.json").read_text())  # named after --data; eval.json is the split's
    assert report["data"] == str(data) and report["split"] is None and report["examples"] == 6

    from ft_cli.data.pipeline import load_eval_data
    from ft_cli.loading import read_run_recipe
    from ft_cli.model import load_tokenizer
    from ft_cli.run_dir import RunDir

    recipe = read_run_recipe(RunDir(lora_run))
    dataset = load_eval_data(data, recipe, load_tokenizer(recipe, str(lora_run / "adapter")))
    expected, _ = hand_loss(peft_model(lora_run / "adapter"), dataset)
    expected_base, _ = hand_loss(AutoModelForCausalLM.from_pretrained(base_dir(), dtype=torch.float32), dataset)
    assert report["loss"] == pytest.approx(expected, rel=1e-4)
    assert report["base_loss"] == pytest.approx(expected_base, rel=1e-4)
    assert report["delta_loss"] == pytest.approx(report["loss"] - report["base_loss"])
    assert report["loss"] < report["base_loss"]  # these rows were trained on
    assert "base" in result.output and "delta" in result.output


def test_fail_if_sets_the_exit_code(lora_run: Path) -> None:
    crossed = invoke("eval", lora_run, "--fail-if", "perplexity>1.0", "--fail-if", "loss<0")
    assert crossed.exit_code == 3
    assert "perplexity" in crossed.output and "crosses perplexity>1" in crossed.output
    report = json.loads((lora_run / "eval.json").read_text())  # written before the verdict, for CI artifacts
    assert report["failed"] == ["perplexity>1"]
    assert invoke("eval", lora_run, "--fail-if", "perplexity < 1", "--fail-if", "tokens<=0").exit_code == 0
    for bad in ("perplexity>>3", "perplexity>abc", "perplexity", "bogus>1", "base_loss>1"):
        result = invoke("eval", lora_run, "--fail-if", bad)
        assert result.exit_code == 2, (bad, result.output)
        assert "--fail-if" in result.output and "Traceback" not in result.output


def test_generation_metrics_on_known_strings() -> None:
    from ft_cli.metrics_text import generation_metrics

    m = generation_metrics(["The cat sat on the mat.", "hello"], ["The cat sat on the mat.", "hello world"])
    assert m["exact_match"] == 0.5
    assert m["rouge_l"] == pytest.approx((1.0 + 2 / 3) / 2)  # "hello" vs "hello world": P=1, R=1/2, F=2/3
    same = generation_metrics(["a b c d"], [" a b c d "])
    assert same["exact_match"] == 1.0 and same["rouge_l"] == 1.0
    assert same["bleu"] == pytest.approx(100.0) and same["chrf"] == pytest.approx(100.0)
    none = generation_metrics(["x y z"], ["a b c"])
    assert none["exact_match"] == 0.0 and none["rouge_l"] == 0.0 and none["bleu"] == pytest.approx(0.0)


def test_eval_generate_scores_replies(lora_run: Path, rows: list[dict]) -> None:
    from transformers import AutoTokenizer

    result = invoke("eval", lora_run, "--generate", "2", "--max-new-tokens", "8", "--fail-if", "rouge_l>1")
    assert result.exit_code == 0, result.output
    report = json.loads((lora_run / "eval.json").read_text())
    assert report["generated"] == 2 and len(report["samples"]) == 2
    for key in ("exact_match", "rouge_l", "bleu", "chrf"):
        assert key in report and key in result.output
    tok = AutoTokenizer.from_pretrained(lora_run / "adapter")
    for sample in report["samples"]:
        # prompt: the chat template's rendering of the user turn plus the assistant header; reference: the answer
        user = sample["prompt"].split("<|im_start|>user\n", 1)[1].rsplit("<|im_end|>", 1)[0]
        assert sample["prompt"] == tok.apply_chat_template([{"role": "user", "content": user}],
                                                           add_generation_prompt=True, tokenize=False)
        assert sample["reference"] in {r["output"] for r in rows}
        assert isinstance(sample["prediction"], str) and "<|im_end|>" not in sample["prediction"]


def test_split_prompt_takes_the_last_trained_span() -> None:
    from ft_cli.evaluate import split_prompt

    ids = [1, 2, 3, 4, 5, 6, 7, 8]
    assert split_prompt(ids, [-100, -100, 3, 4, -100, -100, 7, 8]) == ([1, 2, 3, 4, 5, 6], [7, 8])
    assert split_prompt(ids, [-100, -100, -100, 4, 5, -100, -100, -100]) == ([1, 2, 3], [4, 5])
    assert split_prompt(ids, [-100] + ids[1:]) is None  # everything trained: no prompt to separate
    assert split_prompt(ids, [-100] * 8) is None


def test_eval_data_in_another_format(lora_run: Path, chat_file: Path) -> None:
    result = invoke("eval", lora_run, "--data", chat_file, "--format", "chat")
    assert result.exit_code == 0, result.output
    report = json.loads((lora_run / f"eval-{chat_file.name.split('.')[0]}.json").read_text())
    assert report["format"] == "chat" and report["examples"] > 0 and report["tokens"] > 0
    assert invoke("eval", lora_run, "--format", "chat").exit_code == 2  # --format is for --data


def test_eval_errors_are_user_errors(tmp_path: Path, lora_run: Path) -> None:
    result = invoke("eval", tmp_path)
    assert result.exit_code == 2 and "not an ft run directory" in result.output
    result = invoke("eval", lora_run, "--split", "test")
    assert result.exit_code == 2 and "--split" in result.output
    result = invoke("eval", lora_run, "--data", tmp_path / "missing.json")
    assert result.exit_code == 2 and "missing.json" in result.output
    no_best = tmp_path / "run"
    no_best.mkdir()
    for name in ("recipe.yaml", "adapter"):
        (no_best / name).symlink_to(lora_run / name)
    result = invoke("eval", no_best, "--which", "best")
    assert result.exit_code == 2 and "no best/" in result.output


# ft merge ----------------------------------------------------------------------------------------------------------

def test_merged_logits_equal_adapter_logits(lora_run: Path, merged_dir: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    merged = AutoModelForCausalLM.from_pretrained(merged_dir)
    assert merged.dtype == torch.float32  # the recipe's dtype
    assert not any("lora" in name for name, _ in merged.named_parameters())
    adapter = peft_model(lora_run / "adapter")
    ids = torch.tensor([row["input_ids"][:64] for row in run_eval_rows(lora_run).select(range(2))
                        if len(row["input_ids"]) >= 64] or [list(range(5, 69))])
    with torch.no_grad():
        diff = (merged(ids).logits - adapter(ids).logits).abs().max().item()
        with adapter.disable_adapter():
            effect = (merged(ids).logits - adapter(ids).logits).abs().max().item()
    assert diff < 1e-4 and effect > 1e-2, (diff, effect)
    tok = AutoTokenizer.from_pretrained(merged_dir)
    assert tok.chat_template and "<|im_start|>" in tok.chat_template
    assert tok.eos_token == "<|im_end|>"
    eos = merged.generation_config.eos_token_id
    assert tok.eos_token_id in (eos if isinstance(eos, list) else [eos])  # generation stops at end of turn
    assert list(merged_dir.glob("*.safetensors"))
    report = json.loads((merged_dir / "merge_report.json").read_text())
    assert report["parity_ok"] and report["parity"]["max_abs_diff"] < 1e-4 and report["dtype"] == "float32"


def test_merge_refuses_a_nonempty_out(lora_run: Path, tmp_path: Path) -> None:
    (tmp_path / "keep.txt").write_text("mine")
    result = invoke("merge", lora_run, "--out", tmp_path)
    assert result.exit_code == 2 and "not empty" in result.output
    assert [p.name for p in tmp_path.iterdir()] == ["keep.txt"]
    assert invoke("merge", lora_run, "--out", tmp_path / "x", "--dtype", "int4").exit_code == 2


def test_parity_check_refuses_a_corrupt_merge(lora_run: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import ft_cli.merge

    real = ft_cli.merge.merge_adapter

    def corrupt(model):
        merged = real(model)
        with torch.no_grad():
            merged.model.layers[0].self_attn.q_proj.weight.mul_(1.5)
        return merged

    monkeypatch.setattr(ft_cli.merge, "merge_adapter", corrupt)
    out = tmp_path / "merged"
    result = invoke("merge", lora_run, "--out", out)
    assert result.exit_code == 3, result.output
    assert "merge refused" in result.output and "FAILED" in result.output
    assert not out.exists() and list(tmp_path.iterdir()) == []
    forced = invoke("merge", lora_run, "--out", out, "--force")
    assert forced.exit_code == 0, forced.output
    assert (out / "config.json").is_file()
    assert json.loads((out / "merge_report.json").read_text())["parity_ok"] is False


def test_qlora_merges_through_the_16bit_base(tmp_path: Path, rows: list[dict]) -> None:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    recipe = write_recipe(tmp_path, write_rows(tmp_path / "train.json", rows), method="qlora",
                          model={"name_or_path": "builtin:tiny-llama", "dtype": "bfloat16"},
                          quantization={"bits": 4, "compute_dtype": "bfloat16"},
                          train={"max_steps": 6, "eval_every": 6})
    run = train(recipe)
    # ft eval loads the 4-bit base as training used it (nothing upcast to float32): the same eval loss.
    logged = [json.loads(ln) for ln in (run / "metrics.jsonl").read_text().splitlines() if "eval_loss" in ln][-1]
    assert invoke("eval", run).exit_code == 0
    assert json.loads((run / "eval.json").read_text())["loss"] == pytest.approx(logged["eval_loss"], rel=1e-4)
    out = tmp_path / "merged"
    result = invoke("merge", run, "--out", out)
    assert result.exit_code == 0, result.output
    assert "unquantized bfloat16 base" in result.output and "4-bit" in result.output
    merged = AutoModelForCausalLM.from_pretrained(out)
    assert merged.dtype == torch.bfloat16  # the recipe's dtype, not float32
    assert {p.dtype for p in merged.parameters()} == {torch.bfloat16}
    assert not any("bitsandbytes" in type(m).__module__ or "Linear4bit" in type(m).__name__ for m in merged.modules())
    assert "quantization_config" not in json.loads((out / "config.json").read_text())
    # Reference: the adapter on the unquantized bf16 base, both evaluated in float32.
    base = AutoModelForCausalLM.from_pretrained(base_dir(), dtype=torch.bfloat16).float()
    adapter = PeftModel.from_pretrained(base, run / "adapter")
    ids = torch.tensor([list(range(5, 60))])
    with torch.no_grad():
        ref = adapter(ids).logits
        got = merged.float()(ids).logits
        with adapter.disable_adapter():
            effect = (ref - adapter(ids).logits).abs().mean().item()
    diff = (got - ref).abs()
    assert diff.mean().item() < 0.2 * effect, (diff.mean().item(), effect)  # bf16 rounding, well below the adapter
    report = json.loads((out / "merge_report.json").read_text())
    assert report["parity_ok"] and "vs_quantized_training_model" in report


def test_whole_model_run_merges_by_conversion(tmp_path: Path, rows: list[dict]) -> None:
    """freeze/full runs are already whole: merge converts model/ to the asked dtype and checks it the same way."""
    from transformers import AutoModelForCausalLM

    run = train(write_recipe(tmp_path, write_rows(tmp_path / "train.json", rows), method="freeze", lora=None,
                             freeze={"trainable_layers": 1}, train={"max_steps": 3, "eval_every": None}))
    result = invoke("merge", run, "--out", tmp_path / "bf16", "--dtype", "bfloat16")
    assert result.exit_code == 0, result.output
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "bf16")
    assert {p.dtype for p in merged.parameters()} == {torch.bfloat16}
    trained = AutoModelForCausalLM.from_pretrained(run / "model")
    for (name, a), (_, b) in zip(trained.named_parameters(), merged.named_parameters(), strict=True):
        assert torch.equal(a.to(torch.bfloat16), b), name
    assert invoke("eval", run).exit_code == 0
    assert invoke("generate", tmp_path / "bf16", "-p", "hi", "--temperature", "0", "--max-new-tokens", "4").exit_code == 0


def test_bottleneck_run_evaluates_and_generates_but_does_not_merge(tmp_path: Path, rows: list[dict]) -> None:
    run = train(write_recipe(tmp_path, write_rows(tmp_path / "train.json", rows), method="adapter", lora=None,
                             bottleneck={"size": 8}, train={"max_steps": 4, "eval_every": None}))
    result = invoke("eval", run, "--compare-base")
    assert result.exit_code == 0, result.output
    report = json.loads((run / "eval.json").read_text())
    assert report["loss"] != pytest.approx(report["base_loss"], rel=1e-6)  # base = the model without adapters
    assert invoke("generate", run, "-p", "hi", "--temperature", "0", "--max-new-tokens", "4").exit_code == 0
    result = invoke("merge", run, "--out", tmp_path / "out")
    assert result.exit_code == 2 and "cannot be folded" in result.output
    assert not (tmp_path / "out").exists()


# ft generate -------------------------------------------------------------------------------------------------------

def test_generate_from_run_and_merged_dir(lora_run: Path, merged_dir: Path) -> None:
    args = ["--prompt", "What color is the mouse?", "--temperature", "0", "--max-new-tokens", "12"]
    first = invoke("generate", lora_run, *args)
    assert first.exit_code == 0, first.output
    assert first.stdout.strip()
    assert invoke("generate", lora_run, *args).stdout == first.stdout  # greedy is deterministic
    from_merged = invoke("generate", merged_dir, *args)
    assert from_merged.exit_code == 0 and from_merged.stdout == first.stdout
    sampled = invoke("generate", merged_dir, *args[:2], "--temperature", "1.0", "--seed", "1", "--max-new-tokens", "12")
    again = invoke("generate", merged_dir, *args[:2], "--temperature", "1.0", "--seed", "1", "--max-new-tokens", "12")
    assert sampled.exit_code == 0 and sampled.stdout == again.stdout


def test_generate_stops_at_end_of_turn(lora_run: Path) -> None:
    from ft_cli.generate import generate_reply
    from ft_cli.loading import load_run

    model, tok, _ = load_run(lora_run)
    reply = generate_reply(model, tok, "What color is the mouse?", temperature=0, max_new_tokens=40)
    assert "<|im_end|>" not in reply and "<|im_start|>" not in reply


def test_generate_rejects_what_is_not_a_model(tmp_path: Path) -> None:
    result = invoke("generate", tmp_path, "--prompt", "hi")
    assert result.exit_code == 2 and "not an ft run directory" in result.output


# Early stopping ----------------------------------------------------------------------------------------------------

def test_early_stopping_halts_and_best_loads(tmp_path: Path, rows: list[dict]) -> None:
    """Eval rows unlike the training rows: once the model overfits, eval loss rises and training stops early."""
    train_rows = [r for r in rows if "color" in r["instruction"]][:16] or rows[:16]
    eval_rows = [{"instruction": "Spell the word backwards.", "input": w, "output": w[::-1]}
                 for w in ("river", "bakery", "kettle", "window", "garden", "pencil")]
    recipe = write_recipe(tmp_path, write_rows(tmp_path / "train.json", train_rows),
                          data={"eval": str(write_rows(tmp_path / "eval.json", eval_rows))},
                          train={"max_steps": 60, "eval_every": 2, "early_stopping_patience": 2, "lr": 5e-2,
                                 "scheduler": "constant"})
    run = train(recipe)
    manifest = json.loads((run / "run.json").read_text())
    evals = [json.loads(ln) for ln in (run / "metrics.jsonl").read_text().splitlines() if "eval_loss" in ln]
    assert manifest["status"] == "completed" and manifest["final_step"] < 60, manifest
    best = min(evals, key=lambda e: e["eval_loss"])
    assert manifest["best_step"] == best["step"] and manifest["best_eval_loss"] == pytest.approx(best["eval_loss"])
    assert [e["step"] for e in evals][-1] == manifest["final_step"]
    assert all(e["eval_loss"] >= best["eval_loss"] for e in evals if e["step"] > best["step"])
    # best/ is the model at best_step; adapter/ the last step. ft eval --which best reproduces the logged number.
    assert invoke("eval", run, "--which", "best").exit_code == 0
    assert json.loads((run / "eval-best.json").read_text())["loss"] == pytest.approx(best["eval_loss"], rel=1e-4)
    assert invoke("eval", run).exit_code == 0
    assert json.loads((run / "eval.json").read_text())["loss"] == pytest.approx(evals[-1]["eval_loss"], rel=1e-4)
