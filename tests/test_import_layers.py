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


def _installed_layout(root: Path, folder: Path) -> Path:
    """The package as setuptools installs it (``package-dir``: rewriter/ is gconv_rewrite,
    passes/ is gconv_rewrite.passes), copied under ``folder`` with the pyproject: import-linter
    reads one package tree, and the repository keeps its two top-level folders."""
    shutil.copytree(root / "rewriter", folder / "gconv_rewrite", ignore=shutil.ignore_patterns("__pycache__", "templates"))
    shutil.copytree(root / "passes", folder / "gconv_rewrite" / "passes", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(root / "pyproject.toml", folder / "pyproject.toml")
    return folder


def _lint_imports(project: Path) -> subprocess.CompletedProcess:
    """``lint-imports`` on the installed layout at ``project`` (its pyproject.toml, its package)."""
    env = {**os.environ, "PYTHONPATH": str(project)}
    return subprocess.run([sys.executable, "-c", LINT], cwd=project, env=env, capture_output=True, text=True,
                          timeout=300)


def _fresh(code: str) -> str:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr
    return done.stdout.strip()


def test_every_import_contract_is_kept(tmp_path):
    done = _lint_imports(_installed_layout(ROOT, tmp_path))
    assert done.returncode == 0, done.stdout + done.stderr
    assert "Contracts: 3 kept, 0 broken." in done.stdout, done.stdout


def _copy_of_the_project(tmp_path: Path) -> Path:
    return _installed_layout(ROOT, tmp_path)


def _add_import(path: Path, line: str) -> None:
    text = path.read_text()
    head, _, rest = text.partition("from __future__ import annotations\n")
    path.write_text(f"{head}from __future__ import annotations\n{line}\n{rest}")


def test_a_pass_importing_the_driver_breaks_every_contract(tmp_path):
    """The contracts hold something: a pass that imports gconv_rewrite.api (even deep inside a
    function, as here) breaks the layers, the ban on the driver and, the passes being a package
    inside gconv_rewrite, the acyclic siblings (passes -> api -> passes); lint-imports says where."""
    project = _copy_of_the_project(tmp_path)
    graph = project / "gconv_rewrite" / "passes" / "onnx" / "_graph.py"
    graph.write_text(graph.read_text() + "\n\ndef _late():\n    from gconv_rewrite.api import fuse\n\n    return fuse\n")
    done = _lint_imports(project)
    assert done.returncode == 1, done.stdout + done.stderr
    assert "Contracts: 0 kept, 3 broken." in done.stdout, done.stdout
    assert "gconv_rewrite.passes.onnx._graph -> gconv_rewrite.api" in done.stdout, done.stdout


def test_a_cycle_between_core_modules_breaks_the_acyclic_contract(tmp_path):
    project = _copy_of_the_project(tmp_path)
    _add_import(project / "gconv_rewrite" / "report.py", "import gconv_rewrite.verify  # noqa")  # verify imports report
    done = _lint_imports(project)
    assert done.returncode == 1, done.stdout + done.stderr
    assert "No import cycle among the modules of a package BROKEN" in done.stdout, done.stdout


def test_importing_a_pass_does_not_load_the_driver():
    loaded = _fresh("import sys, gconv_rewrite.passes.onnx.fuse_split_conv; "
                    "print(sorted(m for m in ('gconv_rewrite.api', 'gconv_rewrite.cli', 'gconv_rewrite.batch', "
                    "'gconv_rewrite.passes.onnx.expand_grouped_conv') if m in sys.modules))")
    assert loaded == "[]"


def test_importing_the_package_loads_the_api_on_first_use():
    out = _fresh("import sys, gconv_rewrite; before = 'gconv_rewrite.api' in sys.modules; fuse = gconv_rewrite.fuse; "
                 "print(before, 'gconv_rewrite.api' in sys.modules, fuse.__module__, gconv_rewrite.OutputError.__name__)")
    assert out.split() == ["False", "True", "gconv_rewrite.api", "OutputError"]


def test_the_lazy_faces_say_no_to_unknown_names():
    out = _fresh("import gconv_rewrite, gconv_rewrite.passes.onnx\n"
                 "for module, name in ((gconv_rewrite, 'nothing'), (gconv_rewrite.passes.onnx, 'NoPass')):\n"
                 "    try:\n        getattr(module, name)\n    except AttributeError as e:\n        print(e)\n"
                 "from gconv_rewrite import formats\nfrom gconv_rewrite.passes.onnx import FuseSplitConvPass\n"
                 "print(formats.__name__, FuseSplitConvPass.__module__)")
    assert out.splitlines() == ["module 'gconv_rewrite' has no attribute 'nothing'",
                                "module 'gconv_rewrite.passes.onnx' has no attribute 'NoPass'",
                                "gconv_rewrite.formats gconv_rewrite.passes.onnx.fuse_split_conv"]


def test_rewriter_verify_is_the_api_function_once_the_submodule_is_loaded():
    """``verify`` names a submodule and the API's function: the package keeps the function."""
    out = _fresh("import gconv_rewrite, gconv_rewrite.verify\nfrom gconv_rewrite.verify import compare\n"
                 "import gconv_rewrite.api\nprint(gconv_rewrite.verify is gconv_rewrite.api.verify, compare.__module__)")
    assert out.split() == ["True", "gconv_rewrite.verify"]


def test_every_module_of_rewriter_has_a_layer():
    """A module in no layer is held by no layer contract: a new one must be given its place."""
    import tomllib

    config = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["importlinter"]
    (layers,) = [c["layers"] for c in config["contracts"] if c["type"] == "layers"]
    placed = {name.strip() for layer in layers for name in layer.replace("|", ":").split(":")}
    modules = {f"gconv_rewrite.{path.stem}" for path in (ROOT / "rewriter").glob("*.py") if path.stem != "__init__"}
    assert "gconv_rewrite.passes" in placed and not modules - placed, sorted(modules - placed)


def test_the_tool_runs_from_a_folder_that_has_its_own_passes_package(tmp_path):
    """One import name the distribution owns: a user's own ``passes/`` package (or ``passes.py``,
    or ``rewriter.py``) in the working folder is neither imported nor in the way."""
    (tmp_path / "passes").mkdir()
    (tmp_path / "passes" / "__init__.py").write_text("raise SystemExit('the user package ran')\n")
    (tmp_path / "rewriter.py").write_text("raise SystemExit('the user module ran')\n")
    model = tmp_path / "m.onnx"
    import onnx

    from samples.models import grouped_block

    onnx.save(grouped_block("split", groups=4), model)
    done = subprocess.run([sys.executable, "-m", "gconv_rewrite", str(model), "--check", "-q"], cwd=tmp_path,
                          capture_output=True, text=True, timeout=300,
                          env={k: v for k, v in os.environ.items() if k != "PYTHONPATH"})
    assert done.returncode == 1, done.stderr  # a finding: the tool ran, its own passes did
    assert "user" not in done.stdout + done.stderr
    assert "fusable-group" in done.stdout
