"""The Python API, mirroring the CLI: ``fuse``, ``expand``, ``check``, ``verify``.

    >>> from rewriter import fuse
    >>> result = fuse("model.onnx", output="model.fused.onnx")
    >>> result.report.rewrites[0].groups
    32
"""

from __future__ import annotations

import gc
import tempfile
from collections.abc import Callable, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir

from rewriter import formats, quiet, targets
from rewriter.errors import BadInput, RewriteError, VerificationFailed
from rewriter.report import Report, Verification, model_stats
from rewriter.verify import load_inputs_file, verify_onnx, verify_subgraphs


@dataclass(frozen=True, kw_only=True)
class Options:
    """Settings shared by every entry point (keyword-only, no globals)."""

    verify: bool = True
    atol: float = 1e-4
    rtol: float = 1e-3
    seed: int = 0
    shapes: Mapping[str, list[int]] = field(default_factory=dict)
    inputs: Path | str | Mapping[str, np.ndarray] | None = None  # .npz path or arrays
    force: bool = False
    # Expansion (--expand): which grouped convolutions to expand.
    keep_depthwise: bool = False
    min_groups: int = 2
    max_groups: int | None = None
    # TensorFlow / Keras inputs.
    to: str | None = None  # output format: "onnx", "savedmodel", "keras", "tflite"; None = same as input
    signature: str = "serving_default"
    trust_lambdas: bool = False  # allow running Lambda bytecode found in a Keras file
    repair_late_binding: bool = False
    # Fusion: fold a BatchNormalization (or per-channel Mul/Add) that reads only a fused conv.
    fold_bn: bool = True
    # A deployment target (rewriter.targets): fuse what it runs natively, expand what it does not.
    target: str | None = None
    # --auto: a measured target (rewriter.auto): each grouped conv timed in both forms on onnxruntime.
    auto: bool = False
    # --benchmark: time the original and the written model on the output format's runtime.
    benchmark: bool = False
    threads: int | None = None  # intra-op threads of the timed runtime (--threads); None: its default
    # Called as progress(phase, seconds so far) after each phase (the CLI's terminal display).
    progress: Callable[[str, float], None] | None = field(default=None, compare=False)


@dataclass
class Result:
    model: ir.Model
    report: Report

    @property
    def changed(self) -> bool:
        return bool(self.report.rewrites)


def _options(options: Options | None, overrides: dict) -> Options:
    base = options or Options()
    return Options(**{**base.__dict__, **overrides}) if overrides else base


def _passes(mode: str, rewrite: bool, options: Options, target=None):
    if options.target is not None or target is not None:
        return _target_passes(rewrite, options, target)
    if mode == "fuse":
        from passes.onnx import FoldBatchNormPass, FuseSplitConvPass

        fuse_pass = FuseSplitConvPass(rewrite=rewrite)
        if not (rewrite and options.fold_bn):
            return [fuse_pass]
        # Built when it runs: it folds into the convolutions the fusion wrote.
        return [fuse_pass, lambda: FoldBatchNormPass(fuse_pass.fused_convs)]
    from passes.onnx import ExpandGroupedConvPass

    return [ExpandGroupedConvPass(rewrite=rewrite, keep_depthwise=options.keep_depthwise,
                                  min_groups=options.min_groups, max_groups=options.max_groups)]


def _target_passes(rewrite: bool, options: Options, target=None):
    """--target: one run, both directions. Fuse the hand-made groups the target runs natively,
    then expand the native grouped convs it wants split (leaving the ones just fused alone).
    ``target``: any object with ``name`` and ``decide(props)`` (--auto's measured target)."""
    from passes.onnx import ExpandGroupedConvPass, FoldBatchNormPass, FuseSplitConvPass

    target = target or targets.get(options.target)

    def wants(form: str):
        return targets.target_accept(target, form)

    fuse_pass = FuseSplitConvPass(rewrite=rewrite, accept=wants(targets.NATIVE))
    passes = [fuse_pass]
    if rewrite and options.fold_bn:
        passes.append(lambda: FoldBatchNormPass(fuse_pass.fused_convs))
    passes.append(lambda: ExpandGroupedConvPass(
        rewrite=rewrite, keep_depthwise=options.keep_depthwise, min_groups=options.min_groups,
        max_groups=options.max_groups, accept=wants(targets.SPLIT), exclude=fuse_pass.created))
    return passes


def _resolve_inputs(options: Options):
    if options.inputs is None or isinstance(options.inputs, Mapping):
        return options.inputs
    return load_inputs_file(Path(options.inputs))


