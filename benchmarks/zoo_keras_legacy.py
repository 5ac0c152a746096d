"""Legacy Keras battery (issue #21): grouped convolutions written the way public repositories wrote them.

    python benchmarks/zoo.py --frameworks legacy              # only this part of the zoo battery
    python benchmarks/zoo_keras_legacy.py --out /tmp/zk       # alone: prints its table and JSON summary

The models are this project's own code in those repositories' idioms (not their text), small so the battery
stays fast, with random weights (seeded):

* ``resnext``: ResNeXt blocks whose grouped 3x3 is ``Lambda`` slices made in a loop, then ``Concatenate`` —
  late-bound (``lambda z: z[..., c*w:(c+1)*w]``: every Lambda reads the loop variable when it runs, so the
  saved file slices the last group in every branch), correctly bound (``lambda z, c=c: ...``), and as
  ``x[..., a:b]`` on the Keras tensor (tf-keras: a ``SlicingOpLambda``; Keras 3: a ``GetItem`` operation).
* ``seresnext``: SE-ResNeXt as in the classification-models packages: a ``GroupConv2D`` helper of ``Lambda``
  layers wrapping a named ``def`` (``slice_tensor`` with ``arguments=``), and squeeze-excite whose Lambda
  wraps another named ``def`` (``expand_dims``), which is in no group and stays in the written file.
* ``shufflenet_v1``: ShuffleNet v1, g=3: 1x1 group convs as Lambda slices in a loop over ``offset`` (late-bound,
  as in the Keras ports, and a bound twin), a channel-shuffle Lambda of ``K.reshape`` /
  ``K.permute_dimensions`` / ``K.int_shape``, depthwise 3x3, average-pool shortcut joined by ``Concatenate``;
  and with the shuffle as ``Reshape`` / ``Permute`` layers ("bound_layers"), as other ports write it.
* ``alexnet_cf``: AlexNet's two towers, ``channels_first``: ``splittensor`` Lambdas (a factory closing over
  ``id_split``) slicing axis 1, ``Concatenate(axis=1)``, and cross-channel LRN Lambdas
  (``K.square``, ``K.spatial_2d_padding``, ``K.permute_dimensions``), three grouped layers of 2; and without
  the LRN ("factory_nolrn"), so that the towers are tried apart from the Keras 2 backend calls.
* ``dpn``: DPN dual-path blocks whose grouped 3x3 is ``tf.split`` -> N Conv2D -> ``tf.concat`` (tf-keras
  ``TFOpLambda`` layers), the block output cut by Lambdas into a residual part (``Add``) and a dense part
  (``Concatenate``): slices read by no conv, which must stay.

Each model has two outputs: ``features`` (the global average pool before the classifier) and ``probs`` (the
softmax, which random weights saturate). Saved as ``.h5`` by tf-keras and, where the same code runs in
Keras 3 (no Keras 2 backend calls, no TF ops on Keras tensors), as ``.keras``. The reference is the model as
its author meant it, run in memory by the framework that built it: for a late-bound file that is its bound
twin (same weights), since the late-bound file itself computes something else (recorded as a sanity check).

Per file the CLI runs ``--check``, ``--fuse``, ``--to onnx`` and ``--to tflite``, all with
``--trust-lambdas`` (and ``--repair-late-binding`` where late-bound); each written file is run here (Keras 3
``load_model(safe_mode=False)`` for ``.keras`` — a user's load, under the input's trust —, onnxruntime,
the TFLite interpreter) and compared, output by output, with the reference.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import subprocess
import sys
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

HERE = Path(__file__).resolve()
REPO = HERE.parents[1]
SIZE = 32  # input height and width
ATOL, RTOL = 1e-4, 1e-3  # an output differs when max |got - want| > ATOL + RTOL * max |want|

# name: (expected groups after --fuse as {groups: count of Conv layers}, bindings built, depthwise convs
# {groups: count}, which ONNX writes as grouped Conv nodes too)
# binding "late" / "bound": Lambda slices made in a loop, late- or correctly bound; "getitem": x[..., a:b];
# "def": Lambdas wrapping named functions; "tf": tf.split / tf.concat; "factory": a closure per Lambda.
# "bound_layers": the channel shuffle as Reshape / Permute layers (no Lambda code); "factory_nolrn": AlexNet
# without its LRN Lambdas (both keep the grouped part apart from the Keras 2 backend calls).
MODELS = {
    "resnext": ({"8": 2}, ("late", "bound", "getitem"), {}),
    "seresnext": ({"8": 2}, ("def",), {}),
    "shufflenet_v1": ({"3": 6}, ("late", "bound", "bound_layers"), {"18": 3}),
    "alexnet_cf": ({"2": 3}, ("factory", "factory_nolrn"), {}),
    "dpn": ({"8": 2}, ("tf",), {}),
}
MODES = ("check", "fuse", "onnx", "tflite")


class Framework:
    """The names a model's code uses: ``layers``, ``K`` (the backend it calls), ``tf``, ``Input``, ``Model``."""

    def __init__(self, flavour: str):
        import tensorflow as tf

        self.flavour, self.tf = flavour, tf
        if flavour == "tfkeras":
            import tf_keras as keras
            from tf_keras import backend

            self.K = backend
        else:
            import keras

            self.K = keras.backend  # Keras 3: no reshape, permute_dimensions, int_shape... (code fails there)
        self.keras, self.layers, self.Input, self.Model = keras, keras.layers, keras.Input, keras.Model


