"""Expand native grouped convolutions of a Keras functional model into N plain ones.

    x → ConvND(groups=N)  ⇒  x → x[..., slice_i] (GetItem) → ConvND_i → Concatenate

For runtimes without grouped convolutions. ``gconv_rewrite.plan.plan_expansion`` owns the rules and
the weight arithmetic (Keras kernels ``[k…, I/g, O]`` split on the last axis). The Concatenate
takes the grouped conv's name, so its consumers and the model's output names stay as they were.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from gconv_rewrite.names import fresh_name
from gconv_rewrite.passes.keras import _compat
from gconv_rewrite.passes.keras._build import keras_name, layer_object
from gconv_rewrite.passes.keras._config import Call, KerasGraph, TensorRef, WeightStore
from gconv_rewrite.passes.keras.fuse_grouped_conv import CONV_CLASSES
from gconv_rewrite.plan import ExpansionPlan, Refusal, expansion_refusal, plan_expansion
from gconv_rewrite.report import Rewrite, Skip
from gconv_rewrite.targets import ConvProps, Decision

KIND = "keras-expand-grouped-conv"
# Keras's depthwise layers are no grouped Conv layer to expand: they hold the depthwise kernel
# itself, the op that runtimes without grouped convolutions (TFLite, MNN...) run natively.
DEPTHWISE_CLASSES = ("DepthwiseConv1D", "DepthwiseConv2D")
DEPTHWISE_LAYER_KEPT = ("depthwise ({cls}) kept: it is already the depthwise kernel, which runtimes without "
                        "grouped convolutions run as their own op; nothing to expand")


@dataclass
class ExpandedConv:
    """One planned expansion; as a ``_build.Replacement`` it emits the branches."""

    conv: Call
    plan: ExpansionPlan
    channel_axis: int
    legacy: bool
    names: list[str]  # per branch: slice name, conv name
    removed: set[tuple[str, int]] = field(default_factory=set)

    @property
    def source(self) -> TensorRef:
        return self.conv.inputs[0]

    def emit(self, source_tensor) -> dict[TensorRef, Any]:
        import keras

        conv = layer_object(self.conv.layer, self.legacy)
        config = conv.get_config()
        rank = len(source_tensor.shape)
        outputs = []
        for i, ((start, stop), weight, bias) in enumerate(zip(self.plan.channel_ranges, self.plan.weights,
                                                             self.plan.biases)):
            key = (Ellipsis, slice(start, stop)) if self.channel_axis == rank - 1 else \
                tuple([slice(None)] * self.channel_axis + [slice(start, stop)])
            piece = _compat.get_item(self.names[2 * i])(source_tensor, key)
            branch = type(conv).from_config({**config, "name": self.names[2 * i + 1], "groups": self.plan.groups_per_branch,
                                            "filters": int(weight.shape[-1])})
            with _compat.unrandom_initial_values():  # set_weights gives it every value
                out = branch(piece)
            branch.set_weights([weight] + ([bias] if bias is not None else []))
            outputs.append(out)
        joined = keras.layers.Concatenate(axis=self.channel_axis - rank, name=keras_name(self.conv.layer.name))(outputs)
        return {TensorRef(self.conv.layer.name, self.conv.index, 0): joined}


class ExpandGroupedConv:
    """Plan the expansion of every grouped ConvND layer call, or say why not.

    ``accept(props) -> (ok, rule)``, when given, is asked about each grouped conv (``--target``):
    a refused one is kept, reported as a skip with the rule as its reason; each judged conv is
    also listed in ``decisions``. Calls in ``exclude`` (keys a fuse pass of the same run removes)
    are left alone unreported."""

    def __init__(self, graph: KerasGraph, weights: WeightStore, shape_of, *, keep_depthwise: bool = False,
                 min_groups: int = 2, max_groups: int | None = None,
                 accept: Callable[[ConvProps], tuple[bool, str]] | None = None,
                 exclude: Iterable[tuple[str, int]] = ()):
        self.accept = accept
        self.exclude = set(exclude)
        self.decisions: list[Decision] = []  # per judged conv
        self.graph = graph
        self.weights = weights
        self.shape_of = shape_of
        self.keep_depthwise = keep_depthwise
        self.min_groups = min_groups
        self.max_groups = max_groups
        self.names = set(graph.layers)
        self.groups: list[ExpandedConv] = []
        self.rewrites: list[Rewrite] = []
        self.skipped: list[Skip] = []

    def run(self) -> ExpandGroupedConv:
        for call in self.graph.calls():
            layer = call.layer
            if layer.class_name in DEPTHWISE_CLASSES and self.accept is None and call.key not in self.exclude:
                # Said once per layer (a shared layer has several calls), as the ONNX side says it.
                if call.index == 0:
                    self.skipped.append(Skip(layer.name, DEPTHWISE_LAYER_KEPT.format(cls=layer.class_name),
                                             [layer.name], code="depthwise-kept"))
                continue
            groups = int(layer.config.get("groups", 1) or 1)
            if layer.class_name not in CONV_CLASSES or groups < 2 or call.key in self.exclude:
                continue
            verdict = self._judge(call, groups)
            refusal = Refusal("target-keeps", verdict[1]) if verdict is not None and not verdict[0] else \
                self._refuse(call, groups)
            if verdict is not None and (refusal or not verdict[0]):
                rule = verdict[1] if not verdict[0] else f"{verdict[1]}; but {refusal.reason}"
                self.decisions.append(Decision(location=layer.name, graph="", form="native", action="keep",
                                               rule=rule))
            if refusal:
                self.skipped.append(Skip.refused(layer.name, refusal, [layer.name]))
                continue
            arrays = self.weights.get(layer.name)
            kernel = arrays[0]
            bias = arrays[1] if len(arrays) > 1 and layer.config.get("use_bias", True) else None
            shape = self.shape_of(call.inputs[0])
            data_format = layer.config.get("data_format") or "channels_last"
            axis = len(shape) - 1 if data_format == "channels_last" else 1
            plan = plan_expansion(kernel, bias, groups, shape[axis], stack_axis=-1)
            if isinstance(plan, Refusal):
                if verdict is not None:
                    self.decisions.append(Decision(location=layer.name, graph="", form="native", action="keep",
                                                   rule=f"{verdict[1]}; but {plan.reason}"))
                self.skipped.append(Skip.refused(layer.name, plan, [layer.name]))
                continue
            if verdict is not None:
                self.decisions.append(Decision(location=layer.name, graph="", form="split", action="expand",
                                               rule=verdict[1]))
            names = []
            for i in range(plan.branches):
                names += [self._fresh(f"{layer.name}_slice{i}"), self._fresh(f"{layer.name}_branch{i}")]
            self.groups.append(ExpandedConv(call, plan, axis, self.graph.legacy, names, {call.key}))
            self.rewrites.append(Rewrite(kind=KIND, location=layer.name, groups=groups,
                                         channels={"in": int(shape[axis]), "out": int(kernel.shape[-1])},
                                         nodes=[layer.name],
                                         # the expansion's Concatenate takes the conv's name
                                         boundary=[{"tensor": layer.name, "written_tensor": keras_name(layer.name)}]))
        return self

    def _refuse(self, call: Call, groups: int) -> Refusal | None:
        """Why the layer stays grouped: what the Keras graph rules out, then the range and
        depthwise checks in ``plan.expansion_refusal``'s order and words, as ONNX and TF say them."""
        if len(call.inputs) != 1:
            return Refusal("unsupported-form", "the convolution reads several tensors")
        if len(call.layer.calls) != 1:
            return Refusal("unsupported-form", "the layer is shared by several calls")
        shape = self.shape_of(call.inputs[0])
        if not shape:
            return Refusal("unknown-channels", "the shape of its input is unknown")
        channels_last = (call.layer.config.get("data_format") or "channels_last") == "channels_last"
        refusal = expansion_refusal(groups, depthwise=groups == shape[-1 if channels_last else 1],
                                    keep_depthwise=self.keep_depthwise, min_groups=self.min_groups,
                                    max_groups=self.max_groups)
        if refusal is not None:
            return refusal
        if not self.weights.get(call.layer.name):
            return Refusal("no-weights", "the file holds no weights for it")
        return None

    def _judge(self, call: Call, groups: int) -> tuple[bool, str] | None:
        """The ``accept`` hook's verdict on one grouped conv; None without a hook, a known input
        shape or weights (or for a depthwise conv --keep-depthwise keeps)."""
        if self.accept is None or len(call.inputs) != 1:
            return None
        shape = self.shape_of(call.inputs[0])
        arrays = self.weights.get(call.layer.name)
        if not shape or not arrays:
            return None
        channels_last = (call.layer.config.get("data_format") or "channels_last") == "channels_last"
        in_channels = shape[-1 if channels_last else 1]
        if in_channels is None or (self.keep_depthwise and groups == in_channels):
            return None
        return self.accept(ConvProps(groups=groups, in_channels=int(in_channels), out_channels=int(arrays[0].shape[-1]),
                                     kernel_rank=CONV_CLASSES[call.layer.class_name]))

    def _fresh(self, base: str) -> str:
        return fresh_name(keras_name(base), self.names)
