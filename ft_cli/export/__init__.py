"""`ft export RUN_DIR --format F --out DIR`: a deployable quantized copy of what a run trained, checked.

1. Refuse early (exit 2): unknown format, a missing library, an --out that ft may not write into, a method whose
   weights cannot be merged. Print the estimated size before any weight is loaded (ft plan's meta-device counts).
2. `ft merge` (ft_cli.merge.merge_run, parity-checked as always) makes the 16-bit model, in a temporary directory.
3. The format's writer turns that into the export (formats.py says which library does what).
4. Checks, all on this machine, reported on screen and in DIR/export.json:
   - size on disk vs the 16-bit merge;
   - quality: token-weighted eval loss and perplexity on the run's eval split (unpacked rows, the first
     --eval-rows of them), 16-bit vs export; past --max-ppl-increase the export is refused (exit 3, nothing
     written) unless --force;
   - speed: tokens/s and peak memory of a fixed greedy generation workload, each model in a fresh process
     (ft_cli.export.speed);
   - GGUF only: the file is run in llama.cpp (llama-cpp-python) and its greedy continuations of a few prompts are
     compared token by token with transformers on the 16-bit merge. Without llama-cpp-python, quality is scored
     on the GGUF weights as transformers' GGUF loader dequantizes them, and export.json says so.
5. Everything is written to a temporary sibling of --out and renamed into place at the end.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path
from typing import Any

from ft_cli.atomic import finish_tree, swap_in
from ft_cli.errors import CheckFailed, UserError
from ft_cli.export.formats import FORMATS, INSTALL_HINT, ExportFormat, get_format, parse_percent
from ft_cli.export.load import load_export

__all__ = ["FORMATS", "export_run", "load_export"]

DEFAULT_MAX_PPL_INCREASE = "10%"
EVAL_ROWS = 256
BENCH_PROMPTS = 4
BENCH_NEW_TOKENS = 32
VERIFY_NEW_TOKENS = 16
MARKER = "export.json"


def export_run(run_dir: Path, out: Path, fmt_name: str, *, max_ppl_increase: str = DEFAULT_MAX_PPL_INCREASE,
               force: bool = False, overwrite: bool = False, eval_rows: int = EVAL_ROWS,
               bench_tokens: int = BENCH_NEW_TOKENS) -> dict[str, Any]:
    from ft_cli.loading import resolve_target
    from ft_cli.merge import _check_mergeable

    fmt = get_format(fmt_name)
    limit = parse_percent(max_ppl_increase)
    if eval_rows < 1 or bench_tokens < 1:
        raise UserError("--eval-rows and --bench-tokens must be at least 1")
    target = resolve_target(run_dir)
    if target.kind != "run" or target.recipe is None:
        raise UserError(f"{run_dir}: ft export needs a run directory written by ft train (with recipe.yaml)")
    recipe = target.recipe
    _check_mergeable(recipe)
    out = Path(out).expanduser()
    check_output_dir(out, overwrite=overwrite)
    require_libraries(fmt)
    from ft_cli.export.measure import prepare

    data = prepare(recipe, target, eval_rows, BENCH_PROMPTS)  # bad or missing data fails before any model loads
    estimate = estimate_sizes(target, fmt)
    _echo(f"ft export {fmt.name}: {fmt.summary}")
    _echo(f"estimated size of the weights: {_size(estimate['export'])} (16-bit: {_size(estimate['16-bit'])}, "
          f"{estimate['export'] / estimate['16-bit']:.0%}; layers too narrow for the format's blocks come out larger)")

    dtype16 = recipe.model.dtype if recipe.model.dtype in ("bfloat16", "float16") else "bfloat16"
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.ft-export-", dir=out.parent))
    except OSError as exc:
        raise UserError(f"--out {out}: cannot write beside it ({exc.strerror or exc})") from None
    try:
        report = _export_into(target, fmt, tmp, out, data, dtype16=dtype16, bench_tokens=bench_tokens)
        report["estimated_size_bytes"] = estimate["export"]
        quality = report["quality"]
        quality["max_ppl_increase_pct"] = limit
        quality["ok"] = quality["ppl_increase_pct"] <= limit
        print_summary(report, out)
        if not quality["ok"] and not force:
            raise CheckFailed(
                f"export refused: perplexity rose {quality['ppl_increase_pct']:.2f}% over the 16-bit model "
                f"({quality['reference']['perplexity']:.4g} -> {quality['export']['perplexity']:.4g}), past "
                f"--max-ppl-increase {limit:g}%; nothing was written to {out}. Use --force to write it anyway, "
                "or a format with more bits.")
        export_dir = tmp / "export"
        report["files"] = sorted(p.name for p in export_dir.iterdir()) + [MARKER]
        (export_dir / MARKER).write_text(json.dumps(report, indent=2, default=str) + "\n")
        finish_tree(export_dir)
        swap_in(export_dir, out)  # an earlier export (checked by check_output_dir) goes once the new one is in
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    forced = "" if quality["ok"] else ", quality check FAILED, written because of --force"
    _echo(f"wrote {out} ({fmt.name}{forced}); load it with {report['load']}")
    return report


# Output directory --------------------------------------------------------------------------------------------------

def check_output_dir(out: Path, *, overwrite: bool) -> None:
    """ft writes --out only if it is new, an empty directory, or (with --overwrite) an earlier ft export holding
    nothing but the files its export.json lists. A regular file is never replaced.
    (One function, so that the shared rule of ft_cli.run_dir can replace it.)"""
    if out.is_symlink() or (out.exists() and not out.is_dir()):
        raise UserError(f"--out {out} is a file (or a link); ft export writes a new directory and never replaces "
                        "a file")
    if not out.exists() or not any(out.iterdir()):
        return
    listed = _export_files(out)
    if listed is None:
        raise UserError(f"--out {out} already exists and is not empty (and is not an ft export); choose a new "
                        "directory or empty it")
    extra = sorted(p.name for p in out.iterdir() if p.name not in listed)
    if extra:
        raise UserError(f"--out {out} holds an earlier ft export plus files ft did not write ({', '.join(extra[:5])}); "
                        "ft will not remove them: choose a new directory")
    if not overwrite:
        raise UserError(f"--out {out} holds an earlier ft export; use --overwrite to replace it, or a new directory")


def _export_files(out: Path) -> set[str] | None:
    try:
        data = json.loads((out / MARKER).read_text())
    except (OSError, ValueError):
        return None
    files = data.get("files") if isinstance(data, dict) and data.get("tool") == "ft export" else None
    return set(files) if isinstance(files, list) and all(isinstance(f, str) for f in files) else None


# Before anything loads ---------------------------------------------------------------------------------------------

def require_libraries(fmt: ExportFormat) -> None:
    import importlib.util

    missing = [m for m in fmt.needs if importlib.util.find_spec(m) is None]
    if missing:
        hints = "; ".join(INSTALL_HINT.get(m, f"pip install {m}") for m in missing)
        raise UserError(f"--format {fmt.name} needs {', '.join(missing)}, not installed here: {hints}")
    if fmt.is_gguf:
        from ft_cli.export.gguf import require_converter

        require_converter()


def estimate_sizes(target: Any, fmt: ExportFormat) -> dict[str, int]:
    """Bytes on disk of the 16-bit model and of the export, from the model's config alone (meta device)."""
    from transformers import AutoConfig

    from ft_cli.loading import run_base_path
    from ft_cli.plan import count_params

    recipe = target.recipe
    source = target.output if recipe.spec.whole_model else run_base_path(target)
    config = AutoConfig.from_pretrained(str(source), trust_remote_code=recipe.model.trust_remote_code)
    counts = count_params(config, recipe.model_copy(update={"quantization": None}, deep=True))
    rest = counts.total - counts.quantizable
    return {"16-bit": 2 * counts.total,
            "export": int(counts.quantizable * fmt.linear_bytes + rest * fmt.other_bytes)}


