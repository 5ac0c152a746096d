"""Keras: branches of several convolutions (issue 14, parity with tests/test_fuse_chains.py) —
ResNeXt fig. 3 a/b → c (every branch reads the same whole tensor: one wide 1×1, then a grouped
3×3), chains of grouped layers after slices, and the near misses with their reasons.

Every fusion is checked for structure (layer classes and counts in the written ``.keras``, its
``groups``, names) and numbers (verification passed, and the written file, loaded without trust
flags, computes what the original computes within 1e-4); every fused file is fused again
(nothing more to rewrite)."""

from __future__ import annotations

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras
import numpy as np
import pytest
import tf_keras
from click.testing import CliRunner

from gconv_rewrite.api import fuse
from gconv_rewrite.cli import main
from tests.helpers import classes
from tests.helpers import keras_outputs as run

L = keras.layers


def convs(model) -> list[tuple[str, int, int, tuple]]:
    """(class, groups, filters, kernel_size) of every convolution, in model order."""
    return [(type(layer).__name__, layer.groups, layer.filters, tuple(layer.kernel_size)) for layer in model.layers
            if type(layer).__name__ in ("Conv1D", "Conv2D", "Conv3D")]


def randomise_bn(model, seed: int = 0):
    """Non-trivial BatchNorm parameters (with or without scale/center), so a wrongly fused tail
    shows in the numbers: the moving variance (last) positive, the rest around 0 or 1."""
    rng = np.random.default_rng(seed)
    for layer in model.layers:
        if type(layer).__name__ == "BatchNormalization":
            arrays = layer.get_weights()
            layer.set_weights([rng.uniform(0.5, 1.5, a.shape).astype("float32") if i == len(arrays) - 1 else
                               rng.normal(0, 0.3, a.shape).astype("float32") + (i == 0 and layer.scale)
                               for i, a in enumerate(arrays)])


def save(model, path):
    randomise_bn(model)
    model.save(path)
    return path


def fused_file(path, tmp_path, *, rewrites: int = 1, skipped: int = 0, spatial=(8, 8), seed: int = 0):
    """Fuse ``path``; check the report's counts, that verification passed, that the written file
    loads in safe mode and computes the original's outputs, and that it fuses to nothing more.
    Returns (report, the fused Keras model)."""
    out = tmp_path / f"{path.stem}.fused.keras"
    result = fuse(path, output=out)
    report = result.report
    assert len(report.rewrites) == rewrites, report.rewrites
    assert len(report.skipped) == skipped, [s.reason for s in report.skipped]
    assert report.verification.passed
    fused = keras.models.load_model(out, safe_mode=True)
    original = keras.models.load_model(path, safe_mode=True)
    x = np.random.default_rng(seed).standard_normal((2, *spatial, original.inputs[0].shape[-1])).astype("float32")
    for a, b in zip(run(fused, x), run(original, x), strict=True):
        np.testing.assert_allclose(a, b, atol=1e-4, rtol=1e-4)
    again = fuse(out, output=tmp_path / "again.keras").report
    assert again.rewrites == []
    return report, fused


def resnext_block(n: int, width: int, *, channels: int = 16, second=None, extra=None, spatial=(8, 8)):
    """x (stem) → N × [Conv2D 1×1 → BN → ReLU → ``second(i)`` (default Conv2D 3×3 same) → BN → ReLU]
    → Concatenate → Conv2D 1×1 head. ``extra(ys)``: more model outputs from the branch tensors."""
    inp = keras.Input((*spatial, channels), name="image")
    x = L.Conv2D(channels, 1, name="stem")(inp)
    ends, seen = [], []
    for i in range(n):
        y = L.Conv2D(width, 1, name=f"reduce_{i}")(x)
        y = L.ReLU(name=f"reduce_relu_{i}")(L.BatchNormalization(name=f"reduce_bn_{i}")(y))
        seen.append(y)
        conv = second(i) if second else L.Conv2D(width, 3, padding="same", name=f"conv3_{i}")
        y = L.ReLU(name=f"conv3_relu_{i}")(L.BatchNormalization(name=f"conv3_bn_{i}")(conv(y)))
        ends.append(y)
    y = L.Conv2D(channels, 1, name="head")(L.Concatenate(name="join")(ends))
    outputs = [y] + (extra(seen) if extra else [])
    return keras.Model(inp, outputs if len(outputs) > 1 else y, name="block")


