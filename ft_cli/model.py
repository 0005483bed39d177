"""Base model and tokenizer: where the weights come from, quantization, dtype, and the method's adapter."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ft_cli.errors import UserError
from ft_cli.model_path import (  # noqa: F401  (ft_cli.model.resolve_model_path etc. stay importable)
    check_hub_reachable,
    remote_code_refused,
    resolve_model_path,
)
from ft_cli.precision import torch_dtype  # noqa: F401
from ft_cli.recipe import Recipe

if TYPE_CHECKING:
    pass


# Files a tokenizer is saved as (fast, sentencepiece, BPE/WordPiece vocabularies, tiktoken, Mistral's tekken).
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json", "vocab.txt",
                   "merges.txt", "spiece.model", "sentencepiece.bpe.model", "tekken.json", "tokenizer.tiktoken")


def check_tokenizer_files(path: str | Path, field: str | None = "model.name_or_path") -> None:
    """A local model directory must hold its tokenizer: without one transformers fails deep inside (or builds
    something unusable), so say so first."""
    p = Path(path)
    if p.is_dir() and not any((p / f).is_file() for f in TOKENIZER_FILES) and not any(p.glob("*.tiktoken")):
        raise UserError(f"{field + ': ' if field else ''}no tokenizer files in {p} (none of {', '.join(TOKENIZER_FILES[:4])}, ...); "
                        "save the base model's tokenizer there: AutoTokenizer.from_pretrained(BASE)"
                        f".save_pretrained({str(p)!r})")


def check_attn_implementation(recipe: Recipe, device_type: str) -> None:
    """model.attn_implementation: flash_attention_2 needs the flash-attn package and a CUDA GPU; say so before
    anything loads (transformers would fail only when the model loads, naming no recipe field)."""
    import importlib.util

    if recipe.model.attn_implementation != "flash_attention_2":
        return
    if importlib.util.find_spec("flash_attn") is None:
        raise UserError("model.attn_implementation: flash_attention_2 needs the flash-attn package, which is not "
                        "installed (pip install flash-attn); use sdpa (the default) instead")
    if device_type != "cuda":
        raise UserError(f"model.attn_implementation: flash_attention_2 runs on CUDA GPUs only and this run is on "
                        f"the {device_type}; use sdpa (the default) instead")


def load_tokenizer(recipe: Recipe, path: str | None = None):
    """The model's tokenizer, with a pad token and the recipe's chat template applied."""
    from transformers import AutoTokenizer

    path = path or resolve_model_path(recipe.model)
    check_tokenizer_files(path)
    try:
        tok = AutoTokenizer.from_pretrained(path, trust_remote_code=recipe.model.trust_remote_code,
                                            revision=recipe.model.revision)
    except ValueError as exc:
        if "trust_remote_code" in str(exc):
            raise remote_code_refused(path) from None
        raise
    ensure_pad_token(tok)
    tok.padding_side = "right"
    if recipe.data.format not in ("text", "labelled") or recipe.data.chat_template:
        from ft_cli.data.templates import resolve_chat_template

        resolve_chat_template(tok, recipe.data.chat_template)
    return tok


def ensure_pad_token(tok: Any) -> None:
    """Padding needs a pad token; a tokenizer without one pads with eos (or unk). Padded positions never carry
    loss (their labels are IGNORE_INDEX) and are masked out of attention, so which token pads does not matter."""
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token if tok.eos_token is not None else tok.unk_token


@dataclass
class BuiltModel:
    model: Any  # torch.nn.Module: a PeftModel for PEFT methods
    base_path: str
    trainable_params: int
    total_params: int
    liger_kernels: list[str] | None = None  # train.liger_kernel: the kernels applied
    qat: str | None = None  # train.qat: what was fake-quantized


def load_base_model(recipe: Recipe, path: str, device: Any = None, quantize: bool = True, dtype: str | None = None,
                    head: Any = None):
    """The pretrained base model in the recipe's dtype (or `dtype`), quantized with bitsandbytes when the recipe
    says so. task: classification loads AutoModelForSequenceClassification with `head`'s labels
    (ft_cli.tasks.classify_head.Head)."""
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    kwargs: dict[str, Any] = {
        "dtype": torch_dtype(dtype or recipe.model.dtype),
        "trust_remote_code": recipe.model.trust_remote_code,
        "revision": recipe.model.revision,
    }
    if recipe.model.attn_implementation:
        kwargs["attn_implementation"] = recipe.model.attn_implementation
    if recipe.model.rope_scaling is not None:
        kwargs["config"] = rope_scaled_config(recipe, path)
    if quantize and recipe.quantized:
        kwargs["quantization_config"] = bnb_config(recipe)
        kwargs["device_map"] = {"": device if device is not None else "cpu"}
    auto: Any = AutoModelForCausalLM
    if recipe.task == "classification":
        from ft_cli.tasks.classify_head import model_kwargs

        auto = AutoModelForSequenceClassification
        kwargs.update(model_kwargs(head))
    try:
        if recipe.task == "classification":
            from ft_cli.tasks.classify_head import record_new_modules

            model, info = auto.from_pretrained(path, output_loading_info=True, **kwargs)
            record_new_modules(model, info["missing_keys"])
        else:
            model = auto.from_pretrained(path, **kwargs)
    except ValueError as exc:
        if "trust_remote_code" in str(exc):
            raise remote_code_refused(path) from None
        raise
    except ImportError as exc:
        field = "model.attn_implementation" if "attention" in str(exc).lower() else "model.name_or_path"
        raise UserError(f"{field}: cannot load {path}: {exc}") from None
    if quantize and recipe.quantized:
        keep_bnb_cpu_path_trainable(model)
    # The pad token must be known to the model (generation, and models that mask pads themselves).
    return model


def rope_scaled_config(recipe: Recipe, path: str) -> Any:
    """The model's config with model.rope_scaling applied to its rotary embeddings (transformers 5's
    rope_parameters; the rope_theta and other fields of the model's own parameters are kept)."""
    from transformers import AutoConfig

    scaling = recipe.model.rope_scaling
    assert scaling is not None
    config = AutoConfig.from_pretrained(path, trust_remote_code=recipe.model.trust_remote_code,
                                        revision=recipe.model.revision)
    rope = dict(getattr(config, "rope_parameters", None) or {})
    rope.update(rope_type=scaling.type, factor=scaling.factor)
    if scaling.type in ("dynamic", "yarn"):
        rope.setdefault("original_max_position_embeddings", config.max_position_embeddings)
    config.rope_parameters = rope
    return config


