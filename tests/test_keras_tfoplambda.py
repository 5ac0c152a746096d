"""tf-keras TFOpLambda layers (every TF function called on a Keras tensor): rebuilt as keras.ops
where a rewrite needs the model rebuilt, never in the way of --check or a run that changes
nothing, and refused by name (one line, exit 2) only when a rebuild needs one we do not have."""

from __future__ import annotations

import os
import re
import zipfile

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras
import numpy as np
import pytest
import tensorflow as tf
import tf_keras

from gconv_rewrite.passes.keras import _config
from gconv_rewrite.passes.keras._tf_ops import REBUILT
from tests.helpers import conv2d_groups as grouped
from tests.helpers import error_lines, invoke
from tests.helpers import keras_outputs as run

L = tf_keras.layers
UNKNOWN = "math.cumsum"  # a TF function tf-keras records that has no rebuild here


def tfop_functions(path) -> set[str]:
    config = _config.read_file(path).config
    return {layer["config"]["function"] for layer in config["config"]["layers"]
            if layer["class_name"] in ("TFOpLambda", "SlicingOpLambda")}


def everyday_model(path, *, unknown: str | None = None, unknown_after: bool = True):
    """add / multiply / relu6 / reduce_mean / reshape around two hand-made groups: one from
    tf.split (4 branches of 2 channels... as TFOpLambda split), one from getitem slices."""
    inp = tf_keras.Input((8, 8, 8))
    x = inp + 1.0                                   # tf.__operators__.add with a constant
    x = tf.math.multiply(x, 0.5)                    # tf.math.multiply
    x = tf.nn.relu6(x)                              # tf.nn.relu6
    if unknown and not unknown_after:
        x = tf.math.cumsum(x, axis=-1)
    parts = tf.split(x, 2, axis=-1)                 # tf.split: group 1
    y = L.Concatenate()([L.Conv2D(4, 3, padding="same", name=f"split_conv{i}")(p) for i, p in enumerate(parts)])
    scale = tf.math.reduce_mean(y, axis=[1, 2], keepdims=True)   # tf.math.reduce_mean
    y = y * scale                                   # tf.math.multiply of two tensors
    y = 1.0 - y                                     # tf.math.subtract, constant first argument
    branches = [L.Conv2D(2, 1, name=f"slice_conv{i}")(y[:, :, :, 2 * i:2 * i + 2]) for i in range(4)]  # getitem: group 2
    z = L.Concatenate()(branches)
    z = z + y                                       # tf.__operators__.add of two tensors (y= by keyword)
    if unknown and unknown_after:
        z = tf.math.cumsum(z, axis=-1)
    z = tf.reshape(z, [-1, 8 * 8 * 8])              # tf.reshape
    model = tf_keras.Model(inp, z)
    model.save(path)
    return path


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tfoplambda")
    return {
        "everyday.h5": everyday_model(folder / "everyday.h5"),
        "everyday.keras": everyday_model(folder / "everyday.keras"),
        "unknown_after.h5": everyday_model(folder / "unknown_after.h5", unknown=UNKNOWN),
        "unknown_before.h5": everyday_model(folder / "unknown_before.h5", unknown=UNKNOWN, unknown_after=False),
        "unknown_before.keras": everyday_model(folder / "unknown_before.keras", unknown=UNKNOWN, unknown_after=False),
        "unknown_after.keras": everyday_model(folder / "unknown_after.keras", unknown=UNKNOWN),
    }


@pytest.mark.parametrize("name", ["everyday.h5", "everyday.keras"])
def test_tfoplambda_model_fuses_to_grouped_convs(files, name, tmp_path):
    source = files[name]
    assert {"__operators__.add", "math.multiply", "nn.relu6", "math.reduce_mean", "reshape", "split",
            "__operators__.getitem", "math.subtract"} <= tfop_functions(source)
    out = tmp_path / "fused.keras"
    result = invoke(source, "--fuse", "-o", out)
    assert result.exit_code == 0, result.output
    assert "rewrites (2)" in result.output and "verification: passed" in result.output
    fused = keras.models.load_model(out, safe_mode=True)
    assert grouped(fused) == [2, 4]
    assert not any(type(op).__name__ == "TFOpLambda" for op in fused.operations)
    # The numbers against tf-keras itself (the tool's own verification compares with the rebuild).
    original = tf_keras.models.load_model(source, compile=False)
    x = np.random.default_rng(3).standard_normal((2, 8, 8, 8)).astype("float32")
    np.testing.assert_allclose(run(fused, x)[0], run(original, x)[0], rtol=1e-5, atol=1e-5)

    again = invoke(out, "--check")  # and nothing left to fuse
    assert again.exit_code == 0, again.output


