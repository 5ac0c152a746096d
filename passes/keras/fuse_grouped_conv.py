"""Fuse hand-made grouped convolutions in a Keras functional model into one ``ConvND(groups=N)``.

    x → slice_i (GetItem | tf getitem/split | Lambda) → Conv_i → tail_i… → Concatenate  ⇒  x → Conv(groups=N) → tail

The matcher starts at each ``Concatenate`` on the channel axis, walks every input back through
channel-wise tail layers (BatchNormalization, Activation, ReLU…) to its convolution and on to the
slice that feeds it; the branches must read one source tensor. ``rewriter.plan`` owns the rules
and the weight arithmetic (kernels ``[k…, I/g, O]`` stack on the last axis); tails are fused by
concatenating their per-channel parameters, as far as the branches agree — past that point the
fused tensor is split back into the branches' channels and the rest stays per branch. Late-bound Lambda slices (one code, one closure
value, several branches) are reported, and with repair re-bound to each branch's position.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from passes import register
from passes.keras import _compat, _lambdas
from passes.keras._build import keras_name, layer_object
from passes.keras._config import Call, KerasGraph, TensorRef, WeightStore
from passes.keras._slices import SliceCall
from rewriter.names import fresh_name
from rewriter.plan import Branch, FusionPlan, Refusal, check_channel_ranges, plan_fusion, plan_tail
from rewriter.report import Rewrite, Skip
from rewriter.targets import ConvProps

log = logging.getLogger(__name__)

CONV_CLASSES = {"Conv1D": 1, "Conv2D": 2, "Conv3D": 3, "Convolution1D": 1, "Convolution2D": 2, "Convolution3D": 3}
# Channel-wise layers a branch may end with; the value says, per weight, the axis along which it
# is per-channel (None: must be equal in every branch).
TAIL_CLASSES: dict[str, list[int | None]] = {
    "BatchNormalization": [0, 0, 0, 0],
    "Activation": [], "ReLU": [], "LeakyReLU": [], "ELU": [], "ThresholdedReLU": [],
    "Dropout": [], "SpatialDropout1D": [], "SpatialDropout2D": [], "SpatialDropout3D": [],
    "GaussianNoise": [], "GaussianDropout": [], "ActivityRegularization": [],
    "PReLU": [-1],
}
# Activations that mix channels: per branch they normalise over that branch's channels only.
CHANNEL_MIXING = ("softmax", "log_softmax")
# Conv settings that decide the numbers; branches must agree on all of them.
CONV_SETTINGS = ("strides", "padding", "dilation_rate", "data_format", "activation", "dtype")
KIND = "keras-fuse-grouped-conv"


class _NotACandidate(Exception):
    """The Concatenate is not a grouped-convolution candidate at all (nothing to report)."""


class _Refused(Exception):
    """A candidate that cannot fuse; the message is the reason."""


class _Kept(_Refused):
    """A candidate the ``accept`` hook wants left as it is; the message is the rule."""


@dataclass
class BranchMatch:
    slice: SliceCall
    tensor: int  # which output of the slice call the branch reads
    conv: Call
    tails: list[Call]

    @property
    def channel_range(self) -> tuple[int, int]:
        return self.slice.ranges[self.tensor]


@dataclass
class FusedGroup:
    """One planned fusion; as a ``_build.Replacement`` it emits the fused layers.

    ``tail_weights`` holds one entry per fused tail level. Where the branches' tails stop
    agreeing (``complete`` is False) the fused tensor is split back into the branches' channel
    ranges, and their remaining tails and the Concatenate stay as they were."""

    concat: Call
    source: TensorRef
    branches: list[BranchMatch]
    plan: FusionPlan
    tail_weights: list[list[np.ndarray]]
    conv_name: str
    tail_names: list[str]
    legacy: bool
    channel_axis: int
    complete: bool = True
    split_names: list[str] = field(default_factory=list)
    repaired: bool = False
    removed: set[tuple[str, int]] = field(default_factory=set)

    def emit(self, source_tensor) -> dict[TensorRef, Any]:
        first = self.branches[0]
        conv = layer_object(first.conv.layer, self.legacy)
        config = conv.get_config()
        config.update(name=self.conv_name, filters=self.plan.out_channels, groups=self.plan.groups,
                      use_bias=self.plan.bias is not None)
        fused = type(conv).from_config(config)
        tensor = fused(source_tensor)
        fused.set_weights([self.plan.weight] + ([self.plan.bias] if self.plan.bias is not None else []))
        for tail_call, name, weights in zip(first.tails, self.tail_names, self.tail_weights):
            tail = layer_object(tail_call.layer, self.legacy)
            layer = type(tail).from_config({**tail.get_config(), "name": name})
            tensor = layer(tensor)
            if weights:
                layer.set_weights(weights)
        if self.complete:
            return {TensorRef(self.concat.layer.name, self.concat.index, 0): tensor}
        # Split back: each branch's channels, where its own tails (or the Concatenate) read them.
        width = self.plan.out_channels // len(self.branches)
        rank = len(tensor.shape)
        produced = {}
        for i, (branch, name) in enumerate(zip(self.branches, self.split_names)):
            bounds = slice(i * width, (i + 1) * width)
            key = (Ellipsis, bounds) if self.channel_axis == rank - 1 else \
                tuple([slice(None)] * self.channel_axis + [bounds])
            cut = branch.tails[len(self.tail_weights) - 1] if self.tail_weights else branch.conv
            produced[TensorRef(cut.layer.name, cut.index, 0)] = _compat.get_item(name)(tensor, key)
        return produced


@register("keras.fuse-grouped-conv")
class FuseGroupedConv:
    """Find every fusable slice → Conv → tail → Concatenate pattern; plan it or say why not.

    ``accept(props) -> (ok, rule)``, when given, is asked about the grouped conv a candidate would
    become (``--target``): a refused candidate stays as it is, reported as a skip with the rule as
    its reason; each judged candidate is also listed in ``decisions``."""

    def __init__(self, graph: KerasGraph, weights: WeightStore, slices: dict[tuple[str, int], SliceCall | str],
                 shape_of: Callable[[TensorRef], list | None], *,
                 lambda_sources: dict[str, _lambdas.LambdaSource] | None = None, repair_late_binding: bool = False,
                 accept: Callable[[ConvProps], tuple[bool, str]] | None = None):
        self.accept = accept
        self.decisions: list[dict] = []  # {location, graph, form, action, rule} per judged candidate
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
            if call.layer.class_name != "Concatenate":
                continue
            location = call.layer.name
            self._verdict = None
            try:
                group = self._match(call)
            except _NotACandidate:
                continue
            except _Refused as refusal:
                self.skipped.append(Skip(location, str(refusal), self._branch_names(call)))
                if isinstance(refusal, _Kept):
                    self.decisions.append({"location": location, "graph": "", "form": "split", "action": "keep",
                                           "rule": str(refusal)})
                continue
            if self._verdict is not None:
                self.decisions.append({"location": group.conv_name, "graph": "", "form": "native",
                                       "action": "fuse", "rule": self._verdict[1]})
            self.groups.append(group)
            replaced = sorted({k[0] for k in group.removed}, key=self.order.__getitem__)
            kind = KIND + (" (late binding repaired)" if group.repaired else "")
            self.rewrites.append(Rewrite(kind=kind, location=group.conv_name, groups=group.plan.groups,
                                         channels={"in": group.plan.in_channels, "out": group.plan.out_channels},
                                         nodes=replaced))
        return self

    # -- matching ---------------------------------------------------------------------------

    def _single_use(self, ref: TensorRef) -> bool:
        return ref not in self.outputs and len(self.consumers.get(ref, [])) == 1

    def _producer(self, ref: TensorRef) -> Call:
        return self.graph.layers[ref.layer].calls[ref.node]

    def _walk_back(self, ref: TensorRef) -> BranchMatch | str:
        """From a Concatenate input back through tails and the conv to its slice."""
        tails: list[Call] = []
        call = self._producer(ref)
        while call.layer.class_name in TAIL_CLASSES:
            if len(call.inputs) != 1 or not self._single_use(ref):
                return f"tail {call.layer.name} is shared or used elsewhere"
            tails.append(call)
            ref = call.inputs[0]
            call = self._producer(ref)
        if call.layer.class_name not in CONV_CLASSES:
            return f"{call.layer.name} ({call.layer.class_name}) is not a convolution"
        if not self._single_use(ref):
            return f"the output of {call.layer.name} is used outside the pattern"
        conv = call
        if len(conv.inputs) != 1:
            return f"{conv.layer.name} reads several tensors"
        ref = conv.inputs[0]
        sliced = self.slices.get(self._producer(ref).key)
        if sliced is None:
            return f"{conv.layer.name} does not read a channel slice"
        if isinstance(sliced, str):
            return f"{self._producer(ref).layer.name} is not a channel slice: {sliced}"
        if not self._single_use(ref):
            return f"the slice {ref.layer} read by {conv.layer.name} is used elsewhere too"
        return BranchMatch(sliced, ref.tensor, conv, list(reversed(tails)))

    def _branch_names(self, concat: Call) -> list[str]:
        return [ref.layer for ref in concat.inputs]

    def _match(self, concat: Call) -> FusedGroup:
        walks = [self._walk_back(ref) for ref in concat.inputs]
        found = [w for w in walks if isinstance(w, BranchMatch)]
        if len(found) < 2:
            raise _NotACandidate
        if len(found) != len(walks):
            reason = next(w for w in walks if isinstance(w, str))
            raise _Refused(f"the Concatenate also joins inputs that are not sliced convolution branches ({reason})")
        branches: list[BranchMatch] = found
        if len({id(b.conv) for b in branches}) != len(branches):
            raise _Refused("a branch is concatenated twice")
        sources = {b.slice.source for b in branches}
        if len(sources) != 1:
            raise _Refused("branches read from different tensors")
        (source,) = sources
        shape = self.shape_of(source)
        rank = len(shape) if shape else None
        convs = [b.conv.layer for b in branches]
        data_format = convs[0].config.get("data_format") or "channels_last"
        channel_axis = (rank - 1 if data_format == "channels_last" else 1) if rank else None
        axis = _axis(concat.layer.config.get("axis", -1), rank)
        if rank is None or axis != channel_axis:
            raise _Refused(f"Concatenate on axis {concat.layer.config.get('axis', -1)}, not the channel axis")
        for b in branches:
            if b.slice.axis != channel_axis:
                raise _Refused(f"{b.slice.call.layer.name} slices axis {b.slice.axis}, not the channel axis")
            if CONV_CLASSES[b.conv.layer.class_name] != rank - 2:
                raise _Refused(f"{b.conv.layer.name} does not match the input's rank")
        self._check_slices_consumed(branches)
        for b in branches:
            mixing = _activation_name(b.conv.layer.config.get("activation"))
            if mixing in CHANNEL_MIXING:
                raise _Refused(f"{b.conv.layer.name} applies {mixing} over each branch's channels; "
                               "one grouped conv would mix them all")
        rebound = self._late_binding(concat, branches, shape[channel_axis])

        plan = plan_fusion([self._branch(b) for b in branches], shape[channel_axis], stack_axis=-1)
        if isinstance(plan, Refusal):
            raise _Refused(plan.reason)
        if self.accept is not None and plan.groups > 1:
            self._verdict = self.accept(ConvProps(groups=plan.groups, in_channels=plan.in_channels,
                                                  out_channels=plan.out_channels, kernel_rank=rank - 2))
            if not self._verdict[0]:
                raise _Kept(self._verdict[1])
        tail_weights, stopped = self._plan_tails(branches, channel_axis, rank)
        depth = len(tail_weights)
        removed = set() if stopped else {concat.key}
        for b in branches:
            removed.update({b.slice.call.key, b.conv.key, *(t.key for t in b.tails[:depth])})
        conv_name = self._fresh(f"{convs[0].name}_group{plan.groups}")
        tail_names = [self._fresh(f"{t.layer.name}_group{plan.groups}") for t in branches[0].tails[:depth]]
        split_names = [self._fresh(f"{conv_name}_split{i}") for i in range(len(branches))] if stopped else []
        if stopped:
            self.skipped.append(Skip(concat.layer.name, f"fused up to {stopped}; the rest stays per branch",
                                     self._branch_names(concat)))
        self.rebound.update(rebound)  # only now: a refused candidate keeps its Lambdas as they were
        return FusedGroup(concat, source, branches, plan, tail_weights, conv_name, tail_names,
                          self.graph.legacy, channel_axis, complete=not stopped, split_names=split_names,
                          repaired=bool(rebound), removed=removed)

    def _check_slices_consumed(self, branches: list[BranchMatch]) -> None:
        """Every output of every slice call must feed this pattern (else the slice must stay)."""
        used = {(b.slice.call.key, b.tensor) for b in branches}
        for b in branches:
            call = b.slice.call
            for i in range(len(b.slice.ranges)):
                if (call.key, i) not in used:
                    raise _Refused(f"{call.layer.name} has outputs that feed no branch of this Concatenate")

    def _fresh(self, base: str) -> str:
        return fresh_name(keras_name(base), self.names)

    def _branch(self, b: BranchMatch) -> Branch:
        layer = b.conv.layer
        arrays = self.weights.get(layer.name)
        config = layer.config
        if not arrays:
            raise _Refused(f"the file holds no weights for {layer.name}")
        kernel = arrays[0]
        bias = arrays[1] if len(arrays) > 1 and config.get("use_bias", True) else None
        groups = int(config.get("groups", 1) or 1)
        settings = {key: _canonical(config.get(key)) for key in CONV_SETTINGS}
        start, stop = b.channel_range
        return Branch(name=layer.name, channel_start=start, channel_stop=stop, weight=kernel, bias=bias,
                      groups=groups, out_channels=int(kernel.shape[-1]), attributes=settings)

    def _plan_tails(self, branches: list[BranchMatch], channel_axis: int,
                    rank: int) -> tuple[list[list[np.ndarray]], str | None]:
        """Fuse the tails level by level as far as the branches agree: the fused parameters per
        level, and where and why the branches stop agreeing (None: all the way to the Concatenate)."""
        depths = [len(b.tails) for b in branches]
        fused: list[list[np.ndarray]] = []
        for level in range(min(depths)):
            calls = [b.tails[level] for b in branches]
            kinds = sorted({c.layer.class_name for c in calls})
            if len(kinds) > 1:
                return fused, "where the branches differ (" + " vs ".join(kinds) + ")"
            kind = kinds[0]
            reason = None
            if kind == "BatchNormalization" and _axis(calls[0].layer.config.get("axis", -1), rank) != channel_axis:
                reason = "it normalises another axis than the channels"
            elif kind == "PReLU" and channel_axis != rank - 1:
                reason = "PReLU tails are fused only for channels_last"
            elif _activation_name(calls[0].layer.config.get("activation")) in CHANNEL_MIXING:
                reason = f"{_activation_name(calls[0].layer.config['activation'])} mixes the channels"
            if reason is None:
                configs = [{k: _canonical(v) for k, v in c.layer.config.items() if k not in ("name", "trainable")}
                           for c in calls]
                plan = plan_tail(kind, configs, [self.weights.get(c.layer.name) for c in calls], TAIL_CLASSES[kind])
                if isinstance(plan, Refusal):
                    reason = plan.reason
            if reason is not None:
                return fused, f"{kind} ({reason})"
            fused.append(plan)
        return fused, (None if len(set(depths)) == 1 else "the end of the shortest branch")

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
            raise _Refused(message + "; pass --repair-late-binding to rebuild each branch with its intended slice")
        if channels is None:
            raise _Refused(message + "; cannot repair: the channel count is unknown")
        shape = self.shape_of(branches[0].slice.source)
        for name, _value in cells:
            functions, found = [], []
            for position, source in enumerate(sources):
                function = _lambdas.make_function(source, bind={name: position})
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
                    log.warning("%s: %s; repaired: branch i now reads its own slice (%s re-bound to i)",
                                concat.layer.name, message, name)
                    return rebound
        raise _Refused(message + "; cannot repair: re-binding no closure variable to the branch positions "
                                 "makes the slices tile the channels")


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
