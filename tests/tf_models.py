"""Small TensorFlow SavedModels for the tests, built in code (shared by tests/test_tf_*.py)."""

from __future__ import annotations

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from pathlib import Path

import numpy as np
import tensorflow as tf


def _weights(seed: int, shape) -> tf.Variable:
    return tf.Variable(np.random.default_rng(seed).standard_normal(shape).astype(np.float32) * 0.3)


class SplitConvConcat(tf.Module):
    """x → read channels (split / strided slice / uneven split) → per-group conv + bias → concat → relu."""

    def __init__(self, *, groups=4, channels=16, out_per_group=6, split="split", dilations=None, bias=True,
                 sizes=None, tail="relu_after", extra_output=False, kernel=3, stride=1, padding="SAME"):
        super().__init__()
        self.groups, self.channels, self.split, self.sizes = groups, channels, split, sizes
        self.dilations = dilations or [1] * groups
        self.tail, self.extra_output = tail, extra_output
        self.stride, self.padding = stride, padding
        widths = sizes or [channels // groups] * groups
        self.kernels = [_weights(i, (kernel, kernel, w, out_per_group)) for i, w in enumerate(widths)]
        self.biases = [_weights(100 + i, (out_per_group,)) for i in range(groups)] if bias else None

    def _parts(self, x):
        width = self.channels // self.groups
        if self.split == "split":
            return tf.split(x, self.sizes or self.groups, axis=-1)
        if self.split == "splitv":  # sizes given: SplitV
            return tf.split(x, [width] * self.groups, axis=3)
        if self.split == "slice":
            return [tf.slice(x, [0, 0, 0, i * width], [-1, -1, -1, width]) for i in range(self.groups)]
        return [x[..., i * width:(i + 1) * width] for i in range(self.groups)]

    def serve(self, x):
        ys = []
        for i, part in enumerate(self._parts(x)):
            y = tf.nn.conv2d(part, self.kernels[i], self.stride, self.padding, dilations=self.dilations[i])
            if self.biases is not None:
                y = tf.nn.bias_add(y, self.biases[i])
            if self.tail == "relu_per_branch":
                y = tf.nn.relu(y)
            ys.append(y)
        y = tf.concat(ys, axis=-1)
        if self.tail == "relu_after":
            y = tf.nn.relu(y)
        outputs = {"y": y}
        if self.extra_output:
            outputs["first_branch"] = ys[0]
        return outputs


def save_module(module: tf.Module, path: Path, shape=(1, 8, 8, 16), name="x") -> Path:
    serve = tf.function(module.serve, input_signature=[tf.TensorSpec(shape, tf.float32, name=name)])
    tf.saved_model.save(module, str(path), signatures={"serving_default": serve.get_concrete_function()})
    return path


def save_keras_grouped(path: Path, *, gelu: bool = False) -> Path:
    """A Keras 3 model with Conv2D(groups=4) (XLA-wrapped by Keras on CPU), exported as a SavedModel."""
    import keras

    keras.utils.set_random_seed(0)
    inputs = keras.Input((8, 8, 16), name="img")
    y = keras.layers.Conv2D(24, 3, padding="same", groups=4, activation="relu",
                            bias_initializer="random_normal")(inputs)
    if gelu:
        y = keras.layers.Conv2D(24, 3, padding="same", groups=24, bias_initializer="random_normal")(y)
        y = keras.layers.LayerNormalization()(y)
        y = keras.layers.Activation("gelu")(y)
    y = keras.layers.Conv2D(8, 1)(y)
    model = keras.Model(inputs, y)
    model.export(str(path), verbose=False)
    return path


def save_keras_sliced(path: Path, groups: int = 4, batch_norm: bool = False) -> Path:
    """Keras 3 hand-made groups: x[..., a:b] (GetItem) → Conv2D per group [→ BatchNormalization
    → ReLU] → Concatenate, exported."""
    import keras

    keras.utils.set_random_seed(1)
    inputs = keras.Input((8, 8, 16), name="img")
    width = 16 // groups
    branches, norms = [], []
    for i in range(groups):
        y = keras.layers.Conv2D(6, 3, padding="same", use_bias=not batch_norm, bias_initializer="random_normal",
                                name=f"branch{i}")(inputs[..., i * width:(i + 1) * width])
        if batch_norm:
            norms.append(keras.layers.BatchNormalization(name=f"bn{i}"))
            y = keras.layers.ReLU()(norms[-1](y))
        branches.append(y)
    y = keras.layers.Concatenate(axis=-1)(branches)
    if not batch_norm:
        y = keras.layers.ReLU()(y)
    model = keras.Model(inputs, y)
    rng = np.random.default_rng(2)
    for norm in norms:  # inference statistics that are not the identity
        norm.set_weights([rng.uniform(0.5, 1.5, 6), rng.normal(0, 0.3, 6), rng.normal(0, 0.3, 6),
                          rng.uniform(0.5, 1.5, 6)])
    model.export(str(path), verbose=False)
    return path


class SplitConv1DConcat(tf.Module):
    """x [N, W, C] → tf.split on channels → tf.nn.conv1d + bias per group → concat → relu."""

    def __init__(self, groups=4, channels=16, out_per_group=5):
        super().__init__()
        self.groups = groups
        self.kernels = [_weights(i, (3, channels // groups, out_per_group)) for i in range(groups)]
        self.biases = [_weights(50 + i, (out_per_group,)) for i in range(groups)]

    def serve(self, x):
        parts = tf.split(x, self.groups, axis=-1)
        ys = [tf.nn.bias_add(tf.nn.conv1d(p, k, 2, "SAME"), b) for p, k, b in zip(parts, self.kernels, self.biases)]
        return {"y": tf.nn.relu(tf.concat(ys, axis=-1))}
