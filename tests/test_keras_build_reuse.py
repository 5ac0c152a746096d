"""The Keras backend builds the original model once (issue 14, speed): the emit calls the
analysis's layers again, given the file's weights, wherever the rewritten model keeps them; the
calls a fusion removes are shape stand-ins in the analysis, and the reference rebuilt from the
file (where Keras cannot load it) makes them."""

from __future__ import annotations

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras
import numpy as np

from gconv_rewrite.api import Options
from gconv_rewrite.passes.keras import model as km
from gconv_rewrite.passes.keras.backend import KerasBackend
from gconv_rewrite.report import Report

L = keras.layers


def _lambda_grouped_model(path, groups: int = 4, per: int = 4):
    """stem conv → BN → ``groups`` Lambda slices → Conv2D each → Concatenate → ReLU → head."""
    inputs = keras.Input((8, 8, 3), name="image")
    x = L.BatchNormalization(name="stem_bn")(L.Conv2D(groups * per, 3, padding="same", name="stem")(inputs))
    branches = [L.Conv2D(per, 3, padding="same", name=f"conv{g}")(
        L.Lambda(lambda z, g=g: z[..., g * per:(g + 1) * per], name=f"slice{g}")(x)) for g in range(groups)]
    y = L.ReLU(name="relu")(L.Concatenate(name="concat")(branches))
    model = keras.Model(inputs, L.Dense(5, name="head")(L.GlobalAveragePooling2D(name="pool")(y)))
    rng = np.random.default_rng(0)
    for layer in model.layers:
        layer.set_weights([rng.normal(0, 0.5, w.shape).astype("float32") for w in layer.get_weights()])
    model.save(path)
    return model


def test_the_emit_calls_the_analysis_layers_again_with_the_file_weights(tmp_path):
    original = _lambda_grouped_model(tmp_path / "grouped.keras")
    options = Options(trust_lambdas=True)
    backend = KerasBackend(Report(input=str(tmp_path / "grouped.keras"), mode="fuse"))
    source = backend.load(tmp_path / "grouped.keras", options)
    (fuse,) = backend.fuse_passes(source, rewrite=True, options=options)
    source = backend.apply(fuse, source)
    assert len(source.replacements) == 1
    result = backend.emit(source, backend.report, options)

    analysis_layers = source.analysis.built.layers
    kept = ["stem", "stem_bn", "relu", "pool", "head"]
    for name in kept:  # the very objects the analysis built, not copies
        assert result.model.get_layer(name) is analysis_layers[name]
    fused = [layer for layer in result.model.layers if type(layer).__name__ == "Conv2D" and layer.groups == 4]
    assert len(fused) == 1 and fused[0] not in analysis_layers.values()
    assert not any(type(layer).__name__ == "Lambda" for layer in result.model.layers)
    for name in kept:  # each holds the file's arrays, loaded once
        for mine, theirs in zip(result.model.get_layer(name).get_weights(), original.get_layer(name).get_weights()):
            np.testing.assert_array_equal(mine, theirs)
    assert source.analysis.built.weights_loaded

    # The analysis stood in for the calls the fusion removes (shapes only: those layers were never
    # made); the model rebuilt from the file where Keras cannot load it, and the rewritten one that
    # calls the analysis's layers again, compute what the original computes.
    assert sorted(source.analysis.built.stand_ins) == sorted([f"slice{g}" for g in range(4)] +
                                                             [f"conv{g}" for g in range(4)])
    assert not {f"conv{g}" for g in range(4)} & set(analysis_layers)
    image = np.random.default_rng(1).normal(size=(2, 8, 8, 3)).astype("float32")
    expected = np.asarray(original(image))
    reference, _, _ = km.rebuilt_reference(source.graph, source.kfile, source.analysis, "")
    np.testing.assert_allclose(np.asarray(reference(image)), expected, atol=1e-5)
    np.testing.assert_allclose(np.asarray(result.model(image)), expected, atol=1e-4)
