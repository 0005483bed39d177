"""Imports among ft_cli modules flow one way (cli -> commands -> model | data | methods -> recipe; docs/architecture.md).

Static, over the source with ast: every `import` counts, at module level and inside functions alike (a cycle hidden
behind a function-level import is still a cycle: the two modules cannot be understood or tested apart). Imports under
`if TYPE_CHECKING:` do not count (they never run). Importing `ft_cli.a.b` also imports the package `ft_cli.a`, so
that counts as an edge too, except from inside the package itself (a package's own submodules always import it).
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent / "ft_cli"


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _imported_names(tree: ast.AST, module: str, is_package: bool) -> list[str]:
    names: list[str] = []

    def visit(node: ast.AST) -> None:
        if isinstance(node, ast.If) and _is_type_checking(node):
            for child in node.orelse:
                visit(child)
            return
        if isinstance(node, ast.Import):
            names.extend(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: resolve against this module's package
                package = module.split(".") if is_package else module.split(".")[:-1]
                package = package[: len(package) - node.level + 1]
                base = ".".join(package + ([base] if base else []))
            names.append(base)
            names.extend(f"{base}.{alias.name}" for alias in node.names)
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(tree)
    return names


def import_graph() -> dict[str, set[str]]:
    files = {_module_name(p): p for p in ROOT.rglob("*.py")}
    graph: dict[str, set[str]] = {}
    for module, path in files.items():
        targets: set[str] = set()
        for name in _imported_names(ast.parse(path.read_text()), module, path.name == "__init__.py"):
            if not (name == "ft_cli" or name.startswith("ft_cli.")):
                continue
            parts = name.split(".")
            for i in range(2, len(parts) + 1):  # the module and every package above it (ft_cli itself excepted)
                candidate = ".".join(parts[:i])
                if candidate in files and candidate != module and not module.startswith(candidate + "."):
                    targets.add(candidate)
        graph[module] = targets
    return graph


def find_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    out: list[list[str]] = []

    def strongconnect(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                strongconnect(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                out.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            strongconnect(v)
    return out


def _explain(component: list[str], graph: dict[str, set[str]]) -> str:
    members = set(component)
    edges = [f"  {a} -> {b}" for a in component for b in sorted(graph[a] & members)]
    return "\n".join([" <-> ".join(component), *edges])


def test_no_import_cycles_among_ft_cli_modules():
    graph = import_graph()
    assert len(graph) > 50 and "ft_cli.train" in graph and "ft_cli.recipe" in graph["ft_cli.train"]
    cycles = find_cycles(graph)
    assert not cycles, "import cycles among ft_cli modules:\n" + "\n\n".join(_explain(c, graph) for c in cycles)


def test_the_checker_finds_cycles():
    assert find_cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert find_cycles({"a": {"b"}, "b": set()}) == []


def test_leaves_import_nothing_from_ft():
    graph = import_graph()
    for leaf in ("ft_cli.methods.registry", "ft_cli.atomic", "ft_cli.errors"):
        assert graph[leaf] == set(), f"{leaf} imports {graph[leaf]}"
