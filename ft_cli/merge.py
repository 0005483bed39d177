"""`ft merge`: fold a run's adapter into a 16-bit copy of its base and prove the result computes the same thing.

1. The base is loaded UNQUANTIZED in the recipe's model.dtype — also for QLoRA: merging into 4-bit weights would
   re-quantize the update away. The output dtype is the recipe's model.dtype unless --dtype says otherwise (the
   user contract, docs/SPEC.md): a bfloat16/float16 run gives a 16-bit copy and never a float32 one by accident;
   a run trained in float32 (e.g. on a CPU) gives float32 unless --dtype bfloat16 asks for 16 bits.
2. Reference logits on a few held-out rows come from base + adapter, unmerged (computed in float32 when memory
   allows). The merge runs in that same precision, is cast once to the output dtype and saved (safetensors,
   tokenizer, chat template, generation config stopping at the chat's end-of-turn token).
3. The saved directory is loaded back with AutoModelForCausalLM and its logits compared with the reference. Past
   the tolerance for the output dtype the merge is refused (exit 3) and nothing is left at --out, unless --force.

Everything is written to a temporary sibling of --out and renamed into place at the end
(ft_cli.run_dir.prepare_output_dir: an existing --out is replaced only with --overwrite, and only if ft wrote it).
"""

from __future__ import annotations

import gc
import json
import os
from dataclasses import asdict
from pathlib import Path
from typing import Any

from ft_cli.errors import CheckFailed, FtExit, UserError
from ft_cli.merge_parity import TOLERANCE, Parity, check_plain_model, compare, merge_adapter
from ft_cli.methods.registry import method_spec
from ft_cli.recipe import Recipe

DTYPES = ("bfloat16", "float16", "float32")
PARITY_ROWS = 4
PARITY_TOKENS = 128


def merge_cli(run_dirs: list[Path], out: Path, *, force: bool, dtype: str | None, combine: str | None,
              weights: str | None, density: float | None, seed: int, overwrite: bool) -> None:
    """`ft merge`: fold one run's adapter into its base (merge_run) or, with --combine, combine several runs' LoRA
    adapters into one (ft_cli.compose); the options of the other mode are refused."""
    if combine is not None:
        from ft_cli.compose import combine_runs

        if force or dtype is not None:
            raise FtExit("--force and --dtype apply to merging into the base, not to --combine", exit_code=2)
        combine_runs(run_dirs, out, combine=combine, weights=weights, density=density, seed=seed, overwrite=overwrite)
        return
    if len(run_dirs) > 1:
        raise FtExit(f"{len(run_dirs)} run directories: merging into the base takes one; to combine several "
                     "adapters into one, add --combine linear|cat|ties|dare_ties", exit_code=2)
    if weights is not None or density is not None:
        raise FtExit("--weights and --density apply with --combine", exit_code=2)
    merge_run(run_dirs[0], out, force=force, dtype=dtype, overwrite=overwrite)


