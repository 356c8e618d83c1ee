"""The package keeps its shape: only the CLI reads a command line or prints, train.py imports no
engine, and no import cycle exists among handgrad's modules, lazy imports (inside functions) included.
Read from the source with `ast`, so an import in any function counts."""

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).parents[1] / "src" / "handgrad"


def _module_name(path: Path) -> str:
    parts = path.relative_to(SRC.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {_module_name(p): p for p in sorted(SRC.rglob("*.py"))}
# the command line (handgrad.cli and its modules) and its `python -m handgrad` entry
CLI = {m for m in MODULES if m == "handgrad.cli" or m.startswith("handgrad.cli.")} | {"handgrad.__main__"}


def _imports(name: str) -> set[str]:
    """Every handgrad module `name` imports, at the top or inside a function: `import handgrad.x`,
    `from handgrad import x` (x a module) and `from handgrad.x import y` (y a module or a name)."""
    tree = ast.parse(MODULES[name].read_text(), str(MODULES[name]))
    package = name if MODULES[name].name == "__init__.py" else name.rpartition(".")[0]
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: from the package of this module
                base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1] + ([base] if base else []))
            out |= {f"{base}.{a.name}" if f"{base}.{a.name}" in MODULES else base for a in node.names}
    return {m for m in out if m in MODULES and m != name}


GRAPH = {name: _imports(name) for name in MODULES}


def _calls_print(name: str) -> list[int]:
    tree = ast.parse(MODULES[name].read_text())
    return [n.lineno for n in ast.walk(tree) if isinstance(n, ast.Call) and isinstance(n.func, ast.Name)
            and n.func.id == "print"]


def _uses_argparse(name: str) -> bool:
    tree = ast.parse(MODULES[name].read_text())
    return any(isinstance(n, ast.Import) and any(a.name == "argparse" for a in n.names)
               or isinstance(n, ast.ImportFrom) and n.module == "argparse" for n in ast.walk(tree))


LIBRARY = sorted(set(MODULES) - CLI)


@pytest.mark.parametrize("name", LIBRARY)
def test_no_library_module_reads_a_command_line_or_prints(name):
    assert not _uses_argparse(name), f"{name} imports argparse"
    assert "handgrad.cli" not in GRAPH[name], f"{name} imports handgrad.cli"
    assert not _calls_print(name), f"{name} calls print() at line(s) {_calls_print(name)}"


def test_train_imports_no_engine():
    engines = {m for m in MODULES if m == "handgrad.engines" or m.startswith("handgrad.engines.")}
    assert not GRAPH["handgrad.train"] & engines


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan), each a cycle of imports."""
    index, low, stack, on, out = {}, {}, [], set(), []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in graph:
        if v not in index:
            visit(v)
    return out


def test_no_import_cycle_in_the_package():
    assert _cycles(GRAPH) == []


def test_the_cycle_finder_finds_a_cycle_and_a_self_contained_tree_has_none():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert _cycles({"a": {"b", "c"}, "b": {"c"}, "c": set()}) == []
    assert "handgrad.models" in GRAPH["handgrad.train"]  # the scan sees real imports
    assert "handgrad.engines.native" in GRAPH["handgrad.engines"]


def test_one_version_number_read_by_the_package_and_its_metadata():
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    import handgrad

    meta = tomllib.loads((SRC.parents[1] / "pyproject.toml").read_text())
    assert "version" not in meta["project"] and "version" in meta["project"]["dynamic"]
    assert meta["tool"]["setuptools"]["dynamic"]["version"] == {"attr": "handgrad.__version__"}
    assert handgrad.__version__.count(".") == 2
