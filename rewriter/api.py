"""The Python API, mirroring the CLI: ``fuse``, ``expand``, ``check``, ``verify``.

    >>> from gconv_rewrite import fuse
    >>> result = fuse("model.onnx", output="model.fused.onnx")
    >>> result.report.rewrites[0].groups
    32

A model is a path, or an ONNX model in memory: an ``onnx.ModelProto`` (as onnxsim and onnxslim
take it; ``Result.model`` is then a ModelProto too) or an ``onnx_ir.Model``. The caller's object
is never changed; it is saved to a scratch file, read from there, and verified as a file is.
The library prints nothing: what it has to say is in the report, in the errors it raises
(``gconv_rewrite.errors``) and in log records (module loggers under ``rewriter`` and ``passes``).
"""

from __future__ import annotations

import importlib
import os
import sys
from collections.abc import Callable, Mapping
from contextlib import ExitStack, nullcontext
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from gconv_rewrite import formats, html, proof, quiet, targets
from gconv_rewrite.backend import Unwritable, conversions, format_backend, rewriter_backend
from gconv_rewrite.errors import BadInput, RewriteError, VerificationFailed
from gconv_rewrite.memory import frozen_heap, paused_gc
from gconv_rewrite.report import Report, Verification
from gconv_rewrite.verify import load_inputs_file, verify_onnx

if TYPE_CHECKING:
    import onnx
    import onnx_ir as ir

    ModelInput = str | Path | ir.Model | onnx.ModelProto  # a file, or an ONNX model in memory


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
    # A deployment target (gconv_rewrite.targets): fuse what it runs natively, expand what it does not.
    target: str | None = None
    # --auto: a measured target (gconv_rewrite.auto): each grouped conv timed in both forms on onnxruntime.
    auto: bool = False
    # --benchmark: time the original and the written model on the output format's runtime.
    benchmark: bool = False
    threads: int | None = None  # intra-op threads of the timed runtime (--threads); None: its default
    # --html: the review page of this run (gconv_rewrite.html), written after the run like the output.
    html: Path | str | None = None
    # Called as progress(phase, seconds so far) after each phase (the CLI's terminal display).
    progress: Callable[[str, float], None] | None = field(default=None, compare=False)


@dataclass
class Result:
    model: ir.Model | onnx.ModelProto | Any  # the input's kind: a ModelProto in, a ModelProto out
    report: Report

    @property
    def changed(self) -> bool:
        return bool(self.report.rewrites)


def _in_memory(model) -> bool:
    """An onnx-ir model given in memory (onnx-ir is imported only where ONNX is read, so a model
    can be one only once it is)."""
    ir = sys.modules.get("onnx_ir")
    return ir is not None and isinstance(model, ir.Model)


def _is_proto(model) -> bool:
    onnx = sys.modules.get("onnx")  # a ModelProto exists only once onnx is imported
    return onnx is not None and isinstance(model, onnx.ModelProto)


def _in_ir(model):
    """The model as the driver reads it: a path, or an onnx-ir model (a ModelProto becomes one;
    the proto itself is left as it is); anything else is refused with a TypeError, as Python does."""
    if _is_proto(model):
        from onnx_ir import serde

        return serde.deserialize_model(model)
    if _in_memory(model) or isinstance(model, (str, os.PathLike)):
        return model
    raise TypeError(f"a model is a path, an onnx.ModelProto or an onnx_ir.Model, not {type(model).__name__}")


def _options(options: Options | None, overrides: dict) -> Options:
    base = options or Options()
    return Options(**{**base.__dict__, **overrides}) if overrides else base


def _resolve_inputs(options: Options):
    if options.inputs is None or isinstance(options.inputs, Mapping):
        return options.inputs
    return load_inputs_file(Path(options.inputs))


def rewrite(model: ModelInput, *, mode: str = "fuse", output: str | Path | None = None,
            apply: bool = True, options: Options | None = None, **overrides) -> Result:
    """Find, plan and (with ``apply``) rewrite; verify; write ``output`` atomically if given.

    Raises ``VerificationFailed`` (nothing written) when the rewritten model differs.
    """
    options = _options(options, overrides)
    given_proto, model = _is_proto(model), _in_ir(model)
    fmt = "onnx" if _in_memory(model) else formats.detect_format(Path(model))
    _check_options(model, fmt, options)
    read = [] if _in_memory(model) else formats.input_files(Path(model))
    if options.html is not None:  # refused before anything is loaded, like a bad -o
        html.check_page_path(Path(options.html), read, options.force, [Path(output)] if output is not None else [])
    result = _drive(model, fmt, mode=mode, output=Path(output) if output is not None else None,
                    apply=apply, options=options)
    if options.benchmark and apply:
        _benchmark(model, fmt, result, options)
    if options.html is not None:
        page = Path(options.html)
        with result.report.timed("html"):
            text = html.render_page(result.report.to_dict())
            html.write_page(page, text, protected=read, force=options.force)
    return _as_given(result, given_proto)


