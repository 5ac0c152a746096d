"""Sound Keras verdicts (issue #20): tf-keras files verified against tf-keras itself, late binding
is a finding --check fails on, and tf-keras's ``tf.concat`` joins are candidates like Concatenate."""

from __future__ import annotations

import json
import os
import re

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras
import numpy as np
import pytest
import tensorflow as tf
import tf_keras

from gconv_rewrite.api import Options, check, fuse
from samples import keras_models as km
from tests.helpers import conv2d_groups as grouped
from tests.helpers import invoke
from tests.helpers import keras_outputs as outputs

TL = tf_keras.layers


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


# -- finding 6: late binding is a finding ------------------------------------------------------

@pytest.fixture(scope="module")
def late_files(tmp_path_factory):
    folder = tmp_path_factory.mktemp("keras_sound_late")
    return {"late.keras": km.lambda_model_keras3(folder / "late.keras", binding="late"),
            "legacy_late.h5": km.legacy_model(folder / "legacy_late.h5", style="lambda", late=True),
            "closure.keras": km.lambda_model_keras3(folder / "closure.keras", binding="closure")}


@pytest.mark.parametrize("name", ["late.keras", "legacy_late.h5"])
def test_check_fails_on_late_binding_and_names_the_repair(late_files, name, tmp_path):
    report_path = tmp_path / "report.json"
    result = invoke(late_files[name], "--check", "--trust-lambdas", "--report", report_path)
    assert result.exit_code == 1, result.output
    assert "check: 0 fusable patterns found" in result.output
    assert re.search(r"check: late binding at concatenate(_\d+)?: every branch reads the same group", result.output)
    assert "--repair-late-binding" in result.output.splitlines()[-1]
    (skip,) = json.loads(report_path.read_text())["models"][0]["report"]["skipped"]
    assert skip["finding"] == "late-binding" and skip["reason"].startswith("LATE BINDING")
    # With the repair the same group is work to do: fusable, still exit 1 under --check.
    repaired = invoke(late_files[name], "--check", "--trust-lambdas", "--repair-late-binding")
    assert repaired.exit_code == 1 and "check: 1 fusable pattern found" in repaired.output, repaired.output


def test_correctly_bound_lambdas_are_no_finding(late_files, tmp_path):
    out = tmp_path / "fused.keras"
    result = invoke(late_files["closure.keras"], "--trust-lambdas", "-o", out)
    assert result.exit_code == 0 and "late binding" not in result.output.lower(), result.output
    assert invoke(out, "--check").exit_code == 0  # the fused file: clean, no finding


def test_fuse_without_the_repair_says_the_model_is_not_what_its_author_meant(late_files, tmp_path):
    out = tmp_path / "as_is.keras"
    result = invoke(late_files["late.keras"], "--trust-lambdas", "-o", out)
    assert result.exit_code == 0, result.output
    warning = result.output.splitlines()[-1]
    assert re.match(r"warning: late binding at concatenate(_\d+)? left as it is", warning), warning
    assert "not what its author meant" in warning and "--repair-late-binding" in warning
    # What is written computes what the file computes (the same group in every branch), without code.
    written = keras.models.load_model(out, safe_mode=True)
    original = keras.models.load_model(late_files["late.keras"], safe_mode=False)
    assert grouped(written) == []
    x = np.random.default_rng(6).standard_normal((2, 8, 8, 8)).astype("float32")
    np.testing.assert_allclose(outputs(written, x)[0], outputs(original, x)[0], rtol=1e-6, atol=1e-6)


# -- finding 5: tf-keras files are verified against tf-keras -----------------------------------

def multiply_model(path):
    """tf-keras: x * 0.5 (a TFOpLambda tf.math.multiply the tool rebuilds in Keras 3) → tf.split
    groups → Concatenate."""
    inp = tf_keras.Input((8, 8, 8))
    x = tf.math.multiply(TL.Conv2D(8, 1, name="stem")(inp), 0.5)
    parts = tf.split(x, 4, axis=-1)
    y = TL.Concatenate()([TL.Conv2D(4, 3, padding="same", name=f"m_conv{i}")(p) for i, p in enumerate(parts)])
    tf_keras.Model(inp, y).save(path)
    return path


