"""The package's import graph: no circle anywhere, and nothing below chat and serve imports them.

Every `cutegpt.*` import counts, at module level or inside a function (a lazy import still couples the modules).
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src"
# rooms that chat and serve build on: none of them may import chat or serve
BELOW_CHAT = ("cutegpt.export", "cutegpt.evaluation", "cutegpt.model", "cutegpt.data", "cutegpt.training", "cutegpt.runtime")
ABOVE = ("cutegpt.chat", "cutegpt.serve")


def module_names() -> dict[str, Path]:
    out = {}
    for path in (SRC / "cutegpt").rglob("*.py"):
        parts = path.relative_to(SRC).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        out[name] = path
    return out


def _owner(name: str, modules: dict[str, Path]) -> str | None:
    """The module a dotted import name lands in (`cutegpt.training.loss` for `from cutegpt.training import loss`)."""
    while name and name not in modules:
        name = name.rpartition(".")[0]
    return name or None


def import_graph() -> dict[str, set[str]]:
    modules = module_names()
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        deps: set[str] = set()
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:  # relative import
                    anchor = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                    base = f"{anchor}.{base}" if base else anchor
                if not base.startswith("cutegpt"):
                    continue
                for alias in node.names:
                    target = _owner(f"{base}.{alias.name}", modules)
                    deps.add(target if target and target.startswith(f"{base}.") else _owner(base, modules))
            elif isinstance(node, ast.Import):
                deps.update(_owner(a.name, modules) for a in node.names if a.name.startswith("cutegpt"))
        deps.discard(name)
        deps.discard(None)
        deps.discard("cutegpt")  # the top package holds only the version
        graph[name] = deps
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle as a list of modules (first == last), or None."""
    state: dict[str, int] = {}  # 1 = on the current path, 2 = done
    path: list[str] = []

    def visit(v: str) -> list[str] | None:
        state[v] = 1
        path.append(v)
        for w in sorted(graph.get(v, ())):
            if state.get(w) == 1:
                return path[path.index(w):] + [w]
            if w not in state and (found := visit(w)):
                return found
        path.pop()
        state[v] = 2
        return None

    for v in sorted(graph):
        if v not in state and (found := visit(v)):
            return found
    return None


def test_the_graph_sees_imports_inside_functions():
    graph = import_graph()
    # run.py imports the engine and the plan only inside its function
    assert {"cutegpt.training.engine", "cutegpt.training.plan"} <= graph["cutegpt.training.run"]
    assert "cutegpt.runtime.llamacpp" in graph["cutegpt.export.verify"]


def test_find_cycle_finds_one():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_no_import_circle_in_the_package():
    cycle = find_cycle(import_graph())
    assert cycle is None, "import circle: " + " -> ".join(cycle)


@pytest.mark.parametrize("room", BELOW_CHAT)
def test_rooms_below_chat_and_serve_do_not_import_them(room):
    graph = import_graph()
    bad = sorted(f"{m} -> {d}" for m, deps in graph.items() if m == room or m.startswith(room + ".")
                 for d in deps if d.startswith(ABOVE))
    assert not bad, "imports of chat/serve from below them: " + "; ".join(bad)
