"""--target for SavedModel and Keras inputs (and with --to tflite): one run fuses the hand-made
groups the target runs natively, expands the native grouped convs it wants split, keeps the
rest, verifies once, and reports per node the form and the rule in the report's ``target``."""

from __future__ import annotations

import json
import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras
import numpy as np
import pytest
import tensorflow as tf

import gconv_rewrite
from gconv_rewrite.errors import BadInput
from tests.helpers import invoke
from tests.tf_models import save_module


def keras_model(path):
    """Input 16 ch → conv_a (groups=8: 2 per group) → conv_b (groups=4: 4 per group) → a GetItem
    group of 4 branches (4 per group) → dw (groups=16: depthwise) → out."""
    L = keras.layers
    keras.utils.set_random_seed(0)
    inp = keras.Input((8, 8, 16), name="image")
    x = L.Conv2D(16, 3, padding="same", groups=8, bias_initializer="random_normal", name="conv_a")(inp)
    x = L.Conv2D(16, 3, padding="same", groups=4, activation="relu", name="conv_b")(x)
    parts = [L.Conv2D(4, 3, padding="same", bias_initializer="random_normal", name=f"part{i}")(x[..., 4 * i:4 * i + 4])
             for i in range(4)]
    x = L.Concatenate(name="hand_made")(parts)
    x = L.Conv2D(16, 3, padding="same", groups=16, name="dw")(x)
    keras.Model(inp, x).save(path)
    return path


class Module(tf.Module):
    """x (16 ch) → Conv2D with a grouped filter (8 groups: 2 per group) → one of 4 groups (4 per
    group) → tf.split into 4 → Conv2D + bias each → concat."""

    def __init__(self):
        super().__init__()
        rng = np.random.default_rng(0)
        w = lambda *s: tf.Variable(rng.standard_normal(s).astype(np.float32) * 0.3)
        self.a, self.b = w(3, 3, 2, 16), w(3, 3, 4, 16)
        self.kernels, self.biases = [w(3, 3, 4, 4) for _ in range(4)], [w(4) for _ in range(4)]

    def serve(self, x):
        x = tf.nn.conv2d(x, self.a, 1, "SAME")
        x = tf.nn.relu(tf.nn.conv2d(x, self.b, 1, "SAME"))
        parts = tf.split(x, 4, axis=-1)
        ys = [tf.nn.bias_add(tf.nn.conv2d(p, k, 1, "SAME"), b) for p, k, b in zip(parts, self.kernels, self.biases)]
        return {"y": tf.concat(ys, axis=-1)}


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    folder = tmp_path_factory.mktemp("target_models")
    return {"keras": keras_model(folder / "m.keras"), "savedmodel": save_module(Module(), folder / "sm")}


def nodes(report) -> dict[str, tuple[str, str]]:
    return {n["location"]: (n["action"], n["form"]) for n in report.target["nodes"]}


def grouped_layers(path) -> dict[str, int]:
    model = keras.models.load_model(path, safe_mode=True)
    return {layer.name: layer.groups for layer in model.layers if type(layer).__name__ == "Conv2D"}


# -- Keras --------------------------------------------------------------------------------------


def test_keras_tflite_gpu_expands_keeps_and_fuses(models, tmp_path):
    out = tmp_path / "m.gpu.keras"
    report = gconv_rewrite.fuse(models["keras"], output=out, target="tflite-gpu").report
    assert report.verification.ran and report.verification.passed
    assert report.target["name"] == "tflite-gpu"
    judged = nodes(report)
    assert judged["conv_a"] == ("expand", "split")
    assert judged["conv_b"] == ("keep", "native")
    assert judged["dw"] == ("keep", "native")  # depthwise: DEPTHWISE_CONV_2D
    fused = [loc for loc, (action, _) in judged.items() if action == "fuse"]
    assert len(fused) == 1
    assert "multiples of 4" in next(n["rule"] for n in report.target["nodes"] if n["location"] == "conv_b")
    assert not any(n["rule"].startswith("native for") for n in report.target["nodes"])  # prefix stripped
    kinds = sorted(r.kind for r in report.rewrites)
    assert kinds == ["keras-expand-grouped-conv", "keras-fuse-grouped-conv"]
    skipped = {s.location: s.reason for s in report.skipped}
    assert skipped["conv_b"].startswith("native for tflite-gpu: ")
    layers = grouped_layers(out)
    assert layers["conv_b"] == 4 and layers["dw"] == 16 and layers[fused[0]] == 4
    assert "conv_a" not in layers and [name for name in layers if name.startswith("part")] == fused
    assert sum(1 for g in layers.values() if g == 1) == 8  # conv_a's branches, one per group

    again = gconv_rewrite.fuse(out, target="tflite-gpu").report  # its own output: nothing left to change
    assert not again.rewrites
    assert {n["action"] for n in again.target["nodes"]} == {"keep"}


def test_keras_edgetpu_expands_every_non_depthwise(models, tmp_path):
    out = tmp_path / "m.edgetpu.keras"
    report = gconv_rewrite.fuse(models["keras"], output=out, target="edgetpu").report
    assert report.verification.passed
    judged = nodes(report)
    assert judged["conv_a"] == ("expand", "split") and judged["conv_b"] == ("expand", "split")
    assert judged["hand_made"] == ("keep", "split")
    assert judged["dw"] == ("keep", "native")
    layers = grouped_layers(out)
    assert {name: g for name, g in layers.items() if g > 1} == {"dw": 16}