@pytest.mark.parametrize("suffix", [".h5", ".keras"])
def test_tf_keras_file_is_verified_against_tf_keras(tmp_path, suffix):
    source = multiply_model(tmp_path / f"multiply{suffix}")
    result = fuse(source, output=tmp_path / "fused.keras")
    verification = result.report.verification
    assert verification.passed and verification.reference == f"tf-keras {tf_keras.__version__} (load_model)"
    assert [r.groups for r in result.report.rewrites] == [4]
    fused = keras.models.load_model(tmp_path / "fused.keras", safe_mode=True)
    assert grouped(fused) == [4]
    x = np.random.default_rng(5).standard_normal((2, 8, 8, 8)).astype("float32")
    original = tf_keras.models.load_model(source, compile=False)
    np.testing.assert_allclose(outputs(fused, x)[0], outputs(original, x)[0], rtol=1e-5, atol=1e-5)


def test_a_rebuild_mistake_fails_verification_against_tf_keras(tmp_path, monkeypatch):
    """The tool's Keras 3 rebuild of tf.math.multiply made wrong on purpose: compared with itself it
    would pass; compared with tf-keras, the run fails and nothing is written."""
    from gconv_rewrite.passes.keras import _tf_ops

    source = multiply_model(tmp_path / "multiply.h5")
    monkeypatch.setitem(_tf_ops.REBUILT, "math.multiply", lambda x, y, name=None: keras.ops.add(x, y))
    out = tmp_path / "fused.keras"
    report_path = tmp_path / "report.json"
    result = invoke(source, "-o", out, "--report", report_path)
    assert result.exit_code == 1, result.output
    assert "verification: FAILED" in result.output and "MISMATCH" in result.output
    assert not out.exists()


def test_reference_says_what_ran_the_original(late_files, tmp_path):
    keras3 = fuse(late_files["closure.keras"], output=tmp_path / "a.keras", options=Options(trust_lambdas=True))
    assert keras3.report.verification.reference == f"keras {keras.__version__} (load_model)"
    # tf-keras Lambdas with c=c defaults: Keras 3 cannot load the file, tf-keras runs it (trusted).
    legacy = km.legacy_model(tmp_path / "legacy_default.h5", style="lambda")
    trusted = fuse(legacy, output=tmp_path / "b.keras", options=Options(trust_lambdas=True))
    assert trusted.report.verification.passed
    assert trusted.report.verification.reference.startswith("tf-keras ")
    # A late-binding repair is meant to differ from the file: the reference is the re-bound rebuild.
    repaired = fuse(late_files["legacy_late.h5"], output=tmp_path / "c.keras",
                    options=Options(trust_lambdas=True, repair_late_binding=True))
    assert repaired.report.verification.passed
    assert repaired.report.verification.reference.startswith("the tool's rebuild, late-bound Lambdas re-bound")


def test_tf_keras_never_runs_lambda_code_without_trust(tmp_path):
    """The tf-keras reference loads in a safe-mode scope unless trusted: its .h5 loader would
    otherwise run the Lambda's bytecode (it ignores ``safe_mode=`` for .h5 files)."""
    from gconv_rewrite.passes.keras import _config
    from gconv_rewrite.passes.keras.model import _tf_keras_load

    marker = tmp_path / "ran.txt"

    def marking(z, path=str(marker)):
        open(path, "w").write("ran")
        return z[..., 0:2]

    inp = tf_keras.Input((4, 4, 4))
    path = tmp_path / "marking.h5"
    tf_keras.Model(inp, TL.Lambda(marking)(inp)).save(path)
    marker.unlink()
    kfile = _config.read_file(path)
    refused = _tf_keras_load(path, kfile, run_code=False)
    assert isinstance(refused, str) and refused.startswith("tf-keras cannot load the file")
    assert not marker.exists()
    model, note, reference = _tf_keras_load(path, kfile, run_code=True)
    assert reference.startswith("tf-keras ") and marker.exists()  # trusted: it runs, as the user asked


