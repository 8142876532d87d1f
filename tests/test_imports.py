"""The package import graph: no cycles, and dependencies point one way.

Every import statement counts, wherever it sits (module level, function body, TYPE_CHECKING
block), so a cycle cannot be hidden by moving an import into a function. The graph is read from
the source with `ast`, without importing anything.

    configs -> vla, data         launch -> configs         vla.train -> vla.models, data
    data never imports vla       vla.models imports neither data nor vla.train
    configs never imports launch
and the layers below the spec builder (configs/specs.py) never see a ConfigDict: data/ and
vla/models do not import ml_collections.
"""
import ast
import pathlib

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
PACKAGES = ("configs", "data", "launch", "tools", "vla")
# (importer prefix, imported prefix): a module under the first may not import one under the second.
FORBIDDEN = (
    ("data", "vla"),
    ("vla.models", "data"),
    ("vla.models", "vla.train"),
    ("configs", "launch"),
)


def _module_name(path: pathlib.Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def project_modules() -> dict[str, pathlib.Path]:
    return {_module_name(p): p for pkg in PACKAGES for p in sorted((ROOT / pkg).rglob("*.py"))}


def _imported(node: ast.AST, module: str, is_package: bool, known: set[str]) -> set[str]:
    """Project modules a single import statement brings in (`from pkg import mod` names mod)."""
    if isinstance(node, ast.Import):
        names = [a.name for a in node.names]
    else:
        base = node.module or ""
        if node.level:
            anchor = module.split(".") if is_package else module.split(".")[:-1]
            anchor = anchor[:len(anchor) - (node.level - 1)]
            base = ".".join(anchor + ([base] if base else []))
        names = [f"{base}.{a.name}" if f"{base}.{a.name}" in known else base for a in node.names]
    out = set()
    for name in names:
        while name and name not in known:  # `import a.b.c` of a non-module attribute: its module
            name = name.rpartition(".")[0]
        if name:
            out.add(name)
    return out


def _statements(path: pathlib.Path):
    return [n for n in ast.walk(ast.parse(path.read_text(), str(path)))
            if isinstance(n, (ast.Import, ast.ImportFrom))]


def import_graph() -> dict[str, set[str]]:
    modules = project_modules()
    known = set(modules)
    graph = {}
    for name, path in modules.items():
        is_package = path.name == "__init__.py"
        deps = set()
        for node in _statements(path):
            deps |= _imported(node, name, is_package, known)
        graph[name] = deps - {name}
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan's algorithm)."""
    index, low, on_stack, stack, out = {}, {}, set(), [], []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
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
            visit(v)
    return out


def _under(module: str, prefix: str) -> bool:
    return module == prefix or module.startswith(prefix + ".")


def test_the_graph_sees_imports_everywhere():
    """The walker itself: relative, function-body and from-package imports are all edges."""
    graph = import_graph()
    assert "vla.models.vla" in graph["vla.train"]
    assert "data.pipeline" in graph["vla.train"]
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_no_import_cycles():
    found = cycles(import_graph())
    assert not found, "import cycles:\n" + "\n".join(" <-> ".join(c) for c in found)


@pytest.mark.parametrize("importer,imported", FORBIDDEN)
def test_dependencies_point_one_way(importer, imported):
    bad = sorted(f"{m} imports {d}" for m, deps in import_graph().items() if _under(m, importer)
                 for d in deps if _under(d, imported))
    assert not bad, "\n".join(bad)


@pytest.mark.parametrize("package", ["data", "vla/models"])
def test_layers_below_the_specs_never_see_a_config(package):
    readers = []
    for path in sorted((ROOT / package).rglob("*.py")):
        for node in _statements(path):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module or ""]
            if any(n == "ml_collections" or n.startswith("ml_collections.") for n in names):
                readers.append(f"{path.relative_to(ROOT)}:{node.lineno}")
    assert not readers, f"{package} imports ml_collections: {readers}"
