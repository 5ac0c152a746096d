"""Fuse hand-made grouped convolutions in a TF graph into Conv2Ds with a grouped filter.

    x → Split|SplitV|Slice_i|StridedSlice_i(channel axis) → Conv2D_i [→ BiasAdd_i] [→ tails_i] → ConcatV2
        ⇒  x → Conv2D(filter [kH, kW, C/N, O]) [→ BiasAdd] [→ tails]

NHWC and NCHW (the Conv2D's ``data_format`` names the channel axis); Conv1D as TF writes it,
``ExpandDims → Conv2D → Squeeze``, too. The matcher starts at each ConcatV2 and walks every input
back through the branch's ops (each used only by the next) to where the branch starts; the
layers are then planned step by step across the branches by ``gconv_rewrite.plan.plan_chain``, which
owns the fusability rules, the reasons and the weight arithmetic (TF filters stack on the last
axis). So the same pass fuses:

- tails, the channel-wise ops after each branch conv (activations, FusedBatchNorm in inference
  form, BiasAdd and Add/Sub/Mul/... of a per-channel constant): settings must agree, per-channel
  parameters are concatenated (``gconv_rewrite.plan.TAIL_RULES``), applied once after the fused conv;
  also tails of several ops, as TF writes SiLU (``Mul(Sigmoid(y), y)``), GELU (via Erf or Tanh)
  and Mish: any graph of elementwise ops that reads only its branch and constants;
- chains of several convolutions per branch (ResNeXt, fig. 3): each layer becomes one grouped
  Conv2D; branches that all read the *same* tensor start with one wide Conv2D (forms a/b → c):
  ``x → [Conv1x1_i → tails → Conv3x3_i → tails] → ConcatV2  ⇒  x → Conv1x1(wide) → tails →
  Conv3x3(grouped) → tails``. A concat of single convs on one tensor (Inception) is left alone.

Where the branches stop agreeing (one Relu, one Sigmoid; a 3×3 with another stride), the fused
tensor is split back (SplitV) into the branches' parts, the rest stays per branch, and a skip
says where the fusion stopped. Conv3D branches are reported, never fused: TensorFlow has no
grouped Conv3D kernel on CPU (see ``CONV3D_REFUSAL``).
"""

from __future__ import annotations

import collections
import functools
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
from tensorflow.core.framework import attr_value_pb2, graph_pb2, node_def_pb2, types_pb2

from gconv_rewrite.candidate import ChannelRead, NotACandidate, Refused, resolve_sizes
from gconv_rewrite.passes.tf import _graph as g
from gconv_rewrite.plan import (
    GRAPH_CONSTANT,
    GRAPH_INPUT,
    TAIL_RULES,
    Branch,
    ChainPlan,
    ConvLayer,
    FusionPlan,
    Refusal,
    TailGraphLayer,
    TailLayer,
    describe_tail_graph,
    plan_chain,
    tail_concat_axis,
    tail_refusal,
)
from gconv_rewrite.report import Rewrite, Skip
from gconv_rewrite.targets import ConvProps, Decision

CONV_OPS = ("Conv2D", "Conv3D")
CONV_KINDS = ("Conv1D", "Conv2D", "Conv3D")  # a layer's kind: Conv1D is ExpandDims → Conv2D → Squeeze
READER_OPS = ("Split", "SplitV", "Slice", "StridedSlice")
# TF op → the format-free tail kind of gconv_rewrite.plan.TAIL_RULES (how its parameters concatenate).
TF_TAIL_KINDS = {
    **{op: op for op in ("Relu", "Relu6", "Elu", "Selu", "Sigmoid", "Tanh", "LeakyRelu", "Softplus", "Softsign",
                         "Erf", "Erfc", "Exp", "Neg", "Abs", "Sqrt", "Square", "Reciprocal")},
    **{op: "BatchNorm" for op in ("FusedBatchNorm", "FusedBatchNormV2", "FusedBatchNormV3")},
    "BiasAdd": "BiasAdd", "Add": "Add", "AddV2": "Add", "Sub": "Sub", "Mul": "Mul", "RealDiv": "Div",
    "Maximum": "Max", "Minimum": "Min", "Pow": "Pow",
}
# Element-wise ops that commute with the channel concat: applied per branch or once after.
TAIL_OPS = tuple(op for op, kind in TF_TAIL_KINDS.items() if not TAIL_RULES[kind].params)
BATCH_NORM_OPS = tuple(op for op, kind in TF_TAIL_KINDS.items() if kind == "BatchNorm")
# Ops of the branch tensor and a constant: channel-wise when the constant is per-channel or shared.
BINARY_OPS = tuple(op for op, kind in TF_TAIL_KINDS.items() if TAIL_RULES[kind].params == ("broadcast",)) + ("BiasAdd",)
# Ops a multi-op tail (SiLU as Mul(Sigmoid(y), y), GELU, Mish) may be built of: elementwise each.
GRAPH_OPS = frozenset(TAIL_OPS) | (frozenset(BINARY_OPS) - {"BiasAdd"})
MAX_GRAPH_OPS = 32  # more is no activation formula: the search stops rather than walk a network
# Evidence (TF 2.21, CPU): tf.nn.conv3d of x [1,4,6,6,8] with a filter [3,3,3,4,6] (2 groups)
# fails with oneDNN on ("input and filter must have the same depth: 8 vs 4", _MklNativeConv3D)
# and off ("Number of channels in filter (4) must match last dimension of input (8)"), eagerly
# and in a tf.function; so a grouped Conv3D could not even be verified here, and no TF graph
# that runs holds one (tf.expand-grouped-conv has nothing to expand). A wide Conv3D (group 1,
# branches on one shared input) is plain and fuses.
CONV3D_REFUSAL = ("TensorFlow's Conv3D has no grouped kernel on CPU: a Conv3D filter must span all its "
                  "input channels there (TF 2.21: \"input and filter must have the same depth\")")


@dataclass
class _Tail:
    """One channel-wise op of a branch after its conv: what must agree and what concatenates."""

    node: node_def_pb2.NodeDef
    data_index: int  # which input carries the branch's tensor
    config: dict  # must be equal across branches
    params: list[np.ndarray] = field(default_factory=list)
    param_inputs: list[int] = field(default_factory=list)  # input index of each parameter
    param_axes: list[int | None] = field(default_factory=list)  # concat axis; None: must be equal


