"""``--to tflite`` for a SavedModel: fused (or expanded) as ``--fuse`` does, converted, proven.

    SavedModel ─ signature frozen + inlined ─ fuse | expand ─ SavedModel (verified in TF)
        ─ TFLite converter ─ .tflite ─ interpreter vs the original signature, same inputs ─ write

The TF side is ``gconv_rewrite.passes.tf.savedmodel``'s own load, passes, writer and check; the rows of the
interpreter's run against the original join the same table as ``tflite:KEY``.
"""

from __future__ import annotations

from pathlib import Path

from gconv_rewrite.errors import RewriteError, VerificationFailed
from gconv_rewrite.passes.tflite.convert import (
    TFLiteModel,
    check_output,
    convert_savedmodel,
    grouped_note,
    inspect,
    run,
)
from gconv_rewrite.report import Report
from gconv_rewrite.verify import add_rows, compare_outputs


class SavedModelToTFLite:
    """The rewritten SavedModel (saved and proven in TF by the driver) through the converter."""

    source, target, proves_source = "savedmodel", "tflite", True

    def check_output(self, output: Path) -> None:
        check_output(output)

    def convert(self, model, written: Path, folder: Path, options, report: Report) -> TFLiteModel:
        frozen = model.frozen
        what = f"the {'fused' if report.mode == 'fuse' else 'expanded'} model"
        with report.timed("convert"):
            result = TFLiteModel(convert_savedmodel(written, frozen.name, what), frozen.name)
        inspect(result, report)
        if options.benchmark:  # --benchmark's "before": the original signature converted as it is
            from gconv_rewrite.passes.tf import savedmodel as sm

            try:
                with report.timed("convert"):
                    sm.write_savedmodel(frozen, frozen.graph_def, folder / "original")
                    result.original = convert_savedmodel(folder / "original", frozen.name, "the original model")
            except (RewriteError, Exception) as exc:  # timing is extra: the verified output still gets written
                result.original_note = getattr(exc, "message", None) or str(exc).splitlines()[0][:200]
        return result

    def verify(self, previous, result: TFLiteModel, path: Path, options, report: Report) -> None:
        """The interpreter against the original signature in TF: rows ``tflite:KEY``."""
        from gconv_rewrite.passes.tf import savedmodel as sm

        frozen = previous.frozen
        feeds = sm.verification_inputs(frozen, options)
        expected = sm.run_function(frozen.function, feeds, "original")
        actual = run(result.content, feeds, frozen.name)
        keys = sorted(expected)
        if sorted(actual) != keys:
            raise VerificationFailed(f"verification failed: the .tflite returns {', '.join(sorted(actual))}, "
                                     f"the original {', '.join(keys)}; nothing was written")
        rows = compare_outputs(keys, [expected[k] for k in keys], [actual[k] for k in keys], options)
        add_rows(report, rows, "tflite", feeds, options, grouped_note(result))
