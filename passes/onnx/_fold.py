"""Fold just what a match needs: the value of a small integer computation (PyTorch's exporter
writes ``torch.chunk`` bounds as ``Shape → Gather → Add → Div → Mul → Slice``).

The cone of nodes behind the value is copied into a tiny model, its ``Shape`` nodes replaced by
the static shape of their input, and run with onnx's reference evaluator. Dims that are not
static (a dynamic batch) are tried with two different stand-ins: a result that does not depend
on them is a constant; one that does cannot be proven and is not folded. Nothing in the user's
graph changes.
"""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir

from passes.onnx import _graph as g

# Ops that integer bound computations are made of; anything else is not folded.
FOLDABLE_OPS = {"Shape", "Gather", "Add", "Sub", "Mul", "Div", "Unsqueeze", "Squeeze", "Concat", "Cast",
                "Constant", "Slice", "Identity", "Reshape", "Floor", "Ceil", "Min", "Max", "Neg",
                "ConstantOfShape", "Range", "ReduceProd", "Mod"}
MAX_CONE_NODES = 64
_STAND_INS = (1, 11)  # two different values for dims that are not static (1 catches Min(dim, k))


_CHANNEL_PRESERVING = ("Relu", "Sigmoid", "Tanh", "LeakyRelu", "Clip", "BatchNormalization", "Identity",
                       "HardSwish", "HardSigmoid", "Elu", "Selu", "Gelu", "MaxPool", "AveragePool",
                       "Add", "Mul", "Sub", "Div", "Dropout")


def _conv_behind(value: ir.Value) -> ir.Node | None:
    """The Conv that produced ``value``, through ops that keep rank and channels."""
    for _ in range(32):
        node = value.producer()
        if node is None:
            return None
        if node.op_type == "Conv":
            return node
        if node.op_type not in _CHANNEL_PRESERVING:
            return None
        value = node.inputs[0]
    return None


def channels_of(value: ir.Value) -> int | None:
    """The channel count (axis 1) of an NCHW value: its recorded shape, or read off what
    produced it (a Conv's weight, a shaped input) through channel-preserving ops."""
    for _ in range(32):
        known = g.static_dim(value, 1)
        if known is not None:
            return known
        node = value.producer()
        if node is None:
            return None
        if node.op_type == "Conv":
            weight = g.const_array(node.inputs[1]) if len(node.inputs) > 1 else None
            return int(weight.shape[0]) if weight is not None else None
        if node.op_type not in _CHANNEL_PRESERVING:
            return None
        value = node.inputs[0]
    return None


def _static_shape(value: ir.Value, stand_in: int,
                  known: dict[int, tuple[int, int]] | None = None) -> list[int] | None:
    """The shape, with ``stand_in`` for dims that are not static; the rank and channels read off
    the producing Conv when the value has no recorded shape, or taken from ``known`` (by value
    id: rank and channel count)."""
    rank, channels = (known or {}).get(id(value), (None, None))
    shape = value.shape
    if shape is None:
        conv = _conv_behind(value)
        weight = g.const_array(conv.inputs[1]) if conv is not None and len(conv.inputs) > 1 else None
        if weight is None and rank is None:
            return None
        shape = [None] * (weight.ndim if weight is not None else rank)
    channels = channels_of(value) or channels
    dims = []
    for axis, dim in enumerate(shape):
        if isinstance(dim, int):
            dims.append(dim)
        elif axis == 1 and channels is not None:
            dims.append(channels)
        else:
            dims.append(stand_in)
    return dims


def _cone(value: ir.Value) -> list[ir.Node] | None:
    """The nodes computing ``value`` back to constants and Shape nodes, in topological order."""
    order: list[ir.Node] = []
    seen: set[int] = set()

    def visit(v: ir.Value) -> bool:
        if v.const_value is not None:
            return True
        node = v.producer()
        if node is None:
            return False  # a graph input: not constant
        if id(node) in seen:
            return True
        if node.op_type not in FOLDABLE_OPS or node.domain not in ("", "ai.onnx") or len(order) >= MAX_CONE_NODES:
            return False
        seen.add(id(node))
        if node.op_type != "Shape" and not all(i is None or visit(i) for i in node.inputs):
            return False
        order.append(node)
        return True

    return order if visit(value) else None


