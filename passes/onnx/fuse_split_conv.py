"""Fuse hand-made grouped convolutions into native grouped ones.

    x → Split|Slice_i(axis=1) → Conv_i → tails_i → Concat(axis=1)  ⇒  x → Conv(group=N) → tails

The same pass fuses what real exporters write around that core:

- Slice bounds computed from ``Shape`` (PyTorch's ``torch.chunk``): folded, just for the match;
- tf2onnx's NHWC layout: ``Slice(axis=3) → Transpose(0,3,1,2) → Conv`` per branch, the Concat
  before or after the Transpose back: one Transpose in front of the fused Conv, never more;
- per-branch channel-wise tails (BatchNormalization, Relu, Clip, Add/Mul of a per-channel
  constant...), also of several ops (SiLU as ``Mul(y, Sigmoid(y))``, GELU in its erf and tanh
  forms, Mish: any graph of elementwise ops that reads only its branch and constants): applied
  once, their parameters concatenated; where branches stop agreeing, the fused part is split
  back and the rest stays per branch;
- chains of several convolutions per branch (ResNeXt, fig. 3): each layer becomes one grouped
  Conv; branches that all read the *same* tensor start with one wide Conv (forms a/b → c);
- ConvTranspose branches (weights ``[I, O/g, k...]``), depthwise (C branches of one channel).

The matcher starts at each Concat (onnxscript's pattern rules cannot match a variable number of
branches) and walks each input back to where the branch starts. The branches are then planned
step by step by ``gconv_rewrite.plan.plan_chain``, the walk every format shares, which owns the rules,
the words of every refusal and the weight arithmetic; this pass only reads each step of every
branch for it (``_read_step``: a conv layer, a channel-wise tail, a tail graph) and builds what
the plan says.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import onnx_ir as ir

from gconv_rewrite.candidate import ChannelRead, NotACandidate, Refused
from gconv_rewrite.passes.onnx import _graph as g
from gconv_rewrite.passes.onnx import _qdq
from gconv_rewrite.passes.onnx._fold import channels_of, fold_explained, fold_many
from gconv_rewrite.passes.onnx._tails import (
    BINARY_OPS,
    UNARY_OPS,
    TailGraph,
    TailOp,
    find_tail_graph,
    moved_axis,
    read_tail,
    read_tail_graph,
)
from gconv_rewrite.plan import (
    Branch,
    ConvLayer,
    FusionPlan,
    Refusal,
    TailGraphLayer,
    TailLayer,
    channel_ranges_refusal,
    plan_chain,
    plan_fusion,
    settings_refusal,
    tail_refusal,
)
from gconv_rewrite.report import Rewrite, Skip
from gconv_rewrite.targets import ConvProps, Decision

CONV_OPS = ("Conv", "ConvTranspose")
CHAIN_OPS = set(CONV_OPS) | UNARY_OPS | BINARY_OPS | {"BatchNormalization", "Clip", "Transpose"}
READERS = ("Split", "Slice")


@dataclass
class _Chain:
    """One branch: the value it starts from and its ops, in order, up to the Concat (a multi-op
    tail stands in the list as one ``TailGraph``)."""

    entry: ir.Value
    ops: list[ir.Node | TailGraph]
    read: ChannelRead | None = None  # None: the branch reads ``entry`` whole (shared input)
    used_outside: ir.Value | None = None  # a value after the last conv that something else reads too


@dataclass
class _Fused:
    """What the fused part of a candidate becomes: new nodes, and where the branches stop."""

    nodes: list[ir.Node] = field(default_factory=list)
    output: ir.Value | None = None
    channel_axis: int = 1
    groups: int = 0
    in_channels: int = 0
    out_channels: int = 0
    length: int = 0  # how many ops of each chain are fused
    branch_channels: list[int] = field(default_factory=list)
    stopped_because: str | None = None  # where and why the branches stop agreeing
    stopped_code: str = ""  # the code of why (gconv_rewrite.reasons)
    complete: bool = False  # every op of every branch fused: the result replaces the Concat
    location: str = ""  # the fused node that stands for the pattern in reports
    location_is_grouped: bool = False
    initializers: list[ir.Value] = field(default_factory=list)  # registered only when emitted
    convs: list[ir.Node] = field(default_factory=list)  # the fused convolutions among ``nodes``
    layers: list[ConvProps] = field(default_factory=list)  # each fused conv layer, for an ``accept`` hook

    def constant(self, name: str, array: np.ndarray) -> ir.Value:
        # Type and shape come from the tensor; setting them on the value would add value_info.
        value = ir.Value(name=name, const_value=ir.Tensor(np.asarray(array, order="C"), name=name))
        self.initializers.append(value)
        return value


@dataclass
class _Walk:
    """Where the fused walk along the branches stands: the value the next fused op reads, the
    channel axis there, each branch's channel count (None: the branches read the source whole),
    the rank once a conv or Transpose tells it, and how many conv layers fused so far."""

    current: ir.Value | None  # None while planning: only the builder makes values
    axis: int
    branch_channels: list[int] | None
    rank: int | None = None
    conv_layers: int = 0


@dataclass
class _StepRead:
    """What reading one step of every branch found, for the builder: where the walk stands after
    the step, and the step's own reading (a conv step's quantization, a tail's op as branch 0
    has it, a tail graph's ops as branch 0 has them)."""

    after: _Walk
    quantization: dict | None = None
    tail: TailOp | None = None
    graph_ops: list[TailOp] | None = None


