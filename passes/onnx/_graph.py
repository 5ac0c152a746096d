"""Small readers over an onnx-ir graph shared by the ONNX passes: constants, Conv attributes,
and which channel range of which tensor a Split or Slice output holds."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import numpy as np
import onnx_ir as ir

from gconv_rewrite.candidate import ChannelRead
from gconv_rewrite.names import fresh_name
from gconv_rewrite.reasons import Refused

# Slice ends at or beyond this mean "to the end" (exporters write INT32_MAX or INT64_MAX).
OPEN_END = 2**31 - 1


def opset_of(node: ir.Node, model: ir.Model) -> int:
    if node.version is not None:
        return node.version
    return model.opset_imports.get(node.domain or "", model.opset_imports.get("ai.onnx", 1))


# Ops a constant may pass through on its way to where a pass reads it: the PyTorch exporter feeds
# deduplicated initializers (equal BN-folded biases, BN parameters) through Identity, and
# exporters write small constant expressions (Cast, Reshape, Unsqueeze...) over weights.
CONSTANT_EXPRESSION_OPS = frozenset({"Identity", "Cast", "CastLike", "Reshape", "Squeeze", "Unsqueeze",
                                     "Transpose", "Concat", "Flatten", "Neg", "Expand"})
# Ops that compute a weight from constants at run time, folded where all their inputs are constants:
# Caffe2 builds weights and biases with ConstantOfShape; NF-Nets' ScaledStdConv2d standardises its
# weight in the graph (ReduceMean, Sub, Mul, Div, Sqrt). Not BatchNormalization in training mode
# (timm's other form of it): onnxruntime's CPU kernel gives other numbers than the ONNX reference for
# it (0.08 apart on a 1x4x9 weight, onnxruntime 1.32, onnx 1.23), so a folded copy would not
# compute what the original runs; such a weight is refused with that reason (``not_constant_reason``).
WEIGHT_COMPUTING_OPS = frozenset({"ConstantOfShape", "Add", "Sub", "Mul", "Div", "Sqrt", "Pow", "Reciprocal",
                                  "ReduceMean", "ReduceSum", "ReduceSumSquare"})
_MAX_CONSTANT_DEPTH = 16  # a deeper chain is not "a small constant expression"


def _int_attribute(node: ir.Node, name: str) -> int | None:
    """An int attribute's value, None when absent or not a plain int."""
    attr = node.attributes.get(name)
    try:
        return None if attr is None or attr.is_ref() else int(attr.as_int())
    except TypeError:
        return -1


def const_array(value: ir.Value | None) -> np.ndarray | None:
    """The constant behind a value, or None: an initializer, a ``Constant`` node, or a small
    constant expression over them (``Identity`` chains, Cast, Reshape, Squeeze/Unsqueeze,
    Transpose, Concat, ConstantOfShape, a weight standardised by arithmetic...), evaluated with
    onnx's reference implementation of each op. Nothing in the graph changes: a constant read
    elsewhere stays where it is."""
    return _resolve(value, _MAX_CONSTANT_DEPTH, {})


def _resolve(value: ir.Value | None, depth: int, done: dict[int, np.ndarray | None]) -> np.ndarray | None:
    """``const_array`` with what this call already resolved (by value id): a standardised weight
    reads its centred copy twice, and each read must not evaluate it again."""
    if value is None:
        return None
    if id(value) in done:
        return done[id(value)]
    try:
        tensor = ir.convenience.get_const_tensor(value)
    except ValueError:
        return None
    if tensor is not None:
        return tensor.numpy()
    node = value.producer()
    # BatchNormalization in inference mode over constants (the dynamo exporter's ScaledStdConv2d) is
    # a plain affine map, computed the same by onnxruntime and the reference; training mode is not.
    inference_bn = node is not None and node.op_type == "BatchNormalization" and len(node.outputs) == 1 \
        and _int_attribute(node, "training_mode") in (None, 0)
    if (node is None or depth <= 0 or node.op_type not in CONSTANT_EXPRESSION_OPS | WEIGHT_COMPUTING_OPS
            and not inference_bn or node.domain not in ("", "ai.onnx") or value.is_graph_input()):
        return None
    if node.op_type == "Identity":
        return _resolve(node.inputs[0], depth - 1, done)
    arrays = []
    for v in node.inputs:  # stop at the first input that is not constant: activations often pass these ops
        array = None if v is None else _resolve(v, depth - 1, done)
        if v is not None and array is None:
            done[id(value)] = None
            return None
        arrays.append(array)
    done[id(value)] = _evaluate(node, arrays, value.index() or 0)
    return done[id(value)]


