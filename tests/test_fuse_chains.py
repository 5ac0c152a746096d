"""onnx.fuse-split-conv beyond the textbook pattern (issue 3), on graphs built in code: channel-wise
tails, tails that stop agreeing (split back), shared-input ResNeXt chains, ConvTranspose,
depthwise, tf2onnx's NHWC layouts, and the near misses with their reasons.

Every test checks the structure (op counts, groups, what stays per branch, the report) and the
numbers (``fusion.run``: onnxruntime with its optimisations off, original vs fused); every fused
result is fused again (nothing more to rewrite) and the original fused twice (same bytes).
"""

from __future__ import annotations

import numpy as np
import onnx
import pytest

import gconv_rewrite
from samples.models import GraphBuilder
from tests.conftest import Outcome, attribute, dead_constants, nodes

CONV_OPS = ("Conv", "ConvTranspose")
PATTERN_OPS = ("Split", "Slice", "Concat")


# -- building branches ---------------------------------------------------------------------
#
# A step is ``step(b, y, i, channels) -> (y, channels)``: what branch ``i`` does to its tensor ``y``
# of ``channels`` channels. Parameters are random per branch, so a mix-up of branches shows in the
# numbers.


def conv(out: int, k: int = 3, *, bias: bool = True, op: str = "Conv", **attrs):
    def step(b: GraphBuilder, y: str, i: int, channels: int):
        shape = (out, channels, k, k) if op == "Conv" else (channels, out, k, k)
        weight = b.weight(shape, channels * k * k)
        inputs = [y, b.const("W", weight)]
        if bias if isinstance(bias, bool) else bias(i):
            inputs.append(b.const("B", (b.rng.standard_normal(out) * 0.3).astype(np.float32)))
        attrs.setdefault("pads", [k // 2] * 4)
        return b.node(op, inputs, kernel_shape=[k, k], **attrs)[0], out
    return step


def bn(epsilon: float = 1e-3):
    def step(b, y, i, c):
        params = [1 + 0.2 * b.rng.standard_normal(c), 0.2 * b.rng.standard_normal(c), 0.2 * b.rng.standard_normal(c),
                  0.5 + b.rng.random(c)]
        names = [b.const(n, p.astype(np.float32)) for n, p in zip(("scale", "shift", "mean", "var"), params)]
        return b.node("BatchNormalization", [y, *names], epsilon=epsilon)[0], c
    return step


def unary(op: str, **attrs):
    def step(b, y, i, c):
        return b.node(op, [y], **{k: (v(i) if callable(v) else v) for k, v in attrs.items()})[0], c
    return step


def clip_inputs(low: float, high: float):  # opset >= 11
    def step(b, y, i, c):
        return b.node("Clip", [y, b.const("min", np.float32(low)), b.const("max", np.float32(high))])[0], c
    return step


def per_channel(op: str, shape: str):
    """Add/Mul of a constant of shape [1,C,1,1] or [C,1,1], different in every channel."""
    def step(b, y, i, c):
        dims = {"1C11": (1, c, 1, 1), "C11": (c, 1, 1)}[shape]
        values = (1 + 0.5 * b.rng.standard_normal(dims)).astype(np.float32)
        return b.node(op, [y, b.const(op.lower(), values)])[0], c
    return step


def shared_scalar(op: str, value: float):
    """Add/Mul of one scalar constant that every branch reads (one initializer)."""
    name = {}

    def step(b, y, i, c):
        if b not in name:
            name[b] = b.const("scalar", np.float32(value))
        return b.node(op, [y, name[b]])[0], c
    return step


def equal_scalar(op: str, value: float):
    """The same scalar, but each branch has its own copy of it."""
    def step(b, y, i, c):
        return b.node(op, [y, b.const("scalar", np.float32(value))])[0], c
    return step


def branches(steps, *, n: int = 4, channels: int = 16, reader: str = "slice", opset: int = 17, spatial=(6, 6),
             order=None, seed: int = 0, extra_outputs=(), x_shape=None) -> onnx.ModelProto:
    """``x → reader → N × steps → Concat(axis=1) → y``. ``steps``: a list, or ``steps(i)`` for
    branches that differ. reader: "slice", "split", "num_outputs" (opset 18) or "shared" (every
    branch reads x whole). ``extra_outputs(b, ys)``: more graph outputs, e.g. a branch value."""
    b = GraphBuilder(opset, seed)
    width = channels // n
    if reader == "shared":
        entries, width = ["x"] * n, channels
    elif reader == "slice":
        entries = [b.slice("x", i * width, (i + 1) * width) for i in range(n)]
    else:
        entries = b.split("x", channels, n, style="num_outputs" if reader == "num_outputs" else "auto")
    ends, seen = [], {}
    for i, y in enumerate(entries):
        c = width
        for step in (steps(i) if callable(steps) else steps):
            y, c = step(b, y, i, c)
            seen.setdefault(i, []).append(y)
        ends.append(y)
    y = b.node("Concat", [ends[i] for i in (order or range(n))], axis=1, name="join")[0]
    outputs = [(y, [None] * 4)] + [(name, [None] * 4) for name in (extra_outputs(seen) if extra_outputs else [])]
    return b.model([("x", x_shape or [1, channels, *spatial])], outputs)


# -- checking ------------------------------------------------------------------------------


def convs(model: onnx.ModelProto) -> list[tuple[str, int, int]]:
    """(op, group, output channels) of every conv, in graph order."""
    found = []
    weights = {i.name: i.dims for i in model.graph.initializer}
    for node in model.graph.node:
        if node.op_type in CONV_OPS:
            dims = weights[node.input[1]]
            group = attribute(node, "group", 1)
            found.append((node.op_type, group, dims[0] if node.op_type == "Conv" else dims[1] * group))
    return found


def stable(fusion, outcome: Outcome) -> Outcome:
    """Fusing the fused model rewrites nothing; fusing the original again gives the same bytes."""
    again = gconv_rewrite.fuse(outcome.fused_path, output=fusion.tmp_path / "again.onnx", verify=False, force=True)
    assert again.report.rewrites == []
    if not outcome.report.skipped:  # completely fused: nothing left to even look at
        assert again.report.skipped == []
    twice = fusion.tmp_path / "twice.onnx"
    gconv_rewrite.fuse(outcome.original_path, output=twice, verify=False, force=True)
    assert twice.read_bytes() == outcome.fused_path.read_bytes()
    return outcome


def fused(fusion, model, *, groups: int, convs_after, ops_after: dict, shapes=None) -> Outcome:
    """Completely fused: one rewrite, no skip, nothing of the pattern left, and exactly
    ``ops_after`` (op counts) and ``convs_after`` [(op, group, out channels)]."""
    outcome = fusion.run(model, shapes=shapes)
    assert ([r.groups for r in outcome.report.rewrites], outcome.reasons()) == ([groups], [])
    for op in PATTERN_OPS:
        assert op not in outcome.after, outcome.after
    assert convs(outcome.fused) == convs_after
    assert outcome.after == ops_after
    assert dead_constants(outcome.fused) == []
    return stable(fusion, outcome)


def partly_fused(fusion, model, *, groups: int, ops_after: dict, stopped: list[str]) -> Outcome:
    """Fused as far as the branches agree, then a Split back and the rest per branch: one Rewrite
    and one Skip that says where it stopped."""
    outcome = fusion.run(model)
    assert [r.groups for r in outcome.report.rewrites] == [groups]
    (skip,) = outcome.report.skipped
    assert skip.reason.startswith("fused up to "), skip.reason
    for words in stopped:
        assert words in skip.reason, skip.reason
    assert outcome.after == ops_after
    assert dead_constants(outcome.fused) == []
    return stable(fusion, outcome)


# -- per-branch channel-wise tails ----------------------------------------------------------


@pytest.mark.parametrize("reader", ["slice", "split", "num_outputs"])
def test_conv_bn_relu(fusion, reader):
    model = branches([conv(6), bn(), unary("Relu")], reader=reader, opset=18 if reader == "num_outputs" else 17)
    outcome = fused(fusion, model, groups=4, convs_after=[("Conv", 4, 24)],
                    ops_after={"Conv": 1, "BatchNormalization": 1, "Relu": 1})
    (bn_node,) = nodes(outcome.fused, "BatchNormalization")
    assert attribute(bn_node, "epsilon") == pytest.approx(1e-3)


TAILS = {
    "clip-inputs": ([clip_inputs(-0.5, 0.7)], 17, {"Clip": 1}),
    "clip-min-only": ([lambda b, y, i, c: (b.node("Clip", [y, b.const("min", np.float32(0.1))])[0], c)], 13,
                      {"Clip": 1}),
    "clip-attrs-opset10": ([unary("Clip", min=-0.5, max=0.7)], 10, {"Clip": 1}),
    "clip-attrs-opset9": ([unary("Clip", min=-0.5, max=0.7)], 9, {"Clip": 1}),
    "leaky-relu": ([unary("LeakyRelu", alpha=0.1)], 17, {"LeakyRelu": 1}),
    "sigmoid": ([unary("Sigmoid")], 17, {"Sigmoid": 1}),
    "hard-swish": ([unary("HardSwish")], 14, {"HardSwish": 1}),
    "add-1C11": ([per_channel("Add", "1C11")], 17, {"Add": 1}),
    "mul-1C11": ([per_channel("Mul", "1C11")], 17, {"Mul": 1}),
    "add-C11": ([per_channel("Add", "C11")], 17, {"Add": 1}),
    "mul-C11": ([per_channel("Mul", "C11")], 17, {"Mul": 1}),
    "add-shared-scalar": ([shared_scalar("Add", 0.25)], 17, {"Add": 1}),
    "add-equal-scalars": ([equal_scalar("Add", 0.25)], 17, {"Add": 1}),
    "bn-as-mul-add-relu": ([per_channel("Mul", "1C11"), per_channel("Add", "1C11"), unary("Relu")], 17,
                           {"Mul": 1, "Add": 1, "Relu": 1}),
    "bn-leaky-mul-sigmoid": ([bn(1e-5), unary("LeakyRelu", alpha=0.3), per_channel("Mul", "C11"), unary("Sigmoid")],
                             17, {"BatchNormalization": 1, "LeakyRelu": 1, "Mul": 1, "Sigmoid": 1}),
}


@pytest.mark.parametrize("name", list(TAILS))
def test_channel_wise_tail_applied_once(fusion, name):
    tail, opset, counts = TAILS[name]
    model = branches([conv(4), *tail], opset=opset, reader="slice" if opset >= 10 else "split")
    outcome = fused(fusion, model, groups=4, convs_after=[("Conv", 4, 16)], ops_after={"Conv": 1, **counts})
    if name == "add-shared-scalar":
        (add,) = nodes(outcome.fused, "Add")
        assert add.input[1] in {i.name for i in model.graph.initializer}  # the branches' own scalar, kept
    if name.startswith("clip-attrs"):
        (clip,) = nodes(outcome.fused, "Clip")
        assert (attribute(clip, "min"), attribute(clip, "max")) == pytest.approx((-0.5, 0.7))


def test_constant_on_the_left_of_sub(fusion):
    # Sub(c, y) is not Sub(y, c): the side of the constant is part of what must agree.
    step = lambda b, y, i, c: (b.node("Sub", [b.const("c", np.arange(c, dtype=np.float32).reshape(1, c, 1, 1) + i), y])[0], c)
    fused(fusion, branches([conv(4), step]), groups=4, convs_after=[("Conv", 4, 16)], ops_after={"Conv": 1, "Sub": 1})


def test_tail_constants_from_constant_nodes_inside_the_branches(fusion):
    # PyTorch writes ReLU6 as Clip(y, Constant, Constant) with the Constant nodes inline, after
    # the branch's conv; the fused Clip goes in front of all branches and must not read them.
    b = GraphBuilder(17, 0)
    ends = []
    for i in range(4):
        y = conv(4)(b, b.slice("x", 4 * i, 4 * i + 4), i, 4)[0]
        bounds = [b.node("Constant", [], value=onnx.numpy_helper.from_array(np.array(v, np.float32)))[0]
                  for v in (0.0, 0.6)]
        y = b.node("Clip", [y, *bounds])[0]
        shift = b.node("Constant", [], value=onnx.numpy_helper.from_array(np.array(0.1, np.float32)))[0]
        ends.append(b.node("Add", [y, shift])[0])
    model = b.model([("x", [1, 16, 5, 5])], [(b.node("Concat", ends, axis=1)[0], [None] * 4)])
    fused(fusion, model, groups=4, convs_after=[("Conv", 4, 16)], ops_after={"Conv": 1, "Clip": 1, "Add": 1})


# -- tails that stop agreeing: fused up to there, split back, the rest per branch -------------


def test_leaky_relu_alpha_differs_in_one_branch(fusion):
    model = branches(lambda i: [conv(4), bn(), unary("LeakyRelu", alpha=0.2 if i == 2 else 0.1)])
    outcome = partly_fused(fusion, model, groups=4,
                           ops_after={"Conv": 1, "BatchNormalization": 1, "Split": 1, "LeakyRelu": 4, "Concat": 1},
                           stopped=["LeakyRelu", "alpha", "0.1", "0.2"])
    (split,) = nodes(outcome.fused, "Split")
    assert attribute(split, "axis") == 1
    sizes = {i.name: onnx.numpy_helper.to_array(i) for i in outcome.fused.graph.initializer}[split.input[1]]
    assert sizes.tolist() == [4, 4, 4, 4]
    assert convs(outcome.fused) == [("Conv", 4, 16)]


def test_relu_vs_sigmoid(fusion):
    model = branches(lambda i: [conv(4), per_channel("Mul", "1C11"), unary("Sigmoid" if i == 3 else "Relu")])
    outcome = partly_fused(fusion, model, groups=4,
                           ops_after={"Conv": 1, "Mul": 1, "Split": 1, "Relu": 3, "Sigmoid": 1, "Concat": 1},
                           stopped=["Relu vs Sigmoid"])
    assert outcome.reasons() == ["fused up to where the branches differ (Relu vs Sigmoid); "
                                 "the rest stays per branch"]


def test_nhwc_tails_disagree_split_back_on_axis_3(fusion):
    # tf2onnx without its optimizers: ... → Conv → Transpose(0,2,3,1) → LeakyRelu → Concat(axis=3).
    b = GraphBuilder(17, 1)
    ends = []
    for i in range(4):
        y = b.node("Transpose", [b.slice("x", 4 * i, 4 * i + 4, axis=3)], perm=[0, 3, 1, 2])[0]
        y = b.node("Transpose", [conv(5)(b, y, i, 4)[0]], perm=[0, 2, 3, 1])[0]
        ends.append(b.node("LeakyRelu", [y], alpha=0.2 if i == 1 else 0.1)[0])
    model = b.model([("x", [1, 6, 7, 16])], [(b.node("Concat", ends, axis=3)[0], [None] * 4)])
    outcome = partly_fused(fusion, model, groups=4,
                           ops_after={"Transpose": 2, "Conv": 1, "Split": 1, "LeakyRelu": 4, "Concat": 1},
                           stopped=["LeakyRelu", "alpha"])
    (split,) = nodes(outcome.fused, "Split")
    assert attribute(split, "axis") == 3


def test_split_back_before_opset_13_uses_the_attribute(fusion):
    model = branches(lambda i: [conv(3), unary("LeakyRelu", alpha=0.2 if i == 0 else 0.1)], opset=11, n=2,
                     channels=8)
    outcome = partly_fused(fusion, model, groups=2, ops_after={"Conv": 1, "Split": 1, "LeakyRelu": 2, "Concat": 1},
                           stopped=["LeakyRelu"])
    (split,) = nodes(outcome.fused, "Split")
    assert list(split.input) == [split.input[0]] and attribute(split, "split") == [3, 3]


def test_one_branch_is_longer(fusion):
    model = branches(lambda i: [conv(4), unary("Relu")] + ([unary("Sigmoid")] if i == 1 else []))
    partly_fused(fusion, model, groups=4, ops_after={"Conv": 1, "Relu": 1, "Split": 1, "Sigmoid": 1, "Concat": 1},
                 stopped=["end of the shortest branch"])


def test_second_layer_differs(fusion):
    # ResNeXt-like, but the last branch's 3x3 is a 5x5: one wide 1x1 (+ BN, Relu), then per branch.
    model = branches(lambda i: [conv(4, 1, pads=[0] * 4), bn(), unary("Relu"), conv(4, 5 if i == 3 else 3)],
                     reader="shared")
    outcome = partly_fused(fusion, model, groups=1,
                           ops_after={"Conv": 5, "BatchNormalization": 1, "Relu": 1, "Split": 1, "Concat": 1},
                           stopped=["convolution", "kernel"])
    assert convs(outcome.fused)[0] == ("Conv", 1, 16)


# -- ResNeXt, fig. 3: branches that read the same tensor -------------------------------------


@pytest.mark.parametrize("n,width", [(4, 4), (8, 2)])
def test_resnext_form_a_to_c(fusion, n, width):
    step = [conv(width, 1, pads=[0] * 4), bn(), unary("Relu"), conv(width, 3), bn(), unary("Relu")]
    model = branches(step, reader="shared", n=n, channels=16)
    outcome = fused(fusion, model, groups=n, convs_after=[("Conv", 1, n * width), ("Conv", n, n * width)],
                    ops_after={"Conv": 2, "BatchNormalization": 2, "Relu": 2})
    assert outcome.report.rewrites[0].kind == "fuse-parallel-branches"
    assert outcome.report.rewrites[0].channels == {"in": 16, "out": n * width}


def test_resnext_depth_three(fusion):
    step = [conv(4, 1, pads=[0] * 4), unary("Relu"), conv(4, 3), bn(), unary("Relu"), conv(6, 1, pads=[0] * 4),
            per_channel("Add", "C11")]
    outcome = fused(fusion, branches(step, reader="shared"), groups=4,
                    convs_after=[("Conv", 1, 16), ("Conv", 4, 16), ("Conv", 4, 24)],
                    ops_after={"Conv": 3, "Relu": 2, "BatchNormalization": 1, "Add": 1})
    assert outcome.report.rewrites[0].channels == {"in": 16, "out": 24}


def test_sliced_chain_of_two_grouped_layers(fusion):
    step = [conv(4, 3), unary("Relu"), conv(8, 1, pads=[0] * 4)]
    fused(fusion, branches(step, reader="split"), groups=4, convs_after=[("Conv", 4, 16), ("Conv", 4, 32)],
          ops_after={"Conv": 2, "Relu": 1})


def test_shared_input_single_layer_is_one_wide_conv(fusion):
    # Inception's parallel 1x1s of equal kernels: one wide conv, group 1.
    outcome = fused(fusion, branches([conv(3, 1, pads=[0] * 4), unary("Relu")], reader="shared"), groups=1,
                    convs_after=[("Conv", 1, 12)], ops_after={"Conv": 1, "Relu": 1})
    assert outcome.report.rewrites[0].kind == "fuse-parallel-branches"


def test_shared_nhwc_input_one_transpose(fusion):
    # Every branch transposes the same NHWC tensor itself: one Transpose in front of the wide conv.
    b = GraphBuilder(17, 1)
    ends = []
    for i in range(4):
        y = b.node("Transpose", ["x"], perm=[0, 3, 1, 2])[0]
        y = unary("Relu")(b, conv(4, 1, pads=[0] * 4)(b, y, i, 16)[0], i, 4)[0]
        ends.append(conv(4)(b, y, i, 4)[0])
    model = b.model([("x", [1, 6, 7, 16])], [(b.node("Concat", ends, axis=1)[0], [None] * 4)])
    fused(fusion, model, groups=4, convs_after=[("Conv", 1, 16), ("Conv", 4, 16)],
          ops_after={"Transpose": 1, "Conv": 2, "Relu": 1})


def test_second_layer_grouped_within_its_branch(fusion):
    # Nested groups multiply: 4 branches of a group=2 conv are one group=8 conv.
    def grouped(b, y, i, c):
        return b.node("Conv", [y, b.const("W", b.weight((4, 2, 3, 3), 18))], kernel_shape=[3, 3], pads=[1] * 4,
                      group=2)[0], 4
    fused(fusion, branches([conv(4), unary("Relu"), grouped]), groups=4,
          convs_after=[("Conv", 4, 16), ("Conv", 8, 16)], ops_after={"Conv": 2, "Relu": 1})


def test_inception_like_different_kernels(fusion):
    model = branches(lambda i: [conv(4, [1, 3, 5, 3][i])], reader="shared")
    fusion.untouched(model, "different kernel shapes between branches")


# -- ConvTranspose, depthwise ---------------------------------------------------------------


@pytest.mark.parametrize("reader", ["slice", "split"])
def test_conv_transpose_branches(fusion, reader):
    step = [conv(3, 3, op="ConvTranspose", bias=lambda i: i != 1, strides=[2, 2], pads=[1, 1, 1, 1],
                 output_padding=[1, 1]), unary("Relu")]
    outcome = fused(fusion, branches(step, reader=reader), groups=4, convs_after=[("ConvTranspose", 4, 12)],
                    ops_after={"ConvTranspose": 1, "Relu": 1})
    (node,) = nodes(outcome.fused, "ConvTranspose")
    weights = {i.name: onnx.numpy_helper.to_array(i) for i in outcome.fused.graph.initializer}
    assert weights[node.input[1]].shape == (16, 3, 3, 3)
    assert weights[node.input[2]][3:6].tolist() == [0, 0, 0]  # branch 1 had no bias
    assert (attribute(node, "strides"), attribute(node, "output_padding")) == ([2, 2], [1, 1])


def test_conv_then_conv_transpose(fusion):
    step = [conv(4), unary("Relu"), conv(3, 4, op="ConvTranspose", strides=[2, 2], pads=[1] * 4)]
    fused(fusion, branches(step), groups=4, convs_after=[("Conv", 4, 16), ("ConvTranspose", 4, 12)],
          ops_after={"Conv": 1, "Relu": 1, "ConvTranspose": 1})


def test_conv_transpose_reading_a_shared_input_is_refused(fusion):
    model = branches([conv(3, 3, op="ConvTranspose")], reader="shared", n=2)
    fusion.untouched(model, "ConvTranspose")


@pytest.mark.parametrize("reader", ["slice", "num_outputs"])
def test_depthwise(fusion, reader):
    model = branches([conv(2, 3), unary("Relu")], n=8, channels=8, reader=reader,
                     opset=18 if reader == "num_outputs" else 17)
    fused(fusion, model, groups=8, convs_after=[("Conv", 8, 16)], ops_after={"Conv": 1, "Relu": 1})


# -- tf2onnx's NHWC layouts -------------------------------------------------------------------


def nhwc(*, reader: str = "slice", concat: str = "nchw", n: int = 4, width: int = 4, tail=True, axis: int = 3):
    """x (NHWC) → Slice(axis 3) | Split(axis -1) → Transpose(0,3,1,2) → Conv [→ Mul → Relu] →
    Concat(axis=1) → Transpose(0,2,3,1), or with ``concat="nhwc"`` a Transpose(0,2,3,1) per branch
    and Concat(axis=3)."""
    b = GraphBuilder(17, 1)
    channels = n * width
    if reader == "slice":
        parts = [b.slice("x", i * width, (i + 1) * width, axis=axis) for i in range(n)]
    else:
        parts = b.split("x", channels, n, axis=axis, style="equal")
    ends = []
    for part in parts:
        y = b.node("Transpose", [part], perm=[0, 3, 1, 2])[0]
        y, c = conv(5, 3)(b, y, 0, width)
        if tail:
            y, c = per_channel("Mul", "1C11")(b, y, 0, c)
            y = b.node("Relu", [y])[0]
        if concat == "nhwc":
            y = b.node("Transpose", [y], perm=[0, 2, 3, 1])[0]
        ends.append(y)
    y = b.node("Concat", ends, axis=1 if concat == "nchw" else 3)[0]
    if concat == "nchw":
        y = b.node("Transpose", [y], perm=[0, 2, 3, 1])[0]
    return b.model([("x", [1, 6, 7, channels])], [(y, [None] * 4)])


@pytest.mark.parametrize("reader,axis", [("slice", 3), ("slice", -1), ("split", -1), ("split", 3)])
@pytest.mark.parametrize("concat", ["nchw", "nhwc"])
def test_nhwc_branches(fusion, reader, axis, concat):
    model = nhwc(reader=reader, concat=concat, axis=axis)
    before = sum(n.op_type == "Transpose" for n in model.graph.node)
    outcome = fused(fusion, model, groups=4, convs_after=[("Conv", 4, 20)],
                    ops_after={"Transpose": 2, "Conv": 1, "Mul": 1, "Relu": 1})
    assert before > outcome.after["Transpose"]
    order = [n.op_type for n in outcome.fused.graph.node if n.op_type != "Constant"]
    assert order == ["Transpose", "Conv", "Mul", "Relu", "Transpose"]


def test_nchw_branches_concatenated_as_nhwc(fusion):
    # No Transpose before the convs, one per branch after them: Concat on axis 3.
    b = GraphBuilder(17, 2)
    ends = []
    for i in range(4):
        y, _ = conv(5, 3)(b, b.slice("x", 4 * i, 4 * i + 4), i, 4)
        ends.append(b.node("Transpose", [y], perm=[0, 2, 3, 1])[0])
    model = b.model([("x", [1, 16, 6, 7])], [(b.node("Concat", ends, axis=3)[0], [None] * 4)])
    fused(fusion, model, groups=4, convs_after=[("Conv", 4, 20)], ops_after={"Conv": 1, "Transpose": 1})


# -- near misses and their reasons ------------------------------------------------------------


@pytest.mark.parametrize("reader", ["slice", "split", "shared"])
def test_permuted_concat_order(fusion, reader):
    model = branches([conv(4), unary("Relu")], reader=reader, order=[1, 0, 2, 3])
    if reader == "shared":
        # Reading the same tensor, any order is one wide conv: nothing to refuse.
        fused(fusion, model, groups=1, convs_after=[("Conv", 1, 16)], ops_after={"Conv": 1, "Relu": 1})
    else:
        fusion.untouched(model, "out of channel order")


@pytest.mark.parametrize("where", [0, 1, 2])  # the conv output, the BN output, the Relu output
@pytest.mark.parametrize("reader", ["slice", "shared"])
def test_branch_value_used_outside(fusion, where, reader):
    model = branches([conv(4), bn(), unary("Relu")], reader=reader, extra_outputs=lambda seen: [seen[1][where]])
    name = [n for n in model.graph.node if n.op_type in ("Conv", "BatchNormalization", "Relu")][3 + where].output[0]
    outcome = fusion.untouched(model, "used outside the Concat")
    assert name in outcome.report.skipped[0].reason


def test_all_branches_used_outside_midway(fusion):
    # Every branch's BN output is also a graph output: still a candidate, still a reason.
    model = branches([conv(4), bn(), unary("Relu")], n=2, channels=8,
                     extra_outputs=lambda seen: [seen[0][1], seen[1][1]])
    fusion.untouched(model, "used outside the Concat")


def test_one_conv_read_twice_is_not_a_candidate(fusion):
    # Concat(Relu(y), Sigmoid(y)) of one conv output y: no branches, nothing to report.
    b = GraphBuilder(17, 0)
    y = conv(8)(b, "x", 0, 8)[0]
    out = b.node("Concat", [b.node("Relu", [y])[0], b.node("Sigmoid", [y])[0]], axis=1)[0]
    outcome = fusion.run(b.model([("x", [1, 8, 5, 5])], [(out, [None] * 4)]))
    assert outcome.report.rewrites == [] and outcome.report.skipped == []


def torch_chunk(channel_dim, n: int = 4, width: int = 4, inner: bool = False) -> onnx.ModelProto:
    """PyTorch's legacy torch.chunk bounds: Shape → Gather(1) → Add(n-1) → Div(n) → Mul(i+1).
    ``inner``: chunk a Relu(Conv(x)) with no recorded shape (a ResNeXt block's 3x3 input)."""
    b = GraphBuilder(17, 3)
    source = "x"
    if inner:
        source = unary("Relu")(b, conv(n * width, 1, pads=[0] * 4)(b, "x", 0, n * width)[0], 0, n * width)[0]
    shape = b.node("Shape", [source])[0]
    channel_count = b.node("Gather", [shape, b.const("one", np.array(1, np.int64))], axis=0)[0]
    size = b.node("Div", [b.node("Add", [channel_count, b.const("nm1", np.array(n - 1, np.int64))])[0],
                          b.const("n", np.array(n, np.int64))])[0]
    axes = b.const("axes", np.array([1], np.int64))
    start, ends = b.const("zero", np.array([0], np.int64)), []
    for i in range(n):
        end = b.node("Mul", [size, b.const("k", np.array([i + 1], np.int64))])[0]
        part = b.node("Slice", [source, start, end, axes])[0]
        ends.append(conv(4, 3)(b, part, i, width)[0])
        start = end
    y = b.node("Concat", ends, axis=1)[0]
    return b.model([("x", ["batch", channel_dim, 6, 6])], [(y, [None] * 4)])


def test_shape_bounds_with_static_channels_fuse(fusion):
    fused(fusion, torch_chunk(16), groups=4, convs_after=[("Conv", 4, 16)], ops_after={"Conv": 1},
          shapes={"x": [2, 16, 6, 6]})


def test_shape_bounds_of_an_unshaped_inner_tensor_fuse(fusion):
    # The chunked tensor has no recorded shape; its channels are read off the conv that made it.
    model = torch_chunk("C", inner=True)
    assert not any(v.name == model.graph.node[1].output[0] for v in model.graph.value_info)
    fused(fusion, model, groups=4, convs_after=[("Conv", 1, 16), ("Conv", 4, 16)], ops_after={"Conv": 2, "Relu": 1},
          shapes={"x": [2, 16, 6, 6]})


def test_shape_bounds_with_symbolic_channels_are_left_alone(fusion):
    # ceil(C/4)·i cannot be proven to be 4·i without knowing C.
    fusion.untouched(torch_chunk("C"), "not provably constant", shapes={"x": [2, 16, 6, 6]})


def test_branch_applies_an_op_before_its_conv(fusion):
    model = branches(lambda i: [unary("Relu"), conv(4)], n=2, channels=8)
    fusion.untouched(model, "applies Relu before its convolution")
