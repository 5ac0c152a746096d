"""Fuse hand-made grouped convolutions of a QOperator-quantized model into one QLinearConv.

    xq → Split|Slice_i(axis=1) → QLinearConv_i → Concat | QLinearConcat(axis=1)  ⇒  xq → QLinearConv(group=N)

This is the form onnxruntime's static quantizer writes with ``quant_format=QuantFormat.QOperator``
(``QLinearConcat`` is its com.microsoft op). The fusion is exact, integer for integer, only when
the fused op can compute what every branch computed:

- the branches read one tensor, so they share its quantization (x_scale, x_zero_point);
- one QLinearConv has one output quantization: the branches' y_scale/y_zero_point are equal, and
  a QLinearConcat's output scale and zero point equal each of its inputs' (else it requantizes);
- weights stack on the output axis: a per-tensor weight scale (and zero point) per branch becomes
  one value per output channel of the fused conv, which QLinearConv allows;
- int32 biases were quantized with x_scale·w_scale: with x_scale shared they stack as they are.

Anything else is left alone with the reason. Quantization parameters that are graph inputs
(overridable at run time) are never stacked or copied: the candidate is refused, naming them,
unless every branch reads the very same input, which the fused conv then reads too.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import onnx_ir as ir

from gconv_rewrite.candidate import ChannelRead, NotACandidate, Refused
from gconv_rewrite.passes.onnx import _graph as g
from gconv_rewrite.passes.onnx import _qdq
from gconv_rewrite.passes.onnx._fold import channels_of
from gconv_rewrite.plan import Branch, FusionPlan, Refusal, plan_fusion
from gconv_rewrite.report import Rewrite, Skip
from gconv_rewrite.targets import ConvProps, Decision

KIND = "fuse-qlinear-conv"
READERS = ("Split", "Slice")
MICROSOFT = "com.microsoft"
# QLinearConv's inputs by position (the bias, 8, is optional).
X, X_SCALE, X_ZERO_POINT, W, W_SCALE, W_ZERO_POINT, Y_SCALE, Y_ZERO_POINT, BIAS = range(9)
# What every branch must share, by input position, as the report names it.
SHARED_INPUTS = {X_SCALE: "x_scale", X_ZERO_POINT: "x_zero_point", Y_SCALE: "y_scale", Y_ZERO_POINT: "y_zero_point"}


@dataclass
class _Join:
    """The node that joins the branches: a Concat, or a QLinearConcat with its own output
    quantization and, per joined input, the scale and zero point it reads that input with."""

    node: ir.Node
    branch_values: list[ir.Value]
    axis: int
    output_quantization: tuple[ir.Value, ir.Value] | None = None
    input_quantization: list[tuple[ir.Value, ir.Value]] = field(default_factory=list)

    @property
    def label(self) -> str:
        return self.node.op_type


@dataclass
class _Candidate:
    """N QLinearConv branches, each reading a channel range of one source, and their join."""

    join: _Join
    convs: list[ir.Node]
    reads: list[ChannelRead]
    source_channels: int | None


@dataclass
class _Plan:
    """What the fused QLinearConv reads: the stacked integer weight and int32 bias (``fusion``),
    the weight scale and zero point (one per output channel unless every branch had the same),
    and the shared quantization values it reads as the branches did (by input position)."""

    fusion: FusionPlan
    weight_scale: np.ndarray
    weight_zero_point: np.ndarray
    shared: dict[int, ir.Value]


def _read_join(node: ir.Node) -> _Join | None:
    """A Concat or com.microsoft QLinearConcat as a join, or None for any other node.
    QLinearConcat's inputs are ``Y_scale, Y_zero_point, (X_i, X_i_scale, X_i_zero_point)...``."""
    if node.op_type == "Concat" and node.domain in ("", "ai.onnx"):
        return _Join(node, list(node.inputs), g.attr_int(node, "axis", 1))
    if node.op_type == "QLinearConcat" and node.domain == MICROSOFT and len(node.inputs) >= 5:
        triples = list(node.inputs)[2:]
        if len(triples) % 3:
            return None
        return _Join(node, triples[0::3], g.attr_int(node, "axis", 1),
                     output_quantization=(node.inputs[0], node.inputs[1]),
                     input_quantization=list(zip(triples[1::3], triples[2::3])))
    return None


