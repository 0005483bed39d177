"""`python scripts/bench.py dpo`: ft's DPO against TRL's DPOTrainer, side by side, on the same model, pairs and
LoRA settings, each in a fresh process, interleaved repeats.

Both train `--steps` optimizer steps of `--micro` pairs (grad_accum 1) on the first pairs of dpo_en_demo.json that
fit `--max-seq-len` whole (so neither truncates), in the same order (ft: data.shuffle false; TRL: the sequential
sampler), LoRA r16 on all linear layers, constant lr, float32 on the CPU. Reported:
- pairs/s of training, including each side's reference log-probabilities (ft computes them once before step 1,
  TRL in every step) and excluding model loading and tokenization; the ratio ft / TRL per repeat, and its spread;
- the loss curves side by side (step 1 is log 2 for both), and their largest relative difference.
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    p = subparsers.add_parser("dpo", help="ft's DPO vs TRL's DPOTrainer: pairs/s and loss curves",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="builtin:small-llama", help="a built-in base model (default small-llama)")
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--micro", type=int, default=2, help="pairs per step (default 2)")
    p.add_argument("--max-seq-len", type=int, default=512)
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--repeat", type=int, default=2, help="interleaved repeats of each side (default 2)")
    p.add_argument("--data-dir", default=str(ROOT.parent / "shared" / "data"))
    p.add_argument("--json", default=None, help="write the numbers here")
    p.set_defaults(func=bench_dpo)
    one = subparsers.add_parser("_dpo_one")  # internal: one side in its own process
    one.add_argument("side", choices=["ft", "trl"])
    one.add_argument("config")
    one.set_defaults(func=_dpo_one)
    return p


def bench_dpo(args: argparse.Namespace) -> None:
    work = Path(tempfile.mkdtemp(prefix="ft-bench-dpo-"))
    pairs = _pairs(args, work)
    config = {"model": args.model, "steps": args.steps, "micro": args.micro, "max_seq_len": args.max_seq_len,
              "lr": args.lr, "pairs": str(pairs), "work": str(work)}
    cfg_path = work / "config.json"
    cfg_path.write_text(json.dumps(config))
    runs: dict[str, list[dict]] = {"ft": [], "trl": []}
    for r in range(args.repeat):
        for side in ("ft", "trl") if r % 2 == 0 else ("trl", "ft"):
            out = subprocess.run([sys.executable, str(ROOT / "scripts" / "bench.py"), "_dpo_one", side, str(cfg_path)],
                                 capture_output=True, text=True, timeout=3600)
            if out.returncode != 0:
                raise SystemExit(f"{side} failed:\n{out.stdout[-3000:]}\n{out.stderr[-6000:]}")
            runs[side].append(json.loads(out.stdout.strip().splitlines()[-1]))
    ratios = [f["pairs_per_s"] / t["pairs_per_s"] for f, t in zip(runs["ft"], runs["trl"], strict=True)]
    ft_loss, trl_loss = runs["ft"][0]["losses"], runs["trl"][0]["losses"]
    diff = max(abs(a - b) / max(abs(b), 1e-8) for a, b in zip(ft_loss, trl_loss, strict=True))
    print(f"== DPO: {args.model}, {args.steps} steps x {args.micro} pairs, max_seq_len {args.max_seq_len}, LoRA r16 "
          f"all-linear, {args.repeat} interleaved repeats")
    for side in ("ft", "trl"):
        rates = ", ".join(f"{r['pairs_per_s']:.3f}" for r in runs[side])
        print(f"{side:<4} pairs/s {rates} (reference {runs[side][0]['reference_s']:.1f} s of "
              f"{runs[side][0]['train_s']:.1f} s)")
    spread = f"{min(ratios):.2f}-{max(ratios):.2f}" if len(ratios) > 1 else f"{ratios[0]:.2f}"
    print(f"ft / TRL pairs/s: x{sum(ratios) / len(ratios):.2f} (per repeat {spread}; target 1.2)")
    print("loss per step  ft:  " + " ".join(f"{x:.4f}" for x in ft_loss))
    print("loss per step  TRL: " + " ".join(f"{x:.4f}" for x in trl_loss))
    print(f"largest relative loss difference: {diff:.2e}")
    if args.json:
        Path(args.json).write_text(json.dumps({"runs": runs, "ratios": ratios, "max_rel_loss_diff": diff}, indent=2))


def _pairs(args: argparse.Namespace, work: Path) -> Path:
    """The first steps x micro pairs of dpo_en_demo.json whose prompt + longer reply fit max_seq_len whole in the
    model's tokenizer (with the chat template's tokens), as TRL's prompt / chosen / rejected messages."""
    from transformers import AutoTokenizer

    from ft_cli.builtin_models import resolve_builtin

    tok = AutoTokenizer.from_pretrained(resolve_builtin(args.model))
    records = json.loads((Path(args.data_dir) / "dpo_en_demo.json").read_text())
    role = {"human": "user", "gpt": "assistant", "system": "system"}
    rows = []
    for rec in records:
        prompt = [{"role": role[t["from"]], "content": t["value"]} for t in rec["conversations"]]
        sides = [[{"role": "assistant", "content": rec[k]["value"]}] for k in ("chosen", "rejected")]
        lengths = [len(tok.apply_chat_template(prompt + s, tokenize=True, return_dict=True)["input_ids"]) for s in sides]
        if max(lengths) + 2 > args.max_seq_len:  # (transformers 5 returns a dict: count its input_ids)
            continue
        rows.append({"prompt": prompt, "chosen": sides[0], "rejected": sides[1]})
        if len(rows) == args.steps * args.micro:
            break
    if len(rows) < args.steps * args.micro:
        raise SystemExit(f"only {len(rows)} pairs fit max_seq_len {args.max_seq_len}; raise it or lower --steps")
    path = work / "pairs.json"
    path.write_text(json.dumps(rows))
    return path


