"""Sound Keras verdicts (issue #20): tf-keras files verified against tf-keras itself, late binding
is a finding --check fails on, and tf-keras's ``tf.concat`` joins are candidates like Concatenate."""

from __future__ import annotations

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras
import numpy as np
import pytest
import tensorflow as tf
import tf_keras
from click.testing import CliRunner

from rewriter.api import Options, check, fuse
from rewriter.cli import main
from samples import keras_models as km

TL = tf_keras.layers


def invoke(*args):
    return CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=True)


def grouped(model) -> list[int]:
    return sorted(layer.groups for layer in model.layers if type(layer).__name__ == "Conv2D" and layer.groups > 1)


def outputs(model, x) -> list[np.ndarray]:
    result = model(x, training=False)
    return [np.asarray(r) for r in (result if isinstance(result, (list, tuple)) else [result])]


def tf_concat_model(path, *, groups: int = 4, tails: bool = True, axis: int = -1):
    """tf-keras: stem → tf.split → Conv2D (→ BN → ReLU) per branch → tf.concat → pool → Dense."""
    inp = tf_keras.Input((8, 8, 8))
    x = TL.Conv2D(8, 1, name="stem")(inp)
    branches = []
    for i, part in enumerate(tf.split(x, groups, axis=-1)):
        y = TL.Conv2D(4, 3, padding="same", name=f"branch_conv{i}")(part)
        if tails:
            y = TL.ReLU()(TL.BatchNormalization()(y))
        branches.append(y)
    joined = tf.concat(branches, axis=axis)
    model = tf_keras.Model(inp, TL.Dense(3)(TL.GlobalAveragePooling2D()(joined)))
    km._randomise_bn(model)
    model.save(path)
    return path


# -- finding 8: tf.concat joins ------------------------------------------------------------------

@pytest.mark.parametrize("suffix", [".h5", ".keras"])
def test_tf_concat_join_is_a_candidate_and_fuses(tmp_path, suffix):
    source = tf_concat_model(tmp_path / f"tf_concat{suffix}")
    found = invoke(source, "--check")
    assert found.exit_code == 1 and "check: 1 fusable pattern found" in found.output, found.output

    out = tmp_path / "fused.keras"
    result = invoke(source, "-o", out)
    assert result.exit_code == 0 and "verification: passed" in result.output, result.output
    fused = keras.models.load_model(out, safe_mode=True)
    assert grouped(fused) == [4]
    assert not any(type(op).__name__ in ("TFOpLambda", "Concatenate") for op in fused.operations)
    # The numbers against tf-keras running the original file.
    original = tf_keras.models.load_model(source, compile=False)
    x = np.random.default_rng(8).standard_normal((2, 8, 8, 8)).astype("float32")
    np.testing.assert_allclose(outputs(fused, x)[0], outputs(original, x)[0], rtol=1e-5, atol=1e-5)
    # Nothing is left for a second run to find.
    again = invoke(out, "--check")
    assert again.exit_code == 0 and "check: 0 fusable patterns found" in again.output, again.output


def test_tf_concat_off_the_channel_axis_is_refused_with_the_reason(tmp_path):
    source = tf_concat_model(tmp_path / "tf_concat_axis1.h5", tails=False, axis=1)
    report = check(source)
    assert not report.rewrites
    (skip,) = report.skipped
    assert skip.location.startswith("tf.concat") and skip.reason == "tf.concat on axis 1, not the channel axis"


def test_keras3_ops_concatenate_join_fuses(tmp_path):
    L = keras.layers
    inp = keras.Input((8, 8, 8))
    x = L.Conv2D(8, 1, name="stem")(inp)
    parts = keras.ops.split(x, 4, axis=-1)
    joined = keras.ops.concatenate([L.Conv2D(4, 3, padding="same", name=f"c{i}")(p) for i, p in enumerate(parts)],
                                   axis=-1)
    original = keras.Model(inp, L.GlobalAveragePooling2D()(joined))
    source = tmp_path / "ops_concat.keras"
    original.save(source)
    out = tmp_path / "fused.keras"
    result = fuse(source, output=out)
    assert [r.groups for r in result.report.rewrites] == [4] and result.report.verification.passed
    fused = keras.models.load_model(out, safe_mode=True)
    assert grouped(fused) == [4]
    x = np.random.default_rng(9).standard_normal((2, 8, 8, 8)).astype("float32")
    np.testing.assert_allclose(outputs(fused, x)[0], outputs(original, x)[0], rtol=1e-5, atol=1e-5)
