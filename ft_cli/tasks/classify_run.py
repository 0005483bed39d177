"""`ft eval` and `ft predict` for classification runs (recipe `task: classification`).

ft eval writes eval.json (or eval-NAME.json) with accuracy, macro/micro/weighted F1, macro precision/recall,
per-class precision/recall/F1/support, the confusion matrix and the mean cross-entropy (`loss`); `--fail-if`
takes any of the scalar metrics; `--compare-base` adds the same metrics of the base model with its untrained head
(the floor a fine-tune must beat). ft predict writes one JSON line per input record: the predicted label, its
probability and every label's probability, in input order; batches are grouped by length (no padding to
max_seq_len) and it reports examples/s and peak memory.
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from ft_cli.errors import UserError
from ft_cli.tasks.classification import load_labelled_file
from ft_cli.tasks.classify_head import Head, run_labels
from ft_cli.tasks.classify_loss import log_softmax, make_collator, predict_batches, probabilities
from ft_cli.tasks.metrics import SCALAR_METRICS, classification_metrics, confusion_matrix

EVAL_METRICS = ("loss", "examples", *SCALAR_METRICS)


def classification_target(path: str | Path, which: str) -> Any:
    """The run target when PATH is a classification run (or its adapter/best/model directory); else None."""
    from ft_cli.loading import resolve_target

    p = Path(path).expanduser()
    if not p.is_dir():
        return None
    target = resolve_target(p, which)  # type: ignore[arg-type]
    if target.kind == "run" and target.recipe is not None and target.recipe.task == "classification":
        return target
    return None


def load_classifier(target: Any, *, device: Any = "cpu", base_only: bool = False) -> tuple[Any, Any, list[str]]:
    """(model, tokenizer, labels) of a classification run, in eval mode: the saved whole model (full, freeze), or
    the base (quantized as in training) with the adapter and its trained head on it; `base_only`: the base model
    with the untrained head its seed gave it (ft eval --compare-base)."""
    from transformers import AutoModelForSequenceClassification

    import ft_cli
    from ft_cli.loading import load_run_tokenizer, run_base_path
    from ft_cli.model import load_base_model, torch_dtype

    recipe = target.recipe
    labels = run_labels(target.output)
    tokenizer = load_run_tokenizer(recipe, target.output)
    if recipe.spec.whole_model and not base_only:
        model = AutoModelForSequenceClassification.from_pretrained(
            str(target.output), dtype=torch_dtype(recipe.model.dtype),
            trust_remote_code=recipe.model.trust_remote_code)
        model.to(device)
    else:
        import torch

        torch.manual_seed(recipe.train.seed)  # the untrained head of --compare-base: as training started
        model = load_base_model(recipe, run_base_path(target), device=device,
                                head=Head(labels, tokenizer.pad_token_id))
        if not base_only:
            model = ft_cli.load_adapter(model, target.output)
        if not recipe.quantized:
            model.to(device)
    model.eval()
    return model, tokenizer, labels


def _dataset(target: Any, tokenizer: Any, labels: list[str], data: Path | None, split: str) -> tuple[Any, str]:
    recipe = target.recipe
    if data is not None:
        dataset, _ = load_labelled_file(data, recipe, tokenizer, labels)
        return dataset, str(data)
    from ft_cli.tasks.classification import build_datasets

    bundle = build_datasets(recipe, tokenizer)
    if bundle.labels != labels:
        raise UserError(f"{target.path}: the run's data now has the labels {bundle.labels}, but the run was trained "
                        f"on {labels}; evaluate it on a file with --data")
    dataset = bundle.eval if split == "eval" else bundle.train
    if dataset is None:
        raise UserError(f"{target.path}: the run has no eval split (data.eval is null and val_split 0); pass --data "
                        "FILE or --split train")
    return dataset, f"{split} split of {', '.join(s.path for s in recipe.data.sources)}"


def score(model: Any, dataset: Any, tokenizer: Any, labels: list[str], batch_size: int, device: Any) -> dict[str, Any]:
    logits, true = predict_batches(model, dataset, make_collator(tokenizer), batch_size, device)
    metrics = classification_metrics(confusion_matrix(true, logits.argmax(-1), len(labels)), labels)
    loss = float(-log_softmax(logits)[np.arange(len(true)), true].mean())
    return {"loss": loss, "examples": len(true), **metrics}


def evaluate_classification(target: Any, *, data: Path | None, split: str, which: str, compare_base: bool,
                            fail_if: Sequence[str], batch_size: int, name: str | None, output: Path | None) -> int:
    from ft_cli.eval_results import finish, parse_thresholds, result_path
    from ft_cli.loading import default_device
    from ft_cli.run_dir import RunDir

    allowed = list(EVAL_METRICS) + ([f"{p}_{m}" for m in ("loss", *SCALAR_METRICS) for p in ("base", "delta")]
                                    if compare_base else [])
    thresholds = parse_thresholds(fail_if, allowed)
    device = default_device()
    model, tokenizer, labels = load_classifier(target, device=device)
    dataset, source = _dataset(target, tokenizer, labels, data, split)
    result: dict[str, Any] = {"run_dir": str(target.path), "model": str(target.output), "which": which,
                              "method": target.recipe.method, "task": "classification", "data": source,
                              "split": None if data is not None else split}
    result.update(score(model, dataset, tokenizer, labels, batch_size, device))
    if compare_base:
        del model
        base, _, _ = load_classifier(target, device=device, base_only=True)
        scored = score(base, dataset, tokenizer, labels, batch_size, device)
        for metric in ("loss", *SCALAR_METRICS):
            result[f"base_{metric}"] = scored[metric]
            result[f"delta_{metric}"] = result[metric] - scored[metric]
    path = output or result_path(RunDir(target.path), data=data, split=split, which=which, name=name)
    return finish(result, thresholds, path, printer=print_result)


def print_result(result: dict[str, Any], path: Path) -> None:
    from rich.console import Console
    from rich.table import Table

    from ft_cli.eval_results import metric_table

    console = Console(highlight=False)
    console.print(metric_table(
        f"ft eval: {result['model']} on {result['data']} ({result['examples']:,} examples)", result,
        ("accuracy", "f1_macro", "f1_micro", "f1_weighted", "precision_macro", "recall_macro", "loss"),
        compared="base_accuracy" in result, base="base (untrained head)", delta="delta"))
    per = Table(title="per class")
    for col in ("label", "precision", "recall", "f1", "support"):
        per.add_column(col, justify="left" if col == "label" else "right")
    for label, m in result["per_class"].items():
        per.add_row(label, f"{m['precision']:.4f}", f"{m['recall']:.4f}", f"{m['f1']:.4f}", f"{m['support']:,}")
    console.print(per)
    console.print(confusion_text(result["confusion_matrix"]), markup=False)
    console.print(f"wrote {path}")


def confusion_text(cm: dict[str, Any]) -> str:
    """The confusion matrix as a text table: rows true labels, columns predicted."""
    labels, counts = cm["labels"], cm["counts"]
    width = max(6, *(len(x) for x in labels), *(len(f"{c:,}") for row in counts for c in row))
    lines = ["confusion matrix (rows: true label, columns: predicted)",
             " " * (width + 2) + " ".join(f"{x:>{width}}" for x in labels)]
    for label, row in zip(labels, counts, strict=True):
        lines.append(f"{label:>{width}}  " + " ".join(f"{c:>{width},}" for c in row))
    return "\n".join(lines)


# ft predict ---------------------------------------------------------------------------------------------------

def predict(run_dir: str | Path, *, data: Path, out: Path, which: str = "final", batch_size: int = 32,
            overwrite: bool = False) -> dict[str, Any]:
    """Classify every record of `data` and write `out` (JSON lines: index, label, score, probabilities, and the
    true label when the file has one); returns the summary (examples, examples/s, peak memory)."""
    import torch

    from ft_cli.atomic import write_text_atomic
    from ft_cli.loading import default_device
    from ft_cli.progress import CountProgress

    target = classification_target(run_dir, which)
    if target is None:
        raise UserError(f"{run_dir}: not a classification run (recipe task: classification); ft predict labels text")
    out = Path(out).expanduser()
    if out.exists() and not overwrite:
        raise UserError(f"--out: {out} exists; pass --overwrite to replace it")
    if out.is_dir():
        raise UserError(f"--out: {out} is a directory; give a file name such as {out}/preds.jsonl")
    if not Path(data).expanduser().exists():
        raise UserError(f"--data: {data} not found")
    device = default_device()
    model, tokenizer, labels = load_classifier(target, device=device)
    dataset, rows = load_labelled_file(data, target.recipe, tokenizer, labels, need_labels=False)
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    progress = CountProgress(len(dataset), "predicting (examples)")
    start = time.perf_counter()
    try:
        logits, _ = predict_batches(model, dataset, make_collator(tokenizer), batch_size, device,
                                    on_batch=progress.advance)
    finally:
        progress.close()
    seconds = time.perf_counter() - start
    probs = probabilities(logits)
    lines = []
    for row, p in zip(rows, probs, strict=True):
        k = int(p.argmax())
        record: dict[str, Any] = {"record": row.origin.index, "label": labels[k], "score": round(float(p[k]), 6),
                                  "probabilities": {name: round(float(x), 6) for name, x in zip(labels, p,
                                                                                                  strict=True)}}
        if row.label != -1:
            record["true_label"] = labels[row.label] if isinstance(row.label, int) and 0 <= row.label < len(labels) \
                else row.label
        lines.append(json.dumps(record, ensure_ascii=False))
    out.parent.mkdir(parents=True, exist_ok=True)
    write_text_atomic(out, "\n".join(lines) + "\n")
    summary = {"examples": len(rows), "seconds": round(seconds, 3), "examples_per_s": round(len(rows) / seconds, 1),
               "ms_per_example": round(1000 * seconds / len(rows), 3), "device": str(device),
               "peak_memory_mib": round(_peak_memory(device) / 2**20, 1), "out": str(out)}
    print(f"predicted {summary['examples']:,} examples in {seconds:.2f} s: {summary['examples_per_s']:,} examples/s "
          f"({summary['ms_per_example']} ms each), peak memory {summary['peak_memory_mib']:,} MiB "
          f"({'GPU' if device == 'cuda' else 'process RSS'}); wrote {out}", file=sys.stderr)
    return summary


def _peak_memory(device: Any) -> int:
    """Peak bytes: CUDA's allocator peak on a GPU, the process's peak resident set on the CPU."""
    if str(device).startswith("cuda"):
        import torch

        return int(torch.cuda.max_memory_allocated())
    import resource

    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024  # Linux reports KiB


# ft merge -----------------------------------------------------------------------------------------------------

def merge_classifier(target: Any, out_dir: Any, out_dtype: str, *, force: bool = False) -> dict[str, Any]:
    """ft merge for a classification run, into `out_dir` (ft_cli.run_dir.OutputDir): the adapter and its trained
    head folded into an unquantized copy of the base, saved as a standalone AutoModelForSequenceClassification
    directory (config.json carries id2label), reloaded and compared, logit for logit, with base + adapter on the
    run's held-out rows. Returns the report (ft_cli.merge.merge_run checks the tolerance)."""
    import gc
    from dataclasses import asdict

    import torch
    from transformers import AutoModelForSequenceClassification

    from ft_cli.loading import load_run_tokenizer
    from ft_cli.merge_parity import TOLERANCE, Parity, check_plain_model, compare, merge_adapter
    from ft_cli.model import torch_dtype
    from ft_cli.tasks.classify_head import LABELS_FILE

    recipe = target.recipe
    labels = run_labels(target.output)
    tokenizer = load_run_tokenizer(recipe, target.output)
    samples = _parity_samples(recipe, tokenizer)
    collate = make_collator(tokenizer)
    compute = "float32"
    model, reference_name = _trained_classifier(target, labels, tokenizer)
    reference, _ = predict_batches(model, samples, collate, 8, "cpu")
    merged = merge_adapter(model)
    merged.to(torch_dtype(out_dtype))
    merged.config.use_cache = True
    with out_dir.writing() as tmp:
        merged.save_pretrained(tmp, max_shard_size="5GB")
        tokenizer.save_pretrained(tmp)
        (tmp / LABELS_FILE).write_text(json.dumps({"task": "classification", "labels": labels}, indent=2) + "\n")
        del merged, model
        gc.collect()
        reloaded = AutoModelForSequenceClassification.from_pretrained(str(tmp), dtype="auto")
        check_plain_model(reloaded, torch_dtype(out_dtype))
        reloaded.to(torch.float32)
        candidate, _ = predict_batches(reloaded, samples, collate, 8, "cpu")
        parity = compare([torch.from_numpy(candidate)], [torch.from_numpy(reference)], compute)
        report = {"run_dir": str(target.path), "source": str(target.output), "method": recipe.method,
                  "task": "classification", "labels": labels, "base_model": recipe.model.name_or_path,
                  "dtype": out_dtype, "tolerance": TOLERANCE[out_dtype], "reference": reference_name,
                  "parity": asdict(parity)}
        report["parity"]["samples"] = len(samples)
        ok = parity.relative_mean_diff <= TOLERANCE[out_dtype]
        report["parity_ok"] = ok
        print(f"parity, merged vs {reference_name}, on {len(samples)} held-out rows: {Parity(**report['parity']).line()}"
              f"; tolerance {TOLERANCE[out_dtype]:g} relative -> {'OK' if ok else 'FAILED'}", flush=True)
        if not ok and not force:
            from ft_cli.errors import CheckFailed

            raise CheckFailed(f"merge refused: merged logits differ from {reference_name} by "
                              f"{parity.relative_mean_diff:.3g} relative (tolerance {TOLERANCE[out_dtype]:g} for "
                              f"{out_dtype}); nothing was written. Use --force to write it anyway")
        (tmp / "merge_report.json").write_text(json.dumps(report, indent=2) + "\n")
    return report


