"""Keras: hand-made grouped convolutions (Keras 3 GetItem, tf-keras TFOpLambda) fused into
``ConvND(groups=N)`` — structure, numbers, refusals, CLI behaviour."""

from __future__ import annotations

import json
import os
import zipfile

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras
import numpy as np
import pytest
import tf_keras

from gconv_rewrite.api import Options, fuse
from gconv_rewrite.errors import BadInput, VerificationFailed
from samples import keras_models as km
from tests.helpers import classes, digest, invoke


def outputs(model, x):
    return np.asarray(model(x, training=False))


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    folder = tmp_path_factory.mktemp("keras_models")
    return {
        "getitem": km.getitem_model(folder / "getitem.keras"),
        "getitem1d": km.getitem_model(folder / "getitem1d.keras", rank=1),
        "getitem3d": km.getitem_model(folder / "getitem3d.keras", rank=3, size=4),
        "uneven": km.uneven_model(folder / "uneven.keras"),
        "tf_getitem": km.legacy_model(folder / "tf_getitem.h5", style="getitem"),
        "tf_split": km.legacy_model(folder / "tf_split.h5", style="split"),
    }


def test_getitem_block_fuses_with_tails_via_cli(models, tmp_path):
    source = models["getitem"]
    before = digest(source)
    out = tmp_path / "fused.keras"
    result = invoke(source, "-o", out)
    assert result.exit_code == 0, result.output
    assert "g_conv_0_group4: keras-fuse-grouped-conv" in result.output
    assert "verification: passed" in result.output
    assert digest(source) == before  # the input is never modified

    fused = keras.models.load_model(out, safe_mode=True)
    counts = classes(fused)
    assert counts.get("GetItem", 0) == 0 and counts.get("Concatenate", 0) == 0
    assert counts["BatchNormalization"] == 1 and counts["ReLU"] == 1 and counts["Conv2D"] == 2
    grouped = [layer for layer in fused.layers if type(layer).__name__ == "Conv2D" and layer.groups > 1]
    assert len(grouped) == 1 and grouped[0].groups == 4 and grouped[0].filters == 16

    original = keras.models.load_model(source, safe_mode=True)
    x = np.random.default_rng(1).standard_normal((3, 8, 8, 8)).astype("float32")
    np.testing.assert_allclose(outputs(fused, x), outputs(original, x), atol=1e-5)


def test_other_layers_keep_names_configs_and_weights(models, tmp_path):
    out = tmp_path / "fused.keras"
    fuse(models["getitem"], output=out)
    original = keras.models.load_model(models["getitem"], safe_mode=True)
    fused = keras.models.load_model(out, safe_mode=True)
    for name in ("stem", "head"):
        a, b = original.get_layer(name), fused.get_layer(name)
        assert a.get_config() == b.get_config()
        for wa, wb in zip(a.get_weights(), b.get_weights()):
            np.testing.assert_array_equal(wa, wb)
    assert fused.name == original.name
    assert [t.name for t in fused.inputs] == [t.name for t in original.inputs]


@pytest.mark.parametrize("key,conv", [("getitem1d", "Conv1D"), ("getitem3d", "Conv3D")])
def test_conv1d_and_conv3d(models, tmp_path, key, conv):
    out = tmp_path / "fused.keras"
    result = fuse(models[key], output=out)
    (rewrite,) = result.report.rewrites
    assert rewrite.groups == 4 and rewrite.channels == {"in": 8, "out": 16}
    assert result.report.verification.passed
    fused = keras.models.load_model(out, safe_mode=True)
    grouped = [layer for layer in fused.layers if type(layer).__name__ == conv and layer.groups == 4]
    assert len(grouped) == 1


