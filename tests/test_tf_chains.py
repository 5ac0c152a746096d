"""SavedModels: branches that are chains of layers (issue 14, as the ONNX pass fuses them).

- sliced chains, ``x → Split → [Conv2D → BiasAdd → Relu → Conv2D] → ConcatV2``: each layer one
  grouped Conv2D;
- ResNeXt fig. 3 a/b → c: N branches of 1×1 → 3×3 (with FusedBatchNorm + Relu tails) on the same
  whole x: one wide 1×1 (group 1), then one grouped 3×3;
- near misses: a 3×3 with another stride in one branch (fused up to there, split back, reported);
- Conv3D branches: reported, never grouped (TensorFlow has no grouped Conv3D kernel on CPU).

Every rewritten model is proven by the tool's own verification, and its outputs are compared here
once more."""

from __future__ import annotations

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np
import pytest
import tensorflow as tf

import gconv_rewrite
from gconv_rewrite.passes.tf.fuse_split_conv import CONV3D_REFUSAL
from tests.helpers import saved_model_ops, saved_model_output
from tests.tf_models import save_module


def _weights(seed: int, shape, scale: float = 0.3) -> tf.Variable:
    return tf.Variable(np.random.default_rng(seed).standard_normal(shape).astype(np.float32) * scale)


def _vector(seed: int, size: int, low: float = -1.0, high: float = 1.0) -> tf.Variable:
    return tf.Variable(np.random.default_rng(seed).uniform(low, high, size).astype(np.float32))


class SlicedChain(tf.Module):
    """x [.., 16] → tf.split(4) → conv2d 3×3 (4→4) + bias_add → relu → conv2d 1×1 (4→8) → concat."""

    def __init__(self, *, second_stride=(1, 1, 1, 1)):
        super().__init__()
        self.first = [_weights(i, (3, 3, 4, 4)) for i in range(4)]
        self.bias = [_vector(10 + i, 4) for i in range(4)]
        self.second = [_weights(20 + i, (1, 1, 4, 8)) for i in range(4)]
        self.second_stride = second_stride

    def serve(self, x):
        ys = []
        for i, part in enumerate(tf.split(x, 4, axis=-1)):
            y = tf.nn.relu(tf.nn.bias_add(tf.nn.conv2d(part, self.first[i], 1, "SAME"), self.bias[i]))
            ys.append(tf.nn.conv2d(y, self.second[i], self.second_stride if i == 3 else 1, "SAME"))
        return {"y": tf.concat(ys, axis=-1)}


class ResNeXtBlock(tf.Module):
    """ResNeXt fig. 3 (a): ``n`` branches, each 1×1 (16→width) → fused_batch_norm → relu → 3×3
    (width→width) → fused_batch_norm → relu, all on the same x, concatenated. ``strides``: the 3×3
    strides per branch."""

    def __init__(self, n=4, width=4, strides=None):
        super().__init__()
        self.n, self.strides = n, strides or [1] * n
        self.reduce = [_weights(i, (1, 1, 16, width)) for i in range(n)]
        self.spatial = [_weights(30 + i, (3, 3, width, width)) for i in range(n)]
        self.norms = [[_vector(100 + 10 * i + j, width, *((0.5, 1.5) if j in (0, 3) else (-1, 1)))
                       for j in range(4)] for i in range(2 * n)]

    def _bn_relu(self, y, k):
        scale, offset, mean, variance = self.norms[k]
        y, _, _ = tf.compat.v1.nn.fused_batch_norm(y, scale, offset, mean, variance, epsilon=1e-3,
                                                   is_training=False)
        return tf.nn.relu(y)

    def serve(self, x):
        ys = []
        for i in range(self.n):
            y = self._bn_relu(tf.nn.conv2d(x, self.reduce[i], 1, "VALID"), 2 * i)
            ys.append(self._bn_relu(tf.nn.conv2d(y, self.spatial[i], self.strides[i], "SAME"), 2 * i + 1))
        return {"y": tf.concat(ys, axis=-1)}


class Conv1DChain(tf.Module):
    """x [N, W, 16] → tf.split(2) → conv1d 3 (8→6) + bias → relu → conv1d 1 (6→4) → concat."""

    def __init__(self):
        super().__init__()
        self.first = [_weights(40 + i, (3, 8, 6)) for i in range(2)]
        self.bias = [_vector(50 + i, 6) for i in range(2)]
        self.second = [_weights(60 + i, (1, 6, 4)) for i in range(2)]

    def serve(self, x):
        ys = []
        for i, part in enumerate(tf.split(x, 2, axis=-1)):
            y = tf.nn.relu(tf.nn.bias_add(tf.nn.conv1d(part, self.first[i], 1, "SAME"), self.bias[i]))
            ys.append(tf.nn.conv1d(y, self.second[i], 1, "SAME"))
        return {"y": tf.concat(ys, axis=-1)}