# --------------------------------------------------------------------------------------------------------------
# The models, in the idioms of public repositories
# --------------------------------------------------------------------------------------------------------------

# Module-level names the Lambda code below reads when it runs (a loaded Lambda finds ``K`` in its globals).
K = None


def slice_tensor(x, start, stop, axis):
    """A named function wrapped by Lambda layers (``arguments=``): the channel range [start, stop) of x."""
    if axis == 3:
        return x[:, :, :, start:stop]
    return x[:, start:stop, :, :]


def expand_dims(x, channels_axis):
    """Squeeze-excite: (N, C) -> (N, 1, 1, C) (or (N, C, 1, 1)), a named function wrapped by a Lambda."""
    if channels_axis == 3:
        return x[:, None, None, :]
    return x[:, :, None, None]


def channel_shuffle(x, groups):
    """ShuffleNet's channel shuffle with the Keras 2 backend: reshape to groups, swap, flatten."""
    height, width, in_channels = K.int_shape(x)[1:]
    channels_per_group = in_channels // groups
    x = K.reshape(x, [-1, height, width, groups, channels_per_group])
    x = K.permute_dimensions(x, (0, 1, 2, 4, 3))
    return K.reshape(x, [-1, height, width, in_channels])


def _bn_relu(fw, x, axis=-1):
    return fw.layers.Activation("relu")(fw.layers.BatchNormalization(axis=axis)(x))


def _head(fw, inputs, x, name, data_format="channels_last"):
    features = fw.layers.GlobalAveragePooling2D(data_format=data_format, name="features")(x)
    probs = fw.layers.Dense(10, activation="softmax", name="probs")(features)
    return fw.Model(inputs, [features, probs], name=name)


def _lambda_groups(fw, x, width, cardinality, binding, conv):
    """Branches of a grouped conv: x's channel groups cut as ``binding`` says, each through ``conv()``."""
    branches = []
    for c in range(cardinality):
        if binding == "late":
            part = fw.layers.Lambda(lambda z: z[:, :, :, c * width:(c + 1) * width])(x)  # noqa: B023
        elif binding == "bound":
            part = fw.layers.Lambda(lambda z, c=c: z[:, :, :, c * width:(c + 1) * width])(x)
        else:  # getitem
            part = x[:, :, :, c * width:(c + 1) * width]
        branches.append(conv()(part))
    return fw.layers.concatenate(branches, axis=-1)


def resnext(fw, binding):
    """Two ResNeXt blocks (cardinality 8, width 8) with Lambda (or getitem) sliced grouped 3x3 convs."""
    inputs = fw.Input((SIZE, SIZE, 3))
    x = _bn_relu(fw, fw.layers.Conv2D(32, 3, padding="same", use_bias=False)(inputs))
    for out_channels, strides in ((128, 1), (128, 2)):
        shortcut = fw.layers.BatchNormalization()(fw.layers.Conv2D(out_channels, 1, strides=strides,
                                                                   use_bias=False)(x))
        y = _bn_relu(fw, fw.layers.Conv2D(64, 1, use_bias=False)(x))
        y = _lambda_groups(fw, y, 8, 8, binding,
                           lambda strides=strides: fw.layers.Conv2D(8, 3, strides=strides, padding="same",
                                                                    use_bias=False))
        y = _bn_relu(fw, y)
        y = fw.layers.BatchNormalization()(fw.layers.Conv2D(out_channels, 1, use_bias=False)(y))
        x = fw.layers.Activation("relu")(fw.layers.add([shortcut, y]))
    return _head(fw, inputs, x, f"resnext_{binding}")