class FuseSplitConvPass(ir.passes.InPlacePass):
    """Rewrite every fusable branch structure joined by a Concat; record rewrites and skips.

    ``accept(props) -> (ok, rule)``, when given, is asked about every grouped conv a candidate
    would become (``--target``): a candidate with one refused layer stays as it is, reported as a
    skip with the rule as its reason; each judged candidate is also listed in ``decisions``."""

    def __init__(self, *, rewrite: bool = True, accept: Callable[[ConvProps], tuple[bool, str]] | None = None):
        super().__init__()
        self.rewrite = rewrite  # False: only find and plan (for --check / --dry-run)
        self.accept = accept
        self.decisions: list[Decision] = []  # per judged candidate
        self.created: list[ir.Node] = []  # every conv this pass wrote (a later expand pass leaves them)
        self.rewrites: list[Rewrite] = []
        self.skipped: list[Skip] = []
        self.fused_convs: list[ir.Node] = []  # what onnx.fold-batchnorm may fold into

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        # Before IR 4 every initializer is listed as a graph input, yet the runtime holds it constant.
        with g.initializers_as_constants(model):
            return self._rewrite_model(model)

    def _rewrite_model(self, model: ir.Model) -> ir.passes.PassResult:
        modified = False
        for graph in model.graphs():
            modified |= self._fuse_graph(model, graph)
        # Local functions too: their bodies run wherever the model calls them.
        for function in model.functions.values():
            for graph in function.graph.subgraphs():
                modified |= self._fuse_graph(model, graph, f"function {function.name}")
            modified |= self._fuse_graph(model, function.graph, f"function {function.name}")
        return ir.passes.PassResult(model, modified)

    def _fuse_graph(self, model: ir.Model, graph: ir.Graph, label: str | None = None) -> bool:
        names = g.Names(graph)
        position = {id(node): i for i, node in enumerate(graph)}
        modified = False
        self._in_function = label is not None
        if label is None:
            label = "" if graph is model.graph else (graph.name or "subgraph")
        for concat in [n for n in graph if n.op_type == "Concat" and n.domain in ("", "ai.onnx")]:
            location = concat.name or concat.outputs[0].name or "Concat"
            try:
                chains = self._match(model, concat)
                fused = self._plan_and_build(model, graph, names, concat, chains)
            except NotACandidate:
                # Never silence where the Concat looks like hand-made groups all the same.
                reason = _unmatched_group_reason(concat)
                if reason is not None:
                    self.skipped.append(Skip(location, reason, _split_read_convs(concat), label,
                                             code="unmatched-branches"))
                continue
            except Refused as refusal:
                convs = [g.node_label(n) for v in concat.inputs if v is not None
                         for n in [v.producer()] if n is not None and n.op_type in CONV_OPS]
                self.skipped.append(Skip.refused(location, refusal, convs, label))
                continue
            if _combines_without_groups(chains, fused):
                continue  # native structure (parallel branches of different widths): nothing to report
            verdict = self._judge(fused)
            if verdict is not None and not verdict[0]:
                convs = [g.node_label(op) for c in chains for op in c.ops if op.op_type in CONV_OPS]
                self.skipped.append(Skip(location, verdict[1], convs, label, code="target-keeps"))
                self.decisions.append(Decision(location=location, graph=label, form="split", action="keep",
                                               rule=verdict[1]))
                continue
            if verdict is not None:
                self.decisions.append(Decision(location=fused.location, graph=label, form="native",
                                               action="fuse", rule=verdict[1]))
            readers = list(dict.fromkeys(c.read.reader for c in chains if c.read is not None))
            replaced = readers + _nodes_of([op for c in chains for op in c.ops[:fused.length]])
            if fused.complete:
                replaced.append(concat)
            kind = "fuse-split-conv" if chains[0].read is not None else "fuse-parallel-branches"
            self.rewrites.append(Rewrite(
                kind=kind, location=fused.location, groups=fused.groups,
                channels={"in": fused.in_channels, "out": fused.out_channels},
                nodes=[g.node_label(n) for n in replaced], graph=label,
                # The Concat's output stands in both models, whether the fusion is complete or splits back.
                boundary=[{"tensor": concat.outputs[0].name}]))
            if not fused.complete:
                self.skipped.append(Skip(location, f"fused up to {fused.stopped_because}; "
                                     "the rest stays per branch", [], label, code=fused.stopped_code))
            if self.rewrite:
                self._emit(graph, position, concat, chains, readers, fused)
                self.created.extend(fused.convs)
                # What followed the Concat (a legacy export's BatchNormalization) may fold into the
                # fused conv; tails the branches applied themselves stay as the user wrote them.
                if fused.complete and fused.convs and fused.convs[-1] is fused.nodes[-1]:
                    self.fused_convs.append(fused.convs[-1])
                modified = True
        return modified

    def _judge(self, fused: _Fused) -> tuple[bool, str] | None:
        """The ``accept`` hook's verdict on the grouped layers of a candidate: the first refusal,
        or acceptance with the rules that accepted; None without a hook or a grouped layer."""
        if self.accept is None:
            return None
        verdicts = [self.accept(layer) for layer in fused.layers if layer.groups > 1]
        if not verdicts:
            return None
        refused = next((v for v in verdicts if not v[0]), None)
        return refused or (True, "; ".join(dict.fromkeys(rule for _, rule in verdicts)))

    # -- matching ----------------------------------------------------------------------------

    def _match(self, model: ir.Model, concat: ir.Node) -> list[_Chain]:
        chains = [_walk_back(v) if v is not None else None for v in concat.inputs]
        with_conv = [c for c in chains if c is not None and any(op.op_type in CONV_OPS for op in c.ops)]
        reached = [id(op) for c in with_conv if c.used_outside is not None for op in c.ops if op.op_type in CONV_OPS]
        others = {id(op) for c in with_conv if c.used_outside is None for op in c.ops}
        if len(set(reached)) != len(reached) or others.intersection(reached):
            raise NotACandidate  # one conv read twice (Relu(y), Sigmoid(y)): not parallel branches
        read = [c for c in with_conv if _is_reader_output(c.entry)]
        shared = {}
        for c in with_conv:
            shared.setdefault(id(c.entry), []).append(c)
        if len(read) < 2 and max((len(v) for v in shared.values()), default=0) < 2:
            raise NotACandidate
        if len(with_conv) != len(chains):
            raise Refused("concat-extra-inputs", "the Concat also joins inputs that are not branch convolutions")
        # What the branch convolutions do differently is the cause a user can act on; how the
        # branches are wired (a value read outside the Concat, different inputs) comes after it.
        structural = _structural_refusal([next(op for op in c.ops if op.op_type in CONV_OPS) for c in chains], None)
        if structural is not None:
            entries = list(dict.fromkeys(c.entry.name or "an unnamed tensor" for c in chains))
            wiring = "" if len(entries) == 1 or all(_is_reader_output(c.entry) for c in chains) else \
                f"; and the branches read different tensors ({', '.join(entries)})"
            raise Refused(structural.with_reason(structural.reason + wiring))
        for value in concat.inputs:
            if concat.inputs.count(value) > 1:
                raise Refused("concat-twice", f"the Concat reads branch output {value.name} {concat.inputs.count(value)} times")
            if value.is_graph_output() or len(value.uses()) != 1:
                raise Refused("used-outside", f"branch output {value.name} is used outside the Concat")
        for chain in chains:
            if chain.used_outside is not None:
                raise Refused("used-outside", f"branch value {chain.used_outside.name} is used outside the Concat")
        if len({id(v) for v in concat.inputs}) != len(concat.inputs):
            raise Refused("concat-twice", "a branch is concatenated twice")
        reading = [_is_reader_output(c.entry) for c in chains]
        shared = not any(reading) and len({id(c.entry) for c in chains}) == 1
        for chain, reads in zip(chains, reading):
            # The walk stops early where a branch value has other users than the next op.
            start = chain.entry.producer()
            if not reads and not shared and start is not None and start.op_type in CHAIN_OPS:
                raise Refused("used-outside", f"branch value {chain.entry.name} is used outside the Concat")
            first = next(i for i, op in enumerate(chain.ops) if op.op_type in CONV_OPS)
            if any(op.op_type != "Transpose" for op in chain.ops[:first]):
                before = next(op.op_type for op in chain.ops[:first] if op.op_type != "Transpose")
                raise Refused("op-before-conv", f"a branch applies {before} before its convolution")
        if any(reading) and not all(reading):
            raise Refused("mixed-readers", "some branches read a Split/Slice, others do not")
        if not any(reading) and not shared:
            raise Refused("different-sources", "branches read from different tensors")
        if all(reading):
            self._read_ranges(model, chains)
        return chains

    def _read_ranges(self, model: ir.Model, chains: list[_Chain]) -> None:
        for chain in chains:
            _check_read_only_by_branches(chain)
        first_reader = chains[0].entry.producer()
        source = first_reader.inputs[0]
        convs = [next(op for op in c.ops if op.op_type in CONV_OPS) for c in chains]
        weights = [_weight(conv) for conv in convs]
        widths = [_in_channels(conv, w) for conv, w in zip(convs, weights)]
        # Only a Transpose *before* the conv moves the axis the reader slices; one after it
        # (Conv → Transpose(0,2,3,1) → Concat(axis=3)) says nothing about the reader.
        pre_perms = [[g.attr_ints(op, "perm") for op in _before_conv(c.ops) if op.op_type == "Transpose"][:1]
                     for c in chains]
        # The channel axis as the reader sees it: 1, or moved by a per-branch layout Transpose.
        reader_axis = pre_perms[0][0][1] if pre_perms[0] and pre_perms[0][0] else 1
        channels = g.static_dim(source, reader_axis)
        if channels is None and reader_axis == 1:
            channels = channels_of(source)
        if channels is None and first_reader.op_type == "Split" and None not in widths:
            channels = sum(widths)  # a Split hands out all its channels
        # Slice bounds computed at run time (PyTorch's torch.chunk): fold them all in one go.
        bounds = [v for c in chains for v in list(c.entry.producer().inputs)[1:] if v is not None]
        explained = fold_explained(bounds, model)
        values = [f.array for f in explained]
        if (channels is None and None not in widths and any(v is None for v in values)
                and not source.is_graph_input() and first_reader.op_type == "Slice"):
            values, channels = self._fold_with_tiling_channels(model, chains, source, bounds, widths, weights)
        # A bound that did not fold carries why (a dynamic dim, a graph input) into the reason.
        folded = {id(v): array if array is not None else f.reason for v, array, f in zip(bounds, values, explained)}
        for chain in chains:
            try:
                chain.read = g.read_channels(chain.entry, model, channels, fold=lambda v: folded.get(id(v)))
            except g.UnreadableRange as exc:
                raise Refused(exc.refusal) from None
        reads = [c.read for c in chains]
        if len({id(r.source) for r in reads}) != 1:
            raise Refused("different-sources", "branches read from different tensors")
        if len({r.reader.op_type for r in reads}) > 1:
            raise Refused("mixed-readers", "branches mix Split and Slice")
        if reads[0].reader.op_type == "Split":
            if len({id(r.reader) for r in reads}) != 1:
                raise Refused("mixed-readers", "branches read from different Split nodes")
            if len(reads[0].reader.outputs) != len(chains):
                raise Refused("mixed-readers", f"Split has {len(reads[0].reader.outputs)} outputs but only {len(chains)} "
                               "feed the Concat")
        rank = weights[0].ndim if weights[0] is not None else None
        for read, width in zip(reads, widths):
            if read.start is None:
                raise Refused("not-constant", "cannot tell the Split sizes (computed at run time)")
            if rank is not None and read.axis % rank != reader_axis:
                raise Refused("not-channel-axis", f"{read.reader.op_type} on axis {read.axis}, not the channel axis")
            if rank is not None:
                read.axis %= rank
            if read.open_end and width is not None:
                read.stop = read.start + width
            if channels is None and read.open_end:
                channels = read.stop
        self._source_channels = channels

    def _fold_with_tiling_channels(self, model, chains, source, bounds, widths, weights):
        """The source's channel count is recorded nowhere (it comes out of a run-time Reshape, as
        after ShuffleNet's channel shuffle), but the branch convs fix how many channels each
        slice must hold. Fold the bounds with the count that makes them tile; it is proven only
        if no other count would give the convs their widths too (then every run that works at
        all has this count). The plan checks the tiling; verification runs the model."""
        rank = next(w.ndim for w in weights if w is not None)
        hypothesis = sum(widths)

        def fold_at(channels: int):
            values = fold_many(bounds, model, known_shapes={id(source): (rank, channels)})
            return values, self._slice_widths(model, chains, values, channels)

        values, fitting = fold_at(hypothesis)
        if fitting != widths:
            return values, hypothesis  # the plan will say why these bounds do not fit
        for other in (hypothesis + 1, hypothesis + widths[0], 2 * hypothesis, max(hypothesis - 1, 1)):
            if fold_at(other)[1] == widths:
                return [None] * len(bounds), None  # other counts fit as well: not provable
        return values, hypothesis

    @staticmethod
    def _slice_widths(model, chains, values, channels: int) -> list[int] | None:
        folded = {id(v): array for v, array in zip(
            [v for c in chains for v in list(c.entry.producer().inputs)[1:] if v is not None], values)}
        try:
            reads = [g.read_channels(c.entry, model, channels, fold=lambda v: folded.get(id(v))) for c in chains]
        except g.UnreadableRange:
            return None
        if any(r is None or r.start is None or r.stop is None for r in reads):
            return None
        return [r.stop - r.start for r in reads]

    # -- planning (gconv_rewrite.plan.plan_chain, with this format's readers) ----------------------

    def _plan_and_build(self, model, graph, names: g.Names, concat: ir.Node, chains: list[_Chain]) -> _Fused:
        """Plan the chains step by step with ``plan_chain`` (this pass reads each step of every
        branch: ``_read_step``), then build the fused nodes as far as the branches agree. Raises
        Refused if not even the first conv fuses."""
        reading = chains[0].read is not None
        start = _Walk(current=chains[0].read.source if reading else chains[0].entry,
                      axis=chains[0].read.axis if reading else 1,
                      branch_channels=[r.stop - r.start for r in (c.read for c in chains)] if reading else None)
        reads: list[_StepRead] = []  # what each step read, and where the walk stands after it
        plan = plan_chain([[op.op_type for op in c.ops] for c in chains],
                          functools.partial(self._read_step, model, chains, start, reads),
                          self._source_channels if reading else None,
                          conv_kinds=CONV_OPS, shared_input=not reading, stack_axis=0,
                          # The arithmetic by this module's name for it, read at each call: tests
                          # corrupt it to prove that verification catches a wrong rewrite.
                          fuse=plan_fusion)
        if isinstance(plan, Refusal):
            raise Refused(plan)
        fused = _Fused(length=len(plan.steps), stopped_because=plan.stopped, stopped_code=plan.stopped_code or "")
        current = start.current
        for step, outcome in enumerate(plan.steps):
            new_nodes = self._build_step(names, chains, step, outcome, reads[step], fused, current)
            fused.nodes.extend(new_nodes)
            current = new_nodes[-1].outputs[0]
        walk = reads[len(plan.steps) - 1].after
        walk.current = current
        self._finish(model, graph, names, concat, chains, fused, walk)
        return fused

    def _read_step(self, model, chains: list[_Chain], start: _Walk, reads: list[_StepRead], step: int,
                   _branch_channels: list[int] | None) -> ConvLayer | TailLayer | TailGraphLayer | Refusal:
        """Step ``step`` of every branch as ``plan_chain`` reads it; records what the builder needs
        (``reads[step]``). ``plan_chain`` reads the steps in order, each once."""
        before = reads[step - 1].after if step else start
        ops = [c.ops[step] for c in chains]
        if ops[0].op_type in CONV_OPS:
            layer, read = self._read_conv_step(ops, chains, before)
        elif isinstance(ops[0], TailGraph):
            layer, read = self._read_tail_graph_step(model, ops, before)
        else:
            layer, read = self._read_tail_step(model, chains, step, ops, before)
        if read is not None:
            reads.append(read)
        return layer

    def _read_conv_step(self, convs: list[ir.Node], chains: list[_Chain], before: _Walk):
        """The branches' convs at this step as a ``ConvLayer`` (and the walk after them)."""
        layer = self._read_conv(convs, chains, before.conv_layers, before.axis)
        if isinstance(layer, Refusal):
            return layer, None
        quantization, layer = layer
        after = _Walk(None, axis=1, branch_channels=[b.out_channels for b in layer.branches],
                      rank=layer.branches[0].weight.ndim, conv_layers=before.conv_layers + 1)
        return layer, _StepRead(after, quantization=quantization)

    def _read_tail_step(self, model, chains: list[_Chain], step: int, ops: list[ir.Node], before: _Walk):
        """One channel-wise op per branch as a ``TailLayer`` (its parameters, to concatenate)."""
        kind = ops[0].op_type
        rank = before.rank if before.rank is not None or kind != "Transpose" else len(g.attr_ints(ops[0], "perm") or [])
        tails = []
        for op, chain, channels in zip(ops, chains, before.branch_channels or [None] * len(chains)):
            data = chain.entry if step == 0 else chain.ops[step - 1].outputs[0]
            tail = read_tail(op, data, before.axis, rank or 4, channels or 0, model)
            if isinstance(tail, str):
                return tail_refusal(tail), None
            tails.append(tail)
        after = _Walk(None, moved_axis(tails[0], before.axis), before.branch_channels, rank, before.conv_layers)
        layer = TailLayer(kind, [t.config for t in tails], [t.params for t in tails], tails[0].param_axes)
        return layer, _StepRead(after, tail=tails[0])

    def _read_tail_graph_step(self, model, graphs: list[TailGraph], before: _Walk):
        """A multi-op tail (SiLU, GELU, Mish...) of every branch as a ``TailGraphLayer``."""
        branch_ops = []
        for graph, channels in zip(graphs, before.branch_channels or [None] * len(graphs)):
            ops = read_tail_graph(graph, before.axis, before.rank or 4, channels or 0, model)
            if isinstance(ops, str):
                return tail_refusal(ops), None
            branch_ops.append(ops)
        layer = TailGraphLayer(graphs[0].op_type, [graph.wiring() for graph in graphs], [
            TailLayer(same[0].kind, [op.config for op in same], [op.params for op in same], same[0].param_axes)
            for same in zip(*branch_ops)])
        after = _Walk(None, before.axis, before.branch_channels, before.rank, before.conv_layers)
        return layer, _StepRead(after, graph_ops=branch_ops[0])

    # -- building ------------------------------------------------------------------------------

    def _build_step(self, names: g.Names, chains: list[_Chain], step: int, outcome, read: _StepRead, fused: _Fused,
                    current: ir.Value) -> list[ir.Node]:
        """The fused node(s) for a planned step, reading ``current``."""
        ops = [c.ops[step] for c in chains]
        if isinstance(outcome, FusionPlan):
            return [self._build_conv(names, ops, outcome, read, fused, current)]
        if isinstance(ops[0], TailGraph):
            return self._build_tail_graph(names, ops[0], read.graph_ops, outcome, fused, current)
        return [self._build_tail(fused, names, read.tail, current, outcome)]

    def _build_conv(self, names: g.Names, ops: list[ir.Node], plan: FusionPlan, read: _StepRead, fused: _Fused,
                    current: ir.Value) -> ir.Node:
        """One grouped (or, for a shared input, wide) conv for the branches' convs at this step."""
        kind = ops[0].op_type
        if not fused.convs:
            fused.in_channels = plan.in_channels
            # Shared input: the wide conv (group 1) until a grouped layer follows; the
            # report must not say "groups=0" when the wide conv is all that fuses.
            fused.groups = plan.groups
        elif fused.groups <= 1:
            fused.groups = plan.groups
        fused.out_channels = plan.out_channels
        fused.layers.append(ConvProps(groups=plan.groups, in_channels=plan.in_channels,
                                      out_channels=plan.out_channels, kernel_rank=plan.weight.ndim - 2,
                                      transposed=kind == "ConvTranspose"))
        base = ops[0].name or kind
        name = names.node(f"{base}_group{plan.groups}" if plan.groups > 1 else f"{base}_wide")
        inputs = [current, fused.constant(names.value(f"{name}.weight"), plan.weight)]
        if plan.bias is not None:
            inputs.append(fused.constant(names.value(f"{name}.bias"), plan.bias))
        for index, role in ((1, "weight"), (2, "bias")):
            parts = read.quantization[role]
            if parts is not None:  # QDQ: the stacked integers, dequantized as the branches were
                inputs[index] = _dequantize(fused, names, f"{name}.{role}", inputs[index], parts)
        node = _clone_with(ops[0], inputs, name, group=plan.groups)
        fused.convs.append(node)
        # Reports point at the first grouped conv (the wide one if none is grouped).
        if not fused.location or (plan.groups > 1 and not fused.location_is_grouped):
            fused.location, fused.location_is_grouped = name, plan.groups > 1
        return node

    def _build_tail_graph(self, names: g.Names, graph: TailGraph, ops: list[TailOp], params, fused: _Fused,
                          current: ir.Value) -> list[ir.Node]:
        """Branch 0's tail graph rebuilt on the fused tensor, each op's parameters concatenated."""
        built: dict[int, ir.Node] = {}  # branch 0's node → its fused copy
        for op, op_params in zip(ops, params):
            wired = {}
            for index, value in enumerate(op.node.inputs):
                producer = value.producer() if value is not None else None
                if value is graph.input:
                    wired[index] = current
                elif producer is not None and id(producer) in built:
                    wired[index] = built[id(producer)].outputs[value.index()]
            built[id(op.node)] = self._build_tail(fused, names, op, current, op_params, wired)
        return list(built.values())

    def _finish(self, model, graph, names: g.Names, concat: ir.Node, chains: list[_Chain], fused: _Fused,
                walk: _Walk) -> None:
        """Record where the fused part ends; if it is not the whole of every branch, split the
        fused tensor back into the branches' parts there (else the Concat must be on its axis)."""
        fused.output = walk.current
        fused.channel_axis = walk.axis
        fused.branch_channels = walk.branch_channels or []
        fused.complete = all(len(c.ops) == fused.length for c in chains)
        if fused.complete:
            concat_axis = g.attr_int(concat, "axis", 1)
            if walk.rank is not None and concat_axis % walk.rank != walk.axis:
                raise Refused("not-channel-axis", f"Concat on axis {concat_axis}, not the channel axis")
        else:
            fused.nodes.append(self._split_back(model, graph, names, fused))

    def _read_conv(self, convs: list[ir.Node], chains: list[_Chain], layer: int,
                   axis: int) -> tuple[dict, ConvLayer] | Refusal:
        """The convs of one step as ``gconv_rewrite.plan`` reads them (a first layer reads its channel
        range of the source, or all of it; a later one ``0:`` its input width, placed by
        ``plan_chain``), with their quantization; or why they cannot be read."""
        # Why a near miss is one: what the branches do differently comes before whether their
        # values are constants, so that the reason names the real cause.
        structural = _structural_refusal(convs, chains if layer == 0 else None)
        if structural is not None:
            return structural
        quantized = _read_quantization(convs)
        if isinstance(quantized, Refusal):
            return quantized
        branches = []
        for i, (conv, chain) in enumerate(zip(convs, chains)):
            weight = _weight(conv)
            if weight is None:
                return Refusal("not-constant", f"weights of {conv.name or 'a branch ' + conv.op_type} "
                               f"{g.not_constant_reason(conv.inputs[1])}")
            if g.is_replaceable(conv.inputs[1]):
                overridden = g.overridable_input(conv.inputs[1]) or conv.inputs[1].name
                return Refusal("overridable-input", f"weights of {conv.name or 'a branch ' + conv.op_type} read "
                               f"'{overridden}', {g.GRAPH_INPUT}")
            bias = None
            if len(conv.inputs) > 2 and conv.inputs[2] is not None:
                bias = g.const_array(conv.inputs[2]) if quantized["bias"] is None else quantized["bias"][i].data
                if bias is None or g.is_replaceable(conv.inputs[2]):
                    return Refusal("not-constant", f"bias of {conv.name or 'a branch ' + conv.op_type} is not a constant")
            channel_start, channel_stop = 0, _in_channels(conv, weight)
            if layer == 0 and chain.read is not None:
                if axis != 1:
                    return Refusal("not-channel-axis",
                                   f"the sliced axis {chain.read.axis} is not the channel axis of {conv.name}")
                channel_start, channel_stop = chain.read.start, chain.read.stop
                if channel_stop - channel_start != _in_channels(conv, weight):
                    return Refusal("width-mismatch", f"{conv.name} reads {channel_stop - channel_start} channels but "
                                   f"its weight expects {_in_channels(conv, weight)}")
            branches.append(Branch(
                name=conv.name or "", channel_start=channel_start, channel_stop=channel_stop, weight=weight,
                bias=bias, groups=g.attr_int(conv, "group", 1), out_channels=_out_channels(conv),
                attributes=g.conv_shape_attributes(conv, weight.ndim - 2)))
        if layer == 0 and chains[0].read is None and convs[0].op_type != "Conv":
            return Refusal("unsupported-form", "branches that read the whole input must be Conv, not ConvTranspose")
        return quantized, ConvLayer(branches)

    def _build_tail(self, fused: _Fused, names: g.Names, tail: TailOp, current: ir.Value, params,
                    wired: dict[int, ir.Value] | None = None) -> ir.Node:
        """The tail op once, reading ``current`` (or, inside a tail graph, the fused values
        ``wired`` gives by input index), its per-channel parameters concatenated."""
        wired = {tail.data_index: current} if wired is None else wired
        inputs = list(tail.node.inputs)
        for index, value in wired.items():
            inputs[index] = value
        for index, array, axis in zip(tail.param_inputs, params, tail.param_axes):
            if axis is not None:  # per-channel: the concatenation; else the branches' shared constant
                inputs[index] = fused.constant(names.value(f"{tail.node.name or tail.kind}_fused.param{index}"), array)
        for index, value in enumerate(inputs):
            # A shared constant kept as is (Clip bounds, a scalar) may come from a Constant node
            # that exporters place inside branch 0, after where the fused nodes go: the fused
            # node would read it before it exists. Copy it into an initializer instead.
            if index not in wired and value is not None and value.producer() is not None:
                array = g.const_array(value)
                inputs[index] = fused.constant(names.value(f"{tail.node.name or tail.kind}_fused.input{index}"), array)
        name = names.node(f"{tail.node.name or tail.kind}_fused")
        return _clone_with(tail.node, inputs, name)

    def _split_back(self, model, graph, names: g.Names, fused: _Fused) -> ir.Node:
        """Where branches stop agreeing: split the fused tensor back into the branches' parts
        (sizes as an attribute before opset 13, as an input from 13)."""
        name = names.node(f"{fused.location}_split_back")
        attributes = [ir.AttrInt64("axis", fused.channel_axis)]
        inputs = [fused.output]
        if model.opset_imports.get("", 13) < 13:
            attributes.append(ir.AttrInt64s("split", fused.branch_channels))
        else:
            inputs.append(fused.constant(names.value(f"{name}.split"), np.array(fused.branch_channels, np.int64)))
        return ir.Node("", "Split", inputs, attributes, num_outputs=len(fused.branch_channels), name=name)

    # -- emitting ----------------------------------------------------------------------------

    def _emit(self, graph: ir.Graph, position: dict[int, int], concat: ir.Node, chains: list[_Chain],
              readers: list[ir.Node], fused: _Fused) -> None:
        branch_ops = _nodes_of([op for c in chains for op in c.ops[:fused.length]])
        # A reader another group's convs still read stays until that group is fused too.
        replaced = {id(op) for op in branch_ops}
        old_nodes = [r for r in readers if all(id(use.node) in replaced for out in r.outputs for use in out.uses())] \
            + branch_ops
        # In front of the first node of the structure: the source is ready there, and every
        # node that reads the fused result comes later.
        first = min(old_nodes, key=lambda node: position.get(id(node), len(position)))
        graph.insert_before(first, fused.nodes)
        g.add_constants(graph, fused.initializers, as_nodes=self._in_function)
        old_inputs = [v for node in old_nodes for v in node.inputs]
        if fused.complete:
            old_output = concat.outputs[0]
            new_output = fused.output
            # The fused output takes the Concat output's place: name, type, shape, graph-output role.
            name = old_output.name
            old_output.name = None
            new_output.name, new_output.type, new_output.shape = name, old_output.type, old_output.shape
            ir.convenience.replace_all_uses_with(old_output, new_output, replace_graph_outputs=True)
            old_nodes.append(concat)
            old_inputs.extend(concat.inputs)
        else:
            split = fused.nodes[-1]
            for chain, part in zip(chains, split.outputs):
                cut = chain.ops[fused.length - 1].outputs[0]  # what each branch's rest reads
                for use in list(cut.uses()):
                    use.node.replace_input_with(use.idx, part)
        graph.remove(old_nodes, safe=True)
        g.remove_dead_producers(graph, old_inputs)


