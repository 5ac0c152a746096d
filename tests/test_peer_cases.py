"""The peers' own test cases for this transformation, rebuilt as small ONNX models (issue 21,
"Grow your own battery"), and the Paddle round trip of issue 21 item 13.

Each case says what the peer expects, and asserts what this tool does: the structure (op counts,
``group``) and the numbers (onnxruntime, original vs rewritten, graph optimisations off), or the
reason it refuses. The facts of each case (shapes, split sizes, attributes, which branch reads
what) come from the peer's test; the models are built here. Where this tool decides otherwise on
purpose, a NOTE says so.

Peers read:
- OpenVINO ``ConvolutionToGroupConvolutionFusion`` tests (Split / VariadicSplit → Conv … → Concat
  fused; Split off the channel axis, convs of different attributes, uneven VariadicSplit: not).
- OpenVINO ARM / CPU ``ConvertGroupConvolution`` tests (a 1D GroupConvolution expanded into
  Split → Conv → Concat; depthwise and a dynamic channel dimension: not expanded).
- Huawei CANN ``ASplitConv2dConcatPass`` tests (split in two, 3×3 convs, concat: fused; SplitV of
  10, 14, 12 channels: not fused, and its Concat reads one conv twice).
- onnx-mlir recompose tests (``simple_split_conv_concat``: float64, Split with sizes, bias,
  ``onnx.Constant`` weights → one ``Conv(group=3)``; ``uneven_split`` 2/1: not).
"""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

import gconv_rewrite
from tests.conftest import assert_same_outputs, attribute, constants, feeds_for, nodes, op_counts, run_onnx

RNG = np.random.default_rng(21)


def weight(*shape, dtype=np.float32) -> np.ndarray:
    return (RNG.standard_normal(shape) * 0.3).astype(dtype)


def tensor(name: str, shape, elem_type=TensorProto.FLOAT):
    return helper.make_tensor_value_info(name, elem_type, shape)


def model(nodes_, inputs, outputs, initializers=(), opset: int = 18) -> onnx.ModelProto:
    """A checked model. Nodes are left unnamed, as the peers' test graphs are."""
    graph = helper.make_graph(nodes_, "peer_case", inputs, outputs, list(initializers))
    built = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    onnx.checker.check_model(built, full_check=True)
    return built


def split_conv_concat(channels: int, sizes: list[int], out_per_branch: list[int], *, kernel=(1, 1),
                      pads=None, concat_order=None, spatial=(14, 14), batch=2, variadic=False,
                      split_axis=1, concat_axis=1, weights=None) -> onnx.ModelProto:
    """x → Split(axis) → Conv_i (no bias) → Concat(axis): the shape every peer's test builds."""
    branches = len(sizes)
    weights = weights or [weight(out_per_branch[i], sizes[i] if split_axis == 1 else channels, *kernel)
                          for i in range(branches)]
    initializers = [numpy_helper.from_array(w, f"w{i}") for i, w in enumerate(weights)]
    outputs = [f"part{i}" for i in range(branches)]
    if variadic or len(set(sizes)) > 1:  # VariadicSplit: the sizes as an input
        initializers.append(numpy_helper.from_array(np.array(sizes, np.int64), "sizes"))
        split = helper.make_node("Split", ["x", "sizes"], outputs, axis=split_axis)
    else:
        split = helper.make_node("Split", ["x"], outputs, axis=split_axis, num_outputs=branches)
    branch_pads = pads if pads and isinstance(pads[0], list) else [pads] * branches  # one for all, or one each
    convs = [helper.make_node("Conv", [f"part{i}", f"w{i}"], [f"conv{i}"], **({"pads": p} if p else {}))
             for i, p in enumerate(branch_pads)]
    order = concat_order or list(range(branches))
    concat = helper.make_node("Concat", [f"conv{i}" for i in order], ["y"], axis=concat_axis)
    x_shape = [batch, channels, *spatial]
    y_shape = [f"y{i}" for i in range(len(x_shape))]  # left to shape inference
    return model([split, *convs, concat], [tensor("x", x_shape)], [tensor("y", y_shape)], initializers)