def _evaluate(node: ir.Node, arrays: list[np.ndarray | None], output: int = 0) -> np.ndarray | None:
    """Output ``output`` of one node of a constant expression, run by ``onnx.reference`` on its
    constant inputs."""
    import onnx
    from onnx.reference import ReferenceEvaluator

    names = [f"in{i}" if a is not None else "" for i, a in enumerate(arrays)]
    proto = ir.serde.serialize_node(node)
    del proto.input[:]
    proto.input.extend(names)
    outputs = [f"out{i}" for i in range(len(proto.output))]
    del proto.output[:]
    proto.output.extend(outputs)
    initializers = [onnx.numpy_helper.from_array(a, n) for a, n in zip(arrays, names) if a is not None]
    graph = onnx.helper.make_graph([proto], "constant", [], [onnx.helper.make_tensor_value_info(outputs[output], 0, None)],
                                   initializer=initializers)
    opset = _opset_of_graph(node)
    model = onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", opset)])
    try:
        return np.asarray(ReferenceEvaluator(model).run(None, {})[0])
    except Exception:  # an expression the reference cannot run is simply not a constant
        return None


def _opset_of_graph(node: ir.Node) -> int:
    """The opset to run one constant-expression node under. A subgraph does not know its model's
    opset; of the ops folded here only Squeeze/Unsqueeze changed form (axes moved from attribute
    to input at 13), so the node's own form tells."""
    if node.version is not None:
        return node.version
    opsets = node.graph.opset_imports if node.graph is not None else {}
    if "" in opsets or "ai.onnx" in opsets:
        return opsets.get("", opsets.get("ai.onnx"))
    return 11 if "axes" in node.attributes else 18


# How a reason names an initializer that is also a graph input: the user may feed another value.
GRAPH_INPUT = "a graph input (replaceable at run time)"

# From IR version 4 on, an initializer may also be a graph input, and then the user may feed another
# value for it. Before IR 4 every initializer had to be listed among the graph inputs, and
# onnxruntime treats those as constants (it refuses a feed for one): listing says nothing there.
OVERRIDABLE_INITIALIZERS_IR = 4


@contextmanager
def initializers_as_constants(model: ir.Model) -> Iterator[None]:
    """Inside: an IR < 4 model's initializers are not graph inputs (as the runtime reads them,
    constants), so every pass treats them as it does in a newer file. On leaving, every
    initializer a graph then holds is listed among its inputs again, as IR < 4 requires: the
    file's own inputs in their order (less removed initializers), new initializers after them.
    A model of IR 4 or newer is left exactly as it is."""
    if model.ir_version is None or model.ir_version >= OVERRIDABLE_INITIALIZERS_IR:
        yield
        return
    listed = []
    for graph in model.graphs():
        constant = {id(v) for v in graph.inputs if graph.initializers.get(v.name) is v}
        listed.append((graph, list(graph.inputs), constant))
        kept = [v for v in graph.inputs if id(v) not in constant]
        graph.inputs.clear()
        graph.inputs.extend(kept)
    try:
        yield
    finally:
        for graph, inputs, constant in listed:
            # An initializer a pass removed (a weight it replaced) is no input any more either.
            alive = [v for v in inputs if id(v) not in constant or graph.initializers.get(v.name) is v]
            known = {id(v) for v in alive}
            added = [v for v in graph.initializers.values() if id(v) not in known]
            for value in added:  # a graph input is declared with its type and shape
                if value.type is None and value.const_value is not None:
                    value.type = ir.TensorType(value.const_value.dtype)
                    value.shape = ir.Shape(value.const_value.shape.dims)
            graph.inputs.clear()
            graph.inputs.extend(alive + added)