def merge_run(run_dir: Path, out: Path, *, force: bool = False, dtype: str | None = None,
              overwrite: bool = False) -> Path:
    from ft_cli.loading import resolve_target, run_base_path
    from ft_cli.run_dir import prepare_output_dir

    target = resolve_target(run_dir)
    if target.kind != "run" or target.recipe is None:
        raise UserError(f"{run_dir}: ft merge needs a run directory written by ft train (with recipe.yaml)")
    recipe = target.recipe
    out_dtype = dtype or recipe.model.dtype
    if out_dtype not in DTYPES:
        raise UserError(f"--dtype: must be one of {', '.join(DTYPES)}, got {out_dtype!r}")
    _check_mergeable(recipe)
    out_dir = prepare_output_dir(out, kind="merge", overwrite=overwrite)  # before anything loads
    out = out_dir.path
    if recipe.task == "classification":  # a standalone AutoModelForSequenceClassification (ft_cli.tasks)
        from ft_cli.tasks.classify_run import merge_classifier

        merge_classifier(target, out_dir, out_dtype, force=force)
        _echo(f"wrote {out} ({out_dtype}); load it with AutoModelForSequenceClassification.from_pretrained("
              f"{str(out)!r})")
        return out
    whole = method_spec(recipe.method).whole_model
    bits = recipe.quantization.bits if recipe.quantization else None
    with out_dir.writing() as tmp:  # renamed to --out when everything is written; removed on any failure
        report = _merge_into(target.output, recipe, tmp, out_dtype, run_dir=target.path,
                             base_path=None if whole else run_base_path(target))
        parity = report["parity"]
        ok = parity["relative_mean_diff"] <= report["tolerance"]
        report["parity_ok"] = ok
        _echo(f"parity, merged vs {report['reference']}, on {parity['samples']} held-out rows "
              f"({parity['tokens']} tokens, {parity['compute_dtype']}): {Parity(**parity).line()}; "
              f"tolerance {report['tolerance']:g} relative -> {'OK' if ok else 'FAILED'}")
        if "vs_quantized_training_model" in report:
            _echo(f"information: merged vs the {bits}-bit model used in training: "
                  f"{Parity(**report['vs_quantized_training_model']).line()} (the quantization error the merge "
                  "removes, not a merge error)")
        if not ok and not force:
            raise CheckFailed(
                f"merge refused: merged logits differ from {report['reference']} by "
                f"{parity['relative_mean_diff']:.3g} relative (tolerance {report['tolerance']:g} for {out_dtype}); "
                f"nothing was written to {out}. Use --force to write it anyway, or --dtype float32 to rule out "
                "rounding.")
        (tmp / "merge_report.json").write_text(json.dumps(report, indent=2) + "\n")
    why = "--dtype" if dtype else "the recipe's model.dtype" + ("; --dtype bfloat16 for a 16-bit copy"
                                                                 if out_dtype == "float32" else "")
    _echo(f"wrote {out} ({out_dtype}: {why}{', parity check FAILED, written because of --force' if not ok else ''}); "
          f"load it with AutoModelForCausalLM.from_pretrained({str(out)!r})")
    return out


def _check_mergeable(recipe: Recipe) -> None:
    spec = method_spec(recipe.method)
    if not spec.whole_model and not spec.merges:  # a whole model is converted to the --dtype instead
        raise UserError(f"method {spec.name}: {spec.why_not['merges']}")


def _merge_into(output: Path, recipe: Recipe, tmp: Path, out_dtype: str, *, run_dir: Path,
                base_path: str | None) -> dict[str, Any]:
    from ft_cli.loading import load_base, load_model_dir, load_run_model, load_run_tokenizer
    from ft_cli.methods.apply import load_trained
    from ft_cli.model import torch_dtype

    whole = method_spec(recipe.method).whole_model
    tokenizer = load_run_tokenizer(recipe, output)
    samples = parity_samples(recipe, tokenizer)
    report: dict[str, Any] = {"run_dir": str(run_dir), "source": str(output), "method": recipe.method,
                              "base_model": recipe.model.name_or_path, "dtype": out_dtype,
                              "dtype_from": "model.dtype" if out_dtype == recipe.model.dtype else "--dtype",
                              "tolerance": TOLERANCE[out_dtype]}
    quantized_logits = None
    if recipe.quantized:
        bits = recipe.quantization.bits  # type: ignore[union-attr]
        _echo(f"scoring the {bits}-bit training-time model on {len(samples)} rows (information only)")
        try:
            qmodel = load_run_model(recipe, output, quantize=True, base_path=base_path)
            quantized_logits = logits_of(qmodel, samples)
            del qmodel
        except Exception as exc:  # information only: never block a merge on it (e.g. no bitsandbytes kernel here)
            _echo(f"  skipped: {type(exc).__name__}: {exc}")
        gc.collect()

    # The reference: exactly the function training produced, on the unquantized base, in compute precision.
    if whole:
        model = load_model_dir(output, dtype=recipe.model.dtype, trust_remote_code=recipe.model.trust_remote_code)
        report["reference"] = f"the trained model in {output.name}/"
    else:
        model = load_base(recipe, quantize=False, path=base_path)
        report["reference"] = (f"the adapter on the unquantized {recipe.model.dtype} base"
                               + (f" (QLoRA trained it on a {bits}-bit base; merging needs 16-bit weights)"
                                  if recipe.quantized else ""))
    compute = "float32" if _fits_in_memory(_param_bytes(model, 4)) else out_dtype
    model.to(torch_dtype(compute))
    if not whole:
        model = load_trained(model, output, recipe)
    _echo(f"converting {output} to {out_dtype}" if whole else
          f"merging the {recipe.method} adapter {output} into a {out_dtype} copy of {base_path}")
    reference = logits_of(model, samples)

    merged = merge_adapter(model)
    del model
    merged.to(torch_dtype(out_dtype))
    save_merged(merged, tokenizer, tmp)
    del merged
    gc.collect()

    # Check what was written, loaded the way users will load it.
    reloaded = load_model_dir(tmp, trust_remote_code=recipe.model.trust_remote_code)
    check_plain_model(reloaded, torch_dtype(out_dtype))
    reloaded.to(torch_dtype(compute))
    merged_logits = logits_of(reloaded, samples)
    del reloaded
    gc.collect()
    report["parity"] = asdict(compare(merged_logits, reference, compute))
    if quantized_logits is not None:
        report["vs_quantized_training_model"] = asdict(compare(merged_logits, quantized_logits, compute))
    return report