def sliced_chain(n: int = 4, width: int = 4, *, steps=None, extra=None, spatial=(8, 8), pre=None):
    """image → x[..., a:b] × N → ``steps(i)`` (default Conv2D 3×3 → ReLU → Conv2D 1×1 → BN)
    → Concatenate. ``pre``: a layer each branch applies to its slice first."""
    channels = n * width
    inp = keras.Input((*spatial, channels), name="image")
    ends, seen = [], []
    for i in range(n):
        y = inp[..., i * width:(i + 1) * width]
        if pre is not None:
            y = pre(i)(y)
        layers = steps(i) if steps else [L.Conv2D(4, 3, padding="same", name=f"a_{i}"), L.ReLU(name=f"a_relu_{i}"),
                                         L.Conv2D(8, 1, name=f"b_{i}"), L.BatchNormalization(name=f"b_bn_{i}")]
        for layer in layers:
            y = layer(y)
            seen.append(y)
        ends.append(y)
    y = L.Concatenate(name="join")(ends)
    outputs = [y] + (extra(seen) if extra else [])
    return keras.Model(inp, outputs if len(outputs) > 1 else y, name="chain")


# -- ResNeXt fig. 3: branches that read the same tensor ----------------------------------------


@pytest.mark.parametrize("n,width", [(4, 4), (8, 2)])
def test_resnext_form_a_to_c(tmp_path, n, width):
    path = save(resnext_block(n, width), tmp_path / "block.keras")
    report, fused = fused_file(path, tmp_path)
    (rewrite,) = report.rewrites
    assert rewrite.kind == "keras-fuse-parallel-branches"
    assert (rewrite.groups, rewrite.channels) == (n, {"in": 16, "out": n * width})
    assert rewrite.location == f"conv3_0_group{n}"
    assert classes(fused) == {"InputLayer": 1, "Conv2D": 4, "BatchNormalization": 2, "ReLU": 2}
    assert convs(fused) == [("Conv2D", 1, 16, (1, 1)), ("Conv2D", 1, n * width, (1, 1)),
                            ("Conv2D", n, n * width, (3, 3)), ("Conv2D", 1, 16, (1, 1))]
    names = [layer.name for layer in fused.layers]
    assert names == ["image", "stem", "reduce_0_wide", "reduce_bn_0_wide", "reduce_relu_0_wide",
                     f"conv3_0_group{n}", f"conv3_bn_0_group{n}", f"conv3_relu_0_group{n}", "head"]
    assert sorted(rewrite.nodes) == sorted([f"{kind}_{i}" for i in range(n) for kind in
                                            ("reduce", "reduce_bn", "reduce_relu", "conv3", "conv3_bn",
                                             "conv3_relu")] + ["join"])


def test_wide_conv_weights_are_the_branch_kernels_stacked(tmp_path):
    path = save(resnext_block(4, 4), tmp_path / "block.keras")
    _, fused = fused_file(path, tmp_path)
    original = keras.models.load_model(path)
    wide = fused.get_layer("reduce_0_wide").get_weights()
    grouped = fused.get_layer("conv3_0_group4").get_weights()
    for i in range(4):
        kernel, bias = original.get_layer(f"reduce_{i}").get_weights()
        np.testing.assert_array_equal(wide[0][..., 4 * i:4 * i + 4], kernel)
        np.testing.assert_array_equal(wide[1][4 * i:4 * i + 4], bias)
        kernel, bias = original.get_layer(f"conv3_{i}").get_weights()
        assert grouped[0].shape == (3, 3, 4, 16)  # [kH, kW, I/g, O]
        np.testing.assert_array_equal(grouped[0][..., 4 * i:4 * i + 4], kernel)
        for a, b in zip(fused.get_layer("conv3_bn_0_group4").get_weights(),
                        original.get_layer(f"conv3_bn_{i}").get_weights()):
            np.testing.assert_array_equal(a[4 * i:4 * i + 4], b)


