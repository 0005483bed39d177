"""`ft plan RECIPE`: how much GPU memory training will need at its peak, estimated from the model config alone.

No weights are loaded: the model is built on the meta device (shapes only) and the recipe's method applied to it,
so parameter counts are exact. Bytes per parameter follow what `ft train` actually does:

- weights: the model dtype; with quantization, bitsandbytes replaces every linear layer but the output head
  (4-bit: 0.5 byte/param + one absmax per 64 weights, itself 8-bit with double quant; 8-bit: 1 byte + an fp32
  scale per row) and everything else (embeddings, head, norms) stays in the model dtype
  (ft.methods.apply.prepare_quantized does not upcast it);
- PEFT adapters are kept in float32 (autocast_adapter_dtype); full/freeze with a 16-bit dtype and
  train.mixed_precision hold float32 master weights (so float32 gradients and AdamW state) and compute under
  autocast, which holds a 16-bit copy of each linear weight through the forward (counted with the activations);
  with mixed_precision false they train in the model dtype;
- gradients: one per trainable parameter, in its dtype; AdamW: two states in the parameter's dtype
  (bitsandbytes 8-bit AdamW: 2 bytes + block constants, for tensors of 4096+ elements);
- activations per transformer block, after Korthikanti et al. 2022 ("Reducing activation recomputation in large
  transformer models"), re-derived for the block's real widths (GQA, gated MLPs): the tensors autograd keeps
  for backward. With SDPA/flash attention the s^2 attention-probability term disappears. With gradient
  checkpointing only each block's input is kept, plus one block's activations while it is recomputed.
  Activations are in the model dtype (QLoRA included: bitsandbytes returns its input's dtype), LoRA's own in
  float32; under mixed precision the residual stream (block inputs, norm inputs) is float32, as the float32
  embeddings and norms are not autocast;
- logits: batch x seq x vocab: the logits the model returns (the activation dtype; float32 under mixed precision,
  where accelerate converts outputs) plus, at the start of backward, three float32 tensors of the loss: the
  log-softmax saved for backward, the gradient arriving at it and the one it computes (measured: 14 bytes per
  logit for bfloat16 logits, 16 for float32, on the CPU where freed memory is returned at once); with
  train.liger_kernel's fused linear cross-entropy, chunks of float32 logits instead (`fused_loss_bytes`);
- overhead: CUDA context and library workspaces, plus allocator fragmentation.

These are estimates of the worst case (every row max_seq_len tokens long); measured peaks differ by kernels,
sequence lengths and the allocator, typically within 10-20 %.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ft_cli.errors import UserError
from ft_cli.plan_table import print_plan
from ft_cli.progress import format_bytes
from ft_cli.recipe import Recipe, load_recipe, recipe_errors

GIB = 2**30
CUDA_CONTEXT_BYTES = int(0.8 * GIB)  # CUDA context, cuBLAS/cuDNN workspaces: outside torch's allocator
FRAGMENTATION = 0.08  # the caching allocator reserves more than it hands out
DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
NF4_BLOCK = 64  # bitsandbytes 4-bit: one absmax per 64 weights
NESTED_BLOCK = 256  # double quant: the absmaxes are 8-bit, one fp32 absmax per 256 of them
ADAM8_MIN_SIZE = 4096  # bitsandbytes keeps 32-bit state for smaller tensors
ADAM8_BLOCK = 256


@dataclass(frozen=True)
class ModelShape:
    """The widths that activations scale with, read from the config."""

    model_type: str
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    intermediate: int
    vocab: int
    gated_mlp: bool
    tied_embeddings: bool = False


@dataclass
class ParamCounts:
    """Parameter counts from the meta model (exact); bytes per element as `ft train` holds them."""

    total: int  # base model parameters (a tied head counted once)
    quantizable: int  # weights of the linear layers bitsandbytes would quantize
    quantizable_rows: int  # their output rows (8-bit keeps one fp32 scale per row)
    base_bytes: int  # all base parameters in the model dtype
    trainable: list[tuple[int, int]] = field(default_factory=list)  # (numel, bytes per element)
    added: int = 0  # parameters the method adds (adapters); 0 for full/freeze
    added_bytes: int = 0
    lora_inputs_per_layer: int = 0  # sum of in_features of LoRA-wrapped linears in one block
    lora_rank_per_layer: int = 0  # sum of ranks of those

    @property
    def trainable_count(self) -> int:
        return sum(n for n, _ in self.trainable)


@dataclass(frozen=True)
class Row:
    name: str
    bytes: int
    detail: str


@dataclass
class MemoryPlan:
    recipe: Recipe
    shape: ModelShape
    counts: ParamCounts
    micro_batch_size: int
    seq_len: int
    static: list[Row]  # independent of the batch: weights, adapter, gradients, optimizer
    activations: Row  # with the recipe's gradient_checkpointing setting
    activations_other: Row  # with the opposite setting
    logits: Row
    overhead: Row

    @property
    def rows(self) -> list[Row]:
        return [*self.static, self.activations, self.logits, self.overhead]

    @property
    def total(self) -> int:
        return sum(r.bytes for r in self.rows)

    @property
    def total_other_checkpointing(self) -> int:
        """The total with gradient_checkpointing flipped."""
        subtotal = sum(r.bytes for r in self.static) + self.activations_other.bytes + self.logits.bytes
        return subtotal + _overhead(subtotal)

    def weights_bytes(self) -> int:
        return sum(r.bytes for r in self.static if r.name.startswith("base weights"))


@dataclass(frozen=True)
class Suggestion:
    micro_batch_size: int | None  # None: not even 1 fits
    grad_accum: int
    total: int
    effective_batch: int
    note: str


# Entry point ---------------------------------------------------------------------------------------------------

def plan_recipe(recipe_path: Path, overrides: list[str], *, gpu_memory: float | None = None,
                console: Any = None) -> MemoryPlan:
    """Estimate, print a table and, with `gpu_memory` (GiB), suggest the largest micro-batch that fits."""
    from rich.console import Console

    recipe = load_recipe(recipe_path, overrides)
    if gpu_memory is not None and gpu_memory <= 0:
        raise UserError(f"--gpu-memory: must be a positive number of GiB, got {gpu_memory:g}")
    with recipe_errors(recipe):
        config, where = load_model_config(recipe)
        plan = estimate_memory(config, recipe)
    console = console or Console(highlight=False)
    print_plan(plan, console, where)
    if gpu_memory is not None:
        suggestion = suggest_micro_batch(plan, gpu_memory * GIB)
        console.print(suggestion.note)
    return plan


def load_model_config(recipe: Recipe) -> tuple[Any, str]:
    """The transformers config of the recipe's model, without its weights (offline unless the hub is allowed)."""
    from transformers import AutoConfig

    from ft_cli.model_config import find_model_config

    name = recipe.model.name_or_path
    found = find_model_config(recipe.model, download=True)
    if found is None:
        raise UserError(f"model.name_or_path: the config of {name!r} is not in the local Hugging Face cache and the "
                        "hub is off (HF_HUB_OFFLINE=1); ft plan needs only config.json: huggingface-cli download "
                        f"{name} config.json, or point model.name_or_path at a local directory")
    try:
        config = AutoConfig.from_pretrained(str(found.path.parent), trust_remote_code=recipe.model.trust_remote_code)
    except (OSError, ValueError, KeyError) as exc:
        raise UserError(f"{found.path}: transformers cannot read this config ({exc})") from None
    return config, f"{found.source}: {found.path}"