def test_tf_concat_kept_where_the_branches_stop_agreeing(tmp_path):
    """Branches fuse up to their convs; their tails differ, so the fused tensor is split back and
    the tf.concat stays (rebuilt as Keras 3's concatenate), proven against tf-keras."""
    inp = tf_keras.Input((8, 8, 8))
    x = TL.Conv2D(8, 1, name="stem")(inp)
    branches = [TL.Activation("relu" if i else "tanh")(TL.Conv2D(4, 3, padding="same", name=f"pc{i}")(part))
                for i, part in enumerate(tf.split(x, 4, axis=-1))]
    original = tf_keras.Model(inp, tf.concat(branches, axis=3))
    source = tmp_path / "partial.h5"
    original.save(source)
    result = fuse(source, output=tmp_path / "partial.keras")
    assert [r.groups for r in result.report.rewrites] == [4]
    (skip,) = result.report.skipped
    assert skip.location.startswith("tf.concat") and skip.reason.startswith("fused up to Activation")
    assert result.report.verification.passed and result.report.verification.reference.startswith("tf-keras ")
    fused = keras.models.load_model(tmp_path / "partial.keras", safe_mode=True)
    assert grouped(fused) == [4]
    x = np.random.default_rng(2).standard_normal((2, 8, 8, 8)).astype("float32")
    np.testing.assert_allclose(outputs(fused, x)[0], outputs(original, x)[0], rtol=1e-5, atol=1e-5)


def test_conversion_reports_the_tf_keras_reference(tmp_path):
    source = multiply_model(tmp_path / "multiply.h5")
    report_path = tmp_path / "report.json"
    result = invoke(source, "--to", "savedmodel", "-o", tmp_path / "sm", "--report", report_path)
    assert result.exit_code == 0, result.output
    verification = json.loads(report_path.read_text())["models"][0]["report"]["verification"]
    assert verification["passed"] and verification["reference"] == f"tf-keras {tf_keras.__version__} (load_model)"
    assert any(o["name"].startswith("savedmodel:") for o in verification["outputs"])


def test_tflite_benchmark_converts_the_tf_keras_original(tmp_path):
    """--benchmark's "before" is the original converted as it is: with a tf-keras reference, through
    tf-keras's own export (nothing printed on stdout, where the JSON document goes)."""
    source = multiply_model(tmp_path / "multiply.h5")
    result = invoke(source, "--to", "tflite", "--benchmark", "--threads", "1", "-o", tmp_path / "m.tflite",
                    "--format", "json")
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)["models"][0]["report"]
    assert report["verification"]["passed"] and report["verification"]["reference"].startswith("tf-keras ")
    bench = report["benchmark"]
    assert bench["runs"] > 0 and bench["before_ms"] > 0 and bench["after_ms"] > 0, bench


# -- multi-node channel-wise tails: y · f(y) -----------------------------------------------------

def operation_counts(model) -> dict[str, int]:
    counts: dict[str, int] = {}
    for op in model.operations:
        counts[type(op).__name__] = counts.get(type(op).__name__, 0) + 1
    return counts


def gated_keras3(path, activations=("sigmoid",) * 4):
    """Keras 3: slices → Conv2D → Multiply()([y, Activation(a)(y)]) (SiLU for sigmoid) → Concatenate."""
    L = keras.layers
    inp = keras.Input((8, 8, 8))
    x = L.Conv2D(8, 1, name="stem")(inp)
    branches = []
    for i, activation in enumerate(activations):
        y = L.Conv2D(4, 3, padding="same", name=f"gate_conv{i}")(x[..., 2 * i:2 * i + 2])
        branches.append(L.Multiply()([y, L.Activation(activation)(y)]))
    model = keras.Model(inp, L.Concatenate()(branches))
    model.save(path)
    return model


def gated_tf_keras(path, *, mish: bool):
    """tf-keras: tf.split → Conv2D → y * tf.sigmoid(y) (SiLU) or y * tf.tanh(tf.math.softplus(y))
    (Mish), all TFOpLambda nodes → tf.concat."""
    inp = tf_keras.Input((8, 8, 8))
    x = TL.Conv2D(8, 1, name="stem")(inp)
    branches = []
    for i, part in enumerate(tf.split(x, 4, axis=-1)):
        y = TL.Conv2D(4, 3, padding="same", name=f"gate_conv{i}")(part)
        branches.append(y * tf.tanh(tf.math.softplus(y)) if mish else y * tf.sigmoid(y))
    model = tf_keras.Model(inp, tf.concat(branches, axis=-1))
    model.save(path)
    return model


