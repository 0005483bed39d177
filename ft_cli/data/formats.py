"""Record formats -> `Example`s: a conversation (messages + tools) for alpaca/chat/sharegpt, plain text for text.

Every problem with a record raises a UserError naming the file, the record and the field, and saying what is
allowed. A record that is well formed but has nothing to learn from (no assistant content, blank text) becomes
None and is counted as `dropped_empty` downstream, never skipped silently.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from ft_cli.errors import UserError

# The fields of each format; `data.columns` maps these names to the user's column names.
FIELDS: dict[str, tuple[str, ...]] = {
    "alpaca": ("instruction", "input", "output", "system", "history"),
    "chat": ("messages", "role", "content", "tools", "system"),
    "sharegpt": ("conversations", "from", "value", "tools", "system"),
    "text": ("text",),
    "labelled": ("text", "text_pair", "label"),  # task: classification (ft_cli.tasks.classification reads it)
    # Preference pairs: the prompt as a conversation (`conversations`, sharegpt turns; `messages`, chat messages), an
    # alpaca instruction (+ input) or a plain `prompt` string (or list of chat messages, as TRL's datasets); chosen
    # and rejected as a reply string, a turn/message object, or a list of them.
    "preference": ("prompt", "chosen", "rejected", "conversations", "messages", "instruction", "input", "system",
                   "tools"),
}
CHAT_ROLES = ("system", "user", "assistant", "tool")
_REASONING = ("reasoning_content", "thinking", "reasoning")
SHAREGPT_ROLES = {
    "human": "user", "user": "user",
    "gpt": "assistant", "assistant": "assistant",
    "system": "system",
    "function_call": "assistant",  # value is the JSON of {"name": ..., "arguments": {...}}: a tool call
    "observation": "tool", "tool": "tool",
}


@dataclass(slots=True)
class Origin:
    """Where a record came from, for error messages: `file:record 7 (line 8)`. Records count from 0."""

    source: str
    index: int
    line: int | None = None

    def __str__(self) -> str:
        return f"{self.source}:record {self.index}" + (f" (line {self.line})" if self.line is not None else "")


@dataclass(slots=True)
class Example:
    messages: list[dict[str, Any]] | None  # alpaca / chat / sharegpt
    tools: list[dict[str, Any]] | None
    text: str | None  # text format
    origin: Origin
    rejected: list[dict[str, Any]] | None = None  # preference: the prompt + the rejected reply (messages: + chosen)


Converter = Callable[[dict[str, Any], Origin], "Example | None"]


def check_columns(fmt: str, columns: dict[str, str] | None, where: str = "data.columns") -> dict[str, str]:
    """The full field -> column map of a format, with the user's renames applied."""
    mapping = {f: f for f in FIELDS[fmt]}
    for key, value in (columns or {}).items():
        if key not in mapping:
            raise UserError(f"{where}: {key!r} is not a field of format {fmt} (fields: {', '.join(FIELDS[fmt])}); "
                            "write {format_field: your_column}")
        mapping[key] = value
    return mapping


def format_of_record(record: dict[str, Any]) -> str | None:
    """The format whose fields a record has (messages: chat, conversations: sharegpt, instruction + output: alpaca,
    text: text, text + label: labelled; chosen + rejected: preference); None when none or several match."""
    if "chosen" in record and "rejected" in record:
        return "preference"
    if "text" in record and "label" in record:
        return "labelled"
    found = [fmt for fmt, needs in (("chat", ("messages",)), ("sharegpt", ("conversations",)),
                                    ("alpaca", ("instruction", "output")), ("text", ("text",)))
             if all(k in record for k in needs)]
    return found[0] if len(found) == 1 else None


def make_converter(fmt: str, columns: dict[str, str] | None) -> Converter:
    col = check_columns(fmt, columns)
    return {"alpaca": _alpaca, "chat": _chat, "sharegpt": _sharegpt, "text": _text,
            "preference": _preference}[fmt](col)


