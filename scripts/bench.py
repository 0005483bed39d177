"""Benchmarks. One subcommand per area; each prints its numbers side by side.

    python scripts/bench.py data  [--rows 50000] [--repeat N] [--variants ft,ft-exact,ids,labels] [--pack-rows 100000]
    python scripts/bench.py train [--steps 8] [--packed-steps 4] [--repeat 1] [--json PATH]
    python scripts/bench.py gpu   [--shape 8b] [--methods lora,qlora] [--seq 2048]   (CUDA; see bench_gpu.py)
    python scripts/bench.py serve [--requests 48] [--concurrency 8] [--json PATH]   (see bench_serve.py)
    python scripts/bench.py export [--steps 60] [--formats int8,...] [--json PATH]
    python scripts/bench.py classify [--steps 30] [--batch 32] [--repeat 1] [--json PATH]   (see bench_classify.py)

`data`: ft's data pipeline (render + tokenize + mask + pack, from a file on disk) against a per-example
`datasets.map` over `tokenizer.apply_chat_template`, on alpaca rows (the demo rows repeated, each made unique so
no cache can help); packing time for 100k examples; packing efficiency on alpaca_en_demo at max_seq_len 1024.
Uses the built-in tiny-llama tokenizer (offline).

`train`: ft against HF Trainer + peft (same model, data, LoRA config, optimizer, schedule, effective batch and max
length; `DataCollatorForSeq2Seq` dynamic padding) on builtin:small-llama (~21M params) and alpaca_en_demo.json, CPU,
float32. Each run is its own subprocess (peak RSS, time to first step from process start), the runs are interleaved
`--repeat` times and the best of each is kept. Prints effective tokens/s (real, non-pad tokens) and padding waste
for: ft unpacked, ft packed, the baseline, and a bare PyTorch loop over ft's packed batches (framework overhead);
the loss parity of ft unpacked vs the baseline (same rows in the same order, same LoRA init); `ft --help` time.

`export`: quantization-aware training against post-training quantization. The same full fine-tune of
builtin:small-llama on alpaca_en_demo.json runs twice, without and with `train.qat: int8-dynamic-act-int4-weight`;
each run is exported with `ft export --format int8-dynamic-int4` and the perplexity each loses against its own
16-bit merge is printed side by side (the ratio is QAT's gap over PTQ's). Then the PTQ run is exported to every
other format (--formats) for a size / quality / speed table: weights on disk, eval perplexity change, tokens/s and
peak memory of ft export's fixed greedy workload, each against the 16-bit merge.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))
from bench_classify import add_parser as add_classify_parser  # noqa: E402
from bench_dpo import add_parser as add_dpo_parser  # noqa: E402
from bench_gpu import add_parser as add_gpu_parser  # noqa: E402
from bench_serve import add_parser as add_serve_parser  # noqa: E402

os.environ.setdefault("HF_HUB_OFFLINE", "1")


# data ------------------------------------------------------------------------------------------------------------

def _alpaca_messages(ex: dict) -> list[dict]:
    user = f"{ex['instruction']}\n{ex['input']}" if ex["input"] else ex["instruction"]
    return [{"role": "user", "content": user}, {"role": "assistant", "content": ex["output"]}]


def _baseline(tokenizer, rows: list[dict], *, masked: bool) -> tuple[float, float]:
    """Per-example datasets.map over apply_chat_template. masked=True also computes labels the usual way
    (tokenize the prompt with add_generation_prompt=True and mask that many tokens): the same output as ft's."""
    import datasets

    ds = datasets.Dataset.from_list(rows)

    def one(ex: dict) -> dict:
        messages = _alpaca_messages(ex)
        ids = tokenizer.apply_chat_template(messages, tokenize=True, return_dict=True)["input_ids"]
        if not masked:
            return {"input_ids": ids}
        prompt = tokenizer.apply_chat_template(messages[:-1], tokenize=True, add_generation_prompt=True,
                                               return_dict=True)["input_ids"]
        return {"input_ids": ids, "labels": [-100] * len(prompt) + ids[len(prompt):]}

    start, cpu = time.perf_counter(), time.process_time()
    ds.map(one, remove_columns=ds.column_names, load_from_cache_file=False)
    return time.perf_counter() - start, time.process_time() - cpu


