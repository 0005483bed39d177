"""The method registry: one entry per fine-tuning method, holding every fact the rest of ft needs about it.

Other modules ask this table (`method_spec(recipe.method).merges`) instead of branching on method names, as peft
asks its `PEFT_TYPE_TO_*` mappings. Adding a method is one file under ft_cli/methods/ (its `apply_*` function) and
one entry here; docs/architecture.md walks through it.

This module is a leaf: it imports nothing from ft and no torch, so the recipe schema (which takes the method names
from here) and `ft --help` stay light. Functions are named as "module:function" strings and imported when used.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, Literal

#: What a run writes as its output: a whole model directory, a peft adapter, or ft's own bottleneck adapter.
Saves = Literal["model", "peft_adapter", "ft_adapter"]
#: Tasks a method can train. Only causal_lm exists today; a method lists the tasks it supports so that a new task
#: (classification) is one more value here and in the entries that support it.
Task = Literal["causal_lm"]


@dataclass(frozen=True)
class MethodSpec:
    name: str
    #: The recipe section holding the method's settings (lora, freeze, prompt, bottleneck, ia3); None: no settings.
    section: str | None
    #: "module:function" that turns a loaded base model into the model to train: fn(model, recipe) -> model.
    apply: str
    saves: Saves
    #: The method's family, for facts shared by its members (LoRA+ and ft plan's adapter arithmetic for "lora").
    family: str
    #: Whether `ft merge` can fold the trained adapter into the base weights (whole models are converted instead).
    merges: bool
    #: Whether data.packing may be on (several examples per row).
    packs: bool = True
    #: Whether train.gradient_checkpointing may be on.
    gradient_checkpointing: bool = True
    #: Whether the base may be bitsandbytes-quantized: "never" (trains the base weights, or has a quantized twin
    #: method), "optional", or "required" (qlora; the quantization section then defaults to 4-bit NF4).
    quantized_base: Literal["never", "optional", "required"] = "optional"
    #: The method to write instead when a quantized base is asked for and this one refuses it (lora -> qlora).
    quantized_twin: str | None = None
    #: Whether train.qat (quantization-aware training) applies.
    qat: bool = False
    #: Generation quirk: the adapter is virtual tokens / a KV prefix put before every row (prompt, prefix tuning).
    virtual_tokens: bool = False
    tasks: tuple[Task, ...] = ("causal_lm",)
    #: Why a capability above is off, or why a field of the method's section does not apply, in the words of the
    #: error a user sees; keyed by the capability ("merges", "packs", "gradient_checkpointing") or field path.
    why_not: Mapping[str, str] = field(default_factory=dict)

    @property
    def whole_model(self) -> bool:
        """Trains (and saves) the base weights themselves: full, freeze."""
        return self.saves == "model"

    @property
    def peft(self) -> bool:
        """Writes a peft adapter (`PeftModel.from_pretrained` loads it)."""
        return self.saves == "peft_adapter"

    def apply_fn(self) -> Callable[[Any, Any], Any]:
        return load_function(self.apply)


def load_function(ref: str) -> Callable[..., Any]:
    module, _, name = ref.partition(":")
    return getattr(importlib.import_module(module), name)


_PROMPT_PACKING = ("the virtual tokens go before each row, so packed examples would share them (and peft drops the "
                   "position ids that keep packed examples apart); set packing: false")
_PROMPT_MERGE = ("virtual tokens are inputs, not weights, so there is nothing to merge; use the run directory with "
                 "ft generate / PeftModel.from_pretrained instead")

_SPECS = (
    MethodSpec("lora", "lora", "ft_cli.methods.lora:apply_lora", "peft_adapter", "lora", merges=True,
               quantized_base="never", quantized_twin="qlora", qat=True),
    MethodSpec("qlora", "lora", "ft_cli.methods.lora:apply_lora", "peft_adapter", "lora", merges=True,
               quantized_base="required"),
    MethodSpec("dora", "lora", "ft_cli.methods.lora:apply_lora", "peft_adapter", "lora", merges=True),
    MethodSpec("full", None, "ft_cli.methods.whole:apply_full", "model", "whole", merges=False,
               quantized_base="never", qat=True),
    MethodSpec("freeze", "freeze", "ft_cli.methods.whole:apply_freeze", "model", "whole", merges=False,
               quantized_base="never", qat=True),
    MethodSpec("ia3", "ia3", "ft_cli.methods.ia3:apply_ia3", "peft_adapter", "ia3", merges=True),
    MethodSpec("prompt_tuning", "prompt", "ft_cli.methods.prompt:apply_prompt_tuning", "peft_adapter", "prompt",
               merges=False, packs=False, virtual_tokens=True,
               why_not={"merges": _PROMPT_MERGE, "packs": _PROMPT_PACKING}),
    MethodSpec("prefix_tuning", "prompt", "ft_cli.methods.prompt:apply_prefix_tuning", "peft_adapter", "prompt",
               merges=False, packs=False, gradient_checkpointing=False, virtual_tokens=True,
               why_not={"merges": _PROMPT_MERGE, "packs": _PROMPT_PACKING,
                        # peft feeds the prefix as a KV cache, which checkpointing cannot recompute
                        "gradient_checkpointing": "does not work with prefix_tuning (peft passes the prefix as a KV "
                                                  "cache); set it to false",
                        "prompt.init_text": "only applies to prompt_tuning (prefix tuning learns key/value prefixes, "
                                            "not token embeddings)"}),
    MethodSpec("adapter", "bottleneck", "ft_cli.methods.bottleneck:apply_bottleneck", "ft_adapter", "bottleneck",
               merges=False,
               why_not={"merges": "bottleneck adapters add new layers (with a nonlinearity) after attention and MLP, "
                                  "which cannot be folded into the base weights; load the run directory with "
                                  "ft generate / ft eval instead"}),
)

#: Every method ft trains, in the order the recipe schema and docs list them.
METHODS: Mapping[str, MethodSpec] = MappingProxyType({s.name: s for s in _SPECS})


def method_spec(name: str) -> MethodSpec:
    return METHODS[name]


def methods_where(predicate: Callable[[MethodSpec], bool]) -> tuple[str, ...]:
    """The names of the methods whose spec satisfies `predicate`, in registry order."""
    return tuple(name for name, spec in METHODS.items() if predicate(spec))
