"""The Python API as onnxsim's and onnxslim's users expect it (issue 24): an ``onnx.ModelProto``
in and a ModelProto out, verified all the same; ``check()`` with fuse's and expand's options; the
error types exported from the package; no printing from the library (log records instead)."""

from __future__ import annotations

import ast
import inspect
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import onnx
import pytest

import gconv_rewrite
from gconv_rewrite import errors
from samples.models import grouped_block

ROOT = Path(__file__).resolve().parents[1]


def _ops(model: onnx.ModelProto) -> dict[str, int]:
    counts: dict[str, int] = {}
    for node in model.graph.node:
        counts[node.op_type] = counts.get(node.op_type, 0) + 1
    return counts


def _group(model: onnx.ModelProto) -> int:
    (conv,) = [n for n in model.graph.node if n.op_type == "Conv"]
    return next((a.i for a in conv.attribute if a.name == "group"), 1)


# -- a ModelProto in, a ModelProto out --------------------------------------------------------------


def test_fuse_takes_a_model_proto_and_returns_one_verified():
    split = grouped_block("split", groups=4)
    before = split.SerializeToString()
    result = gconv_rewrite.fuse(split)
    assert isinstance(result.model, onnx.ModelProto)
    assert _ops(split)["Conv"] == 4 and _ops(result.model)["Conv"] == 1 and _group(result.model) == 4
    onnx.checker.check_model(result.model)
    assert split.SerializeToString() == before  # the caller's proto is left as it was
    verification = result.report.verification
    assert verification.ran and verification.passed  # proven through a scratch file
    assert result.report.input == "<model>" and [r.groups for r in result.report.rewrites] == [4]


def test_a_model_proto_is_written_where_output_says(tmp_path):
    out = tmp_path / "fused.onnx"
    result = gconv_rewrite.fuse(grouped_block("split", groups=4), output=out)
    assert result.report.written and _group(onnx.load(out)) == 4
    assert isinstance(result.model, onnx.ModelProto) and _group(result.model) == 4


def test_expand_and_verify_take_model_protos():
    native = grouped_block("native", groups=4)
    expanded = gconv_rewrite.expand(native).model
    assert isinstance(expanded, onnx.ModelProto) and _ops(expanded)["Conv"] == 4
    verification = gconv_rewrite.verify(native, expanded)
    assert verification.ran and verification.passed


def test_a_model_that_is_not_one_is_a_type_error():
    with pytest.raises(TypeError, match="a model is a path, an onnx.ModelProto or an onnx_ir.Model, not bytes"):
        gconv_rewrite.fuse(grouped_block("split").SerializeToString())


# -- check() takes the options ------------------------------------------------------------------------


