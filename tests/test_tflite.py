"""--to tflite: SavedModel and Keras inputs fused (or expanded), written by TensorFlow's converter,
proven in the TFLite interpreter against the original; ONNX refused with the onnx2tf chain.

Each flatbuffer is read back in the interpreter: a grouped conv must be one CONV_2D whose filter
holds in_channels / groups input channels, and the numbers are checked here again, independently
of the tool's own verification, against the original model run in Keras / TensorFlow.
"""

from __future__ import annotations

import json
import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras
import numpy as np
import pytest
import tensorflow as tf

from gconv_rewrite.api import Options, expand, fuse
from gconv_rewrite.errors import VerificationFailed
from gconv_rewrite.passes.tf import _compat as tf_compat
from gconv_rewrite.passes.tflite import convert
from samples import keras_models as km
from tests import tf_models
from tests.helpers import image, invoke

TOLERANCE = 1e-4


def ops(path) -> list[str]:
    return [op["op_name"] for op in tf_compat.tflite_ops(convert.interpreter(path.read_bytes(), delegates=False))]


def convs(path) -> list[convert.ConvOp]:
    return convert.describe(path.read_bytes())[1]


def grouped(path) -> list[convert.ConvOp]:
    return [c for c in convs(path) if c.op == "CONV_2D" and c.groups > 1]


