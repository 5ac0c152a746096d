"""Keras rewrites are compared at their boundary layer, in both models, besides the model outputs:
a wrong fusion behind a saturated softmax head fails there; a defaulted batch runs at 1 and 2."""

from __future__ import annotations

import json

import keras
import numpy as np
import pytest

import gconv_rewrite
from gconv_rewrite.errors import VerificationFailed
from samples.keras_models import legacy_model


def _saturated_head(path):
    """x[..., a:b] ×4 → Conv2D → Concatenate → pool → Dense(softmax) with ×1e6 logits (seeded)."""
    keras.utils.set_random_seed(0)
    L = keras.layers
    inp = keras.Input((6, 6, 8), name="image")
    outs = [L.Conv2D(4, 3, padding="same", name=f"c{i}")(inp[..., 2 * i:2 * i + 2]) for i in range(4)]
    joined = L.Concatenate(name="join")(outs)
    head = L.Dense(10, activation="softmax", name="head")
    probs = head(L.GlobalAveragePooling2D()(joined))
    model = keras.Model(inp, probs)
    kernel, bias = head.get_weights()
    head.set_weights([kernel * 1e6, bias])  # probabilities 1 and exactly 0: nothing left for any output check
    model.save(path)
    return path


def test_a_wrong_fusion_behind_a_saturated_head_fails_at_its_boundary(tmp_path, monkeypatch):
    import gconv_rewrite.plan as planner

    real = planner.plan_fusion

    def slightly_wrong(*args, **kwargs):  # 0.1% off: invisible behind the head
        plan = real(*args, **kwargs)
        plan.weight = plan.weight * np.float32(1.001)
        return plan

    path = _saturated_head(tmp_path / "head.keras")
    monkeypatch.setattr(planner, "plan_fusion", slightly_wrong)
    with pytest.raises(VerificationFailed) as failure:
        gconv_rewrite.fuse(path, output=tmp_path / "out.keras")
    verification = failure.value.verification
    head = [o for o in verification.outputs if o.name == "head"][0]
    assert head.passed  # the model output alone would have said "verified"
    assert any(o.name.startswith("boundary join") and not o.passed for o in verification.outputs)
    assert "differ at their boundary" in verification.note
    assert not (tmp_path / "out.keras").exists()


def test_a_correct_fusion_reports_its_boundary_at_both_sizes(tmp_path):
    path = _saturated_head(tmp_path / "head.keras")
    report = gconv_rewrite.fuse(path, output=tmp_path / "out.keras").report
    (rewrite,) = report.rewrites
    (entry,) = rewrite.boundary
    assert entry["tensor"] == "join" and entry["written_tensor"] != "join"  # the fused conv takes its place
    assert entry["passed"] is True and entry["informative"] is True and entry["max_abs_error"] < 1e-5
    assert [run["inputs"]["image"][0] for run in report.verification.runs] == [1, 2]
    assert json.loads(json.dumps(report.to_dict()))["rewrites"][0]["boundary"][0]["passed"] is True


def test_tf_keras_reference_is_compared_at_the_boundary_too(tmp_path):
    path = legacy_model(tmp_path / "legacy.h5")
    report = gconv_rewrite.fuse(path, output=tmp_path / "out.keras", trust_lambdas=True).report
    assert report.verification.reference.startswith("tf-keras")
    (entry,) = report.rewrites[0].boundary
    assert entry["passed"] is True and entry["max_abs_error"] < 1e-5


def test_an_expansion_is_compared_at_the_grouped_layer(tmp_path):
    L = keras.layers
    inp = keras.Input((6, 6, 8))
    y = L.Conv2D(8, 3, padding="same", groups=4, name="grouped")(inp)
    path = tmp_path / "native.keras"
    keras.Model(inp, L.ReLU()(y)).save(path)
    report = gconv_rewrite.expand(path, output=tmp_path / "out.keras").report
    (entry,) = report.rewrites[0].boundary
    assert entry["tensor"] == "grouped" and entry["passed"] is True and entry["max_abs_error"] < 1e-5
