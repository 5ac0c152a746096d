"""The fuse harnesses, one per format, with the same two checks (used through the ``fusion``,
``tf_fusion`` and ``keras_fusion`` fixtures of tests/conftest.py):

- ``fused(model, groups=...)``: every candidate fused; the written model's structure (op or layer
  counts, the group attribute, nothing of the pattern left) and its numbers (the tool's
  verification passed, with its figures, and this harness's own run of both models agrees);
- ``untouched(model, *reasons, code=...)``: a near miss; nothing rewritten, the same ops or
  layers, and one skip whose reason holds each of ``reasons``.

Each saves or copies the model under tmp_path, runs ``gconv_rewrite.fuse`` and checks that the input
is never modified. TensorFlow and Keras are imported only when their harness runs.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import onnx

import gconv_rewrite
from gconv_rewrite.report import Report
from tests.helpers import (
    PATTERN_OPS,
    TOLERANCE,
    assert_fused_weights,
    attribute,
    classes,
    constants,
    dead_constants,
    digest,
    folder_digest,
    keras_outputs,
    nodes,
    op_counts,
    saved_model_conv_groups,
    saved_model_ops,
    saved_model_outputs,
)


def assert_skip(report: Report, reasons: tuple[str, ...], code: str | None) -> None:
    """One skip, whose reason holds each of ``reasons``; its stable code is ``code`` where the
    report records codes (older reports have none)."""
    found = [s.reason for s in report.skipped]
    assert len(report.skipped) == 1, found
    for reason in reasons:
        assert reason in report.skipped[0].reason, found
    record = asdict(report.skipped[0])
    if code is not None:  # every skip carries its code (gconv_rewrite.reasons)
        assert record["code"] == code, record


def assert_verified(report: Report) -> None:
    """The tool's own verification ran and passed, with figures for every output."""
    verification = report.verification
    assert verification.ran and verification.passed, verification
    assert verification.outputs, "a verification that compared no output proves nothing"
    for output in verification.outputs:
        assert output.passed and output.informative, output
        assert np.isfinite(output.max_abs_error) and output.max_abs_error >= 0, output


# -- ONNX ----------------------------------------------------------------------------------------


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
    """Save a model under tmp_path, fuse it through ``gconv_rewrite.fuse`` and check the numbers."""

    def __init__(self, tmp_path: Path):
        self.tmp_path = tmp_path
        self._count = 0

    def run(self, model: onnx.ModelProto, *, shapes=None) -> Outcome:
        from tests.helpers import assert_same_outputs

        onnx.checker.check_model(model, full_check=True)  # the test model itself must be valid
        self._count += 1
        original = self.tmp_path / f"model{self._count}.onnx"
        fused = self.tmp_path / f"model{self._count}.fused.onnx"
        onnx.save(model, str(original))
        before = original.read_bytes()
        # verify=False: the comparison below is this test's own, independent of gconv_rewrite.verify.
        result = gconv_rewrite.fuse(original, output=fused, verify=False)
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

    def untouched(self, model: onnx.ModelProto, *reasons: str, shapes=None, code: str | None = None) -> Outcome:
        """Expect a near miss: nothing rewritten, the same ops, and a skip saying why."""
        outcome = self.run(model, shapes=shapes)
        assert outcome.report.rewrites == []
        assert outcome.after == outcome.before
        wiring = lambda m: [(n.op_type, list(n.input), list(n.output)) for n in m.graph.node]
        assert wiring(outcome.fused) == wiring(outcome.original)
        assert constants(outcome.fused).keys() == constants(outcome.original).keys()
        assert_skip(outcome.report, reasons, code)
        return outcome


# -- TensorFlow SavedModels and Keras files ------------------------------------------------------


@dataclass
class FileOutcome:
    """A fused SavedModel folder or Keras file: the report, both paths, and the op (TF) or layer
    (Keras) counts of each, read back from the files."""

    report: Report
    original_path: Path
    fused_path: Path
    before: dict[str, int]
    after: dict[str, int]

    def reasons(self) -> list[str]:
        return [s.reason for s in self.report.skipped]


