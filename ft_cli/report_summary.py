"""RUN_DIR/report/summary.md of `ft report` (ft_cli/report.py): the recipe essentials, final and best metrics,
eval.json, timings and status, as Markdown tables, from the recipe and run.json as dicts (any run, old ones too)."""

from __future__ import annotations

import math
from datetime import datetime
from typing import TYPE_CHECKING, Any

from ft_cli.progress import fmt_duration

if TYPE_CHECKING:
    from ft_cli.report import Metrics
    from ft_cli.run_dir import RunDir


def is_finite(x: Any) -> bool:
    return isinstance(x, int | float) and math.isfinite(x)


def render_summary(run: RunDir, metrics: Metrics, recipe: dict[str, Any], manifest: dict[str, Any],
                   eval_result: dict[str, Any] | None) -> str:
    name = run.root.resolve().name
    status = manifest.get("status", "unknown (no run.json)")
    if status == "running" and run.status() == "crashed":
        status = "crashed (run.json says running, but no ft process holds the run's lock)"
    final_step = manifest.get("final_step") or (metrics.train[-1]["step"] if metrics.train else None)
    total = manifest.get("total_steps")
    md = [f"# Run report: {name}", "",
          f"**Status:** {status}" + (f", step {final_step} of {total}" if final_step and total else ""), ""]
    if manifest.get("error"):
        md += [f"**Error:** `{manifest['error'].splitlines()[0][:300]}`", ""]
    md += ["![loss and learning rate](loss.png)", ""]
    md += ["## Recipe", "", *_table(["", ""], _recipe_rows(recipe, manifest)), ""]
    md += ["## Metrics", "", *_table(["metric", "value", "step"], _metric_rows(metrics)), ""]
    if eval_result is not None:
        rows = [[k, _fmt(v)] for k, v in eval_result.items() if isinstance(v, int | float | str | bool) or v is None]
        md += [f"## Evaluation ({run.eval_json.name})", "", *_table(["key", "value"], rows), ""]
    md += ["## Timing", "", *_table(["", ""], _timing_rows(metrics, manifest)), ""]
    md += ["Files: `metrics.jsonl` (every logged value), `run.json` (manifest), `recipe.yaml` (the resolved recipe).",
           ""]
    return "\n".join(md)


def _recipe_rows(recipe: dict[str, Any], manifest: dict[str, Any]) -> list[list[str]]:
    model = recipe.get("model") or {}
    method = method_name(recipe, manifest)
    rows = [["model", f"`{model_name(recipe, manifest)}`" + (f" ({model['dtype']})" if model.get("dtype") else "")],
            ["method", method + _method_detail(recipe, method)]]
    q = recipe.get("quantization") or {}
    if q.get("bits"):
        kind = f"{q.get('quant_type', 'nf4')}" + (" + double quant" if q.get("double_quant") else "") \
            if q["bits"] == 4 else "int8"
        rows.append(["quantization", f"{q['bits']}-bit {kind}, compute {q.get('compute_dtype', '?')}"])
    else:
        rows.append(["quantization", "none"])
    data = recipe.get("data") or {}
    if data:
        rows.append(["data", f"{_sources(data.get('train'))} ({data.get('format', '?')})"])
        rows.append(["eval data", _sources(data["eval"]) if data.get("eval")
                     else f"{data.get('val_split', 0):g} of train held out"])
        rows.append(["sequence", f"max_seq_len {data.get('max_seq_len', '?')}, packing "
                                 f"{'on' if data.get('packing') else 'off'}, train_on_inputs "
                                 f"{'on' if data.get('train_on_inputs') else 'off'}"])
        stats = (manifest.get("data") or {}).get("train") or {}
        if stats.get("rows") is not None:
            rows.append(["train rows", f"{stats['rows']:,}" + (f", {stats['tokens']:,} tokens" if stats.get("tokens")
                                                              else "")])
    t = recipe.get("train") or {}
    if t:
        length = f"max_steps {t['max_steps']}" if t.get("max_steps") else f"{t.get('epochs', '?')} epochs"
        rows.append(["steps", f"{length} ({manifest['total_steps']} optimizer steps)" if manifest.get("total_steps")
                     else length])
        rows.append(["batch", f"micro_batch_size {t.get('micro_batch_size')} x grad_accum {t.get('grad_accum')}"
                              f" x processes {manifest.get('num_processes', 1)}"])
        rows.append(["optimizer", f"{t.get('optimizer', '?')}, lr {t.get('lr', '?')} {t.get('scheduler', '')}, "
                                  f"warmup_ratio {t.get('warmup_ratio', '?')}, weight_decay {t.get('weight_decay', '?')}"])
    if manifest.get("trainable_params") is not None:
        tr, tot = manifest["trainable_params"], manifest.get("total_params") or 0
        pct = f" ({100 * tr / tot:.3f}%)" if tot else ""
        rows.append(["trainable parameters", f"{tr:,} of {tot:,}{pct}"])
    return rows


def _method_detail(recipe: dict[str, Any], method: str) -> str:
    """The settings of the method's recipe section (a dict: recipe.yaml of any run, old ones included)."""
    from ft_cli.methods.registry import METHODS

    spec = METHODS.get(method)
    section = spec.section if spec else None
    settings = recipe.get(section) if section else None
    return _SECTION_DETAIL[section](settings) if settings and section in _SECTION_DETAIL else ""


