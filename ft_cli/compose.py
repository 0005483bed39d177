"""`ft merge RUN_A RUN_B ... --combine linear|cat|ties|dare_ties --weights ... --out DIR`: one LoRA adapter from
several, with peft's add_weighted_adapter, and `ft eval DIR` scoring it against each input on each input's data.

What each combination does (peft computes it; ft checks its preconditions first, so a mismatch is one exit-2
message rather than a ValueError from deep inside peft):
- cat: the low-rank factors side by side; the update is exactly sum_i w_i * B_i A_i * scale_i. Ranks may differ
  (the result's rank is their sum).
- linear: A and B each averaged with weights sqrt(w_i * scale_i); not the weighted sum of the updates (the cross
  terms B_i A_j remain) unless only one weight is non-zero. Equal ranks required.
- ties / dare_ties: task arithmetic on A and B with magnitude pruning (ties) or random drop-and-rescale (dare) to
  `density`, then sign election. Equal ranks required; dare is seeded (--seed) so a combination is reproducible.
All inputs must be LoRA adapters of one method (lora or qlora, not DoRA: peft does not combine the magnitude
vectors) on the same base loaded the same way (ft_cli.adapters.check_shared_base).

The output is a run-like directory, so every ft command that takes a run takes it:
  DIR/adapter/           PEFT adapter (loads with PeftModel.from_pretrained(base, "DIR/adapter")) + tokenizer
  DIR/recipe.yaml        the first input's recipe, with lora.rank/alpha of the combined adapter
  DIR/run.json           status completed, base_model_path, and `combined`: method, weights, density, inputs
  DIR/merge_report.json  the same, plus the reload check (the saved adapter loaded back gives the same logits)
It is written to a temporary sibling and renamed into place (ft_cli.run_dir.prepare_output_dir: an existing --out
is replaced only with --overwrite, and only if it is an earlier combination ft wrote).
"""

from __future__ import annotations

import gc
import json
import os
from pathlib import Path
from typing import Any

from ft_cli.adapters import RunAdapter, check_shared_base, load_adapters, run_adapter
from ft_cli.errors import CheckFailed, UserError
from ft_cli.run_dir import RunDir, now_iso, prepare_output_dir

COMBINATIONS = ("linear", "cat", "ties", "dare_ties")
PRUNING = ("ties", "dare_ties")  # the combinations that take a density
DEFAULT_DENSITY = 0.5
COMBINED = "combined"


def parse_weights(text: str | None, n: int) -> list[float]:
    if text is None:
        return [1.0 / n] * n
    try:
        weights = [float(w) for w in text.split(",")]
    except ValueError:
        raise UserError(f"--weights {text!r}: expected comma-separated numbers, e.g. 0.6,0.4") from None
    if len(weights) != n:
        raise UserError(f"--weights {text!r}: {len(weights)} weights for {n} runs; give one per run, in order")
    if not any(weights):
        raise UserError(f"--weights {text!r}: all weights are 0")
    return weights


def plan_combine(run_dirs: list[Path], combine: str, weights: str | None,
                 density: float | None) -> tuple[list[RunAdapter], list[float], float | None]:
    """Every check that needs no model: exit 2 before anything loads."""
    if combine not in COMBINATIONS:
        raise UserError(f"--combine: must be one of {', '.join(COMBINATIONS)}, got {combine!r}")
    if len(run_dirs) < 2:
        raise UserError("--combine needs at least two run directories")
    adapters = [run_adapter(p, name=f"input{i}", what=str(p)) for i, p in enumerate(run_dirs)]
    first = adapters[0]
    for a in adapters:
        if a.recipe.method != first.recipe.method:
            raise UserError(f"{a.run} is method {a.recipe.method}, {first.run} is {first.recipe.method}; "
                            "--combine needs runs of one method")
        if a.peft_type != "LORA" or a.use_dora:
            raise UserError(f"{a.run}: method {a.recipe.method}; --combine combines LoRA adapters (methods lora, "
                            "qlora) — peft's add_weighted_adapter does not combine DoRA magnitudes or other methods")
    check_shared_base(adapters)
    ranks = [a.rank for a in adapters]
    if combine != "cat" and len(set(ranks)) > 1:
        listing = ", ".join(f"{a.run.name}: {a.rank}" for a in adapters)
        raise UserError(f"--combine {combine} needs adapters of one rank ({listing}); use --combine cat, which "
                        "concatenates adapters of any ranks")
    if density is not None and combine not in PRUNING:
        raise UserError(f"--density applies to --combine ties or dare_ties, not {combine}")
    if combine in PRUNING:
        density = DEFAULT_DENSITY if density is None else density
        if not 0 < density <= 1:
            raise UserError(f"--density: must be in (0, 1], got {density}")
    return adapters, parse_weights(weights, len(adapters)), density


