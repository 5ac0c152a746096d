"""Fuse hand-made grouped convolutions in a Keras functional model into grouped ``ConvND`` layers.

    x → slice_i | x whole → (Conv_i → tail_i…)+ → Concatenate  ⇒  x → Conv(groups=N | wide) → tail → Conv(groups=N) → tail…

The matcher starts at each ``Concatenate`` on the channel axis (or tf-keras's ``tf.concat``) and
walks every input back through channel-wise tail layers (BatchNormalization, Activation, ReLU…),
gates ``y · f(y)`` (SiLU, Mish: a multiply of the tensor by elementwise activations of itself) and
convolutions, each used only by the next, to where its branch starts: a channel slice of one source tensor, or (ResNeXt fig. 3
a/b) the same whole tensor for every branch. The branches are then planned layer by layer, in
step: the first convolution becomes one grouped conv (sliced) or one wide conv of stacked kernels
(shared input), every later one a grouped conv, every tail one layer with the branches' parameters
concatenated. ``gconv_rewrite.plan`` owns the rules and the weight arithmetic (``plan_chain``, layer by
layer; kernels ``[k…, I/g, O]`` stack on the last axis). Where the branches stop agreeing, the
fused tensor is split back into the branches' channels and the rest stays per branch. Late-bound
Lambda slices (one code, one closure value, several branches) are reported, and with repair
re-bound to each branch's position.
"""

from __future__ import annotations

import functools
import json
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from gconv_rewrite.candidate import NotACandidate, Refused
from gconv_rewrite.names import fresh_name
from gconv_rewrite.passes.keras import _compat, _lambdas
from gconv_rewrite.passes.keras._build import keras_name, layer_object
from gconv_rewrite.passes.keras._config import Call, KerasGraph, TensorRef, WeightStore, first_arg_count, legacy_kwargs
from gconv_rewrite.passes.keras._slices import SliceCall
from gconv_rewrite.plan import (
    BROADCAST,
    CHANNEL,
    EQUAL,
    TAIL_RULES,
    Branch,
    ChainPlan,
    ConvLayer,
    FusionPlan,
    Refusal,
    TailLayer,
    check_channel_ranges,
    plan_chain,
)
from gconv_rewrite.report import Rewrite, Skip
from gconv_rewrite.targets import ConvProps, Decision

log = logging.getLogger(__name__)

CONV_CLASSES = {"Conv1D": 1, "Conv2D": 2, "Conv3D": 3, "Convolution1D": 1, "Convolution2D": 2, "Convolution3D": 3}
# Channel-wise layers a branch may hold after a convolution → the format-free tail kind of
# gconv_rewrite.plan.TAIL_RULES (how its parameters concatenate). Dropout and noise layers are the
# identity at inference; an Activation's settings (which function) must agree like any other.
KERAS_TAIL_KINDS = {
    "BatchNormalization": "BatchNorm", "Activation": "Activation", "ReLU": "Relu", "LeakyReLU": "LeakyRelu",
    "ELU": "Elu", "ThresholdedReLU": "ThresholdedRelu", "PReLU": "PRelu",
    **{name: "Identity" for name in ("Dropout", "SpatialDropout1D", "SpatialDropout2D", "SpatialDropout3D",
                                     "GaussianNoise", "GaussianDropout", "ActivityRegularization")},
}
# Keras keeps the channels last in a layer's weights (BatchNormalization's vectors, PReLU's alpha
# [..., C]): per weight, the axis along which it is per-channel (None: equal in every branch).
_WEIGHT_AXIS = {CHANNEL: 0, BROADCAST: -1, EQUAL: None}
TAIL_CLASSES: dict[str, list[int | None]] = {
    name: [_WEIGHT_AXIS[param] for param in TAIL_RULES[kind].params] for name, kind in KERAS_TAIL_KINDS.items()}
# Activations that mix channels: per branch they normalise over that branch's channels only.
CHANNEL_MIXING = ("softmax", "log_softmax")
# Conv settings that decide the numbers; branches must agree on all of them.
CONV_SETTINGS = ("strides", "padding", "dilation_rate", "data_format", "activation", "dtype")
KIND = "keras-fuse-grouped-conv"
SHARED_KIND = "keras-fuse-parallel-branches"  # branches that read one whole tensor (ResNeXt fig. 3 a/b)
MAX_WALK = 10_000  # layers walked back from one Concatenate input, at most
# How far back from a join's input, and from a conv to the slice it reads, the check for unmatched
# groups looks: far enough for an activation formula or a padding, not across a network.
TRACE_CALLS = 12
TRACE_TO_SLICE = 4


# Multi-node channel-wise tails ``y · f(y)`` (SiLU: y·sigmoid(y); Mish: y·tanh(softplus(y))): f is
# a chain of elementwise activations of y alone. Keras ``Activation`` layers or these tf-keras
# TFOpLambda functions, then a ``Multiply`` layer or tf-keras's ``tf.math.multiply``.
GATE_TF_FUNCTIONS = ("math.sigmoid", "math.tanh", "math.softplus", "math.erf", "math.exp", "nn.relu", "nn.relu6",
                     "nn.elu", "nn.selu", "nn.softsign", "nn.silu", "nn.swish", "nn.gelu")
