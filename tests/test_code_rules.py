"""House rules, checked on the source itself (no model is run).

1. No function or method in ``rewriter/`` or ``passes/`` is longer than 60 lines: a longer one is
   split into helpers whose names say what they hold.
2. The modules of ``rewriter`` and ``passes`` import each other without a cycle, and no pass
   imports the layers that drive it (``gconv_rewrite.api``, ``gconv_rewrite.cli``, ``gconv_rewrite.batch``).

The import graph is read with ``ast``: every ``import`` and ``from ... import`` anywhere in a
module (inside functions too: a deferred import is still a dependency), relative imports
resolved. ``from PKG import NAME`` is an edge to the submodule ``PKG.NAME`` when there is one,
else to ``PKG`` itself, whose ``__init__`` imports (its re-exports) are edges of their own. The
parent packages Python initialises on the way to a submodule are not counted as edges.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("rewriter", "passes")
MAX_FUNCTION_LINES = 60


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


# -- 2. what importing the command line loads -------------------------------------------------


def test_the_cli_imports_no_onnx_until_it_reads_onnx():
    """A Keras or SavedModel run never pays ONNX's import (about 0.9 s): gconv_rewrite.formats loads it
    on first use; the ONNX backend and the ONNX passes import it themselves."""
    import subprocess
    import sys

    code = "import sys, gconv_rewrite.cli, gconv_rewrite.formats; print(sorted(m for m in ('onnx', 'onnx_ir') if m in sys.modules))"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert result.stdout.strip() == "[]", result.stdout + result.stderr
    code = "import gconv_rewrite.formats as f; print(f.ir.Model.__name__, f.onnx.TensorProto.FLOAT)"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert result.stdout.split() == ["Model", "1"], result.stdout + result.stderr
