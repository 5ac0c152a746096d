"""Channel-wise ops that may follow a branch convolution, read in a format-free way.

A *tail* op acts on each channel on its own (BatchNormalization, activations, Add/Mul of a
per-channel constant...), so N branch tails equal one tail on the concatenated channels, with
the per-channel parameters concatenated (``gconv_rewrite.plan.plan_tail`` decides and does that).
``Transpose`` is read too: it moves the channel axis (tf2onnx wraps NHWC convs in them).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import onnx_ir as ir

from gconv_rewrite.passes.onnx import _graph as g
from gconv_rewrite.plan import BROADCAST, GRAPH_CONSTANT, GRAPH_INPUT, TAIL_RULES, describe_tail_graph, tail_concat_axis

# ONNX op → the format-free tail kind of gconv_rewrite.plan.TAIL_RULES (how its parameters concatenate).
ONNX_TAIL_KINDS = {
    **{op: op for op in ("Relu", "Sigmoid", "Tanh", "HardSwish", "HardSigmoid", "LeakyRelu", "Elu", "Selu", "Celu",
                         "Softplus", "Softsign", "Gelu", "Mish", "ThresholdedRelu", "Identity", "Abs", "Neg", "Erf",
                         "Exp", "Sqrt", "Reciprocal", "Floor", "Ceil", "Round", "Sign")},
    **{op: op for op in ("Add", "Sub", "Mul", "Div", "PRelu", "Max", "Min", "Clip", "Pow")},
    "BatchNormalization": "BatchNorm",
}
# Elementwise ops with no per-channel parameters: any attribute they have must agree.
UNARY_OPS = {op for op, kind in ONNX_TAIL_KINDS.items() if not TAIL_RULES[kind].params}
# Ops of the branch and one constant: channel-wise where the constant is per channel or shared.
BINARY_OPS = {op for op, kind in ONNX_TAIL_KINDS.items() if TAIL_RULES[kind].params == (BROADCAST,)}
# Ops a multi-op tail (SiLU as Mul(y, Sigmoid(y)), GELU, Mish) may be built of: each acts on every
# element on its own, so a graph of them is channel-wise as long as it reads only its branch.
GRAPH_OPS = UNARY_OPS | BINARY_OPS | {"Clip"}
MAX_GRAPH_OPS = 32  # more is no activation formula: the search stops rather than walk a network


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
    g.refuse_overridable_inputs(node, data)  # a constant the user may feed is never concatenated
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


@dataclass
class TailGraph:
    """A channel-wise tail of several ops after a branch conv: a small graph of elementwise ops
    whose only reads from outside are ``input`` (the branch tensor) and constants.

    It stands in a branch's op list like one op: ``op_type`` names what it computes (SiLU, GELU,
    Mish...), ``outputs`` is its result. ``nodes`` are in one canonical order (each op after the
    ops it reads, depth first from the output, inputs in order), so that equal graphs in two
    branches list their ops in the same order; the output's op is last."""

    nodes: list[ir.Node]
    input: ir.Value
    used_outside: ir.Value | None = None  # a value inside the graph that something outside reads

    @property
    def op_type(self) -> str:
        return describe_tail_graph([node.op_type for node in self.nodes])

    @property
    def domain(self) -> str:
        return ""

    @property
    def name(self) -> str:
        return self.nodes[-1].name

    @property
    def outputs(self):
        return self.nodes[-1].outputs

    def wiring(self) -> tuple:
        """Each op as ``(op type, where each input comes from)``: ``GRAPH_INPUT``,
        ``GRAPH_CONSTANT``, ``(op position, output index)`` or None (absent)."""
        position = {id(node): k for k, node in enumerate(self.nodes)}
        ops = []
        for node in self.nodes:
            sources = []
            for value in node.inputs:
                producer = value.producer() if value is not None else None
                if value is None:
                    sources.append(None)
                elif value is self.input:
                    sources.append(GRAPH_INPUT)
                elif producer is not None and id(producer) in position:
                    sources.append((position[id(producer)], value.index()))
                else:
                    sources.append(GRAPH_CONSTANT)
            ops.append((node.op_type, tuple(sources)))
        return tuple(ops)


def _variable_inputs(node: ir.Node) -> list[ir.Value]:
    return [v for v in node.inputs if v is not None and g.const_array(v) is None]


def find_tail_graph(output_node: ir.Node) -> TailGraph | None:
    """The multi-op elementwise tail that ends at ``output_node`` (whose inputs are not one
    branch tensor and constants, e.g. ``Mul(y, Sigmoid(y))``), or None.

    From the output, the values the graph still reads from outside (its frontier) are replaced
    by the elementwise ops that produce them until one value is left: the branch tensor. A
    value is taken in only once all its readers are in the graph; where no value is, the one an
    elementwise op produces is taken anyway and the graph records that something outside reads
    it (the candidate is then refused with that reason)."""
    if output_node.op_type not in GRAPH_OPS or output_node.domain not in ("", "ai.onnx"):
        return None
    members = {id(output_node): output_node}
    frontier = list(dict.fromkeys(_variable_inputs(output_node)))
    while len(frontier) > 1:
        expandable = [v for v in frontier if v.producer() is not None and v.producer().op_type in GRAPH_OPS
                      and v.producer().domain in ("", "ai.onnx") and len(v.producer().outputs) == 1]
        if not expandable or len(members) >= MAX_GRAPH_OPS:
            return None
        inside = [v for v in expandable if not v.is_graph_output()
                  and all(id(use.node) in members for use in v.uses())]
        value = (inside or expandable)[0]
        node = value.producer()
        members[id(node)] = node
        frontier.remove(value)
        frontier.extend(v for v in _variable_inputs(node) if v not in frontier)
    if len(frontier) != 1:
        return None
    graph = TailGraph(_canonical_order(output_node, members), frontier[0])
    for node in graph.nodes[:-1]:
        value = node.outputs[0]
        if value.is_graph_output() or any(id(use.node) not in members for use in value.uses()):
            graph.used_outside = value
            break
    return graph


def _canonical_order(output_node: ir.Node, members: dict[int, ir.Node]) -> list[ir.Node]:
    """The graph's ops depth first from the output, inputs in order: each after what it reads."""
    order, seen = [], set()
    stack = [(output_node, False)]
    while stack:
        node, expanded = stack.pop()
        if expanded:
            order.append(node)
            continue
        if id(node) in seen:
            continue
        seen.add(id(node))
        stack.append((node, True))
        for value in reversed(node.inputs):
            producer = value.producer() if value is not None else None
            if producer is not None and id(producer) in members and id(producer) not in seen:
                stack.append((producer, False))
    return order


def read_tail_graph(graph: TailGraph, channel_axis: int, rank: int, channels: int,
                    model: ir.Model) -> list[TailOp] | str:
    """Each op of a tail graph read as a ``TailOp`` (in the graph's order), or why one is not
    channel-wise. An op of two graph values (the ``Mul`` of ``Mul(y, Sigmoid(y))``) has no
    parameters; an op of one graph value and a constant is read as a one-op tail is."""
    ops = []
    for node in graph.nodes:
        variables = _variable_inputs(node)
        if len(variables) > 1:  # Mul(y, s), Mul(y, y): both inputs inside the graph, wired by position
            ops.append(TailOp(node, node.inputs.index(variables[0]), _attributes(node)))
            continue
        op = read_tail(node, variables[0], channel_axis, rank, channels, model)
        if isinstance(op, str):
            return op
        ops.append(op)
    return ops
