"""Preference tuning (objective dpo / orpo / simpo): losses and gradients equal TRL's on the same batch, pairs from
real data (LLaMA-Factory's dpo_en_demo.json) score only their replies, training runs in ft's loop for the allowed
methods, and the recipe refuses what makes no sense with exit 2."""

from __future__ import annotations

import json
import math
import tempfile
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import yaml
from typer.testing import CliRunner

from ft_cli.cli import app
from ft_cli.objectives import pair_losses, reply_logps, sequence_logps

runner = CliRunner()


# Loss parity with TRL ----------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def trl_dpo(tiny_llama_dir: Path):
    """TRL's DPOTrainer on the tiny model with a new LoRA adapter (so its reference is the base with the adapter
    disabled, as ft's), one collated batch of two pairs, and the adapter moved away from its no-op init."""
    pytest.importorskip("trl")
    import datasets
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import DPOConfig, DPOTrainer

    tok = AutoTokenizer.from_pretrained(tiny_llama_dir)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32)
    pairs = datasets.Dataset.from_list([
        {"prompt": [{"role": "user", "content": "What is 2+2?"}],
         "chosen": [{"role": "assistant", "content": "It is 4."}],
         "rejected": [{"role": "assistant", "content": "Five, I think."}]},
        {"prompt": [{"role": "user", "content": "Name a colour."}],
         "chosen": [{"role": "assistant", "content": "Blue."}],
         "rejected": [{"role": "assistant", "content": "A dog, mostly."}]},
    ])
    args = DPOConfig(output_dir=tempfile.mkdtemp(), per_device_train_batch_size=2, beta=0.1, report_to=[],
                     max_length=128, use_cpu=True, bf16=False)
    trainer = DPOTrainer(model=model, args=args, train_dataset=pairs, processing_class=tok,
                         peft_config=LoraConfig(r=8, lora_alpha=16, target_modules="all-linear", lora_dropout=0.0))
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(2)])
    with torch.no_grad():
        for name, p in trainer.model.named_parameters():
            if "lora_B" in name:
                p.add_(torch.randn_like(p) * 0.05)
    return trainer, batch


def _grads(model) -> dict[str, torch.Tensor]:
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("loss_type", ["sigmoid", "hinge", "ipo"])
def test_dpo_loss_and_gradients_equal_trls(trl_dpo, loss_type: str) -> None:
    trainer, batch = trl_dpo
    model = trainer.model
    trainer.loss_types = [loss_type]
    model.zero_grad()
    theirs = trainer.compute_loss(model, batch)
    theirs.backward()
    their_grads = _grads(model)

    model.zero_grad()
    labels = batch["input_ids"].masked_fill(batch["completion_mask"] == 0, -100)
    inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"], "use_cache": False}
    logps, counts = sequence_logps(model(**inputs).logits, labels)
    with torch.no_grad(), model.disable_adapter():
        ref, _ = sequence_logps(model(**inputs).logits, labels)
    with torch.no_grad():  # ft's scoring keeps only the logits of scored positions: the same numbers
        kept, kept_counts = reply_logps(model, {**batch, "labels": labels}, "cpu")
    assert torch.allclose(kept, logps.detach(), rtol=1e-6, atol=1e-5) and torch.equal(kept_counts, counts)
    cfg = SimpleNamespace(beta=0.1, label_smoothing=0.0, loss_type=loss_type)
    losses, chosen_rewards, rejected_rewards = pair_losses("dpo", cfg, logps, counts, ref)
    ours = losses.mean()
    ours.backward()
    our_grads = _grads(model)

    assert float(ours.detach()) == pytest.approx(float(theirs.detach()), rel=1e-5, abs=1e-7)
    assert set(our_grads) == set(their_grads) and our_grads
    scale = max(float(g.abs().max()) for g in their_grads.values())
    assert scale > 1e-4  # the check means something: the adapter gets a real gradient
    for name, g in their_grads.items():
        assert torch.allclose(our_grads[name], g, rtol=1e-5, atol=1e-6 * scale), name
    assert not torch.equal(chosen_rewards, rejected_rewards)

    # preference.share_prompt: each pair's prompt computed once, in one row with both replies: the same loss and
    # gradients as TRL's
    from ft_cli.pair_rows import shared_layout

    pair_batch = {**batch, "labels": labels, "pairs": torch.tensor(2)}
    layout = shared_layout(pair_batch)
    assert layout is not None and layout["input_ids"].numel() < batch["input_ids"].numel()  # really shared
    model.zero_grad()
    shared, shared_counts = reply_logps(model, pair_batch, "cpu", "bool")
    assert torch.equal(shared_counts, counts)
    losses, _, _ = pair_losses("dpo", cfg, shared, shared_counts, ref)
    losses.mean().backward()
    shared_grads = _grads(model)
    assert float(losses.mean().detach()) == pytest.approx(float(theirs.detach()), rel=1e-5, abs=1e-7)
    for name, g in their_grads.items():
        assert torch.allclose(shared_grads[name], g, rtol=1e-5, atol=1e-6 * scale), name


