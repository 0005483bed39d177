"""Chat templates: which one applies, whether it is safe to train with, and where each assistant turn lies.

Loss masks come from rendered text, not from per-model knowledge: for assistant turn k we render
messages[:k] with add_generation_prompt=True (what the model is shown at inference) and messages[:k+1]; the
characters between the two are what the model must learn to produce, end-of-turn token included. That only
holds if the template is *prefix-consistent*: each of those renders must be a prefix of the full conversation's
render. Every conversation is checked (a `startswith`, nearly free) and a template that breaks the rule is an
error, because a model trained on one rendering would be prompted with another.

Rendering uses the same compiled jinja object as `tokenizer.apply_chat_template` (transformers'
`_compile_jinja_template`) with the same variables, so the text is identical; calling it directly skips
apply_chat_template's per-call overhead, which matters when rendering 2-3 times per conversation.
"""

from __future__ import annotations

from importlib.resources import files
from pathlib import Path
from typing import Any

from ft_cli.data.formats import Example
from ft_cli.errors import UserError

TEMPLATES_DIR = Path(str(files("ft_cli"))) / "templates"


def builtin_template_names() -> list[str]:
    return sorted(p.stem for p in TEMPLATES_DIR.glob("*.jinja"))


def builtin_template(name: str) -> str:
    path = TEMPLATES_DIR / f"{name}.jinja"
    if not path.is_file():
        raise UserError(f"data.chat_template: unknown built-in template {name!r} (built-in: "
                        f"{', '.join(builtin_template_names())}; or give a jinja string or a .jinja file)")
    return path.read_text(encoding="utf-8")


def resolve_chat_template(tokenizer: Any, override: str | None) -> str:
    """The chat template to train with (the override, else the tokenizer's own); sets tokenizer.chat_template."""
    if override:
        if "{{" in override or "{%" in override:
            template = override
        elif override.endswith(".jinja"):
            path = Path(override).expanduser()
            if not path.is_file():
                raise UserError(f"data.chat_template: template file not found: {path}")
            template = path.read_text(encoding="utf-8")
        else:
            template = builtin_template(override)
    else:
        own = tokenizer.chat_template
        if isinstance(own, dict):  # named templates: the default one is the one we report; tools pick their own
            own = own.get("default") or next(iter(own.values()), None)
        if not own:
            raise UserError(
                "data.chat_template: the model's tokenizer has no chat template (a base model?); set "
                f"data.chat_template to a built-in ({', '.join(builtin_template_names())}) or a jinja string. "
                "Format text needs no template.")
        template = own
    compile_template(template)
    if override or not isinstance(tokenizer.chat_template, dict):
        tokenizer.chat_template = template
    return template


def compile_template(template: str) -> Any:
    import jinja2
    from transformers.utils.chat_template_utils import _compile_jinja_template

    try:
        return _compile_jinja_template(template)
    except jinja2.TemplateSyntaxError as exc:
        raise UserError(f"data.chat_template: invalid jinja template, line {exc.lineno}: {exc.message}") from None


class ChatRenderer:
    """Renders conversations with the tokenizer's chat template, exactly as apply_chat_template(tokenize=False)."""

    def __init__(self, tokenizer: Any):
        self.tokenizer = tokenizer
        if not tokenizer.chat_template:
            resolve_chat_template(tokenizer, None)  # raises the "set data.chat_template" error
        self._compiled: dict[bool, Any] = {}
        self.variables = dict(tokenizer.special_tokens_map)

    def _template(self, with_tools: bool) -> Any:
        if with_tools not in self._compiled:
            self._compiled[with_tools] = compile_template(
                self.tokenizer.get_chat_template(None, [{}] if with_tools else None))
        return self._compiled[with_tools]

    def render(self, messages: list[dict[str, Any]], tools: list[dict[str, Any]] | None = None,
               add_generation_prompt: bool = False) -> str:
        return self._template(tools is not None).render(
            messages=messages, tools=tools, documents=None, add_generation_prompt=add_generation_prompt,
            **self.variables)

    def render_with_spans(self, ex: Example) -> tuple[str, list[tuple[int, int]]]:
        """The full render and the [start, end) characters of every assistant turn in it."""
        import jinja2

        messages, tools = ex.messages, ex.tools
        assert messages is not None
        try:
            full = self.render(messages, tools)
            spans = []
            last = len(messages) - 1
            for k, m in enumerate(messages):
                if m["role"] != "assistant":
                    continue
                prompt = self.render(messages[:k], tools, add_generation_prompt=True)
                upto = full if k == last else self.render(messages[: k + 1], tools)
                if not (upto.startswith(prompt) and full.startswith(upto)):
                    raise UserError(_inconsistency(ex, k, prompt, upto, full))
                spans.append((len(prompt), len(upto)))
        except jinja2.TemplateError as exc:
            raise UserError(f"{ex.origin}: the chat template cannot render this conversation: {exc}") from None
        return full, spans


def _inconsistency(ex: Example, k: int, prompt: str, upto: str, full: str) -> str:
    if upto.startswith(prompt):
        shorter, longer, what = upto, full, f"messages[:{k + 1}] (up to and including assistant turn {k})"
        other = "the whole conversation"
    else:
        shorter, longer = prompt, upto
        what = f"messages[:{k}] with add_generation_prompt=True (the inference prompt for assistant turn {k})"
        other = f"messages[:{k + 1}] (the same conversation with the answer)"
    i = next((j for j, (a, b) in enumerate(zip(shorter, longer, strict=False)) if a != b), min(len(shorter), len(longer)))
    lo = max(0, i - 40)
    return (
        f"data.chat_template: the chat template is not prefix-consistent ({ex.origin}): rendering {what} gives\n"
        f"    ...{shorter[lo:i + 40]!r}\n"
        f"  but {other} renders there\n"
        f"    ...{longer[lo:i + 40]!r}\n"
        "  ft finds the trained tokens by rendering each prefix of a conversation, and a model trained on one "
        "rendering would be prompted with the other at inference. Use a template that renders earlier turns "
        "the same whatever follows them (e.g. data.chat_template: chatml or llama3).")


def check_prefix_consistency(renderer: ChatRenderer, example: Example) -> None:
    """Raise the prefix-consistency UserError for this conversation (render_with_spans does the same check)."""
    renderer.render_with_spans(example)


def template_warnings(tokenizer: Any, renderer: ChatRenderer, example: Example) -> list[str]:
    """Silent-mistake checks on one rendered conversation: does an assistant turn end with the eos token?"""
    text, spans = renderer.render_with_spans(example)
    eos = tokenizer.eos_token
    if not spans or not eos:
        return []
    start, end = spans[-1]
    turn = text[start:end].rstrip()
    if turn.endswith(eos):
        return []
    tail = turn[-24:]
    return [f"the chat template ends an assistant turn with {tail!r}, not with the tokenizer's eos_token {eos!r}: "
            "generation stops at that end-of-turn text only if the model's generation_config lists its token as "
            "an eos_token_id (set data.chat_template to one matching the model, or fix the eos token)"]