def test_check_takes_the_options_of_fuse_and_expand(tmp_path):
    path = tmp_path / "native.onnx"
    onnx.save(grouped_block("native", groups=4), path)
    assert [r.groups for r in gconv_rewrite.check(path, mode="expand").rewrites] == [4]
    assert gconv_rewrite.check(path, mode="expand", min_groups=8).rewrites == []  # a keyword override
    assert gconv_rewrite.check(path, mode="expand", options=gconv_rewrite.Options(max_groups=2)).rewrites == []
    report = gconv_rewrite.check(path, target="tflite-gpu")  # 4 in/out per group: the GPU delegate wants it native
    assert report.target["name"] == "tflite-gpu" and [n["action"] for n in report.target["nodes"]] == ["keep"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["native.onnx"]  # nothing written
    parameters = inspect.signature(gconv_rewrite.check).parameters
    assert {"options", "overrides", "mode"} <= set(parameters)


def test_check_refuses_an_unknown_option(tmp_path):
    with pytest.raises(TypeError, match="min_group"):
        gconv_rewrite.check(grouped_block("split"), min_group=8)


# -- the error types ----------------------------------------------------------------------------------


ERRORS = ["RewriteError", "BadInput", "OutputError", "VerificationFailed", "VerificationImpossible", "ConfigError"]


def test_the_error_types_are_exported():
    assert set(ERRORS) <= set(gconv_rewrite.__all__)
    for name in ERRORS:
        error = getattr(gconv_rewrite, name)
        assert issubclass(error, gconv_rewrite.RewriteError), name
        assert error.__name__ == name
    assert gconv_rewrite.OutputError is errors.OutputError
    from gconv_rewrite import ConfigError, OutputError  # noqa: F401  (the import form users write)


def test_a_bad_input_is_caught_by_the_exported_type(tmp_path):
    missing = tmp_path / "nowhere.onnx"
    with pytest.raises(gconv_rewrite.RewriteError) as caught:
        gconv_rewrite.fuse(missing)
    assert isinstance(caught.value, gconv_rewrite.BadInput) and caught.value.exit_code == 2


# -- the library prints nothing -------------------------------------------------------------------------


# The command line's modules write to the terminal; every other module of the library may not.
TERMINAL_MODULES = {"rewriter/cli.py", "rewriter/__main__.py"}


def _writes_to_terminal(path: Path) -> list[str]:
    """``print(...)``, ``sys.stdout/stderr.write(...)`` and ``click.echo/secho(...)`` calls in a file."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if not isinstance(node, ast.Call):
            continue
        function = node.func
        if isinstance(function, ast.Name) and function.id == "print":
            found.append(f"{path.relative_to(ROOT)}:{node.lineno}: print")
        elif isinstance(function, ast.Attribute):
            target = ast.unparse(function)
            if target in ("sys.stdout.write", "sys.stderr.write", "click.echo", "click.secho"):
                found.append(f"{path.relative_to(ROOT)}:{node.lineno}: {target}")
    return found


def test_no_library_module_writes_to_the_terminal():
    files = [p for package in ("rewriter", "passes") for p in sorted((ROOT / package).rglob("*.py"))
             if p.relative_to(ROOT).as_posix() not in TERMINAL_MODULES]
    assert len(files) > 40
    offenders = [line for path in files for line in _writes_to_terminal(path)]
    assert not offenders, "\n".join(offenders)
    assert _writes_to_terminal(ROOT / "rewriter" / "cli.py")  # the scan finds what is there


_LATE_BINDING = textwrap.dedent("""
    import logging, sys, tempfile
    from pathlib import Path
    if sys.argv[1] == "configured":
        logging.basicConfig(level=logging.WARNING, format="%(name)s: %(message)s")
    import gconv_rewrite
    from samples import keras_models
    folder = Path(tempfile.mkdtemp())
    path = keras_models.lambda_model_keras3(folder / "late.keras", binding="late")
    result = gconv_rewrite.fuse(path, output=folder / "out.keras", trust_lambdas=True)
    print("skipped:", [s.finding for s in result.report.skipped])
""")


def _late_binding_run(how: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "TF_CPP_MIN_LOG_LEVEL": "3"}
    return subprocess.run([sys.executable, "-c", _LATE_BINDING, how], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=300)


def test_a_late_binding_warning_is_a_log_record_not_a_print():
    """Without a logging configuration the caller sees nothing but the report; with one, the
    warning arrives as a record of the pass's logger."""
    pytest.importorskip("keras")
    quiet = _late_binding_run("unconfigured")
    assert quiet.returncode == 0, quiet.stderr
    assert quiet.stdout.strip() == "skipped: ['late-binding']"
    assert "LATE BINDING" not in quiet.stderr
    told = _late_binding_run("configured")
    assert told.returncode == 0, told.stderr
    assert "gconv_rewrite.passes.keras.fuse_grouped_conv: concatenate: LATE BINDING: Lambdas" in told.stderr, told.stderr


def test_dry_run_takes_a_model_proto_too():
    from gconv_rewrite.api import dry_run

    result = dry_run(grouped_block("split", groups=4))
    assert isinstance(result.model, onnx.ModelProto) and _group(result.model) == 4
    assert [r.groups for r in result.report.rewrites] == [4]
