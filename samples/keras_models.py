"""Builders of small Keras models holding hand-made grouped convolutions, the ways people wrote
them (seed 003 and DESIGN.md): Keras 3 slicing (``GetItem``), tf-keras ``TFOpLambda`` nodes, and
``Lambda`` layers — closure-bound, default-argument-bound and late-bound. Used by the tests and
the benchmark; each writes a file and returns its path.
"""

from __future__ import annotations

import os
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


def _keras():
    import keras

    return keras


def _tf_keras():
    import tf_keras

    return tf_keras


def _branches(layers, x, slices, filters: int, kernel: int, *, conv=None, tails=(), strides=1, name=""):
    """One hand-made grouped conv: slice_i → Conv → tails → Concatenate."""
    conv = conv or layers.Conv2D
    outs = []
    for i, piece in enumerate(slices):
        y = conv(filters, kernel, padding="same", strides=strides, name=f"{name}conv_{i}" if name else None)(piece)
        for tail in tails:
            y = tail()(y)
        outs.append(y)
    return layers.Concatenate(name=f"{name}concat" if name else None)(outs)


def _randomise_bn(model, seed: int = 0):
    """Non-trivial BatchNorm statistics, so a wrongly fused tail shows in the numbers."""
    import numpy as np

    rng = np.random.default_rng(seed)
    for layer in model.layers:
        if type(layer).__name__ == "BatchNormalization":
            gamma, beta, mean, var = layer.get_weights()
            layer.set_weights([rng.uniform(0.5, 1.5, gamma.shape).astype("float32"),
                               rng.normal(0, 0.1, beta.shape).astype("float32"),
                               rng.normal(0, 0.1, mean.shape).astype("float32"),
                               rng.uniform(0.5, 1.5, var.shape).astype("float32")])


def getitem_model(path: Path, *, groups: int = 4, channels: int = 8, filters: int = 4, size: int = 8,
                  tails: bool = True, rank: int = 2) -> Path:
    """Keras 3: stem conv → x[..., a:b] ×N → ConvND → (BN → ReLU) → Concatenate → pool → Dense."""
    keras = _keras()
    L = keras.layers
    conv = {1: L.Conv1D, 2: L.Conv2D, 3: L.Conv3D}[rank]
    inp = keras.Input((size,) * rank + (channels,), name="image")
    x = conv(channels, 1, name="stem")(inp)
    width = channels // groups
    slices = [x[..., i * width:(i + 1) * width] for i in range(groups)]
    tail_layers = (L.BatchNormalization, L.ReLU) if tails else ()
    y = _branches(L, x, slices, filters, 3, conv=conv, tails=tail_layers, name="g_")
    pool = {1: L.GlobalAveragePooling1D, 2: L.GlobalAveragePooling2D, 3: L.GlobalAveragePooling3D}[rank]
    out = L.Dense(3, name="head")(pool()(y))
    model = keras.Model(inp, out, name="getitem_block")
    _randomise_bn(model)
    model.save(path)
    return path


