"""The import graph of qscore (docs/developing.md, "What each part may import"): no cycle among
module-level imports, and none of the forbidden directions at any level (function-level imports
included). Read from the source with ``ast``; nothing is imported."""

from __future__ import annotations

import ast
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src"
PACKAGE = SRC / "qscore"

# (importer prefix, imported prefix, why): a module under the first may not import one under the second
FORBIDDEN = [
    ("qscore.media", "qscore.models", "media decodes files; it knows no model"),
    ("qscore.weights", "qscore.models", "weights loads files; models use it, not the other way"),
    ("qscore.models", "qscore.cli", "a model never drives a run"),
    ("qscore.models", "qscore.runner", "a model never drives a run"),
    ("qscore.models", "qscore.sinks", "a model never writes files"),
    ("qscore.models", "qscore.fsutil", "a model never writes files (the runner keeps its cache entries)"),
]


def module_name(path: Path) -> str:
    parts = list(path.relative_to(SRC).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def modules() -> dict[str, Path]:
    return {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def imports(name: str, path: Path, known: set[str]) -> list[tuple[str, bool, int]]:
    """``(imported qscore module, at module level, line)`` for every import in the file.
    Module level: not inside a function and not under ``if TYPE_CHECKING:`` (what runs on import)."""
    is_package = path.name == "__init__.py"
    found: list[tuple[str, bool, int]] = []

    def resolve(node: ast.ImportFrom) -> str:
        if not node.level:
            return node.module or ""
        base = name.split(".")
        base = base if is_package else base[:-1]
        base = base[: len(base) - (node.level - 1)]
        return ".".join(base + ([node.module] if node.module else []))

    def visit(node: ast.AST, top: bool) -> None:
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.split(".")[0] == "qscore":
                    found.append((alias.name, top, node.lineno))
        elif isinstance(node, ast.ImportFrom):
            mod = resolve(node)
            if mod.split(".")[0] == "qscore":
                for alias in node.names:
                    sub = f"{mod}.{alias.name}"
                    found.append((sub if sub in known else mod, top, node.lineno))
        for field, value in ast.iter_fields(node):
            children = value if isinstance(value, list) else [value]
            for child in children:
                if not isinstance(child, ast.AST):
                    continue
                inner = top and not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
                if isinstance(node, ast.If) and field == "body" and _is_type_checking(node.test):
                    inner = False
                visit(child, inner)

    visit(ast.parse(path.read_text(encoding="utf-8"), filename=str(path)), True)
    return found


def graph() -> dict[str, list[tuple[str, bool, int]]]:
    mods = modules()
    known = set(mods)
    return {name: [(t, top, line) for t, top, line in imports(name, path, known) if t in known]
            for name, path in mods.items()}


def find_cycle(edges: dict[str, set[str]]) -> list[str] | None:
    """One cycle of ``edges`` as ``[a, b, ..., a]``, or None."""
    state: dict[str, int] = {}  # 1: on the stack, 2: done
    stack: list[str] = []

    def dfs(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(edges.get(node, ())):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state:
                cycle = dfs(nxt)
                if cycle:
                    return cycle
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(edges):
        if node not in state:
            cycle = dfs(node)
            if cycle:
                return cycle
    return None


def _under(name: str, prefix: str) -> bool:
    return name == prefix or name.startswith(prefix + ".")


def test_the_walker_sees_the_imports():
    g = graph()
    assert "qscore.types" in g and "qscore.media.discover" in g
    top = {(a, b) for a, targets in g.items() for b, at_top, _ in targets if at_top}
    inner = {(a, b) for a, targets in g.items() for b, at_top, _ in targets if not at_top}
    assert ("qscore.runner", "qscore.models.base") in top
    assert ("qscore.models.base", "qscore.types") in top
    assert ("qscore.models.base", "qscore.weights") in inner  # function-level: load_checkpoint


def test_find_cycle_finds_one():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": set()}) is None
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]


def test_no_cycle_among_module_level_imports():
    g = graph()
    edges = {a: {b for b, at_top, _ in targets if at_top and b != a} for a, targets in g.items()}
    cycle = find_cycle(edges)
    assert cycle is None, "module-level import cycle: " + " -> ".join(cycle)


def test_no_forbidden_import_direction():
    bad = []
    for a, targets in graph().items():
        for b, _, line in targets:
            for src, dst, why in FORBIDDEN:
                if _under(a, src) and _under(b, dst):
                    bad.append(f"{a}:{line} imports {b} ({why})")
    assert not bad, "\n".join(bad)


def test_types_imports_no_qscore_module():
    assert not graph()["qscore.types"]


def test_only_the_ray_executor_imports_ray():
    """The local runner stays free of Ray (an optional extra): one module imports it."""
    importers = set()
    for name, path in modules().items():
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module or ""] if (
                isinstance(node, ast.ImportFrom) and not node.level) else []
            if any(n.split(".")[0] == "ray" for n in names):
                importers.add(name)
    assert importers == {"qscore.ray_engine"}
