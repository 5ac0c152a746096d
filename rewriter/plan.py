"""The fusability rules and the weight arithmetic, once, for every format.

A *group candidate* is one source tensor whose channels are read in ranges by N branches, each a
convolution, joined by one concat on the channel axis. ``plan_fusion`` decides, in plain numpy,
whether the branches can become one grouped convolution and computes its weights; when they
cannot it returns a ``Refusal`` whose reason is a sentence a user understands.
``plan_expansion`` is the same arithmetic read backwards.

Weight layouts differ per format and op, so the caller says along which axis the branch kernels
stack (``stack_axis``): ONNX Conv ``[O, I/g, k...]`` stacks on 0, ONNX ConvTranspose
``[I, O/g, k...]`` on 0 (the input axis), TF/Keras ``[k..., I/g, O]`` on the last axis.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from gconv_rewrite.reasons import Refusal


@dataclass
class Branch:
    """One convolution of a candidate, as the format's matcher read it."""

    name: str
    channel_start: int  # first channel of the source this branch reads
    channel_stop: int  # one past its last channel
    weight: np.ndarray  # in the format's layout
    bias: np.ndarray | None
    groups: int  # the branch's own group count (1 for a plain conv)
    out_channels: int
    # Everything else that decides the output shape and values (strides, pads, dilations,
    # auto_pad...): branches must agree on all of it.
    attributes: dict[str, Any] = field(default_factory=dict)

    @property
    def width(self) -> int:
        return self.channel_stop - self.channel_start


@dataclass
class FusionPlan:
    groups: int
    in_channels: int
    out_channels: int
    weight: np.ndarray
    bias: np.ndarray | None
    attributes: dict[str, Any]



def _describe(value: Any) -> str:
    if isinstance(value, (tuple, list)):
        return "(" + ",".join(str(v) for v in value) + ")"
    return str(value)


def _describe_setting(value: Any) -> str:
    """Floats as a user wrote them (float32 attributes read back as 0.10000000149011612)."""
    if isinstance(value, float):
        return f"{value:.6g}"
    if isinstance(value, (tuple, list)):
        return "(" + ",".join(_describe_setting(v) for v in value) + ")"
    return repr(value)


def check_channel_ranges(ranges: Sequence[tuple[int, int]], source_channels: int | None) -> str | None:
    """Why the ranges, in concat order, do not tile the source's channels exactly once, or None."""
    refusal = channel_ranges_refusal(ranges, source_channels)
    return refusal.reason if refusal is not None else None


def channel_ranges_refusal(ranges: Sequence[tuple[int, int]], source_channels: int | None) -> Refusal | None:
    """``check_channel_ranges`` as a refusal with its code."""
    starts = [start for start, _ in ranges]
    for (start, stop) in ranges:
        if stop <= start:
            return Refusal("empty-range", f"empty channel range {start}:{stop}")
    ordered = sorted(ranges)
    for (a_start, a_stop), (b_start, b_stop) in zip(ordered, ordered[1:]):
        if b_start < a_stop:
            return Refusal("ranges-overlap", f"channel ranges overlap: {a_start}:{a_stop} and {b_start}:{b_stop}")
        if b_start > a_stop:
            return Refusal("ranges-gap", f"channel ranges leave a gap: channels {a_stop}:{b_start} are read by no branch")
    if starts != sorted(starts):
        order = ",".join(f"{s}:{e}" for s, e in ranges)
        return Refusal("out-of-order", f"branches are concatenated out of channel order ({order})")
    if ordered[0][0] != 0:
        return Refusal("ranges-gap", f"channels 0:{ordered[0][0]} are read by no branch")
    if source_channels is None:
        return Refusal("unknown-channels",
                       "cannot prove the branches cover every channel of the source (its channel count is unknown)")
    if ordered[-1][1] != source_channels:
        return Refusal("partial-cover", f"branches read channels 0:{ordered[-1][1]} of {source_channels}; "
                       "a grouped convolution needs them all")
    return None


