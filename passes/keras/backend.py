"""Keras as a backend of the driver (``gconv_rewrite.backend``): files read as data, models rebuilt.

    .keras | .h5 ─ config as data ─ (trust?) ─ rebuild + probe Lambdas ─ fuse | expand
        ─ rebuild with the replacements (emit) ─ .keras ─ Keras's load of the file vs the written one

A file with Lambda layers is refused unless the user trusts it (``--trust-lambdas``): a Lambda is
Python bytecode, and running it is running the file's code. Everything else of the model —
layers, names, configs, weights — is rebuilt as it was.
"""

from __future__ import annotations

import json
import os
import shutil
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from gconv_rewrite.backend import Unwritable
from gconv_rewrite.errors import BadInput, OutputError, RewriteError, one_line
from gconv_rewrite.passes.keras import _build, _config, _slices
from gconv_rewrite.passes.keras import model as km
from gconv_rewrite.passes.keras.expand_grouped_conv import ExpandGroupedConv
from gconv_rewrite.passes.keras.fuse_grouped_conv import FuseGroupedConv
from gconv_rewrite.passes.keras.reference import ReferenceRunner
from gconv_rewrite.proof import boundaries, prove, verification_sizes
from gconv_rewrite.report import ModelStats, Report, Skip, Verification
from gconv_rewrite.verify import InputSpec

_FORMAT_NAMES = {"onnx": "ONNX", "tflite": "TFLite", "savedmodel": "SavedModel"}

# What a .keras archive would otherwise take from the clock: metadata.json's date_saved and each
# member's zip timestamp (Keras stamps the weights file with the time it was written). Fixed, so
# the same input gives the same bytes; the zip format's own epoch, in Keras's date format.
FIXED_DATE_SAVED = "1980-01-01@00:00:00"
_ZIP_EPOCH = (1980, 1, 1, 0, 0, 0)


@dataclass
class KerasSource:
    """The file as data and what the passes found in it; ``replacements`` are the rewrites to
    build (fused groups, expanded convs), ``names`` the layer names taken so far."""

    path: Path
    kfile: _config.KerasFile
    graph: _config.KerasGraph
    analysis: Any  # gconv_rewrite.passes.keras.model._Analysis: shapes, Lambdas, slices
    has_lambdas: bool
    replacements: list = field(default_factory=list)
    names: set[str] = field(default_factory=set)
    rebound: dict = field(default_factory=dict)  # late-bound Lambda → its repaired function


@dataclass
class KerasResult:
    """The rebuilt model and where it came from (the conversions need both)."""

    model: Any  # keras.Model
    source: KerasSource
    options: Any
    lambdas_left: bool
    _reference: tuple[Any, str, str] | None = None

    @property
    def graph(self) -> _config.KerasGraph:
        return self.source.graph

    def reference(self) -> tuple[Any, str]:
        """The original model to compare against, and a note on how it was made (built once)."""
        if self._reference is None:
            s = self.source
            self._reference = km._reference(s.path, s.graph, s.kfile, s.analysis, s, self.options, s.has_lambdas)
        return self._reference[:2]

    @property
    def reference_name(self) -> str:
        """What runs the original in the comparison (``Verification.reference``)."""
        self.reference()
        return self._reference[2]


