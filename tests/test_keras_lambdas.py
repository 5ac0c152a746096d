"""Keras Lambda layers: refused without --trust-lambdas (no code runs), probed with it,
default-argument files Keras cannot load, late binding detected and repaired."""

from __future__ import annotations

import logging
import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras
import numpy as np
import pytest
import tensorflow as tf
import tf_keras

from gconv_rewrite.api import Options, fuse
from gconv_rewrite.errors import BadInput
from gconv_rewrite.passes.keras import _lambdas
from samples import keras_models as km
from tests.helpers import classes, invoke


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    folder = tmp_path_factory.mktemp("keras_lambdas")
    return {
        "closure": km.lambda_model_keras3(folder / "closure.keras", binding="closure"),
        "default": km.lambda_model_keras3(folder / "default.keras", binding="default"),
        "late": km.lambda_model_keras3(folder / "late.keras", binding="late"),
        "legacy_default": km.legacy_model(folder / "legacy_default.h5", style="lambda"),
        "legacy_late": km.legacy_model(folder / "legacy_late.h5", style="lambda", late=True),
    }


# -- no trust: nothing runs ------------------------------------------------------------------

@pytest.mark.parametrize("key", ["closure", "legacy_default"])
def test_lambdas_are_refused_without_trust(models, key, tmp_path):
    out = tmp_path / "out.keras"
    result = invoke(models[key], "-o", out)
    assert result.exit_code == 2
    line = result.output.strip()
    assert len(line.splitlines()) == 1 and "Traceback" not in line
    assert "Lambda" in line and "running it means running the file's code" in line
    assert "--trust-lambdas" in line
    assert not out.exists()


def test_a_lambda_that_writes_a_file_never_runs_without_trust(tmp_path):
    marker = tmp_path / "pwned.txt"

    def evil(z, path=str(marker)):
        open(path, "w").write("ran")  # what a hostile file could do on load
        return z[..., 0:2]

    L = keras.layers
    inp = keras.Input((4, 4, 4))
    y = L.Concatenate()([L.Conv2D(2, 1)(L.Lambda(evil)(inp)), L.Conv2D(2, 1)(inp[..., 2:4])])
    path = tmp_path / "evil.keras"
    keras.Model(inp, y).save(path)
    legacy_path = tmp_path / "evil.h5"
    t_inp = tf_keras.Input((4, 4, 4))
    tf_keras.Model(t_inp, tf_keras.layers.Lambda(evil)(t_inp)).save(legacy_path)
    marker.unlink()  # building the models ran it; from here on nothing may

    for source in (path, legacy_path):
        for flags in ([], ["--check"], ["--dry-run"], ["--no-verify"]):
            result = invoke(source, *flags, "-o", tmp_path / "out.keras")
            assert result.exit_code == 2, result.output
            assert "--trust-lambdas" in result.output
        with pytest.raises(BadInput, match="trust-lambdas"):
            fuse(source, output=tmp_path / "out.keras")
    assert not marker.exists()
    assert not (tmp_path / "out.keras").exists()


# -- trusted: probed, fused ------------------------------------------------------------------

def test_trusted_closure_lambdas_fuse_to_a_safe_file(models, tmp_path):
    out = tmp_path / "fused.keras"
    result = invoke(models["closure"], "--trust-lambdas", "-o", out)
    assert result.exit_code == 0, result.output
    assert "group=4" in result.output and "Lambda 4->0" in result.output
    fused = keras.models.load_model(out, safe_mode=True)  # no code left in the file
    assert "Lambda" not in classes(fused)
    original = keras.models.load_model(models["closure"], safe_mode=False)
    x = np.random.default_rng(0).standard_normal((2, 8, 8, 8)).astype("float32")
    np.testing.assert_allclose(np.asarray(fused(x)), np.asarray(original(x)), atol=1e-5)


@pytest.mark.parametrize("key", ["default", "legacy_default"])
def test_default_argument_lambdas_keras_cannot_load_still_convert(models, key, tmp_path):
    with pytest.raises(Exception, match="defaults|deserialized"):
        keras.models.load_model(models[key], safe_mode=False)
    out = tmp_path / "fused.keras"
    result = fuse(models[key], output=out, options=Options(trust_lambdas=True))
    assert result.report.rewrites[0].groups == 4
    assert result.report.verification.passed
    assert "Keras cannot load it" in result.report.verification.note
    fused = keras.models.load_model(out, safe_mode=True)
    assert "Lambda" not in classes(fused)
    if key == "legacy_default":  # an independent reference: tf-keras loads its own file
        original = tf_keras.models.load_model(models[key], compile=False)
        x = np.random.default_rng(3).standard_normal((2, 8, 8, 8)).astype("float32")
        np.testing.assert_allclose(np.asarray(fused(x)), np.asarray(original(x, training=False)), atol=1e-5)