def is_replaceable(value: ir.Value | None) -> bool:
    """Whether a constant can be replaced at run time: it is (or is computed from) a graph input.
    (Before IR 4 every initializer is listed among the graph inputs and is still a constant: the
    passes run inside ``initializers_as_constants``, where those are no inputs.)"""
    return _graph_input_behind(value, initializers_only=False) is not None


def overridable_input(value: ir.Value | None) -> str | None:
    """The name of the initializer that is also a graph input which ``value`` is, or is computed
    from through the small constant expressions ``const_array`` follows; None if there is none.
    Such a value is never folded, stacked or removed: the user may feed another one."""
    found = _graph_input_behind(value, initializers_only=True)
    return None if found is None else found.name or "an unnamed input"


def graph_input_name(value: ir.Value | None) -> str | None:
    """The name of the graph input (initializer or not) a value is or is computed from, or None."""
    found = _graph_input_behind(value, initializers_only=False)
    return None if found is None else found.name or "an unnamed input"


def _graph_input_behind(value: ir.Value | None, *, initializers_only: bool) -> ir.Value | None:
    pending, seen = [value], set()
    while pending:
        current = pending.pop()
        if current is None or id(current) in seen:
            continue
        seen.add(id(current))
        if current.is_graph_input() and (current.const_value is not None or not initializers_only):
            return current
        node = current.producer()
        if node is not None and node.op_type in CONSTANT_EXPRESSION_OPS | WEIGHT_COMPUTING_OPS and len(seen) < 256:
            pending.extend(node.inputs)
    return None


def refuse_overridable_inputs(node: ir.Node, data: ir.Value | None = None) -> None:
    """Raise ``Refused`` naming the first input of ``node`` (other than the branch tensor
    ``data``) that is an initializer the user may replace at run time: a tail op's constant
    (Mul/Add scale, BatchNormalization parameters, Clip or Pad bounds) is concatenated into the
    fused op, which would then ignore what is fed. The whole candidate is left alone."""
    for value in node.inputs:
        if value is None or value is data:
            continue
        name = overridable_input(value)
        if name is not None:
            raise Refused("overridable-input", f"the {_describe_op(node, data)} reads '{name}', {GRAPH_INPUT}")


def _describe_op(node: ir.Node, data: ir.Value | None) -> str:
    """ "Mul after branch conv c0": the op and the convolution of its branch, walking back along
    the branch tensor (the one input that is not a constant) to the nearest conv."""
    current = data
    for _ in range(32):
        producer = current.producer() if current is not None else None
        if producer is None:
            break
        if producer.op_type in ("Conv", "ConvTranspose"):
            return f"{node.op_type} after branch conv {producer.name or producer.outputs[0].name}"
        variable = [v for v in producer.inputs if v is not None and v.const_value is None
                    and not v.is_graph_input() and const_array(v) is None]
        current = variable[0] if variable else None
    return f"{node.op_type} {node.name}".strip()


def node_label(node: ir.Node) -> str:
    """What identifies a node in a report: its name, or, for the unnamed nodes of many graphs
    (OpenVINO's and onnx-mlir's tests, hand-built models), its op type and first output's name
    ("Conv:conv_out"), which ONNX requires to be unique in a graph."""
    if node.name:
        return node.name
    output = node.outputs[0].name if node.outputs and node.outputs[0].name else None
    return f"{node.op_type}:{output}" if output else node.op_type


def const_shape(value: ir.Value | None) -> tuple[int, ...] | None:
    """A constant's shape without reading its data where possible (its tensor or recorded
    shape, through Identity, or the target of a Reshape that names every dim: a weight computed
    at run time and reshaped back to its own shape), else from its value."""
    current = value
    for _ in range(_MAX_CONSTANT_DEPTH):
        if current is None:
            return None
        shape = current.const_value.shape if current.const_value is not None else current.shape
        if shape is not None and all(isinstance(d, int) for d in shape):
            return tuple(int(d) for d in shape)
        node = current.producer()
        if node is not None and node.op_type == "Reshape" and len(node.inputs) > 1:
            target = const_ints(node.inputs[1])
            if target and all(d > 0 for d in target):
                return tuple(target)
        if node is None or node.op_type != "Identity":
            break
        current = node.inputs[0]
    array = const_array(value)
    return None if array is None else tuple(array.shape)