class KerasBackend:
    name = "keras"
    suffix = ".keras"
    verify_unchanged = True  # the rebuild itself is proven against Keras's own load of the file
    check = None  # no checker beyond Keras's own save
    # A reference process (gconv_rewrite.passes.keras.reference) the driver started for this run (gconv_rewrite.proof
    # .reference_ahead): it loads the original while this process reads and rewrites.
    reference_ahead = None

    def __init__(self, report: Report):
        self.report = report

    # -- reading -------------------------------------------------------------------------------

    def load(self, path: Path, options) -> KerasSource | None:
        """The file as data, analysed; None (reported) for a subclassed model."""
        kfile = _config.read_file(path)
        graph = km._read_graph(path, kfile, options, self.report)
        if graph is None:
            return None
        has_lambdas = bool(_config.lambda_names(kfile.config))
        analysis = km._analyse(path, graph, kfile, options)
        return KerasSource(path, kfile, graph, analysis, has_lambdas, names=set(graph.layers))

    def files_read(self, path: Path, model) -> list[Path]:
        return [path]

    def stats(self, model) -> ModelStats:
        if isinstance(model, KerasSource):
            return km._graph_stats(model.graph, model.kfile.weights)
        return km._model_stats(model.model)

    def result(self, model):
        return model.model if isinstance(model, KerasResult) else None

    # -- passes --------------------------------------------------------------------------------

    def fuse_passes(self, source: KerasSource, *, rewrite: bool, options, accept=None) -> list[FuseGroupedConv]:
        analysis = source.analysis
        return [FuseGroupedConv(source.graph, source.kfile.weights, analysis.slices, analysis.shape_of,
                                lambda_sources=analysis.lambda_sources,
                                repair_late_binding=options.repair_late_binding, accept=accept)]

    def fold_pass(self, source, fuse_passes, options):
        return None  # the fuse pass carries BatchNormalization tails itself

    def expand_pass(self, source: KerasSource, *, rewrite: bool, options, accept=None, after=()) -> ExpandGroupedConv:
        replaced = set().union(*(group.removed for fuse in after for group in fuse.groups))  # a target's fusions
        return ExpandGroupedConv(source.graph, source.kfile.weights, source.analysis.shape_of,
                                 keep_depthwise=options.keep_depthwise, min_groups=options.min_groups,
                                 max_groups=options.max_groups, accept=accept, exclude=replaced)

    def apply(self, keras_pass, source: KerasSource) -> KerasSource:
        """A Keras pass finds its rewrites; they are recorded on the source, built by ``emit``."""
        keras_pass.names |= source.names  # the layers an earlier pass made are taken too
        keras_pass.run()
        source.replacements += keras_pass.groups
        source.names |= keras_pass.names
        source.rebound.update(getattr(keras_pass, "rebound", {}))
        return source

    def emit(self, source: KerasSource, report: Report, options, *, apply: bool = True):
        """The model rebuilt with every replacement, weights loaded, compile settings carried."""
        analysis = source.analysis
        unrepaired = [name for name in analysis.placeholders if name not in source.rebound]
        if unrepaired:
            names = ", ".join(analysis.placeholders[unrepaired[0]])
            raise BadInput(f"{source.path}: Lambda layer {unrepaired[0]!r} reads {names}, a global the file does "
                           "not hold, and is no late-bound branch slice that can be re-bound to its position; "
                           "it cannot run")
        report.skipped.extend(Skip(name, reason, code="opaque-lambda") for name, reason in analysis.lambda_skips)
        report.skipped.extend(km._unbuilt_skips(analysis.built))
        if not apply:
            return source
        failure = analysis.built.first_failure()
        if failure is not None:
            return self._unbuildable(source, options, failure)
        self._ask_reference(source, report, options)
        lambda_as_slice = {key: (s.axis, s.ranges) for key, s in analysis.slices.items()
                           if isinstance(s, _slices.SliceCall) and s.kind == "Lambda"}
        # The analysis's layers, given the file's arrays once, are called again where the model
        # keeps them (the reference rebuilt from the file, when needed, is that same build).
        graph, weights = source.graph, source.kfile.weights
        _build.load_weights(analysis.built, graph, weights)
        rebuilt = _build.build(graph, _build.BuildOptions(
            lambda_functions=analysis.functions, lambda_as_slice=lambda_as_slice,
            replacements=source.replacements, trusted=options.trust_lambdas, reuse=analysis.built.layers))
        _build.load_weights(rebuilt, graph, weights, reused=analysis.built.layers)
        km._carry_compile_settings(rebuilt.model, source.kfile, report)
        return KerasResult(rebuilt.model, source, options, km._has_lambda(rebuilt.model))

    def _ask_reference(self, source: KerasSource, report: Report, options) -> None:
        """The rewrites are known: the reference process (if any) is asked for the original's run
        now, so that it runs while the model is rebuilt and written; the proof finds it asked."""
        if self.reference_ahead is None or source.rebound or not options.verify:
            return
        try:
            sizes = verification_sizes(_input_specs(source.graph), None, options)
        except RewriteError:
            return  # inputs that cannot be made (a dynamic dim without --shape): the proof says so
        self.reference_ahead.request(list(boundaries(report.rewrites)), sizes)

    def _unbuildable(self, source: KerasSource, options, failure: BadInput) -> Unwritable:
        """Keras 3 cannot rebuild the model (a tf-keras TFOpLambda without a rebuild, say): with
        nothing to rewrite, the accepted .keras archive is written as it was read (as the ONNX
        path writes an unchanged model); an .h5 cannot become a .keras without the rebuild."""
        converted = options.to in _FORMAT_NAMES
        first = next(iter(source.analysis.built.unbuilt))[0]
        if source.graph.layers[first].class_name == "Lambda":
            # --check and --dry-run report it and go on; a file whose Lambda cannot run cannot be
            # run either, so nothing (not even the file as it was) is written as if proven.
            raise BadInput(f"{source.path}: {failure.message}") from failure
        if source.replacements or converted:
            what = (f"the {'fused' if self.report.mode == 'fuse' else 'expanded'} model" if source.replacements
                    else f"the {_FORMAT_NAMES[options.to]} model")
            raise BadInput(f"{source.path}: cannot write {what}, which needs the model rebuilt in Keras 3: "
                           f"{failure.message}") from failure
        kfile = source.kfile
        return Unwritable(note=f"an .h5 becomes a .keras only when rebuilt in Keras 3 ({failure.message})",
                          write=kfile.write_accepted if kfile.kind == "keras" else None)

    # -- writing and running -------------------------------------------------------------------

    def save(self, result: KerasResult, path: Path) -> None:
        """Keras's own save, then the archive made deterministic (``deterministic_archive``)."""
        try:
            result.model.save(path)
            deterministic_archive(path)
        except Exception as exc:
            raise OutputError(f"{path}: cannot write the rewritten model ({one_line(exc)})") from exc

    def verify(self, original: Path, result: KerasResult, written: Path, options, report: Report) -> Verification:
        """``gconv_rewrite.proof``: the reference (tf-keras's or Keras's load of the file, or the rebuild)
        against the written file loaded back, model outputs and each rewrite's boundary layer. The
        reference is run by the reference process where the driver started one
        (``reference_ahead``), else here."""
        process, self.reference_ahead = self.reference_ahead, None  # it answers one run
        runners = _Runners(result, written, process if not result.source.rebound else None)
        verification = prove(runners, original, written, options, report.rewrites)
        note, verification.reference, verification.reference_pid = runners.reference_info()
        verification.note = "; ".join(n for n in (note, verification.note) if n)
        return verification