# The work ----------------------------------------------------------------------------------------------------------

def _export_into(target: Any, fmt: ExportFormat, tmp: Path, out: Path, data: Any, *, dtype16: str,
                 bench_tokens: int) -> dict[str, Any]:
    from ft_cli import __version__
    from ft_cli.export import measure
    from ft_cli.manifest import package_versions
    from ft_cli.merge import merge_run
    from ft_cli.run_dir import now_iso

    recipe = target.recipe
    merged = tmp / "merged-16bit"
    _echo(f"step 1/3: the 16-bit model ({dtype16}), by ft merge")
    merge_run(target.path, merged, dtype=dtype16)
    export_dir = tmp / "export"
    export_dir.mkdir()
    _echo(f"step 2/3: writing {fmt.name}")
    written = write_format(fmt, merged, export_dir, dtype16)
    artifact = export_dir / written["artifact"] if written.get("artifact") else export_dir
    _echo("step 3/3: checking quality and speed against the 16-bit model")
    checks = measure.run_checks(fmt, data, merged, artifact, bench_tokens=bench_tokens,
                                verify_tokens=VERIFY_NEW_TOKENS)
    size16 = _dir_bytes(merged, skip={"merge_report.json"})
    size = _dir_bytes(export_dir)
    weights16, weights = _weights_bytes(merged), _weights_bytes(export_dir)
    merge_report = json.loads((merged / "merge_report.json").read_text())
    return {
        "tool": "ft export", "ft_version": __version__, "created_at": now_iso(), "format": fmt.name,
        "summary": fmt.summary, "run_dir": str(target.path), "source": str(target.output), "method": recipe.method,
        "base_model": recipe.model.name_or_path, "artifact": written.get("artifact"),
        "load": fmt.load_hint.format(path=str(out / written["artifact"] if written.get("artifact") else out)),
        "size_bytes": size, "weights_bytes": weights, "size_ratio": weights / weights16,
        "reference_16bit": {"dtype": dtype16, "size_bytes": size16, "weights_bytes": weights16}, **{k: v for k, v in written.items() if k != "artifact"}, **checks,
        "merge_parity": merge_report.get("parity"),
        "versions": {**package_versions(), **measure.export_library_versions()},
    }