# Counting --------------------------------------------------------------------------------------------------------

def model_shape(config: Any) -> ModelShape:
    c = config.get_text_config() if hasattr(config, "get_text_config") else config

    def get(*names: str, default: Any = None) -> Any:
        for n in names:
            v = getattr(c, n, None)
            if v is not None:
                return v
        return default

    hidden = get("hidden_size", "n_embd", "d_model")
    layers = get("num_hidden_layers", "n_layer", "num_layers")
    heads = get("num_attention_heads", "n_head")
    vocab = get("vocab_size")
    if not all(isinstance(v, int) for v in (hidden, layers, heads, vocab)):
        raise UserError(f"model config ({getattr(c, 'model_type', '?')}): cannot find hidden size, layers, heads "
                        "and vocabulary size in it; ft plan supports decoder-only transformers")
    head_dim = get("head_dim", default=None) or hidden // heads
    model_type = getattr(c, "model_type", "?")
    gated = model_type not in ("gpt2", "gpt_neox", "gptj", "opt", "bloom", "falcon", "phi", "starcoder2")
    return ModelShape(model_type=model_type, hidden=hidden, layers=layers, heads=heads,
                      kv_heads=get("num_key_value_heads", "num_kv_heads", default=heads), head_dim=head_dim,
                      intermediate=get("intermediate_size", "n_inner", "ffn_dim", default=None) or 4 * hidden,
                      vocab=vocab, gated_mlp=gated, tied_embeddings=bool(get("tie_word_embeddings", default=False)))


