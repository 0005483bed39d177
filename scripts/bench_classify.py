"""`python scripts/bench.py classify`: ft's text classification against a hand-written HF Trainer script.

Same model (builtin:small-bert, a ~30M-parameter random BERT; or --model), same rows (the SST-2 sample:
1800 training rows and a stratified held-out 200, split by ft's stratified split), same optimizer (AdamW, lr,
linear schedule with steps/10 warm-up steps, weight decay 0), batch size, max length, seed and number of steps, full fine-tuning
in float32 on the CPU. The baseline is the script the transformers text-classification tutorial teaches:
`tokenizer(..., padding="max_length", truncation=True)` + `AutoModelForSequenceClassification` + `Trainer`; a
second baseline pads per batch (`DataCollatorWithPadding`) instead. ft trains with data.group_by_length (batches of
similar length, padded to their longest row) and predicts in batches sorted by length.

Each run is its own subprocess; runs are interleaved `--repeat` times and the best of each kept. Training time is the loop's (ft's final save of the model is left out,
as the baseline saves nothing). Printed: training
examples/s, prediction examples/s on the held-out rows (and a 2000-row pass), held-out accuracy and macro-F1, peak
RSS, and ft's ratios over each baseline. Accuracy after a few dozen steps on a random model is near chance for
both; the point is that it matches (same data, same maths), not that it is high.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data" / "sst2_train_sample.tsv"


def add_parser(sub: Any) -> None:
    p = sub.add_parser("classify", help="ft classification vs HF Trainer + AutoModelForSequenceClassification")
    p.add_argument("--model", default="builtin:small-bert")
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--max-len", type=int, default=128)
    p.add_argument("--lr", type=float, default=5e-5)
    p.add_argument("--repeat", type=int, default=1)
    p.add_argument("--data", default=str(DATA))
    p.add_argument("--json", default=None, help="Also write the results to this file.")
    p.set_defaults(func=bench_classify)
    one = sub.add_parser("_classify_one")  # internal: one run in its own process
    one.add_argument("which")
    one.add_argument("args_json")
    one.set_defaults(func=_one)


def _rows(data: str) -> tuple[list[tuple[str, int]], list[tuple[str, int]]]:
    """(train, held-out) rows: the SST-2 TSV read with quoting off; held out: ft's stratified 10%."""
    import numpy as np

    from ft_cli.tasks.classification import stratified_split

    lines = Path(data).read_text(encoding="utf-8").splitlines()[1:]
    rows = [(line.rsplit("\t", 1)[0], int(line.rsplit("\t", 1)[1])) for line in lines if line.strip()]
    keep, held = stratified_split(np.array([r[1] for r in rows]), 0.1, seed=42)
    return [rows[i] for i in keep], [rows[i] for i in held]


def _model_path(name: str) -> str:
    from ft_cli.builtin_models import is_builtin, resolve_builtin

    return str(resolve_builtin(name)) if is_builtin(name) else name


def _peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _one(args: argparse.Namespace) -> None:
    cfg = json.loads(args.args_json)
    out = {"ft": _run_ft, "trainer": _run_trainer, "trainer-dynamic": _run_trainer}[args.which](cfg, args.which)
    out["peak_rss_mib"] = round(_peak_rss_mib(), 1)
    print("RESULT " + json.dumps(out))


def _metrics(true: list[int], pred: list[int]) -> dict[str, float]:
    from ft_cli.tasks.metrics import classification_metrics, confusion_matrix

    m = classification_metrics(confusion_matrix(true, pred, 2), ["negative", "positive"])
    return {"accuracy": m["accuracy"], "f1_macro": m["f1_macro"]}