class FuseQLinearConvPass(ir.passes.InPlacePass):
    """Rewrite every exactly fusable set of QLinearConv branches; record rewrites and skips.

    ``rewrite`` False only finds and plans (``--check``, ``--dry-run``). ``accept(props) -> (ok,
    rule)`` (``--target``) is asked about the grouped conv a candidate would become; a refused one
    stays as it is, reported with the rule, and each judged candidate is listed in ``decisions``."""

    def __init__(self, *, rewrite: bool = True, accept: Callable[[ConvProps], tuple[bool, str]] | None = None):
        super().__init__()
        self.rewrite = rewrite
        self.accept = accept
        self.decisions: list[Decision] = []
        self.created: list[ir.Node] = []  # every QLinearConv this pass wrote
        self.rewrites: list[Rewrite] = []
        self.skipped: list[Skip] = []
        self.fused_convs: list[ir.Node] = []  # nothing folds into an integer conv: always empty

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        # Before IR 4 every initializer is listed as a graph input, yet the runtime holds it constant.
        with g.initializers_as_constants(model):
            return self._rewrite_model(model)

    def _rewrite_model(self, model: ir.Model) -> ir.passes.PassResult:
        modified = False
        for graph in model.graphs():
            label = "" if graph is model.graph else (graph.name or "subgraph")
            modified |= self._fuse_graph(model, graph, label, in_function=False)
        for function in model.functions.values():  # their bodies run wherever the model calls them
            for graph in [*function.graph.subgraphs(), function.graph]:
                modified |= self._fuse_graph(model, graph, f"function {function.name}", in_function=True)
        return ir.passes.PassResult(model, modified)

    def _fuse_graph(self, model: ir.Model, graph: ir.Graph, label: str, *, in_function: bool) -> bool:
        names = g.Names(graph)
        position = {id(node): i for i, node in enumerate(graph)}
        modified = False
        for join in [j for j in map(_read_join, graph) if j is not None]:
            location = join.node.name or join.node.outputs[0].name or join.label
            try:
                candidate = _match(model, join)
                plan = _plan(candidate)
            except NotACandidate:
                continue
            except Refused as refusal:
                convs = [g.node_label(n) for v in join.branch_values if v is not None
                         for n in [v.producer()] if n is not None and n.op_type == "QLinearConv"]
                self.skipped.append(Skip.refused(location, refusal, convs, label))
                continue
            name = names.node(f"{candidate.convs[0].name or 'QLinearConv'}_group{plan.fusion.groups}")
            if not self._accepted(candidate, plan, location, name, label):
                continue
            replaced = _replaced_nodes(candidate)
            self.rewrites.append(Rewrite(
                kind=KIND, location=name, groups=plan.fusion.groups,
                channels={"in": plan.fusion.in_channels, "out": plan.fusion.out_channels},
                nodes=[g.node_label(n) for n in replaced], graph=label,
                boundary=[{"tensor": join.node.outputs[0].name}]))  # the fused conv's output takes its name
            if self.rewrite:
                self.created.append(_emit(graph, position, names, name, candidate, plan, in_function=in_function))
                modified = True
        return modified

    def _accepted(self, candidate: _Candidate, plan: _Plan, location: str, name: str, label: str) -> bool:
        """The ``accept`` hook's verdict (True without a hook); a refusal is recorded as a skip.
        Reports name the join where the branches stay, the fused conv (``name``) where they fuse."""
        if self.accept is None:
            return True
        fusion = plan.fusion
        ok, rule = self.accept(ConvProps(groups=fusion.groups, in_channels=fusion.in_channels,
                                         out_channels=fusion.out_channels, kernel_rank=fusion.weight.ndim - 2))
        if not ok:
            self.skipped.append(Skip(location, rule, [g.node_label(c) for c in candidate.convs], label,
                                     code="target-keeps"))
        self.decisions.append(Decision(location=name if ok else location, graph=label, form="native" if ok else "split",
                                       action="fuse" if ok else "keep", rule=rule))
        return ok


