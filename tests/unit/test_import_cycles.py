"""No import loops: the module graph of vzkit, lazy (function-level) imports included.

A loop through a lazy import still ties the modules together: neither can be understood,
tested or moved alone (``sdk.client`` and ``sdk.remotes`` were such a pair, and so were
``images.store`` and its builders). Imports under ``if TYPE_CHECKING:`` are left out: they
never run. The lead's import contracts (import-linter) check the layers; this checks loops.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

import vzkit

SRC = Path(vzkit.__file__).resolve().parent
# The packages this test holds to no loops at all; the rest of the tree is reported, and
# joins this list as its own restructuring lands.
CHECKED = ("vzkit", "vzkit.api", "vzkit.sdk", "vzkit.cli", "vzkit.images")


def module_of(path: Path) -> str:
    parts = path.relative_to(SRC.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_of(p): p for p in SRC.rglob("*.py")}


def _runtime_nodes(tree: ast.AST) -> Iterator[ast.AST]:
    """Every node except what sits under ``if TYPE_CHECKING:``."""
    for node in ast.iter_child_nodes(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            for other in node.orelse:
                yield other
                yield from _runtime_nodes(other)
            continue
        yield node
        yield from _runtime_nodes(node)


def imports_of(module: str) -> set[str]:
    path = MODULES[module]
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found: set[str] = set()
    for node in _runtime_nodes(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parent = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                base = f"{parent}.{base}" if base else parent
            for alias in node.names:
                child = f"{base}.{alias.name}"
                found.add(child if child in MODULES else base)
    return {m for m in found if m in MODULES and m != module}


def loops() -> list[set[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    graph = {m: imports_of(m) for m in MODULES}
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[set[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = set()
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.add(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(component)

    for m in sorted(graph):
        if m not in index:
            visit(m)
    return found


def in_checked(module: str) -> bool:
    return any(module == p or (module.startswith(p + ".") and p != "vzkit") for p in CHECKED)


def test_no_import_loops_in_the_sdk_cli_api_and_images() -> None:
    bad = [sorted(c) for c in loops() if any(in_checked(m) for m in c)]
    assert bad == []


def test_the_checker_sees_a_lazy_loop(tmp_path: Path) -> None:
    # The checker itself: a loop through a function-level import is one.
    a = ast.parse("def f():\n    from vzkit.sdk import client\n")
    nodes = [n for n in _runtime_nodes(a) if isinstance(n, ast.ImportFrom)]
    assert [n.module for n in nodes] == ["vzkit.sdk"]
    typed = ast.parse("if TYPE_CHECKING:\n    from vzkit.sdk import client\n")
    assert not [n for n in _runtime_nodes(typed) if isinstance(n, ast.ImportFrom)]