def _read_quantization(convs: list[ir.Node]) -> dict | Refusal:
    """Which of weight and bias every branch reads through a DequantizeLinear (QDQ models):
    {"weight": [Quantized...] | None, "bias": ...}; a refusal when branches differ in that or use
    a form that does not stack exactly."""
    found = {}
    for index, role in ((1, "weight"), (2, "bias")):
        try:
            parts = [_qdq.read_quantized(conv.inputs[index]) if len(conv.inputs) > index else None
                     for conv in convs]
        except _qdq.NotExact as exc:
            return exc.refusal
        if all(p is None for p in parts):
            found[role] = None
            continue
        if any(p is None for p in parts):
            return Refusal("quantization-mismatch", f"some branches have a quantized {role} (DequantizeLinear), others not")
        if convs[0].op_type != "Conv":
            return Refusal("unsupported-form", f"quantized {convs[0].op_type} {role}s are not fused")
        try:
            _qdq.stack(parts)
        except _qdq.NotExact as exc:
            return exc.refusal
        found[role] = parts
    return found


def _dequantize(fused: _Fused, names: g.Names, name: str, data: ir.Value, parts: list) -> ir.Value:
    """A DequantizeLinear of the stacked integer ``data`` with the branches' scales and zero
    points (per tensor where they all agree, else per output channel)."""
    scale, zero_point = _qdq.stack(parts)
    inputs = [data, fused.constant(names.value(f"{name}.scale"), scale)]
    if zero_point is not None:
        inputs.append(fused.constant(names.value(f"{name}.zero_point"), zero_point))
    template = parts[0].node
    attributes = [a for key, a in template.attributes.items() if key != "axis"]
    if scale.ndim == 1:
        attributes.append(ir.AttrInt64("axis", 0))
    node = ir.Node(template.domain, "DequantizeLinear", inputs, attributes, name=names.node(f"{name}_dequantize"),
                   version=template.version)
    fused.nodes.append(node)
    return node.outputs[0]


