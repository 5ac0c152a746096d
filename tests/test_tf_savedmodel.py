"""SavedModels: fuse, expand and --to onnx through the API and the CLI; structure and numbers."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import tensorflow as tf
from click.testing import CliRunner

import gconv_rewrite
from gconv_rewrite.cli import main
from gconv_rewrite.errors import BadInput, VerificationFailed
from tests.helpers import folder_digest, saved_model_ops, saved_model_outputs
from tests.tf_models import SplitConvConcat, save_keras_grouped, save_module

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tf_models")
    return {
        "split": save_module(SplitConvConcat(), folder / "split"),
        "strided": save_module(SplitConvConcat(split="strided", tail="relu_per_branch", bias=False),
                               folder / "strided"),
        "uneven": save_module(SplitConvConcat(groups=3, sizes=[5, 5, 6]), folder / "uneven"),
        "dilations": save_module(SplitConvConcat(dilations=[1, 1, 2, 1]), folder / "dilations"),
        "used_elsewhere": save_module(SplitConvConcat(extra_output=True), folder / "used_elsewhere"),
        "keras": save_keras_grouped(folder / "keras"),
    }


X = np.random.default_rng(7).standard_normal((1, 8, 8, 16)).astype(np.float32)
IMG = np.random.default_rng(8).standard_normal((3, 8, 8, 16)).astype(np.float32)


# -- fuse ------------------------------------------------------------------------------------


def test_fuse_split_conv_bias_concat(models, tmp_path):
    before = folder_digest(models["split"])
    out = tmp_path / "fused"
    result = gconv_rewrite.fuse(models["split"], output=out)
    report = result.report
    assert [(r.kind, r.groups, r.channels) for r in report.rewrites] == [
        ("fuse-split-conv", 4, {"in": 16, "out": 24})]
    assert report.before.op_counts["Conv2D"] == 4 and report.before.op_counts["Split"] == 1
    assert report.after.op_counts == {"BiasAdd": 1, "Conv2D": 1, "Relu": 1}
    assert report.verification.passed and report.verification.outputs[0].name == "y"
    assert report.written and out.is_dir() and folder_digest(models["split"]) == before
    # Same signature, keys, dtypes, shapes; same numbers; one grouped conv (TF can run it).
    fn = tf.saved_model.load(str(out)).signatures["serving_default"]
    assert list(fn.structured_input_signature[1]) == ["x"]
    assert fn.structured_input_signature[1]["x"].shape == (1, 8, 8, 16)
    assert list(fn.structured_outputs) == ["y"]
    np.testing.assert_allclose(saved_model_outputs(out, {"x": X})["y"], saved_model_outputs(models["split"], {"x": X})["y"], atol=1e-5)
    ops = saved_model_ops(out)
    assert ops.get("Conv2D") == 1 and "Split" not in ops and "ConcatV2" not in ops
    assert {"timings": set(report.timings)} == {"timings": {"load", "rewrite", "save", "verify"}}


def test_fuse_strided_slices_with_per_branch_tail(models, tmp_path):
    out = tmp_path / "fused"
    report = gconv_rewrite.fuse(models["strided"], output=out).report
    assert [r.groups for r in report.rewrites] == [4]
    assert report.after.op_counts == {"Conv2D": 1, "Relu": 1}  # four Relus became one after the fused conv
    assert report.verification.passed


@pytest.mark.parametrize("settings", [
    dict(split="splitv", groups=2, kernel=1, stride=2, padding="VALID"),
    dict(split="slice", groups=8, out_per_group=3, bias=False),
    dict(split="split", groups=4, kernel=5, dilations=[2] * 4, tail="relu_per_branch"),
], ids=["splitv-1x1-stride2", "slice-8groups-nobias", "split-5x5-dilated"])
def test_fuse_variants(tmp_path, settings):
    module = SplitConvConcat(**settings)
    report = gconv_rewrite.fuse(save_module(module, tmp_path / "m"), output=tmp_path / "fused").report
    assert [r.groups for r in report.rewrites] == [settings["groups"]] and report.skipped == []
    assert report.after.op_counts["Conv2D"] == 1 and report.verification.passed
    assert {"Split", "SplitV", "Slice", "StridedSlice", "ConcatV2"}.isdisjoint(report.after.op_counts)


def test_fuse_is_idempotent(models, tmp_path):
    gconv_rewrite.fuse(models["split"], output=tmp_path / "once")
    again = gconv_rewrite.fuse(tmp_path / "once", output=tmp_path / "twice").report
    # Nothing to rewrite: written, and (as for ONNX) no rewritten model to prove.
    assert again.rewrites == [] and again.written and not again.verification.ran
    assert again.verification.note == "no rewrite: the model is unchanged"


@pytest.mark.parametrize("model, reason", [
    ("uneven", "uneven split: 5,5,6 channels"),
    ("dilations", "different dilations between branches: (1,1,1,1) vs (1,2,2,1)"),
    ("used_elsewhere", "is used outside the ConcatV2"),
])
def test_near_misses_are_left_alone_with_the_plan_reason(models, model, reason):
    report = gconv_rewrite.check(models[model])
    assert report.rewrites == []
    assert len(report.skipped) == 1 and reason in report.skipped[0].reason


def test_concat_of_convs_on_one_whole_tensor_is_no_candidate(tmp_path):
    class Inception(tf.Module):
        def __init__(self):
            self.kernels = [tf.Variable(np.full((1, 1, 16, 4), i, np.float32)) for i in range(2)]

        def serve(self, x):
            return {"y": tf.concat([tf.nn.conv2d(x, k, 1, "SAME") for k in self.kernels], axis=-1)}

    report = gconv_rewrite.check(save_module(Inception(), tmp_path / "inception"))
    assert report.rewrites == [] and report.skipped == []


def test_fuse_conv1d_branches(tmp_path):
    from tests.tf_models import SplitConv1DConcat

    path = save_module(SplitConv1DConcat(), tmp_path / "conv1d", shape=(2, 12, 16))
    assert saved_model_ops(path)["Conv2D"] == 4 and saved_model_ops(path)["ExpandDims"] == 4
    report = gconv_rewrite.fuse(path, output=tmp_path / "fused").report
    assert [(r.groups, r.channels) for r in report.rewrites] == [(4, {"in": 16, "out": 20})]
    assert report.after.op_counts == {"BiasAdd": 1, "Conv2D": 1, "ExpandDims": 1, "Relu": 1, "Squeeze": 1}
    assert report.verification.passed
    out = tmp_path / "conv1d.onnx"
    assert gconv_rewrite.fuse(path, output=out, to="onnx").report.verification.passed
    assert _conv_groups(out) == [4]


def test_nchw_split_is_fused(tmp_path):
    class Nchw(tf.Module):
        def __init__(self):
            self.kernels = [tf.Variable(np.full((1, 1, 2, 3), i, np.float32)) for i in range(4)]

        def serve(self, x):
            parts = tf.split(x, 4, axis=1)
            return {"y": tf.concat([tf.nn.conv2d(p, k, 1, "VALID", data_format="NCHW")
                                    for p, k in zip(parts, self.kernels)], axis=1)}

    # TF on CPU cannot run NCHW convolutions: check the structure with --check, and the numbers in ONNX.
    path = save_module(Nchw(), tmp_path / "nchw", shape=(1, 8, 5, 5))
    report = gconv_rewrite.check(path)
    assert [(r.groups, r.channels) for r in report.rewrites] == [(4, {"in": 8, "out": 12})]


def test_check_and_dry_run_write_nothing(models, tmp_path):
    runner = CliRunner()
    out = tmp_path / "never"
    result = runner.invoke(main, [str(models["split"]), "--check"])
    assert result.exit_code == 1 and "check: 1 fusable pattern found" in result.output
    result = runner.invoke(main, [str(models["split"]), "--dry-run", "-o", str(out)])
    assert result.exit_code == 0 and "dry run: nothing written" in result.output
    assert not out.exists() and list(tmp_path.iterdir()) == []


def test_cli_fuse_default_output_is_a_directory(models, tmp_path):
    import shutil

    source = shutil.copytree(models["split"], tmp_path / "model")
    result = CliRunner().invoke(main, [str(source)])
    assert result.exit_code == 0, result.output
    assert "fuse-split-conv" in result.output and "verification: passed" in result.output
    assert "ops: BiasAdd 4->1, ConcatV2 1->0, Conv2D 4->1, Split 1->0" in result.output
    assert (tmp_path / "model.fused" / "saved_model.pb").is_file()
    again = CliRunner().invoke(main, [str(source)])  # exists: refuse without --force
    assert again.exit_code == 2 and "already exists" in again.output


# -- expand ----------------------------------------------------------------------------------


def test_expand_keras_grouped_conv(models, tmp_path):
    out = tmp_path / "expanded"
    report = gconv_rewrite.expand(models["keras"], output=out, shapes={"img": [3, 8, 8, 16]}).report
    assert [(r.kind, r.groups) for r in report.rewrites] == [("expand-grouped-conv", 4)]
    assert report.before.op_counts["Conv2D"] == 2
    assert report.after.op_counts["Conv2D"] == 5 and report.after.op_counts["Split"] == 1
    assert report.verification.passed
    np.testing.assert_allclose(saved_model_outputs(out, {"img": IMG})["output_0"], saved_model_outputs(models["keras"], {"img": IMG})["output_0"],
                               atol=1e-4)
    # Fusing the expanded model gives the grouped convolution back.
    fused = gconv_rewrite.fuse(out, output=tmp_path / "refused", shapes={"img": [1, 8, 8, 16]}).report
    assert [r.groups for r in fused.rewrites] == [4]


def test_expanded_model_runs_with_onednn_off(models, tmp_path):
    """The known failure: TF CPU without oneDNN cannot run a grouped Conv2D + BiasAdd + Relu;
    the frozen grouped graph (no XLA around it) fails there, the expanded one runs."""
    from gconv_rewrite.passes.tf.savedmodel import load_signature, write_savedmodel

    grouped, expanded = tmp_path / "grouped", tmp_path / "expanded"
    frozen = load_signature(models["keras"])
    write_savedmodel(frozen, frozen.graph_def, grouped, keep_tf_runnable=False)
    gconv_rewrite.expand(models["keras"], output=expanded, shapes={"img": [1, 8, 8, 16]})
    script = ("import sys, numpy as np, tensorflow as tf\n"
              "fn = tf.saved_model.load(sys.argv[1]).signatures['serving_default']\n"
              "try:\n    fn(img=tf.constant(np.ones((1, 8, 8, 16), np.float32))); print('RAN')\n"
              "except Exception as e:\n    print('FAILED', str(e).strip().splitlines()[-2])\n")
    env = {**os.environ, "TF_ENABLE_ONEDNN_OPTS": "0", "TF_CPP_MIN_LOG_LEVEL": "2"}
    runs = subprocess.run([sys.executable, "-c", script, str(grouped)], env=env,
                          capture_output=True, text=True, timeout=120)
    assert "Fused conv implementation does not support grouped convolutions" in runs.stdout, runs.stdout + runs.stderr
    runs = subprocess.run([sys.executable, "-c", script, str(expanded)], env=env, capture_output=True, text=True,
                          timeout=120)
    assert "RAN" in runs.stdout, runs.stdout + runs.stderr


def test_expand_options_keep_depthwise_and_max_groups(models):
    report = gconv_rewrite.check(models["keras"], mode="expand")
    assert [r.groups for r in report.rewrites] == [4]
    report = gconv_rewrite.rewrite(models["keras"], mode="expand", apply=False, max_groups=2).report
    assert report.rewrites == [] and "group=4 is above --max-groups 2" in report.skipped[0].reason


# -- --to onnx -------------------------------------------------------------------------------


def _ort(path: Path, feeds):
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return dict(zip([o.name for o in session.get_outputs()], session.run(None, feeds)))


def _conv_groups(path: Path) -> list[int]:
    model = onnx.load(str(path))
    assert not [n for n in model.graph.node if "PartitionedCall" in n.op_type]
    return [next((a.i for a in n.attribute if a.name == "group"), 1) for n in model.graph.node if n.op_type == "Conv"]


def test_to_onnx_fuses_hand_made_groups(models, tmp_path):
    out = tmp_path / "split.onnx"
    report = gconv_rewrite.fuse(models["split"], output=out, to="onnx").report
    assert [r.groups for r in report.rewrites] == [4] and report.verification.passed
    onnx.checker.check_model(str(out), full_check=True)
    assert _conv_groups(out) == [4]
    np.testing.assert_allclose(_ort(out, {"x": X})["y"], saved_model_outputs(models["split"], {"x": X})["y"], atol=1e-4)


def test_to_onnx_keras_grouped_conv_is_one_native_conv(models, tmp_path):
    out = tmp_path / "keras.onnx"
    result = CliRunner().invoke(main, [str(models["keras"]), "--to", "onnx", "-o", str(out),
                                       "--shape", "img=2,8,8,16"])
    assert result.exit_code == 0, result.output
    assert "verification: passed" in result.output
    assert sorted(_conv_groups(out)) == [1, 4]
    np.testing.assert_allclose(_ort(out, {"img": IMG})["output_0"], saved_model_outputs(models["keras"], {"img": IMG})["output_0"],
                               atol=1e-4)


def test_to_onnx_keras_gelu_depthwise_layernorm(tmp_path):
    """A ConvNeXt-like block: depthwise Conv2D(groups=C), LayerNormalization, exact GELU (Erfc)."""
    path = save_keras_grouped(tmp_path / "gelu", gelu=True)
    assert "Erfc" in saved_model_ops(path)
    out = tmp_path / "gelu.onnx"
    report = gconv_rewrite.fuse(path, output=out, to="onnx", shapes={"img": [1, 8, 8, 16]}).report
    assert report.verification.passed and report.verification.outputs[0].max_abs_error < 1e-4
    assert sorted(_conv_groups(out)) == [1, 4, 24]


def test_to_onnx_expand(models, tmp_path):
    out = tmp_path / "expanded.onnx"
    report = gconv_rewrite.expand(models["keras"], output=out, to="onnx", shapes={"img": [1, 8, 8, 16]}).report
    assert report.verification.passed and _conv_groups(out) == [1] * 5


# -- failures --------------------------------------------------------------------------------


def test_verification_failure_exits_1_and_writes_nothing(models, tmp_path):
    out = tmp_path / "strict.onnx"
    result = CliRunner().invoke(main, [str(models["split"]), "--to", "onnx", "-o", str(out), "--atol", "0",
                                       "--rtol", "0"])
    assert result.exit_code == 1
    assert "verification: FAILED" in result.output and "nothing was written" in result.output
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(VerificationFailed):
        gconv_rewrite.fuse(models["split"], output=tmp_path / "strict", to="onnx", atol=0, rtol=0)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("args, message", [
    (["--signature", "nope"], "no signature 'nope' (signatures: serving_default)"),
    (["--to", "keras"], "a SavedModel converts to a SavedModel or ONNX, not keras"),
])
def test_bad_input_is_one_line_exit_2(models, tmp_path, args, message):
    result = CliRunner().invoke(main, [str(models["split"]), "-o", str(tmp_path / "out"), *args])
    assert result.exit_code == 2 and message in result.output
    assert "Traceback" not in result.output and len(result.output.strip().splitlines()) == 1
    assert list(tmp_path.iterdir()) == []


def test_dynamic_batch_is_set_to_1(models, tmp_path):
    # A None batch needs no --shape: verification runs at batch 1 and says so (tests/test_verify_inputs.py).
    verification = gconv_rewrite.expand(models["keras"], output=tmp_path / "out").report.verification
    assert verification.passed and verification.inputs == {"img": [1, 8, 8, 16]}
    assert verification.defaulted == {"img": [0]}


def test_not_a_savedmodel(tmp_path):
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "saved_model.pb").write_bytes(b"not a protobuf")
    with pytest.raises(BadInput, match="not a loadable SavedModel"):
        gconv_rewrite.fuse(tmp_path / "broken", output=tmp_path / "out")


def test_keras_hand_made_groups_with_batch_norm_tails(tmp_path):
    """Keras BatchNormalization per branch: grappler folds its scale into the conv filter and
    leaves the shift as an Add of a constant vector, which fuses as the grouped conv's bias."""
    from tests.tf_models import save_keras_sliced

    path = save_keras_sliced(tmp_path / "bn", batch_norm=True)
    report = gconv_rewrite.fuse(path, output=tmp_path / "fused", shapes={"img": [2, 8, 8, 16]}).report
    assert [r.groups for r in report.rewrites] == [4] and report.verification.passed
    assert report.after.op_counts == {"BiasAdd": 1, "Conv2D": 1, "Relu": 1}