def test_resnext_depth_three_mixed_bias(tmp_path):
    inp = keras.Input((6, 6, 12))
    ends = []
    for i in range(3):
        y = L.ReLU()(L.Conv2D(4, 1, use_bias=i != 1)(inp))
        y = L.ReLU()(L.BatchNormalization()(L.Conv2D(4, 3, padding="same")(y)))
        ends.append(L.PReLU()(L.Conv2D(6, 1)(y)))
    path = save(keras.Model(inp, L.Concatenate()(ends)), tmp_path / "deep.keras")
    report, fused = fused_file(path, tmp_path, spatial=(6, 6))
    assert report.rewrites[0].channels == {"in": 12, "out": 18}
    assert [(c[1], c[2]) for c in convs(fused)] == [(1, 12), (3, 12), (3, 18)]
    assert classes(fused) == {"InputLayer": 1, "Conv2D": 3, "ReLU": 2, "BatchNormalization": 1, "PReLU": 1}
    assert fused.layers[1].use_bias  # one branch without bias: zeros in its part of the stacked bias
    np.testing.assert_array_equal(fused.layers[1].get_weights()[1][4:8], np.zeros(4))


def test_conv1d_resnext_block(tmp_path):
    inp = keras.Input((10, 8))
    ends = [L.ReLU()(L.Conv1D(2, 3, padding="same")(L.ReLU()(L.BatchNormalization()(L.Conv1D(2, 1)(inp)))))
            for _ in range(4)]
    path = save(keras.Model(inp, L.Concatenate()(ends)), tmp_path / "conv1d.keras")
    report, fused = fused_file(path, tmp_path, spatial=(10,))
    assert (report.rewrites[0].groups, report.rewrites[0].channels) == (4, {"in": 8, "out": 8})
    assert convs(fused) == [("Conv1D", 1, 8, (1,)), ("Conv1D", 4, 8, (3,))]


def test_shared_input_single_layer_is_one_wide_conv(tmp_path):
    # Inception's parallel 1×1s of equal kernels: one wide conv, groups 1.
    inp = keras.Input((8, 8, 8))
    path = save(keras.Model(inp, L.Concatenate()([L.ReLU()(L.Conv2D(3, 1)(inp)) for _ in range(4)])),
                tmp_path / "wide.keras")
    report, fused = fused_file(path, tmp_path)
    assert (report.rewrites[0].kind, report.rewrites[0].groups) == ("keras-fuse-parallel-branches", 1)
    assert convs(fused) == [("Conv2D", 1, 12, (1, 1))]
    assert classes(fused) == {"InputLayer": 1, "Conv2D": 1, "ReLU": 1}


def test_shared_input_made_by_a_slice(tmp_path):
    # The tensor every branch reads whole is itself a slice: it stays, the branches fuse.
    inp = keras.Input((8, 8, 12))
    x = inp[..., 0:8]
    ends = [L.Conv2D(4, 3, padding="same")(L.ReLU()(L.Conv2D(4, 1)(x))) for _ in range(2)]
    path = save(keras.Model(inp, L.Concatenate()(ends)), tmp_path / "sliced_source.keras")
    _, fused = fused_file(path, tmp_path)
    assert [c[:3] for c in convs(fused)] == [("Conv2D", 1, 8), ("Conv2D", 2, 8)]
    assert classes(fused)["GetItem"] == 1


def test_resnext_via_cli(tmp_path):
    path = save(resnext_block(4, 4), tmp_path / "block.keras")
    out = tmp_path / "cli.keras"
    result = CliRunner().invoke(main, [str(path), "-o", str(out)], catch_exceptions=True)
    assert result.exit_code == 0, result.output
    assert "conv3_0_group4: keras-fuse-parallel-branches" in result.output
    assert "verification: passed" in result.output
    assert [c[1] for c in convs(keras.models.load_model(out, safe_mode=True))] == [1, 1, 4, 1]