def plan_fusion(branches: Sequence[Branch], source_channels: int | None, *, stack_axis: int,
                shared_input: bool = False) -> FusionPlan | Refusal:
    """Fuse N branch convolutions into one grouped convolution, or say why not.

    With ``shared_input`` the branches all read the *same* whole tensor (ResNeXt fig. 3 a/b,
    Inception-like 1×1s): they become one wide convolution, kernels stacked on the output axis,
    group unchanged (1); ``source_channels`` is then not read."""
    refusal = fusion_refusal(branches, source_channels, stack_axis=stack_axis, shared_input=shared_input)
    if refusal is not None:
        return refusal
    weight = np.concatenate([b.weight for b in branches], axis=stack_axis)
    bias = None
    if any(b.bias is not None for b in branches):
        # A branch without bias adds zeros: the fused bias must say so explicitly.
        dtype = next(b.bias.dtype for b in branches if b.bias is not None)
        bias = np.concatenate([
            b.bias if b.bias is not None else np.zeros(b.out_channels, dtype=dtype) for b in branches
        ])
    return FusionPlan(
        groups=1 if shared_input else len(branches) * branches[0].groups,
        in_channels=branches[0].width if shared_input else sum(b.width for b in branches),
        out_channels=sum(b.out_channels for b in branches),
        weight=weight,
        bias=bias,
        attributes=dict(branches[0].attributes),
    )


def fusion_refusal(branches: Sequence[Branch], source_channels: int | None, *, stack_axis: int,
                   shared_input: bool = False) -> Refusal | None:
    """Why the branches cannot become one grouped (``shared_input``: one wide) convolution, read
    from their channel ranges, shapes and attributes only, never their weight values; or None."""
    if len(branches) < 2:
        return Refusal("fewer-branches", "fewer than two branches")
    if shared_input:
        if any(b.groups != 1 for b in branches):
            return Refusal("groups-differ", "branches that read the whole input must be plain convolutions (group=1)")
    else:
        refusal = channel_ranges_refusal([(b.channel_start, b.channel_stop) for b in branches], source_channels)
        if refusal is not None:
            return refusal
        widths, outs = [b.width for b in branches], [b.out_channels for b in branches]
        if len(set(widths)) > 1:
            return Refusal("uneven-split", "uneven split: " + ",".join(map(str, widths)) + " channels")
        if len(set(outs)) > 1:
            return Refusal("out-channels-differ", "branches have different output channel counts: "
                           + ",".join(map(str, outs)))
    return settings_refusal(branches, stack_axis=stack_axis)


def settings_refusal(branches: Sequence[Branch], *, stack_axis: int, kernel_axes: Sequence[int] | None = None
                     ) -> Refusal | None:
    """What the branch convolutions do differently by their settings: group counts, kernel
    shapes, weight dtypes, strides/pads/dilations and the rest; or None. Channel counts are not
    judged here, so a reader may ask this first, with weights known only by their shapes
    (``kernel_axes``: the weight axes that make a kernel different, default all but the stack
    axis; the sentence shows the shape less the stack axis), before it reads their values: what
    the branches do differently is the cause a user can act on."""
    groups = [b.groups for b in branches]
    if len(set(groups)) > 1:
        return Refusal("groups-differ", "branches have different group counts: " + ",".join(map(str, groups)))
    shapes = [tuple(b.weight.shape) for b in branches]
    axes = kernel_axes if kernel_axes is not None else \
        [axis for axis in range(len(shapes[0])) if axis != stack_axis % len(shapes[0])]
    if len({tuple(shape[a] for a in axes) if len(shape) == len(shapes[0]) else shape for shape in shapes}) > 1:
        return kernel_refusal([tuple(np.delete(shape, [stack_axis % len(shape)])) for shape in shapes])
    if len({b.weight.dtype for b in branches}) > 1:
        return Refusal("dtype-mismatch", "branches have weights of different dtypes")
    for key in sorted(set().union(*(b.attributes for b in branches))):
        distinct = list(dict.fromkeys(_describe(b.attributes.get(key)) for b in branches))
        if len(distinct) > 1:
            return Refusal("attribute-mismatch", f"different {key} between branches: " + " vs ".join(distinct))
    return None