def test_expand_of_the_fused_tfoplambda_model(files, tmp_path):
    fused = tmp_path / "fused.keras"
    assert invoke(files["everyday.h5"], "-o", fused).exit_code == 0
    expanded = tmp_path / "expanded.keras"
    result = invoke(fused, "--expand", "-o", expanded)
    assert result.exit_code == 0, result.output
    assert "verification: passed" in result.output
    assert grouped(keras.models.load_model(expanded, safe_mode=True)) == []


def test_check_works_with_an_unknown_tf_function(files):
    # The hand-made groups sit before the unknown function: found by --check (exit 1) ...
    result = invoke(files["unknown_after.h5"], "--check")
    assert result.exit_code == 1, result.output
    assert "2 fusable patterns found" in result.output
    # ... after it, where the file records the shapes (tf-keras's .keras build_config): found too ...
    result = invoke(files["unknown_before.keras"], "--check")
    assert result.exit_code == 1, result.output
    assert "2 fusable patterns found" in result.output
    # ... where it does not (.h5): not checkable without the rebuild, and the summary says so.
    result = invoke(files["unknown_before.h5"], "--check")
    assert result.exit_code == 0, result.output
    assert not error_lines(result)
    assert re.search(r"tf\.math\.cumsum(_\d+)?: layer .* calling tf\.math\.cumsum, which has no Keras 3 rebuild; "
                     r"\d+ layer call\(s\) after it are not rebuilt", result.output), result.output
    for flags in (["--dry-run"], ["--check", "--expand"]):
        result = invoke(files["unknown_after.h5"], *flags)
        assert result.exit_code in (0, 1) and not error_lines(result), result.output


@pytest.mark.parametrize("name", ["unknown_after.h5", "unknown_after.keras"])
def test_fuse_needing_a_rebuild_refuses_the_unknown_function_by_name(files, name, tmp_path):
    source = files[name]
    before = source.read_bytes()
    out = tmp_path / "out.keras"
    result = invoke(source, "--fuse", "-o", out)
    assert result.exit_code == 2, result.output
    lines = error_lines(result)
    assert len(lines) == 1, result.output
    assert re.search(r"layer 'tf\.math\.cumsum(_\d+)?' is a tf-keras TFOpLambda calling tf\.math\.cumsum", lines[0])
    assert "cannot write the fused model" in lines[0]
    assert not out.exists() and source.read_bytes() == before
    result = invoke(source, "--to", "onnx", "-o", tmp_path / "out.onnx")
    assert result.exit_code == 2 and f"tf.{UNKNOWN}" in error_lines(result)[0]


def test_nothing_to_change_with_an_unknown_function(tmp_path):
    inp = tf_keras.Input((4, 4, 3))
    y = tf.math.cumsum(L.Conv2D(4, 1)(inp), axis=1)
    model = tf_keras.Model(inp, tf.nn.relu(y))
    keras_path, h5_path = tmp_path / "plain.keras", tmp_path / "plain.h5"
    model.save(keras_path)
    model.save(h5_path)

    # .keras: written as it was (the archive as accepted), like the ONNX path's unchanged model.
    out = tmp_path / "plain.fused.keras"
    result = invoke(keras_path, "--fuse", "-o", out)
    assert result.exit_code == 0, result.output
    assert "rewrites: none" in result.output and f"wrote {out}" in result.output
    with zipfile.ZipFile(keras_path) as a, zipfile.ZipFile(out) as b:
        assert sorted(a.namelist()) == sorted(b.namelist())
        assert all(a.read(n) == b.read(n) for n in a.namelist())
    # .h5 → .keras needs the rebuild: nothing written, exit 0, the summary says why.
    out = tmp_path / "plain_h5.fused.keras"
    result = invoke(h5_path, "--expand", "-o", out)
    assert result.exit_code == 0, result.output
    assert "rewrites: none" in result.output and "not written" in result.output and f"tf.{UNKNOWN}" in result.output
    assert not out.exists()


