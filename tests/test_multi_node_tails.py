"""Multi-op channel-wise tails (issue #20, finding 7): SiLU exported as ``Mul(y, Sigmoid(y))``, GELU
in its erf and tanh forms, Mish, and any graph of elementwise ops that reads only its own branch
and constants, fuse like one-op tails: the graph is applied once after the grouped conv, its
per-channel constants concatenated. ONNX models built with onnx.helper (1D and 2D, opsets 13 and
18); TF SavedModels built with tf.Module. Each test checks the structure and the numbers."""

from __future__ import annotations

import collections
import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np
import onnx
import pytest

import gconv_rewrite
from samples.models import INT64_MAX, GraphBuilder
from tests.conftest import attribute, constants, nodes
from tests.helpers import saved_model_output

SQRT2 = np.float32(np.sqrt(2.0))
TANH_SCALE = np.float32(np.sqrt(2.0 / np.pi))


def _scalar(b: GraphBuilder, value: float) -> str:
    return b.const("c", np.array(value, np.float32))


def silu(b, y, i):
    return b.node("Mul", [y, b.node("Sigmoid", [y])[0]])[0]


def silu_sigmoid_first(b, y, i):
    return b.node("Mul", [b.node("Sigmoid", [y])[0], y])[0]


def gelu_erf(b, y, i, half=0.5):
    """The form the PyTorch dynamo exporter and onnxscript write."""
    erf = b.node("Erf", [b.node("Div", [y, _scalar(b, SQRT2)])[0]])[0]
    return b.node("Mul", [b.node("Mul", [y, _scalar(b, half)])[0], b.node("Add", [erf, _scalar(b, 1.0)])[0]])[0]


def gelu_erf_legacy(b, y, i):
    """The form the PyTorch legacy exporter writes: the 0.5 applied last."""
    erf = b.node("Erf", [b.node("Div", [y, _scalar(b, SQRT2)])[0]])[0]
    return b.node("Mul", [b.node("Mul", [y, b.node("Add", [erf, _scalar(b, 1.0)])[0]])[0], _scalar(b, 0.5)])[0]


def _gelu_tanh(b, y, cube):
    inner = b.node("Add", [y, b.node("Mul", [_scalar(b, 0.044715), cube])[0]])[0]
    tanh = b.node("Tanh", [b.node("Mul", [_scalar(b, TANH_SCALE), inner])[0]])[0]
    return b.node("Mul", [b.node("Mul", [_scalar(b, 0.5), y])[0], b.node("Add", [_scalar(b, 1.0), tanh])[0]])[0]


def gelu_tanh_pow(b, y, i):
    return _gelu_tanh(b, y, b.node("Pow", [y, _scalar(b, 3.0)])[0])


def gelu_tanh_mul(b, y, i):
    return _gelu_tanh(b, y, b.node("Mul", [y, b.node("Mul", [y, y])[0]])[0])


def mish(b, y, i):
    return b.node("Mul", [y, b.node("Tanh", [b.node("Softplus", [y])[0]])[0]])[0]


def hard_swish(b, y, i):
    """y * Clip(y + 3, 0, 6) / 6 (Clip bounds as inputs: opset >= 11)."""
    clipped = b.node("Clip", [b.node("Add", [y, _scalar(b, 3.0)])[0], _scalar(b, 0.0), _scalar(b, 6.0)])[0]
    return b.node("Mul", [y, b.node("Div", [clipped, _scalar(b, 6.0)])[0]])[0]


def per_channel_gate(b, y, i, rank=4, out=4):
    """y * Sigmoid(y * s_i + 1), s_i one value per channel and different in every branch."""
    scale = b.const("s", (np.arange(out, dtype=np.float32) + 1 + 10 * i).reshape((1, out) + (1,) * (rank - 2)) / 20)
    gate = b.node("Sigmoid", [b.node("Add", [b.node("Mul", [y, scale])[0], _scalar(b, 1.0)])[0]])[0]
    return b.node("Mul", [gate, y])[0]