def kernel_refusal(kernels: Sequence[tuple[int, ...]]) -> Refusal | None:
    """Branch kernels (weight shapes less the stack axis, or a format's kernel attribute) that
    differ, in the words every format uses; or None."""
    if len(set(kernels)) > 1:
        return Refusal("kernel-mismatch", "different kernel shapes between branches: "
                       + " vs ".join(_describe(k) for k in dict.fromkeys(kernels)))
    return None


@dataclass
class ExpansionPlan:
    """One grouped convolution as N plain (or less grouped) branch convolutions."""

    branches: int
    groups_per_branch: int
    channel_ranges: list[tuple[int, int]]
    weights: list[np.ndarray]
    biases: list[np.ndarray | None]


def plan_expansion(weight: np.ndarray, bias: np.ndarray | None, groups: int, in_channels: int,
                   *, stack_axis: int, branches: int | None = None) -> ExpansionPlan | Refusal:
    """Split a grouped convolution into ``branches`` convolutions (default: one per group)."""
    branches = groups if branches is None else branches
    if groups < 2:
        return Refusal("not-grouped", "not a grouped convolution (group=1)")
    # One "branch" would rewrite the conv as itself, and zero would divide by zero.
    if branches < 2 or groups % branches:
        return Refusal("indivisible-groups", f"group={groups} cannot be split into {branches} branches")
    if in_channels % branches or weight.shape[stack_axis] % branches:
        return Refusal("indivisible-groups", f"channels do not divide into {branches} branches")
    width = in_channels // branches
    weights = np.split(weight, branches, axis=stack_axis)
    biases = list(np.split(bias, branches)) if bias is not None else [None] * branches
    return ExpansionPlan(
        branches=branches,
        groups_per_branch=groups // branches,
        channel_ranges=[(i * width, (i + 1) * width) for i in range(branches)],
        weights=weights,
        biases=biases,
    )


DEPTHWISE_KEPT = "depthwise (group == channels) kept: --keep-depthwise"


def expansion_refusal(groups: int, *, depthwise: bool | None, keep_depthwise: bool, min_groups: int,
                      max_groups: int | None) -> Refusal | None:
    """Why ``--expand`` leaves a grouped conv as it is, in the same words for every format (the
    --min-groups/--max-groups range first; ``depthwise`` None: not known yet), or None."""
    if groups < min_groups:
        return Refusal("below-min-groups", f"group={groups} is below --min-groups {min_groups}")
    if max_groups is not None and groups > max_groups:
        return Refusal("above-max-groups", f"group={groups} is above --max-groups {max_groups}")
    if depthwise and keep_depthwise:
        return Refusal("depthwise-kept", DEPTHWISE_KEPT)
    return None


def tail_refusal(sentence: str) -> Refusal:
    """A format's reason why an op after a branch conv is no channel-wise tail, with its code."""
    constant = "are not constant" in sentence or "bounds are not constants" in sentence
    return Refusal("not-constant" if constant else "not-channel-wise", sentence)


