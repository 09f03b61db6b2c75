"""No two product modules import each other, directly or through a longer circle (lazy imports
inside functions count: they hide a circle, they do not remove it)."""
from __future__ import annotations

from tests.helpers.product import imported_modules, module_name, product_files


def import_graph() -> dict[str, set[str]]:
    """Module -> the product modules it imports (tests/helpers/product.py)."""
    files = {module_name(p): p for p in product_files()}
    known = set(files)
    return {name: imported_modules(path, known) for name, path in files.items()}


def circles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []
    for root in sorted(graph):
        if root in index:
            continue
        work = [(root, iter(sorted(graph[root])))]
        index[root] = low[root] = len(index)
        stack.append(root)
        on_stack.add(root)
        while work:
            node, edges = work[-1]
            nxt = next((w for w in edges if w not in index or w in on_stack), None)
            if nxt is not None:
                if nxt in index:
                    low[node] = min(low[node], index[nxt])
                else:
                    index[nxt] = low[nxt] = len(index)
                    stack.append(nxt)
                    on_stack.add(nxt)
                    work.append((nxt, iter(sorted(graph.get(nxt, ())))))
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                component = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.append(member)
                    if member == node:
                        break
                if len(component) > 1:
                    found.append(sorted(component))
    return found


def test_the_circle_finder_finds_direct_and_long_circles():
    graph = {"a": {"b"}, "b": {"a"}, "c": {"d"}, "d": {"e"}, "e": {"c", "f"}, "f": set()}
    assert sorted(circles(graph)) == [["a", "b"], ["c", "d", "e"]]


def test_the_graph_sees_lazy_and_relative_imports():
    graph = import_graph()
    assert "modules.diffusers_format" in graph["modules.loading"]  # a lazy import inside load_model
    assert "core.data.images" in graph["core.data.make_shards"]  # from .images import ...


def test_no_product_modules_import_each_other():
    found = circles(import_graph())
    assert not found, f"import circles (move the shared part into a module both import): {found}"


def test_no_module_imports_private_names_of_another():
    """``from m import _name`` reaches into m's internals (core.data.inspect once drove
    ``WorkerStream._read`` with ``_Pos``): use or add a public function. A package's own private
    module (``from . import _rng`` in gdf/) is part of that package and fine."""
    import ast

    files = {module_name(p): p for p in product_files()}
    offenders = []
    for name, path in files.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if not isinstance(node, ast.ImportFrom):
                continue
            base = node.module or ""
            if node.level:
                parts = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                base = ".".join(parts + ([base] if base else []))
            for alias in node.names:
                if not alias.name.startswith("_") or alias.name.startswith("__"):
                    continue
                target = f"{base}.{alias.name}"
                if target in files and target.rpartition(".")[0] == package:
                    continue  # the package's own private module
                offenders.append(f"{name}: from {base} import {alias.name}")
    assert not offenders, f"private names imported across modules: {offenders}"
