"""Keras --expand: ``ConvND(groups=N)`` ⇒ GetItem slices → N ConvND → Concatenate, verified;
fusing the result gives the grouped structure back."""

from __future__ import annotations

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras
import numpy as np
import pytest

from gconv_rewrite.api import Options, expand, fuse
from tests.helpers import classes


@pytest.fixture(scope="module")
def grouped(tmp_path_factory):
    L = keras.layers
    inp = keras.Input((8, 8, 8), name="x")
    y = L.Conv2D(16, 3, padding="same", groups=4, name="grouped")(inp)
    y = L.ReLU(name="act")(y)
    y = L.Conv2D(16, 3, padding="same", groups=16, use_bias=False, name="depthwise")(y)
    path = tmp_path_factory.mktemp("keras_expand") / "grouped.keras"
    keras.Model(inp, y, name="grouped_net").save(path)
    return path


def test_expand_then_fuse_round_trip(grouped, tmp_path):
    expanded_path = tmp_path / "expanded.keras"
    result = expand(grouped, output=expanded_path)
    assert [(r.location, r.groups) for r in result.report.rewrites] == [("grouped", 4), ("depthwise", 16)]
    assert result.report.verification.passed
    expanded = keras.models.load_model(expanded_path, safe_mode=True)
    assert classes(expanded)["Conv2D"] == 4 + 16 and classes(expanded)["Concatenate"] == 2
    assert all(layer.groups == 1 for layer in expanded.layers if type(layer).__name__ == "Conv2D")
    # The Concatenate takes the grouped conv's name: consumers and output names stay.
    assert type(expanded.get_layer("grouped")).__name__ == "Concatenate"
    original = keras.models.load_model(grouped, safe_mode=True)
    x = np.random.default_rng(0).standard_normal((2, 8, 8, 8)).astype("float32")
    np.testing.assert_allclose(np.asarray(expanded(x)), np.asarray(original(x)), atol=1e-5)

    fused = fuse(expanded_path, output=tmp_path / "fused.keras")
    assert sorted(r.groups for r in fused.report.rewrites) == [4, 16]
    refused = keras.models.load_model(tmp_path / "fused.keras", safe_mode=True)
    assert sorted(layer.groups for layer in refused.layers if type(layer).__name__ == "Conv2D") == [4, 16]


def test_expand_options_keep_depthwise_and_group_bounds(grouped, tmp_path):
    report = expand(grouped, output=tmp_path / "a.keras", options=Options(keep_depthwise=True)).report
    assert [r.location for r in report.rewrites] == ["grouped"]
    assert [(s.location, s.reason) for s in report.skipped] == [("depthwise", "depthwise (group == channels) kept: --keep-depthwise")]
    report = expand(grouped, output=tmp_path / "b.keras", options=Options(min_groups=8)).report
    assert [r.location for r in report.rewrites] == ["depthwise"]
    assert "below --min-groups 8" in report.skipped[0].reason
