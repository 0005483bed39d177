"""Render-once for plain conversations: one jinja render per conversation instead of one per assistant turn.

Finding the trained characters takes a render of every inference prompt (render.ChatRenderer.plan), which doubles
the jinja work of a single-turn conversation and more for longer ones. Most data is plain: every message has a
role and a text content, and there are no tools. For those, ft plans a conversation's *shape* once:

- The shape is the roles in order and which contents are empty. Its skeleton is the same conversation with each
  non-empty content replaced by a placeholder string of private-use characters, and `plan` runs on the skeleton
  (every inference prompt rendered, prefix-consistency checked), giving the full render with placeholders and
  the trained spans as positions in it.
- The skeleton is rendered by a copy of the template whose placeholders are a `str` subclass that reports any
  use a template can make of a content other than pasting it in: comparisons, `in`, len, indexing, iteration,
  hashing, `%`, every str method except strip/lstrip/rstrip (those give derived placeholders, replaced by the
  stripped content: `| trim` is how Llama, Gemma and Mistral paste contents), and filters and tests other than
  type tests. If the template used a content in any such way (Qwen3 and DeepSeek-R1 look for `</think>`), its
  output could depend on the text and the shape takes the exact path, rendering every prefix of each
  conversation. So does a shape whose plan needs a sample per turn, or a content outside its trained span.
  A content passed to another string's method (`'abc'.startswith(content)`, seen by the sandbox's `call`) is
  noted as well; only `sep.join(...)`, which pastes, is not.
- Each conversation of a planned shape is the skeleton with its contents filled in, and a real render must equal
  it, character for character; where it does not (the template read something the placeholder could not show)
  the conversation takes the exact path. By default every conversation is rendered for real (`check_every` 1).
  ft's tokenizing pass (encode.encode_examples) checks the first CHECK_FIRST conversations of each shape and every
  `check_every`-th after; every one where the skeleton's render called a function whose result can change between
  calls (`strftime_now`, which Llama 3.2's template calls for the date, or jinja's random `lipsum`). When a check
  fails after unchecked conversations of its shape went out, `ShapeMismatch` is raised and the pass starts again
  with every conversation of that shape checked; so the training text is the template's own output wherever a
  check could show otherwise, and the spans are those `plan` finds on the skeleton.

What this leaves trusted rather than checked: a template that reads a content through an operation that neither
the placeholder nor the sandbox sees, in a conversation the sampled check skips or while rendering an inference
prompt. No template seen does; every one in tests/chat_templates plans, and the sampled check found none.
"""

from __future__ import annotations

import contextvars
import re
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from ft_cli.data.rendered import Rendered, Sample

if TYPE_CHECKING:
    from ft_cli.data.render import ChatRenderer

OPEN, CLOSE = "\ue000", "\ue001"  # private-use characters delimit placeholders
_PLACEHOLDER = re.compile(f"{OPEN}(\\d+)(l?r?){CLOSE}")
_NOTES: contextvars.ContextVar[list[str] | None] = contextvars.ContextVar("ft_shape_notes", default=None)
_CALLS: contextvars.ContextVar[list[str] | None] = contextvars.ContextVar("ft_shape_calls", default=None)
_MISSING = object()
VOLATILE_GLOBALS = ("strftime_now", "lipsum")  # template globals whose result can change from call to call
CHECK_FIRST = 32  # conversations of each shape always compared with a real render before sampling starts


class ShapeMismatch(Exception):
    """A sampled check found a conversation whose real render differs from its filled-in skeleton, after
    conversations of the same shape went out unchecked: the caller starts again (the shape is now always checked)."""


