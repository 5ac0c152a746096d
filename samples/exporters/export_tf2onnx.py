"""Write ONNX fixtures with tf2onnx from Keras 3 NHWC models (hand-made grouped convs), for the tests.

Needs tensorflow 2.21, keras 3.15, tf2onnx 1.17, onnx, onnxruntime (the /work/venv-tf venv):

    TF_CPP_MIN_LOG_LEVEL=2 /work/venv-tf/bin/python samples/exporters/export_tf2onnx.py
    TF_CPP_MIN_LOG_LEVEL=2 /work/venv-tf/bin/python samples/exporters/export_tf2onnx.py --resnext /tmp/resnext_tf

Conversion is `tf2onnx.convert.from_keras(model, opset=...)`, which works with Keras 3.15 (it
traces the model into a tf.function and freezes it). tf2onnx converts with continue_on_error, so
every file is checked: no op outside the default domain, and onnxruntime must reproduce the Keras
output within 1e-4.

Each fixture NAME.onnx gets NAME.npz beside it (x: the fixed NHWC input, y: the Keras output) and
tests/fixtures/tf2onnx/README.md says what each file is and what tf2onnx wrote.

--resnext DIR writes resnext50_lambda_tf2onnx.onnx (+ .npz): a ResNeXt-50 32x4d-shaped Keras
model whose grouped 3x3 is written the legacy way (32 Lambda slices + 32 Conv2D + Concatenate),
converted by tf2onnx. Too big (~100 MB) for fixtures.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras
import numpy as np
import onnx
import onnxruntime as ort
import tensorflow as tf
import tf2onnx

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
sys.path.insert(0, str(HERE))
from describe import describe, op_counts

tf.get_logger().setLevel("ERROR")

MAX_BYTES = 200 * 1024
TOL = 1e-4
L = keras.layers


def _bn():
    """BatchNormalization with non-trivial statistics, so it is not an identity."""
    return L.BatchNormalization(
        beta_initializer=keras.initializers.RandomNormal(stddev=0.3),
        gamma_initializer=keras.initializers.RandomUniform(0.5, 1.5),
        moving_mean_initializer=keras.initializers.RandomNormal(stddev=0.2),
        moving_variance_initializer=keras.initializers.RandomUniform(0.5, 2.0),
    )


def _conv(filters, k, **kw):
    # a random bias: Keras' zero bias would be dropped by tf2onnx (Conv with 2 inputs)
    return L.Conv2D(filters, k, padding="same", bias_initializer=keras.initializers.RandomNormal(stddev=0.1), **kw)


def keras_slice_conv():
    """a. x[..., 4i:4i+4] (GetItem) -> Conv2D(8, 3, same) each -> Concatenate(-1)."""
    x = keras.Input((8, 8, 16), name="x")
    outs = [_conv(8, 3)(x[..., i * 4:(i + 1) * 4]) for i in range(4)]
    return keras.Model(x, L.Concatenate(axis=-1)(outs), name="keras_slice_conv")


def keras_split_conv():
    """b. keras.ops.split(x, 4, axis=-1) -> Conv2D each -> Concatenate(-1)."""
    x = keras.Input((8, 8, 16), name="x")
    outs = [_conv(8, 3)(p) for p in keras.ops.split(x, 4, axis=-1)]
    return keras.Model(x, L.Concatenate(axis=-1)(outs), name="keras_split_conv")


def keras_slice_bn_relu(use_bias=True):
    """c. x[..., 4i:4i+4] -> Conv2D -> BatchNormalization -> ReLU each -> Concatenate(-1)."""
    x = keras.Input((8, 8, 16), name="x")
    conv = (lambda: _conv(8, 3)) if use_bias else (lambda: L.Conv2D(8, 3, padding="same", use_bias=False))
    outs = [L.ReLU()(_bn()(conv()(x[..., i * 4:(i + 1) * 4]))) for i in range(4)]
    return keras.Model(x, L.Concatenate(axis=-1)(outs), name="keras_slice_bn_relu")


def _lambda_slice(c, w):
    # the index is bound by a default argument: a closure over the loop variable would be
    # late-bound and every Lambda would slice the last group
    return L.Lambda(lambda z, c=c, w=w: z[..., c * w:(c + 1) * w])


def _lambda_grouped_conv(x, width, groups, stride=1):
    w = width // groups
    outs = [_conv(w, 3, strides=stride)(_lambda_slice(c, w)(x)) for c in range(groups)]
    return L.Concatenate(axis=-1)(outs)


def keras_lambda_resnext():
    """d. legacy Lambda-style ResNeXt block: 1x1 -> BN -> ReLU -> [4 x Lambda slice -> 3x3] -> concat
    -> BN -> ReLU -> 1x1 -> BN -> add(x) -> ReLU. 32 channels in and out, width 16, 4 groups."""
    x = keras.Input((8, 8, 32), name="x")
    y = L.ReLU()(_bn()(_conv(16, 1)(x)))
    y = _lambda_grouped_conv(y, 16, 4)
    y = L.ReLU()(_bn()(y))
    y = _bn()(_conv(32, 1)(y))
    y = L.ReLU()(L.Add()([y, x]))
    return keras.Model(x, y, name="keras_lambda_resnext")


# name -> (builder, from_keras options, description)
FIXTURES = [
    ("keras_slice_conv", keras_slice_conv, dict(opset=17),
     "x[..., 4i:4i+4] (GetItem) -> Conv2D(8,3,same) x4 -> Concatenate(-1)"),
    ("keras_slice_conv_nchw", keras_slice_conv, dict(opset=17, inputs_as_nchw=["x"]),
     "same model, converted with inputs_as_nchw=['x'] (ONNX input is NCHW)"),
    ("keras_slice_conv_opset9", keras_slice_conv, dict(opset=9),
     "same model at opset 9 (Slice bounds as attributes)"),
    ("keras_split_conv", keras_split_conv, dict(opset=17),
     "keras.ops.split(x, 4, -1) -> Conv2D(8,3,same) x4 -> Concatenate(-1)"),
    ("keras_slice_bn_relu", keras_slice_bn_relu, dict(opset=17),
     "x[..., 4i:4i+4] -> Conv2D -> BatchNormalization -> ReLU x4 -> Concatenate(-1)"),
    ("keras_slice_bn_relu_nobias", lambda: keras_slice_bn_relu(use_bias=False), dict(opset=17),
     "same model with Conv2D(use_bias=False): tf2onnx folds BN into the Conv"),
    ("keras_slice_bn_relu_noopt", keras_slice_bn_relu, dict(opset=17, optimizers={}),
     "same model converted with optimizers={} (tf2onnx's graph optimizers off)"),
    ("keras_lambda_resnext", keras_lambda_resnext, dict(opset=17),
     "Lambda-style ResNeXt block: 1x1-BN-ReLU -> 4 x (Lambda slice -> Conv2D 3x3) -> concat -> BN-ReLU "
     "-> 1x1-BN -> add -> ReLU"),
]


def convert(model: keras.Model, opts: dict) -> onnx.ModelProto:
    proto, _ = tf2onnx.convert.from_keras(model, **opts)
    bad = sorted({n.op_type for n in proto.graph.node if n.domain not in ("", "ai.onnx")}
                 | {n.op_type for n in proto.graph.node if n.op_type in ("StatefulPartitionedCall",
                                                                         "PartitionedCall")})
    if bad:  # tf2onnx reports success even when it could not convert an op
        raise RuntimeError(f"tf2onnx left unconverted ops: {bad}")
    return proto


def verify(path: Path, x: np.ndarray, y: np.ndarray, tol: float = TOL) -> float:
    onnx.checker.check_model(str(path), full_check=True)
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    got = sess.run(None, {sess.get_inputs()[0].name: x})[0]
    if got.shape != y.shape:
        raise AssertionError(f"{path.name}: shape {got.shape} != {y.shape}")
    err = float(np.max(np.abs(got - y)))
    if err > tol:
        raise AssertionError(f"{path.name}: onnxruntime differs from Keras by {err:g}")
    return err


def build_fixtures(out: Path) -> list[dict]:
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    for name, builder, opts, what in FIXTURES:
        keras.backend.clear_session()  # layer names (hence ONNX names) independent of build order
        keras.utils.set_random_seed(0)
        model = builder()
        x = np.random.default_rng(1).standard_normal((1,) + tuple(model.input.shape[1:])).astype(np.float32)
        y = keras.ops.convert_to_numpy(model(x, training=False))
        row = dict(name=name, what=what, opts=opts)
        try:
            proto = convert(model, opts)
        except Exception as e:
            row["failed"] = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
            print(f"FAILED {name}: {row['failed']}")
            rows.append(row)
            continue
        path = out / f"{name}.onnx"
        onnx.save(proto, str(path))
        x_onnx = np.ascontiguousarray(x.transpose(0, 3, 1, 2)) if opts.get("inputs_as_nchw") else x
        np.savez(out / f"{name}.npz", x=x_onnx, y=y)
        size = path.stat().st_size
        if size > MAX_BYTES:
            raise AssertionError(f"{name}: {size} bytes, over {MAX_BYTES}")
        err = verify(path, x_onnx, y)
        row.update(size=size, err=err, pattern=describe(proto), nodes=op_counts(proto))
        print(f"{path.relative_to(REPO) if path.is_relative_to(REPO) else path}  {size:>7} B  "
              f"max|ort-keras|={err:.2e}\n    {row['pattern']}\n    nodes: {row['nodes']}")
        rows.append(row)
    return rows


def write_readme(out: Path, rows: list[dict]) -> None:
    lines = _readme_header()
    for r in rows:
        lines += _readme_section(r)
    (out / "README.md").write_text("\n".join(lines))


def _readme_header() -> list[str]:
    """The README's fixed part: how to rebuild, the versions, and what tf2onnx writes."""
    return [
        "# tf2onnx-converted Keras fixtures",
        "",
        "Written by tf2onnx from Keras 3 functional NHWC models; do not edit by hand. Rebuild (from",
        "the repo root):",
        "",
        "```",
        "TF_CPP_MIN_LOG_LEVEL=2 /work/venv-tf/bin/python samples/exporters/export_tf2onnx.py",
        "```",
        "",
        f"tensorflow {tf.__version__}, keras {keras.__version__}, tf2onnx {tf2onnx.__version__}, "
        f"onnx {onnx.__version__}, onnxruntime {ort.__version__}.",
        "Converted with `tf2onnx.convert.from_keras(model, **options)` (works with Keras 3.15).",
        "Models are seeded (`keras.utils.set_random_seed(0)`), Conv2D biases and BatchNormalization",
        "statistics are random (tf2onnx drops an all-zero bias). The ONNX input is `x` with a",
        "dynamic batch dim named by tf2onnx (`unk__N`); the output keeps the Keras layer name.",
        "Each `NAME.npz` holds `x` (the fixed input, batch 1, in the ONNX input's layout: NHWC, or",
        "NCHW for `*_nchw`) and `y` (the Keras output, NHWC);",
        f"onnxruntime reproduces `y` within {TOL:g} (checked when written). The pattern lines are",
        "produced by `samples/exporters/describe.py` from the files themselves.",
        "tf2onnx is not byte-for-byte reproducible: the numbers in generated names (`const_starts__N`,",
        "`unk__N`, `BiasAdd__N`) can change from one rebuild to the next; the op graph, weights",
        "and outputs do not.",
        "",
        "What tf2onnx 1.17 writes (seen in these files and in the --resnext model):",
        "",
        "- Slicing the NHWC graph input: the slice stays NHWC (`Slice` with constant bounds on",
        "  axis 3, or `Split(axis=-1)` with no sizes), and each branch gets its own",
        "  `Transpose(perm=0,3,1,2)` between the slice and its NCHW `Conv`. The transpose optimizer",
        "  does not move these Transposes up through the Slices/Split to the input. The branch ends",
        "  stay NCHW and meet in `Concat(axis=1)`; one `Transpose(perm=0,2,3,1)` after the Concat",
        "  gives back NHWC (when the Concat feeds the output).",
        "- Slicing an inner tensor (`keras_lambda_resnext`, and every block of the --resnext",
        "  model): that tensor is already NCHW after the transpose optimizer, so each branch is",
        "  `Slice(axes=[1], constant bounds) -> Conv`, no Transpose in the branch; the model has one",
        "  Transpose at the input (and one at the output if it ends NHWC).",
        "- `inputs_as_nchw=['x']`: `Slice(axes=[1])` straight from the NCHW input, no per-branch",
        "  Transpose.",
        "- opset 9: `Slice` with `starts`/`ends`/`axes` attributes.",
        "- BatchNormalization depends on the Conv2D bias *values*: after a Conv2D with a non-zero",
        "  bias it is `Conv(bias) -> Mul(const 1xCx1x1) -> Add(const 1xCx1x1)`; after a Conv2D with",
        "  `use_bias=False` (or an all-zero bias) it is folded into the Conv's weights and bias.",
        "  After a Concatenate it is `Mul -> Add` on the concat output.",
        "- `optimizers={}` (tf2onnx's optimizers off) keeps the raw form: `Slice(axis 3) ->",
        "  Transpose(0,3,1,2) -> Conv -> Transpose(0,2,3,1) -> Mul -> Add -> Relu` per branch, NHWC",
        "  `Concat(axis=3)`, then Identity nodes.",
        "",
    ]


