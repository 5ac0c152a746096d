"""Sound reads (issue #20, findings 2 and 3): the ONNX passes fold or bake in only what provably
is a constant. A value computed from a dynamic dim (the batch) is not one, however it evaluates at
a few sizes; an initializer that is also a graph input (the user may feed another value) is not
one either. Such a candidate is left alone, with a reason that names the cause, and the written
model computes what the original did at every batch size and for every fed value."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import helper, numpy_helper

import gconv_rewrite
from samples.models import GraphBuilder
from tests.conftest import assert_same_outputs, attribute, nodes, op_counts, run_onnx

OPSETS = [13, 18]
WIDTH = 4  # channels per branch


def ints(b: GraphBuilder, base: str, values) -> str:
    return b.const(base, np.array(values, np.int64))


def branch_convs(b: GraphBuilder, parts: list[str], *, pads: bool = True) -> list[str]:
    """One 3×3 Conv (with bias) per branch, named c0, c1, ..."""
    outs = []
    for i, part in enumerate(parts):
        weight = b.weight((WIDTH, WIDTH, 3, 3), WIDTH * 9)
        bias = (b.rng.standard_normal(WIDTH) * 0.1).astype(np.float32)
        outs.append(b.conv(part, weight, bias, name=f"c{i}", kernel_shape=[3, 3], pads=[1] * 4 if pads else [0] * 4))
    return outs


def finish(b: GraphBuilder, outs: list[str], groups: int = 2) -> onnx.ModelProto:
    """Concat the branches; the input has a dynamic batch ``N``."""
    b.node("Concat", outs, name="cat", axis=1)
    channels = groups * WIDTH
    model = b.model([("x", ["N", channels, 5, 5])], [("cat_out", ["N", channels, 5, 5])])
    model.ir_version = 8  # IR >= 4: an initializer listed among the inputs is an overridable one
    return model


def with_graph_inputs(model: onnx.ModelProto, *names: str) -> onnx.ModelProto:
    """The same model with the initializers ``names`` also listed as graph inputs: the user may
    feed other values for them (onnxruntime then uses the fed ones)."""
    by_name = {i.name: i for i in model.graph.initializer}
    for name in names:
        init = by_name[name]
        model.graph.input.append(helper.make_tensor_value_info(name, init.data_type, list(init.dims)))
    return model


def fuse(tmp_path, model: onnx.ModelProto):
    onnx.checker.check_model(model, full_check=True)
    source, output = tmp_path / "m.onnx", tmp_path / "m.fused.onnx"
    onnx.save(model, str(source))
    result = gconv_rewrite.fuse(source, output=output)
    return result, source, output


def assert_left_alone(result, source, output, *phrases: str) -> None:
    """No rewrite, one skip whose reason says all of ``phrases``, and the same graph written."""
    report = result.report
    assert report.rewrites == [], [r.location for r in report.rewrites]
    assert len(report.skipped) == 1, [s.reason for s in report.skipped]
    for phrase in phrases:
        assert phrase in report.skipped[0].reason, report.skipped[0].reason
    assert op_counts(onnx.load(str(output))) == op_counts(onnx.load(str(source)))


def assert_same_with_fed(source, output, feeds: dict[str, np.ndarray]) -> None:
    """Original and written model agree when the overridable initializers are fed too."""
    x = np.random.default_rng(7).standard_normal((2, 2 * WIDTH, 5, 5)).astype(np.float32)
    want, got = run_onnx(source, {"x": x, **feeds}), run_onnx(output, {"x": x, **feeds})
    np.testing.assert_allclose(got[0], want[0], rtol=1e-4, atol=1e-4)


# -- finding 2: bounds computed from a dynamic dim --------------------------------------------


def batch_dependent_slices(opset: int) -> onnx.ModelProto:
    """Branch 0 reads channels [s : s+4], branch 1 [4-s : 8-s], with s = 4·((N−1) mod 2): at batch
    1 and 11 that is channels 0:4 and 4:8, at batch 2 and 4 the branches swap halves."""
    b = GraphBuilder(opset)
    batch = b.node("Gather", [b.node("Shape", ["x"])[0], ints(b, "zero", 0)], axis=0)[0]
    odd = b.node("Mod", [b.node("Sub", [batch, ints(b, "one", 1)])[0], ints(b, "two", 2)])[0]
    shift = b.node("Mul", [odd, ints(b, "four", 4)])[0]
    start0 = b.node("Unsqueeze", [shift, ints(b, "axes", [0])])[0]
    end0 = b.node("Add", [start0, ints(b, "four", [4])])[0]
    start1 = b.node("Sub", [ints(b, "four", [4]), start0])[0]
    end1 = b.node("Add", [start1, ints(b, "four", [4])])[0]
    axis = ints(b, "axis", [1])
    parts = [b.node("Slice", ["x", start0, end0, axis], name="slice0")[0],
             b.node("Slice", ["x", start1, end1, axis], name="slice1")[0]]
    return finish(b, branch_convs(b, parts))


@pytest.mark.parametrize("opset", OPSETS)
def test_bounds_computed_from_the_dynamic_batch_are_not_folded(tmp_path, opset):
    result, source, output = fuse(tmp_path, batch_dependent_slices(opset))
    assert_left_alone(result, source, output, "slice0", "starts", "dim 0 of 'x' (N)", "dynamic")
    for batch in (1, 2, 4):  # nothing wrong was written: the same numbers at every batch size
        assert_same_output_at(source, output, batch)


def assert_same_output_at(source, output, batch: int) -> None:
    assert_same_outputs(source, output, shapes={"x": [batch, 2 * WIDTH, 5, 5]})


def chunk_bounds(b: GraphBuilder, shape_of_x: str, groups: int) -> list[tuple[str, str]]:
    """torch.chunk's bounds as the PyTorch legacy exporter writes them: the channel count read
    off the shape, divided by the number of chunks, times the chunk index."""
    channels = b.node("Gather", [shape_of_x, ints(b, "one", 1)], axis=0)[0]
    per_chunk = b.node("Div", [b.node("Add", [channels, ints(b, "zero", 0)])[0], ints(b, "n", groups)])[0]
    per_chunk = b.node("Unsqueeze", [per_chunk, ints(b, "axes", [0])])[0]
    bounds = []
    for i in range(groups):
        start = b.node("Mul", [per_chunk, ints(b, "i", [i])])[0]
        end = b.node("Mul", [per_chunk, ints(b, "i", [i + 1])])[0]
        bounds.append((start, end))
    return bounds


@pytest.mark.parametrize("opset", OPSETS)
@pytest.mark.parametrize("shape_form", ["whole", "sliced", "concatenated"])
def test_static_chunk_bounds_beside_a_dynamic_batch_still_fuse(tmp_path, opset, shape_form):
    """The channel count is static even though the batch in the same Shape is not: the bounds
    depend only on the channel element, so they fold (also after the shape vector is sliced or
    rebuilt with the dynamic batch in it)."""
    b = GraphBuilder(opset)
    shape = b.node("Shape", ["x"])[0]
    if shape_form == "sliced":
        shape = b.node("Slice", [shape, ints(b, "s", [0]), ints(b, "e", [2])])[0]
    elif shape_form == "concatenated":
        batch = b.node("Slice", [shape, ints(b, "s", [0]), ints(b, "e", [1])])[0]
        rest = b.node("Slice", [shape, ints(b, "s", [1]), ints(b, "e", [4])])[0]
        shape = b.node("Concat", [batch, rest], axis=0)[0]
    groups = 2
    axis = ints(b, "axis", [1])
    parts = [b.node("Slice", ["x", start, end, axis])[0] for start, end in chunk_bounds(b, shape, groups)]
    result, source, output = fuse(tmp_path, finish(b, branch_convs(b, parts)))
    assert [r.groups for r in result.report.rewrites] == [2], [s.reason for s in result.report.skipped]
    assert result.report.skipped == []
    written = onnx.load(str(output))
    assert op_counts(written) == {"Conv": 1}  # the bound computations went with the Slices
    assert [attribute(n, "group", 1) for n in nodes(written, "Conv")] == [2]
    for batch in (1, 2, 4):
        assert_same_output_at(source, output, batch)


@pytest.mark.parametrize("opset", OPSETS)
def test_a_bound_that_takes_the_minimum_with_the_batch_is_not_folded(tmp_path, opset):
    """end = min(N, 1)·4 + 4 is 8 at every batch size, but only a proof may say so: a value
    computed from a dynamic dim is left alone unless the dependency is provably cut."""
    b = GraphBuilder(opset)
    batch = b.node("Gather", [b.node("Shape", ["x"])[0], ints(b, "zero", [0])], axis=0)[0]
    capped = b.node("Min", [batch, ints(b, "one", [1])])[0]
    end = b.node("Add", [b.node("Mul", [capped, ints(b, "four", [4])])[0], ints(b, "four", [4])])[0]
    axis = ints(b, "axis", [1])
    parts = [b.node("Slice", ["x", ints(b, "s", [0]), ints(b, "e", [4]), axis])[0],
             b.node("Slice", ["x", ints(b, "s", [4]), end, axis], name="slice1")[0]]
    result, source, output = fuse(tmp_path, finish(b, branch_convs(b, parts)))
    assert_left_alone(result, source, output, "slice1", "ends", "dim 0 of 'x' (N)")
    for batch in (1, 2):
        assert_same_output_at(source, output, batch)


# -- finding 3: initializers that are also graph inputs ---------------------------------------


def split_model(opset: int, *, split_sizes_name: str | None = None) -> tuple[GraphBuilder, list[str]]:
    b = GraphBuilder(opset)
    sizes = b.const(split_sizes_name or "split", np.array([WIDTH, WIDTH], np.int64))
    parts = b.node("Split", ["x", sizes], 2, name="split", axis=1)
    return b, branch_convs(b, parts)


@pytest.mark.parametrize("opset", OPSETS)
def test_per_branch_mul_by_a_graph_input_is_not_baked_in(tmp_path, opset):
    """Each branch conv is scaled by its own initializer s0, s1 that the user may feed: stacking
    them into one constant would ignore what is fed."""
    b, outs = split_model(opset)
    scales = [b.const("s", np.full((1, WIDTH, 1, 1), 0.5 + i, np.float32)) for i in range(2)]
    outs = [b.node("Mul", [y, s])[0] for y, s in zip(outs, scales)]
    model = with_graph_inputs(finish(b, outs), *scales)
    result, source, output = fuse(tmp_path, model)
    assert_left_alone(result, source, output, "the Mul after branch conv c0", f"'{scales[0]}'",
                      "a graph input (replaceable at run time)")
    assert_same_with_fed(source, output, {s: np.full((1, WIDTH, 1, 1), -3, np.float32) for s in scales})


@pytest.mark.parametrize("opset", OPSETS)
@pytest.mark.parametrize("op", ["BatchNormalization", "Clip", "Add"])
def test_other_tail_constants_that_are_graph_inputs_are_not_baked_in(tmp_path, opset, op):
    b, outs = split_model(opset)
    overridable = []
    tailed = []
    for y in outs:
        if op == "BatchNormalization":
            params = [b.const(p, np.full(WIDTH, v, np.float32)) for p, v in
                      (("gamma", 1.5), ("beta", 0.1), ("mean", 0.2), ("var", 2.0))]
            overridable.append(params[3])  # only the variance is overridable
            tailed.append(b.node("BatchNormalization", [y, *params])[0])
        elif op == "Clip":
            low, high = b.const("low", np.array(-0.5, np.float32)), b.const("high", np.array(0.5, np.float32))
            overridable.append(high)
            tailed.append(b.node("Clip", [y, low, high])[0])
        else:
            shift = b.const("shift", np.full((WIDTH, 1, 1), 0.25, np.float32))
            overridable.append(shift)
            tailed.append(b.node("Add", [shift, y])[0])  # the constant first: also read as a tail
    model = with_graph_inputs(finish(b, tailed), *overridable)
    result, source, output = fuse(tmp_path, model)
    assert_left_alone(result, source, output, f"the {op} after branch conv c0", f"'{overridable[0]}'",
                      "a graph input (replaceable at run time)")
    fed = {name: np.asarray(numpy_helper.to_array(next(i for i in model.graph.initializer if i.name == name)) * 3)
           for name in overridable}
    assert_same_with_fed(source, output, fed)


@pytest.mark.parametrize("opset", OPSETS)
@pytest.mark.parametrize("bound", ["starts", "ends", "axes"])
def test_slice_bounds_that_are_graph_inputs_are_not_baked_in(tmp_path, opset, bound):
    """Branch 1's Slice reads an overridable bound: fed other values, it reads other channels."""
    b = GraphBuilder(opset)
    inputs = {"starts": [ints(b, "start", [0]), ints(b, "start", [WIDTH])],
              "ends": [ints(b, "end", [WIDTH]), ints(b, "end", [2 * WIDTH])],
              "axes": [ints(b, "axis", [1]), ints(b, "axis", [1])]}
    parts = [b.node("Slice", ["x", inputs["starts"][i], inputs["ends"][i], inputs["axes"][i]], name=f"slice{i}")[0]
             for i in range(2)]
    overridable = inputs[bound][1]
    model = with_graph_inputs(finish(b, branch_convs(b, parts)), overridable)
    result, source, output = fuse(tmp_path, model)
    assert_left_alone(result, source, output, f"slice1 reads its {bound} from '{overridable}'",
                      "a graph input (replaceable at run time)")
    # One bound alone can only be fed an equal range in another spelling (the conv wants 4 channels);
    # the next test feeds both bounds of a Slice.
    fed = {"starts": [-WIDTH], "ends": [2**62], "axes": [-3]}[bound]
    assert_same_with_fed(source, output, {overridable: np.array(fed, np.int64)})