def keep_bnb_cpu_path_trainable(model) -> int:
    """Turn off bitsandbytes' packed CPU inference kernel on every 4-bit layer; returns how many layers.

    bitsandbytes 0.50.2 (`Linear4bit.forward`) on a CPU with AVX512-BF16 repacks the 4-bit weight *in place* the
    first time a layer runs in eval mode without grad. The repack asserts unless out_features % 32 == 0, and after
    it every later training forward takes the packed kernel: outputs shift by ~4e-3 and no gradient reaches the
    layer's input — an evaluation would silently change training. ft keeps every layer on the dequantizing path
    on every CPU, for training, eval, merge and generate alike, so numbers never depend on the host's instruction
    set and ft never uses the packed kernel (docs/SPEC.md says why). tests/test_bnb_cpu_paths.py runs both
    settings whatever the host and fails when a bitsandbytes release stops repacking."""
    n = 0
    for module in model.modules():
        if hasattr(module, "support_avx512bf16_for_cpu"):
            module.support_avx512bf16_for_cpu = False
            n += 1
    return n


def bnb_config(recipe: Recipe):
    from transformers import BitsAndBytesConfig

    q = recipe.quantization
    assert q is not None and q.bits is not None
    # task classification: the new head is trained in full (peft's modules_to_save), so it must stay a plain layer
    # (DeBERTa-v2's new pooler too: ft_cli.tasks.classify_head.record_new_modules)
    skip = {"llm_int8_skip_modules": ["classifier", "score", "pooler"]} if recipe.task == "classification" else {}
    if q.bits == 8:
        return BitsAndBytesConfig(load_in_8bit=True, **skip)
    return BitsAndBytesConfig(
        **skip,
        load_in_4bit=True,
        bnb_4bit_quant_type=q.quant_type,
        bnb_4bit_use_double_quant=q.double_quant,
        bnb_4bit_compute_dtype=torch_dtype(q.compute_dtype),
        bnb_4bit_quant_storage=torch_dtype(recipe.model.dtype),
    )