class _Source:
    """The model to rewrite and a file of its original form, for onnxruntime to read."""

    def __init__(self, model: str | Path | ir.Model, scratch: Path):
        if isinstance(model, ir.Model):
            # Work on a copy, so the caller's object is never changed.
            self.path = scratch / "original.onnx"
            formats.save_onnx(model, self.path)
            self.label = model.graph.name or "<model>"
        else:
            self.path = Path(model)
            self.label = str(model)
        self.model = formats.load_onnx(self.path)


def rewrite(model: str | Path | ir.Model, *, mode: str = "fuse", output: str | Path | None = None,
            apply: bool = True, options: Options | None = None, **overrides) -> Result:
    """Find, plan and (with ``apply``) rewrite; verify; write ``output`` atomically if given.

    Raises ``VerificationFailed`` (nothing written) when the rewritten model differs.
    """
    options = _options(options, overrides)
    fmt = "onnx" if isinstance(model, ir.Model) else formats.detect_format(Path(model))
    if fmt == "onnx" and options.to == "tflite":  # one converter already does this well: say how to chain it
        stem = Path(str(model)).stem if not isinstance(model, ir.Model) else "model"
        raise BadInput(f"{model}: --to tflite converts SavedModel and Keras inputs; for ONNX, chain onnx2tf: "
                       f"gconv-rewrite {model} --target tflite, then onnx2tf -i {stem}.tflite.onnx "
                       "(its .tflite files land in saved_model/)")
    if options.auto:
        _check_auto(model, fmt, options)
    if options.target is not None:

        targets.get(options.target)  # an unknown name: one line listing the known ones
        if fmt != "onnx" and options.to == "onnx":  # the ONNX writer fuses what the converter leaves split
            raise BadInput(f"{model}: --target with --to onnx is not supported; convert this {fmt} model with "
                           f"--to onnx first, then run --target {options.target} on the ONNX model")
    if fmt != "onnx" or (options.to not in (None, "onnx")):
        result = _rewrite_tensorflow(fmt, Path(model), mode=mode, output=output, apply=apply, options=options)
    else:
        with _collector_paused():
            result = _rewrite_onnx(model, mode=mode, output=output, apply=apply, options=options)
    if options.benchmark and apply:
        _benchmark(model, fmt, result, options)
    return result


def _check_auto(model, fmt: str, options: Options) -> None:
    """--auto measures, then must prove what it chose: ONNX only, never without verification."""
    if options.target is not None:
        raise BadInput("--auto is a measured target; drop --target")
    if fmt != "onnx" or options.to not in (None, "onnx"):
        raise BadInput(f"{model}: --auto measures on onnxruntime and works on ONNX models only for now; convert "
                       f"this {fmt} model with --to onnx first")
    if not options.verify:
        raise BadInput("--auto needs verification (it applies forms chosen by timing, then proves the model): "
                       "drop --no-verify")


def _benchmark(model, fmt: str, result: Result, options: Options) -> None:
    """--benchmark: the original against the written model on the output format's runtime."""
    from rewriter import benchmark

    report = result.report
    out_fmt = benchmark.output_format(fmt, options.to)
    with report.timed("benchmark"), formats.scratch_dir() as scratch:
        before = model if not isinstance(model, ir.Model) else scratch / "before.onnx"
        if isinstance(model, ir.Model):
            formats.save_onnx(model, before)
        after = Path(report.output) if report.written and report.output else None
        if out_fmt == "tflite":  # before: the original converted as it is (its hand-made groups and all)
            before, fmt = _tflite_original(result, scratch), "tflite"
            if after is None and getattr(result.model, "content", None):  # the API without an output
                after = scratch / "after.tflite"
                after.write_bytes(result.model.content)
            if before is None:
                report.benchmark = {"runtime": benchmark.RUNTIMES["tflite"].name, "threads": options.threads,
                                    "runs": 0, "before_ms": None, "after_ms": None, "ratio": None,
                                    "note": getattr(result.model, "original_note", "") or
                                    "the original was not converted to TFLite"}
                return
        if after is None and out_fmt == "onnx" and isinstance(result.model, ir.Model):
            after = scratch / "after.onnx"  # not written (the API without an output): time it from scratch
            formats.save_onnx(result.model, after)
        if after is None:
            report.benchmark = {"runtime": benchmark.RUNTIMES[out_fmt].name if out_fmt in benchmark.RUNTIMES
                                else out_fmt, "threads": options.threads, "runs": 0, "before_ms": None,
                                "after_ms": None, "ratio": None, "note": "nothing was written to time"}
            return
        try:
            report.benchmark = benchmark.benchmark(Path(before), after, out_fmt, options, input_format=fmt)
        except RewriteError as error:  # the output is written and verified: say why it was not timed
            report.benchmark = {"runtime": benchmark.RUNTIMES[out_fmt].name, "threads": options.threads, "runs": 0,
                                "before_ms": None, "after_ms": None, "ratio": None, "note": error.message}