def _as_given(result: Result, given_proto: bool) -> Result:
    """What came in goes out: a ModelProto given, a ModelProto in ``Result.model``."""
    if given_proto and result.model is not None:
        from onnx_ir import serde

        result.model = serde.serialize_model(result.model)
    return result


def _check_options(model, fmt: str, options: Options) -> None:
    """Combinations refused before anything is loaded, each in one line."""
    if fmt == "onnx" and options.to == "tflite":  # one converter already does this well: say how to chain it
        stem = Path(str(model)).stem if not _in_memory(model) else "model"
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


# -- the driver: options → backend → passes → staging → verification → atomic commit → report ------

def _reference_ahead(fmt: str, source: Path, options: Options, *, apply: bool):
    """The format's early reference run (its row's ``reference_ahead``), or nothing to start."""
    hook = formats.row(fmt).reference_ahead
    if hook is None:
        return nullcontext(None)
    module, name = hook.split(":")
    return getattr(importlib.import_module(module), name)(source, options, apply=apply)


def _drive(model, fmt: str, *, mode: str, output: Path | None, apply: bool, options: Options,
           measure_only: bool = False) -> Result:
    report = Report(input=str(model) if not _in_memory(model) else "<model>", mode=mode)
    report.on_phase = options.progress
    with formats.scratch_dir() as scratch, ExitStack() as collector:
        source = _source_path(model, scratch)
        # Keras: the original loads in a process of its own meanwhile, to be compared with at the end.
        ahead = collector.enter_context(_reference_ahead(fmt, source, options, apply=apply))
        backend, hops = _backends(fmt, source, options, report)
        if ahead is not None:
            backend.reference_ahead = ahead
        collector.enter_context(_collector_for(fmt))
        if output is not None:
            _check_output(model, fmt, source, output, hops, options)
        with report.timed("load"):
            loaded = backend.load(source, options)
            if loaded is None:  # nothing the tool can rewrite (a subclassed Keras model): reported
                return Result(None, report)
            report.before = backend.stats(loaded)
        # Everything the input reads (its external data too) is never written over or removed.
        read = [] if _in_memory(model) else backend.files_read(source, loaded)
        read += [p for p in _user_inputs(options) if p.exists()]
        if output is not None:
            formats.check_not_read(output, read)
        if options.verify:
            options = replace(options, inputs=_resolve_inputs(options))
        target = _target(source, options, report)
        with report.timed("rewrite"):
            for rewrite_pass in _passes(backend, loaded, mode, apply, options, target):
                loaded = backend.apply(rewrite_pass, loaded)
                _record(rewrite_pass, report, target)
            rewritten = backend.emit(loaded, report, options, apply=apply)
            if not isinstance(rewritten, Unwritable):
                report.after = backend.stats(rewritten) if apply else report.before
        if not apply:
            return Result(backend.result(rewritten), report)
        if measure_only:  # dry_run: the counts after are taken; the size too, from scratch
            return _measured(backend, source, rewritten, scratch, report)
        if isinstance(rewritten, Unwritable):
            _write_unchanged(rewritten, output, report, options)
            return Result(None, report)
        final = _write(backend, hops, source, rewritten, output, read, scratch, options, report)
        if report.written:
            report.sizes = {"before": _bytes(source), "after": _bytes(Path(report.output))}
        if report.verification is not None and report.verification.ran and report.verification.passed:
            for r in report.rewrites:  # those in no subgraph: the verification run ran every one
                if r.exercised is None:
                    r.exercised, r.exercised_by = True, "model run"
        final_backend = format_backend(hops[-1].target, report) if hops else backend
        return Result(final_backend.result(final), report)