class _Bad:
    """Builds the error messages of one format."""

    def __init__(self, fmt: str, col: dict[str, str]):
        self.fmt, self.col = fmt, col
        self.renamed = any(k != v for k, v in col.items())

    def missing(self, origin: Origin, field: str) -> UserError:
        hint = "" if self.renamed else "; map your columns with data.columns"
        return UserError(f"{origin}: missing field {self.col[field]!r} (format {self.fmt}{hint})")

    def type(self, origin: Origin, name: str, value: Any, want: str) -> UserError:
        got = "null" if value is None else type(value).__name__
        shown = repr(value) if not isinstance(value, (dict, list)) else got
        return UserError(f"{origin}: field {name!r} must be {want}, got {got} ({_clip(shown)}) (format {self.fmt})")

    def other(self, origin: Origin, message: str) -> UserError:
        return UserError(f"{origin}: {message} (format {self.fmt})")


def _clip(s: str, n: int = 60) -> str:
    return s if len(s) <= n else s[: n - 3] + "..."


def _str(bad: _Bad, record: dict, field: str, origin: Origin, *, required: bool) -> str:
    name = bad.col[field]
    value = record.get(name)
    if value is None:
        if required:
            raise bad.missing(origin, field)
        return ""
    if not isinstance(value, str):
        raise bad.type(origin, name, value, "a string")
    return value


def _alpaca(col: dict[str, str]) -> Converter:
    bad = _Bad("alpaca", col)
    c_hist = col["history"]

    def convert(record: dict, origin: Origin) -> Example | None:
        instruction = _str(bad, record, "instruction", origin, required=True)
        output = _str(bad, record, "output", origin, required=True)
        extra = _str(bad, record, "input", origin, required=False)
        system = _str(bad, record, "system", origin, required=False)
        messages: list[dict[str, Any]] = [{"role": "system", "content": system}] if system else []
        history = record.get(c_hist)
        if history:
            if not isinstance(history, list):
                raise bad.type(origin, c_hist, history, "a list of [user, assistant] pairs")
            for i, pair in enumerate(history):
                if not (isinstance(pair, (list, tuple)) and len(pair) == 2 and all(isinstance(x, str) for x in pair)):
                    raise bad.type(origin, f"{c_hist}[{i}]", pair, "a [user, assistant] pair of strings")
                messages.append({"role": "user", "content": pair[0]})
                messages.append({"role": "assistant", "content": pair[1]})
        # LLaMA-Factory's convention: instruction and input joined by a newline.
        messages.append({"role": "user", "content": f"{instruction}\n{extra}" if extra else instruction})
        messages.append({"role": "assistant", "content": output})
        return Example(messages, None, None, origin) if _has_answer(messages) else None

    return convert


def _chat(col: dict[str, str]) -> Converter:
    bad = _Bad("chat", col)
    c_msgs, c_role, c_content = col["messages"], col["role"], col["content"]

    def convert(record: dict, origin: Origin) -> Example | None:
        raw = record.get(c_msgs)
        if raw is None:
            raise bad.missing(origin, "messages")
        if not isinstance(raw, list):
            raise bad.type(origin, c_msgs, raw, "a list of {role, content} messages")
        messages: list[dict[str, Any]] = []
        for i, m in enumerate(raw):
            where = f"{c_msgs}[{i}]"
            if not isinstance(m, dict):
                raise bad.type(origin, where, m, f"an object with {c_role!r} and {c_content!r}")
            role = m.get(c_role)
            if role not in CHAT_ROLES:
                if role is None:
                    raise bad.other(origin, f"{where} has no {c_role!r}")
                raise bad.other(origin, f"{where}.{c_role}: unknown role {role!r} (allowed: {', '.join(CHAT_ROLES)})")
            msg = {k: v for k, v in m.items() if k not in (c_role, c_content) and v is not None}
            msg["role"] = role
            content = m.get(c_content)
            if "tool_calls" in msg:
                if role != "assistant":
                    raise bad.other(origin, f"{where}: only assistant messages have tool_calls, not {role!r}")
                calls = msg["tool_calls"]
                if not isinstance(calls, list):
                    raise bad.type(origin, f"{where}.tool_calls", calls, "a list of tool calls")
                msg["tool_calls"] = [_tool_call(bad, origin, f"{where}.tool_calls[{j}]", c) for j, c in enumerate(calls)]
                content = content or ""
            if not isinstance(content, str):
                raise bad.type(origin, f"{where}.{c_content}", content, "a string")
            msg["content"] = content
            reasoning = next((msg[k] for k in _REASONING if msg.get(k) is not None), None)
            if reasoning is not None:  # as apply_chat_template does: templates read one name or another
                msg = {"thinking": reasoning, **msg, "reasoning_content": reasoning}
            messages.append(msg)
        _prepend_system(bad, record, origin, messages)
        tools = _tools(bad, record, origin)
        return Example(messages, tools, None, origin) if _has_answer(messages) else None

    return convert


