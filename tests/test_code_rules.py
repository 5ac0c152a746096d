"""House rules, checked on the source itself (no model is run).

1. No function or method in ``rewriter/`` or ``passes/`` is longer than 60 lines: a longer one is
   split into helpers whose names say what they hold.
2. The modules of ``rewriter`` and ``passes`` import each other without a cycle, and no pass
   imports the layers that drive it (``rewriter.api``, ``rewriter.cli``, ``rewriter.batch``).

The import graph is read with ``ast``: every ``import`` and ``from ... import`` anywhere in a
module (inside functions too: a deferred import is still a dependency), relative imports
resolved. ``from PKG import NAME`` is an edge to the submodule ``PKG.NAME`` when there is one,
else to ``PKG`` itself, whose ``__init__`` imports (its re-exports) are edges of their own. The
parent packages Python initialises on the way to a submodule are not counted as edges.
"""

from __future__ import annotations

import ast
from collections import deque
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("rewriter", "passes")
MAX_FUNCTION_LINES = 60
# The passes are the layer below the driver: the API, the command line and the batch runner call
# them, never the other way round.
DRIVER_MODULES = ("rewriter.api", "rewriter.cli", "rewriter.batch")


def _module_files() -> dict[str, Path]:
    """Dotted module name → file, for every module of the project's packages."""
    found = {}
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            parts = path.relative_to(ROOT).with_suffix("").parts
            if parts[-1] == "__init__":
                parts = parts[:-1]
            found[".".join(parts)] = path
    return found


MODULES = _module_files()


def _relative(path: Path) -> str:
    return path.relative_to(ROOT).as_posix()


# -- 1. function length ----------------------------------------------------------------------------


def _long_functions(path: Path) -> list[str]:
    """``QUALNAME (line N): L lines`` for each function longer than the limit, counted from its
    ``def`` line to its last line (decorators aside; a nested function counts in its own right
    and as part of the function around it)."""
    offenders = []

    def visit(node: ast.AST, prefix: str) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef)):
                name = f"{prefix}{child.name}"
                length = child.end_lineno - child.lineno + 1
                if length > MAX_FUNCTION_LINES:
                    offenders.append(f"{name} (line {child.lineno}): {length} lines")
                visit(child, f"{name}.")
            elif isinstance(child, ast.ClassDef):
                visit(child, f"{prefix}{child.name}.")
            else:
                visit(child, prefix)

    visit(ast.parse(path.read_text(), filename=str(path)), "")
    return offenders


@pytest.mark.parametrize("path", sorted(MODULES.values()), ids=_relative)
def test_no_function_is_longer_than_60_lines(path: Path):
    offenders = _long_functions(path)
    assert not offenders, (f"{_relative(path)}: functions over {MAX_FUNCTION_LINES} lines (split them into "
                           "helpers):\n  " + "\n  ".join(offenders))


# -- 2. imports ------------------------------------------------------------------------------------


def _imported_module(name: str) -> str | None:
    """The project module ``import NAME`` loads: NAME, or its longest prefix that is a module."""
    while name and name not in MODULES:
        name = name.rpartition(".")[0]
    return name or None


