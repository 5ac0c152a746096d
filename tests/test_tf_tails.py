"""SavedModels: channel-wise tails after the branch convs (FusedBatchNorm, BiasAdd, Add/Mul of a
per-channel constant, activations) fuse with their parameters concatenated; where the branches
stop agreeing the fused tensor is split back and a skip says where and why."""

from __future__ import annotations

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np
import pytest
import tensorflow as tf

import gconv_rewrite
from tests.helpers import saved_model_ops, saved_model_output
from tests.tf_models import save_module

X = np.random.default_rng(3).standard_normal((1, 8, 8, 16)).astype(np.float32)


def _vector(seed: int, low: float = -1.0, high: float = 1.0) -> tf.Variable:
    return tf.Variable(np.random.default_rng(seed).uniform(low, high, 6).astype(np.float32))


class BranchTails(tf.Module):
    """x → tf.split(4) → conv2d → ``tail`` (per branch) → concat.

    ``tail``: "bn" (fused_batch_norm → activation), "bias" (bias_add → BiasAdd → Mul and Add of
    per-channel vectors → relu6); ``activations`` one per branch; ``epsilons`` one per branch."""

    def __init__(self, tail="bn", activations=("relu",) * 4, epsilons=(1e-3,) * 4, training=False):
        super().__init__()
        rng = np.random.default_rng(0)
        self.tail, self.activations, self.epsilons, self.training = tail, activations, epsilons, training
        self.kernels = [tf.Variable(rng.standard_normal((3, 3, 4, 6)).astype(np.float32) * 0.3) for _ in range(4)]
        self.scale = [_vector(10 + i, 0.5, 1.5) for i in range(4)]
        self.offset = [_vector(20 + i) for i in range(4)]
        self.mean = [_vector(30 + i) for i in range(4)]
        self.variance = [_vector(40 + i, 0.5, 1.5) for i in range(4)]

    def serve(self, x):
        ys = []
        for i, part in enumerate(tf.split(x, 4, axis=-1)):
            y = tf.nn.conv2d(part, self.kernels[i], 1, "SAME")
            if self.tail == "bn":
                statistics = (None, None) if self.training else (self.mean[i], self.variance[i])
                y, _, _ = tf.compat.v1.nn.fused_batch_norm(y, self.scale[i], self.offset[i], *statistics,
                                                           epsilon=self.epsilons[i], is_training=self.training)
            else:
                y = tf.nn.bias_add(y, self.offset[i])
                y = tf.raw_ops.BiasAdd(value=y, bias=self.mean[i])
                y = tf.nn.relu6(y * self.scale[i] + tf.reshape(self.variance[i], [1, 1, 1, 6]))
            ys.append(tf.nn.relu(y) if self.activations[i] == "relu" else tf.sigmoid(y))
        return tf.concat(ys, -1)


class Conv1DTails(tf.Module):
    """x [N, W, C] → tf.split(2) → conv1d (ExpandDims → Conv2D → Squeeze) → bias_add → Mul of a
    per-channel vector → leaky_relu → concat."""

    def __init__(self):
        super().__init__()
        rng = np.random.default_rng(1)
        self.kernels = [tf.Variable(rng.standard_normal((3, 8, 6)).astype(np.float32) * 0.3) for _ in range(2)]
        self.bias = [_vector(50 + i) for i in range(2)]
        self.scale = [_vector(60 + i) for i in range(2)]

    def serve(self, x):
        ys = []
        for i, part in enumerate(tf.split(x, 2, axis=-1)):
            y = tf.nn.bias_add(tf.nn.conv1d(part, self.kernels[i], 1, "SAME"), self.bias[i])
            ys.append(tf.nn.leaky_relu(y * self.scale[i], alpha=0.1))
        return tf.concat(ys, -1)


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tf_tails")
    return {
        "bn": save_module(BranchTails(), folder / "bn"),
        "bias": save_module(BranchTails("bias"), folder / "bias"),
        "differ": save_module(BranchTails(activations=("relu", "relu", "sigmoid", "sigmoid")), folder / "differ"),
        "epsilon": save_module(BranchTails(epsilons=(1e-3, 1e-3, 1e-3, 1e-2)), folder / "epsilon"),
        "training": save_module(BranchTails(training=True), folder / "training"),
        "conv1d": save_module(Conv1DTails(), folder / "conv1d", shape=(1, 8, 16)),
    }


def _run(saved_model, x=X) -> np.ndarray:
    return saved_model_output(saved_model, x)


def test_fused_batch_norm_tail_fuses(models, tmp_path):
    report = gconv_rewrite.fuse(models["bn"], output=tmp_path / "fused").report
    assert report.before.op_counts["FusedBatchNormV3"] == 4 and report.before.op_counts["Conv2D"] == 4
    assert [(r.groups, r.channels) for r in report.rewrites] == [(4, {"in": 16, "out": 24})]
    assert report.after.op_counts == {"Conv2D": 1, "FusedBatchNormV3": 1, "Relu": 1}
    # Written: the grouped conv's batch norm as Mul + AddV2 (TF's remapper refuses grouped
    # FusedBatchNorm without oneDNN), the Mul folded into the filter on load.
    assert saved_model_ops(tmp_path / "fused") == {"AddV2": 1, "Conv2D": 1, "Relu": 1}
    assert report.skipped == [] and report.verification.passed
    np.testing.assert_allclose(_run(tmp_path / "fused"), _run(models["bn"]), atol=1e-5)


