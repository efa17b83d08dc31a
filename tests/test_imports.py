"""No two patchwidgets modules import each other, directly or around a longer circle.

An import circle works by accident (whichever module is imported first decides which names
exist yet) and makes one idea impossible to read without the other. The graph here is read
from the source with ``ast``, not by importing: every ``import`` and ``from ... import``
statement of every module counts, including lazy ones inside functions and ones under
``if TYPE_CHECKING:``, since a lazy import only moves the circle to run time. (Dynamic
``importlib.import_module`` calls, such as the package's lazy attributes, are not followed.)
"""

from __future__ import annotations

import ast
from pathlib import Path

import patchwidgets

PACKAGE = Path(patchwidgets.__file__).parent


def _modules(root: Path) -> dict[str, Path]:
    """``{dotted module name: file}`` for every ``.py`` file of the package."""
    found = {}
    for path in sorted(root.rglob("*.py")):
        parts = list(path.relative_to(root.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        found[".".join(parts)] = path
    return found


def _imported(module: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """The package modules that ``module``'s import statements name, anywhere in its file."""
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    targets: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            targets.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: `from .x import y`, `from .. import z`
                base = package.split(".")[:len(package.split(".")) - node.level + 1]
                source = ".".join(base + ([node.module] if node.module else []))
            else:
                source = node.module or ""
            for alias in node.names:
                # `from . import metrics` imports the submodule; `from .sweep import x` the module.
                sub = f"{source}.{alias.name}"
                targets.add(sub if sub in modules else source)
    edges = set()
    for target in targets:
        while target not in modules and "." in target:  # `import patchwidgets.engine.x` -> the module
            target = target.rpartition(".")[0]
        if target in modules and target != module:
            edges.add(target)
    return edges


def import_graph(root: Path = PACKAGE) -> dict[str, set[str]]:
    """``{module: modules it imports}`` over the package's own modules."""
    modules = _modules(root)
    return {m: _imported(m, path, modules) for m, path in modules.items()}


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Every group of modules that import each other around a circle (strongly connected
    components of more than one module, or a module importing itself), each as a circle
    ``[a, b, ..., a]`` through the group."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    groups: list[list[str]] = []

    def visit(v: str) -> None:  # Tarjan's algorithm
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            group = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                group.append(w)
                if w == v:
                    break
            if len(group) > 1 or v in graph.get(v, ()):
                groups.append(sorted(group))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return [_circle(group, graph) for group in groups]


def _circle(group: list[str], graph: dict[str, set[str]]) -> list[str]:
    """One import circle through the first module of ``group`` (for the failure message)."""
    start, members = group[0], set(group)
    paths = {start: [start]}
    frontier = [start]
    while frontier:  # breadth first, inside the group, back to `start`
        nxt = []
        for v in frontier:
            for w in sorted(graph[v] & members):
                if w == start:
                    return paths[v] + [start]
                if w not in paths:
                    paths[w] = paths[v] + [w]
                    nxt.append(w)
        frontier = nxt
    return group


def test_no_import_cycles_among_patchwidgets_modules():
    found = cycles(import_graph())
    assert not found, "import circles: " + "; ".join(" -> ".join(c) for c in found)


def test_the_graph_sees_lazy_imports_and_the_backend_split():
    """The graph is the one the cycle test needs: lazy imports inside functions count (the
    entry points hand nnsight models to the nnsight backend from inside ``patch`` and
    ``attribution_patch``), and the AtP steps both backends use come from ``atp``."""
    graph = import_graph()
    assert "patchwidgets.nnsight_backend" in graph["patchwidgets.patching"]       # lazy, inside patch()
    assert "patchwidgets.nnsight_backend" in graph["patchwidgets.attribution"]    # lazy, inside attribution_patch()
    assert "patchwidgets.devices" in graph["patchwidgets.sources"]                # lazy, inside embedding_std()
    assert "patchwidgets.attribution" in graph["patchwidgets.grading.grader"]    # `from .. import attribution`
    assert "patchwidgets.metrics" in graph["patchwidgets.atp"]                    # `from . import metrics as ...`
    assert "patchwidgets.atp" in graph["patchwidgets.nnsight_backend"]
    assert "patchwidgets.attribution" not in graph["patchwidgets.nnsight_backend"]


def test_cycles_finds_circles_of_any_length():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a", "e"}, "e": set(), "f": {"f"}}
    assert cycles(graph) == [["a", "b", "c", "a"], ["f", "f"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


def test_import_graph_reads_lazy_and_relative_imports(tmp_path):
    """A circle made only by a lazy import inside a function, in a sub-package, is found."""
    pkg = tmp_path / "pkg"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "sub" / "__init__.py").write_text("")
    (pkg / "one.py").write_text("from .sub import two\n")
    (pkg / "sub" / "two.py").write_text("def f():\n    from ..one import g\n    return g\n")
    (pkg / "three.py").write_text("import pkg.one\n")
    graph = import_graph(pkg)
    assert graph["pkg.one"] == {"pkg.sub.two"}
    assert graph["pkg.sub.two"] == {"pkg.one"}
    assert graph["pkg.three"] == {"pkg.one"}
    assert cycles(graph) == [["pkg.one", "pkg.sub.two", "pkg.one"]]