def test_a_tensor_passed_by_keyword_is_a_use(tmp_path):
    """``a + y`` stores y in the node's kwargs; a slice read there is used outside the pattern."""
    inp = tf_keras.Input((6, 6, 6))
    a, b, c = inp[:, :, :, :2], inp[:, :, :, 2:4], inp[:, :, :, 4:]
    joined = L.Concatenate()([L.Conv2D(2, 1)(a), L.Conv2D(2, 1)(b), L.Conv2D(2, 1)(c)])
    extra = L.Conv2D(2, 1)(inp) + c  # c read by keyword
    path = tmp_path / "shared.h5"
    tf_keras.Model(inp, [joined, extra]).save(path)
    result = invoke(path, "--check")
    assert result.exit_code == 0, result.output
    assert "used elsewhere" in result.output


# One tf-keras model calling many of the rebuilt functions; the rebuilt model (written by a run
# that changes nothing) must compute what tf-keras computes, output by output.
def _many_ops(x, v):
    ops = {
        "abs": tf.math.abs(x), "exp": tf.math.exp(-tf.math.square(x)), "sqrt": tf.math.sqrt(tf.math.abs(x) + 1.0),
        "rsqrt": tf.math.rsqrt(tf.math.abs(x) + 1.0), "neg": -x, "div": x / 3.0, "tanh": tf.math.tanh(x),
        "sigmoid": tf.math.sigmoid(x), "relu": tf.nn.relu(x), "swish": tf.nn.swish(x), "silu_beta": tf.nn.silu(x, beta=2.0),
        "gelu": tf.nn.gelu(x), "gelu_tanh": tf.nn.gelu(x, approximate=True), "leaky": tf.nn.leaky_relu(x, alpha=0.1),
        "elu": tf.nn.elu(x), "selu": tf.nn.selu(x), "softplus": tf.math.softplus(x), "softmax": tf.nn.softmax(x),
        "log_softmax": tf.nn.log_softmax(x, axis=-1), "max": tf.math.maximum(x, 0.2), "min": tf.math.minimum(x, v),
        "pow": tf.math.pow(tf.math.abs(x) + 1.0, 2.0), "sum": tf.math.reduce_sum(x, axis=-1),
        "rmax": tf.math.reduce_max(x, axis=[1, 2]), "rmin": tf.math.reduce_min(x, axis=1, keepdims=True),
        "var": tf.math.reduce_variance(x, axis=-1), "std": tf.math.reduce_std(x, axis=-1),
        "transpose": tf.transpose(x, perm=[0, 3, 1, 2]), "v1_transpose": tf.compat.v1.transpose(x, perm=[0, 2, 1, 3]),
        "concat": tf.concat([x, v], axis=-1), "stack": tf.stack([x, v], axis=1),
        "d2s": tf.nn.depth_to_space(x, 2), "s2d": tf.nn.space_to_depth(x, 2),
        "expand": tf.expand_dims(x, 1), "squeeze": tf.squeeze(tf.math.reduce_mean(x, axis=1, keepdims=True), axis=1),
        "tile": tf.tile(x, [1, 1, 2, 1]), "clip": tf.clip_by_value(x, -0.5, 0.5), "cast": tf.cast(x, "float16"),
        "pad": tf.pad(x, [[0, 0], [1, 1], [2, 0], [0, 0]]), "reflect": tf.pad(x, [[0, 0], [1, 1], [1, 1], [0, 0]], mode="REFLECT"),
        "matmul": tf.linalg.matmul(x, v, transpose_b=True), "bias": tf.nn.bias_add(x, [0.5, -1.0, 2.0, 0.0]),
        "resize": tf.image.resize(x, [8, 8]), "l2": tf.math.l2_normalize(x, axis=-1),
        "getitem": x[:, 1:3, ::2, 0], "unstack0": tf.unstack(x, axis=-1)[0], "erf": tf.math.erf(x),
        "reshape": tf.reshape(x, [-1, 16, 4]), "mul_list": x * [1.0, 2.0, 3.0, 4.0],
    }
    return ops