GATE_KIND = "Gate"  # a gate's step kind for plan_chain
MAX_GATE_CHAIN = 8  # activations between y and the multiply, at most


@dataclass
class Gate:
    """A multi-node tail ``y · f(y)`` as one branch step: ``calls`` are f's nodes from y, then the
    multiply; ``root`` is y. The multiply stands for the gate where a step is named or cut."""

    calls: list[Call]
    root: TensorRef

    @property
    def layer(self):
        return self.calls[-1].layer

    @property
    def index(self) -> int:
        return self.calls[-1].index

    @property
    def key(self) -> tuple[str, int]:
        return self.calls[-1].key

    @property
    def inputs(self) -> list[TensorRef]:
        return [self.root]


def _step_kind(step) -> str:
    return GATE_KIND if isinstance(step, Gate) else step.layer.class_name


def _step_keys(step) -> list[tuple[str, int]]:
    return [c.key for c in step.calls] if isinstance(step, Gate) else [step.key]


def _is_keras_layer(call: Call) -> bool:
    """A Keras layer, not a Keras 3 operation recorded under a layer's class name (``Multiply``)."""
    return not str(call.layer.raw.get("module") or "").startswith(_compat.OPS_MODULE_PREFIX)


# Keras 3 operations (``y * keras.ops.sigmoid(y)`` on Keras tensors) → the TF function whose
# rebuild (gconv_rewrite.passes.keras._tf_ops) makes the same operation anew.
KERAS3_GATE_OPS = {"Sigmoid": "math.sigmoid", "Tanh": "math.tanh", "Softplus": "math.softplus", "Erf": "math.erf",
                   "Exp": "math.exp", "Relu": "nn.relu", "Silu": "nn.silu", "Multiply": "math.multiply"}


def _tf_function(call: Call) -> str | None:
    """The TF function of a tf-keras TFOpLambda node in legacy form, or the one a gate's Keras 3
    operation is rebuilt as; else None."""
    if not _is_keras_layer(call):
        plain = isinstance(call.data, dict) and not call.data.get("kwargs")
        return KERAS3_GATE_OPS.get(call.layer.class_name) if plain else None
    if call.layer.class_name != "TFOpLambda" or isinstance(call.data, dict):
        return None
    return str(call.layer.config.get("function", ""))


def _is_gate_activation(call: Call) -> bool:
    if len(call.inputs) != 1:
        return False
    if call.layer.class_name == "Activation" and _is_keras_layer(call):
        return _activation_name(call.layer.config.get("activation")) not in CHANNEL_MIXING
    return _tf_function(call) in GATE_TF_FUNCTIONS + tuple(KERAS3_GATE_OPS.values())


def _is_gate_multiply(call: Call) -> bool:
    if len(call.inputs) != 2:
        return False
    if call.layer.class_name == "Multiply" and _is_keras_layer(call):
        return True
    if not _is_keras_layer(call):
        return _tf_function(call) == "math.multiply"
    return _tf_function(call) == "math.multiply" and first_arg_count(call.data) == 1


def _gate_signature(gate: Gate) -> dict:
    """What a gate computes, names aside: compared between branches like a tail's settings."""
    nodes = []
    for call in gate.calls:
        settings = {k: _canonical(v) for k, v in call.layer.config.items() if k not in ("name", "trainable")}
        kwargs = {k: _canonical(v) for k, v in legacy_kwargs(call.data).items() if k not in ("name", "y")} \
            if _tf_function(call) and _is_keras_layer(call) else {}
        nodes.append([call.layer.class_name, settings, kwargs])
    return {"nodes": json.dumps(nodes, sort_keys=True), "y first": gate.calls[-1].inputs[0] == gate.root}


def _apply_gate_node(call: Call, inputs: list, name: str, legacy: bool):
    """One node of a gate on the fused tensors, as a new layer (or Keras 3 operations) named ``name``."""
    function = _tf_function(call)
    if function is not None:
        from gconv_rewrite.passes.keras import _tf_ops

        kwargs = {k: v for k, v in legacy_kwargs(call.data).items() if k != "name"} if _is_keras_layer(call) else {}
        if len(inputs) == 2:
            kwargs["y"] = inputs[1]
        return _tf_ops.rebuild(function, name, inputs[0], kwargs)[0]
    template = layer_object(call.layer, legacy)
    layer = type(template).from_config({**template.get_config(), "name": name})
    return layer(inputs if len(inputs) == 2 else inputs[0])


LATE_BINDING = "late-binding"  # the code, and the Skip.finding, of a late-bound group: a fault of the model


@dataclass
class BranchMatch:
    """One branch: the tensor it starts from and its layers (convolutions and tails) in order,
    up to the Concatenate. ``slice`` is None where the branch reads ``entry`` whole."""

    entry: TensorRef
    steps: list[Call]
    slice: SliceCall | None = None
    tensor: int = 0  # which output of the slice call the branch reads
    not_a_slice: str | None = None  # why the entry's producer is no usable channel slice

    @property
    def conv(self) -> Call:
        return self.steps[0]

    @property
    def channel_range(self) -> tuple[int, int]:
        return self.slice.ranges[self.tensor]