@dataclass
class _Layer:
    """One step of a branch: a convolution (with its bias op; a Conv1D with its ExpandDims and
    Squeeze), one tail op, or a tail graph (several elementwise ops that read the tensor
    ``graph_input``, in one canonical order). ``nodes`` in order; the last one's output is the
    step's output."""

    nodes: list[node_def_pb2.NodeDef]
    conv: node_def_pb2.NodeDef | None = None  # None: a tail op
    bias_add: node_def_pb2.NodeDef | None = None
    expand_axis: int | None = None  # Conv1D: the 4-D axis the ExpandDims inserts
    graph_input: str | None = None  # a tail graph: the branch tensor it reads
    wiring: tuple = ()  # a tail graph: (kind, where each input comes from) per op, see TailGraphLayer

    @property
    def kind(self) -> str:
        if self.graph_input is not None:
            return describe_tail_graph([TF_TAIL_KINDS[n.op] for n in self.nodes])
        if self.conv is None:
            return self.nodes[0].op
        return "Conv1D" if self.expand_axis is not None else self.conv.op

    @property
    def rank(self) -> int:
        return {"Conv1D": 3, "Conv2D": 4, "Conv3D": 5}[self.kind]

    @property
    def channels_last(self) -> bool:
        return g.attr_str(self.conv, "data_format", "NHWC").endswith("C")

    @property
    def channel_axis(self) -> int:
        """The channel axis of what the layer reads and writes."""
        if self.expand_axis is None:
            return self.rank - 1 if self.channels_last else 1
        axis = 3 if self.channels_last else 1
        return axis if axis < self.expand_axis else axis - 1


@dataclass
class _Chain:
    """One branch: the tensor it starts from and its layers, in order, up to the ConcatV2."""

    entry: str
    layers: list[_Layer]
    before: list[node_def_pb2.NodeDef] = field(default_factory=list)  # ops before the first conv (refused)
    start: str = ""  # the tensor the branch starts from, before ``before``

    @property
    def nodes(self) -> list[node_def_pb2.NodeDef]:
        return [n for layer in self.layers for n in layer.nodes]

    @property
    def convs(self) -> list[_Layer]:
        return [layer for layer in self.layers if layer.conv is not None]

    @property
    def first(self) -> _Layer:
        return self.layers[0]


@dataclass
class _Candidate:
    concat: node_def_pb2.NodeDef
    chains: list[_Chain]
    source: str  # the tensor the fused part reads
    channels: int | None  # the source's channel count
    reads: list[ChannelRead] | None  # None: every branch reads ``source`` whole (shared input)
    readers: list[node_def_pb2.NodeDef] = field(default_factory=list)
    tails: dict[int, _Tail] = field(default_factory=dict)  # branch 0's tail at each fused step

    @property
    def shared(self) -> bool:
        return self.reads is None