def build_model(recipe: Recipe, device: Any = None, head: Any = None) -> BuiltModel:
    """Base model + the recipe's method (adapter, freezing, ...), ready to train. `head`: task classification's
    labels and pad token (ft_cli.tasks.classify_head.Head)."""
    from ft_cli.methods.apply import apply_method

    path = resolve_model_path(recipe.model)
    # float32 master weights under mixed precision (train.py runs them under autocast), model.dtype otherwise
    model = load_base_model(recipe, path, device=device, dtype=recipe.weights_dtype, head=head)
    # on the base's own modules, before an adapter wraps them
    liger = apply_liger_kernel(model, recipe) if recipe.train.liger_kernel else None
    if recipe.train.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.config.use_cache = False
    model = apply_method(model, recipe)
    if recipe.task == "classification":
        from ft_cli.tasks.classify_head import train_head

        train_head(model, recipe)
    trainable, total = count_parameters(model)
    if trainable == 0:
        raise UserError(f"method {recipe.method}: no parameter is trainable (check target_modules / trainable_modules)")
    qat = apply_qat(model, recipe) if recipe.train.qat else None  # after the method: LoRA's base layers exist now
    return BuiltModel(model=model, base_path=path, trainable_params=trainable, total_params=total,
                      liger_kernels=liger, qat=qat)


def apply_qat(model: Any, recipe: Recipe) -> str:
    """train.qat: fake-quantize the linear layers (ft_cli.qat); returns the line train prints about it."""
    import importlib.util

    if importlib.util.find_spec("torchao") is None:
        raise UserError("train.qat needs torchao, not installed here: pip install 'ft-cli[export]'")
    from ft_cli.qat import apply_qat as prepare
    from ft_cli.qat import skipped_note

    swapped, skipped = prepare(model)
    if swapped == 0:
        raise UserError(f"train.qat: no linear layer of this model can be quantized in groups of 32 "
                        f"({skipped_note(skipped, len(skipped))})")
    line = f"train.qat {recipe.train.qat}: {swapped} linear layers train fake-quantized (torchao)"
    return line + (f"; {skipped_note(skipped, swapped + len(skipped))}" if skipped else "")


def count_parameters(model) -> tuple[int, int]:
    trainable = total = 0
    for p in model.parameters():
        n = p.numel()
        # bitsandbytes packs two 4-bit values per byte
        if p.__class__.__name__ == "Params4bit":
            n *= 2
        total += n
        if p.requires_grad:
            trainable += n
    return trainable, total


# train.compile and train.liger_kernel -------------------------------------------------------------------------

def compile_problem(device_type: str) -> str | None:
    """Why torch.compile cannot run on `device_type` here (None when it can): its inductor backend generates C++
    on the CPU and Triton kernels on CUDA, and fails only at the first step without them."""
    if device_type == "cuda":
        from torch.utils._triton import has_triton

        return None if has_triton() else "torch.compile on CUDA needs triton, which is not installed (pip install triton)"
    if device_type == "cpu":
        try:
            from torch._inductor.cpp_builder import get_cpp_compiler

            get_cpp_compiler()
        except ImportError:
            return None  # another torch layout: let torch.compile say what it misses
        except Exception as exc:  # InvalidCxxCompiler
            return (f"torch.compile on the CPU needs a C++ compiler (g++ or clang++ on PATH, or CXX=...) and found "
                    f"none ({type(exc).__name__})")
    return None


def compile_blocks(model: Any) -> int:
    """train.compile: torch.compile every transformer block in place; returns how many.

    - In place (`nn.Module.compile`), so parameter and state-dict names do not change: checkpoints, the adapter and
      resume see the same model as without compile. `torch.compile(model)`, and accelerate's `dynamo_backend`, wrap
      the model instead and prefix every name with `_orig_mod.`.
    - The blocks, not the whole model ("regional compilation"): the blocks share their code, so the first one is
      compiled and the others reuse it (compile time does not grow with depth), and the outer forward code of peft
      and transformers, which dynamo cannot trace as one graph, stays eager. Embeddings, final norm, head and loss
      run eagerly.
    - dynamic=True: rows are padded to the longest in each micro-batch, so the sequence length changes every step;
      compiled for symbolic shapes once, not once per length. Evaluation (no_grad, eval mode) compiles once more.
    Gradient checkpointing is traced inside the compiled block (transformers checkpoints the block's forward)."""
    from ft_cli.methods.blocks import transformer_blocks

    try:
        _, blocks = transformer_blocks(model)
    except UserError as exc:
        raise UserError(f"train.compile: {exc.message}; set train.compile: false") from None
    for block in blocks:
        block.compile(dynamic=True)
    return len(blocks)


