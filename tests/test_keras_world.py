"""Legacy Keras code from the world (issue #21, items 1-4 and 9): models written the way public
Keras repositories write grouped convolutions — Lambda slices from named ``def`` helpers with
``arguments`` (classification_models' ResNeXt / SE blocks), Keras 2 backend calls in Lambda code
(ShuffleNet's channel shuffle, AlexNet's local response normalisation), AlexNet's two
``channels_first`` towers cut by ``splittensor`` Lambdas, ShuffleNet v1 group convs whose slice
Lambdas close over a late-bound ``offset`` — built here in code, saved as ``.h5`` by tf-keras.
Each test checks the structure written and the numbers against tf-keras running the original."""

from __future__ import annotations

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras
import numpy as np
import pytest
import tensorflow as tf
import tf_keras
from tf_keras import backend as K

from gconv_rewrite.api import Options, expand, fuse
from gconv_rewrite.passes.keras import _lambdas
from gconv_rewrite.passes.keras._keras2_backend import Keras2Backend
from tests.helpers import conv2d_groups as grouped
from tests.helpers import invoke

L = tf_keras.layers


def layer_classes(model) -> list[str]:
    return [type(layer).__name__ for layer in model.layers]


def inputs_for(model, seed: int = 0) -> np.ndarray:
    shape = [2 if d is None else d for d in model.inputs[0].shape]
    return np.random.default_rng(seed).standard_normal(shape).astype("float32")


def same_numbers(original, written_path, *, seed: int = 0):
    """The written .keras, loaded by Keras 3 under the trust the input needed (its Lambda code
    runs: safe_mode=False), computes what tf-keras computes with the original."""
    written = keras.models.load_model(written_path, safe_mode=False)
    x = inputs_for(original, seed)
    np.testing.assert_allclose(np.asarray(written(x)), np.asarray(original(x, training=False)), atol=1e-4, rtol=1e-4)
    return written


def randomise_batchnorm(model, seed: int = 1):
    rng = np.random.default_rng(seed)
    for layer in model.layers:
        if type(layer).__name__ == "BatchNormalization":
            gamma, beta, mean, var = layer.get_weights()
            layer.set_weights([rng.uniform(0.5, 1.5, gamma.shape), rng.normal(0, 0.2, beta.shape),
                               rng.normal(0, 0.2, mean.shape), rng.uniform(0.5, 1.5, var.shape)])


# -- classification_models style: named def helpers with ``arguments`` (item 1) -----------------

def slice_tensor(x, start, stop, axis):
    """The helper a ResNeXt group conv slices with (one Lambda per group, by ``arguments``)."""
    if axis == 3:
        return x[:, :, :, start:stop]
    return x[:, start:stop, :, :]


def expand_dims(x, channels_axis):
    """Squeeze-excite: the pooled vector back to a 1x1 map (a named def, no globals)."""
    if channels_axis == 3:
        return x[:, None, None, :]
    return x[:, :, None, None]


def expand_dims_k(x):
    """The same through the Keras 2 backend (K.expand_dims), as older copies write it."""
    return K.expand_dims(K.expand_dims(x, 1), 1)