def plan_tail(kind: str, configs: Sequence[dict[str, Any]], weights: Sequence[Sequence[np.ndarray]],
              concat_axes: Sequence[int | None]) -> list[np.ndarray] | Refusal:
    """One channel-wise op that follows every branch conv (BatchNorm, an activation...), applied
    once after the fused conv instead: its settings must agree between branches, its per-channel
    parameters are concatenated in branch order.

    ``configs`` are the branches' settings without their names; ``weights`` each branch's
    parameter arrays; ``concat_axes[i]`` is the axis along which parameter ``i`` is per-channel,
    or None when it must be equal in every branch.
    """
    for key in sorted(set().union(*(c.keys() for c in configs))):
        distinct = list(dict.fromkeys(_describe_setting(c.get(key)) for c in configs))
        if len(distinct) > 1:
            return Refusal("tails-differ", f"tails disagree between branches: {kind} {key} " + " vs ".join(distinct[:3]))
    counts = {len(w) for w in weights}
    if len(counts) > 1:
        return Refusal("tails-differ", f"tails disagree between branches: {kind} parameter counts differ")
    fused: list[np.ndarray] = []
    for i, axis in enumerate(concat_axes[:next(iter(counts), 0)]):
        arrays = [np.asarray(w[i]) for w in weights]
        if axis is None:
            if any(a.shape != arrays[0].shape or not np.array_equal(a, arrays[0]) for a in arrays[1:]):
                return Refusal("tails-differ", f"tails disagree between branches: {kind} parameter {i} differs")
            fused.append(arrays[0])
        else:
            fused.append(np.concatenate(arrays, axis=axis))
    return fused


# -- tails: how each channel-wise op's parameters concatenate ---------------------------------

CHANNEL = "channel"  # a vector of one value per channel: concatenated in branch order
EQUAL = "equal"  # must be the same array in every branch; kept once
BROADCAST = "broadcast"  # a constant broadcast against the branch: CHANNEL where it spans the
#                          channel axis with one value per channel, else EQUAL


@dataclass(frozen=True)
class TailRule:
    """How a channel-wise op after the branch convs becomes one op after the fused conv: its
    settings must agree, and each parameter (in the op's input order, data input left out)
    concatenates or must be equal."""

    params: tuple[str, ...] = ()


# One table for every backend, keyed by a format-free op kind; each backend maps its own op names
# onto these kinds (ONNX: passes/onnx/_tails.py ``ONNX_TAIL_KINDS``, TF: passes/tf/fuse_split_conv.py
# ``TF_TAIL_KINDS``, Keras: passes/keras/fuse_grouped_conv.py ``TAIL_CLASSES``).
TAIL_RULES: dict[str, TailRule] = {
    **{kind: TailRule() for kind in ("Activation", "Relu", "Relu6", "Elu", "Selu", "Celu", "Sigmoid", "Tanh", "LeakyRelu",
                                     "Softplus", "Softsign", "HardSigmoid", "HardSwish", "Gelu", "Swish", "Mish",
                                     "ThresholdedRelu", "Identity", "Abs", "Neg", "Erf", "Exp", "Sqrt", "Reciprocal",
                                     "Floor", "Ceil", "Round", "Sign", "Square", "Erfc")},
    "BatchNorm": TailRule((CHANNEL,) * 4),  # scale, offset, mean, variance
    "BiasAdd": TailRule((CHANNEL,)),
    "Clip": TailRule((EQUAL, EQUAL)),  # min, max
    **{kind: TailRule((BROADCAST,)) for kind in ("Add", "Sub", "Mul", "Div", "Max", "Min", "PRelu", "Pow")},
}


def tail_concat_axis(rule: str, shape: Sequence[int], channel_axis: int, rank: int, channels: int) -> int | None | str:
    """Along which axis of a parameter of ``shape`` the branches' parameters concatenate (None:
    they must be equal), for a branch tensor of ``rank`` with ``channels`` on ``channel_axis``;
    a sentence when the parameter cannot be channel-wise."""
    if rule == CHANNEL:
        return 0 if tuple(shape) == (channels,) else f"parameter of shape {list(shape)} is not per-channel"
    if rule == EQUAL:
        return None
    if len(shape) > rank:
        return f"constant of rank {len(shape)} broadcasts the branch"
    axis = channel_axis - (rank - len(shape))  # numpy broadcasting aligns on the right
    if axis >= 0 and shape[axis] not in (1, channels):
        return f"constant of shape {list(shape)} is not per-channel"
    # One channel per branch: a [1] on the channel axis is that branch's own value, concatenated.
    return axis if axis >= 0 and shape[axis] == channels else None


