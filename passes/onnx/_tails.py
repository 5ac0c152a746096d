"""Channel-wise ops that may follow a branch convolution, read in a format-free way.

A *tail* op acts on each channel on its own (BatchNormalization, activations, Add/Mul of a
per-channel constant...), so N branch tails equal one tail on the concatenated channels, with
the per-channel parameters concatenated (``rewriter.plan.plan_tail`` decides and does that).
``Transpose`` is read too: it moves the channel axis (tf2onnx wraps NHWC convs in them).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import onnx_ir as ir

from passes.onnx import _graph as g
from rewriter.plan import BROADCAST, TAIL_RULES, tail_concat_axis

# ONNX op → the format-free tail kind of rewriter.plan.TAIL_RULES (how its parameters concatenate).
ONNX_TAIL_KINDS = {
    **{op: op for op in ("Relu", "Sigmoid", "Tanh", "HardSwish", "HardSigmoid", "LeakyRelu", "Elu", "Selu", "Celu",
                         "Softplus", "Softsign", "Gelu", "Mish", "ThresholdedRelu", "Identity", "Abs", "Neg", "Erf",
                         "Exp", "Sqrt", "Reciprocal", "Floor", "Ceil", "Round", "Sign")},
    **{op: op for op in ("Add", "Sub", "Mul", "Div", "PRelu", "Max", "Min", "Clip")},
    "BatchNormalization": "BatchNorm",
}
# Elementwise ops with no per-channel parameters: any attribute they have must agree.
UNARY_OPS = {op for op, kind in ONNX_TAIL_KINDS.items() if not TAIL_RULES[kind].params}
# Ops of the branch and one constant: channel-wise where the constant is per channel or shared.
BINARY_OPS = {op for op, kind in ONNX_TAIL_KINDS.items() if TAIL_RULES[kind].params == (BROADCAST,)}


@dataclass
class TailOp:
    """One op of a branch after (or before) its conv, with what must agree and what concatenates."""

    node: ir.Node
    data_index: int  # which input carries the branch's tensor
    config: dict[str, Any]  # must be equal across branches
    params: list[np.ndarray] = field(default_factory=list)
    param_inputs: list[int] = field(default_factory=list)  # input index of each param
    param_axes: list[int | None] = field(default_factory=list)  # concat axis, None: must be equal
    perm: list[int] | None = None  # Transpose only

    @property
    def kind(self) -> str:
        return self.node.op_type


def _attributes(node: ir.Node) -> dict[str, Any]:
    config = {}
    for key, attr in node.attributes.items():
        value = attr.value
        config[key] = tuple(value) if isinstance(value, (list, tuple)) else value
    return config


def read_tail(node: ir.Node, data: ir.Value, channel_axis: int, rank: int, channels: int,
              model: ir.Model) -> TailOp | str:
    """Read ``node`` (consuming ``data``) as a tail op, or say why it is not one."""
    if node.domain not in ("", "ai.onnx"):
        return f"{node.op_type} ({node.domain}) is not a channel-wise op"
    if len(node.outputs) != 1 and node.op_type != "BatchNormalization":
        return f"{node.op_type} has several outputs"
    data_index = next(i for i, v in enumerate(node.inputs) if v is data)
    kind = node.op_type
    if kind == "Transpose":
        perm = g.attr_ints(node, "perm") or list(reversed(range(rank)))
        return TailOp(node, data_index, {"perm": tuple(perm)}, perm=perm)
    if kind in UNARY_OPS:
        return TailOp(node, data_index, _attributes(node))
    if kind == "Clip":
        config = _attributes(node)
        for index in (1, 2):  # min, max as inputs (opset >= 11): constants, equal everywhere
            if index < len(node.inputs) and node.inputs[index] is not None:
                bound = g.const_array(node.inputs[index])
                if bound is None:
                    return "Clip bounds are not constants"
                config[f"input{index}"] = float(bound)
        return TailOp(node, data_index, config)
    if kind == "BatchNormalization":
        if channel_axis != 1:
            return "BatchNormalization normalises axis 1, not the branch's channel axis"
        if any(o.uses() or o.is_graph_output() for o in node.outputs[1:]) or g.attr_int(node, "training_mode", 0):
            return "BatchNormalization in training mode"
        params = [g.const_array(v) for v in node.inputs[1:5]]
        if any(p is None for p in params):
            return "BatchNormalization parameters are not constants"
        config = {"epsilon": round(float(node.attributes["epsilon"].value), 12) if "epsilon" in node.attributes
                  else 1e-5}
        return TailOp(node, data_index, config, params, [1, 2, 3, 4], [0, 0, 0, 0])
    if kind in BINARY_OPS and len(node.inputs) == 2:
        other_index = 1 - data_index
        constant = g.const_array(node.inputs[other_index])
        if constant is None:
            return f"{kind} of a tensor that is not a constant"
        concat_axis = tail_concat_axis(BROADCAST, constant.shape, channel_axis, rank, channels)
        if isinstance(concat_axis, str):
            return f"{kind} {concat_axis}"
        axis = channel_axis - (rank - constant.ndim)  # numpy broadcasting aligns on the right
        # Broadcasting must not grow the branch along another axis either.
        config = {"constant_side": other_index, "constant_shape": tuple(
            d if i != axis else -1 for i, d in enumerate(constant.shape))}
        return TailOp(node, data_index, config, [constant], [other_index], [concat_axis])
    return f"{kind} is not a channel-wise op"


def moved_axis(op: TailOp, channel_axis: int) -> int:
    """The channel axis after ``op`` (only a Transpose moves it)."""
    return op.perm.index(channel_axis) if op.perm is not None else channel_axis