def test_orpo_and_simpo_losses_equal_trls() -> None:
    pytest.importorskip("trl")
    from trl.experimental.cpo.cpo_trainer import CPOTrainer
    from trl.experimental.orpo.orpo_trainer import ORPOTrainer

    torch.manual_seed(3)
    counts = torch.tensor([7, 3, 12, 5, 9, 4], dtype=torch.float32)  # chosen x3, rejected x3
    logps = -torch.rand(6) * counts * 2 - 0.05  # summed log-probs of the replies
    avg_c, avg_r = (logps / counts).chunk(2)
    device = SimpleNamespace(device="cpu")

    orpo_self = SimpleNamespace(beta=0.25, accelerator=device)
    their_ratio_terms = ORPOTrainer.odds_ratio_loss(orpo_self, avg_c, avg_r)[0]  # beta * logsigmoid(log odds)
    ours, oc, orj = pair_losses("orpo", SimpleNamespace(beta=0.25, label_smoothing=0.0), logps, counts)
    assert torch.allclose(ours, -their_ratio_terms, rtol=1e-6, atol=1e-7)  # TRL: loss = nll - mean(those)
    assert torch.allclose(oc, 0.25 * avg_c) and torch.allclose(orj, 0.25 * avg_r)

    for ls in (0.0, 0.1):
        cpo_self = SimpleNamespace(beta=2.0, simpo_gamma=0.7, label_smoothing=ls, loss_type="simpo", alpha=0.0,
                                   accelerator=device)
        theirs = CPOTrainer.cpo_loss(cpo_self, avg_c, avg_r)[0]
        ours, _, _ = pair_losses("simpo", SimpleNamespace(beta=2.0, simpo_gamma=0.7, label_smoothing=ls), logps, counts)
        assert torch.allclose(ours, theirs, rtol=1e-6, atol=1e-7), ls


# Data ------------------------------------------------------------------------------------------------------------

def test_pairs_from_dpo_en_demo_score_only_their_replies(shared_data: Path, data_tokenizer) -> None:
    from ft_cli.data.encode import EncodeSettings
    from ft_cli.data.formats import Origin, make_converter
    from ft_cli.data.preference import encode_pairs
    from ft_cli.data.render import ChatRenderer

    records = json.loads((shared_data / "dpo_en_demo.json").read_text())[:40]
    convert = make_converter("preference", None)
    examples = [convert(r, Origin("dpo_en_demo.json", i)) for i, r in enumerate(records)]
    enc = encode_pairs(examples, data_tokenizer, EncodeSettings(1024, "drop", False), ChatRenderer(data_tokenizer))
    assert enc.pairs_in == 40 and len(enc.chosen_ids) + enc.dropped_too_long + enc.dropped_empty == 40
    assert len(enc.chosen_ids) >= 10 and enc.truncated_pairs == 0  # truncation: drop never cuts a side
    end_of_turn = data_tokenizer.convert_tokens_to_ids("<|im_end|>")
    for c_ids, c_lab, r_ids, r_lab in zip(enc.chosen_ids, enc.chosen_labels, enc.rejected_ids, enc.rejected_labels,
                                          strict=True):
        first_c = next(i for i, t in enumerate(c_lab) if t != -100)
        first_r = next(i for i, t in enumerate(r_lab) if t != -100)
        assert first_c == first_r and c_ids[:first_c] == r_ids[:first_r]  # the same prompt, unscored
        assert all(t == -100 for t in c_lab[:first_c])
        assert end_of_turn in [t for t in c_lab if t != -100] and end_of_turn in [t for t in r_lab if t != -100]
        assert c_ids != r_ids
    # The first pair's chosen reply is what the model is scored on, token for token.
    reply = data_tokenizer.decode([t for t in enc.chosen_labels[0] if t != -100])
    assert records[0]["chosen"]["value"][:40] in reply