def count_params(config: Any, recipe: Recipe) -> ParamCounts:
    """Build the model on the meta device, note what bitsandbytes would quantize, apply the method, count."""
    import torch
    from transformers import AutoModelForCausalLM
    from transformers.pytorch_utils import Conv1D

    from ft_cli.methods.apply import apply_method
    from ft_cli.precision import torch_dtype

    with torch.device("meta"):  # float32 master weights under mixed precision
        model = AutoModelForCausalLM.from_config(config, dtype=torch_dtype(recipe.weights_dtype),
                                                 trust_remote_code=recipe.model.trust_remote_code)
    skip = _modules_not_quantized(model)
    quantizable = rows = 0
    for name, module in model.named_modules():
        if (type(module) is torch.nn.Linear or isinstance(module, Conv1D)) and _converts(name, skip):
            quantizable += module.weight.numel()
            rows += module.weight.shape[0] if type(module) is torch.nn.Linear else module.weight.shape[1]
    base = list(model.parameters())
    base_ids = {id(p) for p in base}
    counts = ParamCounts(total=sum(p.numel() for p in base), quantizable=quantizable, quantizable_rows=rows,
                         base_bytes=sum(p.numel() * p.element_size() for p in base))
    # validate.count_trainable counts with this too. Apply the method without quantization (bitsandbytes cannot run on meta).
    meta_recipe = recipe.model_copy(update={"quantization": None}, deep=True)
    try:
        model = apply_method(model, meta_recipe)
    except NotImplementedError as exc:
        raise UserError(f"method: ft plan cannot size {recipe.method!r} yet ({exc})") from None
    for p in model.parameters():  # PEFT adapters are float32 already (autocast_adapter_dtype)
        size = p.element_size()
        if p.requires_grad:
            counts.trainable.append((p.numel(), size))
        if id(p) not in base_ids:
            counts.added += p.numel()
            counts.added_bytes += p.numel() * size
    if recipe.spec.family == "lora":
        per_model_in = per_model_rank = 0
        for module in model.modules():
            if hasattr(module, "lora_A") and hasattr(module, "in_features") and len(module.lora_A):
                per_model_in += module.in_features
                per_model_rank += next(iter(module.lora_A.values())).out_features
        layers = max(model_shape(config).layers, 1)
        counts.lora_inputs_per_layer = per_model_in // layers
        counts.lora_rank_per_layer = per_model_rank // layers
    return counts


def _modules_not_quantized(model: Any) -> list[str]:
    try:
        from transformers.quantizers.base import get_keys_to_not_convert

        return list(get_keys_to_not_convert(model))
    except ImportError:  # older transformers: the output head is what it skips
        return ["lm_head"]


def _converts(name: str, skip: list[str]) -> bool:
    try:
        from transformers.quantizers.quantizers_utils import should_convert_module

        return should_convert_module(name, skip)
    except ImportError:
        return not any(name == s or name.startswith(s + ".") or name.endswith(s) for s in skip)