# -- matching ------------------------------------------------------------------------------------


def _match(model: ir.Model, join: _Join) -> _Candidate:
    """The QLinearConv branches a join reads, each from a Split/Slice of one source; NotACandidate
    when fewer than two QLinearConvs read a Split/Slice, Refused (with the reason) for a near miss."""
    producers = [v.producer() if v is not None else None for v in join.branch_values]
    convs = [p for p in producers if p is not None and p.op_type == "QLinearConv" and p.domain in ("", "ai.onnx")]
    if sum(1 for conv in convs if _is_reader_output(conv.inputs[X])) < 2:
        raise NotACandidate
    if len(convs) != len(producers):
        raise Refused("concat-extra-inputs", f"the {join.label} also joins inputs that are not QLinearConv branches")
    if len({id(v) for v in join.branch_values}) != len(join.branch_values):
        raise Refused("concat-twice", "a branch is concatenated twice")
    for value in join.branch_values:
        if value.is_graph_output() or len(value.uses()) != 1:
            raise Refused("used-outside", f"branch output {value.name} is used outside the {join.label}")
    for conv in convs:
        entry = conv.inputs[X]
        if not _is_reader_output(entry):
            raise Refused("mixed-readers", "some branches read a Split/Slice, others do not")
        if entry.is_graph_output() or len(entry.uses()) != 1:
            raise Refused("used-outside", f"branch input {entry.name} is used outside its branch")
    reads, channels = _read_ranges(model, convs)
    rank = _weight_rank(convs[0])
    if rank is not None and join.axis % rank != 1:
        raise Refused("not-channel-axis", f"{join.label} on axis {join.axis}, not the channel axis")
    return _Candidate(join, convs, reads, channels)


def _read_ranges(model: ir.Model, convs: list[ir.Node]) -> tuple[list[ChannelRead], int | None]:
    """Which channel range of which tensor each branch reads, and the source's channel count."""
    readers = list(dict.fromkeys(conv.inputs[X].producer() for conv in convs))
    for reader in readers:
        for value in list(reader.inputs)[1:]:  # split sizes, slice bounds: never baked in if overridable
            graph_input = g.graph_input_name(value)
            if graph_input is not None:
                label = f"{reader.op_type} {reader.name}" if reader.name else reader.op_type
                raise Refused("overridable-input", f"{label} reads its bounds from graph input {graph_input} (replaceable at run time)")
    if len({r.op_type for r in readers}) > 1:
        raise Refused("mixed-readers", "branches mix Split and Slice")
    widths = [_in_channels(conv) for conv in convs]
    source = readers[0].inputs[0]
    channels = _source_channels(source)
    if channels is None and readers[0].op_type == "Split" and None not in widths:
        channels = sum(widths)  # a Split hands out all its channels
    reads = []
    for conv, width in zip(convs, widths):
        try:
            read = g.read_channels(conv.inputs[X], model, channels)
        except g.UnreadableRange as exc:
            raise Refused(exc.refusal) from None
        if read.start is None:
            raise Refused("not-constant", "cannot tell the Split sizes (computed at run time)")
        if read.open_end and width is not None:
            read.stop = read.start + width
        reads.append(read)
    if channels is None and reads[-1].open_end:
        channels = reads[-1].stop
    _check_reads(reads, readers, convs)
    return reads, channels