def _sharegpt(col: dict[str, str]) -> Converter:
    bad = _Bad("sharegpt", col)
    c_conv, c_from, c_value = col["conversations"], col["from"], col["value"]
    allowed = ", ".join(("human", "gpt", "system", "function_call", "observation"))

    def convert(record: dict, origin: Origin) -> Example | None:
        raw = record.get(c_conv)
        if raw is None:
            raise bad.missing(origin, "conversations")
        if not isinstance(raw, list):
            raise bad.type(origin, c_conv, raw, "a list of {from, value} turns")
        messages: list[dict[str, Any]] = []
        for i, turn in enumerate(raw):
            where = f"{c_conv}[{i}]"
            if not isinstance(turn, dict):
                raise bad.type(origin, where, turn, f"an object with {c_from!r} and {c_value!r}")
            tag = turn.get(c_from)
            role = SHAREGPT_ROLES.get(tag) if isinstance(tag, str) else None
            if role is None:
                raise bad.other(origin, f"{where}.{c_from}: unknown role {tag!r} (allowed: {allowed})")
            value = turn.get(c_value)
            if not isinstance(value, str):
                raise bad.type(origin, f"{where}.{c_value}", value, "a string")
            if tag == "function_call":
                try:
                    call = json.loads(value)
                except json.JSONDecodeError as exc:
                    raise bad.other(origin, f"{where}.{c_value}: a function_call must be the JSON of "
                                    f"{{name, arguments}}: {exc.msg}") from None
                calls = call if isinstance(call, list) else [call]
                tool_calls = [_tool_call(bad, origin, f"{where}.{c_value}", c) for c in calls]
                prev = messages[-1] if messages else None
                if prev is not None and prev["role"] == "assistant":  # gpt text, then its call: one message
                    prev.setdefault("tool_calls", []).extend(tool_calls)
                else:
                    messages.append({"role": "assistant", "content": "", "tool_calls": tool_calls})
            else:
                messages.append({"role": role, "content": value})
        _prepend_system(bad, record, origin, messages)
        tools = _tools(bad, record, origin)
        return Example(messages, tools, None, origin) if _has_answer(messages) else None

    return convert


def _text(col: dict[str, str]) -> Converter:
    bad = _Bad("text", col)

    def convert(record: dict, origin: Origin) -> Example | None:
        text = _str(bad, record, "text", origin, required=True)
        return Example(None, None, text, origin) if text.strip() else None

    return convert


