"""Reading a recipe file: UTF-8 text, YAML with the line of every key (for messages), `--set KEY=VALUE` overrides,
and local paths resolved against the recipe file. ft_cli/recipe.py's load_recipe puts these together."""

from __future__ import annotations

import glob
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

from ft_cli.errors import UserError

if TYPE_CHECKING:
    from ft_cli.recipe import Recipe


def read_utf8(path: Path) -> str:
    data = path.read_bytes()
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = data.count(b"\n", 0, exc.start) + 1
        raise UserError(f"{path}:{line}: not valid UTF-8 (byte 0x{data[exc.start]:02x}); save the recipe as UTF-8") from None


class _LineLoader(yaml.SafeLoader):
    """Safe loader that also records the line of every mapping key."""


def parse_yaml(text: str, path: Path) -> tuple[Any, dict[tuple, int]]:
    try:
        node = yaml.compose(text, Loader=_LineLoader)
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"{path}:{mark.line + 1}" if mark is not None else str(path)
        problem = getattr(exc, "problem", None) or str(exc)
        raise UserError(f"{where}: invalid YAML: {problem}") from None
    lines: dict[tuple, int] = {}

    def walk(n: Any, loc: tuple) -> None:
        if isinstance(n, yaml.MappingNode):
            for k, v in n.value:
                key = loc + (k.value,)
                if key in lines:  # YAML keeps the last one silently
                    raise UserError(f"{path}:{k.start_mark.line + 1}: {'.'.join(map(str, key))}: duplicate key (first "
                                    f"set on line {lines[key]}); remove one of them")
                lines[key] = k.start_mark.line + 1
                walk(v, key)
        elif isinstance(n, yaml.SequenceNode):
            for i, v in enumerate(n.value):
                lines[loc + (i,)] = v.start_mark.line + 1
                walk(v, loc + (i,))

    walk(node, ())
    return data if data is not None else {}, lines


def apply_override(raw: dict, item: str) -> tuple:
    """Set `raw`'s dotted key to the value of `item` (KEY=VALUE); returns the key path."""
    if "=" not in item:
        raise UserError(f"--set {item}: expected KEY=VALUE, e.g. --set train.lr=1e-4")
    key, value = item.split("=", 1)
    parts = key.strip().split(".")
    if not all(parts):
        raise UserError(f"--set {item}: bad key {key!r}")
    try:
        parsed = yaml.safe_load(value) if value.strip() else None
    except yaml.YAMLError:
        parsed = value
    node = raw
    for part in parts[:-1]:
        nxt = node.get(part)
        if nxt is None:
            nxt = node[part] = {}
        if not isinstance(nxt, dict):
            raise UserError(f"--set {item}: {part} is not a section")
        node = nxt
    node[parts[-1]] = parsed
    return tuple(parts)


def resolve_paths(recipe: Recipe, base: Path) -> None:
    """Relative local paths in a recipe are relative to the recipe file, not the current directory; `~` is the
    user's home. Data paths may be globs (data/*.jsonl), resolved the same way and expanded when the data loads."""
    name = recipe.model.name_or_path
    if not name.startswith("builtin:"):
        recipe.model.name_or_path = _resolve_one(name, base)
    for src in recipe.data.sources + recipe.data.eval_sources:
        src.path = _resolve_one(src.path, base)
    # _as_sources builds new objects for plain strings: write the resolved paths back.
    if isinstance(recipe.data.train, str):
        recipe.data.train = _resolve_one(recipe.data.train, base)
    if isinstance(recipe.data.eval, str):
        recipe.data.eval = _resolve_one(recipe.data.eval, base)


def _resolve_one(p: str, base: Path) -> str:
    candidate = base / Path(p).expanduser()  # an absolute path (also ~/...) replaces base
    if _looks_like_path(p) or candidate.exists():
        return str(candidate.resolve())
    return p


def _looks_like_path(p: str) -> bool:
    return (p.startswith(("/", "./", "../", "~")) or p.endswith((".json", ".jsonl", ".csv", ".tsv", ".parquet", ".yaml"))
            or glob.has_magic(p))
