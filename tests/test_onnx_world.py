"""ONNX files from the world (issue #21, items 5, 6, 7, 10, 11, 12, 14, 15, 16): each idiom rebuilt
as a small model in code, with the structure and the numbers (onnxruntime, original vs rewritten)
checked."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

import gconv_rewrite
from gconv_rewrite.report import format_summary
from samples.models import GraphBuilder, grouped_block
from tests.conftest import as_constant_nodes, assert_same_outputs, attribute, nodes, op_counts


def expand_file(tmp_path: Path, model: onnx.ModelProto, name: str = "model"):
    """Save, expand (verified by the tool), check the written file and compare it ourselves."""
    original, written = tmp_path / f"{name}.onnx", tmp_path / f"{name}.expanded.onnx"
    onnx.save(model, str(original))
    result = gconv_rewrite.expand(original, output=written)
    expanded = onnx.load(str(written))
    onnx.checker.check_model(expanded, full_check=True)
    assert_same_outputs(original, written)
    return result.report, expanded


def fuse_file(tmp_path: Path, path_or_model, name: str = "model"):
    if isinstance(path_or_model, onnx.ModelProto):
        original = tmp_path / f"{name}.onnx"
        onnx.save(path_or_model, str(original))
    else:
        original = path_or_model
    written = original.with_name(original.stem + ".fused.onnx")
    result = gconv_rewrite.fuse(original, output=written)
    fused = onnx.load(str(written))
    onnx.checker.check_model(fused, full_check=True)
    assert_same_outputs(original, written)
    return result.report, fused


def groups_of(model: onnx.ModelProto) -> list[int]:
    return [attribute(n, "group", 1) for n in nodes(model, "Conv")]


# -- 5: ConvNeXt: a Split of a residual Add's output, where a layer scale is the Mul's first input --


def convnext_blocks(channels: int = 8, blocks: int = 2) -> onnx.ModelProto:
    """stem → (depthwise 3x3 → 1x1 → Mul(gamma[C,1,1], y) → Add(·, block input)) × blocks: no
    value records a shape, as in torchvision's export."""
    b = GraphBuilder(17)
    x = b.conv("x", b.weight((channels, 3, 1, 1), 3), None, name="stem", kernel_shape=[1, 1])
    for i in range(blocks):
        y = b.conv(x, b.weight((channels, 1, 3, 3), 9), np.full(channels, 0.1, np.float32), group=channels,
                   name=f"dw{i}", kernel_shape=[3, 3], pads=[1] * 4)
        y = b.conv(y, b.weight((channels, channels, 1, 1), channels), None, name=f"pw{i}", kernel_shape=[1, 1])
        y = b.node("Mul", [b.const("gamma", np.full((channels, 1, 1), 0.5, np.float32)), y])[0]
        x = b.node("Add", [y, x])[0]
    b.nodes.append(helper.make_node("Identity", [x], ["y"], name="out"))
    return b.model([("x", [1, 3, 6, 6])], [("y", [1, channels, 6, 6])])


def test_convnext_expand_then_fuse_comes_back(tmp_path):
    model = convnext_blocks()
    report, expanded = expand_file(tmp_path, model, "convnext")
    assert [r.groups for r in report.rewrites] == [8, 8]
    assert op_counts(expanded)["Split"] == 2
    onnx.save(expanded, str(tmp_path / "round.onnx"))
    report, fused = fuse_file(tmp_path, tmp_path / "round.onnx")
    assert report.skipped == [], [s.reason for s in report.skipped]
    assert [r.groups for r in report.rewrites] == [8, 8]
    assert op_counts(fused) == op_counts(model)
    assert groups_of(fused) == groups_of(model) == [1, 8, 1, 8, 1]
    assert_same_outputs(tmp_path / "convnext.onnx", tmp_path / "round.fused.onnx")


# -- 6: wrong reasons ---------------------------------------------------------------------------