@pytest.mark.parametrize("key,op", [("tf_getitem", "SlicingOpLambda"), ("tf_split", "TFOpLambda")])
def test_legacy_tf_op_lambda_h5(models, key, op, tmp_path):
    source = tmp_path / models[key].name
    source.write_bytes(models[key].read_bytes())
    result = invoke(source)
    assert result.exit_code == 0, result.output
    out = tmp_path / f"{source.stem}.fused.keras"  # .h5 in, .keras out by default
    assert out.is_file()
    assert f"{op} " in result.output  # the changed op counts name the TF op layers

    fused = keras.models.load_model(out, safe_mode=True)
    assert not any(type(o).__name__ in ("GetItem", "Split", "Concatenate") for o in fused.operations)
    assert sum(type(layer).__name__ == "Conv2D" and layer.groups == 4 for layer in fused.layers) == 1
    # Against the file as tf-keras itself loads it.
    original = tf_keras.models.load_model(source, compile=False)
    x = np.random.default_rng(2).standard_normal((2, 8, 8, 8)).astype("float32")
    np.testing.assert_allclose(outputs(fused, x), np.asarray(original(x, training=False)), atol=1e-5)


def test_uneven_split_is_refused_with_reason(models, tmp_path):
    out = tmp_path / "uneven.fused.keras"
    result = invoke(models["uneven"], "-o", out)
    assert result.exit_code == 0, result.output
    assert "uneven split: 16,16,16,19 channels" in result.output
    report = fuse(models["uneven"], output=tmp_path / "again.keras").report
    assert not report.rewrites
    assert [s.reason for s in report.skipped] == ["uneven split: 16,16,16,19 channels"]
    fused = keras.models.load_model(out, safe_mode=True)
    assert classes(fused)["Conv2D"] == 4  # left as it was


def test_check_and_dry_run_write_nothing(models, tmp_path):
    source = tmp_path / "block.keras"
    source.write_bytes(models["getitem"].read_bytes())
    result = invoke(source, "--check")
    assert result.exit_code == 1 and "check: 1 fusable pattern found" in result.output
    result = invoke(source, "--dry-run")
    assert result.exit_code == 0 and "dry run: nothing written" in result.output
    assert sorted(p.name for p in tmp_path.iterdir()) == ["block.keras"]


def test_fused_model_is_clean_and_idempotent(models, tmp_path):
    out = tmp_path / "fused.keras"
    fuse(models["getitem"], output=out)
    assert invoke(out, "--check").exit_code == 0
    again = fuse(out, output=tmp_path / "twice.keras")
    assert not again.report.rewrites
    assert again.report.before.op_counts == again.report.after.op_counts


def test_report_json_has_layer_counts_and_timings(models, tmp_path):
    report_path = tmp_path / "report.json"
    result = invoke(models["getitem"], "-o", tmp_path / "out.keras", "--report", report_path)
    assert result.exit_code == 0, result.output
    report = json.loads(report_path.read_text())["models"][0]["report"]
    assert report["before"]["op_counts"]["Conv2D"] == 5 and report["after"]["op_counts"]["Conv2D"] == 2
    assert report["before"]["nodes"] == 21 and report["after"]["nodes"] == 7
    assert report["before"]["parameters"] == report["after"]["parameters"]
    assert report["written"] is True and report["verification"]["passed"] is True
    assert {"load", "rewrite", "save", "verify"} <= set(report["timings"])


@pytest.mark.parametrize("key", ["getitem", "tf_split"])  # reference: Keras's own load / the rebuilt file
def test_verification_failure_writes_nothing(models, key, tmp_path, monkeypatch):
    import gconv_rewrite.plan as fgc  # the planner every backend's chains go through (plan_chain → plan_fusion)

    real = fgc.plan_fusion

    def corrupted(*args, **kwargs):
        plan = real(*args, **kwargs)
        plan.weight = plan.weight * 1.5
        return plan

    monkeypatch.setattr(fgc, "plan_fusion", corrupted)
    out = tmp_path / "fused.keras"
    with pytest.raises(VerificationFailed, match="differ beyond atol/rtol; nothing was written"):
        fuse(models[key], output=out)
    result = invoke(models[key], "-o", out)
    assert result.exit_code == 1
    assert "MISMATCH" in result.output and "nothing was written" in result.output
    assert list(tmp_path.iterdir()) == []