def _parity_samples(recipe: Any, tokenizer: Any) -> Any:
    """Up to 8 rows of the run's held-out split (its training split without one) for the merge's parity check."""
    from ft_cli.tasks.classification import build_datasets

    try:
        bundle = build_datasets(recipe, tokenizer)
        rows = bundle.eval if bundle.eval is not None else bundle.train
        return rows.select(range(min(8, len(rows))))
    except UserError as exc:  # the training data moved away: a few fixed texts
        print(f"parity samples: the run's data is unavailable ({exc.message.splitlines()[0]}); using fixed texts")
        import datasets

        texts = ["a gripping , beautifully made film", "the service was slow and the room was dirty",
                 "it is what it is", "I would come back any time"]
        return datasets.Dataset.from_dict({"input_ids": tokenizer(texts)["input_ids"], "label": [0] * len(texts)})


def _trained_classifier(target: Any, labels: list[str], tokenizer: Any) -> tuple[Any, str]:
    """The run's classifier in float32 (a full/freeze run's model, or the adapter on an unquantized base), and
    what the merge report calls it."""
    import torch
    from transformers import AutoModelForSequenceClassification

    import ft_cli
    from ft_cli.loading import run_base_path
    from ft_cli.model import load_base_model

    recipe = target.recipe
    if recipe.spec.whole_model:
        model = AutoModelForSequenceClassification.from_pretrained(str(target.output), dtype=torch.float32)
        return model, f"the trained model in {target.output.name}/"
    torch.manual_seed(recipe.train.seed)
    base = load_base_model(recipe, run_base_path(target), quantize=False, dtype="float32",
                           head=Head(labels, tokenizer.pad_token_id))
    model = ft_cli.load_adapter(base, target.output)
    return model, f"the adapter on the unquantized {recipe.model.dtype} base (computed in float32)"