def _readme_section(r: dict) -> list[str]:
    """One fixture's section: what it is, how it was converted, and what the file holds (or why
    the conversion failed)."""
    lines = [f"## {r['name']}.onnx", "", f"- model: {r['what']}",
             f"- converter: tf2onnx.convert.from_keras, options: `{_opts_str(r['opts'])}`"]
    if "failed" in r:
        lines.append(f"- **conversion failed**: {r['failed']}")
    else:
        lines.append(f"- pattern: {r['pattern']}")
        lines.append(f"- nodes: {r['nodes']}")
        lines.append(f"- size: {r['size']} bytes; max |onnxruntime - keras| = {r['err']:.1e}")
    lines.append("")
    return lines


def _opts_str(opts: dict) -> str:
    return ", ".join(f"{k}={v!r}" for k, v in opts.items())


# --------------------------------------------------------------------------------------------
# ResNeXt-50 32x4d-shaped, legacy Lambda style
# --------------------------------------------------------------------------------------------


def resnext50_lambda(groups=32, base_width=4, layers=(3, 4, 6, 3), num_classes=1000):
    x = inp = keras.Input((224, 224, 3), name="x")
    x = L.ReLU()(_bn()(L.Conv2D(64, 7, strides=2, padding="same", use_bias=False)(x)))
    x = L.MaxPooling2D(3, strides=2, padding="same")(x)
    inplanes = 64
    for i, (planes, n) in enumerate(zip((64, 128, 256, 512), layers)):
        for b in range(n):
            stride = 1 if i == 0 or b > 0 else 2
            width = int(planes * base_width / 64) * groups
            shortcut = x
            if stride != 1 or inplanes != planes * 4:
                shortcut = _bn()(L.Conv2D(planes * 4, 1, strides=stride, use_bias=False)(x))
            y = L.ReLU()(_bn()(L.Conv2D(width, 1, use_bias=False)(x)))
            w = width // groups
            outs = [L.Conv2D(w, 3, strides=stride, padding="same", use_bias=False)(_lambda_slice(c, w)(y))
                    for c in range(groups)]
            y = L.ReLU()(_bn()(L.Concatenate(axis=-1)(outs)))
            y = _bn()(L.Conv2D(planes * 4, 1, use_bias=False)(y))
            x = L.ReLU()(L.Add()([y, shortcut]))
            inplanes = planes * 4
    x = L.GlobalAveragePooling2D()(x)
    return keras.Model(inp, L.Dense(num_classes)(x), name="resnext50_lambda")