def combine_runs(run_dirs: list[Path], out: Path, *, combine: str, weights: str | None = None,
                 density: float | None = None, seed: int = 0, overwrite: bool = False) -> Path:
    import torch

    from ft_cli.loading import default_device, load_base, load_run_tokenizer
    from ft_cli.recipe import dump_recipe

    adapters, w, density = plan_combine(run_dirs, combine, weights, density)
    out_dir = prepare_output_dir(out, kind="combine", overwrite=overwrite)  # before anything loads
    out = out_dir.path
    first = adapters[0]
    device = default_device()
    listing = ", ".join(f"{a.run} x {wi:g}" for a, wi in zip(adapters, w, strict=True))
    _echo(f"combining ({combine}{f', density {density:g}' if density is not None else ''}): {listing}")
    base = load_base(first.recipe, device=device, path=first.base_path)
    if not first.recipe.quantized:
        base.to(device)
    model = load_adapters(base, adapters)
    torch.manual_seed(seed)  # dare drops entries at random
    try:
        model.add_weighted_adapter([a.name for a in adapters], w, COMBINED, combination_type=combine,
                                   density=density)
    except ValueError as exc:  # peft's own checks (e.g. modules_to_save on the same module in two adapters)
        raise UserError(f"--combine {combine}: peft refused: {exc}") from None
    config = model.peft_config[COMBINED]

    try:
        with out_dir.writing() as tmp:  # renamed to --out when everything is written; removed on any failure
            model.save_pretrained(str(tmp), selected_adapters=[COMBINED])  # peft writes the adapter to tmp/NAME
            os.replace(tmp / COMBINED, tmp / "adapter")
            (tmp / "README.md").unlink(missing_ok=True)  # peft's empty model card for the parent directory
            tokenizer = load_run_tokenizer(first.recipe, first.path)
            tokenizer.save_pretrained(tmp / "adapter")
            reload = _reload_check(model, tmp / "adapter", tokenizer, device)
            if reload["max_abs_diff"] != 0.0:
                raise CheckFailed(f"the saved adapter does not reproduce the combination (max |logit diff| "
                                  f"{reload['max_abs_diff']:.3g}); nothing was written to {out}")
            recipe = first.recipe.model_copy(deep=True)
            if recipe.lora is not None:
                recipe.lora.rank, recipe.lora.alpha = int(config.r), float(config.lora_alpha)
            (tmp / "recipe.yaml").write_text(dump_recipe(recipe), encoding="utf-8")
            combined = {"combine": combine, "weights": w, "density": density, "seed": seed, "rank": int(config.r),
                        "inputs": [{"run": str(a.run), "adapter": str(a.path), "method": a.recipe.method,
                                    "rank": a.rank, "weight": wi} for a, wi in zip(adapters, w, strict=True)]}
            manifest = {"status": "completed", "kind": "combined adapter", "created_at": now_iso(),
                        "base_model": first.recipe.model.name_or_path, "base_model_path": first.base_path,
                        "method": first.recipe.method, "combined": combined}
            (tmp / "run.json").write_text(json.dumps(manifest, indent=2) + "\n")
            report = {**combined, "reload_check": reload}
            (tmp / "merge_report.json").write_text(json.dumps(report, indent=2) + "\n")
    finally:
        del model
        gc.collect()
    _echo(f"wrote {out}/adapter (rank {config.r}); the saved adapter reloads to identical logits. "
          f"Serve it with `ft serve {out}`, score it against its inputs with `ft eval {out}`")
    return out


def _reload_check(model: Any, adapter_dir: Path, tokenizer: Any, device: Any) -> dict[str, Any]:
    """Load the written adapter next to the in-memory combination and compare their logits on a prompt."""
    import torch

    from ft_cli.generation import render_prompt

    model.load_adapter(str(adapter_dir), adapter_name="reloaded", is_trainable=False, autocast_adapter_dtype=True)
    ids = torch.tensor([render_prompt(tokenizer, "Combine what you learned and answer briefly.")], device=device)
    logits = {}
    with torch.no_grad():
        for name in (COMBINED, "reloaded"):
            model.set_adapter(name)
            logits[name] = model(input_ids=ids).logits.float()
    model.set_adapter(COMBINED)
    model.delete_adapter("reloaded")
    return {"tokens": int(ids.shape[1]), "max_abs_diff": float((logits[COMBINED] - logits["reloaded"]).abs().max())}


# ft eval of a combined adapter -----------------------------------------------------------------------------------

def combined_inputs(run_dir: Path) -> dict[str, Any] | None:
    """run.json's `combined` section when RUN_DIR was written by ft merge --combine."""
    return RunDir(Path(run_dir)).read_manifest().get("combined")