def _cpu_with_children() -> float:
    """CPU seconds of this process and of its finished children (ft forks tokenizing workers on big data)."""
    import resource

    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    return time.process_time() + children.ru_utime + children.ru_stime


def _ft(tokenizer, path: Path, *, packing: bool, max_seq_len: int = 2048,
        render_once: bool = True) -> tuple[tuple[float, float], object]:
    """ft's data pipeline from the file; render_once=False renders every inference prompt of every conversation
    (the exact path, and what ft did before rendering plain conversations once)."""
    import functools

    from ft_cli.data import pipeline
    from ft_cli.data.render import ChatRenderer
    from ft_cli.recipe import recipe_from_dict

    recipe = recipe_from_dict({"model": {"name_or_path": "builtin:tiny-llama"},
                               "data": {"train": str(path), "format": "alpaca", "val_split": 0.0, "cache": False,
                                        "packing": packing, "max_seq_len": max_seq_len}})
    pipeline.ChatRenderer = ChatRenderer if render_once else functools.partial(ChatRenderer, fast=False)
    try:
        start, cpu = time.perf_counter(), _cpu_with_children()
        bundle = pipeline.build_datasets(recipe, tokenizer)
        return (time.perf_counter() - start, _cpu_with_children() - cpu), bundle
    finally:
        pipeline.ChatRenderer = ChatRenderer


DATA_VARIANTS = {  # name -> what runs; every repeat runs all of them back to back, in this order
    "ft": "ft (file -> tokens + labels + packed rows)",
    "ft-exact": "ft, every inference prompt rendered too",
    "ids": "baseline map, apply_chat_template only",
    "labels": "baseline map, apply_chat_template + prompt mask",
}


def _spread(values: list[float]) -> str:
    import statistics

    return (f"x{statistics.median(values):.2f} (min {min(values):.2f}, max {max(values):.2f}, "
            f"{len(values)} repeats)")