def test_inception_7b_names_the_kernels_and_the_inputs(fusion):
    """Mixed_7b: a 1x1 of the block input beside a 1x3 and a 3x1 of another tensor."""
    b = GraphBuilder(17)
    shared = b.node("Relu", [b.conv("x", b.weight((4, 8, 1, 1), 8), None, name="b3_1", kernel_shape=[1, 1])])[0]
    ends = [b.node("Relu", [b.conv("x", b.weight((4, 8, 1, 1), 8), None, name="b1", kernel_shape=[1, 1])])[0],
            b.node("Relu", [b.conv(shared, b.weight((4, 4, 1, 3), 12), None, name="b3_2a", kernel_shape=[1, 3],
                                   pads=[0, 1, 0, 1])])[0],
            b.node("Relu", [b.conv(shared, b.weight((4, 4, 3, 1), 12), None, name="b3_2b", kernel_shape=[3, 1],
                                   pads=[1, 0, 1, 0])])[0]]
    b.node("Concat", ends, name="mixed", axis=1)
    model = b.model([("x", [1, 8, 5, 5])], [("mixed_out", [1, 12, 5, 5])])
    outcome = fusion.untouched(model, "different kernel shapes between branches: (8,1,1) vs (4,1,3) vs (4,3,1)",
                               "the branches read different tensors (x, ")
    assert "used outside" not in outcome.report.skipped[0].reason


def standardised_weight(b: GraphBuilder, shape: tuple[int, ...], form: str) -> str:
    """A weight computed at run time from an initializer, as NF-Nets' ScaledStdConv2d exports it:
    "reduce" (ReduceMean, Sub, Mul, Add, Sqrt, Div, Mul by a gain) or "batchnorm" (a
    BatchNormalization in training mode over the reshaped weight, reshaped back; "batchnorm-1"
    reshapes back with a -1, so the weight's shape is recorded nowhere)."""
    weight = b.const("W", b.weight(shape, int(np.prod(shape[1:]))))
    if form == "reduce":
        axes = b.const("axes", np.array([1, 2, 3], np.int64))
        centred = b.node("Sub", [weight, b.node("ReduceMean", [weight, axes], keepdims=1)[0]])[0]
        variance = b.node("ReduceMean", [b.node("Mul", [centred, centred])[0], axes], keepdims=1)[0]
        std = b.node("Sqrt", [b.node("Add", [variance, b.const("eps", np.array(1e-5, np.float32))])[0]])[0]
        gain = b.const("gain", np.full((shape[0], 1, 1, 1), 0.7, np.float32))
        return b.node("Mul", [b.node("Div", [centred, std])[0], gain])[0]
    out = shape[0]
    flat = b.node("Reshape", [weight, b.const("flat", np.array([1, out, -1], np.int64))])[0]
    zeros = b.node("ConstantOfShape", [b.const("n", np.array([out], np.int64))],
                   value=helper.make_tensor("zero", TensorProto.FLOAT, [1], [0.0]))[0]
    scaled = b.node("BatchNormalization", [flat, b.const("gain", np.full(out, 1.5, np.float32)), zeros, zeros,
                                           b.const("ones", np.ones(out, np.float32))], outputs=3, training_mode=1)[0]
    back = list(shape) if form == "batchnorm" else [shape[0], -1, *shape[2:]]
    return b.node("Reshape", [scaled, b.const("shape", np.array(back, np.int64))])[0]


def nf_chunk_model(form: str) -> onnx.ModelProto:
    """stem (standardised weight) → torch.chunk(2) with Shape-computed Slice bounds → two
    standardised 3x3 convs → Concat: fully static, yet no value records a shape."""
    b = GraphBuilder(18)
    x = b.node("Conv", ["x", standardised_weight(b, (8, 4, 1, 1), form)], name="stem", kernel_shape=[1, 1])[0]
    channels = b.node("Gather", [b.node("Shape", [x])[0], b.const("one", np.array(1, np.int64))], axis=0)[0]
    half = b.node("Unsqueeze", [b.node("Div", [channels, b.const("two", np.array(2, np.int64))])[0],
                                b.const("axis0", np.array([0], np.int64))])[0]
    axis = b.const("axis", np.array([1], np.int64))
    parts = [b.node("Slice", [x, b.const("zero", np.array([0], np.int64)), half, axis])[0],
             b.node("Slice", [x, half, b.node("Mul", [half, b.const("two", np.array([2], np.int64))])[0], axis])[0]]
    ends = [b.node("Conv", [p, standardised_weight(b, (4, 4, 3, 3), form)], name=f"conv{i}", kernel_shape=[3, 3],
                   pads=[1] * 4)[0] for i, p in enumerate(parts)]
    b.node("Concat", ends, name="cat", axis=1)
    return b.model([("x", [1, 4, 6, 6])], [("cat_out", [1, 8, 6, 6])])


