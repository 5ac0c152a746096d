"""Quantized (QDQ) weights: a Conv weight or bias that a ``DequantizeLinear`` computes from an
integer constant. Fusing such branches stacks the integer data and the scales and zero points
along the output axis, so the fused weight dequantizes to exactly the branches' values and the
model stays quantized (it is never turned into float weights behind the user's back).

    q_i, scale_i, zp_i → DequantizeLinear → Conv_i   ⇒   concat(q_i), concat(scale_i), concat(zp_i) → DequantizeLinear → Conv(group=N)
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx_ir as ir

from gconv_rewrite.passes.onnx import _graph as g
from gconv_rewrite.reasons import Refused


@dataclass
class Quantized:
    """A weight or bias dequantized from constants, per tensor or per output channel (axis 0)."""

    node: ir.Node
    data: np.ndarray
    scale: np.ndarray
    zero_point: np.ndarray | None

    @property
    def per_tensor(self) -> bool:
        return self.scale.ndim == 0

    def per_channel(self, channels: int) -> tuple[np.ndarray, np.ndarray | None]:
        scale = np.broadcast_to(self.scale.reshape(-1), (channels,))
        zero_point = None if self.zero_point is None else np.broadcast_to(self.zero_point.reshape(-1), (channels,))
        return scale, zero_point


class NotExact(Refused):
    """Quantized branches that cannot be stacked exactly; says why (a refusal: code and reason)."""


def read_quantized(value: ir.Value | None) -> Quantized | None:
    """The DequantizeLinear of constants behind ``value`` (through Identity), or None.
    Raises ``NotExact`` for a form this module does not stack (blocked, per-channel on another
    axis than the output channels, or reading an initializer that is also a graph input)."""
    node = value.producer() if value is not None else None
    while node is not None and node.op_type == "Identity":
        node = node.inputs[0].producer() if node.inputs[0] is not None else None
    if node is None or node.op_type != "DequantizeLinear" or node.domain not in ("", "ai.onnx"):
        return None
    inputs = list(node.inputs) + [None] * (3 - len(node.inputs))
    data, scale = g.const_array(inputs[0]), g.const_array(inputs[1])
    zero_point = g.const_array(inputs[2]) if inputs[2] is not None else None
    if data is None or scale is None or (inputs[2] is not None and zero_point is None):
        return None
    for value in inputs:
        name = g.overridable_input(value)
        if name is not None:  # the user may feed another scale or zero point: never stacked
            raise NotExact("overridable-input", f"the DequantizeLinear {node.name or 'of a weight'} reads '{name}', {g.GRAPH_INPUT}")
    if g.attr_int(node, "block_size", 0):
        raise NotExact("quantization-mismatch", "weights are block-quantized (DequantizeLinear block_size)")
    if scale.ndim > 1 or (scale.ndim == 1 and g.attr_int(node, "axis", 1) % max(data.ndim, 1) != 0):
        raise NotExact("quantization-mismatch", "weights are quantized per channel along another axis than the output channels")
    if scale.ndim == 1 and scale.shape[0] != data.shape[0]:
        raise NotExact("quantization-mismatch", "quantization scales do not match the output channels")
    return Quantized(node, data, scale, zero_point)


def stack(parts: list[Quantized]) -> tuple[np.ndarray, np.ndarray | None]:
    """The scale and zero point of the stacked data: kept per tensor where every branch has the
    same, else per output channel (each branch's own values, repeated over its channels)."""
    if len({p.data.dtype for p in parts}) > 1 or len({p.scale.dtype for p in parts}) > 1:
        raise NotExact("quantization-mismatch", "branches are quantized to different types")
    if len({p.zero_point is None for p in parts}) > 1:
        raise NotExact("quantization-mismatch", "some branches have a quantization zero point, others not")
    if all(p.per_tensor for p in parts):
        same_scale = all(np.array_equal(p.scale, parts[0].scale) for p in parts)
        same_zero = parts[0].zero_point is None or all(np.array_equal(p.zero_point, parts[0].zero_point)
                                                       for p in parts)
        if same_scale and same_zero:
            return parts[0].scale, parts[0].zero_point
    scales, zero_points = zip(*(p.per_channel(p.data.shape[0]) for p in parts))
    scale = np.concatenate(scales)
    zero_point = None if parts[0].zero_point is None else np.concatenate(zero_points)
    return scale, zero_point
