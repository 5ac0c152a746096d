"""Fold the channel-wise affine op after a fused convolution into its weights and bias.

    Conv(group=N) → BatchNormalization | Mul | Add | Sub | Div (per-channel constant)  ⇒  Conv(group=N)

A legacy export keeps a BatchNormalization after each ``torch.cat`` of branch convs (the exporter
folds a BN only into the Conv right before it, and a Concat stood between them). Once the branches
are one grouped Conv, the BN is what the native export would have folded: folding it here makes a
fused legacy export op for op what the native export is. Only convolutions this run fused are
touched, and only where the op is the conv output's sole reader; shared constants are never
changed in place (the folded weight and bias are new initializers). An op that reads an
initializer which is also a graph input is never folded (the user may feed another value); the
report says so.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from gconv_rewrite.passes.onnx import _graph as g
from gconv_rewrite.report import Rewrite, Skip

FOLDABLE_OPS = ("BatchNormalization", "Mul", "Add", "Sub", "Div")


class FoldBatchNormPass(ir.passes.InPlacePass):
    """Fold BN / per-channel Mul, Add, Sub, Div into each of ``convs`` (the fused convolutions)."""

    def __init__(self, convs: list[ir.Node]):
        super().__init__()
        self.convs = convs
        self.rewrites: list[Rewrite] = []
        self.skipped: list[Skip] = []  # ops not folded because they read a value the user may feed
        self.decisions: list = []  # a fold is no target's choice: always empty

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        # Before IR 4 every initializer is listed as a graph input, yet the runtime holds it constant.
        with g.initializers_as_constants(model):
            return self._rewrite_model(model)

    def _rewrite_model(self, model: ir.Model) -> ir.passes.PassResult:
        modified = False
        names_by_graph: dict[int, g.Names] = {}
        for conv in self.convs:
            graph = conv.graph
            if graph is None or conv.op_type != "Conv":
                continue
            names = names_by_graph.setdefault(id(graph), g.Names(graph))
            label = "" if graph is model.graph else (graph.name or "subgraph")
            while self._fold_next(graph, names, conv, label):
                modified = True
        return ir.passes.PassResult(model, modified)

    def _fold_next(self, graph: ir.Graph, names: g.Names, conv: ir.Node, label: str) -> bool:
        output = conv.outputs[0]
        if output.is_graph_output() or len(output.uses()) != 1:
            return False
        op = output.uses()[0].node
        if op.op_type not in FOLDABLE_OPS or op.domain not in ("", "ai.onnx") or op.graph is not graph:
            return False
        weight = g.const_array(conv.inputs[1])
        bias_value = conv.inputs[2] if len(conv.inputs) > 2 else None
        bias = g.const_array(bias_value) if bias_value is not None else None
        if weight is None or weight.dtype.kind != "f" or (bias_value is not None and bias is None):
            return False
        if g.is_replaceable(conv.inputs[1]) or (bias_value is not None and g.is_replaceable(bias_value)):
            return False
        overridden = next((name for v in op.inputs if v is not None and v is not output
                           for name in [g.overridable_input(v)] if name is not None), None)
        if overridden is not None:  # the user may feed another value: folding would ignore it
            where = f"{op.op_type} {op.name}" if op.name else op.op_type
            self.skipped.append(Skip(op.name or op.outputs[0].name or op.op_type,
                                     f"the {where} after the fused conv reads '{overridden}', {g.GRAPH_INPUT}; "
                                     "it is not folded", [g.node_label(op)], label, code="overridable-input"))
            return False
        folded = _fold(op, output, weight, bias if bias is not None else np.zeros(weight.shape[0], weight.dtype))
        if folded is None:
            return False
        new_weight, new_bias = folded
        if _overflows(weight.dtype, new_weight, new_bias):
            # A scale of 3e38 overflows the folded weights: the model computes with the BN kept.
            where = f"{op.op_type} {op.name}" if op.name else op.op_type
            self.skipped.append(Skip(op.name or op.outputs[0].name or op.op_type,
                                     f"the {where} after the fused conv is not folded: the folded weights would "
                                     f"overflow {weight.dtype}", [g.node_label(op)], label, code="fold-refused"))
            return False
        old_weight = conv.inputs[1]
        base = conv.name or "conv"
        conv.replace_input_with(1, g.new_initializer(graph, names.value(f"{base}.weight"),
                                                     new_weight.astype(weight.dtype)))
        if bias_value is None:
            conv.resize_inputs(3)
        conv.replace_input_with(2, g.new_initializer(graph, names.value(f"{base}.bias"),
                                                     new_bias.astype(weight.dtype)))
        # The conv output takes the folded op's place: its name, type, shape and graph-output role.
        result = op.outputs[0]
        name = result.name
        result.name = None
        output.name, output.type, output.shape = name, result.type, result.shape
        ir.convenience.replace_all_uses_with(result, output, replace_graph_outputs=True)
        old_inputs = [v for v in op.inputs if v is not None and v is not output]
        graph.remove(op, safe=True)
        g.remove_dead_producers(graph, old_inputs + [v for v in (old_weight, bias_value) if v is not None])
        self.rewrites.append(Rewrite(
            kind="fold-batchnorm", location=conv.name or name, groups=g.attr_int(conv, "group", 1),
            channels={"in": int(weight.shape[1]) * g.attr_int(conv, "group", 1), "out": int(weight.shape[0])},
            nodes=[g.node_label(op)], graph=label, boundary=[{"tensor": name}]))
        return True


def _overflows(dtype: np.dtype, *arrays: np.ndarray) -> bool:
    """Whether a folded array (computed in float64) leaves the range of the model's dtype."""
    limit = float(np.finfo(dtype).max)
    return not all(np.all(np.abs(array) <= limit) for array in arrays)


