"""Conversations -> training texts and the characters in them that carry loss.

Every assistant turn trains as the model writes it at inference. For assistant turn k, ft renders messages[:k]
with add_generation_prompt=True (the inference prompt P) and messages[:k+1] (U, the conversation up to and
including the turn): the characters U adds after P are what the model must produce, end-of-turn token
included. The whole conversation's render F is the training text, and each turn is placed in it:

1. U is a prefix of F (most templates): the turn trains in F at [len(P), len(U)).
2. U ends with text the template appends only after the last message (Phi-3 appends eos_token when
   add_generation_prompt is false): U without that tail (special tokens and whitespace, removed one at a time
   until the rest is a prefix of F) lines up with F, and the turn trains up to there. The tail trains after the
   last turn, the only place F has it; no eos is invented mid-conversation.
3. P is a prefix of U but U's turn is not in F: the template renders the turn differently once more messages
   follow (Qwen3 drops <think> blocks and empty reasoning from earlier turns). The turn trains in a sample of its
   own, U, exactly as the model sees and writes it at that position; earlier turns in it are context only.
4. P is not a prefix of U: the model would be prompted with text training never showed it. That is an error
   (the prefix-consistency guarantee), with the template's rule named and, where it applies, the fix.

Rendering uses the compiled jinja template of `tokenizer.apply_chat_template` with the same variables, so the
text is identical. Plain conversations (role + text content, no tools) render once: see `shapes`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from ft_cli.data.formats import Example
from ft_cli.data.rendered import Rendered, Sample
from ft_cli.data.templates import compile_template, resolve_chat_template
from ft_cli.errors import UserError

SYSTEM_MESSAGE_POLICIES = ("keep", "merge_into_first_user")


@dataclass
class ChatRenderer:
    """Turns `Example`s into `Rendered` samples with the tokenizer's chat template (see the module docstring)."""

    tokenizer: Any
    system_message: str = "keep"
    fast: bool = True  # plain conversations render once (shapes.ShapeCache); False: always the exact path
    _compiled: dict[bool, Any] = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        if not self.tokenizer.chat_template:
            resolve_chat_template(self.tokenizer, None)  # raises the "set data.chat_template" error
        self.variables = dict(self.tokenizer.special_tokens_map)
        # What a template may append after the last message only (case 2): special tokens, longest first.
        specials = {t for t in getattr(self.tokenizer, "all_special_tokens", []) if t}
        self.tail_tokens = sorted(specials, key=len, reverse=True)
        from ft_cli.data.shapes import ShapeCache

        self.shapes = ShapeCache(self) if self.fast else None

    # Rendering -------------------------------------------------------------------------------------------------

    def template(self, with_tools: bool) -> Any:
        if with_tools not in self._compiled:
            self._compiled[with_tools] = compile_template(self.template_source(with_tools))
        return self._compiled[with_tools]

    def template_source(self, with_tools: bool) -> str:
        return self.tokenizer.get_chat_template(None, [{}] if with_tools else None)

    def render(self, messages: list[dict[str, Any]], tools: list[dict[str, Any]] | None = None,
               add_generation_prompt: bool = False) -> str:
        return self.template(tools is not None).render(
            messages=messages, tools=tools, documents=None, add_generation_prompt=add_generation_prompt,
            **self.variables)

    # Conversations ---------------------------------------------------------------------------------------------

    def conversation(self, ex: Example) -> Rendered:
        import jinja2

        assert ex.messages is not None
        messages = self.prepare(ex)
        try:
            if self.shapes is not None:
                fast = self.shapes.render(messages, ex.tools)
                if fast is not None:
                    return fast
            rendered = self.plan(messages, ex.tools, self.render, ex)
        except jinja2.TemplateError as exc:
            raise UserError(self.refusal(ex, messages, exc)) from None
        rendered.lost = lost_text(messages, rendered)
        return rendered

    def render_with_spans(self, ex: Example) -> tuple[str, list[tuple[int, int]]]:
        """The first sample's text and trained spans (for callers that need one text per conversation)."""
        sample = self.conversation(ex).samples[0]
        return sample.text, sample.spans

    def prepare(self, ex: Example) -> list[dict[str, Any]]:
        """The messages as rendered: data.system_message applied."""
        messages = ex.messages
        assert messages is not None
        if self.system_message != "merge_into_first_user" or not messages or messages[0]["role"] != "system":
            return messages
        rest = messages[1:]
        first_user = next((i for i, m in enumerate(rest) if m["role"] == "user"), None)
        if first_user is None:
            raise UserError(f"{ex.origin}: data.system_message: merge_into_first_user: the record has a system "
                            "message but no user message to merge it into")
        system, user = messages[0]["content"], rest[first_user]
        rest = list(rest)
        # A blank line between them, as the templates that do this themselves join them (Mistral, LLaMA-Factory).
        rest[first_user] = {**user, "content": merge_system_prompt(system, user["content"]) if system
                            else user["content"]}
        return rest

    def plan(self, messages: list[dict[str, Any]], tools: list[dict[str, Any]] | None, render: Any,
             ex: Example | None) -> Rendered:
        """Cases 1-4 of the module docstring. `render(messages, tools, add_generation_prompt)` renders."""
        full = render(messages, tools, False)
        last = len(messages) - 1
        spans: list[tuple[int, int]] = []
        own: list[Sample] = []
        turns: list[tuple[int, str, int, int]] = []
        for k, m in enumerate(messages):
            if m["role"] != "assistant":
                continue
            prompt = render(messages[:k], tools, True)
            upto = full if k == last else render(messages[:k + 1], tools, False)
            if not upto.startswith(prompt):
                raise UserError(self.inconsistency(ex, messages, tools, k, prompt, upto, render))
            end = self.end_in(full, upto, len(prompt))
            if end is not None:
                spans.append((len(prompt), end))
                turns.append((k, full, len(prompt), end))
            else:
                own.append(Sample(upto, [(len(prompt), len(upto))]))
                turns.append((k, upto, len(prompt), len(upto)))
        samples = ([Sample(full, spans)] if spans or not own else []) + own
        return Rendered(samples, own_turns=len(own), turns=turns)

    def end_in(self, full: str, upto: str, start: int) -> int | None:
        """Where the turn that `upto` ends with ends in `full` (case 1 or 2), or None (case 3)."""
        if not full.startswith(upto[:start]):
            return None
        if full.startswith(upto):
            return len(upto)
        end = len(upto)
        while end > start:  # case 2: peel the tail one special token or whitespace character at a time
            token = next((t for t in self.tail_tokens if upto.endswith(t, start, end)), None)
            if token is not None:
                end -= len(token)
            elif upto[end - 1].isspace():
                end -= 1
            else:
                return None
            if end > start and full.startswith(upto[:end]):
                return end
        return None

    # Messages for what a template refuses ----------------------------------------------------------------------

    def refusal(self, ex: Example, messages: list[dict[str, Any]], exc: Exception) -> str:
        roles = ", ".join(m["role"] for m in messages)
        msg = (f"{ex.origin}: the chat template refuses this conversation: {exc} (the template's own rule; roles "
               f"in this record: {roles})")
        if self.system_message == "keep" and messages and messages[0]["role"] == "system" \
                and self._renders_without_system(messages, ex.tools):
            msg += (". The template has no place for a system message (Gemma's has no system role). Set "
                    "data.system_message: merge_into_first_user to put the system prompt at the start of the first "
                    "user message, or remove it from the data")
        elif any(m["role"] == "tool" for m in messages):
            msg += ". This template has no tool role: use a template with one (data.chat_template) or data without"
        else:
            msg += ". Make the records follow that rule, or use a template that accepts them (data.chat_template)"
        return msg

    def _renders_without_system(self, messages: list[dict[str, Any]], tools: list[dict[str, Any]] | None) -> bool:
        import jinja2

        rest = messages[1:]
        try:
            self.render(rest, tools)
            k = next((i for i, m in enumerate(rest) if m["role"] == "assistant"), None)
            if k is not None:
                prompt = self.render(rest[:k], tools, True)
                return self.render(rest[:k + 1], tools).startswith(prompt)
            return True
        except jinja2.TemplateError:
            return False

    def inconsistency(self, ex: Example | None, messages: list[dict[str, Any]], tools: list[dict[str, Any]] | None,
                      k: int, prompt: str, upto: str, render: Any) -> str:
        i = _common_prefix(prompt, upto)
        lo = max(0, i - 40)
        where = f" ({ex.origin})" if ex is not None else ""
        msg = (
            f"data.chat_template: the chat template is not prefix-consistent{where}: the inference prompt for "
            f"the assistant message at index {k} (messages[:{k}] with add_generation_prompt=True) renders\n"
            f"    ...{prompt[lo:i + 40]!r}\n"
            f"  but the conversation up to and including that message (messages[:{k + 1}]) renders there\n"
            f"    ...{upto[lo:i + 40]!r}\n")
        if i >= _common_prefix(render(messages[:k], tools, False), prompt):  # it differs in the generation prompt
            msg += (f"  The generation prompt ends with {prompt[i:]!r}, which the template does not render before the "
                    "assistant's message" + (" (DeepSeek-R1's template opens <think> in the prompt but strips the "
                                             "reasoning from messages: give data.chat_template a template that "
                                             "renders it, e.g. TRL's trl/chat_templates/"
                                             "deepseek_r1_distill_training.jinja, and data whose answers start "
                                             "with <think>)." if "<think>" in prompt[i:] else "."))
        if self.system_message == "keep" and messages and messages[0]["role"] == "system" \
                and self._renders_without_system(messages, tools):
            msg += ("  The system message is what moves: the template places it differently in the inference prompt "
                    "than in the training text (Mistral v0.3 puts it in the last [INST] block, and only while the "
                    "conversation ends with a user turn). Set data.system_message: merge_into_first_user to put it at "
                    "the start of the first user message, where every render has it.")
        else:
            msg += ("  A model trained on one rendering would be prompted with the other. Use a template whose "
                    "generation prompt is where the assistant's message begins (data.chat_template: a jinja file or "
                    "a built-in such as chatml or llama3).")
        return msg