def bench_data(args: argparse.Namespace) -> None:
    import datasets
    import numpy as np
    from transformers import AutoTokenizer

    from ft_cli.builtin_models import resolve_builtin
    from ft_cli.data.packing import pack_sequences, packing_efficiency

    datasets.disable_progress_bars()
    data_dir = Path(args.data_dir)
    demo = json.loads((data_dir / "alpaca_en_demo.json").read_text())
    tokenizer = AutoTokenizer.from_pretrained(resolve_builtin("builtin:tiny-llama"))
    rows = [dict(r, instruction=f"{r['instruction']} (#{i})") for i, r in
            ((i, demo[i % len(demo)]) for i in range(args.rows))]
    print(f"data: {len(rows):,} alpaca rows (alpaca_en_demo repeated, each unique); tokenizer builtin:tiny-llama; "
          f"{os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.2f}")

    variants = ["ft", *(v for v in args.variants.split(",") if v != "ft")]
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "rows.json"
        path.write_text(json.dumps(rows))
        warm = Path(tmp) / "warm.json"
        warm.write_text(json.dumps(rows[:1000]))
        _ft(tokenizer, warm, packing=True)  # warm-up: imports, jinja compile
        _baseline(tokenizer, rows[:1000], masked=True)
        run = {"ft": lambda: _ft(tokenizer, path, packing=True),
               "ft-exact": lambda: _ft(tokenizer, path, packing=True, render_once=False),
               "ids": lambda: (_baseline(tokenizer, rows, masked=False), None),
               "labels": lambda: (_baseline(tokenizer, rows, masked=True), None)}
        times: dict[str, list[tuple[float, float]]] = {v: [] for v in variants}
        for _ in range(args.repeat):  # interleaved, so load from other processes hits every variant alike
            for v in variants:
                t, out = run[v]()
                times[v].append(t)
                if v == "ft":
                    bundle = out
    best = {v: min(ts) for v, ts in times.items()}  # (wall, cpu) of the fastest run
    ft_time = best["ft"][0]
    for v, (t, cpu) in best.items():
        print(f"  {DATA_VARIANTS[v]:<50} {t:7.2f} s wall ({cpu:6.1f} s CPU)  {len(rows) / t:7,.0f} rows/s  "
              f"x{t / ft_time:.2f} of ft's time")
    print("  ratios within each repeat (the variants ran back to back), median and spread:")
    for v in variants:
        if v != "ft":
            ratios = [other[0] / mine[0] for other, mine in zip(times[v], times["ft"], strict=True)]
            print(f"    {DATA_VARIANTS[v]:<48} / ft: {_spread(ratios)}")
    print(f"  load average (1 min) at the end: {os.getloadavg()[0]:.2f} on {os.cpu_count()} CPUs")
    s = bundle.train_stats
    print(f"  ft: {s.rows:,} examples, {s.tokens:,} tokens, {s.packed_rows:,} packed rows")

    rng = np.random.default_rng(0)
    lengths = np.clip(rng.lognormal(5.5, 0.8, args.pack_rows).astype(np.int64), 8, 2048)
    start = time.perf_counter()
    packed = pack_sequences(lengths, 2048, seed=0)
    pack_time = time.perf_counter() - start
    print(f"packing: {args.pack_rows:,} examples (lognormal lengths, mean {lengths.mean():.0f}) into "
          f"{len(packed):,} rows of 2048 in {pack_time:.2f} s, efficiency "
          f"{packing_efficiency(lengths, len(packed), 2048):.4f}")

    _, bundle = _ft(tokenizer, data_dir / "alpaca_en_demo.json", packing=True, max_seq_len=1024)
    s = bundle.train_stats
    print(f"packing efficiency on alpaca_en_demo.json at max_seq_len 1024: {s.packing_efficiency:.4f} "
          f"({s.rows} examples, {s.tokens:,} tokens -> {s.packed_rows} rows)")


# train -----------------------------------------------------------------------------------------------------------

TRAIN_VARIANTS = ("ft", "ft-packed", "bare-packed", "baseline")
TRAIN_MODEL = "builtin:small-llama"  # ~21M parameters


def _train_recipe(args: argparse.Namespace, out: Path, *, packed: bool) -> dict:
    """The ft recipe every ft variant runs; the baseline mirrors it by hand."""
    return {
        "model": {"name_or_path": args.model, "dtype": "float32"},
        "method": "lora",
        "lora": {"rank": 16, "alpha": 32, "dropout": 0.0, "target_modules": "all-linear"},
        "data": {"train": str(Path(args.data_dir) / "alpaca_en_demo.json"), "format": "alpaca", "val_split": 0.0,
                 "max_seq_len": args.max_seq_len, "packing": packed, "shuffle": False,
                 "cache": False},  # no tokenized cache: preprocessing counts in the time to the first step
        "train": {"max_steps": args.packed_steps if packed else args.steps, "micro_batch_size": args.micro_batch,
                  "grad_accum": args.grad_accum, "lr": 2e-4, "scheduler": "cosine", "warmup_steps": 0,
                  "weight_decay": 0.0, "max_grad_norm": 1.0, "gradient_checkpointing": False, "seed": 42,
                  "eval_every": None, "save_every": None, "log_every": 1},
        "output_dir": str(out / "run"),
    }


