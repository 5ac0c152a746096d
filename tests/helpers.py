"""Plain helpers shared by the tests, defined once: run the CLI, read and run ONNX models, read and
run TensorFlow SavedModels and Keras models. Import them: ``from tests.helpers import invoke``.

Fixtures and the fuse harnesses (``fusion``, ``tf_fusion``, ``keras_fusion``) live in
``tests/conftest.py`` and ``tests/harness.py``. TensorFlow and Keras are imported inside the
functions that need them, so an ONNX-only test module does not pay for loading them.
"""

from __future__ import annotations

import collections
import hashlib
import os
from collections.abc import Callable, Mapping
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

TOLERANCE = 1e-4
PATTERN_OPS = ("Split", "Slice", "Concat")


# -- the CLI ---------------------------------------------------------------------------------


def invoke(*args, **kwargs):
    """Run ``gconv-rewrite ARGS`` in-process (click's CliRunner; exceptions are caught and kept
    in ``result.exception``). Arguments are passed as strings, bytes as they are."""
    from click.testing import CliRunner

    from gconv_rewrite.cli import main

    return CliRunner().invoke(main, [a if isinstance(a, bytes) else str(a) for a in args], **kwargs)


def error_lines(output, prefix: str = "gconv-rewrite") -> list[str]:
    """The non-blank lines of a CLI run's output (a click Result or a string) that start with
    ``prefix`` ("" for every non-blank line)."""
    text = output if isinstance(output, str) else output.output
    return [line for line in text.splitlines() if line.strip() and line.startswith(prefix)]


def digest(path: Path) -> str:
    """SHA-256 of one file's bytes: proof that an input was not modified."""
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def folder_digest(folder: Path) -> str:
    """SHA-256 over every file of a folder (a SavedModel), names included."""
    sha = hashlib.sha256()
    for path in sorted(Path(folder).rglob("*")):
        if path.is_file():
            sha.update(path.relative_to(folder).as_posix().encode() + path.read_bytes())
    return sha.hexdigest()


# -- ONNX: reading models ------------------------------------------------------------------------


def op_counts(model: onnx.ModelProto | Path | str) -> dict[str, int]:
    """Nodes per op type of the main graph; a path is loaded first."""
    if not isinstance(model, onnx.ModelProto):
        model = onnx.load(str(model))
    return dict(collections.Counter(n.op_type for n in model.graph.node))


def attribute(node: onnx.NodeProto, name: str, default=None):
    for attr in node.attribute:
        if attr.name == name:
            return helper.get_attribute_value(attr)
    return default


def group_of(node: onnx.NodeProto) -> int:
    return attribute(node, "group", 1)


def constants(model: onnx.ModelProto) -> dict[str, np.ndarray]:
    """Every constant by value name: initializers and Constant node outputs."""
    values = {init.name: numpy_helper.to_array(init) for init in model.graph.initializer}
    for node in model.graph.node:
        if node.op_type == "Constant":
            values[node.output[0]] = numpy_helper.to_array(attribute(node, "value"))
    return values


def nodes(model: onnx.ModelProto, op_type: str) -> list[onnx.NodeProto]:
    return [n for n in model.graph.node if n.op_type == op_type]


def dead_constants(model: onnx.ModelProto) -> list[str]:
    """Initializers and Constant nodes that nothing reads."""
    used = {name for n in model.graph.node for name in n.input}
    used |= {o.name for o in model.graph.output}
    dead = [i.name for i in model.graph.initializer if i.name not in used]
    dead += [n.output[0] for n in model.graph.node if n.op_type == "Constant" and n.output[0] not in used]
    return dead


# -- ONNX: running models ------------------------------------------------------------------------


