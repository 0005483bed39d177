"""README.md of a run's adapter/, model/ and best/: a model card, since users publish these to model hubs.

peft's save_pretrained writes an empty template ("[More Information Needed]"); ft replaces it with what the run
knows: the base model, the method and its settings, the data (fingerprint, size), the recipe, the final and best
evaluation, the versions, and how to load the weights. The metadata block at the top follows the Hugging Face
model card format (base_model, library_name, pipeline_tag, tags). Local paths are shortened to their last part:
a card is meant to be published, and a home directory is nobody's business.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import yaml

from ft_cli.recipe import Recipe, dump_recipe

CARD_FILE = "README.md"
_HUB_ID = re.compile(r"^[\w.-]+/[\w.-]+$")


def write_model_card(out_dir: Path, recipe: Recipe, manifest: dict[str, Any], state: dict[str, Any], *,
                     step: int, best: bool) -> Path:
    """Write OUT_DIR/README.md for the weights of `step` (`best`: the copy kept at the lowest eval loss)."""
    path = Path(out_dir) / CARD_FILE
    path.write_text(render_model_card(recipe, manifest, state, step=step, best=best), encoding="utf-8")
    return path


def render_model_card(recipe: Recipe, manifest: dict[str, Any], state: dict[str, Any], *, step: int,
                      best: bool) -> str:
    from ft_cli import __version__

    base = recipe.model.name_or_path
    shown_base = _public(base)
    method = recipe.method
    kind = "model" if recipe.spec.whole_model else "adapter"
    meta: dict[str, Any] = {}
    if _HUB_ID.match(base):
        meta["base_model"] = base
    meta["library_name"] = _LIBRARY[recipe.spec.saves]
    meta["pipeline_tag"] = "text-classification" if recipe.task == "classification" else "text-generation"
    meta["tags"] = ["ft", method] + (["qlora"] if recipe.quantized and method != "qlora" else [])

    rows = [("base model", f"`{shown_base}`"), ("method", method + method_detail(recipe))]
    if recipe.quantized and recipe.quantization is not None:
        q = recipe.quantization
        rows.append(("quantization (training)", f"{q.bits}-bit {q.quant_type if q.bits == 4 else 'int8'} base "
                     "(bitsandbytes)"))
    total = manifest.get("total_steps")
    rows.append(("these weights", f"step {step}" + (f" of {total}" if total else "")
                 + (" — the lowest eval loss of the run" if best else " — the last step")))
    rows += _eval_rows(state)
    rows += _data_rows(recipe, manifest)
    versions = (manifest.get("environment") or {}).get("packages") or {}
    libs = ", ".join(f"{k} {versions[k]}" for k in ("transformers", "peft", "torch") if versions.get(k))
    rows.append(("trained with", f"ft {__version__}" + (f" ({libs})" if libs else "")))

    title = f"{Path(str(recipe.output_dir or 'run')).name}: {method} {kind} for {shown_base}"
    lines = ["---", yaml.safe_dump(meta, sort_keys=False).rstrip(), "---", "", f"# {title}", "",
             f"Fine-tuned with ft {__version__} from a YAML recipe (below).", "",
             "| | |", "|---|---|", *[f"| {k} | {_cell(v)} |" for k, v in rows], "",
             "## Use", "", "```python", *_usage(recipe, shown_base), "```", "",
             "## Recipe", "", "```yaml", _public_recipe(recipe).rstrip(), "```", ""]
    return "\n".join(lines)


# The Hub's library_name for what a method saves (ft_cli.methods.registry.MethodSpec.saves).
_LIBRARY = {"model": "transformers", "peft_adapter": "peft", "ft_adapter": "ft-cli"}


def method_detail(recipe: Recipe) -> str:
    """`: rank 16, alpha 32, ...`: the settings in the method's recipe section, for the card's method row."""
    section = recipe.spec.section
    settings = getattr(recipe, section) if section else None
    return _SECTION_DETAIL[section](settings) if settings is not None and section in _SECTION_DETAIL else ""


def _lora_detail(lo: Any) -> str:
    targets = ", ".join(lo.target_modules) if isinstance(lo.target_modules, list) else lo.target_modules
    return f": rank {lo.rank}, alpha {lo.alpha:g}, dropout {lo.dropout:g}, targets {targets}"


def _freeze_detail(fr: Any) -> str:
    extra = ", ".join(fr.trainable_modules) or "no other modules"
    return f": last {fr.trainable_layers} blocks + {extra}"


_SECTION_DETAIL = {
    "lora": _lora_detail,
    "freeze": _freeze_detail,
    "prompt": lambda p: f": {p.num_virtual_tokens} virtual tokens",
    "bottleneck": lambda b: f": Houlsby bottleneck adapters of size {b.size} after attention and MLP",
}


def _eval_rows(state: dict[str, Any]) -> list[tuple[str, str]]:
    rows = []
    if state.get("last_eval_loss") is not None:
        rows.append(("final eval loss", f"{state['last_eval_loss']:.4f} (step {state.get('last_eval_step')})"))
    if state.get("best_eval_loss") is not None:
        rows.append(("best eval loss", f"{state['best_eval_loss']:.4f} (step {state.get('best_step')})"))
    if not rows:
        rows.append(("evaluation", "none during training (no eval data)"))
    return rows


def _data_rows(recipe: Recipe, manifest: dict[str, Any]) -> list[tuple[str, str]]:
    data = manifest.get("data") or {}
    d = recipe.data
    sources = ", ".join(f"`{_public(s.path)}`" for s in d.sources)
    stats = data.get("train") or {}
    size = ""
    if stats.get("rows") is not None:
        trained = stats.get("trained_tokens") or 0
        tokens = stats.get("tokens") or 0
        size = f", {stats['rows']:,} examples, {tokens:,} tokens ({trained / max(tokens, 1):.0%} trained)"
    rows = [("training data", f"{sources} (format {d.format}){size}")]
    if data.get("fingerprint"):
        rows.append(("data fingerprint", f"`{data['fingerprint']}` (ft's hash of the data, tokenizer and settings)"))
    rows.append(("sequence length", f"{d.max_seq_len}" + (", packed" if d.packing else "")))
    return rows


def _usage(recipe: Recipe, base: str) -> list[str]:
    saves = recipe.spec.saves
    auto = "AutoModelForSequenceClassification" if recipe.task == "classification" else "AutoModelForCausalLM"
    # a classifier's base gets a new head of the run's size (its labels: ft_classification.json here)
    head = ", num_labels=len(json.load(open('PATH_TO_THIS_DIRECTORY/ft_classification.json'))['labels'])" \
        if recipe.task == "classification" else ""
    imports = [f"from transformers import {auto}, AutoTokenizer"] + (["import json"] if head else [])
    if saves == "model":
        return [*imports, "", f'model = {auto}.from_pretrained("PATH_TO_THIS_DIRECTORY")',
                'tokenizer = AutoTokenizer.from_pretrained("PATH_TO_THIS_DIRECTORY")']
    if saves == "ft_adapter" or (recipe.task == "classification" and recipe.method == "prefix_tuning"):
        why = "peft has no bottleneck adapters" if saves == "ft_adapter" else \
            "peft 0.21 cannot run prefix tuning on a transformers 5 classifier alone"
        imports.append(f"import ft_cli  # pip install ft-cli: {why}")
        load = 'model = ft_cli.load_adapter(base, "PATH_TO_THIS_DIRECTORY")'
    else:
        imports.append("from peft import PeftModel")
        load = 'model = PeftModel.from_pretrained(base, "PATH_TO_THIS_DIRECTORY")'
    return [*imports, "", f'base = {auto}.from_pretrained("{base}", dtype="auto"{head})', load,
            'tokenizer = AutoTokenizer.from_pretrained("PATH_TO_THIS_DIRECTORY")  # with the chat template']


def _public(value: str) -> str:
    """A local path cut to its last part (a hub id or a built-in stays as it is)."""
    if value.startswith(("/", "~")) or re.match(r"^[A-Za-z]:[\\/]", value):
        return Path(value).name
    return value


def _public_recipe(recipe: Recipe) -> str:
    data = yaml.safe_load(dump_recipe(recipe))
    data.pop("output_dir", None)

    def scrub(x: Any) -> Any:
        if isinstance(x, dict):
            return {k: scrub(v) for k, v in x.items()}
        if isinstance(x, list):
            return [scrub(v) for v in x]
        return _public(x) if isinstance(x, str) else x

    return yaml.safe_dump(scrub(data), sort_keys=False, allow_unicode=True)


def _cell(text: str) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")
