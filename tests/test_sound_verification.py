"""Verification that cannot be fooled: non-finite values, a relative error that cannot explode,
references that prove nothing, each rewrite compared at its boundary, a defaulted batch run at two
sizes (issue "Sound verdicts", findings 1, 2 and 4)."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

import gconv_rewrite
from gconv_rewrite.errors import VerificationFailed
from gconv_rewrite.verify import compare
from samples.models import GraphBuilder
from tests.conftest import run_onnx

# -- compare ------------------------------------------------------------------------------------


def test_inf_against_the_other_inf_fails():
    row = compare("y", np.array([np.inf, 1.0], np.float32), np.array([-np.inf, 1.0], np.float32), 1e-4, 1e-3)
    assert not row.passed and row.max_abs_error == float("inf")
    assert "non-finite values differ (inf expected, -inf written)" in row.note


@pytest.mark.parametrize("expected, actual, passed", [
    ([np.inf, np.nan, 1.0], [np.inf, np.nan, 1.0], True),  # identical non-finite values match
    ([np.nan, 1.0], [0.0, 1.0], False),  # NaN appears on one side only
    ([1.0, 2.0], [np.nan, 2.0], False),
    ([-np.inf, 2.0], [-np.inf, 2.0], True),
    ([np.inf, 2.0], [3e38, 2.0], False),  # a huge finite value is no inf
])
def test_non_finite_values_match_only_where_identical(expected, actual, passed):
    row = compare("y", np.array(expected, np.float32), np.array(actual, np.float32), 1e-4, 1e-3)
    assert row.passed is passed


def test_relative_error_where_the_expected_value_is_zero_stays_finite():
    row = compare("y", np.array([0.0, 1.0], np.float32), np.array([1e-9, 1.0], np.float32), 1e-4, 1e-3)
    assert row.passed and row.max_rel_error == pytest.approx(1e-9 / 1e-4)  # against max(|expected|, atol)
    text = "\n".join(gconv_rewrite.report.format_verification(gconv_rewrite.report.Verification(
        ran=True, passed=True, atol=1e-4, rtol=1e-3, outputs=[row])))
    assert "e+2" not in text  # the old floor printed 9.9e+266


@pytest.mark.parametrize("values, why", [
    ([np.nan, np.nan], "all NaN/Inf"),
    ([0.25, 0.25 + 1e-6, 0.25], "constant for these inputs"),
])
def test_a_reference_that_proves_nothing_is_flagged(values, why):
    array = np.array(values, np.float32)
    row = compare("y", array, array.copy(), 1e-4, 1e-3)
    assert row.passed and row.informative is False and why in row.note


def test_an_informative_reference_is_not_flagged():
    row = compare("y", np.array([0.0, 1.0, -2.0], np.float32), np.array([0.0, 1.0, -2.0], np.float32), 1e-4, 1e-3)
    assert row.informative and row.note == ""


# -- finding 1: BN scale 3e38 after the Concat --------------------------------------------------


def _split_conv_concat(b: GraphBuilder, x: str, channels: int = 8, groups: int = 2) -> str:
    return b.grouped_conv(x, channels, channels, groups, form="split", kernel=(1, 1))


def _bn_overflow_model() -> onnx.ModelProto:
    b = GraphBuilder(opset=17, seed=3)
    y = _split_conv_concat(b, "x")
    scale = np.full(8, 3e38, np.float32)
    zeros, ones = np.zeros(8, np.float32), np.ones(8, np.float32)
    b.nodes.append(helper.make_node(
        "BatchNormalization", [y, b.const("gamma", scale), b.const("beta", zeros), b.const("mean", zeros),
                               b.const("var", ones)], ["y"], name="bn"))
    return b.model([("x", [1, 8, 4, 4])], [("y", [1, 8, 4, 4])])


def test_a_fold_that_would_overflow_is_not_made(tmp_path):
    path = tmp_path / "bn.onnx"
    onnx.save(_bn_overflow_model(), path)
    feeds = {"x": np.random.default_rng(0).standard_normal((1, 8, 4, 4)).astype(np.float32)}
    (reference,) = run_onnx(path, feeds)
    assert np.isinf(reference).any()  # the model itself overflows: the rewrite must keep each inf's sign
    output = tmp_path / "out.onnx"
    result = gconv_rewrite.fuse(path, output=output)
    # The fold would overflow float32 the other way: the BN stays, and the model computes the same infinities.
    assert [r.kind for r in result.report.rewrites] == ["fuse-split-conv"]
    assert any("would overflow float32" in s.reason for s in result.report.skipped)
    (written,) = run_onnx(output, feeds)
    assert result.report.verification.passed
    np.testing.assert_array_equal(np.isinf(written), np.isinf(reference))
    np.testing.assert_array_equal(np.sign(written[np.isinf(written)]), np.sign(reference[np.isinf(reference)]))


# -- finding 4: a saturated head hides a wrong rewrite; the boundary does not ------------------


def _saturated_head_model() -> onnx.ModelProto:
    """Split → Conv → Concat → GlobalAveragePool → Flatten → MatMul(×1e4 logits) → Softmax: the
    probabilities are 0 and 1 to float precision whatever the features are."""
    b = GraphBuilder(opset=17, seed=5)
    features = _split_conv_concat(b, "x", channels=8, groups=4)
    pooled = b.node("GlobalAveragePool", [features])[0]
    flat = b.node("Flatten", [pooled])[0]
    logits = b.node("MatMul", [flat, b.const("head", b.rng.standard_normal((8, 10)).astype(np.float32) * 1e4)])[0]
    b.nodes.append(helper.make_node("Softmax", [logits], ["probs"], name="softmax", axis=-1))
    return b.model([("x", ["N", 8, 6, 6])], [("probs", ["N", 10])])


def test_a_wrong_rewrite_behind_a_saturated_head_fails_at_its_boundary(tmp_path, monkeypatch):
    import gconv_rewrite.passes.onnx.fuse_split_conv as fusion

    real_plan = fusion.plan_fusion

    def slightly_wrong(*args, **kwargs):  # 0.1% off: invisible behind the head, not at the Concat
        plan = real_plan(*args, **kwargs)
        plan.weight = plan.weight * np.float32(1.001)
        return plan

    path = tmp_path / "head.onnx"
    onnx.save(_saturated_head_model(), path)
    monkeypatch.setattr(fusion, "plan_fusion", slightly_wrong)
    with pytest.raises(VerificationFailed) as failure:
        gconv_rewrite.fuse(path, output=tmp_path / "out.onnx")
    verification = failure.value.verification
    probs = [o for o in verification.outputs if o.name == "probs"][0]
    assert probs.passed  # the model output alone would have said "verified"
    assert any(o.name.startswith("boundary ") and not o.passed for o in verification.outputs)
    assert "differ at their boundary" in verification.note
    assert not (tmp_path / "out.onnx").exists()


def test_each_rewrite_reports_its_boundary(tmp_path):
    path = tmp_path / "head.onnx"
    onnx.save(_saturated_head_model(), path)
    report = gconv_rewrite.fuse(path, output=tmp_path / "out.onnx").report
    (rewrite,) = report.rewrites
    (entry,) = rewrite.boundary
    assert entry["tensor"] == onnx.load(str(path)).graph.node[5].output[0]  # the Concat's output
    assert entry["passed"] is True and entry["informative"] is True and entry["max_abs_error"] < 1e-5
    assert json.loads(json.dumps(report.to_dict()))["rewrites"][0]["boundary"][0]["passed"] is True


def test_a_folded_fusion_is_proven_at_the_fold(tmp_path):
    b = GraphBuilder(opset=17, seed=2)
    y = _split_conv_concat(b, "x")
    gamma = b.rng.uniform(0.5, 2, 8).astype(np.float32)
    zeros, ones = np.zeros(8, np.float32), np.ones(8, np.float32)
    b.nodes.append(helper.make_node("BatchNormalization", [y, b.const("g", gamma), b.const("b", zeros),
                                                           b.const("m", zeros), b.const("v", ones)], ["y"]))
    path = tmp_path / "fold.onnx"
    onnx.save(b.model([("x", [1, 8, 4, 4])], [("y", [1, 8, 4, 4])]), path)
    report = gconv_rewrite.fuse(path, output=tmp_path / "out.onnx").report
    fuse, fold = report.rewrites
    assert (fuse.kind, fold.kind) == ("fuse-split-conv", "fold-batchnorm")
    assert "a later rewrite replaced it" in fuse.boundary[0]["note"]
    assert fold.boundary[0]["tensor"] == "y" and fold.boundary[0]["passed"] is True


# -- finding 2 (the driver's side): a defaulted batch is verified at 1 and at 2 ----------------


def test_a_defaulted_batch_is_verified_at_two_sizes(tmp_path):
    path = tmp_path / "head.onnx"
    onnx.save(_saturated_head_model(), path)
    verification = gconv_rewrite.fuse(path, output=tmp_path / "out.onnx").report.verification
    assert [run["inputs"] for run in verification.runs] == [{"x": [1, 8, 6, 6]}, {"x": [2, 8, 6, 6]}]
    assert verification.inputs == {"x": [1, 8, 6, 6]}  # the first run's, as before
    assert all(o["passed"] for run in verification.runs for o in run["outputs"])


def test_given_shapes_and_fixed_shapes_run_once(tmp_path):
    path = tmp_path / "head.onnx"
    onnx.save(_saturated_head_model(), path)
    verification = gconv_rewrite.fuse(path, output=tmp_path / "out.onnx", shapes={"x": [3, 8, 6, 6]}).report.verification
    assert [run["inputs"] for run in verification.runs] == [{"x": [3, 8, 6, 6]}]


def test_a_rewrite_wrong_only_at_batch_two_is_caught(tmp_path, monkeypatch):
    """A model right at batch 1 and wrong at 2: the second size is what catches it."""
    b = GraphBuilder(opset=17, seed=4)
    y = _split_conv_concat(b, "x")
    b.nodes.append(helper.make_node("Identity", [y], ["y"]))
    model = b.model([("x", ["N", 8, 4, 4])], [("y", ["N", 8, 4, 4])])
    path = tmp_path / "m.onnx"
    onnx.save(model, path)

    import gconv_rewrite.passes.onnx.backend as onnx_backend

    real_save = onnx_backend.OnnxBackend.save

    def save_wrong_past_batch_one(self, ir_model, target):
        real_save(self, ir_model, target)
        written = onnx.load(str(target))
        # y + (N - 1): the same at N=1, off by one at N=2.
        shape = helper.make_node("Shape", ["x"], ["n_shape"], start=0, end=1)
        count = helper.make_node("Cast", ["n_shape"], ["n_float"], to=TensorProto.FLOAT)
        minus = helper.make_node("Sub", ["n_float", "one"], ["offset"])
        out = written.graph.output[0].name
        for node in written.graph.node:
            node.output[:] = [f"{o}_pre" if o == out else o for o in node.output]
        add = helper.make_node("Add", [f"{out}_pre", "offset"], [out])
        written.graph.initializer.append(numpy_helper.from_array(np.array([1.0], np.float32), "one"))
        written.graph.node.extend([shape, count, minus, add])
        onnx.save(written, str(target))

    monkeypatch.setattr(onnx_backend.OnnxBackend, "save", save_wrong_past_batch_one)
    with pytest.raises(VerificationFailed) as failure:
        gconv_rewrite.fuse(path, output=tmp_path / "out.onnx")
    verification = failure.value.verification
    assert [run["inputs"]["x"][0] for run in verification.runs] == [1, 2]
    assert verification.runs[0]["outputs"][0]["passed"] and not verification.runs[1]["outputs"][0]["passed"]
    assert any(o.name == "y (at x=2x8x4x4)" and not o.passed for o in verification.outputs)


# -- finding 4: a softmax output is compared in log space too ------------------------------------


def test_saturated_softmax_probabilities_are_compared_as_log_probabilities():
    logits = np.array([[40.0, 0.0, 1.0]])
    wrong = logits + np.array([[0.0, 0.5, 0.0]])  # a logit off by 0.5: probabilities off by 1e-18
    softmax = lambda z: (np.exp(z - z.max()) / np.exp(z - z.max()).sum()).astype(np.float32)
    row = compare("probs", softmax(logits), softmax(wrong), 1e-4, 1e-3)
    assert np.abs(softmax(logits) - softmax(wrong)).max() < 1e-16  # what atol/rtol alone would accept
    assert not row.passed and "softmax log-probabilities differ by up to 0.5" in row.note
    assert compare("probs", softmax(logits), softmax(logits + 1e-6), 1e-4, 1e-3).passed  # noise is not a difference


def test_values_that_are_not_probabilities_are_not_compared_in_log_space():
    values = np.array([[1e-9, 0.3, 0.2]], np.float32)  # rows do not sum to 1
    assert compare("y", values, values + np.float32(1e-8), 1e-4, 1e-3).passed


def test_boundaries_of_a_model_with_external_data(tmp_path):
    path = tmp_path / "head.onnx"
    onnx.save(_saturated_head_model(), path, save_as_external_data=True, location="head.data", size_threshold=0)
    report = gconv_rewrite.fuse(path, output=tmp_path / "out.onnx").report
    (entry,) = report.rewrites[0].boundary
    assert entry["passed"] is True and entry["max_abs_error"] < 1e-5
    assert sorted(p.name for p in tmp_path.iterdir() if not p.name.startswith("out")) == ["head.data", "head.onnx"]


def test_the_summary_says_each_rewrite_was_compared_at_its_boundary_and_both_sizes(tmp_path):
    from click.testing import CliRunner

    from gconv_rewrite.cli import main

    path = tmp_path / "head.onnx"
    onnx.save(_saturated_head_model(), path)
    result = CliRunner().invoke(main, [str(path)])
    assert result.exit_code == 0, result.output
    assert "verification: passed at x=1x8x6x6 (batch set to 1) and at x=2x8x6x6" in result.output
    assert "boundaries: 1 rewrite compared at the tensor each replaces, all within tolerance" in result.output


def test_an_infinity_of_the_other_sign_fails_verification(tmp_path, monkeypatch):
    """Even when a rewrite does overflow: +inf against -inf is a mismatch, never a NaN that passes."""
    import gconv_rewrite.passes.onnx.fold_batchnorm as fold

    monkeypatch.setattr(fold, "_overflows", lambda *args: False)  # the fold's own guard off
    path = tmp_path / "bn.onnx"
    onnx.save(_bn_overflow_model(), path)
    with pytest.raises(VerificationFailed) as failure:
        gconv_rewrite.fuse(path, output=tmp_path / "out.onnx")
    assert not (tmp_path / "out.onnx").exists()
    notes = [o.note for o in failure.value.verification.outputs if not o.passed]
    assert any("non-finite values differ" in n for n in notes)