class FuseSplitConvPass:
    """Rewrite every fusable branch structure joined by a ConcatV2; record rewrites and skips.

    ``accept(props) -> (ok, rule)``, when given, is asked about every grouped conv a candidate
    would become (``--target``): a candidate with one refused layer stays as it is, reported as a
    skip with the rule as its reason; each judged candidate is also listed in ``decisions``."""

    def __init__(self, *, rewrite: bool = True, accept: Callable[[ConvProps], tuple[bool, str]] | None = None):
        self.rewrite = rewrite  # False: only find and plan (for --check / --dry-run)
        self.accept = accept
        self.decisions: list[Decision] = []  # per judged candidate
        self.created: list[str] = []  # the names of the convs this pass wrote (a later expand pass leaves them)
        self.rewrites: list[Rewrite] = []
        self.skipped: list[Skip] = []

    def __call__(self, graph_def: graph_pb2.GraphDef, protected: set[str]) -> graph_pb2.GraphDef:
        """Return the rewritten graph (``graph_def`` itself is left as it was)."""
        graph_def = graph_pb2.GraphDef.FromString(graph_def.SerializeToString())
        index = g.GraphIndex(graph_def, protected)
        names = g.Names(graph_def)
        replaced: set[str] = set()
        new_nodes: list[node_def_pb2.NodeDef] = []
        rewired: dict[str, str] = {}  # a branch's cut tensor → its part of the split-back
        for concat in [n for n in graph_def.node if n.op == "ConcatV2"]:
            try:
                candidate = self._match(index, concat, replaced)
                plan = plan_chain([[layer.kind for layer in c.layers] for c in candidate.chains],
                                  functools.partial(self._read_step, index, candidate),
                                  candidate.channels, conv_kinds=CONV_KINDS, shared_input=candidate.shared,
                                  stack_axis=-1)
                if isinstance(plan, Refusal):
                    raise Refused(plan)
            except NotACandidate:
                # Never silence where the ConcatV2 looks like hand-made groups all the same.
                convs = _split_read_convs(index, concat)
                reason = _unmatched_group_reason(index, concat) if convs else None
                if reason is not None and not replaced.intersection(convs):  # not already rewritten
                    self.skipped.append(Skip(concat.name, reason, convs, code="unmatched-branches"))
                continue
            except Refused as refusal:
                self.skipped.append(Skip.refused(concat.name, refusal, _branch_convs(index, concat)))
                continue
            new_nodes.extend(self._fuse(names, candidate, plan, replaced, rewired))
        if not new_nodes:
            return graph_def
        kept = _rewire([n for n in graph_def.node if n.name not in replaced], rewired)
        del graph_def.node[:]
        graph_def.node.extend(kept + new_nodes)
        keep = [g.split_input(t)[0] for t in protected] + [n.name for n in kept if n.op == "Placeholder"]
        return g.prune(graph_def, keep)

    def _fuse(self, names: g.Names, candidate: _Candidate, plan: ChainPlan, replaced: set[str],
              rewired: dict[str, str]) -> list[node_def_pb2.NodeDef]:
        """Judge a planned candidate, record it, and (when rewriting) return its new nodes."""
        concat, chains = candidate.concat, candidate.chains
        verdict = self._judge(chains[0], plan)
        if verdict is not None and not verdict[0]:
            self.skipped.append(Skip(concat.name, verdict[1], [c.conv.name for ch in chains for c in ch.convs],
                                     code="target-keeps"))
            self.decisions.append(Decision(location=concat.name, graph="", form="split", action="keep",
                                           rule=verdict[1]))
            return []
        conv_names = _conv_names(names, candidate, plan)
        location = next((name for name, conv in zip(conv_names, plan.convs) if conv.groups > 1), conv_names[0])
        if verdict is not None:
            self.decisions.append(Decision(location=location, graph="", form="native", action="fuse",
                                           rule=verdict[1]))
        old = candidate.readers + [n for c in chains for layer in c.layers[:len(plan.steps)] for n in layer.nodes]
        old += [concat] if plan.stopped is None else []
        new_nodes = []
        if self.rewrite:
            new_nodes = self._emit(names, candidate, plan, conv_names, rewired)
            replaced.update(n.name for n in old)
            self.created.extend(conv_names)
        self.rewrites.append(Rewrite(
            kind="fuse-parallel-branches" if candidate.shared else "fuse-split-conv", location=location,
            groups=plan.groups, channels={"in": plan.convs[0].in_channels, "out": plan.convs[-1].out_channels},
            nodes=[n.name for n in old],
            # The ConcatV2's output: the fused result takes its name, or, where the fusion stops
            # early, the ConcatV2 stays and joins the split-back branches (gconv_rewrite.proof).
            boundary=[{"tensor": g.tensor_name(concat.name)}]))
        if plan.stopped is not None:
            self.skipped.append(Skip(concat.name, f"fused up to {plan.stopped}; the rest stays per branch", [],
                                     code=plan.stopped_code or ""))
        return new_nodes

    def _judge(self, first: _Chain, plan: ChainPlan) -> tuple[bool, str] | None:
        """The ``accept`` hook's verdict on the grouped layers of a candidate: the first refusal,
        or acceptance with the rules that accepted; None without a hook or a grouped layer."""
        if self.accept is None:
            return None
        verdicts = [self.accept(ConvProps(groups=conv.groups, in_channels=conv.in_channels,
                                          out_channels=conv.out_channels, kernel_rank=layer.rank - 2))
                    for conv, layer in zip(plan.convs, first.convs) if conv.groups > 1]
        if not verdicts:
            return None
        refused = next((v for v in verdicts if not v[0]), None)
        return refused or (True, "; ".join(dict.fromkeys(rule for _, rule in verdicts)))

    # -- matching ----------------------------------------------------------------------------

    def _match(self, index: g.GraphIndex, concat, replaced: set[str]) -> _Candidate:
        chains = _find_chains(index, concat, replaced)
        _check_chains(index, concat, chains)
        before = next((c.before[0] for c in chains if c.before), None)
        if before is not None:
            raise Refused("op-before-conv", f"a branch applies {before.op} before its convolution")
        reading = [_read_channels(index, c.entry, c.first.channel_axis, rank=c.first.rank) is not None
                   for c in chains]
        if not any(reading) and len({c.entry for c in chains}) == 1:
            shape = index.shape(chains[0].entry)
            rank = chains[0].first.rank
            channels = shape[chains[0].first.channel_axis] if shape is not None and len(shape) == rank else None
            if channels is None:  # the wide conv's filter depth must be all of them (group 1)
                raise Refused("unknown-channels", "cannot tell the channel count of the tensor every branch reads")
            return _Candidate(concat, chains, chains[0].entry, channels, None)
        for chain, reads in zip(chains, reading):
            start, _ = index.producer(chain.entry)
            if not reads and start is not None and (start.op in CONV_OPS or start.op in TF_TAIL_KINDS
                                                    or start.op == "Squeeze"):
                raise Refused("used-outside", f"branch output {start.name} is used outside the ConcatV2")
        if not any(reading):
            raise Refused("different-sources", "branches read from different tensors")
        return _read_ranges(index, concat, chains)

    def _read_step(self, index: g.GraphIndex, candidate: _Candidate, step: int,
                   branch_channels: list[int] | None) -> ConvLayer | TailLayer | Refusal:
        """Step ``step`` of every branch as ``plan_chain`` reads it."""
        chains = candidate.chains
        layers = [c.layers[step] for c in chains]
        if layers[0].conv is not None:
            return _read_conv_layer(index, candidate, layers, branch_channels)
        if layers[0].graph_input is not None:
            return _read_tail_graph(index, candidate, step, branch_channels)
        tails = [_read_tail(index, layer.nodes[0], _layer_axis(c, step), c.first.rank, channels)
                 for layer, c, channels in zip(layers, chains, branch_channels)]
        reason = next((t for t in tails if isinstance(t, str)), None)
        if reason is not None:
            return tail_refusal(reason)
        candidate.tails[step] = tails[0]
        return TailLayer(layers[0].kind, [t.config for t in tails], [t.params for t in tails], tails[0].param_axes)

    # -- emitting ----------------------------------------------------------------------------

    def _emit(self, names: g.Names, candidate: _Candidate, plan: ChainPlan, conv_names: list[str],
              rewired: dict[str, str]) -> list[node_def_pb2.NodeDef]:
        """New nodes: per fused step a conv (with its bias) or a tail; the last takes the
        ConcatV2's name, so its readers need no change; or, where the branches stop agreeing, a
        SplitV whose outputs ``rewired`` hands to the rest of each branch."""
        first = candidate.chains[0]
        nodes, current, conv_name = [], candidate.source, ""
        convs = iter(zip(conv_names, plan.convs))
        for step, fused in enumerate(plan.steps):
            layer = first.layers[step]
            if layer.conv is not None:
                conv_name, conv_plan = next(convs)
                new, current = _emit_conv(names, layer, conv_plan, conv_name, current)
            elif layer.graph_input is not None:
                new, current = _emit_tail_graph(names, layer, candidate.tails[step], fused, conv_name, current)
            else:
                new, current = _emit_tail(names, candidate.tails[step], fused, conv_name, current)
            nodes.extend(new)
        if plan.stopped is None:
            last = nodes[-1]
            if last.name != candidate.concat.name:
                last.name = candidate.concat.name  # the fused result stands where the ConcatV2 stood
            return nodes
        split = names.fresh(f"{conv_name}/split_back")
        sizes = g.make_const(names.fresh(f"{split}/sizes"), np.array(plan.branch_channels, np.int32))
        axis = g.make_const(names.fresh(f"{split}/axis"), np.array(first.first.channel_axis, np.int32))
        nodes += [sizes, axis, g.make_node("SplitV", split, [current, sizes.name, axis.name],
                                           T=first.first.conv.attr["T"],
                                           Tlen=attr_value_pb2.AttrValue(type=types_pb2.DT_INT32),
                                           num_split=len(plan.branch_channels))]
        for i, chain in enumerate(candidate.chains):
            rewired[g.tensor_name(chain.layers[len(plan.steps) - 1].nodes[-1].name)] = g.tensor_name(split, i)
        return nodes


