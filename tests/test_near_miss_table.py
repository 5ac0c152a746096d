"""One table of near misses, each built in ONNX, as a TensorFlow SavedModel and as a Keras file:
every format leaves the pattern as it is (nothing rewritten, the same ops or layers, the written
copy computes the same) and reports one skip with the reason, and its stable code where the
report records codes.

A near miss is described once (``NearMiss``: the channels each branch reads, each branch's kernel
and stride, the concat order, a branch also read outside) and each format's builder reads that
description: ONNX through tests/test_fuse_split_conv.py's ``candidate``; TF and Keras through the
small builders below (``x → slices → Conv → Concat → ReLU``, channels last).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from tests.helpers import nodes
from tests.test_fuse_split_conv import candidate


@dataclass(frozen=True)
class NearMiss:
    """Four branches reading ``widths`` channels each, side by side, from one tensor that has
    ``unread`` more channels after them; branch i runs a ``kernels[i]``×``kernels[i]`` conv with
    stride ``strides[i]`` ("same" padding) writing ``outs[i]`` channels; the concat joins them in
    ``order``; ``used_outside``: branch 0's conv output is also a model output."""

    code: str  # the stable code of the skip (gconv_rewrite.reasons.CODES)
    reason: str  # words every format's skip reason holds
    widths: tuple[int, ...] = (4, 4, 4, 4)
    kernels: tuple[int, ...] = (3, 3, 3, 3)
    strides: tuple[int, ...] = (1, 1, 1, 1)
    outs: tuple[int, ...] = (4, 4, 4, 4)
    unread: int = 0
    order: tuple[int, ...] = (0, 1, 2, 3)
    used_outside: bool = False
    spatial: int = 5
    # Words a format's reason holds besides ``reason`` ({"onnx": ..., "tf": ..., "keras": ...}).
    details: dict[str, str] = field(default_factory=dict)

    @property
    def channels(self) -> int:
        return sum(self.widths) + self.unread

    def ranges(self) -> list[tuple[int, int]]:
        starts = np.cumsum((0, *self.widths))
        return [(int(a), int(b)) for a, b in zip(starts[:-1], starts[1:])]


NEAR_MISSES = {
    "uneven-split": NearMiss("uneven-split", "uneven split: 4,4,4,6 channels", widths=(4, 4, 4, 6)),
    "kernel-mismatch": NearMiss(
        "kernel-mismatch", "different kernel shapes between branches", kernels=(3, 1, 3, 3),
        details={"onnx": "(4,3,3) vs (4,1,1)", "tf": "(3,3,4) vs (1,1,4)", "keras": "(3,3,4) vs (1,1,4)"}),
    # 1×1 kernels on a 1×1 image: a stride changes no shape, so every format can build the model.
    "stride-mismatch": NearMiss(
        "attribute-mismatch", "different strides between branches", kernels=(1,) * 4, strides=(1, 2, 1, 1),
        spatial=1, details={"onnx": "(1,1) vs (2,2)", "tf": "(1,1,1,1) vs (1,2,2,1)", "keras": "(1,1) vs (2,2)"}),
    "used-outside": NearMiss(
        "used-outside", "is used outside", used_outside=True,
        details={"onnx": "outside the Concat", "tf": "outside the ConcatV2", "keras": "the output of branch0"}),
    "out-channels-differ": NearMiss("out-channels-differ", "different output channel counts: 4,6,4,4",
                                    outs=(4, 6, 4, 4)),
    "partial-cover": NearMiss("partial-cover", "branches read channels 0:16 of 20; a grouped convolution needs them all",
                              unread=4),
    "out-of-order": NearMiss("out-of-order", "branches are concatenated out of channel order (4:8,0:4,8:12,12:16)",
                             order=(1, 0, 2, 3)),
}


# -- one builder per format --------------------------------------------------------------------


