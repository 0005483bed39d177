"""`ft train RECIPE --smoke`: run a real recipe end to end in seconds, offline, e.g. in CI.

Everything that decides *how* training runs is kept: method and its settings, quantization, data format,
masking (train_on_inputs), packing, optimizer family, scheduler, and the chat template where ft has it. What makes
it big is swapped:

- the model becomes the built-in tiny random model of the same architecture family (llama, qwen2, mistral,
  gemma, phi3, gpt2, ...), found from the model's config.json when it is available offline (local directory
  or Hugging Face cache) and from its name otherwise; for models whose chat template ships with ft
  (ft_cli.chat_profiles: Llama-3.1 Instruct, Mistral-7B-Instruct-v0.3, Qwen2.5 Instruct) its tokenizer has that
  model's template and special tokens, so rendering, masking and the end-of-turn token are the real run's (for
  others it says that it uses ChatML);
- a few optimizer steps on the first rows of the real data, short sequences, small batches; data that is not
  there (a missing file, or a hub dataset, which would need the network) is replaced by the small sample of the
  same format that ships with ft (ft_cli/samples/), and the summary says so;
- float32 on the CPU, without liger-kernel (CUDA only; train.compile stays on where a C++ compiler is found);
  trackers off; the run goes to `<output_dir>-smoke`.
"""

from __future__ import annotations

import re
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ft_cli.errors import UserError
from ft_cli.recipe import DatasetSource, Recipe

SMOKE_STEPS = 4
SMOKE_ROWS = 64
SMOKE_MAX_SEQ_LEN = 256
SMOKE_MICRO_BATCH = 2
_TINY_LAYERS = 2  # transformer blocks of every tiny smoke model (ft_cli.builtin_models)

# config.json model_type -> the tiny built-in family that exercises the same code paths.
_FAMILY_OF_MODEL_TYPE = {
    "mixtral": "mistral",
    "qwen2_moe": "qwen2",
    "qwen3_moe": "qwen3",
    "gemma3": "gemma2",
    "gemma3_text": "gemma2",
    "phi": "phi3",
    "phimoe": "phi3",
    # encoders (task: classification) -> the tiny BERT
    "roberta": "bert",
    "xlm-roberta": "bert",
    "deberta-v2": "bert",
    "modernbert": "bert",
    "electra": "bert",
    "distilbert": "bert",
}
# Checked in order against the lower-cased model name when no config is available offline.
_FAMILY_OF_NAME = (
    (r"bert|roberta|electra", "bert"),
    (r"qwen-?3", "qwen3"),
    (r"qwen", "qwen2"),
    (r"gemma-?[23]", "gemma2"),
    (r"gemma", "gemma"),
    (r"mi[sx]tral", "mistral"),
    (r"phi", "phi3"),
    (r"gpt-?2", "gpt2"),
    (r"llama|vicuna|tinyllama|smollm", "llama"),
)


