"""``--to tflite`` for a SavedModel: fused (or expanded) as ``--fuse`` does, converted, proven.

    SavedModel ─ signature frozen + inlined ─ fuse | expand ─ SavedModel (verified in TF)
        ─ TFLite converter ─ .tflite ─ interpreter vs the original signature, same inputs ─ write

The TF side is ``passes.tf.savedmodel``'s own load, passes, writer and check; the rows of the
interpreter's run against the original join the same table as ``tflite:KEY``.
"""

from __future__ import annotations

import contextlib
from pathlib import Path

from passes.tflite.convert import (
    TFLiteModel,
    check_output,
    compare_outputs,
    convert_savedmodel,
    grouped_note,
    inspect,
    run,
    write,
)
from rewriter import formats
from rewriter.errors import RewriteError, VerificationFailed
from rewriter.report import Report, Skip
from rewriter.verify import add_rows


def rewrite_savedmodel_to_tflite(path: Path, *, mode: str, output: Path | None, apply: bool, options,
                                 report: Report):
    """Returns the ``TFLiteModel`` written (the rewritten GraphDef when not applied). Raises
    ``VerificationFailed`` with nothing written when TF or the interpreter disagrees with the original."""
    from passes.tf import savedmodel as sm

    check_output(output)
    with report.timed("load"):
        frozen = sm.load_signature(path, options.signature)
        report.before = sm.graph_stats(frozen.graph_def)
    for name in frozen.others:
        report.skipped.append(Skip(f"signature {name}", f"not rewritten, and not in the .tflite: only {frozen.name} "
                                   "(choose with --signature)"))
    graph_def = sm.run_passes(frozen, mode, apply, options, report)
    if not apply:
        return graph_def
    what = f"the {'fused' if mode == 'fuse' else 'expanded'} model"
    with formats.scratch_dir() as scratch:
        folder = Path(scratch) / "rewritten"
        sm._write_and_verify(frozen, graph_def, folder, options, report)  # saved, and checked in TF
        with report.timed("convert"):
            result = TFLiteModel(convert_savedmodel(folder, frozen.name, what), frozen.name)
        inspect(result, report)
        if options.verify:
            with report.timed("verify"):
                feeds = sm.verification_inputs(frozen, options)
                with getattr(sm, "remapper_off", contextlib.nullcontext)():  # as the TF check runs it
                    expected = sm.run_function(frozen.function, feeds, "original")
                actual = run(result.content, feeds, frozen.name)
                keys = sorted(expected)
                if sorted(actual) != keys:
                    raise VerificationFailed(f"verification failed: the .tflite returns {', '.join(sorted(actual))}, "
                                             f"the original {', '.join(keys)}; nothing was written")
                rows = compare_outputs(keys, [expected[k] for k in keys], [actual[k] for k in keys], options)
                add_rows(report, rows, "tflite", feeds, options, grouped_note(result))
        if options.benchmark:  # --benchmark's "before": the original signature converted as it is
            try:
                with report.timed("convert"):
                    sm.write_savedmodel(frozen, frozen.graph_def, Path(scratch) / "original")
                    result.original = convert_savedmodel(Path(scratch) / "original", frozen.name, "the original model")
            except (RewriteError, Exception) as exc:  # timing is extra: the verified output still gets written
                result.original_note = getattr(exc, "message", None) or str(exc).splitlines()[0][:200]
    return write(result, report, output)