# Arithmetic ------------------------------------------------------------------------------------------------------

def estimate_memory(config: Any, recipe: Recipe, *, counts: ParamCounts | None = None,
                    micro_batch_size: int | None = None) -> MemoryPlan:
    shape = model_shape(config)
    counts = counts or count_params(config, recipe)
    return _plan(recipe, shape, counts, micro_batch_size or recipe.train.micro_batch_size)


def _plan(recipe: Recipe, shape: ModelShape, counts: ParamCounts, pairs_or_rows: int) -> MemoryPlan:
    s = recipe.data.max_seq_len
    # Preference objectives score a pair's chosen and rejected sequences in one forward: twice the rows.
    per_row = 2 if recipe.objective != "sft" else 1
    b = pairs_or_rows * per_row
    static = weight_rows(recipe, counts) + training_state_rows(recipe, counts)
    act_bytes = activation_dtype_bytes(recipe)
    stream = stream_dtype_bytes(recipe)
    eager = recipe.model.attn_implementation == "eager"
    full = activation_bytes(shape, counts, recipe, b, s, checkpointing=False)
    ckpt = activation_bytes(shape, counts, recipe, b, s, checkpointing=True)
    attn = "eager attention keeps the s^2 probabilities" if eager else "SDPA/flash: no s^2 attention term"
    dtype = f"{act_bytes}-byte activations"
    if stream != act_bytes:
        dtype += f", {stream}-byte residual stream, + {recipe.model.dtype} autocast copies of the linear weights"
    ckpt_row = Row("activations (gradient checkpointing)", ckpt,
                   f"{shape.layers} block inputs + one block recomputed; {b} x {s} tokens, {dtype}")
    full_row = Row("activations (no checkpointing)", full,
                   f"{shape.layers} blocks x tensors kept for backward; {b} x {s} tokens, {dtype}; {attn}")
    on = recipe.train.gradient_checkpointing
    held = 4 if recipe.autocast_dtype else act_bytes  # accelerate returns autocast outputs in float32
    if recipe.task == "classification":  # the head reads one token per row: b x classes logits, no vocab ones
        logits = Row("logits and loss", 0, f"task classification: {b} rows x a few class logits (the vocabulary's "
                     "logits are never computed)")
    elif liger_fused_loss(recipe, shape):
        logits = Row("logits and loss (liger fused)", fused_loss_bytes(shape, b, s, act_bytes),
                     f"liger's fused linear cross-entropy: float32 logits and their gradient for chunks of ~{b} x "
                     f"{s} x hidden {shape.hidden:,} / vocab {shape.vocab:,} tokens at a time, never all "
                     f"{b} x {s} x {shape.vocab:,} logits; + the hidden states' gradient")
    else:
        logits = Row("logits and loss", logits_bytes(shape, b, s, held),
                     f"{b} x {s} x vocab {shape.vocab:,}: {held}-byte logits + the loss's float32 log-softmax and "
                     "its two gradients in backward")
    subtotal = sum(r.bytes for r in static) + (ckpt if on else full) + logits.bytes
    overhead = Row("CUDA context + allocator", _overhead(subtotal),
                   f"{CUDA_CONTEXT_BYTES / GIB:.1f} GiB context and workspaces + {FRAGMENTATION:.0%} fragmentation")
    return MemoryPlan(recipe=recipe, shape=shape, counts=counts, micro_batch_size=pairs_or_rows, seq_len=s,
                      static=static,
                      activations=ckpt_row if on else full_row, activations_other=full_row if on else ckpt_row,
                      logits=logits, overhead=overhead)


