"""onnx.expand-grouped-conv: Conv(group=N) → Split → N Conv → Concat, structure and numbers;
round trips through onnx.fuse-split-conv; property tests; a ResNeXt-50-shaped model."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from onnx import TensorProto, helper, numpy_helper

from gconv_rewrite.passes.onnx import ExpandGroupedConvPass, FuseSplitConvPass, expand_grouped_conv
from gconv_rewrite.passes.onnx.expand_grouped_conv import DEPTHWISE_KEPT
from samples.models import GraphBuilder, grouped_block, resnext50
from tests.helpers import feeds_for, group_of, op_counts
from tests.helpers import run_onnx as run

CONV_OPS = ("Conv", "ConvTranspose")


# -- helpers ---------------------------------------------------------------------------------


def apply(pass_, model: onnx.ModelProto) -> onnx.ModelProto:
    """Run an onnx-ir pass on a copy of ``model``; the input proto is never touched."""
    working = ir.serde.deserialize_model(model)
    pass_(working)
    return ir.serde.serialize_model(working)


def expand(model: onnx.ModelProto, **options) -> tuple[onnx.ModelProto, ExpandGroupedConvPass]:
    pass_ = ExpandGroupedConvPass(**options)
    return apply(pass_, model), pass_


def fuse(model: onnx.ModelProto) -> tuple[onnx.ModelProto, FuseSplitConvPass]:
    pass_ = FuseSplitConvPass()
    return apply(pass_, model), pass_


def conv_groups(model: onnx.ModelProto) -> list[tuple[str, int]]:
    """(op, group) of every convolution, in graph order."""
    return [(n.op_type, group_of(n)) for n in model.graph.node if n.op_type in CONV_OPS]


def structure(model: onnx.ModelProto):
    return op_counts(model), conv_groups(model)


def assert_same_numbers(original: onnx.ModelProto, rewritten: onnx.ModelProto, atol: float = 1e-4) -> None:
    onnx.checker.check_model(rewritten, full_check=True)
    feeds = feeds_for(original)
    expected, actual = run(original, feeds), run(rewritten, feeds)
    assert len(expected) == len(actual)
    for e, a in zip(expected, actual):
        assert e.shape == a.shape and e.dtype == a.dtype
        np.testing.assert_allclose(a, e, atol=atol, rtol=0)


def conv_model(op: str = "Conv", *, groups: int = 4, in_per_group: int = 2, out_per_group: int = 3,
               kernel=(3, 3), spatial=None, bias: bool = True, opset: int = 17, seed: int = 0,
               **attrs) -> onnx.ModelProto:
    """``x → Conv|ConvTranspose(group) → y``: the conv output is the graph output itself."""
    b = GraphBuilder(opset, seed)
    cin, cout = groups * in_per_group, groups * out_per_group
    shape = (cout, in_per_group, *kernel) if op == "Conv" else (cin, out_per_group, *kernel)
    weight = b.weight(shape, in_per_group * int(np.prod(kernel)))
    inputs = ["x", b.const("W", weight)]
    if bias:
        inputs.append(b.const("B", (b.rng.standard_normal(cout) * 0.1).astype(np.float32)))
    b.nodes.append(helper.make_node(op, inputs, ["y"], name="conv", group=groups, kernel_shape=list(kernel),
                                    **attrs))
    spatial = spatial or (6,) * len(kernel)
    return b.model([("x", [1, cin, *spatial])], [("y", [None] * (2 + len(kernel)))], name=f"{op}_model")


def chain_model(group_list, *, channels: int = 16, opset: int = 17) -> onnx.ModelProto:
    """Several grouped convs in a row, named ``conv{i}``, each with ``group_list[i]`` groups."""
    b = GraphBuilder(opset)
    x = "x"
    for i, groups in enumerate(group_list):
        x = b.conv(x, b.weight((channels, channels // groups, 3, 3), 9 * channels // groups),
                   np.zeros(channels, np.float32), group=groups, name=f"conv{i}", kernel_shape=[3, 3], pads=[1] * 4)
    b.nodes.append(helper.make_node("Relu", [x], ["y"], name="relu"))
    return b.model([("x", [1, channels, 6, 6])], [("y", [1, channels, 6, 6])])


def split_node(model: onnx.ModelProto) -> onnx.NodeProto:
    (split,) = [n for n in model.graph.node if n.op_type == "Split"]
    return split


# -- the module ----------------------------------------------------------------------------


def test_the_module_says_what_it_rewrites():
    assert "x → Conv(group=N)  ⇒  x → Split(axis=1) → N Conv → Concat(axis=1)" in expand_grouped_conv.__doc__


# -- structure and numbers -------------------------------------------------------------------


@pytest.mark.parametrize("opset", [11, 13, 17, 18, 21])
def test_split_written_for_the_opset(opset):
    model = grouped_block("native", groups=4, channels=16, out_channels=8, opset=opset)
    expanded, pass_ = expand(model)
    assert op_counts(expanded) == {"Split": 1, "Conv": 4, "Concat": 1, "Relu": 1, "Identity": 1}
    assert conv_groups(expanded) == [("Conv", 1)] * 4
    split = split_node(expanded)
    attributes = {a.name: a for a in split.attribute}
    assert attributes["axis"].i == 1
    assert "num_outputs" not in attributes
    initializers = {i.name: numpy_helper.to_array(i) for i in expanded.graph.initializer}
    if opset < 13:
        assert list(attributes["split"].ints) == [4, 4, 4, 4]
        assert len(split.input) == 1
    else:
        assert "split" not in attributes
        sizes = initializers[split.input[1]]
        assert sizes.dtype == np.int64 and sizes.tolist() == [4, 4, 4, 4]
    (concat,) = [n for n in expanded.graph.node if n.op_type == "Concat"]
    assert [a.i for a in concat.attribute if a.name == "axis"] == [1]
    # The grouped weight and bias are gone; each branch has its own.
    assert sorted(initializers) == sorted(
        ([] if opset < 13 else [split.input[1]]) + [f"Conv_3_g{i}.{k}" for i in range(4) for k in ("weight", "bias")])
    assert initializers["Conv_3_g0.weight"].shape == (2, 4, 3, 3)
    assert initializers["Conv_3_g0.bias"].shape == (2,)
    assert len(pass_.rewrites) == 1 and not pass_.skipped
    assert_same_numbers(model, expanded)


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("spatial", [(9,), (6, 7), (4, 5, 6)], ids=["1d", "2d", "3d"])
def test_1d_2d_3d_with_and_without_bias(spatial, bias):
    model = grouped_block("native", groups=3, channels=6, out_channels=9, spatial=spatial, bias=bias,
                          strides=[2] * len(spatial))
    expanded, pass_ = expand(model)
    assert conv_groups(expanded) == [("Conv", 1)] * 3
    branches = [n for n in expanded.graph.node if n.op_type == "Conv"]
    assert all(len(n.input) == (3 if bias else 2) for n in branches)
    assert all([a.ints for a in n.attribute if a.name == "strides"] == [[2] * len(spatial)] for n in branches)
    assert pass_.rewrites[0].channels == {"in": 6, "out": 9}
    assert_same_numbers(model, expanded)


def test_report_names_and_output_place():
    model = conv_model(groups=4, in_per_group=2, out_per_group=3)
    expanded, pass_ = expand(model)
    (rewrite,) = pass_.rewrites
    assert rewrite.kind == "expand-grouped-conv"
    assert rewrite.location == "conv"
    assert rewrite.groups == 4
    assert rewrite.channels == {"in": 8, "out": 12}
    assert rewrite.nodes == ["conv_split", "conv_g0", "conv_g1", "conv_g2", "conv_g3", "conv_concat"]
    assert [n.name for n in expanded.graph.node] == rewrite.nodes
    # The Concat output is the graph output, under the original name and type.
    assert expanded.graph.node[-1].output == ["y"]
    assert [o.name for o in expanded.graph.output] == ["y"]
    assert expanded.graph.output[0].type == model.graph.output[0].type
    assert_same_numbers(model, expanded)


def test_unnamed_conv_and_taken_names_get_fresh_names():
    model = conv_model(groups=2)
    model.graph.node[0].name = ""
    # A value already called like the name the split sizes would take.
    model.graph.initializer[0].name = "y_split.split"
    model.graph.node[0].input[1] = "y_split.split"
    expanded, pass_ = expand(model)
    assert pass_.rewrites[0].location == "y"
    assert pass_.rewrites[0].nodes == ["y_split", "y_g0", "y_g1", "y_concat"]
    sizes_name = split_node(expanded).input[1]
    assert sizes_name == "y_split.split_1"
    assert_same_numbers(model, expanded)


def test_deterministic_and_input_untouched():
    model = grouped_block("native", groups=4, opset=13)
    before = model.SerializeToString()
    first, _ = expand(model)
    second, _ = expand(model)
    assert model.SerializeToString() == before
    assert first.SerializeToString() == second.SerializeToString()


def test_idempotent():
    expanded, _ = expand(grouped_block("native", groups=4))
    working = ir.serde.deserialize_model(expanded)
    pass_ = ExpandGroupedConvPass()
    result = pass_(working)
    assert not result.modified and not pass_.rewrites and not pass_.skipped
    untouched = ir.serde.serialize_model(ir.serde.deserialize_model(expanded))
    assert ir.serde.serialize_model(working).SerializeToString() == untouched.SerializeToString()


def test_dry_run_records_without_rewriting():
    model = chain_model([2, 4])
    working = ir.serde.deserialize_model(model)
    pass_ = ExpandGroupedConvPass(rewrite=False)
    result = pass_(working)
    assert not result.modified
    assert [(r.location, r.groups, r.nodes[0]) for r in pass_.rewrites] == [("conv0", 2, "conv0_split"),
                                                                           ("conv1", 4, "conv1_split")]
    assert structure(ir.serde.serialize_model(working)) == structure(model)
    # The names a dry run announces are the ones a real run writes.
    _, real = expand(model)
    assert [r.nodes for r in real.rewrites] == [r.nodes for r in pass_.rewrites]


def test_plain_convs_are_neither_rewritten_nor_reported():
    model = chain_model([1, 1])
    expanded, pass_ = expand(model)
    assert not pass_.rewrites and not pass_.skipped
    assert structure(expanded) == structure(model)


@pytest.mark.parametrize("opset", [11, 17])
@pytest.mark.parametrize("rank", [1, 2])
def test_conv_transpose(rank, opset):
    model = conv_model("ConvTranspose", groups=4, in_per_group=2, out_per_group=3, kernel=(3,) * rank,
                       spatial=(5,) * rank, strides=[2] * rank, pads=[1] * 2 * rank,
                       output_padding=[1] * rank, opset=opset)
    expanded, pass_ = expand(model)
    assert op_counts(expanded) == {"Split": 1, "ConvTranspose": 4, "Concat": 1}
    assert conv_groups(expanded) == [("ConvTranspose", 1)] * 4
    initializers = {i.name: numpy_helper.to_array(i) for i in expanded.graph.initializer}
    # [I, O/g, k...] split on the input axis; bias split per output block.
    assert initializers["conv_g0.weight"].shape == (2, 3, *(3,) * rank)
    assert initializers["conv_g0.bias"].shape == (3,)
    assert pass_.rewrites[0].channels == {"in": 8, "out": 12}
    assert_same_numbers(model, expanded)


def test_conv_transpose_output_shape_and_dilations_no_bias():
    model = conv_model("ConvTranspose", groups=2, in_per_group=3, out_per_group=2, bias=False,
                       spatial=(4, 5), strides=[2, 3], dilations=[2, 1], output_shape=[10, 15])
    expanded, _ = expand(model)
    assert conv_groups(expanded) == [("ConvTranspose", 1)] * 2
    assert_same_numbers(model, expanded)
    assert run(expanded, feeds_for(model))[0].shape == (1, 4, 10, 15)


def test_depthwise_is_expanded_unless_kept():
    b = GraphBuilder(17)
    y = b.conv("x", b.weight((16, 1, 3, 3), 9), None, group=16, name="depthwise", kernel_shape=[3, 3], pads=[1] * 4)
    # A depthwise conv with channel multiplier 2 is depthwise too (group == input channels).
    y = b.conv(y, b.weight((32, 1, 3, 3), 9), None, group=16, name="depthwise_x2", kernel_shape=[3, 3])
    y = b.conv(y, b.weight((32, 8, 1, 1), 8), None, group=4, name="grouped", kernel_shape=[1, 1])
    b.nodes.append(helper.make_node("Relu", [y], ["out"], name="relu"))
    model = b.model([("x", [1, 16, 6, 6])], [("out", [1, 32, 4, 4])])

    kept, pass_ = expand(model, keep_depthwise=True)
    assert [r.location for r in pass_.rewrites] == ["grouped"]
    assert [(s.location, s.reason) for s in pass_.skipped] == [("depthwise", DEPTHWISE_KEPT),
                                                                ("depthwise_x2", DEPTHWISE_KEPT)]
    assert DEPTHWISE_KEPT == "depthwise (group == channels) kept: --keep-depthwise"
    assert conv_groups(kept) == [("Conv", 16), ("Conv", 16)] + [("Conv", 1)] * 4
    assert_same_numbers(model, kept)

    expanded, pass_ = expand(model)
    assert [r.location for r in pass_.rewrites] == ["depthwise", "depthwise_x2", "grouped"]
    assert not pass_.skipped
    assert conv_groups(expanded) == [("Conv", 1)] * 36
    assert_same_numbers(model, expanded)


def test_depthwise_conv_transpose_kept():
    model = conv_model("ConvTranspose", groups=4, in_per_group=1, out_per_group=2, spatial=(5, 5))
    kept, pass_ = expand(model, keep_depthwise=True)
    assert [(s.location, s.reason) for s in pass_.skipped] == [("conv", DEPTHWISE_KEPT)]
    assert structure(kept) == structure(model)


def test_min_and_max_groups():
    model = chain_model([2, 4, 8])
    expanded, pass_ = expand(model, min_groups=4)
    assert [r.location for r in pass_.rewrites] == ["conv1", "conv2"]
    assert [(s.location, s.reason) for s in pass_.skipped] == [("conv0", "group=2 is below --min-groups 4")]
    assert conv_groups(expanded) == [("Conv", 2)] + [("Conv", 1)] * 12
    assert_same_numbers(model, expanded)

    expanded, pass_ = expand(model, max_groups=4)
    assert [r.location for r in pass_.rewrites] == ["conv0", "conv1"]
    assert [(s.location, s.reason) for s in pass_.skipped] == [("conv2", "group=8 is above --max-groups 4")]
    assert conv_groups(expanded) == [("Conv", 1)] * 6 + [("Conv", 8)]
    assert_same_numbers(model, expanded)

    expanded, pass_ = expand(model, min_groups=3, max_groups=5)
    assert [r.location for r in pass_.rewrites] == ["conv1"]
    assert [s.location for s in pass_.skipped] == ["conv0", "conv2"]


def test_weights_from_a_constant_node():
    b = GraphBuilder(17)
    weight = b.weight((8, 2, 3, 3), 18)
    b.nodes.append(helper.make_node("Constant", [], ["w"], name="w_const", value=numpy_helper.from_array(weight)))
    b.nodes.append(helper.make_node("Conv", ["x", "w"], ["y"], name="conv", group=4, kernel_shape=[3, 3]))
    model = b.model([("x", [1, 8, 5, 5])], [("y", [1, 8, 3, 3])])
    expanded, pass_ = expand(model)
    assert len(pass_.rewrites) == 1
    # The Constant that held the grouped weight is dead and gone.
    assert op_counts(expanded) == {"Split": 1, "Conv": 4, "Concat": 1}
    assert_same_numbers(model, expanded)


def test_non_constant_weights_or_bias_are_skipped():
    weight = np.random.default_rng(0).standard_normal((8, 2, 3, 3)).astype(np.float32)
    conv = helper.make_node("Conv", ["x", "w"], ["y"], name="conv", group=4, kernel_shape=[3, 3])
    graph = helper.make_graph([conv], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 8, 5, 5]),
                                            helper.make_tensor_value_info("w", TensorProto.FLOAT, [8, 2, 3, 3])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    del graph  # make_model copied it: edit model.graph from here on
    expanded, pass_ = expand(model)
    assert not pass_.rewrites
    assert [(s.location, s.reason) for s in pass_.skipped] == [
        ("conv", "weights are not constants (initializer or Constant node); cannot split them ahead of time")]
    assert structure(expanded) == structure(model)

    # An initializer that is also a graph input can be replaced when the model runs.
    model.graph.initializer.append(numpy_helper.from_array(weight, "w"))
    _, pass_ = expand(model)
    assert not pass_.rewrites
    assert [(s.location, s.reason) for s in pass_.skipped] == [
        ("conv", "weights are an initializer that is also a graph input (replaceable at run time); "
                 "cannot split them ahead of time")]

    # A constant weight with a bias computed at run time.
    del model.graph.initializer[:]
    del model.graph.input[1:]
    model.graph.initializer.append(numpy_helper.from_array(weight, "w"))
    model.graph.input.append(helper.make_tensor_value_info("b", TensorProto.FLOAT, [8]))
    model.graph.node[0].input.append("b")
    _, pass_ = expand(model)
    assert not pass_.rewrites
    assert [(s.location, s.reason) for s in pass_.skipped] == [
        ("conv", "bias is not a constant (initializer or Constant node); cannot split it ahead of time")]


def shared_weight_model(also_read_by_identity: bool) -> onnx.ModelProto:
    b = GraphBuilder(17)
    w = b.const("W", b.weight((8, 2, 3, 3), 18))
    b.nodes.append(helper.make_node("Conv", ["x", w], ["a"], name="conv_a", group=4, kernel_shape=[3, 3], pads=[1] * 4))
    b.nodes.append(helper.make_node("Conv", ["a", w], ["y"], name="conv_b", group=4, kernel_shape=[3, 3]))
    outputs = [("y", [1, 8, 3, 3])]
    if also_read_by_identity:
        b.nodes.append(helper.make_node("Identity", [w], ["w_copy"], name="keep_w"))
        outputs.append(("w_copy", [8, 2, 3, 3]))
    return b.model([("x", [1, 8, 5, 5])], outputs)


def test_shared_weight_is_removed_only_when_dead():
    model = shared_weight_model(also_read_by_identity=False)
    expanded, pass_ = expand(model)
    assert [r.location for r in pass_.rewrites] == ["conv_a", "conv_b"]
    assert [n.name for n in expanded.graph.node if n.op_type == "Conv"] == [
        "conv_a_g0", "conv_a_g1", "conv_a_g2", "conv_a_g3", "conv_b_g0", "conv_b_g1", "conv_b_g2", "conv_b_g3"]
    assert model.graph.initializer[0].name not in {i.name for i in expanded.graph.initializer}
    assert_same_numbers(model, expanded)

    model = shared_weight_model(also_read_by_identity=True)
    expanded, pass_ = expand(model)
    assert len(pass_.rewrites) == 2
    # Still read by the Identity: it stays.
    assert model.graph.initializer[0].name in {i.name for i in expanded.graph.initializer}
    assert_same_numbers(model, expanded)


def test_conv_inside_a_subgraph_reading_outer_weights():
    weight = numpy_helper.from_array(
        np.random.default_rng(1).standard_normal((8, 2, 3, 3)).astype(np.float32), "W")
    then_graph = helper.make_graph(
        [helper.make_node("Conv", ["x", "W"], ["t"], name="inner_conv", group=4, kernel_shape=[3, 3],
                           pads=[1] * 4)],
        "then_branch", [], [helper.make_tensor_value_info("t", TensorProto.FLOAT, [1, 8, 5, 5])])
    else_graph = helper.make_graph(
        [helper.make_node("Neg", ["x"], ["e"], name="neg")], "else_branch", [],
        [helper.make_tensor_value_info("e", TensorProto.FLOAT, [1, 8, 5, 5])])
    graph = helper.make_graph(
        [helper.make_node("If", ["cond"], ["y"], name="if", then_branch=then_graph, else_branch=else_graph)],
        "outer", [helper.make_tensor_value_info("cond", TensorProto.BOOL, []),
                  helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 8, 5, 5])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 8, 5, 5])], initializer=[weight])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    expanded, pass_ = expand(model)
    (rewrite,) = pass_.rewrites
    assert rewrite.graph == "then_branch"
    then_expanded = next(a.g for a in expanded.graph.node[0].attribute if a.name == "then_branch")
    assert [n.op_type for n in then_expanded.node] == ["Split", "Conv", "Conv", "Conv", "Conv", "Concat"]
    assert "W" not in {i.name for i in expanded.graph.initializer}  # the outer weight is dead
    onnx.checker.check_model(expanded, full_check=True)
    x = np.random.default_rng(2).standard_normal((1, 8, 5, 5)).astype(np.float32)
    feeds = {"cond": np.array(True), "x": x}
    np.testing.assert_allclose(run(expanded, feeds)[0], run(model, feeds)[0], atol=1e-4, rtol=0)


# -- round trips with the fusion pass ---------------------------------------------------------


@pytest.mark.parametrize("opset", [11, 13, 17, 18, 21])
@pytest.mark.parametrize("spatial", [(9,), (6, 6), (4, 4, 4)], ids=["1d", "2d", "3d"])
def test_fuse_of_expand_is_the_original(spatial, opset):
    model = grouped_block("native", groups=4, channels=8, out_channels=12, spatial=spatial, opset=opset,
                          dilations=[2] * len(spatial), pads=[2] * 2 * len(spatial))
    expanded, expand_pass = expand(model)
    fused, fuse_pass = fuse(expanded)
    assert not fuse_pass.skipped
    assert [r.groups for r in fuse_pass.rewrites] == [4]
    assert fuse_pass.rewrites[0].channels == expand_pass.rewrites[0].channels
    assert structure(fused) == structure(model)
    assert len(fused.graph.initializer) == len(model.graph.initializer)
    assert_same_numbers(model, fused)


def test_fuse_of_expand_without_bias_and_as_graph_output():
    model = conv_model(groups=3, in_per_group=2, out_per_group=2, bias=False, strides=[2, 1])
    fused, fuse_pass = fuse(expand(model)[0])
    assert structure(fused) == structure(model)
    assert [o.name for o in fused.graph.output] == ["y"]
    assert [len(n.input) for n in fused.graph.node] == [2]
    assert_same_numbers(model, fused)


@pytest.mark.parametrize("opset", [11, 13, 17, 18, 21])
def test_expand_of_fuse_is_the_split_form(opset):
    model = grouped_block("split", groups=4, channels=16, out_channels=8, opset=opset)
    fused, fuse_pass = fuse(model)
    assert [r.groups for r in fuse_pass.rewrites] == [4]
    expanded, expand_pass = expand(fused)
    assert [r.groups for r in expand_pass.rewrites] == [4]
    assert structure(expanded) == structure(model)
    original_split, new_split = split_node(model), split_node(expanded)
    assert len(new_split.input) == len(original_split.input)
    assert [a.name for a in new_split.attribute] == [a.name for a in original_split.attribute]
    assert_same_numbers(model, expanded)


# -- property tests ----------------------------------------------------------------------------


@st.composite
def grouped_convs(draw, ops=CONV_OPS):
    op = draw(st.sampled_from(ops))
    rank = draw(st.integers(1, 3))
    groups = draw(st.integers(2, 6))
    in_per_group = draw(st.integers(1, 3))
    out_per_group = draw(st.integers(1, 3))
    kernel = tuple(draw(st.lists(st.integers(1, 3), min_size=rank, max_size=rank)))
    strides = draw(st.lists(st.integers(1, 2), min_size=rank, max_size=rank))
    dilations = draw(st.lists(st.integers(1, 2), min_size=rank, max_size=rank))
    extent = [(k - 1) * d + 1 for k, d in zip(kernel, dilations)]
    attrs = {"strides": strides, "dilations": dilations}
    # onnxruntime refuses SAME_* padding with dilations.
    paddings = ["explicit", "VALID"] + (["SAME_UPPER", "SAME_LOWER"] if set(dilations) == {1} else [])
    padding = draw(st.sampled_from(paddings))
    if padding == "explicit":
        # Pads smaller than the kernel's extent on each side keep the output non-empty.
        attrs["pads"] = [draw(st.integers(0, e - 1)) for e in extent * 2]
    else:
        attrs["auto_pad"] = padding
    spatial = tuple(e + draw(st.integers(0, 3)) for e in extent)
    if rank == 3:
        spatial = tuple(min(s, 6) for s in spatial)
    return dict(op=op, groups=groups, in_per_group=in_per_group, out_per_group=out_per_group, kernel=kernel,
                spatial=spatial, bias=draw(st.booleans()), opset=draw(st.sampled_from([11, 13, 17, 18, 21])),
                seed=draw(st.integers(0, 3)), **attrs)


PROPERTY_SETTINGS = settings(max_examples=40, deadline=None, derandomize=True,
                             suppress_health_check=[HealthCheck.too_slow])


@PROPERTY_SETTINGS
@given(grouped_convs())
def test_property_expanded_equals_original(params):
    params = dict(params)
    model = conv_model(params.pop("op"), **params)
    expanded, pass_ = expand(model)
    assert len(pass_.rewrites) == 1 and not pass_.skipped
    op = model.graph.node[0].op_type
    assert conv_groups(expanded) == [(op, 1)] * params["groups"]
    assert_same_numbers(model, expanded)


@PROPERTY_SETTINGS
@given(grouped_convs(ops=("Conv",)))
def test_property_fuse_of_expand_equals_original(params):
    params = dict(params)
    model = conv_model(params.pop("op"), **params)
    fused, fuse_pass = fuse(expand(model)[0])
    assert not fuse_pass.skipped
    assert structure(fused) == structure(model)
    assert_same_numbers(model, fused)


# -- acceptance: a ResNeXt-50-shaped network --------------------------------------------------


def test_resnext50_expand_then_fuse_round_trip():
    model = resnext50("native", image=64, classes=10)
    expanded, expand_pass = expand(model)
    assert len(expand_pass.rewrites) == 16 and not expand_pass.skipped
    assert all(r.groups == 32 for r in expand_pass.rewrites)
    counts = op_counts(expanded)
    original_counts = op_counts(model)
    assert counts["Split"] == counts["Concat"] == 16
    assert counts["Conv"] == original_counts["Conv"] - 16 + 16 * 32
    assert all(g == 1 for _, g in conv_groups(expanded))

    fused, fuse_pass = fuse(expanded)
    assert len(fuse_pass.rewrites) == 16 and not fuse_pass.skipped
    assert structure(fused) == structure(model)
    feeds = feeds_for(model)
    expected = run(model, feeds)[0]
    np.testing.assert_allclose(run(expanded, feeds)[0], expected, atol=1e-4, rtol=1e-4)
    np.testing.assert_allclose(run(fused, feeds)[0], expected, atol=1e-4, rtol=1e-4)