# Training in ft's loop -------------------------------------------------------------------------------------------

def _recipe(tmp: Path, shared_data: Path, **over) -> Path:
    raw = {
        "model": {"name_or_path": "builtin:tiny-llama", "dtype": "float32"},
        "method": "lora", "objective": "dpo",
        "lora": {"rank": 8, "alpha": 16, "dropout": 0.0, "target_modules": "all-linear"},
        "data": {"train": str(shared_data / "dpo_en_demo.json"), "format": "preference", "val_split": 0.15,
                 "max_seq_len": 256, "limit": 40, "truncation": "drop"},
        "train": {"max_steps": 4, "micro_batch_size": 2, "grad_accum": 2, "lr": 5e-3, "scheduler": "constant",
                  "eval_every": 4, "save_every": 4, "log_every": 1, "seed": 3},
    }
    for key, value in over.items():
        section, _, field = key.partition("__")
        if field:
            raw.setdefault(section, {})
            if value is None:
                raw[section].pop(field, None)
            else:
                raw[section][field] = value
        elif value is None:
            raw.pop(section, None)
        else:
            raw[section] = value
    path = tmp / "recipe.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def _train(recipe: Path, out: Path) -> list[dict]:
    result = runner.invoke(app, ["train", str(recipe), "--output-dir", str(out)])
    assert result.exit_code == 0, result.output + repr(result.exception)
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize(("objective", "method"), [("dpo", "lora"), ("dpo", "qlora"), ("orpo", "full"),
                                                   ("simpo", "dora")])
def test_preference_objectives_train(tmp_path: Path, shared_data: Path, tiny_llama_dir: Path, objective: str,
                                     method: str) -> None:
    over: dict = {"objective": objective, "method": method}
    if method == "full":
        over.update(lora=None, train__lr=1e-3)
    if method == "qlora":
        over["quantization"] = {"bits": 4, "compute_dtype": "float32"}
    lines = _train(_recipe(tmp_path, shared_data, **over), tmp_path / "run")
    train = [ln for ln in lines if "loss" in ln]
    evals = [ln for ln in lines if "eval_loss" in ln]
    assert [ln["step"] for ln in train] == [1, 2, 3, 4]
    if objective == "dpo":  # the policy starts as its reference: every pair's loss is log 2, rewards 0
        assert train[0]["loss"] == pytest.approx(math.log(2), abs=1e-5)
        assert train[0]["rewards_chosen"] == pytest.approx(0, abs=1e-6)
    assert train[-1]["loss"] < train[0]["loss"] - 0.05, [ln["loss"] for ln in train]
    assert train[-1]["reward_margin"] > train[0]["reward_margin"]
    for key in ("rewards_chosen", "rewards_rejected", "reward_accuracy", "logps_chosen", "logps_rejected"):
        assert math.isfinite(train[-1][key])
    assert evals and {"eval_reward_accuracy", "eval_reward_margin", "eval_pairs"} <= evals[-1].keys()
    out = tmp_path / "run" / ("model" if method == "full" else "adapter")
    assert (out / ("config.json" if method == "full" else "adapter_config.json")).is_file()
    if method == "lora":  # the adapter loads in peft and changes the base model's output
        from peft import PeftModel
        from transformers import AutoModelForCausalLM

        base = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32)
        ids = torch.tensor([[5, 17, 42, 9, 77, 3]])
        before = base(input_ids=ids).logits
        model = PeftModel.from_pretrained(base, str(out))
        assert not torch.allclose(model(input_ids=ids).logits, before, atol=1e-5)


@pytest.mark.parametrize(("over", "field"), [
    ({"data__format": "alpaca"}, "data.format"),
    ({"objective": "sft"}, "data.format"),
    ({"method": "prompt_tuning", "lora": None}, "objective"),
    ({"data__packing": True}, "data.packing"),
    ({"preference": {"simpo_gamma": 1.0}}, "preference.simpo_gamma"),
    ({"objective": "orpo", "preference": {"loss_type": "ipo"}}, "preference.loss_type"),
])
def test_recipe_refuses_what_makes_no_sense(tmp_path: Path, shared_data: Path, over: dict, field: str) -> None:
    result = runner.invoke(app, ["validate", str(_recipe(tmp_path, shared_data, **over)), "--no-data"])
    assert result.exit_code == 2, result.output
    assert f"{field}:" in result.output and "Traceback" not in result.output, result.output


