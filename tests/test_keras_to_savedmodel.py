"""--to savedmodel for Keras inputs: the fused (or expanded) Keras model exported, frozen and
written as a plain-TF SavedModel folder (NAME.fused beside the input), proven by running its
serving signature in TensorFlow against the original Keras model.

Each written folder is read back here in plain TensorFlow (default settings, no remapper
switched off): its graph must hold one grouped Conv2D per fused group and no XLA-compiled call,
its signature must take the model's input names, and its numbers are checked again against the
original, independently of the tool's own verification.
"""

from __future__ import annotations

import json
import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras
import numpy as np
import pytest
import tensorflow as tf

from gconv_rewrite.api import fuse
from gconv_rewrite.errors import VerificationFailed
from gconv_rewrite.passes.keras.to_savedmodel import SIGNATURE
from gconv_rewrite.passes.tf import savedmodel as sm
from samples import keras_models as km
from tests.helpers import image, invoke
from tests.helpers import saved_model_conv_groups as conv_groups

TOLERANCE = 1e-4


def signature(folder):
    return tf.saved_model.load(str(folder)).signatures[SIGNATURE]


def written_ops(folder) -> set[str]:
    """Every op the written SavedModel's functions hold (XLA calls would show as *PartitionedCall
    with an _XlaMustCompile function)."""
    loaded = tf.saved_model.load(str(folder))
    graph_def = loaded.signatures[SIGNATURE].graph.as_graph_def()
    ops = {n.op for n in graph_def.node}
    for function in graph_def.library.function:
        assert not function.attr["_XlaMustCompile"].b, function.signature.name
        ops |= {n.op for n in function.node_def}
    return ops


def test_keras3_getitem_group_becomes_one_grouped_conv2d_savedmodel(tmp_path):
    source = km.getitem_model(tmp_path / "getitem.keras")
    report_path = tmp_path / "report.json"
    result = invoke(source, "--to", "savedmodel", "--report", report_path)
    assert result.exit_code == 0, result.output
    out = tmp_path / "getitem.fused"  # NAME.fused/ beside the input, a folder
    assert (out / "saved_model.pb").is_file() and "wrote " + str(out) in result.output
    assert sorted(conv_groups(out)) == [1, 4]  # the stem and the one fused group
    ops = written_ops(out)
    assert "StridedSlice" not in ops and "ConcatV2" not in ops
    # Plain TF, default settings: the signature takes the model's input name and matches Keras.
    function = signature(out)
    assert sorted(function.structured_input_signature[1]) == ["image"]
    x = image((2, 8, 8, 8))
    expected = np.asarray(keras.models.load_model(source)(x, training=False))
    (actual,) = function(image=tf.constant(x)).values()
    np.testing.assert_allclose(actual.numpy(), expected, atol=TOLERANCE, rtol=1e-3)
    report = json.loads(report_path.read_text())["models"][0]["report"]
    rows = {row["name"]: row for row in report["verification"]["outputs"]}
    assert report["verification"]["passed"] and rows["savedmodel:head"]["passed"] and rows["head"]["passed"]
    assert report["output"] == str(out) and report["rewrites"]


def test_tf_keras_h5_split_tfoplambda_group(tmp_path):
    source = km.legacy_model(tmp_path / "split.h5", style="split")
    result = invoke(source, "--to", "savedmodel")
    assert result.exit_code == 0, result.output
    out = tmp_path / "split.fused"
    assert sorted(conv_groups(out)) == [1, 4]
    assert "Split" not in written_ops(out) and "SplitV" not in written_ops(out)
    function = signature(out)
    (name,) = function.structured_input_signature[1]
    x = image((1, 8, 8, 8))
    import tf_keras
    expected = np.asarray(tf_keras.models.load_model(source, compile=False)(x, training=False))
    (actual,) = function(**{name: tf.constant(x)}).values()
    np.testing.assert_allclose(actual.numpy(), expected, atol=TOLERANCE, rtol=1e-3)
    assert "savedmodel:" in result.output


def test_expand_native_grouped_conv_to_savedmodel(tmp_path):
    inputs = keras.Input((8, 8, 16), name="img")
    y = keras.layers.Conv2D(16, 3, padding="same", groups=4, activation="relu", name="grouped")(inputs)
    y = keras.layers.Conv2D(8, 1, name="mix")(y)
    source = tmp_path / "native.keras"
    keras.Model(inputs, y).save(source)

    result = invoke(source, "--expand", "--to", "savedmodel")
    assert result.exit_code == 0, result.output
    out = tmp_path / "native.expanded"
    assert conv_groups(out) == [1] * 5  # four branches and the 1x1, none grouped
    function = signature(out)
    assert sorted(function.structured_input_signature[1]) == ["img"]
    x = image((1, 8, 8, 16))
    (actual,) = function(img=tf.constant(x)).values()
    np.testing.assert_allclose(actual.numpy(), np.asarray(keras.models.load_model(source)(x)),
                               atol=TOLERANCE, rtol=1e-3)

    fused = invoke(source, "--to", "savedmodel", "-o", tmp_path / "kept")  # the native one stays one grouped conv
    assert fused.exit_code == 0, fused.output
    assert sorted(conv_groups(tmp_path / "kept")) == [1, 4]


def test_api_returns_the_graph_and_proves_it_without_an_output(tmp_path):
    source = km.getitem_model(tmp_path / "getitem.keras")
    result = fuse(source, to="savedmodel")
    assert sum(n.op == "Conv2D" for n in result.model.node) == 2
    verification = result.report.verification
    assert verification.passed and any(o.name == "savedmodel:head" for o in verification.outputs)
    assert not result.report.written


def test_output_named_like_a_file_is_refused(tmp_path):
    source = km.getitem_model(tmp_path / "getitem.keras")
    result = invoke(source, "--to", "savedmodel", "-o", tmp_path / "out.keras")
    assert result.exit_code == 2 and "SavedModel folder" in result.output
    assert not (tmp_path / "out.keras").exists()


def test_mismatch_fails_and_writes_nothing(tmp_path, monkeypatch):
    source = km.getitem_model(tmp_path / "getitem.keras")
    real = sm.run_function

    def skewed(function, feeds, role):
        results = real(function, feeds, role)
        return {k: v + (1.0 if role == "written" else 0.0) for k, v in results.items()}

    monkeypatch.setattr(sm, "run_function", skewed)
    result = invoke(source, "--to", "savedmodel")
    assert result.exit_code == 1, result.output
    assert "savedmodel:head" in result.output
    assert not (tmp_path / "getitem.fused").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".getitem.fused")]
    with pytest.raises(VerificationFailed):
        fuse(source, to="savedmodel", output=tmp_path / "api_out")
    assert not (tmp_path / "api_out").exists()
