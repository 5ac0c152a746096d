"""ONNX as a backend of the driver (``rewriter.backend``): onnx-ir models, onnxruntime runs.

    .onnx (+ external data, lazily) ─ onnx-ir ─ fuse | fold | expand (in place) ─ save ─ checker ─ onnxruntime
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir

import passes.onnx  # noqa: F401  (registers the ONNX passes)
from passes import registered
from passes.onnx import _graph as g
from rewriter import formats
from rewriter.errors import VerificationFailed
from rewriter.proof import prove
from rewriter.report import ModelStats, Report, Verification, model_stats
from rewriter.verify import InputSpec, OnnxRunner, run_session, verify_subgraphs


class _InPlace:
    """An onnx-ir pass as the driver calls passes: ``pass(model) → model``; its findings read through."""

    def __init__(self, onnx_pass: ir.passes.PassBase):
        self.onnx_pass = onnx_pass

    def __call__(self, model: ir.Model) -> ir.Model:
        self.onnx_pass(model)
        return model

    def __getattr__(self, name):  # rewrites, skipped, decisions, created, fused_convs
        return getattr(self.onnx_pass, name)


class _Sequence:
    """Several fuse passes run one after the other as the one pass the driver calls: their
    findings read as one (``rewrites``, ``skipped``, ``decisions``, ``created``, ``fused_convs``)."""

    def __init__(self, steps: list[_InPlace]):
        self.steps = steps

    def __call__(self, model: ir.Model) -> ir.Model:
        for step in self.steps:
            model = step(model)
        return model

    def __getattr__(self, name):  # rewrites, skipped, decisions, created, fused_convs: concatenated
        if name.startswith("__") or name == "steps":
            raise AttributeError(name)
        return [item for step in self.steps for item in getattr(step, name)]


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

    def input_specs(self, model: ir.Model) -> list[InputSpec]:
        # Before IR 4 the initializers are listed as inputs too, but the runtime takes no feed for them.
        constants = model.graph.initializers if model.ir_version < g.OVERRIDABLE_INITIALIZERS_IR else {}
        return [InputSpec(v.name, None if v.shape is None else [d if isinstance(d, int) else None for d in v.shape],
                          str(v.dtype)) for v in model.graph.inputs if constants.get(v.name) is not v]

    # -- passes (reader + planner + emitter in one onnx-ir pass each) ------------------------------

    def fuse_pass(self, model, *, rewrite: bool, options, accept=None):
        return _Sequence([_InPlace(registered(name)(rewrite=rewrite, accept=accept))
                          for name in passes.onnx.FUSE_PASSES])

    def fold_pass(self, model, fuse_pass, options):
        return _InPlace(registered("onnx.fold-batchnorm")(fuse_pass.fused_convs))

    def expand_pass(self, model, *, rewrite: bool, options, accept=None, exclude=None):
        expand = registered("onnx.expand-grouped-conv")
        return _InPlace(expand(rewrite=rewrite, keep_depthwise=options.keep_depthwise, min_groups=options.min_groups,
                               max_groups=options.max_groups, accept=accept, exclude=exclude or ()))

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

    def run(self, model_or_path, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        from rewriter.verify import _session

        session = _session(Path(model_or_path), "rewritten")
        names = [o.name for o in session.get_outputs()]
        return dict(zip(names, run_session(session, feeds, "rewritten")))

    def runner(self, path: Path, role: str, extra=()) -> OnnxRunner:
        """The file run in onnxruntime with ``extra`` tensors exposed (``rewriter.proof``)."""
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