class _Runners:
    """``gconv_rewrite.proof``'s ``runner(path, role, extra)`` for a Keras run: the original in the
    reference process (``gconv_rewrite.passes.keras.reference``) or here, the written file loaded back here."""

    def __init__(self, result: KerasResult, written: Path, process):
        self.result, self.written, self.process = result, written, process
        self.remote: ReferenceRunner | None = None

    def runner(self, path: Path, role: str, extra=()):
        result = self.result
        if role == "rewritten":
            return km.KerasRunner(km._load_written(self.written, trusted=result.lambdas_left), result.graph, role,
                                  extra)
        if self.process is None:
            return km.KerasRunner(result.reference()[0], result.graph, role, extra)
        specs = _input_specs(result.graph)
        self.remote = ReferenceRunner(self.process, [ref.layer for ref in result.graph.outputs], specs, extra,
                                      fallback=self._rebuilt)
        return self.remote

    def _rebuilt(self, note: str, extra: list[str]):
        """Where the reference process could not load the file (``note`` says why): the rebuild."""
        s = self.result.source
        self.result._reference = km.rebuilt_reference(s.graph, s.kfile, s.analysis, note)
        return km.KerasRunner(self.result._reference[0], s.graph, "original", extra), note, self.result._reference[2]

    def reference_info(self) -> tuple[str, str, int | None]:
        """(the note on the reference, what ran it, the process that did where not this one)."""
        if self.remote is not None:
            return self.remote.note, self.remote.name, self.remote.pid
        note = self.result.reference()[1]
        return note, self.result.reference_name, None


def _input_specs(graph: _config.KerasGraph) -> list[InputSpec]:
    """The model's inputs as the proof makes inputs for them (names, shapes with None, dtypes)."""
    return [InputSpec(name, shape, dtype) for name, shape, dtype in km._input_specs(graph)]


def deterministic_archive(path: Path) -> None:
    """Rewrite the .keras zip at ``path`` without what the clock put in it: metadata.json's
    ``date_saved`` becomes ``FIXED_DATE_SAVED``, every member gets the zip epoch as its time and
    the same permissions; member order, names, contents and compression are kept. (The HDF5
    weights file itself was measured byte-identical across runs, h5py creating datasets with
    ``track_times=False``: only its zip timestamp differed; tests/test_redteam_files.py pins it.)"""
    normalised = path.with_name(".gconv-deterministic.keras")  # a short name: ``path`` may be 255 bytes
    try:
        with zipfile.ZipFile(path) as source, zipfile.ZipFile(normalised, "w") as target:
            for info in source.infolist():
                member = zipfile.ZipInfo(info.filename, date_time=_ZIP_EPOCH)
                member.compress_type = info.compress_type
                member.external_attr = 0o644 << 16
                if info.filename == "metadata.json":
                    metadata = json.loads(source.read(info))
                    if isinstance(metadata, dict) and "date_saved" in metadata:
                        metadata["date_saved"] = FIXED_DATE_SAVED
                    target.writestr(member, json.dumps(metadata))
                    continue
                large = info.file_size >= zipfile.ZIP64_LIMIT
                with source.open(info) as reader, target.open(member, "w", force_zip64=large) as writer:
                    shutil.copyfileobj(reader, writer, 1 << 22)
        os.replace(normalised, path)
    finally:
        normalised.unlink(missing_ok=True)