def test_near_miss_different_kernels_is_reported(tmp_path):
    L = keras.layers
    inp = keras.Input((8, 8, 8))
    outs = [L.Conv2D(4, 5 if i == 3 else 3, padding="same")(inp[..., 2 * i:2 * i + 2]) for i in range(4)]
    path = tmp_path / "kernels.keras"
    keras.Model(inp, L.Concatenate()(outs)).save(path)
    result = invoke(path, "-o", tmp_path / "out.keras")
    assert result.exit_code == 0, result.output
    assert "different kernel shapes between branches: (3,3,2) vs (5,5,2)" in result.output


def test_tails_that_disagree_fuse_as_far_as_they_agree(tmp_path):
    L = keras.layers
    inp = keras.Input((8, 8, 8))
    outs = []
    for i in range(4):
        y = L.ReLU()(L.BatchNormalization()(L.Conv2D(4, 3, padding="same")(inp[..., 2 * i:2 * i + 2])))
        outs.append(L.LeakyReLU(0.2)(y) if i else L.ELU()(y))
    path = tmp_path / "tails.keras"
    model = keras.Model(inp, L.Concatenate(name="joined")(outs))
    km._randomise_bn(model)
    model.save(path)
    out = tmp_path / "out.keras"
    report = fuse(path, output=out).report
    (rewrite,) = report.rewrites
    assert rewrite.groups == 4
    assert report.skipped[0].reason == ("fused up to where the branches differ (ELU vs LeakyReLU); "
                                        "the rest stays per branch")
    fused = keras.models.load_model(out, safe_mode=True)
    counts = classes(fused)
    assert counts["Conv2D"] == 1 and counts["BatchNormalization"] == 1 and counts["ReLU"] == 1
    assert counts["GetItem"] == 4 and counts["LeakyReLU"] == 3 and counts["ELU"] == 1
    assert type(fused.get_layer("joined")).__name__ == "Concatenate"
    x = np.random.default_rng(7).standard_normal((2, 8, 8, 8)).astype("float32")
    np.testing.assert_allclose(outputs(fused, x), outputs(keras.models.load_model(path), x), atol=1e-5)


def test_near_miss_different_dilations(tmp_path):
    L = keras.layers
    inp = keras.Input((8, 8, 8))
    outs = [L.Conv2D(4, 3, padding="same", dilation_rate=1 + (i == 0))(inp[..., 2 * i:2 * i + 2]) for i in range(4)]
    path = tmp_path / "dilations.keras"
    keras.Model(inp, L.Concatenate()(outs)).save(path)
    report = fuse(path, output=tmp_path / "out.keras").report
    assert report.skipped[0].reason == "different dilation_rate between branches: (2,2) vs (1,1)"


def test_branch_output_used_elsewhere_is_not_fused(tmp_path):
    L = keras.layers
    inp = keras.Input((8, 8, 8))
    convs = [L.Conv2D(4, 1)(inp[..., 2 * i:2 * i + 2]) for i in range(4)]
    model = keras.Model(inp, [L.Concatenate()(convs), L.ReLU()(convs[0])])
    path = tmp_path / "shared.keras"
    model.save(path)
    report = fuse(path, output=tmp_path / "out.keras").report
    assert not report.rewrites
    assert "used outside the pattern" in report.skipped[0].reason


def test_nested_models_and_two_patterns_in_legacy_h5(tmp_path):
    L = tf_keras.layers
    inner_in = tf_keras.Input((8, 8, 8))
    backbone = tf_keras.Model(inner_in, L.BatchNormalization()(L.Conv2D(8, 1)(inner_in)), name="backbone")
    inp = tf_keras.Input((8, 8, 8))
    x = backbone(inp)
    for _block in range(2):
        x = L.Concatenate()([L.Conv2D(4, 3, padding="same")(x[..., 4 * i:4 * i + 4]) for i in range(2)])
    path = tmp_path / "nested.h5"
    tf_keras.Model(inp, x).save(path)
    result = fuse(path, output=tmp_path / "out.keras")
    assert [r.groups for r in result.report.rewrites] == [2, 2]
    assert result.report.verification.passed
    fused = keras.models.load_model(tmp_path / "out.keras", safe_mode=True)
    assert type(fused.get_layer("backbone")).__name__ == "Functional"


