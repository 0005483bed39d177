"""Built-in tiny models that need no network: `model.name_or_path: builtin:tiny-llama`.

Each built-in is a randomly initialised model of a real Hugging Face architecture plus a real byte-level BPE
tokenizer trained here, from text that ships with ft (builtin_corpus.py), with a ChatML chat template
(templates/chatml.jinja). It is built on first use into

    $FT_CACHE_DIR/builtin/<name>-<hash>        (FT_CACHE_DIR defaults to ~/.cache/ft)

and loaded from there like any local model directory. The hash covers everything the files are made from, so
a change to a spec, the corpus or the template builds a new directory instead of reusing a stale one. Builds
are deterministic (same inputs, bitwise-identical files) and atomic (built in a temporary sibling directory,
then renamed), so several processes of one distributed run can start at once.

torch, transformers and tokenizers are imported only inside the functions that build: `ft --help` and
`ft validate` import this module and must stay fast.
"""

from __future__ import annotations

import difflib
import hashlib
import json
import logging
import os
import shutil
import tempfile
from dataclasses import asdict, dataclass
from importlib import metadata
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ft_cli.atomic import publish_once
from ft_cli.builtin_tokenizers import (
    ENCODER_MAX_LENGTH,
    MODEL_MAX_LENGTH,
    build_tokenizer,
    build_wordpiece_tokenizer,
    chat_template,
    tokenizer_inputs,
)
from ft_cli.errors import UserError

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerFast

    from ft_cli.chat_profiles import ChatProfile

log = logging.getLogger(__name__)

BUILTIN_PREFIX = "builtin:"
# Bump when the build changes in a way the spec, corpus and template do not show (e.g. how weights are saved).
FORMAT_VERSION = 3  # 3: the WordPiece vocabulary is shipped (builtin_wordpiece.txt), not trained per build

_COMPLETE_MARKER = "ft_builtin.json"  # written last: a directory without it is not a finished build


@dataclass(frozen=True)
class BuiltinSpec:
    """One built-in model: a Hugging Face architecture (`model_type`) at a given size."""

    name: str
    model_type: str
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    intermediate_size: int
    tie_word_embeddings: bool
    description: str
    seed: int = 0
    # Further config fields, as (key, value) pairs so the spec stays hashable.
    extra_config: tuple[tuple[str, Any], ...] = ()


# Wider than the usual 0.02: with a frozen random output head of std 0.02 the logits of a 64-wide model stay
# near uniform whatever the adapter does (loss stuck near ln(vocab)); at 0.1, LoRA can visibly fit data.
_INIT = ("initializer_range", 0.1)


def _tiny(model_type: str, *, tie: bool, kv_heads: int = 2, intermediate: int = 176,
          extra: tuple[tuple[str, Any], ...] = ()) -> BuiltinSpec:
    return BuiltinSpec(name=f"tiny-{model_type}", model_type=model_type, hidden_size=64, num_layers=2, num_heads=4,
                       num_kv_heads=kv_heads, intermediate_size=intermediate, tie_word_embeddings=tie,
                       description=f"tiny random {model_type} for tests and --smoke (2 layers, hidden 64)",
                       extra_config=(_INIT, *extra))


BUILTIN_SPECS: dict[str, BuiltinSpec] = {spec.name: spec for spec in (
    _tiny("llama", tie=False),
    _tiny("mistral", tie=False),
    _tiny("qwen2", tie=True),  # Qwen2's attention has q/k/v biases; small Qwen2.5 models tie embeddings
    _tiny("qwen3", tie=True),
    _tiny("gemma", tie=True, kv_heads=1),  # Gemma always ties; gemma-2b uses one KV head
    _tiny("gemma2", tie=True, extra=(("query_pre_attn_scalar", 16),)),
    _tiny("phi3", tie=False),  # fused qkv_proj and gate_up_proj
    _tiny("gpt2", tie=True, kv_heads=4, intermediate=256),  # Conv1D c_attn / c_proj / c_fc, no GQA
    # An encoder for task: classification (AutoModelForSequenceClassification pools [CLS]), with a WordPiece
    # tokenizer ([CLS] text [SEP], lower-cased, Chinese characters split one per token) as BERT's.
    BuiltinSpec(name="tiny-bert", model_type="bert", hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=4,
                intermediate_size=176, tie_word_embeddings=True,
                description="tiny random BERT encoder for classification tests and --smoke (2 layers, hidden 64)",
                extra_config=(_INIT,)),
    BuiltinSpec(name="small-bert", model_type="bert", hidden_size=512, num_layers=6, num_heads=8, num_kv_heads=8,
                intermediate_size=2048, tie_word_embeddings=True,
                description="~30M-parameter random BERT encoder for classification benchmarks (6 layers, hidden 512)",
                extra_config=(("initializer_range", 0.02),)),
    BuiltinSpec(name="small-llama", model_type="llama", hidden_size=512, num_layers=6, num_heads=8, num_kv_heads=8,
                intermediate_size=1376, tie_word_embeddings=False,
                description="~21M-parameter random llama for benchmarks (6 layers, hidden 512)",
                extra_config=(("initializer_range", 0.02),)),
)}
# `ft train --smoke` swaps a recipe's model for the tiny built-in of the same family.
_TINY_BY_MODEL_TYPE = {spec.model_type: spec for spec in BUILTIN_SPECS.values() if spec.name.startswith("tiny-")}