def _lora_detail(lo: dict[str, Any]) -> str:
    targets = lo.get("target_modules")
    targets = ", ".join(targets) if isinstance(targets, list) else targets
    return f": rank {lo.get('rank')}, alpha {lo.get('alpha')}, dropout {lo.get('dropout')}, targets {targets}"


_SECTION_DETAIL = {
    "lora": _lora_detail,
    "freeze": lambda fr: f": last {fr.get('trainable_layers')} blocks + "
                         f"{fr.get('trainable_modules') or 'no extra modules'}",
    "prompt": lambda p: f": {p.get('num_virtual_tokens')} virtual tokens",
    "bottleneck": lambda b: f": bottleneck size {b.get('size')}",
}


def _metric_rows(metrics: Metrics) -> list[list[str]]:
    rows: list[list[str]] = []
    finite = [r for r in metrics.train if is_finite(r.get("loss"))]
    if finite:
        first, last = finite[0], finite[-1]
        best = min(finite, key=lambda r: r["loss"])
        rows.append(["final train loss", f"{last['loss']:.4f}", str(last["step"])])
        rows.append(["first train loss", f"{first['loss']:.4f}", str(first["step"])])
        rows.append(["lowest train loss", f"{best['loss']:.4f}", str(best["step"])])
        if is_finite(last.get("grad_norm")):
            rows.append(["final grad norm", f"{last['grad_norm']:.4g}", str(last["step"])])
        for key in ("reward_margin", "reward_accuracy"):
            if is_finite(last.get(key)):
                rows.append([f"final {key.replace('_', ' ')}", f"{last[key]:.4f}", str(last["step"])])
    if metrics.eval:
        last = metrics.eval[-1]
        rows.append(["final eval loss", _fmt(last.get("eval_loss")), str(last["step"])])
        if last.get("eval_perplexity") is not None:
            rows.append(["final eval perplexity", _fmt(last["eval_perplexity"]), str(last["step"])])
        for key in ("eval_reward_margin", "eval_reward_accuracy"):
            if is_finite(last.get(key)):
                rows.append([f"final {key.replace('_', ' ')}", f"{last[key]:.4f}", str(last["step"])])
        best = metrics.best_eval
        if best is not None:
            rows.append(["best eval loss", f"{best['eval_loss']:.4f}", str(best["step"])])
            if best.get("eval_perplexity") is not None:
                rows.append(["best eval perplexity", _fmt(best["eval_perplexity"]), str(best["step"])])
    return rows


def _timing_rows(metrics: Metrics, manifest: dict[str, Any]) -> list[list[str]]:
    rows: list[list[str]] = []
    started, finished = manifest.get("started_at"), manifest.get("finished_at")
    if started:
        rows.append(["started", started])
    resumes = [r for r in manifest.get("resumes") or [] if isinstance(r, dict)]
    for r in resumes:
        rows.append(["resumed", f"{r.get('at')} (from step {r.get('step')})"])
    if manifest.get("resumed_at") and not resumes:
        rows.append(["resumed", f"{manifest['resumed_at']} (from step {manifest.get('resumed_from_step')})"])
    if finished:
        rows.append(["finished", finished])
    duration = _seconds_between(started, finished)
    if duration is not None:
        rows.append(["duration", f"{fmt_duration(duration)} ({duration:,.0f} s wall clock, after loading)"])
    tps = [r["tokens_per_s"] for r in metrics.train if is_finite(r.get("tokens_per_s"))]
    if tps:
        rows.append(["throughput", f"{sum(tps) / len(tps):,.0f} tokens/s average over {len(tps)} logged windows "
                                   f"(min {min(tps):,.0f}, max {max(tps):,.0f})"])
    env = manifest.get("environment") or {}
    if env.get("device"):
        gpus = f" ({', '.join(env['gpus'])})" if env.get("gpus") else ""
        rows.append(["device", f"{env['device']}{gpus} x {manifest.get('num_processes', 1)} process(es)"])
    if not rows:
        rows.append(["", "no run.json: timings unknown"])
    return rows


def _seconds_between(start: str | None, end: str | None) -> float | None:
    if not start or not end:
        return None
    try:
        return (_parse_time(end) - _parse_time(start)).total_seconds()
    except ValueError:
        return None


def _parse_time(text: str) -> datetime:
    try:
        return datetime.strptime(text, "%Y-%m-%dT%H:%M:%S%z")
    except ValueError:
        return datetime.fromisoformat(text)


def model_name(recipe: dict[str, Any], manifest: dict[str, Any]) -> str:
    return str((recipe.get("model") or {}).get("name_or_path") or manifest.get("base_model") or "?")


def method_name(recipe: dict[str, Any], manifest: dict[str, Any]) -> str:
    return str(recipe.get("method") or manifest.get("method") or "?")


def _sources(value: Any) -> str:
    if isinstance(value, list):
        return ", ".join(f"`{s.get('path')}`" + (f" x{s['weight']:g}" if s.get("weight") else "") for s in value
                         if isinstance(s, dict))
    return f"`{value}`" if value else "?"


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4f}" if abs(value) < 1e5 else f"{value:.4g}"
    if isinstance(value, int) and not isinstance(value, bool):
        return f"{value:,}"
    return "" if value is None else str(value)


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    def esc(cell: str) -> str:
        return str(cell).replace("|", "\\|").replace("\n", " ")

    out = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    out += ["| " + " | ".join(esc(c) for c in row) + " |" for row in rows]
    return out