# -- chains after slices -----------------------------------------------------------------------


def test_sliced_chain_of_two_grouped_layers(tmp_path):
    path = save(sliced_chain(), tmp_path / "chain.keras")
    report, fused = fused_file(path, tmp_path)
    (rewrite,) = report.rewrites
    assert (rewrite.kind, rewrite.groups, rewrite.channels) == ("keras-fuse-grouped-conv", 4, {"in": 16, "out": 32})
    assert convs(fused) == [("Conv2D", 4, 16, (3, 3)), ("Conv2D", 4, 32, (1, 1))]
    assert classes(fused) == {"InputLayer": 1, "Conv2D": 2, "ReLU": 1, "BatchNormalization": 1}
    assert [layer.name for layer in fused.layers] == ["image", "a_0_group4", "a_relu_0_group4", "b_0_group4",
                                                      "b_bn_0_group4"]


def test_sliced_chain_second_layer_grouped_within_its_branch(tmp_path):
    # Nested groups multiply: 4 branches of a groups=2 conv are one groups=8 conv.
    steps = lambda i: [L.Conv2D(4, 3, padding="same"), L.ReLU(), L.Conv2D(4, 3, padding="same", groups=2)]
    path = save(sliced_chain(steps=steps), tmp_path / "nested.keras")
    _, fused = fused_file(path, tmp_path)
    assert [c[:3] for c in convs(fused)] == [("Conv2D", 4, 16), ("Conv2D", 8, 16)]


def test_tf_keras_h5_resnext_block(tmp_path):
    T = tf_keras.layers
    inp = tf_keras.Input((8, 8, 8))
    ends = []
    for _i in range(4):
        y = T.Activation("relu")(T.BatchNormalization()(T.Conv2D(2, 1)(inp)))
        ends.append(T.ReLU()(T.Conv2D(2, 3, padding="same")(y)))
    model = tf_keras.Model(inp, T.Concatenate()(ends))
    randomise_bn(model)
    path = tmp_path / "legacy.h5"
    model.save(path)
    out = tmp_path / "legacy.fused.keras"
    report = fuse(path, output=out).report
    assert [(r.kind, r.groups) for r in report.rewrites] == [("keras-fuse-parallel-branches", 4)]
    assert report.skipped == [] and report.verification.passed
    fused = keras.models.load_model(out, safe_mode=True)
    assert [c[:3] for c in convs(fused)] == [("Conv2D", 1, 8), ("Conv2D", 4, 8)]
    x = np.random.default_rng(3).standard_normal((2, 8, 8, 8)).astype("float32")
    np.testing.assert_allclose(run(fused, x)[0], np.asarray(model(x, training=False)), atol=1e-4, rtol=1e-4)


# -- near misses: fused as far as the branches agree, or left, always with the reason -----------


def test_second_layer_different_kernel(tmp_path):
    # ResNeXt-like, but the last branch's 3×3 is a 5×5: one wide 1×1 (+ BN, ReLU), then per branch.
    second = lambda i: L.Conv2D(4, 5 if i == 3 else 3, padding="same", name=f"conv3_{i}")
    path = save(resnext_block(4, 4, second=second), tmp_path / "kernel.keras")
    report, fused = fused_file(path, tmp_path, skipped=1)
    assert (report.rewrites[0].groups, report.rewrites[0].location) == (1, "reduce_0_wide")
    assert report.skipped[0].location == "join"
    assert report.skipped[0].reason == ("fused up to the convolution after (different kernel shapes between "
                                        "branches: (3,3,4) vs (5,5,4)); the rest stays per branch")
    counts = classes(fused)
    assert counts["GetItem"] == 4 and counts["Concatenate"] == 1 and counts["Conv2D"] == 1 + 1 + 4 + 1
    assert counts["BatchNormalization"] == 1 + 4 and counts["ReLU"] == 1 + 4


