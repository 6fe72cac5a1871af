"""The layout holds: no import cycle between modules or packages, every module imports alone, sizes stay small.

The import graph is read from the source (every `import`, also those inside functions, which hide cycles from
a plain import). "Alone" means a process in which no module of ours was imported before: each module is
imported in a child forked from a parent that loaded only third-party libraries (torch and friends), so the
check takes seconds instead of a fresh torch import per module.
"""

from __future__ import annotations

import ast
import importlib
import os
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
OUR_PACKAGES = ("dist_train", "data_prep", "launch")
MAX_MODULE_LINES = 500
MAX_FUNCTION_LINES = 60


def module_name(path: Path) -> str:
    parts = list(path.relative_to(REPO).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def our_modules() -> dict[str, Path]:
    return {module_name(p): p for pkg in OUR_PACKAGES for p in sorted((REPO / pkg).rglob("*.py"))}


def imported_modules(path: Path, known: set[str]) -> set[str]:
    """Our modules that `path` imports anywhere in its body (`from pkg import mod` counts as pkg.mod)."""
    out: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names if a.name in known}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0 and node.module in known:
            subs = {f"{node.module}.{a.name}" for a in node.names} & known
            out |= subs or {node.module}
            if len(subs) < len(node.names):
                out.add(node.module)
    return out


def import_graph() -> dict[str, set[str]]:
    modules = our_modules()
    return {m: imported_modules(p, set(modules)) - {m} for m, p in modules.items()}


def package_of(module: str) -> str:
    """dist_train.config.schema → dist_train.config; a top-level module of dist_train (a CLI shim) is its own."""
    parts = module.split(".")
    return ".".join(parts[:2]) if parts[0] == "dist_train" and len(parts) > 1 else parts[0]


def package_graph(graph: dict[str, set[str]]) -> dict[str, set[str]]:
    out: dict[str, set[str]] = {}
    for m, deps in graph.items():
        out.setdefault(package_of(m), set()).update(package_of(d) for d in deps)
    # A package importing its own __init__'s parent is not an edge between packages.
    return {p: {d for d in deps if d != p and d != "dist_train"} for p, deps in out.items()}


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one node (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            scc = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                scc.append(w)
                if w == v:
                    break
            if len(scc) > 1:
                found.append(sorted(scc))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def dependency_order(graph: dict[str, set[str]]) -> list[str]:
    order: list[str] = []
    done: set[str] = set()

    def visit(v: str) -> None:
        if v in done:
            return
        done.add(v)
        for w in sorted(graph.get(v, ())):
            visit(w)
        order.append(v)

    for v in sorted(graph):
        visit(v)
    return order


def test_no_import_cycle_between_modules():
    graph = import_graph()
    assert len(graph) > 60, "the graph should hold every module of dist_train, data_prep and launch"
    assert cycles(graph) == []


def test_no_import_cycle_between_packages():
    graph = package_graph(import_graph())
    assert {"dist_train.config", "dist_train.model", "dist_train.train", "data_prep"} <= set(graph)
    assert cycles(graph) == []
    assert "data_prep" not in set().union(*(graph[p] for p in graph if p.startswith("dist_train"))), \
        "dist_train must not import data_prep (the shared formats live in dist_train.formats)"


def test_cycle_finder_finds_a_cycle():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork")
def test_every_module_imports_alone_in_dependency_order():
    graph = import_graph()
    order = dependency_order(graph)
    assert order.index("dist_train.config.schema") < order.index("dist_train.train.trainer")
    for lib in ("torch", "numpy", "yaml", "transformers", "datasets", "tokenizers"):
        importlib.import_module(lib)
    ours_loaded = [m for m in sys.modules if m.split(".")[0] in OUR_PACKAGES]
    failures = []
    for module in order:
        if module.endswith("__main__"):
            continue
        pid = os.fork()
        if pid == 0:  # the child: none of our modules is loaded yet, unless the parent test process had them
            for m in ours_loaded:
                del sys.modules[m]
            code = 0
            try:
                importlib.import_module(module)
            except BaseException as err:  # noqa: BLE001 - report any failure, also SystemExit at import
                print(f"{module}: {type(err).__name__}: {err}", file=sys.stderr)
                code = 1
            os._exit(code)
        _, status = os.waitpid(pid, 0)
        if os.waitstatus_to_exitcode(status) != 0:
            failures.append(module)
    assert failures == []


def test_no_module_over_500_lines_and_no_function_over_60():
    too_long = []
    for module, path in our_modules().items():
        source = path.read_text()
        if source.count("\n") > MAX_MODULE_LINES:
            too_long.append(f"{module}: {source.count(chr(10))} lines")
        for node in ast.walk(ast.parse(source)):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                length = node.end_lineno - node.lineno + 1
                if length > MAX_FUNCTION_LINES:
                    too_long.append(f"{module}.{node.name}: {length} lines")
    assert too_long == []


def test_every_package_says_what_lives_there():
    for init in sorted((REPO / "dist_train").glob("*/__init__.py")):
        doc = ast.get_docstring(ast.parse(init.read_text()))
        assert doc and "Not here" in doc, f"{init} needs a docstring saying what lives there and what does not"
