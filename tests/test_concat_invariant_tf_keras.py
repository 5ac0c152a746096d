"""The invariant of issue #20 ("clean means looked") for SavedModels and Keras files: each join of
hand-made groups (a ConcatV2; a Concatenate or tf-keras ``tf.concat``) ends as a rewrite or a "left
alone" line, never in silence, over the idioms the passes know.

What counts as hand-made groups where the matcher finds no branches (the rule
``tests/test_concat_invariant.py`` pins for ONNX): two or more distinct convolutions behind the
join's inputs, within a few nodes, that read Split/SplitV/Slice/StridedSlice outputs (TF) or slices
(Keras: GetItem, Split, tf-keras getitem/split, probed Lambdas) of one tensor. Joins of network
structure stay silent: a U-Net skip, a DenseNet concat of a conv and its input, Inception, one conv
read twice, a ShuffleNet channel split with one conv."""

from __future__ import annotations

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras
import numpy as np
import pytest
import tensorflow as tf
import tf_keras

import gconv_rewrite
from gconv_rewrite.passes.keras._config import parse_graph, read_file
from gconv_rewrite.passes.keras.fuse_grouped_conv import is_join
from gconv_rewrite.passes.tf.savedmodel import graph_stats, load_signature
from tests.helpers import saved_model_output
from tests.tf_models import save_module

X = np.random.default_rng(5).standard_normal((2, 6, 6, 8)).astype(np.float32)
AFTER = "after a branch convolution is not a channel-wise op of that branch alone, so the branches cannot " \
        "become one grouped convolution"
BEFORE = "before a branch convolution: the branches do not read their channels straight from a"


def _variable(seed: int, shape) -> tf.Variable:
    return tf.Variable(np.random.default_rng(seed).standard_normal(shape).astype(np.float32) * 0.3)


# -- TF SavedModels ------------------------------------------------------------------------------


class Idiom(tf.Module):
    """x [N, 6, 6, 8] → 4 channel parts (tf.split, or x[..., a:b]) → [tf.pad] → conv2d + bias_add →
    [an op per ``kind``] → tf.concat."""

    def __init__(self, kind: str):
        super().__init__()
        self.kind = kind
        self.widths = [1, 2, 2, 3] if kind == "uneven split" else [2] * 4
        self.kernels = [_variable(i, (3, 3, w, 3)) for i, w in enumerate(self.widths)]
        self.biases = [_variable(10 + i, (3,)) for i in range(4)]

    def _parts(self, x):
        if self.kind == "strided slice":
            return [x[..., 2 * i:2 * i + 2] for i in range(4)]
        parts = tf.split(x, self.widths, axis=-1)
        if self.kind == "pad before the convs":
            parts = [tf.pad(p, [[0, 0], [1, 1], [1, 1], [0, 0]]) for p in parts]
        return parts

    def serve(self, x):
        padding = "VALID" if self.kind == "pad before the convs" else "SAME"
        ys = [tf.nn.bias_add(tf.nn.conv2d(p, k, 1, padding), b) for p, k, b in zip(self._parts(x), self.kernels,
                                                                                   self.biases)]
        if self.kind in ("relu tails", "a tail is a model output"):
            ys = [tf.nn.relu(y) for y in ys]
        elif self.kind == "silu tails":
            ys = [y * tf.sigmoid(y) for y in ys]
        elif self.kind == "pool after the convs":
            ys = [tf.nn.relu(tf.nn.max_pool2d(y, 1, 1, "SAME")) for y in ys]
        elif self.kind == "cross-branch tail":
            ys = [ys[i] * tf.sigmoid(ys[(i + 1) % 4]) for i in range(4)]
        elif self.kind == "tail reads another tensor":
            gate = tf.sigmoid(tf.reduce_mean(x, axis=-1, keepdims=True))
            ys = [y * gate for y in ys]
        joined = tf.concat(ys, axis=1 if self.kind == "off-axis concat" else -1)
        return {"joined": joined, "relu": ys[0]} if self.kind == "a tail is a model output" else joined