def _fold(op: ir.Node, conv_output: ir.Value, weight: np.ndarray, bias: np.ndarray):
    """The (weight, bias) of the conv with ``op`` applied after it, or None if it does not fold."""
    out_channels = weight.shape[0]
    rank = weight.ndim
    w, b = weight.astype(np.float64), bias.astype(np.float64)
    per_channel = (-1,) + (1,) * (rank - 1)
    if op.op_type == "BatchNormalization":
        if g.attr_int(op, "training_mode", 0) or any(o.uses() or o.is_graph_output() for o in op.outputs[1:]):
            return None
        params = [g.const_array(v) for v in op.inputs[1:5]]
        if len(params) != 4 or any(p is None or p.shape != (out_channels,) for p in params):
            return None
        if any(g.is_replaceable(v) for v in op.inputs[1:5]):
            return None
        epsilon = float(op.attributes["epsilon"].value) if "epsilon" in op.attributes else 1e-5
        gamma, beta, mean, var = (p.astype(np.float64) for p in params)
        scale = gamma / np.sqrt(var + np.float32(epsilon).astype(np.float64))
        return w * scale.reshape(per_channel), (b - mean) * scale + beta
    if len(op.inputs) != 2 or op.inputs[0] is not conv_output and op.op_type in ("Sub", "Div"):
        return None  # c - conv or c / conv is not affine in the conv's weights
    other = op.inputs[1] if op.inputs[0] is conv_output else op.inputs[0]
    constant = g.const_array(other)
    if constant is None or g.is_replaceable(other) or constant.dtype != weight.dtype:
        return None
    vector = _channel_vector(constant, rank, out_channels)
    if vector is None:
        return None
    if op.op_type == "Mul":
        return w * vector.reshape(per_channel), b * vector
    if op.op_type == "Div":
        if np.any(vector == 0):
            return None
        return w / vector.reshape(per_channel), b / vector
    if op.op_type == "Add":
        return w, b + vector
    return w, b - vector  # Sub


def _channel_vector(constant: np.ndarray, rank: int, channels: int) -> np.ndarray | None:
    """A constant that broadcasts along the channel axis only (scalar, [C,1,1], [1,C,1,1]...), as a
    length-C vector; None if it would broadcast along another axis or grow the output."""
    if constant.ndim > rank:
        return None
    shape = (1,) * (rank - constant.ndim) + constant.shape
    if any(d != 1 for i, d in enumerate(shape) if i != 1) or shape[1] not in (1, channels):
        return None
    return np.broadcast_to(constant.reshape(-1).astype(np.float64), (channels,)).copy()