def test_subclassed_model_is_left_and_reported(tmp_path):
    @keras.saving.register_keras_serializable(package="gconv_test")
    class Tiny(keras.Model):
        def __init__(self, **kwargs):
            super().__init__(**kwargs)
            self.conv = keras.layers.Conv2D(4, 1)

        def call(self, x):
            return self.conv(x)

    model = Tiny()
    model(np.zeros((1, 4, 4, 2), "float32"))
    path = tmp_path / "tiny.keras"
    model.save(path)
    out = tmp_path / "out.keras"
    result = invoke(path, "-o", out)
    assert result.exit_code == 0, result.output
    assert "subclassed model (Tiny)" in result.output
    assert not out.exists()


@pytest.mark.parametrize("args,message", [
    (["--to", "savedmodel"], "--to savedmodel writes a SavedModel folder"),  # -o never.onnx: not a folder name
    (["-o", "{folder}/out.h5"], "Keras models are written as .keras files"),
])
def test_unsupported_modes_are_bad_input(models, args, message):
    folder = models["getitem"].parent
    args = [a.format(folder=folder) for a in args]
    if "-o" not in args:
        args = [*args, "-o", folder / "never.onnx"]
    result = invoke(models["getitem"], *args)
    assert result.exit_code == 2
    assert message in result.output
    assert "Traceback" not in result.output


@pytest.mark.parametrize("content,message", [
    (b"", "empty file"),
    (b"not a model at all", "not a Keras file"),
    (None, "no config.json"),
])
def test_broken_files_are_one_line_errors(tmp_path, content, message):
    path = tmp_path / "broken.keras"
    if content is None:
        with zipfile.ZipFile(path, "w") as archive:
            archive.writestr("metadata.json", "{}")
    else:
        path.write_bytes(content)
    result = invoke(path)
    assert result.exit_code == 2
    assert message in result.output
    assert "Traceback" not in result.output and len(result.output.strip().splitlines()) == 1
    with pytest.raises(BadInput):
        fuse(path, options=Options())


@pytest.mark.parametrize("key", ["getitem", "tf_split"])
def test_to_onnx_writes_one_grouped_conv(models, key, tmp_path):
    import onnx
    import onnxruntime as ort

    out = tmp_path / "fused.onnx"
    result = invoke(models[key], "--to", "onnx", "-o", out)
    assert result.exit_code == 0, result.output
    assert "onnx:output_0" in result.output  # the ONNX proof joins the Keras one in the table
    convs = [n for n in onnx.load(str(out)).graph.node if n.op_type == "Conv"]
    groups = sorted(next((a.i for a in n.attribute if a.name == "group"), 1) for n in convs)
    assert groups == [1, 4]
    x = np.random.default_rng(5).standard_normal((2, 8, 8, 8)).astype("float32")
    session = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    (actual,) = session.run(None, {session.get_inputs()[0].name: x})
    if key == "getitem":
        expected = keras.models.load_model(models[key], safe_mode=True)(x)
    else:
        expected = tf_keras.models.load_model(models[key], compile=False)(x, training=False)
    np.testing.assert_allclose(actual, np.asarray(expected), atol=1e-4)


def test_compile_settings_are_carried(tmp_path):
    L = keras.layers
    inp = keras.Input((8, 8, 4))
    y = L.Concatenate()([L.Conv2D(2, 1)(inp[..., 2 * i:2 * i + 2]) for i in range(2)])
    model = keras.Model(inp, L.Dense(2)(L.GlobalAveragePooling2D()(y)))
    model.compile(optimizer=keras.optimizers.Adam(1e-3), loss="mse")
    path = tmp_path / "compiled.keras"
    model.save(path)
    result = fuse(path, output=tmp_path / "out.keras")
    assert result.report.rewrites and not result.report.skipped
    fused = keras.models.load_model(tmp_path / "out.keras", safe_mode=True)
    assert type(fused.optimizer).__name__ == "Adam" and fused.loss == "mse"


