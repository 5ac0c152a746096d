"""SavedModel idioms from the zoo battery (FINDINGS F5, F6), each as a small model built in code.

- F5: a native grouped ``Conv2D`` + ``BiasAdd`` / ``FusedBatchNormV3`` (+ ReLU) — tf-keras RegNet's
  grouped conv + BatchNormalization, once frozen — is remapped by grappler into ``_FusedConv2D``,
  which TF's CPU kernels without oneDNN refuse. Verification runs with the remapper off; the
  written model keeps running there (bias as ``AddV2``, batch norm as ``Mul`` + ``AddV2``); a run
  that changes nothing runs no rewritten model at all.
- F6: the tool's own expanded SavedModel (its graph imported into a function) fuses back: the
  constants grappler gives a ``^input`` control dependency follow the input when written again.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np
import pytest
import tensorflow as tf

import gconv_rewrite
from tests.helpers import saved_model_ops, saved_model_outputs

REPO = Path(__file__).resolve().parents[1]
X = np.random.default_rng(11).standard_normal((1, 8, 8, 16)).astype(np.float32)


def _weights(rng, shape, low=None):
    values = rng.uniform(low, 1.5, shape) if low is not None else rng.standard_normal(shape) * 0.3
    return tf.Variable(values.astype(np.float32))


class NativeGroups(tf.Module):
    """x·0.5 → Conv2D(groups=4) + bias_add + relu → Conv2D(groups=4) + FusedBatchNormV3 + relu
    [→ hand-made group: split(2) → 2 Conv2D → concat → relu] → mean over H, W.

    The scalar and the mean's axes are constants outside any group: in an expanded model written
    by the tool, grappler gives such constants a control input on the signature's input (F6)."""

    def __init__(self, hand_made: bool = True):
        super().__init__()
        rng = np.random.default_rng(5)
        self.hand_made = hand_made
        self.kernel1, self.bias1 = _weights(rng, (3, 3, 4, 16)), _weights(rng, (16,))
        self.kernel2 = _weights(rng, (3, 3, 4, 16))
        self.scale, self.variance = _weights(rng, (16,), 0.5), _weights(rng, (16,), 0.5)
        self.offset, self.mean = _weights(rng, (16,)), _weights(rng, (16,))
        self.branches = [_weights(rng, (1, 1, 8, 8)) for _ in range(2)]

    def serve(self, x):
        y = tf.nn.relu(tf.nn.bias_add(tf.nn.conv2d(x * 0.5, self.kernel1, 1, "SAME"), self.bias1))
        y, *_ = tf.raw_ops.FusedBatchNormV3(x=tf.nn.conv2d(y, self.kernel2, 1, "SAME"), scale=self.scale,
                                             offset=self.offset, mean=self.mean, variance=self.variance,
                                             epsilon=1e-3, is_training=False)
        y = tf.nn.relu(y)
        if self.hand_made:
            parts = tf.split(y, 2, axis=-1)
            y = tf.nn.relu(tf.concat([tf.nn.conv2d(p, k, 1, "SAME") for p, k in zip(parts, self.branches)], -1))
        return {"y": tf.reduce_mean(y, axis=[1, 2]), "map": y}


def _save(module: tf.Module, path: Path) -> Path:
    serve = tf.function(module.serve, input_signature=[tf.TensorSpec([None, 8, 8, 16], tf.float32, name="x")])
    tf.saved_model.save(module, str(path), signatures={"serving_default": serve.get_concrete_function()})
    return path


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    folder = tmp_path_factory.mktemp("zoo_idioms")
    return {"mixed": _save(NativeGroups(), folder / "mixed"),
            "native_only": _save(NativeGroups(hand_made=False), folder / "native_only")}


def _run(saved_model: Path, x: np.ndarray = X) -> dict[str, np.ndarray]:
    # The originals are plain tf.functions: no XLA around their grouped convs.
    return saved_model_outputs(saved_model, {"x": x}, remapper=False)


# -- F5: native grouped Conv2D + BiasAdd / FusedBatchNorm, oneDNN off ---------------------------

