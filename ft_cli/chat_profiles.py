"""The chat templates and special tokens of widely used instruct models, shipped with ft (public text from each
model's tokenizer_config.json), so that `ft train --smoke` trains its tiny model with the recipe model's own
template and special tokens: the same rendering, masking and end-of-turn token as the real run.

Each template file in ft_cli/builtin_chat/ is the model's `chat_template` byte for byte; the special tokens are the
ones the template and the model's generation config use (their ids differ: the tiny tokenizer is ft's own BPE).
Nothing here imports torch.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from importlib import resources
from typing import Any


@dataclass(frozen=True)
class ChatProfile:
    name: str
    source: str  # where the template and tokens come from
    template_file: str  # in ft_cli/builtin_chat/
    bos_token: str | None
    eos_token: str  # the tokenizer's eos: what ft appends to text and what ends a turn
    pad_token: str | None  # None: the model has none (ft pads with eos, as with the real model)
    special_tokens: tuple[str, ...]  # every special token, in tokenizer-id order (bos/eos/pad among them)
    generation_eos: tuple[str, ...]  # what the model's generation_config stops on
    add_bos: bool  # the tokenizer puts bos before encoded text (Llama 3, Mistral), or not (Qwen)
    names: tuple[str, ...]  # patterns of model names (lower case) this profile is for

    @property
    def template(self) -> str:
        return resources.files("ft_cli").joinpath("builtin_chat", self.template_file).read_text(encoding="utf-8")

    def key(self) -> dict[str, Any]:
        """What a tiny model built with this profile is made from (for the built-in cache key)."""
        return {"name": self.name, "template": hashlib.sha256(self.template.encode()).hexdigest(),
                "tokens": [self.bos_token, self.eos_token, self.pad_token, list(self.special_tokens),
                           list(self.generation_eos), self.add_bos]}


PROFILES: dict[str, ChatProfile] = {p.name: p for p in (
    ChatProfile(
        name="llama-3.1-instruct", source="meta-llama/Llama-3.1-8B-Instruct", template_file="llama-3.1-instruct.jinja",
        bos_token="<|begin_of_text|>", eos_token="<|eot_id|>", pad_token=None,
        special_tokens=("<|begin_of_text|>", "<|end_of_text|>", "<|finetune_right_pad_id|>", "<|start_header_id|>",
                        "<|end_header_id|>", "<|eom_id|>", "<|eot_id|>", "<|python_tag|>"),
        generation_eos=("<|end_of_text|>", "<|eom_id|>", "<|eot_id|>"), add_bos=True,
        names=(r"llama-?3\.1\b.*instruct",)),
    ChatProfile(
        name="mistral-instruct-v0.3", source="mistralai/Mistral-7B-Instruct-v0.3",
        template_file="mistral-instruct-v0.3.jinja", bos_token="<s>", eos_token="</s>", pad_token=None,
        special_tokens=("<unk>", "<s>", "</s>", "[INST]", "[/INST]", "[TOOL_CALLS]", "[AVAILABLE_TOOLS]",
                        "[/AVAILABLE_TOOLS]", "[TOOL_RESULTS]", "[/TOOL_RESULTS]"),
        generation_eos=("</s>",), add_bos=True, names=(r"mistral-7b-instruct-v0\.3",)),
    ChatProfile(
        name="qwen2.5-instruct", source="Qwen/Qwen2.5-7B-Instruct (all Qwen2.5 instruct sizes)",
        template_file="qwen2.5-instruct.jinja", bos_token=None, eos_token="<|im_end|>", pad_token="<|endoftext|>",
        special_tokens=("<|endoftext|>", "<|im_start|>", "<|im_end|>"),
        generation_eos=("<|im_end|>", "<|endoftext|>"), add_bos=False, names=(r"qwen2\.5-.*instruct",)),
)}


def chat_profile_for(name_or_path: str) -> ChatProfile | None:
    """The shipped profile of a model, found from its name (hub id or directory name); None if ft ships none."""
    lowered = name_or_path.lower()
    for profile in PROFILES.values():
        if any(re.search(pattern, lowered) for pattern in profile.names):
            return profile
    return None