def _tflite_original(result: Result, scratch: Path) -> Path | None:
    """The original model's own TFLite conversion, which the backend made for --benchmark."""
    original = getattr(result.model, "original", None)
    if original is None:
        return None
    path = scratch / "before.tflite"
    path.write_bytes(original)
    return path


@contextmanager
def _collector_paused():
    """A graph is a web of cycles (values know their users, nodes their graph): Python's cycle
    collector would rescan all of it again and again while it grows, making big models cost
    more per node. Nothing here needs it until the rewrite is done."""
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()


def _rewrite_onnx(model, *, mode: str, output, apply: bool, options: Options) -> Result:
    with formats.scratch_dir() as scratch:
        report = Report(input=str(model) if not isinstance(model, ir.Model) else "<model>", mode=mode)
        report.on_phase = options.progress
        output_path = Path(output) if output is not None else None
        if output_path is not None:
            formats.check_output_path(output_path, [Path(model)] if not isinstance(model, ir.Model) else [],
                                      options.force, deep=False)
        given_inputs = _resolve_inputs(options) if options.verify else None
        with report.timed("load"):
            source = _Source(model, scratch)
            working = source.model
            threshold = formats.external_layout(working)
            report.before = model_stats(working)
        # Everything the input reads (its external data too) is never written over or removed.
        read = _files_read(model, working, options)
        if output_path is not None:
            formats.check_not_read(output_path, read)
        measured = None
        if options.auto:  # time both forms of every grouped conv first; the rewrite applies the winners
            from rewriter import auto

            with report.timed("measure"):
                measured = auto.measure(source.path, options, given_inputs)
        if options.target is not None or measured is not None:
            report.target = {"name": options.target or measured.name, "nodes": []}
        with report.timed("rewrite"):
            for rewrite_pass in _passes(mode, apply, options, measured):
                if not isinstance(rewrite_pass, ir.passes.PassBase):
                    rewrite_pass = rewrite_pass()
                rewrite_pass(working)
                report.rewrites.extend(rewrite_pass.rewrites)
                report.skipped.extend(rewrite_pass.skipped)
                if report.target is not None:  # per node: the form the target wants, and why
                    judged = targets.target_nodes(getattr(rewrite_pass, "decisions", []), report.target["name"])
                    if measured is not None:  # --auto: both timings per node
                        measured.annotate(judged)
                    report.target["nodes"].extend(judged)
            report.after = model_stats(working) if apply else report.before

        if not apply:
            return Result(working, report)

        def write_and_verify(folder: Path, name: str) -> Path:
            path = folder / name
            external = f"{name}.data" if threshold is not None else None
            with report.timed("save"):
                formats.save_onnx(working, path, external_data=external, threshold=threshold or 0)
                if external and (folder / external).exists():
                    # Named after its content: never the name of data another model reads.
                    formats.name_external_data_by_content(path, external)
            with report.timed("checker"):
                try:
                    onnx.checker.check_model(str(path))
                except Exception as exc:
                    raise VerificationFailed(f"the rewritten model fails onnx.checker: "
                                             f"{str(exc).strip().splitlines()[0][:200]}") from exc
            with report.timed("verify"):
                report.verification = _verify(source.path, path, report, options, given_inputs)
            return path

        if output_path is not None:
            with formats.atomic_output(output_path, protected=read) as staging:
                write_and_verify(staging, output_path.name)
            report.output, report.written = str(output_path), True
        elif options.verify and report.rewrites:
            write_and_verify(scratch, "rewritten.onnx")
        else:
            report.verification = _skipped_verification(report, options)
        return Result(working, report)


def _files_read(model, loaded: ir.Model, options: Options) -> list[Path]:
    read = formats.input_files(Path(model), loaded) if not isinstance(model, ir.Model) else []
    if isinstance(options.inputs, (str, Path)) and Path(options.inputs).exists():
        read.append(Path(options.inputs))
    return read