@pytest.mark.parametrize("opset", OPSETS)
def test_slice_bounds_fed_other_values_read_other_channels(tmp_path, opset):
    """Both bounds of branch 1 overridable: fed [0:4], branch 1 reads the first half too. The
    written model must follow what is fed, as the original does."""
    b = GraphBuilder(opset)
    axis = ints(b, "axis", [1])
    start, end = ints(b, "start", [WIDTH]), ints(b, "end", [2 * WIDTH])
    parts = [b.node("Slice", ["x", ints(b, "s", [0]), ints(b, "e", [WIDTH]), axis], name="slice0")[0],
             b.node("Slice", ["x", start, end, axis], name="slice1")[0]]
    model = with_graph_inputs(finish(b, branch_convs(b, parts)), start, end)
    result, source, output = fuse(tmp_path, model)
    assert_left_alone(result, source, output, f"slice1 reads its starts from '{start}'")
    assert_same_with_fed(source, output, {start: np.array([0], np.int64), end: np.array([WIDTH], np.int64)})


@pytest.mark.parametrize("opset", OPSETS)
def test_computed_slice_bounds_that_read_a_graph_input_are_not_folded(tmp_path, opset):
    """torch.chunk bounds whose chunk count is an overridable initializer: not a constant."""
    b = GraphBuilder(opset)
    channels = b.node("Gather", [b.node("Shape", ["x"])[0], ints(b, "one", 1)], axis=0)[0]
    count = ints(b, "chunks", 2)
    per_chunk = b.node("Unsqueeze", [b.node("Div", [channels, count])[0], ints(b, "axes", [0])])[0]
    axis = ints(b, "axis", [1])
    parts = [b.node("Slice", ["x", ints(b, "s", [0]), per_chunk, axis], name="slice0")[0],
             b.node("Slice", ["x", per_chunk, ints(b, "e", [2 * WIDTH]), axis], name="slice1")[0]]
    model = with_graph_inputs(finish(b, branch_convs(b, parts)), count)
    result, source, output = fuse(tmp_path, model)
    assert_left_alone(result, source, output, "slice0", f"'{count}'", "a graph input (replaceable at run time)")
    assert_same_with_fed(source, output, {count: np.array(2, np.int64)})


