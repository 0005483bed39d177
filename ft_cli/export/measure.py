"""The checks of `ft export`: quality on the run's eval split, speed and memory of a fixed workload, and (GGUF) the
file run in llama.cpp against transformers on the 16-bit merge."""

from __future__ import annotations

import json
import math
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ft_cli.errors import UserError
from ft_cli.recipe import Recipe

PROMPT_TOKENS = 256  # longest prompt of the speed workload
TEXT_PROMPT_TOKENS = 16  # format text has no prompt/reply split: the first tokens of a row are the prompt


@dataclass
class CheckData:
    rows: Any  # datasets.Dataset: input_ids, labels (unpacked)
    source: str
    tokenizer: Any
    prompts: list[list[int]]
    notes: list[str] = field(default_factory=list)


def prepare(recipe: Recipe, target: Any, eval_rows: int, n_prompts: int) -> CheckData:
    """The rows to score and the prompts to generate from, built before anything heavy runs (bad data fails
    first). Rows are never packed here, so llama.cpp and transformers see the same independent sequences."""
    from ft_cli.evaluate import eval_dataset, split_prompt
    from ft_cli.loading import load_run_tokenizer

    tokenizer = load_run_tokenizer(recipe, target.output)
    unpacked = recipe.model_copy(deep=True)
    unpacked.data.packing = False
    notes = []
    try:
        rows, source = eval_dataset(unpacked, tokenizer, None, "eval")
    except UserError:
        rows, source = eval_dataset(unpacked, tokenizer, None, "train")
        notes.append("the run has no eval split: quality is measured on training rows (the model has seen them)")
    total = len(rows)
    if total == 0:
        raise UserError(f"{source}: no row to evaluate the export on")
    if total > eval_rows:
        rows = rows.select(range(eval_rows))
        notes.append(f"quality measured on the first {eval_rows} of {total} rows of {source} (--eval-rows)")
    prompts = []
    for row in rows.select(range(min(len(rows), 4 * n_prompts))):
        pair = split_prompt(row["input_ids"], row["labels"])
        prompt = pair[0] if pair and recipe.data.format != "text" else row["input_ids"][:TEXT_PROMPT_TOKENS]
        if len(prompt) > 1:
            prompts.append(list(prompt[-PROMPT_TOKENS:]))
        if len(prompts) == n_prompts:
            break
    if not prompts:
        raise UserError(f"{source}: no row long enough to prompt the speed workload")
    return CheckData(rows=rows, source=source, tokenizer=tokenizer, prompts=prompts, notes=notes)


def run_checks(fmt: Any, data: CheckData, merged: Path, artifact: Path, *, bench_tokens: int,
               verify_tokens: int) -> dict[str, Any]:
    from ft_cli.export.gguf import llama_cpp_available
    from ft_cli.generation import stop_token_ids
    from ft_cli.loading import default_device, load_model_dir
    from ft_cli.scoring import score

    device = default_device()
    llama = fmt.is_gguf and llama_cpp_available()
    reference_model = load_model_dir(merged, device=device)
    reference = _scores(score(reference_model, data.rows, data.tokenizer, 8, device, label="16-bit"))
    stops = stop_token_ids(reference_model, data.tokenizer)
    reference_greedy = [greedy_ids(reference_model, p, verify_tokens, stops, device) for p in data.prompts] \
        if llama else None
    del reference_model

    notes: list[str] = []
    verification = None
    if fmt.is_gguf and llama:
        from ft_cli.export.gguf import LlamaCppModel

        longest = max(len(r) for r in data.rows["input_ids"])
        model = LlamaCppModel(artifact, n_ctx=max(longest, max(len(p) for p in data.prompts) + verify_tokens) + 8)
        exported = _scores(llama_cpp_loss(model, data.rows))
        scored_with = "llama.cpp (llama-cpp-python), the GGUF file as llama.cpp runs it"
        verification = compare_greedy(reference_greedy or [], [model.greedy(p, verify_tokens, stops)
                                                                for p in data.prompts], verify_tokens)
        model.close()
    elif fmt.is_gguf:
        from ft_cli.export.gguf import load_gguf_in_transformers

        model = load_gguf_in_transformers(artifact)
        exported = _scores(score(model, data.rows, data.tokenizer, 8, "cpu", label=fmt.name))
        scored_with = ("transformers' GGUF loader (gguf-py dequantizes the file's weights to float32); llama.cpp "
                       "itself was not run: llama-cpp-python is not installed")
        del model
    else:
        from ft_cli.export.load import load_export

        model, _, notes = load_export(artifact, device=device)
        exported = _scores(score(model, data.rows, data.tokenizer, 8, device, label=fmt.name))
        scored_with = "transformers, the export loaded with AutoModelForCausalLM.from_pretrained"
        del model

    increase = 100.0 * (exported["perplexity"] / reference["perplexity"] - 1.0)
    quality = {"data": data.source, "rows": len(data.rows), "tokens": reference["tokens"], "reference": reference,
               "export": exported, "ppl_increase_pct": increase, "scored_with": scored_with,
               "notes": data.notes + notes}
    speed = measure_speed(fmt, merged, artifact, data.prompts, bench_tokens, device, llama)
    out: dict[str, Any] = {"quality": quality, "speed": speed}
    if verification is not None:
        out["verification"] = verification
    elif fmt.is_gguf:
        out["verification"] = {"summary": "not run: llama-cpp-python is not installed (pip install "
                                          "'ft-cli[llama-cpp]'); the file was read back by transformers' GGUF loader"}
    return out