def test_validate_counts_pairs(tmp_path: Path, shared_data: Path) -> None:
    result = runner.invoke(app, ["validate", str(_recipe(tmp_path, shared_data))])
    assert result.exit_code == 0, result.output
    assert "pairs dropped" in result.output or "preference pairs" in result.output, result.output


def test_full_dpo_resume_equals_the_uninterrupted_run(tmp_path: Path, shared_data: Path) -> None:
    """A resumed full-model DPO run compares with the same reference (the model before training, read from ft's
    cache before the checkpoint loads) and continues exactly: steps 3-4 and the final weights equal the uninterrupted run's."""
    import shutil

    from safetensors.torch import load_file

    recipe = _recipe(tmp_path, shared_data, method="full", lora=None, train__lr=1e-3, train__save_every=2,
                     train__eval_every=2, train__keep_last=None)
    whole = tmp_path / "whole"
    want = _train(recipe, whole)
    cut = tmp_path / "cut"  # the same run as if killed right after the step-2 checkpoint
    shutil.copytree(whole, cut)
    for entry in ("model", "best", "checkpoints/step-4"):
        shutil.rmtree(cut / entry)
    (cut / "metrics.jsonl").write_text("".join(line + "\n" for line in (whole / "metrics.jsonl").read_text()
                                               .splitlines() if json.loads(line)["step"] <= 2))
    state = json.loads((cut / "run.json").read_text())
    (cut / "run.json").write_text(json.dumps({**state, "status": "running"}))
    result = runner.invoke(app, ["train", str(recipe), "--output-dir", str(cut), "--resume"])
    assert result.exit_code == 0, result.output + repr(result.exception)
    assert "read from ft's cache" in " ".join(result.output.split())  # the reference the whole run computed
    got = [json.loads(line) for line in (cut / "metrics.jsonl").read_text().splitlines()]
    assert [ln["step"] for ln in got] == [ln["step"] for ln in want]
    for a, b in zip(got, want, strict=True):
        for key in ("loss", "eval_loss", "reward_margin", "eval_reward_margin"):
            if key in b:
                assert a[key] == pytest.approx(b[key], rel=1e-6, abs=1e-7), (key, a["step"])
    a, b = load_file(cut / "model" / "model.safetensors"), load_file(whole / "model" / "model.safetensors")
    assert max((a[k] - b[k]).abs().max().item() for k in b) < 1e-6


def test_ft_eval_on_a_dpo_run_reproduces_its_last_evaluation(tmp_path: Path, shared_data: Path) -> None:
    """ft eval RUN on a DPO run reports the pair loss, reward accuracy and margin that training logged at its last
    evaluation (same reference: the base with the adapter disabled); --fail-if works on them; --data takes pairs."""
    _train(_recipe(tmp_path, shared_data, train__max_steps=2, train__eval_every=2, train__save_every=2),
           tmp_path / "run")
    logged = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    last = [ln for ln in logged if "eval_loss" in ln][-1]
    result = runner.invoke(app, ["eval", str(tmp_path / "run"), "--fail-if", "reward_accuracy<0"])
    assert result.exit_code == 0, result.output + repr(result.exception)
    got = json.loads((tmp_path / "run" / "eval.json").read_text())
    assert got["pairs"] == last["eval_pairs"]
    assert got["pair_loss"] == pytest.approx(last["eval_loss"], rel=1e-5)
    assert got["reward_margin"] == pytest.approx(last["eval_reward_margin"], rel=1e-4, abs=1e-6)
    assert got["reward_accuracy"] == pytest.approx(last["eval_reward_accuracy"])
    failed = runner.invoke(app, ["eval", str(tmp_path / "run"), "--fail-if", "reward_accuracy<2", "--name", "x"])
    assert failed.exit_code == 3, failed.output
    pairs = tmp_path / "pairs.json"
    pairs.write_text(json.dumps(json.loads((shared_data / "dpo_en_demo.json").read_text())[200:230]))
    on_file = runner.invoke(app, ["eval", str(tmp_path / "run"), "--data", str(pairs)])
    assert on_file.exit_code == 0, on_file.output + repr(on_file.exception)
    assert json.loads((tmp_path / "run" / "eval-pairs.json").read_text())["pairs"] > 0
    # ft report adds a reward panel (margin and accuracy, train and eval) and the final values to the summary
    from ft_cli.report import plot_curves, read_metrics
    from ft_cli.run_dir import RunDir

    report = runner.invoke(app, ["report", str(tmp_path / "run")])
    assert report.exit_code == 0, report.output
    summary = (tmp_path / "run" / "report" / "summary.md").read_text()
    assert "final reward margin" in summary and "final eval reward accuracy" in summary
    figure = plot_curves(read_metrics(RunDir(tmp_path / "run")), tmp_path / "curves.png")
    assert [ax.get_ylabel() for ax in figure.axes][:3] == ["loss (per pair)", "reward margin", "learning rate"]


