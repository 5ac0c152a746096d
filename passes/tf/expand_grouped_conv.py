"""Expand grouped Conv2Ds in a TF graph into one Conv2D per group.

    x → Conv2D(filter [kH, kW, C/N, O])  ⇒  x → Split(N) → Conv2D_i(filter [kH, kW, C/N, O/N]) → ConcatV2

For runtimes without grouped convolutions: TF 2.21 on CPU with oneDNN off fails on a grouped
``Conv2D + BiasAdd + Relu`` ("Fused conv implementation does not support grouped convolutions
for now"); the expanded graph runs there. What follows the convolution (BiasAdd, activation)
stays as it is, after the ConcatV2. ``gconv_rewrite.plan.plan_expansion`` splits the weights.
Only Conv2D: TensorFlow has no grouped Conv3D kernel on CPU (a Conv3D filter shallower than its
input fails, with oneDNN and without; ``gconv_rewrite.passes.tf.fuse_split_conv.CONV3D_REFUSAL``), so there is no
grouped Conv3D to expand.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import numpy as np
import tensorflow as tf
from tensorflow.core.framework import graph_pb2, node_def_pb2

from gconv_rewrite.passes.tf import _graph as g
from gconv_rewrite.plan import Refusal, expansion_refusal, plan_expansion
from gconv_rewrite.report import Rewrite, Skip
from gconv_rewrite.targets import ConvProps, Decision


class ExpandGroupedConvPass:
    """Rewrite every grouped Conv2D (filter depth C/N, N ≥ 2) into Split → N Conv2D → ConcatV2.

    ``accept(props) -> (ok, rule)``, when given, is asked about each grouped conv (``--target``):
    a refused one is kept, reported as a skip with the rule as its reason; each judged conv is
    also listed in ``decisions``. Convs named in ``exclude`` (what a fuse pass just wrote) are
    left alone unreported."""

    def __init__(self, *, rewrite: bool = True, keep_depthwise: bool = False, min_groups: int = 2,
                 max_groups: int | None = None, accept: Callable[[ConvProps], tuple[bool, str]] | None = None,
                 exclude: Iterable[str] = ()):
        self.rewrite = rewrite
        self.keep_depthwise = keep_depthwise
        self.min_groups = min_groups
        self.max_groups = max_groups
        self.accept = accept
        self.exclude = set(exclude)
        self.decisions: list[Decision] = []  # per judged conv
        self.rewrites: list[Rewrite] = []
        self.skipped: list[Skip] = []

    def __call__(self, graph_def: graph_pb2.GraphDef, protected: set[str]) -> graph_pb2.GraphDef:
        """Return the rewritten graph (``graph_def`` itself is left as it was)."""
        graph_def = graph_pb2.GraphDef.FromString(graph_def.SerializeToString())
        index = g.GraphIndex(graph_def, protected)
        names = g.Names(graph_def)
        replaced: dict[str, list[node_def_pb2.NodeDef]] = {}
        for conv in [n for n in graph_def.node if n.op == "Conv2D"]:
            channel_axis = 3 if g.attr_str(conv, "data_format", "NHWC") == "NHWC" else 1
            shape = index.shape(conv.input[0])
            in_channels = shape[channel_axis] if shape is not None and len(shape) == 4 else None
            weight = index.const(conv.input[1])
            if in_channels is None:
                continue  # cannot tell whether it is grouped; TF's shape inference did not know either
            if weight is None:
                if _filter_depth(index, conv) not in (None, in_channels):
                    self.skipped.append(Skip(conv.name, "filter is not a constant", [conv.name], code="not-constant"))
                continue
            depth = weight.shape[2]
            if in_channels == depth or conv.name in self.exclude:
                continue  # a plain convolution, or one a fuse pass of this run just wrote
            groups = in_channels // depth
            verdict = None
            if self.accept is not None and groups > 1 and not (groups == in_channels and self.keep_depthwise):
                verdict = self.accept(ConvProps(groups=groups, in_channels=in_channels,
                                                out_channels=int(weight.shape[3]),
                                                kernel_rank=1 if _is_conv1d(index, conv) else 2))
            refusal = Refusal("target-keeps", verdict[1]) if verdict is not None and not verdict[0] else \
                self._refuse(groups, in_channels, weight.shape[3])
            plan = plan_expansion(weight, None, groups, in_channels, stack_axis=-1) if refusal is None else None
            if isinstance(plan, Refusal):
                refusal = plan
            reason = refusal.reason if refusal is not None else None
            if verdict is not None:
                expands = reason is None
                rule = verdict[1] if expands or not verdict[0] else f"{verdict[1]}; but {reason}"
                self.decisions.append(Decision(location=conv.name, graph="", form="split" if expands else "native",
                                               action="expand" if expands else "keep", rule=rule))
            if refusal is not None:
                self.skipped.append(Skip.refused(conv.name, refusal, [conv.name]))
                continue
            if self.rewrite:
                replaced[conv.name] = self._emit(names, conv, plan, channel_axis)
            self.rewrites.append(Rewrite(kind="expand-grouped-conv", location=conv.name, groups=groups,
                                         channels={"in": in_channels, "out": int(weight.shape[3])},
                                         nodes=[conv.name],
                                         # the ConcatV2 of the groups takes the conv's name
                                         boundary=[{"tensor": g.tensor_name(conv.name)}]))
        if not replaced:
            return graph_def
        nodes = []
        for node in graph_def.node:
            nodes.extend(replaced.get(node.name, [node]) if node.op == "Conv2D" else [node])
        del graph_def.node[:]
        graph_def.node.extend(nodes)
        keep = [g.split_input(t)[0] for t in protected] + [n.name for n in nodes if n.op == "Placeholder"]
        return g.prune(graph_def, keep)

    def _refuse(self, groups: int, in_channels: int, out_channels: int) -> Refusal | None:
        refusal = expansion_refusal(groups, depthwise=groups == in_channels, keep_depthwise=self.keep_depthwise,
                                    min_groups=self.min_groups, max_groups=self.max_groups)
        if refusal is not None:
            return refusal
        if out_channels % groups:
            return Refusal("indivisible-groups", f"{out_channels} output channels do not divide into {groups} groups")
        return None

    def _emit(self, names: g.Names, conv, plan, channel_axis: int) -> list[node_def_pb2.NodeDef]:
        """Split → N Conv2D → ConcatV2; the ConcatV2 takes the Conv2D's name, so its readers need no change."""
        dtype = conv.attr["T"]
        axis = g.make_const(names.fresh(f"{conv.name}/split_dim"), np.array(channel_axis, np.int32))
        split = g.make_node("Split", names.fresh(f"{conv.name}/split"), [axis.name, conv.input[0]],
                            T=dtype, num_split=plan.branches)
        nodes = [axis, split]
        outputs = []
        for i, weight in enumerate(plan.weights):
            filter_node = g.make_const(names.fresh(f"{conv.name}/group{i}/filter"), np.ascontiguousarray(weight))
            branch = node_def_pb2.NodeDef()
            branch.CopyFrom(conv)
            branch.name = names.fresh(f"{conv.name}/group{i}")
            del branch.input[:]
            branch.input.extend([f"{split.name}:{i}", filter_node.name])
            nodes.extend([filter_node, branch])
            outputs.append(branch.name)
        concat_axis = g.make_const(names.fresh(f"{conv.name}/concat_axis"), np.array(channel_axis, np.int32))
        concat = g.make_node("ConcatV2", conv.name, outputs + [concat_axis.name], T=dtype, N=plan.branches,
                             Tidx=tf.int32)
        return nodes + [concat_axis, concat]


def _is_conv1d(index: g.GraphIndex, conv) -> bool:
    """TF writes a Conv1D as ExpandDims → Conv2D → Squeeze."""
    node, _ = index.producer(index.skip_identity(conv.input[0]))
    return node is not None and node.op == "ExpandDims"


def _filter_depth(index: g.GraphIndex, conv) -> int | None:
    shape = index.shape(conv.input[1])
    return shape[2] if shape is not None and len(shape) == 4 else None
