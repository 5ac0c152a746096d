"""Shared helpers for the ONNX fusion tests: run the fusion on a saved copy of a model, and check
both the structure of what came out and the numbers (onnxruntime, original vs fused, with its own
graph optimisations off so they cannot hide a difference)."""

from __future__ import annotations

import collections
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

import rewriter
from rewriter.report import Report

TOLERANCE = 1e-4
PATTERN_OPS = ("Split", "Slice", "Concat")


# -- reading models --------------------------------------------------------------------------


def op_counts(model: onnx.ModelProto) -> dict[str, int]:
    return dict(collections.Counter(n.op_type for n in model.graph.node))


def attribute(node: onnx.NodeProto, name: str, default=None):
    for attr in node.attribute:
        if attr.name == name:
            return helper.get_attribute_value(attr)
    return default


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


# -- running models --------------------------------------------------------------------------


def feeds_for(model: onnx.ModelProto, seed: int, shapes: Mapping[str, list[int]] | None = None):
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


def run_onnx(path_or_model: Path | onnx.ModelProto, feeds: Mapping[str, np.ndarray]) -> list[np.ndarray]:
    options = ort.SessionOptions()
    # onnxruntime's own fusions must not hide a difference.
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    source = str(path_or_model) if isinstance(path_or_model, Path) else path_or_model.SerializeToString()
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


# -- rewriting models ------------------------------------------------------------------------


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


@dataclass
class Outcome:
    original: onnx.ModelProto
    fused: onnx.ModelProto
    report: Report
    original_path: Path
    fused_path: Path

    @property
    def before(self) -> dict[str, int]:
        return op_counts(self.original)

    @property
    def after(self) -> dict[str, int]:
        return op_counts(self.fused)

    def fused_convs(self) -> list[onnx.NodeProto]:
        """The Conv nodes the fusion wrote, in graph order."""
        written = {r.location for r in self.report.rewrites}
        return [n for n in self.fused.graph.node if n.name in written]

    def reasons(self) -> list[str]:
        return [s.reason for s in self.report.skipped]


class Fusion:
    """Save a model under tmp_path, fuse it through ``rewriter.fuse`` and check the numbers."""

    def __init__(self, tmp_path: Path):
        self.tmp_path = tmp_path
        self._count = 0

    def run(self, model: onnx.ModelProto, *, shapes=None) -> Outcome:
        onnx.checker.check_model(model, full_check=True)  # the test model itself must be valid
        self._count += 1
        original = self.tmp_path / f"model{self._count}.onnx"
        fused = self.tmp_path / f"model{self._count}.fused.onnx"
        onnx.save(model, str(original))
        before = original.read_bytes()
        # verify=False: the comparison below is this test's own, independent of rewriter.verify.
        result = rewriter.fuse(original, output=fused, verify=False)
        assert original.read_bytes() == before, "the input file must never change"
        fused_model = onnx.load(str(fused))
        onnx.checker.check_model(fused_model, full_check=True)
        assert_same_outputs(original, fused, shapes)
        return Outcome(model, fused_model, result.report, original, fused)

    def fused(self, model: onnx.ModelProto, *, groups: int | list[int], shapes=None) -> Outcome:
        """Expect every candidate fused: one grouped Conv each, nothing of the pattern left."""
        outcome = self.run(model, shapes=shapes)
        expected = groups if isinstance(groups, list) else [groups]
        assert [r.groups for r in outcome.report.rewrites] == expected
        assert outcome.report.skipped == []
        for op in PATTERN_OPS:
            assert op not in outcome.after, f"{op} left after fusion: {outcome.after}"
        # Every Concat became one Conv: its N branch Convs are gone.
        branch_convs = sum(len(n.input) for n in nodes(outcome.original, "Concat"))
        assert outcome.after.get("Conv", 0) == outcome.before["Conv"] - branch_convs + len(expected)
        assert [attribute(n, "group", 1) for n in outcome.fused_convs()] == expected
        # Everything else is untouched.
        others = lambda counts: {op: c for op, c in counts.items() if op not in PATTERN_OPS + ("Conv", "Constant")}
        assert others(outcome.after) == others(outcome.before)
        assert dead_constants(outcome.fused) == []
        assert_fused_weights(outcome.original, outcome.fused)
        return outcome

    def untouched(self, model: onnx.ModelProto, *reasons: str, shapes=None) -> Outcome:
        """Expect a near miss: nothing rewritten, the same ops, and a skip saying why."""
        outcome = self.run(model, shapes=shapes)
        assert outcome.report.rewrites == []
        assert outcome.after == outcome.before
        wiring = lambda m: [(n.op_type, list(n.input), list(n.output)) for n in m.graph.node]
        assert wiring(outcome.fused) == wiring(outcome.original)
        assert constants(outcome.fused).keys() == constants(outcome.original).keys()
        assert len(outcome.report.skipped) == 1, outcome.reasons()
        for reason in reasons:
            assert reason in outcome.report.skipped[0].reason, outcome.reasons()
        return outcome


@pytest.fixture
def fusion(tmp_path: Path) -> Fusion:
    return Fusion(tmp_path)