def is_builtin(name: str) -> bool:
    return name.startswith(BUILTIN_PREFIX)


def builtin_names() -> list[str]:
    """Every built-in, as users write it in a recipe: `builtin:tiny-llama`, ..."""
    return [BUILTIN_PREFIX + name for name in BUILTIN_SPECS]


def builtin_spec(name: str) -> BuiltinSpec:
    """The spec of built-in `name` (`builtin:tiny-llama`; the prefix is optional), without building anything:
    `ft validate` checks the name with this."""
    short = name.removeprefix(BUILTIN_PREFIX)
    spec = BUILTIN_SPECS.get(short)
    if spec is None:
        close = difflib.get_close_matches(short, list(BUILTIN_SPECS), n=1)
        hint = f" (did you mean {BUILTIN_PREFIX}{close[0]}?)" if close else ""
        raise UserError(f"unknown built-in model {BUILTIN_PREFIX + short!r}{hint}; "
                        f"available: {', '.join(builtin_names())}")
    return spec


def resolve_builtin(name: str, cache_dir: str | os.PathLike | None = None) -> Path:
    """The local model directory of built-in `name`, built on first use. `cache_dir` is ft's cache root
    (default: $FT_CACHE_DIR, else ~/.cache/ft); the model lives in `<cache_dir>/builtin/<name>-<hash>`."""
    return _ensure_built(builtin_spec(name), _cache_root(cache_dir))


def tiny_model_dir_for(model_type: str, cache_dir: str | os.PathLike | None = None,
                       chat: ChatProfile | None = None) -> Path:
    """A tiny random model of Hugging Face `model_type` (config.json's "model_type"), with the built-in
    tokenizer: what `ft train --smoke` trains instead of a recipe's real model. With `chat`, the tokenizer has that
    model's special tokens and chat template (ft_cli.chat_profiles) instead of ChatML's."""
    spec = _TINY_BY_MODEL_TYPE.get(model_type)
    if spec is None:
        close = difflib.get_close_matches(model_type, list(_TINY_BY_MODEL_TYPE), n=1)
        hint = f" (did you mean {close[0]}?)" if close else ""
        raise UserError(f"no built-in tiny model for model_type {model_type!r}{hint}; "
                        f"supported: {', '.join(sorted(_TINY_BY_MODEL_TYPE))}")
    return _ensure_built(spec, _cache_root(cache_dir), chat)


# Cache -------------------------------------------------------------------------------------------------------


def _cache_root(cache_dir: str | os.PathLike | None) -> Path:
    if cache_dir is None:
        cache_dir = os.environ.get("FT_CACHE_DIR") or Path.home() / ".cache" / "ft"
    return Path(cache_dir).expanduser()


def build_key(spec: BuiltinSpec, chat: ChatProfile | None = None) -> str:
    """A short hash of everything a built-in's files are made from."""
    from ft_cli.builtin_corpus import corpus

    fields = asdict(spec)
    fields.pop("description")  # documentation only: editing it must not rebuild anything
    inputs = {
        "format_version": FORMAT_VERSION,
        "spec": fields,
        "corpus": hashlib.sha256("\n\n".join(corpus()).encode()).hexdigest(),
        "template": hashlib.sha256(chat_template().encode()).hexdigest(),
        "tokenizer": tokenizer_inputs(),
        # A directory saved by one major version of transformers may not load in another.
        "transformers": metadata.version("transformers").split(".")[0],
    }
    if chat is not None:
        inputs["chat"] = chat.key()
    return hashlib.sha256(json.dumps(inputs, sort_keys=True).encode()).hexdigest()[:10]


def _ensure_built(spec: BuiltinSpec, root: Path, chat: ChatProfile | None = None) -> Path:
    name = spec.name if chat is None else f"{spec.name}+{chat.name}"
    target = root / "builtin" / f"{name}-{build_key(spec, chat)}"
    if (target / _COMPLETE_MARKER).is_file():
        try:
            os.utime(target / _COMPLETE_MARKER)  # last use, for `ft cache clean --older-than`
        except OSError:
            pass  # a read-only shared cache
        return target
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent))
        tmp.chmod(0o755)  # mkdtemp makes it private; the cache may be shared
    except OSError as exc:
        raise UserError(f"cannot write built-in model {BUILTIN_PREFIX}{spec.name} under {target.parent} "
                        f"({exc.strerror}); set FT_CACHE_DIR to a writable directory") from None
    try:
        log.info("building %s%s in %s", BUILTIN_PREFIX, name, target)
        _build_model_dir(spec, tmp, chat)
        if target.exists() and not (target / _COMPLETE_MARKER).is_file():
            # Left half-made by something other than this function (renames are atomic): replace it.
            shutil.rmtree(target, ignore_errors=True)
        # Another process may rename its (identical) build into place first: then theirs is used.
        publish_once(tmp, target, complete=lambda t: (t / _COMPLETE_MARKER).is_file())
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