def _check_reads(reads: list[ChannelRead], readers: list[ir.Node], convs: list[ir.Node]) -> None:
    if len({id(r.source) for r in reads}) != 1:
        raise Refused("different-sources", "branches read from different tensors")
    if readers[0].op_type == "Split":
        if len(readers) != 1:
            raise Refused("mixed-readers", "branches read from different Split nodes")
        if len(readers[0].outputs) != len(convs):
            raise Refused("mixed-readers", f"Split has {len(readers[0].outputs)} outputs but only {len(convs)} "
                          "feed the join")
    rank = _weight_rank(convs[0])
    for read in reads:
        if rank is not None and read.axis % rank != 1:
            raise Refused("not-channel-axis", f"{read.reader.op_type} on axis {read.axis}, not the channel axis")


def _source_channels(source: ir.Value) -> int | None:
    """The channel count of the quantized source: its shape, or that of the float tensor a
    QuantizeLinear made it from (the quantizer records no shape for what it writes)."""
    for _ in range(8):
        channels = channels_of(source)
        producer = source.producer()
        if channels is not None or producer is None or producer.op_type not in ("QuantizeLinear", "DequantizeLinear"):
            return channels
        source = producer.inputs[0]
    return None


# -- planning ------------------------------------------------------------------------------------


def _plan(candidate: _Candidate) -> _Plan:
    """The fused QLinearConv's parameters, or Refused with the first reason it would not be exact."""
    convs = candidate.convs
    shared = {}
    for index, role in SHARED_INPUTS.items():
        values = [(f"{role} of {_label(conv)}", conv.inputs[index]) for conv in convs]
        if index in (Y_SCALE, Y_ZERO_POINT) and candidate.join.output_quantization is not None:
            # The join's output quantization first: the fused conv reads what the join's readers read.
            values = _join_quantization(candidate.join, index == Y_SCALE) + values
        shared[index] = _shared(values, role, candidate.join.label)
    branches, scales, zero_points = [], [], []
    for conv, read in zip(convs, candidate.reads):
        weight, bias, scale, zero_point = _branch_constants(conv)
        branches.append(Branch(
            name=conv.name or "", channel_start=read.start, channel_stop=read.stop, weight=weight, bias=bias,
            groups=g.attr_int(conv, "group", 1), out_channels=int(weight.shape[0]),
            attributes=g.conv_shape_attributes(conv, weight.ndim - 2)))
        scales.append(scale)
        zero_points.append(zero_point)
    fusion = plan_fusion(branches, candidate.source_channels, stack_axis=0)
    if isinstance(fusion, Refusal):
        raise Refused(fusion)
    if fusion.bias is not None and fusion.bias.dtype != np.int32:
        raise Refused("quantization-mismatch", f"biases are {fusion.bias.dtype}, not int32")
    parts = [_qdq.Quantized(conv, b.weight, s, z) for conv, b, s, z in zip(convs, branches, scales, zero_points)]
    try:  # one scale and zero point where every branch has the same, else one per output channel
        weight_scale, weight_zero_point = _qdq.stack(parts)
    except _qdq.NotExact as exc:
        raise Refused(exc.refusal) from None
    return _Plan(fusion, weight_scale, weight_zero_point, shared)


def _join_quantization(join: _Join, scale: bool) -> list[tuple[str, ir.Value]]:
    """A QLinearConcat's output scale (or zero point) and the one it reads each input with."""
    role = "scale" if scale else "zero point"
    pick = 0 if scale else 1
    values = [(f"the {join.label}'s output {role}", join.output_quantization[pick])]
    values += [(f"the {join.label}'s {role} for input {i}", pair[pick])
               for i, pair in enumerate(join.input_quantization)]
    return values