def _structural_refusal(convs: list[ir.Node], chains: list[_Chain] | None) -> Refusal | None:
    """What the branch convolutions do differently, judged by the planner from their attributes
    and weight shapes only (no weight data): for the first layer the order and overlaps of the
    channel ranges they read, then ``plan.settings_refusal`` (group, kernel, strides, pads,
    dilations...) with the kernel judged by its spatial axes (a different channel count is the
    plan's later, more precise sentence)."""
    if chains is not None and all(c.read is not None and c.read.start is not None and c.read.stop is not None
                                  for c in chains):
        ranges = [(c.read.start, c.read.stop) for c in chains]
        if sorted(ranges) != ranges or any(b[0] < a[1] for a, b in zip(sorted(ranges), sorted(ranges)[1:])):
            refusal = channel_ranges_refusal(ranges, None)
            if refusal is not None:
                return refusal
    shapes = [g.const_shape(conv.inputs[1]) if len(conv.inputs) > 1 else None for conv in convs]
    if None in shapes:
        # Weights computed at run time have no shape to read, but the kernel attribute tells.
        kernels = [g.attr_ints(conv, "kernel_shape") for conv in convs]
        shapes = [(0, *k) for k in kernels] if None not in kernels else [(0,)] * len(convs)
        with_settings, kernel_axes = False, range(1, len(shapes[0]))
    else:
        with_settings, kernel_axes = True, range(2, len(shapes[0]))
    branches = [Branch(conv.name or "", 0, 0, np.broadcast_to(np.float32(0), shape), None,
                       g.attr_int(conv, "group", 1), 0,
                       g.conv_shape_attributes(conv, len(shape) - 2) if with_settings else {})
                for conv, shape in zip(convs, shapes)]
    return settings_refusal(branches, stack_axis=0, kernel_axes=kernel_axes)


