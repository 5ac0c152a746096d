"""The invariant of issue #20 ("clean means looked"): each Concat that joins hand-made groups ends
as a rewrite or a "left alone" line, never in silence, over every ONNX idiom the pass knows.

What counts as hand-made groups (the rule ``passes/onnx/fuse_split_conv.py`` applies where its
matcher finds no branches): two or more distinct convolutions behind the Concat's inputs, within
a few nodes, that read Split/Slice outputs of one tensor. Concats of network structure stay
silent, and that is pinned here too: convs of different tensors (a U-Net skip), one conv and
another tensor (DenseNet), one conv read twice, convs of one whole tensor with unmatched branches
(a CSP block)."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
import pytest

from gconv_rewrite.passes.onnx import FuseSplitConvPass
from samples.models import GraphBuilder
from tests.conftest import nodes
from tests.test_fuse_chains import torch_chunk
from tests.test_fuse_split_conv import candidate
from tests.test_multi_node_tails import gelu_erf, mish, per_channel_gate, silu, tail_model
from tests.test_onnx_qdq import qdq_model


def _outcome(model: onnx.ModelProto) -> tuple[set[str], dict[str, str], FuseSplitConvPass]:
    """Run the pass (find and plan only) and say which Concats ended in a rewrite, which in a
    skip (with its reason)."""
    fuse = FuseSplitConvPass(rewrite=False)
    fuse(ir.serde.deserialize_model(model))
    rewritten = {name for rewrite in fuse.rewrites for name in rewrite.nodes}
    return rewritten, {skip.location: skip.reason for skip in fuse.skipped}, fuse


def _concat_names(model: onnx.ModelProto) -> list[str]:
    names = [n.name or n.output[0] for n in nodes(model, "Concat")]
    assert names, "the idiom has a Concat"
    return names


def _cross_branch(b, ys):
    """Each branch's output gated by the other branch: not a tail of one branch."""
    return [b.node("Mul", [ys[0], b.node("Sigmoid", [ys[1]])[0]])[0],
            b.node("Mul", [ys[1], b.node("Sigmoid", [ys[0]])[0]])[0]]


def _outside_gate(b, ys):
    """Each branch multiplied by a run-time tensor from outside (the graph input z)."""
    return [b.node("Mul", [y, b.node("Sigmoid", ["z"])[0]])[0] for y in ys]


def _pooled(b, ys):
    return [b.node("MaxPool", [y], kernel_shape=[1, 1])[0] for y in ys]


def _padded_reads(b, reads):
    return [b.node("Pad", [r, b.const("pads", np.array([0, 0, 1, 1, 0, 0, 1, 1], np.int64))])[0] for r in reads]


def split_branches(after=None, before=None, inputs=()) -> onnx.ModelProto:
    """``x → Split(2) → [before] → Conv_i (3×3) → [after] → Concat``: hooks to put ops the pass
    cannot read between the convs and the Split or the Concat."""
    b = GraphBuilder(17, 0)
    reads = b.split("x", 8, 2)
    reads = before(b, reads) if before else reads
    pads = [0] * 4 if before else [1] * 4
    ys = [b.conv(r, b.weight((4, 4, 3, 3), 36), None, kernel_shape=[3, 3], pads=pads) for r in reads]
    outs = after(b, ys) if after else ys
    z = b.node("Concat", outs, axis=1)[0]
    return b.model([("x", [1, 8, 5, 5])] + [(name, [1, 4, 5, 5]) for name in inputs], [(z, [1, 8, 5, 5])])