def test_keras_onnxruntime_cpu_fuses_all(models, tmp_path):
    report = gconv_rewrite.fuse(models["keras"], target="onnxruntime-cpu").report
    assert report.verification.passed
    judged = nodes(report)
    assert [a for a, _ in judged.values()].count("fuse") == 1
    assert judged["conv_a"] == judged["conv_b"] == judged["dw"] == ("keep", "native")
    assert [r.kind for r in report.rewrites] == ["keras-fuse-grouped-conv"]


def test_keras_cli_default_output_and_json_report(models, tmp_path):
    source = tmp_path / "m.keras"
    source.write_bytes(models["keras"].read_bytes())
    report_path = tmp_path / "report.json"
    result = invoke(source, "--target", "tflite-gpu", "--report", report_path)
    assert result.exit_code == 0, result.output
    assert (tmp_path / "m.tflite-gpu.keras").exists()
    document = json.loads(report_path.read_text())["models"][0]["report"]
    assert document["target"]["name"] == "tflite-gpu" and len(document["target"]["nodes"]) == 4
    assert "target tflite-gpu" in result.output


def test_keras_to_tflite_grouped_only_where_multiples_of_4(models, tmp_path):
    from gconv_rewrite.passes.tflite import convert

    source = tmp_path / "m.keras"
    source.write_bytes(models["keras"].read_bytes())
    result = invoke(source, "--target", "tflite-gpu", "--to", "tflite")
    assert result.exit_code == 0, result.output
    out = tmp_path / "m.tflite-gpu.tflite"
    convs = convert.describe(out.read_bytes())[1]
    grouped = [c for c in convs if c.op == "CONV_2D" and 1 < c.groups < c.in_channels]
    assert sorted(c.groups for c in grouped) == [4, 4]  # conv_b and the fused group
    for c in grouped:
        assert (c.in_channels // c.groups) % 4 == 0 and (c.out_channels // c.groups) % 4 == 0
    assert sum(1 for c in convs if c.op == "CONV_2D" and c.groups == 1) == 8  # conv_a's branches
    # Keras's Conv2D(groups=16) on 16 channels (depthwise by the rule) is kept; TensorFlow's
    # converter writes it as a CONV_2D of 16 groups (docs/TARGETS.md, Limits).
    depthwise = [c for c in convs if c.groups == c.in_channels == 16]
    assert len(depthwise) == 1


# -- SavedModel ---------------------------------------------------------------------------------


def test_savedmodel_tflite_gpu_expands_keeps_and_fuses(models, tmp_path):
    from gconv_rewrite.passes.tf.savedmodel import graph_stats, load_signature

    out = tmp_path / "sm.gpu"
    report = gconv_rewrite.fuse(models["savedmodel"], output=out, target="tflite-gpu").report
    assert report.verification.ran and report.verification.passed
    actions = sorted((n["action"], n["form"]) for n in report.target["nodes"])
    assert actions == [("expand", "split"), ("fuse", "native"), ("keep", "native")]
    kinds = sorted(r.kind for r in report.rewrites)
    assert kinds == ["expand-grouped-conv", "fuse-split-conv"]
    expanded = next(r for r in report.rewrites if r.kind == "expand-grouped-conv")
    assert expanded.groups == 8
    graph = load_signature(out).graph_def
    counts = graph_stats(graph).op_counts
    assert counts["Conv2D"] == 8 + 1 + 1  # a's 8 branches, b kept, the fused group
    assert counts.get("Split", 0) == 1  # the expansion's; the hand-made split is gone

    again = gconv_rewrite.fuse(out, target="tflite-gpu").report
    assert not again.rewrites


def test_savedmodel_edgetpu_keeps_hand_made_and_expands(models):
    report = gconv_rewrite.fuse(models["savedmodel"], target="edgetpu").report
    assert report.verification.passed
    actions = sorted((n["action"], n["form"]) for n in report.target["nodes"])
    assert actions == [("expand", "split"), ("expand", "split"), ("keep", "split")]
    skipped = [s.reason for s in report.skipped if s.reason.startswith("split for edgetpu: ")]
    assert len(skipped) == 1


def test_savedmodel_onnxruntime_cpu_fuses(models):
    report = gconv_rewrite.fuse(models["savedmodel"], target="onnxruntime-cpu").report
    assert report.verification.passed
    assert [r.kind for r in report.rewrites] == ["fuse-split-conv"]
    assert sorted(n["action"] for n in report.target["nodes"]) == ["fuse", "keep", "keep"]


def test_target_with_to_onnx_is_refused_in_one_line(models):
    with pytest.raises(BadInput, match="--to onnx first"):
        gconv_rewrite.fuse(models["keras"], target="tflite-gpu", to="onnx")


def test_savedmodel_to_tflite_with_target(models, tmp_path):
    from gconv_rewrite.passes.tflite import convert

    out = tmp_path / "sm.tflite"
    report = gconv_rewrite.fuse(models["savedmodel"], output=out, target="tflite-gpu", to="tflite").report
    assert report.verification.passed and any(o.name.startswith("tflite:") for o in report.verification.outputs)
    convs = convert.describe(out.read_bytes())[1]
    assert sorted(c.groups for c in convs if c.op == "CONV_2D") == [1] * 8 + [4, 4]
