"""What `ft eval` writes and prints: the result file (which one, when), the table, and the --fail-if verdict."""

from __future__ import annotations

import operator
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ft_cli.errors import CheckFailed, UserError
from ft_cli.metrics_text import GENERATION_METRICS
from ft_cli.run_dir import RunDir, now_iso, write_text_atomic


def result_path(run: RunDir, *, data: Path | None, split: str, which: str, name: str | None) -> Path:
    """RUN_DIR/eval.json for the default evaluation (the run's eval split, final weights), as before; every other
    evaluation gets its own RUN_DIR/eval-<name>.json so none overwrites another: <name> is --name, else the --data
    file's name or the split, with -best for --which best."""
    if name is None:
        if data is None and split == "eval" and which == "final":
            return run.eval_json
        parts = [Path(data).name.split(".")[0] if data is not None else split if split != "eval" else "",
                 "best" if which == "best" else ""]
        name = "-".join(p for p in parts if p)
    clean = re.sub(r"[^A-Za-z0-9_.-]+", "-", name).strip("-.") or "eval"
    return run.root / f"eval-{clean}.json"


def add_base(result: dict[str, Any], scored: dict[str, Any], base_gen: dict[str, Any] | None) -> None:
    """base_* and delta_* (run - base) for the loss, perplexity and, with --generate, each generation metric."""
    pairs = [("loss", scored["loss"]), ("perplexity", scored["perplexity"])]
    if base_gen is not None:
        pairs += [(m, base_gen[m]) for m in GENERATION_METRICS]
        for sample, base_sample in zip(result["samples"], base_gen["samples"], strict=True):
            sample["base_prediction"] = base_sample["prediction"]
    for metric, base in pairs:
        result[f"base_{metric}"] = base
        result[f"delta_{metric}"] = result[metric] - base


# --fail-if ---------------------------------------------------------------------------------------------------------

_OPS: dict[str, Callable[[float, float], bool]] = {
    ">=": operator.ge, "<=": operator.le, "==": operator.eq, ">": operator.gt, "<": operator.lt,
}
_THRESHOLD = re.compile(r"^\s*([A-Za-z_][A-Za-z0-9_]*)\s*(>=|<=|==|>|<)\s*([^\s<>=]+)\s*$")


@dataclass(frozen=True)
class Threshold:
    """`metric op value`: the check fails when the comparison is true, e.g. perplexity>12."""

    metric: str
    op: str
    value: float

    def crossed(self, actual: float) -> bool:
        return _OPS[self.op](actual, self.value)

    def __str__(self) -> str:
        return f"{self.metric}{self.op}{self.value:g}"



def parse_thresholds(specs: Sequence[str], allowed: Sequence[str]) -> list[Threshold]:
    out = []
    for spec in specs:
        m = _THRESHOLD.match(spec)
        if not m:
            raise UserError(f"--fail-if {spec!r}: expected METRIC OP NUMBER with OP one of > >= < <= ==, "
                            "e.g. 'perplexity>12'")
        name, op, raw = m.groups()
        try:
            value = float(raw)
        except ValueError:
            raise UserError(f"--fail-if {spec!r}: {raw!r} is not a number") from None
        if name not in allowed:
            hint = ""
            if name.startswith(("base_", "delta_")):
                hint = " (add --compare-base)"
            elif name in GENERATION_METRICS or name == "generated":
                hint = " (add --generate N)"
            raise UserError(f"--fail-if {spec!r}: unknown metric {name!r}{hint}; available: {', '.join(allowed)}")
        out.append(Threshold(name, op, value))
    return out


# The command -------------------------------------------------------------------------------------------------------


def finish(result: dict[str, Any], thresholds: list[Any], path: Path | None, printer: Any = None) -> int:
    """Write the result (when `path`), print it (`printer`, default print_result), apply --fail-if."""
    failed = [t for t in thresholds if t.crossed(float(result[t.metric]))]
    result.update(evaluated_at=now_iso(), fail_if=[str(t) for t in thresholds], failed=[str(t) for t in failed])
    if path is not None:
        path = Path(path).expanduser()
        if path.is_dir():
            raise UserError(f"--output: {path} is a directory; give a file name such as {path}/eval.json")
        path.parent.mkdir(parents=True, exist_ok=True)
        write_json(path, result)
    (printer or print_result)(result, path)
    if failed:
        lines = [f"  {t.metric} = {result[t.metric]:.6g} crosses {t}" for t in failed]
        raise CheckFailed("eval check failed (--fail-if):\n" + "\n".join(lines))
    return 0


# Output --------------------------------------------------------------------------------------------------------------

def write_json(path: Path, data: dict[str, Any]) -> None:
    import json

    write_text_atomic(path, json.dumps(data, indent=2, default=str) + "\n")


def metric_table(title: str, result: dict[str, Any], names: Any, *, compared: bool, base: str = "base",
                 delta: str = "delta (run - base)") -> Any:
    """A rich table of `names` from `result`: the run's value and, when `compared`, the base model's (`base_NAME`)
    and the difference (`delta_NAME`). ft eval's tables for causal LMs and classifiers."""
    from rich.table import Table

    table = Table(title=title)
    table.add_column("metric")
    table.add_column("run", justify="right")
    if compared:
        table.add_column(base, justify="right")
        table.add_column(delta, justify="right")
    for name in names:
        add_metric_row(table, result, name, compared)
    return table


def add_metric_row(table: Any, result: dict[str, Any], name: str, compared: bool, label: str | None = None) -> None:
    row = [label or name, f"{result[name]:.4f}"]
    if compared:
        row += ([f"{result['base_' + name]:.4f}", f"{result['delta_' + name]:+.4f}"] if "base_" + name in result
                else ["", ""])
    table.add_row(*row)


def print_result(result: dict[str, Any], path: Path | None) -> None:
    from rich.console import Console

    compared = "base_loss" in result
    where = result["data"] if result["split"] is None else f"{result['split']} split of {result['data']}"
    table = metric_table(f"ft eval: {result['model']} on {where}", result, ("loss", "perplexity"), compared=compared)
    for name in ("tokens", "examples"):
        table.add_row(name, f"{result[name]:,}", *([""] * 2 if compared else []))
    if "pairs" in result:  # a preference run (objective dpo / orpo / simpo)
        for name in ("pair_loss", "reward_accuracy", "reward_margin"):
            table.add_row(name, f"{result[name]:.4f}", *([""] * 2 if compared else []))
        table.add_row("pairs", f"{result['pairs']:,}", *([""] * 2 if compared else []))
    if "generated" in result:
        table.add_row("generated", str(result["generated"]), *([""] * 2 if compared else []))
        for name, scale in (("exact_match", "0-1"), ("rouge_l", "0-1"), ("bleu", "0-100"), ("chrf", "0-100")):
            add_metric_row(table, result, name, compared, f"{name} ({scale})")
    console = Console(highlight=False)
    console.print(table)  # a crossed --fail-if threshold is reported once, by the exit-3 message
    console.print(f"wrote {path}" if path is not None else
                  "not saved (a model that ft did not write); pass --output FILE to keep the result")