def _combines_without_groups(chains: list[_Chain], fused: _Fused) -> bool:
    """Whether a candidate is parallel branches on one input that would only become one wide
    conv, never a grouped one: their first convs differ in width (16, 16, 12 in an RFB face
    detector), so no later layer can group them. That is network structure, not hand-made
    groups: combining it is no finding, and is not done (it is not shown to pay)."""
    if chains[0].read is not None or any(layer.groups > 1 for layer in fused.layers):
        return False
    widths = [_out_channels(next(op for op in c.ops if op.op_type in CONV_OPS)) for c in chains]
    return len(set(widths)) > 1


def _check_read_only_by_branches(chain: _Chain) -> None:
    """A branch's input (a Split or Slice output) may be read by its first op, and by branch convs of
    another group (the dynamo exporter merges equal torch.split calls: SK-ResNeXt's kernel paths),
    for which the Split stays; any other reader is outside the pattern."""
    others = [use.node for use in chain.entry.uses() if use.node is not chain.ops[0]]
    if chain.entry.is_graph_output() or any(node.op_type not in CONV_OPS for node in others) \
            or len(others) + 1 != len(chain.entry.uses()):
        raise Refused("used-outside", f"branch input {chain.entry.name} is used outside its branch")


def _walk_back(value: ir.Value) -> _Chain:
    """Follow a Concat input back through convs, channel-wise ops and Transposes, each used only
    by the next, to where its branch starts."""
    ops = []
    current = value
    used_outside = None
    readers: set[int] = set()  # the nodes of the op after ``current`` (several for a tail graph)
    while True:
        node = current.producer()
        if node is None or node.domain not in ("", "ai.onnx"):
            break
        step, data = node, _data_input(node) if node.op_type in CHAIN_OPS else None
        if data is None:
            # Not one branch tensor and constants: maybe a multi-op tail (Mul(y, Sigmoid(y))).
            step = find_tail_graph(node)
            if step is None:
                break
            data = step.input
        if current is not value and (current.is_graph_output()
                                     or any(id(use.node) not in readers for use in current.uses())):
            if any(op.op_type in CONV_OPS for op in ops):
                break  # behind a conv: where the branch starts (or a use _match reports)
            # Between the last conv and the Concat (Conv → BN ⇉ graph output → Relu): walk on, so
            # that the branch is still seen as one and refused with this reason, not skipped silently.
            if used_outside is None:
                used_outside = current
        if isinstance(step, TailGraph) and step.used_outside is not None:
            if any(op.op_type in CONV_OPS for op in ops):
                break
            used_outside = used_outside or step.used_outside
        ops.append(step)
        readers = {id(n) for n in _nodes_of([step])}
        current = data
    ops.reverse()
    return _Chain(entry=current, ops=ops, used_outside=used_outside)