def smoke_recipe(recipe: Recipe, *, echo: Any = None) -> Recipe:
    """A copy of `recipe` that runs in seconds on the CPU; prints what was swapped (to stderr by default)."""
    import torch

    echo = echo or (lambda line: print(line, file=sys.stderr, flush=True))
    cuda = torch.cuda.is_available()
    r = recipe.model_copy(deep=True)
    changes: list[tuple[str, Any, Any]] = []

    def swap(path: str, value: Any) -> None:
        section, _, key = path.rpartition(".")
        target = _section(r, section)
        old = getattr(target, key)
        if old != value:
            setattr(target, key, value)
            changes.append((path, old, value))

    model_type, how = model_family(recipe)
    from ft_cli.builtin_models import tiny_model_dir_for
    from ft_cli.chat_profiles import chat_profile_for

    chat = chat_profile_for(recipe.model.name_or_path)  # the real model's template and special tokens, if shipped
    tiny_dir = tiny_model_dir_for(model_type, chat=chat)
    swap("model.name_or_path", str(tiny_dir))
    swap("model.revision", None)
    swap("model.trust_remote_code", False)
    if not cuda:
        _swap_for_cpu(r, swap)

    tiny_layers = _TINY_LAYERS
    if r.freeze is not None and r.freeze.trainable_layers >= tiny_layers:
        # Keep a frozen block below the trained ones, as in the real run (the tiny model has only 2).
        swap("freeze.trainable_layers", tiny_layers - 1)

    substituted = use_samples_for_missing_data(r, changes)
    _swap_to_a_few_steps(r, swap)
    swap("output_dir", f"{(recipe.output_dir or 'runs/run').rstrip('/')}-smoke")

    # The swaps must leave a recipe that validates exactly as a hand-written one would.
    try:
        smoked = Recipe.model_validate(r.model_dump())
    except Exception as exc:  # pragma: no cover - a bug in the swaps above, not the user's recipe
        raise RuntimeError(f"--smoke produced an invalid recipe: {exc}") from exc

    echo(f"smoke: {recipe.method} on a tiny random {model_type} (2 layers, hidden 64) instead of "
         f"{recipe.model.name_or_path} [family from {how}]; kept: method, quantization, data format, masking, "
         f"packing")
    echo(f"smoke: {template_note(recipe, chat)}")
    for path, old, new in changes:
        if path != "model.name_or_path":
            echo(f"smoke:   {path}: {_show(old)} -> {_show(new)}")
    for line in substituted:
        echo(f"smoke: {line}")
    return smoked


def _swap_for_cpu(r: Recipe, swap: Callable[[str, Any], None]) -> None:
    """Without CUDA: what needs it (16-bit matmuls, flash attention, paged optimizers, Triton kernels) swapped for
    what runs on the CPU."""
    swap("model.dtype", "float32")
    if r.model.attn_implementation == "flash_attention_2":
        swap("model.attn_implementation", None)
    if r.quantization is not None and r.quantization.bits is not None:
        swap("quantization.compute_dtype", "float32")
    if r.train.optimizer == "paged_adamw_8bit":
        swap("train.optimizer", "adamw_8bit")  # paging needs CUDA; same 8-bit state otherwise
    if r.train.compile:
        from ft_cli.model import compile_problem

        if compile_problem("cpu"):  # kept where it runs: compiling is part of how the recipe trains
            swap("train.compile", False)
    swap("train.liger_kernel", False)  # Triton kernels: CUDA only


def _swap_to_a_few_steps(r: Recipe, swap: Callable[[str, Any], None]) -> None:
    """A few short rows and a few steps, each of which logs, evaluates and saves as often as it can."""
    d, t = r.data, r.train
    swap("data.limit", min(d.limit or SMOKE_ROWS, SMOKE_ROWS))
    # Preference pairs are a prompt plus a whole reply each: twice the room, or most of ft's sample would not fit.
    swap("data.max_seq_len", min(d.max_seq_len, SMOKE_MAX_SEQ_LEN * (2 if d.format == "preference" else 1)))
    swap("train.max_steps", min(t.max_steps or SMOKE_STEPS, SMOKE_STEPS))
    swap("train.micro_batch_size", min(t.micro_batch_size, SMOKE_MICRO_BATCH))
    if t.eval_batch_size is not None:
        swap("train.eval_batch_size", min(t.eval_batch_size, SMOKE_MICRO_BATCH))
    swap("train.grad_accum", 1)
    swap("train.eval_every", 2)
    swap("train.save_every", 2)
    swap("train.log_every", 1)
    if t.warmup_steps is not None:
        swap("train.warmup_steps", min(t.warmup_steps, 1))
    swap("train.early_stopping_patience", None)
    swap("logging.trackers", [])


def template_note(recipe: Recipe, chat: Any) -> str:
    """Which chat template and special tokens the smoke run trains with - never claiming the real model's when ft
    has no copy of them."""
    name = recipe.model.name_or_path
    tokens = (f"{chat.source}'s special tokens (end of turn {chat.eos_token})" if chat is not None
              else "ChatML special tokens (<|im_start|>, end of turn <|im_end|>)")
    if recipe.data.chat_template:
        return f"chat template: the recipe's data.chat_template, with {tokens}"
    if recipe.data.format == "text":
        return f"format text (no chat template), with {tokens}"
    if recipe.data.format == "labelled":
        return "format labelled (task classification: no chat template)"
    if chat is not None:
        return (f"chat template and special tokens: {chat.source}'s own (a copy ships with ft, "
                f"builtin_chat/{chat.template_file}; end of turn {chat.eos_token})")
    return (f"chat template: ChatML - ft ships no copy of {name}'s own template and special tokens, so its "
            "rendering and masking are NOT exercised by this run (set data.chat_template to try another template)")