def test_non_slice_lambda_is_left_and_reported(tmp_path):
    L = keras.layers
    width = 2

    def make(c):
        return lambda z: z[..., c * width:(c + 1) * width]

    inp = keras.Input((8, 8, 8))
    x = L.Lambda(lambda z: z * 2.0 + 1.0, name="scale")(inp)
    y = L.Concatenate()([L.Conv2D(4, 1)(L.Lambda(make(c))(x)) for c in range(4)])
    path = tmp_path / "mixed.keras"
    keras.Model(inp, y).save(path)
    out = tmp_path / "out.keras"
    result = invoke(path, "--trust-lambdas", "-o", out)
    assert result.exit_code == 0, result.output
    assert "scale: Lambda left as it is: not a channel slice" in result.output
    fused = keras.models.load_model(out, safe_mode=False)
    assert classes(fused)["Lambda"] == 1
    with pytest.raises(ValueError):
        keras.models.load_model(out, safe_mode=True)  # the one Lambda left is still code


def test_lambda_slicing_a_spatial_axis_is_refused(tmp_path):
    L = keras.layers

    def make(c):
        return lambda z: z[:, c * 4:(c + 1) * 4]

    inp = keras.Input((8, 8, 8))
    y = L.Concatenate(axis=1)([L.Conv2D(4, 1)(L.Lambda(make(c))(inp)) for c in range(2)])
    path = tmp_path / "spatial.keras"
    keras.Model(inp, y).save(path)
    report = fuse(path, output=tmp_path / "out.keras", options=Options(trust_lambdas=True)).report
    assert not report.rewrites
    assert report.skipped[0].reason == "Concatenate on axis 1, not the channel axis"


# -- late binding ----------------------------------------------------------------------------

@pytest.mark.parametrize("key", ["late", "legacy_late"])
def test_late_binding_is_reported_loudly(models, key, tmp_path, caplog):
    out = tmp_path / "out.keras"
    with caplog.at_level(logging.WARNING):
        result = fuse(models[key], output=out, options=Options(trust_lambdas=True))
    (skip,) = result.report.skipped
    assert skip.reason.startswith("LATE BINDING: Lambdas")
    assert "every branch reads channels 6:8" in skip.reason and "--repair-late-binding" in skip.reason
    assert "LATE BINDING" in caplog.text
    assert not result.report.rewrites
    # The output computes what the file computes (the same slice four times), now without code.
    assert result.report.verification.passed
    assert "Lambda" not in classes(keras.models.load_model(out, safe_mode=True))


def test_late_binding_repaired_slices_each_group(models, tmp_path):
    out = tmp_path / "repaired.keras"
    result = invoke(models["late"], "--trust-lambdas", "--repair-late-binding", "-o", out)
    assert result.exit_code == 0, result.output
    assert "late binding repaired" in result.output
    assert "re-bound to their branch positions" in result.output

    # Independent check: the branch convs of the file applied to their intended slices.
    original = keras.models.load_model(models["late"], safe_mode=False)
    convs = [layer for layer in original.layers if type(layer).__name__ == "Conv2D"]
    x = np.random.default_rng(4).standard_normal((2, 8, 8, 8)).astype("float32")
    intended = np.concatenate([np.asarray(conv(x[..., 2 * i:2 * i + 2])) for i, conv in enumerate(convs)], axis=-1)
    intended = np.maximum(intended, 0)  # the model's Activation("relu")
    fused = keras.models.load_model(out, safe_mode=True)
    np.testing.assert_allclose(np.asarray(fused(x)), intended, atol=1e-5)
    assert not np.allclose(np.asarray(original(x)), intended)  # the file itself computes something else


def test_late_binding_repair_on_legacy_h5(models, tmp_path):
    result = fuse(models["legacy_late"], output=tmp_path / "out.keras",
                  options=Options(trust_lambdas=True, repair_late_binding=True))
    (rewrite,) = result.report.rewrites
    assert rewrite.groups == 4 and "late binding repaired" in rewrite.kind
    assert result.report.verification.passed


# -- probing ---------------------------------------------------------------------------------

@pytest.mark.parametrize("function,expected", [
    (lambda z: z[..., 2:4], (3, [(2, 4)])),
    (lambda z: z[:, :, :, 6:], (3, [(6, 8)])),
    (lambda z: tf.split(z, 4, axis=-1), (3, [(0, 2), (2, 4), (4, 6), (6, 8)])),
    (lambda z: z[:, 1:3], (1, [(1, 3)])),
    (lambda z: tf.identity(z[..., 0:4]), (3, [(0, 4)])),
])
def test_probe_accepts_exact_contiguous_slices(function, expected):
    probed = _lambdas.probe_slice(function, {}, [None, 4, 4, 8])
    assert (probed.axis, probed.ranges) == expected


@pytest.mark.parametrize("function,reason", [
    (lambda z: tf.abs(z)[..., 0:2], "not an exact contiguous slice"),
    (lambda z: z[..., ::2], "not an exact contiguous slice"),
    (lambda z: z[..., 0:2] * 1.0001, "not an exact contiguous slice"),
    (lambda z: tf.reverse(z, [-1])[..., 0:2], "not an exact contiguous slice"),
    (lambda z: z[:, 0:2, :, 0:2], "changes more than one axis"),
    (lambda z: tf.reduce_sum(z, -1), "changes the tensor's rank"),
    (lambda z: undefined_name, "NameError"),  # noqa: F821
])
def test_probe_rejects_everything_else(function, reason):
    probed = _lambdas.probe_slice(function, {}, [None, 4, 4, 8])
    assert isinstance(probed, str) and reason in probed