def test_second_layer_different_stride(tmp_path):
    # 3×3 valid on 3×3 gives 1×1 at stride 1 and 2 alike: the Concatenate is valid, the group is not.
    steps = lambda i: [L.Conv2D(4, 1, name=f"a_{i}"), L.ReLU(name=f"a_relu_{i}"),
                       L.Conv2D(4, 3, strides=2 if i == 1 else 1, name=f"b_{i}")]
    path = save(sliced_chain(steps=steps, spatial=(3, 3)), tmp_path / "strides.keras")
    report, fused = fused_file(path, tmp_path, skipped=1, spatial=(3, 3))
    assert (report.rewrites[0].groups, report.rewrites[0].location) == (4, "a_0_group4")
    assert report.skipped[0].reason == ("fused up to the convolution after (different strides between branches: "
                                        "(1,1) vs (2,2)); the rest stays per branch")
    assert [c[:3] for c in convs(fused)] == [("Conv2D", 4, 16)] + [("Conv2D", 1, 4)] * 4


def test_inception_resnet_like_branches_of_different_depths(tmp_path):
    # InceptionResNetV2's block35: three 1×1 → BN → ReLU read x; two branches go on with 3×3s.
    def conv_bn(y, filters, k):
        y = L.Conv2D(filters, k, padding="same", use_bias=False)(y)
        return L.Activation("relu")(L.BatchNormalization(scale=False)(y))

    inp = keras.Input((8, 8, 8))
    ends = [conv_bn(inp, 4, 1), conv_bn(conv_bn(inp, 4, 1), 4, 3), conv_bn(conv_bn(conv_bn(inp, 4, 1), 6, 3), 8, 3)]
    path = save(keras.Model(inp, L.Concatenate()(ends)), tmp_path / "block35.keras")
    report, fused = fused_file(path, tmp_path, skipped=1)
    assert report.skipped[0].reason == "fused up to the end of the shortest branch; the rest stays per branch"
    assert sorted(c[:3] for c in convs(fused)) == [("Conv2D", 1, 4), ("Conv2D", 1, 6), ("Conv2D", 1, 8),
                                                   ("Conv2D", 1, 12)]
    assert classes(fused)["GetItem"] == 3 and classes(fused)["Concatenate"] == 1


def test_branches_differ_in_the_tail_between_the_convs(tmp_path):
    steps = lambda i: [L.Conv2D(4, 1), L.ELU() if i == 2 else L.ReLU(), L.Conv2D(4, 3, padding="same")]
    path = save(sliced_chain(steps=steps), tmp_path / "tails.keras")
    report, fused = fused_file(path, tmp_path, skipped=1)
    assert report.skipped[0].reason == ("fused up to where the branches differ (ELU vs ReLU); "
                                        "the rest stays per branch")
    assert classes(fused)["Conv2D"] == 1 + 4


@pytest.mark.parametrize("where", [0, 1, 2])  # the 1×1's output, its ReLU's, the second conv's
def test_sliced_branch_value_used_elsewhere(tmp_path, where):
    steps = lambda i: [L.Conv2D(4, 1, name=f"a_{i}"), L.ReLU(name=f"a_relu_{i}"),
                       L.Conv2D(4, 3, padding="same", name=f"b_{i}")]
    path = save(sliced_chain(steps=steps, extra=lambda seen: [seen[3 + where]]), tmp_path / "used.keras")
    report, fused = fused_file(path, tmp_path, rewrites=0, skipped=1)
    reason = report.skipped[0].reason
    name = ["a_1", "a_relu_1", "b_1"][where]
    assert f"the output of {name}" in reason and "used outside the pattern" in reason, reason
    assert classes(fused)["Conv2D"] == 8  # left as it was