# How far back from a Concat input, and from a conv to the Split/Slice it reads, the check for
# unmatched groups looks: far enough for an activation formula or a Pad, not across a network.
_TRACE_NODES = 12
_TRACE_TO_READER = 4


def _split_read_convs(concat: ir.Node) -> list[str]:
    """The convs behind a Concat's inputs that read a Split/Slice output: see
    ``_unmatched_group_reason``."""
    groups = _convs_by_split_source(concat)
    return [g.node_label(conv) for convs in groups.values() if len(convs) >= 2 for conv in convs]


def _convs_by_split_source(concat: ir.Node) -> dict[int, list[ir.Node]]:
    """The convs nearest behind each Concat input (found through any ops but convs, a few
    nodes back), by the tensor whose Split/Slice output each reads (through ops of one input)."""
    by_source: dict[int, list[ir.Node]] = {}
    for value in concat.inputs:
        pending, seen = [value] if value is not None else [], set()
        while pending and len(seen) < _TRACE_NODES:
            node = pending.pop(0).producer()
            if node is None or id(node) in seen:
                continue
            seen.add(id(node))
            if node.op_type in READERS:
                continue  # upstream of a Split/Slice is another part of the network
            if node.op_type not in CONV_OPS:
                pending.extend(v for v in node.inputs if v is not None and g.const_array(v) is None)
                continue
            source = _split_source(node.inputs[0])
            if source is not None and node not in by_source.setdefault(id(source), []):
                by_source[id(source)].append(node)
    return by_source