def _writes_into_its_input(z):
    z[..., 0] = 0.0  # NumPy: the read-only probe refuses; a tensor has no item assignment either
    return z[..., 0:2]


def test_probe_runs_code_that_needs_a_tensor_on_one_and_never_changes_the_probes():
    """Probes go in as NumPy arrays first; code that needs a tensor runs on the constant tensor;
    code that writes into its input cannot change the probes the next Lambda sees."""
    needs_tensor = _lambdas.probe_slice(lambda z: z[..., : z.shape.as_list()[-1] // 2], {}, [None, 4, 4, 8])
    assert (needs_tensor.axis, needs_tensor.ranges) == (3, [(0, 4)])
    writes = _lambdas.probe_slice(_writes_into_its_input, {}, [None, 4, 4, 8])
    assert isinstance(writes, str) and "running it on a probe failed" in writes
    after = _lambdas.probe_slice(lambda z: z[..., 0:2], {}, [None, 4, 4, 8])
    assert (after.axis, after.ranges) == (3, [(0, 2)])
    retyped = _lambdas.probe_slice(lambda z: tf.cast(z, "float16")[..., 0:2], {}, [None, 4, 4, 8])
    assert retyped == "it changes the tensor's type"
    for probe in _lambdas._probes((2, 4, 4, 8), 3):
        assert not probe.flags.writeable
    np.testing.assert_array_equal(_lambdas._probes((2, 4, 4, 8), 1)[0].ravel(), np.arange(1, 257, dtype=np.float32))


def test_probe_rejects_slices_relative_to_an_unfixed_size():
    probed = _lambdas.probe_slice(lambda z: z[:, 1:], {}, [None, None, None, 8])
    assert isinstance(probed, str) and "not fixed" in probed or "not a constant slice" in probed
    channels = _lambdas.probe_slice(lambda z: z[..., 2:4], {}, [None, None, None, 8])
    assert (channels.axis, channels.ranges) == (3, [(2, 4)])


def test_a_splitting_lambda_and_a_nested_lambda(tmp_path):
    """One Lambda handing out all groups (tf.split) fuses; a Lambda inside a nested model is code
    too: refused without trust, kept as it is with trust."""
    L = keras.layers
    inner_in = keras.Input((8, 8, 8))
    inner = keras.Model(inner_in, L.Lambda(lambda z: z * 2.0, name="double")(inner_in), name="inner")
    inp = keras.Input((8, 8, 8))
    parts = L.Lambda(lambda z: tf.split(z, 4, axis=-1), name="split4")(inner(inp))
    path = tmp_path / "split.keras"
    keras.Model(inp, L.Concatenate()([L.Conv2D(4, 1)(p) for p in parts])).save(path)

    refused = invoke(path, "-o", tmp_path / "out.keras")
    assert refused.exit_code == 2 and "double" in refused.output and "--trust-lambdas" in refused.output

    result = fuse(path, output=tmp_path / "out.keras", options=Options(trust_lambdas=True))
    (rewrite,) = result.report.rewrites
    assert rewrite.groups == 4 and "split4" in rewrite.nodes
    assert not result.report.skipped  # one splitting Lambda is no late binding
    fused = keras.models.load_model(tmp_path / "out.keras", safe_mode=False)
    assert [type(layer).__name__ for layer in fused.layers] == ["InputLayer", "Functional", "Conv2D"]


def test_module_level_loop_lambdas_are_repaired(tmp_path):
    """A loop at module level: the Lambdas read ``c`` as a global, which the file does not hold,
    so the saved model cannot run at all; the repair re-binds it per branch."""
    L = keras.layers
    inp = keras.Input((8, 8, 8))
    namespace = {"L": L, "inp": inp, "outs": []}
    exec("for c in range(4):\n"
         "    outs.append(L.Conv2D(4, 1)(L.Lambda(lambda z: z[..., c * 2:(c + 1) * 2])(inp)))", namespace)
    path = tmp_path / "module_level.keras"
    keras.Model(inp, L.Concatenate()(namespace["outs"])).save(path)
    convs = [namespace["outs"][i]._keras_history[0] for i in range(4)]
    x = np.random.default_rng(6).standard_normal((2, 8, 8, 8)).astype("float32")
    intended = np.concatenate([np.asarray(conv(x[..., 2 * i:2 * i + 2])) for i, conv in enumerate(convs)], axis=-1)

    refused = invoke(path, "--trust-lambdas", "-o", tmp_path / "out.keras")
    assert refused.exit_code == 2 and "NameError" in refused.output and "--repair-late-binding" in refused.output

    result = fuse(path, output=tmp_path / "out.keras",
                  options=Options(trust_lambdas=True, repair_late_binding=True))
    assert "late binding repaired" in result.report.rewrites[0].kind
    fused = keras.models.load_model(tmp_path / "out.keras", safe_mode=True)
    np.testing.assert_allclose(np.asarray(fused(x)), intended, atol=1e-5)