# ft report ----------------------------------------------------------------------------------------------------

METRICS_PNG = "metrics.png"
CONFUSION_PNG = "confusion.png"


def classification_report(evals: list[dict[str, Any]], eval_result: dict[str, Any] | None, out: Path,
                          labels: list[str] | None) -> list[str]:
    """ft report for a classification run: metrics.png (eval accuracy and F1s vs step) and confusion.png (the
    confusion matrix of eval.json, else of the last evaluation during training); returns summary.md's section."""
    from matplotlib.figure import Figure

    points = [r for r in evals if "eval_accuracy" in r]
    md: list[str] = []
    if points:
        fig = Figure(figsize=(8, 4), dpi=110)
        ax = fig.add_subplot()
        for key in ("eval_accuracy", "eval_f1_macro", "eval_f1_micro", "eval_f1_weighted"):
            ax.plot([r["step"] for r in points], [r[key] for r in points], marker="o", ms=3,
                    label=key.removeprefix("eval_"))
        ax.set_xlabel("step")
        ax.set_ylim(0, 1.02)
        ax.grid(alpha=0.3)
        ax.legend(loc="lower right")
        ax.set_title("evaluation during training")
        fig.tight_layout()
        fig.savefig(out / METRICS_PNG, format="png")
        print(f"wrote {out / METRICS_PNG}")
        md += ["## Classification metrics", "", f"![accuracy and F1 during training]({METRICS_PNG})", ""]
    if eval_result is not None and "confusion_matrix" in eval_result:
        cm, source = eval_result["confusion_matrix"], "eval.json"
    elif points and labels:
        cm, source = {"labels": labels, "counts": points[-1]["eval_confusion_matrix"]}, \
            f"the evaluation at step {points[-1]['step']}"
    else:
        return md
    fig = Figure(figsize=(max(4.5, 1.6 + 0.9 * len(cm["labels"])), 1.4 + 0.9 * len(cm["labels"])), dpi=110)
    ax = fig.add_subplot()
    counts = np.asarray(cm["counts"])
    ax.imshow(counts, cmap="Blues")
    ticks = range(len(cm["labels"]))
    ax.set_xticks(ticks, cm["labels"], rotation=45, ha="right")
    ax.set_yticks(ticks, cm["labels"])
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    for i in ticks:
        for j in ticks:
            ax.text(j, i, f"{counts[i, j]:,}", ha="center", va="center",
                    color="white" if counts[i, j] > counts.max() / 2 else "black")
    ax.set_title(f"confusion matrix\n({source})", fontsize=9)
    fig.tight_layout()
    fig.savefig(out / CONFUSION_PNG, format="png")
    print(f"wrote {out / CONFUSION_PNG}")
    header = ["true \\ predicted", *cm["labels"]]
    rows = [[label, *(f"{c:,}" for c in row)] for label, row in zip(cm["labels"], counts.tolist(), strict=True)]
    md += [f"### Confusion matrix ({source})", "", f"![confusion matrix]({CONFUSION_PNG})", "",
           "| " + " | ".join(header) + " |", "|" + "---|" * len(header),
           *("| " + " | ".join(r) + " |" for r in rows), ""]
    return md