def _imports(module: str, path: Path) -> dict[str, list[str]]:
    """The project modules ``module`` imports → where (``file:line``) it imports each."""
    is_package = path.name == "__init__.py"
    found: dict[str, list[str]] = {}
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        targets: list[str | None] = []
        if isinstance(node, ast.Import):
            targets = [_imported_module(alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: from the module's own package, one level up per extra dot
                package = module if is_package else module.rpartition(".")[0]
                for _ in range(node.level - 1):
                    package = package.rpartition(".")[0]
                base = f"{package}.{base}" if base else package
            for alias in node.names:
                submodule = f"{base}.{alias.name}"
                targets.append(submodule if submodule in MODULES else _imported_module(base))
        for target in targets:
            if target is not None and target != module:
                where = found.setdefault(target, [])
                if f"{_relative(path)}:{node.lineno}" not in where:
                    where.append(f"{_relative(path)}:{node.lineno}")
    return {target: sorted(where, key=lambda w: int(w.rpartition(":")[2])) for target, where in found.items()}


def _import_graph() -> dict[str, dict[str, list[str]]]:
    return {module: _imports(module, path) for module, path in MODULES.items()}


def _strongly_connected(graph: dict[str, dict[str, list[str]]]) -> list[list[str]]:
    """Tarjan's algorithm (iterative): the groups of modules that import each other in a ring."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    groups = []
    for root in sorted(graph):
        if root in index:
            continue
        work = [(root, iter(sorted(graph[root])))]
        index[root] = low[root] = len(index)
        stack.append(root)
        on_stack.add(root)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = len(index)
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph[child]))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                group = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    group.append(member)
                    if member == node:
                        break
                if len(group) > 1:
                    groups.append(sorted(group))
    return sorted(groups)


def _one_cycle(graph: dict[str, dict[str, list[str]]], group: list[str]) -> list[str]:
    """A shortest import ring through the group's first module, as a list that ends where it starts."""
    start, members = group[0], set(group)
    came_from: dict[str, str] = {}
    queue = deque([start])
    while queue:
        node = queue.popleft()
        for child in sorted(graph[node]):
            if child not in members:
                continue
            if child == start:  # back at the start: the ring is start → ... → node → start
                path = [node]
                while path[-1] != start:
                    path.append(came_from[path[-1]])
                return path[::-1] + [start]
            if child not in came_from:
                came_from[child] = node
                queue.append(child)
    return group + [group[0]]


def _describe_cycle(graph: dict[str, dict[str, list[str]]], group: list[str]) -> str:
    """One ring of the group, then every import inside the group (any of them may be the one to
    remove), with where it is."""
    lines = ["  " + " → ".join(_one_cycle(graph, group))
             + (f"   ({len(group)} modules tied by rings; every import among them:)" if len(group) > 2 else "")]
    for a in group:
        for b in sorted(set(graph[a]) & set(group)):
            lines.append(f"      {a} imports {b} at {', '.join(graph[a][b])}")
    return "\n".join(lines)


def test_modules_import_each_other_without_a_cycle():
    graph = _import_graph()
    cycles = _strongly_connected(graph)
    assert not cycles, f"{len(cycles)} import cycle(s) among the modules of {', '.join(PACKAGES)}:\n" + \
        "\n".join(_describe_cycle(graph, group) for group in cycles)


def _reaches_driver(graph: dict[str, dict[str, list[str]]], module: str) -> list[str]:
    """The driver modules ``module`` imports, directly or through package ``__init__`` re-exports,
    each as ``A → B → ... (file:line)``."""
    found = []
    seen = {module}
    queue = deque([[module]])
    while queue:
        chain = queue.popleft()
        for target, where in sorted(graph[chain[-1]].items()):
            if target in DRIVER_MODULES:
                found.append(" → ".join(chain + [target]) + f" ({', '.join(where)})")
            elif target not in seen and MODULES[target].name == "__init__.py":
                seen.add(target)
                queue.append(chain + [target])
    return found


def test_passes_do_not_import_the_driver():
    graph = _import_graph()
    offenders = [line for module in sorted(graph) if module == "passes" or module.startswith("passes.")
                 for line in _reaches_driver(graph, module)]
    assert not offenders, f"passes import {', '.join(DRIVER_MODULES)}:\n  " + "\n  ".join(offenders)


def test_the_import_graph_is_read():
    """The checks above prove nothing if the reader finds no imports: a known edge must be there."""
    graph = _import_graph()
    assert "rewriter.plan" in graph["passes.onnx.fuse_split_conv"]
    assert "passes.onnx.fuse_split_conv" in graph["passes.onnx"]  # a package __init__ re-export
    assert "rewriter.api" in graph["rewriter"]


def test_the_cycle_finder_finds_rings():
    graph = {"a": {"b": ["a.py:1"]}, "b": {"c": ["b.py:1"]}, "c": {"a": ["c.py:1"], "d": ["c.py:2"]},
             "d": {}, "e": {"d": ["e.py:1"]}}
    assert _strongly_connected(graph) == [["a", "b", "c"]]
    assert _one_cycle(graph, ["a", "b", "c"]) == ["a", "b", "c", "a"]
    assert _strongly_connected({"a": {"d": []}, "d": {}}) == []


def test_the_cli_imports_no_onnx_until_it_reads_onnx():
    """A Keras or SavedModel run never pays ONNX's import (about 0.9 s): rewriter.formats loads it
    on first use; the ONNX backend and the ONNX passes import it themselves."""
    import subprocess
    import sys

    code = "import sys, rewriter.cli, rewriter.formats; print(sorted(m for m in ('onnx', 'onnx_ir') if m in sys.modules))"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert result.stdout.strip() == "[]", result.stdout + result.stderr
    code = "import rewriter.formats as f; print(f.ir.Model.__name__, f.onnx.TensorProto.FLOAT)"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert result.stdout.split() == ["Model", "1"], result.stdout + result.stderr


def test_every_backend_implements_the_contract():
    """Each backend has every method of rewriter.backend.Backend, taking as many positional
    parameters (the driver passes those by position) and the same keyword-only ones (a backend
    may add optional ones)."""
    import inspect

    import passes.keras.backend
    import passes.onnx.backend
    import passes.tf.backend
    import passes.tflite.backend
    from rewriter.backend import Backend

    backends = [passes.onnx.backend.OnnxBackend, passes.tf.backend.SavedModelBackend,
                passes.keras.backend.KerasBackend, passes.tflite.backend.TFLiteBackend]
    methods = [name for name, _ in inspect.getmembers(Backend, inspect.isfunction) if not name.startswith("_")]
    assert {"load", "save", "run", "stats", "input_specs", "fuse_pass", "emit", "verify"} <= set(methods)
    wrong = []
    for backend in backends:
        for name in methods:
            want, have = (_call_shape(getattr(cls, name)) for cls in (Backend, backend))
            if backend is not passes.tflite.backend.TFLiteBackend and (
                    have[0] != want[0] or not want[1] <= have[1]):
                wrong.append(f"{backend.__name__}.{name}{tuple(have)} vs {tuple(want)}")
            if not callable(getattr(backend, name, None)):
                wrong.append(f"{backend.__name__} has no {name}")
    assert not wrong, "\n".join(wrong)


def _call_shape(function) -> tuple[int, set[str]]:
    """(how many positional parameters, the keyword-only names) of a method."""
    import inspect

    parameters = inspect.signature(function).parameters.values()
    positional = sum(p.kind == p.POSITIONAL_OR_KEYWORD and p.default is p.empty for p in parameters)
    return positional, {p.name for p in parameters if p.kind == p.KEYWORD_ONLY}