def _split_source(value: ir.Value | None) -> ir.Value | None:
    """The tensor a Split/Slice reads where ``value`` is one's output (or becomes ``value``
    through a few ops of one input each: a Transpose, a Pad)."""
    for _ in range(_TRACE_TO_READER):
        node = value.producer() if value is not None else None
        if node is None:
            return None
        if _is_reader_output(value):
            return node.inputs[0]
        variables = [v for v in node.inputs if v is not None and g.const_array(v) is None]
        if len(variables) != 1 or node.op_type in CONV_OPS:
            return None
        value = variables[0]
    return None


def _unmatched_group_reason(concat: ir.Node) -> str | None:
    """Why a Concat the matcher found no branches in is left alone, when it looks like hand-made
    groups all the same, else None (nothing to report).

    The rule: it looks like groups when at least two distinct convs behind its inputs (within a
    few nodes, through any ops but convs) read Split/Slice outputs of one tensor. A Concat of
    convs of different tensors (a U-Net skip), of one conv and another tensor (DenseNet), of one
    conv read twice, or of convs of one whole tensor (Inception, CSP blocks) stays silent: those
    are network structure, not groups. The reason names the first op the branch walk could not
    pass."""
    groups = _convs_by_split_source(concat)
    if not any(len(convs) >= 2 for convs in groups.values()):
        return None
    for value in concat.inputs:
        chain = _walk_back(value) if value is not None else None
        stop = chain.entry.producer() if chain is not None else None
        if chain is None or stop is None or stop.op_type in READERS:
            continue
        label = f"{stop.op_type} ({stop.name})" if stop.name else stop.op_type
        if not any(op.op_type in CONV_OPS for op in chain.ops):
            return (f"{label} after a branch convolution is not a channel-wise op of that branch alone, so "
                    "the branches cannot become one grouped convolution")
        return (f"{label} before a branch convolution: the branches do not read their channels straight from "
                "a Split or Slice")
    return "the branch convolutions are not joined by the Concat in a form this pass reads"