def onnx_model(miss: NearMiss) -> onnx.ModelProto:
    per_branch = {i: {"kernel": (k, k), "attrs": {"strides": [s, s]}, "out": out}
                  for i, (k, s, out) in enumerate(zip(miss.kernels, miss.strides, miss.outs))}
    # Slices where channels stay unread (a Split hands out every channel).
    model = candidate(form="slice" if miss.unread else "split", open_end=False, channels=miss.channels,
                      groups=len(miss.widths), ranges=miss.ranges(), spatial=(miss.spatial, miss.spatial),
                      per_branch=per_branch, order=list(miss.order))
    if miss.used_outside:
        first = nodes(model, "Conv")[0].output[0]
        model.graph.output.append(helper.make_tensor_value_info(
            first, TensorProto.FLOAT, [1, miss.outs[0], miss.spatial, miss.spatial]))
    return model


def tf_module(miss: NearMiss):
    import tensorflow as tf

    class Branches(tf.Module):
        def __init__(self):
            super().__init__()
            rng = np.random.default_rng(0)
            self.kernels = [tf.Variable(rng.standard_normal((k, k, w, out)).astype(np.float32) * 0.3)
                            for k, w, out in zip(miss.kernels, miss.widths, miss.outs)]

        def serve(self, x):
            ys = [tf.nn.conv2d(x[..., a:b], kernel, stride, "SAME")
                  for (a, b), kernel, stride in zip(miss.ranges(), self.kernels, miss.strides)]
            outputs = {"y": tf.nn.relu(tf.concat([ys[i] for i in miss.order], axis=-1))}
            if miss.used_outside:
                outputs["first_branch"] = ys[0]
            return outputs

    return Branches()


def keras_model(miss: NearMiss):
    import keras

    keras.utils.set_random_seed(0)
    L = keras.layers
    x = keras.Input((miss.spatial, miss.spatial, miss.channels), name="x")
    ys = [L.Conv2D(out, k, strides=s, padding="same", name=f"branch{i}")(x[..., a:b])
          for i, ((a, b), k, s, out) in enumerate(zip(miss.ranges(), miss.kernels, miss.strides, miss.outs))]
    y = L.ReLU()(L.Concatenate()([ys[i] for i in miss.order]))
    return keras.Model(x, [y, ys[0]] if miss.used_outside else y)


# -- the table, over the three formats ---------------------------------------------------------


def expected_words(miss: NearMiss, fmt: str) -> tuple[str, ...]:
    return (miss.reason,) + ((miss.details[fmt],) if fmt in miss.details else ())


@pytest.mark.parametrize("name", list(NEAR_MISSES))
def test_onnx_leaves_the_near_miss_alone(fusion, name):
    miss = NEAR_MISSES[name]
    fusion.untouched(onnx_model(miss), *expected_words(miss, "onnx"), code=miss.code)


@pytest.mark.parametrize("name", list(NEAR_MISSES))
def test_tf_leaves_the_near_miss_alone(tf_fusion, name):
    miss = NEAR_MISSES[name]
    tf_fusion.untouched(tf_module(miss), *expected_words(miss, "tf"), code=miss.code,
                        shape=(1, miss.spatial, miss.spatial, miss.channels))


@pytest.mark.parametrize("name", list(NEAR_MISSES))
def test_keras_leaves_the_near_miss_alone(keras_fusion, tmp_path: Path, name):
    miss = NEAR_MISSES[name]
    outcome = keras_fusion.untouched(keras_model(miss), *expected_words(miss, "keras"), code=miss.code)
    assert outcome.before.get("Conv2D") == len(miss.widths)


@pytest.mark.parametrize("spatial", sorted({miss.spatial for miss in NEAR_MISSES.values()}))
def test_the_same_model_without_a_flaw_is_fused_in_every_format(fusion, tf_fusion, keras_fusion, spatial):
    """Each near miss differs from a fusable model by its flaw alone: the builders are sound."""
    fixed = NearMiss(code="", reason="", spatial=spatial, kernels=(3,) * 4 if spatial > 1 else (1,) * 4)
    fusion.fused(onnx_model(fixed), groups=4)
    tf_fusion.fused(tf_module(fixed), groups=4, shape=(1, spatial, spatial, fixed.channels))
    keras_fusion.fused(keras_model(fixed), groups=4)
