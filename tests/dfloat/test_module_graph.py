"""The modules of dfloat/ (and the decoders in kernels/, installed as dfloat.kernels) import each other without a
cycle: every import counts, at module level or inside a function, so none can hide a cycle by importing late."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).parents[2]


def package_modules(folder: Path, package: str) -> dict[str, Path]:
    """{dotted module name: file} for every module under ``folder``, installed as ``package``."""
    out = {}
    for path in sorted(folder.rglob("*.py")):
        parts = [p for p in path.relative_to(folder).with_suffix("").parts if p != "__init__"]
        out[".".join([package, *parts])] = path
    return out


def _imported(node: ast.Import | ast.ImportFrom, module: str, is_package: bool, modules) -> set[str]:
    """The modules among ``modules`` an import statement loads: ``from a import b`` loads module ``a.b`` if there
    is one, else (``b`` a name in it) module ``a``."""
    if isinstance(node, ast.Import):
        names = [alias.name for alias in node.names]
    else:
        source = node.module
        if node.level:  # relative: from the module's package, one level up per extra dot
            base = module if is_package else module.rpartition(".")[0]
            for _ in range(node.level - 1):
                base = base.rpartition(".")[0]
            source = f"{base}.{node.module}" if node.module else base
        names = [f"{source}.{a.name}" if f"{source}.{a.name}" in modules else source for a in node.names]
    return {n for n in names if n in modules and n != module}


def import_graph(modules: dict[str, Path]) -> dict[str, set[str]]:
    """{module: the modules among ``modules`` it imports anywhere in its file}."""
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        graph[name] = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import | ast.ImportFrom):
                graph[name] |= _imported(node, name, path.name == "__init__.py", modules)
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle as ``[a, b, ..., a]``, or None."""
    state: dict[str, str] = {}  # "open" while on the current path, "done" once all its imports are cleared
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = "open"
        path.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == "open":
                return path[path.index(nxt) :] + [nxt]
            if nxt not in state and (found := visit(nxt)):
                return found
        path.pop()
        state[node] = "done"
        return None

    for node in sorted(graph):
        if node not in state and (found := visit(node)):
            return found
    return None


def test_the_cycle_finder_finds_cycles():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b", "c"}, "b": {"c"}, "c": set()}) is None


def test_an_import_inside_a_function_counts(tmp_path):
    pkg = tmp_path / "pkg"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "a.py").write_text("from pkg.b import g\n")
    (pkg / "b.py").write_text("def g():\n    from pkg import a\n\n    return a\n")
    (pkg / "c.py").write_text("from . import b\n")
    graph = import_graph(package_modules(pkg, "pkg"))
    assert graph == {"pkg": set(), "pkg.a": {"pkg.b"}, "pkg.b": {"pkg.a"}, "pkg.c": {"pkg.b"}}
    assert find_cycle(graph) == ["pkg.a", "pkg.b", "pkg.a"]


def test_dfloat_modules_import_each_other_without_a_cycle():
    modules = {
        **package_modules(ROOT / "dfloat", "dfloat"),
        **package_modules(ROOT / "kernels", "dfloat.kernels"),
    }
    graph = import_graph(modules)
    assert {"dfloat.format", "dfloat.codec", "dfloat.kernels.cpu"} <= set(graph)
    assert "dfloat.format" in graph["dfloat.codec"]  # imports are seen at all
    cycle = find_cycle(graph)
    assert cycle is None, "import cycle: " + " -> ".join(cycle)