def test_channel_mixing_activation_is_not_fused(tmp_path):
    L = keras.layers
    inp = keras.Input((8, 8, 8))
    outs = [L.Activation("softmax")(L.Conv2D(4, 1)(inp[..., 2 * i:2 * i + 2])) for i in range(4)]
    path = tmp_path / "softmax.keras"
    keras.Model(inp, L.Concatenate()(outs)).save(path)
    report = fuse(path, output=tmp_path / "out.keras").report
    assert report.rewrites[0].groups == 4  # the convs fuse; each branch keeps its own softmax
    assert "fused up to Activation (softmax mixes the channels)" in report.skipped[0].reason
    assert classes(keras.models.load_model(tmp_path / "out.keras"))["Activation"] == 4

    outs = [L.Conv2D(4, 1, activation="softmax")(inp[..., 2 * i:2 * i + 2]) for i in range(4)]
    keras.Model(inp, L.Concatenate()(outs)).save(path)
    report = fuse(path, output=tmp_path / "out2.keras").report
    assert not report.rewrites
    assert "applies softmax over each branch's channels" in report.skipped[0].reason


def test_dynamic_spatial_dims_need_shape_or_inputs(tmp_path):
    L = keras.layers
    inp = keras.Input((None, None, 8), name="img")
    y = L.Concatenate()([L.Conv2D(4, 3, padding="same")(inp[..., 2 * i:2 * i + 2]) for i in range(4)])
    path = tmp_path / "dynamic.keras"
    keras.Model(inp, y).save(path)
    result = invoke(path, "-o", tmp_path / "a.keras")
    assert result.exit_code == 2 and "--shape img=1,N,N,8" in result.output
    assert not (tmp_path / "a.keras").exists()
    assert invoke(path, "-o", tmp_path / "b.keras", "--shape", "img=1,6,5,8").exit_code == 0
    inputs = tmp_path / "inputs.npz"
    np.savez(inputs, img=np.ones((1, 4, 4, 8), "float32"))
    result = invoke(path, "-o", tmp_path / "c.keras", "--inputs", inputs)
    assert result.exit_code == 0 and "1x4x4x16" in result.output


def test_batch_folder_mirrors_h5_as_keras(models, tmp_path):
    folder = tmp_path / "models"
    folder.mkdir()
    for key in ("getitem", "tf_split"):
        (folder / models[key].name).write_bytes(models[key].read_bytes())
    out = tmp_path / "out"
    result = invoke(folder, "-o", out)
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in out.iterdir()) == ["getitem.keras", "tf_split.keras"]


def test_seed_003_example_1_fuses(tmp_path):
    """Seed 003's first example, as written there (Keras 3 slicing, no Lambda)."""
    from keras.layers import Conv2D, concatenate

    def group_conv(x, filters, kernel_size, groups):
        channels = x.shape[-1]
        group_channels = channels // groups
        group_outputs = []
        for i in range(groups):
            start, end = i * group_channels, (i + 1) * group_channels
            group_outputs.append(Conv2D(filters, kernel_size)(x[:, :, :, start:end]))
        return concatenate(group_outputs)

    input_tensor = keras.Input(shape=(32, 32, 64))
    model = keras.Model(inputs=input_tensor, outputs=group_conv(input_tensor, filters=32, kernel_size=(3, 3), groups=4))
    path = tmp_path / "seed003.keras"
    model.save(path)
    result = fuse(path, output=tmp_path / "out.keras")
    (rewrite,) = result.report.rewrites
    assert (rewrite.groups, rewrite.channels) == (4, {"in": 64, "out": 128})
    assert result.report.verification.passed
    assert result.report.after.op_counts == {"Conv2D": 1, "InputLayer": 1}