def dry_run(model: ModelInput, *, mode: str = "fuse", options: Options | None = None,
            **overrides) -> Result:
    """What ``rewrite`` would do, found without writing anything: the passes rewrite the model in
    memory (BatchNorm folds too, counted as their own rewrites), the counts after are taken from
    it, and it is saved in scratch only to measure its size. Nothing is verified or converted
    (``--to``: the sizes are the input format's)."""
    options = _options(options, overrides)  # (the driver returns before verifying; --html, --benchmark: rewrite's)
    given_proto, model = _is_proto(model), _in_ir(model)
    fmt = "onnx" if _in_memory(model) else formats.detect_format(Path(model))
    _check_options(model, fmt, options)
    result = _drive(model, fmt, mode=mode, output=None, apply=True, options=options, measure_only=True)
    return _as_given(result, given_proto)


def _bytes(path: Path) -> int:
    """The bytes a model occupies: its file and external data, or every file of its folder."""
    return sum(f.stat().st_size for f in formats.input_files(path) if f.is_file())


def _measured(backend, source: Path, rewritten, scratch: Path, report: Report) -> Result:
    """dry_run's end: the rewritten model saved in scratch, only to measure it."""
    before = _bytes(source)
    if isinstance(rewritten, Unwritable):
        report.after, report.sizes = report.before, {"before": before, "after": before}
        return Result(None, report)
    path = scratch / f"dry-run{backend.suffix}"
    with report.timed("save"):
        backend.save(rewritten, path)
    report.sizes = {"before": before, "after": _bytes(path)}
    return Result(backend.result(rewritten), report)


def _collector_for(fmt: str):
    """How Python's cycle collector runs while the model is read, rewritten and written. An
    onnx-ir graph is a web of cycles (values know their users, nodes their graph) that the
    collector would rescan again and again while it grows: paused, nothing needs it meanwhile.
    TensorFlow's formats must keep it (their conversions leave cyclic garbage only it frees:
    ConvNeXt-Tiny .h5 --to onnx peaked at 15.6 GB with it paused, 6.1 GB with it running); there
    the million objects of TensorFlow and Keras, imported by now, are frozen out of its full
    collections (5.1 GB, 29 s against 41 s), and the Keras backend pauses it around each build."""
    return paused_gc() if fmt == "onnx" else frozen_heap()


def _user_inputs(options: Options) -> list[Path]:
    return [Path(options.inputs)] if isinstance(options.inputs, (str, Path)) else []


def _check_output(model, fmt: str, source: Path, output: Path, hops, options: Options) -> None:
    """Refuse a bad ``-o`` before anything is loaded: the output format's own naming rules,
    then an existing file without --force, or a file the input reads."""
    if hops:  # the output is the last conversion's
        hops[-1].check_output(output)
    if fmt == "keras" and not hops and output.suffix.lower() != formats.WRITE_SUFFIX["keras"]:
        raise BadInput(f"{output}: Keras models are written as .keras files; name the output NAME.keras")
    read = [] if _in_memory(model) else [source, *_user_inputs(options)]
    # ONNX's external data is compared once the model is loaded (check_not_read in _drive).
    formats.check_output_path(output, read, options.force, deep=fmt != "onnx")


def _source_path(model, scratch: Path) -> Path:
    """The input as a file the runtimes can read: an in-memory ONNX model is saved in scratch
    first, so the caller's object is never changed."""
    if not _in_memory(model):
        return Path(model)
    path = scratch / "original.onnx"
    formats.save_onnx(model, path)
    return path


def _backends(fmt: str, source: Path, options: Options, report: Report):
    """The input format's backend and the ``--to`` hops; TensorFlow is imported here, quietly."""
    if fmt == "onnx":
        return rewriter_backend(fmt, report), conversions(fmt, options.to, str(source))
    try:
        quiet.import_tensorflow()  # before any backend module: its native log never reaches stderr
        if options.benchmark and options.threads:  # TensorFlow's threads are fixed once it runs anything
            from gconv_rewrite.benchmark import set_tensorflow_threads

            set_tensorflow_threads(options.threads)
        return rewriter_backend(fmt, report), conversions(fmt, options.to, str(source))
    except ImportError as exc:
        missing = getattr(exc, "name", None) or str(exc)
        raise BadInput(f"{source}: {fmt} models need the TensorFlow extra "
                       f"(pip install 'gconv-rewrite[tensorflow]'); missing: {missing}") from exc