def seresnext(fw, binding="def"):
    """SE-ResNeXt blocks: GroupConv2D of Lambda(slice_tensor, arguments=...), SE via Lambda(expand_dims)."""
    def group_conv(x, filters, groups, strides):
        in_width, out_width = int(x.shape[-1]) // groups, filters // groups
        blocks = []
        for c in range(groups):
            arguments = {"start": c * in_width, "stop": (c + 1) * in_width, "axis": 3}
            xc = fw.layers.Lambda(slice_tensor, arguments=arguments)(x)
            blocks.append(fw.layers.Conv2D(out_width, 3, strides=strides, padding="same", use_bias=False)(xc))
        return fw.layers.Concatenate(axis=3)(blocks)

    def squeeze_excite(x, reduction=4):
        channels = int(x.shape[-1])
        s = fw.layers.GlobalAveragePooling2D()(x)
        s = fw.layers.Lambda(expand_dims, arguments={"channels_axis": 3})(s)
        s = fw.layers.Conv2D(channels // reduction, 1, activation="relu")(s)
        s = fw.layers.Conv2D(channels, 1, activation="sigmoid")(s)
        return fw.layers.Multiply()([x, s])

    inputs = fw.Input((SIZE, SIZE, 3))
    x = _bn_relu(fw, fw.layers.Conv2D(32, 3, padding="same", use_bias=False)(inputs))
    for out_channels, strides in ((64, 1), (128, 2)):
        shortcut = fw.layers.BatchNormalization()(fw.layers.Conv2D(out_channels, 1, strides=strides,
                                                                   use_bias=False)(x))
        y = _bn_relu(fw, fw.layers.Conv2D(out_channels // 2, 1, use_bias=False)(x))
        y = _bn_relu(fw, group_conv(y, out_channels // 2, 8, strides))
        y = fw.layers.BatchNormalization()(fw.layers.Conv2D(out_channels, 1, use_bias=False)(y))
        y = squeeze_excite(y)
        x = fw.layers.Activation("relu")(fw.layers.add([shortcut, y]))
    return _head(fw, inputs, x, "seresnext")


def shufflenet_v1(fw, binding):
    """ShuffleNet v1 (g=3): Lambda-sliced 1x1 group convs (offset loop), channel-shuffle Lambda, depthwise 3x3."""
    groups = 3

    def group_conv(x, in_channels, out_channels):
        in_width = in_channels // groups
        group_list = []
        for i in range(groups):
            offset = i * in_width
            if binding == "late":
                group = fw.layers.Lambda(lambda z: z[:, :, :, offset:offset + in_width])(x)  # noqa: B023
            else:
                group = fw.layers.Lambda(lambda z, offset=offset: z[:, :, :, offset:offset + in_width])(x)
            group_list.append(fw.layers.Conv2D(out_channels // groups, 1, use_bias=False)(group))
        return fw.layers.Concatenate()(group_list)

    def unit(x, in_channels, out_channels, strides):
        bottleneck = out_channels // 4
        y = _bn_relu(fw, group_conv(x, in_channels, bottleneck))
        if binding.endswith("_layers"):  # the shuffle as layers, as other ports write it
            height, width = int(y.shape[1]), int(y.shape[2])
            y = fw.layers.Reshape((height, width, groups, bottleneck // groups))(y)
            y = fw.layers.Permute((1, 2, 4, 3))(y)
            y = fw.layers.Reshape((height, width, bottleneck))(y)
        else:
            y = fw.layers.Lambda(channel_shuffle, arguments={"groups": groups})(y)
        y = fw.layers.DepthwiseConv2D(3, strides=strides, padding="same", use_bias=False)(y)
        y = fw.layers.BatchNormalization()(y)
        if strides == 2:
            y = fw.layers.BatchNormalization()(group_conv(y, bottleneck, out_channels - in_channels))
            shortcut = fw.layers.AveragePooling2D(3, strides=2, padding="same")(x)
            return fw.layers.Activation("relu")(fw.layers.Concatenate()([shortcut, y]))
        y = fw.layers.BatchNormalization()(group_conv(y, bottleneck, out_channels))
        return fw.layers.Activation("relu")(fw.layers.add([x, y]))

    inputs = fw.Input((SIZE, SIZE, 3))
    x = _bn_relu(fw, fw.layers.Conv2D(24, 3, padding="same", use_bias=False)(inputs))
    x = unit(x, 24, 72, 2)
    x = unit(x, 72, 72, 1)
    x = unit(x, 72, 72, 1)
    return _head(fw, inputs, x, f"shufflenet_v1_{binding}")


def splittensor(fw, axis=1, ratio_split=1, id_split=0):
    """The two-tower slice: a Lambda closing over ``id_split`` (one closure per call, so bound)."""
    def f(X):
        div = X.shape[axis] // ratio_split
        if axis == 1:
            return X[:, id_split * div:(id_split + 1) * div, :, :]
        return X[:, :, :, id_split * div:(id_split + 1) * div]

    return fw.layers.Lambda(f)


def crosschannelnormalization(fw, alpha=1e-4, k=2, beta=0.75, n=5):
    """AlexNet's local response normalisation across channels (channels_first) with the Keras 2 backend."""
    def f(X):
        channels = X.shape[1]
        half = n // 2
        square = K.square(X)
        padded = K.spatial_2d_padding(K.permute_dimensions(square, (0, 2, 1, 3)), ((0, 0), (half, half)))
        padded = K.permute_dimensions(padded, (0, 2, 1, 3))
        scale = k
        for i in range(n):
            scale += alpha * padded[:, i:i + channels, :, :]
        return X / scale ** beta

    return fw.layers.Lambda(f)


def alexnet_cf(fw, binding="factory"):
    """AlexNet's two towers, channels_first: conv2, conv4 and conv5 as two towers joined on axis 1."""
    cf = "channels_first"

    def towers(x, filters, name):
        outs = [fw.layers.Conv2D(filters // 2, 3, padding="same", activation="relu", data_format=cf,
                                 name=f"{name}_{i + 1}")(splittensor(fw, ratio_split=2, id_split=i)(x))
                for i in range(2)]
        return fw.layers.Concatenate(axis=1, name=name)(outs)

    def lrn(x):
        return x if binding.endswith("_nolrn") else crosschannelnormalization(fw)(x)

    inputs = fw.Input((3, SIZE, SIZE))
    x = fw.layers.Conv2D(16, 5, strides=2, padding="same", activation="relu", data_format=cf, name="conv_1")(inputs)
    x = towers(lrn(x), 32, "conv_2")
    x = lrn(x)
    x = fw.layers.Conv2D(48, 3, padding="same", activation="relu", data_format=cf, name="conv_3")(x)
    x = towers(x, 48, "conv_4")
    x = towers(x, 32, "conv_5")
    return _head(fw, inputs, x, "alexnet_cf", data_format=cf)


def dpn(fw, binding="tf"):
    """DPN dual-path blocks: grouped 3x3 by tf.split / tf.concat, the output cut by Lambdas into residual
    (added) and dense (concatenated) parts."""
    tf = fw.tf

    def grouped_conv(x, filters, groups):
        parts = tf.split(x, groups, axis=-1)
        outs = [fw.layers.Conv2D(filters // groups, 3, padding="same", use_bias=False)(p) for p in parts]
        return tf.concat(outs, axis=-1)

    def block(residual, dense, res_channels, dense_channels):
        x = fw.layers.concatenate([residual, dense], axis=-1)
        y = _bn_relu(fw, fw.layers.Conv2D(64, 1, use_bias=False)(x))
        y = _bn_relu(fw, grouped_conv(y, 64, 8))
        y = fw.layers.Conv2D(res_channels + dense_channels, 1, use_bias=False)(y)
        res_part = fw.layers.Lambda(lambda z: z[:, :, :, :res_channels])(y)
        dense_part = fw.layers.Lambda(lambda z: z[:, :, :, res_channels:])(y)
        return fw.layers.add([residual, res_part]), fw.layers.concatenate([dense, dense_part], axis=-1)

    inputs = fw.Input((SIZE, SIZE, 3))
    x = _bn_relu(fw, fw.layers.Conv2D(64, 3, padding="same", use_bias=False)(inputs))
    residual, dense = x, fw.layers.Conv2D(16, 1, use_bias=False)(x)
    for _ in range(2):
        residual, dense = block(residual, dense, 64, 16)
    x = _bn_relu(fw, fw.layers.concatenate([residual, dense], axis=-1))
    return _head(fw, inputs, x, "dpn")


BUILDERS = {"resnext": resnext, "seresnext": seresnext, "shufflenet_v1": shufflenet_v1, "alexnet_cf": alexnet_cf,
            "dpn": dpn}


# --------------------------------------------------------------------------------------------------------------
# Export: each model as .h5 (tf-keras) and .keras (Keras 3, where its code runs), with its reference outputs
# --------------------------------------------------------------------------------------------------------------


def _input(name):
    import numpy as np

    shape = (1, 3, SIZE, SIZE) if name == "alexnet_cf" else (1, SIZE, SIZE, 3)
    return np.random.RandomState(0).standard_normal(shape).astype("float32")


def _build(fw, name, binding):
    """(model, reference model): a late-bound model's reference is its bound twin with the same weights."""
    global K
    K = fw.K  # the backend the Lambda code calls while the model is built and run here
    fw.keras.utils.set_random_seed(0)
    builder = BUILDERS[name]
    if binding != "late":
        model = builder(fw, binding)
        return model, model
    reference = builder(fw, "bound")
    model = builder(fw, "late")
    model.set_weights(reference.get_weights())
    return model, reference


def _first_line(exc: Exception) -> str:
    """The line of an exception's message that says what failed (Keras wraps it in "Exception encountered
    when calling ..." and colours it)."""
    import re

    lines = [re.sub(r"\x1b\[[0-9;]*m", "", line).strip() for line in str(exc).splitlines()]
    useful = [line for line in lines if line and not line.startswith("Exception encountered")]
    return (useful or [""])[0][:200]


def export_one(name, binding, flavour, folder: Path) -> dict:
    """Build, save and run one model; its manifest entry (``export_error`` where the code does not run)."""
    import numpy as np

    suffix = "h5" if flavour == "tfkeras" else "keras"
    path = folder / flavour / f"{name}.{binding}.{suffix}"
    expected = MODELS[name][0]
    entry = {"name": name, "binding": binding, "framework": flavour, "format": suffix, "path": str(path),
             "reference": str(path.with_suffix(".ref.npz")), "expected_groups": expected,
             "late_bound": binding == "late"}
    if binding.startswith(("def", "factory")) and flavour == "keras":
        # Keras 3 saves a Lambda's named function (a def, or a factory's inner ``f``) by name, not its code: the
        # file cannot be rebuilt without the module that defines it, and the tool must say so (exit 2, naming it)
        entry["expected_refusal"] = "refers to a Python function"
    # in ONNX a DepthwiseConv2D is a grouped Conv too
    entry["expected_onnx_groups"] = dict(collections.Counter(expected) + collections.Counter(MODELS[name][2]))
    start = time.perf_counter()
    try:
        fw = Framework(flavour)
        model, reference = _build(fw, name, binding)
        x = _input(name)
        wanted = [np.asarray(o) for o in reference(x, training=False)]
        if binding == "late":  # the file computes something else: how far from what its author meant
            got = [np.asarray(o) for o in model(x, training=False)]
            entry["late_vs_meant"] = float(np.max(np.abs(got[0] - wanted[0])))
        path.parent.mkdir(parents=True, exist_ok=True)
        model.save(str(path))
        np.savez(entry["reference"], x=x, **{f"out{i}": o for i, o in enumerate(wanted)})
        entry["layers"] = dict(collections.Counter(type(layer).__name__ for layer in model.layers))
    except Exception as exc:
        entry["export_error"] = f"{type(exc).__name__}: {_first_line(exc)}"
    entry["export_seconds"] = round(time.perf_counter() - start, 2)
    return entry


def export_all(folder: Path, only: list[str]) -> list[dict]:
    """Every (model, binding) for tf-keras, then Keras 3: one manifest entry each."""
    entries = []
    for flavour in ("tfkeras", "keras"):
        for name, (_, bindings, _) in MODELS.items():
            if only and not any(o.lower() in name.lower() for o in only):
                continue
            for binding in bindings:
                entries.append(export_one(name, binding, flavour, folder))
    return entries


# --------------------------------------------------------------------------------------------------------------
# The CLI, and running what it wrote
# --------------------------------------------------------------------------------------------------------------


def _cli_args(mode: str, late: bool, out_dir: Path | None) -> list[str]:
    args = ["--trust-lambdas"] + (["--repair-late-binding"] if late else [])
    if mode == "check":
        return args + ["--check"]
    args += ["--fuse", "-o", str(out_dir), "--force"]
    return args + (["--to", mode] if mode in ("onnx", "tflite") else [])


def run_cli(paths: list[str], mode: str, late: bool, out_dir: Path) -> dict[str, dict]:
    """One CLI process over ``paths`` (``--format json``); per file: exit, error, rewrites, output, seconds."""
    sys.path.insert(0, str(HERE.parent))
    import zoo

    out_dir.mkdir(parents=True, exist_ok=True)
    if len(paths) == 1:  # -o names a file for one model, a folder for several
        out_dir = out_dir / f"{Path(paths[0]).stem}.{'keras' if mode == 'fuse' else mode}"
    args = zoo.cli_executable() + paths + ["--format", "json"] + _cli_args(mode, late, out_dir)
    start = time.perf_counter()
    try:
        proc = subprocess.run(args, capture_output=True, text=True, timeout=zoo.CLI_TIMEOUT, cwd=REPO,
                              env={**os.environ, "PYTHONWARNINGS": "ignore"})
        doc = json.loads(proc.stdout)
        by_input = {m["input"]: m for m in doc["models"]}
    except (subprocess.TimeoutExpired, json.JSONDecodeError, KeyError, TypeError) as exc:
        tail = getattr(locals().get("proc"), "stderr", "") or ""
        lines = [line for line in tail.splitlines() if line.strip()]
        error = lines[-1][:300] if lines else f"{type(exc).__name__}"
        return {p: {"mode": mode, "exit": "timeout" if isinstance(exc, subprocess.TimeoutExpired) else "no JSON",
                    "crash": True, "error": error, "command": " ".join(args)} for p in paths}
    wall = round(time.perf_counter() - start, 2)
    results = {}
    for path in paths:
        model = by_input.get(path)
        if model is None:
            results[path] = {"mode": mode, "exit": "missing", "error": "not in the CLI's JSON document"}
            continue
        one = zoo._parse_model(model)
        one.update(mode=mode, process_seconds=wall, output=model.get("output") if one.get("written") else None,
                   command=" ".join(zoo.cli_executable() + [path] + _cli_args(mode, late, out_dir)))
        results[path] = one
    return results


def _run_written(path: str, x):
    """Outputs of a written file in its own runtime, as a user would run it; (outputs, note)."""
    import numpy as np

    if path.endswith(".onnx"):
        import onnxruntime as ort

        session = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
        return session.run(None, {session.get_inputs()[0].name: x}), ""
    if path.endswith(".tflite"):
        import tensorflow as tf

        interpreter = tf.lite.Interpreter(model_path=path)
        detail = interpreter.get_input_details()[0]
        if list(detail["shape"]) != list(x.shape):
            interpreter.resize_tensor_input(detail["index"], x.shape)
        interpreter.allocate_tensors()
        interpreter.set_tensor(detail["index"], x)
        interpreter.invoke()
        return [interpreter.get_tensor(d["index"]) for d in interpreter.get_output_details()], ""
    import keras

    try:
        model = keras.saving.load_model(path, compile=False, safe_mode=False)
        return [np.asarray(o) for o in model(x, training=False)], ""
    except Exception as exc:
        import tf_keras

        note = f"plain Keras 3 load/run fails ({type(exc).__name__}: {str(exc).splitlines()[0][:120]})"
        model = keras.saving.load_model(path, compile=False, safe_mode=False,
                                        custom_objects={"K": tf_keras.backend})
        return [np.asarray(o) for o in model(x, training=False)], note + "; runs with K=tf_keras.backend"


def compare_files(jobs: list[dict]) -> list[dict]:
    """For each {reference, path}: the max abs error of every reference output against the written file's
    output of the same shape (TFLite may list outputs in another order)."""
    import numpy as np

    results = []
    for job in jobs:
        ref = np.load(job["reference"])
        wanted = [ref[f"out{i}"] for i in range(len(ref.files) - 1)]
        try:
            got, note = _run_written(job["path"], ref["x"])
            got = [np.asarray(g) for g in got]
            errors, used = [], set()
            for want in wanted:
                match = next((i for i, g in enumerate(got) if i not in used and g.shape == want.shape), None)
                if match is None:
                    errors.append(None)
                    continue
                used.add(match)
                errors.append(float(np.max(np.abs(got[match].astype("float64") - want))))
            limits = [ATOL + RTOL * float(np.max(np.abs(w))) for w in wanted]
            results.append({"errors": errors, "passed": all(e is not None and e <= lim
                                                            for e, lim in zip(errors, limits)), "note": note})
        except Exception as exc:
            results.append({"error": f"{type(exc).__name__}: {str(exc).splitlines()[0][:200] if str(exc) else ''}"})
    return results


def _worker(function: str, payload: dict):
    """Run ``function`` of this module in a fresh interpreter (TF, Keras 3 and tf-keras apart from the caller;
    the compare worker is ``__main__``, so loaded Lambdas do not find this module's ``K``)."""
    code = ("import json, sys; sys.path.insert(0, sys.argv[1]); import zoo_keras_legacy as z; "
            "print('ZK ' + json.dumps(getattr(z, sys.argv[2])(**json.loads(sys.argv[3]))))")
    args = [sys.executable, "-c", code, str(HERE.parent), function, json.dumps(payload)]
    if function == "compare_files":
        args = [sys.executable, str(HERE), "_compare", json.dumps(payload)]
    proc = subprocess.run(args, capture_output=True, text=True, cwd=REPO)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("ZK ")]
    if not lines:
        raise RuntimeError(f"{function} worker died: {proc.stderr[-1500:]}")
    return json.loads(lines[-1][3:])


def _export_worker(folder: str, only: list[str]) -> list[dict]:
    return export_all(Path(folder), only)


# --------------------------------------------------------------------------------------------------------------
# The battery, judged and tabulated
# --------------------------------------------------------------------------------------------------------------


def _groups(path: str | None) -> dict | None:
    """{groups: count} of the grouped (groups > 1) convolutions of a written .keras or .onnx file."""
    sys.path.insert(0, str(HERE.parent))
    import zoo

    stats = zoo.file_stats(path) if path and path.endswith((".keras", ".onnx")) else None
    if not stats or "error" in stats:
        return None
    return {g: n for g, n in stats["groups"].items() if g != "1"}


def run_battery(entries: list[dict], work: Path) -> None:
    """Each mode once per (format, late-bound) batch of files; then every written file run and compared."""
    live = [e for e in entries if not e.get("export_error")]
    batches = collections.defaultdict(list)
    for e in live:
        e["calls"] = {}
        batches[(e["format"], e["late_bound"])].append(e)
    for (fmt, late), group in batches.items():
        start = time.perf_counter()
        by_path = {e["path"]: e for e in group}
        for mode in MODES:
            out_dir = work / "out" / "legacy" / mode / f"{fmt}{'-late' if late else ''}"
            for path, call in run_cli(list(by_path), mode, late, out_dir).items():
                call["groups"] = _groups(call.get("output"))
                by_path[path]["calls"][mode] = call
        print(f"[zoo] legacy keras {fmt}{' late-bound' if late else ''}: {len(group)} files, "
              f"{time.perf_counter() - start:.1f}s", file=sys.stderr, flush=True)
    jobs = [(e, mode) for e in live for mode in MODES[1:] if e["calls"][mode].get("output")]
    compared = _worker("compare_files", {"jobs": [{"reference": e["reference"], "path": e["calls"][m]["output"]}
                                                  for e, m in jobs]}) if jobs else []
    for (e, mode), result in zip(jobs, compared):
        e["calls"][mode]["compare"] = result


def judge(entry: dict) -> list[str]:
    """Problems of one file, each a short sentence (empty: as expected)."""
    if entry.get("export_error"):
        return []
    calls, problems = entry["calls"], []
    for mode in MODES:
        call = calls.get(mode, {})
        want = 1 if mode == "check" else 0
        if entry.get("expected_refusal"):
            if call.get("exit") != 2 or entry["expected_refusal"] not in str(call.get("error")):
                problems.append(f"{mode}: exit {call.get('exit')}, expected a refusal naming "
                                f"{entry['expected_refusal']} ({call.get('error')})")
            continue
        if call.get("crash"):
            problems.append(f"{mode}: crash ({call.get('error')})")
        elif call.get("exit") != want:
            problems.append(f"{mode}: exit {call.get('exit')} ({call.get('error')})")
        verification = call.get("verification") or {}
        if verification.get("ran") and verification.get("passed") is False:
            problems.append(f"{mode}: the tool's verification failed")
        expected = entry["expected_groups"] if mode == "fuse" else entry["expected_onnx_groups"]
        if mode in ("fuse", "onnx") and call.get("exit") == 0 and call.get("groups") != expected:
            problems.append(f"{mode}: grouped convs {call.get('groups')} vs expected {expected}")
        compare = call.get("compare")
        if compare and "error" in compare:
            problems.append(f"{mode}: the written file does not run ({compare['error']})")
        elif compare and not compare["passed"]:
            problems.append(f"{mode}: outputs differ from the original's (max abs {compare['errors']})")
        if compare and compare.get("note"):
            problems.append(f"{mode}: {compare['note']}")
    if entry.get("late_bound") and not entry.get("late_vs_meant"):
        problems.append("late-bound file computes what was meant (the idiom was not reproduced)")
    return problems


def _error_cell(call: dict) -> str:
    compare = call.get("compare") or {}
    if "error" in compare:
        return "does not run"
    errors = compare.get("errors")
    return "–" if not errors else ("?" if errors[0] is None else f"{errors[0]:.1e}")


def markdown(entries: list[dict]) -> list[str]:
    """The section of zoo_results.md: one row a file, then a summary line."""
    lines = ["## Legacy Keras code (public repositories' idioms)", "",
             "`benchmarks/zoo_keras_legacy.py`: this project's code written in the idioms of public Keras "
             "repositories (ResNeXt, SE-ResNeXt, ShuffleNet v1 g=3, AlexNet two towers channels_first, DPN), "
             "random weights, saved by tf-keras (.h5) and Keras 3 (.keras, where the code runs there). Every call "
             "has `--trust-lambdas` (late-bound files also `--repair-late-binding`). Exit codes: check / fuse / "
             "--to onnx / --to tflite. Error: max abs difference of the `features` output (before the classifier) "
             "of the written file, run by Keras 3 / onnxruntime / the TFLite interpreter, from the model as its "
             "author meant it, run in memory by the framework that built it.", "",
             "| model | binding | format | check | fuse | onnx | tflite | rewrites | grouped after fuse "
             "(expected) | grouped in ONNX (depthwise incl.) | error fuse / onnx / tflite | problems |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for e in entries:
        if e.get("export_error"):
            lines.append(f"| {e['name']} | {e['binding']} | {e['format']} | not built: "
                         f"{e['export_error'][:110].replace('|', '/')} |" + " |" * 8)
            continue
        calls = e["calls"]
        exits = [str(calls[m].get("exit")) + (" CRASH" if calls[m].get("crash") else "") for m in MODES]
        errors = " / ".join(_error_cell(calls[m]) for m in MODES[1:])
        problems = "; ".join(e.get("problems", [])).replace("|", "/") or "ok"
        lines.append(f"| {e['name']} | {e['binding']} | {e['format']} | {' | '.join(exits)} | "
                     f"{calls['fuse'].get('rewrite_count', 0)} | {calls['fuse'].get('groups')} "
                     f"({e['expected_groups']}) | {calls['onnx'].get('groups')} | {errors} | {problems} |")
    s = summarize(entries)
    lines += ["", f"**Legacy Keras summary**: {s['files']} files ({s['not_built']} not built in Keras 3: the "
              f"code calls the Keras 2 backend or TF ops on Keras tensors), {s['cli_calls']} CLI calls, "
              f"{s['crashes']} crashes, {s['exit2']} exit 2 ({s['refused_as_expected']} files refused as "
              f"expected: Keras 3 saves a Lambda's named function by name, without its code), fused as expected: "
              f"{s['fused_as_expected']}/{s['files']}, ONNX grouped as expected: {s['onnx_as_expected']}/"
              f"{s['files']}, written files "
              f"equal to the original: {s['outputs_equal']}/{s['outputs_compared']}, files with a problem: "
              f"{s['with_problems']}.", ""]
    return lines


def summarize(entries: list[dict]) -> dict:
    live = [e for e in entries if not e.get("export_error")]
    calls = [c for e in live for c in e["calls"].values()]
    compared = [c["compare"] for c in calls if c.get("compare")]
    return {"files": len(live), "not_built": len(entries) - len(live), "cli_calls": len(calls),
            "crashes": sum(1 for c in calls if c.get("crash")), "exit2": sum(1 for c in calls if c.get("exit") == 2),
            "fused_as_expected": sum(1 for e in live if e["calls"]["fuse"].get("exit") == 0
                                     and e["calls"]["fuse"].get("groups") == e["expected_groups"]),
            "onnx_as_expected": sum(1 for e in live if e["calls"]["onnx"].get("exit") == 0
                                    and e["calls"]["onnx"].get("groups") == e["expected_onnx_groups"]),
            "outputs_compared": len(compared),
            "outputs_equal": sum(1 for c in compared if c.get("passed") and not c.get("note")),
            "with_problems": sum(1 for e in live if e.get("problems")),
            "refused_as_expected": sum(1 for e in live if e.get("expected_refusal") and not e.get("problems"))}


def run(out: Path, only: list[str] | None = None) -> dict:
    """Export, run and judge the legacy Keras battery under ``out``; {"entries", "summary", "markdown",
    "seconds"} for zoo.py's results."""
    start = time.perf_counter()
    entries = _worker("_export_worker", {"folder": str(out / "models" / "legacy"), "only": list(only or [])})
    export_seconds = time.perf_counter() - start
    run_battery(entries, out)
    for e in entries:
        e["problems"] = judge(e)
        print(f"[zoo] legacy {e['name']}.{e['binding']}.{e['format']}: {'; '.join(e['problems']) or 'ok'}",
              file=sys.stderr, flush=True)
    return {"entries": entries, "summary": summarize(entries), "markdown": markdown(entries),
            "export_seconds": round(export_seconds, 1), "seconds": round(time.perf_counter() - start, 1)}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "_compare":
        print("ZK " + json.dumps(compare_files(**json.loads(argv[1]))))
        return 0
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True, help="work folder (models and outputs)")
    parser.add_argument("--only", action="append", default=[], help="substring of model names (repeatable)")
    args = parser.parse_args(argv)
    result = run(args.out, args.only)
    print("\n".join(result["markdown"]))
    (args.out / "legacy_keras.json").write_text(json.dumps(result, indent=1, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