def test_nf_weight_standardisation_folds_and_fuses(fusion):
    model = nf_chunk_model("reduce")
    outcome = fusion.run(model)
    assert [r.groups for r in outcome.report.rewrites] == [2] and outcome.report.skipped == []
    assert "Slice" not in outcome.after and "Concat" not in outcome.after
    assert groups_of(outcome.fused) == [1, 2]
    # The branches' standardisation is folded into the fused weight; the stem's stays as written.
    assert outcome.before["ReduceMean"] == 6 and outcome.after["ReduceMean"] == 2


def test_nf_batchnorm_standardisation_names_the_real_cause(fusion):
    outcome = fusion.untouched(nf_chunk_model("batchnorm"), "weights of conv0 are computed at run time",
                               "BatchNormalization in training mode")
    assert "Slice" not in outcome.report.skipped[0].reason


# -- 7: unnamed nodes ----------------------------------------------------------------------------


def test_unnamed_nodes_are_counted_and_listed(tmp_path):
    model = grouped_block("split", groups=4)
    for node in model.graph.node:
        node.name = ""
    report, fused = fuse_file(tmp_path, model, "unnamed")
    (rewrite,) = report.rewrites
    assert groups_of(fused) == [4]
    assert len(rewrite.nodes) == 6  # Split, 4 Conv, Concat
    assert sorted({n.split(":")[0] for n in rewrite.nodes}) == ["Concat", "Conv", "Split"]
    assert all(":" in n for n in rewrite.nodes)
    assert "6 nodes -> group=4" in format_summary(report)


# -- 10: IR 3: every initializer is listed as a graph input, and is a constant -------------------


def ir3(model: onnx.ModelProto) -> onnx.ModelProto:
    model.ir_version = 3
    for init in model.graph.initializer:
        model.graph.input.append(helper.make_tensor_value_info(init.name, init.data_type, list(init.dims)))
    onnx.checker.check_model(model)
    return model


@pytest.mark.parametrize("mode", ["expand", "fuse"])
def test_ir3_initializers_listed_as_inputs_are_constants(tmp_path, mode):
    model = ir3(grouped_block("native" if mode == "expand" else "split", groups=4, opset=7))
    report, written = (expand_file if mode == "expand" else fuse_file)(tmp_path, model, f"ir3_{mode}")
    assert [r.groups for r in report.rewrites] == [4] and report.skipped == []
    assert groups_of(written) == ([1] * 4 if mode == "expand" else [4])
    assert written.ir_version == 3
    # As IR 3 requires: every initializer still listed as an input, and no input left without one.
    initializers = {i.name for i in written.graph.initializer}
    inputs = [i.name for i in written.graph.input]
    assert inputs[0] == "x" and set(inputs[1:]) == initializers


def test_ir4_initializer_that_is_an_input_stays_replaceable(tmp_path):
    model = ir3(grouped_block("native", groups=4, opset=7))
    model.ir_version = 4
    original, written = tmp_path / "ir4.onnx", tmp_path / "ir4.expanded.onnx"
    onnx.save(model, str(original))
    report = gconv_rewrite.expand(original, output=written).report
    assert report.rewrites == []
    assert "replaceable at run time" in report.skipped[0].reason
    assert op_counts(onnx.load(str(written))) == op_counts(model)


# -- 11: weights built by ConstantOfShape (Caffe2) ------------------------------------------------


def test_constant_of_shape_weights_expand(tmp_path):
    b = GraphBuilder(11)
    fill = lambda shape, value: b.node("ConstantOfShape", [b.const("shape", np.array(shape, np.int64))],
                                       value=helper.make_tensor("v", TensorProto.FLOAT, [1], [value]))[0]
    y = b.node("Conv", ["x", fill([8, 2, 3, 3], 0.2), fill([8], 0.1)], name="g1", group=4, kernel_shape=[3, 3],
               pads=[1] * 4)[0]
    y = b.node("Relu", [y])[0]
    y = b.conv(y, b.weight((8, 4, 1, 1), 4), None, group=2, name="g2", kernel_shape=[1, 1])
    b.nodes.append(helper.make_node("Identity", [y], ["y"], name="out"))
    model = b.model([("x", [1, 8, 5, 5])], [("y", [1, 8, 5, 5])])
    report, expanded = expand_file(tmp_path, model, "caffe2")
    assert [(r.location, r.groups) for r in report.rewrites] == [("g1", 4), ("g2", 2)] and report.skipped == []
    assert groups_of(expanded) == [1] * 6 and "ConstantOfShape" not in op_counts(expanded)
    weights = {i.name: numpy_helper.to_array(i) for i in expanded.graph.initializer}
    assert all(np.all(weights[n.input[1]] == np.float32(0.2)) for n in nodes(expanded, "Conv")[:4])