def _shared(values: list[tuple[str, ir.Value]], role: str, join_label: str) -> ir.Value:
    """The one value every branch reads for ``role``: equal constants, or one graph input that
    every branch (and the join) reads; Refused with the first difference otherwise."""
    same_value = len({id(v) for _, v in values}) == 1
    for label, value in values:
        graph_input = g.graph_input_name(value)
        if graph_input is not None and not same_value:
            raise Refused("overridable-input", f"{label} is graph input {graph_input} (replaceable at run time), "
                          "not read by every branch alike")
    arrays = [g.const_array(v) for _, v in values]
    for (label, _), array in zip(values, arrays):
        if array is None:
            raise Refused("not-constant", f"{label} is not a constant")
    first_label, first = values[0][0], arrays[0]
    for (label, _), array in zip(values[1:], arrays[1:]):
        if array.shape != first.shape or not np.array_equal(array, first):
            why = (f"the {join_label} requantizes, so one QLinearConv would not compute the same integers"
                   if join_label == "QLinearConcat" and role.startswith("y_") else
                   "one QLinearConv has one " + ("output" if role.startswith("y_") else "input") + " quantization")
            raise Refused("quantization-mismatch", f"{label} is {_describe(array)} but {first_label} is {_describe(first)}: {why}")
    return values[0][1]


def _branch_constants(conv: ir.Node) -> tuple[np.ndarray, np.ndarray | None, np.ndarray, np.ndarray]:
    """A branch's integer weight, int32 bias (None without), weight scale and zero point (a
    scalar for one value, else one per output channel); Refused if one is not a fixed constant."""
    inputs = list(conv.inputs) + [None] * (BIAS + 1 - len(conv.inputs))
    roles = {W: "weights", BIAS: "bias", W_SCALE: "weight scale", W_ZERO_POINT: "weight zero point"}
    arrays = {}
    for index, role in roles.items():
        value = inputs[index]
        if value is None:
            continue
        graph_input = g.graph_input_name(value)
        if graph_input is not None:
            raise Refused("overridable-input", f"{_label(conv)} reads its {role} from graph input {graph_input} (replaceable at run time)")
        arrays[index] = g.const_array(value)
        if arrays[index] is None:
            raise Refused("not-constant", f"the {role} of {_label(conv)} {'are' if role == 'weights' else 'is'} not a constant")
    weight = arrays.get(W)
    if weight is None or W_SCALE not in arrays or W_ZERO_POINT not in arrays:
        raise Refused("not-constant", f"{_label(conv)} has no constant weight, weight scale or weight zero point")
    out_channels = int(weight.shape[0])
    scale, zero_point = (_per_tensor_or_channel(arrays[i], out_channels, roles[i], conv) for i in (W_SCALE, W_ZERO_POINT))
    if scale.ndim != zero_point.ndim:  # one per channel, the other per tensor: both per channel
        scale, zero_point = (np.broadcast_to(a, (out_channels,)) for a in (scale, zero_point))
    bias = arrays.get(BIAS)
    if bias is not None and bias.shape != (out_channels,):
        raise Refused("quantization-mismatch", f"bias of {_label(conv)} has shape {list(bias.shape)}, not one value per output channel")
    return weight, bias, scale, zero_point


def _per_tensor_or_channel(array: np.ndarray, out_channels: int, role: str, conv: ir.Node) -> np.ndarray:
    """One value as a scalar, or one per output channel as a vector; Refused for any other shape."""
    if array.size == 1:
        return array.reshape(())
    if array.shape == (out_channels,):
        return array
    raise Refused("quantization-mismatch", f"{role} of {_label(conv)} has shape {list(array.shape)}: neither one value nor one per "
                  "output channel")


# -- emitting ------------------------------------------------------------------------------------