# labelled: the first 96 rows of GLUE SST-2 train (text, label 0/1); preference: the 64 pairs of LLaMA-Factory's
# dpo_en_demo.json (sharegpt turns + chosen/rejected) with the shortest prompt + longer reply.
SAMPLE_FILES = {"alpaca": "alpaca.json", "chat": "chat.jsonl", "sharegpt": "sharegpt.jsonl", "text": "text.jsonl",
                "labelled": "labelled.tsv", "preference": "preference.json"}


def sample_data(fmt: str) -> Path:
    """The sample dataset of format `fmt` that ships inside ft (so it is there in an installed ft too)."""
    from importlib import resources

    return Path(str(resources.files("ft_cli").joinpath("samples", SAMPLE_FILES[fmt])))


def use_samples_for_missing_data(r: Recipe, changes: list[tuple[str, Any, Any]]) -> list[str]:
    """Replace every data source that is not there (no such local file, directory or glob match; or a hub
    dataset) by ft's sample of the source's format, so any recipe smoke-tests offline; returns what it said."""
    d = r.data
    notes: list[str] = []
    for field in ("train", "eval"):
        value = getattr(d, field)
        if value is None:
            continue
        sources = d.sources if field == "train" else d.eval_sources
        for i, src in enumerate(sources):
            if _is_there(src.path):
                continue
            fmt = src.format or d.format
            sample = sample_data(fmt)
            where = f"data.{field}" + ("" if isinstance(value, str) else f"[{i}]")
            changes.append((where, src.path, str(sample)))
            notes.append(f"{where}: {src.path} is not there (a missing file, or a hub dataset that needs the "
                         f"network); using ft's {fmt} sample instead ({sample.name}, {SMOKE_ROWS} records). The "
                         "real run needs the real data.")
            if isinstance(value, str) and not d.columns:
                setattr(d, field, str(sample))
            elif isinstance(value, str):  # data.columns renames the real data's fields, not the sample's
                setattr(d, field, [DatasetSource(path=str(sample), columns={})])
            else:
                src.path, src.split, src.columns = str(sample), None, {}
    return notes


def _is_there(path: str) -> bool:
    import glob

    p = Path(path).expanduser()
    return p.exists() or (glob.has_magic(path) and bool(glob.glob(str(p), recursive=True)))


def model_family(recipe: Recipe) -> tuple[str, str]:
    """(tiny built-in model_type, how it was found) for the recipe's model, without the network."""
    from ft_cli.model_config import find_model_config

    name = recipe.model.name_or_path
    found = find_model_config(recipe.model)
    if found is not None and found.model_type:
        model_type = found.model_type
        family = _FAMILY_OF_MODEL_TYPE.get(model_type, model_type)
        how = f"model_type {model_type!r} in the {found.source} config.json"
        return family, how if family == model_type else how + f", closest built-in: {family}"
    lowered = name.lower()
    for pattern, family in _FAMILY_OF_NAME:
        if re.search(pattern, lowered):
            return family, f"the model name (no config.json offline; matched {pattern!r})"
    raise UserError(f"--smoke: cannot tell the architecture of model.name_or_path {name!r}: its config.json is not "
                    "in the local Hugging Face cache and the name mentions no known family (llama, qwen, mistral, "
                    "gemma, phi, gpt2); download its config once (huggingface-cli download "
                    f"{name} config.json) or use a local model directory")


def _section(recipe: Recipe, dotted: str) -> Any:
    node: Any = recipe
    for part in filter(None, dotted.split(".")):
        node = getattr(node, part)
    return node


def _show(value: Any) -> str:
    return "null" if value is None else repr(value) if isinstance(value, str) else str(value)