def feeds_for(model: onnx.ModelProto, seed: int = 0, shapes: Mapping[str, list[int]] | None = None):
    rng = np.random.default_rng(seed)
    initializers = {i.name for i in model.graph.initializer}
    feeds = {}
    for value in model.graph.input:
        if value.name in initializers:
            continue
        shape = (shapes or {}).get(value.name)
        if shape is None:
            dims = value.type.tensor_type.shape.dim
            assert value.type.tensor_type.HasField("shape") and all(d.HasField("dim_value") for d in dims), \
                f"give a shape for input {value.name}"
            shape = [d.dim_value for d in dims]
        if value.type.tensor_type.elem_type == TensorProto.BOOL:
            feeds[value.name] = np.ones(shape, bool)  # e.g. an If condition: take the then-branch
        else:
            feeds[value.name] = rng.standard_normal(shape).astype(np.float32)
    return feeds


def run_onnx(path_or_model: Path | str | onnx.ModelProto, feeds: Mapping[str, np.ndarray]) -> list[np.ndarray]:
    options = ort.SessionOptions()
    # onnxruntime's own fusions must not hide a difference.
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    source = path_or_model.SerializeToString() if isinstance(path_or_model, onnx.ModelProto) else str(path_or_model)
    session = ort.InferenceSession(source, options, providers=["CPUExecutionProvider"])
    return session.run(None, dict(feeds))


def assert_same_outputs(original: Path, rewritten: Path, shapes=None, trials: int = 2) -> None:
    model = onnx.load(str(original))
    for seed in range(trials):
        feeds = feeds_for(model, seed, shapes)
        expected, actual = run_onnx(original, feeds), run_onnx(rewritten, feeds)
        assert len(expected) == len(actual)
        for want, got in zip(expected, actual):
            assert want.shape == got.shape and want.dtype == got.dtype
            assert np.abs(want).max() > 0, "a test model whose output is all zeros proves nothing"
            np.testing.assert_allclose(got, want, rtol=TOLERANCE, atol=TOLERANCE)