def expansion(tmp_path, original: onnx.ModelProto, *, name="native", shapes=None, **options):
    """Expand ``original`` through the API (its own verification off) and check the numbers here."""
    source, written = tmp_path / f"{name}.onnx", tmp_path / f"{name}.expanded.onnx"
    onnx.save(original, source)
    report = gconv_rewrite.expand(source, output=written, verify=False, shapes=shapes or {}, **options).report
    assert_same_outputs(source, written, shapes)
    return report, onnx.load(written)


# -- OpenVINO ConvolutionToGroupConvolutionFusion ------------------------------------------------


@pytest.mark.parametrize("variadic", [False, True], ids=["Split", "VariadicSplit"])
def test_openvino_split_of_five_fuses_to_one_group_conv(fusion, variadic):
    """Peer: x [2,10,14,14] → Split in 5 (or VariadicSplit 2×5) → five 1×1 convs of 3 outputs
    whose weights are all i+1 → Concat → one GroupConvolution of 5 groups, weights stacked."""
    constant_weights = [np.full((3, 2, 1, 1), i + 1, np.float32) for i in range(5)]
    case = split_conv_concat(10, [2] * 5, [3] * 5, weights=constant_weights, variadic=variadic)
    outcome = fusion.fused(case, groups=5)
    (conv,) = nodes(outcome.fused, "Conv")
    fused_weight = constants(outcome.fused)[conv.input[1]]
    assert fused_weight.shape == (15, 2, 1, 1)
    np.testing.assert_array_equal(fused_weight[:, 0, 0, 0], np.repeat(np.arange(1, 6), 3))  # 3 outputs a group


def test_openvino_split_off_the_channel_axis_is_refused(fusion):
    """Peer (negative): Split and Concat on axis 2, each conv reading all 10 channels: unchanged."""
    case = split_conv_concat(10, [7, 7], [3, 3], split_axis=2, concat_axis=2)
    fusion.untouched(case, "Split on axis 2, not the channel axis")


def test_openvino_convs_of_different_attributes_are_refused(fusion):
    """Peer (negative): one branch 2×2 with pads 1, the other 4×4 with pads 2: unchanged. This
    tool names the first difference it checks (the kernels)."""
    weights = [weight(3, 5, 2, 2), weight(3, 5, 4, 4)]
    case = split_conv_concat(10, [5, 5], [3, 3], weights=weights, pads=[[1, 1, 1, 1], [2, 2, 2, 2]])
    fusion.untouched(case, "different kernel shapes between branches: (5,2,2) vs (5,4,4)")


def test_openvino_uneven_variadic_split_is_refused(fusion):
    """Peer (negative): VariadicSplit of 3 and 7 channels: no grouped conv can read them."""
    fusion.untouched(split_conv_concat(10, [3, 7], [3, 3]), "uneven split: 3,7 channels")


@pytest.mark.parametrize("crossed", [False, True], ids=["concat-permuted", "reads-crossed"])
def test_what_openvino_does_not_check_is_refused_here(fusion, crossed):
    """Read from OpenVINO's source (DESIGN, lessons from peers): it checks neither the Concat's
    order nor which Split output each conv reads. Both forms compute a permuted grouped conv,
    which no ``group`` attribute can express: this tool refuses them."""
    case = split_conv_concat(10, [5, 5], [3, 3], concat_order=None if crossed else [1, 0])
    if crossed:  # conv0 reads the second half, conv1 the first; the Concat is in conv order
        case.graph.node[1].input[0], case.graph.node[2].input[0] = "part1", "part0"
    fusion.untouched(case, "branches are concatenated out of channel order (5:10,0:5)")


# -- OpenVINO ARM / CPU ConvertGroupConvolution ---------------------------------------------------