@dataclass
class _Plan:
    """The skeleton's full render cut at its placeholders, and the trained spans as indices into `bounds`."""

    literals: list[str]  # text between placeholders: len(refs) + 1 pieces
    refs: list[tuple[int, str]]  # (message index, strip ops) of each placeholder in order
    widths: list[int]  # characters each placeholder takes in the skeleton
    bounds: list[tuple[int, int]]  # (skeleton offset, placeholders before it)
    spans: list[tuple[int, int]]  # (start bound, end bound)
    volatile: bool = False  # the skeleton's render called a VOLATILE_GLOBALS function: check every conversation
    seen: int = 0  # conversations filled from this plan
    unchecked: int = 0  # of them, how many went out without a real render

    def fill(self, contents: list[str]) -> tuple[str, list[tuple[int, int]]]:
        values = [_strip(contents[i], ops) for i, ops in self.refs]
        literals = self.literals
        text = literals[0] + "".join(v + lit for v, lit in zip(values, literals[1:], strict=True))
        shift = [0]
        for v, w in zip(values, self.widths, strict=True):
            shift.append(shift[-1] + len(v) - w)
        offsets = [offset + shift[before] for offset, before in self.bounds]
        return text, [(offsets[a], offsets[b]) for a, b in self.spans]


def _strip(value: str, ops: str) -> str:
    if ops == "lr":
        return value.strip()
    if ops == "l":
        return value.lstrip()
    return value.rstrip() if ops == "r" else value


class ShapeCache:
    """Plans per conversation shape; `render` returns None whenever the exact path must be taken instead."""

    def __init__(self, renderer: ChatRenderer):
        self.renderer = renderer
        self.plans: dict[tuple[tuple[str, bool], ...], _Plan | None] = {}
        self._tracking: Any = None
        self.reasons: dict[tuple[tuple[str, bool], ...], str] = {}  # why a shape takes the exact path
        self.check_every = 1  # compare every conversation with a real render; n: the first CHECK_FIRST and every n-th

    def render(self, messages: list[dict[str, Any]], tools: Any) -> Rendered | None:
        if tools is not None:
            return None
        key = []
        for m in messages:
            content = m.get("content")
            if len(m) != 2 or not isinstance(content, str) or OPEN in content or (content and not content.strip()):
                return None
            key.append((m["role"], bool(content)))
        shape = tuple(key)
        plan = self.plans.get(shape, _MISSING)
        if plan is _MISSING:
            plan = self.plans[shape] = self._plan(shape)
        if plan is None:
            return None
        text, spans = plan.fill([m["content"] for m in messages])
        plan.seen += 1
        if plan.volatile or plan.seen <= CHECK_FIRST or plan.seen % self.check_every == 0:
            if text != self.renderer.render(messages):  # the one real render
                plan.volatile = True  # from now on, every conversation of this shape is checked
                if plan.unchecked:  # the caller starts again, and this time every conversation is checked
                    plan.unchecked = 0
                    raise ShapeMismatch(f"shape {shape}: conversation {plan.seen} differs from its skeleton")
                return None
        else:
            plan.unchecked += 1
        return Rendered([Sample(text, spans)])

    def _plan(self, shape: tuple[tuple[str, bool], ...]) -> _Plan | None:
        skeleton = [{"role": role, "content": Placeholder(f"{OPEN}{i}{CLOSE}") if filled else ""}
                    for i, (role, filled) in enumerate(shape)]
        notes: list[str] = []
        calls: list[str] = []
        token, calls_token = _NOTES.set(notes), _CALLS.set(calls)
        try:
            rendered = self.renderer.plan(skeleton, None, self._render_tracked, None)
        except Exception as exc:  # noqa: BLE001 - the exact path renders the record itself and reports any error
            self.reasons[shape] = f"the skeleton does not render: {type(exc).__name__}: {str(exc).splitlines()[0]}"
            return None
        finally:
            _NOTES.reset(token)
            _CALLS.reset(calls_token)
        if notes:
            self.reasons[shape] = f"the template inspects message contents ({notes[0]})"
            return None
        if len(rendered.samples) != 1:
            self.reasons[shape] = "turns train in samples of their own"
            return None
        sample = rendered.samples[0]
        marks = list(_PLACEHOLDER.finditer(sample.text))
        for i, (role, filled) in enumerate(shape):  # an assistant content outside its span: lost text to report
            if role == "assistant" and filled and not any(
                    int(m.group(1)) == i and any(a <= m.start() and m.end() <= b for a, b in sample.spans)
                    for m in marks):
                self.reasons[shape] = f"assistant message {i} is not all inside its trained span"
                return None
        edges = sorted({e for span in sample.spans for e in span})
        bounds = []
        for e in edges:
            before = sum(1 for m in marks if m.end() <= e)
            if any(m.start() < e < m.end() for m in marks):
                self.reasons[shape] = "a trained span starts or ends inside a message's content"
                return None
            bounds.append((e, before))
        index = {e: j for j, e in enumerate(edges)}
        literals = _PLACEHOLDER.split(sample.text)[::3]  # split() also returns the two groups of each placeholder
        return _Plan(literals=literals, refs=[(int(m.group(1)), m.group(2)) for m in marks],
                     widths=[m.end() - m.start() for m in marks], bounds=bounds,
                     spans=[(index[a], index[b]) for a, b in sample.spans], volatile=bool(calls))

    def _render_tracked(self, messages: list[dict[str, Any]], tools: Any, add_generation_prompt: bool) -> str:
        if self._tracking is None:
            self._tracking = _tracking_template(self.renderer.template(False), self.renderer.template_source(False))
        return self._tracking.render(messages=messages, tools=tools, documents=None,
                                     add_generation_prompt=add_generation_prompt, **self.renderer.variables)