LIGER_KERNELS = ("rope", "rms_norm", "swiglu", "geglu", "layer_norm")


def apply_liger_kernel(model: Any, recipe: Recipe) -> list[str]:
    """train.liger_kernel: swap in liger-kernel's Triton kernels on this model instance (liger's
    `_apply_liger_kernel_to_instance`, which Hugging Face's Trainer uses too); returns the kernels asked for.

    RMSNorm / LayerNorm, SwiGLU / GeGLU MLP and RoPE replace the base's own computation and keep its module and
    parameter names, so an adapter added afterwards wraps the same Linear layers. The fused linear cross-entropy
    computes the loss from the last hidden states and lm_head's weight in chunks, never materialising the logits.
    It fits ft's loss: training passes num_items_in_batch (the step's trained tokens), with which liger returns
    sum / num_items_in_batch as transformers does, and only the loss is used; evaluation runs in eval mode, where
    liger computes the logits and transformers' loss as usual. It reads lm_head.weight directly, so it is left out
    when the method puts an adapter on the output head (lora.target_modules / modules_to_save, ia3.target_modules
    naming it, or the tied input embeddings), which it would ignore; the plain loss is used then."""
    import importlib.metadata
    import inspect

    from liger_kernel.transformers import _apply_liger_kernel_to_instance

    try:
        from liger_kernel.transformers.monkey_patch import MODEL_TYPE_TO_APPLY_LIGER_FN as supported
    except ImportError:
        supported = None
    model_type = getattr(model.config, "model_type", None)
    if supported is not None and model_type not in supported:
        version = importlib.metadata.version("liger-kernel")
        raise UserError(f"train.liger_kernel: liger-kernel {version} has no kernels for model type {model_type!r} "
                        f"(it has {', '.join(sorted(supported))}); set train.liger_kernel: false")
    fused = not _output_head_adapted(model, recipe)
    kernels = {k: True for k in LIGER_KERNELS}
    try:
        _apply_liger_kernel_to_instance(model=model, **kernels, cross_entropy=False, fused_linear_cross_entropy=fused)
    except NotImplementedError:  # no fused loss for this architecture (e.g. granite scales its logits)
        fused = False
        _apply_liger_kernel_to_instance(model=model, **kernels, cross_entropy=False, fused_linear_cross_entropy=False)
    takes = inspect.signature(supported[model_type]).parameters if supported else kernels
    return [k for k in LIGER_KERNELS if k in takes] + (["fused_linear_cross_entropy"] if fused else [])


def _output_head_adapted(model: Any, recipe: Recipe) -> bool:
    """Whether the recipe's method wraps the output head (or the input embeddings tied to it) in adapter layers."""
    names = {id(m): n for n, m in model.named_modules()}
    head = model.get_output_embeddings()
    if head is None or id(head) not in names:
        return True  # cannot tell: keep the plain loss
    heads = [names[id(head)]]
    embeddings = model.get_input_embeddings()
    if getattr(model.config, "tie_word_embeddings", False) and id(embeddings) in names:
        heads.append(names[id(embeddings)])
    return adapts_any(recipe, heads)


def adapts_any(recipe: Recipe, module_names: list[str]) -> bool:
    """Whether the recipe's method puts adapter layers on (or trains in full) any of these modules."""
    keys: list[str] = []
    if recipe.lora is not None:
        if isinstance(recipe.lora.target_modules, list):  # "all-linear" never includes the output layer
            keys += recipe.lora.target_modules
        keys += recipe.lora.modules_to_save or []
    if recipe.ia3 is not None:
        keys += recipe.ia3.target_modules or []
    return any(h == k or h.endswith("." + k) for h in module_names for k in keys)