def not_constant_reason(value: ir.Value | None) -> str:
    """Why a weight or bias is no constant, as the end of a sentence about it: "are computed at
    run time by ...", naming the op that computes it from initializers where that is what stops
    the fold (a BatchNormalization in training mode), else "are not constants"."""
    pending, seen = [value], set()
    while pending and len(seen) < 64:
        current = pending.pop()
        node = current.producer() if current is not None else None
        if node is None or id(node) in seen:
            continue
        seen.add(id(node))
        if node.op_type == "BatchNormalization" and attr_int(node, "training_mode", 0) == 1:
            if all(v is None or const_array(v) is not None for v in node.inputs):
                return ("are computed at run time from initializers by a BatchNormalization in training mode "
                        "(weight standardisation), which onnxruntime computes differently from the ONNX "
                        "reference: not folded ahead of time")
        if node.op_type in CONSTANT_EXPRESSION_OPS | WEIGHT_COMPUTING_OPS:
            pending.extend(v for v in node.inputs if v is not None)
    return "are not constants"


def const_ints(value: ir.Value | None) -> list[int] | None:
    array = const_array(value)
    if array is None or array.dtype.kind not in "iu":
        return None
    return [int(v) for v in array.reshape(-1)]


def _ints(array: np.ndarray | None) -> list[int] | None:
    if array is None or array.dtype.kind not in "iu":
        return None
    return [int(v) for v in array.reshape(-1)]


def attr_ints(node: ir.Node, name: str) -> list[int] | None:
    attr = node.attributes.get(name)
    if attr is None:
        return None
    try:
        return [int(v) for v in attr.as_ints()]
    except TypeError:  # a damaged or hand-written attribute of another type
        raise Refused("malformed", f"{node.op_type} {node_label(node)} has a {name} attribute that is not a list of ints") from None


def attr_int(node: ir.Node, name: str, default: int) -> int:
    attr = node.attributes.get(name)
    if attr is not None and attr.is_ref():  # inside a local function: each call site sets it
        raise Refused("call-site-attribute", f"{node.op_type} {node_label(node)} takes its {name} from the call site (@{attr.ref_attr_name})")
    try:
        return default if attr is None else int(attr.as_int())
    except TypeError:
        raise Refused("malformed", f"{node.op_type} {node_label(node)} has a {name} attribute that is not an int") from None


def attr_str(node: ir.Node, name: str, default: str) -> str:
    attr = node.attributes.get(name)
    return default if attr is None else attr.as_string()


def static_dim(value: ir.Value, axis: int) -> int | None:
    shape = value.shape
    if shape is None or axis >= len(shape):
        return None
    dim = shape[axis]
    return dim if isinstance(dim, int) else None


def conv_shape_attributes(node: ir.Node, spatial_rank: int) -> dict:
    """The attributes that decide a Conv's output, with ONNX defaults filled in, so that a
    missing ``strides`` and an explicit ``strides=[1,1]`` compare equal."""
    auto_pad = attr_str(node, "auto_pad", "NOTSET")
    attributes = {
        "auto_pad": auto_pad,
        "strides": tuple(attr_ints(node, "strides") or [1] * spatial_rank),
        "dilations": tuple(attr_ints(node, "dilations") or [1] * spatial_rank),
    }
    if auto_pad == "NOTSET":  # pads mean nothing under SAME_*/VALID
        attributes["pads"] = tuple(attr_ints(node, "pads") or [0] * (2 * spatial_rank))
    if node.op_type == "ConvTranspose":
        attributes["output_padding"] = tuple(attr_ints(node, "output_padding") or [0] * spatial_rank)
        output_shape = attr_ints(node, "output_shape")
        if output_shape:
            attributes["output_shape"] = tuple(output_shape)
    return attributes