def write_format(fmt: ExportFormat, merged: Path, export_dir: Path, dtype16: str) -> dict[str, Any]:
    if fmt.is_gguf:
        return _write_gguf(fmt, merged, export_dir)
    from ft_cli.export.quantize import quantize_transformers

    return quantize_transformers(fmt.name, merged, export_dir, dtype16)


def _write_gguf(fmt: ExportFormat, merged: Path, export_dir: Path) -> dict[str, Any]:
    from ft_cli.export import gguf

    kind = fmt.name.removeprefix("gguf-")
    name = f"model-{kind}.gguf"
    if kind == "q4_k_m":
        f16 = export_dir.parent / "model-f16.gguf"
        info = gguf.convert(merged, f16, "f16")
        gguf.quantize_q4_k_m(f16, export_dir / name)
        f16.unlink()
    else:
        info = gguf.convert(merged, export_dir / name, kind)
    types = gguf.tensor_types(export_dir / name)
    notes = []
    if info.get("pre_tokenizer_rule"):
        notes.append(f"llama.cpp's converter does not know this tokenizer's hash; its pre-tokenizer is exactly "
                     f"{info['pre_tokenizer_rule']}'s, so it was written as tokenizer.ggml.pre = "
                     f"{info['pre_tokenizer_rule']}")
    if info.get("fell_back_to_f16"):
        notes.append(f"{info['fell_back_to_f16']} tensor(s) could not be split into {kind} blocks and stayed F16 "
                     "(llama.cpp's converter: rows must be a multiple of the block size)")
    _echo(f"wrote {name}: tensor types {', '.join(f'{k} x{v}' for k, v in types.items())}")
    for note in notes:
        _echo(f"note: {note}")
    return {"artifact": name, "tensor_types": types, "converter": {
        "path": str(gguf.find_converter()), "llama_cpp_python_release": gguf.converter_version(),
        "warnings": info.get("warnings", [])}, "notes": notes}


