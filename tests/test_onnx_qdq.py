"""Quantized (QDQ) models: DequantizeLinear on each branch Conv's weight and bias, the Split input
without a static shape. Fused exactly (integers, scales and zero points stacked on the output
axis; the model stays quantized), refused with a reason where that is not exact; never a crash."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

import gconv_rewrite
from tests.conftest import assert_same_outputs
from tests.helpers import op_counts as ops


def qdq_model(*, per_channel: bool = True, equal_scales: bool = False, quantized_bias: bool = True,
              branches: int = 4, width: int = 4, unquantized_branch: bool = False) -> onnx.ModelProto:
    rng = np.random.default_rng(0)
    channels = branches * width
    inits = [numpy_helper.from_array(np.float32(0.05), "xs"), numpy_helper.from_array(np.int8(0), "xz"),
             numpy_helper.from_array(np.array([width] * branches, np.int64), "split")]
    nodes = [helper.make_node("QuantizeLinear", ["x", "xs", "xz"], ["xq"]),
             helper.make_node("DequantizeLinear", ["xq", "xs", "xz"], ["xd"]),  # no static shape after this
             helper.make_node("Split", ["xd", "split"], [f"s{i}" for i in range(branches)], axis=1)]
    outs = []
    for i in range(branches):
        data = rng.integers(-127, 127, (width, width, 3, 3)).astype(np.int8)
        if unquantized_branch and i == 1:
            inits.append(numpy_helper.from_array(data.astype(np.float32) * 0.01, f"w{i}"))
        else:
            inits.append(numpy_helper.from_array(data, f"wq{i}"))
            scale = (np.float32(0.004) if equal_scales else np.float32(rng.uniform(0.001, 0.01))) if not per_channel \
                else rng.uniform(0.001, 0.01, width).astype(np.float32)
            zero = np.zeros(np.shape(scale), np.int8)
            inits += [numpy_helper.from_array(np.asarray(scale), f"ws{i}"), numpy_helper.from_array(zero, f"wz{i}")]
            nodes.append(helper.make_node("DequantizeLinear", [f"wq{i}", f"ws{i}", f"wz{i}"], [f"w{i}"],
                                          **({"axis": 0} if per_channel else {})))
        inputs = [f"s{i}", f"w{i}"]
        if quantized_bias:
            inits.append(numpy_helper.from_array(rng.integers(-1000, 1000, width).astype(np.int32), f"bq{i}"))
            inits.append(numpy_helper.from_array(rng.uniform(1e-4, 5e-4, width).astype(np.float32), f"bs{i}"))
            nodes.append(helper.make_node("DequantizeLinear", [f"bq{i}", f"bs{i}"], [f"b{i}"], axis=0))
            inputs.append(f"b{i}")
        nodes.append(helper.make_node("Conv", inputs, [f"c{i}"], name=f"conv{i}", kernel_shape=[3, 3], pads=[1] * 4))
        outs.append(f"c{i}")
    nodes.append(helper.make_node("Concat", outs, ["y"], name="cat", axis=1))
    graph = helper.make_graph(nodes, "qdq", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, channels, 8, 8])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, channels, 8, 8])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model


@pytest.mark.parametrize("per_channel,equal_scales", [(True, False), (False, True), (False, False)])
def test_qdq_branches_fuse_exactly_and_stay_quantized(tmp_path, per_channel, equal_scales):
    source, output = tmp_path / "q.onnx", tmp_path / "q.fused.onnx"
    onnx.save(qdq_model(per_channel=per_channel, equal_scales=equal_scales), source)
    assert [r.groups for r in gconv_rewrite.check(source).rewrites] == [4]  # --check: no crash, a candidate
    result = gconv_rewrite.fuse(source, output=output)
    assert [(r.kind, r.groups) for r in result.report.rewrites] == [("fuse-split-conv", 4)]
    fused = onnx.load(output)
    assert ops(fused) == {"QuantizeLinear": 1, "DequantizeLinear": 3, "Conv": 1}
    inits = {i.name: numpy_helper.to_array(i) for i in fused.graph.initializer}
    conv = next(n for n in fused.graph.node if n.op_type == "Conv")
    producers = {o: n for n in fused.graph.node for o in n.output}
    weight_dq = producers[conv.input[1]]
    assert inits[weight_dq.input[0]].dtype == np.int8 and inits[weight_dq.input[0]].shape == (16, 4, 3, 3)
    # Equal per-tensor scales stay one scale; differing ones become per-channel on axis 0.
    assert inits[weight_dq.input[1]].shape == (() if equal_scales else (16,))
    assert result.report.verification.passed
    assert max(o.max_abs_error for o in result.report.verification.outputs) == 0.0  # exact
    assert_same_outputs(source, output)


def test_mixed_quantized_and_float_branches_are_refused_with_a_reason(tmp_path):
    source = tmp_path / "q.onnx"
    onnx.save(qdq_model(unquantized_branch=True, quantized_bias=False), source)
    report = gconv_rewrite.check(source)
    assert report.rewrites == []
    assert [s.reason for s in report.skipped] == [
        "some branches have a quantized weight (DequantizeLinear), others not"]


def test_expand_of_a_quantized_grouped_conv_says_why_not(tmp_path):
    source, fused = tmp_path / "q.onnx", tmp_path / "q.fused.onnx"
    onnx.save(qdq_model(), source)
    gconv_rewrite.fuse(source, output=fused)
    report = gconv_rewrite.check(fused, mode="expand")
    assert report.rewrites == []
    assert [s.reason for s in report.skipped] == [
        "weights are quantized (DequantizeLinear); expanding quantized weights is not supported"]