def _preference(col: dict[str, str]) -> Converter:
    """A pair: the prompt through the conversation format it is written in (so roles, tools and system messages
    mean what they mean there), then the chosen and the rejected reply as its last assistant message."""
    bad = _Bad("preference", col)
    sharegpt = _sharegpt({"conversations": col["conversations"], "from": "from", "value": "value",
                          "tools": col["tools"], "system": col["system"]})
    chat = _chat({"messages": "messages", "role": "role", "content": "content", "tools": col["tools"],
                  "system": col["system"]})

    def reply(record: dict, field: str, origin: Origin, turn_key: tuple[str, str]) -> list[dict[str, Any]]:
        name = col[field]
        value = record.get(name)
        if value is None:
            raise bad.missing(origin, field)
        if isinstance(value, str):
            value = [{turn_key[0]: "gpt" if turn_key[0] == "from" else "assistant", turn_key[1]: value}]
        elif isinstance(value, dict):
            value = [value]
        if not isinstance(value, list) or not value or not all(isinstance(v, dict) for v in value):
            raise bad.type(origin, name, value, "a reply string, a message object or a list of them")
        return value

    def convert(record: dict, origin: Origin) -> Example | None:
        if col["conversations"] in record:  # sharegpt turns (LLaMA-Factory's dpo_en_demo.json)
            conv = record[col["conversations"]]
            if not isinstance(conv, list):
                raise bad.type(origin, col["conversations"], conv, "a list of {from, value} turns")
            key, convert_with, prompt_field = ("from", "value"), sharegpt, col["conversations"]
        else:
            if col["messages"] in record or isinstance(record.get(col["prompt"]), list):
                field = col["messages"] if col["messages"] in record else col["prompt"]
                conv = record[field]
                if not isinstance(conv, list):
                    raise bad.type(origin, field, conv, "a list of {role, content} messages")
            elif col["instruction"] in record:  # alpaca: instruction and input joined by a newline
                instruction = _str(bad, record, "instruction", origin, required=True)
                extra = _str(bad, record, "input", origin, required=False)
                conv = [{"role": "user", "content": f"{instruction}\n{extra}" if extra else instruction}]
            elif col["prompt"] in record:
                conv = [{"role": "user", "content": _str(bad, record, "prompt", origin, required=True)}]
            else:
                raise bad.other(origin, f"no prompt: a pair needs {col['conversations']!r} (sharegpt turns), "
                                f"{col['messages']!r} (chat messages), {col['instruction']!r} (alpaca) or "
                                f"{col['prompt']!r}")
            key, convert_with, prompt_field = ("role", "content"), chat, "messages"
        sides = []
        for field in ("chosen", "rejected"):
            record_side = {k: v for k, v in record.items() if k in (col["tools"], col["system"])}
            record_side[prompt_field] = list(conv) + reply(record, field, origin, key)
            ex = convert_with(record_side, origin)
            if ex is None:
                return None  # a blank reply: nothing to compare (counted as dropped_empty)
            sides.append(ex)
        return Example(sides[0].messages, sides[0].tools, None, origin, rejected=sides[1].messages)

    return convert


def _has_answer(messages: list[dict[str, Any]]) -> bool:
    return any(m["role"] == "assistant" and (m["content"].strip() or m.get("tool_calls")) for m in messages)


def _prepend_system(bad: _Bad, record: dict, origin: Origin, messages: list[dict[str, Any]]) -> None:
    system = _str(bad, record, "system", origin, required=False)
    if system and not (messages and messages[0]["role"] == "system"):
        messages.insert(0, {"role": "system", "content": system})


def _tools(bad: _Bad, record: dict, origin: Origin) -> list[dict[str, Any]] | None:
    """The `tools` column (a JSON string or a list) as JSON schemas in the transformers convention."""
    name = bad.col["tools"]
    value = record.get(name)
    if value is None or value == "":
        return None
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError as exc:
            raise bad.other(origin, f"field {name!r} is not valid JSON: {exc.msg}") from None
    if isinstance(value, dict):
        value = [value]
    if not isinstance(value, list) or not all(isinstance(t, dict) for t in value):
        raise bad.type(origin, name, value, "a list of tool schemas (or its JSON string)")
    # Bare {name, description, parameters} (glaive, LLaMA-Factory) -> {"type": "function", "function": {...}}, the
    # shape transformers builds from Python functions at inference, so training sees what inference will.
    return [t if "type" in t or "name" not in t else {"type": "function", "function": t} for t in value] or None


def _tool_call(bad: _Bad, origin: Origin, where: str, call: Any) -> dict[str, Any]:
    if not isinstance(call, dict):
        raise bad.type(origin, where, call, "a tool call object {name, arguments}")
    fn = call.get("function") if isinstance(call.get("function"), dict) else call
    name = fn.get("name")
    if not isinstance(name, str) or not name:
        raise bad.other(origin, f"{where}: a tool call needs a 'name'")
    args = fn.get("arguments", fn.get("parameters", {}))
    if isinstance(args, str):  # OpenAI sends arguments as a JSON string; chat templates expect the object
        try:
            args = json.loads(args)
        except json.JSONDecodeError:
            pass
    out: dict[str, Any] = {"type": "function", "function": {"name": name, "arguments": args}}
    if "id" in call:
        out["id"] = call["id"]
    return out