def test_bias_add_and_per_channel_constant_tails_fuse(models, tmp_path):
    report = gconv_rewrite.fuse(models["bias"], output=tmp_path / "fused").report
    before = report.before.op_counts
    assert before["Conv2D"] == 4 and before["BiasAdd"] == 8 and before["Mul"] == 4
    assert [r.groups for r in report.rewrites] == [4] and report.skipped == []
    # The first BiasAdd becomes the grouped conv's bias, the second stays a (fused) BiasAdd.
    assert report.after.op_counts == {"AddV2": 1, "BiasAdd": 2, "Conv2D": 1, "Mul": 1, "Relu": 1, "Relu6": 1}
    assert saved_model_ops(tmp_path / "fused") == {"AddV2": 2, "BiasAdd": 1, "Conv2D": 1, "Mul": 1, "Relu": 1,
                                                "Relu6": 1}
    assert report.verification.passed
    np.testing.assert_allclose(_run(tmp_path / "fused"), _run(models["bias"]), atol=1e-5)


def test_branches_that_differ_split_back(models, tmp_path):
    report = gconv_rewrite.fuse(models["differ"], output=tmp_path / "fused").report
    assert [r.groups for r in report.rewrites] == [4]
    assert report.after.op_counts == {"Conv2D": 1, "FusedBatchNormV3": 1, "SplitV": 1, "Relu": 2, "Sigmoid": 2,
                                      "ConcatV2": 1}
    assert saved_model_ops(tmp_path / "fused") == {"AddV2": 1, "ConcatV2": 1, "Conv2D": 1, "Relu": 2, "Sigmoid": 2,
                                                "SplitV": 1}
    [skip] = report.skipped
    assert "fused up to where the branches differ (Relu vs Sigmoid)" in skip.reason
    assert report.verification.passed
    np.testing.assert_allclose(_run(tmp_path / "fused"), _run(models["differ"]), atol=1e-5)


def test_different_epsilons_stop_before_the_batch_norm(models, tmp_path):
    report = gconv_rewrite.fuse(models["epsilon"], output=tmp_path / "fused").report
    assert [r.groups for r in report.rewrites] == [4]
    [skip] = report.skipped
    assert "FusedBatchNormV3" in skip.reason and "epsilon 0.001 vs 0.01" in skip.reason
    assert report.after.op_counts == {"Conv2D": 1, "SplitV": 1, "FusedBatchNormV3": 4, "Relu": 4, "ConcatV2": 1}
    assert saved_model_ops(tmp_path / "fused") == report.after.op_counts
    assert report.verification.passed
    np.testing.assert_allclose(_run(tmp_path / "fused"), _run(models["epsilon"]), atol=1e-5)


def test_training_mode_batch_norm_is_reported_and_left_per_branch(models, tmp_path):
    report = gconv_rewrite.fuse(models["training"], output=tmp_path / "fused").report
    assert [r.groups for r in report.rewrites] == [4]
    [skip] = report.skipped
    assert "FusedBatchNormV3 (FusedBatchNormV3 in training mode)" in skip.reason
    assert report.after.op_counts["FusedBatchNormV3"] == 4 and report.after.op_counts["SplitV"] == 1
    assert report.verification.passed


def test_conv1d_branches_with_bias_and_scale_tails(models, tmp_path):
    report = gconv_rewrite.fuse(models["conv1d"], output=tmp_path / "fused").report
    assert [r.groups for r in report.rewrites] == [2] and report.skipped == []
    after = report.after.op_counts
    assert after["Conv2D"] == 1 and after["Mul"] == 1 and after["LeakyRelu"] == 1 and after["BiasAdd"] == 1
    assert "ConcatV2" not in after and report.verification.passed
    assert saved_model_ops(tmp_path / "fused") == {"AddV2": 1, "Conv2D": 1, "ExpandDims": 1, "LeakyRelu": 1, "Mul": 1,
                                                "Squeeze": 1}
    x = np.random.default_rng(4).standard_normal((1, 8, 16)).astype(np.float32)
    np.testing.assert_allclose(_run(tmp_path / "fused", x), _run(models["conv1d"], x), atol=1e-5)


def test_split_back_converts_to_onnx_and_checks(models, tmp_path):
    report = gconv_rewrite.check(models["differ"])
    assert [r.groups for r in report.rewrites] == [4]
    assert ["where the branches differ (Relu vs Sigmoid)" in s.reason for s in report.skipped] == [True]
    out = tmp_path / "differ.onnx"
    report = gconv_rewrite.fuse(models["differ"], output=out, to="onnx").report
    assert report.verification.passed
    import onnx

    ops = [n.op_type for n in onnx.load(str(out)).graph.node]
    assert ops.count("Conv") == 1 and ops.count("Split") == 1 and ops.count("Sigmoid") == 2


def test_bias_that_is_no_constant_is_reported(tmp_path):
    class VariableBias(tf.Module):
        def __init__(self):
            super().__init__()
            self.kernels = [tf.Variable(np.ones((1, 1, 4, 6), np.float32) * i) for i in range(1, 3)]

        def serve(self, x):
            bias = tf.reduce_mean(x, axis=[0, 1, 2])[:6]  # computed from the input: no constant
            parts = tf.split(x[..., :8], 2, axis=-1)
            return tf.concat([tf.nn.bias_add(tf.nn.conv2d(p, k, 1, "SAME"), bias)
                              for p, k in zip(parts, self.kernels)], -1)

    path = save_module(VariableBias(), tmp_path / "variable_bias", shape=(1, 8, 8, 8))
    report = gconv_rewrite.check(path)
    assert report.rewrites == []
    [skip] = report.skipped
    assert skip.reason.startswith("bias of ") and skip.reason.endswith("/Conv2D is not a constant")
