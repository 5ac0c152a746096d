"""onnx.fuse-qlinear-conv: xq → Split|Slice → QLinearConv_i → Concat|QLinearConcat ⇒ xq → QLinearConv(group=N).

The QOperator form of onnxruntime's static quantizer (issue #20, finding 9). Models come from the
quantizer itself (a float Split → Conv → Concat model, ``quantize_static(..., QOperator)``) and
from onnx.helper (Concat and QLinearConcat joins, near misses). Every fusion is checked for its
structure and for integer-exact outputs in onnxruntime (its own optimisations off); every near
miss is left as it was, with its reason."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from click.testing import CliRunner
from onnx import TensorProto, helper, numpy_helper

import gconv_rewrite
from gconv_rewrite.cli import main
from tests.helpers import group_of, op_counts
from tests.helpers import run_onnx as run

BRANCHES, WIDTH, OUT = 4, 2, 4  # 4 branches of 2 input channels, 4 output channels each
SPATIAL = 6


# -- running ---------------------------------------------------------------------------------------


def assert_identical_outputs(original, fused, make_feeds, trials: int = 3) -> None:
    """Bit-identical outputs (integers: exact equality) over several seeded inputs."""
    for seed in range(trials):
        feeds = make_feeds(np.random.default_rng(seed))
        expected, actual = run(original, feeds), run(fused, feeds)
        assert len(expected) == len(actual)
        for want, got in zip(expected, actual):
            assert want.dtype == got.dtype and want.shape == got.shape
            assert len(np.unique(want)) > 8, "a test output that is nearly constant proves nothing"
            np.testing.assert_array_equal(got, want)


def uint8_feeds(rng) -> dict[str, np.ndarray]:
    return {"x": rng.integers(0, 256, size=(1, BRANCHES * WIDTH, SPATIAL, SPATIAL)).astype(np.uint8)}


def float_feeds(rng) -> dict[str, np.ndarray]:
    return {"x": rng.standard_normal((1, BRANCHES * WIDTH, SPATIAL, SPATIAL)).astype(np.float32)}


def initializers(model: onnx.ModelProto) -> dict[str, np.ndarray]:
    return {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}


def the_qlinear_conv(model: onnx.ModelProto) -> onnx.NodeProto:
    (conv,) = [n for n in model.graph.node if n.op_type == "QLinearConv"]
    return conv


# -- models from onnxruntime's quantizer -------------------------------------------------------------


def float_model(seed: int = 0) -> onnx.ModelProto:
    """x → Split(axis=1) → Conv_i (3×3, bias) → Concat(axis=1) → y, in float."""
    rng = np.random.default_rng(seed)
    nodes = [helper.make_node("Split", ["x", "sizes"], [f"s{i}" for i in range(BRANCHES)], axis=1, name="split")]
    inits = [numpy_helper.from_array(np.array([WIDTH] * BRANCHES, np.int64), "sizes")]
    for i in range(BRANCHES):
        inits += [numpy_helper.from_array(rng.normal(size=(OUT, WIDTH, 3, 3)).astype(np.float32), f"w{i}"),
                  numpy_helper.from_array(rng.normal(size=(OUT,)).astype(np.float32), f"b{i}")]
        nodes.append(helper.make_node("Conv", [f"s{i}", f"w{i}", f"b{i}"], [f"c{i}"], pads=[1] * 4, name=f"conv{i}"))
    nodes.append(helper.make_node("Concat", [f"c{i}" for i in range(BRANCHES)], ["y"], axis=1, name="concat"))
    shape = [1, BRANCHES * WIDTH, SPATIAL, SPATIAL]
    graph = helper.make_graph(nodes, "grouped", [helper.make_tensor_value_info("x", TensorProto.FLOAT, shape)],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def quantize(tmp_path, *, per_channel: bool, shared_output_range: bool):
    """The float model through ``quantize_static(..., QuantFormat.QOperator)`` with a small
    calibration reader. ``shared_output_range``: every branch output and the Concat output are
    given one range (TensorQuantOverrides), so that their scales agree and the QLinearConcat is
    a plain copy; without it each branch gets its calibrated scale and the join requantizes."""
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static

    class Reader(CalibrationDataReader):
        def __init__(self):
            rng = np.random.default_rng(7)
            self.batches = iter([float_feeds(rng) for _ in range(4)])

        def get_next(self):
            return next(self.batches, None)

    source, quantized = tmp_path / "float.onnx", tmp_path / "quantized.onnx"
    onnx.save(float_model(), source)
    same_range = [{"rmin": np.float32(-12.0), "rmax": np.float32(12.0)}]
    overrides = {name: same_range for name in [*(f"c{i}" for i in range(BRANCHES)), "y"]} if shared_output_range else {}
    quantize_static(str(source), str(quantized), Reader(), quant_format=QuantFormat.QOperator,
                    per_channel=per_channel, activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                    extra_options={"TensorQuantOverrides": overrides})
    return quantized


@pytest.mark.parametrize("per_channel", [False, True], ids=["per-tensor-weights", "per-channel-weights"])
def test_quantize_static_qoperator_branches_fuse_into_one_grouped_qlinearconv(tmp_path, per_channel):
    quantized, fused_path = quantize(tmp_path, per_channel=per_channel, shared_output_range=True), tmp_path / "f.onnx"
    assert op_counts(onnx.load(quantized)) == {"QuantizeLinear": 1, "Split": 1, "QLinearConv": 4, "QLinearConcat": 1,
                                               "DequantizeLinear": 1}
    checked = gconv_rewrite.check(quantized)
    assert [(r.kind, r.groups) for r in checked.rewrites] == [("fuse-qlinear-conv", 4)]  # --check lists it
    result = gconv_rewrite.fuse(quantized, output=fused_path)
    assert [(r.kind, r.groups, r.channels) for r in result.report.rewrites] == [
        ("fuse-qlinear-conv", 4, {"in": 8, "out": 16})]
    assert result.report.skipped == []
    assert result.report.verification.passed
    assert max(o.max_abs_error for o in result.report.verification.outputs) == 0.0
    fused = onnx.load(fused_path)
    assert op_counts(fused) == {"QuantizeLinear": 1, "QLinearConv": 1, "DequantizeLinear": 1}
    conv, values = the_qlinear_conv(fused), initializers(fused)
    assert group_of(conv) == 4
    assert values[conv.input[3]].dtype == np.int8 and values[conv.input[3]].shape == (16, WIDTH, 3, 3)
    assert values[conv.input[4]].shape == (16,)  # each branch's weight scale, now one per output channel
    assert values[conv.input[5]].shape == (16,) and values[conv.input[5]].dtype == np.int8
    assert values[conv.input[8]].dtype == np.int32 and values[conv.input[8]].shape == (16,)
    # The branches' own weights are stacked as they were, integer for integer.
    original = initializers(onnx.load(quantized))
    np.testing.assert_array_equal(values[conv.input[3]],
                                  np.concatenate([original[f"w{i}_quantized"] for i in range(BRANCHES)]))
    assert conv.input[0] == "x_quantized" and conv.output[0] == "y_quantized"  # the join's name, kept
    onnx.checker.check_model(fused)  # raises on an invalid model
    assert_identical_outputs(quantized, fused_path, float_feeds)
    # Fusing what was fused finds nothing, and says nothing.
    again = gconv_rewrite.check(fused_path)
    assert again.rewrites == [] and again.skipped == []


def test_quantize_static_with_calibrated_scales_is_refused_because_the_join_requantizes(tmp_path):
    quantized = quantize(tmp_path, per_channel=False, shared_output_range=False)
    report = gconv_rewrite.check(quantized)
    assert report.rewrites == []
    [skip] = report.skipped
    assert skip.reason.startswith("the QLinearConcat's scale for input 0 is ")
    assert skip.reason.endswith("the QLinearConcat requantizes, so one QLinearConv would not compute the same "
                                "integers")
    assert skip.nodes == ["conv0_quant", "conv1_quant", "conv2_quant", "conv3_quant"]


def test_check_on_the_command_line_reports_the_qlinear_candidate(tmp_path):
    quantized = quantize(tmp_path, per_channel=True, shared_output_range=True)
    result = CliRunner().invoke(main, [str(quantized), "--check"])
    assert result.exit_code == 1, result.output  # --check found work
    assert "fuse-qlinear-conv" in result.output and "group=4" in result.output


# -- models built by hand ----------------------------------------------------------------------------


def qlinear_model(*, join: str = "concat", reader: str = "split", weight_type=np.int8, weight_zero_points=None,
                  y_scales=None, join_scale: float | None = None, overridable: tuple[str, ...] = (),
                  shared_x_scale_input: bool = False, widths=None, no_bias_branch: int | None = None,
                  inner_group: int = 1, output_is_join: bool = True, out: int = OUT, seed: int = 0) -> onnx.ModelProto:
    """``x (uint8) → Split|Slice → QLinearConv_i → Concat|QLinearConcat → y (uint8)``.

    Each branch has its own per-tensor weight scale (and zero point: ``weight_zero_points``);
    ``y_scales`` the branch output scales (default all 0.25); ``join_scale`` the QLinearConcat's
    output scale (default the branches'); ``overridable`` names initializers that are also graph
    inputs; ``shared_x_scale_input``: every branch reads one graph input ``xs`` as its x_scale."""
    rng = np.random.default_rng(seed)
    widths = widths or [WIDTH] * BRANCHES
    y_scales = y_scales or [0.25] * len(widths)
    weight_zero_points = weight_zero_points or [0 if weight_type == np.int8 else 128] * len(widths)
    low, high = (-60, 60) if weight_type == np.int8 else (68, 188)
    inits = {"xs": np.float32(0.02), "xz": np.uint8(120), "yz": np.uint8(128)}
    nodes, starts = [], np.cumsum([0, *widths])
    if reader == "split":
        inits["sizes"] = np.array(widths, np.int64)
        nodes.append(helper.make_node("Split", ["x", "sizes"], [f"s{i}" for i in range(len(widths))], axis=1,
                                      name="split"))
    else:
        inits["axes"] = np.array([1], np.int64)
        for i in range(len(widths)):
            inits[f"start{i}"], inits[f"end{i}"] = np.array([starts[i]], np.int64), np.array([starts[i + 1]], np.int64)
            nodes.append(helper.make_node("Slice", ["x", f"start{i}", f"end{i}", "axes"], [f"s{i}"], name=f"slice{i}"))
    for i, width in enumerate(widths):
        inits[f"w{i}"] = rng.integers(low, high, size=(out, width // inner_group, 3, 3)).astype(weight_type)
        inits[f"ws{i}"] = np.float32(0.004 + 0.002 * i)
        inits[f"wz{i}"] = np.asarray(weight_zero_points[i], weight_type)
        inits[f"ys{i}"] = np.float32(y_scales[i])
        inputs = [f"s{i}", "xs", "xz", f"w{i}", f"ws{i}", f"wz{i}", f"ys{i}", "yz"]
        if i != no_bias_branch:
            inits[f"b{i}"] = rng.integers(-3000, 3000, size=(out,)).astype(np.int32)
            inputs.append(f"b{i}")
        nodes.append(helper.make_node("QLinearConv", inputs, [f"c{i}"], pads=[1] * 4, group=inner_group,
                                      name=f"conv{i}"))
    branch_outputs = [f"c{i}" for i in range(len(widths))]
    if join == "concat":
        nodes.append(helper.make_node("Concat", branch_outputs, ["joined"], axis=1, name="concat"))
    else:
        inits["js"] = np.float32(y_scales[0] if join_scale is None else join_scale)
        triples = [name for i, c in enumerate(branch_outputs) for name in (c, f"ys{i}", "yz")]
        nodes.append(helper.make_node("QLinearConcat", ["js", "yz", *triples], ["joined"], axis=1,
                                      domain="com.microsoft", name="qconcat"))
    outputs = {"joined": [1, out * len(widths), SPATIAL, SPATIAL]}
    if not output_is_join:  # something reads the joined tensor (a following op keeps its input name)
        nodes.append(helper.make_node("MaxPool", ["joined"], ["pooled"], kernel_shape=[2, 2], name="pool"))
        outputs = {"pooled": [1, out * len(widths), SPATIAL - 1, SPATIAL - 1]}
    graph_inputs = [helper.make_tensor_value_info("x", TensorProto.UINT8, [1, sum(widths), SPATIAL, SPATIAL])]
    overridable = tuple(overridable) + (("xs",) if shared_x_scale_input else ())
    graph_inputs += [helper.make_tensor_value_info(name, helper.np_dtype_to_tensor_dtype(np.asarray(inits[name]).dtype),
                                                   list(np.asarray(inits[name]).shape)) for name in overridable]
    graph = helper.make_graph(nodes, "qlinear", graph_inputs,
                              [helper.make_tensor_value_info(name, TensorProto.UINT8, shape) for name, shape in outputs.items()],
                              [numpy_helper.from_array(np.asarray(v), k) for k, v in inits.items()])
    opsets = [helper.make_opsetid("", 17)] + ([helper.make_opsetid("com.microsoft", 1)] if join != "concat" else [])
    return helper.make_model(graph, opset_imports=opsets)


def fuse_by_hand(tmp_path, model: onnx.ModelProto):
    source, output = tmp_path / "q.onnx", tmp_path / "q.fused.onnx"
    onnx.save(model, source)
    result = gconv_rewrite.fuse(source, output=output)
    return source, output, result


@pytest.mark.parametrize("join", ["concat", "qlinearconcat"])
@pytest.mark.parametrize("reader", ["split", "slice"])
def test_hand_built_qlinearconv_branches_fuse_exactly(tmp_path, join, reader):
    source, output, result = fuse_by_hand(tmp_path, qlinear_model(join=join, reader=reader, output_is_join=False))
    assert [(r.kind, r.groups) for r in result.report.rewrites] == [("fuse-qlinear-conv", 4)]
    assert result.report.verification.passed
    fused = onnx.load(output)
    assert op_counts(fused) == {"QLinearConv": 1, "MaxPool": 1}
    conv, values = the_qlinear_conv(fused), initializers(fused)
    assert group_of(conv) == 4 and conv.input[0] == "x"
    assert conv.output[0] == "joined"  # the boundary tensor keeps its name in both models
    np.testing.assert_allclose(values[conv.input[4]], np.repeat([0.004, 0.006, 0.008, 0.010], OUT), rtol=1e-6)
    # Zero points follow the scales, one per output channel (here all 0, int8 weights being symmetric).
    np.testing.assert_array_equal(values[conv.input[5]], np.zeros(16, np.int8))
    assert values[conv.input[6]] == np.float32(0.25)  # the join's scale
    assert sorted(values) == sorted(conv.input[1:])  # nothing dead is left behind
    assert_identical_outputs(source, output, uint8_feeds)


def test_uint8_weights_with_different_zero_points_stack_per_channel(tmp_path):
    model = qlinear_model(weight_type=np.uint8, weight_zero_points=[128, 120, 131, 125])
    source, output, result = fuse_by_hand(tmp_path, model)
    assert [r.groups for r in result.report.rewrites] == [4]
    conv, values = the_qlinear_conv(onnx.load(output)), initializers(onnx.load(output))
    assert values[conv.input[3]].dtype == np.uint8
    np.testing.assert_array_equal(values[conv.input[5]], np.repeat([128, 120, 131, 125], OUT).astype(np.uint8))
    assert_identical_outputs(source, output, uint8_feeds)


def test_a_branch_without_bias_gets_zeros_and_inner_groups_multiply(tmp_path):
    source, output, result = fuse_by_hand(tmp_path, qlinear_model(no_bias_branch=2, inner_group=2))
    assert [r.groups for r in result.report.rewrites] == [8]
    conv, values = the_qlinear_conv(onnx.load(output)), initializers(onnx.load(output))
    assert group_of(conv) == 8
    np.testing.assert_array_equal(values[conv.input[8]][2 * OUT:3 * OUT], np.zeros(OUT, np.int32))
    assert_identical_outputs(source, output, uint8_feeds)


def test_depthwise_branches_of_one_channel_fuse_exactly(tmp_path):
    """onnxruntime runs a depthwise QLinearConv with its own kernel: still integer-exact."""
    source, output, result = fuse_by_hand(tmp_path, qlinear_model(widths=[1] * 8, out=1))
    assert [(r.groups, r.channels) for r in result.report.rewrites] == [(8, {"in": 8, "out": 8})]
    assert group_of(the_qlinear_conv(onnx.load(output))) == 8
    assert_identical_outputs(source, output, uint8_feeds)


def test_one_overridable_x_scale_read_by_every_branch_stays_overridable(tmp_path):
    """Never baked in: the fused conv reads the same graph input, so overriding it still counts."""
    source, output, result = fuse_by_hand(tmp_path, qlinear_model(shared_x_scale_input=True))
    assert [r.groups for r in result.report.rewrites] == [4]
    fused = onnx.load(output)
    assert the_qlinear_conv(fused).input[1] == "xs" and "xs" in [i.name for i in fused.graph.input]
    for x_scale in (0.02, 0.05):
        feeds = {**uint8_feeds(np.random.default_rng(3)), "xs": np.array(x_scale, np.float32)}
        np.testing.assert_array_equal(run(output, feeds)[0], run(source, feeds)[0])


# -- near misses -------------------------------------------------------------------------------------


def refusal(tmp_path, model: onnx.ModelProto) -> list[str]:
    source = tmp_path / "q.onnx"
    onnx.save(model, source)
    report = gconv_rewrite.check(source)
    assert report.rewrites == []
    result = gconv_rewrite.fuse(source, output=tmp_path / "q.out.onnx")
    assert result.report.rewrites == []
    assert op_counts(onnx.load(tmp_path / "q.out.onnx")) == op_counts(model)  # left as it was
    return [s.reason for s in report.skipped]


def test_different_branch_output_scales_under_a_concat_are_refused(tmp_path):
    assert refusal(tmp_path, qlinear_model(y_scales=[0.25, 0.25, 0.3, 0.25])) == [
        "y_scale of conv2 is 0.3 but y_scale of conv0 is 0.25: one QLinearConv has one output quantization"]


def test_a_qlinearconcat_that_requantizes_is_refused(tmp_path):
    assert refusal(tmp_path, qlinear_model(join="qlinearconcat", join_scale=0.5)) == [
        "the QLinearConcat's scale for input 0 is 0.25 but the QLinearConcat's output scale is 0.5: "
        "the QLinearConcat requantizes, so one QLinearConv would not compute the same integers"]


def test_an_overridable_weight_scale_is_never_stacked(tmp_path):
    assert refusal(tmp_path, qlinear_model(overridable=("ws1",))) == [
        "conv1 reads its weight scale from graph input ws1 (replaceable at run time)"]


def test_overridable_output_scales_of_each_branch_are_refused_by_name(tmp_path):
    assert refusal(tmp_path, qlinear_model(overridable=("ys0",))) == [
        "y_scale of conv0 is graph input ys0 (replaceable at run time), not read by every branch alike"]


def test_overridable_slice_bounds_are_refused_by_name(tmp_path):
    assert refusal(tmp_path, qlinear_model(reader="slice", overridable=("end1",))) == [
        "Slice slice1 reads its bounds from graph input end1 (replaceable at run time)"]


def test_an_uneven_split_is_refused_with_the_planner_reason(tmp_path):
    assert refusal(tmp_path, qlinear_model(widths=[2, 2, 2, 4])) == ["uneven split: 2,2,2,4 channels"]


def test_a_target_that_runs_no_grouped_conv_keeps_the_branches_and_says_why(tmp_path):
    source, output = tmp_path / "q.onnx", tmp_path / "q.mnn.onnx"
    onnx.save(qlinear_model(), source)
    result = gconv_rewrite.fuse(source, output=output, target="mnn")
    assert result.report.rewrites == []
    [skip] = result.report.skipped
    assert skip.reason.startswith("split for mnn: MNN runs only depthwise and group=1 convolutions")
    assert [(n["location"], n["action"]) for n in result.report.target["nodes"]] == [("concat", "keep")]
    assert op_counts(onnx.load(output)) == op_counts(onnx.load(source))
    fused = gconv_rewrite.fuse(source, output=tmp_path / "q.ort.onnx", target="onnxruntime-cpu").report
    assert [(n["location"], n["action"]) for n in fused.target["nodes"]] == [("conv0_group4", "fuse")]
    assert [r.kind for r in fused.rewrites] == ["fuse-qlinear-conv"]