def _assert_close(expected: list[np.ndarray], actual: list[np.ndarray]) -> None:
    assert len(expected) == len(actual)
    for want, got in zip(expected, actual):
        assert want.shape == got.shape and want.dtype == got.dtype
        assert np.abs(want).max() > 0, "a test model whose output is all zeros proves nothing"
        np.testing.assert_allclose(got, want, rtol=TOLERANCE, atol=TOLERANCE)


TF_PATTERN_OPS = ("Split", "SplitV", "Slice", "StridedSlice", "ConcatV2")
TF_CONV_OPS = ("Conv2D", "Conv3D")
# The written SavedModel holds a grouped conv's bias as AddV2 and its batch norm as Mul + AddV2
# (passes/tf/savedmodel.py: the remapper cannot fuse those into a grouped conv it cannot run).
TF_WRITER_OPS = ("AddV2", "Mul")


def _signature_feeds(saved_model: Path, seed: int = 0) -> dict[str, np.ndarray]:
    """Random inputs for the serving signature, by name; an unknown dimension is 1."""
    import tensorflow as tf

    specs = tf.saved_model.load(str(saved_model)).signatures["serving_default"].structured_input_signature[1]
    rng = np.random.default_rng(seed)
    return {name: rng.standard_normal([d or 1 for d in spec.shape]).astype(spec.dtype.as_numpy_dtype)
            for name, spec in specs.items()}


class TFFusion:
    """Save a ``tf.Module`` (``serve(x)``) or take a SavedModel folder, fuse it through
    ``gconv_rewrite.fuse`` (with its verification) and check the numbers again here."""

    def __init__(self, tmp_path: Path):
        self.tmp_path = tmp_path
        self._count = 0

    def run(self, model, *, shape=(1, 8, 8, 16)) -> FileOutcome:
        from tests.tf_models import save_module

        self._count += 1
        original = model if isinstance(model, Path) else save_module(model, self.tmp_path / f"model{self._count}",
                                                                     shape=shape)
        fused = self.tmp_path / f"model{self._count}.fused"
        before = folder_digest(original)
        report = gconv_rewrite.fuse(original, output=fused).report
        assert folder_digest(original) == before, "the input folder must never change"
        assert report.written and fused.is_dir()
        feeds = _signature_feeds(original)
        expected, actual = saved_model_outputs(original, feeds), saved_model_outputs(fused, feeds)
        assert actual.keys() == expected.keys()
        _assert_close([expected[k] for k in sorted(expected)], [actual[k] for k in sorted(expected)])
        return FileOutcome(report, original, fused, saved_model_ops(original), saved_model_ops(fused))

    def fused(self, model, *, groups: int | list[int], shape=(1, 8, 8, 16)) -> FileOutcome:
        """Expect every candidate fused: one grouped Conv2D each, nothing of the pattern left."""
        from gconv_rewrite.passes.tf.savedmodel import load_signature

        outcome = self.run(model, shape=shape)
        expected = groups if isinstance(groups, list) else [groups]
        assert [r.groups for r in outcome.report.rewrites] == expected
        assert outcome.report.skipped == []
        assert set(TF_PATTERN_OPS).isdisjoint(outcome.after), f"pattern ops left after fusion: {outcome.after}"
        # Every ConcatV2 became one conv: its N branch convs are gone.
        concats = [n for n in load_signature(outcome.original_path).graph_def.node if n.op == "ConcatV2"]
        convs = lambda counts: sum(counts.get(op, 0) for op in TF_CONV_OPS)
        assert convs(outcome.after) == convs(outcome.before) - sum(n.attr["N"].i for n in concats) + len(expected)
        grouped = [g for g in saved_model_conv_groups(outcome.fused_path) if g > 1]
        assert sorted(grouped) == sorted(expected)
        # No op kind the original did not have (per-branch tails become one op of the same kind),
        # but for the writer's form of a grouped conv's bias or batch norm.
        assert set(outcome.after) - set(outcome.before) <= set(TF_WRITER_OPS), (outcome.before, outcome.after)
        assert_verified(outcome.report)
        return outcome

    def untouched(self, model, *reasons: str, code: str | None = None, shape=(1, 8, 8, 16)) -> FileOutcome:
        """Expect a near miss: nothing rewritten, the same ops, and a skip saying why."""
        outcome = self.run(model, shape=shape)
        assert outcome.report.rewrites == []
        assert outcome.after == outcome.before
        assert_skip(outcome.report, reasons, code)
        return outcome