class Structure(tf.Module):
    """Concats of network structure, not groups: none of them is reported."""

    def __init__(self, kind: str):
        super().__init__()
        self.kind = kind
        self.kernels = [_variable(30 + i, (3, 3, 8, 4)) for i in range(2)]
        self.half = _variable(40, (3, 3, 4, 4))

    def serve(self, x):
        conv = lambda t, k: tf.nn.conv2d(t, k, 1, "SAME")
        if self.kind == "u-net skip":  # convs of two different tensors
            return tf.concat([conv(x, self.kernels[0]), conv(tf.nn.max_pool2d(x, 3, 1, "SAME"), self.kernels[1])], -1)
        if self.kind == "densenet":  # a conv and the tensor it reads
            return tf.concat([x, tf.nn.relu(conv(x, self.kernels[0]))], -1)
        if self.kind == "inception":  # single convs of one whole tensor
            return tf.concat([conv(x, self.kernels[0]), conv(x, self.kernels[1])], -1)
        if self.kind == "one conv read twice":
            y = conv(x, self.kernels[0])
            return tf.concat([tf.nn.relu(y), tf.sigmoid(y)], -1)
        kept, convolved = tf.split(x, 2, axis=-1)  # shufflenet: one half as it is, one conv of the other
        return tf.concat([kept, tf.nn.relu(conv(convolved, self.half))], -1)


TF_FUSED = ["split", "strided slice", "relu tails", "silu tails"]
TF_LEFT_ALONE = {  # idiom → what the reason says
    "uneven split": "uneven",
    "off-axis concat": "not the channel axis",
    "pool after the convs": f"MaxPool (StatefulPartitionedCall/MaxPool2d) {AFTER}",
    "pad before the convs": f"Pad (StatefulPartitionedCall/Pad) {BEFORE} Split, SplitV, Slice or StridedSlice",
    "cross-branch tail": f"Mul (StatefulPartitionedCall/mul) {AFTER}",
    "tail reads another tensor": f"Mul (StatefulPartitionedCall/mul) {AFTER}",
    "a tail is a model output": "is used outside the ConcatV2",
}
TF_STRUCTURE = ["u-net skip", "densenet", "inception", "one conv read twice", "shufflenet"]