class Conv3DBranches(tf.Module):
    """x [N, D, H, W, 8] (NDHWC) → tf.split(2) → conv3d 3×3×3 (4→6) → concat; or, ``shared``, 2
    branches of 1×1×1 (8→4) → relu → 3×3×3 (4→4) on the same x."""

    def __init__(self, shared=False):
        super().__init__()
        self.shared = shared
        if shared:
            self.first = [_weights(70 + i, (1, 1, 1, 8, 4)) for i in range(2)]
            self.second = [_weights(80 + i, (3, 3, 3, 4, 4)) for i in range(2)]
        else:
            self.kernels = [_weights(90 + i, (3, 3, 3, 4, 6)) for i in range(2)]

    def serve(self, x):
        if self.shared:
            ys = [tf.nn.conv3d(tf.nn.relu(tf.nn.conv3d(x, a, [1] * 5, "VALID")), b, [1] * 5, "SAME")
                  for a, b in zip(self.first, self.second)]
        else:
            ys = [tf.nn.conv3d(p, k, [1] * 5, "SAME") for p, k in zip(tf.split(x, 2, axis=-1), self.kernels)]
        return {"y": tf.concat(ys, axis=-1)}


X = np.random.default_rng(7).standard_normal((2, 8, 8, 16)).astype(np.float32)
# One row: a 3×3 with stride 2 in height gives the same 1-row output as stride 1 (SAME padding),
# so branches that differ only in that stride still concatenate.
ROW = np.random.default_rng(8).standard_normal((2, 1, 8, 16)).astype(np.float32)
SEQUENCE = np.random.default_rng(9).standard_normal((2, 12, 16)).astype(np.float32)
VOLUME = np.random.default_rng(10).standard_normal((1, 4, 6, 6, 8)).astype(np.float32)


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tf_chains")
    return {
        "sliced": save_module(SlicedChain(), folder / "sliced", shape=(None, 8, 8, 16)),
        "sliced_stride": save_module(SlicedChain(second_stride=(1, 2, 1, 1)), folder / "sliced_stride",
                                     shape=(None, 1, 8, 16)),
        "resnext": save_module(ResNeXtBlock(), folder / "resnext", shape=(None, 8, 8, 16)),
        "resnext8": save_module(ResNeXtBlock(n=8, width=2), folder / "resnext8", shape=(None, 8, 8, 16)),
        "resnext_stride": save_module(ResNeXtBlock(strides=[1, 1, 1, (2, 1)]), folder / "resnext_stride",
                                      shape=(None, 1, 8, 16)),
        "conv1d": save_module(Conv1DChain(), folder / "conv1d", shape=(None, 12, 16)),
        "conv3d": save_module(Conv3DBranches(), folder / "conv3d", shape=(None, 4, 6, 6, 8)),
        "conv3d_shared": save_module(Conv3DBranches(shared=True), folder / "conv3d_shared", shape=(None, 4, 6, 6, 8)),
    }