# -- 12: SqueezeNet's fire module: different kernels before "not constants" -----------------------


@pytest.mark.parametrize("form", ["batchnorm", "batchnorm-1"])
def test_squeezenet_fire_names_the_kernels(fusion, form):
    """squeeze 1x1 → (expand 1x1, expand 3x3) → Concat, the expand weights computed at run time
    (their shape recorded, or, with a -1 reshape, only in the kernel_shape attribute)."""
    b = GraphBuilder(17)
    squeezed = b.node("Relu", [b.conv("x", b.weight((4, 8, 1, 1), 8), None, name="squeeze", kernel_shape=[1, 1])])[0]
    ends = [b.node("Relu", [b.node("Conv", [squeezed, standardised_weight(b, (8, 4, k, k), form)], name=f"expand{k}",
                                   kernel_shape=[k, k], pads=[k // 2] * 4)[0]])[0] for k in (1, 3)]
    b.node("Concat", ends, name="fire", axis=1)
    model = b.model([("x", [1, 8, 5, 5])], [("fire_out", [1, 16, 5, 5])])
    outcome = fusion.untouched(model, "different kernel shapes between branches")
    assert "not constants" not in outcome.report.skipped[0].reason


# -- 14: parallel branches that would only become a wide conv -------------------------------------


def rfb_model() -> onnx.ModelProto:
    """An RFB block of a native face detector: three 1x1 convs of widths 16, 16, 12 on one input,
    each followed by its own dilated 3x3."""
    b = GraphBuilder(17)
    ends = []
    for i, width in enumerate([16, 16, 12]):
        y = b.node("Relu", [b.conv("x", b.weight((width, 8, 1, 1), 8), None, name=f"rfb{i}", kernel_shape=[1, 1])])[0]
        ends.append(b.node("Relu", [b.conv(y, b.weight((width, width, 3, 3), 9 * width), None, name=f"rfb{i}_3x3",
                                           kernel_shape=[3, 3], pads=[i + 1] * 4, dilations=[i + 1] * 2)])[0])
    b.node("Concat", ends, name="rfb", axis=1)
    return b.model([("x", [1, 8, 9, 9])], [("rfb_out", [1, 44, 9, 9])])


def test_branches_of_different_widths_are_no_finding(tmp_path):
    model = rfb_model()
    path = tmp_path / "rfb.onnx"
    onnx.save(model, str(path))
    checked = gconv_rewrite.check(path)
    assert checked.rewrites == [] and checked.skipped == []
    report, fused = fuse_file(tmp_path, path)
    assert report.rewrites == [] and report.skipped == []
    assert op_counts(fused) == op_counts(model)


# -- 15: grouped convs inside local functions, group taken from the call site ----------------------


def test_group_from_the_call_site_is_reported(tmp_path):
    """The dynamo exporter's ``_aten_convolution_onnx``: ``group=@groups``, weight a function input."""
    conv = helper.make_node("Conv", ["x", "w"], ["y"], pads=[1] * 4)
    reference = onnx.AttributeProto(name="group", ref_attr_name="groups", type=onnx.AttributeProto.INT)
    conv.attribute.append(reference)
    function = helper.make_function("pkg.torch", "_aten_convolution_onnx", ["x", "w"], ["y"], [conv],
                                    [helper.make_opsetid("", 18)], attributes=["groups"])
    weight = numpy_helper.from_array(np.random.default_rng(0).standard_normal((8, 2, 3, 3)).astype(np.float32), "W")
    call = helper.make_node("_aten_convolution_onnx", ["x", "W"], ["y"], domain="pkg.torch", groups=4)
    graph = helper.make_graph([call], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 8, 5, 5])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 8, 5, 5])], [weight])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18), helper.make_opsetid("pkg.torch", 1)],
                              functions=[function])
    model.ir_version = 10
    report, expanded = expand_file(tmp_path, model, "dynamo")
    assert report.rewrites == []
    (skip,) = report.skipped
    assert skip.graph == "function _aten_convolution_onnx"
    assert "group is the attribute 'groups'" in skip.reason and "1 call site" in skip.reason
    assert op_counts(expanded) == op_counts(model)