# Build -------------------------------------------------------------------------------------------------------


def _build_model_dir(spec: BuiltinSpec, out: Path, chat: ChatProfile | None = None) -> None:
    """Write the tokenizer, the model and, last, the marker that says the directory is complete."""
    tokenizer = build_wordpiece_tokenizer() if spec.model_type in ENCODER_TYPES else build_tokenizer(chat)
    model = _build_model(spec, tokenizer, chat)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    # transformers 5 loads qwen2 directories with Qwen2Tokenizer, whose default unk token <|endoftext|> we do
    # not have (it would be added as a new token): say explicitly that there is none.
    tokenizer_config = json.loads((out / "tokenizer_config.json").read_text(encoding="utf-8"))
    if spec.model_type not in ENCODER_TYPES:
        tokenizer_config["unk_token"] = None
    (out / "tokenizer_config.json").write_text(json.dumps(tokenizer_config, indent=2) + "\n", encoding="utf-8")
    marker = {"name": BUILTIN_PREFIX + spec.name, "key": build_key(spec, chat), "format_version": FORMAT_VERSION,
              "parameters": sum(p.numel() for p in model.parameters()), "spec": asdict(spec),
              "chat": None if chat is None else {"profile": chat.name, "source": chat.source}}
    (out / _COMPLETE_MARKER).write_text(json.dumps(marker, indent=2) + "\n", encoding="utf-8")


def _build_model(spec: BuiltinSpec, tokenizer: PreTrainedTokenizerFast,
                 chat: ChatProfile | None = None) -> PreTrainedModel:
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, GenerationConfig

    ids = {"bos_token_id": tokenizer.bos_token_id, "eos_token_id": tokenizer.eos_token_id,
           "pad_token_id": tokenizer.pad_token_id}
    stops = [tokenizer.convert_tokens_to_ids(t) for t in chat.generation_eos] if chat is not None else None
    # Rounded up to a multiple of 64, as real models do for fast matmuls; the spare rows are never produced.
    vocab_size = -(-len(tokenizer) // 64) * 64
    if spec.model_type in ENCODER_TYPES:
        return _build_encoder(spec, tokenizer)
    if spec.model_type == "gpt2":
        sizes = {"n_embd": spec.hidden_size, "n_layer": spec.num_layers, "n_head": spec.num_heads,
                 "n_inner": spec.intermediate_size, "n_positions": MODEL_MAX_LENGTH}
    else:
        sizes = {"hidden_size": spec.hidden_size, "num_hidden_layers": spec.num_layers,
                 "num_attention_heads": spec.num_heads, "num_key_value_heads": spec.num_kv_heads,
                 "head_dim": spec.hidden_size // spec.num_heads, "intermediate_size": spec.intermediate_size,
                 "max_position_embeddings": MODEL_MAX_LENGTH}
    config = AutoConfig.for_model(spec.model_type, vocab_size=vocab_size,
                                  tie_word_embeddings=spec.tie_word_embeddings, **sizes, **ids,
                                  **dict(spec.extra_config))
    # Seeded in a forked RNG: the same spec gives the same weights, and the caller's random state is untouched.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(spec.seed)
        model = AutoModelForCausalLM.from_config(config)
    model.to(torch.float32)
    model.generation_config = GenerationConfig(**{**ids, "eos_token_id": stops or ids["eos_token_id"]})
    return model


ENCODER_TYPES = ("bert",)


def _build_encoder(spec: BuiltinSpec, tokenizer: PreTrainedTokenizerFast) -> PreTrainedModel:
    """A BERT-style encoder with its pre-training heads and pooler (what bert-base-uncased is saved as); AutoModelForSequenceClassification
    loads its encoder and adds a new head."""
    import torch
    from transformers import AutoConfig, AutoModelForPreTraining

    vocab_size = -(-len(tokenizer) // 64) * 64
    config = AutoConfig.for_model(spec.model_type, vocab_size=vocab_size, hidden_size=spec.hidden_size,
                                  num_hidden_layers=spec.num_layers, num_attention_heads=spec.num_heads,
                                  intermediate_size=spec.intermediate_size,
                                  max_position_embeddings=ENCODER_MAX_LENGTH, pad_token_id=tokenizer.pad_token_id,
                                  tie_word_embeddings=spec.tie_word_embeddings, **dict(spec.extra_config))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(spec.seed)
        model = AutoModelForPreTraining.from_config(config)
    return model.to(torch.float32)
