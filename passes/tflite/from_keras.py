"""``--to tflite`` for a Keras model: the Keras backend fuses (or expands) and proves the model in
Keras, then hands it here with the original.

    fused Keras model (verified against the original in Keras) ─ export as SavedModel
        ─ TFLite converter ─ .tflite ─ interpreter vs the original, same inputs ─ write

The original is Keras's own load of the file, or the model rebuilt from its config and trusted
Lambda code where Keras cannot load it (``passes.keras.model._reference``): the rows of the
interpreter's run against it join the Keras check's table as ``tflite:OUTPUT``.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

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
from rewriter.errors import BadInput, RewriteError
from rewriter.report import Report
from rewriter.verify import add_rows

SIGNATURE = "serving_default"  # what keras.Model.export names its signature


def export(model, folder: Path, what: str) -> None:
    try:
        model.export(str(folder), format="tf_saved_model", verbose=False)
    except Exception as exc:
        text = str(exc).strip()
        raise BadInput(f"{what} cannot be exported as a SavedModel for the TFLite converter "
                       f"({(text.splitlines()[0] if text else type(exc).__name__)[:200]})") from exc


def write_tflite(model, graph, original: Callable[[], Any], output: Path | None, *, mode: str, options,
                 report: Report) -> TFLiteModel:
    """``model``: the rewritten Keras model, already verified; ``graph``: the file's layer graph
    (its inputs and outputs name the feeds and the rows); ``original()``: the input's model as it is."""
    from passes.keras.model import _make_inputs, _run

    check_output(output)
    what = f"the {'fused' if mode == 'fuse' else 'expanded'} Keras model"
    with formats.scratch_dir() as scratch:
        with report.timed("export"):
            export(model, Path(scratch) / "rewritten", what)
        with report.timed("convert"):
            result = TFLiteModel(convert_savedmodel(Path(scratch) / "rewritten", SIGNATURE, what), SIGNATURE)
        inspect(result, report)
        reference = None
        if options.verify:
            with report.timed("verify"):
                reference = original()
                feeds = _make_inputs(graph, options)
                expected = _run(reference, feeds)
                # The signature's inputs are named after the model's Input layers, in the file's order.
                keyed = dict(zip([t.name for t in model.inputs], feeds.values()))
                actual = run(result.content, keyed, SIGNATURE)
                names = [ref.layer for ref in graph.outputs]
                rows = compare_outputs(names, expected, list(actual.values()), options)
                add_rows(report, rows, "tflite", feeds, options, grouped_note(result))
        if options.benchmark:  # --benchmark's "before": the original model converted as it is
            try:
                reference = reference if reference is not None else original()
                with report.timed("convert"):
                    export(reference, Path(scratch) / "original", "the original Keras model")
                    result.original = convert_savedmodel(Path(scratch) / "original", SIGNATURE, "the original model")
            except (RewriteError, Exception) as exc:  # timing is extra: the verified output still gets written
                result.original_note = getattr(exc, "message", None) or str(exc).splitlines()[0][:200]
    return write(result, report, output)
