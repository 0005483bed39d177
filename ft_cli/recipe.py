"""The recipe: pydantic schema, YAML loading, `--set` overrides and friendly errors (reading the file and its
`--set` items: recipe_yaml.py; turning pydantic's errors into `recipe.yaml:LINE: field: message`: recipe_messages.py).

Every section forbids unknown keys. Each field's help lives once, in `Field(description=...)`, and feeds
`ft schema`, `ft validate` and the docs. This module imports no torch.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    PrivateAttr,
    ValidationError,
    field_validator,
    model_validator,
)

from ft_cli.errors import UserError
from ft_cli.methods.registry import METHODS, method_spec, methods_where
from ft_cli.recipe_messages import FieldError, FieldErrors, field_location, format_errors
from ft_cli.recipe_yaml import apply_override, parse_yaml, read_utf8, resolve_paths

Method = Literal[tuple(METHODS)]  # type: ignore[valid-type]  # the registry's names, in its order
DType = Literal["bfloat16", "float16", "float32"]


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid")

    @field_validator("*", mode="before")
    @classmethod
    def _no_bool_for_numbers(cls, value: Any, info: Any) -> Any:
        """pydantic takes true/false for a number (as 1/0): `--set lora.rank=true` would train rank 1."""
        if isinstance(value, bool) and _takes_numbers(cls.model_fields[info.field_name].annotation):
            raise ValueError(f"must be a number, got {str(value).lower()}")
        return value


def _takes_numbers(annotation: Any) -> bool:
    """Whether a field is a number (int/float, possibly optional) and not also a bool."""
    args = getattr(annotation, "__args__", None)
    kinds = set(args) if args and getattr(annotation, "__origin__", None) is not Literal else {annotation}
    return bool(kinds & {int, float}) and bool not in kinds


class RopeScalingSection(Section):
    type: Literal["linear", "dynamic", "yarn"] = Field(
        description="linear (position interpolation), dynamic (NTK-aware, scales with the sequence) or yarn."
    )
    factor: float = Field(gt=1, description="How many times the model's context to stretch the positions to.")


class ModelSection(Section):
    name_or_path: str = Field(
        description="Hub id (e.g. meta-llama/Llama-3.1-8B), a local model directory (relative paths resolve "
        "against the recipe file), or a built-in offline model such as builtin:tiny-llama."
    )
    dtype: DType = Field(
        "bfloat16", description="Dtype of the base weights and of the saved model. PEFT methods train float32 "
        "adapters on a base in this dtype; full/freeze compute in it (see train.mixed_precision)."
    )
    trust_remote_code: bool = Field(
        False, description="Allow running Python code shipped with the model. Off unless you trust the model."
    )
    revision: str | None = Field(None, description="Hub revision (branch, tag or commit) of the model.")
    attn_implementation: Literal["sdpa", "eager", "flash_attention_2"] | None = Field(
        None, description="Attention kernel; default: sdpa (flash_attention_2 on CUDA when installed and packing)."
    )
    rope_scaling: RopeScalingSection | None = Field(
        None, description="Stretch the model's rotary position embeddings past its context (config.json "
        "max_position_embeddings) to context x factor, e.g. {type: linear, factor: 2}. Required for a "
        "data.max_seq_len above the model's context; saved with the run and applied wherever ft loads the model."
    )

    @field_validator("name_or_path")
    @classmethod
    def _known_builtin(cls, value: str) -> str:
        if value.startswith("builtin:"):  # checked by name only (no torch), so ft validate --no-data catches typos
            from ft_cli.builtin_models import builtin_spec

            try:
                builtin_spec(value)
            except UserError as exc:
                raise ValueError(exc.message) from None
        return value


class LoraSection(Section):
    rank: int = Field(16, gt=0, description="LoRA rank r.")
    alpha: float = Field(32, gt=0, description="LoRA alpha; the update is scaled by alpha / rank.")
    dropout: float = Field(0.05, ge=0, lt=1, description="Dropout on the LoRA input.")
    target_modules: Literal["all-linear"] | list[str] = Field(
        "all-linear", description="'all-linear' (every linear layer but the output head) or a list of module names."
    )
    use_rslora: bool = Field(False, description="Rank-stabilized LoRA: scale by alpha / sqrt(rank).")
    loraplus_lr_ratio: float | None = Field(
        None, gt=0, description="LoRA+: the B matrices train with lr x this ratio (e.g. 16)."
    )
    modules_to_save: list[str] | None = Field(
        None, description="Extra modules trained in full and saved with the adapter (e.g. [lm_head, embed_tokens])."
    )


class FreezeSection(Section):
    trainable_layers: int = Field(
        2, ge=0, description="Train the last N transformer blocks (at most the model's number of blocks)."
    )
    trainable_modules: list[str] = Field(
        default_factory=list, description="Also train modules whose name contains one of these (e.g. lm_head)."
    )


class PromptSection(Section):
    num_virtual_tokens: int = Field(20, gt=0, description="Number of trained virtual tokens.")
    init_text: str | None = Field(None, description="prompt_tuning: initialise the virtual tokens from this text.")


class BottleneckSection(Section):
    size: int = Field(64, gt=0, description="Bottleneck width of the adapters after attention and MLP.")
    dropout: float = Field(0.0, ge=0, lt=1, description="Dropout inside the bottleneck adapter.")


class IA3Section(Section):
    target_modules: list[str] | None = Field(None, description="Modules to scale; default: peft's for the model.")
    feedforward_modules: list[str] | None = Field(None, description="Which target modules are feed-forward layers.")


class QuantizationSection(Section):
    bits: Literal[4, 8] | None = Field(4, description="4 (QLoRA) or 8 bit base weights via bitsandbytes; null: off.")
    quant_type: Literal["nf4", "fp4"] = Field("nf4", description="4-bit data type.")
    double_quant: bool = Field(True, description="Quantize the quantization constants too (saves ~0.4 bit/param).")
    compute_dtype: DType = Field("bfloat16", description="Dtype of the matmuls on the dequantized weights.")


Format = Literal["alpaca", "chat", "sharegpt", "text", "labelled", "preference"]
Task = Literal["causal_lm", "classification"]
Objective = Literal["sft", "dpo", "orpo", "simpo"]
PREFERENCE_OBJECTIVES = ("dpo", "orpo", "simpo")
PREFERENCE_METHODS = ("lora", "qlora", "dora", "full", "freeze")
# Defaults where the objectives' papers and TRL differ: DPO and ORPO (TRL's `beta`, the paper's lambda) 0.1; SimPO's
# paper trains with beta 2.0-2.5 and gamma 0.5-1.6 (TRL's CPOConfig: simpo_gamma 0.5).
DEFAULT_BETA = {"dpo": 0.1, "orpo": 0.1, "simpo": 2.0}


class PreferenceSection(Section):
    beta: float | None = Field(
        None, gt=0, description="dpo: the KL strength (default 0.1); orpo: the weight of the odds-ratio term, the "
        "paper's lambda (default 0.1); simpo: the reward scale (default 2.0).")
    loss_type: Literal["sigmoid", "hinge", "ipo"] = Field(
        "sigmoid", description="dpo only: sigmoid (DPO), hinge (SLiC) or ipo (IPO, on per-token average log-ratios, "
        "as TRL).")
    label_smoothing: float = Field(
        0.0, ge=0, lt=0.5, description="dpo (sigmoid) and simpo: the probability that a pair's labels are flipped "
        "(conservative DPO); 0: off.")
    simpo_gamma: float = Field(0.5, ge=0, description="simpo only: the target reward margin gamma.")
    share_prompt: bool = Field(
        True, description="Compute each pair's prompt once: one row holds the prompt, the chosen reply and the "
        "rejected reply, which a 4D attention mask keeps from seeing the chosen one (the prompt is about half the "
        "tokens of a pair). Checked before step 1 against separate rows on the first batch; off, with a message, "
        "where they differ or the attention kernel takes no custom mask (flash-attention).")


class DatasetSource(Section):
    path: str = Field(description="A .json/.jsonl/.csv/.tsv/.parquet file, a glob, a directory of them, a dataset saved with "
                      "save_to_disk (ft preprocess's output is used as is), or a hub dataset id.")
    format: Format | None = Field(None, description="Format of this source; default: data.format.")
    columns: dict[str, str] | None = Field(None, description="Column renames for this source; default: data.columns.")
    weight: float | None = Field(
        None, gt=0, description="Mixing weight. The mixed set has as many rows as all sources together; each source "
        "fills weight/sum(weights) of it (no weight counts as 1), without replacement when it has enough rows, else "
        "every row k times plus a seeded random remainder. No weights: every row once. Eval is split off each "
        "source before mixing; weights don't apply to eval."
    )
    split: str | None = Field(None, description="Split of a hub dataset or of a saved DatasetDict (default: train).")


class DataSection(Section):
    train: str | list[DatasetSource] = Field(
        description="Training data: one path (file, glob such as data/*.jsonl, directory, a dataset saved with "
        "save_to_disk, or hub id; ~ is expanded) or a list of sources with weights."
    )
    format: Format = Field("alpaca", description="Record format: alpaca | chat | sharegpt | text; labelled (text "
                           "+ label, for task: classification; its default there); preference (prompt + chosen + "
                           "rejected replies, for objective dpo / orpo / simpo).")
    columns: dict[str, str] | None = Field(
        None, description="Map the format's field names to yours, e.g. {instruction: question, output: answer}."
    )
    eval: str | list[DatasetSource] | None = Field(
        None, description="Evaluation data; null splits val_split of train off instead."
    )
    val_split: float = Field(0.05, ge=0, lt=1, description="Fraction of train held out for eval when eval is null.")
    max_seq_len: int = Field(2048, gt=0, description="Longest sequence in tokens; longer examples are truncated.")
    truncation: Literal["truncate", "drop"] = Field(
        "truncate", description="Over-long conversations (and text documents with text_chunking: truncate): "
        "'truncate' keeps the first max_seq_len tokens; 'drop' skips them. Either way, examples left with no trained "
        "token are dropped and counted."
    )
    text_chunking: Literal["split", "truncate"] = Field(
        "split", description="Text documents (format text) longer than max_seq_len: 'split' cuts them into "
        "max_seq_len-token chunks, each its own example, so no token is lost (continued pre-training); 'truncate' "
        "handles them like conversations (data.truncation). Counted in ft validate."
    )
    text_overlap: int = Field(
        0, ge=0, description="text_chunking: split: each chunk after the first starts with the last N tokens of the "
        "previous one as context; they carry no loss there, so every token is trained exactly once."
    )
    packing: bool = Field(
        False, description="Pack several examples into each max_seq_len row (attention never crosses examples)."
    )
    train_on_inputs: bool = Field(False, description="false: only assistant/response tokens carry loss.")
    chat_template: str | None = Field(
        None, description="Override the tokenizer's chat template: a built-in name (chatml, llama3, ...) or a jinja "
        "string. Needed for base models without one."
    )
    system_message: Literal["keep", "merge_into_first_user"] = Field(
        "keep", description="keep: system messages go to the chat template as they are. merge_into_first_user: the "
        "system prompt is put at the start of the first user message (a blank line between them), for templates "
        "without a system role (Gemma) or that place it only in the last user turn (Mistral v0.3); ft generate "
        "--system does the same."
    )
    shuffle: bool = Field(True, description="Shuffle training rows each epoch (seeded).")
    group_by_length: bool = Field(
        False, description="Put training rows of similar length in the same micro-batch (as HF Trainer's "
        "group_by_length: shuffled rows sorted by length within windows of 64 batches, batch order shuffled), so "
        "unpacked batches carry little padding. Changes which rows share a batch, not which rows train."
    )
    cache: bool = Field(True, description="Reuse tokenized data from the cache when data, tokenizer and settings match.")
    labels: list[str] | list[int] | None = Field(
        None, description="task: classification: the label names, in class-id order (e.g. [negative, positive]). "
        "Integer labels in the data are class ids into this list; string labels must be in it. null: the labels "
        "found in the training data (integers as they are, strings sorted)."
    )
    limit: int | None = Field(
        None, gt=0, description="Use only the first N records of each source (before the eval split and mixing); "
        "null: all. ft train --smoke sets it to try a recipe on a slice of its data."
    )

    @model_validator(mode="after")
    def _overlap_fits(self) -> DataSection:
        if self.group_by_length and self.packing:
            raise FieldError("group_by_length", "does nothing with packing: true (packed rows are all max_seq_len "
                              "long); remove one of them")
        if self.text_overlap and self.text_chunking != "split":
            raise FieldError("text_overlap", "only applies to text_chunking: split")
        if self.text_overlap >= self.max_seq_len:
            raise FieldError("text_overlap", f"must be less than max_seq_len ({self.max_seq_len}), got "
                              f"{self.text_overlap}")
        return self

    @property
    def sources(self) -> list[DatasetSource]:
        return _as_sources(self.train)

    @property
    def eval_sources(self) -> list[DatasetSource]:
        return _as_sources(self.eval) if self.eval is not None else []


def _as_sources(value: str | list[DatasetSource]) -> list[DatasetSource]:
    return [DatasetSource(path=value)] if isinstance(value, str) else list(value)


class TrainSection(Section):
    epochs: float = Field(3, gt=0, description="Passes over the training data (ignored when max_steps is set).")
    max_steps: int | None = Field(None, gt=0, description="Stop after this many optimizer steps.")
    micro_batch_size: int = Field(4, gt=0, description="Rows per forward pass per device.")
    grad_accum: int = Field(4, gt=0, description="Micro-batches accumulated per optimizer step.")
    lr: float = Field(2.0e-4, gt=0, description="Peak learning rate.")
    scheduler: Literal["cosine", "linear", "constant"] = Field("cosine", description="Learning-rate schedule.")
    warmup_ratio: float = Field(0.03, ge=0, le=1, description="Fraction of optimizer steps spent warming up.")
    warmup_steps: int | None = Field(None, ge=0, description="Warm-up steps; overrides warmup_ratio.")
    weight_decay: float = Field(0.0, ge=0, description="AdamW weight decay.")
    max_grad_norm: float | None = Field(1.0, gt=0, description="Clip the global gradient norm; null: no clipping.")
    optimizer: Literal["adamw_torch", "adamw_8bit", "paged_adamw_8bit"] = Field(
        "adamw_torch", description="adamw_torch, or bitsandbytes' 8-bit AdamW (paged: pages state to CPU on OOM)."
    )
    adam_beta1: float = Field(0.9, gt=0, lt=1, description="AdamW beta1.")
    adam_beta2: float = Field(0.999, gt=0, lt=1, description="AdamW beta2.")
    layerwise_lr_decay: float | None = Field(
        None, gt=0, le=1, description="full/freeze: each block below the top gets lr x this factor once more."
    )
    mixed_precision: bool = Field(
        True, description="For full/freeze with bfloat16/float16: keep float32 master weights and run forward/backward "
        "under autocast in model.dtype - accurate, 2x weight memory; false: train the weights in model.dtype directly "
        "(pure bf16; less memory, small updates may be lost). PEFT methods always train float32 adapters."
    )
    gradient_checkpointing: bool = Field(True, description="Recompute activations in backward to save memory. Off "
                                         "for methods that cannot use it (prefix_tuning: peft passes the prefix as a "
                                         "KV cache); `ft validate` lists it under derived values.")
    seed: int = Field(42, ge=0, description="Seed for weights init, data order and dropout.")
    eval_every: int | None = Field(100, gt=0, description="Evaluate every N optimizer steps (and at the end).")
    eval_batch_size: int | None = Field(None, gt=0, description="Rows per eval forward; default micro_batch_size.")
    save_every: int | None = Field(200, gt=0, description="Write a resumable checkpoint every N optimizer steps.")
    keep_last: int | None = Field(2, gt=0, description="Keep only the newest N checkpoints; null keeps all.")
    log_every: int = Field(10, gt=0, description="Write a metrics line every N optimizer steps.")
    early_stopping_patience: int | None = Field(
        None, gt=0, description="Stop after this many evaluations without a new best train.best_metric."
    )
    best_metric: Literal["eval_loss", "accuracy", "f1_macro", "f1_micro", "f1_weighted"] = Field(
        "eval_loss", description="The evaluation metric that picks best/ and drives early stopping: eval_loss "
        "(lower is better), or for task: classification accuracy, f1_macro, f1_micro, f1_weighted (higher is better)."
    )
    class_weights: Literal["auto"] | list[float] | None = Field(
        None, description="task: classification: weigh the cross-entropy per class; 'auto' = inverse class "
        "frequency in the training data (n / (classes x n_class)), or one weight per label; null: unweighted."
    )
    dataloader_workers: int | None = Field(
        None, ge=0, description="Processes that read and collate the next micro-batches while the current one trains "
        "(a torch DataLoader over ft's batch order; pinned memory on CUDA). null: 1 on CUDA, 0 on a CPU device (a "
        "worker would take cores from the model's math). Changes speed only: batches, order and resume are the same."
    )
    compile: bool = Field(
        False, description="torch.compile each transformer block in place (inductor: triton on CUDA, a C++ compiler "
        "on the CPU; refused where missing). Shapes are dynamic, so padding and packing do not recompile; the first "
        "step and the first evaluation compile. Saved weights, checkpoints and resume are unchanged (resuming may "
        "switch it)."
    )
    liger_kernel: bool = Field(
        False, description="Swap in liger-kernel's Triton kernels (CUDA only; pip install liger-kernel; refused "
        "otherwise): RMSNorm/LayerNorm, SwiGLU/GeGLU, RoPE, and the fused linear cross-entropy, which never "
        "materialises the training logits (same token-normalised loss; left out when an adapter is on lm_head)."
    )
    qat: Literal["int8-dynamic-act-int4-weight"] | None = Field(
        None, description="Quantization-aware training (torchao; pip install 'ft-cli[export]'): the forward sees "
        "the linear weights as int4 (groups of 32) and activations as int8, as `ft export --format "
        "int8-dynamic-int4` will quantize them, so training learns around the rounding. Methods full, freeze "
        "(the weights themselves) and lora (the base layers under the adapter, as torchtune does). In-training "
        "eval_loss is that of the fake-quantized model."
    )


class LoggingSection(Section):
    trackers: list[Literal["tensorboard", "wandb", "mlflow"]] = Field(
        default_factory=list, description="Experiment trackers via accelerate; metrics.jsonl is always written."
    )
    project: str | None = Field(None, description="Tracker project / experiment name (default: the run name).")


class Recipe(Section):
    model: ModelSection = Field(description="The base model: where it comes from and the dtype it trains in.")
    task: Task = Field(
        "causal_lm", description="causal_lm: train a language model on text/conversations; classification: "
        "predict a label per text (or text pair) with AutoModelForSequenceClassification (data.format labelled)."
    )
    method: Method = Field("lora", description="Fine-tuning method.")
    objective: Objective = Field(
        "sft", description="What the loop optimises: sft (next-token loss on the replies) or, on preference pairs "
        "(data.format: preference), dpo | orpo | simpo.")
    preference: PreferenceSection | None = Field(
        None, description="Settings of objective dpo / orpo / simpo.")
    lora: LoraSection | None = Field(None, description="LoRA settings (methods lora, qlora, dora).")
    freeze: FreezeSection | None = Field(None, description="Which parts train (method freeze).")
    prompt: PromptSection | None = Field(None, description="Virtual tokens (methods prompt_tuning, prefix_tuning).")
    bottleneck: BottleneckSection | None = Field(None, description="Bottleneck adapter settings (method adapter).")
    ia3: IA3Section | None = Field(None, description="IA3 settings (method ia3).")
    quantization: QuantizationSection | None = Field(
        None, description="bitsandbytes quantization of the base weights; default 4-bit NF4 for qlora, off otherwise."
    )
    data: DataSection = Field(description="Training (and eval) data, its format, and how it becomes token rows.")
    train: TrainSection = Field(default_factory=TrainSection, description="Optimization, batch sizes and cadence.")
    logging: LoggingSection = Field(default_factory=LoggingSection,
                                    description="Experiment trackers besides metrics.jsonl.")
    output_dir: str | None = Field(
        None, description="Run directory (relative to the current directory); default runs/<recipe file name>."
    )
    # Where each field came from, for messages: the recipe file and its lines, and the --set items.
    _source: str | None = PrivateAttr(None)
    _lines: dict[tuple, int] = PrivateAttr(default_factory=dict)
    _overrides: dict[tuple, str] = PrivateAttr(default_factory=dict)
    # Values the recipe did not set and ft derived from other fields ("train.gradient_checkpointing" -> why), for
    # `ft validate` to show: nothing is changed behind the user's back.
    _derived: dict[str, str] = PrivateAttr(default_factory=dict)

    @property
    def derived(self) -> dict[str, str]:
        return dict(self._derived)

    def location(self, loc: tuple) -> str | None:
        """`recipe.yaml:12` or `--set train.lr=x` for a field path such as ("train", "lr"); None when unknown."""
        return field_location(loc, self._source, self._lines, self._overrides)

    @model_validator(mode="after")
    def _sections_match_method(self) -> Recipe:
        """What the method's registry entry (ft_cli.methods.registry) says about the other fields. Every problem is
        collected and reported at once, like field errors."""
        errors: list[FieldError] = []
        m = self.method
        spec = method_spec(m)
        for section in _method_sections():
            methods = methods_where(lambda s, section=section: s.section == section)
            if getattr(self, section) is not None and m not in methods:
                errors.append(FieldError(section, f"is only used by method {' | '.join(methods)}, not {m!r}; remove it"))
        self._check_quantization(spec, errors)
        if spec.section is not None and getattr(self, spec.section) is None:
            setattr(self, spec.section, _section_class(spec.section)())
        if self.lora is not None and self.lora.loraplus_lr_ratio is not None and spec.family != "lora":
            errors.append(FieldError("lora.loraplus_lr_ratio", "only applies to LoRA methods"))
        if self.train.qat is not None and (not spec.qat or self.quantized):
            qat = methods_where(lambda s: s.qat)
            errors.append(FieldError("train.qat", f"applies to method {' | '.join(qat)} on an unquantized base, "
                              f"not {m!r}{' with quantization' if self.quantized else ''}"))
        if self.train.layerwise_lr_decay is not None and not spec.whole_model:
            errors.append(FieldError("train.layerwise_lr_decay", f"applies to method full or freeze, not {m!r}"))
        if not spec.whole_model and "mixed_precision" in self.train.model_fields_set \
                and not self.train.mixed_precision:
            errors.append(FieldError("train.mixed_precision", f"applies to method full or freeze, not {m!r} (PEFT methods "
                              "always train float32 adapters on a model.dtype base); remove it"))
        if self.freeze is not None and self.freeze.trainable_layers == 0 and not self.freeze.trainable_modules:
            errors.append(FieldError("freeze", "trains nothing: set trainable_layers > 0 or list trainable_modules"))
        for path, why in spec.why_not.items():  # fields of the method's own section that it does not use
            section, _, key = path.partition(".")
            if key and section == spec.section and getattr(getattr(self, section), key) is not None:
                errors.append(FieldError(path, f"{why}; remove it for {m!r}"))
        if not spec.packs and self.data.packing:
            errors.append(FieldError("data.packing", f"cannot be used with {m}: {spec.why_not['packs']}"))
        if not spec.gradient_checkpointing:
            if "gradient_checkpointing" in self.train.model_fields_set and self.train.gradient_checkpointing:
                errors.append(FieldError("train.gradient_checkpointing", spec.why_not["gradient_checkpointing"]))
            if self.train.gradient_checkpointing:  # the default: derived, and said so by ft validate
                self._derived["train.gradient_checkpointing"] = (
                    f"false (the default true {spec.why_not['gradient_checkpointing'].split('; ')[0]})")
            self.train.gradient_checkpointing = False
        self._task_fits()
        self._check_objective()
        if self.ia3 is not None and self.ia3.target_modules and self.ia3.feedforward_modules:
            extra = sorted(set(self.ia3.feedforward_modules) - set(self.ia3.target_modules))
            if extra:
                errors.append(FieldError("ia3.feedforward_modules", f"{', '.join(extra)} not in ia3.target_modules; "
                                  "feed-forward modules must also be targets"))
        if errors:
            raise errors[0] if len(errors) == 1 else FieldErrors(errors)
        return self

    def _check_quantization(self, spec: Any, errors: list[FieldError]) -> None:
        m = spec.name
        if self.quantization is not None and self.quantization.bits is not None and spec.quantized_base == "never":
            if spec.quantized_twin is not None:
                errors.append(FieldError("quantization", f"with method {m!r} means QLoRA: write method: "
                                  f"{spec.quantized_twin} instead"))
            else:
                errors.append(FieldError("quantization", f"cannot be used with method {m!r} (quantized weights cannot be "
                              "trained); use method: qlora, or remove quantization"))
        if spec.quantized_base == "required":
            if self.quantization is None:
                self.quantization = QuantizationSection()
            elif self.quantization.bits is None:
                errors.append(FieldError("quantization.bits", f"method {m} needs 4 or 8 bits; use method: lora for none"))

    def _task_fits(self) -> None:
        """task: classification reads labelled text and trains a head; the keys that only one task uses are refused
        on the other."""
        d, t = self.data, self.train
        if self.task == "classification":
            if "format" not in d.model_fields_set:
                d.format = "labelled"
            if d.format != "labelled":
                raise FieldError("data.format", f"task classification reads labelled text (format: labelled), not "
                                  f"{d.format!r}; remove data.format or set it to labelled")
            for src in d.sources + d.eval_sources:
                if src.format not in (None, "labelled"):
                    raise FieldError("data.train", f"task classification reads format labelled, not {src.format!r}")
            if d.packing:
                raise FieldError("data.packing", "does not apply to task classification (one label per example); "
                                  "set packing: false")
            if isinstance(t.class_weights, list) and d.labels is not None and len(t.class_weights) != len(d.labels):
                raise FieldError("train.class_weights", f"has {len(t.class_weights)} weights for "
                                  f"{len(d.labels)} data.labels")
            if d.labels is not None and len(set(d.labels)) != len(d.labels):
                raise FieldError("data.labels", "lists a label twice")
            if d.labels is not None and len(d.labels) < 2:
                raise FieldError("data.labels", "a classifier needs at least 2 labels")
            return
        if d.format == "labelled":
            raise FieldError("data.format", "labelled is the format of task: classification; set task: "
                              "classification or use alpaca | chat | sharegpt | text")
        for key, value in (("data.labels", d.labels), ("train.class_weights", t.class_weights)):
            if value is not None:
                raise FieldError(key, "only applies to task: classification; remove it")
        if t.best_metric != "eval_loss":
            raise FieldError("train.best_metric", f"{t.best_metric} is a classification metric; a causal_lm run "
                              "picks its best by eval_loss")

    def _check_objective(self) -> None:
        o, m = self.objective, self.method
        formats = {self.data.format} | {src.format for src in self.data.sources + self.data.eval_sources
                                         if src.format is not None}
        if o == "sft":
            if self.preference is not None:
                raise FieldError("preference", "is only used by objective dpo | orpo | simpo; remove it, or set "
                                  "objective")
            if "preference" in formats:
                raise FieldError("data.format", "preference pairs train with objective: dpo (or orpo, simpo); "
                                  "set objective, or use a conversation format to train on the chosen replies only")
            return
        if self.task != "causal_lm":
            raise FieldError("objective", f"{o} applies to task causal_lm, not {self.task}")
        if m not in PREFERENCE_METHODS:
            raise FieldError("objective", f"{o} trains with method {' | '.join(PREFERENCE_METHODS)}, not {m!r}")
        if formats != {"preference"}:
            raise FieldError("data.format", f"objective {o} needs preference pairs: set data.format: preference "
                              f"(records with a prompt or conversation, 'chosen' and 'rejected'); got "
                              f"{', '.join(sorted(formats))}")
        if self.data.packing:
            raise FieldError("data.packing", f"cannot be used with objective {o}: each chosen and rejected reply "
                              "is scored as a whole sequence; set packing: false")
        if self.data.train_on_inputs:
            raise FieldError("data.train_on_inputs", f"objective {o} scores only the replies; set it to false")
        if self.preference is None:
            self.preference = PreferenceSection()
        p = self.preference
        if p.beta is None:
            p.beta = DEFAULT_BETA[o]
        default = {k: f.default for k, f in PreferenceSection.model_fields.items()}
        if o != "dpo" and p.loss_type != default["loss_type"]:
            raise FieldError("preference.loss_type", f"only applies to objective dpo, not {o}; remove it")
        if o != "simpo" and p.simpo_gamma != default["simpo_gamma"]:
            raise FieldError("preference.simpo_gamma", f"only applies to objective simpo, not {o}; remove it")
        if p.label_smoothing and not (
                o == "simpo" or (o == "dpo" and p.loss_type == "sigmoid")):
            raise FieldError("preference.label_smoothing", "applies to objective dpo with loss_type sigmoid, and "
                              "simpo")

    # Derived facts -------------------------------------------------------------------------------------------
    @property
    def quantized(self) -> bool:
        return self.quantization is not None and self.quantization.bits is not None

    @property
    def spec(self) -> Any:
        """The method's registry entry (ft_cli.methods.registry.MethodSpec): what it saves, merges, packs, ..."""
        return method_spec(self.method)

    @property
    def is_peft(self) -> bool:
        """Trains an adapter on a frozen base (every method but full and freeze)."""
        return not method_spec(self.method).whole_model

    @property
    def autocast_dtype(self) -> str | None:
        """bfloat16/float16 when training keeps float32 master weights and computes under autocast in that dtype
        (full/freeze with train.mixed_precision and a 16-bit model.dtype); None when it computes in model.dtype."""
        if method_spec(self.method).whole_model and self.model.dtype != "float32" and self.train.mixed_precision:
            return self.model.dtype
        return None

    @property
    def weights_dtype(self) -> str:
        """The dtype the base weights are held in while training: float32 master weights under mixed precision,
        model.dtype otherwise (PEFT adapters are float32 either way)."""
        return "float32" if self.autocast_dtype else self.model.dtype

    def training_fingerprint(self) -> dict[str, Any]:
        """The fields whose change makes resuming produce a different run than the checkpoint's.

        Harmless fields (max_steps, epochs, logging, eval/save cadence, output_dir) are left out.
        """
        d = self.model_dump(mode="json")
        if d.get("objective") == "sft" and d.get("preference") is None:  # as recipes from before the key
            d.pop("objective", None)
            d.pop("preference", None)
        d.pop("output_dir", None)
        d.pop("logging", None)
        for key in ("max_steps", "epochs", "eval_every", "save_every", "keep_last", "log_every",
                    "early_stopping_patience", "eval_batch_size", "compile", "best_metric", "dataloader_workers"):
            d["train"].pop(key, None)
        for key, default in (("task", "causal_lm"), ("data.labels", None), ("train.class_weights", None),
                             ("data.group_by_length", False)):
            section, _, name = key.rpartition(".")
            holder = d[section] if section else d
            if holder.get(name) == default:  # unset: a checkpoint from before the classification task resumes
                holder.pop(name)
        if (d.get("preference") or {}).get("share_prompt") is True:  # the default: as checkpoints from before it
            d["preference"].pop("share_prompt")
        if not method_spec(self.method).whole_model or self.model.dtype == "float32":
            d["train"].pop("mixed_precision", None)  # changes nothing here (and runs from before the field resume)
        return _flatten(d)

    def fingerprint_hash(self) -> str:
        blob = json.dumps(self.training_fingerprint(), sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()[:16]


def _method_sections() -> tuple[str, ...]:
    """The recipe sections that hold a method's settings, in the recipe's field order."""
    used = {spec.section for spec in METHODS.values()}
    return tuple(name for name in Recipe.model_fields if name in used)


def _section_class(section: str) -> type[Section]:
    """The Section class of a method's section (the X of its `X | None` annotation)."""
    import typing

    return next(a for a in typing.get_args(Recipe.model_fields[section].annotation) if a is not type(None))


def _flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(_flatten(v, key + "."))
        else:
            out[key] = v
    return out


# Loading ---------------------------------------------------------------------------------------------------------

def load_recipe(path: str | os.PathLike, overrides: list[str] | None = None) -> Recipe:
    """Read, override and validate a recipe; raise UserError listing every problem at once."""
    path = Path(path)
    if path.is_dir():
        found = sorted(p.name for p in path.glob("*.y*ml"))[:5]
        hint = f"; recipes in it: {', '.join(found)}" if found else ""
        raise UserError(f"{path}: is a directory, not a recipe file (give the path of a .yaml file){hint}")
    if not path.is_file():
        raise UserError(f"{path}: recipe file not found")
    raw, lines = parse_yaml(read_utf8(path), path)
    set_items: dict[tuple, str] = {}
    if isinstance(raw, dict):  # a list or a scalar is refused by recipe_from_dict
        for item in overrides or []:
            set_items[apply_override(raw, item)] = item
        if not raw:
            raise UserError(f"{path}: the recipe is empty; it needs at least model.name_or_path and data.train")
    recipe = recipe_from_dict(raw, source=str(path), lines=lines, overrides=set_items)
    resolve_paths(recipe, path.parent)
    if recipe.output_dir is None:
        recipe.output_dir = str(Path("runs") / path.stem)
    return recipe


def recipe_from_dict(raw: Any, source: str = "recipe", lines: dict[tuple, int] | None = None,
                     overrides: dict[tuple, str] | None = None) -> Recipe:
    """Validate a recipe mapping. `lines` (key path -> line in `source`) and `overrides` (key path -> the --set item
    that set it) say where each value came from, in error messages now and in `Recipe.location` later."""
    if not isinstance(raw, dict):
        raise UserError(f"{source}: a recipe is a YAML mapping of sections (model, method, data, train, ...)")
    try:
        recipe = Recipe.model_validate(raw)
    except ValidationError as exc:
        raise UserError("\n".join(format_errors(exc, Recipe, source, lines or {}, overrides or {}))) from None
    recipe._source, recipe._lines, recipe._overrides = source, dict(lines or {}), dict(overrides or {})
    return recipe


_FIELD_MESSAGE = re.compile(r"^([a-z_]+(?:\.[a-z_0-9]+|\[\d+\])*): ")


@contextlib.contextmanager
def recipe_errors(recipe: Recipe):
    """Errors about a recipe field ("model.attn_implementation: ...") raised inside get the field's place in front:
    the recipe file and line, or the --set item that set it."""
    try:
        yield
    except UserError as exc:
        m = _FIELD_MESSAGE.match(exc.message)
        if m is None or m.group(1).split(".")[0].split("[")[0] not in Recipe.model_fields:
            raise
        loc = tuple(int(p) if p.isdigit() else p for p in re.split(r"\.|\[|\]\.?", m.group(1)) if p)
        where = recipe.location(loc)
        if where is None:
            raise
        exc.message = f"{where}: {exc.message}"
        exc.args = (exc.message,)
        raise


# Writing ---------------------------------------------------------------------------------------------------------

SECRET_ENV = ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "WANDB_API_KEY", "MLFLOW_TRACKING_PASSWORD")


def dump_recipe(recipe: Recipe) -> str:
    """The resolved recipe as YAML, with any secret value that leaked into a string field redacted."""
    data = recipe.model_dump(mode="json", exclude_none=False)
    secrets = [v for k in SECRET_ENV if (v := os.environ.get(k)) and len(v) >= 8]

    def scrub(x: Any) -> Any:
        if isinstance(x, dict):
            return {k: scrub(v) for k, v in x.items()}
        if isinstance(x, list):
            return [scrub(v) for v in x]
        if isinstance(x, str):
            for s in secrets:
                x = x.replace(s, "***")
        return x

    return yaml.safe_dump(scrub(data), sort_keys=False, allow_unicode=True)


def recipe_json_schema() -> dict[str, Any]:
    schema = Recipe.model_json_schema()
    schema["$schema"] = "https://json-schema.org/draft/2020-12/schema"
    schema["title"] = "ft recipe"
    return schema