def split_sizes(split: ir.Node, model: ir.Model, channels: int | None) -> list[int] | None:
    """Output sizes of a Split along its axis, from the attribute (opset < 13), the input
    (>= 13), or an even split / ``num_outputs`` (18) of a known channel count. Raises
    ``UnreadableRange`` when the sizes are an initializer the user may replace at run time."""
    opset = opset_of(split, model)
    if opset < 13:
        sizes = attr_ints(split, "split")
    else:
        given = split.inputs[1] if len(split.inputs) > 1 else None
        name = overridable_input(given)
        if name is not None:
            raise UnreadableRange("overridable-input", f"{split.name or 'a Split'} reads its sizes from '{name}', {GRAPH_INPUT}")
        sizes = const_ints(given) if given is not None else None
        if sizes is None and given is not None:
            return None  # sizes computed at run time
    if sizes:
        return sizes
    if channels is None:
        return None
    n = len(split.outputs)
    if opset >= 18 and "num_outputs" in split.attributes:
        chunk = -(-channels // n)  # ceil: the last chunk may be smaller
        return [chunk] * (n - 1) + [channels - chunk * (n - 1)]
    if channels % n:
        return None
    return [channels // n] * n


class UnreadableRange(Refused):
    """A Split or Slice output that is not one constant, contiguous channel range; says why (a
    refusal: code and reason)."""


def read_channels(value: ir.Value, model: ir.Model, channels: int | None, fold=None) -> ChannelRead | None:
    """Which channel range of which tensor ``value`` is, if a Split or Slice produced it.

    None when no Split/Slice produced it; ``UnreadableRange`` when one did but what it reads is
    not a constant, contiguous range, so that a near miss can be reported with its reason.
    ``fold(value)``, when given, evaluates a computed bound: an array, None, or a sentence that
    says why it is not a constant."""
    node = value.producer()
    if node is None or node.domain not in ("", "ai.onnx"):
        return None
    if node.op_type == "Split":
        axis = attr_int(node, "axis", 0)
        sizes = split_sizes(node, model, channels)
        if sizes is None:
            return ChannelRead(node.inputs[0], node, axis, None, None)
        index = value.index()
        start = sum(sizes[:index])
        return ChannelRead(node.inputs[0], node, axis, start, start + sizes[index])
    if node.op_type == "Slice":
        return _read_slice(node, model, channels, fold)
    return None


def _read_slice(node: ir.Node, model: ir.Model, channels: int | None, fold=None) -> ChannelRead:
    label = node.name or "a Slice"
    if opset_of(node, model) < 10:
        starts, ends, axes, steps = (attr_ints(node, "starts"), attr_ints(node, "ends"),
                                     attr_ints(node, "axes"), None)
    else:
        inputs = list(node.inputs) + [None] * (5 - len(node.inputs))

        def ints(value: ir.Value, role: str) -> list[int] | None:
            """A bound's integers: a constant, or, through ``fold``, computed from Shape
            (PyTorch's torch.chunk) where that is proven; never a value the user may feed."""
            name = overridable_input(value)
            if name is not None:
                raise UnreadableRange("overridable-input", f"{label} reads its {role} from '{name}', {GRAPH_INPUT}")
            found = const_ints(value)
            if found is not None or fold is None:
                return found
            folded = fold(value)
            if isinstance(folded, str):  # why it is not a constant (a dynamic dim, a graph input)
                raise UnreadableRange("not-constant", f"{label} has {role} {folded}: not provably constant")
            return _ints(folded)

        starts, ends = ints(inputs[1], "starts"), ints(inputs[2], "ends")
        axes = ints(inputs[3], "axes") if inputs[3] is not None else None
        steps = ints(inputs[4], "steps") if inputs[4] is not None else None
        if (inputs[3] is not None and axes is None) or (inputs[4] is not None and steps is None):
            raise UnreadableRange("not-constant", f"{label} has axes or steps computed at run time")
    if starts is None or ends is None:
        raise UnreadableRange("not-constant", f"{label} has starts or ends computed at run time, not provably constant")
    axes = axes if axes is not None else list(range(len(starts)))
    steps = steps if steps is not None else [1] * len(starts)
    source = node.inputs[0]
    rank = len(source.shape) if source.shape is not None else None
    # One axis must carry the range; every other listed axis must take everything.
    sliced = []
    for axis, start, end, step in zip(axes, starts, ends, steps):
        if step != 1:
            raise UnreadableRange("not-a-range", f"{label} has step {step} on axis {axis}: not a contiguous channel range")
        whole = start == 0 and end >= OPEN_END
        if not whole:
            sliced.append((axis, start, end))
    if len(sliced) != 1:
        raise UnreadableRange("not-a-range", f"{label} slices {len(sliced)} axes, not one channel range")
    axis, start, end = sliced[0]
    if rank is not None and axis < 0:
        axis += rank
    open_end = end >= OPEN_END
    if start < 0 or end < 0:
        if channels is None:
            raise UnreadableRange("unknown-channels", f"{label} counts from the end of a tensor whose channel count is unknown")
        start = start + channels if start < 0 else start
        end = end + channels if end < 0 else end
    if channels is not None:
        start, end = min(max(start, 0), channels), min(max(end, 0), channels)
        open_end = False
    return ChannelRead(source, node, axis, start, None if open_end else end, open_end=open_end)


def new_initializer(graph: ir.Graph, name: str, array: np.ndarray) -> ir.Value:
    # Type and shape come from the tensor; setting them on the value would add value_info entries.
    value = ir.Value(name=name, const_value=ir.Tensor(np.asarray(array, order="C"), name=name))
    graph.register_initializer(value)
    return value


def add_constants(graph: ir.Graph, values: list[ir.Value], *, as_nodes: bool) -> None:
    """Make ``values`` (each holding a tensor) part of ``graph``: initializers, or, in a function
    body (which cannot hold initializers), Constant nodes at its start."""
    if not as_nodes:
        for value in values:
            graph.register_initializer(value)
        return
    first = next(iter(graph), None)
    for value in values:
        node = ir.Node("", "Constant", [], [ir.AttrTensor("value", value.const_value)], name=f"{value.name}_constant")
        ir.convenience.replace_all_uses_with(value, node.outputs[0])
        node.outputs[0].name = value.name
        if first is None:
            graph.append(node)
        else:
            graph.insert_before(first, node)


def remove_dead_producers(graph: ir.Graph, values) -> None:
    """Drop what only the replaced nodes used: weights, biases, Slice bounds, and the small
    computations behind them (PyTorch's Shape → Gather → Div → Mul), transitively. Nothing that
    something else still uses is touched."""
    pending = list(dict.fromkeys(v for v in values if v is not None))
    while pending:
        value = pending.pop()
        if value.uses() or value.is_graph_output() or value.is_graph_input():
            continue
        if value.is_initializer() and graph.initializers.get(value.name) is value:
            del graph.initializers[value.name]
            _release(value.const_value)
            continue
        producer = value.producer()
        if producer is None or producer.graph is not graph:
            continue
        if any(o.uses() or o.is_graph_output() for o in producer.outputs):
            continue
        inputs = [v for v in producer.inputs if v is not None]
        graph.remove(producer, safe=True)
        pending.extend(inputs)


def _release(tensor) -> None:
    """Unmap a dead external tensor now: its pages would otherwise count in the process's memory
    until the garbage collector gets to it (a 2.5 GB model must fuse in about its own size)."""
    if isinstance(tensor, ir.ExternalTensor):
        try:
            tensor.release()
        except BufferError:  # a numpy view still holds it; the collector will
            pass


class Names:
    """Fresh, deterministic node and value names, indexed once per graph."""

    def __init__(self, graph: ir.Graph):
        self._nodes = {n.name for n in graph if n.name}
        self._values = set(graph.initializers)
        self._values.update(v.name for v in graph.inputs if v.name)
        for node in graph:
            self._values.update(o.name for o in node.outputs if o.name)

    def node(self, base: str) -> str:
        return fresh_name(base, self._nodes)

    def value(self, base: str) -> str:
        return fresh_name(base, self._values)