def _rewrite_tensorflow(fmt: str, path: Path, *, mode: str, output, apply: bool, options: Options) -> Result:
    """SavedModel and Keras inputs: their own load/match/emit/verify, same report and errors."""
    if fmt == "onnx":
        raise BadInput(f"{path}: --to {options.to} needs a SavedModel or Keras input; ONNX stays ONNX")
    try:
        quiet.import_tensorflow()  # before any backend module: its native log never reaches stderr
        if options.benchmark and options.threads:  # TensorFlow's threads are fixed once it runs anything
            from rewriter.benchmark import set_tensorflow_threads

            set_tensorflow_threads(options.threads)
        if fmt == "savedmodel" and options.to == "tflite":
            from passes.tflite.from_savedmodel import rewrite_savedmodel_to_tflite as backend
        elif fmt == "savedmodel":
            from passes.tf.savedmodel import rewrite_savedmodel as backend
        else:
            from passes.keras.model import rewrite_keras as backend
    except ImportError as exc:
        missing = getattr(exc, "name", None) or str(exc)
        raise BadInput(f"{path}: {fmt} models need the TensorFlow extra "
                       f"(pip install 'gconv-rewrite[tensorflow]'); missing: {missing}") from exc
    report = Report(input=str(path), mode=mode)
    report.on_phase = options.progress
    if options.target is not None:  # filled per node by the backend's passes
        report.target = {"name": options.target, "nodes": []}
    output_path = Path(output) if output is not None else None
    if output_path is not None and options.to == "tflite":
        from passes.tflite.convert import check_output

        check_output(output_path)
    if output_path is not None and options.to == "savedmodel" and fmt == "keras":
        from passes.keras.to_savedmodel import check_output as check_folder_output

        check_folder_output(output_path)
    if output_path is not None:
        inputs = [path, *([Path(options.inputs)] if isinstance(options.inputs, (str, Path)) else [])]
        formats.check_output_path(output_path, inputs, options.force)
    model = backend(path, mode=mode, output=output_path, apply=apply, options=options, report=report)
    if report.verification is not None and report.verification.ran and report.verification.passed:
        for r in report.rewrites:  # one graph, no branches: the verification run ran every rewrite
            if r.exercised is None:
                r.exercised, r.exercised_by = True, "model run"
    return Result(model, report)


def _skipped_verification(report: Report, options: Options) -> Verification:
    note = "--no-verify" if not options.verify else "no rewrite: the model is unchanged"
    return Verification(ran=False, passed=None, atol=options.atol, rtol=options.rtol, note=note)


def _verify(original: Path, rewritten: Path, report: Report, options: Options, given_inputs) -> Verification:
    if not options.verify or not report.rewrites:
        return _skipped_verification(report, options)
    verification = verify_onnx(original, rewritten, atol=options.atol, rtol=options.rtol, seed=options.seed,
                               shapes=options.shapes, inputs=given_inputs)
    if verification.passed:
        # One run takes one branch of each If: rewrites in subgraphs are run on their own too.
        with tempfile.TemporaryDirectory(prefix="gconv-subgraphs-") as scratch:
            verify_subgraphs(original, rewritten, report.rewrites, verification, seed=options.seed,
                             scratch=Path(scratch))
    if not verification.passed:
        report.verification = verification
        failing = [o.name for o in verification.outputs if not o.passed]
        detail = verification.note or f"outputs {', '.join(failing)} differ beyond atol/rtol"
        raise VerificationFailed(f"verification failed: {detail}; nothing was written", verification)
    return verification


def fuse(model: str | Path | ir.Model, *, output: str | Path | None = None, options: Options | None = None,
         **overrides) -> Result:
    """Fuse every hand-made grouped convolution into a native one. See ``rewrite``."""
    return rewrite(model, mode="fuse", output=output, options=options, **overrides)


def expand(model: str | Path | ir.Model, *, output: str | Path | None = None, options: Options | None = None,
           **overrides) -> Result:
    """Expand native grouped convolutions into Split → N Conv → Concat. See ``rewrite``."""
    return rewrite(model, mode="expand", output=output, options=options, **overrides)


def check(model: str | Path | ir.Model, *, mode: str = "fuse") -> Report:
    """Find what ``fuse`` would rewrite, without changing or writing anything."""
    return rewrite(model, mode=mode, apply=False).report


def verify(original: str | Path | ir.Model, rewritten: str | Path | ir.Model, *,
           options: Options | None = None, **overrides) -> Verification:
    """Run both models in onnxruntime on the same inputs and compare every output."""
    options = _options(options, overrides)
    with formats.scratch_dir() as scratch_dir:
        paths = []
        for i, model in enumerate((original, rewritten)):
            if isinstance(model, ir.Model):
                path = Path(scratch_dir) / f"model{i}.onnx"
                formats.save_onnx(model, path)
                paths.append(path)
            else:
                paths.append(formats.load_onnx(Path(model)) and Path(model))
        return verify_onnx(paths[0], paths[1], atol=options.atol, rtol=options.rtol, seed=options.seed,
                           shapes=options.shapes, inputs=_resolve_inputs(options))