def _layer_axis(chain: _Chain, step: int) -> int:
    """The channel axis of the branch's tensor before ``step`` (that of the conv before it)."""
    return next(layer for layer in reversed(chain.layers[:step]) if layer.conv is not None).channel_axis


def _conv_names(names: g.Names, candidate: _Candidate, plan: ChainPlan) -> list[str]:
    """A name for each fused conv; a bare conv that ends the whole candidate takes the ConcatV2's
    name (its readers need no change)."""
    steps = candidate.chains[0].layers[:len(plan.steps)]
    layers = [layer for layer in steps if layer.conv is not None]
    bare_end = (plan.stopped is None and steps[-1].conv is not None and plan.convs[-1].bias is None
                and steps[-1].expand_axis is None)
    return [candidate.concat.name if bare_end and i == len(layers) - 1
            else names.fresh(f"{layer.conv.name}_group{conv.groups}" if conv.groups > 1 else f"{layer.conv.name}_wide")
            for i, (layer, conv) in enumerate(zip(layers, plan.convs))]


def _emit_conv(names: g.Names, layer: _Layer, plan: FusionPlan, name: str, current: str):
    """[ExpandDims →] Conv [→ Squeeze] [→ BiasAdd] of the fused weights, reading ``current``."""
    filter_node = g.make_const(names.fresh(f"{name}/filter"), plan.weight)
    nodes = [filter_node]
    if layer.expand_axis is not None:  # Conv1D: the same ExpandDims, now of the whole tensor
        expand = layer.nodes[0]
        nodes.append(_copy(expand, names.fresh(f"{name}/ExpandDims"), [current, expand.input[1]]))
        current = nodes[-1].name
    nodes.append(_copy(layer.conv, name, [current, filter_node.name]))
    current = name
    if layer.expand_axis is not None:
        nodes.append(_copy(layer.nodes[2], names.fresh(f"{name}/Squeeze"), [current]))
        current = nodes[-1].name
    if plan.bias is not None:
        bias_node = g.make_const(names.fresh(f"{name}/bias"), plan.bias)
        template = layer.bias_add
        if template is None or template.op != "BiasAdd":
            template = g.make_node("BiasAdd", "", [], T=layer.conv.attr["T"],
                                   data_format="NHWC" if layer.channels_last else "NCHW")
        nodes += [bias_node, _copy(template, names.fresh(f"{name}/BiasAdd"), [current, bias_node.name])]
        current = nodes[-1].name
    return nodes, current


def _emit_tail(names: g.Names, tail: _Tail, params: list[np.ndarray], conv_name: str, current: str,
               wired: dict[int, str] | None = None):
    """Branch 0's tail op, reading ``current`` (or, inside a tail graph, the fused tensors
    ``wired`` gives by input index), its per-channel parameters concatenated."""
    node = _copy(tail.node, names.fresh(f"{conv_name}/{tail.node.op}"), list(tail.node.input))
    for index, ref in ({tail.data_index: current} if wired is None else wired).items():
        node.input[index] = ref
    nodes = []
    for index, array, axis in zip(tail.param_inputs, params, tail.param_axes):
        if axis is not None:  # per-channel: the concatenation; else the branches' shared constant
            nodes.append(g.make_const(names.fresh(f"{node.name}/param{index}"), array))
            node.input[index] = nodes[-1].name
    return nodes + [node], node.name


def _emit_tail_graph(names: g.Names, layer: _Layer, tails: list[_Tail], params: list[list[np.ndarray]],
                     conv_name: str, current: str):
    """Branch 0's tail graph once, reading ``current``: each op copied, wired to the copies of
    the ops it reads (``layer.wiring``), its per-channel parameters concatenated."""
    nodes, copies = [], []  # copies[k]: the name of op k's copy
    for tail, op_params, (_, sources) in zip(tails, params, layer.wiring):
        wired = {}
        for i, source in enumerate(sources):
            if source == GRAPH_INPUT:
                wired[i] = current
            elif isinstance(source, tuple):
                wired[i] = g.tensor_name(copies[source[0]], source[1])
        new, name = _emit_tail(names, tail, op_params, conv_name, current, wired)
        copies.append(name)
        nodes.extend(new)
    return nodes, copies[-1]


def _rewire(nodes: list[node_def_pb2.NodeDef], rewired: dict[str, str]) -> list[node_def_pb2.NodeDef]:
    """The rest of each branch reads its part of the fused tensor (split back)."""
    for node in nodes:
        for i, ref in enumerate(node.input):
            tensor = g.tensor_name(*g.split_input(ref))
            if not ref.startswith("^") and tensor in rewired:
                node.input[i] = rewired[tensor]
    return nodes


def _copy(node: node_def_pb2.NodeDef, name: str, inputs: list[str]) -> node_def_pb2.NodeDef:
    copy = node_def_pb2.NodeDef()
    copy.CopyFrom(node)
    copy.name = name
    del copy.input[:]
    copy.input.extend(inputs)
    return copy


# -- matching helpers ------------------------------------------------------------------------


def _find_chains(index: g.GraphIndex, concat, replaced: set[str]) -> list[_Chain]:
    """The ConcatV2's branches, if it is a candidate: at least two branch convs that read a
    channel range, or at least two chains of convs that read the same whole tensor (a concat of
    single convs on one tensor, Inception-style, is nothing to report)."""
    count = concat.attr["N"].i
    chains = [_walk_back(index, ref) for ref in concat.input[:count]]
    found = [c for c in chains if c is not None]
    reading = [c for c in found if _read_channels(index, c.start, c.first.channel_axis, rank=c.first.rank)]
    sharing = collections.Counter(c.start for c in found if len(c.convs) >= 2)
    if len(reading) < 2 and max(sharing.values(), default=0) < 2:
        raise NotACandidate
    if any(c is None for c in chains):
        raise Refused("concat-extra-inputs", "the ConcatV2 also joins inputs that are not branch convolutions")
    if any(n.name in replaced for c in chains for n in c.nodes):
        raise NotACandidate  # already part of a rewrite in this run
    names = [n.name for c in chains for n in c.nodes]
    if len(set(names)) != len(names):
        raise Refused("concat-twice", "a branch is concatenated twice")
    return chains