def test_plan_counts_both_sequences_of_a_pair(tmp_path: Path, shared_data: Path, tiny_llama_dir: Path) -> None:
    """ft plan: a DPO micro-batch of b pairs runs 2b sequences, so its activations and logits are those of an SFT
    micro-batch of 2b rows; the weights and optimizer state are the same."""
    from transformers import AutoConfig

    from ft_cli.plan import estimate_memory
    from ft_cli.recipe import load_recipe

    config = AutoConfig.from_pretrained(tiny_llama_dir)
    dpo = load_recipe(_recipe(tmp_path, shared_data), [])
    sft = load_recipe(_recipe(tmp_path, shared_data, objective="sft", data__format="sharegpt"), [])
    pairs, rows = estimate_memory(config, dpo, micro_batch_size=2), estimate_memory(config, sft, micro_batch_size=4)
    assert pairs.micro_batch_size == 2
    assert pairs.activations.bytes == rows.activations.bytes > 0 and pairs.logits.bytes == rows.logits.bytes
    assert [r.bytes for r in pairs.static] == [r.bytes for r in rows.static]
    assert estimate_memory(config, dpo, micro_batch_size=1).activations.bytes < pairs.activations.bytes


def test_two_processes_equal_one_with_twice_the_micro_batch(tmp_path: Path, shared_data: Path) -> None:
    """DPO under torchrun (2 gloo processes, micro-batch 1 pair each) trains as 1 process with micro-batch 2: the
    pair-normalised loss, the reward metrics and the adapter agree."""
    from safetensors.torch import load_file

    from tests.test_distributed import child_env, run, torchrun

    one = _recipe(tmp_path, shared_data, train__micro_batch_size=2, train__max_steps=3, train__eval_every=3,
                  train__save_every=3)
    _train(one, tmp_path / "one")
    two_dir = tmp_path / "two"
    two_dir.mkdir()
    two = _recipe(two_dir, shared_data, train__micro_batch_size=1, train__max_steps=3, train__eval_every=3,
                  train__save_every=3)
    run(torchrun("-m", "ft_cli.cli", "train", str(two), "--output-dir", str(tmp_path / "two-run")), child_env())
    read = lambda d: [json.loads(x) for x in (d / "metrics.jsonl").read_text().splitlines()]  # noqa: E731
    got, want = read(tmp_path / "two-run"), read(tmp_path / "one")
    assert [x["step"] for x in got] == [x["step"] for x in want]
    for a, b in zip(got, want, strict=True):
        for key in ("loss", "reward_margin", "eval_loss", "eval_reward_margin"):
            if key in b:
                assert a[key] == pytest.approx(b[key], rel=1e-4, abs=1e-6), (key, a["step"])
    a, b = (load_file(d / "adapter" / "adapter_model.safetensors") for d in (tmp_path / "two-run", tmp_path / "one"))
    # Adam divides each element's update by its own gradient scale, so summation-order noise in near-zero gradients
    # (shared prompt rows padded to 2 pairs vs 1 pair per process) shows in the weights: here 5e-5, 1 % of lr 5e-3
    scale = max(v.abs().max().item() for v in b.values())
    assert max((a[k] - b[k]).abs().max().item() for k in b) < 1e-3 * scale