class _Meter:
    """Counts the tokens of every collated micro-batch and stamps every optimizer step."""

    def __init__(self) -> None:
        self.real = self.slots = self.trained = 0
        self.steps: list[tuple[float, int, int, int]] = []  # (time, real, slots, trained) after each step

    def batch(self, batch: dict) -> dict:
        from ft_cli.scoring import count_targets, real_tokens

        self.slots += batch["input_ids"].numel()
        self.real += real_tokens(batch)
        self.trained += count_targets(batch)
        return batch

    def step(self) -> None:
        self.steps.append((time.time(), self.real, self.slots, self.trained))


def _one_ft(args: argparse.Namespace, out: Path, *, packed: bool, bare: bool) -> dict:
    import torch

    from ft_cli.batches import rows_at
    from ft_cli.recipe import recipe_from_dict
    from ft_cli.scoring import count_targets
    from ft_cli.train import fit, setup

    recipe = recipe_from_dict(_train_recipe(args, out, packed=packed))
    session = setup(recipe, out / "recipe.yaml", resume=False, overwrite=True)
    meter, losses = _Meter(), []
    if not bare:  # ft's own loop, as users run it: its metrics.jsonl has a line per step (log_every: 1)
        fit(session)
        lines = [json.loads(ln) for ln in session.run.metrics.read_text().splitlines() if '"loss"' in ln]
        for ln in lines:  # the step's end, and the tokens the loop counted
            meter.real, meter.slots, meter.trained = (meter.real + ln["tokens"], meter.slots + ln["padded_tokens"],
                                                      meter.trained + ln["targets"])
            meter.steps.append((ln["wall_time"], meter.real, meter.slots, meter.trained))
        losses = [ln["loss"] for ln in lines]
    else:  # the same model, optimizer, schedule and batches, in the plainest PyTorch loop
        model, optimizer, scheduler = session.model, session.optimizer.optimizer, session.scheduler
        params = [p for p in model.parameters() if p.requires_grad]
        model.train()
        for step in range(session.total_steps):
            first = step * recipe.train.grad_accum
            micro = [meter.batch(session.collate(rows_at(session.data.train, session.batches.indices(m))))
                     for m in range(first, first + recipe.train.grad_accum)]
            n = torch.tensor(float(sum(count_targets(b) for b in micro)))
            total = 0.0
            for b in micro:
                inputs = {k: b[k] for k in ("input_ids", "labels", "attention_mask", "position_ids") if k in b}
                loss = model(**inputs, use_cache=False, num_items_in_batch=n).loss
                loss.backward()
                total += loss.item()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            meter.step()
            losses.append(total)
    return {"steps": meter.steps, "losses": losses}


def _one_baseline(args: argparse.Namespace, out: Path) -> dict:
    """A typical hand-written HF script: Trainer + peft, apply_chat_template with the prompt masked,
    DataCollatorForSeq2Seq dynamic padding. Rows in file order (train_sampling_strategy sequential) so that the
    loss can be compared step by step with ft's (data.shuffle: false)."""
    import datasets
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import (
        AutoModelForCausalLM,
        AutoTokenizer,
        DataCollatorForSeq2Seq,
        Trainer,
        TrainerCallback,
        TrainingArguments,
        set_seed,
    )

    from ft_cli.builtin_models import resolve_builtin

    datasets.disable_progress_bars()
    path = resolve_builtin(args.model)
    tokenizer = AutoTokenizer.from_pretrained(path)
    rows = json.loads((Path(args.data_dir) / "alpaca_en_demo.json").read_text())

    def tokenize(ex: dict) -> dict:
        messages = _alpaca_messages(ex)
        ids = tokenizer.apply_chat_template(messages, tokenize=True, return_dict=True)["input_ids"]
        prompt = tokenizer.apply_chat_template(messages[:-1], tokenize=True, add_generation_prompt=True,
                                               return_dict=True)["input_ids"]
        ids = ids[:args.max_seq_len]
        return {"input_ids": ids, "attention_mask": [1] * len(ids),
                "labels": ([-100] * len(prompt) + ids[len(prompt):])[:len(ids)]}

    train = datasets.Dataset.from_list(rows).map(tokenize, remove_columns=list(rows[0]))
    set_seed(42)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    model = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules="all-linear",
                                             task_type="CAUSAL_LM"))
    meter, losses = _Meter(), []
    collator = DataCollatorForSeq2Seq(tokenizer, padding=True, label_pad_token_id=-100)

    class Stamp(TrainerCallback):
        def on_step_end(self, *a, **k):
            meter.step()

        def on_log(self, _args, _state, _control, logs=None, **k):
            if logs and "loss" in logs:
                losses.append(logs["loss"])

    targs = TrainingArguments(
        output_dir=str(out / "hf"), per_device_train_batch_size=args.micro_batch,
        gradient_accumulation_steps=args.grad_accum, max_steps=args.steps, learning_rate=2e-4,
        lr_scheduler_type="cosine", warmup_steps=0, weight_decay=0.0, max_grad_norm=1.0, optim="adamw_torch",
        logging_steps=1, save_strategy="no", report_to=[], seed=42, use_cpu=True, dataloader_num_workers=0,
        train_sampling_strategy="sequential", disable_tqdm=True, remove_unused_columns=False)
    trainer = Trainer(model=model, args=targs, train_dataset=train, callbacks=[Stamp()],
                      data_collator=lambda feats: meter.batch(collator(feats)))
    trainer.train()
    return {"steps": meter.steps, "losses": losses, "rows": len(train)}