@dataclass
class Level:
    """One fused layer: the first branch's call as the template, its new name, its weights; a
    convolution level also holds its plan (filters, groups, bias)."""

    template: Call | Gate
    name: str
    weights: list[np.ndarray]
    plan: FusionPlan | None = None
    gate_names: list[str] = field(default_factory=list)  # a gate's f nodes, each named anew

    def apply(self, tensor, legacy: bool):
        if isinstance(self.template, Gate):
            return self._apply_gate(self.template, tensor, legacy)
        template = layer_object(self.template.layer, legacy)
        config = {**template.get_config(), "name": self.name}
        if self.plan is not None:
            config.update(filters=self.plan.out_channels, groups=self.plan.groups,
                          use_bias=self.plan.bias is not None)
        layer = type(template).from_config(config)
        result = layer(tensor)
        if self.weights:
            layer.set_weights(self.weights)
        return result

    def _apply_gate(self, gate: Gate, tensor, legacy: bool):
        """The gate's nodes replayed once on the fused tensor: ``NAME`` for the multiply,
        ``gate_names`` for f's nodes."""
        values = {gate.root: tensor}
        for call, name in zip(gate.calls, [*self.gate_names, self.name]):
            values[TensorRef(call.layer.name, call.index, 0)] = \
                _apply_gate_node(call, [values[ref] for ref in call.inputs], name, legacy)
        return values[TensorRef(gate.layer.name, gate.index, 0)]


@dataclass
class FusedGroup:
    """One planned fusion; as a ``_build.Replacement`` it emits the fused layers.

    ``levels`` are the fused layers in order. Where the branches stop agreeing (``complete`` is
    False) the fused tensor is split back into the branches' channels (``widths``), and their
    remaining layers and the Concatenate stay as they were."""

    concat: Call
    source: TensorRef
    branches: list[BranchMatch]
    levels: list[Level]
    legacy: bool
    channel_axis: int
    widths: list[int]
    complete: bool = True
    split_names: list[str] = field(default_factory=list)
    repaired: bool = False
    removed: set[tuple[str, int]] = field(default_factory=set)
    # The Concatenate's output, compared in both models (gconv_rewrite.proof); where the fusion is
    # complete, the layer whose output takes its place is recorded as "written_tensor" on emit.
    boundary: dict = field(default_factory=dict)

    def __post_init__(self):
        self.boundary.setdefault("tensor", self.concat.layer.name)

    @property
    def convs(self) -> list[Level]:
        return [level for level in self.levels if level.plan is not None]

    def emit(self, source_tensor) -> dict[TensorRef, Any]:
        tensor = source_tensor
        for level in self.levels:
            tensor = level.apply(tensor, self.legacy)
        if self.complete:
            history = getattr(tensor, "_keras_history", None)
            if history is not None:
                self.boundary["written_tensor"] = history[0].name
            return {TensorRef(self.concat.layer.name, self.concat.index, 0): tensor}
        # Split back: each branch's channels, where its own next layer (or the Concatenate) reads them.
        rank = len(tensor.shape)
        produced, start = {}, 0
        for branch, name, width in zip(self.branches, self.split_names, self.widths):
            bounds = slice(start, start + width)
            start += width
            key = (Ellipsis, bounds) if self.channel_axis == rank - 1 else \
                tuple([slice(None)] * self.channel_axis + [bounds])
            cut = branch.steps[len(self.levels) - 1]
            produced[TensorRef(cut.layer.name, cut.index, 0)] = _compat.get_item(name)(tensor, key)
        return produced