def test_shared_prompt_rows_train_as_separate_rows_and_turn_off_where_they_differ(
        tmp_path: Path, shared_data: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """preference.share_prompt (the default) trains the same steps as separate rows; where the shared computation
    disagrees with the separate one on the first batch, ft says so and computes each prompt twice."""
    import ft_cli.pair_rows

    shared = _train(_recipe(tmp_path, shared_data, train__max_steps=3), tmp_path / "shared")
    separate = _train(_recipe(tmp_path, shared_data, train__max_steps=3, preference={"share_prompt": False}),
                      tmp_path / "separate")
    for key in ("loss", "reward_margin", "eval_loss"):
        got, want = ([x[key] for x in lines if key in x] for lines in (shared, separate))
        assert got and got == pytest.approx(want, rel=1e-5, abs=1e-6), key

    real = ft_cli.pair_rows.shared_reply_logps
    monkeypatch.setattr(ft_cli.pair_rows, "shared_reply_logps",  # a model that ignores the 4D mask, as it were
                        lambda *a, **k: (lambda lp, n: (lp * 1.01, n))(*real(*a, **k)))
    result = runner.invoke(app, ["train", str(_recipe(tmp_path, shared_data, train__max_steps=1)), "--output-dir",
                                 str(tmp_path / "off")])
    assert result.exit_code == 0, result.output
    assert "preference.share_prompt: off" in result.output and "each pair's prompt is computed twice" in result.output


# The reference cache ---------------------------------------------------------------------------------------------

def test_reference_log_probabilities_are_cached_across_runs(tmp_path: Path, shared_data: Path,
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    """A second DPO run on the same pairs and base model (another learning rate and LoRA rank) reads the reference
    from ft's cache instead of computing it, and trains exactly as a run that computes it; a damaged entry is caught
    by the first-batch check and replaced; other pairs get an entry of their own; data.cache: false neither reads nor writes."""
    import numpy as np

    import ft_cli.reference

    cache = tmp_path / "cache"
    monkeypatch.setenv("FT_CACHE_DIR", str(cache))
    calls: list = []
    real = ft_cli.reference.reference_logps
    monkeypatch.setattr(ft_cli.reference, "reference_logps",
                        lambda *a, **k: (calls.append(k.get("batches")), real(*a, **k))[1])
    full = lambda: sum(b is None for b in calls)  # noqa: E731 - passes over a whole split, not the first-batch check
    entries = lambda: sorted(p.name for p in (cache / "reference").iterdir())  # noqa: E731

    def train(name: str, **over) -> tuple[list[dict], str]:
        result = runner.invoke(app, ["train", str(_recipe(tmp_path, shared_data, train__max_steps=2, **over)),
                                     "--output-dir", str(tmp_path / name)])
        assert result.exit_code == 0, result.output + repr(result.exception)
        lines = [json.loads(x) for x in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]
        return [{k: v for k, v in x.items() if k not in ("wall_time", "step_time_s", "tokens_per_s")} for x in lines], \
            " ".join(result.output.split())

    _, out = train("first")
    assert full() == 2 and "kept in ft's cache for the next run" in out, out  # train and eval pairs
    assert len(entries()) == 2
    sweep = {"train__lr": 1e-3, "lora__rank": 4}
    got, out = train("second", **sweep)
    assert full() == 2 and "read from ft's cache, its first batch checked against the model" in out, out
    want, out = train("uncached", data__cache=False, **sweep)
    assert full() == 4 and "computed in" in out and len(entries()) == 2
    assert got == want  # bit for bit: same batches, same kernels
    assert got[0]["loss"] == pytest.approx(math.log(2), abs=1e-6)

    for name in entries():  # damage both entries: every value 1 % off
        path = cache / "reference" / name / "logps.npy"
        np.save(path, np.load(path) * 1.01)
    got, out = train("damaged", **sweep)
    assert "differ from this model's on the first batch" in out and "computing them again" in out, out
    assert full() == 6 and got == want
    got, out = train("mended", **sweep)  # the damaged entries were replaced
    assert full() == 6 and "read from ft's cache" in out and got == want

    _, out = train("other-pairs", data__limit=30)
    assert full() > 6 and "kept in ft's cache" in out and len(entries()) > 2


def test_the_reference_key_follows_the_weights_the_reference_uses(tiny_llama_dir: Path) -> None:
    """The model's part of the key: the adapter's own weights (disabled for the reference) do not change it; a base
    weight does, and so does a quantized base."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from ft_cli.reference import weights_digest

    def lora(rank: int):
        base = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32)
        return get_peft_model(base, LoraConfig(r=rank, target_modules=["q_proj", "v_proj"]))

    model = lora(8)
    key = weights_digest(model)
    assert weights_digest(lora(4)) == key
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.add_(1.0)
    assert weights_digest(model) == key
    with torch.no_grad():
        model.get_input_embeddings().weight.mul_(1.001)
    assert weights_digest(model) != key