def test_arm_1d_group_conv_expands_into_split_conv_concat(tmp_path):
    """Peer: x [1,6,224], GroupConvolution of 2 groups (1 output, 3 inputs, kernel 5 each) →
    Split in 2 → two Convs → Concat on axis 1."""
    native = model([helper.make_node("Conv", ["x", "w"], ["y"], group=2)], [tensor("x", [1, 6, 224])],
                   [tensor("y", [1, 2, 220])], [numpy_helper.from_array(weight(2, 3, 5), "w")])
    report, expanded = expansion(tmp_path, native)
    assert [r.groups for r in report.rewrites] == [2]
    assert op_counts(expanded) == {"Split": 1, "Conv": 2, "Concat": 1}
    assert all(attribute(n, "group", 1) == 1 for n in nodes(expanded, "Conv"))
    assert attribute(nodes(expanded, "Concat")[0], "axis") == 1


def _depthwise_1d(channels_dim) -> onnx.ModelProto:
    return model([helper.make_node("Conv", ["x", "w"], ["y"], group=2)], [tensor("x", [1, channels_dim, 224])],
                 [tensor("y", [1, 2, 220])], [numpy_helper.from_array(weight(2, 1, 5), "w")])


def test_arm_depthwise_is_expanded_by_default_and_kept_on_request(tmp_path):
    """Peer (negative): a depthwise GroupConvolution (2 groups on 2 channels) is not expanded.
    NOTE: this tool expands depthwise convs by default (the expansion's purpose is a runtime
    without grouped kernels, and depthwise is one); ``--keep-depthwise`` gives the peer's choice."""
    report, expanded = expansion(tmp_path, _depthwise_1d(2), name="default")
    assert [r.groups for r in report.rewrites] == [2]
    assert op_counts(expanded) == {"Split": 1, "Conv": 2, "Concat": 1}

    report, kept = expansion(tmp_path, _depthwise_1d(2), name="kept", keep_depthwise=True)
    assert report.rewrites == []
    assert [s.reason for s in report.skipped] == ["depthwise (group == channels) kept: --keep-depthwise"]
    assert op_counts(kept) == {"Conv": 1} and attribute(kept.graph.node[0], "group") == 2


def test_arm_dynamic_channels_are_read_from_the_weights(tmp_path):
    """Peer (negative): the input's channel dimension is dynamic, so the peer does not fire.
    NOTE: this tool reads the channel count from the weights and ``group`` (2 groups of 1 input
    channel), so it expands; only its verification needs the dimension (``--shape x=1,2,224``)."""
    shapes = {"x": [1, 2, 224]}
    report, expanded = expansion(tmp_path, _depthwise_1d("C"), shapes=shapes)
    assert [r.groups for r in report.rewrites] == [2]
    assert op_counts(expanded) == {"Split": 1, "Conv": 2, "Concat": 1}
    with pytest.raises(gconv_rewrite.errors.RewriteError, match=r"dynamic dims \(C\): set them with --shape"):
        onnx.save(_depthwise_1d("C"), tmp_path / "unverifiable.onnx")
        gconv_rewrite.expand(tmp_path / "unverifiable.onnx", output=tmp_path / "out.onnx")


# -- Huawei CANN ASplitConv2dConcatPass -----------------------------------------------------------


def test_huawei_split_in_two_fuses(fusion):
    """Peer: NHWC x [1,7,7,32] → Split(axis 3) in 2 → 3×3 convs of 16 → 16, no padding → Concat
    → no Split and no Concat left. As ONNX (NCHW): x [1,32,7,7], Split on axis 1."""
    outcome = fusion.fused(split_conv_concat(32, [16, 16], [16, 16], kernel=(3, 3), spatial=(7, 7), batch=1),
                           groups=2)
    assert op_counts(outcome.fused) == {"Conv": 1}


def test_huawei_uneven_splitv_is_refused(fusion):
    """Peer (negative): SplitV of 10, 14, 12 channels, 3×3 convs of 16 outputs each: the Split and
    the Concat stay."""
    case = split_conv_concat(36, [10, 14, 12], [16, 16, 16], kernel=(3, 3), spatial=(7, 7), batch=1)
    fusion.untouched(case, "uneven split: 10,14,12 channels")