def build_resnext(out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    keras.backend.clear_session()
    keras.utils.set_random_seed(0)
    model = resnext50_lambda()
    x = np.random.default_rng(1).standard_normal((1, 224, 224, 3)).astype(np.float32)
    y = keras.ops.convert_to_numpy(model(x, training=False))
    proto = convert(model, dict(opset=17))
    path = out / "resnext50_lambda_tf2onnx.onnx"
    onnx.save(proto, str(path))
    np.savez(out / "resnext50_lambda_tf2onnx.npz", x=x, y=y)
    scale = float(np.abs(y).max())
    err = verify(path, x, y, tol=1e-3 * max(scale, 1.0))
    print(f"{path}  {path.stat().st_size / 1e6:.1f} MB  max|ort-keras|={err:.2e} (output scale {scale:.2e})\n"
          f"    {describe(proto)}\n    nodes: {op_counts(proto)}")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=REPO / "tests" / "fixtures" / "tf2onnx",
                    help="where the small fixtures go (default: tests/fixtures/tf2onnx)")
    ap.add_argument("--no-fixtures", action="store_true", help="skip the small fixtures")
    ap.add_argument("--resnext", type=Path, metavar="DIR", help="also convert the ResNeXt-50 Lambda model into DIR")
    args = ap.parse_args(argv)
    if not args.no_fixtures:
        write_readme(args.out, build_fixtures(args.out))
    if args.resnext:
        build_resnext(args.resnext)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