def _dpo_one(args: argparse.Namespace) -> None:
    cfg = json.loads(Path(args.config).read_text())
    result = _run_ft(cfg) if args.side == "ft" else _run_trl(cfg)
    print(json.dumps(result))


def _run_ft(cfg: dict) -> dict:
    import yaml

    from ft_cli.recipe import load_recipe

    work = Path(cfg["work"])
    recipe_path = work / "ft.yaml"
    recipe_path.write_text(yaml.safe_dump({
        "model": {"name_or_path": cfg["model"], "dtype": "float32"},
        "method": "lora", "objective": "dpo", "preference": {"beta": 0.1},
        "lora": {"rank": 16, "alpha": 32, "dropout": 0.0, "target_modules": "all-linear"},
        "data": {"train": cfg["pairs"], "format": "preference", "val_split": 0, "max_seq_len": cfg["max_seq_len"],
                 "shuffle": False, "cache": False},
        "train": {"max_steps": cfg["steps"], "micro_batch_size": cfg["micro"], "grad_accum": 1, "lr": cfg["lr"],
                  "scheduler": "constant", "warmup_steps": 0, "weight_decay": 0.0, "max_grad_norm": 1.0,
                  "log_every": 1, "save_every": None, "eval_every": None, "seed": 1},
        "output_dir": str(work / f"ft-run-{time.time_ns()}"),
    }))
    # As a user runs it: `ft train` in its own process. Training time is what ft reports: the seconds of its steps
    # (metrics.jsonl step_time_s) plus its one-time reference pass (the "dpo: reference log-probabilities" line).
    t0 = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "ft_cli.cli", "train", str(recipe_path)], capture_output=True,
                          text=True, cwd=ROOT)
    wall_s = time.perf_counter() - t0
    if done.returncode:
        raise SystemExit(f"ft train failed:\n{done.stderr[-4000:]}")
    found = re.search(r"dpo: reference log-probabilities of [\d,]+ pairs \([^)]*\) computed in ([\d.]+) s", done.stderr)
    if found is None:
        raise SystemExit(f"ft train did not report its reference pass:\n{done.stderr[-2000:]}")
    reference_s = float(found.group(1))
    lines = [json.loads(x) for x in (Path(load_recipe(recipe_path, []).output_dir) / "metrics.jsonl").read_text()
             .splitlines() if '"step_time_s"' in x]
    train_s = sum(x["step_time_s"] for x in lines) + reference_s  # log_every 1: a line per step
    return {"pairs_per_s": cfg["steps"] * cfg["micro"] / train_s, "train_s": train_s, "reference_s": reference_s,
            "wall_s": wall_s, "losses": [x["loss"] for x in lines]}


def _run_trl(cfg: dict) -> dict:
    import datasets
    import torch
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import DPOConfig, DPOTrainer

    from ft_cli.builtin_models import resolve_builtin

    path = resolve_builtin(cfg["model"])
    tok = AutoTokenizer.from_pretrained(path)
    torch.manual_seed(1)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    pairs = datasets.Dataset.from_list(json.loads(Path(cfg["pairs"]).read_text()))
    args = DPOConfig(output_dir=str(Path(cfg["work"]) / "trl-run"), per_device_train_batch_size=cfg["micro"],
                     gradient_accumulation_steps=1, max_steps=cfg["steps"], learning_rate=cfg["lr"],
                     lr_scheduler_type="constant", warmup_steps=0, weight_decay=0.0, max_grad_norm=1.0, beta=0.1,
                     max_length=cfg["max_seq_len"], logging_steps=1, save_strategy="no", report_to=[], use_cpu=True,
                     bf16=False, seed=1, train_sampling_strategy="sequential", dataloader_num_workers=0)
    trainer = DPOTrainer(model=model, args=args, train_dataset=pairs, processing_class=tok,
                         peft_config=LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules="all-linear"))

    class Clock(TrainerCallback):
        start = 0.0

        def on_train_begin(self, *a: Any, **k: Any) -> None:
            Clock.start = time.perf_counter()

    trainer.add_callback(Clock())
    trainer.train()
    train_s = time.perf_counter() - Clock.start
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    return {"pairs_per_s": cfg["steps"] * cfg["micro"] / train_s, "train_s": train_s, "reference_s": 0.0,
            "losses": losses}