def test_huawei_concat_reading_one_conv_twice_is_refused(fusion):
    """Peer (negative, as its graph is wired): the Concat's third input is the second conv again,
    so the third conv's output is read by nothing. Not a grouped conv: unchanged.
    The reason says the Concat itself reads it twice."""
    case = split_conv_concat(36, [12, 12, 12], [16, 16, 16], kernel=(3, 3), spatial=(7, 7), batch=1,
                             concat_order=[0, 1, 1])
    outcome = fusion.untouched(case, "the Concat reads branch output", "2 times")
    assert outcome.after == {"Split": 1, "Conv": 3, "Concat": 1}


# -- onnx-mlir recompose --------------------------------------------------------------------------


def _onnx_mlir_simple(dtype, elem_type) -> onnx.ModelProto:
    """x [1,6,32,32] → Split(sizes [2,2,2] from a Constant) → three 3×3 convs (2 → 2, pads 1,
    kernel_shape given) with bias, weights and biases in Constant nodes → Concat."""
    constants_ = [helper.make_node("Constant", [], ["sizes"],
                                   value=numpy_helper.from_array(np.array([2, 2, 2], np.int64), "sizes"))]
    for i in range(3):
        constants_.append(helper.make_node("Constant", [], [f"w{i}"],
                                           value=numpy_helper.from_array(weight(2, 2, 3, 3, dtype=dtype), f"w{i}")))
        constants_.append(helper.make_node("Constant", [], [f"b{i}"],
                                           value=numpy_helper.from_array(weight(2, dtype=dtype), f"b{i}")))
    split = helper.make_node("Split", ["x", "sizes"], ["p0", "p1", "p2"], axis=1)
    convs = [helper.make_node("Conv", [f"p{i}", f"w{i}", f"b{i}"], [f"c{i}"], pads=[1, 1, 1, 1], kernel_shape=[3, 3],
                              dilations=[1, 1], strides=[1, 1]) for i in range(3)]
    concat = helper.make_node("Concat", ["c0", "c1", "c2"], ["y"], axis=1)
    return model([*constants_, split, *convs, concat], [tensor("x", [1, 6, 32, 32], elem_type)],
                 [tensor("y", [1, 6, 32, 32], elem_type)])


def test_onnx_mlir_simple_split_conv_concat_fuses(fusion):
    """Peer: → one Conv(group=3) with weights [6,2,3,3] and bias [6], attributes kept (here in
    float32: onnxruntime runs it)."""
    outcome = fusion.fused(_onnx_mlir_simple(np.float32, TensorProto.FLOAT), groups=3)
    (conv,) = nodes(outcome.fused, "Conv")
    assert constants(outcome.fused)[conv.input[1]].shape == (6, 2, 3, 3)
    assert constants(outcome.fused)[conv.input[2]].shape == (6,)
    assert attribute(conv, "kernel_shape") == [3, 3] and attribute(conv, "pads") == [1, 1, 1, 1]


def _as_float32(graph: onnx.ModelProto) -> onnx.ModelProto:
    """The same model in float32 (initializers, Constant values, inputs and outputs cast): how a
    float64 model's arithmetic is checked where onnxruntime has no float64 Conv."""
    cast = onnx.ModelProto.FromString(graph.SerializeToString())
    def to32(t):
        array = numpy_helper.to_array(t)
        if array.dtype == np.float64:
            t.CopyFrom(numpy_helper.from_array(array.astype(np.float32), t.name))
    for init in cast.graph.initializer:
        to32(init)
    for node in cast.graph.node:
        for attr in node.attribute:
            if attr.name == "value":
                to32(attr.t)
    for value in [*cast.graph.input, *cast.graph.output, *cast.graph.value_info]:
        if value.type.tensor_type.elem_type == TensorProto.DOUBLE:
            value.type.tensor_type.elem_type = TensorProto.FLOAT
    return cast


