"""onnx.fuse-split-conv: x → Split/Slice(axis=1) → Conv_i → Concat(axis=1) ⇒ x → Conv(group=N).

Every test checks the structure of what came out (op counts, the group attribute, nothing of the
pattern left, weights concatenated, no dead constants) and the numbers (onnxruntime, original vs
fused). Every near miss is left as it was and reported with its reason."""

from __future__ import annotations

import collections

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from onnx import TensorProto, helper

import gconv_rewrite
from gconv_rewrite.passes.onnx import FuseSplitConvPass
from samples.models import INT64_MAX, GraphBuilder, grouped_block
from tests.conftest import (
    as_constant_nodes,
    assert_fused_weights,
    attribute,
    constants,
    dead_constants,
    nodes,
    op_counts,
    without_attribute,
)

OPSETS = list(range(11, 24))


def candidate(*, channels: int = 8, groups: int = 4, form: str = "slice", spatial=(5, 5), opset: int = 17,
              out: int = 4, kernel=None, bias: bool = True, group: int = 1, attrs: dict | None = None,
              per_branch: dict | None = None, ranges=None, split_style: str = "auto", open_end: bool = True,
              order=None, read_axis: int = 1, concat_axis: int = 1, source: str = "input",
              tail: bool = True, seed: int = 0) -> onnx.ModelProto:
    """``x → Split | Slices → Conv_i → Concat → Relu → y``, each part adjustable to make near misses.

    ranges: the channel range each branch reads (default: ``groups`` even ranges); a Split hands
    them out in order. per_branch: {index: {out, kernel, bias, group, attrs}} overrides. order: the
    order of the Concat inputs. source: "input" (graph input with its shape), "unknown" (graph
    input of unknown dimensions), "relu" (an intermediate tensor: no shape, not even a rank).
    """
    b = GraphBuilder(opset, seed)
    rank = len(spatial)
    kernel = tuple(kernel or (3,) * rank)
    per_branch = per_branch or {}
    if ranges is None:
        width = channels // groups
        ranges = [(i * width, (i + 1) * width) for i in range(groups)]
    x = b.node("Relu", ["x"], name="pre")[0] if source == "relu" else "x"

    if form == "split":
        sizes = [stop - start for start, stop in ranges]
        if split_style == "num_outputs":
            reads = b.node("Split", [x], len(sizes), axis=read_axis, num_outputs=len(sizes))
        elif split_style == "equal":
            reads = b.node("Split", [x], len(sizes), axis=read_axis)
        elif opset < 13:
            reads = b.node("Split", [x], len(sizes), axis=read_axis, split=sizes)
        else:
            reads = b.node("Split", [x, b.const("split", np.array(sizes, np.int64))], len(sizes), axis=read_axis)
    else:
        ints = lambda v: b.const("slice", np.array([v], np.int64))
        last = len(ranges) - 1
        reads = [b.node("Slice", [x, ints(start), ints(INT64_MAX if open_end and i == last else stop),
                                  ints(read_axis)])[0]
                 for i, (start, stop) in enumerate(ranges)]

    outs = []
    for i, (read, (start, stop)) in enumerate(zip(reads, ranges)):
        spec = per_branch.get(i, {})
        k = tuple(spec.get("kernel", kernel))
        conv_attrs = {"kernel_shape": list(k), "pads": [n // 2 for n in k] * 2, **(attrs or {}), **spec.get("attrs", {})}
        conv_attrs = {key: v for key, v in conv_attrs.items() if v is not None}
        g, o = spec.get("group", group), spec.get("out", out)
        weight = b.weight((o, (stop - start) // g, *k), (stop - start) // g * int(np.prod(k)))
        with_bias = spec.get("bias", bias)
        bias_array = (b.rng.standard_normal(o) * 0.5).astype(np.float32) if with_bias else None
        outs.append(b.conv(read, weight, bias_array, group=g, **conv_attrs))
    order = order or range(len(outs))
    y = b.node("Concat", [outs[i] for i in order], axis=concat_axis)[0]
    if tail:
        y = b.node("Relu", [y], name="post")[0]
    shape = {"input": [1, channels, *spatial], "unknown": [None] * (2 + rank), "relu": [1, channels, *spatial]}[source]
    return b.model([("x", shape)], [(y, [None] * (2 + rank))])


def shapes_for(channels=8, spatial=(5, 5)):
    return {"x": [1, channels, *spatial]}


# -- fusable: forms, opsets, ranks -----------------------------------------------------------


@pytest.mark.parametrize("form", ["split", "slice"])
@pytest.mark.parametrize("opset", OPSETS)
def test_fuses_in_every_opset(fusion, form, opset):
    # The samples builder: Split sizes as attribute before 13, as input from 13; Slice bounds as inputs.
    model = grouped_block(form, opset=opset, groups=4, channels=8, out_channels=8, spatial=(5, 5))
    outcome = fusion.fused(model, groups=4)
    assert outcome.after == {"Conv": 1, "Relu": 1, "Identity": 1}
    assert outcome.fused.opset_import[0].version == opset and outcome.fused.ir_version == model.ir_version
    (rewrite,) = outcome.report.rewrites
    assert rewrite.channels == {"in": 8, "out": 8}


@pytest.mark.parametrize("form", ["split", "slice"])
@pytest.mark.parametrize("spatial", [(7,), (5, 5), (3, 4, 5)], ids=["conv1d", "conv2d", "conv3d"])
def test_fuses_1d_2d_3d(fusion, form, spatial):
    model = candidate(form=form, spatial=spatial, channels=8, groups=2, out=3)
    outcome = fusion.fused(model, groups=2)
    (conv,) = outcome.fused_convs()
    weight = constants(outcome.fused)[conv.input[1]]
    assert weight.shape == (6, 4, *(3,) * len(spatial))
    assert attribute(conv, "kernel_shape") == [3] * len(spatial)


@pytest.mark.parametrize("form", ["split", "slice"])
@pytest.mark.parametrize("biases", [(True, True, True), (False, False, False), (True, False, True),
                                    (False, True, False)], ids=["bias", "no-bias", "mixed", "mixed-first-none"])
def test_bias_present_absent_or_mixed(fusion, form, biases):
    model = candidate(form=form, channels=6, groups=3, per_branch={i: {"bias": b} for i, b in enumerate(biases)})
    outcome = fusion.fused(model, groups=3)
    (conv,) = outcome.fused_convs()
    assert len(conv.input) == (3 if any(biases) else 2)
    if any(biases) and not all(biases):
        fused_bias = constants(outcome.fused)[conv.input[2]]
        for i, present in enumerate(biases):
            # A branch without bias adds nothing: its share of the fused bias is zero.
            assert (np.count_nonzero(fused_bias[i * 4:(i + 1) * 4]) > 0) == present


@pytest.mark.parametrize("form", ["split", "slice"])
@pytest.mark.parametrize("inner", [2, 4])
def test_grouped_branches_multiply_groups(fusion, form, inner):
    model = candidate(form=form, channels=16, groups=2, out=8, group=inner)
    outcome = fusion.fused(model, groups=2 * inner)
    (conv,) = outcome.fused_convs()
    assert constants(outcome.fused)[conv.input[1]].shape == (16, 16 // (2 * inner), 3, 3)


def test_samples_builder_nested_groups(fusion):
    model = grouped_block("split", groups=2, channels=8, out_channels=8, inner_group=2, spatial=(4, 4))
    fusion.fused(model, groups=4)


# -- Split flavours --------------------------------------------------------------------------


@pytest.mark.parametrize("opset,style", [
    (11, "auto"), (12, "auto"),  # split attribute
    (13, "auto"), (17, "auto"), (18, "auto"), (23, "auto"),  # split input
    (18, "num_outputs"), (21, "num_outputs"), (23, "num_outputs"),
    (11, "equal"), (13, "equal"), (17, "equal"),  # no sizes: an even split
])
def test_split_sizes_every_way(fusion, opset, style):
    model = candidate(form="split", opset=opset, split_style=style, channels=12, groups=3)
    split = nodes(model, "Split")[0]
    assert (attribute(split, "split") is not None) == (style == "auto" and opset < 13)
    assert (len(split.input) == 2) == (style == "auto" and opset >= 13)
    outcome = fusion.fused(model, groups=3)
    assert [i.name for i in outcome.fused.graph.initializer if i.name.startswith("split")] == []


@pytest.mark.parametrize("style", ["auto", "num_outputs", "equal"])
@pytest.mark.parametrize("source", ["unknown", "relu"])
def test_split_of_unknown_channel_count(fusion, style, source):
    opset = 18 if style == "num_outputs" else 17
    model = candidate(form="split", opset=opset, split_style=style, channels=8, groups=4, source=source)
    fusion.fused(model, groups=4, shapes=shapes_for())


@pytest.mark.parametrize("source", ["unknown", "relu"])
def test_open_ended_slices_of_unknown_channel_count(fusion, source):
    # The last Slice runs to INT64_MAX: it fixes the channel count the other branches lack.
    model = candidate(form="slice", channels=8, groups=4, source=source, open_end=True)
    fusion.fused(model, groups=4, shapes=shapes_for())


def test_symbolic_source_shape(fusion):
    model = candidate(form="slice", channels=8, groups=2)
    dims = model.graph.input[0].type.tensor_type.shape.dim
    dims[0].dim_param, dims[2].dim_param = "N", "H"  # channels stay known
    fusion.fused(model, groups=2, shapes={"x": [2, 8, 3, 5]})


# -- axes ------------------------------------------------------------------------------------


@pytest.mark.parametrize("form", ["split", "slice"])
@pytest.mark.parametrize("read_axis,concat_axis", [(-3, 1), (1, -3), (-3, -3)])
def test_negative_axes(fusion, form, read_axis, concat_axis):
    model = candidate(form=form, channels=8, groups=4, read_axis=read_axis, concat_axis=concat_axis)
    fusion.fused(model, groups=4)


@pytest.mark.parametrize("form", ["split", "slice"])
def test_negative_axes_1d_and_unknown_rank(fusion, form):
    # Conv1D: axis -2 is the channel axis; the source's rank is not recorded.
    model = candidate(form=form, channels=8, groups=2, spatial=(6,), read_axis=-2, concat_axis=-2,
                      source="relu")
    fusion.fused(model, groups=2, shapes={"x": [1, 8, 6]})


def test_slice_with_negative_bounds(fusion):
    b = GraphBuilder(17)
    ints = lambda v: b.const("bound", np.array(v, np.int64))
    # x[:, 0:4], x[:, -4:] and a Slice whose axes also list the batch axis as a whole range.
    first = b.node("Slice", ["x", ints([0, 0]), ints([INT64_MAX, 4]), ints([0, 1])])[0]
    second = b.node("Slice", ["x", ints([-4]), ints([INT64_MAX]), ints([1])])[0]
    convs = [b.conv(x, b.weight((3, 4, 1, 1), 4), None, kernel_shape=[1, 1]) for x in (first, second)]
    y = b.node("Concat", convs, axis=1)[0]
    fusion.fused(b.model([("x", [1, 8, 3, 3])], [(y, [1, 6, 3, 3])]), groups=2)


# -- shared attributes -----------------------------------------------------------------------


@pytest.mark.parametrize("form", ["split", "slice"])
@pytest.mark.parametrize("attrs", [
    {"strides": [2, 2]},
    {"pads": [0, 1, 2, 1]},
    {"dilations": [2, 2], "pads": [2, 2, 2, 2]},
    {"strides": [2, 1], "dilations": [1, 2], "pads": [1, 0, 1, 2]},
    {"auto_pad": "SAME_UPPER", "pads": None},
    {"auto_pad": "SAME_LOWER", "pads": None, "strides": [2, 2]},
    {"auto_pad": "VALID", "pads": None},
], ids=["strides", "pads", "dilations", "all", "same_upper", "same_lower", "valid"])
def test_shared_conv_attributes_are_kept(fusion, form, attrs):
    model = candidate(form=form, channels=8, groups=2, spatial=(6, 7), attrs=attrs)
    outcome = fusion.fused(model, groups=2)
    (conv,) = outcome.fused_convs()
    for key, value in attrs.items():
        assert attribute(conv, key) == (value.encode() if isinstance(value, str) else value)


def test_even_kernel_same_lower_vs_upper_matter(fusion):
    # With an even kernel SAME_UPPER and SAME_LOWER differ: the fused node must keep the branches' one.
    model = candidate(form="split", channels=8, groups=2, kernel=(2, 2), attrs={"auto_pad": "SAME_LOWER", "pads": None})
    outcome = fusion.fused(model, groups=2)
    assert attribute(outcome.fused_convs()[0], "auto_pad") == b"SAME_LOWER"


@pytest.mark.parametrize("form", ["split", "slice"])
def test_kernel_shape_omitted(fusion, form):
    model = without_attribute(candidate(form=form, channels=8, groups=4), "Conv", "kernel_shape")
    outcome = fusion.fused(model, groups=4)
    assert attribute(outcome.fused_convs()[0], "kernel_shape") is None


def test_kernel_shape_omitted_in_some_branches(fusion):
    # kernel_shape is implied by the weights: a branch that leaves it out is no different.
    model = candidate(form="slice", channels=8, groups=2)
    model = without_attribute(model, "Conv", "kernel_shape")
    conv = nodes(model, "Conv")[0]
    conv.attribute.append(helper.make_attribute("kernel_shape", [3, 3]))
    fusion.fused(model, groups=2)


@pytest.mark.parametrize("form", ["split", "slice"])
def test_explicit_default_attributes_equal_missing_ones(fusion, form):
    # strides=[1,1], dilations=[1,1], pads=0 and auto_pad=NOTSET written out in one branch only.
    model = candidate(form=form, channels=8, groups=2, kernel=(1, 1), attrs={"pads": None}, per_branch={
        1: {"attrs": {"strides": [1, 1], "dilations": [1, 1], "pads": [0, 0, 0, 0], "auto_pad": "NOTSET"}}})
    fusion.fused(model, groups=2)


# -- where the constants come from -----------------------------------------------------------


@pytest.mark.parametrize("form", ["split", "slice"])
@pytest.mark.parametrize("which", ["weights", "all"])
def test_constants_as_constant_nodes(fusion, form, which):
    model = candidate(form=form, channels=8, groups=4, opset=17)
    pick = (lambda name: name.startswith(("W_", "B_"))) if which == "weights" else (lambda name: True)
    model = as_constant_nodes(model, pick)
    assert len(model.graph.initializer) == 0 or which == "weights"
    outcome = fusion.fused(model, groups=4)
    # The branch weights, biases, Split sizes and Slice bounds all went with the branches.
    assert "Constant" not in outcome.after
    assert sorted(i.name for i in outcome.fused.graph.initializer) == sorted(
        [outcome.fused_convs()[0].input[1], outcome.fused_convs()[0].input[2]])


def test_shared_slice_bound_constant_stays_while_used(fusion):
    # One axes constant is shared by the branch Slices and an unrelated Slice: it must stay.
    b = GraphBuilder(17)
    axes, zero, four, eight = (b.const(n, np.array([v], np.int64)) for n, v in
                               [("axes", 1), ("zero", 0), ("four", 4), ("eight", 8)])
    left = b.node("Slice", ["x", zero, four, axes])[0]
    right = b.node("Slice", ["x", four, eight, axes])[0]
    convs = [b.conv(v, b.weight((4, 4, 3, 3), 36), None, kernel_shape=[3, 3], pads=[1, 1, 1, 1])
             for v in (left, right)]
    y = b.node("Concat", convs, axis=1)[0]
    other = b.node("Slice", ["x", zero, four, axes])[0]
    model = b.model([("x", [1, 8, 4, 4])], [(y, [1, 8, 4, 4]), (other, [1, 4, 4, 4])])
    outcome = fusion.run(model)
    assert [r.groups for r in outcome.report.rewrites] == [2]
    assert outcome.after == {"Conv": 1, "Slice": 1}
    kept = {i.name for i in outcome.fused.graph.initializer}
    assert {axes, zero, four} <= kept and eight not in kept


def test_weight_shared_with_an_unrelated_conv_stays(fusion):
    model = candidate(form="split", channels=8, groups=2)
    weight = nodes(model, "Conv")[0].input[1]
    model.graph.node.append(helper.make_node("Conv", ["other", weight], ["side"], name="side",
                                             kernel_shape=[3, 3], pads=[1, 1, 1, 1]))
    model.graph.input.append(helper.make_tensor_value_info("other", TensorProto.FLOAT, [1, 4, 5, 5]))
    model.graph.output.append(helper.make_tensor_value_info("side", TensorProto.FLOAT, [1, 4, 5, 5]))
    outcome = fusion.run(model)
    assert [r.groups for r in outcome.report.rewrites] == [2]
    assert outcome.after == {"Conv": 2, "Relu": 1}
    assert weight in {i.name for i in outcome.fused.graph.initializer}
    assert dead_constants(outcome.fused) == []
    assert_fused_weights(outcome.original, outcome.fused)


# -- surroundings ----------------------------------------------------------------------------


def test_two_candidates_among_unrelated_ops(fusion):
    b = GraphBuilder(17, seed=3)
    x = b.node("Sigmoid", ["x"])[0]
    first = b.grouped_conv(x, 8, 8, 4, form="split", kernel=(3, 3), pads=[1, 1, 1, 1])
    mid = b.node("Relu", [first])[0]
    mid = b.node("Add", [mid, x])[0]
    second = b.grouped_conv(mid, 8, 12, 2, form="slice", kernel=(1, 1), strides=[2, 2])
    pooled = b.node("MaxPool", [first], kernel_shape=[2, 2], strides=[2, 2])[0]
    y = b.node("Concat", [second, pooled], axis=1)[0]  # a Concat that is no candidate
    model = b.model([("x", [1, 8, 6, 6])], [(y, [1, 20, 3, 3])])
    outcome = fusion.run(model)
    assert [r.groups for r in outcome.report.rewrites] == [4, 2]
    assert outcome.report.skipped == []
    assert outcome.after == {"Sigmoid": 1, "Conv": 2, "Relu": 1, "Add": 1, "MaxPool": 1, "Concat": 1}
    assert [attribute(n, "group") for n in nodes(outcome.fused, "Conv")] == [4, 2]
    assert outcome.before["Conv"] == 6
    assert dead_constants(outcome.fused) == []
    assert_fused_weights(outcome.original, outcome.fused)


def test_chained_candidates(fusion):
    # The second candidate reads the first one's Concat output: it must read the fused Conv.
    b = GraphBuilder(17, seed=5)
    y = b.grouped_conv("x", 8, 8, 2, form="split", kernel=(3, 3), pads=[1, 1, 1, 1])
    y = b.grouped_conv(y, 8, 8, 4, form="slice", kernel=(3, 3), pads=[1, 1, 1, 1])
    model = b.model([("x", [1, 8, 4, 4])], [(y, [1, 8, 4, 4])])
    outcome = fusion.fused(model, groups=[2, 4])
    first, second = nodes(outcome.fused, "Conv")
    assert second.input[0] == first.output[0]


@pytest.mark.parametrize("form", ["split", "slice"])
def test_concat_output_is_graph_output(fusion, form):
    model = candidate(form=form, channels=8, groups=4, tail=False)
    output_name = model.graph.output[0].name
    outcome = fusion.fused(model, groups=4)
    assert [o.name for o in outcome.fused.graph.output] == [output_name]
    assert outcome.fused.graph.node[-1].output[0] == output_name
    assert outcome.after == {"Conv": 1}


def test_two_parallel_candidates_on_one_source(fusion):
    b = GraphBuilder(17, seed=4)
    left = b.grouped_conv("x", 8, 8, 2, form="split", kernel=(1, 1))
    right = b.grouped_conv("x", 8, 8, 4, form="slice", kernel=(3, 3), pads=[1, 1, 1, 1])
    y = b.node("Add", [left, right])[0]
    outcome = fusion.fused(b.model([("x", [1, 8, 3, 3])], [(y, [1, 8, 3, 3])]), groups=[2, 4])
    assert outcome.after == {"Conv": 2, "Add": 1}
    assert [n.input[0] for n in nodes(outcome.fused, "Conv")] == ["x", "x"]


def test_unnamed_nodes(fusion):
    model = candidate(form="split", channels=8, groups=2)
    for node in model.graph.node:
        node.name = ""
    outcome = fusion.fused(model, groups=2)
    (conv,) = nodes(outcome.fused, "Conv")
    assert conv.name and conv.input[1] == f"{conv.name}.weight"
    again = fusion.run(outcome.fused)
    assert again.report.rewrites == [] and again.after == outcome.after


def test_int32_slice_bounds_without_axes(fusion):
    # Slice's axes input is optional (then 0, 1, ...) and its bounds may be int32.
    b = GraphBuilder(17)
    bounds = lambda v: b.const("bound", np.array(v, np.int32))
    parts = [b.node("Slice", ["x", bounds([0, start]), bounds([2**31 - 1, stop])])[0] for start, stop in [(0, 4), (4, 8)]]
    convs = [b.conv(p, b.weight((4, 4, 1, 1), 4), None, kernel_shape=[1, 1]) for p in parts]
    y = b.node("Concat", convs, axis=1)[0]
    fusion.fused(b.model([("x", [1, 8, 3, 3])], [(y, [1, 8, 3, 3])]), groups=2)


def test_concat_output_is_graph_output_and_read_further(fusion):
    model = candidate(form="split", channels=8, groups=2)
    concat = nodes(model, "Concat")[0]
    model.graph.output.append(helper.make_tensor_value_info(concat.output[0], TensorProto.FLOAT, [1, 8, 5, 5]))
    outcome = fusion.fused(model, groups=2)
    assert [o.name for o in outcome.fused.graph.output] == [o.name for o in model.graph.output]


def test_source_also_read_elsewhere(fusion):
    # The source tensor itself may have other readers; only the branch values must be private.
    model = candidate(form="slice", channels=8, groups=2, source="relu")
    model.graph.output.append(helper.make_tensor_value_info("pre_out", TensorProto.FLOAT, [1, 8, 5, 5]))
    fusion.fused(model, groups=2)


def test_names_metadata_and_opsets_kept(fusion):
    model = candidate(form="split", channels=8, groups=2)
    model.doc_string = "kept"
    helper.set_model_props(model, {"author": "me"})
    outcome = fusion.fused(model, groups=2)
    assert outcome.fused.doc_string == "kept"
    assert {p.key: p.value for p in outcome.fused.metadata_props} == {"author": "me"}
    assert [n.name for n in outcome.fused.graph.node if n.op_type == "Relu"] == ["post"]
    assert outcome.fused.graph.input[0].name == "x"


def test_shape_inferred_model(fusion):
    # value_info for every intermediate: the source's channel count comes from it (so closed
    # Slices suffice), and nothing is left describing the removed branch values.
    model = onnx.shape_inference.infer_shapes(candidate(form="slice", source="relu", open_end=False))
    assert len(model.graph.value_info) > 2
    outcome = fusion.fused(model, groups=4)
    names = {o for n in outcome.fused.graph.node for o in n.output}
    assert {v.name for v in outcome.fused.graph.value_info} <= names
    concat_out = nodes(model, "Concat")[0].output[0]
    (info,) = [v for v in outcome.fused.graph.value_info if v.name == concat_out]
    assert [d.dim_value for d in info.type.tensor_type.shape.dim] == [1, 16, 5, 5]


def test_candidate_inside_a_subgraph(fusion):
    body = candidate(form="split", channels=8, groups=2).graph
    del body.input[:]  # x comes from the outer scope
    otherwise = helper.make_graph([helper.make_node("Identity", ["x"], ["same"])], "else", [],
                                  [helper.make_tensor_value_info("same", TensorProto.FLOAT, [None] * 4)])
    out = body.output[0].name
    graph = helper.make_graph(
        [helper.make_node("If", ["cond"], [out], name="if", then_branch=body, else_branch=otherwise)], "outer",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 8, 5, 5]),
         helper.make_tensor_value_info("cond", TensorProto.BOOL, [])],
        [helper.make_tensor_value_info(out, TensorProto.FLOAT, [None] * 4)])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    outcome = fusion.run(model)
    (rewrite,) = outcome.report.rewrites
    assert rewrite.groups == 2 and rewrite.graph == body.name
    fused_body = attribute(outcome.fused.graph.node[0], "then_branch")
    assert collections.Counter(n.op_type for n in fused_body.node) == {"Conv": 1, "Relu": 1}
    (conv,) = [n for n in fused_body.node if n.op_type == "Conv"]
    assert attribute(conv, "group") == 2 and conv.input[0] == "x"
    assert {i.name for i in fused_body.initializer} == set(conv.input[1:])


# -- near misses: left alone, with the reason ------------------------------------------------


@pytest.mark.parametrize("form,opset", [("split", 11), ("split", 13), ("split", 18), ("slice", 11), ("slice", 17)])
def test_uneven_split(fusion, form, opset):
    # Split sizes as attribute (opset 11) or input (13, 18); 67 channels do not divide by 4.
    model = candidate(form=form, opset=opset, channels=67, ranges=[(0, 16), (16, 32), (32, 48), (48, 67)],
                      spatial=(3, 3))
    fusion.untouched(model, "uneven split: 16,16,16,19 channels")


def test_uneven_num_outputs_split(fusion):
    # num_outputs=4 over 10 channels: 3,3,3,1.
    model = candidate(form="split", opset=18, split_style="num_outputs", channels=10,
                      ranges=[(0, 3), (3, 6), (6, 9), (9, 10)])
    fusion.untouched(model, "uneven split: 3,3,3,1")


@pytest.mark.parametrize("form", ["split", "slice"])
@pytest.mark.parametrize("branch,reason", [
    ({"kernel": (1, 1)}, "different kernel shapes between branches: (4,3,3) vs (4,1,1)"),
    ({"attrs": {"pads": [2, 0, 0, 2]}}, "different pads between branches: (1,1,1,1) vs (2,0,0,2)"),
    ({"attrs": {"auto_pad": "SAME_UPPER", "pads": None}}, "different auto_pad between branches: NOTSET vs SAME_UPPER"),
    ({"group": 2}, "different group counts: 1,2,1,1"),
    ({"out": 6}, "different output channel counts: 4,6,4,4"),
], ids=["kernel", "pads", "auto_pad", "group", "out"])
def test_branches_that_differ(fusion, form, branch, reason):
    model = candidate(form=form, channels=16, per_branch={1: branch})
    fusion.untouched(model, reason)


@pytest.mark.parametrize("form", ["split", "slice"])
@pytest.mark.parametrize("key,values", [("strides", ([1, 1], [2, 2])), ("dilations", ([1, 1], [2, 2]))])
def test_branches_with_different_strides_or_dilations(fusion, form, key, values):
    # 1×1 kernels on a 1×1 image: strides and dilations change nothing in the shapes, so the
    # model is valid, but they are different convolutions all the same.
    model = candidate(form=form, channels=8, groups=2, spatial=(1, 1), kernel=(1, 1),
                      per_branch={0: {"attrs": {key: values[0]}}, 1: {"attrs": {key: values[1]}}})
    fusion.untouched(model, f"different {key} between branches: (1,1) vs (2,2)")


def test_same_upper_vs_same_lower(fusion):
    model = candidate(form="split", channels=8, groups=2, kernel=(2, 2), attrs={"pads": None}, per_branch={
        0: {"attrs": {"auto_pad": "SAME_UPPER"}}, 1: {"attrs": {"auto_pad": "SAME_LOWER"}}})
    fusion.untouched(model, "different auto_pad between branches: SAME_UPPER vs SAME_LOWER")


@pytest.mark.parametrize("form", ["split", "slice"])
def test_branch_output_also_used_elsewhere(fusion, form):
    model = candidate(form=form, channels=8, groups=2)
    conv = nodes(model, "Conv")[0]
    model.graph.node.append(helper.make_node("Sigmoid", [conv.output[0]], ["side"], name="side"))
    model.graph.output.append(helper.make_tensor_value_info("side", TensorProto.FLOAT, [1, 4, 5, 5]))
    fusion.untouched(model, f"branch output {conv.output[0]} is used outside the Concat")


def test_branch_output_is_graph_output(fusion):
    model = candidate(form="split", channels=8, groups=2)
    conv = nodes(model, "Conv")[1]
    model.graph.output.append(helper.make_tensor_value_info(conv.output[0], TensorProto.FLOAT, [1, 4, 5, 5]))
    fusion.untouched(model, f"branch output {conv.output[0]} is used outside the Concat")


@pytest.mark.parametrize("form", ["split", "slice"])
def test_branch_input_also_used_elsewhere(fusion, form):
    model = candidate(form=form, channels=8, groups=2)
    read = nodes(model, "Conv")[1].input[0]
    model.graph.node.append(helper.make_node("Sigmoid", [read], ["side"], name="side"))
    model.graph.output.append(helper.make_tensor_value_info("side", TensorProto.FLOAT, [1, 4, 5, 5]))
    fusion.untouched(model, f"branch input {read} is used outside its branch")


def test_split_output_is_graph_output(fusion):
    model = candidate(form="split", channels=8, groups=2)
    read = nodes(model, "Split")[0].output[0]
    model.graph.output.append(helper.make_tensor_value_info(read, TensorProto.FLOAT, [1, 4, 5, 5]))
    fusion.untouched(model, "is used outside its branch")


@pytest.mark.parametrize("form", ["split", "slice"])
@pytest.mark.parametrize("order", [(1, 0, 2, 3), (3, 2, 1, 0), (0, 1, 3, 2)])
def test_concat_out_of_channel_order(fusion, form, order):
    model = candidate(form=form, channels=8, groups=4, order=order)
    fusion.untouched(model, "branches are concatenated out of channel order")


def test_overlapping_ranges(fusion):
    model = candidate(form="slice", channels=8, ranges=[(0, 4), (2, 6), (4, 8)], open_end=False)
    fusion.untouched(model, "channel ranges overlap: 0:4 and 2:6")


def test_gap_between_ranges(fusion):
    model = candidate(form="slice", channels=12, ranges=[(0, 4), (8, 12)])
    fusion.untouched(model, "channel ranges leave a gap: channels 4:8 are read by no branch")


def test_leading_channels_unread(fusion):
    model = candidate(form="slice", channels=12, ranges=[(4, 8), (8, 12)])
    fusion.untouched(model, "channels 0:4 are read by no branch")


def test_trailing_channels_unread(fusion):
    model = candidate(form="slice", channels=12, ranges=[(0, 4), (4, 8)], open_end=False)
    fusion.untouched(model, "branches read channels 0:8 of 12")


def test_closed_slices_of_unknown_channel_count(fusion):
    # Without the channel count and without an open-ended Slice, nobody can prove the branches
    # read every channel.
    model = candidate(form="slice", channels=8, groups=2, source="unknown", open_end=False)
    fusion.untouched(model, "its channel count is unknown", shapes=shapes_for())


def test_closed_slices_channel_count_read_through_an_elementwise_op(fusion):
    # The Relu's output has no recorded shape, but its channels are those of the graph input.
    model = candidate(form="slice", channels=8, groups=2, source="relu", open_end=False)
    fusion.fused(model, groups=2)


def test_split_with_an_output_no_branch_reads(fusion):
    b = GraphBuilder(17)
    parts = b.split("x", 12, 3)
    convs = [b.conv(p, b.weight((4, 4, 1, 1), 4), None, kernel_shape=[1, 1]) for p in parts[:2]]
    y = b.node("Concat", convs, axis=1)[0]
    model = b.model([("x", [1, 12, 3, 3])], [(y, [1, 8, 3, 3]), (parts[2], [1, 4, 3, 3])])
    fusion.untouched(model, "Split has 3 outputs but only 2 feed the Concat")


@pytest.mark.parametrize("what", ["weight", "bias"])
def test_weights_not_constants(fusion, what):
    model = candidate(form="split", channels=8, groups=2)
    conv = nodes(model, "Conv")[1]
    index = 1 if what == "weight" else 2
    init = next(i for i in model.graph.initializer if i.name == conv.input[index])
    model.graph.initializer.remove(init)
    model.graph.input.append(helper.make_tensor_value_info(init.name, TensorProto.FLOAT, list(init.dims)))
    reason = "weights of" if what == "weight" else "bias of"
    fusion.untouched(model, reason, f"{conv.name}", "not", "constant")


def test_concat_not_on_the_channel_axis(fusion):
    model = candidate(form="split", channels=8, groups=2, concat_axis=2)
    fusion.untouched(model, "Concat on axis 2, not the channel axis")


@pytest.mark.parametrize("form", ["split", "slice"])
def test_read_not_on_the_channel_axis(fusion, form):
    # Split the height, convolve each half, join along channels: no grouped convolution.
    b = GraphBuilder(17)
    if form == "split":
        parts = b.node("Split", ["x", b.const("split", np.array([3, 3], np.int64))], 2, axis=2)
    else:
        ints = lambda v: b.const("bound", np.array([v], np.int64))
        parts = [b.node("Slice", ["x", ints(s), ints(e), ints(2)])[0] for s, e in [(0, 3), (3, 6)]]
    convs = [b.conv(p, b.weight((4, 8, 1, 1), 8), None, kernel_shape=[1, 1]) for p in parts]
    y = b.node("Concat", convs, axis=1)[0]
    model = b.model([("x", [1, 8, 6, 6])], [(y, [1, 8, 3, 6])])
    fusion.untouched(model, f"{form.capitalize()} on axis 2, not the channel axis")


def test_slice_with_step_two(fusion):
    # x[:, 0::2] and x[:, 1::2]: every other channel, not a contiguous range.
    b = GraphBuilder(17)
    ints = lambda v: b.const("bound", np.array([v], np.int64))
    parts = [b.node("Slice", ["x", ints(start), ints(INT64_MAX), ints(1), ints(2)])[0] for start in (0, 1)]
    convs = [b.conv(p, b.weight((4, 4, 3, 3), 36), None, kernel_shape=[3, 3], pads=[1, 1, 1, 1]) for p in parts]
    y = b.node("Concat", convs, axis=1)[0]
    model = b.model([("x", [1, 8, 4, 4])], [(y, [1, 8, 4, 4])])
    fusion.untouched(model, "step 2")


def test_slice_with_step_two_in_one_branch(fusion):
    b = GraphBuilder(17)
    ints = lambda v: b.const("bound", np.array([v], np.int64))
    first = b.node("Slice", ["x", ints(0), ints(4), ints(1)])[0]
    second = b.node("Slice", ["x", ints(0), ints(8), ints(1), ints(2)])[0]
    convs = [b.conv(p, b.weight((4, 4, 1, 1), 4), None, kernel_shape=[1, 1]) for p in (first, second)]
    y = b.node("Concat", convs, axis=1)[0]
    fusion.untouched(b.model([("x", [1, 8, 4, 4])], [(y, [1, 8, 4, 4])]), "step 2")


@pytest.mark.parametrize("form", ["split", "slice"])
def test_bounds_computed_at_run_time(fusion, form):
    # Split sizes / Slice ends computed by an op the matcher does not fold are not constants.
    model = candidate(form=form, channels=8, groups=2, opset=17)
    target = nodes(model, "Split" if form == "split" else "Slice")[-1]
    index = 1 if form == "split" else 2
    target.input[index], bound = "computed", target.input[index]
    model.graph.node.insert(0, helper.make_node("Abs", [bound], ["computed"], name="compute"))
    reason = "cannot tell the Split sizes (computed at run time)" if form == "split" else "computed at run time"
    fusion.untouched(model, reason)


def test_negative_slice_bounds_on_unknown_channel_count(fusion):
    b = GraphBuilder(17)
    ints = lambda v: b.const("bound", np.array([v], np.int64))
    x = b.node("Relu", ["x"], name="pre")[0]  # no shape recorded
    parts = [b.node("Slice", [x, ints(s), ints(e), ints(1)])[0] for s, e in [(0, 4), (-4, INT64_MAX)]]
    convs = [b.conv(p, b.weight((4, 4, 1, 1), 4), None, kernel_shape=[1, 1]) for p in parts]
    y = b.node("Concat", convs, axis=1)[0]
    fusion.untouched(b.model([("x", [1, "C", 3, 3])], [(y, [1, 8, 3, 3])]), "counts from the end",
                     "channel count is unknown", shapes={"x": [1, 8, 3, 3]})


def test_branches_read_different_tensors(fusion):
    b = GraphBuilder(17)
    ints = lambda v: b.const("bound", np.array([v], np.int64))
    parts = [b.node("Slice", [src, ints(s), ints(e), ints(1)])[0] for src, s, e in [("x", 0, 4), ("z", 4, 8)]]
    convs = [b.conv(p, b.weight((4, 4, 1, 1), 4), None, kernel_shape=[1, 1]) for p in parts]
    y = b.node("Concat", convs, axis=1)[0]
    model = b.model([("x", [1, 8, 3, 3]), ("z", [1, 8, 3, 3])], [(y, [1, 8, 3, 3])])
    fusion.untouched(model, "branches read from different tensors")


def test_branches_mix_split_and_slice(fusion):
    b = GraphBuilder(17)
    halves = b.split("x", 8, 2)
    upper = b.node("Slice", ["x"] + [b.const("bound", np.array([v], np.int64)) for v in (4, 8, 1)])[0]
    convs = [b.conv(v, b.weight((4, 4, 1, 1), 4), None, kernel_shape=[1, 1]) for v in (halves[0], upper)]
    y = b.node("Concat", convs, axis=1)[0]
    model = b.model([("x", [1, 8, 3, 3])], [(y, [1, 8, 3, 3]), (halves[1], [1, 4, 3, 3])])
    fusion.untouched(model, "branches mix Split and Slice")


def test_concat_joins_a_non_branch_input(fusion):
    model = candidate(form="split", channels=8, groups=2)
    concat = nodes(model, "Concat")[0]
    concat.input.append("x")
    fusion.untouched(model, "the Concat also joins inputs that are not branch convolutions")


def test_one_near_miss_beside_one_candidate(fusion):
    b = GraphBuilder(17, seed=1)
    y = b.grouped_conv("x", 8, 8, 2, form="split", kernel=(3, 3), pads=[1, 1, 1, 1])
    z = b.grouped_conv("x", 8, 8, 2, form="slice", kernel=(3, 3), pads=[1, 1, 1, 1])
    b.nodes[-2].attribute.append(helper.make_attribute("dilations", [2, 2]))  # the last branch Conv
    for attr in b.nodes[-2].attribute:
        if attr.name == "pads":
            attr.ints[:] = [2, 2, 2, 2]
    w = b.node("Add", [y, z])[0]
    model = b.model([("x", [1, 8, 4, 4])], [(w, [1, 8, 4, 4])])
    outcome = fusion.run(model)
    assert [r.groups for r in outcome.report.rewrites] == [2]
    assert outcome.reasons() == ["different dilations between branches: (1,1) vs (2,2)"]
    assert outcome.after == {"Conv": 3, "Slice": 2, "Concat": 1, "Add": 1}
    assert [attribute(n, "group", 1) for n in nodes(outcome.fused, "Conv")] == [2, 1, 1]
    assert dead_constants(outcome.fused) == []


def test_near_miss_reported_with_its_nodes(fusion):
    model = candidate(form="split", channels=8, groups=2, concat_axis=2)
    outcome = fusion.untouched(model, "not the channel axis")
    (skip,) = outcome.report.skipped
    concat = nodes(model, "Concat")[0]
    assert skip.location == concat.name
    assert skip.nodes == [n.name for n in nodes(model, "Conv")]


# -- determinism, idempotency, check-only ----------------------------------------------------


@pytest.mark.parametrize("form", ["split", "slice"])
def test_deterministic_and_idempotent(fusion, tmp_path, form):
    b = GraphBuilder(17, seed=2)
    y = b.grouped_conv("x", 8, 8, 4, form=form, kernel=(3, 3), pads=[1, 1, 1, 1])
    z = b.grouped_conv(y, 8, 8, 2, form="split", kernel=(1, 1))
    model = b.model([("x", [1, 8, 4, 4])], [(z, [1, 8, 4, 4])])
    first = fusion.fused(model, groups=[4, 2])
    again = tmp_path / "again.onnx"
    gconv_rewrite.fuse(first.original_path, output=again, verify=False)
    assert again.read_bytes() == first.fused_path.read_bytes()

    second = fusion.run(first.fused)  # fusing the fused model
    assert second.report.rewrites == [] and second.report.skipped == []
    assert second.after == first.after == {"Conv": 2}
    third = tmp_path / "third.onnx"
    gconv_rewrite.fuse(first.fused_path, output=third, verify=False)
    assert third.read_bytes() == first.fused_path.read_bytes()


def test_near_miss_is_idempotent(fusion, tmp_path):
    model = candidate(form="split", channels=67, ranges=[(0, 16), (16, 32), (32, 48), (48, 67)], spatial=(3, 3))
    first = fusion.untouched(model, "uneven split")
    second = fusion.untouched(first.fused, "uneven split")
    assert second.fused_path.read_bytes() == first.fused_path.read_bytes()


def test_check_and_dry_pass_change_nothing(fusion, tmp_path):
    model = candidate(form="split", channels=8, groups=2)
    path = tmp_path / "m.onnx"
    onnx.save(model, str(path))
    report = gconv_rewrite.check(path)
    assert [r.groups for r in report.rewrites] == [2] and report.skipped == []
    assert report.before == report.after and report.before.op_counts["Split"] == 1

    working = ir.serde.deserialize_model(model)
    dry = FuseSplitConvPass(rewrite=False)
    result = dry(working)
    assert not result.modified and [r.groups for r in dry.rewrites] == [2]
    assert op_counts(ir.serde.serialize_model(working)) == op_counts(model)

    live = FuseSplitConvPass()
    result = live(working)
    assert result.modified and [r.groups for r in live.rewrites] == [2]
    assert op_counts(ir.serde.serialize_model(result.model)) == {"Conv": 1, "Relu": 1}
    fusion.fused(model, groups=2)  # and the numbers


def test_fused_names_do_not_clash(fusion):
    model = candidate(form="split", channels=8, groups=2)
    first_conv = nodes(model, "Conv")[0].name
    # A node already has the name the fused Conv would take, and a graph input the name its
    # weight would then take.
    taken = f"{first_conv}_group2_1.weight"
    model.graph.input.append(helper.make_tensor_value_info(taken, TensorProto.FLOAT, [1, 8, 5, 5]))
    model.graph.node.append(helper.make_node("Identity", [taken], ["echo"], name=f"{first_conv}_group2"))
    model.graph.output.append(helper.make_tensor_value_info("echo", TensorProto.FLOAT, [1, 8, 5, 5]))
    outcome = fusion.fused(model, groups=2)
    (conv,) = outcome.fused_convs()
    assert conv.name == f"{first_conv}_group2_1"
    assert conv.input[1] == f"{taken}_1" and conv.input[2] == f"{first_conv}_group2_1.bias"
