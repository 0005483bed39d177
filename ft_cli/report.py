"""`ft report RUN_DIR`: plot a run's curves and summarize it, from the files the run directory already holds.

Reads metrics.jsonl (train lines: step, loss, lr, grad_norm, tokens_per_s; eval lines: step, eval_loss, ...),
recipe.yaml, run.json and eval.json when present, and writes

    RUN_DIR/report/loss.png     train and eval loss vs step (top), learning rate vs step (bottom)
    RUN_DIR/report/summary.md   recipe essentials, final and best metrics, eval.json, timings, status

Works on running, failed and interrupted runs too: it shows whatever has been logged so far. matplotlib (the
`report` extra) is imported only here, through its object-oriented API, so no global backend is changed. The
summary's Markdown is rendered by ft_cli/report_summary.py.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from ft_cli.errors import UserError
from ft_cli.report_summary import is_finite, method_name, model_name, render_summary
from ft_cli.run_dir import RunDir, write_text_atomic

REPORT_DIR = "report"
LOSS_PNG = "loss.png"
SUMMARY_MD = "summary.md"


@dataclass
class Metrics:
    train: list[dict[str, Any]] = field(default_factory=list)  # sorted by step, one line per step
    eval: list[dict[str, Any]] = field(default_factory=list)

    @property
    def best_eval(self) -> dict[str, Any] | None:
        finite = [r for r in self.eval if is_finite(r.get("eval_loss"))]
        return min(finite, key=lambda r: r["eval_loss"]) if finite else None


def write_report(run_dir: str | Path) -> Path:
    """Write RUN_DIR/report/{loss.png, summary.md}; returns the report directory."""
    run = RunDir(Path(run_dir).expanduser())
    metrics = read_metrics(run)
    _require_matplotlib()
    out = run.root / REPORT_DIR
    out.mkdir(exist_ok=True)
    recipe = _read_yaml(run.recipe)
    manifest = run.read_manifest()
    eval_result = _read_json(run.eval_json)
    title = run.root.resolve().name
    if recipe or manifest:
        title += f": {Path(model_name(recipe, manifest)).name} ({method_name(recipe, manifest)})"
    plot_curves(metrics, out / LOSS_PNG, title=title, resumed_at=resume_steps(manifest))
    summary = render_summary(run, metrics, recipe, manifest, eval_result)
    if recipe.get("task") == "classification":  # accuracy/F1 curves and the confusion matrix (ft_cli.tasks)
        from ft_cli.tasks.classify_head import LABELS_FILE
        from ft_cli.tasks.classify_run import classification_report

        saved = [run.root / d / LABELS_FILE for d in ("best", "adapter", "model")]
        labels = next((json.loads(p.read_text())["labels"] for p in saved if p.is_file()), None)
        section = classification_report(metrics.eval, eval_result, out, labels)
        summary = summary.replace("## Timing", "\n".join(section) + "\n## Timing", 1) if section else summary
    write_text_atomic(out / SUMMARY_MD, summary)
    print(f"wrote {out / LOSS_PNG}")
    print(f"wrote {out / SUMMARY_MD}")
    return out


# Reading ---------------------------------------------------------------------------------------------------------

def read_metrics(run: RunDir) -> Metrics:
    """Train and eval lines of metrics.jsonl, sorted by step (the last line wins when a step repeats)."""
    root = run.root
    if not root.is_dir():
        raise UserError(f"{root}: no such run directory")
    if not run.metrics.is_file():
        what = "an ft run directory" if run.recipe.is_file() or run.manifest.is_file() else "not an ft run directory"
        raise UserError(f"{root}: no metrics.jsonl ({what}; ft train writes metrics.jsonl from its first logged step)")
    lines = run.metrics.read_text(encoding="utf-8").splitlines()
    train: dict[int, dict[str, Any]] = {}
    evals: dict[int, dict[str, Any]] = {}
    for i, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except ValueError:
            if i == len(lines):  # a run killed mid-write can leave a partial last line: ignore it
                continue
            raise UserError(f"{run.metrics}:{i}: not a JSON object; metrics.jsonl holds one JSON object per line") from None
        if not isinstance(record, dict) or not isinstance(record.get("step"), int):
            raise UserError(f"{run.metrics}:{i}: expected a JSON object with an integer 'step'")
        if "loss" in record:
            train[record["step"]] = record
        if "eval_loss" in record:
            evals[record["step"]] = record
    if not train and not evals:
        raise UserError(f"{run.metrics}: no train or eval lines yet (the run has not logged a step); nothing to report")
    return Metrics(train=[train[s] for s in sorted(train)], eval=[evals[s] for s in sorted(evals)])


def _read_yaml(path: Path) -> dict[str, Any]:
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError):
        return {}
    return data if isinstance(data, dict) else {}


def _read_json(path: Path) -> dict[str, Any] | None:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def _require_matplotlib() -> None:
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise UserError("ft report draws its plots with matplotlib, which is not installed: "
                        "pip install 'ft-cli[report]'") from None


# Plots -----------------------------------------------------------------------------------------------------------

def resume_steps(manifest: dict[str, Any]) -> list[int]:
    """The steps a run was resumed from (run.json "resumes"; older runs recorded only the last one)."""
    steps = [r.get("step") for r in manifest.get("resumes") or [] if isinstance(r, dict)]
    if not steps and manifest.get("resumed_from_step") is not None:
        steps = [manifest["resumed_from_step"]]
    return sorted({s for s in steps if isinstance(s, int)})


def _marker(n: int) -> str:
    """Points are drawn as markers when there are few (one point with no marker draws nothing)."""
    return "o" if n == 1 else "." if n <= 40 else ""


def plot_curves(metrics: Metrics, path: Path, title: str = "", resumed_at: list[int] | None = None) -> Any:
    """One PNG, two panels sharing the step axis: loss (train, smoothed train, eval, best eval) and learning rate,
    with a dashed line where the run was resumed. Returns the matplotlib Figure."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    preference = any("reward_margin" in r for r in metrics.train)  # objective dpo / orpo / simpo
    fig = Figure(figsize=(9, 9.5 if preference else 7), dpi=110, layout="constrained")
    FigureCanvasAgg(fig)
    if preference:
        loss_ax, reward_ax, lr_ax = fig.subplots(3, 1, sharex=True, height_ratios=[3, 2, 1.4])
        _plot_rewards(reward_ax, metrics)
    else:
        loss_ax, lr_ax = fig.subplots(2, 1, sharex=True, height_ratios=[3, 1.4])

    steps = [r["step"] for r in metrics.train if is_finite(r.get("loss"))]
    losses = [r["loss"] for r in metrics.train if is_finite(r.get("loss"))]
    if steps:
        smooth = len(steps) >= 20
        loss_ax.plot(steps, losses, color="tab:blue", lw=1, alpha=0.35 if smooth else 1.0,
                     marker=_marker(len(steps)), label="train loss")
        if smooth:
            loss_ax.plot(steps, _ema(losses, alpha=2 / (1 + max(5, len(steps) // 20))), color="tab:blue", lw=2,
                         label="train loss (smoothed)")
    eval_points = [(r["step"], r["eval_loss"]) for r in metrics.eval if is_finite(r.get("eval_loss"))]
    if eval_points:
        loss_ax.plot(*zip(*eval_points, strict=True), color="tab:orange", lw=2, marker="o", ms=5, label="eval loss")
        best = metrics.best_eval
        assert best is not None
        loss_ax.plot([best["step"]], [best["eval_loss"]], marker="*", ms=16, color="tab:red", ls="",
                     label=f"best eval {best['eval_loss']:.4f} (step {best['step']})")
    for i, step in enumerate(resumed_at or []):
        for ax in (loss_ax, lr_ax):
            ax.axvline(step, color="tab:gray", ls="--", lw=1, label=None if ax is lr_ax or i else "resumed")
    loss_ax.set_ylabel("loss (per pair)" if preference else "loss (per trained token)")
    loss_ax.grid(alpha=0.3)
    loss_ax.legend(loc="best")
    if title:
        loss_ax.set_title(title)

    lr_points = [(r["step"], r["lr"]) for r in metrics.train if is_finite(r.get("lr"))]
    if lr_points:
        lr_ax.plot(*zip(*lr_points, strict=True), color="tab:green", lw=1.5, marker=_marker(len(lr_points)))
    else:
        lr_ax.text(0.5, 0.5, "no learning rate logged", ha="center", va="center", transform=lr_ax.transAxes)
    lr_ax.set_ylabel("learning rate")
    lr_ax.set_xlabel("optimizer step")
    lr_ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    lr_ax.ticklabel_format(axis="y", style="sci", scilimits=(-2, 3))
    lr_ax.grid(alpha=0.3)
    fig.savefig(path, format="png")
    return fig


def _ema(values: list[float], alpha: float) -> list[float]:
    out, acc = [], values[0]
    for v in values:
        acc = alpha * v + (1 - alpha) * acc
        out.append(acc)
    return out


def _plot_rewards(ax: Any, metrics: Metrics) -> None:
    """Preference runs: the reward margin (chosen - rejected) in training and evaluation, and the fraction of pairs
    whose chosen reply gets the higher reward (right axis)."""
    for rows, key, prefix, color in ((metrics.train, "reward_margin", "", "tab:purple"),
                                     (metrics.eval, "eval_reward_margin", "eval ", "tab:orange")):
        points = [(r["step"], r[key]) for r in rows if is_finite(r.get(key))]
        if points:
            ax.plot(*zip(*points, strict=True), color=color, lw=1.5, marker="o" if prefix else _marker(len(points)),
                    ms=4, label=f"{prefix}reward margin")
    ax.set_ylabel("reward margin")
    ax.grid(alpha=0.3)
    acc_ax = ax.twinx()
    for rows, key, prefix, style in ((metrics.train, "reward_accuracy", "", ":"),
                                     (metrics.eval, "eval_reward_accuracy", "eval ", "--")):
        points = [(r["step"], r[key]) for r in rows if is_finite(r.get(key))]
        if points:
            acc_ax.plot(*zip(*points, strict=True), color="tab:gray", ls=style, lw=1.2, label=f"{prefix}accuracy")
    acc_ax.set_ylim(-0.02, 1.02)
    acc_ax.set_ylabel("reward accuracy")
    lines = ax.get_legend_handles_labels()[0] + acc_ax.get_legend_handles_labels()[0]
    labels = ax.get_legend_handles_labels()[1] + acc_ax.get_legend_handles_labels()[1]
    if lines:
        ax.legend(lines, labels, loc="best")
