"""``--to savedmodel`` for a Keras model: the Keras backend fuses (or expands) and proves the
model in Keras, then hands it here with the original.

    rewritten Keras model (verified in Keras) ─ keras export (tf_saved_model) ─ freeze + inline
        ─ SavedModel, plain TF ops ─ its serving signature in TF vs the original, same inputs ─ write

Keras's export wraps each grouped ``Conv2D`` in an XLA-compiled function on CPU (the trap of
``gconv_rewrite.passes.tf.savedmodel``); the export is therefore frozen and inlined as the SavedModel backend
reads any SavedModel, and written by that backend's writer: one plain grouped ``Conv2D`` per
group, its bias an ``AddV2``, runnable in TensorFlow without XLA. The signature keeps Keras's
names: ``serving_default`` (and its alias ``serve``), inputs named after the model's ``Input``
layers, outputs ``output_0, output_1, …``. The rows of the signature's run against the original
join the Keras check's table as ``savedmodel:OUTPUT``.
"""

from __future__ import annotations

from pathlib import Path

from gconv_rewrite.errors import BadInput, VerificationFailed, VerificationImpossible
from gconv_rewrite.report import Report, Verification
from gconv_rewrite.verify import add_rows

SIGNATURE = "serving_default"  # what keras.Model.export names its signature
_FILE_SUFFIXES = (".keras", ".h5", ".hdf5", ".onnx", ".tflite", ".pb")


def check_output(output: Path | None) -> None:
    if output is not None and output.suffix.lower() in _FILE_SUFFIXES:
        raise BadInput(f"{output}: --to savedmodel writes a SavedModel folder; name the output NAME or NAME.fused")


def export(model, folder: Path, what: str) -> None:
    """Keras 3's own SavedModel export (``--to savedmodel`` and the first step of ``--to onnx``);
    a model it cannot export is refused in one line."""
    from gconv_rewrite.passes.tf.savedmodel import one_line

    try:
        model.export(str(folder), format="tf_saved_model", verbose=False)
    except Exception as exc:
        raise BadInput(f"{what} cannot be exported as a SavedModel ({one_line(exc)})") from exc


class KerasToSavedModel:
    """``--to savedmodel`` (and the first hop of ``--to onnx``): the rewritten Keras model,
    exported, frozen and inlined; the SavedModel backend writes it."""

    source, target, proves_source = "keras", "savedmodel", True

    def check_output(self, output: Path) -> None:
        check_output(output)

    def convert(self, result, written, folder: Path, options, report: Report):
        from gconv_rewrite.passes.tf import savedmodel as sm
        from gconv_rewrite.passes.tf.backend import SavedModelGraph

        what = f"the {'fused' if report.mode == 'fuse' else 'expanded'} Keras model"
        exported = folder / "exported"
        with report.timed("export"):
            export(result.model, exported, what)
            frozen = sm.load_signature(exported, SIGNATURE)  # XLA wrappers inlined: plain TF ops
        report.after = sm.graph_stats(frozen.graph_def)
        return SavedModelGraph(frozen, frozen.graph_def)

    def verify(self, previous, converted, path: Path, options, report: Report) -> None:
        try:
            _verify(previous.model, previous.graph, previous.reference()[0], path, converted.frozen, options, report)
        finally:  # what ran the original, also when the conversion's rows are the whole table
            if report.verification is not None and not report.verification.reference:
                report.verification.reference = previous.reference_name


def _verify(model, graph, reference, folder: Path, frozen, options, report: Report) -> None:
    """The written signature, loaded back and run in TF, against the original model in Keras."""
    import tensorflow as tf

    from gconv_rewrite.passes.keras.model import _make_inputs, _run
    from gconv_rewrite.passes.tf import savedmodel as sm
    from gconv_rewrite.verify import compare_outputs, output_order

    feeds = _make_inputs(graph, options)
    expected = _run(reference, feeds)
    # The signature's inputs are named after the model's Input layers, in the file's order.
    keyed = dict(zip([t.name for t in model.inputs], feeds.values()))
    try:
        candidate = tf.saved_model.load(str(folder)).signatures[SIGNATURE]
    except Exception as exc:
        note = f"the written SavedModel does not load: {sm.one_line(exc)}"
        raise VerificationFailed(f"verification failed: {note}; nothing was written",
                                 Verification(ran=True, passed=False, atol=options.atol, rtol=options.rtol,
                                              note=note)) from exc
    takes = sorted(candidate.structured_input_signature[1])
    if takes != sorted(keyed):
        raise VerificationImpossible(f"the written SavedModel takes inputs {', '.join(takes)}, the model "
                                     f"{', '.join(sorted(keyed))}; pass --no-verify")
    actual = sm.run_function(candidate, keyed, "written")
    try:
        rows = compare_outputs([ref.layer for ref in graph.outputs], expected,
                               [actual[k] for k in output_order(list(actual))], options)
    except VerificationFailed as failure:
        report.verification = failure.verification
        raise
    add_rows(report, rows, "savedmodel", feeds, options, _grouped_note(frozen.graph_def))


def _grouped_note(graph_def) -> str:
    from gconv_rewrite.passes.tf import _graph as g

    index = g.GraphIndex(graph_def)
    convs = [n for n in graph_def.node if n.op == "Conv2D"]
    grouped = 0
    for conv in convs:
        axis = 3 if g.attr_str(conv, "data_format", "NHWC") == "NHWC" else 1
        data, kernel = index.shape(conv.input[0]), index.shape(conv.input[1])
        grouped += bool(data and kernel and len(data) == 4 and len(kernel) == 4
                        and data[axis] not in (None, kernel[2]))
    return f"savedmodel: the written serving signature in TensorFlow vs the original; {grouped} of {len(convs)} " \
        "Conv2D grouped"