def merge_system_prompt(system: str, prompt: str) -> str:
    """data.system_message: merge_into_first_user for one user message (ft generate --system uses it too)."""
    return f"{system}\n\n{prompt}"


def lost_text(messages: list[dict[str, Any]], rendered: Rendered) -> str | None:
    """The first assistant text (content or reasoning) missing from where its turn is rendered, described; None if
    all is there. The place looked in is the trained span and the end of its prompt (a generation prompt may open
    the text, as DeepSeek-R1's '<think>\n' does); whitespace is ignored, since templates strip and re-space what
    they paste in."""
    for k, text, start, end in rendered.turns:
        m = messages[k]
        rendered_turn = "".join(text[max(0, start - _PROMPT_TAIL):end].split())
        for name in ("content", "reasoning_content"):
            value = m.get(name)
            if not isinstance(value, str) or not value.strip() or "".join(value.split()) in rendered_turn:
                continue
            if name == "content" and "</think>" in value and \
                    "".join(value.split("</think>")[-1].split()) in rendered_turn:
                return f"assistant message {k}: the reasoning before </think> in its content"
            if name == "reasoning_content":
                return f"assistant message {k}: its reasoning_content (the template does not render it)"
            return f"assistant message {k}: content {_clip(value)!r} is not all in the training text"
    return None


_PROMPT_TAIL = 64  # characters of a turn's prompt that may hold the start of its text


def _common_prefix(a: str, b: str) -> int:
    return next((j for j, (x, y) in enumerate(zip(a, b, strict=False)) if x != y), min(len(a), len(b)))


def _clip(s: str, n: int = 50) -> str:
    s = " ".join(s.split())
    return s if len(s) <= n else s[: n - 3] + "..."