@pytest.mark.parametrize("opset", OPSETS)
def test_split_sizes_that_are_a_graph_input_are_not_baked_in(tmp_path, opset):
    b, outs = split_model(opset, split_sizes_name="sizes")
    sizes = next(i.name for i in b.initializers if i.name.startswith("sizes"))
    model = with_graph_inputs(finish(b, outs), sizes)
    result, source, output = fuse(tmp_path, model)
    assert_left_alone(result, source, output, "split", f"'{sizes}'", "a graph input (replaceable at run time)")
    assert_same_with_fed(source, output, {sizes: np.array([WIDTH, WIDTH], np.int64)})


@pytest.mark.parametrize("opset", OPSETS)
def test_quantized_weight_scale_that_is_a_graph_input_is_named(tmp_path, opset):
    """QDQ: a branch weight dequantized with a scale the user may feed is not stacked."""
    b = GraphBuilder(opset)
    sizes = b.const("split", np.array([WIDTH, WIDTH], np.int64))
    parts = b.node("Split", ["x", sizes], 2, name="split", axis=1)
    outs, scales = [], []
    for i, part in enumerate(parts):
        data = b.const("q", b.rng.integers(-100, 100, (WIDTH, WIDTH, 3, 3)).astype(np.int8))
        scales.append(b.const("scale", np.array(0.01, np.float32)))
        weight = b.node("DequantizeLinear", [data, scales[-1]], name=f"dq{i}")[0]
        outs.append(b.node("Conv", [part, weight], name=f"c{i}", kernel_shape=[3, 3], pads=[1] * 4)[0])
    model = with_graph_inputs(finish(b, outs), scales[1])
    result, source, output = fuse(tmp_path, model)
    assert_left_alone(result, source, output, f"'{scales[1]}'", "a graph input (replaceable at run time)")
    assert_same_with_fed(source, output, {scales[1]: np.array(0.5, np.float32)})