@pytest.mark.parametrize("name", ["reduce_2", "reduce_bn_2", "reduce_relu_2"])
def test_shared_branch_value_used_elsewhere(tmp_path, name):
    block = resnext_block(4, 4)
    model = keras.Model(block.inputs[0], [block.outputs[0], block.get_layer(name).output])
    path = save(model, tmp_path / "used.keras")
    report, fused = fused_file(path, tmp_path, rewrites=0, skipped=1)
    assert report.skipped[0].reason == f"the output of {name}, inside a branch, is used outside the pattern"
    assert classes(fused)["Conv2D"] == 2 + 8


def test_slice_read_elsewhere_too(tmp_path):
    inp = keras.Input((8, 8, 16))
    parts = [inp[..., 4 * i:4 * i + 4] for i in range(4)]
    ends = [L.Conv2D(4, 3, padding="same")(L.ReLU()(L.Conv2D(4, 1)(p))) for p in parts]
    path = save(keras.Model(inp, [L.Concatenate()(ends), parts[1]]), tmp_path / "slice_used.keras")
    report, _ = fused_file(path, tmp_path, rewrites=0, skipped=1)
    assert "is used elsewhere too" in report.skipped[0].reason


def test_branch_applies_a_layer_before_its_convolution(tmp_path):
    path = save(sliced_chain(pre=lambda i: L.ReLU(name=f"pre_{i}")), tmp_path / "pre.keras")
    report, _ = fused_file(path, tmp_path, rewrites=0, skipped=1)
    assert report.skipped[0].reason == "a branch applies pre_0 (ReLU) before its convolution"


def test_inception_like_different_kernels(tmp_path):
    inp = keras.Input((8, 8, 8))
    ends = [L.Conv2D(4, k, padding="same")(inp) for k in (1, 3, 5)]
    path = save(keras.Model(inp, L.Concatenate()(ends)), tmp_path / "inception.keras")
    report, _ = fused_file(path, tmp_path, rewrites=0, skipped=1)
    assert report.skipped[0].reason.startswith("different kernel shapes between branches: (1,1,8) vs (3,3,8)")


def test_branches_of_different_tensors_are_no_candidate(tmp_path):
    # A U-Net-style join of two unrelated convolutions: nothing to fuse, nothing to report.
    a, b = keras.Input((8, 8, 8), name="a"), keras.Input((8, 8, 8), name="b")
    joined = L.Concatenate()([L.Conv2D(4, 3, padding="same")(L.ReLU()(a)), L.Conv2D(4, 3, padding="same")(b)])
    path = save(keras.Model([a, b], joined), tmp_path / "unet.keras")
    report = fuse(path, output=tmp_path / "out.keras").report
    assert (report.rewrites, report.skipped) == ([], [])


def test_same_tensor_different_tails_before_the_convs(tmp_path):
    inp = keras.Input((8, 8, 8))
    joined = L.Concatenate()([L.Conv2D(4, 3, padding="same", name=f"c{i}")(layer(inp))
                              for i, layer in enumerate([L.ReLU(name="pre"), L.Activation("sigmoid")])])
    path = save(keras.Model(inp, joined), tmp_path / "pre.keras")
    report, _ = fused_file(path, tmp_path, rewrites=0, skipped=1)
    assert report.skipped[0].reason == "a branch applies pre (ReLU) before its convolution"


# -- --target: every grouped layer of a chain is judged ------------------------------------------


def test_target_judges_the_chain(tmp_path):
    path = save(resnext_block(4, 4), tmp_path / "block.keras")
    kept = fuse(path, output=tmp_path / "edgetpu.keras", target="edgetpu").report
    assert kept.rewrites == [] and kept.verification.passed
    (node,) = [n for n in kept.target["nodes"] if n["location"] == "join"]
    assert (node["action"], node["form"]) == ("keep", "split")
    assert [s.location for s in kept.skipped] == ["join"]
    fused = fuse(path, output=tmp_path / "cpu.keras", target="onnxruntime-cpu").report
    assert [(r.kind, r.location) for r in fused.rewrites] == [("keras-fuse-parallel-branches", "conv3_0_group4")]
    (node,) = [n for n in fused.target["nodes"] if n["location"] == "conv3_0_group4"]
    assert (node["action"], node["form"]) == ("fuse", "native")