# -- tail graphs: a channel-wise tail of several ops (SiLU as Mul(y, Sigmoid(y)), GELU, Mish) --

GRAPH_INPUT = "input"  # where a tail graph's op reads the branch tensor the graph starts from
GRAPH_CONSTANT = "constant"  # where it reads a constant (a parameter, or a setting such as Clip's bounds)


def describe_tail_graph(kinds: Sequence[str]) -> str:
    """A name for a multi-op channel-wise tail a user recognises (the activation it computes),
    from its op kinds in order; every name says it is a graph, so it never equals one op's kind."""
    ops = set(kinds)
    if "Softplus" in ops and "Tanh" in ops:
        return "Mish (elementwise graph)"
    if "Erf" in ops or "Erfc" in ops:
        return "GELU, erf form (elementwise graph)"
    if "Tanh" in ops and ("Pow" in ops or kinds.count("Mul") >= 4):
        return "GELU, tanh form (elementwise graph)"
    if ops == {"Sigmoid", "Mul"}:
        return "SiLU (elementwise graph)"
    return "elementwise graph (" + ", ".join(dict.fromkeys(kinds)) + ")"


@dataclass
class TailGraphLayer:
    """A multi-op channel-wise tail of every branch at a chain step: a small graph of elementwise
    ops whose only reads from outside are the branch tensor and constants.

    ``wirings[b]`` is branch b's graph as one tuple per op, in one canonical order (each op after
    the ops it reads, the graph's output last): ``(kind, inputs)`` where each input is
    ``GRAPH_INPUT``, ``GRAPH_CONSTANT``, ``(op position, output index)`` or None (absent).
    ``ops[k]`` is op k of every branch as ``plan_tail`` reads it."""

    kind: str
    wirings: list[tuple]
    ops: list[TailLayer]


def plan_tail_graph(layer: TailGraphLayer) -> list[list[np.ndarray]] | Refusal:
    """A multi-op tail after every branch conv applied once after the fused conv: the branches'
    graphs must be wired the same way, op by op, and each op's settings and parameters follow
    ``plan_tail`` (per-channel parameters concatenated, shared ones equal). Returns each op's
    fused parameters, in the graph's order."""
    if any(wiring != layer.wirings[0] for wiring in layer.wirings[1:]):
        return Refusal("tails-differ", f"tails disagree between branches: the {layer.kind} is not wired the same way in every branch")
    fused = []
    for op in layer.ops:
        params = plan_tail(op.kind, op.configs, op.weights, op.concat_axes)
        if isinstance(params, Refusal):
            return params.with_reason(f"{params.reason} (inside the {layer.kind})")
        fused.append(params)
    return fused


# -- chains: several layers per branch ------------------------------------------------------


@dataclass
class ConvLayer:
    """One convolution of every branch at a chain step. For the first layer ``channel_start`` /
    ``channel_stop`` are the source channels a branch reads; for later layers ``0:width``, the
    channels the conv expects of its own branch (``plan_chain`` places them)."""

    branches: list[Branch]


@dataclass
class TailLayer:
    """One channel-wise op of every branch at a chain step, read as ``plan_tail`` takes it."""

    kind: str
    configs: list[dict[str, Any]]
    weights: list[list[np.ndarray]]
    concat_axes: list[int | None]


@dataclass
class ChainPlan:
    """What the branches become, step by step, as far as they agree."""

    # Each fused step: a conv's plan, a tail's parameters, or a tail graph's parameters per op.
    steps: list[FusionPlan | list[np.ndarray] | list[list[np.ndarray]]]
    branch_channels: list[int]  # each branch's channels after the last fused step (for a split back)
    stopped: str | None = None  # where and why the branches stop agreeing; None: every step fused
    stopped_code: str | None = None  # the code of why they stop (gconv_rewrite.reasons)

    @property
    def convs(self) -> list[FusionPlan]:
        return [s for s in self.steps if isinstance(s, FusionPlan)]

    @property
    def groups(self) -> int:
        """The first grouped layer's groups (1 when only a wide conv fused)."""
        return next((c.groups for c in self.convs if c.groups > 1), self.convs[0].groups)