def _run_ft(cfg: dict[str, Any], _: str) -> dict[str, Any]:
    import yaml

    from ft_cli.recipe import load_recipe
    from ft_cli.tasks.classify_loss import make_collator, predict_batches
    from ft_cli.tasks.classify_run import classification_target, load_classifier
    from ft_cli.train import fit, setup

    train, held = _rows(cfg["data"])
    tmp = Path(cfg["tmp"])
    for name, rows in (("train.tsv", train), ("held.tsv", held)):
        (tmp / name).write_text("sentence\tlabel\n" + "".join(f"{t}\t{y}\n" for t, y in rows), encoding="utf-8")
    recipe = {
        "task": "classification", "model": {"name_or_path": cfg["model"], "dtype": "float32"}, "method": "full",
        "data": {"train": str(tmp / "train.tsv"), "columns": {"text": "sentence"}, "val_split": 0.0,
                 "max_seq_len": cfg["max_len"], "group_by_length": True, "cache": False},
        "train": {"max_steps": cfg["steps"], "micro_batch_size": cfg["batch"], "grad_accum": 1, "lr": cfg["lr"],
                  "scheduler": "linear", "warmup_steps": max(1, cfg["steps"] // 10), "weight_decay": 0.0, "gradient_checkpointing": False,
                  "eval_every": None, "save_every": None, "log_every": 10, "seed": 42},
        "output_dir": str(tmp / "run"),
    }
    path = tmp / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    session = setup(load_recipe(path), path, resume=False, overwrite=True)
    run = fit(session)
    # Training time from ft's own metrics.jsonl (seconds per step over each logged window): writing the trained model
    # at the end is not training, and the Trainer baseline saves nothing.
    lines = [json.loads(ln) for ln in (run / "metrics.jsonl").read_text().splitlines() if '"step_time_s"' in ln]
    train_s, last = 0.0, 0
    for ln in lines:
        train_s, last = train_s + ln["step_time_s"] * (ln["step"] - last), ln["step"]
    target = classification_target(run, "final")
    model, tokenizer, labels = load_classifier(target)
    from ft_cli.tasks.classification import load_labelled_file

    result = {"train_s": train_s, "train_examples_per_s": cfg["steps"] * cfg["batch"] / train_s}
    for key, file in (("predict", tmp / "held.tsv"), ("predict_all", cfg["data"])):
        dataset, _ = load_labelled_file(file, target.recipe, tokenizer, labels)
        start = time.perf_counter()
        logits, true = predict_batches(model, dataset, make_collator(tokenizer), 64, "cpu")
        seconds = time.perf_counter() - start
        result[f"{key}_examples_per_s"] = len(true) / seconds
        if key == "predict":
            result.update(_metrics(true.tolist(), logits.argmax(-1).tolist()))
    return result


def _run_trainer(cfg: dict[str, Any], which: str) -> dict[str, Any]:
    """The tutorial script: tokenize (padded to max_length, or per batch), AutoModelForSequenceClassification,
    Trainer.train, Trainer.predict."""
    import datasets
    import numpy as np
    from transformers import (
        AutoModelForSequenceClassification,
        AutoTokenizer,
        DataCollatorWithPadding,
        Trainer,
        TrainingArguments,
    )

    train, held = _rows(cfg["data"])
    path = _model_path(cfg["model"])
    tok = AutoTokenizer.from_pretrained(path)
    dynamic = which == "trainer-dynamic"

    def encode(rows: list[tuple[str, int]]) -> datasets.Dataset:
        ds = datasets.Dataset.from_dict({"text": [t for t, _ in rows], "label": [y for _, y in rows]})
        return ds.map(lambda b: tok(b["text"], truncation=True, max_length=cfg["max_len"],
                                    padding=False if dynamic else "max_length"), batched=True)

    train_ds, held_ds = encode(train), encode(held)
    all_ds = encode(train + held)
    model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=2)
    args = TrainingArguments(output_dir=cfg["tmp"], max_steps=cfg["steps"], per_device_train_batch_size=cfg["batch"],
                             per_device_eval_batch_size=64, learning_rate=cfg["lr"], lr_scheduler_type="linear",
                             warmup_steps=max(1, cfg["steps"] // 10), weight_decay=0.0, seed=42, report_to=[], save_strategy="no",
                             logging_steps=10, use_cpu=True, dataloader_num_workers=0, disable_tqdm=True)
    trainer = Trainer(model=model, args=args, train_dataset=train_ds,
                      data_collator=DataCollatorWithPadding(tok) if dynamic else None)
    start = time.perf_counter()
    trainer.train()
    train_s = time.perf_counter() - start
    result = {"train_s": train_s, "train_examples_per_s": cfg["steps"] * cfg["batch"] / train_s}
    for key, ds in (("predict", held_ds), ("predict_all", all_ds)):
        start = time.perf_counter()
        out = trainer.predict(ds)
        seconds = time.perf_counter() - start
        result[f"{key}_examples_per_s"] = len(ds) / seconds
        if key == "predict":
            result.update(_metrics(list(out.label_ids), np.argmax(out.predictions, -1).tolist()))
    return result


def bench_classify(args: argparse.Namespace) -> None:
    if not Path(args.data).is_file():
        raise SystemExit(f"{args.data}: not found (the SST-2 sample beside the checkout, ../shared/data)")
    _model_path(args.model)  # build a built-in once, before the timed runs
    best: dict[str, dict[str, Any]] = {}
    for _ in range(args.repeat):
        for which in ("ft", "trainer", "trainer-dynamic"):
            with tempfile.TemporaryDirectory() as tmp:
                cfg = {"model": args.model, "steps": args.steps, "batch": args.batch, "max_len": args.max_len,
                       "lr": args.lr, "data": args.data, "tmp": tmp}
                done = subprocess.run([sys.executable, str(ROOT / "scripts" / "bench.py"), "_classify_one", which,
                                       json.dumps(cfg)], capture_output=True, text=True,
                                      env={**os.environ, "TOKENIZERS_PARALLELISM": "false"})
                line = next((x for x in done.stdout.splitlines() if x.startswith("RESULT ")), None)
                if done.returncode or line is None:
                    raise SystemExit(f"{which} failed:\n{done.stderr[-3000:]}")
                result = json.loads(line[len("RESULT "):])
                if which not in best or result["train_examples_per_s"] > best[which]["train_examples_per_s"]:
                    best[which] = result
    print(f"classification: {args.model}, full fine-tune, {args.steps} steps x batch {args.batch}, max_len "
          f"{args.max_len}, CPU float32; held-out: 200 rows of the SST-2 sample (best of {args.repeat})")
    keys = [("train_examples_per_s", "train examples/s"), ("predict_examples_per_s", "predict examples/s (200)"),
            ("predict_all_examples_per_s", "predict examples/s (2000)"), ("accuracy", "held-out accuracy"),
            ("f1_macro", "held-out macro-F1"), ("peak_rss_mib", "peak RSS MiB")]
    print(f"{'':28}" + "".join(f"{w:>18}" for w in best))
    for key, label in keys:
        print(f"{label:28}" + "".join(f"{best[w][key]:>18,.3f}" for w in best))
    for base in ("trainer", "trainer-dynamic"):
        ratios = {k: best["ft"][k] / best[base][k] for k in ("train_examples_per_s", "predict_examples_per_s",
                                                              "predict_all_examples_per_s")}
        print(f"ft / {base}: training {ratios['train_examples_per_s']:.2f}x, prediction "
              f"{ratios['predict_examples_per_s']:.2f}x (200 rows), {ratios['predict_all_examples_per_s']:.2f}x "
              f"(2000 rows); accuracy {best['ft']['accuracy'] - best[base]['accuracy']:+.3f}")
    if args.json:
        Path(args.json).write_text(json.dumps(best, indent=2) + "\n")