def test_keras_hand_made_groups_fuse_and_convert(tmp_path):
    from tests.tf_models import save_keras_sliced

    path = save_keras_sliced(tmp_path / "sliced")
    assert saved_model_ops(path)["StridedSlice"] == 4
    report = gconv_rewrite.fuse(path, output=tmp_path / "fused", shapes={"img": [2, 8, 8, 16]}).report
    assert [r.groups for r in report.rewrites] == [4] and report.verification.passed
    assert saved_model_ops(tmp_path / "fused")["Conv2D"] == 1
    out = tmp_path / "sliced.onnx"
    report = gconv_rewrite.fuse(path, output=out, to="onnx", shapes={"img": [2, 8, 8, 16]}).report
    assert report.verification.passed and _conv_groups(out) == [4]


def test_signatures_kept_or_reported(models, tmp_path):
    out = tmp_path / "fused"
    gconv_rewrite.fuse(models["keras"], output=out, shapes={"img": [1, 8, 8, 16]})
    # keras.Model.export writes "serve" and "serving_default", one computation: both are kept.
    assert sorted(tf.saved_model.load(str(out)).signatures) == ["serve", "serving_default"]

    module = SplitConvConcat()
    serve = tf.function(module.serve, input_signature=[tf.TensorSpec((1, 8, 8, 16), tf.float32, name="x")])
    other = tf.function(lambda x: {"z": x * 2.0}, input_signature=[tf.TensorSpec((1, 8, 8, 16), tf.float32, name="x")])
    tf.saved_model.save(module, str(tmp_path / "two"), signatures={"serving_default": serve.get_concrete_function(),
                                                                  "double": other.get_concrete_function()})
    result = CliRunner().invoke(main, [str(tmp_path / "two"), "--signature", "double", "-o", str(tmp_path / "d")])
    assert result.exit_code == 0, result.output
    assert "signature serving_default: not rewritten, and not in the output: only double" in result.output
    assert list(tf.saved_model.load(str(tmp_path / "d")).signatures) == ["double"]