def weight_rows(recipe: Recipe, c: ParamCounts) -> list[Row]:
    dtype = recipe.model.dtype
    q = recipe.quantization
    if not recipe.quantized or q is None:
        if recipe.autocast_dtype:
            return [Row("base weights", c.base_bytes, f"{c.total:,} params in float32: master weights "
                        f"(train.mixed_precision; computed and saved in {dtype})")]
        return [Row("base weights", c.base_bytes, f"{c.total:,} params in {dtype}")]
    other = c.total - c.quantizable
    if q.bits == 4:
        per_param = 0.5 + (1 / NF4_BLOCK + 4 / (NF4_BLOCK * NESTED_BLOCK) if q.double_quant else 4 / NF4_BLOCK)
        quant = Row("base weights, 4-bit", math.ceil(c.quantizable * per_param),
                    f"{c.quantizable:,} linear-layer params, {q.quant_type}: {8 * per_param:.2f} bits/param with "
                    f"{'double-quantized ' if q.double_quant else ''}block constants")
    else:
        quant = Row("base weights, 8-bit", c.quantizable + 4 * c.quantizable_rows,
                    f"{c.quantizable:,} linear-layer params in int8 + one float32 scale per row")
    rest = Row("base weights, not quantized", other * DTYPE_BYTES[dtype],
               f"{other:,} params (embeddings, head, norms) in {dtype}, not upcast")
    return [quant, rest]


def training_state_rows(recipe: Recipe, c: ParamCounts) -> list[Row]:
    rows: list[Row] = []
    n = c.trainable_count
    if c.added:
        rows.append(Row("adapter weights", c.added_bytes,
                        f"{c.added:,} params the method adds "
                        f"({'float32' if recipe.is_peft else recipe.weights_dtype})"))
    grads = sum(k * size for k, size in c.trainable)
    rows.append(Row("gradients", grads, f"one per trainable param ({n:,}), in its dtype"))
    opt = recipe.train.optimizer
    if opt == "adamw_torch":
        state = sum(2 * k * size for k, size in c.trainable)
        how = "AdamW: 2 states per trainable param, in its dtype"
    else:
        state = sum(math.ceil(k * (2 + 8 / ADAM8_BLOCK)) if k >= ADAM8_MIN_SIZE else 8 * k for k, _ in c.trainable)
        how = f"{opt}: 2 x 8-bit states + block constants (float32 for tensors under {ADAM8_MIN_SIZE} elements)"
        if opt == "paged_adamw_8bit":
            how += "; paged: can spill to CPU memory under pressure"
    rows.append(Row("optimizer state", state, how))
    return rows


def activation_dtype_bytes(recipe: Recipe) -> int:
    """Bytes per activation element: the model dtype, which is also autocast's under mixed precision. QLoRA too:
    embeddings and norms stay in the model dtype and bitsandbytes returns outputs in its input's dtype."""
    return DTYPE_BYTES[recipe.model.dtype]


def stream_dtype_bytes(recipe: Recipe) -> int:
    """Bytes per element of the residual stream. Under mixed precision it is float32: the embedding lookup and
    the norms are not autocast and run on float32 master weights, and a 16-bit block output added to a float32
    stream stays float32 (only matmul inputs and outputs are 16-bit)."""
    return 4 if recipe.autocast_dtype else activation_dtype_bytes(recipe)


