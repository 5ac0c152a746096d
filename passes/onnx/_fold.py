"""Fold just what a match needs: the value of a small integer computation (PyTorch's exporter
writes ``torch.chunk`` bounds as ``Shape → Gather → Add → Div → Mul → Slice``).

The cone of nodes behind the value is copied into a tiny model, its ``Shape`` nodes replaced by
the static shape of their input, and run with onnx's reference evaluator. A dim that is not
static (a dynamic batch) gets a stand-in size for that run, and beside the run a dependency
analysis follows every element of every value: an element computed from a dynamic dim is
*dynamic* unless an op provably cuts the dependency (a Gather that picks only static elements of
a shape, a Slice or Concat that moves them). A value is folded only when none of its elements,
nor its shape, is dynamic; what a stand-in size happens to give is never taken as proof
(``4·((N−1) mod 2)`` is 0 at batch 1 and 11, and 4 at batch 2). A value computed from an
initializer that is also a graph input (the user may feed another one) is not folded either.
Nothing in the user's graph changes.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
import onnx
import onnx_ir as ir

from gconv_rewrite.passes.onnx import _graph as g

# Ops that integer bound computations are made of; anything else is not folded.
FOLDABLE_OPS = {"Shape", "Gather", "Add", "Sub", "Mul", "Div", "Unsqueeze", "Squeeze", "Concat", "Cast",
                "Constant", "Slice", "Identity", "Reshape", "Floor", "Ceil", "Min", "Max", "Neg",
                "ConstantOfShape", "Range", "ReduceProd", "Mod"}
MAX_CONE_NODES = 64
# The size a dim that is not static takes in the evaluation. Its value is never trusted (the
# dependency analysis decides what is constant); it only has to let the cone run (no 0 or 1, which
# make ``N - 1`` a divisor of zero).
_STAND_IN = 7


_CHANNEL_PRESERVING = ("Relu", "Sigmoid", "Tanh", "LeakyRelu", "Clip", "BatchNormalization", "Identity",
                       "HardSwish", "HardSigmoid", "Elu", "Selu", "Gelu", "MaxPool", "AveragePool",
                       "Add", "Mul", "Sub", "Div", "Dropout")


# Ops with several inputs that broadcast: the output's channels are the widest of their tensors'.
_BROADCASTING = ("Add", "Mul", "Sub", "Div")


def _tensor_inputs(node: ir.Node) -> list[ir.Value]:
    """The inputs of a channel-preserving op that carry the tensor: the first one, or for an op
    that broadcasts, every input that is no constant (a layer scale ``Mul(gamma[C,1,1], y)`` or
    a bias puts the constant first; its shape says nothing about the tensor's axis 1)."""
    if node.op_type not in _BROADCASTING:
        return [node.inputs[0]] if node.inputs and node.inputs[0] is not None else []
    return [v for v in node.inputs if v is not None and g.const_array(v) is None]


def _conv_behind(value: ir.Value) -> ir.Node | None:
    """The Conv that produced ``value``, through ops that keep rank and channels."""
    pending, seen = [value], 0
    while pending and seen < 64:
        node = pending.pop(0).producer()
        seen += 1
        if node is None:
            continue
        if node.op_type == "Conv":
            return node
        if node.op_type in _CHANNEL_PRESERVING:
            pending.extend(_tensor_inputs(node))
    return None


def channels_of(value: ir.Value, _budget: list[int] | None = None) -> int | None:
    """The channel count (axis 1) of an NCHW value: its recorded shape, or read off what
    produced it (a Conv's weight, a shaped input) through channel-preserving ops. Where such an
    op broadcasts (a residual Add, a layer-scale Mul), its tensor inputs are read, and a count
    is given only where it is sure: all known (the widest), or one known wider than 1."""
    budget = _budget if _budget is not None else [64]  # nodes visited, shared by the whole walk
    known = g.static_dim(value, 1)
    if known is not None:
        return known
    node = value.producer()
    budget[0] -= 1
    if node is None or budget[0] < 0:
        return None
    if node.op_type == "Conv":
        weight = g.const_shape(node.inputs[1]) if len(node.inputs) > 1 else None
        return int(weight[0]) if weight is not None else None
    if node.op_type not in _CHANNEL_PRESERVING:
        return None
    counts = [channels_of(v, budget) for v in _tensor_inputs(node)]
    found = [c for c in counts if c is not None]
    if not found:
        return None
    if len(found) == len(counts) or max(found) > 1:  # broadcasting: the output has the widest count
        return max(found)
    return None  # a 1 beside an unknown count: it may broadcast to anything


def _static_shape(value: ir.Value, known: dict[int, tuple[int, int]] | None = None
                  ) -> tuple[list[int], dict[int, str]] | None:
    """The shape, with a stand-in size for dims that are not static, and those dims (axis →
    a description such as "dim 0 of 'x' (N)"). The rank and channels are read off the producing
    Conv when the value has no recorded shape, or taken from ``known`` (by value id: rank and
    channel count)."""
    rank, channels = (known or {}).get(id(value), (None, None))
    shape = value.shape
    if shape is None:
        conv = _conv_behind(value)
        weight = g.const_shape(conv.inputs[1]) if conv is not None and len(conv.inputs) > 1 else None
        if weight is None and rank is None:
            return None
        shape = [None] * (len(weight) if weight is not None else rank)
    channels = channels_of(value) or channels
    dims, dynamic = [], {}
    for axis, dim in enumerate(shape):
        if isinstance(dim, int):
            dims.append(dim)
        elif axis == 1 and channels is not None:
            dims.append(channels)
        else:
            dims.append(_STAND_IN)
            symbol = getattr(dim, "value", None)
            dynamic[axis] = f"dim {axis} of '{value.name}'" + (f" ({symbol})" if symbol else "")
    return dims, dynamic


class _Blocked(Exception):
    """The cone reads something that is not a constant; ``reason`` says what, when worth saying."""

    def __init__(self, reason: str | None = None):
        super().__init__(reason)
        self.reason = reason


def _cone(value: ir.Value) -> list[ir.Node]:
    """The nodes computing ``value`` back to constants and Shape nodes, in topological order.
    Raises ``_Blocked`` where it reaches a run-time value, an op it does not fold, or an
    initializer that is also a graph input."""
    order: list[ir.Node] = []
    seen: set[int] = set()

    def visit(v: ir.Value) -> None:
        if v.is_graph_input():
            if v.const_value is not None:  # an initializer the user may feed another value for
                raise _Blocked(f"computed from '{v.name}', {g.GRAPH_INPUT}")
            raise _Blocked
        if v.const_value is not None:
            return
        node = v.producer()
        if node is None:
            raise _Blocked  # an outer graph's value
        if id(node) in seen:
            return
        if node.op_type not in FOLDABLE_OPS or node.domain not in ("", "ai.onnx") or len(order) >= MAX_CONE_NODES:
            raise _Blocked
        seen.add(id(node))
        if node.op_type != "Shape":
            for i in node.inputs:
                if i is not None:
                    visit(i)
        order.append(node)

    visit(value)
    return order


class Folded(NamedTuple):
    """A value's constant, or None and (where it is worth telling the user) why not."""

    array: np.ndarray | None
    reason: str | None = None


def fold(value: ir.Value | None, model: ir.Model) -> np.ndarray | None:
    """The constant value of ``value``, if it can be proven; None otherwise."""
    return fold_many([value], model)[0] if value is not None else None


def fold_many(values: list[ir.Value], model: ir.Model,
              known_shapes: dict[int, tuple[int, int]] | None = None) -> list[np.ndarray | None]:
    """``fold`` for several values at once (see ``fold_explained``)."""
    return [folded.array for folded in fold_explained(values, model, known_shapes)]


def fold_explained(values: list[ir.Value], model: ir.Model,
                   known_shapes: dict[int, tuple[int, int]] | None = None) -> list[Folded]:
    """Each value's constant, or why it is none: one evaluation of the union of their cones (a
    ResNeXt block has 64 Slice bounds sharing one Shape → Gather → Div). ``known_shapes`` gives
    the rank and channel count of values (by id) that shapes do not record."""
    results = [Folded(None, f"computed from '{name}', {g.GRAPH_INPUT}") if (name := g.overridable_input(v))
               else Folded(g.const_array(v)) for v in values]
    first_index: dict[int, int] = {}
    for i, v in enumerate(values):
        first_index.setdefault(id(v), i)
    cones: dict[int, list[ir.Node]] = {}
    for i, v in enumerate(values):
        if results[i].array is not None or results[i].reason is not None or first_index[id(v)] != i:
            continue
        try:
            cones[i] = _cone(v)
        except _Blocked as blocked:
            results[i] = Folded(None, blocked.reason)
    if cones:
        nodes = list(dict.fromkeys(node for cone in cones.values() for node in cone))
        order = {id(node): k for k, node in enumerate(model.graph)} if len(cones) > 1 else {}
        nodes.sort(key=lambda node: order.get(id(node), 0))  # the union keeps topological order
        run = _evaluate(nodes, model, known_shapes)
        if run is not None:
            arrays, dependencies = run
            for i in cones:
                dependency = dependencies[id(values[i])]
                if dependency.dynamic:
                    results[i] = Folded(None, f"computed from {', '.join(sorted(dependency.sources))}, "
                                              "a dynamic dim")
                else:
                    results[i] = Folded(arrays[id(values[i])])
    return [results[first_index[id(v)]] for v in values]


def _evaluate(cone: list[ir.Node], model: ir.Model, known_shapes: dict[int, tuple[int, int]] | None = None
              ) -> tuple[dict[int, np.ndarray], dict[int, _Dependency]] | None:
    """Run the cone (dynamic dims at a stand-in size): every value it computes (by value id),
    and what each element of each depends on; None if it cannot run."""
    from onnx.reference import ReferenceEvaluator

    built = _tiny_model(cone, model, known_shapes)
    if built is None:
        return None
    tiny, values, shape_dims = built
    try:
        results = ReferenceEvaluator(tiny).run(None, {})
    except Exception:  # an op or input the evaluator rejects: simply not foldable
        return None
    arrays = {id(values[init.name]): onnx.numpy_helper.to_array(init) for init in tiny.graph.initializer}
    arrays.update((id(values[o.name]), np.asarray(r)) for o, r in zip(tiny.graph.output, results))
    dependencies = {key: _Dependency.static(array) for key, array in arrays.items()}
    for key, described in shape_dims.items():  # a Shape's output: its dynamic dims are the sources
        dependencies[key] = _Dependency(np.array([d is not None for d in described], bool),
                                        frozenset(d for d in described if d is not None))
    for node in cone:
        if node.op_type != "Shape":
            dependency = _depends(node, arrays, dependencies)
            for output in node.outputs:
                dependencies[id(output)] = dependency.shaped(arrays[id(output)])
    return arrays, dependencies


def _tiny_model(cone: list[ir.Node], model: ir.Model, known_shapes: dict[int, tuple[int, int]] | None
                ) -> tuple[onnx.ModelProto, dict[str, ir.Value], dict[int, list[str | None]]] | None:
    """The cone as a model of its own that outputs every value it computes, each Shape replaced
    by its (stand-in) result; the values by their names there; and, per Shape output (by value
    id), which of its elements are dynamic dims (a description) or static (None)."""
    names: dict[int, str] = {}
    values: dict[str, ir.Value] = {}

    def name(v: ir.Value) -> str:
        if id(v) not in names:
            names[id(v)] = f"v{len(names)}"
            values[names[id(v)]] = v
        return names[id(v)]

    nodes, initializers, shape_dims = [], [], {}
    for node in cone:
        outputs = [name(o) for o in node.outputs]
        if node.op_type == "Shape":
            static = _static_shape(node.inputs[0], known_shapes)
            if static is None:
                return None
            shape, dynamic = static
            end = node.attributes.get("end")
            axes = list(range(len(shape)))[g.attr_int(node, "start", 0):end.as_int() if end is not None else None]
            initializers.append(onnx.numpy_helper.from_array(np.array([shape[a] for a in axes], np.int64), outputs[0]))
            shape_dims[id(node.outputs[0])] = [dynamic.get(a) for a in axes]
            continue
        inputs = []
        for v in node.inputs:
            if v is not None and v.const_value is not None and id(v) not in names:
                initializers.append(onnx.numpy_helper.from_array(v.const_value.numpy(), name(v)))
            inputs.append("" if v is None else name(v))
        proto = ir.serde.serialize_node(node)
        del proto.input[:], proto.output[:]
        proto.input.extend(inputs)
        proto.output.extend(outputs)
        nodes.append(proto)
    computed = [onnx.helper.make_tensor_value_info(o, 0, None) for node in nodes for o in node.output]
    opset = g.opset_of(cone[-1], model) if cone else 17
    graph = onnx.helper.make_graph(nodes, "fold", [], computed, initializer=initializers)
    return onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", opset)]), values, shape_dims


# -- the dependency analysis ------------------------------------------------------------------------


@dataclass(frozen=True)
class _Dependency:
    """Which elements of a value are computed from a dynamic dim (``mask``, the value's shape),
    which dims those are (``sources``), and whether the value's shape itself depends on one
    (``whole``: then no element is trusted)."""

    mask: np.ndarray
    sources: frozenset[str] = frozenset()
    whole: bool = False

    @staticmethod
    def static(array: np.ndarray) -> _Dependency:
        return _Dependency(np.zeros(np.shape(array), bool))

    @property
    def dynamic(self) -> bool:
        return self.whole or bool(self.mask.any())

    def shaped(self, array: np.ndarray) -> _Dependency:
        """The same dependency with its mask in ``array``'s shape (a whole one: all set)."""
        if self.whole:
            return _Dependency(np.ones(np.shape(array), bool), self.sources, True)
        return self


# Ops whose every output element is computed from the elements at the same (broadcast) place.
_ELEMENTWISE = {"Add", "Sub", "Mul", "Div", "Mod", "Min", "Max", "Neg", "Floor", "Ceil", "Cast", "Identity"}
# Ops that only move elements: the data input's elements land where the op puts them, as long as
# the inputs that say where (axes, shape, indices, bounds) are static.
_MOVING = {"Reshape", "Squeeze", "Unsqueeze", "Concat", "Gather", "Slice"}


def _depends(node: ir.Node, arrays: dict[int, np.ndarray], dependencies: dict[int, _Dependency]) -> _Dependency:
    """What ``node``'s output depends on, from what its inputs do. Only the cuts that hold for
    every size of a dynamic dim are made; anything else that reads a dynamic element is dynamic
    as a whole (ConstantOfShape, Range, ReduceProd: their result's shape or every element)."""
    inputs = [v for v in node.inputs if v is not None]
    found = [dependencies[id(v)] for v in inputs]
    output = arrays[id(node.outputs[0])]
    if not any(d.dynamic for d in found):
        return _Dependency.static(output)
    sources = frozenset().union(*(d.sources for d in found if d.dynamic))
    whole = _Dependency(np.ones(np.shape(output), bool), sources, True)
    if node.op_type in _ELEMENTWISE and not any(d.whole for d in found):
        masks = [np.broadcast_to(d.mask, np.shape(output)) for d in found]
        return _Dependency(np.logical_or.reduce(masks), sources)
    if node.op_type not in _MOVING or any(d.dynamic for d in found[1:] if node.op_type != "Concat"):
        return whole  # where the elements go is itself dynamic
    if any(d.whole for d in found):
        return whole
    data = found[0].mask
    if node.op_type == "Concat":
        mask = np.concatenate([d.mask for d in found], axis=g.attr_int(node, "axis", 0))
    elif node.op_type == "Gather":
        mask = np.take(data, arrays[id(inputs[1])], axis=g.attr_int(node, "axis", 0))
    elif node.op_type == "Slice":
        mask = _slice(node, data, [arrays[id(v)] if v is not None else None for v in node.inputs[1:]])
    else:  # Reshape, Squeeze, Unsqueeze: the same elements in the same order
        mask = data.reshape(np.shape(output))
    if np.shape(mask) != np.shape(output):
        return whole  # not the op this analysis understood: trust nothing
    return _Dependency(mask, sources)


def _slice(node: ir.Node, mask: np.ndarray, bounds: list[np.ndarray | None]) -> np.ndarray:
    """The elements a Slice takes (as onnx's reference implementation takes them)."""
    from onnx.reference.ops.op_slice import _slice as reference_slice

    if not bounds:  # opset < 10: bounds as attributes
        bounds = [np.array(g.attr_ints(node, key), np.int64) if key in node.attributes else None
                  for key in ("starts", "ends", "axes")]
    bounds = bounds + [None] * (4 - len(bounds))
    return reference_slice(mask, *bounds)
