"""Expand native grouped convolutions into one plain convolution per group.

    x → Conv(group=N)  ⇒  x → Split(axis=1) → N Conv → Concat(axis=1)

The reverse of ``onnx.fuse-split-conv``, for runtimes and tools that lack grouped convolutions.
Grouped ``ConvTranspose`` expands the same way. Matching is one node, so there is no matcher to
speak of: the pass reads each grouped convolution's weight, hands it to
``gconv_rewrite.plan.plan_expansion`` (which owns the weight arithmetic), and emits the branches.

Weight layouts (both split on axis 0):

- ``Conv``          ``[O, C/g, k...]``: C = ``W.shape[1]·g``, O = ``W.shape[0]``
- ``ConvTranspose`` ``[C, O/g, k...]``: C = ``W.shape[0]``,   O = ``W.shape[1]·g``

The Split is written for the model's opset: sizes as the ``split`` attribute before opset 13, as
an int64 initializer input from 13 on (still valid at 18+, where ``num_outputs`` is the
alternative). The Concat's output takes the original output's place: its name, type, shape and
graph-output role, so nothing downstream changes.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import numpy as np
import onnx_ir as ir

from gconv_rewrite.passes.onnx import _graph as g
from gconv_rewrite.passes.onnx import _qdq
from gconv_rewrite.plan import DEPTHWISE_KEPT, ExpansionPlan, Refusal, expansion_refusal, plan_expansion
from gconv_rewrite.report import Rewrite, Skip
from gconv_rewrite.targets import ConvProps, Decision

EXPANDABLE_OPS = ("Conv", "ConvTranspose")



class ExpandGroupedConvPass(ir.passes.InPlacePass):
    """Rewrite every grouped Conv/ConvTranspose (within the group range) into Split → N Conv →
    Concat; record rewrites and skips.

    ``accept(props) -> (ok, rule)``, when given, is asked about each grouped conv (``--target``):
    a refused one is kept, reported as a skip with the rule as its reason; each judged conv is
    also listed in ``decisions``. Nodes in ``exclude`` (what a fuse pass just wrote) are left
    alone unreported."""

    def __init__(self, *, rewrite: bool = True, keep_depthwise: bool = False, min_groups: int = 2,
                 max_groups: int | None = None, accept: Callable[[ConvProps], tuple[bool, str]] | None = None,
                 exclude: Iterable[ir.Node] = ()):
        super().__init__()
        self.rewrite = rewrite  # False: only find and plan (for --check / --dry-run)
        self.keep_depthwise = keep_depthwise
        self.min_groups = min_groups
        self.max_groups = max_groups
        self.accept = accept
        self.exclude = {id(node) for node in exclude}
        self.decisions: list[Decision] = []  # per judged conv
        self._verdict: tuple[bool, str] | None = None
        self.rewrites: list[Rewrite] = []
        self.skipped: list[Skip] = []

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        # Before IR 4 every initializer is listed as a graph input, yet the runtime holds it constant.
        with g.initializers_as_constants(model):
            return self._rewrite_model(model)

    def _rewrite_model(self, model: ir.Model) -> ir.passes.PassResult:
        modified = False
        for graph in model.graphs():
            modified |= self._expand_graph(model, graph)
        for function in model.functions.values():
            self._report_function(model, function)
        return ir.passes.PassResult(model, modified)

    def _report_function(self, model: ir.Model, function: ir.Function) -> None:
        """Grouped convs inside a local function stay, each with a line saying why: the body is
        shared by every call site, and the dynamo exporter's ``_aten_convolution_onnx`` even takes
        ``group`` from the call site (``group=@groups``) and its weight as a function input."""
        label = f"function {function.name}"
        calls = sum(1 for graph in [*model.graphs(), *(f.graph for f in model.functions.values())] for node in graph
                    if node.op_type == function.name and node.domain == function.domain)
        sites = f"{calls} call site{'s' if calls != 1 else ''}"
        for graph in [function.graph, *function.graph.subgraphs()]:
            for conv in graph:
                group = conv.attributes.get("group")
                if conv.op_type not in EXPANDABLE_OPS or conv.domain not in ("", "ai.onnx") or group is None:
                    continue
                if group.is_ref():
                    code, reason = "call-site-attribute", (f"its group is the attribute '{group.ref_attr_name}' of local function {function.name}, "
                              f"set at each of its {sites}: expanding it needs a copy of the function per call site, "
                              "which this pass does not make")
                elif group.as_int() >= 2 and id(conv) not in self.exclude:
                    code, reason = "unsupported-form", (f"it is inside local function {function.name}, whose body its {sites} share: grouped "
                              "convolutions in local functions are not expanded")
                else:
                    continue
                self.skipped.append(Skip(g.node_label(conv), reason, [g.node_label(conv)], label, code=code))

    def _expand_graph(self, model: ir.Model, graph: ir.Graph) -> bool:
        names = g.Names(graph)
        modified = False
        graph_label = "" if graph is model.graph else (graph.name or "subgraph")
        # The default-domain opset the new Split and Concat run under (they carry no version).
        opset = model.opset_imports.get("", model.opset_imports.get("ai.onnx", 1))
        convs = [n for n in graph if n.op_type in EXPANDABLE_OPS and n.domain in ("", "ai.onnx")]
        for conv in convs:
            groups = g.attr_int(conv, "group", 1)
            if groups < 2 or id(conv) in self.exclude:
                continue  # not grouped: nothing to expand, nothing to report
            # An unnamed conv is reported, and its new nodes named, after its output.
            location = conv.name or conv.outputs[0].name or conv.op_type
            self._verdict = None
            refusal, plan, channels = self._plan(conv, groups)
            reason = refusal.reason if refusal is not None else None
            if self._verdict is not None:
                accepted, rule = self._verdict
                expands = accepted and reason is None
                if accepted and reason is not None:  # the target wants it split, but it cannot be
                    rule = f"{rule}; but {reason}"
                self.decisions.append(Decision(location=location, graph=graph_label,
                                               form="split" if expands else "native",
                                               action="expand" if expands else "keep", rule=rule))
            if refusal is not None:
                self.skipped.append(Skip.refused(location, refusal, [g.node_label(conv)], graph_label))
                continue
            split_name = names.node(f"{location}_split")
            branch_names = [names.node(f"{location}_g{i}") for i in range(plan.branches)]
            concat_name = names.node(f"{location}_concat")
            boundary = [{"tensor": conv.outputs[0].name}]  # the Concat output takes this name
            if self.rewrite:
                self._emit(graph, names, opset, conv, plan, split_name, branch_names, concat_name)
                modified = True
            self.rewrites.append(Rewrite(
                kind="expand-grouped-conv", location=location, groups=groups, channels=channels,
                nodes=[split_name, *branch_names, concat_name], graph=graph_label, boundary=boundary))
        return modified

    # -- planning ----------------------------------------------------------------------------

    def _plan(self, conv: ir.Node, groups: int) -> tuple[Refusal | None, ExpansionPlan | None, dict | None]:
        """(why to skip, None, None) or (None, plan, {"in": C, "out": O})."""
        refusal = expansion_refusal(groups, depthwise=None, keep_depthwise=self.keep_depthwise,
                                    min_groups=self.min_groups, max_groups=self.max_groups)
        if refusal is not None:
            return refusal, None, None
        if len(conv.inputs) < 2 or conv.inputs[1] is None:
            return Refusal("not-constant", "has no weight input"), None, None
        weight_value = conv.inputs[1]
        transpose = conv.op_type == "ConvTranspose"

        # The weight's shape decides depthwise-ness without reading its data.
        shape = g.const_shape(weight_value)
        if shape is not None and self.keep_depthwise and _in_channels(shape, groups, transpose) == groups:
            return Refusal("depthwise-kept", DEPTHWISE_KEPT), None, None
        if shape is not None and self.accept is not None and len(shape) >= 3:
            out_channels = int(shape[1]) * groups if transpose else int(shape[0])
            self._verdict = self.accept(ConvProps(groups=groups, in_channels=_in_channels(shape, groups, transpose),
                                                  out_channels=out_channels, kernel_rank=len(shape) - 2,
                                                  transposed=transpose))
            if not self._verdict[0]:
                return Refusal("target-keeps", self._verdict[1]), None, None

        weight = g.const_array(weight_value)
        if weight is None and _is_quantized(weight_value):
            return (Refusal("unsupported-form",
                            "weights are quantized (DequantizeLinear); expanding quantized weights is not supported"),
                    None, None)
        if weight is None:
            why = g.not_constant_reason(weight_value)
            if why == "are not constants":
                why += " (initializer or Constant node)"
            return Refusal("not-constant", f"weights {why}; cannot split them ahead of time"), None, None
        if g.is_replaceable(weight_value):
            return Refusal("overridable-input", "weights are an initializer that is also a graph input (replaceable "
                           "at run time); cannot split them ahead of time"), None, None
        if weight.ndim < 3:
            return Refusal("malformed", f"weight of rank {weight.ndim}; a convolution weight has rank 3 or more"), \
                None, None
        in_channels = _in_channels(weight.shape, groups, transpose)
        if self.keep_depthwise and in_channels == groups:
            return Refusal("depthwise-kept", DEPTHWISE_KEPT), None, None
        bias = None
        if len(conv.inputs) > 2 and conv.inputs[2] is not None:
            bias_value = conv.inputs[2]
            bias = g.const_array(bias_value)
            if bias is None:
                return Refusal("not-constant", "bias is not a constant (initializer or Constant node); cannot "
                               "split it ahead of time"), None, None
            if g.is_replaceable(bias_value):
                return Refusal("overridable-input", "bias is an initializer that is also a graph input (replaceable "
                               "at run time); cannot split it ahead of time"), None, None
        out_channels = weight.shape[1] * groups if transpose else weight.shape[0]
        if bias is not None and bias.shape != (out_channels,):
            return Refusal("malformed", f"bias of shape {tuple(bias.shape)} does not match {out_channels} output "
                           "channels"), None, None
        plan = plan_expansion(weight, bias, groups, in_channels, stack_axis=0)
        if isinstance(plan, Refusal):
            return plan, None, None
        return None, plan, {"in": int(in_channels), "out": int(out_channels)}

    # -- emitting ----------------------------------------------------------------------------

    def _emit(self, graph: ir.Graph, names: g.Names, opset: int, conv: ir.Node, plan: ExpansionPlan,
              split_name: str, branch_names: list[str], concat_name: str) -> None:
        source = conv.inputs[0]
        widths = [stop - start for start, stop in plan.channel_ranges]
        split_inputs = [source]
        split_attributes = [ir.AttrInt64("axis", 1)]
        if opset < 13:
            split_attributes.append(ir.AttrInt64s("split", widths))
        else:
            split_inputs.append(g.new_initializer(graph, names.value(f"{split_name}.split"),
                                             np.array(widths, dtype=np.int64)))
        split = ir.Node("", "Split", split_inputs, split_attributes, num_outputs=plan.branches, name=split_name)
        for i, output in enumerate(split.outputs):
            output.name = names.value(f"{split_name}_out{i}")

        # Every attribute but group is the same per branch (kernel_shape, strides, pads, dilations,
        # auto_pad, and ConvTranspose's output_padding / spatial output_shape).
        shared = [a for key, a in conv.attributes.items() if key != "group"]
        branches = []
        for name, weight, bias in zip(branch_names, plan.weights, plan.biases):
            inputs = [split.outputs[len(branches)],
                      g.new_initializer(graph, names.value(f"{name}.weight"), np.ascontiguousarray(weight))]
            if bias is not None:
                inputs.append(g.new_initializer(graph, names.value(f"{name}.bias"), np.ascontiguousarray(bias)))
            attributes = list(shared)
            if plan.groups_per_branch != 1:
                attributes.append(ir.AttrInt64("group", plan.groups_per_branch))
            branch = ir.Node("", conv.op_type, inputs, attributes, name=name, doc_string=conv.doc_string,
                             metadata_props=dict(conv.metadata_props))
            branch.outputs[0].name = names.value(f"{name}_out")
            branches.append(branch)
        concat = ir.Node("", "Concat", [b.outputs[0] for b in branches], [ir.AttrInt64("axis", 1)],
                         name=concat_name)

        old_inputs = [v for v in conv.inputs[1:] if v is not None]
        # The Concat output takes the conv output's place: its name, type, shape and graph-output role.
        ir.convenience.replace_nodes_and_values(
            graph, conv, [conv], [split, *branches, concat], [conv.outputs[0]], [concat.outputs[0]])
        _remove_dead_values(graph, old_inputs)


def _is_quantized(value: ir.Value) -> bool:
    try:
        return _qdq.read_quantized(value) is not None
    except _qdq.NotExact:
        return True


def _in_channels(weight_shape, groups: int, transpose: bool) -> int:
    return int(weight_shape[0]) if transpose else int(weight_shape[1]) * groups


def _remove_dead_values(graph: ir.Graph, values: list[ir.Value]) -> None:
    """Drop the grouped weight and bias once nothing reads them, also when they are initializers
    of an enclosing graph (a Conv in an If/Loop body reading an outer weight)."""
    by_graph: dict[int, tuple[ir.Graph, list[ir.Value]]] = {}
    for value in values:
        producer = value.producer()
        if value.is_initializer() and value.graph is not None:
            owner = value.graph
        elif producer is not None and producer.graph is not None:
            owner = producer.graph  # a Constant node
        else:
            owner = graph
        by_graph.setdefault(id(owner), (owner, []))[1].append(value)
    for owner, owned in by_graph.values():
        g.remove_dead_producers(owner, owned)