class FuseGroupedConv:
    """Find every fusable (slice →) Conv → tail (→ Conv → tail…) → Concatenate pattern; plan it or
    say why not.

    ``accept(props) -> (ok, rule)``, when given, is asked about every grouped conv a candidate would
    become (``--target``): a candidate with one refused layer stays as it is, reported as a skip
    with the rule as its reason; each judged candidate is also listed in ``decisions``."""

    def __init__(self, graph: KerasGraph, weights: WeightStore, slices: dict[tuple[str, int], SliceCall | str],
                 shape_of: Callable[[TensorRef], list | None], *,
                 lambda_sources: dict[str, _lambdas.LambdaSource] | None = None, repair_late_binding: bool = False,
                 accept: Callable[[ConvProps], tuple[bool, str]] | None = None):
        self.accept = accept
        self.decisions: list[Decision] = []  # per judged candidate
        self._verdict: tuple[bool, str] | None = None
        self.graph = graph
        self.weights = weights
        self.slices = slices
        self.shape_of = shape_of
        self.lambda_sources = lambda_sources or {}
        self.repair = repair_late_binding
        self.consumers = graph.consumers()
        self.outputs = set(graph.outputs)
        self.names = set(graph.layers)
        self.groups: list[FusedGroup] = []
        self.rewrites: list[Rewrite] = []
        self.skipped: list[Skip] = []
        self.rebound: dict[str, Callable] = {}  # repaired Lambda layer → its re-bound function
        self.order = {name: i for i, name in enumerate(graph.layers)}  # file order, for reports

    def run(self) -> FuseGroupedConv:
        for call in self.graph.calls():
            if not is_join(call):
                continue
            location = call.layer.name
            self._verdict = None
            try:
                group = self._match(call)
            except NotACandidate:
                # Never silence where the join looks like hand-made groups all the same.
                convs = self._slice_read_convs(call)
                if convs:
                    self.skipped.append(Skip(location, self._unmatched_group_reason(call), convs,
                                             code="unmatched-branches"))
                continue
            except Refused as refusal:
                self.skipped.append(Skip.refused(location, refusal, self._branch_names(call),
                                                 finding=LATE_BINDING if refusal.code == LATE_BINDING else ""))
                if refusal.code == "target-keeps":  # the --target keeps it: a decision too
                    self.decisions.append(Decision(location=location, graph="", form="split", action="keep",
                                                   rule=str(refusal)))
                continue
            self._record(group)
        return self

    def _record(self, group: FusedGroup) -> None:
        convs = group.convs
        # Reports point at the first grouped conv (the wide one if none is grouped).
        first = next((level for level in convs if level.plan.groups > 1), convs[0])
        if self._verdict is not None:
            self.decisions.append(Decision(location=first.name, graph="", form="native",
                                           action="fuse", rule=self._verdict[1]))
        self.groups.append(group)
        replaced = sorted({k[0] for k in group.removed}, key=self.order.__getitem__)
        kind = (KIND if group.branches[0].slice is not None else SHARED_KIND) + \
            (" (late binding repaired)" if group.repaired else "")
        self.rewrites.append(Rewrite(kind=kind, location=first.name, groups=first.plan.groups,
                                     channels={"in": convs[0].plan.in_channels, "out": convs[-1].plan.out_channels},
                                     nodes=replaced, boundary=[group.boundary]))

    # -- matching ---------------------------------------------------------------------------

    def _single_use(self, ref: TensorRef) -> bool:
        return self._used_only_by(ref, 1)

    def _used_only_by(self, ref: TensorRef, count: int) -> bool:
        """``ref`` is no model output and read by exactly ``count`` calls (those of the pattern)."""
        return ref not in self.outputs and len(self.consumers.get(ref, [])) == count

    def _gate(self, multiply: Call) -> Gate | None:
        """``multiply`` as the end of a gate ``y · f(y)``: one input y, the other f's chain of
        elementwise activations reading y (each used only there), y read by both; else None."""
        if not _is_gate_multiply(multiply):
            return None
        first, second = multiply.inputs
        for root, other in ((first, second), (second, first)):
            chain, ref = [], other
            while ref != root and len(chain) < MAX_GATE_CHAIN:
                producer = self._producer(ref)
                if not _is_gate_activation(producer) or not self._single_use(ref):
                    break
                chain.append(producer)
                ref = producer.inputs[0]
            if ref == root and chain:
                return Gate([*reversed(chain), multiply], root)
        return None

    def _producer(self, ref: TensorRef) -> Call:
        return self.graph.layers[ref.layer].calls[ref.node]

    def _walk_back(self, ref: TensorRef) -> BranchMatch | Refusal:
        """From a Concatenate input back through tails and convolutions, each used only by the
        next, to where the branch starts: a slice, or a tensor other layers read too; else why not."""
        steps: list[Call | Gate] = []
        call = self._producer(ref)
        seen_conv = False
        uses = 1  # how many reads of ``ref`` the steps walked so far hold (a gate reads its y twice)
        while len(steps) < MAX_WALK:
            kind = call.layer.class_name
            gate = self._gate(call) if kind not in TAIL_CLASSES and kind not in CONV_CLASSES else None
            if gate is None and kind not in TAIL_CLASSES and kind not in CONV_CLASSES:
                break
            used_here = self._used_only_by(ref, uses)
            if not used_here and seen_conv:
                break  # where the branch starts (a shared input, or a use _match reports)
            if (kind in TAIL_CLASSES or gate is not None) and \
                    (not used_here or (gate is None and len(call.inputs) != 1)):
                return Refusal("used-outside", f"tail {call.layer.name} is shared or used elsewhere")
            if kind in CONV_CLASSES and not used_here:
                return Refusal("used-outside", f"the output of {call.layer.name} is used outside the pattern")
            if gate is None and len(call.inputs) != 1:
                return Refusal("concat-extra-inputs", f"{call.layer.name} reads several tensors")
            step = gate or call
            steps.append(step)
            seen_conv = seen_conv or kind in CONV_CLASSES
            ref, uses = step.inputs[0], 2 if gate is not None else 1
            call = self._producer(ref)
        steps.reverse()
        convs = [s for s in steps if s.layer.class_name in CONV_CLASSES]
        if not convs:
            return Refusal("concat-extra-inputs", f"{call.layer.name} ({call.layer.class_name}) is not a convolution")
        sliced = self.slices.get(call.key)
        if isinstance(sliced, SliceCall):
            if self._single_use(ref):
                return BranchMatch(ref, steps, sliced, ref.tensor)
            # Read whole by several branches, the slice is their shared input.
            return BranchMatch(ref, steps, not_a_slice=f"the slice {ref.layer} read by {convs[0].layer.name} "
                                                       "is used elsewhere too")
        reason = f"{convs[0].layer.name} does not read a channel slice" if sliced is None else \
            f"{call.layer.name} is not a channel slice: {sliced}"
        return BranchMatch(ref, steps, not_a_slice=reason)

    def _slice_read_convs(self, join: Call) -> list[str]:
        """The convs behind a join's inputs (within a few calls, through any layer but a conv) that,
        two or more of them, read slices of one tensor (through calls of one input each: a
        ZeroPadding2D): the sign of hand-made groups. Network structure (a U-Net skip, DenseNet,
        Inception) has no such convs."""
        by_source: dict[TensorRef, list[str]] = {}
        for ref in join.inputs:
            pending, seen = [ref], set()
            while pending and len(seen) < TRACE_CALLS:
                call = self._producer(pending.pop(0))
                if call.key in seen:
                    continue
                seen.add(call.key)
                if call.key in self.slices:
                    continue  # upstream of a slice is another part of the network
                if call.layer.class_name not in CONV_CLASSES:
                    pending.extend(call.inputs)
                    continue
                source = self._slice_source(call.inputs[0]) if len(call.inputs) == 1 else None
                if source is not None and call.layer.name not in by_source.setdefault(source, []):
                    by_source[source].append(call.layer.name)
        return [name for names in by_source.values() if len(names) >= 2 for name in names]

    def _slice_source(self, ref: TensorRef) -> TensorRef | None:
        """The tensor a slice call reads where ``ref`` is its output, or becomes ``ref`` through a
        few calls of one input each."""
        for _ in range(TRACE_TO_SLICE):
            call = self._producer(ref)
            if call.key in self.slices:
                return call.inputs[0]
            if len(call.inputs) != 1 or call.layer.class_name in CONV_CLASSES:
                return None
            ref = call.inputs[0]
        return None

    def _unmatched_group_reason(self, join: Call) -> str:
        """Why a join the matcher found no branches in, though convs behind it read slices of one
        tensor (``_slice_read_convs``), is left alone: it names the first layer the branch walk
        could not pass."""
        for ref in join.inputs:
            walk = self._walk_back(ref)
            if isinstance(walk, BranchMatch):
                stop = self._producer(walk.entry)
                if walk.slice is not None:
                    continue
                if stop.key in self.slices:
                    return f"{walk.not_a_slice}, so the branches cannot become one grouped convolution"
                if not stop.inputs:
                    continue  # a branch reads a model input whole: no slice behind it
                return (f"{_label(stop)} before a branch convolution: the branches do not read their channels "
                        "straight from a slice")
            stop = self._first_untraversed(ref)
            if stop.key in self.slices or not stop.inputs:
                continue  # a channel part joined as it is, or a model input: no branch convolution behind it
            if stop.layer.class_name in CONV_CLASSES or stop.layer.class_name in TAIL_CLASSES:
                return f"{walk.reason}, so the branches cannot become one grouped convolution"
            return (f"{_label(stop)} after a branch convolution is not a channel-wise op of that branch alone, "
                    "so the branches cannot become one grouped convolution")
        return "the branch convolutions are not joined in a form this pass reads"

    def _first_untraversed(self, ref: TensorRef) -> Call:
        """The first call back from ``ref`` that is no channel-wise tail or gate of one input."""
        call = self._producer(ref)
        for _ in range(MAX_WALK):
            step = call if call.layer.class_name in TAIL_CLASSES else self._gate(call)
            if step is None or len(step.inputs) != 1:
                return call
            call = self._producer(step.inputs[0])
        return call

    def _branch_names(self, concat: Call) -> list[str]:
        return [ref.layer for ref in concat.inputs]

    def _branches(self, concat: Call) -> list[BranchMatch]:
        """The Concatenate's inputs as branches, or why not; NotACandidate where fewer than two
        branches read slices and fewer than two read one tensor."""
        walks = [self._walk_back(ref) for ref in concat.inputs]
        found = [w for w in walks if isinstance(w, BranchMatch)]
        sliced = [w for w in found if w.slice is not None]
        readers: dict[TensorRef, int] = {}
        for w in found:
            if w.slice is None:
                readers[w.entry] = readers.get(w.entry, 0) + 1
        if len(sliced) < 2 and max(readers.values(), default=0) < 2:
            raise NotACandidate
        if len(found) != len(walks):
            inner = next(w for w in walks if isinstance(w, Refusal))  # its code says why (used-outside, ...)
            raise Refused(inner.code, "the Concatenate also joins inputs that are not sliced convolution branches "
                                      f"({inner.reason})")
        if len({id(b.steps[-1]) for b in found}) != len(found):
            raise Refused("concat-twice", "a branch is concatenated twice")
        return found

    def _source(self, branches: list[BranchMatch]) -> tuple[TensorRef, bool]:
        """The one tensor the branches read, and whether they read it whole (shared input)."""
        source, shared = self._common_source(branches)
        for b in branches:
            if b.steps[0].layer.class_name not in CONV_CLASSES:
                raise Refused("op-before-conv", f"a branch applies {b.steps[0].layer.name} ({b.steps[0].layer.class_name}) "
                               "before its convolution")
        return source, shared

    def _common_source(self, branches: list[BranchMatch]) -> tuple[TensorRef, bool]:
        if all(b.slice is None for b in branches) and len({b.entry for b in branches}) == 1:
            return branches[0].entry, True
        sliced = [b for b in branches if b.slice is not None]
        entries = [b.entry for b in branches if b.slice is None]
        starts = {b.slice.source for b in sliced} or {max(entries, key=entries.count)}
        for b in branches:  # a branch cut short by a tensor of its own read elsewhere
            if b.slice is None and self._inside_branch(b.entry, starts):
                raise Refused("used-outside", f"the output of {b.entry.layer}, inside a branch, is used outside the pattern")
        if sliced and len(sliced) != len(branches):
            reason = next(b.not_a_slice for b in branches if b.slice is None)
            raise Refused("concat-extra-inputs", f"the Concatenate also joins inputs that are not sliced convolution branches ({reason})")
        if len({b.slice.source for b in sliced}) > 1 or not sliced:
            raise Refused("different-sources", "branches read from different tensors")
        return sliced[0].slice.source, False

    def _inside_branch(self, ref: TensorRef, starts: set[TensorRef]) -> bool:
        """Whether ``ref`` is made by a conv/tail chain that reads one of ``starts`` (directly or
        through a slice of it): then it is part of a branch, not a tensor of its own."""
        if isinstance(self.slices.get(self._producer(ref).key), SliceCall):
            return False  # a slice read elsewhere too: reported as such
        for _ in range(MAX_WALK):
            call = self._producer(ref)
            sliced = self.slices.get(call.key)
            if isinstance(sliced, SliceCall):
                return sliced.source in starts
            if call.layer.class_name not in TAIL_CLASSES and call.layer.class_name not in CONV_CLASSES:
                return False
            if len(call.inputs) != 1:
                return False
            ref = call.inputs[0]
            if ref in starts:
                return True
        return False

    def _match(self, concat: Call) -> FusedGroup:
        branches = self._branches(concat)
        source, shared = self._source(branches)
        shape = self.shape_of(source)
        rank = len(shape) if shape else None
        data_format = branches[0].conv.layer.config.get("data_format") or "channels_last"
        channel_axis = (rank - 1 if data_format == "channels_last" else 1) if rank else None
        axis = _axis(_join_axis(concat), rank)
        if rank is None or axis != channel_axis:
            join = "tf.concat" if concat.layer.class_name == "TFOpLambda" else "Concatenate"
            raise Refused("not-channel-axis", f"{join} on axis {_join_axis(concat)}, not the channel axis")
        if not shared:
            for b in branches:
                if b.slice.axis != channel_axis:
                    raise Refused("not-channel-axis", f"{b.slice.call.layer.name} slices axis {b.slice.axis}, not the channel axis")
            self._check_slices_consumed(branches)
        rebound = {} if shared else self._late_binding(concat, branches, shape[channel_axis])
        chain = self._plan_chain(branches, shape[channel_axis], channel_axis, rank, shared)
        self._judge(chain.convs, rank)
        plans, widths, stopped = list(zip(branches[0].steps, chain.steps)), chain.branch_channels, chain.stopped
        depth = len(plans)
        removed = set() if stopped else {concat.key}
        for b in branches:
            removed.update(key for s in b.steps[:depth] for key in _step_keys(s))
            if b.slice is not None:
                removed.add(b.slice.call.key)
        levels = self._levels(plans)
        split_names = [self._fresh(f"{levels[0].name}_split{i}") for i in range(len(branches))] if stopped else []
        if stopped:
            self.skipped.append(Skip(concat.layer.name, f"fused up to {stopped}; the rest stays per branch",
                                     self._branch_names(concat), code=chain.stopped_code or ""))
        self.rebound.update(rebound)  # only now: a refused candidate keeps its Lambdas as they were
        return FusedGroup(concat, source, branches, levels, self.graph.legacy, channel_axis, widths,
                          complete=not stopped, split_names=split_names, repaired=bool(rebound), removed=removed)

    def _levels(self, plans: list[tuple[Call, FusionPlan | list[np.ndarray]]]) -> list[Level]:
        """Names and weights of the fused layers: ``NAME_groupN`` (``NAME_wide`` for the wide conv
        of a shared input, and the tails that follow it), after the first branch's layers."""
        levels, suffix = [], ""
        for call, plan in plans:
            if isinstance(plan, FusionPlan):
                suffix = f"_group{plan.groups}" if plan.groups > 1 else "_wide"
                weights = [plan.weight] + ([plan.bias] if plan.bias is not None else [])
                levels.append(Level(call, self._fresh(call.layer.name + suffix), weights, plan))
            elif isinstance(call, Gate):  # f's nodes first: the multiply's name stands for the gate
                gate_names = [self._fresh(c.layer.name + suffix) for c in call.calls[:-1]]
                levels.append(Level(call, self._fresh(call.layer.name + suffix), plan, gate_names=gate_names))
            else:
                levels.append(Level(call, self._fresh(call.layer.name + suffix), plan))
        return levels

    def _judge(self, plans: list[FusionPlan], rank: int) -> None:
        """The ``accept`` hook on every grouped layer: the first refusal keeps the candidate as it is."""
        if self.accept is None:
            return
        verdicts = [self.accept(ConvProps(groups=p.groups, in_channels=p.in_channels, out_channels=p.out_channels,
                                          kernel_rank=rank - 2)) for p in plans if p.groups > 1]
        if not verdicts:
            return
        refused = next((v for v in verdicts if not v[0]), None)
        if refused is not None:
            raise Refused("target-keeps", refused[1])
        self._verdict = (True, "; ".join(dict.fromkeys(rule for _, rule in verdicts)))

    def _check_slices_consumed(self, branches: list[BranchMatch]) -> None:
        """Every output of every slice call must feed this pattern (else the slice must stay)."""
        used = {(b.slice.call.key, b.tensor) for b in branches}
        for b in branches:
            call = b.slice.call
            for i in range(len(b.slice.ranges)):
                if (call.key, i) not in used:
                    raise Refused("concat-extra-inputs", f"{call.layer.name} has outputs that feed no branch of this Concatenate")

    def _fresh(self, base: str) -> str:
        return fresh_name(keras_name(base), self.names)

    # -- planning ---------------------------------------------------------------------------

    def _plan_chain(self, branches: list[BranchMatch], channels: int | None, channel_axis: int, rank: int,
                    shared: bool) -> ChainPlan:
        """The branches planned layer by layer by ``gconv_rewrite.plan.plan_chain``, as far as they agree.
        Raises Refused if not even the first convolution fuses."""
        plan = plan_chain([[_step_kind(c) for c in b.steps] for b in branches],
                          functools.partial(self._read_step, branches, channel_axis, rank), channels,
                          conv_kinds=tuple(CONV_CLASSES), shared_input=shared, stack_axis=-1)
        if isinstance(plan, Refusal):
            raise Refused(plan)
        return plan

    def _read_step(self, branches: list[BranchMatch], channel_axis: int, rank: int, step: int,
                   _widths: list[int] | None) -> ConvLayer | TailLayer | Refusal:
        calls = [b.steps[step] for b in branches]
        if isinstance(calls[0], Gate):  # weightless: it fuses where every branch computes the same
            return TailLayer(GATE_KIND, [_gate_signature(g) for g in calls], [[] for _ in calls], [])
        if calls[0].layer.class_name in CONV_CLASSES:
            return self._read_conv(calls, branches, step, rank)
        return self._read_tail(calls, channel_axis, rank)

    def _read_conv(self, calls: list[Call], branches: list[BranchMatch], step: int, rank: int) -> ConvLayer | Refusal:
        """One convolution per branch: the first layer reads its slice of the source (or all of
        it), a later one ``0:width`` of its own branch (``plan_chain`` places them)."""
        parts = []
        for call, branch in zip(calls, branches):
            layer = call.layer
            if CONV_CLASSES[layer.class_name] != rank - 2:
                return Refusal("rank-mismatch", f"{layer.name} does not match the input's rank")
            mixing = _activation_name(layer.config.get("activation"))
            if mixing in CHANNEL_MIXING:
                return Refusal("not-channel-wise", f"{layer.name} applies {mixing} over each branch's channels; "
                               "one grouped conv would mix them all")
            if not self.weights.get(layer.name):
                return Refusal("no-weights", f"the file holds no weights for {layer.name}")
            parts.append(self._branch(call, branch if step == 0 else None))
        return ConvLayer(parts)

    def _branch(self, call: Call, branch: BranchMatch | None) -> Branch:
        """A conv as ``gconv_rewrite.plan`` reads it: the channels it reads are its branch's slice of the
        source (``branch``, first layer of a sliced candidate), else ``0:`` its input width."""
        layer = call.layer
        arrays = self.weights.get(layer.name)
        config = layer.config
        kernel = arrays[0]
        bias = arrays[1] if len(arrays) > 1 and config.get("use_bias", True) else None
        groups = int(config.get("groups", 1) or 1)
        start, stop = branch.channel_range if branch is not None and branch.slice is not None else \
            (0, int(kernel.shape[-2]) * groups)
        settings = {key: _canonical(config.get(key)) for key in CONV_SETTINGS}
        return Branch(name=layer.name, channel_start=start, channel_stop=stop, weight=kernel, bias=bias,
                      groups=groups, out_channels=int(kernel.shape[-1]), attributes=settings)

    def _read_tail(self, calls: list[Call], channel_axis: int, rank: int) -> TailLayer | Refusal:
        """One channel-wise layer per branch, as ``plan_tail`` takes it, or why it cannot be one."""
        kind = calls[0].layer.class_name
        config = calls[0].layer.config
        if kind == "BatchNormalization" and _axis(config.get("axis", -1), rank) != channel_axis:
            return Refusal("not-channel-wise", "it normalises another axis than the channels")
        if kind == "PReLU" and channel_axis != rank - 1:
            return Refusal("unsupported-form", "PReLU tails are fused only for channels_last")
        if _activation_name(config.get("activation")) in CHANNEL_MIXING:
            return Refusal("not-channel-wise", f"{_activation_name(config['activation'])} mixes the channels")
        configs = [{k: _canonical(v) for k, v in c.layer.config.items() if k not in ("name", "trainable")}
                   for c in calls]
        return TailLayer(kind, configs, [self.weights.get(c.layer.name) for c in calls], TAIL_CLASSES[kind])

    # -- late binding -----------------------------------------------------------------------

    def _late_binding(self, concat: Call, branches: list[BranchMatch], channels: int | None) -> dict[str, Callable]:
        """Same Lambda code and closure values in several branches: the loop variable was bound
        late. Report it; with repair, re-bind each branch's Lambda to its position."""
        lambdas = [b.slice.call.layer for b in branches if b.slice.kind == "Lambda"]
        if len(lambdas) != len(branches) or len({layer.name for layer in lambdas}) != len(lambdas):
            return {}  # not one Lambda per branch (a splitting Lambda hands out all branches)
        sources = [self.lambda_sources[layer.name] for layer in lambdas]
        by_print: dict[tuple, list[str]] = {}
        for source in sources:
            by_print.setdefault(source.fingerprint, []).append(source.layer)
        shared = [names for names in by_print.values() if len(names) > 1]
        if not shared:
            return {}
        ranges = sorted({b.channel_range for b in branches})
        seen = ", ".join(f"{a}:{z}" for a, z in ranges)
        names = ", ".join(shared[0][:4]) + (" …" if len(shared[0]) > 4 else "")
        cells = _lambdas.bindable_names(sources[0])
        bound = ", ".join(f"{n}={v}" for n, v in cells if v is not None)
        missing = [n for n, v in cells if v is None]
        if missing:  # made at module level: the loop variable was a global, not saved in the file
            message = (f"LATE BINDING: Lambdas {names} share one code reading {', '.join(missing)}, a global "
                       "the file does not hold (a loop at module level): as saved, the model cannot run")
        else:
            message = (f"LATE BINDING: Lambdas {names} share one code and closure value ({bound or 'no closure'}), "
                       f"so every branch reads channels {seen}: the model does not compute what its author meant")
        if not self.repair:
            log.warning("%s: %s", concat.layer.name, message)
            raise Refused("late-binding", message + "; pass --repair-late-binding to rebuild each branch with its intended slice")
        if channels is None:
            raise Refused("late-binding", message + "; cannot repair: the channel count is unknown")
        shape = self.shape_of(branches[0].slice.source)
        for name, step in _binding_steps(cells, len(sources)):
            functions, found = [], []
            for position, source in enumerate(sources):
                function = _lambdas.make_function(source, bind={name: position * step})
                probed = _lambdas.probe_slice(function, source.arguments, shape)
                if isinstance(probed, str) or len(probed.ranges) != 1:
                    break
                functions.append(function)
                found.append(probed.ranges[0])
            else:
                if check_channel_ranges(found, channels) is None:
                    rebound = {}
                    for b, source, function, channel_range in zip(branches, sources, functions, found):
                        rebound[source.layer] = function
                        b.slice = SliceCall(b.slice.call, b.slice.source, b.slice.axis, [channel_range], "Lambda")
                        b.tensor = 0
                    log.warning("%s: %s; repaired: branch i now reads its own slice (%s re-bound to %s)",
                                concat.layer.name, message, name, "i" if step == 1 else f"i*{step}")
                    return rebound
        raise Refused("late-binding", message + "; cannot repair: re-binding no closure variable to the branch positions "
                                 "makes the slices tile the channels")