# -- 16: parameters held in Constant nodes ---------------------------------------------------------


def test_constant_node_parameters_are_counted(tmp_path):
    model = as_constant_nodes(grouped_block("native", groups=4))  # weight 16x4x3x3 and bias 16
    report, expanded = expand_file(tmp_path, model, "constants")
    assert [r.groups for r in report.rewrites] == [4]
    assert report.before.parameters == report.after.parameters == 16 * 4 * 9 + 16
    assert groups_of(expanded) == [1] * 4


def test_two_groups_reading_one_split_both_fuse(tmp_path):
    """SK-ResNeXt as the dynamo exporter writes it: one Split feeds two hand-made groups (3×3 and a
    dilated 3×3 path), each joined by its own Concat. Both fuse; the Split goes once neither reads it."""
    b = GraphBuilder(opset=18, seed=9)
    parts = b.split("x", 16, 4)
    paths = []
    for dilation in (1, 2):
        outs = [b.conv(p, b.weight((4, 4, 3, 3), 36), None, kernel_shape=[3, 3], pads=[dilation] * 4,
                       dilations=[dilation] * 2) for p in parts]
        paths.append(b.node("Concat", outs, axis=1)[0])
    b.nodes.append(helper.make_node("Add", paths, ["y"], name="sum"))
    path = tmp_path / "sk.onnx"
    onnx.save(b.model([("x", ["N", 16, 8, 8])], [("y", ["N", 16, 8, 8])]), path)
    report = gconv_rewrite.fuse(path, output=tmp_path / "out.onnx").report
    assert [r.groups for r in report.rewrites] == [4, 4] and report.skipped == []
    fused = onnx.load(str(tmp_path / "out.onnx"))
    ops = [n.op_type for n in fused.graph.node]
    assert ops.count("Conv") == 2 and "Split" not in ops and "Concat" not in ops
    assert report.verification.passed and all(e["passed"] for r in report.rewrites for e in r.boundary)
    assert_same_outputs(path, tmp_path / "out.onnx", shapes={"x": [2, 16, 8, 8]})


def test_a_weight_standardised_by_an_inference_batchnorm_is_folded(tmp_path):
    """NF-RegNet as the dynamo exporter writes ScaledStdConv2d: the grouped conv's weight is
    Reshape(BatchNormalization(Reshape(W), gain, 0, mean, var)) over initializers, inference mode.
    It folds, so the grouped conv expands (it was "weights are not constants")."""
    b = GraphBuilder(opset=18, seed=3)
    w = b.weight((8, 2, 3, 3), 18)
    flat = b.node("Reshape", [b.const("W", w), b.const("flat", np.array([1, 8, 18], np.int64))])[0]
    mean, var = w.reshape(8, -1).mean(1), w.reshape(8, -1).var(1)
    standard = b.node("BatchNormalization", [flat, b.const("gain", np.full(8, 0.5, np.float32)),
                                             b.const("zero", np.zeros(8, np.float32)), b.const("mean", mean),
                                             b.const("var", var)], epsilon=1e-5)[0]
    weight = b.node("Reshape", [standard, b.const("shape", np.array([8, 2, 3, 3], np.int64))])[0]
    b.nodes.append(helper.make_node("Conv", ["x", weight], ["y"], name="conv", group=4, kernel_shape=[3, 3],
                                    pads=[1, 1, 1, 1]))
    path = tmp_path / "nf.onnx"
    onnx.save(b.model([("x", [1, 8, 6, 6])], [("y", [1, 8, 6, 6])]), path)
    report = gconv_rewrite.expand(path, output=tmp_path / "out.onnx").report
    assert [r.groups for r in report.rewrites] == [4] and report.verification.passed
    assert op_counts(onnx.load(str(tmp_path / "out.onnx")))["Conv"] == 4
    assert_same_outputs(path, tmp_path / "out.onnx")