def _emit(graph: ir.Graph, position: dict[int, int], names: g.Names, name: str, candidate: _Candidate,
          plan: _Plan, *, in_function: bool) -> ir.Node:
    """Write the fused QLinearConv in front of the first node it replaces; its output takes the
    join's output's place (name, type, shape, graph-output role); remove what became dead."""
    constants: list[ir.Value] = []

    def constant(suffix: str, array: np.ndarray) -> ir.Value:
        value_name = names.value(f"{name}.{suffix}")
        value = ir.Value(name=value_name, const_value=ir.Tensor(np.asarray(array, order="C"), name=value_name))
        constants.append(value)
        return value

    inputs: list[ir.Value | None] = [candidate.reads[0].source]
    for index in (X_SCALE, X_ZERO_POINT):
        inputs.append(_kept(plan.shared[index], constant, SHARED_INPUTS[index]))
    inputs += [constant("weight", plan.fusion.weight), constant("weight_scale", plan.weight_scale),
               constant("weight_zero_point", plan.weight_zero_point)]
    for index in (Y_SCALE, Y_ZERO_POINT):
        inputs.append(_kept(plan.shared[index], constant, SHARED_INPUTS[index]))
    if plan.fusion.bias is not None:
        inputs.append(constant("bias", plan.fusion.bias))
    template = candidate.convs[0]
    attributes = [a for key, a in template.attributes.items() if key != "group"]
    attributes.append(ir.AttrInt64("group", plan.fusion.groups))
    node = ir.Node(template.domain, "QLinearConv", inputs, attributes, name=name, version=template.version,
                   doc_string=template.doc_string, metadata_props=dict(template.metadata_props))
    old_nodes = _replaced_nodes(candidate)
    graph.insert_before(min(old_nodes, key=lambda n: position.get(id(n), len(position))), node)
    g.add_constants(graph, constants, as_nodes=in_function)
    old_output, new_output = candidate.join.node.outputs[0], node.outputs[0]
    output_name, old_output.name = old_output.name, None
    new_output.name, new_output.type, new_output.shape = output_name, old_output.type, old_output.shape
    ir.convenience.replace_all_uses_with(old_output, new_output, replace_graph_outputs=True)
    old_inputs = [v for n in old_nodes for v in n.inputs]
    graph.remove(old_nodes, safe=True)
    g.remove_dead_producers(graph, old_inputs)
    return node


def _kept(value: ir.Value, constant: Callable[[str, np.ndarray], ir.Value], role: str) -> ir.Value:
    """A shared value as the fused conv reads it: the value itself where it exists before any node
    runs (an initializer, a graph input), else a copy of its constant (a Constant node the
    branches read may come after where the fused conv goes)."""
    if value.producer() is None:
        return value
    return constant(role, g.const_array(value))


# -- small readers ---------------------------------------------------------------------------------


def _replaced_nodes(candidate: _Candidate) -> list[ir.Node]:
    readers = list(dict.fromkeys(read.reader for read in candidate.reads))
    return readers + candidate.convs + [candidate.join.node]


def _is_reader_output(value: ir.Value | None) -> bool:
    producer = value.producer() if value is not None else None
    return producer is not None and producer.op_type in READERS and producer.domain in ("", "ai.onnx")


def _weight_shape(conv: ir.Node) -> tuple[int, ...] | None:
    return g.const_shape(conv.inputs[W]) if len(conv.inputs) > W else None


def _weight_rank(conv: ir.Node) -> int | None:
    shape = _weight_shape(conv)
    return None if shape is None else len(shape)


def _in_channels(conv: ir.Node) -> int | None:
    shape = _weight_shape(conv)
    return None if shape is None else int(shape[1]) * g.attr_int(conv, "group", 1)


def _label(conv: ir.Node) -> str:
    return conv.name or "a branch QLinearConv"


def _describe(array: np.ndarray) -> str:
    values = array.reshape(-1)
    if values.size == 1:
        value = values[0]
        return f"{float(value):.6g}" if array.dtype.kind == "f" else str(int(value))
    return "[" + ",".join(f"{float(v):.6g}" if array.dtype.kind == "f" else str(int(v)) for v in values[:4]) \
        + (",..." if values.size > 4 else "") + "]"
