"""No import circle between the proxy's modules, counting every import: module level, under
TYPE_CHECKING and inside functions (a circle hidden in a function still ties two modules together).
Was: sessions/model.py <-> sessions/scope.py (issue #14, item 7)."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "proxy"


def import_graph(root: Path) -> dict[str, set[str]]:
    modules: dict[str, Path] = {}
    for path in root.rglob("*.py"):
        name = ".".join(path.relative_to(root.parent).with_suffix("").parts).removesuffix(".__init__")
        modules[name] = path
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        found: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                found.add(node.module)
                found.update(f"{node.module}.{alias.name}" for alias in node.names)
            elif isinstance(node, ast.Import):
                found.update(alias.name for alias in node.names)
        graph[name] = {dep for dep in found if dep in modules and dep != name}
    return graph


def circles(graph: dict[str, set[str]]) -> set[tuple[str, ...]]:
    found: set[tuple[str, ...]] = set()

    def walk(path: list[str]) -> None:
        for dep in graph[path[-1]]:
            if dep in path:
                circle = tuple(path[path.index(dep) :])
                first = circle.index(min(circle))
                found.add(circle[first:] + circle[:first])
            elif len(path) < 10:
                walk([*path, dep])

    for module in graph:
        walk([module])
    return found


def test_no_import_circles_between_proxy_modules() -> None:
    graph = import_graph(PACKAGE)
    assert "proxy.sessions.model" in graph and "proxy.engine.client_http" in graph  # the walk saw the tree
    assert circles(graph) == set()