def _check_chains(index: g.GraphIndex, concat, chains: list[_Chain]) -> None:
    """What every candidate must satisfy, whatever its branches read."""
    convs = [layer for c in chains for layer in c.convs]
    if len({layer.channels_last for layer in convs}) > 1:
        raise Refused("mixed-ops", "branches mix NHWC and NCHW")
    if len({(layer.rank, layer.channel_axis) for layer in convs}) > 1:
        raise Refused("mixed-ops", "branches mix " + " and ".join(sorted({layer.kind for layer in convs})))
    channel_axis, rank = convs[0].channel_axis, convs[0].rank
    axis = index.const_ints(concat.input[concat.attr["N"].i])
    if axis is None:
        raise Refused("not-constant", "ConcatV2 axis is not a constant")
    if axis[0] % rank != channel_axis:
        raise Refused("not-channel-axis", f"ConcatV2 on axis {axis[0]}, not the channel axis")
    # Each branch's intermediate tensors must feed only the branch's next op(s) (a tail graph reads
    # some twice: Mul(Sigmoid(y), y)); its output only the ConcatV2.
    for chain in chains:
        members = {node.name for node in chain.nodes}
        for node in chain.nodes:
            tensor = g.tensor_name(node.name)
            readers = [r.name for r in index.readers.get(tensor, ())]
            outside = [r for r in readers if r not in members]
            if tensor in index.protected or not readers or (outside and outside != [concat.name]) \
                    or (outside and node is not chain.nodes[-1]):
                raise Refused("used-outside", f"branch output {node.name} is used outside the ConcatV2")
    for chain in chains:
        conv = chain.first.conv
        if index.const(conv.input[1]) is None:
            raise Refused("not-constant", f"weights of {conv.name} are not constants")


def _read_ranges(index: g.GraphIndex, concat, chains: list[_Chain]) -> _Candidate:
    """Which channel range of which one tensor each branch reads, through one Split/SplitV or
    one Slice/StridedSlice per branch."""
    channel_axis, rank = chains[0].first.channel_axis, chains[0].first.rank
    first = next(r for c in chains if (r := _read_channels(index, c.entry, channel_axis, rank=rank)))
    shape = index.shape(first.source)
    channels = shape[channel_axis] if shape is not None and len(shape) == rank else None
    reads = [_read_channels(index, c.entry, channel_axis, channels, rank=rank) for c in chains]
    for chain, read in zip(chains, reads):
        if read is None:
            raise Refused("not-constant", f"{chain.first.conv.name} does not read a constant channel range "
                           "(Split/SplitV/Slice/StridedSlice with constant bounds)")
    if len({r.source for r in reads}) != 1:
        raise Refused("different-sources", "branches read from different tensors")
    kinds = {r.reader.op for r in reads}
    if len(kinds) > 1:
        raise Refused("mixed-ops", "branches mix " + " and ".join(sorted(kinds)))
    for read in reads:
        if read.axis % rank != channel_axis:
            raise Refused("not-channel-axis", f"{read.reader.op} on axis {read.axis}, not the channel axis")
    readers = list({r.reader.name: r.reader for r in reads}.values())
    if kinds & {"Split", "SplitV"}:
        if len(readers) != 1:
            raise Refused("mixed-readers", f"branches read from different {readers[0].op} nodes")
        outputs = readers[0].attr["num_split"].i
        if outputs != len(chains):
            raise Refused("mixed-readers", f"{readers[0].op} has {outputs} outputs but only {len(chains)} feed the ConcatV2")
    for chain in chains:
        if index.uses(chain.entry) != 1:
            raise Refused("used-outside", f"branch input of {chain.first.conv.name} is used outside its convolution")
    if any(r.start is None or r.stop is None for r in reads):
        raise Refused("unknown-channels", "cannot tell the channel ranges (the source's channel count is unknown)")
    return _Candidate(concat, chains, reads[0].source, channels, reads, readers)


def _read_conv_layer(index: g.GraphIndex, candidate: _Candidate, layers: list[_Layer],
                     branch_channels: list[int] | None) -> ConvLayer | Refusal:
    """One conv of every branch as a ``gconv_rewrite.plan.Branch``: the first layer with the source
    channels it reads, a later one with the channels of its own branch."""
    branches = []
    for i, layer in enumerate(layers):
        conv = layer.conv
        if conv.op == "Conv3D" and not (branch_channels is None and candidate.shared):
            return Refusal("unsupported-form", CONV3D_REFUSAL)  # only a wide (group 1) Conv3D runs in TF
        weight = index.const(conv.input[1])
        if weight is None:
            return Refusal("not-constant", f"weights of {conv.name} are not constants")
        depth = weight.shape[-2]
        if branch_channels is not None:
            start, stop = 0, branch_channels[i]
        elif candidate.shared:
            start, stop = 0, candidate.channels
        else:
            start, stop = candidate.reads[i].start, candidate.reads[i].stop
        if (stop - start) % depth:
            return Refusal("width-mismatch", f"{conv.name} reads {stop - start} channels but its filter expects a multiple of {depth}")
        bias = None
        if layer.bias_add is not None:
            bias = (index.const(layer.bias_add.input[1]) if layer.bias_add.op == "BiasAdd"
                    else _bias_vector(index, layer.bias_add))
            if bias is None:
                return Refusal("not-constant", f"bias of {conv.name} is not a constant")
        branches.append(Branch(name=conv.name, channel_start=start, channel_stop=stop, weight=weight, bias=bias,
                               groups=(stop - start) // depth, out_channels=weight.shape[-1],
                               attributes=_conv_attributes(conv, layer.rank)))
    return ConvLayer(branches)


def _conv_attributes(conv, rank: int) -> dict:
    """What decides a conv's output besides its weights (branches must agree on all of it)."""
    spatial = 4 if rank <= 4 else 5
    attributes = {"strides": tuple(g.attr_ints(conv, "strides")), "padding": g.attr_str(conv, "padding"),
                  "dilations": tuple(g.attr_ints(conv, "dilations")) or (1,) * spatial}
    if conv.op == "Conv2D":
        attributes["explicit_paddings"] = tuple(g.attr_ints(conv, "explicit_paddings"))
    return attributes


