"""Summarise a quickstart run and check it learned: exit 1 when the train loss did not fall (the mean of the last
three logged losses must be below 90% of the first three's) or the last eval loss is not below the first.
Used by scripts/quickstart.sh, which .ci/run runs after the suite.

    python scripts/quickstart_summary.py [RUN_DIR]      (default runs/quickstart)
"""

from __future__ import annotations

import json
import sys
from pathlib import Path


def check(run: Path) -> tuple[list[str], list[str]]:
    """(summary lines, problems); no problems means the run learned."""
    metrics = run / "metrics.jsonl"
    if not metrics.is_file():
        return [], [f"{metrics} not found: did training run?"]
    lines = [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()]
    train = [ln for ln in lines if "loss" in ln]
    evals = [ln for ln in lines if "eval_loss" in ln]
    problems: list[str] = []
    if len(train) < 6:
        return [], [f"{metrics}: {len(train)} train losses logged, expected at least 6"]
    summary = [f"train loss: {train[0]['loss']:.3f} (step {train[0]['step']}) -> {train[-1]['loss']:.3f} "
               f"(step {train[-1]['step']})"]
    first, last = (sum(ln["loss"] for ln in part) / 3 for part in (train[:3], train[-3:]))
    if not last < 0.9 * first:
        problems.append(f"the train loss did not fall: mean of the first three {first:.4f}, of the last three "
                        f"{last:.4f}")
    if evals:
        summary.append(f"eval loss:  {evals[0]['eval_loss']:.3f} (step {evals[0]['step']}) -> "
                       f"{evals[-1]['eval_loss']:.3f} (step {evals[-1]['step']})")
        if len(evals) > 1 and not evals[-1]["eval_loss"] < evals[0]["eval_loss"]:
            problems.append(f"the eval loss did not fall: {evals[0]['eval_loss']:.4f} -> {evals[-1]['eval_loss']:.4f}")
    summary.append(f"adapter:    {run / 'adapter'}  (loads with peft.PeftModel.from_pretrained)")
    return summary, problems


def main(argv: list[str]) -> int:
    run = Path(argv[0] if argv else "runs/quickstart")
    summary, problems = check(run)
    print("\n" + "\n".join(summary))
    for problem in problems:
        print(f"quickstart FAILED: {problem}", file=sys.stderr)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