def fold(value: ir.Value | None, model: ir.Model) -> np.ndarray | None:
    """The constant value of ``value``, if it can be proven; None otherwise."""
    return fold_many([value], model)[0] if value is not None else None


def fold_many(values: list[ir.Value], model: ir.Model,
              known_shapes: dict[int, tuple[int, int]] | None = None) -> list[np.ndarray | None]:
    """``fold`` for several values at once: one evaluation of the union of their cones (a
    ResNeXt block has 64 Slice bounds sharing one Shape → Gather → Div). ``known_shapes``
    gives the rank and channel count of values (by id) that shapes do not record."""
    results: list[np.ndarray | None] = [g.const_array(v) for v in values]
    first_index: dict[int, int] = {}
    for i, v in enumerate(values):
        first_index.setdefault(id(v), i)
    cones = {i: _cone(v) for i, v in enumerate(values) if results[i] is None and first_index[id(v)] == i}
    wanted = [i for i, cone in cones.items() if cone is not None]
    if not wanted:
        return results
    nodes = list(dict.fromkeys(node for i in wanted for node in cones[i]))
    order = {id(node): k for k, node in enumerate(model.graph)} if len(wanted) > 1 else {}
    nodes.sort(key=lambda node: order.get(id(node), 0))  # the union keeps topological order
    runs = [_evaluate(nodes, [values[i] for i in wanted], model, stand_in, known_shapes)
            for stand_in in _STAND_INS]
    if any(run is None for run in runs):
        return results
    for k, i in enumerate(wanted):
        first, second = runs[0][k], runs[1][k]
        if first.shape == second.shape and np.array_equal(first, second):  # else: depends on a dynamic dim
            results[i] = first
    return [results[first_index[id(v)]] for v in values]


def _evaluate(cone: list[ir.Node], targets: list[ir.Value], model: ir.Model,
              stand_in: int, known_shapes: dict[int, tuple[int, int]] | None = None) -> list[np.ndarray] | None:
    from onnx.reference import ReferenceEvaluator

    names: dict[int, str] = {}

    def name(v: ir.Value) -> str:
        return names.setdefault(id(v), f"v{len(names)}")

    nodes, initializers = [], []
    for node in cone:
        outputs = [name(o) for o in node.outputs]
        if node.op_type == "Shape":
            shape = _static_shape(node.inputs[0], stand_in, known_shapes)
            if shape is None:
                return None
            start = g.attr_int(node, "start", 0)
            end = node.attributes.get("end")
            dims = shape[start:end.as_int()] if end is not None else shape[start:]
            initializers.append(onnx.numpy_helper.from_array(np.array(dims, np.int64), outputs[0]))
            continue
        inputs = []
        for v in node.inputs:
            if v is None:
                inputs.append("")
                continue
            if v.const_value is not None and id(v) not in names:
                initializers.append(onnx.numpy_helper.from_array(v.const_value.numpy(), name(v)))
            inputs.append(name(v))
        proto = ir.serde.serialize_node(node)
        del proto.input[:], proto.output[:]
        proto.input.extend(inputs)
        proto.output.extend(outputs)
        nodes.append(proto)
    outputs = [onnx.helper.make_tensor_value_info(name(v), 0, None) for v in targets]
    opset = g.opset_of(cone[-1], model) if cone else 17
    graph = onnx.helper.make_graph(nodes, "fold", [], outputs, initializer=initializers)
    tiny = onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", opset)])
    try:
        return [np.asarray(r) for r in ReferenceEvaluator(tiny).run(None, {})]
    except Exception:  # an op or input the evaluator rejects: simply not foldable
        return None