def _walk_back(index: g.GraphIndex, ref: str) -> _Chain | None:
    """concat input ← (tail | conv)* back through ops each used only by the next, skipping
    Identity, to where the branch starts; None if the branch has no conv."""
    layers: list[_Layer] = []
    tensor = index.skip_identity(ref)
    while True:
        node, _ = index.producer(tensor)
        if node is None or (any(l.conv is not None for l in layers) and index.uses(tensor) != 1):
            break  # behind a conv, a tensor with other readers is where the branch starts
        layer = _conv_layer(index, node)
        if layer is None:
            data = _tail_data(index, node)
            layer = _Layer([node]) if data is not None else _tail_graph(index, node)
            if layer is None:
                break
            data = layer.graph_input or data
        layers.insert(0, layer)
        tensor = index.skip_identity(data if layer.conv is None else layer.nodes[0].input[0])
    first = next((i for i, layer in enumerate(layers) if layer.conv is not None), None)
    if first is None:
        return None
    # Ops before the first conv do not fuse: kept apart, so that a candidate can say so.
    return _Chain(index.skip_identity(layers[first].nodes[0].input[0]), _attach_biases(index, layers[first:]),
                  [layer.nodes[0] for layer in layers[:first]], tensor)


def _tail_graph(index: g.GraphIndex, output_node) -> _Layer | None:
    """The multi-op elementwise tail ending at ``output_node`` (``Mul(Sigmoid(y), y)``: not one
    branch tensor and constants), as one layer, or None.

    From the output, the tensors the graph still reads from outside (its frontier) are replaced
    by the elementwise ops that produce them until one tensor is left: the branch tensor. A
    tensor is taken in once all its readers are in the graph (else the one an elementwise op
    produces; ``_check_chains`` then says what else reads it)."""
    if output_node.op not in GRAPH_OPS:
        return None
    members = {output_node.name: output_node}
    frontier = list(dict.fromkeys(_variable_inputs(index, output_node)))
    while len(frontier) > 1:
        producers = [(tensor, index.producer(tensor)[0]) for tensor in frontier]
        expandable = [(t, n) for t, n in producers if n is not None and n.op in GRAPH_OPS and n.name not in members]
        if not expandable or len(members) >= MAX_GRAPH_OPS:
            return None
        inside = [(t, n) for t, n in expandable if t not in index.protected
                  and all(reader.name in members for reader in index.readers.get(t, ()))]
        tensor, node = (inside or expandable)[0]
        members[node.name] = node
        frontier.remove(tensor)
        frontier.extend(t for t in _variable_inputs(index, node) if t not in frontier)
    if len(frontier) != 1:
        return None
    nodes = _canonical_order(index, output_node, members)
    position = {node.name: k for k, node in enumerate(nodes)}
    wiring = []
    for node in nodes:
        sources = []
        for ref in node.input:
            tensor = index.skip_identity(ref) if not ref.startswith("^") else None
            name, output = g.split_input(tensor) if tensor else (None, 0)
            sources.append(None if tensor is None else GRAPH_INPUT if tensor == frontier[0]
                           else (position[name], output) if name in position else GRAPH_CONSTANT)
        wiring.append((TF_TAIL_KINDS[node.op], tuple(sources)))
    return _Layer(nodes, graph_input=frontier[0], wiring=tuple(wiring))


def _variable_inputs(index: g.GraphIndex, node) -> list[str]:
    """The tensors ``node`` reads that are not constants (control inputs left out)."""
    return [index.skip_identity(ref) for ref in node.input if not ref.startswith("^") and index.const(ref) is None]


def _canonical_order(index: g.GraphIndex, output_node, members: dict) -> list:
    """A tail graph's ops depth first from the output, inputs in order: each after what it
    reads, and equal graphs in two branches in the same order."""
    order, seen, stack = [], set(), [(output_node, False)]
    while stack:
        node, expanded = stack.pop()
        if expanded:
            order.append(node)
        elif node.name not in seen:
            seen.add(node.name)
            stack.append((node, True))
            for tensor in reversed(_variable_inputs(index, node)):
                producer = members.get(g.split_input(tensor)[0])
                if producer is not None and producer.name not in seen:
                    stack.append((producer, False))
    return order


def _read_tail_graph(index: g.GraphIndex, candidate: _Candidate, step: int,
                     branch_channels: list[int]) -> TailGraphLayer | Refusal:
    """Step ``step`` of every branch, a tail graph, as ``plan_chain`` reads it: each op of two
    graph tensors without parameters, each op of one and a constant as a one-op tail."""
    branch_tails = []
    for chain, channels in zip(candidate.chains, branch_channels):
        layer, tails = chain.layers[step], []
        for node in layer.nodes:
            if len(_variable_inputs(index, node)) > 1:  # Mul(Sigmoid(y), y), Mul(y, y)
                tails.append(_Tail(node, 0, g.attr_values(node)))
                continue
            tail = _read_tail(index, node, _layer_axis(chain, step), chain.first.rank, channels)
            if isinstance(tail, str):
                return tail_refusal(f"{tail} (inside the {layer.kind})")
            tails.append(tail)
        branch_tails.append(tails)
    candidate.tails[step] = branch_tails[0]
    first = candidate.chains[0].layers[step]
    return TailGraphLayer(first.kind, [c.layers[step].wiring for c in candidate.chains], [
        TailLayer(TF_TAIL_KINDS[same[0].node.op], [t.config for t in same], [t.params for t in same],
                  same[0].param_axes) for same in zip(*branch_tails)])


def _conv_layer(index: g.GraphIndex, node) -> _Layer | None:
    """``node`` as the end of a conv layer: a Conv2D/Conv3D, or the Squeeze of a Conv1D."""
    if node.op in CONV_OPS:
        return _Layer([node], conv=node)
    if node.op != "Squeeze":
        return None
    conv, _ = index.producer(index.skip_identity(node.input[0]))
    if conv is None or conv.op != "Conv2D":
        return None
    expand, _ = index.producer(index.skip_identity(conv.input[0]))
    axis = _expand_axis(index, expand) if expand is not None and expand.op == "ExpandDims" else None
    if axis is None or [d % 4 for d in g.attr_ints(node, "squeeze_dims")] != [axis]:
        return None  # not the ExpandDims → Conv2D → Squeeze of a Conv1D
    return _Layer([expand, conv, node], conv=conv, expand_axis=axis)