def save_merged(model: Any, tokenizer: Any, out_dir: Path) -> None:
    """safetensors shards + config + generation config + tokenizer (with its chat template)."""
    from ft_cli.generation import stop_token_ids

    out_dir.mkdir(parents=True, exist_ok=True)
    gen = model.generation_config
    stops = stop_token_ids(model, tokenizer)
    if stops:
        gen.eos_token_id = stops[0] if len(stops) == 1 else stops
    if tokenizer.pad_token_id is not None:
        gen.pad_token_id = tokenizer.pad_token_id
    model.config.use_cache = True
    model.save_pretrained(out_dir, max_shard_size="5GB")
    tokenizer.save_pretrained(out_dir)


# Parity ------------------------------------------------------------------------------------------------------------

def parity_samples(recipe: Recipe, tokenizer: Any, rows: int = PARITY_ROWS, tokens: int = PARITY_TOKENS) -> list[Any]:
    """Token ids of a few held-out rows (the run's eval split, else train rows), each cut to `tokens`."""
    import torch

    try:
        from ft_cli.data.pipeline import build_datasets

        bundle = build_datasets(recipe, tokenizer)
        data = bundle.eval if bundle.eval is not None and len(bundle.eval) else bundle.train
        ids = [row[:tokens] for row in data.select(range(min(rows, len(data))))["input_ids"]]
    except UserError as exc:  # the training data moved away: fall back to fixed prompts
        _echo(f"parity samples: the run's data is unavailable ({exc.message.splitlines()[0]}); using fixed prompts")
        ids = [_render_prompt(tokenizer, text)[:tokens] for text in _FALLBACK_PROMPTS[:rows]]
    return [torch.tensor(i, dtype=torch.long) for i in ids if len(i) > 1]


_FALLBACK_PROMPTS = ["Explain what a merge of a LoRA adapter does.", "Write a haiku about the sea.",
                     "List three prime numbers.", "What is the capital of France?"]


def _render_prompt(tokenizer: Any, text: str) -> list[int]:
    if getattr(tokenizer, "chat_template", None):
        return list(tokenizer.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True,
                                                  tokenize=True, return_dict=True)["input_ids"])
    return tokenizer(text)["input_ids"]


def logits_of(model: Any, samples: list[Any]) -> list[Any]:
    """float32 logits on the CPU, one tensor per sample (run one at a time: no padding to get wrong)."""
    import torch

    device = next(model.parameters()).device
    model.eval()
    out = []
    with torch.no_grad():
        for ids in samples:
            out.append(model(input_ids=ids[None].to(device)).logits[0].float().cpu())
    return out


def _param_bytes(model: Any, bytes_per_param: int) -> int:
    return sum(p.numel() for p in model.parameters()) * bytes_per_param


def _fits_in_memory(nbytes: int) -> bool:
    """Room for a float32 copy (plus the saved copy being reloaded) in the memory available now."""
    try:
        available = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return True
    return 2 * nbytes < available


def _echo(text: str) -> None:
    print(text, flush=True)