@pytest.mark.parametrize("opset", OPSETS)
def test_batchnorm_after_the_concat_with_a_graph_input_parameter_is_not_folded(tmp_path, opset):
    """The fuse is sound (the branch weights are constants); the BatchNormalization after it reads
    an overridable mean: it stays as a node, and the report says why it was not folded."""
    b, outs = split_model(opset)
    cat = b.node("Concat", outs, name="cat", axis=1)[0]
    params = [b.const(p, np.full(2 * WIDTH, v, np.float32)) for p, v in
              (("gamma", 1.5), ("beta", 0.1), ("mean", 0.2), ("var", 2.0))]
    b.node("BatchNormalization", [cat, *params], name="bn")
    model = b.model([("x", ["N", 2 * WIDTH, 5, 5])], [("bn_out", ["N", 2 * WIDTH, 5, 5])])
    model.ir_version = 8
    model = with_graph_inputs(model, params[2])
    result, source, output = fuse(tmp_path, model)
    assert [r.kind for r in result.report.rewrites] == ["fuse-split-conv"]
    assert [s.reason for s in result.report.skipped] == [
        f"the BatchNormalization bn after the fused conv reads '{params[2]}', a graph input "
        "(replaceable at run time); it is not folded"]
    written = onnx.load(str(output))
    assert op_counts(written).get("BatchNormalization") == 1
    assert [attribute(n, "group", 1) for n in nodes(written, "Conv")] == [2]
    assert_same_with_fed(source, output, {params[2]: np.full(2 * WIDTH, -1.0, np.float32)})


