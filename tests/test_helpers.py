"""The shared test helpers stay shared, and the harnesses can fail.

- No test module defines again a helper that tests/helpers.py holds (by name, or by the same body
  under another name): a helper is fixed once and every test gets the fix.
- The harness checks are not vacuous: each one rejects a model that does not meet it.
"""

from __future__ import annotations

import ast
from dataclasses import dataclass
from pathlib import Path

import onnx
import pytest

from gconv_rewrite.report import Report, Skip
from samples.models import grouped_block
from tests.harness import assert_skip
from tests.helpers import error_lines, onnx_conv_groups, op_counts

TESTS = Path(__file__).resolve().parent
SHARED_FILES = ("helpers.py", "harness.py", "conftest.py")


def _functions(path: Path) -> list[ast.FunctionDef]:
    return [n for n in ast.parse(path.read_text()).body if isinstance(n, ast.FunctionDef)]


def _body(function: ast.FunctionDef) -> str:
    """The function's statements without its docstring: what it does, whatever it is called."""
    body = function.body
    if body and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant):
        body = body[1:]
    return "\n".join(ast.dump(statement) for statement in body)


def _shared() -> dict[str, str]:
    """Every function of the shared files, by name: its body."""
    return {f.name: _body(f) for name in SHARED_FILES for f in _functions(TESTS / name)}


def test_no_test_module_defines_a_shared_helper_again():
    shared = _shared()
    bodies = {body: name for name, body in shared.items()}
    again = []
    for path in sorted(TESTS.glob("*.py")):
        if path.name in SHARED_FILES:
            continue
        for function in _functions(path):
            if function.name in shared and _body(function) == shared[function.name]:
                again.append(f"{path.name}: {function.name} (import it from tests.helpers)")
            elif _body(function) in bodies:
                again.append(f"{path.name}: {function.name} is tests.helpers.{bodies[_body(function)]}")
    assert again == []


@pytest.mark.parametrize("helper", ["invoke", "error_lines", "op_counts", "classes", "digest", "run_onnx",
                                    "keras_outputs", "saved_model_outputs", "saved_model_ops"])
def test_the_helpers_the_tests_used_to_repeat_are_not_redefined(helper):
    defined = [path.name for path in sorted(TESTS.glob("*.py")) if path.name not in SHARED_FILES
               and any(f.name == helper for f in _functions(path))]
    assert defined == []


# -- the helpers ---------------------------------------------------------------------------------


def test_error_lines_filter_by_prefix():
    output = "gconv-rewrite: error: a\n\nsummary\ngconv-rewrite: warning: b\n  \n"
    assert error_lines(output) == ["gconv-rewrite: error: a", "gconv-rewrite: warning: b"]
    assert error_lines(output, "gconv-rewrite: error:") == ["gconv-rewrite: error: a"]
    assert error_lines(output, prefix="") == ["gconv-rewrite: error: a", "summary", "gconv-rewrite: warning: b"]


def test_onnx_counts_from_a_model_or_a_file(tmp_path):
    model = grouped_block("split", groups=4)
    onnx.save(model, tmp_path / "m.onnx")
    assert op_counts(model) == op_counts(tmp_path / "m.onnx") == {
        "Split": 1, "Conv": 4, "Concat": 1, "Relu": 1, "Identity": 1}
    onnx.save(grouped_block("native", groups=4), tmp_path / "n.onnx")
    assert onnx_conv_groups(tmp_path / "m.onnx") == [1, 1, 1, 1] and onnx_conv_groups(tmp_path / "n.onnx") == [4]


# -- the harnesses reject what they must ---------------------------------------------------------


@dataclass
class CodedSkip(Skip):
    """A skip record as reports with stable codes write it."""

    code: str = ""


def test_assert_skip_checks_reason_count_and_code():
    plain = Report(input="m", mode="fuse", skipped=[Skip("c", "uneven split: 4,4,6 channels")])
    with pytest.raises(AssertionError):  # a skip without its code fails: every skip carries one
        assert_skip(plain, ("uneven split",), code="uneven-split")
    with pytest.raises(AssertionError):
        assert_skip(plain, ("kernel",), code=None)
    coded = Report(input="m", mode="fuse", skipped=[CodedSkip("c", "uneven split: 4,4,6 channels", code="uneven-split")])
    assert_skip(coded, ("uneven split",), code="uneven-split")
    with pytest.raises(AssertionError):
        assert_skip(coded, ("uneven split",), code="kernel-mismatch")
    with pytest.raises(AssertionError):
        assert_skip(Report(input="m", mode="fuse", skipped=plain.skipped * 2), ("uneven split",), code=None)


def test_onnx_harness_rejects_the_wrong_expectation(fusion):
    with pytest.raises(AssertionError):
        fusion.untouched(grouped_block("split", groups=4), "uneven")  # it fuses
    with pytest.raises(AssertionError):
        fusion.fused(grouped_block("split", groups=4), groups=2)  # it fuses into 4 groups


def test_keras_harness_rejects_the_wrong_expectation(keras_fusion, tmp_path):
    from samples import keras_models as km

    with pytest.raises(AssertionError):
        keras_fusion.fused(km.uneven_model(tmp_path / "uneven.keras"), groups=4)  # a near miss
    with pytest.raises(AssertionError):
        keras_fusion.untouched(km.getitem_model(tmp_path / "g.keras"), "uneven")  # it fuses