def _scores(result: dict[str, Any]) -> dict[str, Any]:
    return {k: result[k] for k in ("loss", "perplexity", "tokens")}


# llama.cpp ---------------------------------------------------------------------------------------------------------

def llama_cpp_loss(model: Any, rows: Any) -> dict[str, Any]:
    """Token-weighted cross-entropy over trained tokens, as ft_cli.evaluate.score computes it."""
    import torch

    from ft_cli.data.encode import IGNORE_INDEX

    total, count = 0.0, 0
    for ids, labels in zip(rows["input_ids"], rows["labels"], strict=True):
        logits = torch.from_numpy(model.logits(list(ids))).double()
        targets = torch.tensor(labels[1:])
        keep = targets != IGNORE_INDEX
        if keep.any():
            total += float(torch.nn.functional.cross_entropy(logits[:-1][keep], targets[keep], reduction="sum"))
            count += int(keep.sum())
    if count == 0:
        raise UserError("no trained tokens in the evaluation rows")
    loss = total / count
    return {"loss": loss, "perplexity": math.exp(min(loss, 700)), "tokens": count}


def greedy_ids(model: Any, prompt: list[int], n: int, stops: list[int], device: Any) -> list[int]:
    import torch

    x = torch.tensor([prompt], device=device)
    with torch.no_grad():
        out = model.generate(input_ids=x, attention_mask=torch.ones_like(x), max_new_tokens=n, do_sample=False,
                             temperature=None, top_p=None, top_k=None, eos_token_id=stops or None,
                             pad_token_id=stops[0] if stops else None)
    new = out[0, x.shape[1]:].tolist()
    cut = next((i + 1 for i, t in enumerate(new) if t in stops), len(new))
    return new[:cut]


def compare_greedy(reference: list[list[int]], candidate: list[list[int]], n: int) -> dict[str, Any]:
    prefixes = []
    for a, b in zip(reference, candidate, strict=True):
        k = 0
        while k < min(len(a), len(b)) and a[k] == b[k]:
            k += 1
        prefixes.append(k)
    same = sum(a == b for a, b in zip(reference, candidate, strict=True))
    return {"prompts": len(reference), "max_new_tokens": n, "identical": same, "common_prefix_tokens": prefixes,
            "reference_tokens": reference, "llama_cpp_tokens": candidate,
            "summary": f"{same} of {len(reference)} greedy continuations ({n} tokens at most) identical to "
                       f"transformers on the 16-bit merge; tokens in common before the first difference: "
                       f"{', '.join(map(str, prefixes))}"}


# Speed ---------------------------------------------------------------------------------------------------------------

def measure_speed(fmt: Any, merged: Path, artifact: Path, prompts: list[list[int]], new_tokens: int, device: str,
                  llama: bool) -> dict[str, Any]:
    workload = {"prompts": len(prompts), "prompt_tokens": [len(p) for p in prompts], "new_tokens_each": new_tokens,
                "decoding": "greedy, batch 1, end-of-turn ignored, one warm-up prompt first", "device": device}
    base = {"prompts": prompts, "new_tokens": new_tokens, "device": device}
    reference = run_speed({**base, "kind": "transformers", "path": str(merged), "plain": True})
    result: dict[str, Any] = {"workload": workload, "reference": reference}
    if fmt.is_gguf and not llama:
        result["skipped"] = "llama-cpp-python is not installed (pip install 'ft-cli[llama-cpp]')"
        return result
    kind = "gguf" if fmt.is_gguf else "transformers"
    result["export"] = run_speed({**base, "kind": kind, "path": str(artifact), "device": "cpu" if llama else device})
    result["export_runtime"] = "llama.cpp (llama-cpp-python, CPU)" if fmt.is_gguf else "transformers"
    return result


def run_speed(spec: dict[str, Any]) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="ft-export-speed-") as tmp:
        spec_file, result_file = Path(tmp, "spec.json"), Path(tmp, "result.json")
        spec_file.write_text(json.dumps(spec))
        done = subprocess.run([sys.executable, "-m", "ft_cli.export.speed", str(spec_file), str(result_file)],
                              capture_output=True, text=True)
        if done.returncode != 0 or not result_file.is_file():
            tail = "\n".join(done.stderr.strip().splitlines()[-12:])
            raise RuntimeError(f"the speed workload failed on {spec['path']}:\n{tail}")
        return json.loads(result_file.read_text())


def export_library_versions() -> dict[str, str | None]:
    from importlib import metadata

    out: dict[str, str | None] = {}
    for name in ("torchao", "gguf", "llama-cpp-python", "sentencepiece"):
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = None
    return out