def run_conv(x: np.ndarray, weight: np.ndarray, bias: np.ndarray | None = None, *, op: str = "Conv",
             **attrs) -> np.ndarray:
    """One ONNX Conv (or ConvTranspose) in onnxruntime: the reference the plan's weight
    arithmetic is checked against."""
    inits = [numpy_helper.from_array(weight, "W")] + ([numpy_helper.from_array(bias, "B")] if bias is not None else [])
    node = helper.make_node(op, ["x", "W"] + (["B"] if bias is not None else []), ["y"], **attrs)
    graph = helper.make_graph([node], "conv", [helper.make_tensor_value_info("x", TensorProto.FLOAT, x.shape)],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return run_onnx(model, {"x": x})[0]


# -- ONNX: rewriting models ----------------------------------------------------------------------


def as_constant_nodes(model: onnx.ModelProto, which: Callable[[str], bool] = lambda name: True) -> onnx.ModelProto:
    """The same model with the chosen initializers written as Constant nodes (as exporters do)."""
    model = onnx.ModelProto.FromString(model.SerializeToString())
    moved = [i for i in model.graph.initializer if which(i.name)]
    kept = [i for i in model.graph.initializer if not which(i.name)]
    constant_nodes = [helper.make_node("Constant", [], [i.name], name=f"const_{i.name}", value=i) for i in moved]
    del model.graph.initializer[:]
    model.graph.initializer.extend(kept)
    old_nodes = list(model.graph.node)
    del model.graph.node[:]
    model.graph.node.extend(constant_nodes + old_nodes)
    return model


def without_attribute(model: onnx.ModelProto, op_type: str, name: str) -> onnx.ModelProto:
    model = onnx.ModelProto.FromString(model.SerializeToString())
    for node in nodes(model, op_type):
        kept = [a for a in node.attribute if a.name != name]
        del node.attribute[:]
        node.attribute.extend(kept)
    return model


def assert_fused_weights(original: onnx.ModelProto, fused: onnx.ModelProto) -> None:
    """Each original Concat is now one Conv, under the Concat output's name, that reads the
    branches' source and holds their weights and biases concatenated (a missing bias: zeros)."""
    producers = {out: n for n in original.graph.node for out in n.output}
    fused_by_output = {n.output[0]: n for n in nodes(fused, "Conv")}
    before, after = constants(original), constants(fused)
    for concat in nodes(original, "Concat"):
        conv = fused_by_output.get(concat.output[0])
        if conv is None:
            continue  # not fused: callers check which Concats must be gone
        branches = [producers[name] for name in concat.input]
        assert conv.input[0] == producers[branches[0].input[0]].input[0]
        weights = [before[b.input[1]] for b in branches]
        np.testing.assert_array_equal(after[conv.input[1]], np.concatenate(weights))
        has_bias = [len(b.input) > 2 and b.input[2] != "" for b in branches]
        if any(has_bias):
            biases = [before[b.input[2]] if bias else np.zeros(w.shape[0], np.float32)
                      for b, w, bias in zip(branches, weights, has_bias)]
            np.testing.assert_array_equal(after[conv.input[2]], np.concatenate(biases))
        else:
            assert len(conv.input) == 2
        # Strides, pads, dilations, auto_pad, kernel_shape: the branches' own, carried over.
        shared = lambda node: {a.name: helper.get_attribute_value(a) for a in node.attribute if a.name != "group"}
        assert shared(conv) == shared(branches[0])


# -- TensorFlow SavedModels ----------------------------------------------------------------------


def saved_model_ops(saved_model: Path) -> dict[str, int]:
    """Op counts of the serving signature as the passes read it (frozen, inlined, constant-folded:
    the writer's Mul of a grouped conv's batch norm folds into the filter)."""
    from gconv_rewrite.passes.tf.savedmodel import graph_stats, load_signature

    return graph_stats(load_signature(saved_model).graph_def).op_counts


def saved_model_conv_groups(saved_model: Path, signature: str = "serving_default") -> list[int]:
    """Each Conv2D of the signature's frozen graph: its group count (input channels over the
    filter's input channels; 1: not grouped), in graph order."""
    from gconv_rewrite.passes.tf import savedmodel as sm

    frozen = sm.load_signature(saved_model, signature)
    index = sm.g.GraphIndex(frozen.graph_def)
    return [index.shape(node.input[0])[3] // index.shape(node.input[1])[2]
            for node in frozen.graph_def.node if node.op == "Conv2D"]


def saved_model_outputs(saved_model: Path, feeds: Mapping[str, np.ndarray], *,
                        remapper: bool = True) -> dict[str, np.ndarray]:
    """Run the serving signature on ``feeds``: its outputs by key. remapper=False runs it with
    Grappler's remapper off (plain tf.functions: no XLA around their grouped convs)."""
    import contextlib

    import tensorflow as tf

    from gconv_rewrite.passes.tf.savedmodel import remapper_off

    fn = tf.saved_model.load(str(saved_model)).signatures["serving_default"]
    with contextlib.nullcontext() if remapper else remapper_off():
        return {k: v.numpy() for k, v in fn(**{k: tf.constant(v) for k, v in feeds.items()}).items()}


def saved_model_output(saved_model: Path, x: np.ndarray) -> np.ndarray:
    """The first output of the serving signature run on its one input, ``x``."""
    return next(iter(saved_model_outputs(saved_model, {"x": x}).values()))


# -- Keras ---------------------------------------------------------------------------------------


def classes(model) -> dict[str, int]:
    """Operations (layers and op layers) per class name."""
    return dict(collections.Counter(type(op).__name__ for op in model.operations))


def conv2d_groups(model) -> list[int]:
    """The ``groups`` of every grouped Conv2D layer, sorted."""
    return sorted(layer.groups for layer in model.layers if type(layer).__name__ == "Conv2D" and layer.groups > 1)


def keras_outputs(model, x) -> list[np.ndarray]:
    """The model's outputs on ``x`` (inference mode), always as a list."""
    result = model(x, training=False)
    return [np.asarray(r) for r in (result if isinstance(result, (list, tuple)) else [result])]


def image(shape, seed: int = 7) -> np.ndarray:
    """A float32 array of standard-normal values: an input batch for a model."""
    return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


def onnx_conv_groups(path: Path) -> list[int]:
    """The group of every Conv in an ONNX file's main graph, in graph order."""
    return [group_of(n) for n in onnx.load(str(path)).graph.node if n.op_type == "Conv"]