# The tracking placeholder ----------------------------------------------------------------------------------------

def _note(what: str) -> None:
    notes = _NOTES.get()
    if notes is not None:
        notes.append(what)


def _plain(s: str) -> str:
    return str.__str__(s)  # an exact str copy, whose methods report nothing


class Placeholder(str):
    """A message content in a skeleton. Pasting it (+, ~, output, `| string`) keeps it a Placeholder; anything that
    could make the output depend on the content's text is noted. strip/lstrip/rstrip of a bare placeholder give a
    derived one (`| trim` calls strip)."""

    __slots__ = ()

    def __add__(self, other: Any) -> Any:
        return Placeholder(_plain(self) + other) if isinstance(other, str) else NotImplemented

    def __radd__(self, other: Any) -> Any:
        return Placeholder(other + _plain(self)) if isinstance(other, str) else NotImplemented

    def __str__(self) -> str:
        return self

    def __bool__(self) -> bool:
        return True  # shapes only hold non-empty, non-blank contents as placeholders

    def __format__(self, spec: str) -> str:
        if spec:
            _note("a format spec")
        return Placeholder(_plain(self))

    def _derive(self, ops: str, name: str, chars: Any) -> str:
        m = _PLACEHOLDER.fullmatch(_plain(self))
        if chars is not None or m is None:
            _note(f"{name}() with arguments or on pasted text")
            return Placeholder(getattr(str, name)(_plain(self), chars))
        merged = "".join(c for c in "lr" if c in m.group(2) or c in ops)
        return Placeholder(f"{OPEN}{m.group(1)}{merged}{CLOSE}")

    def strip(self, chars: Any = None) -> str:
        return self._derive("lr", "strip", chars)

    def lstrip(self, chars: Any = None) -> str:
        return self._derive("l", "lstrip", chars)

    def rstrip(self, chars: Any = None) -> str:
        return self._derive("r", "rstrip", chars)


def _reporting(name: str) -> Any:
    original = getattr(str, name)

    def hooked(self: str, *args: Any, **kwargs: Any) -> Any:
        _note(f"str.{name}")
        return original(_plain(self), *args, **kwargs)

    hooked.__name__ = f"_reported_{name}"  # not "format": the sandbox would route that around this method
    return hooked


_REPORTED = ("__contains__", "__eq__", "__ne__", "__lt__", "__le__", "__gt__", "__ge__", "__len__", "__iter__",
             "__getitem__", "__hash__", "__mod__", "__rmod__", "__mul__", "__rmul__")
for _name in (*_REPORTED, *(n for n in dir(str) if not n.startswith("_") and n not in ("strip", "lstrip", "rstrip"))):
    setattr(Placeholder, _name, _reporting(_name))


