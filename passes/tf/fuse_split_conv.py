"""Fuse hand-made grouped convolutions in a TF graph into one Conv2D with a grouped filter.

    x → Split|SplitV|Slice_i|StridedSlice_i(channel axis) → Conv2D_i [→ BiasAdd_i] [→ tails_i] → ConcatV2
        ⇒  x → Conv2D(filter [kH, kW, C/N, O]) [→ BiasAdd] [→ tails]

NHWC and NCHW (the Conv2D's ``data_format`` names the channel axis); Conv1D as TF writes it,
``ExpandDims → Conv2D → Squeeze``, too. The matcher starts at each
ConcatV2 and walks every input back to its Conv2D and on to the op that reads a channel range;
``rewriter.plan`` owns the fusability rules, the reasons and the weight arithmetic (TF filters
stack on the last axis). Tails are the channel-wise ops after each branch conv (activations,
FusedBatchNorm in inference form, BiasAdd and Add/Sub/Mul/... of a per-channel constant); they are
planned step by step across the branches with ``rewriter.plan.plan_tail`` (settings must agree,
per-channel parameters are concatenated) and applied once after the fused convolution. Where the
branches stop agreeing (one Relu, one Sigmoid), the fused tensor is split back (SplitV) into the
branches' parts, the rest stays per branch, and a skip says where the fusion stopped.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
from tensorflow.core.framework import attr_value_pb2, graph_pb2, node_def_pb2, types_pb2

from passes import register
from passes.tf import _graph as g
from rewriter.plan import Branch, FusionPlan, Refusal, plan_fusion, plan_tail
from rewriter.report import Rewrite, Skip
from rewriter.targets import ConvProps

CONV_OPS = ("Conv2D",)
READER_OPS = ("Split", "SplitV", "Slice", "StridedSlice")
# Element-wise ops that commute with the channel concat: applied per branch or once after.
TAIL_OPS = ("Relu", "Relu6", "Elu", "Selu", "Sigmoid", "Tanh", "LeakyRelu", "Softplus", "Softsign")
BATCH_NORM_OPS = ("FusedBatchNorm", "FusedBatchNormV2", "FusedBatchNormV3")
# Ops of the branch tensor and a constant: channel-wise when the constant is per-channel or shared.
BINARY_OPS = ("BiasAdd", "Add", "AddV2", "Sub", "Mul", "RealDiv", "Maximum", "Minimum")


class _NotACandidate(Exception):
    """The ConcatV2 does not join branch convolutions at all (nothing to report)."""


class _Refused(Exception):
    """A candidate that cannot fuse; the message is the reason."""


@dataclass
class _Read:
    reader: node_def_pb2.NodeDef
    source: str  # the tensor whose channels are read
    axis: int
    start: int | None
    stop: int | None


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
class _Chain:
    """One branch, from the concat input back to its convolution."""

    conv: node_def_pb2.NodeDef
    bias_add: node_def_pb2.NodeDef | None
    tail: list[node_def_pb2.NodeDef]
    # Conv1D: ExpandDims → Conv2D → Squeeze around the conv.
    expand: node_def_pb2.NodeDef | None = None
    squeeze: node_def_pb2.NodeDef | None = None
    expand_axis: int | None = None  # the 4-D axis the ExpandDims inserts

    @property
    def nodes(self) -> list[node_def_pb2.NodeDef]:
        around = [self.expand] if self.expand is not None else []
        around += [self.conv] + ([self.squeeze] if self.squeeze is not None else [])
        return around + ([self.bias_add] if self.bias_add is not None else []) + self.tail

    def cut(self, fused_tails: int) -> node_def_pb2.NodeDef:
        """The last node of the branch that the fusion replaces when ``fused_tails`` tails fuse."""
        return self.nodes[len(self.nodes) - len(self.tail) + fused_tails - 1]

    @property
    def data(self) -> str:
        """The tensor the branch reads (before the ExpandDims of a Conv1D)."""
        return self.expand.input[0] if self.expand is not None else self.conv.input[0]

    @property
    def rank(self) -> int:
        return 3 if self.expand is not None else 4

    @property
    def channel_axis(self) -> int:
        """The channel axis of what the branch reads and writes."""
        axis = 3 if g.attr_str(self.conv, "data_format", "NHWC") == "NHWC" else 1
        if self.expand is None:
            return axis
        return axis if axis < self.expand_axis else axis - 1


@register("tf.fuse-split-conv")
class FuseSplitConvPass:
    """Rewrite every fusable channel split → Conv2D → ConcatV2 subgraph; record rewrites and skips.

    ``accept(props) -> (ok, rule)``, when given, is asked about the grouped conv a candidate would
    become (``--target``): a refused candidate stays as it is, reported as a skip with the rule as
    its reason; each judged candidate is also listed in ``decisions``."""

    def __init__(self, *, rewrite: bool = True, accept: Callable[[ConvProps], tuple[bool, str]] | None = None):
        self.rewrite = rewrite  # False: only find and plan (for --check / --dry-run)
        self.accept = accept
        self.decisions: list[dict] = []  # {location, graph, form, action, rule} per judged candidate
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
                source, channels, branches, chains, readers = self._match(index, concat, replaced)
                plan = plan_fusion(branches, channels, stack_axis=-1)
                if isinstance(plan, Refusal):
                    raise _Refused(plan.reason)
            except _NotACandidate:
                continue
            except _Refused as refusal:
                self.skipped.append(Skip(concat.name, str(refusal), [c.name for c in _branch_convs(index, concat)]))
                continue
            verdict = None
            if self.accept is not None and plan.groups > 1:
                verdict = self.accept(ConvProps(groups=plan.groups, in_channels=plan.in_channels,
                                                out_channels=plan.out_channels,
                                                kernel_rank=1 if chains[0].expand is not None else 2))
                if not verdict[0]:
                    self.skipped.append(Skip(concat.name, verdict[1], [c.conv.name for c in chains]))
                    self.decisions.append({"location": concat.name, "graph": "", "form": "split",
                                           "action": "keep", "rule": verdict[1]})
                    continue
            tails, stopped = _plan_tails(index, chains, plan.out_channels // len(chains))
            cut = len(tails)
            old = [*readers, *(n for c in chains for n in c.nodes[:len(c.nodes) - len(c.tail) + cut])]
            old += [concat] if stopped is None else []
            simple = plan.bias is None and not tails and chains[0].squeeze is None and stopped is None
            conv_name = concat.name if simple else names.fresh(f"{chains[0].conv.name}_group{plan.groups}")
            if verdict is not None:
                self.decisions.append({"location": conv_name, "graph": "", "form": "native", "action": "fuse",
                                       "rule": verdict[1]})
            if self.rewrite:
                split_back = None if stopped is None else [c.cut(cut) for c in chains]
                new_nodes.extend(self._emit(names, concat, source, chains[0], plan, conv_name, tails, split_back,
                                            rewired))
                replaced.update(n.name for n in old)
                self.created.append(conv_name)
            self.rewrites.append(Rewrite(kind="fuse-split-conv", location=conv_name, groups=plan.groups,
                                         channels={"in": plan.in_channels, "out": plan.out_channels},
                                         nodes=[n.name for n in old]))
            if stopped is not None:
                self.skipped.append(Skip(concat.name, f"fused up to {stopped}; the rest stays per branch", []))
        if not new_nodes:
            return graph_def
        kept = _rewire([n for n in graph_def.node if n.name not in replaced], rewired)
        del graph_def.node[:]
        graph_def.node.extend(kept + new_nodes)
        keep = [g.split_input(t)[0] for t in protected] + [n.name for n in kept if n.op == "Placeholder"]
        return g.prune(graph_def, keep)

    # -- matching ----------------------------------------------------------------------------

    def _match(self, index: g.GraphIndex, concat, replaced: set[str]):
        count = concat.attr["N"].i
        values, axis_ref = list(concat.input[:count]), concat.input[count]
        chains = [_walk_to_conv(index, ref) for ref in values]
        # A candidate has at least two branch convs that read a channel range (so a concat of
        # Inception-style branches on one whole tensor is nothing to report).
        fed = [c for c in chains if c is not None and _read_channels(index, c.data, c.channel_axis, rank=c.rank)]
        if len(fed) < 2:
            raise _NotACandidate
        if any(c is None for c in chains):
            raise _Refused("the ConcatV2 also joins inputs that are not branch convolutions")
        if any(n.name in replaced for c in chains for n in c.nodes):
            raise _NotACandidate  # already part of a rewrite in this run
        convs = [c.conv for c in chains]
        if len({c.name for c in convs}) != len(convs):
            raise _Refused("a branch is concatenated twice")

        data_formats = {g.attr_str(c, "data_format", "NHWC") for c in convs}
        if len(data_formats) > 1:
            raise _Refused("branches mix NHWC and NCHW")
        if len({(c.rank, c.channel_axis) for c in chains}) > 1:
            raise _Refused("branches mix Conv1D and Conv2D")
        channel_axis, rank = chains[0].channel_axis, chains[0].rank
        axis = index.const_ints(axis_ref)
        if axis is None:
            raise _Refused("ConcatV2 axis is not a constant")
        if axis[0] % rank != channel_axis:
            raise _Refused(f"ConcatV2 on axis {axis[0]}, not the channel axis")

        # Each branch's intermediate tensors must feed only the next op of the branch.
        for chain in chains:
            for node in chain.nodes:
                if index.uses(g.tensor_name(node.name)) != 1:
                    raise _Refused(f"branch output {node.name} is used outside the ConcatV2")
        weights = [index.const(c.input[1]) for c in convs]
        for conv, weight in zip(convs, weights):
            if weight is None:
                raise _Refused(f"weights of {conv.name} are not constants")

        first = _read_channels(index, fed[0].data, channel_axis, rank=rank)
        shape = index.shape(first.source)
        channels = shape[channel_axis] if shape is not None and len(shape) == rank else None
        reads = [_read_channels(index, c.data, channel_axis, channels, rank=rank) for c in chains]
        for conv, read in zip(convs, reads):
            if read is None:
                raise _Refused(f"{conv.name} does not read a constant channel range "
                               "(Split/SplitV/Slice/StridedSlice with constant bounds)")
        if len({r.source for r in reads}) != 1:
            raise _Refused("branches read from different tensors")
        kinds = {r.reader.op for r in reads}
        if len(kinds) > 1:
            raise _Refused("branches mix " + " and ".join(sorted(kinds)))
        for read in reads:
            if read.axis % rank != channel_axis:
                raise _Refused(f"{read.reader.op} on axis {read.axis}, not the channel axis")
        readers = list({r.reader.name: r.reader for r in reads}.values())
        if kinds & {"Split", "SplitV"}:
            if len(readers) != 1:
                raise _Refused(f"branches read from different {readers[0].op} nodes")
            outputs = readers[0].attr["num_split"].i
            if outputs != len(convs):
                raise _Refused(f"{readers[0].op} has {outputs} outputs but only {len(convs)} feed the ConcatV2")
        for chain in chains:
            if index.uses(index.skip_identity(chain.data)) != 1:
                raise _Refused(f"branch input of {chain.conv.name} is used outside its convolution")

        branches = []
        for chain, read, weight in zip(chains, reads, weights):
            conv = chain.conv
            if read.start is None or read.stop is None:
                raise _Refused("cannot tell the channel ranges (the source's channel count is unknown)")
            width = read.stop - read.start
            if width % weight.shape[2]:
                raise _Refused(f"{conv.name} reads {width} channels but its filter expects a multiple of "
                               f"{weight.shape[2]}")
            bias = None
            if chain.bias_add is not None:
                bias = (index.const(chain.bias_add.input[1]) if chain.bias_add.op == "BiasAdd"
                        else _bias_vector(index, chain.bias_add))
                if bias is None:
                    raise _Refused(f"bias of {conv.name} is not a constant")
            branches.append(Branch(
                name=conv.name, channel_start=read.start, channel_stop=read.stop, weight=weight, bias=bias,
                groups=width // weight.shape[2], out_channels=weight.shape[3],
                attributes={"strides": tuple(g.attr_ints(conv, "strides")),
                            "padding": g.attr_str(conv, "padding"),
                            "explicit_paddings": tuple(g.attr_ints(conv, "explicit_paddings")),
                            "dilations": tuple(g.attr_ints(conv, "dilations")) or (1, 1, 1, 1)}))
        return reads[0].source, channels, branches, chains, readers

    # -- emitting ----------------------------------------------------------------------------

    def _emit(self, names: g.Names, concat, source: str, first: _Chain, plan: FusionPlan, conv_name: str,
              tails: list[tuple[_Tail, list[np.ndarray]]], split_back: list | None, rewired: dict[str, str]):
        """New nodes: Conv2D [→ BiasAdd] [→ tails]; the last takes the ConcatV2's name, so its
        readers need no change; or, where the branches stop agreeing, a SplitV whose outputs
        ``rewired`` hands to the rest of each branch."""
        filter_node = g.make_const(names.fresh(f"{conv_name}/filter"), plan.weight)
        consts, chain = [filter_node], []
        if first.expand is not None:  # Conv1D: the same ExpandDims, now of the whole source
            expand = _copy(first.expand, names.fresh(f"{conv_name}/ExpandDims"), [source, first.expand.input[1]])
            consts, source = consts + [expand], expand.name
        conv = _copy(first.conv, conv_name, [source, filter_node.name])
        chain.append(conv)
        if first.squeeze is not None:
            chain.append(_copy(first.squeeze, names.fresh(f"{conv_name}/Squeeze"), [""]))
        if plan.bias is not None:
            bias_node = g.make_const(names.fresh(f"{conv_name}/bias"), plan.bias)
            template = first.bias_add
            if template is None or template.op != "BiasAdd":
                template = g.make_node("BiasAdd", "", [], T=conv.attr["T"],
                                       data_format=g.attr_str(conv, "data_format", "NHWC"))
            consts.append(bias_node)
            chain.append(_copy(template, names.fresh(f"{conv_name}/BiasAdd"), ["", bias_node.name]))
        data_index = [0] * len(chain)
        for tail, params in tails:
            node = _copy(tail.node, names.fresh(f"{conv_name}/{tail.node.op}"), list(tail.node.input))
            for index, array, axis in zip(tail.param_inputs, params, tail.param_axes):
                if axis is not None:  # per-channel: the concatenation; else the branches' shared constant
                    consts.append(g.make_const(names.fresh(f"{node.name}/param{index}"), array))
                    node.input[index] = consts[-1].name
            chain.append(node)
            data_index.append(tail.data_index)
        for later, earlier, at in zip(chain[1:], chain, data_index[1:]):
            later.input[at] = earlier.name
        if split_back is None:
            chain[-1].name = concat.name  # the fused result stands where the ConcatV2 stood
            return consts + chain
        split = names.fresh(f"{conv_name}/split_back")
        sizes = g.make_const(names.fresh(f"{split}/sizes"), np.full(len(split_back), plan.out_channels
                                                                    // len(split_back), np.int32))
        axis = g.make_const(names.fresh(f"{split}/axis"), np.array(first.channel_axis, np.int32))
        consts += [sizes, axis]
        chain.append(g.make_node("SplitV", split, [chain[-1].name, sizes.name, axis.name], T=conv.attr["T"],
                                 Tlen=attr_value_pb2.AttrValue(type=types_pb2.DT_INT32),
                                 num_split=len(split_back)))
        for i, node in enumerate(split_back):
            rewired[g.tensor_name(node.name)] = g.tensor_name(split, i)
        return consts + chain


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


def _walk_to_conv(index: g.GraphIndex, ref: str) -> _Chain | None:
    """concat input ← tail* ← [Squeeze ←] Conv2D, skipping Identity; None if it is no conv branch.

    The first tail, when it is a BiasAdd or an Add/AddV2 of a constant vector over the channels
    in the conv's data format, becomes the conv's bias."""
    tail, bias_add = [], None
    node, _ = index.producer(index.skip_identity(ref))
    while node is not None and (data := _tail_data(index, node)) is not None:
        tail.insert(0, node)
        node, _ = index.producer(index.skip_identity(data))
    if tail and (tail[0].op == "BiasAdd" or _bias_vector(index, tail[0]) is not None):
        bias_add = tail[0]
    squeeze = expand = None
    if node is not None and node.op == "Squeeze":
        squeeze = node
        node, _ = index.producer(index.skip_identity(node.input[0]))
    if node is None or node.op not in CONV_OPS:
        return None
    if squeeze is not None:
        expand, _ = index.producer(index.skip_identity(node.input[0]))
        axis = _expand_axis(index, expand) if expand is not None and expand.op == "ExpandDims" else None
        if axis is None or [d % 4 for d in g.attr_ints(squeeze, "squeeze_dims")] != [axis]:
            return None  # not the ExpandDims → Conv2D → Squeeze of a Conv1D
    if bias_add is not None:
        data_format = g.attr_str(node, "data_format", "NHWC")
        bias_format = g.attr_str(bias_add, "data_format", "NHWC") if bias_add.op == "BiasAdd" else "NHWC"
        if bias_format == data_format:
            tail.pop(0)
        else:
            bias_add = None  # left to the tails, which say why it does not fuse
    return _Chain(node, bias_add, tail, expand, squeeze, axis if squeeze is not None else None)


def _plan_tails(index: g.GraphIndex, chains: list[_Chain], channels: int):
    """The tails every branch applies alike, in order, each with its fused parameters; and where
    and why the branches stop agreeing (None when every tail up to the ConcatV2 fuses)."""
    planned: list[tuple[_Tail, list[np.ndarray]]] = []
    shortest = min(len(c.tail) for c in chains)
    for step in range(shortest):
        kinds = sorted({c.tail[step].op for c in chains})
        if len(kinds) > 1:
            return planned, "where the branches differ (" + " vs ".join(kinds) + ")"
        tails = [_read_tail(index, c.tail[step], c.channel_axis, c.rank, channels) for c in chains]
        reason = next((t for t in tails if isinstance(t, str)), None)
        if reason is not None:
            return planned, f"{kinds[0]} ({reason})"
        params = plan_tail(kinds[0], [t.config for t in tails], [t.params for t in tails], tails[0].param_axes)
        if isinstance(params, Refusal):
            return planned, f"{kinds[0]} ({params.reason})"
        planned.append((tails[0], params))
    if any(len(c.tail) != shortest for c in chains):
        return planned, "the end of the shortest branch"
    return planned, None


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


def _read_tail(index: g.GraphIndex, node, channel_axis: int, rank: int, channels: int) -> _Tail | str:
    """Read ``node`` as a channel-wise op of a branch with ``channels`` channels, or say why not."""
    config = g.attr_values(node)
    if node.op in TAIL_OPS:
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
        if any(p is None or p.shape != (channels,) for p in params):
            return f"{node.op} parameters are not constant per-channel vectors"
        return _Tail(node, 0, config, params, [1, 2, 3, 4], [0, 0, 0, 0])
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
    if constant.ndim > rank:
        return f"{node.op} constant of rank {constant.ndim} broadcasts the branch"
    axis = channel_axis - (rank - constant.ndim)  # numpy broadcasting aligns on the right
    if axis >= 0 and constant.shape[axis] not in (1, channels):
        return f"{node.op} constant of shape {list(constant.shape)} is not per-channel"
    per_channel = axis >= 0 and constant.shape[axis] == channels and channels > 1
    config.update(constant_side=1 - data_index,
                  constant_shape=tuple(d if i != axis else -1 for i, d in enumerate(constant.shape)))
    return _Tail(node, data_index, config, [constant], [1 - data_index], [axis if per_channel else None])


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


def _branch_convs(index: g.GraphIndex, concat) -> list[node_def_pb2.NodeDef]:
    count = concat.attr["N"].i
    chains = [_walk_to_conv(index, ref) for ref in concat.input[:count]]
    return [c.conv for c in chains if c is not None]


def _read_channels(index: g.GraphIndex, ref: str, channel_axis: int, channels: int | None = None, *,
                   rank: int = 4) -> _Read | None:
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
        return _Read(node, source, axis[0], start, start + width if width is not None else None)
    if node.op == "SplitV":
        sizes, axis = index.const_ints(node.input[1]), index.const_ints(node.input[2])
        source = index.skip_identity(node.input[0])
        if sizes is None or axis is None:
            return None
        if -1 in sizes:
            if channels is None:
                return _Read(node, source, axis[0], None, None)
            sizes[sizes.index(-1)] = channels - (sum(sizes) + 1)
        start = sum(sizes[:output])
        return _Read(node, source, axis[0], start, start + sizes[output])
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
            return _Read(node, source, axis, start, stop)  # slices another axis: not a channel read
    start, stop = spans[channel_axis]
    dim = shape[channel_axis]
    if stop is None or (dim is not None and stop > dim):
        stop = dim
    return _Read(node, source, channel_axis, start, stop)


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