@pytest.fixture(scope="module")
def saved_models(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tf_invariant")
    models = {kind: save_module(Idiom(kind), folder / kind.replace(" ", "_"), shape=(None, 6, 6, 8))
              for kind in TF_FUSED + list(TF_LEFT_ALONE)}
    models.update({kind: save_module(Structure(kind), folder / kind.replace(" ", "_"), shape=(None, 6, 6, 8))
                   for kind in TF_STRUCTURE})
    return models


def _tf_concats(path) -> list[str]:
    names = [n.name for n in load_signature(path).graph_def.node if n.op == "ConcatV2"]
    assert names, "the idiom has a ConcatV2"
    return names


def _tf_run(path, x=X) -> np.ndarray:
    return saved_model_output(path, x)


@pytest.mark.parametrize("idiom", TF_FUSED + sorted(TF_LEFT_ALONE))
def test_tf_every_concat_of_groups_is_rewritten_or_reported(saved_models, idiom):
    report = gconv_rewrite.check(saved_models[idiom])
    rewritten = {name for rewrite in report.rewrites for name in rewrite.nodes}
    skipped = {skip.location: skip.reason for skip in report.skipped}
    for concat in _tf_concats(saved_models[idiom]):
        assert concat in rewritten or concat in skipped, f"{idiom}: {concat} ended in silence"
    if idiom in TF_FUSED:
        assert len(report.rewrites) == 1 and report.rewrites[0].groups == 4 and skipped == {}
    else:
        assert report.rewrites == [] and TF_LEFT_ALONE[idiom] in " ".join(skipped.values()), skipped


@pytest.mark.parametrize("idiom", ["strided slice", "silu tails"])
def test_tf_fused_idioms_compute_what_the_branches_computed(saved_models, idiom, tmp_path):
    report = gconv_rewrite.fuse(saved_models[idiom], output=tmp_path / "fused").report
    assert report.before.op_counts["Conv2D"] == 4 and report.after.op_counts["Conv2D"] == 1
    assert report.verification.passed
    np.testing.assert_allclose(_tf_run(tmp_path / "fused"), _tf_run(saved_models[idiom]), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("idiom", ["pool after the convs", "pad before the convs", "cross-branch tail",
                                   "tail reads another tensor"])
def test_tf_unmatched_groups_name_the_branch_convs(saved_models, idiom):
    report = gconv_rewrite.check(saved_models[idiom])
    (skip,) = report.skipped
    graph_def = load_signature(saved_models[idiom]).graph_def
    # The skip names the four branch convolutions, so that a user finds them.
    assert sorted(skip.nodes) == sorted(n.name for n in graph_def.node if n.op == "Conv2D") and len(skip.nodes) == 4


def test_tf_left_alone_model_is_written_as_it_computes(saved_models, tmp_path):
    # Through the driver: the skip is in the fuse report, and the written model is the original's.
    source = saved_models["pool after the convs"]
    report = gconv_rewrite.fuse(source, output=tmp_path / "out").report
    assert report.rewrites == [] and [s.reason.split(" (")[0] for s in report.skipped] == ["MaxPool"]
    assert graph_stats(load_signature(tmp_path / "out").graph_def).op_counts == report.before.op_counts
    np.testing.assert_allclose(_tf_run(tmp_path / "out"), _tf_run(source), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("kind", TF_STRUCTURE)
def test_tf_network_structure_stays_silent(saved_models, kind):
    # Not hand-made groups: reporting them would be noise on every real model.
    report = gconv_rewrite.check(saved_models[kind])
    assert report.rewrites == [] and report.skipped == []
    assert report.before.op_counts["ConcatV2"] == 1 and report.before.op_counts["Conv2D"] >= 1


# -- Keras ---------------------------------------------------------------------------------------


def _keras3_idiom(path, kind: str):
    """Keras 3: x → x[..., a:b] (GetItem) or keras.ops.split → [ZeroPadding2D] → Conv2D → [layers per
    ``kind``] → Concatenate."""
    L = keras.layers
    keras.utils.set_random_seed(0)
    inp = keras.Input((6, 6, 8), name="x")
    widths = [1, 2, 2, 3] if kind == "uneven slices" else [2] * 4
    bounds = np.cumsum([0] + widths)
    parts = keras.ops.split(inp, 4, axis=-1) if kind == "split" else \
        [inp[..., int(a):int(b)] for a, b in zip(bounds, bounds[1:])]
    padding = "same"
    if kind == "pad before the convs":
        parts, padding = [L.ZeroPadding2D(1, name=f"pad_{i}")(p) for i, p in enumerate(parts)], "valid"
    ys = [L.Conv2D(3, 3, padding=padding, name=f"conv_{i}", bias_initializer="random_normal")(p)
          for i, p in enumerate(parts)]
    if kind == "bn relu tails":
        ys = [L.ReLU()(L.BatchNormalization()(y)) for y in ys]
    elif kind == "silu gates":
        ys = [L.Multiply()([y, L.Activation("sigmoid")(y)]) for y in ys]
    elif kind == "pool after the convs":
        ys = [L.ReLU()(L.MaxPooling2D(1, name=f"pool_{i}")(y)) for i, y in enumerate(ys)]
    elif kind == "cross-branch tail":
        ys = [L.Multiply(name=f"gate_{i}")([ys[i], L.Activation("sigmoid")(ys[(i + 1) % 4])]) for i in range(4)]
    elif kind == "tail reads another tensor":
        gate = L.Activation("sigmoid")(L.Conv2D(3, 1, name="gate_conv")(inp))
        ys = [L.Multiply(name=f"gate_{i}")([y, gate]) for i, y in enumerate(ys)]
    elif kind == "tails are model outputs":
        ys = [L.ReLU(name=f"relu_{i}")(y) for i, y in enumerate(ys)]
    joined = L.Concatenate(axis=1 if kind == "off-axis concat" else -1, name="join")(ys)
    keras.Model(inp, [joined, *ys] if kind == "tails are model outputs" else joined).save(path)
    return path


def _tf_keras_idiom(path, kind: str):
    """tf-keras ``.h5``: tf.split, tf-keras getitem or Lambda slices → [ZeroPadding2D] → Conv2D →
    [MaxPooling2D] → tf.concat (a TFOpLambda) or Concatenate."""
    L = tf_keras.layers
    tf_keras.utils.set_random_seed(0)
    inp = tf_keras.Input((6, 6, 8))
    if kind.startswith("tf.split"):
        parts = tf.split(inp, 4, axis=-1)
    elif kind.startswith("getitem"):
        parts = [inp[..., 2 * i:2 * i + 2] for i in range(4)]
    else:
        parts = [L.Lambda(lambda z, c=c: z[..., 2 * c:2 * c + 2], name=f"slice_{c}")(inp) for c in range(4)]
    padding = "same"
    if "pad" in kind:
        parts, padding = [L.ZeroPadding2D(1, name=f"pad_{i}")(p) for i, p in enumerate(parts)], "valid"
    ys = [L.Conv2D(3, 3, padding=padding, name=f"conv_{i}", bias_initializer="random_normal")(p)
          for i, p in enumerate(parts)]
    if "pool" in kind:
        ys = [L.MaxPooling2D(1, name=f"pool_{i}")(y) for i, y in enumerate(ys)]
    joined = tf.concat(ys, axis=-1) if "tf.concat" in kind else L.Concatenate(name="join")(ys)
    tf_keras.Model(inp, joined).save(path)
    return path


KERAS_FUSED = ["getitem", "split", "bn relu tails", "silu gates"]
KERAS_LEFT_ALONE = {
    "uneven slices": "uneven",
    "off-axis concat": "Concatenate on axis 1, not the channel axis",
    "pool after the convs": f"MaxPooling2D (pool_0) {AFTER}",
    "pad before the convs": f"ZeroPadding2D (pad_0) {BEFORE} slice",
    "cross-branch tail": f"Multiply (gate_0) {AFTER}",
    "tail reads another tensor": f"Multiply (gate_0) {AFTER}",
    "tails are model outputs": "tail relu_0 is shared or used elsewhere, so the branches cannot become one grouped "
                               "convolution",
}
TF_KERAS_FUSED = ["tf.split, tf.concat"]
TF_KERAS_LEFT_ALONE = {
    "tf.split, pool, tf.concat": f"MaxPooling2D (pool_0) {AFTER}",
    "getitem, pad, Concatenate": f"ZeroPadding2D (pad_0) {BEFORE} slice",
    "Lambda, pool, tf.concat": f"MaxPooling2D (pool_0) {AFTER}",
}


@pytest.fixture(scope="module")
def keras_files(tmp_path_factory):
    folder = tmp_path_factory.mktemp("keras_invariant")
    files = {kind: _keras3_idiom(folder / f"{kind.replace(' ', '_')}.keras", kind)
             for kind in KERAS_FUSED + list(KERAS_LEFT_ALONE)}
    files.update({kind: _tf_keras_idiom(folder / f"{kind.replace(', ', '_').replace(' ', '_')}.h5", kind)
                  for kind in TF_KERAS_FUSED + list(TF_KERAS_LEFT_ALONE)})
    return files


def _joins(path) -> list[str]:
    kfile = read_file(path)
    graph = parse_graph(kfile.config, legacy=kfile.kind == "h5", path=path)
    names = [call.layer.name for call in graph.calls() if is_join(call)]
    assert names, "the idiom has a join"
    return names


def _keras_check(path):
    return gconv_rewrite.rewrite(path, apply=False, trust_lambdas=True).report


@pytest.mark.parametrize("idiom", KERAS_FUSED + sorted(KERAS_LEFT_ALONE) + TF_KERAS_FUSED + sorted(TF_KERAS_LEFT_ALONE))
def test_keras_every_join_of_groups_is_rewritten_or_reported(keras_files, idiom):
    report = _keras_check(keras_files[idiom])
    rewritten = {name for rewrite in report.rewrites for name in rewrite.nodes}
    skipped = {skip.location: skip.reason for skip in report.skipped}
    for join in _joins(keras_files[idiom]):
        assert join in rewritten or join in skipped, f"{idiom}: {join} ended in silence"
    if idiom in KERAS_FUSED + TF_KERAS_FUSED:
        assert len(report.rewrites) == 1 and report.rewrites[0].groups == 4 and skipped == {}
    else:
        expected = {**KERAS_LEFT_ALONE, **TF_KERAS_LEFT_ALONE}[idiom]
        assert report.rewrites == [] and expected in " ".join(skipped.values()), skipped
        # The skip names the four branch convolutions, so that a user finds them.
        assert sorted(node for skip in report.skipped for node in skip.nodes) == [f"conv_{i}" for i in range(4)]


@pytest.mark.parametrize("idiom", ["split", "silu gates", "tf.split, tf.concat"])
def test_keras_fused_idioms_compute_what_the_branches_computed(keras_files, idiom, tmp_path):
    source = keras_files[idiom]
    out = tmp_path / "fused.keras"
    report = gconv_rewrite.fuse(source, output=out).report
    assert report.verification.passed
    fused = keras.models.load_model(out, safe_mode=True)
    assert [layer.groups for layer in fused.layers if isinstance(layer, keras.layers.Conv2D)] == [4]
    original = (tf_keras.models.load_model(source, compile=False) if source.suffix == ".h5"
                else keras.models.load_model(source, safe_mode=True))
    np.testing.assert_allclose(np.asarray(fused(X, training=False)), np.asarray(original(X, training=False)),
                               rtol=1e-5, atol=1e-5)


def test_keras_left_alone_file_is_written_as_it_computes(keras_files, tmp_path):
    # Through the driver: the skip is in the fuse report, and the written model is the original's.
    source = keras_files["pool after the convs"]
    out = tmp_path / "out.keras"
    report = gconv_rewrite.fuse(source, output=out).report
    assert report.rewrites == [] and [s.location for s in report.skipped] == ["join"]
    written = keras.models.load_model(out, safe_mode=True)
    assert [type(layer).__name__ for layer in written.layers].count("Conv2D") == 4
    original = keras.models.load_model(source, safe_mode=True)
    np.testing.assert_allclose(np.asarray(written(X)), np.asarray(original(X)), rtol=1e-6, atol=1e-6)


def _keras_structure(path, kind: str):
    """Keras 3 joins of network structure: none of them is reported (see ``Structure``)."""
    L = keras.layers
    inp = keras.Input((6, 6, 8), name="x")
    conv = lambda t: L.Conv2D(4, 3, padding="same")(t)
    if kind == "u-net skip":
        outs = [conv(inp), conv(L.MaxPooling2D(3, 1, padding="same")(inp))]
    elif kind == "densenet":
        outs = [inp, L.ReLU()(conv(inp))]
    elif kind == "one conv read twice":
        y = conv(inp)
        outs = [L.ReLU()(y), L.Activation("sigmoid")(y)]
    else:  # shufflenet: one half as it is, one conv of the other
        outs = [inp[..., :4], L.ReLU()(conv(inp[..., 4:]))]
    keras.Model(inp, L.Concatenate(name="join")(outs)).save(path)
    return path


# Not Inception: Keras's pass reads convs of one whole tensor as a candidate (one wide conv).
@pytest.mark.parametrize("kind", [kind for kind in TF_STRUCTURE if kind != "inception"])
def test_keras_network_structure_stays_silent(kind, tmp_path):
    path = _keras_structure(tmp_path / "structure.keras", kind)
    report = gconv_rewrite.check(path)
    assert report.rewrites == [] and report.skipped == []
    assert report.before.op_counts["Concatenate"] == 1 and report.before.op_counts["Conv2D"] >= 1