def sub_gate(b, y, i, swapped=False):
    sig = b.node("Sigmoid", [y])[0]
    return b.node("Sub", [sig, y] if swapped else [y, sig])[0]


TAILS = {"silu": silu, "silu-sigmoid-first": silu_sigmoid_first, "gelu-erf": gelu_erf,
         "gelu-erf-legacy": gelu_erf_legacy, "gelu-tanh-pow": gelu_tanh_pow, "gelu-tanh-mul": gelu_tanh_mul,
         "mish": mish, "hard-swish": hard_swish}


def tail_model(tails, *, form="split", opset=17, spatial=(5, 5), channels=8, out=4, seed=0,
               side_output=False) -> onnx.ModelProto:
    """``x → Split | Slices → Conv_i → tails[i](y_i) → Concat → z``: one tail builder per branch.
    ``side_output``: branch 0's first tail op output is also a graph output."""
    b = GraphBuilder(opset, seed)
    groups, rank = len(tails), len(spatial) + 2
    width = channels // groups
    if form == "split":
        reads = b.split("x", channels, groups)
    else:
        reads = [b.slice("x", i * width, INT64_MAX if i == groups - 1 else (i + 1) * width) for i in range(groups)]
    kernel = [3] * len(spatial)
    outs, extra = [], []
    for i, (read, tail) in enumerate(zip(reads, tails)):
        weight = b.weight((out, width, *kernel), width * 3 ** len(spatial))
        y = b.conv(read, weight, (b.rng.standard_normal(out) * 0.5).astype(np.float32), kernel_shape=kernel,
                   pads=[1] * 2 * len(spatial))
        first = len(b.nodes)
        outs.append(tail(b, y, i, rank=rank, out=out) if tail is per_channel_gate else tail(b, y, i))
        if side_output and i == 0:
            extra.append((b.nodes[first].output[0], [1, out, *spatial]))
    z = b.node("Concat", outs, axis=1)[0]
    return b.model([("x", [1, channels, *spatial])], [(z, [1, out * groups, *spatial])] + extra)