def test_onnx_mlir_float64_fuses_without_a_runtime_proof(tmp_path):
    """Peer: the same case in float64 → Conv(group=3), float64 weights. onnxruntime has no float64
    Conv, so verification is impossible and says so in one line; with --no-verify the model is
    written, and its arithmetic is checked here on a float32 cast of both models."""
    original = _onnx_mlir_simple(np.float64, TensorProto.DOUBLE)
    source, written = tmp_path / "f64.onnx", tmp_path / "f64.fused.onnx"
    onnx.save(original, source)
    with pytest.raises(gconv_rewrite.errors.RewriteError, match="onnxruntime cannot run the original model"):
        gconv_rewrite.fuse(source, output=written)
    report = gconv_rewrite.fuse(source, output=written, verify=False).report
    assert [r.groups for r in report.rewrites] == [3]
    fused = onnx.load(written)
    (conv,) = nodes(fused, "Conv")
    assert op_counts(fused) == {"Conv": 1} and attribute(conv, "group") == 3
    stacked = constants(fused)[conv.input[1]]
    assert stacked.dtype == np.float64 and stacked.shape == (6, 2, 3, 3)
    np.testing.assert_array_equal(stacked, np.concatenate([constants(original)[f"w{i}"] for i in range(3)]))
    feeds = feeds_for(_as_float32(original), seed=0)
    want, got = run_onnx(_as_float32(original), feeds)[0], run_onnx(_as_float32(fused), feeds)[0]
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_onnx_mlir_uneven_split_is_refused(fusion):
    """Peer (negative): x [1,3,16,16] → Split 2/1 → convs of one output each, with bias → Concat:
    the weights are not concatenated."""
    weights = [weight(1, 2, 3, 3), weight(1, 1, 3, 3)]
    case = split_conv_concat(3, [2, 1], [1, 1], kernel=(3, 3), pads=[1, 1, 1, 1], spatial=(16, 16), batch=1,
                             weights=weights)
    fusion.untouched(case, "uneven split: 2,1 channels")


# -- where this tool decides otherwise on purpose --------------------------------------------------


def test_a_bias_on_one_branch_only_is_filled_with_zeros(fusion):
    """The peers' cases give every branch a bias or none. NOTE: here a branch without one is a
    bias of zeros, so the group fuses (the fused bias: the first branch's, then zeros)."""
    case = split_conv_concat(10, [5, 5], [3, 3], kernel=(3, 3), pads=[1, 1, 1, 1])
    case.graph.initializer.append(numpy_helper.from_array(weight(3), "b0"))
    case.graph.node[1].input.append("b0")
    outcome = fusion.fused(case, groups=2)
    (conv,) = nodes(outcome.fused, "Conv")
    bias = constants(outcome.fused)[conv.input[2]]
    np.testing.assert_array_equal(bias[3:], np.zeros(3, np.float32))


def test_3d_grouped_conv_is_expanded_and_fused_back(tmp_path, fusion):
    """The peers' cases are 1D and 2D. NOTE: a 3D grouped conv is expanded here like any other
    rank (TFLite, one reason to expand, has no grouped CONV_3D), and fuses back."""
    native = model([helper.make_node("Conv", ["x", "w", "b"], ["y"], group=2, pads=[1] * 6)],
                   [tensor("x", [1, 4, 6, 6, 6])], [tensor("y", [1, 6, 6, 6, 6])],
                   [numpy_helper.from_array(weight(6, 2, 3, 3, 3), "w"), numpy_helper.from_array(weight(6), "b")])
    report, expanded = expansion(tmp_path, native)
    assert [r.groups for r in report.rewrites] == [2]
    assert op_counts(expanded) == {"Split": 1, "Conv": 2, "Concat": 1}
    back = fusion.fused(expanded, groups=2)
    (conv,) = nodes(back.fused, "Conv")
    np.testing.assert_array_equal(constants(back.fused)[conv.input[1]], constants(native)["w"])


