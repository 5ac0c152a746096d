"""Acceptance: a ResNeXt-50-shaped legacy Lambda model (tf-keras .h5, 16 blocks × 32 Lambda
slices → Conv2D → Concatenate) converts to 16 ``Conv2D(groups=32)`` within 1e-4.

About 40 s on 2 cores (the model has ~1,200 layers; the input is 32×32 to keep it short);
``benchmarks/keras_resnext.py`` runs the same conversion at full size and times it."""

from __future__ import annotations

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
import tf_keras  # noqa: F401  (the test extra installs it; a missing one must fail)


def test_resnext50_lambda_model_becomes_16_grouped_convs(tmp_path):
    from benchmarks.keras_resnext import run

    results = run(size=32, folder=tmp_path, timing=False)
    assert results["rewrites"] == 16
    assert results["grouped_conv2d_32"] == 16
    assert results["lambdas_left"] == 0
    assert results["ops_after"].get("Concatenate", 0) == 0
    assert results["verification_passed"]
    assert results["max_abs_error"] <= 1e-4