def _attach_biases(index: g.GraphIndex, layers: list[_Layer]) -> list[_Layer]:
    """The first op after a conv, when it is a BiasAdd or an Add/AddV2 of a constant vector over
    the channels in the conv's data format, becomes the conv's bias."""
    out: list[_Layer] = []
    for layer in layers:
        before = out[-1] if out else None
        node = layer.nodes[0]
        if (layer.conv is None and layer.graph_input is None and before is not None and before.conv is not None
                and before.bias_add is None
                and (node.op == "BiasAdd" or _bias_vector(index, node) is not None)):
            bias_last = g.attr_str(node, "data_format", "NHWC") == "NHWC" if node.op == "BiasAdd" else True
            if bias_last == before.channels_last:
                before.bias_add = node
                before.nodes.append(node)
                continue  # else left to the tails, which say why it does not fuse
        out.append(layer)
    return out


def _branch_convs(index: g.GraphIndex, concat) -> list[str]:
    count = concat.attr["N"].i
    chains = [_walk_back(index, ref) for ref in concat.input[:count]]
    return list(dict.fromkeys(layer.conv.name for c in chains if c is not None for layer in c.convs))


# How far back from a ConcatV2 input, and from a conv to the Split/Slice it reads, the check for
# unmatched groups looks: far enough for an activation formula or a Pad, not across a network.
_TRACE_NODES = 12
_TRACE_TO_READER = 4


def _split_read_convs(index: g.GraphIndex, concat) -> list[str]:
    """The convs behind a ConcatV2's inputs that, two or more of them, read Split/SplitV/Slice/
    StridedSlice outputs of one tensor: the sign of hand-made groups (see ``_unmatched_group_reason``)."""
    by_source: dict[str, list[str]] = {}
    for ref in concat.input[:concat.attr["N"].i]:
        pending, seen = [ref], set()
        while pending and len(seen) < _TRACE_NODES:
            node, _ = index.producer(index.skip_identity(pending.pop(0)))
            if node is None or node.name in seen:
                continue
            seen.add(node.name)
            if node.op in READER_OPS:
                continue  # upstream of a Split/Slice is another part of the network
            if node.op not in CONV_OPS:
                pending.extend(_variable_inputs(index, node))
                continue
            source = _split_source(index, node.input[0])
            if source is not None and node.name not in by_source.setdefault(source, []):
                by_source[source].append(node.name)
    return [name for names in by_source.values() if len(names) >= 2 for name in names]


def _split_source(index: g.GraphIndex, ref: str) -> str | None:
    """The tensor a Split/SplitV/Slice/StridedSlice reads where ``ref`` is one's output (or becomes
    ``ref`` through a few ops of one variable input each: a Pad, an ExpandDims, a Transpose)."""
    tensor = index.skip_identity(ref)
    for _ in range(_TRACE_TO_READER):
        node, _ = index.producer(tensor)
        if node is None:
            return None
        if node.op in READER_OPS:
            return index.skip_identity(node.input[1 if node.op == "Split" else 0])
        variables = _variable_inputs(index, node)
        if len(variables) != 1 or node.op in CONV_OPS:
            return None
        tensor = variables[0]
    return None


def _unmatched_group_reason(index: g.GraphIndex, concat) -> str:
    """Why a ConcatV2 the matcher found no branches in, but whose inputs come from convs that read
    channels of one tensor (``_split_read_convs``), is left alone: it names the first op the branch
    walk could not pass. A ConcatV2 of network structure (a U-Net skip, DenseNet, Inception) has no
    such convs and is not reported at all."""
    for ref in concat.input[:concat.attr["N"].i]:
        chain = _walk_back(index, ref)
        stop = index.producer(chain.start)[0] if chain is not None else _first_untraversed(index, ref)
        if stop is None or (chain is None and (stop.op in READER_OPS or not _variable_inputs(index, stop))):
            continue  # a graph input or a channel part joined as it is: no branch convolution behind it
        label = f"{stop.op} ({stop.name})"
        if chain is None:
            return (f"{label} after a branch convolution is not a channel-wise op of that branch alone, so "
                    "the branches cannot become one grouped convolution")
        if stop.op not in READER_OPS:
            return (f"{label} before a branch convolution: the branches do not read their channels straight from "
                    "a Split, SplitV, Slice or StridedSlice")
        if _read_channels(index, chain.start, chain.first.channel_axis, rank=chain.first.rank) is None:
            return (f"{label} does not read constant bounds of a tensor of known rank, so the branches cannot "
                    "become one grouped convolution")
    return "the branch convolutions are not joined by the ConcatV2 in a form this pass reads"


def _first_untraversed(index: g.GraphIndex, ref: str):
    """The first op back from ``ref`` that is no channel-wise tail (``_walk_back``'s stop where it
    found no conv), or None at a graph input."""
    tensor = index.skip_identity(ref)
    for _ in range(MAX_GRAPH_OPS):
        node, _ = index.producer(tensor)
        if node is None:
            return None
        data = _tail_data(index, node)
        if data is None:
            layer = _tail_graph(index, node)
            data = layer.graph_input if layer is not None else None
        if data is None:
            return node
        tensor = index.skip_identity(data)
    return None