def activation_bytes(shape: ModelShape, c: ParamCounts, recipe: Recipe, b: int, s: int, *,
                     checkpointing: bool) -> int:
    """Bytes autograd keeps for backward. Per token and block (elements): both norms' inputs 2h; attention:
    q/k/v input h, q, k, v, context (o_proj input); MLP: input h plus, gated, gate, up, act and product (4 I) or,
    not gated, fc1 output and activation (2 I). Korthikanti et al.'s 34 s b h (16-bit, GPT MLP, dropout) is
    this count for h = q = kv width and I = 4h, plus dropout masks. LoRA adds its rank-r intermediates and a
    float32 copy of each wrapped layer's input (peft casts it to the adapter's float32; with dropout, the dropped
    copy, plus its mask), all float32. Under mixed precision the residual stream (norm and block inputs) is
    float32, and there is a 16-bit copy of every linear weight: autocast caches the copy of each trainable weight
    until the forward (loss included) ends, checkpointed or not, and autograd keeps them for backward."""
    h, tokens = shape.hidden, b * s
    q, kv = shape.heads * shape.head_dim, shape.kv_heads * shape.head_dim
    act, stream = activation_dtype_bytes(recipe), stream_dtype_bytes(recipe)
    mlp = h + (4 if shape.gated_mlp else 2) * shape.intermediate
    elements = (h + 2 * q + 2 * kv) + mlp
    lora_bytes = 4 * c.lora_rank_per_layer  # float32 adapters
    if recipe.spec.family == "lora" and recipe.lora is not None:
        dropout = recipe.lora.dropout > 0
        if dropout or act != 4:  # without dropout and already float32, lora_A keeps the input counted above
            lora_bytes += 4 * c.lora_inputs_per_layer
        if dropout:
            lora_bytes += c.lora_inputs_per_layer  # bool mask, one byte per element
    per_layer = tokens * (2 * h * stream + elements * act + lora_bytes)  # 2 h: both norms' inputs
    if recipe.model.attn_implementation == "eager":
        per_layer += tokens * shape.heads * s * (4 + act)  # float32 softmax output + its cast copy
    outside = tokens * 2 * h * stream  # embedding output and final norm input
    weight_copies = act * (c.quantizable + shape.vocab * h) if recipe.autocast_dtype else 0  # blocks' + head
    if checkpointing:
        return shape.layers * tokens * h * stream + per_layer + outside + weight_copies
    return shape.layers * per_layer + outside + weight_copies


def logits_bytes(shape: ModelShape, b: int, s: int, logit_bytes: int) -> int:
    """The returned logits, alive until the step ends, plus the loss's peak at the start of backward: transformers
    computes cross-entropy on a float32 copy (freed once the loss is computed: it peaks at 10 bytes per logit in
    the forward), autograd keeps the float32 log-softmax, and its backward holds the incoming float32 gradient
    and the outgoing one at once: logit_bytes + 12 per logit."""
    return b * s * shape.vocab * (logit_bytes + 12)


def liger_fused_loss(recipe: Recipe, shape: ModelShape) -> bool:
    """Whether `ft train` uses liger's fused linear cross-entropy for this recipe (see model.apply_liger_kernel):
    train.liger_kernel, and no adapter on the output head (or on the input embeddings tied to it)."""
    from ft_cli.model import adapts_any

    heads = ["lm_head"] + (["embed_tokens", "wte"] if shape.tied_embeddings else [])
    return recipe.train.liger_kernel and not adapts_any(recipe, heads)


def fused_loss_bytes(shape: ModelShape, b: int, s: int, act_bytes: int) -> int:
    """liger's fused linear cross-entropy works through the b*s tokens in chunks of next_pow2(b*s*hidden/vocab)
    tokens (at most 2x that many logits: b*s*hidden*2), each chunk's float32 logits and their gradient held at
    once (8 bytes a logit), plus the gradient of the hidden states it returns (b*s*hidden in the activation dtype)."""
    return b * s * shape.hidden * (2 * 8 + act_bytes)


def _overhead(subtotal: int) -> int:
    return CUDA_CONTEXT_BYTES + int(FRAGMENTATION * subtotal)


# Suggestion ------------------------------------------------------------------------------------------------------

