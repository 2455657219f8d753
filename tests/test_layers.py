"""The import map of docs/architecture.md, checked on the source with the standard library's ast:
no import circle inside `lbs_tune` or inside `analysis` (TYPE_CHECKING imports and imports
inside functions count too), the core never imports `analysis`, and `analysis` never imports
torch, Ray or pandas."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("lbs_tune", "analysis")


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports(path: Path) -> set[str]:
    """Every module that `path` imports, by absolute name (`from a import b` names a.b too)."""
    found: set[str] = set()
    package = module_name(path).split(".")
    if path.name != "__init__.py":
        package = package[:-1]
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = package[: len(package) - node.level + 1] if node.level else []
            module = ".".join([*base, *([node.module] if node.module else [])])
            found |= {module} | {f"{module}.{alias.name}" for alias in node.names}
    return found


MODULES = {module_name(p): p for pkg in PACKAGES for p in sorted((ROOT / pkg).rglob("*.py"))}
GRAPH = {
    name: {m for m in imports(path) if m in MODULES and m != name} for name, path in MODULES.items()
}


def cycles() -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in GRAPH[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in GRAPH:
        if v not in index:
            visit(v)
    return found


def test_no_import_circle_inside_either_package():
    assert cycles() == []


def test_the_check_finds_a_circle_when_there_is_one():
    GRAPH["lbs_tune.names"].add("lbs_tune.config")  # config imports names: a circle of two
    try:
        assert ["lbs_tune.config", "lbs_tune.names"] in cycles()
    finally:
        GRAPH["lbs_tune.names"].discard("lbs_tune.config")


def test_imports_point_down_the_layers():
    core = [m for m in MODULES if m.startswith("lbs_tune.") and m != "lbs_tune.cli"]
    readers = [m for m in MODULES if m.startswith("analysis")]
    assert [m for m in core if any(i.startswith("analysis") for i in imports(MODULES[m]))] == []
    heavy = ("torch", "ray", "pandas")
    assert [(m, i) for m in readers for i in imports(MODULES[m]) if i.split(".")[0] in heavy] == []


def test_the_page_imports_figures_which_import_numbers():
    assert GRAPH["analysis.figures"] == set()  # the package's __init__ imports nothing
    figures = {m for m in MODULES if m.startswith("analysis.figures.")}
    numbers = {"analysis.metrics", "analysis.scaling", "analysis.summary", "analysis.answer"}
    page = {"analysis.page", "analysis.html", "analysis.report"}
    assert [m for m in figures | numbers if GRAPH[m] & page] == []
    assert [m for m in numbers if GRAPH[m] & figures] == []
    assert "analysis.figures.tuned_steps" in GRAPH["analysis.page"]