_ONEDNN_OFF_SCRIPT = r"""
import json, sys
import numpy as np, tensorflow as tf
from click.testing import CliRunner
from gconv_rewrite.cli import main
from gconv_rewrite.passes.tf.savedmodel import remapper_off

mixed, native_only, out = sys.argv[1:4]
facts = {}
for name, model in (("mixed", mixed), ("native_only", native_only)):
    target, report = f"{out}/{name}.fused", f"{out}/{name}.json"
    result = CliRunner().invoke(main, [model, "--fuse", "-o", target, "--report", report])
    facts[name] = {"exit": result.exit_code, "output": result.output[-600:]}
    if result.exit_code == 0:
        facts[name]["report"] = json.load(open(report))["models"][0]["report"]
x = tf.constant(np.load(f"{out}/x.npy"))
with remapper_off():
    expected = tf.saved_model.load(mixed).signatures["serving_default"](x=x)["y"].numpy()
try:  # the written model, as a user runs it: default session, remapper on, no oneDNN
    actual = tf.saved_model.load(f"{out}/mixed.fused").signatures["serving_default"](x=x)["y"].numpy()
    facts["written_runs"] = float(np.abs(actual - expected).max())
except Exception as exc:
    facts["written_runs"] = str(exc).strip().splitlines()[-2]
print("FACTS" + json.dumps(facts))
"""


@pytest.fixture(scope="module")
def onednn_off(models, tmp_path_factory):
    """Both models fused by the CLI in one process with TF_ENABLE_ONEDNN_OPTS=0."""
    out = tmp_path_factory.mktemp("onednn_off")
    np.save(out / "x.npy", X)
    env = {**os.environ, "TF_ENABLE_ONEDNN_OPTS": "0", "TF_CPP_MIN_LOG_LEVEL": "2"}
    run = subprocess.run([sys.executable, "-c", _ONEDNN_OFF_SCRIPT, str(models["mixed"]),
                          str(models["native_only"]), str(out)], env=env, cwd=REPO, capture_output=True,
                         text=True, timeout=300)
    lines = [line for line in run.stdout.splitlines() if line.startswith("FACTS")]
    assert lines, run.stdout[-2000:] + run.stderr[-3000:]
    return json.loads(lines[-1][len("FACTS"):]), out


def test_onednn_off_native_grouped_bias_and_batch_norm_verified(onednn_off):
    """F5 (b): a rewrite in a model that also holds native grouped Conv2D + BiasAdd and + FusedBatchNormV3
    is verified with oneDNN off (both models run with grappler's remapper off)."""
    facts, _ = onednn_off
    mixed = facts["mixed"]
    assert mixed["exit"] == 0, mixed["output"]
    report = mixed["report"]
    assert [(r["kind"], r["groups"]) for r in report["rewrites"]] == [("fuse-split-conv", 2)]
    assert report["verification"]["ran"] and report["verification"]["passed"], report["verification"]
    assert report["written"]


def test_onednn_off_written_model_runs_in_a_default_session(onednn_off):
    """The written model runs where TF runs it by default (remapper on, oneDNN off): the native grouped
    convs' bias is an AddV2 and their batch norm a Mul + AddV2, which the remapper does not fuse."""
    facts, out = onednn_off
    assert isinstance(facts["written_runs"], float) and facts["written_runs"] < 1e-4, facts["written_runs"]
    ops = saved_model_ops(out / "mixed.fused")
    assert "FusedBatchNormV3" not in ops and "BiasAdd" not in ops and ops["Conv2D"] == 3, ops


def test_onednn_off_nothing_to_fuse_needs_no_run(onednn_off):
    """F5 (a): nothing rewritten → no rewritten model to prove: verification skipped with the ONNX
    path's note, the output written as the ONNX path writes it, exit 0."""
    facts, out = onednn_off
    native = facts["native_only"]
    assert native["exit"] == 0, native["output"]
    report = native["report"]
    assert report["rewrites"] == [] and report["written"] and (out / "native_only.fused").is_dir()
    assert not report["verification"]["ran"]
    assert report["verification"]["note"] == "no rewrite: the model is unchanged"


def test_nothing_to_fuse_through_the_api_is_not_verified(models):
    report = gconv_rewrite.fuse(models["native_only"]).report
    assert report.rewrites == [] and not report.written
    assert not report.verification.ran and report.verification.note == "no rewrite: the model is unchanged"


