"""Recipe errors in plain words: `recipe.yaml:LINE: field: message`, or `--set ITEM: message` for a value a --set
item gave; "did you mean" for a misspelt key; one line per problem, every problem at once.

The recipe's validators (ft_cli/recipe.py) raise FieldError (or FieldErrors) to name the field a problem is about;
format_errors turns pydantic's ValidationError of a schema into the lines. Imports nothing of ft, so the schema
can use it.
"""

from __future__ import annotations

import difflib
from typing import Any

from pydantic import BaseModel, ValidationError


class FieldError(ValueError):
    """Raised inside validators to attach the message to a dotted field path."""

    def __init__(self, path: str, message: str):
        super().__init__(f"{path}: {message}")
        self.path, self.message = path, message


class FieldErrors(ValueError):
    """Several FieldErrors of one validator, reported together."""

    def __init__(self, errors: list[FieldError]):
        super().__init__("; ".join(str(e) for e in errors))
        self.errors = errors


_MESSAGES = {
    "greater_than": "must be greater than {gt}",
    "greater_than_equal": "must be at least {ge}",
    "less_than": "must be less than {lt}",
    "less_than_equal": "must be at most {le}",
}


def format_errors(exc: ValidationError, schema: type[BaseModel], source: str, lines: dict[tuple, int],
                  overrides: dict[tuple, str] | None = None) -> list[str]:
    """One line per problem: `recipe.yaml:LINE: field: message`, or `--set ITEM: message` for a value a --set
    item gave (the field is named too when the problem is deeper inside it)."""
    out: list[str] = []
    seen: set[str] = set()
    for loc, msg in _problems(exc.errors(include_url=False), schema):
        dotted = ".".join(str(p) for p in loc)
        item = _override_for(loc, overrides or {})
        if item is not None:
            key = item.split("=", 1)[0].strip()
            text = f"--set {item}: {msg}" if dotted == key else f"--set {item}: {dotted}: {msg}"
        else:
            where = field_location(loc, source, lines, {}) or source
            text = f"{where}: {dotted}: {msg}" if dotted else f"{where}: {msg}"
        if text not in seen:
            seen.add(text)
            out.append(text)
    return out


def _override_for(loc: tuple, overrides: dict[tuple, str]) -> str | None:
    """The --set item that set this field, a section above it, or a key below it (a misspelt section)."""
    if not loc:
        return None
    for path, item in overrides.items():
        n = min(len(path), len(loc))
        if path[:n] == loc[:n]:
            return item
    return None


def field_location(loc: tuple, source: str | None, lines: dict[tuple, int], overrides: dict[tuple, str]) -> str | None:
    item = _override_for(loc, overrides)
    if item is not None:
        return f"--set {item}"
    line = _line_for(loc, lines)
    if source is None:
        return None
    return f"{source}:{line}" if line else None


def _line_for(loc: tuple, lines: dict[tuple, int]) -> int | None:
    while loc:
        if loc in lines:
            return lines[loc]
        loc = loc[:-1]
    return None


def _is_branch(part: Any) -> bool:
    """pydantic's union-branch markers in an error location (e.g. 'list[DatasetSource]', 'literal[...]', 'str')."""
    return isinstance(part, str) and ("[" in part or part in ("str", "int", "float"))


def _problems(errors: list[dict], schema: type[BaseModel]) -> list[tuple[tuple, str]]:
    """(location, message) per problem. A union field (str | list[...], 'all-linear' | list[str]) gets one error per
    branch: when the input had one branch's shape, only that branch's errors (inside it) are kept; otherwise the
    field gets one line saying what it may be."""
    groups: dict[tuple, list[dict]] = {}
    for err in errors:
        cut = next((i for i, p in enumerate(err["loc"]) if _is_branch(p)), None)
        groups.setdefault(err["loc"] if cut is None else err["loc"][:cut], []).append(err)
    out: list[tuple[tuple, str]] = []
    for key, group in list(groups.items()):
        several = [e for e in group if e["type"] == "value_error" and isinstance((e.get("ctx") or {}).get("error"),
                                                                                FieldErrors)]
        for e in several:  # one validator's several problems: one line each
            group.remove(e)
            loc = tuple(p for p in e["loc"] if not _is_branch(p))
            out.extend((loc + tuple(fe.path.split(".")), fe.message) for fe in e["ctx"]["error"].errors)
        if not group:
            continue
        inner = [e for e in group if len(e["loc"]) > len(key) + 1]
        if len(group) == 1 or inner or not all(len(e["loc"]) > len(key) for e in group):
            out.extend(_describe(e, schema) for e in (inner or group))
            continue
        wants = [_describe(e, schema)[1].split(", got ")[0].removeprefix("must be ") for e in group]
        out.append((_describe(group[0], schema)[0], f"must be {' or '.join(wants)}, got {group[0].get('input')!r}"))
    return out


def _describe(err: dict, schema: type[BaseModel]) -> tuple[tuple, str]:
    loc = tuple(p for p in err["loc"] if not _is_branch(p))
    typ, ctx = err["type"], err.get("ctx") or {}
    if typ == "extra_forbidden":
        return loc, "unknown key" + _did_you_mean(loc, schema)
    if typ == "missing":
        return loc, "is required"
    if typ == "value_error" and isinstance(ctx.get("error"), FieldError):
        fe = ctx["error"]
        return loc + tuple(fe.path.split(".")), fe.message
    if typ == "literal_error":
        return loc, f"must be one of {ctx.get('expected', '')}, got {err.get('input')!r}"
    if typ in _MESSAGES:
        return loc, _MESSAGES[typ].format(**ctx) + f", got {err.get('input')!r}"
    msg = err["msg"]
    msg = msg[0].lower() + msg[1:] if msg else msg
    msg = msg.replace("input should be", "must be").replace("value error, ", "")
    return loc, f"{msg}, got {err.get('input')!r}" if "input" in err and typ != "value_error" else msg


def _did_you_mean(loc: tuple, schema: type[BaseModel]) -> str:
    fields = _fields_at(loc[:-1], schema)
    if not fields:
        return ""
    guess = difflib.get_close_matches(str(loc[-1]), fields, n=1, cutoff=0.6)
    allowed = ", ".join(fields)
    return f" (did you mean {guess[0]!r}?)" if guess else f" (allowed: {allowed})"


def _fields_at(loc: tuple, schema: type[BaseModel]) -> list[str]:
    model: Any = schema
    for part in loc:
        if isinstance(part, int):
            continue
        field = model.model_fields.get(part) if hasattr(model, "model_fields") else None
        if field is None:
            return []
        model = nested_model(field.annotation)
        if model is None:
            return []
    return list(model.model_fields) if hasattr(model, "model_fields") else []


def nested_model(annotation: Any) -> type[BaseModel] | None:
    """The pydantic model a field holds (`X`, `X | None`, `list[X]`, ...), or None."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for arg in getattr(annotation, "__args__", ()) or ():
        found = nested_model(arg)
        if found is not None:
            return found
    return None