def run_tflite(path, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    return list(convert.run(path.read_bytes(), feeds, "serving_default").values())


# -- Keras 3 --------------------------------------------------------------------------------------


def test_keras3_getitem_group_becomes_one_grouped_conv_2d(tmp_path):
    source = km.getitem_model(tmp_path / "getitem.keras")
    report_path = tmp_path / "report.json"
    result = invoke(source, "--to", "tflite", "--report", report_path)
    assert result.exit_code == 0, result.output
    out = tmp_path / "getitem.tflite"  # NAME.tflite beside the input
    assert out.is_file() and "wrote " + str(out) in result.output
    (conv,) = grouped(out)
    assert (conv.groups, conv.in_channels, conv.out_channels) == (4, 8, 16)
    names = ops(out)
    assert names.count("CONV_2D") == 2  # the stem and the fused group
    assert "STRIDED_SLICE" not in names and "CONCATENATION" not in names and "SPLIT" not in names
    # The numbers, checked here against Keras's own load of the original.
    x = image((1, 8, 8, 8))
    expected = np.asarray(keras.models.load_model(source)(x, training=False))
    (actual,) = run_tflite(out, {"image": x})
    np.testing.assert_allclose(actual, expected, atol=TOLERANCE, rtol=1e-3)
    report = json.loads(report_path.read_text())["models"][0]["report"]
    rows = {row["name"]: row for row in report["verification"]["outputs"]}
    assert report["verification"]["passed"] and rows["tflite:head"]["passed"]
    assert rows["tflite:head"]["max_abs_error"] <= TOLERANCE
    assert report["after"]["op_counts"]["CONV_2D"] == 2
    assert "1 of 2 CONV_2D grouped" in report["verification"]["note"]


def test_tensorflow_interpreter_reads_and_runs_it_too(tmp_path, monkeypatch):
    """Without ai-edge-litert: TensorFlow's own tf.lite.Interpreter reads the ops and runs the file."""
    source = km.getitem_model(tmp_path / "getitem.keras")
    out = fuse(source, output=tmp_path / "getitem.tflite", options=Options(to="tflite")).report.output
    content = open(out, "rb").read()
    monkeypatch.setattr(convert, "interpreter_class", lambda: tf.lite.Interpreter)
    assert convert.runtime_name() == "tflite"
    stats, found = convert.describe(content)
    assert stats.op_counts == {"CONV_2D": 2, "FULLY_CONNECTED": 1, "MEAN": 1}
    assert [c.groups for c in found] == [1, 4]
    x = image((1, 8, 8, 8))
    (actual,) = convert.run(content, {"image": x}, "serving_default").values()
    np.testing.assert_allclose(actual, np.asarray(keras.models.load_model(source)(x)), atol=TOLERANCE, rtol=1e-3)


def test_expand_then_tflite_leaves_no_grouped_conv_2d(tmp_path):
    inputs = keras.Input((8, 8, 16), name="img")
    y = keras.layers.Conv2D(16, 3, padding="same", groups=4, activation="relu", name="grouped")(inputs)
    y = keras.layers.Conv2D(8, 1, name="mix")(y)
    source = tmp_path / "native.keras"
    keras.Model(inputs, y).save(source)

    fused = invoke(source, "--to", "tflite")  # the native grouped conv goes through as one CONV_2D
    assert fused.exit_code == 0, fused.output
    assert [c.groups for c in grouped(tmp_path / "native.tflite")] == [4]

    result = invoke(source, "--expand", "--to", "tflite")
    assert result.exit_code == 0, result.output
    out = tmp_path / "native.expanded.tflite"
    assert out.is_file()
    assert grouped(out) == []
    assert ops(out).count("CONV_2D") == 4 + 1  # four branches and the 1x1
    x = image((1, 8, 8, 16))
    expected = np.asarray(keras.models.load_model(source)(x))
    (actual,) = run_tflite(out, {"img": x})
    np.testing.assert_allclose(actual, expected, atol=TOLERANCE, rtol=1e-3)


# -- legacy tf-keras .h5 with Lambda slices -------------------------------------------------------


def _legacy_resnext(path, *, cardinality: int = 8, width: int = 32, blocks: int = 2):
    """A small ResNeXt the legacy way: per block 1x1 → BN → ReLU → [Lambda slice → 3x3 conv]×N →
    Concatenate → BN → ReLU → 1x1 → BN, added to the shortcut; tf-keras, saved as .h5."""
    import tf_keras
    L = tf_keras.layers
    per = width // cardinality
    inp = tf_keras.Input((16, 16, 3), name="image")
    x = L.Conv2D(width, 3, padding="same", use_bias=False, name="stem")(inp)
    for b in range(blocks):
        strides = 2 if b == 1 else 1
        shortcut = x if strides == 1 else L.Conv2D(width, 1, strides=2, name=f"b{b}_proj")(x)
        y = L.ReLU(name=f"b{b}_1_relu")(L.BatchNormalization(name=f"b{b}_1_bn")(L.Conv2D(width, 1, name=f"b{b}_1")(x)))
        pieces = [L.Lambda(lambda z, c=c: z[..., c * per:(c + 1) * per], name=f"b{b}_slice{c}")(y)
                  for c in range(cardinality)]
        y = L.Concatenate(name=f"b{b}_concat")([L.Conv2D(per, 3, strides=strides, padding="same", use_bias=False,
                                                         name=f"b{b}_conv{c}")(p) for c, p in enumerate(pieces)])
        y = L.ReLU(name=f"b{b}_2_relu")(L.BatchNormalization(name=f"b{b}_2_bn")(y))
        y = L.BatchNormalization(name=f"b{b}_3_bn")(L.Conv2D(width, 1, name=f"b{b}_3")(y))
        x = L.ReLU(name=f"b{b}_out")(L.Add(name=f"b{b}_add")([shortcut, y]))
    model = tf_keras.Model(inp, L.Dense(5, name="logits")(L.GlobalAveragePooling2D(name="pool")(x)))
    rng = np.random.default_rng(0)
    for layer in model.layers:
        if type(layer).__name__ == "BatchNormalization":
            layer.set_weights([rng.uniform(0.5, 1.5, s).astype("float32") if i in (0, 3) else
                               rng.normal(0, 0.1, s).astype("float32")
                               for i, s in enumerate(w.shape for w in layer.get_weights())])
    model.save(path)
    return path, model


def test_legacy_lambda_resnext_h5_to_tflite_with_grouped_conv_2d_blocks(tmp_path):
    source, original = _legacy_resnext(tmp_path / "resnext_lambda.h5")
    refused = invoke(source, "--to", "tflite")  # Lambdas are code: never run without trust
    assert refused.exit_code == 2 and "--trust-lambdas" in refused.output
    assert not (tmp_path / "resnext_lambda.tflite").exists()

    result = invoke(source, "--to", "tflite", "--trust-lambdas")
    assert result.exit_code == 0, result.output
    out = tmp_path / "resnext_lambda.tflite"
    # Each block's 8 Lambda → Conv2D branches is one CONV_2D with 8 groups; nothing of the pattern is left.
    assert [(c.groups, c.in_channels, c.out_channels) for c in grouped(out)] == [(8, 32, 32)] * 2
    names = ops(out)
    assert "STRIDED_SLICE" not in names and "CONCATENATION" not in names and "SLICE" not in names
    x = image((1, 16, 16, 3))
    expected = original.predict(x, verbose=0)  # tf-keras itself, on the model it saved
    (actual,) = run_tflite(out, {"image": x})
    np.testing.assert_allclose(actual, expected, atol=TOLERANCE, rtol=1e-3)
    assert "tflite:logits" in result.output


def test_legacy_lambda_h5_api_returns_the_flatbuffer(tmp_path):
    source = km.legacy_model(tmp_path / "legacy.h5", style="lambda")
    result = fuse(source, output=tmp_path / "legacy.tflite", options=Options(trust_lambdas=True, to="tflite"))
    model = result.model
    assert isinstance(model, convert.TFLiteModel)
    assert (tmp_path / "legacy.tflite").read_bytes() == model.content
    assert [c.groups for c in model.grouped] == [4]
    assert result.report.verification.passed and result.report.written


# -- SavedModel -----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def savedmodels(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tflite_savedmodels")
    return {"split": tf_models.save_module(tf_models.SplitConvConcat(), folder / "split"),
            "keras_grouped": tf_models.save_keras_grouped(folder / "keras_grouped")}


def test_savedmodel_split_group_to_one_grouped_conv_2d(savedmodels, tmp_path):
    out = tmp_path / "split.tflite"
    result = invoke(savedmodels["split"], "--to", "tflite", "-o", out)
    assert result.exit_code == 0, result.output
    (conv,) = grouped(out)
    assert (conv.groups, conv.in_channels, conv.out_channels) == (4, 16, 24)
    assert ops(out) == ["CONV_2D"]  # split, 4 convs, biases, concat and relu: one op
    x = image((1, 8, 8, 16))
    original = tf.saved_model.load(str(savedmodels["split"])).signatures["serving_default"]
    expected = original(x=tf.constant(x))["y"].numpy()
    actual = convert.run(out.read_bytes(), {"x": x}, "serving_default")["y"]
    np.testing.assert_allclose(actual, expected, atol=TOLERANCE, rtol=1e-3)
    assert "tflite:y" in result.output and "y " in result.output  # the TF check and the interpreter's


def test_savedmodel_default_name_and_expand(savedmodels, tmp_path):
    # The XLA-wrapped grouped convs Keras exports: one CONV_2D each, or split with --expand.
    source = tmp_path / "kg"
    import shutil

    shutil.copytree(savedmodels["keras_grouped"], source)
    result = invoke(source, "--to", "tflite")
    assert result.exit_code == 0, result.output
    assert [c.groups for c in grouped(tmp_path / "kg.tflite")] == [4]
    expanded = invoke(source, "--expand", "--to", "tflite")
    assert expanded.exit_code == 0, expanded.output
    out = tmp_path / "kg.expanded.tflite"
    assert grouped(out) == [] and ops(out).count("CONV_2D") == 4 + 1


# -- refusals, failures, benchmark ----------------------------------------------------------------


def test_onnx_input_is_refused_with_the_onnx2tf_chain(tmp_path):
    source = tmp_path / "m.onnx"
    source.write_bytes((__import__("pathlib").Path(__file__).parents[1] / "samples" / "grouped_split.onnx").read_bytes())
    result = invoke(source, "--to", "tflite")
    assert result.exit_code == 2
    line = result.output.strip()
    assert len(line.splitlines()) == 1 and "Traceback" not in line
    assert "onnx2tf -i m.tflite.onnx" in line and "--target tflite" in line
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.onnx"]


def test_output_must_be_named_tflite(tmp_path):
    source = km.getitem_model(tmp_path / "g.keras")
    result = invoke(source, "--to", "tflite", "-o", tmp_path / "g.keras2")
    assert result.exit_code == 2 and "NAME.tflite" in result.output
    assert len(result.output.strip().splitlines()) == 1


def test_interpreter_mismatch_fails_and_writes_nothing(tmp_path, monkeypatch):
    source = km.getitem_model(tmp_path / "g.keras")
    real_run = convert.run

    def off_by_one(*args, **kwargs):
        return {k: v + 1.0 for k, v in real_run(*args, **kwargs).items()}

    monkeypatch.setattr(convert, "run", off_by_one)
    import gconv_rewrite.passes.tflite.from_keras as from_keras

    monkeypatch.setattr(from_keras, "run", off_by_one)
    out = tmp_path / "g.tflite"
    with pytest.raises(VerificationFailed) as failure:
        fuse(source, output=out, options=Options(to="tflite"))
    assert "tflite:head" in failure.value.message
    rows = {o.name: o.passed for o in failure.value.verification.outputs}
    assert rows == {"head": True, "tflite:head": False}
    assert not out.exists() and sorted(p.name for p in tmp_path.iterdir()) == ["g.keras"]


def test_benchmark_times_the_original_tflite_against_the_fused_one(tmp_path):
    source = km.getitem_model(tmp_path / "g.keras")
    report_path = tmp_path / "r.json"
    result = invoke(source, "--to", "tflite", "--benchmark", "--threads", "1", "--report", report_path)
    assert result.exit_code == 0, result.output
    bench = json.loads(report_path.read_text())["models"][0]["report"]["benchmark"]
    assert bench["runtime"] == "tflite" and bench["threads"] == 1 and bench["runs"] >= 10
    assert bench["before_ms"] > 0 and bench["after_ms"] > 0 and bench["ratio"] > 0
    assert "benchmark (tflite, 1 thread" in result.output


def test_expand_api_on_keras(tmp_path):
    inputs = keras.Input((8, 8, 8), name="img")
    source = tmp_path / "n.keras"
    keras.Model(inputs, keras.layers.Conv2D(8, 3, groups=2, name="g")(inputs)).save(source)
    result = expand(source, output=tmp_path / "n.expanded.tflite", options=Options(to="tflite"))
    assert result.model.grouped == [] and len(result.report.rewrites) == 1


def test_folder_of_models_mirrors_tflite_outputs(tmp_path):
    models = tmp_path / "models"
    (models / "sub").mkdir(parents=True)
    km.getitem_model(models / "a.keras")
    km.getitem_model(models / "sub" / "b.keras", groups=2)
    out = tmp_path / "out"
    result = invoke(models, "--to", "tflite", "-o", out, "--format", "json")
    assert result.exit_code == 0, result.output
    document = json.loads(result.stdout)
    assert [m["status"] for m in document["models"]] == ["rewritten", "rewritten"]
    assert [c.groups for c in grouped(out / "a.tflite")] == [4]
    assert [c.groups for c in grouped(out / "sub" / "b.tflite")] == [2]
