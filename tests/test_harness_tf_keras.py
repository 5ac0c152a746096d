"""The fuse harness on TensorFlow SavedModels and Keras files (``tf_fusion``, ``keras_fusion``;
tests/harness.py): the fused and untouched checks the ONNX tests make, on each format's idioms —
tf.split / strided slices / tf.slice, per-branch tails, Keras-exported SavedModels, Keras 3
GetItem, tf-keras ``.h5`` with TFOpLambda / SlicingOpLambda, Conv1D and Conv3D branches."""

from __future__ import annotations

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras
import pytest

from samples import keras_models as km
from tests.harness import KerasFusion
from tests.tf_models import SplitConvConcat, save_keras_sliced

# -- TensorFlow SavedModels --------------------------------------------------------------------


@pytest.mark.parametrize("settings", [
    dict(split="split"),
    dict(split="strided", tail="relu_per_branch", bias=False),
    dict(split="slice", groups=2, out_per_group=5),
], ids=["split-bias", "strided-relu-per-branch", "slice-2groups"])
def test_tf_modules_fuse(tf_fusion, settings):
    outcome = tf_fusion.fused(SplitConvConcat(**settings), groups=settings.get("groups", 4))
    (rewrite,) = outcome.report.rewrites
    assert rewrite.channels == {"in": 16, "out": settings.get("groups", 4) * settings.get("out_per_group", 6)}


def test_tf_per_branch_relus_become_one(tf_fusion):
    outcome = tf_fusion.fused(SplitConvConcat(split="strided", tail="relu_per_branch"), groups=4)
    assert outcome.before["Relu"] == 4 and outcome.after["Relu"] == 1


def test_keras_exported_savedmodel_fuses(tf_fusion, tmp_path):
    outcome = tf_fusion.fused(save_keras_sliced(tmp_path / "sliced"), groups=4)
    assert outcome.after["Conv2D"] == 1


@pytest.mark.parametrize("settings,reason", [
    (dict(groups=3, sizes=[5, 5, 6]), "uneven split: 5,5,6 channels"),
    (dict(dilations=[1, 1, 2, 1]), "different dilations between branches: (1,1,1,1) vs (1,2,2,1)"),
    (dict(extra_output=True), "is used outside the ConcatV2"),
], ids=["uneven", "dilations", "used-outside"])
def test_tf_near_misses_stay(tf_fusion, settings, reason):
    outcome = tf_fusion.untouched(SplitConvConcat(**settings), reason)
    assert outcome.after.get("ConcatV2") == 1


# -- Keras files -------------------------------------------------------------------------------


@pytest.mark.parametrize("rank", [1, 2, 3])
def test_keras3_getitem_blocks_fuse(keras_fusion: KerasFusion, tmp_path, rank):
    path = km.getitem_model(tmp_path / f"getitem{rank}d.keras", rank=rank, size=8 if rank < 3 else 4)
    outcome = keras_fusion.fused(path, groups=4)
    (rewrite,) = outcome.report.rewrites
    assert rewrite.channels == {"in": 8, "out": 16}
    # BatchNormalization → ReLU per branch: one of each after the fused conv.
    assert outcome.before["BatchNormalization"] == 4 and outcome.after["BatchNormalization"] == 1
    assert outcome.after["ReLU"] == 1


@pytest.mark.parametrize("style", ["split", "getitem"])
def test_tf_keras_h5_fuses(keras_fusion: KerasFusion, tmp_path, style):
    outcome = keras_fusion.fused(km.legacy_model(tmp_path / f"{style}.h5", style=style), groups=4)
    assert outcome.fused_path.suffix == ".keras"
    assert outcome.after["Activation"] == 1


def test_keras_model_object_is_saved_and_fused(keras_fusion: KerasFusion):
    inp = keras.Input((6, 6, 8))
    branches = [keras.layers.Conv2D(3, 3, padding="same")(inp[..., i * 4:(i + 1) * 4]) for i in range(2)]
    outcome = keras_fusion.fused(keras.Model(inp, keras.layers.Concatenate()(branches)), groups=2)
    assert outcome.after["Conv2D"] == 1


def test_keras_uneven_split_stays(keras_fusion: KerasFusion, tmp_path):
    outcome = keras_fusion.untouched(km.uneven_model(tmp_path / "uneven.keras"), "uneven split: 16,16,16,19 channels",
                                     code="uneven-split")
    assert outcome.after["GetItem"] == 4 and outcome.after["Conv2D"] == 4