def _holds(value: Any, depth: int = 0) -> bool:
    if isinstance(value, Placeholder):
        return True
    if depth > 4:
        return False
    if isinstance(value, dict):
        return any(_holds(v, depth + 1) for v in value.values())
    if isinstance(value, (list, tuple)):
        return any(_holds(v, depth + 1) for v in value)
    return False


# Filters that only paste a string argument, and filters that move items around without reading their text.
_PASTING_FILTERS = frozenset({"string", "default", "d", "trim"})
_STRUCTURAL_FILTERS = frozenset({"selectattr", "rejectattr", "select", "reject", "map", "list", "first", "last",
                                 "length", "count", "reverse", "items", "batch", "slice", "unique", "sum", "max",
                                 "min", "groupby", "dictsort", "sort", "join", "attr"})
_TYPE_TESTS = frozenset({"defined", "undefined", "none", "string", "mapping", "iterable", "sequence", "number",
                         "integer", "float", "boolean", "true", "false", "callable", "escaped"})


def _hook_filter(name: str, f: Any) -> Any:
    def hooked(*args: Any, **kwargs: Any) -> Any:
        values = (*args, *kwargs.values())
        if name in _STRUCTURAL_FILTERS:
            if any(isinstance(v, Placeholder) for v in values):
                _note(f"filter {name}")
        elif name not in _PASTING_FILTERS and any(_holds(v) for v in values):
            _note(f"filter {name}")
        return f(*args, **kwargs)

    return _keep_pass_arg(hooked, f)


def _hook_test(name: str, f: Any) -> Any:
    skip = 1 if getattr(f, "jinja_pass_arg", None) is not None else 0

    def hooked(*args: Any, **kwargs: Any) -> Any:
        args = list(args)
        if name in _TYPE_TESTS:
            args[skip:] = [_plain(a) if isinstance(a, Placeholder) else a for a in args[skip:]]
        elif any(_holds(v) for v in (*args[skip:], *kwargs.values())):
            _note(f"test {name}")
        return f(*args, **kwargs)

    return _keep_pass_arg(hooked, f)


def _keep_pass_arg(hooked: Any, f: Any) -> Any:
    if getattr(f, "jinja_pass_arg", None) is not None:
        hooked.jinja_pass_arg = f.jinja_pass_arg  # pass_context / pass_environment / pass_eval_context
    return hooked


def _hook_volatile(name: str, f: Any) -> Any:
    def hooked(*args: Any, **kwargs: Any) -> Any:
        calls = _CALLS.get()
        if calls is not None:
            calls.append(name)
        return f(*args, **kwargs)

    return _keep_pass_arg(hooked, f)


def _joined(parts: Any, join: Any) -> str:
    parts = list(parts)
    out = join(parts)
    return Placeholder(out) if any(isinstance(p, Placeholder) for p in parts) else out


def _tracking_template(template: Any, source: str) -> Any:
    """A copy of a compiled chat template whose filters and tests report placeholders, and whose `~` keeps them."""
    from jinja2 import runtime

    env = template.environment.overlay()
    env.filters = {name: _hook_filter(name, f) for name, f in template.environment.filters.items()}
    env.tests = {name: _hook_test(name, f) for name, f in template.environment.tests.items()}
    env.globals = dict(template.environment.globals)
    for name in VOLATILE_GLOBALS:
        if name in env.globals:
            env.globals[name] = _hook_volatile(name, env.globals[name])
    sandboxed_call = env.call  # every call a sandboxed template makes goes through environment.call

    def call(context: Any, obj: Any, *args: Any, **kwargs: Any) -> Any:
        owner = getattr(obj, "__self__", None)
        if (type(owner) is str and getattr(obj, "__name__", "") != "join"
                and any(_holds(v) for v in (*args, *kwargs.values()))):
            _note(f"str.{getattr(obj, '__name__', '?')} given a message content")
        return sandboxed_call(context, obj, *args, **kwargs)

    env.call = call
    tracked = env.from_string(source)
    namespace = tracked.root_render_func.__globals__
    namespace["str_join"] = lambda seq: _joined(seq, runtime.str_join)
    namespace["markup_join"] = lambda seq: _joined(seq, runtime.markup_join)
    return tracked

