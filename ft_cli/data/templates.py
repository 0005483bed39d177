"""Chat templates: which one applies (the tokenizer's own, a built-in, a jinja string or file), compiled as
`tokenizer.apply_chat_template` compiles it, and checks on what a template renders. Where each assistant turn
lies in the rendered text is `render`'s job.
"""

from __future__ import annotations

from importlib.resources import files
from pathlib import Path
from typing import Any

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


def template_warnings(tokenizer: Any, text: str, spans: list[tuple[int, int]]) -> list[str]:
    """Silent-mistake checks on one rendered conversation: does an assistant turn end with the eos token?"""
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