def _one_train(args: argparse.Namespace) -> None:
    """Child process: one variant; writes its numbers to --json."""
    import resource

    with tempfile.TemporaryDirectory() as tmp:
        v = args.variant
        if v == "baseline":
            result = _one_baseline(args, Path(tmp))
        else:
            result = _one_ft(args, Path(tmp), packed=v != "ft", bare=v == "bare-packed")
    result["peak_rss_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    Path(args.json).write_text(json.dumps(result))


def _summarise(result: dict, t0: float, warmup: int) -> dict:
    steps = result["steps"]
    (ta, ra, _, ka), (tb, rb, _, kb) = steps[warmup - 1], steps[-1]
    return {"tokens_per_s": (rb - ra) / (tb - ta), "trained_per_s": (kb - ka) / (tb - ta),
            "s_per_step": (tb - ta) / (len(steps) - warmup), "padding_waste": 1 - steps[-1][1] / steps[-1][2],
            "first_step_s": steps[0][0] - t0, "peak_rss_mib": result["peak_rss_mib"], "losses": result["losses"],
            "steps": len(steps)}


def _help_time(repeat: int = 5) -> tuple[float, float]:
    ft = Path(sys.executable).with_name("ft")
    cmds = {"help": [str(ft), "--help"], "python": [sys.executable, "-c", "pass"]}
    best = {}
    for name, cmd in cmds.items():
        times = []
        for _ in range(repeat):
            start = time.perf_counter()
            subprocess.run(cmd, capture_output=True, check=True)
            times.append(time.perf_counter() - start)
        best[name] = min(times)
    return best["help"], best["python"]


def bench_train(args: argparse.Namespace) -> None:
    from ft_cli.builtin_models import resolve_builtin

    resolve_builtin(args.model)  # built once, outside the timings
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "PYTHONUNBUFFERED": "1"}
    variants = [v for v in TRAIN_VARIANTS if v in args.variants.split(",")]
    runs: dict[str, list[dict]] = {v: [] for v in variants}
    print(f"train: {args.model}, LoRA r16 all-linear, float32, alpaca_en_demo.json, max_seq_len {args.max_seq_len}, "
          f"micro-batch {args.micro_batch} x grad_accum {args.grad_accum}; {args.steps} steps unpacked, "
          f"{args.packed_steps} packed, first {args.warmup} untimed; {os.cpu_count()} CPUs, "
          f"load {os.getloadavg()[0]:.2f}")
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(args.repeat):
            for v in variants:
                out = Path(tmp) / f"{v}-{r}.json"
                cmd = [sys.executable, __file__, "_train_one", v, "--json", str(out), "--steps", str(args.steps),
                       "--packed-steps", str(args.packed_steps), "--max-seq-len", str(args.max_seq_len),
                       "--micro-batch", str(args.micro_batch), "--grad-accum", str(args.grad_accum),
                       "--data-dir", args.data_dir, "--model", args.model]
                t0 = time.time()
                proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
                if proc.returncode:
                    sys.exit(f"{v} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}")
                runs[v].append(_summarise(json.loads(out.read_text()), t0, args.warmup))
                print(f"  run {r + 1}/{args.repeat} {v:<12} {runs[v][-1]['tokens_per_s']:8,.0f} tok/s", flush=True)
    best = {v: max(rs, key=lambda x: x["tokens_per_s"]) for v, rs in runs.items()}
    first = {v: min(x["first_step_s"] for x in rs) for v, rs in runs.items()}
    base = best.get("baseline")
    print(f"\n  {'':<12} {'tokens/s':>9} {'x base':>7} {'pad waste':>9} {'s/step':>7} {'1st step':>9} {'peak RSS':>9}")
    for v, b in best.items():
        ratio = f"{b['tokens_per_s'] / base['tokens_per_s']:.2f}" if base else "-"
        print(f"  {v:<12} {b['tokens_per_s']:9,.0f} {ratio:>7} {b['padding_waste']:9.1%} {b['s_per_step']:7.3f} "
              f"{first[v]:8.1f}s {b['peak_rss_mib']:7.0f}MiB")
    results: dict = {"config": {k: v for k, v in vars(args).items() if k != "func"}, "runs": runs}
    checks = []
    if base and "ft-packed" in best:
        r = best["ft-packed"]["tokens_per_s"] / base["tokens_per_s"]
        checks.append((f"ft packed vs baseline effective tokens/s: {r:.2f}x", r >= 1.3, "target >= 1.3x, stretch 1.6x"))
        results["packed_speedup"] = r
    if "ft-packed" in best:
        w = best["ft-packed"]["padding_waste"]
        checks.append((f"ft packed padding waste: {w:.1%}", w <= 0.05, "target <= 5 %"))
    if base:
        checks.append((f"baseline padding waste: {base['padding_waste']:.1%}", True, "for reference"))
    if "ft-packed" in best and "bare-packed" in best:
        o = best["ft-packed"]["s_per_step"] / best["bare-packed"]["s_per_step"] - 1
        checks.append((f"ft loop overhead over a bare PyTorch loop on the same batches: {o:+.1%}", o <= 0.05,
                       "target <= 5 %"))
        results["overhead"] = o
    if base and "ft" in best:
        a, b = best["ft"]["losses"], base["losses"]
        n = min(len(a), len(b))
        rel = abs(a[n - 1] - b[n - 1]) / abs(b[n - 1])
        worst = max(abs(x - y) / abs(y) for x, y in zip(a[:n], b[:n], strict=True))
        checks.append((f"loss parity ft vs baseline (unpacked, same order): final {a[n - 1]:.4f} vs {b[n - 1]:.4f}, "
                       f"rel {rel:.2e} (worst step {worst:.2e})", rel <= 0.01, "target <= 1 %"))
        results["loss_parity"] = rel
        ratio = first["ft"] / first["baseline"]
        checks.append((f"time to first optimizer step: ft {first['ft']:.1f} s vs baseline {first['baseline']:.1f} s "
                       f"({ratio:.2f}x)", ratio <= 1.0, "target: no worse than the baseline"))
    help_s, python_s = _help_time()
    checks.append((f"ft --help: {help_s:.2f} s (bare python start {python_s:.2f} s)", help_s < 0.5, "target < 0.5 s"))
    results["help_s"] = help_s
    print()
    for text, ok, target in checks:
        print(f"  {'PASS' if ok else 'MISS'}  {text}   [{target}]")
    print(f"  load average (1 min) at the end: {os.getloadavg()[0]:.2f} on {os.cpu_count()} CPUs")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))