def test_rebuilt_functions_compute_what_tf_keras_computes(tmp_path):
    inp, other = tf_keras.Input((4, 4, 4), name="x"), tf_keras.Input((4, 4, 4), name="v")
    ops = _many_ops(inp, other)
    path = tmp_path / "many.h5"
    tf_keras.Model([inp, other], list(ops.values())).save(path)
    used = tfop_functions(path)
    assert used <= set(REBUILT) | {"__operators__.getitem", "split"}, used - set(REBUILT)
    assert len(used) >= 40

    out = tmp_path / "many.keras"
    result = invoke(path, "--fuse", "-o", out)
    assert result.exit_code == 0, result.output
    rebuilt = keras.models.load_model(out, safe_mode=True)
    original = tf_keras.models.load_model(path, compile=False)
    rng = np.random.default_rng(5)
    feeds = [rng.standard_normal((2, 4, 4, 4)).astype("float32") for _ in range(2)]
    for name, expected, actual in zip(ops, run(original, feeds), run(rebuilt, feeds)):
        assert expected.shape == actual.shape and expected.dtype == actual.dtype, name
        np.testing.assert_allclose(actual.astype("float64"), expected.astype("float64"), rtol=2e-3 if name == "cast" else 1e-5,
                                   atol=1e-5, err_msg=name)


def test_tf_keras_application_idioms_expand_and_fuse_back(tmp_path):
    """What tf_keras.applications write around their TFOpLambdas: layer names with "/" (MobileNetV3,
    whose .h5 weights then sit in nested groups), DepthwiseConv2D with groups=1 in its config,
    ConvNeXt's LayerScale, hard-swish as add/multiply TFOpLambdas, a native grouped conv."""
    from tf_keras.src.applications.convnext import LayerScale

    inp = tf_keras.Input((8, 8, 8))
    x = L.Conv2D(8, 1, name="stem/conv")(inp)
    x = L.BatchNormalization(name="stem/conv/BatchNorm")(x)
    x = x * L.ReLU(6.0)(x + 3.0) * (1.0 / 6.0)                   # hard-swish, as MobileNetV3 writes it
    x = L.DepthwiseConv2D(3, padding="same", name="block/depthwise")(x)
    y = L.Conv2D(8, 3, padding="same", groups=4, name="block/grouped")(x)
    y = LayerScale(1e-6 * 1e5, 8, name="block/layer_scale")(y)  # ConvNeXt's x * gamma
    model = tf_keras.Model(inp, x + y)
    h5, keras_file = tmp_path / "app.h5", tmp_path / "app.keras"
    model.save(h5)
    model.save(keras_file)
    x_in = np.random.default_rng(7).standard_normal((2, 8, 8, 8)).astype("float32")
    for source in (h5, keras_file):
        reference = tf_keras.models.load_model(source, compile=False, custom_objects={"LayerScale": LayerScale})
        expanded, fused = tmp_path / f"{source.suffix[1:]}.expanded.keras", tmp_path / f"{source.suffix[1:]}.fused.keras"
        result = invoke(source, "--expand", "-o", expanded)
        assert result.exit_code == 0 and "verification: passed" in result.output, result.output
        assert "rewrites (1)" in result.output
        result = invoke(expanded, "--fuse", "-o", fused)
        assert result.exit_code == 0 and "verification: passed" in result.output, result.output
        for written, groups in ((expanded, []), (fused, [4])):
            loaded = keras.models.load_model(written, safe_mode=True)
            assert grouped(loaded) == groups
            np.testing.assert_allclose(run(loaded, x_in)[0], run(reference, x_in)[0], rtol=1e-5, atol=1e-5)


def test_tfoplambda_model_to_onnx(files, tmp_path):
    import onnx
    import tf2onnx  # noqa: F401  (the test extra installs it; a missing one must fail)
    out = tmp_path / "everyday.onnx"
    result = invoke(files["everyday.h5"], "--to", "onnx", "-o", out)
    assert result.exit_code == 0, result.output
    assert "verification: passed" in result.output and "onnx:output_0" in result.output
    groups = sorted(next((a.i for a in node.attribute if a.name == "group"), 1)
                    for node in onnx.load(str(out)).graph.node if node.op_type == "Conv")
    assert groups == [2, 4]