def _read_tail(index: g.GraphIndex, node, channel_axis: int, rank: int, channels: int) -> _Tail | str:
    """Read ``node`` as a channel-wise op of a branch with ``channels`` channels, or say why not."""
    config = g.attr_values(node)
    rules = TAIL_RULES[TF_TAIL_KINDS[node.op]].params
    if not rules:
        return _Tail(node, 0, config)
    if node.op in BATCH_NORM_OPS:
        axis = 3 if config.get("data_format", "NHWC") == "NHWC" else 1
        if rank != 4 or axis != channel_axis:
            return f"{node.op} normalises another axis than the branch's channel axis"
        if config.get("is_training", True):
            return f"{node.op} in training mode"
        if any(index.uses(g.tensor_name(node.name, i)) for i in range(1, 6)):
            return f"{node.op} batch statistics are used"
        params = [index.const(ref) for ref in node.input[1:5]]
        axes = [tail_concat_axis(r, p.shape, channel_axis, rank, channels) if p is not None else "no constant"
                for r, p in zip(rules, params)]
        if any(isinstance(a, str) for a in axes):
            return f"{node.op} parameters are not constant per-channel vectors"
        return _Tail(node, 0, config, params, [1, 2, 3, 4], axes)
    data_index = 0 if node.op == "BiasAdd" or index.const(node.input[0]) is None else 1
    constant = index.const(node.input[1 - data_index])
    if constant is None:
        return f"{node.op} of a tensor that is not a constant"
    if node.op == "BiasAdd":
        axis = rank - 1 if config.get("data_format", "NHWC") in ("NHWC", "N...C") else 1
        if axis != channel_axis:
            return "BiasAdd adds along another axis than the branch's channel axis"
        if constant.shape != (channels,):
            return f"BiasAdd vector of shape {list(constant.shape)} is not per-channel"
        return _Tail(node, 0, config, [constant], [1], [0])
    concat_axis = tail_concat_axis(rules[0], constant.shape, channel_axis, rank, channels)
    if isinstance(concat_axis, str):
        return f"{node.op} {concat_axis}"
    axis = channel_axis - (rank - constant.ndim)  # where the constant meets the channel axis
    config.update(constant_side=1 - data_index,
                  constant_shape=tuple(d if i != axis else -1 for i, d in enumerate(constant.shape)))
    return _Tail(node, data_index, config, [constant], [1 - data_index], [concat_axis])


def _tail_data(index: g.GraphIndex, node) -> str | None:
    """The branch tensor a possible tail op reads, or None if ``node`` is no tail op."""
    if node.op in TAIL_OPS or (node.op in BATCH_NORM_OPS and len(node.input) >= 5):
        return node.input[0]
    if node.op == "BiasAdd" and len(node.input) == 2:  # a bias that is no constant is reported
        return node.input[0]
    if node.op in BINARY_OPS and len(node.input) == 2:
        tensors = [ref for ref in node.input if index.const(ref) is None]
        if len(tensors) == 1:
            return tensors[0]
    return None



def _expand_axis(index: g.GraphIndex, expand) -> int | None:
    """The 4-D axis an ExpandDims inserts (TF's conv1d inserts the height axis)."""
    axis = index.const_ints(expand.input[1])
    return axis[0] % 4 if axis and len(axis) == 1 else None


def _bias_vector(index: g.GraphIndex, node) -> np.ndarray | None:
    """The per-channel vector an Add/AddV2 adds to its first input (NHWC: shape [O] or [1,1,1,O])."""
    if node.op not in ("Add", "AddV2") or len(node.input) != 2:
        return None
    vector = index.const(node.input[1])
    if vector is None or vector.ndim == 0 or vector.size != vector.shape[-1] or vector.shape[-1] < 2:
        return None
    return vector.reshape(-1)




def _read_channels(index: g.GraphIndex, ref: str, channel_axis: int, channels: int | None = None, *,
                   rank: int = 4) -> ChannelRead | None:
    """Which channel range of which tensor ``ref`` holds, if a Split/SplitV/Slice/StridedSlice made it."""
    node, output = index.producer(index.skip_identity(ref))
    if node is None or node.op not in READER_OPS:
        return None
    if node.op == "Split":
        axis = index.const_ints(node.input[0])
        source = index.skip_identity(node.input[1])
        count = node.attr["num_split"].i
        if axis is None:
            return None
        width = channels // count if channels is not None else None
        start = output * width if width is not None else None
        return ChannelRead(source, node, axis[0], start, start + width if width is not None else None)
    if node.op == "SplitV":
        sizes, axis = index.const_ints(node.input[1]), index.const_ints(node.input[2])
        source = index.skip_identity(node.input[0])
        if sizes is None or axis is None:
            return None
        sizes = resolve_sizes(sizes, channels)
        if sizes is None:  # a "-1" (the rest) of an unknown channel count
            return ChannelRead(source, node, axis[0], None, None)
        start = sum(sizes[:output])
        return ChannelRead(source, node, axis[0], start, start + sizes[output])
    source = index.skip_identity(node.input[0])
    shape = index.shape(source)
    if shape is None or len(shape) != rank:
        return None
    if node.op == "Slice":
        begin, size = index.const_ints(node.input[1]), index.const_ints(node.input[2])
        if begin is None or size is None or len(begin) != rank:
            return None
        spans = [(b, None if s == -1 else b + s) for b, s in zip(begin, size)]
    else:
        spans = _strided_spans(index, node, shape)
        if spans is None:
            return None
    for axis, ((start, stop), dim) in enumerate(zip(spans, shape)):
        if axis == channel_axis:
            continue
        if start != 0 or (stop is not None and (dim is None or stop < dim)):
            return ChannelRead(source, node, axis, start, stop)  # slices another axis: not a channel read
    start, stop = spans[channel_axis]
    dim = shape[channel_axis]
    if stop is None or (dim is not None and stop > dim):
        stop = dim
    return ChannelRead(source, node, channel_axis, start, stop)


def _strided_spans(index: g.GraphIndex, node, shape) -> list[tuple[int, int | None]] | None:
    """Per-axis (start, stop) of a StridedSlice with unit strides; None for anything fancier."""
    begin, end, strides = (index.const_ints(node.input[i]) for i in (1, 2, 3))
    if begin is None or end is None or strides is None or any(s != 1 for s in strides):
        return None
    masks = {k: node.attr[k].i if k in node.attr else 0
             for k in ("begin_mask", "end_mask", "ellipsis_mask", "new_axis_mask", "shrink_axis_mask")}
    if masks["new_axis_mask"] or masks["shrink_axis_mask"]:
        return None
    rank = len(shape)
    spans: list[tuple[int, int | None]] = [(0, None)] * rank
    entries = list(range(len(begin)))
    if masks["ellipsis_mask"]:
        at = (masks["ellipsis_mask"] & -masks["ellipsis_mask"]).bit_length() - 1
        before, after = entries[:at], entries[at + 1:]
        axes = list(range(len(before))) + list(range(rank - len(after), rank))
        entries = before + after
    else:
        axes = entries
    for entry, axis in zip(entries, axes):
        start = 0 if masks["begin_mask"] >> entry & 1 else begin[entry]
        stop = None if masks["end_mask"] >> entry & 1 else end[entry]
        dim = shape[axis]
        if start < 0 or (stop is not None and stop < 0):
            if dim is None:
                return None
            start = start + dim if start < 0 else start
            stop = stop + dim if stop is not None and stop < 0 else stop
        spans[axis] = (start, stop)
    return spans