KERAS_PATTERN_CLASSES = ("GetItem", "Concatenate", "Split", "SlicingOpLambda", "TFOpLambda", "Lambda")
KERAS_CONV_CLASSES = ("Conv1D", "Conv2D", "Conv3D")


class KerasFusion:
    """Take a ``.keras`` / ``.h5`` file (or save a ``keras.Model``), fuse it through
    ``gconv_rewrite.fuse`` (with its verification) into a ``.keras`` file, load that without trust
    flags and check the numbers again here against the original (tf-keras for ``.h5``)."""

    def __init__(self, tmp_path: Path):
        self.tmp_path = tmp_path
        self._count = 0

    def _original(self, model) -> Path:
        if isinstance(model, Path):
            return model
        path = self.tmp_path / f"model{self._count}.keras"
        model.save(path)
        return path

    def run(self, model) -> FileOutcome:
        import keras
        import tf_keras

        self._count += 1
        original = self._original(model)
        fused = self.tmp_path / f"model{self._count}.fused.keras"
        before = digest(original)
        report = gconv_rewrite.fuse(original, output=fused).report
        assert digest(original) == before, "the input file must never change"
        written = keras.models.load_model(fused, safe_mode=True)
        reference = (keras.models.load_model(original, safe_mode=True) if original.suffix == ".keras"
                     else tf_keras.models.load_model(original, compile=False))
        shape = [2 if d is None else d for d in written.inputs[0].shape]
        x = np.random.default_rng(0).standard_normal(shape).astype(np.float32)
        _assert_close(keras_outputs(reference, x), keras_outputs(written, x))
        return FileOutcome(report, original, fused, report.before.op_counts, classes(written))

    def fused(self, model, *, groups: int | list[int]) -> FileOutcome:
        """Expect every candidate fused: one grouped conv layer each (each group one branch conv),
        nothing of the pattern left."""
        outcome = self.run(model)
        expected = groups if isinstance(groups, list) else [groups]
        assert [r.groups for r in outcome.report.rewrites] == expected
        assert outcome.report.skipped == []
        assert set(KERAS_PATTERN_CLASSES).isdisjoint(outcome.after), f"pattern left: {outcome.after}"
        convs = lambda counts: sum(counts.get(c, 0) for c in KERAS_CONV_CLASSES)
        assert convs(outcome.after) == convs(outcome.before) - sum(expected) + len(expected)
        import keras

        written = keras.models.load_model(outcome.fused_path, safe_mode=True)
        grouped = [layer.groups for layer in written.layers
                   if type(layer).__name__ in KERAS_CONV_CLASSES and layer.groups > 1]
        assert sorted(grouped) == sorted(expected)
        # No layer class the original did not have (per-branch tails become one layer each).
        assert set(outcome.after) <= set(outcome.before), (outcome.before, outcome.after)
        assert_verified(outcome.report)
        return outcome

    def untouched(self, model, *reasons: str, code: str | None = None) -> FileOutcome:
        """Expect a near miss: nothing rewritten, the same layers, and a skip saying why."""
        outcome = self.run(model)
        assert outcome.report.rewrites == []
        assert outcome.after == outcome.before
        assert_skip(outcome.report, reasons, code)
        return outcome