def assert_tail_once(outcome, groups: int) -> None:
    """One Conv(group=N), no Split/Slice/Concat, every tail op once instead of N times, and the
    fused tail reads the fused conv."""
    assert [r.groups for r in outcome.report.rewrites] == [groups]
    assert outcome.report.skipped == [], outcome.reasons()
    before, after = outcome.before, outcome.after
    assert after["Conv"] == 1 and attribute(nodes(outcome.fused, "Conv")[0], "group") == groups
    assert not {"Split", "Slice", "Concat"} & set(after)
    tail_ops = {op: count for op, count in before.items() if op not in ("Conv", "Split", "Slice", "Concat")}
    assert tail_ops, "the test model has a tail"
    assert {op: after.get(op, 0) for op in tail_ops} == {op: count // groups for op, count in tail_ops.items()}
    conv_output = nodes(outcome.fused, "Conv")[0].output[0]
    readers = [n.op_type for n in outcome.fused.graph.node if conv_output in n.input]
    assert readers and all(op != "Conv" for op in readers)


# -- ONNX: every form fuses, 1D and 2D, opsets 13 and 18 ---------------------------------------


@pytest.mark.parametrize("opset", [13, 18])
@pytest.mark.parametrize("spatial", [(7,), (5, 5)], ids=["conv1d", "conv2d"])
@pytest.mark.parametrize("name", sorted(TAILS))
def test_multi_op_tail_fuses_once(fusion, name, spatial, opset):
    model = tail_model([TAILS[name]] * 2, form="split" if opset == 13 else "slice", opset=opset, spatial=spatial)
    assert_tail_once(fusion.run(model), groups=2)


@pytest.mark.parametrize("spatial", [(7,), (5, 5)], ids=["conv1d", "conv2d"])
def test_per_channel_constants_inside_the_graph_concatenate(fusion, spatial):
    model = tail_model([per_channel_gate] * 4, channels=16, spatial=spatial, opset=18)
    outcome = fusion.run(model)
    assert_tail_once(outcome, groups=4)
    # The Mul by s_i of each branch became one Mul by their concatenation along the channel axis.
    scales = [constants(model)[n.input[1]] for n in nodes(model, "Mul") if n.input[1].startswith("s_")]
    (fused_mul,) = [n for n in nodes(outcome.fused, "Mul") if n.input[1] in constants(outcome.fused)]
    np.testing.assert_array_equal(constants(outcome.fused)[fused_mul.input[1]], np.concatenate(scales, axis=1))


def test_graph_tail_after_batch_norm_and_before_a_second_grouped_layer(fusion):
    """timm's ResNeXt-ts block as torch.chunk writes it: Conv → BN → SiLU per branch, then a
    second conv per branch; both layers fuse, each SiLU once."""
    b = GraphBuilder(17, 5)
    outs = []
    for i, read in enumerate(b.split("x", 8, 2)):
        y = b.conv(read, b.weight((4, 4, 3, 3), 36), None, kernel_shape=[3, 3], pads=[1] * 4)
        params = [b.const("bn", b.rng.uniform(0.5, 1.5, 4).astype(np.float32)) for _ in range(4)]
        y = silu(b, b.node("BatchNormalization", [y, *params])[0], i)
        outs.append(silu(b, b.conv(y, b.weight((4, 4, 1, 1), 4), None, kernel_shape=[1, 1]), i))
    z = b.node("Concat", outs, axis=1)[0]
    outcome = fusion.run(b.model([("x", [1, 8, 5, 5])], [(z, [1, 8, 5, 5])]))
    assert [r.groups for r in outcome.report.rewrites] == [2] and outcome.report.skipped == []
    assert collections.Counter(attribute(n, "group") for n in nodes(outcome.fused, "Conv")) == {2: 2}
    assert outcome.after == {"Conv": 2, "BatchNormalization": 1, "Sigmoid": 2, "Mul": 2}


# -- ONNX near misses: fused as far as the branches agree, or left alone, always with a reason --


def test_different_activation_graphs_split_back(fusion):
    outcome = fusion.run(tail_model([silu, mish]))
    assert [r.groups for r in outcome.report.rewrites] == [2]
    assert outcome.reasons() == ["fused up to where the branches differ "
                                 "(Mish (elementwise graph) vs SiLU (elementwise graph)); the rest stays per branch"]
    assert outcome.after["Split"] == 1 and outcome.after["Sigmoid"] == 1 and outcome.after["Softplus"] == 1


def test_scalar_that_differs_inside_the_graph(fusion):
    outcome = fusion.run(tail_model([gelu_erf, lambda b, y, i: gelu_erf(b, y, i, half=0.6)]))
    (reason,) = outcome.reasons()
    assert reason.startswith("fused up to GELU, erf form (elementwise graph) (tails disagree between branches: Mul")
    assert "differs (inside the GELU, erf form (elementwise graph))" in reason
    assert outcome.after["Erf"] == 2  # each branch keeps its own GELU


def test_graphs_wired_differently(fusion):
    # y - Sigmoid(y) and Sigmoid(y) - y: the same ops, not the same function.
    outcome = fusion.run(tail_model([sub_gate, lambda b, y, i: sub_gate(b, y, i, swapped=True)]))
    (reason,) = outcome.reasons()
    assert "is not wired the same way in every branch" in reason and outcome.after["Sub"] == 2


def test_intermediate_value_read_outside_is_refused(fusion):
    model = tail_model([silu, silu], side_output=True)
    sigmoid = nodes(model, "Sigmoid")[0].output[0]
    fusion.untouched(model, f"branch value {sigmoid} is used outside the Concat")


# -- TF SavedModels ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tf_models(tmp_path_factory):
    import tensorflow as tf

    from tests.tf_models import save_module

    activations = {
        "silu": tf.nn.silu,
        "sigmoid-times-y": lambda y, i: tf.sigmoid(y) * y,
        "gelu-erf": lambda y, i: tf.nn.gelu(y, approximate=False),
        "gelu-tanh": lambda y, i: tf.nn.gelu(y, approximate=True),
        "mish": lambda y, i: y * tf.tanh(tf.nn.softplus(y)),
        "gate": lambda y, i: y * tf.sigmoid(y * tf.constant(np.linspace(0.1, 1.0, 6, dtype=np.float32) + i) + 1.0),
        "differ": lambda y, i: tf.nn.silu(y) if i < 2 else y * tf.tanh(tf.nn.softplus(y)),
    }

    class Branches(tf.Module):
        """x → tf.split(4) → conv2d (or conv1d) → activation(y, i) per branch → concat."""

        def __init__(self, activation, rank=4):
            super().__init__()
            rng = np.random.default_rng(0)
            self.activation, self.rank = activation, rank
            shape = (3, 3, 4, 6) if rank == 4 else (3, 4, 6)
            self.kernels = [tf.Variable(rng.standard_normal(shape).astype(np.float32) * 0.3) for _ in range(4)]

        def serve(self, x):
            conv = tf.nn.conv2d if self.rank == 4 else tf.nn.conv1d
            activation = self.activation if self.activation is not tf.nn.silu else (lambda y, i: tf.nn.silu(y))
            return tf.concat([activation(conv(part, self.kernels[i], 1, "SAME"), i)
                              for i, part in enumerate(tf.split(x, 4, axis=-1))], -1)

    folder = tmp_path_factory.mktemp("tf_multi_node_tails")
    saved = {name: save_module(Branches(fn), folder / name) for name, fn in activations.items()}
    saved["silu-conv1d"] = save_module(Branches(activations["silu"], rank=3), folder / "silu-conv1d", shape=(1, 8, 16))
    return saved


@pytest.mark.parametrize("name", ["silu", "sigmoid-times-y", "gelu-erf", "gelu-tanh", "mish", "gate", "silu-conv1d"])
def test_tf_multi_op_tail_fuses_once(tf_models, tmp_path, name):
    report = gconv_rewrite.fuse(tf_models[name], output=tmp_path / "fused").report
    assert [r.groups for r in report.rewrites] == [4] and report.skipped == []
    before, after = report.before.op_counts, report.after.op_counts
    assert before["Conv2D"] == 4 and after["Conv2D"] == 1 and "ConcatV2" not in after and "Split" not in after
    tail_ops = {op: n for op, n in before.items() if op not in ("Conv2D", "ConcatV2", "Split", "ExpandDims", "Squeeze")}
    assert tail_ops and {op: after.get(op, 0) for op in tail_ops} == {op: n // 4 for op, n in tail_ops.items()}
    assert report.verification.passed
    shape = (1, 8, 16) if name.endswith("conv1d") else (1, 8, 8, 16)
    x = np.random.default_rng(1).standard_normal(shape).astype(np.float32)
    np.testing.assert_allclose(saved_model_output(tmp_path / "fused", x), saved_model_output(tf_models[name], x), rtol=1e-4, atol=1e-4)


def test_tf_different_activation_graphs_split_back(tf_models, tmp_path):
    report = gconv_rewrite.fuse(tf_models["differ"], output=tmp_path / "fused").report
    assert [r.groups for r in report.rewrites] == [4]
    assert [s.reason for s in report.skipped] == [
        "fused up to where the branches differ (Mish (elementwise graph) vs SiLU (elementwise graph)); "
        "the rest stays per branch"]
    assert report.after.op_counts["SplitV"] == 1 and report.verification.passed
    x = np.random.default_rng(2).standard_normal((1, 8, 8, 16)).astype(np.float32)
    np.testing.assert_allclose(saved_model_output(tmp_path / "fused", x), saved_model_output(tf_models["differ"], x), rtol=1e-4, atol=1e-4)