def _binding_steps(cells: list[tuple[str, Any]], branches: int) -> list[tuple[str, int]]:
    """Per bindable variable, the values to try for branch i: ``i`` (the loop variable itself),
    then ``i * step`` where the late-bound value is the last of such a sequence (ShuffleNet's
    ``offset = i * channels_per_group`` is captured, not ``i``: it holds ``(N-1) * step``)."""
    steps = []
    for name, value in cells:
        steps.append((name, 1))
        if isinstance(value, int) and branches > 1 and value > branches - 1 and value % (branches - 1) == 0:
            steps.append((name, value // (branches - 1)))
    return steps


def is_join(call: Call) -> bool:
    """A join point of branches: a ``Concatenate`` layer (Keras 3 records ``keras.ops.concatenate``
    on Keras tensors as an operation of that class too) or tf-keras's ``tf.concat``, which it
    writes as a ``TFOpLambda`` node (the axis recorded as a kwarg) — only one that reads no tensor
    but the joined ones."""
    if call.layer.class_name == "Concatenate":
        return True
    return (call.layer.class_name == "TFOpLambda" and call.layer.config.get("function") == "concat"
            and not isinstance(call.data, dict) and first_arg_count(call.data) == len(call.inputs))


def _join_axis(call: Call) -> Any:
    """The axis a join concatenates on, as the file records it (a Concatenate's default is -1;
    tf.concat has no default)."""
    if call.layer.class_name == "TFOpLambda":
        return legacy_kwargs(call.data).get("axis")
    return call.layer.config.get("axis", -1)


def _label(call: Call) -> str:
    """A layer as reasons name it: ``MaxPooling2D (pool_1)``; a tf-keras TFOpLambda by its function."""
    kind = call.layer.class_name
    if kind == "TFOpLambda" and isinstance(call.layer.config.get("function"), str):
        kind = "tf." + call.layer.config["function"]
    return f"{kind} ({call.layer.name})"


def _activation_name(value) -> str | None:
    if isinstance(value, dict):  # Keras 3 may serialise an activation as an object
        value = value.get("config", value.get("class_name"))
    return value if isinstance(value, str) else None


def _axis(axis, rank: int | None) -> int | None:
    if isinstance(axis, list) and len(axis) == 1:
        axis = axis[0]
    if not isinstance(axis, int) or rank is None:
        return None
    return axis % rank


def _canonical(value) -> Any:
    """Settings compare equal across formats: lists for tuples, a dtype policy by its name."""
    if isinstance(value, dict) and value.get("class_name") in ("DTypePolicy", "Policy"):
        return (value.get("config") or {}).get("name")
    if isinstance(value, (tuple, list)):
        return [_canonical(v) for v in value]
    if isinstance(value, dict):
        return json.dumps(value, sort_keys=True)
    return value