def _dir_bytes(path: Path, skip: frozenset[str] | set[str] = frozenset()) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file() and p.name not in skip)


def _weights_bytes(path: Path) -> int:
    """The weight files alone (safetensors shards or the .gguf, which also embeds the tokenizer)."""
    return sum(p.stat().st_size for p in path.iterdir() if p.suffix in (".safetensors", ".gguf"))


# Screen ------------------------------------------------------------------------------------------------------------

def print_summary(report: dict[str, Any], out: Path) -> None:
    from rich.console import Console
    from rich.markup import escape
    from rich.table import Table

    q, speed = report["quality"], report.get("speed") or {}
    table = Table(title=f"ft export {report['format']} vs the 16-bit ({report['reference_16bit']['dtype']}) model",
                  caption=f"quality: {q['rows']} rows, {q['tokens']:,} scored tokens of {escape(str(q['data']))}")
    for col in ("", "16-bit", report["format"], "change"):
        table.add_column(col, justify="left" if not col else "right")
    ref_w, w = report["reference_16bit"]["weights_bytes"], report["weights_bytes"]
    table.add_row("weights on disk", _size(ref_w), _size(w),
                  f"{w / ref_w:.0%} (est. {_size(report['estimated_size_bytes'])})")
    table.add_row("eval loss", f"{q['reference']['loss']:.4f}", f"{q['export']['loss']:.4f}",
                  f"{q['export']['loss'] - q['reference']['loss']:+.4f}")
    table.add_row("perplexity", f"{q['reference']['perplexity']:.4f}", f"{q['export']['perplexity']:.4f}",
                  f"{q['ppl_increase_pct']:+.2f}% (max {q['max_ppl_increase_pct']:g}%)")
    ref_s, exp_s = speed.get("reference"), speed.get("export")
    if ref_s and exp_s:
        table.add_row("tokens/s", f"{ref_s['tokens_per_second']:.1f}", f"{exp_s['tokens_per_second']:.1f}",
                      f"x{exp_s['tokens_per_second'] / ref_s['tokens_per_second']:.2f}")
        table.add_row("peak memory", _size(ref_s["model_memory_bytes"]), _size(exp_s["model_memory_bytes"]),
                      f"{exp_s['model_memory_bytes'] / max(ref_s['model_memory_bytes'], 1):.0%}")
    console = Console(highlight=False)
    console.print(table)
    lines = [f"quality scored with: {q['scored_with']}"]
    if ref_s:
        w = speed["workload"]
        lines.append(f"speed: {w['prompts']} prompts x {w['new_tokens_each']} new tokens, {w['decoding']}; "
                     f"16-bit in transformers ({w['device']}), export in {speed.get('export_runtime', '-')}; "
                     "peak memory = what loading and generating added to the process")
    if speed.get("skipped"):
        lines.append(f"speed: not measured for the export: {speed['skipped']}")
    if report.get("verification"):
        lines.append(f"GGUF in llama.cpp: {report['verification']['summary']}")
    lines += [f"note: {n}" for n in report.get("notes", []) + q.get("notes", [])]
    for line in lines:
        console.print(escape(line))
    status = "OK" if q["ok"] else "[bold red]FAILED[/]"
    console.print(f"quality check: perplexity {q['ppl_increase_pct']:+.2f}% vs --max-ppl-increase "
                  f"{q['max_ppl_increase_pct']:g}% -> {status}")


def _size(n: float) -> str:
    from ft_cli.progress import format_bytes

    return format_bytes(n)


def _echo(text: str) -> None:
    print(text, flush=True)