def group_conv(x, filters: int, groups: int, name: str):
    width = K.int_shape(x)[-1] // groups
    blocks = []
    for c in range(groups):
        piece = L.Lambda(slice_tensor, arguments={"start": c * width, "stop": (c + 1) * width, "axis": 3})(x)
        blocks.append(L.Conv2D(filters // groups, 3, padding="same", use_bias=False, name=f"{name}_{c}")(piece))
    return L.Concatenate(axis=3, name=f"{name}_concat")(blocks)


def se_resnext_model(path, *, k_helper: bool = False):
    inp = tf_keras.Input((8, 8, 16))
    x = group_conv(inp, 16, 4, "block1_gconv")
    x = L.BatchNormalization()(x)
    x = L.Activation("relu")(x)
    se = L.GlobalAveragePooling2D()(x)
    se = L.Lambda(expand_dims_k)(se) if k_helper else L.Lambda(expand_dims, arguments={"channels_axis": 3})(se)
    se = L.Conv2D(4, 1, activation="relu")(se)
    se = L.Conv2D(16, 1, activation="sigmoid")(se)
    x = L.Multiply()([x, se])
    model = tf_keras.Model(inp, x)
    randomise_batchnorm(model)
    model.save(path)
    return model


@pytest.mark.parametrize("k_helper", [False, True], ids=["plain-def", "def-calling-K"])
def test_kept_lambda_wrapping_a_named_def_is_written_so_that_it_loads(tmp_path, k_helper):
    path = tmp_path / "se_resnext.h5"
    original = se_resnext_model(path, k_helper=k_helper)
    out = tmp_path / "out.keras"
    result = invoke(path, "--trust-lambdas", "-o", out)
    assert result.exit_code == 0, result.output
    written = same_numbers(original, out)
    assert grouped(written) == [4]
    assert layer_classes(written).count("Lambda") == 1  # the squeeze-excite helper, kept
    # The same trust as the input: its code runs only when the user opts in.
    with pytest.raises(ValueError, match="safe_mode"):
        keras.models.load_model(out, safe_mode=True)
    # Written once more by Keras (a second save of the loaded model) it still loads: the kept
    # function is bytecode named "<lambda>", not a name no loader can find.
    again = tmp_path / "again.keras"
    written.save(again)
    same_numbers(original, again)


def test_kept_lambda_with_defaults_and_closure_reloads(tmp_path):
    """Keras 3 writes a function's defaults as a list, and refuses them when loading ("arg 4
    (defaults) must be None or tuple"): a kept ``lambda z, scale=...`` must load all the same."""
    inp = tf_keras.Input((6, 6, 4))
    x = L.Concatenate()([L.Conv2D(2, 1, name=f"b{c}")(L.Lambda(lambda z, c=c: z[..., 2 * c:2 * c + 2])(inp))
                         for c in range(2)])
    factor = 3.0
    x = L.Lambda(lambda z, scale=(0.5, 2.0): z * scale[1] * factor)(x)  # defaults and a closure value
    original = tf_keras.Model(inp, x)
    path = tmp_path / "defaults.h5"
    original.save(path)
    result = fuse(path, output=tmp_path / "out.keras", options=Options(trust_lambdas=True))
    assert [r.groups for r in result.report.rewrites] == [2]
    written = same_numbers(original, tmp_path / "out.keras")
    assert layer_classes(written).count("Lambda") == 1


def test_a_written_model_that_does_not_load_names_its_cause_whole(tmp_path, monkeypatch):
    """The cause at the root of Keras's wrapped error, whole (no cut mid-word); -v shows the
    traceback."""
    path = tmp_path / "se.h5"
    se_resnext_model(path)
    cause = "the innermost reason " + "with many words " * 20 + "ends here"

    def refuse(*args, **kwargs):
        try:
            raise TypeError(cause)
        except TypeError as inner:
            raise ValueError("Functional could not be deserialized properly. config=" + "{...}" * 200) from inner

    monkeypatch.setattr(keras.models, "load_model", refuse)
    result = invoke(path, "--trust-lambdas", "-o", tmp_path / "out.keras")
    assert result.exit_code == 1
    assert f"the written model does not load in Keras (TypeError: {cause}); nothing was written" in result.output
    assert "Traceback" not in result.output and not (tmp_path / "out.keras").exists()
    verbose = invoke(path, "--trust-lambdas", "-o", tmp_path / "out.keras", "-v")
    assert verbose.exit_code == 1 and "Traceback (most recent call last)" in verbose.output


# -- Keras 2 backend calls in Lambda code (item 2) ---------------------------------------------

def channel_shuffle(x, groups):
    """ShuffleNet's channel shuffle through the Keras 2 backend."""
    height, width, channels = K.int_shape(x)[1:]
    per_group = channels // groups
    x = K.reshape(x, [-1, height, width, groups, per_group])
    x = K.permute_dimensions(x, (0, 1, 2, 4, 3))
    return K.reshape(x, [-1, height, width, channels])


def cross_channel_normalisation(alpha=1e-4, k=2.0, beta=0.75, n=5):
    """AlexNet's local response normalisation across channels (channels_last), Keras 2 backend."""
    def normalise(x):
        half = n // 2
        squared = K.square(x)
        # Pad the channel axis: move it into a spatial position, pad, move it back.
        padded = K.spatial_2d_padding(K.permute_dimensions(squared, (0, 3, 1, 2)), ((half, half), (0, 0)),
                                      data_format="channels_last")
        padded = K.permute_dimensions(padded, (0, 2, 3, 1))
        channels = K.int_shape(x)[-1]
        windows = K.concatenate([K.expand_dims(padded[..., i:i + channels], -1) for i in range(n)], axis=-1)
        return x / K.pow(k + alpha * K.sum(windows, axis=-1), beta)
    return normalise


def backend_calls_model(path):
    inp = tf_keras.Input((8, 8, 6))
    x = L.Conv2D(12, 3, padding="same", name="stem")(inp)
    x = L.Lambda(cross_channel_normalisation(), name="lrn")(x)
    x = L.Concatenate(name="join")([L.Conv2D(4, 1, name=f"g{c}")(L.Lambda(lambda z, c=c: z[..., 4 * c:4 * c + 4])(x))
                                    for c in range(3)])
    x = L.Lambda(channel_shuffle, arguments={"groups": 3}, name="shuffle")(x)
    model = tf_keras.Model(inp, x)
    model.save(path)
    return model


def test_keras2_backend_calls_run_and_stay(tmp_path):
    path = tmp_path / "backend_calls.h5"
    original = backend_calls_model(path)
    check = invoke(path, "--trust-lambdas", "--check")
    assert check.exit_code == 1, check.output  # one group to fuse; nothing fatal
    assert "shuffle: Lambda left as it is" in check.output and "lrn: Lambda left as it is" in check.output
    out = tmp_path / "out.keras"
    result = fuse(path, output=out, options=Options(trust_lambdas=True))
    assert [r.groups for r in result.report.rewrites] == [3]
    assert result.report.verification.passed and result.report.verification.reference.startswith("tf-keras")
    written = same_numbers(original, out)
    assert grouped(written) == [3] and layer_classes(written).count("Lambda") == 2


def test_a_lambda_that_cannot_run_in_no_group_is_reported_not_fatal_for_check(tmp_path):
    path = tmp_path / "helper.h5"
    globals()["helper_beside_the_model"] = lambda z: z * 2  # exists while the author builds the model
    try:
        inp = tf_keras.Input((8, 8, 8))
        x = L.Concatenate()([L.Conv2D(4, 3, padding="same", name=f"g{c}")(
            L.Lambda(lambda z, c=c: z[..., 2 * c:2 * c + 2])(inp)) for c in range(4)])
        x = L.Lambda(lambda z: helper_beside_the_model(z), name="helper_call")(x)  # noqa: F821 (not saved)
        tf_keras.Model(inp, x).save(path)
    finally:
        del globals()["helper_beside_the_model"]
    check = invoke(path, "--trust-lambdas", "--check")
    assert check.exit_code == 1, check.output  # the group is found; the Lambda is reported
    assert "helper_call: Lambda layer 'helper_call' fails when run: NameError" in check.output
    assert "a global the file does not hold" in check.output
    # Writing needs the model to run: one line, exit 2, nothing written.
    refused = invoke(path, "--trust-lambdas", "-o", tmp_path / "out.keras")
    assert refused.exit_code == 2 and "Traceback" not in refused.output
    assert "fails when run: NameError" in refused.output and not (tmp_path / "out.keras").exists()


@pytest.mark.parametrize("data_format", ["channels_last", "channels_first"])
def test_keras2_backend_mapping_onto_keras_ops_matches_tf_keras(data_format):
    """Where tf-keras is not installed, Lambda code gets the mapping onto keras.ops: the same
    numbers as tf-keras's backend for the calls legacy code makes."""
    mapped = Keras2Backend()
    x = tf.constant(np.random.default_rng(0).standard_normal((2, 4, 5, 6)).astype("float32"))
    pairs = [
        (lambda B: B.reshape(x, [-1, 4, 5, 3, 2])),
        (lambda B: B.permute_dimensions(x, (0, 3, 1, 2))),
        (lambda B: B.spatial_2d_padding(x, ((1, 2), (0, 1)), data_format=data_format)),
        (lambda B: B.sum(B.square(x), axis=-1, keepdims=True)),
        (lambda B: B.concatenate([x, x], axis=-1)),
        (lambda B: B.pow(B.abs(x) + 1.0, 0.75)),
        (lambda B: B.expand_dims(B.mean(x, axis=1), 1)),
        (lambda B: B.batch_flatten(x)),
    ]
    for call in pairs:
        np.testing.assert_allclose(np.asarray(call(mapped)), np.asarray(call(K)), rtol=1e-6)
    assert mapped.int_shape(x) == K.int_shape(x) == (2, 4, 5, 6)
    with pytest.raises(AttributeError, match="no 'not_a_backend_function'"):
        mapped.not_a_backend_function  # noqa: B018


def test_lambda_code_gets_the_keras2_backend_as_k():
    assert _lambdas.lambda_globals()["K"] is K  # tf-keras is installed here: its backend


# -- AlexNet's two towers, channels_first (item 3) ---------------------------------------------

def splittensor(axis=1, ratio_split=1, id_split=0):
    """convnets-keras style: a Lambda cutting one of ``ratio_split`` parts of ``axis``."""
    def cut(x):
        part = K.int_shape(x)[axis] // ratio_split
        if axis == 1:
            return x[:, id_split * part:(id_split + 1) * part]
        return x[:, :, :, id_split * part:(id_split + 1) * part]
    return L.Lambda(cut)


def alexnet_towers(path, data_format: str):
    axis = 1 if data_format == "channels_first" else 3
    inp = tf_keras.Input((3, 19, 19) if data_format == "channels_first" else (19, 19, 3))

    def towers(x, filters, name):
        return L.Concatenate(axis=axis, name=name)([
            L.Conv2D(filters // 2, 3, padding="same", activation="relu", data_format=data_format,
                     name=f"{name}_{i + 1}")(splittensor(axis=axis, ratio_split=2, id_split=i)(x))
            for i in range(2)])

    x = L.Conv2D(16, 5, strides=2, activation="relu", data_format=data_format, name="conv_1")(inp)
    x = towers(x, 16, "conv_2")
    x = L.Conv2D(24, 3, padding="same", activation="relu", data_format=data_format, name="conv_3")(x)
    x = towers(x, 24, "conv_4")
    x = towers(x, 16, "conv_5")
    x = L.Flatten(data_format=data_format)(x)
    model = tf_keras.Model(inp, x)  # features before the classifier: nothing saturates
    model.save(path)
    return model


@pytest.mark.parametrize("data_format", ["channels_first", "channels_last"])
def test_alexnet_two_towers_fuse(tmp_path, data_format):
    path = tmp_path / f"alexnet_{data_format}.h5"
    original = alexnet_towers(path, data_format)
    out = tmp_path / "out.keras"
    result = fuse(path, output=out, options=Options(trust_lambdas=True))
    assert sorted(r.location for r in result.report.rewrites) == ["conv_2_1_group2", "conv_4_1_group2",
                                                                   "conv_5_1_group2"]
    assert [r.groups for r in result.report.rewrites] == [2, 2, 2]
    # Proven against tf-keras running the file itself (TF runs these NCHW convs on CPU).
    assert result.report.verification.passed and result.report.verification.reference.startswith("tf-keras")
    written = keras.models.load_model(out, safe_mode=True)  # no Lambda left
    assert "Lambda" not in layer_classes(written) and grouped(written) == [2, 2, 2]
    assert {layer.data_format for layer in written.layers if type(layer).__name__ == "Conv2D"} == {data_format}
    x = inputs_for(original)
    np.testing.assert_allclose(np.asarray(written(x)), np.asarray(original(x)), atol=1e-4, rtol=1e-4)


# -- ShuffleNet v1, g=3 (item 4) ---------------------------------------------------------------

def shufflenet_group_conv(x, in_channels, out_channels, groups, name):
    """The public ShuffleNet v1 idiom: Lambdas made in a loop closing over ``offset`` (late-bound:
    every one reads the last group) → 1x1 Conv2D → Concatenate."""
    if groups == 1:
        return L.Conv2D(out_channels, 1, use_bias=False, name=name)(x)
    per_group = in_channels // groups
    branches = []
    for i in range(groups):
        offset = i * per_group
        piece = L.Lambda(lambda z: z[:, :, :, offset:offset + per_group],  # noqa: B023 (late-bound on purpose)
                         name=f"{name}/g{i}_slice")(x)
        branches.append(L.Conv2D(out_channels // groups, 1, use_bias=False, name=f"{name}/g{i}")(piece))
    return L.Concatenate(name=f"{name}/concat")(branches)


def shufflenet_unit(x, in_channels, out_channels, groups, stride, name, first_groups):
    bottleneck = out_channels // 4
    y = shufflenet_group_conv(x, in_channels, bottleneck, first_groups, f"{name}/1x1_gconv_1")
    y = L.BatchNormalization(name=f"{name}/bn_gconv_1")(y)
    y = L.Activation("relu")(y)
    y = L.Lambda(channel_shuffle, arguments={"groups": groups}, name=f"{name}/channel_shuffle")(y)
    y = L.DepthwiseConv2D(3, strides=stride, padding="same", use_bias=False, name=f"{name}/1x1_dwconv_1")(y)
    y = L.BatchNormalization(name=f"{name}/bn_dwconv_1")(y)
    if stride == 2:
        y = shufflenet_group_conv(y, bottleneck, out_channels - in_channels, groups, f"{name}/1x1_gconv_2")
        y = L.BatchNormalization(name=f"{name}/bn_gconv_2")(y)
        shortcut = L.AveragePooling2D(3, strides=2, padding="same")(x)
        return L.Activation("relu")(L.Concatenate(name=f"{name}/concat")([y, shortcut]))
    y = L.BatchNormalization(name=f"{name}/bn_gconv_2")(
        shufflenet_group_conv(y, bottleneck, out_channels, groups, f"{name}/1x1_gconv_2"))
    return L.Activation("relu")(L.Add()([x, y]))


def shufflenet_v1(path, *, units=(2, 2), size=16, groups=3, channels=(24, 48, 96, 192)):
    """A small ShuffleNet v1 (stages of ``units``; the first unit of each stage has stride 2)."""
    inp = tf_keras.Input((size, size, 3))
    x = L.Conv2D(channels[0], 3, strides=2, padding="same", use_bias=False, name="conv1")(inp)
    in_channels = channels[0]
    for stage, repeat in enumerate(units):
        out_channels = channels[stage + 1]
        for unit in range(repeat):
            stride = 2 if unit == 0 else 1
            x = shufflenet_unit(x, in_channels, out_channels, groups, stride, f"stage{stage + 2}/block{unit + 1}",
                                first_groups=1 if stage == 0 and unit == 0 else groups)
            in_channels = out_channels
    model = tf_keras.Model(inp, x)
    randomise_batchnorm(model)
    model.save(path)
    return model


def test_shufflenet_v1_group_convs_fuse_with_the_late_binding_repaired(tmp_path):
    path = tmp_path / "shufflenet.h5"
    original = shufflenet_v1(path)
    # 2 stages x 2 units x 2 group convs, less the first unit's first 1x1 (groups=1): 7 groups.
    check = invoke(path, "--trust-lambdas", "--check")
    assert check.exit_code == 1 and "LATE BINDING" in check.output and "Traceback" not in check.output
    out = tmp_path / "out.keras"
    result = fuse(path, output=out, options=Options(trust_lambdas=True, repair_late_binding=True))
    assert len(result.report.rewrites) == 7 and {r.groups for r in result.report.rewrites} == {3}
    assert all("late binding repaired" in r.kind for r in result.report.rewrites)
    assert result.report.verification.passed
    written = keras.models.load_model(out, safe_mode=False)
    assert grouped(written) == [3] * 7
    assert layer_classes(written).count("Lambda") == 4  # the channel shuffles, left as they are
    # The repaired model is what the author meant: each branch reads its own group, so it
    # differs from tf-keras running the late-bound file, and equals the intended computation.
    intended = _intended_shufflenet(original)
    x = inputs_for(original)
    np.testing.assert_allclose(np.asarray(written(x)), np.asarray(intended(x)), atol=1e-4, rtol=1e-4)
    assert not np.allclose(np.asarray(written(x)), np.asarray(original(x)), atol=1e-3)


def _intended_shufflenet(original):
    """The original with each late-bound slice Lambda replaced by the slice its name says."""
    import re

    def clone(layer):
        match = re.search(r"/g(\d+)_slice$", layer.name)
        if type(layer).__name__ == "Lambda" and match:
            i = int(match.group(1))
            return L.Lambda(lambda z, i=i: z[..., i * (z.shape[-1] // 3):(i + 1) * (z.shape[-1] // 3)],
                            name=layer.name)
        return layer.__class__.from_config(layer.get_config())

    intended = tf_keras.models.clone_model(original, clone_function=clone)
    for source, target in zip(original.layers, intended.layers):
        target.set_weights(source.get_weights())
    return intended


# -- DepthwiseConv2D under --expand (item 9) ---------------------------------------------------

def test_expand_says_why_depthwise_layers_stay(tmp_path):
    inp = tf_keras.Input((8, 8, 8))
    x = L.DepthwiseConv2D(3, padding="same", name="dw")(inp)
    x = L.Conv2D(8, 3, groups=2, padding="same", name="grouped")(x)
    original = tf_keras.Model(inp, x)
    path = tmp_path / "dw.h5"
    original.save(path)
    out = tmp_path / "out.keras"
    report = expand(path, output=out).report
    assert [r.location for r in report.rewrites] == ["grouped"]
    assert [(s.location, s.reason) for s in report.skipped] == [
        ("dw", "depthwise (DepthwiseConv2D) kept: it is already the depthwise kernel, which runtimes without "
               "grouped convolutions run as their own op; nothing to expand")]
    written = keras.models.load_model(out, safe_mode=True)
    assert layer_classes(written).count("DepthwiseConv2D") == 1
    x = inputs_for(original)
    np.testing.assert_allclose(np.asarray(written(x)), np.asarray(original(x)), atol=1e-5)