def test_ir3_initializers_listed_as_inputs_are_constants(tmp_path):
    """Before IR 4 every initializer is listed among the graph inputs, and onnxruntime holds them
    constant (it refuses a feed for one): such weights fuse (issue #21, item 10), and the written
    IR 3 file lists every initializer it holds as an input again."""
    b = GraphBuilder(8)
    parts = b.node("Split", ["x"], 2, name="split", axis=1, split=[WIDTH, WIDTH])
    model = finish(b, branch_convs(b, parts))
    model.ir_version = 3
    model = with_graph_inputs(model, *[i.name for i in model.graph.initializer])
    result, source, output = fuse(tmp_path, model)
    assert [r.groups for r in result.report.rewrites] == [2] and result.report.skipped == []
    assert result.report.verification.passed
    written = onnx.load(str(output))
    assert {i.name for i in written.graph.initializer} <= {i.name for i in written.graph.input}


def test_the_dependency_analysis_follows_each_element_of_a_shape():
    """Shape(x) of x [N, 8, 5, 5]: the elements Gather picks decide. Channels and spatial dims
    fold (whatever the batch); anything holding the batch, or computed from it, does not, and
    says which dim it depends on."""
    import onnx_ir as ir

    from gconv_rewrite.passes.onnx._fold import fold_explained

    b = GraphBuilder(13)
    shape = b.node("Shape", ["x"])[0]
    picked = {
        "channels": b.node("Gather", [shape, ints(b, "i", [1])], axis=0)[0],
        "spatial": b.node("ReduceProd", [b.node("Slice", [shape, ints(b, "s", [2]), ints(b, "e", [4])])[0]])[0],
        "channels_and_batch": b.node("Gather", [shape, ints(b, "i", [1, 0])], axis=0)[0],
        "batch_times_zero": b.node("Mul", [b.node("Gather", [shape, ints(b, "i", [0])], axis=0)[0],
                                           ints(b, "zero", [0])])[0],
        "reshaped_channels": b.node("Reshape", [b.node("Slice", [shape, ints(b, "s", [1]), ints(b, "e", [2])])[0],
                                                ints(b, "shape", [1, 1])])[0],
    }
    for name, value in picked.items():
        b.node("Identity", [value], name=f"use_{name}")
    graph = b.model([("x", ["N", 8, 5, 5])], [("x", ["N", 8, 5, 5])])
    model = ir.serde.deserialize_model(graph)
    values = {v.name: v for node in model.graph for v in node.outputs}
    folded = dict(zip(picked, fold_explained([values[v] for v in picked.values()], model)))
    assert folded["channels"].array.tolist() == [8]
    assert folded["spatial"].array.tolist() == [25]  # keepdims
    assert folded["reshaped_channels"].array.tolist() == [[8]]
    for name in ("channels_and_batch", "batch_times_zero"):  # × 0 cuts nothing this analysis proves
        assert folded[name].array is None
        assert folded[name].reason == "computed from dim 0 of 'x' (N), a dynamic dim"