def uneven_model(path: Path) -> Path:
    """Seed 003, example 2: 67 channels in 4 groups (16,16,16,19) — not one grouped conv."""
    keras = _keras()
    L = keras.layers
    inp = keras.Input((8, 8, 67))
    sizes = [67 // 4] * 4
    sizes[-1] += 67 % 4
    start, outs = 0, []
    for size in sizes:
        outs.append(L.Conv2D(8, 3)(inp[:, :, :, start:start + size]))
        start += size
    keras.Model(inp, L.concatenate(outs)).save(path)
    return path


def lambda_model_keras3(path: Path, *, binding: str = "closure", groups: int = 4, channels: int = 8) -> Path:
    """Keras 3 Lambdas: ``closure`` (a factory per group: correct), ``late`` (closing over the loop
    variable: every branch slices the last group), ``default`` (``lambda z, c=c``: correct, but
    Keras 3.15 cannot load the file)."""
    keras = _keras()
    L = keras.layers
    width = channels // groups

    def make(c):
        return lambda z: z[..., c * width:(c + 1) * width]

    def group_conv(x):
        outs = []
        for c in range(groups):
            if binding == "closure":
                fn = make(c)
            elif binding == "late":
                fn = lambda z: z[..., c * width:(c + 1) * width]  # noqa: B023 (late binding is the point)
            else:
                fn = lambda z, c=c: z[..., c * width:(c + 1) * width]
            outs.append(L.Conv2D(4, 3, padding="same")(L.Lambda(fn)(x)))
        return L.Concatenate()(outs)

    inp = keras.Input((8, 8, channels))
    out = L.Activation("relu")(group_conv(inp))
    keras.Model(inp, out).save(path)
    return path


def legacy_model(path: Path, *, style: str = "lambda", groups: int = 4, channels: int = 8,
                 late: bool = False) -> Path:
    """tf-keras ``.h5``: ``lambda`` (Lambda with ``c=c`` defaults — or late-bound), ``getitem``
    (SlicingOpLambda ``tf.__operators__.getitem``) or ``split`` (TFOpLambda ``tf.split``)."""
    tk = _tf_keras()
    import tensorflow as tf

    L = tk.layers
    width = channels // groups
    inp = tk.Input((8, 8, channels))
    x = L.Conv2D(channels, 1, name="stem")(inp)
    if style == "split":
        slices = tf.split(x, groups, axis=-1)
    elif style == "getitem":
        slices = [x[..., i * width:(i + 1) * width] for i in range(groups)]
    elif late:
        slices = _late_closure(L, x, groups, width)
    else:
        slices = [L.Lambda(lambda z, c=c: z[..., c * width:(c + 1) * width])(x) for c in range(groups)]
    y = _branches(L, x, slices, 4, 3, tails=(L.BatchNormalization, lambda: L.Activation("relu")))
    model = tk.Model(inp, L.Dense(2)(L.GlobalAveragePooling2D()(y)))
    _randomise_bn(model)
    model.save(path)
    return path


def _late_closure(L, x, groups: int, width: int):
    # Inside a function, so the Lambdas close over the cell of ``c`` (late binding), not a global.
    slices = []
    for c in range(groups):
        slices.append(L.Lambda(lambda z: z[..., c * width:(c + 1) * width])(x))  # noqa: B023
    return slices


def resnext50_lambda_model(path: Path, *, size: int = 224, cardinality: int = 32, seed: int = 0,
                           keras3: bool = False) -> Path:
    """ResNeXt-50 (32x4d) as legacy code wrote it: each stage's 3×3 conv as 32 Lambda slices →
    Conv2D → Concatenate, in tf-keras, saved as ``.h5`` (16 blocks, so 16 grouped convs);
    ``keras3``: the same code in Keras 3, saved as ``path`` says (``.keras``)."""
    if keras3:
        import keras as tk
    else:
        tk = _tf_keras()
    import numpy as np

    L = tk.layers

    def grouped(x, width: int, strides: int, name: str):
        per = width // cardinality
        outs = []
        for c in range(cardinality):
            piece = L.Lambda(lambda z, c=c: z[..., c * per:(c + 1) * per], name=f"{name}_slice{c}")(x)
            outs.append(L.Conv2D(per, 3, strides=strides, padding="same", use_bias=False,
                                 name=f"{name}_conv{c}")(piece))
        return L.Concatenate(name=f"{name}_concat")(outs)

    def block(x, width: int, out: int, strides: int, name: str, project: bool):
        shortcut = x
        if project:
            shortcut = L.Conv2D(out, 1, strides=strides, use_bias=False, name=f"{name}_proj")(x)
            shortcut = L.BatchNormalization(name=f"{name}_proj_bn")(shortcut)
        y = L.Conv2D(width, 1, use_bias=False, name=f"{name}_1_conv")(x)
        y = L.ReLU(name=f"{name}_1_relu")(L.BatchNormalization(name=f"{name}_1_bn")(y))
        y = grouped(y, width, strides, f"{name}_2")
        y = L.ReLU(name=f"{name}_2_relu")(L.BatchNormalization(name=f"{name}_2_bn")(y))
        y = L.BatchNormalization(name=f"{name}_3_bn")(L.Conv2D(out, 1, use_bias=False, name=f"{name}_3_conv")(y))
        return L.ReLU(name=f"{name}_out")(L.Add(name=f"{name}_add")([shortcut, y]))

    inp = tk.Input((size, size, 3), name="image")
    x = L.Conv2D(64, 7, strides=2, padding="same", use_bias=False, name="stem_conv")(inp)
    x = L.ReLU(name="stem_relu")(L.BatchNormalization(name="stem_bn")(x))
    x = L.MaxPooling2D(3, strides=2, padding="same", name="stem_pool")(x)
    for stage, (blocks, width, out) in enumerate([(3, 128, 256), (4, 256, 512), (6, 512, 1024), (3, 1024, 2048)]):
        for b in range(blocks):
            strides = 2 if b == 0 and stage > 0 else 1
            x = block(x, width, out, strides, f"s{stage + 1}b{b + 1}", project=b == 0)
    x = L.GlobalAveragePooling2D(name="pool")(x)
    model = tk.Model(inp, L.Dense(1000, name="logits")(x), name="resnext50_lambda")
    rng = np.random.default_rng(seed)
    for layer in model.layers:
        if type(layer).__name__ == "BatchNormalization":
            gamma, beta, mean, var = layer.get_weights()
            layer.set_weights([rng.uniform(0.5, 1.0, gamma.shape).astype("float32"),
                               rng.normal(0, 0.05, beta.shape).astype("float32"),
                               rng.normal(0, 0.05, mean.shape).astype("float32"),
                               rng.uniform(0.5, 1.5, var.shape).astype("float32")])
    model.save(path)
    return path