def suggest_micro_batch(plan: MemoryPlan, budget_bytes: float) -> Suggestion:
    """The largest micro_batch_size whose estimate fits `budget_bytes`, among those that divide the recipe's
    effective batch, with the grad_accum that keeps that effective batch exactly (7 x 3 would turn 16 into 21)."""
    t = plan.recipe.train
    effective = t.micro_batch_size * t.grad_accum
    budget_gib = budget_bytes / GIB
    best: MemoryPlan | None = None
    for b in (d for d in range(1, effective + 1) if effective % d == 0):
        candidate = _plan(plan.recipe, plan.shape, plan.counts, b)
        if candidate.total > budget_bytes:
            break
        best = candidate
    if best is None:
        one = _plan(plan.recipe, plan.shape, plan.counts, 1)
        hints = []
        if not t.gradient_checkpointing:
            hints.append(f"turn on train.gradient_checkpointing ({one.total_other_checkpointing / GIB:.1f} GiB at "
                         "micro_batch_size 1)")
        if not plan.recipe.quantized and plan.recipe.spec.family == "lora":
            hints.append("use method: qlora (4-bit base weights)")
        if t.optimizer == "adamw_torch" and plan.recipe.spec.whole_model:
            hints.append("use train.optimizer: adamw_8bit")
        hints.append(f"lower data.max_seq_len (now {plan.seq_len})")
        return Suggestion(None, t.grad_accum, one.total, effective,
                          f"[bold red]does not fit[/] in {budget_gib:g} GiB even at micro_batch_size 1 (estimated "
                          f"{one.total / GIB:.1f} GiB); try: " + "; ".join(hints))
    b = best.micro_batch_size
    accum = effective // b
    note = (f"[bold green]fits[/] in {budget_gib:g} GiB: micro_batch_size {b}, grad_accum {accum} "
            f"(estimated {best.total / GIB:.1f} GiB; effective batch {b * accum}, as the recipe's)")
    if b < t.micro_batch_size:
        note += f"; the recipe's micro_batch_size {t.micro_batch_size} needs {plan.total / GIB:.1f} GiB"
    note += f"\n  --set train.micro_batch_size={b} --set train.grad_accum={accum}"
    return Suggestion(b, accum, best.total, b * accum, note)


# Disk ------------------------------------------------------------------------------------------------------------

OUTPUT_EXTRA_BYTES = 16 * 2**20  # tokenizer, configs, README beside the weights (a Llama 3 tokenizer is 9 MB)


def planned_trainable(recipe: Recipe) -> tuple[list[tuple[int, int]], int] | None:
    """(trainable (numel, bytes per element), total base params) from the model config on disk, for `ft train`'s
    free-space check before the model loads; None when the config is not on disk or the method cannot be sized."""
    from ft_cli.model_config import find_model_config

    try:
        found = find_model_config(recipe.model, download=False)
        if found is None:
            return None
        config, _ = load_model_config(recipe)
        counts = count_params(config, recipe)
    except Exception:  # noqa: BLE001 - then ft train sizes the run from the loaded model instead
        return None
    return counts.trainable, counts.total


def disk_needs(recipe: Recipe, trainable: list[tuple[int, int]], total_params: int, *,
               total_steps: int) -> tuple[int, str]:
    """Bytes a run writes at its peak (checkpoints kept at once, plus the one being written; adapter/ or model/,
    best/ and a new best/ being written) and a line saying how they add up."""
    t = recipe.train
    weights = sum(n * size for n, size in trainable)
    state_rows = training_state_rows(recipe, ParamCounts(total=total_params, quantizable=0, quantizable_rows=0,
                                                         base_bytes=0, trainable=trainable))
    optimizer = next(r.bytes for r in state_rows if r.name == "optimizer state")
    checkpoint = weights + optimizer + 2**20
    saves = math.ceil(total_steps / t.save_every) if t.save_every else 0
    kept = min(saves, t.keep_last) if t.keep_last else saves
    at_once = kept + (1 if t.keep_last and saves > t.keep_last else 0)
    output = (weights if recipe.is_peft else total_params * DTYPE_BYTES[recipe.model.dtype]) + OUTPUT_EXTRA_BYTES
    evaluates = recipe.data.eval is not None or recipe.data.val_split > 0  # then best/ is written too
    copies = 3 if evaluates else 1
    need = at_once * checkpoint + copies * output
    detail = (f"{at_once} checkpoint{'s' * (at_once != 1)} of {format_bytes(checkpoint)} at once, "
              f"{copies} cop{'ies' if copies != 1 else 'y'} of the {'adapter' if recipe.is_peft else 'model'} "
              f"({format_bytes(output)}){' with best/' if copies > 1 else ''}")
    return need, detail