def _grouped_filters(saved_model) -> list[tuple[str, int]]:
    """(op, groups) of each conv in the written signature: input channels / filter depth."""
    from gconv_rewrite.passes.tf import _graph as g
    from gconv_rewrite.passes.tf.savedmodel import load_signature

    graph_def = load_signature(saved_model).graph_def
    index = g.GraphIndex(graph_def)
    found = []
    for node in graph_def.node:
        if node.op in ("Conv2D", "Conv3D"):
            channels_last = g.attr_str(node, "data_format", "NHWC").endswith("C")
            shape = index.shape(node.input[0])
            depth = index.shape(node.input[1])[-2]
            found.append((node.op, shape[-1 if channels_last else 1] // depth))
    return found


def _fuse_and_compare(model, tmp_path, x):
    outcome = gconv_rewrite.fuse(model, output=tmp_path / "fused")
    report = outcome.report
    assert report.verification.passed, report.verification
    np.testing.assert_allclose(saved_model_output(tmp_path / "fused", x), saved_model_output(model, x), atol=1e-4, rtol=1e-4)
    return report


def _fused_again_changes_nothing(tmp_path):
    again = gconv_rewrite.check(tmp_path / "fused")
    assert again.rewrites == [] and again.skipped == []


# -- chains that fuse whole -------------------------------------------------------------------


def test_two_layer_sliced_chain_becomes_two_grouped_convs(models, tmp_path):
    report = _fuse_and_compare(models["sliced"], tmp_path, X)
    assert report.before.op_counts["Conv2D"] == 8
    [rewrite] = report.rewrites
    assert (rewrite.kind, rewrite.groups, rewrite.channels) == ("fuse-split-conv", 4, {"in": 16, "out": 32})
    assert report.skipped == []
    assert report.after.op_counts == {"Conv2D": 2, "BiasAdd": 1, "Relu": 1}
    assert _grouped_filters(tmp_path / "fused") == [("Conv2D", 4), ("Conv2D", 4)]
    # Written: the first grouped conv's bias as an AddV2 (see gconv_rewrite.passes.tf.savedmodel).
    assert saved_model_ops(tmp_path / "fused") == {"AddV2": 1, "Conv2D": 2, "Relu": 1}
    _fused_again_changes_nothing(tmp_path)


@pytest.mark.parametrize("name, n, width", [("resnext", 4, 4), ("resnext8", 8, 2)])
def test_resnext_shared_input_becomes_wide_1x1_and_grouped_3x3(models, tmp_path, name, n, width):
    report = _fuse_and_compare(models[name], tmp_path, X)
    assert report.before.op_counts["Conv2D"] == 2 * n and report.before.op_counts["FusedBatchNormV3"] == 2 * n
    [rewrite] = report.rewrites
    assert (rewrite.kind, rewrite.groups) == ("fuse-parallel-branches", n)
    assert rewrite.channels == {"in": 16, "out": n * width}
    assert rewrite.location.endswith(f"_group{n}")
    assert report.skipped == []
    assert report.after.op_counts == {"Conv2D": 2, "FusedBatchNormV3": 2, "Relu": 2}
    # The wide 1×1 (group 1) reads all 16 channels; the 3×3 is grouped.
    assert _grouped_filters(tmp_path / "fused") == [("Conv2D", 1), ("Conv2D", n)]
    # Written: the grouped 3×3's batch norm as Mul (folded into the filter) + AddV2; the wide
    # 1×1's stays a FusedBatchNormV3.
    assert saved_model_ops(tmp_path / "fused") == {"AddV2": 1, "Conv2D": 2, "FusedBatchNormV3": 1, "Relu": 2}
    _fused_again_changes_nothing(tmp_path)


def test_conv1d_chain(models, tmp_path):
    report = _fuse_and_compare(models["conv1d"], tmp_path, SEQUENCE)
    [rewrite] = report.rewrites
    assert (rewrite.groups, rewrite.channels) == (2, {"in": 16, "out": 8})
    assert report.skipped == []
    after = report.after.op_counts
    assert (after["Conv2D"], after["ExpandDims"], after["Squeeze"], after["Relu"]) == (2, 2, 2, 1)
    assert "ConcatV2" not in after and "Split" not in after


def test_resnext_chain_converts_to_onnx(models, tmp_path):
    out = tmp_path / "resnext.onnx"
    report = gconv_rewrite.fuse(models["resnext"], output=out, to="onnx").report
    assert [r.groups for r in report.rewrites] == [4] and report.verification.passed
    import onnx

    groups = [next((a.i for a in n.attribute if a.name == "group"), 1)
              for n in onnx.load(str(out)).graph.node if n.op_type == "Conv"]
    assert groups == [1, 4]


@pytest.mark.parametrize("target, fused", [("onnxruntime-cpu", True), ("edgetpu", False)])
def test_target_judges_every_grouped_layer_of_a_chain(models, target, fused):
    report = gconv_rewrite.fuse(models["resnext"], target=target).report
    nodes = report.target["nodes"]
    if fused:
        assert report.verification.passed
        assert [r.kind for r in report.rewrites] == ["fuse-parallel-branches"]
        assert [(n["action"], n["form"]) for n in nodes] == [("fuse", "native")]
    else:  # the grouped 3×3 is refused: the candidate stays whole, wide 1×1 included
        assert report.rewrites == [] and [(n["action"], n["form"]) for n in nodes] == [("keep", "split")]
        [skip] = report.skipped
        assert skip.reason.startswith("split for edgetpu: ") and len(skip.nodes) == 8


# -- near misses ------------------------------------------------------------------------------


def test_resnext_3x3_with_another_stride_stops_after_the_wide_1x1(models, tmp_path):
    report = _fuse_and_compare(models["resnext_stride"], tmp_path, ROW)
    [rewrite] = report.rewrites
    assert (rewrite.kind, rewrite.groups, rewrite.channels) == ("fuse-parallel-branches", 1, {"in": 16, "out": 16})
    [skip] = report.skipped
    assert skip.reason == ("fused up to the convolution after (different strides between branches: "
                           "(1,1,1,1) vs (1,2,1,1)); the rest stays per branch")
    # One wide 1×1 with its batch norm and relu, split back; each branch keeps its own 3×3.
    assert report.after.op_counts == {"Conv2D": 5, "FusedBatchNormV3": 5, "Relu": 5, "SplitV": 1, "ConcatV2": 1}
    assert saved_model_ops(tmp_path / "fused") == report.after.op_counts


def test_sliced_chain_second_layer_with_another_stride_is_split_back(models, tmp_path):
    report = _fuse_and_compare(models["sliced_stride"], tmp_path, ROW)
    assert [(r.groups, r.channels) for r in report.rewrites] == [(4, {"in": 16, "out": 16})]
    [skip] = report.skipped
    assert "fused up to the convolution after (different strides between branches" in skip.reason
    assert report.after.op_counts == {"Conv2D": 5, "BiasAdd": 1, "Relu": 1, "SplitV": 1, "ConcatV2": 1}


def test_first_layer_that_differs_refuses_the_candidate(tmp_path):
    class Differ(SlicedChain):
        def serve(self, x):
            parts = tf.split(x, 4, axis=-1)
            ys = [tf.nn.conv2d(tf.nn.relu(tf.nn.conv2d(p, k, (1, 2 if i == 3 else 1, 1, 1), "SAME")), s, 1, "SAME")
                  for i, (p, k, s) in enumerate(zip(parts, self.first, self.second))]
            return {"y": tf.concat(ys, axis=-1)}

    report = gconv_rewrite.check(save_module(Differ(), tmp_path / "differ", shape=(None, 1, 8, 16)))
    assert report.rewrites == []
    [skip] = report.skipped
    assert skip.reason == "different strides between branches: (1,1,1,1) vs (1,2,1,1)"
    assert len(skip.nodes) == 8  # every branch conv, both layers


def test_shared_input_branch_value_used_outside(tmp_path):
    class Leaky(ResNeXtBlock):
        def serve(self, x):
            ys, middles = [], []
            for i in range(self.n):
                middles.append(tf.nn.relu(tf.nn.conv2d(x, self.reduce[i], 1, "VALID")))
                ys.append(tf.nn.conv2d(middles[-1], self.spatial[i], 1, "SAME"))
            return {"y": tf.concat(ys, axis=-1), "middle": middles[0]}

    report = gconv_rewrite.check(save_module(Leaky(), tmp_path / "leaky"))
    assert report.rewrites == []
    [skip] = report.skipped
    assert "is used outside the ConcatV2" in skip.reason


def test_branch_that_applies_an_op_before_its_conv_is_reported(tmp_path):
    class Before(SlicedChain):
        def serve(self, x):
            parts = tf.split(x, 4, axis=-1)
            return {"y": tf.concat([tf.nn.conv2d(tf.nn.relu(p), k, 1, "SAME") for p, k in zip(parts, self.first)], -1)}

    report = gconv_rewrite.check(save_module(Before(), tmp_path / "before"))
    assert report.rewrites == []
    assert [s.reason for s in report.skipped] == ["a branch applies Relu before its convolution"]


# -- Conv3D -----------------------------------------------------------------------------------


def test_tensorflow_runs_no_grouped_conv3d_on_cpu():
    """The evidence behind CONV3D_REFUSAL: a Conv3D filter of half the input depth fails."""
    x = tf.constant(VOLUME)
    with pytest.raises(tf.errors.InvalidArgumentError):
        tf.nn.conv3d(x, tf.zeros((3, 3, 3, 4, 6)), [1] * 5, "SAME")


def test_conv3d_branches_are_reported_not_fused(models, tmp_path):
    report = gconv_rewrite.check(models["conv3d"])
    assert report.rewrites == []
    [skip] = report.skipped
    assert skip.reason == CONV3D_REFUSAL
    assert skip.reason.startswith("TensorFlow's Conv3D has no grouped kernel on CPU: ")
    assert len(skip.nodes) == 2


def test_conv3d_shared_input_fuses_the_wide_conv_only(models, tmp_path):
    report = _fuse_and_compare(models["conv3d_shared"], tmp_path, VOLUME)
    [rewrite] = report.rewrites
    assert (rewrite.kind, rewrite.groups, rewrite.channels) == ("fuse-parallel-branches", 1, {"in": 8, "out": 8})
    [skip] = report.skipped
    assert skip.reason == f"fused up to the convolution after ({CONV3D_REFUSAL}); the rest stays per branch"
    assert report.after.op_counts == {"Conv3D": 3, "Relu": 1, "SplitV": 1, "ConcatV2": 1}
    assert _grouped_filters(tmp_path / "fused") == [("Conv3D", 1)] * 3