def test_keras3_silu_branches_fuse_with_the_gate_applied_once(tmp_path):
    original = gated_keras3(tmp_path / "silu.keras")
    out = tmp_path / "fused.keras"
    result = fuse(tmp_path / "silu.keras", output=out)
    (rewrite,) = result.report.rewrites
    assert rewrite.groups == 4 and result.report.verification.passed and not result.report.skipped
    fused = keras.models.load_model(out, safe_mode=True)
    assert grouped(fused) == [4]
    counts = operation_counts(fused)
    assert counts["Activation"] == 1 and counts["Multiply"] == 1 and "Concatenate" not in counts
    x = np.random.default_rng(11).standard_normal((2, 8, 8, 8)).astype("float32")
    np.testing.assert_allclose(outputs(fused, x)[0], outputs(original, x)[0], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("mish", [False, True])
def test_tf_keras_silu_and_mish_tfoplambda_gates_fuse(tmp_path, mish):
    source = tmp_path / ("mish.h5" if mish else "silu.h5")
    original = gated_tf_keras(source, mish=mish)
    out = tmp_path / "fused.keras"
    result = invoke(source, "-o", out)
    assert result.exit_code == 0 and "verification: passed" in result.output, result.output
    fused = keras.models.load_model(out, safe_mode=True)
    assert grouped(fused) == [4]
    counts = operation_counts(fused)
    expected = {"Softplus": 1, "Tanh": 1} if mish else {"Sigmoid": 1}
    assert {k: counts.get(k) for k in expected} == expected and counts["Multiply"] == 1
    assert "TFOpLambda" not in counts and "Concatenate" not in counts
    x = np.random.default_rng(12).standard_normal((2, 8, 8, 8)).astype("float32")
    np.testing.assert_allclose(outputs(fused, x)[0], outputs(original, x)[0], rtol=1e-5, atol=1e-5)


def test_gates_that_differ_fuse_up_to_the_conv_and_say_why(tmp_path):
    original = gated_keras3(tmp_path / "mixed.keras", activations=("sigmoid", "sigmoid", "tanh", "sigmoid"))
    out = tmp_path / "fused.keras"
    result = fuse(tmp_path / "mixed.keras", output=out)
    assert [r.groups for r in result.report.rewrites] == [4] and result.report.verification.passed
    (skip,) = result.report.skipped
    assert skip.reason.startswith("fused up to Gate (tails disagree between branches")
    fused = keras.models.load_model(out, safe_mode=True)
    assert grouped(fused) == [4] and operation_counts(fused)["Multiply"] == 4
    x = np.random.default_rng(13).standard_normal((2, 8, 8, 8)).astype("float32")
    np.testing.assert_allclose(outputs(fused, x)[0], outputs(original, x)[0], rtol=1e-5, atol=1e-5)


def test_a_gate_whose_conv_output_is_read_elsewhere_is_left_with_the_reason(tmp_path):
    L = keras.layers
    inp = keras.Input((8, 8, 8))
    ys = [L.Conv2D(4, 3, padding="same", name=f"seen_conv{i}")(inp[..., 2 * i:2 * i + 2]) for i in range(4)]
    joined = L.Concatenate()([L.Multiply()([y, L.Activation("sigmoid")(y)]) for y in ys])
    keras.Model(inp, [joined, ys[0]]).save(tmp_path / "leak.keras")  # conv 0's output is a model output too
    report = check(tmp_path / "leak.keras")
    assert not report.rewrites
    (skip,) = report.skipped
    assert "the output of seen_conv0 is used outside the pattern" in skip.reason


def test_keras3_ops_gate_on_keras_tensors_fuses(tmp_path):
    """``y * keras.ops.sigmoid(y)`` on Keras tensors: Sigmoid and Multiply operations in the config."""
    L = keras.layers
    inp = keras.Input((8, 8, 8))
    branches = []
    for i in range(4):
        y = L.Conv2D(4, 3, padding="same", name=f"op_conv{i}")(inp[..., 2 * i:2 * i + 2])
        branches.append(y * keras.ops.sigmoid(y))
    original = keras.Model(inp, L.Concatenate()(branches))
    original.save(tmp_path / "ops_silu.keras")
    out = tmp_path / "fused.keras"
    result = fuse(tmp_path / "ops_silu.keras", output=out)
    assert [r.groups for r in result.report.rewrites] == [4] and result.report.verification.passed
    fused = keras.models.load_model(out, safe_mode=True)
    counts = operation_counts(fused)
    assert grouped(fused) == [4] and counts["Sigmoid"] == 1 and counts["Multiply"] == 1
    x = np.random.default_rng(14).standard_normal((2, 8, 8, 8)).astype("float32")
    np.testing.assert_allclose(outputs(fused, x)[0], outputs(original, x)[0], rtol=1e-5, atol=1e-5)