def _nodes_of(ops: list) -> list[ir.Node]:
    """The graph nodes of branch ops: a tail graph's nodes in its order, others as they are."""
    return [node for op in ops for node in (op.nodes if isinstance(op, TailGraph) else [op])]


def _before_conv(ops: list[ir.Node]) -> list[ir.Node]:
    return ops[:next((i for i, op in enumerate(ops) if op.op_type in CONV_OPS), len(ops))]


def _data_input(node: ir.Node) -> ir.Value | None:
    """The input that carries the branch's tensor: the only non-constant one."""
    if node.op_type in CONV_OPS or node.op_type in ("BatchNormalization", "Clip", "Transpose") \
            or node.op_type in UNARY_OPS:
        return node.inputs[0] if node.inputs else None
    variable = [v for v in node.inputs if v is not None and g.const_array(v) is None]
    return variable[0] if len(variable) == 1 else None


def _is_reader_output(value: ir.Value) -> bool:
    producer = value.producer()
    return producer is not None and producer.op_type in READERS and producer.domain in ("", "ai.onnx")


def _weight(conv: ir.Node) -> np.ndarray | None:
    """The weight as stored: a constant, or the integer data a DequantizeLinear reads (its shape
    is the weight's)."""
    if len(conv.inputs) < 2 or conv.inputs[1] is None:
        return None
    array = g.const_array(conv.inputs[1])
    if array is None:
        try:
            quantized = _qdq.read_quantized(conv.inputs[1])
        except _qdq.NotExact:
            return None
        array = quantized.data if quantized is not None else None
    return array


def _in_channels(conv: ir.Node, weight: np.ndarray | None) -> int | None:
    if weight is None:
        return None
    if conv.op_type == "ConvTranspose":
        return int(weight.shape[0])
    return int(weight.shape[1]) * g.attr_int(conv, "group", 1)


def _out_channels(conv: ir.Node) -> int:
    weight = _weight(conv)
    if conv.op_type == "ConvTranspose":
        return int(weight.shape[1]) * g.attr_int(conv, "group", 1)
    return int(weight.shape[0])


def _clone_with(node: ir.Node, inputs: list, name: str, group: int | None = None) -> ir.Node:
    attributes = [a for key, a in node.attributes.items() if not (group is not None and key == "group")]
    if group is not None and group != 1:
        attributes.append(ir.AttrInt64("group", group))
    elif group == 1 and "group" in node.attributes:
        attributes.append(ir.AttrInt64("group", 1))
    return ir.Node(node.domain, node.op_type, inputs, attributes, name=name, version=node.version,
                   doc_string=node.doc_string, metadata_props=dict(node.metadata_props))
