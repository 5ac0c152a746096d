"""One constant resolver for every ONNX pass: what the PyTorch legacy exporter writes (deduplicated
initializers fed through ``Identity``), small constant expressions over weights, and near-miss
reasons that name the structural cause before the value one."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from onnx import TensorProto, helper, numpy_helper

import gconv_rewrite
from gconv_rewrite.passes.onnx import _graph as g
from samples.models import GraphBuilder
from tests.conftest import assert_same_outputs, attribute, nodes, op_counts


def identity(b: GraphBuilder, name: str) -> str:
    """A shared constant as the legacy exporter feeds it: through an Identity node."""
    return b.node("Identity", [name])[0]


def chunk_model(*, bn_per_branch: bool = True, shared_via_identity: bool = True, groups: int = 4,
                width: int = 4, kernels=None) -> onnx.ModelProto:
    """x → Split → (Conv with an Identity-fed zero bias → BN with Identity-fed parameters) per
    branch → Concat: the legacy ``torch.chunk`` form with per-branch BatchNorm."""
    b = GraphBuilder(17)
    channels = groups * width
    parts = b.split("x", channels, groups)
    zero_bias = b.const("zero_bias", np.zeros(width, np.float32))
    ones = b.const("ones", np.ones(width, np.float32))
    outs = []
    for i, part in enumerate(parts):
        k = (kernels or [3] * groups)[i]
        bias = identity(b, zero_bias) if shared_via_identity else b.const("B", np.zeros(width, np.float32))
        weight = b.const("W", b.weight((width, width, k, k), width * k * k))
        y = b.node("Conv", [part, weight, bias], name=f"conv{i}", kernel_shape=[k, k], pads=[k // 2] * 4)[0]
        if bn_per_branch:
            scale = identity(b, ones)
            shift = b.const("beta", b.rng.standard_normal(width).astype(np.float32))
            mean = b.const("mean", b.rng.standard_normal(width).astype(np.float32))
            var = identity(b, ones)
            y = b.node("BatchNormalization", [y, scale, shift, mean, var], epsilon=1e-5)[0]
        outs.append(y)
    b.node("Concat", outs, name="cat", axis=1)
    return b.model([("x", [1, channels, 6, 6])], [("cat_out", [1, channels, 6, 6])])


def test_const_array_follows_identity_chains_and_small_expressions():
    b = GraphBuilder(17)
    base = b.const("w", np.arange(6, dtype=np.float16).reshape(2, 3))
    chained = identity(b, identity(b, base))
    cast = b.node("Cast", [chained], to=TensorProto.FLOAT)[0]
    shape = b.const("shape", np.array([3, 2], np.int64))
    reshaped = b.node("Reshape", [cast, shape])[0]
    unsqueezed = b.node("Unsqueeze", [reshaped, b.const("axes", np.array([0], np.int64))])[0]
    b.node("Add", ["x", unsqueezed], name="use")
    model = ir.serde.deserialize_model(b.model([("x", [1, 3, 2])], [("use", None)]))
    values = {v.name: v for node in model.graph for v in node.outputs}
    np.testing.assert_array_equal(g.const_array(values[chained]), np.arange(6, dtype=np.float16).reshape(2, 3))
    folded = g.const_array(values[unsqueezed])
    assert folded.dtype == np.float32 and folded.shape == (1, 3, 2)
    np.testing.assert_array_equal(folded[0], np.arange(6, dtype=np.float32).reshape(3, 2))
    assert g.const_shape(values[chained]) == (2, 3)
    # A value computed from the graph input is no constant, however close to one.
    assert g.const_array(values["use_out"] if "use_out" in values else model.graph.outputs[0]) is None
    assert not g.is_replaceable(values[unsqueezed])


def test_expand_splits_identity_fed_weights_and_bias_and_keeps_the_shared_one(tmp_path):
    """The legacy exporter's deduplicated zero bias, read by two grouped convs through Identity:
    both expand; the shared initializer survives exactly as long as something reads it."""
    b = GraphBuilder(17)
    zero = b.const("zero_bias", np.zeros(8, np.float32))
    w1 = identity(b, b.const("W", b.weight((8, 2, 3, 3), 18)))
    y = b.node("Conv", ["x", w1, identity(b, zero)], name="conv_a", group=4, kernel_shape=[3, 3], pads=[1] * 4)[0]
    y = b.node("Relu", [y])[0]
    b.node("Conv", [y, b.const("W", b.weight((8, 2, 3, 3), 18)), identity(b, zero)], name="conv_b", group=4,
           kernel_shape=[3, 3], pads=[1] * 4)
    # A third reader of the shared zero bias that is not expanded (group 1).
    b.node("Conv", ["x", b.const("W", b.weight((8, 8, 1, 1), 8)), identity(b, zero)], name="plain",
           kernel_shape=[1, 1])
    model = b.model([("x", [1, 8, 5, 5])], [("conv_b_out", [1, 8, 5, 5]), ("plain_out", [1, 8, 5, 5])])
    source, output = tmp_path / "m.onnx", tmp_path / "m.expanded.onnx"
    onnx.save(model, source)
    result = gconv_rewrite.expand(source, output=output)
    assert [r.location for r in result.report.rewrites] == ["conv_a", "conv_b"]
    assert result.report.skipped == []
    expanded = onnx.load(output)
    assert op_counts(expanded)["Conv"] == 4 + 4 + 1
    assert all(attribute(n, "group", 1) == 1 for n in nodes(expanded, "Conv"))
    # The plain conv still reads the shared zero bias (through its Identity); nothing else does.
    assert "zero_bias_1" in {i.name for i in expanded.graph.initializer}
    assert op_counts(expanded).get("Identity") == 1
    assert result.report.verification.passed
    assert_same_outputs(source, output)


def test_legacy_chunk_with_bn_per_branch_fuses_through_identity(tmp_path):
    model = chunk_model()
    source, output = tmp_path / "m.onnx", tmp_path / "m.fused.onnx"
    onnx.save(model, source)
    result = gconv_rewrite.fuse(source, output=output, fold_bn=False)
    assert [(r.kind, r.groups) for r in result.report.rewrites] == [("fuse-split-conv", 4)]
    assert result.report.skipped == []
    fused = onnx.load(output)
    assert op_counts(fused) == {"Conv": 1, "BatchNormalization": 1}
    assert attribute(nodes(fused, "Conv")[0], "group") == 4
    assert_same_outputs(source, output)


def test_check_reports_the_identity_form_as_a_candidate(tmp_path):
    source = tmp_path / "m.onnx"
    onnx.save(chunk_model(bn_per_branch=False), source)
    report = gconv_rewrite.check(source)
    assert [r.groups for r in report.rewrites] == [4]


def test_reasons_name_the_structural_cause_before_the_value_one(tmp_path):
    """Kernels differ *and* one bias is computed at run time: the reason is the kernels."""
    model = chunk_model(bn_per_branch=False, kernels=[3, 3, 1, 3])
    # Make branch 0's bias a run-time value: an input.
    conv0 = next(n for n in model.graph.node if n.name == "conv0")
    conv0.input[2] = "b_in"
    model.graph.input.append(helper.make_tensor_value_info("b_in", TensorProto.FLOAT, [4]))
    source = tmp_path / "m.onnx"
    onnx.save(model, source)
    report = gconv_rewrite.check(source)
    assert report.rewrites == []
    assert [s.reason for s in report.skipped] == [
        "different kernel shapes between branches: (4,3,3) vs (4,1,1)"]


def test_identity_of_a_graph_input_initializer_is_replaceable(tmp_path):
    """An initializer that is also a graph input can be replaced at run time, also behind Identity."""
    model = chunk_model(bn_per_branch=False, shared_via_identity=True)
    shared = next(i.name for i in model.graph.initializer if i.name.startswith("zero_bias"))
    model.graph.input.append(helper.make_tensor_value_info(shared, TensorProto.FLOAT, [4]))
    model.ir_version = 8
    source = tmp_path / "m.onnx"
    onnx.save(model, source)
    report = gconv_rewrite.check(source)
    assert report.rewrites == []
    assert report.skipped[0].reason == "bias of conv0 is not a constant"


@pytest.mark.parametrize("fold_bn", [True, False])
def test_batchnorm_after_the_fused_concat_is_folded(tmp_path, fold_bn):
    """Legacy export: chunk → Conv_i → cat → BatchNormalization. Fused and folded, it is what the
    native export is: one grouped Conv, the BN gone into its weights and bias."""
    b = GraphBuilder(17)
    parts = b.split("x", 16, 4)
    zero = b.const("zero_bias", np.zeros(4, np.float32))
    outs = [b.conv(p, b.weight((4, 4, 3, 3), 36), None, name=f"conv{i}", kernel_shape=[3, 3], pads=[1] * 4)
            for i, p in enumerate(parts)]
    for node, _ in zip(b.nodes[-4:], range(4)):
        node.input.append(identity(b, zero))
    cat = b.node("Concat", outs, name="cat", axis=1)[0]
    rng = b.rng
    params = [b.const(n, a.astype(np.float32)) for n, a in (
        ("gamma", rng.uniform(0.5, 2, 16)), ("beta", rng.standard_normal(16)),
        ("mean", rng.standard_normal(16)), ("var", rng.uniform(0.5, 2, 16)))]
    bn = b.node("BatchNormalization", [cat, *params], name="bn", epsilon=1e-3)[0]
    b.node("Relu", [bn], name="relu")
    model = b.model([("x", [1, 16, 6, 6])], [("relu_out", [1, 16, 6, 6])])
    source, output = tmp_path / "m.onnx", tmp_path / "m.fused.onnx"
    onnx.save(model, source)
    result = gconv_rewrite.fuse(source, output=output, fold_bn=fold_bn)
    fused = onnx.load(output)
    kinds = [r.kind for r in result.report.rewrites]
    if fold_bn:
        assert kinds == ["fuse-split-conv", "fold-batchnorm"]
        assert op_counts(fused) == {"Conv": 1, "Relu": 1}
        assert {i.name for i in fused.graph.initializer}.isdisjoint(params)
    else:
        assert kinds == ["fuse-split-conv"]
        assert op_counts(fused) == {"Conv": 1, "BatchNormalization": 1, "Relu": 1}
    assert attribute(nodes(fused, "Conv")[0], "group") == 4
    assert result.report.verification.passed
    assert_same_outputs(source, output)


def test_fold_keeps_a_batchnorm_whose_input_is_read_elsewhere(tmp_path):
    b = GraphBuilder(17)
    parts = b.split("x", 8, 2)
    outs = [b.conv(p, b.weight((4, 4, 1, 1), 4), np.zeros(4, np.float32), name=f"conv{i}", kernel_shape=[1, 1])
            for i, p in enumerate(parts)]
    cat = b.node("Concat", outs, name="cat", axis=1)[0]
    params = [b.const(n, np.full(8, v, np.float32)) for n, v in (("g", 2.0), ("b", 0.5), ("m", 0.1), ("v", 1.0))]
    b.node("BatchNormalization", [cat, *params], name="bn")
    model = b.model([("x", [1, 8, 4, 4])], [("bn_out", [1, 8, 4, 4]), ("cat_out", [1, 8, 4, 4])])
    source, output = tmp_path / "m.onnx", tmp_path / "m.fused.onnx"
    onnx.save(model, source)
    result = gconv_rewrite.fuse(source, output=output)
    assert [r.kind for r in result.report.rewrites] == ["fuse-split-conv"]
    assert op_counts(onnx.load(output)) == {"Conv": 1, "BatchNormalization": 1}
    assert_same_outputs(source, output)


def test_mul_and_add_of_per_channel_constants_fold_too(tmp_path):
    b = GraphBuilder(17)
    parts = b.split("x", 8, 2)
    outs = [b.conv(p, b.weight((4, 4, 3, 3), 36), None, name=f"conv{i}", kernel_shape=[3, 3], pads=[1] * 4)
            for i, p in enumerate(parts)]
    cat = b.node("Concat", outs, name="cat", axis=1)[0]
    scale = b.const("scale", b.rng.uniform(0.5, 2, (8, 1, 1)).astype(np.float32))
    shift = b.const("shift", b.rng.standard_normal((1, 8, 1, 1)).astype(np.float32))
    y = b.node("Mul", [cat, scale], name="mul")[0]
    b.node("Add", [shift, y], name="add")
    model = b.model([("x", [1, 8, 5, 5])], [("add_out", [1, 8, 5, 5])])
    source, output = tmp_path / "m.onnx", tmp_path / "m.fused.onnx"
    onnx.save(model, source)
    result = gconv_rewrite.fuse(source, output=output)
    assert [r.kind for r in result.report.rewrites] == ["fuse-split-conv", "fold-batchnorm", "fold-batchnorm"]
    fused = onnx.load(output)
    assert op_counts(fused) == {"Conv": 1}
    assert fused.graph.output[0].name == "add_out" and nodes(fused, "Conv")[0].output[0] == "add_out"
    assert_same_outputs(source, output)


def function_model() -> onnx.ModelProto:
    """A model whose grouped block lives in a local function (weights as Constant nodes, as
    functions cannot hold initializers), called twice from the main graph."""
    rng = np.random.default_rng(0)
    body = [helper.make_node("Split", ["x"], ["a", "b"], axis=1)]
    outs = []
    for i, part in enumerate(["a", "b"]):
        weight = numpy_helper.from_array(rng.standard_normal((4, 4, 3, 3)).astype(np.float32), f"w{i}")
        body.append(helper.make_node("Constant", [], [f"w{i}"], value=weight))
        body.append(helper.make_node("Conv", [part, f"w{i}"], [f"c{i}"], name=f"conv{i}", pads=[1] * 4))
        outs.append(f"c{i}")
    body.append(helper.make_node("Concat", outs, ["y"], name="cat", axis=1))
    function = helper.make_function("local", "GroupedBlock", ["x"], ["y"], body,
                                    [helper.make_opsetid("", 17)])
    calls = [helper.make_node("GroupedBlock", ["x"], ["h"], domain="local", name="call0"),
             helper.make_node("Relu", ["h"], ["r"]),
             helper.make_node("GroupedBlock", ["r"], ["out"], domain="local", name="call1")]
    graph = helper.make_graph(calls, "main", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 8, 6, 6])],
                              [helper.make_tensor_value_info("out", TensorProto.FLOAT, [1, 8, 6, 6])])
    model = helper.make_model(graph, functions=[function],
                              opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("local", 1)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model


def test_patterns_inside_local_functions_are_fused_and_verified(tmp_path):
    source, output = tmp_path / "f.onnx", tmp_path / "f.fused.onnx"
    onnx.save(function_model(), source)
    assert [(r.groups, r.graph) for r in gconv_rewrite.check(source).rewrites] == [(2, "function GroupedBlock")]
    result = gconv_rewrite.fuse(source, output=output)
    assert result.report.verification.passed
    fused = onnx.load(output)
    onnx.checker.check_model(fused, full_check=True)
    body = fused.functions[0].node
    assert [n.op_type for n in body] == ["Constant", "Conv"]
    assert attribute(body[1], "group") == 2
    assert_same_outputs(source, output)


@pytest.mark.parametrize("bounds", ["chunk", "from_the_end"])
def test_chunk_of_a_tensor_whose_channels_no_shape_records(tmp_path, bounds):
    """ShuffleNet's channel shuffle ends in a run-time Reshape: nothing records the channel count
    that torch.chunk's bounds (Shape → Gather(1) → Div) are computed from. The branch convs fix
    how many channels each slice holds; the bounds are folded with the count that tiles them."""
    b = GraphBuilder(17)
    shape = b.node("Shape", ["x"])[0]
    keep = b.node("Slice", [shape, b.const("s0", np.array([0], np.int64)), b.const("s1", np.array([1], np.int64))])[0]
    spatial = b.node("Slice", [shape, b.const("s2", np.array([2], np.int64)), b.const("s4", np.array([4], np.int64))])[0]
    target = b.node("Concat", [keep, b.const("minus1", np.array([-1], np.int64)), spatial], axis=0)[0]
    shuffled = b.node("Reshape", ["x", target], name="reshape")[0]
    channels = b.node("Gather", [b.node("Shape", [shuffled])[0], b.const("one", np.array(1, np.int64))], axis=0)[0]
    if bounds == "chunk":  # torch.chunk(x, 2): [0 : C/2], [C/2 : end]
        half = b.node("Div", [channels, b.const("two", np.array(2, np.int64))])[0]
        start = b.const("zero", np.array([0], np.int64))
    else:  # [C-8 : C-4], [C-4 : end]: every C >= 8 gives the convs their 4 channels
        half = b.node("Sub", [channels, b.const("four", np.array(4, np.int64))])[0]
        start = b.node("Unsqueeze", [b.node("Sub", [channels, b.const("eight", np.array(8, np.int64))])[0],
                                     b.const("axes0", np.array([0], np.int64))])[0]
    half = b.node("Unsqueeze", [half, b.const("axes", np.array([0], np.int64))])[0]
    end = b.const("end", np.array([2**62], np.int64))
    axis = b.const("axis", np.array([1], np.int64))
    parts = [b.node("Slice", [shuffled, start, half, axis])[0], b.node("Slice", [shuffled, half, end, axis])[0]]
    outs = [b.conv(p, b.weight((4, 4, 3, 3), 36), np.zeros(4, np.float32), name=f"conv{i}", kernel_shape=[3, 3],
                   pads=[1] * 4) for i, p in enumerate(parts)]
    b.node("Concat", outs, name="cat", axis=1)
    model = b.model([("x", [1, 8, 5, 5])], [("cat_out", [1, 8, 5, 5])])
    source, output = tmp_path / "m.onnx", tmp_path / "m.fused.onnx"
    onnx.save(model, source)
    result = gconv_rewrite.fuse(source, output=output)
    if bounds == "from_the_end":  # not provable: a 12-channel run would read channels 4:12 only
        assert result.report.rewrites == []
        assert [s.reason for s in result.report.skipped] == [
            "Slice_23 has starts or ends computed at run time, not provably constant"]
        return
    assert [r.groups for r in result.report.rewrites] == [2], [s.reason for s in result.report.skipped]
    assert op_counts(onnx.load(output)).get("Slice", 0) == 2  # the Shape slices of the Reshape stay
    assert result.report.verification.passed
    assert_same_outputs(source, output)