# export ----------------------------------------------------------------------------------------------------------

EXPORT_FORMATS = ("int8", "int8-dynamic", "int4", "gguf-f16", "gguf-q8_0", "gguf-q4_k_m")


def _export_recipe(args: argparse.Namespace, out: Path, qat: bool) -> Path:
    import yaml

    recipe = {
        "model": {"name_or_path": args.model, "dtype": "float32"},
        "method": "full",
        "data": {"train": str(Path(args.data_dir) / "alpaca_en_demo.json"), "format": "alpaca", "val_split": 0.1,
                 "max_seq_len": args.max_seq_len, "packing": False},
        "train": {"max_steps": args.steps, "micro_batch_size": 8, "grad_accum": 1, "lr": args.lr,
                  "scheduler": "cosine", "warmup_ratio": 0.05, "gradient_checkpointing": False, "seed": 42,
                  "eval_every": args.steps, "save_every": None, "log_every": 10,
                  **({"qat": "int8-dynamic-act-int4-weight"} if qat else {})},
        "output_dir": str(out / ("run-qat" if qat else "run-ptq")),
    }
    path = out / ("qat.yaml" if qat else "ptq.yaml")
    path.write_text(yaml.safe_dump(recipe))
    return path


def bench_export(args: argparse.Namespace) -> None:
    from ft_cli.errors import FtExit
    from ft_cli.export import export_run
    from ft_cli.train import train_from_recipe

    out = Path(args.out or tempfile.mkdtemp(prefix="ft-bench-export-"))
    out.mkdir(parents=True, exist_ok=True)
    flags = {"max_ppl_increase": "1000%", "eval_rows": args.eval_rows, "bench_tokens": args.bench_tokens}
    runs, reports = {}, {}
    for qat in (False, True):
        name = "qat" if qat else "ptq"
        t0 = time.time()
        runs[name] = Path(train_from_recipe(_export_recipe(args, out, qat), [], overwrite=True))
        print(f"[bench] trained {name} in {time.time() - t0:.0f}s", flush=True)
        reports[name] = {"int8-dynamic-int4": export_run(runs[name], out / f"{name}-int8-dynamic-int4",
                                                         "int8-dynamic-int4", overwrite=True, **flags)}
    for fmt in [f for f in args.formats.split(",") if f]:
        try:
            reports["ptq"][fmt] = export_run(runs["ptq"], out / f"ptq-{fmt}", fmt, overwrite=True, **flags)
        except FtExit as exc:  # e.g. llama-cpp-python missing for gguf-q4_k_m: say so, measure the rest
            print(f"[bench] {fmt}: skipped: {exc.message}", flush=True)

    print("\n== QAT vs post-training quantization (int8-dynamic-int4, eval perplexity vs each run's 16-bit merge)")
    gaps = {}
    for name in ("ptq", "qat"):
        q = reports[name]["int8-dynamic-int4"]["quality"]
        gaps[name] = q["ppl_increase_pct"]
        print(f"{name}: 16-bit {q['reference']['perplexity']:.3f} -> int4 {q['export']['perplexity']:.3f} "
              f"({q['ppl_increase_pct']:+.2f}%)")
    print(f"QAT's perplexity gap / PTQ's: {gaps['qat'] / gaps['ptq']:.2f}" if gaps["ptq"] else "PTQ gap is 0")
    print("\n== formats (PTQ run; vs its 16-bit merge)")
    print(f"{'format':<18} {'weights':>10} {'ratio':>6} {'ppl':>9} {'d ppl':>8} {'tok/s 16b':>10} {'tok/s':>8} "
          f"{'mem 16b':>9} {'mem':>9}")
    for fmt, r in reports["ptq"].items():
        q, sp = r["quality"], r["speed"]
        ref, exp = sp["reference"], sp.get("export") or {}
        print(f"{fmt:<18} {r['weights_bytes'] / 2**20:>8.1f}Mi {r['size_ratio']:>6.2f} "
              f"{q['export']['perplexity']:>9.3f} {q['ppl_increase_pct']:>+7.2f}% {ref['tokens_per_second']:>10.1f} "
              f"{exp.get('tokens_per_second', float('nan')):>8.1f} {ref['model_memory_bytes'] / 2**20:>7.0f}Mi "
              f"{exp.get('model_memory_bytes', float('nan')) / 2**20:>7.0f}Mi")
    if args.json:
        Path(args.json).write_text(json.dumps({"args": vars(args) | {"func": None}, "reports": reports},
                                              indent=2, default=str))