def plan_chain(kinds: Sequence[Sequence[str]],
               read_step: Callable[[int, list[int] | None], ConvLayer | TailLayer | TailGraphLayer | Refusal],
               source_channels: int | None, *,
               conv_kinds: Sequence[str], shared_input: bool, stack_axis: int,
               fuse: Callable[..., FusionPlan | Refusal] | None = None) -> ChainPlan | Refusal:
    """Fuse branches that are chains of convolutions and channel-wise tails, step by step.

    The walk is written once, here; each format hands in its reader. ``kinds[i]`` are branch i's
    op kinds in order (a conv first, or after layout ops such as ONNX's Transpose of tf2onnx's
    NHWC branches); ``read_step(step, branch_channels)`` reads step ``step`` of every branch as
    a ``ConvLayer``, a ``TailLayer``, a ``TailGraphLayer`` or a ``Refusal`` (``branch_channels``:
    each branch's channels after the last conv, None before it); the steps are read in order,
    each once. The first conv layer reads channel ranges of the source (``plan_fusion``) or,
    with ``shared_input``, the whole source (one wide conv); later conv layers each become one
    grouped conv. A refusal up to the first conv refuses the candidate; after it the plan stops
    there and says where and why (the format splits the fused tensor back into the branches' parts).
    ``fuse`` plans each conv layer (default ``plan_fusion``)."""
    steps: list[FusionPlan | list[np.ndarray]] = []
    channels: list[int] = []
    for step in range(min(len(k) for k in kinds)):
        here = sorted({k[step] for k in kinds})
        if len(here) > 1:
            if not channels:  # no conv fused yet
                return Refusal("branches-differ", "branches differ here: " + " vs ".join(here))
            return ChainPlan(steps, channels, "where the branches differ (" + " vs ".join(here) + ")",
                             "branches-differ")
        layer = read_step(step, channels or None)
        if isinstance(layer, ConvLayer):
            outcome = _plan_conv_layer(layer.branches, channels, source_channels, shared_input, stack_axis,
                                       fuse or plan_fusion)
        else:
            outcome = _plan_tail_layer(layer)
        if isinstance(outcome, Refusal):
            if not channels:
                return outcome
            where = "the convolution after" if here[0] in conv_kinds else here[0]
            return ChainPlan(steps, channels, f"{where} ({outcome.reason})", outcome.code)
        steps.append(outcome)
        if isinstance(layer, ConvLayer):
            channels = [b.out_channels for b in layer.branches]
    ends = {len(k) for k in kinds}
    if len(ends) > 1:
        return ChainPlan(steps, channels, "the end of the shortest branch", "branches-differ")
    return ChainPlan(steps, channels)


def _plan_tail_layer(layer: TailLayer | TailGraphLayer | Refusal) -> list | Refusal:
    if isinstance(layer, TailLayer):
        return plan_tail(layer.kind, layer.configs, layer.weights, layer.concat_axes)
    if isinstance(layer, TailGraphLayer):
        return plan_tail_graph(layer)
    return layer


def _plan_conv_layer(branches: list[Branch], channels: list[int], source_channels: int | None, shared_input: bool,
                     stack_axis: int, fuse: Callable[..., FusionPlan | Refusal]) -> FusionPlan | Refusal:
    if not channels:
        return fuse(branches, source_channels, stack_axis=stack_axis, shared_input=shared_input)
    placed, start = [], 0
    for branch, width in zip(branches, channels):
        if branch.width != width:
            return Refusal("width-mismatch", f"{branch.name} expects {branch.width} channels, its branch has {width}")
        placed.append(Branch(branch.name, start, start + width, branch.weight, branch.bias, branch.groups,
                             branch.out_channels, branch.attributes))
        start += width
    return fuse(placed, start, stack_axis=stack_axis)