IDIOMS = {
    # fused
    "split": lambda: candidate(form="split"),
    "slice": lambda: candidate(form="slice"),
    "qdq": lambda: qdq_model(),
    "one-op tails": lambda: tail_model([lambda b, y, i: b.node("Relu", [y])[0]] * 2),
    "silu": lambda: tail_model([silu, silu]),
    "gelu": lambda: tail_model([gelu_erf] * 4, channels=16, opset=13),
    "mish-1d": lambda: tail_model([mish, mish], spatial=(7,), opset=18),
    "per-channel gate": lambda: tail_model([per_channel_gate] * 2),
    "computed bounds": lambda: torch_chunk(16),
    "grouped branches": lambda: candidate(form="split", channels=16, groups=2, group=2),
    # fused in part, or left alone with a reason
    "differing graphs": lambda: tail_model([silu, mish]),
    "uneven": lambda: candidate(form="split", channels=10, ranges=[(0, 3), (3, 6), (6, 9), (9, 10)]),
    "permuted": lambda: candidate(form="slice", order=[1, 0, 2, 3]),
    "off-axis concat": lambda: candidate(form="split", channels=8, groups=2, concat_axis=2),
    "mixed kernels": lambda: candidate(form="split", per_branch={1: {"kernel": (1, 1)}}),
    "cross-branch tail": lambda: split_branches(after=_cross_branch),
    "tail reads another tensor": lambda: split_branches(after=_outside_gate, inputs=["z"]),
    "pool after the convs": lambda: split_branches(after=_pooled),
    "pad before the convs": lambda: split_branches(before=_padded_reads),
}


@pytest.mark.parametrize("idiom", sorted(IDIOMS))
def test_every_concat_of_groups_is_rewritten_or_reported(idiom):
    model = IDIOMS[idiom]()
    rewritten, skipped, _ = _outcome(model)
    for concat in _concat_names(model):
        assert concat in rewritten or concat in skipped, f"{idiom}: {concat} ended in silence"
        if concat in skipped:
            assert skipped[concat].strip(), "a reason is a sentence"


@pytest.mark.parametrize("idiom,reason", [
    ("cross-branch tail", "after a branch convolution is not a channel-wise op of that branch alone"),
    ("tail reads another tensor", "after a branch convolution is not a channel-wise op of that branch alone"),
    ("pool after the convs", "MaxPool (MaxPool_"),
    ("pad before the convs", "Pad (Pad_"),
])
def test_unmatched_groups_say_what_stopped_the_match(idiom, reason):
    model = IDIOMS[idiom]()
    rewritten, skipped, fuse = _outcome(model)
    (concat,) = _concat_names(model)
    assert rewritten == set() and reason in skipped[concat]
    # The skip names the branch convolutions, so that a user finds them.
    assert sorted(fuse.skipped[0].nodes) == sorted(n.name for n in nodes(model, "Conv"))


def _structure(kind: str) -> onnx.ModelProto:
    b = GraphBuilder(17, 1)
    conv = lambda x, k=3: b.conv(x, b.weight((4, 4, k, k), 4 * k * k), None, kernel_shape=[k, k], pads=[k // 2] * 4)
    if kind == "u-net skip":  # convs of two different tensors
        outs = [conv("x"), conv(b.node("MaxPool", ["x"], kernel_shape=[1, 1])[0])]
    elif kind == "densenet":  # one conv and the tensor it reads
        outs = ["x", conv("x")]
    elif kind == "one conv read twice":
        y = conv("x")
        outs = [b.node("Relu", [y])[0], b.node("Sigmoid", [y])[0]]
    else:  # a CSP block: cat(m(cv1(x)), cv2(x)), m a residual bottleneck
        first = silu(b, conv("x", 1), 0)
        outs = [b.node("Add", [first, silu(b, conv(first), 0)])[0], silu(b, conv("x", 1), 0)]
    z = b.node("Concat", outs, axis=1)[0]
    return b.model([("x", [1, 4, 5, 5])], [(z, [1, 8, 5, 5])])


@pytest.mark.parametrize("kind", ["u-net skip", "densenet", "one conv read twice", "csp block"])
def test_network_structure_stays_silent(kind):
    # Not hand-made groups: reporting them would be noise on every real model.
    model = _structure(kind)
    rewritten, skipped, _ = _outcome(model)
    assert rewritten == set() and skipped == {}