def evaluate_combined_run(run_dir: Path, combined: dict[str, Any], *, split: str, batch_size: int,
                          thresholds: list[Any], compare_base: bool = False, generate: int = 0,
                          path: Path | None = None) -> int:
    """`ft eval DIR` for a combined adapter (without --data): write `path` (default eval.json), print, apply
    --fail-if."""
    from ft_cli.eval_results import write_json

    if compare_base or generate:
        raise UserError(f"{run_dir} is a combined adapter: without --data, ft eval scores it against each input on "
                        "each input's data; --compare-base and --generate need --data PATH")
    result = evaluate_combined(run_dir, combined, split=split, batch_size=batch_size)
    failed = [t for t in thresholds if t.crossed(float(result[t.metric]))]
    result.update(evaluated_at=now_iso(), fail_if=[str(t) for t in thresholds], failed=[str(t) for t in failed])
    path = path or RunDir(Path(run_dir)).eval_json
    write_json(path, result)
    print_combined(result, path)
    if failed:
        lines = [f"  {t.metric} = {result[t.metric]:.6g} crosses {t}" for t in failed]
        raise CheckFailed("eval check failed (--fail-if):\n" + "\n".join(lines))
    return 0


def evaluate_combined(run_dir: Path, combined: dict[str, Any], *, split: str, batch_size: int) -> dict[str, Any]:
    """Score the combined adapter and each input adapter on each input's `split`: one base in memory, the adapters
    switched by name. Top-level loss/perplexity/tokens are the combined adapter's over all inputs' data together
    (token-weighted), so --fail-if works as for any run."""
    from ft_cli.loading import default_device, load_base, load_run_tokenizer
    from ft_cli.scoring import eval_dataset, perplexity, score

    target = run_adapter(run_dir, name="combined", what=str(run_dir))
    inputs = []
    for i, item in enumerate(combined["inputs"]):
        if not Path(item["run"]).is_dir():
            raise UserError(f"{run_dir} combines {item['run']}, which no longer exists; evaluate with --data PATH")
        inputs.append(run_adapter(item["run"], name=f"input{i}", what=f"input {item['run']}"))
    check_shared_base([target, *inputs])
    device = default_device()
    datasets = []
    for a in inputs:  # data first: a data problem should not wait for the model to load
        tokenizer = load_run_tokenizer(a.recipe, a.path)
        datasets.append((tokenizer, eval_dataset(a.recipe, tokenizer, None, split)))
    base = load_base(target.recipe, device=device, path=target.base_path)
    if not target.recipe.quantized:
        base.to(device)
    model = load_adapters(base, [target, *inputs])
    rows, loss_sum, tokens, examples = [], 0.0, 0, 0
    for a, (tokenizer, (dataset, source)) in zip(inputs, datasets, strict=True):
        model.set_adapter(target.name)
        mine = score(model, dataset, tokenizer, batch_size, device, label=f"combined on {a.run.name}")
        model.set_adapter(a.name)
        theirs = score(model, dataset, tokenizer, batch_size, device, label=f"{a.run.name} on its data")
        rows.append({"input": str(a.run), "data": source, "tokens": mine["tokens"], "examples": mine["examples"],
                     "loss": mine["loss"], "perplexity": mine["perplexity"], "input_loss": theirs["loss"],
                     "input_perplexity": theirs["perplexity"], "delta_loss": mine["loss"] - theirs["loss"]})
        loss_sum += mine["loss"] * mine["tokens"]
        tokens += mine["tokens"]
        examples += mine["examples"]
    loss = loss_sum / tokens
    return {"run_dir": str(run_dir), "model": str(target.path), "method": target.recipe.method,
            "combined": {k: combined[k] for k in ("combine", "weights", "density")}, "split": split,
            "data": [r["data"] for r in rows], "loss": loss, "perplexity": perplexity(loss), "tokens": tokens,
            "examples": examples, "inputs": rows}


def print_combined(result: dict[str, Any], path: Path) -> None:
    from rich.console import Console
    from rich.table import Table

    c = result["combined"]
    table = Table(title=f"ft eval: {result['model']} ({c['combine']} of {len(result['inputs'])} adapters) on each "
                        f"input's {result['split']} split")
    for col in ("input", "tokens", "combined loss", "input's own loss", "delta (combined - input)"):
        table.add_column(col, justify="left" if col == "input" else "right")
    for r in result["inputs"]:
        table.add_row(str(Path(*Path(r["input"]).parts[-2:])), f"{r['tokens']:,}", f"{r['loss']:.4f}", f"{r['input_loss']:.4f}",
                      f"{r['delta_loss']:+.4f}")
    table.add_row("all (token-weighted)", f"{result['tokens']:,}", f"{result['loss']:.4f}", "", "")
    console = Console(highlight=False)
    console.print(table)
    console.print(f"wrote {path}")


def _echo(text: str) -> None:
    print(text, flush=True)
