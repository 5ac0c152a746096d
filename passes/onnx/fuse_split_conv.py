"""Fuse hand-made grouped convolutions into one native grouped Conv.

    x → Split(axis=1) | Slice_i(axis=1) → Conv_i → Concat(axis=1)  ⇒  x → Conv(group=N)

The matcher starts at each Concat (onnxscript's pattern rules cannot match a variable number of
branches), walks each input back to its Conv and on to the Split/Slice that feeds it, and hands
the branches to ``rewriter.plan``, which owns the rules and the weight arithmetic.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from passes import register
from passes.onnx import _graph as g
from rewriter.plan import Branch, FusionPlan, Refusal, plan_fusion
from rewriter.report import Rewrite, Skip

CONV_OPS = ("Conv",)


class _NotACandidate(Exception):
    """The Concat is not a grouped-convolution candidate at all (nothing to report)."""


class _Refused(Exception):
    """A candidate that cannot fuse; the message is the reason."""


@register("onnx.fuse-split-conv")
class FuseSplitConvPass(ir.passes.InPlacePass):
    """Rewrite every fusable Split/Slice → Conv → Concat subgraph; record rewrites and skips."""

    def __init__(self, *, rewrite: bool = True):
        super().__init__()
        self.rewrite = rewrite  # False: only find and plan (for --check / --dry-run)
        self.rewrites: list[Rewrite] = []
        self.skipped: list[Skip] = []

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        modified = False
        for graph in model.graphs():
            modified |= self._fuse_graph(model, graph)
        return ir.passes.PassResult(model, modified)

    # -- matching ----------------------------------------------------------------------------

    def _fuse_graph(self, model: ir.Model, graph: ir.Graph) -> bool:
        names = _Names(graph)
        modified = False
        graph_label = "" if graph is model.graph else (graph.name or "subgraph")
        for concat in [n for n in graph if n.op_type == "Concat" and n.domain in ("", "ai.onnx")]:
            location = concat.name or concat.outputs[0].name or "Concat"
            try:
                source, channels, branches, convs, readers = self._match(model, concat)
                plan = plan_fusion(branches, channels, stack_axis=0)
                if isinstance(plan, Refusal):
                    raise _Refused(plan.reason)
            except _NotACandidate:
                continue
            except _Refused as refusal:
                # The Concat may join other inputs besides convolutions: list the convolutions.
                convs = [c.name for c in _conv_inputs(concat) if c is not None]
                self.skipped.append(Skip(location, str(refusal), convs, graph_label))
                continue
            replaced = [r.name for r in readers] + [c.name for c in convs] + [concat.name]
            fused_name = names.node(f"{convs[0].name or 'Conv'}_group{plan.groups}")
            if self.rewrite:
                self._emit(graph, names, concat, source, convs, readers, plan, fused_name)
                modified = True
            self.rewrites.append(Rewrite(
                kind="fuse-split-conv", location=fused_name, groups=plan.groups,
                channels={"in": plan.in_channels, "out": plan.out_channels},
                nodes=[n for n in replaced if n], graph=graph_label))
        return modified

    def _match(self, model: ir.Model, concat: ir.Node):
        convs = _conv_inputs(concat)
        # A candidate has at least two Conv inputs that read a Split/Slice output. Whether those
        # reads are usable channel ranges is decided below, so that a near miss gets its reason.
        fed = [c for c in convs if c is not None and _reads_split_or_slice(c)]
        if len(fed) < 2:
            raise _NotACandidate
        if any(c is None for c in convs):
            raise _Refused("the Concat also joins inputs that are not branch convolutions")

        weights = [g.const_array(c.inputs[1]) for c in convs]
        for conv, weight in zip(convs, weights):
            if weight is None:
                raise _Refused(f"weights of {conv.name or 'a branch Conv'} are not constants")
        rank = weights[0].ndim
        axis = g.attr_int(concat, "axis", 1)
        if axis % rank != 1:
            raise _Refused(f"Concat on axis {axis}, not the channel axis")

        for conv in convs:
            if conv.outputs[0].is_graph_output() or len(conv.outputs[0].uses()) != 1:
                raise _Refused(f"branch output {conv.outputs[0].name} is used outside the Concat")
        if len({id(c) for c in convs}) != len(convs):
            raise _Refused("a branch is concatenated twice")

        # Where each branch reads from. Channel counts from the weights resolve Split sizes and
        # open-ended Slices when the source's shape is not recorded.
        widths_from_weights = [w.shape[1] * g.attr_int(c, "group", 1) for c, w in zip(convs, weights)]
        first_reader = fed[0].inputs[0].producer()
        source = first_reader.inputs[0]
        channels = g.static_dim(source, 1) if source is not None else None
        if channels is None and first_reader.op_type == "Split":
            channels = sum(widths_from_weights)  # a Split hands out all its channels
        reads = []
        for conv in convs:
            try:
                read = g.read_channels(conv.inputs[0], model, channels)
            except g.UnreadableRange as exc:
                raise _Refused(str(exc)) from None
            if read is None:
                raise _Refused(f"{conv.name or 'a branch Conv'} does not read a Split or Slice output")
            reads.append(read)
        if len({id(r.source) for r in reads}) != 1:
            raise _Refused("branches read from different tensors")
        kinds = {r.reader.op_type for r in reads}
        if len(kinds) > 1:
            raise _Refused("branches mix Split and Slice")
        if len({id(r.reader) for r in reads}) != 1 and "Split" in kinds:
            raise _Refused("branches read from different Split nodes")
        for read in reads:
            if read.axis % rank != 1:
                raise _Refused(f"{read.reader.op_type} on axis {read.axis}, not the channel axis")
        readers = list(dict.fromkeys(r.reader for r in reads))
        for conv in convs:
            data = conv.inputs[0]
            if data.is_graph_output() or len(data.uses()) != 1:
                raise _Refused(f"branch input {data.name} is used outside its convolution")
        if "Split" in kinds and len(readers[0].outputs) != len(convs):
            raise _Refused(f"Split has {len(readers[0].outputs)} outputs but only {len(convs)} feed the Concat")

        branches = []
        for conv, read, weight, width in zip(convs, reads, weights, widths_from_weights):
            if read.start is None:
                raise _Refused("cannot tell the Split sizes (computed at run time)")
            stop = read.start + width if read.open_end else read.stop
            if stop - read.start != width:
                raise _Refused(f"{conv.name} reads {stop - read.start} channels but its weight expects {width}")
            bias = None
            if len(conv.inputs) > 2 and conv.inputs[2] is not None:
                bias = g.const_array(conv.inputs[2])
                if bias is None:
                    raise _Refused(f"bias of {conv.name or 'a branch Conv'} is not a constant")
            branches.append(Branch(
                name=conv.name or "", channel_start=read.start, channel_stop=stop, weight=weight, bias=bias,
                groups=g.attr_int(conv, "group", 1), out_channels=weight.shape[0],
                attributes=g.conv_shape_attributes(conv, rank - 2)))
        if channels is None:
            # An open-ended Slice reads up to the source's last channel: that fixes the count.
            channels = next((b.channel_stop for b, r in zip(branches, reads) if r.open_end), None)
        return source, channels, branches, convs, readers

    # -- emitting ----------------------------------------------------------------------------

    def _emit(self, graph, names, concat, source, convs, readers, plan: FusionPlan, fused_name):
        first = convs[0]
        weight_value = _initializer(graph, names.value(f"{fused_name}.weight"), plan.weight)
        inputs = [source, weight_value]
        if plan.bias is not None:
            inputs.append(_initializer(graph, names.value(f"{fused_name}.bias"), plan.bias))
        attributes = [a for key, a in first.attributes.items() if key != "group"]
        attributes.append(ir.AttrInt64("group", plan.groups))
        fused = ir.Node("", first.op_type, inputs, attributes, name=fused_name,
                        doc_string=first.doc_string, metadata_props=dict(first.metadata_props))
        old_nodes = [*readers, *convs, concat]
        old_inputs = [v for n in old_nodes for v in n.inputs if v is not None and v is not source]
        # The fused output takes the Concat output's place: its name, type, shape and graph-output role.
        ir.convenience.replace_nodes_and_values(
            graph, concat, old_nodes, [fused], [concat.outputs[0]], [fused.outputs[0]])
        _remove_dead_constants(graph, old_inputs)


def _reads_split_or_slice(conv: ir.Node) -> bool:
    producer = conv.inputs[0].producer() if conv.inputs and conv.inputs[0] is not None else None
    return producer is not None and producer.op_type in ("Split", "Slice") and producer.domain in ("", "ai.onnx")


def _conv_inputs(concat: ir.Node) -> list[ir.Node | None]:
    convs = []
    for value in concat.inputs:
        producer = value.producer() if value is not None else None
        ok = producer is not None and producer.op_type in CONV_OPS and producer.domain in ("", "ai.onnx")
        convs.append(producer if ok else None)
    return convs


def _initializer(graph: ir.Graph, name: str, array: np.ndarray) -> ir.Value:
    # Type and shape come from the tensor; setting them on the value would add value_info entries.
    value = ir.Value(name=name, const_value=ir.tensor(array, name=name))
    graph.register_initializer(value)
    return value


def _remove_dead_constants(graph: ir.Graph, values: list[ir.Value]) -> None:
    """Drop the weights, biases and Slice bounds that only the replaced nodes used."""
    for value in dict.fromkeys(values):
        if value.uses() or value.is_graph_output() or value.is_graph_input():
            continue
        if value.name in graph.initializers and graph.initializers[value.name] is value:
            del graph.initializers[value.name]
        producer = value.producer()
        if producer is not None and producer.op_type == "Constant" and not any(o.uses() for o in producer.outputs):
            graph.remove(producer, safe=True)


class _Names:
    """Fresh, deterministic node and value names, indexed once per graph."""

    def __init__(self, graph: ir.Graph):
        self._nodes = {n.name for n in graph if n.name}
        self._values = set(graph.initializers)
        self._values.update(v.name for v in graph.inputs if v.name)
        for node in graph:
            self._values.update(o.name for o in node.outputs if o.name)

    @staticmethod
    def _fresh(base: str, taken: set[str]) -> str:
        name, i = base, 1
        while name in taken:
            name, i = f"{base}_{i}", i + 1
        taken.add(name)
        return name

    def node(self, base: str) -> str:
        return self._fresh(base, self._nodes)

    def value(self, base: str) -> str:
        return self._fresh(base, self._values)
