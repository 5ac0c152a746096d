"""ONNX as a backend of the driver (``gconv_rewrite.backend``): onnx-ir models, onnxruntime runs.

    .onnx (+ external data, lazily) ─ onnx-ir ─ fuse | fold | expand (in place) ─ save ─ checker ─ onnxruntime
"""

from __future__ import annotations

from pathlib import Path

import onnx
import onnx_ir as ir

from gconv_rewrite import formats
from gconv_rewrite.errors import VerificationFailed
from gconv_rewrite.passes.onnx.expand_grouped_conv import ExpandGroupedConvPass
from gconv_rewrite.passes.onnx.fold_batchnorm import FoldBatchNormPass
from gconv_rewrite.passes.onnx.fuse_qlinear_conv import FuseQLinearConvPass
from gconv_rewrite.passes.onnx.fuse_split_conv import FuseSplitConvPass
from gconv_rewrite.proof import prove
from gconv_rewrite.report import ModelStats, Report, Verification, model_stats
from gconv_rewrite.verify import OnnxRunner, verify_subgraphs

# What ``--fuse`` runs, in order: float (and QDQ) branches, then QOperator (QLinearConv) branches.
FUSE_PASSES = (FuseSplitConvPass, FuseQLinearConvPass)


class OnnxBackend:
    name = "onnx"
    suffix = ".onnx"
    verify_unchanged = False

    def __init__(self, report: Report):
        self.report = report
        self.threshold: int | None = None  # the input's external-data layout, kept on save

    # -- reading ---------------------------------------------------------------------------------

    def load(self, path: Path, options) -> ir.Model:
        model = formats.load_onnx(path)
        self.threshold = formats.external_layout(model)
        return model

    def files_read(self, path: Path, model: ir.Model) -> list[Path]:
        return formats.input_files(path, model)

    def stats(self, model: ir.Model) -> ModelStats:
        return model_stats(model)

    def result(self, model: ir.Model) -> ir.Model:
        return model

    # -- passes (reader + planner + emitter in one onnx-ir pass each) ------------------------------

    def fuse_passes(self, model, *, rewrite: bool, options, accept=None) -> list[ir.passes.InPlacePass]:
        return [fuse(rewrite=rewrite, accept=accept) for fuse in FUSE_PASSES]

    def fold_pass(self, model, fuse_passes, options) -> FoldBatchNormPass:
        return FoldBatchNormPass([conv for fuse in fuse_passes for conv in fuse.fused_convs])

    def expand_pass(self, model, *, rewrite: bool, options, accept=None, after=()) -> ExpandGroupedConvPass:
        return ExpandGroupedConvPass(rewrite=rewrite, keep_depthwise=options.keep_depthwise,
                                     min_groups=options.min_groups, max_groups=options.max_groups, accept=accept,
                                     exclude=[conv for fuse in after for conv in fuse.created])

    def apply(self, rewrite_pass: ir.passes.InPlacePass, model: ir.Model) -> ir.Model:
        rewrite_pass(model)  # in place
        return model

    def emit(self, model: ir.Model, report: Report, options, *, apply: bool = True) -> ir.Model:
        return model  # the passes rewrote it in place

    # -- writing and running ---------------------------------------------------------------------

    def save(self, model: ir.Model, path: Path) -> None:
        """As the input was laid out: external data (named after its content, so never the name
        of data another model reads) where the input had it."""
        external = f"{formats.data_stem(path.name)}.data" if self.threshold is not None else None
        formats.save_onnx(model, path, external_data=external, threshold=self.threshold or 0)
        if external and (path.parent / external).exists():
            formats.name_external_data_by_content(path, external)

    def check(self, path: Path) -> None:
        """onnx.checker on the written file (the driver's "checker" phase)."""
        try:
            onnx.checker.check_model(str(path))
        except Exception as exc:
            raise VerificationFailed(f"the rewritten model fails onnx.checker: "
                                     f"{str(exc).strip().splitlines()[0][:200]}") from exc

    def runner(self, path: Path, role: str, extra=()) -> OnnxRunner:
        """The file run in onnxruntime with ``extra`` tensors exposed (``gconv_rewrite.proof``)."""
        return OnnxRunner(path, role, extra)

    def verify(self, original: Path, rewritten: ir.Model, written: Path, options, report: Report) -> Verification:
        verification = prove(self, original, written, options, report.rewrites)
        if verification.passed:
            # One run takes one branch of each If: rewrites in subgraphs are run on their own too.
            # The run's kind of scratch folder ($TMPDIR/gconv-<pid>-<random>): a later run sweeps it
            # if this one is killed meanwhile.
            with formats.scratch_dir() as scratch:
                verify_subgraphs(original, written, report.rewrites, verification, seed=options.seed,
                                 scratch=scratch)
        return verification