def _train_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--steps", type=int, default=8, help="optimizer steps of the unpacked runs")
    p.add_argument("--packed-steps", type=int, default=4, help="optimizer steps of the packed runs")
    p.add_argument("--max-seq-len", type=int, default=1024)
    p.add_argument("--micro-batch", type=int, default=4)
    p.add_argument("--grad-accum", type=int, default=2)
    p.add_argument("--data-dir", default=str(ROOT.parent / "shared" / "data"))
    p.add_argument("--model", default=TRAIN_MODEL, help="a built-in model (builtin:tiny-llama for a quick check)")
    p.add_argument("--json", default=None, help="write the numbers here")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("data", help="data pipeline vs a per-example apply_chat_template map; packing")
    p.add_argument("--rows", type=int, default=50_000)
    p.add_argument("--pack-rows", type=int, default=100_000)
    p.add_argument("--repeat", type=int, default=1, help="interleaved runs per variant; best and ratio spread shown")
    p.add_argument("--variants", default=",".join(DATA_VARIANTS), help=f"of {','.join(DATA_VARIANTS)}; ft always")
    p.add_argument("--data-dir", default=str(ROOT.parent / "shared" / "data"))
    p.set_defaults(func=bench_data)
    p = sub.add_parser("train", help="ft vs HF Trainer + peft: tokens/s, padding waste, overhead, loss parity")
    _train_args(p)
    p.add_argument("--repeat", type=int, default=1, help="interleaved runs per variant; the best is reported")
    p.add_argument("--warmup", type=int, default=1, help="optimizer steps left out of the timings")
    p.add_argument("--variants", default=",".join(TRAIN_VARIANTS))
    p.set_defaults(func=bench_train)
    p = sub.add_parser("export", help="QAT vs post-training int4; size / quality / speed of every export format")
    p.add_argument("--model", default=TRAIN_MODEL)
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--lr", type=float, default=5e-4)
    p.add_argument("--max-seq-len", type=int, default=256)
    p.add_argument("--eval-rows", type=int, default=100)
    p.add_argument("--bench-tokens", type=int, default=32)
    p.add_argument("--formats", default=",".join(EXPORT_FORMATS), help="exports of the PTQ run (comma-separated)")
    p.add_argument("--data-dir", default=str(ROOT.parent / "shared" / "data"))
    p.add_argument("--out", default=None, help="keep the runs and exports here (default: a temporary directory)")
    p.add_argument("--json", default=None, help="write the numbers here")
    p.set_defaults(func=bench_export)
    add_gpu_parser(sub)  # scripts/bench_gpu.py
    add_serve_parser(sub)  # scripts/bench_serve.py
    add_classify_parser(sub)  # scripts/bench_classify.py
    add_dpo_parser(sub)  # scripts/bench_dpo.py
    p = sub.add_parser("_train_one")  # internal: one run in its own process
    p.add_argument("variant", choices=TRAIN_VARIANTS)
    _train_args(p)
    p.set_defaults(func=_one_train)
    args = parser.parse_args(argv)
    args.func(args)


if __name__ == "__main__":
    main()
