"""The import layers, held by import-linter (``lint-imports``, contracts in pyproject.toml's
``[tool.importlinter]``): the command line and batch runner above the driver, the driver above
the passes, the passes above the core modules; no pass imports the driver; no import cycle among
the modules of a package. And what the contracts cannot see, run in a fresh interpreter: the
packages' ``__init__`` files import nothing, so importing one pass does not load the driver.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LINT = "from importlinter.cli import lint_imports; raise SystemExit(lint_imports(no_cache=True, no_logo=True))"


def _lint_imports(root: Path) -> subprocess.CompletedProcess:
    """``lint-imports`` on the project at ``root`` (its pyproject.toml, its packages)."""
    env = {**os.environ, "PYTHONPATH": str(root)}
    return subprocess.run([sys.executable, "-c", LINT], cwd=root, env=env, capture_output=True, text=True,
                          timeout=300)


def _fresh(code: str) -> str:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr
    return done.stdout.strip()


def test_every_import_contract_is_kept():
    done = _lint_imports(ROOT)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "Contracts: 3 kept, 0 broken." in done.stdout, done.stdout


def _copy_of_the_project(tmp_path: Path) -> Path:
    for name in ("rewriter", "passes"):
        shutil.copytree(ROOT / name, tmp_path / name, ignore=shutil.ignore_patterns("__pycache__", "templates"))
    shutil.copy(ROOT / "pyproject.toml", tmp_path / "pyproject.toml")
    return tmp_path


def _add_import(path: Path, line: str) -> None:
    text = path.read_text()
    head, _, rest = text.partition("from __future__ import annotations\n")
    path.write_text(f"{head}from __future__ import annotations\n{line}\n{rest}")


def test_a_pass_importing_the_driver_breaks_two_contracts(tmp_path):
    """The contracts hold something: a pass that imports rewriter.api (even deep inside a
    function, as here) breaks the layers and the ban on the driver, and lint-imports says where."""
    project = _copy_of_the_project(tmp_path)
    graph = project / "passes" / "onnx" / "_graph.py"
    graph.write_text(graph.read_text() + "\n\ndef _late():\n    from rewriter.api import fuse\n\n    return fuse\n")
    done = _lint_imports(project)
    assert done.returncode == 1, done.stdout + done.stderr
    assert "Contracts: 1 kept, 2 broken." in done.stdout, done.stdout
    assert "passes.onnx._graph -> rewriter.api" in done.stdout, done.stdout


def test_a_cycle_between_core_modules_breaks_the_acyclic_contract(tmp_path):
    project = _copy_of_the_project(tmp_path)
    _add_import(project / "rewriter" / "report.py", "import rewriter.verify  # noqa")  # verify imports report
    done = _lint_imports(project)
    assert done.returncode == 1, done.stdout + done.stderr
    assert "No import cycle among the modules of a package BROKEN" in done.stdout, done.stdout


def test_importing_a_pass_does_not_load_the_driver():
    loaded = _fresh("import sys, passes.onnx.fuse_split_conv; "
                    "print(sorted(m for m in ('rewriter.api', 'rewriter.cli', 'rewriter.batch', "
                    "'passes.onnx.expand_grouped_conv') if m in sys.modules))")
    assert loaded == "[]"


def test_importing_the_package_loads_the_api_on_first_use():
    out = _fresh("import sys, rewriter; before = 'rewriter.api' in sys.modules; fuse = rewriter.fuse; "
                 "print(before, 'rewriter.api' in sys.modules, fuse.__module__, rewriter.OutputError.__name__)")
    assert out.split() == ["False", "True", "rewriter.api", "OutputError"]


def test_the_lazy_faces_say_no_to_unknown_names():
    out = _fresh("import rewriter, passes.onnx\n"
                 "for module, name in ((rewriter, 'nothing'), (passes.onnx, 'NoPass')):\n"
                 "    try:\n        getattr(module, name)\n    except AttributeError as e:\n        print(e)\n"
                 "from rewriter import formats\nfrom passes.onnx import FuseSplitConvPass\n"
                 "print(formats.__name__, FuseSplitConvPass.__module__)")
    assert out.splitlines() == ["module 'rewriter' has no attribute 'nothing'",
                                "module 'passes.onnx' has no attribute 'NoPass'",
                                "rewriter.formats passes.onnx.fuse_split_conv"]


def test_rewriter_verify_is_the_api_function_once_the_submodule_is_loaded():
    """``verify`` names a submodule and the API's function: the package keeps the function."""
    out = _fresh("import rewriter, rewriter.verify\nfrom rewriter.verify import compare\n"
                 "import rewriter.api\nprint(rewriter.verify is rewriter.api.verify, compare.__module__)")
    assert out.split() == ["True", "rewriter.verify"]


def test_every_module_of_rewriter_has_a_layer():
    """A module in no layer is held by no layer contract: a new one must be given its place."""
    import tomllib

    config = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["importlinter"]
    (layers,) = [c["layers"] for c in config["contracts"] if c["type"] == "layers"]
    placed = {name.strip() for layer in layers for name in layer.replace("|", ":").split(":")}
    modules = {f"rewriter.{path.stem}" for path in (ROOT / "rewriter").glob("*.py") if path.stem != "__init__"}
    assert "passes" in placed and not modules - placed, sorted(modules - placed)