# -- issue 21 item 13: the Paddle round trip -------------------------------------------------------


def _paddle_block() -> onnx.ModelProto:
    """As Paddle2ONNX writes a grouped conv block: weights in a Constant node, Conv(group=4)
    without bias, then a BatchNormalization (inference mode) that the exporter did not fold."""
    scale, shift, mean = weight(8) + 1.0, weight(8), weight(8)
    variance = np.abs(weight(8)) + 0.5
    nodes_ = [helper.make_node("Constant", [], ["w"], name="conv_weight",
                               value=numpy_helper.from_array(weight(8, 2, 3, 3), "w")),
              helper.make_node("Conv", ["x", "w"], ["c"], name="conv", group=4, pads=[1, 1, 1, 1]),
              helper.make_node("BatchNormalization", ["c", "scale", "shift", "mean", "variance"], ["y"], name="bn")]
    params = [numpy_helper.from_array(v, n) for v, n in
              ((scale, "scale"), (shift, "shift"), (mean, "mean"), (variance, "variance"))]
    return model(nodes_, [tensor("x", [1, 8, 10, 10])], [tensor("y", [1, 8, 10, 10])], params)


def test_paddle_round_trip_folds_the_batchnorm_and_writes_initializers(tmp_path):
    """Issue 21 item 13, the documented behaviour: fuse(expand(m)) is one Conv(group=4) with the
    BatchNormalization folded into it, and its weight an initializer (the original's was a
    Constant node); the numbers are the original's."""
    native = _paddle_block()
    report, expanded = expansion(tmp_path, native)
    assert [r.groups for r in report.rewrites] == [4]
    # Expansion writes each branch's weight as an initializer, whatever held the original's.
    assert op_counts(expanded) == {"Split": 1, "Conv": 4, "Concat": 1, "BatchNormalization": 1}
    assert all(n.input[1] in {i.name for i in expanded.graph.initializer} for n in nodes(expanded, "Conv"))

    back = tmp_path / "round.onnx"
    onnx.save(expanded, tmp_path / "expanded.onnx")
    kinds = [r.kind for r in gconv_rewrite.fuse(tmp_path / "expanded.onnx", output=back).report.rewrites]
    assert kinds == ["fuse-split-conv", "fold-batchnorm"]
    round_trip = onnx.load(back)
    assert op_counts(round_trip) == {"Conv": 1}  # the BatchNormalization is folded in
    (conv,) = nodes(round_trip, "Conv")
    assert attribute(conv, "group") == 4 and len(conv.input) == 3  # the fold adds a bias
    assert conv.input[1] in {i.name for i in round_trip.graph.initializer}
    onnx.save(native, tmp_path / "native.onnx")
    assert_same_outputs(tmp_path / "native.onnx", back)


def test_paddle_round_trip_with_no_fold_bn_keeps_the_batchnorm(tmp_path):
    """With --no-fold-bn the round trip keeps the original's ops: Conv(group=4) → BatchNormalization,
    the grouped weight equal to the original Constant's value (now an initializer)."""
    native = _paddle_block()
    _, expanded = expansion(tmp_path, native)
    onnx.save(expanded, tmp_path / "expanded.onnx")
    back = tmp_path / "round.onnx"
    report = gconv_rewrite.fuse(tmp_path / "expanded.onnx", output=back, fold_bn=False).report
    assert [r.kind for r in report.rewrites] == ["fuse-split-conv"]
    round_trip = onnx.load(back)
    assert [n.op_type for n in round_trip.graph.node] == ["Conv", "BatchNormalization"]
    (conv,) = nodes(round_trip, "Conv")
    assert attribute(conv, "group") == 4 and len(conv.input) == 2
    np.testing.assert_array_equal(constants(round_trip)[conv.input[1]], constants(native)["w"])
    assert conv.input[1] in {i.name for i in round_trip.graph.initializer}
    onnx.save(native, tmp_path / "native.onnx")
    assert_same_outputs(tmp_path / "native.onnx", back)
