"""``--to tflite`` for a Keras model: the Keras backend fuses (or expands) and proves the model in
Keras, then hands it here with the original.

    fused Keras model (verified against the original in Keras) ─ export as SavedModel
        ─ TFLite converter ─ .tflite ─ interpreter vs the original, same inputs ─ write

The original is Keras's own load of the file, or the model rebuilt from its config and trusted
Lambda code where Keras cannot load it (``gconv_rewrite.passes.keras.model._reference``): the rows of the
interpreter's run against it join the Keras check's table as ``tflite:OUTPUT``.
"""

from __future__ import annotations

from pathlib import Path

from gconv_rewrite.errors import BadInput, RewriteError
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

SIGNATURE = "serving_default"  # what keras.Model.export names its signature


def export(model, folder: Path, what: str) -> None:
    try:
        if type(model).__module__.startswith("tf_keras"):  # the tf-keras reference of a tf-keras file
            import contextlib
            import io

            # tf-keras's export (the same "serving_default" signature) prints its endpoints on
            # stdout, which may hold the run's JSON document.
            with contextlib.redirect_stdout(io.StringIO()):
                model.export(str(folder))
        else:
            model.export(str(folder), format="tf_saved_model", verbose=False)
    except Exception as exc:
        text = str(exc).strip()
        raise BadInput(f"{what} cannot be exported as a SavedModel for the TFLite converter "
                       f"({(text.splitlines()[0] if text else type(exc).__name__)[:200]})") from exc


class KerasToTFLite:
    """``--to tflite``: the rewritten Keras model (saved and proven in Keras by the driver),
    exported as a SavedModel and converted."""

    source, target, proves_source = "keras", "tflite", True

    def check_output(self, output: Path) -> None:
        check_output(output)

    def convert(self, result, written, folder: Path, options, report: Report) -> TFLiteModel:
        what = f"the {'fused' if report.mode == 'fuse' else 'expanded'} Keras model"
        with report.timed("export"):
            export(result.model, folder / "rewritten-savedmodel", what)
        with report.timed("convert"):
            converted = TFLiteModel(convert_savedmodel(folder / "rewritten-savedmodel", SIGNATURE, what), SIGNATURE)
        inspect(converted, report)
        if options.benchmark:  # --benchmark's "before": the original model converted as it is
            try:
                with report.timed("convert"):
                    export(result.reference()[0], folder / "original", "the original Keras model")
                    converted.original = convert_savedmodel(folder / "original", SIGNATURE, "the original model")
            except (RewriteError, Exception) as exc:  # timing is extra: the verified output still gets written
                converted.original_note = getattr(exc, "message", None) or str(exc).splitlines()[0][:200]
        return converted

    def verify(self, previous, converted: TFLiteModel, path: Path, options, report: Report) -> None:
        """The interpreter against the original Keras model: rows ``tflite:OUTPUT``."""
        from gconv_rewrite.passes.keras.model import _make_inputs, _run

        graph = previous.graph
        feeds = _make_inputs(graph, options)
        expected = _run(previous.reference()[0], feeds)
        # The signature's inputs are named after the model's Input layers, in the file's order.
        keyed = dict(zip([t.name for t in previous.model.inputs], feeds.values()))
        actual = run(converted.content, keyed, SIGNATURE)
        rows = compare_outputs([ref.layer for ref in graph.outputs], expected, list(actual.values()), options)
        add_rows(report, rows, "tflite", feeds, options, grouped_note(converted))