def _target(source: Path, options: Options, report: Report):
    """--target's rule, or --auto's measured one (each grouped conv timed in both forms first)."""
    if options.auto:
        from gconv_rewrite import auto

        with report.timed("measure"):
            target = auto.measure(source, options, options.inputs)
    elif options.target is not None:
        target = targets.get(options.target)
    else:
        return None
    report.target = {"name": target.name, "nodes": []}
    return target


def _passes(backend, model, mode: str, apply: bool, options: Options, target):
    """The passes of one run, each built when the one before it has run (a fold reads what the
    fuse wrote; a target's expand leaves alone what its fuse just made).

    --target: both directions in one run. Fuse the hand-made groups the target runs natively,
    then expand the native grouped convs it wants split. ``target``: anything with ``name`` and
    ``decide(props)`` (a rule of gconv_rewrite.targets, or --auto's measured target)."""
    if target is None and mode == "expand":
        yield backend.expand_pass(model, rewrite=apply, options=options)
        return
    accept = targets.target_accept(target, targets.NATIVE) if target is not None else None
    fuse_passes = backend.fuse_passes(model, rewrite=apply, options=options, accept=accept)
    yield from fuse_passes
    if apply and options.fold_bn:
        fold_pass = backend.fold_pass(model, fuse_passes, options)
        if fold_pass is not None:
            yield fold_pass
    if target is not None:
        yield backend.expand_pass(model, rewrite=apply, options=options, after=fuse_passes,
                                  accept=targets.target_accept(target, targets.SPLIT))


def _record(rewrite_pass, report: Report, target) -> None:
    report.rewrites.extend(rewrite_pass.rewrites)
    report.skipped.extend(rewrite_pass.skipped)
    if target is not None:  # per node: the form the target wants, and why
        judged = targets.target_nodes(rewrite_pass.decisions, target.name)
        if hasattr(target, "annotate"):  # --auto: both timings per node
            target.annotate(judged)
        report.target["nodes"].extend(decision.to_json() for decision in judged)


def _write(backend, hops, source: Path, rewritten, output: Path | None, read: list[Path], scratch: Path,
           options: Options, report: Report):
    """Save and prove the rewritten model, in staging beside ``output`` (committed atomically)
    or in scratch; with ``--to``, hand it to each conversion and prove what that made."""
    if hops:
        return _convert(backend, hops, source, rewritten, output, read, scratch, options, report)
    if output is not None:
        with formats.atomic_output(output, protected=read, replace=options.force) as staging:
            _save_and_verify(backend, source, rewritten, staging / output.name, options, report)
        report.output, report.written = str(output), True
    elif backend.verify_unchanged or (options.verify and report.rewrites):
        # The API without an output: prove the rewrite all the same, in scratch.
        _save_and_verify(backend, source, rewritten, scratch / f"rewritten{backend.suffix}", options,
                         report)
    else:
        report.verification = _skipped_verification(report, options)
    return rewritten


def _save_and_check(backend, model, path: Path, report: Report) -> None:
    """The backend writes ``model`` at ``path``; its format checker (if it has one) reads it back."""
    with report.timed("save"):
        backend.save(model, path)
    if backend.check is not None:
        with report.timed("checker"):
            backend.check(path)


def _save_and_verify(backend, source: Path, rewritten, path: Path, options: Options, report: Report) -> None:
    _save_and_check(backend, rewritten, path, report)
    if not options.verify or not (report.rewrites or backend.verify_unchanged):
        report.verification = _skipped_verification(report, options)
        return
    with report.timed("verify"):
        _proven(lambda: proof.at_second_size(lambda opts: backend.verify(source, rewritten, path, opts, report),
                                             options, backend.verify(source, rewritten, path, options, report)),
                report)


def _proven(verify, report: Report) -> None:
    """Run ``verify``; its table goes into the report, passed or not; a failure stops the run
    with nothing written (the staging folder is removed)."""
    try:
        verification = verify()
    except VerificationFailed as failure:
        if failure.verification is not None:
            report.verification = failure.verification
        raise
    if verification is None:  # a conversion's rows, already added to the report's table
        return
    report.verification = verification
    if not verification.passed:
        failing = [o.name for o in verification.outputs if not o.passed]
        detail = f"outputs {', '.join(failing)} differ beyond atol/rtol" if failing else \
            (verification.note or "the models differ")
        raise VerificationFailed(f"verification failed: {detail}; nothing was written", verification)


