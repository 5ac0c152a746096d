"""SavedModels as a backend of the driver (``rewriter.backend``): one signature, frozen and inlined.

    SavedModel ─ signature ─ freeze + inline calls (GraphDef) ─ fuse | expand ─ write ─ run both in TF
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tensorflow.core.framework import graph_pb2

import passes.tf.expand_grouped_conv  # noqa: F401  (registers the TF passes)
import passes.tf.fuse_split_conv  # noqa: F401
from passes import registered
from passes.tf import savedmodel as sm
from rewriter.errors import VerificationFailed
from rewriter.proof import prove
from rewriter.report import ModelStats, Report, Skip, Verification
from rewriter.verify import InputSpec


@dataclass
class SavedModelGraph:
    """The model the TF passes rewrite: the signature as loaded, and its graph so far."""

    frozen: sm.FrozenSignature
    graph_def: graph_pb2.GraphDef


class _OnGraph:
    """A TF pass (``pass(graph_def, protected) → graph_def``) as the driver calls passes."""

    def __init__(self, tf_pass):
        self.tf_pass = tf_pass

    def __call__(self, model: SavedModelGraph) -> SavedModelGraph:
        return SavedModelGraph(model.frozen, self.tf_pass(model.graph_def, model.frozen.protected))

    def __getattr__(self, name):  # rewrites, skipped, decisions, created
        return getattr(self.tf_pass, name)


class SavedModelBackend:
    name = "savedmodel"
    suffix = ""  # a folder
    verify_unchanged = False

    def __init__(self, report: Report):
        self.report = report

    def load(self, path: Path, options) -> SavedModelGraph:
        frozen = sm.load_signature(path, options.signature)
        written = ", ".join([frozen.name, *frozen.aliases])
        where = "the .tflite" if options.to == "tflite" else "the output"
        for name in frozen.others:
            self.report.skipped.append(Skip(f"signature {name}", f"not rewritten, and not in {where}: only "
                                            f"{written} (choose with --signature)", code="not-carried"))
        return SavedModelGraph(frozen, frozen.graph_def)

    def files_read(self, path: Path, model) -> list[Path]:
        return [path]

    def stats(self, model: SavedModelGraph) -> ModelStats:
        return sm.graph_stats(model.graph_def)

    def input_specs(self, model: SavedModelGraph) -> list[InputSpec]:
        return [InputSpec(i.key, i.shape, i.dtype.name) for i in model.frozen.inputs]

    def result(self, model: SavedModelGraph) -> graph_pb2.GraphDef:
        return model.graph_def

    # -- passes --------------------------------------------------------------------------------

    def fuse_pass(self, model, *, rewrite: bool, options, accept=None):
        return _OnGraph(registered("tf.fuse-split-conv")(rewrite=rewrite, accept=accept))

    def fold_pass(self, model, fuse_pass, options):
        return None  # the fuse pass carries FusedBatchNorm tails itself

    def expand_pass(self, model, *, rewrite: bool, options, accept=None, exclude=None):
        expand = registered("tf.expand-grouped-conv")
        return _OnGraph(expand(rewrite=rewrite, keep_depthwise=options.keep_depthwise, min_groups=options.min_groups,
                               max_groups=options.max_groups, accept=accept, exclude=exclude or set()))

    def emit(self, model: SavedModelGraph, report: Report, options, *, apply: bool = True) -> SavedModelGraph:
        return model

    # -- writing and running -------------------------------------------------------------------

    def save(self, model: SavedModelGraph, path: Path) -> None:
        try:
            sm.write_savedmodel(model.frozen, model.graph_def, path)
        except Exception as exc:
            raise VerificationFailed(f"the rewritten graph cannot be saved as a SavedModel ({sm.one_line(exc)}); "
                                     "nothing was written") from exc

    def run(self, model_or_path, feeds: Mapping[str, np.ndarray], signature: str = "serving_default"):
        import tensorflow as tf

        function = model_or_path.frozen.function if isinstance(model_or_path, SavedModelGraph) else \
            tf.saved_model.load(str(model_or_path)).signatures[signature]
        return sm.run_function(function, feeds, "rewritten")

    def verify(self, original: Path, rewritten: SavedModelGraph, written: Path, options,
               report: Report) -> Verification:
        """``rewriter.proof``: the model outputs of the original signature against the written
        SavedModel's, at one size or two, and each rewrite's boundary tensor (see ``_Runners``)."""
        return prove(_Runners(rewritten), original, written, options, report.rewrites)


class _Runners:
    """The two runs ``rewriter.proof.prove`` compares, for one rewritten SavedModel.

    original: the signature as loaded (its outputs), and the frozen graph the passes read (the
    boundary tensors). rewritten: the written SavedModel's signature (its outputs: what is proven
    is the file), and the graph the passes wrote, in the form it was written (the boundary
    tensors, under the names the rewrites recorded; large constants are variables in the file)."""

    def __init__(self, model: SavedModelGraph):
        self.model = model

    def runner(self, path: Path, role: str, extra=()) -> sm.SignatureRunner:
        frozen = self.model.frozen
        if role == "original":
            return sm.SignatureRunner(frozen.function, frozen, frozen.graph_def, role, extra)
        graph_def = sm.tf_runnable(self.model.graph_def) if extra else self.model.graph_def
        return sm.SignatureRunner(sm.load_written(path, frozen.name), frozen, graph_def, role, extra)
