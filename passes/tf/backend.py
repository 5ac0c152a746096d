"""SavedModels as a backend of the driver (``gconv_rewrite.backend``): one signature, frozen and inlined.

    SavedModel ─ signature ─ freeze + inline calls (GraphDef) ─ fuse | expand ─ write ─ run both in TF
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from tensorflow.core.framework import graph_pb2

from gconv_rewrite.errors import VerificationFailed
from gconv_rewrite.passes.tf import savedmodel as sm
from gconv_rewrite.passes.tf.expand_grouped_conv import ExpandGroupedConvPass
from gconv_rewrite.passes.tf.fuse_split_conv import FuseSplitConvPass
from gconv_rewrite.proof import prove
from gconv_rewrite.report import ModelStats, Report, Skip, Verification


@dataclass
class SavedModelGraph:
    """The model the TF passes rewrite: the signature as loaded, and its graph so far."""

    frozen: sm.FrozenSignature
    graph_def: graph_pb2.GraphDef


class SavedModelBackend:
    name = "savedmodel"
    suffix = ""  # a folder
    verify_unchanged = False
    check = None  # no checker beyond TensorFlow's own save

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

    def result(self, model: SavedModelGraph) -> graph_pb2.GraphDef:
        return model.graph_def

    # -- passes --------------------------------------------------------------------------------

    def fuse_passes(self, model, *, rewrite: bool, options, accept=None) -> list[FuseSplitConvPass]:
        return [FuseSplitConvPass(rewrite=rewrite, accept=accept)]

    def fold_pass(self, model, fuse_passes, options):
        return None  # the fuse pass carries FusedBatchNorm tails itself

    def expand_pass(self, model, *, rewrite: bool, options, accept=None, after=()) -> ExpandGroupedConvPass:
        return ExpandGroupedConvPass(rewrite=rewrite, keep_depthwise=options.keep_depthwise,
                                     min_groups=options.min_groups, max_groups=options.max_groups, accept=accept,
                                     exclude={name for fuse in after for name in fuse.created})

    def apply(self, rewrite_pass, model: SavedModelGraph) -> SavedModelGraph:
        """A TF pass rewrites the GraphDef (``pass(graph_def, protected) → graph_def``)."""
        return SavedModelGraph(model.frozen, rewrite_pass(model.graph_def, model.frozen.protected))

    def emit(self, model: SavedModelGraph, report: Report, options, *, apply: bool = True) -> SavedModelGraph:
        return model

    # -- writing and running -------------------------------------------------------------------

    def save(self, model: SavedModelGraph, path: Path) -> None:
        try:
            sm.write_savedmodel(model.frozen, model.graph_def, path)
        except Exception as exc:
            raise VerificationFailed(f"the rewritten graph cannot be saved as a SavedModel ({sm.one_line(exc)}); "
                                     "nothing was written") from exc

    def verify(self, original: Path, rewritten: SavedModelGraph, written: Path, options,
               report: Report) -> Verification:
        """``gconv_rewrite.proof``: the model outputs of the original signature against the written
        SavedModel's, at one size or two, and each rewrite's boundary tensor (see ``_Runners``)."""
        return prove(_Runners(rewritten), original, written, options, report.rewrites)


class _Runners:
    """The two runs ``gconv_rewrite.proof.prove`` compares, for one rewritten SavedModel.

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