def test_batch_norm_after_ungrouped_conv_is_left_alone():
    """Only a grouped conv's batch norm is rewritten; an ordinary conv's stays a FusedBatchNormV3."""
    from gconv_rewrite.passes.tf import _graph as g
    from gconv_rewrite.passes.tf.savedmodel import batch_norm_after_grouped_conv_as_mul_add

    graph = tf.Graph()
    with graph.as_default():
        x = tf.compat.v1.placeholder(tf.float32, [1, 8, 8, 16], name="x")
        ones, zeros = tf.ones([16]), tf.zeros([16])
        for name, depth in (("grouped", 4), ("plain", 16)):
            y = tf.nn.conv2d(x, tf.ones([3, 3, depth, 16]), 1, "SAME", name=f"{name}_conv")
            tf.raw_ops.FusedBatchNormV3(x=y, scale=ones, offset=zeros, mean=zeros, variance=ones, epsilon=1e-3,
                                        is_training=False, name=f"{name}_bn")
    rewritten = batch_norm_after_grouped_conv_as_mul_add(graph.as_graph_def())
    nodes = {n.name: n for n in rewritten.node}
    assert nodes["grouped_bn"].op == "AddV2" and nodes["plain_bn"].op == "FusedBatchNormV3"
    mul = nodes[g.split_input(nodes["grouped_bn"].input[0])[0]]
    assert mul.op == "Mul" and g.split_input(mul.input[0])[0] == "grouped_conv"


# -- F6: expand → fuse round trip on the tool's own SavedModel ----------------------------------


def test_expand_then_fuse_round_trip_restores_every_grouped_conv(models, tmp_path):
    from gconv_rewrite.passes.tf.savedmodel import load_signature

    original = _run(models["mixed"])
    expanded, restored = tmp_path / "expanded", tmp_path / "restored"
    report = gconv_rewrite.expand(models["mixed"], output=expanded).report
    assert sorted(r.groups for r in report.rewrites) == [4, 4] and report.verification.passed
    # Loading the tool's own SavedModel leaves no placeholder but the signature's input.
    frozen = load_signature(expanded)
    assert [n.name for n in frozen.graph_def.node if n.op == "Placeholder"] == ["x"]

    report = gconv_rewrite.fuse(expanded, output=restored).report
    assert sorted(r.groups for r in report.rewrites) == [2, 4, 4]
    assert report.verification.ran and report.verification.passed and report.written
    ops = saved_model_ops(restored)
    assert ops["Conv2D"] == 3 and "Split" not in ops and "ConcatV2" not in ops, ops
    for key, value in _run(restored).items():
        np.testing.assert_allclose(value, original[key], rtol=1e-4, atol=1e-4)


def test_written_graph_with_control_inputs_on_the_signature_input_runs(models, tmp_path):
    """The writer maps ``^x`` with ``x``: a constant with a control input on the signature's input
    does not hold the imported graph's own, unfed placeholder."""
    from gconv_rewrite.passes.tf.savedmodel import load_signature, write_savedmodel

    frozen = load_signature(models["native_only"])
    graph_def = type(frozen.graph_def).FromString(frozen.graph_def.SerializeToString())
    consts = [n for n in graph_def.node if n.op == "Const" and not n.input]
    assert consts
    for node in consts:
        node.input.append("^x")
    write_savedmodel(frozen, graph_def, tmp_path / "written")
    expected, actual = _run(models["native_only"]), _run(tmp_path / "written")
    for key, value in actual.items():
        np.testing.assert_allclose(value, expected[key], rtol=1e-5, atol=1e-5)


# -- --to onnx: verification inputs go through gconv_rewrite.verify.run_session ----------------------


def test_to_onnx_bfloat16_input_is_fed_as_ort_value(tmp_path):
    """A bfloat16 signature input reaches onnxruntime as an OrtValue (numpy's session.run cannot feed
    it: "Numpy_type 256 can't be converted"). tf2onnx 1.17 declares that input float16, which
    onnxruntime then refuses: a one-line VerificationImpossible, nothing written."""
    from gconv_rewrite.errors import VerificationImpossible

    class Bfloat16Input(tf.Module):
        def __init__(self):
            super().__init__()
            rng = np.random.default_rng(3)
            self.kernels = [_weights(rng, (3, 3, 4, 6)) for _ in range(2)]

        def serve(self, x):
            parts = tf.split(tf.cast(x, tf.float32), 2, axis=-1)
            return {"y": tf.concat([tf.nn.conv2d(p, k, 1, "SAME") for p, k in zip(parts, self.kernels)], -1)}

    module = Bfloat16Input()
    serve = tf.function(module.serve, input_signature=[tf.TensorSpec([1, 8, 8, 8], tf.bfloat16, name="x")])
    tf.saved_model.save(module, str(tmp_path / "bf16"), signatures={"serving_default": serve.get_concrete_function()})
    out = tmp_path / "bf16.onnx"
    try:
        report = gconv_rewrite.fuse(tmp_path / "bf16", output=out, to="onnx").report
    except VerificationImpossible as error:
        assert "onnxruntime cannot run the converted model" in error.message and not out.exists()
    else:  # a tf2onnx that keeps bfloat16
        assert report.verification.passed