def test_savedmodel_to_onnx_entry_point_is_deterministic(models, tmp_path):
    """SavedModel → ONNX through the driver's conversion hop (what a Keras export is handed to)."""
    outputs = []
    for name in ("a.onnx", "b.onnx"):
        result = gconv_rewrite.fuse(models["keras"], output=tmp_path / name, to="onnx",
                               options=gconv_rewrite.Options(shapes={"img": [1, 8, 8, 16]}))
        report, model = result.report, result.model
        assert report.written and report.verification.passed and report.after.op_counts["Conv"] == 2
        assert [n.op_type for n in model.graph].count("Conv") == 2
        outputs.append((tmp_path / name).read_bytes())
    assert outputs[0] == outputs[1]  # the same input gives the same file


def test_cli_inputs_file_and_json_report(models, tmp_path):
    import json

    np.savez(tmp_path / "inputs.npz", img=IMG)
    result = CliRunner().invoke(main, [str(models["keras"]), "--expand", "-o", str(tmp_path / "out"),
                                       "--inputs", str(tmp_path / "inputs.npz"), "--report", str(tmp_path / "r.json")])
    assert result.exit_code == 0, result.output
    report = json.loads((tmp_path / "r.json").read_text())["models"][0]["report"]
    assert report["verification"]["inputs"] == {"img": [3, 8, 8, 16]}
    assert report["rewrites"][0]["kind"] == "expand-grouped-conv" and report["written"]