def _convert(backend, hops, source: Path, rewritten, output: Path | None, read: list[Path], scratch: Path,
             options: Options, report: Report):
    """--to: the rewritten model, proven in its own format first (unless the conversion proves
    itself against the original), handed to each conversion in turn; the last one's model is
    saved by its format's backend and proven, then committed."""
    written = None
    if hops[0].proves_source:
        written = scratch / f"rewritten{backend.suffix}"
        _save_and_verify(backend, source, rewritten, written, options, report)
    previous = current = rewritten
    for hop in hops:
        previous, current = current, hop.convert(current, written, scratch, options, report)
        written = None  # a later hop converts from memory
    last = hops[-1]
    writer = format_backend(last.target, report)

    def save_and_verify(path: Path) -> None:
        _save_and_check(writer, current, path, report)
        if options.verify:
            with report.timed("verify"):
                _proven(lambda: last.verify(previous, current, path, options, report), report)
        elif report.verification is None:
            report.verification = _skipped_verification(report, options)

    if output is not None:
        with formats.atomic_output(output, protected=read, replace=options.force) as staging:
            save_and_verify(staging / output.name)
        report.output, report.written = str(output), True
    else:
        save_and_verify(scratch / f"converted{writer.suffix}")
    for rewrite in report.rewrites:  # what no boundary run saw: say so rather than leave it blank
        for entry in rewrite.boundary:
            if entry.get("passed") is None:
                entry.setdefault("note", "not compared at its boundary: proven at the converted model's outputs")
    return current


def _write_unchanged(unwritable: Unwritable, output: Path | None, report: Report, options: Options) -> None:
    """Nothing changed, and the model cannot be rebuilt: the input written back as it was, or
    nothing, with the reason in the verification note."""
    report.after = report.before
    note = "no rewrite: the model is unchanged"
    if output is not None and unwritable.write is not None:
        with report.timed("save"), formats.atomic_output(output, replace=options.force) as staging:
            unwritable.write(staging / output.name)
        report.output, report.written = str(output), True
    elif output is not None:
        note += f"; not written: {unwritable.note}"
    report.verification = Verification(ran=False, passed=None, atol=options.atol, rtol=options.rtol, note=note)


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
    from gconv_rewrite import benchmark

    report = result.report
    out_fmt = benchmark.output_format(fmt, options.to)
    with report.timed("benchmark"), formats.scratch_dir() as scratch:
        before = model if not _in_memory(model) else scratch / "before.onnx"
        if _in_memory(model):
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
        if after is None and out_fmt == "onnx" and _in_memory(result.model):
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


def _skipped_verification(report: Report, options: Options) -> Verification:
    note = "--no-verify" if not options.verify else "no rewrite: the model is unchanged"
    return Verification(ran=False, passed=None, atol=options.atol, rtol=options.rtol, note=note)


def fuse(model: ModelInput, *, output: str | Path | None = None, options: Options | None = None,
         **overrides) -> Result:
    """Fuse every hand-made grouped convolution into a native one. See ``rewrite``."""
    return rewrite(model, mode="fuse", output=output, options=options, **overrides)


def expand(model: ModelInput, *, output: str | Path | None = None, options: Options | None = None,
           **overrides) -> Result:
    """Expand native grouped convolutions into Split → N Conv → Concat. See ``rewrite``."""
    return rewrite(model, mode="expand", output=output, options=options, **overrides)


def check(model: ModelInput, *, mode: str = "fuse", options: Options | None = None,
          **overrides) -> Report:
    """Find what ``fuse`` (or ``expand``, or a target: ``target=NAME``) would rewrite, without
    changing or writing anything; the options are ``fuse``'s and ``expand``'s."""
    return rewrite(model, mode=mode, apply=False, options=options, **overrides).report


def verify(original: ModelInput, rewritten: ModelInput, *,
           options: Options | None = None, **overrides) -> Verification:
    """Run both models in onnxruntime on the same inputs and compare every output."""
    options = _options(options, overrides)
    with formats.scratch_dir() as scratch_dir:
        paths = []
        for i, model in enumerate((original, rewritten)):
            model = _in_ir(model)
            if _in_memory(model):
                path = Path(scratch_dir) / f"model{i}.onnx"
                formats.save_onnx(model, path)
                paths.append(path)
            else:
                paths.append(formats.load_onnx(Path(model)) and Path(model))
        return verify_onnx(paths[0], paths[1], atol=options.atol, rtol=options.rtol, seed=options.seed,
                           shapes=options.shapes, inputs=_resolve_inputs(options))
