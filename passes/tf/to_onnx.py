"""SavedModel signature → ONNX in which every grouped convolution is one ``Conv(group=N)``.

    frozen, inlined GraphDef ─ Erfc → 1 − Erf ─ tf2onnx ─ [ONNX fuse pass] ─ checker ─ onnxruntime vs TF

tf2onnx itself writes ``group`` for a grouped ``Conv2D``; what defeats it on Keras models is
the XLA-compiled function Keras wraps around each grouped conv (it stays a
``StatefulPartitionedCall`` and onnxruntime refuses the file). We hand tf2onnx the graph that
``savedmodel.load_signature`` already inlined, after replacing the few TF ops tf2onnx cannot
convert (GELU's ``Erfc``) by equivalent ones.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
import tensorflow as tf
from tensorflow.core.framework import graph_pb2

from gconv_rewrite.errors import BadInput, VerificationFailed
from gconv_rewrite.passes.tf import _compat
from gconv_rewrite.passes.tf import _graph as g
from gconv_rewrite.passes.tf.savedmodel import (
    FrozenSignature,
    one_line,
    run_function,
    verification_inputs,
    verify_outputs,
)
from gconv_rewrite.report import Report, model_stats
from gconv_rewrite.verify import add_rows, compare

OPSET = 17


def replace_unsupported_ops(graph_def: graph_pb2.GraphDef) -> graph_pb2.GraphDef:
    """Rewrite ops tf2onnx 1.17 cannot convert into ones it can: ``Erfc(x)`` ⇒ ``1 − Erf(x)``."""
    erfcs = [n for n in graph_def.node if n.op == "Erfc"]
    if not erfcs:
        return graph_def
    graph_def = graph_pb2.GraphDef.FromString(graph_def.SerializeToString())
    names = g.Names(graph_def)
    added = []
    for node in [n for n in graph_def.node if n.op == "Erfc"]:
        dtype = node.attr["T"]
        erf = g.make_node("Erf", names.fresh(f"{node.name}/erf"), [node.input[0]], T=dtype)
        one = g.make_const(names.fresh(f"{node.name}/one"), np.array(1, dtype=tf.as_dtype(dtype.type).as_numpy_dtype))
        # The Sub keeps the Erfc's name: its readers need no change.
        node.op = "Sub"
        del node.input[:]
        node.input.extend([one.name, erf.name])
        added.extend([erf, one])
    graph_def.node.extend(added)
    return graph_def


def convert(frozen: FrozenSignature, graph_def: graph_pb2.GraphDef, *, opset: int = OPSET) -> onnx.ModelProto:
    """tf2onnx on the inlined graph; inputs and outputs named by the signature's keys."""
    import tf2onnx
    import tf2onnx.rewriter

    logging.getLogger("tf2onnx").setLevel(logging.ERROR)
    logging.getLogger("tensorflow").setLevel(logging.ERROR)  # tf2onnx's v1 calls log deprecations
    # tf2onnx names the nodes it inserts from a process-wide counter: restart it, so the same
    # input gives the same file however many conversions ran before in this process.
    _compat.restart_tf2onnx_names()
    rename = {i.tensor: i.key for i in frozen.inputs} | {o.tensor: o.key for o in frozen.outputs}
    try:
        model_proto, _ = tf2onnx.convert.from_graph_def(
            replace_unsupported_ops(graph_def), name=frozen.name,
            input_names=[i.tensor for i in frozen.inputs], output_names=[o.tensor for o in frozen.outputs],
            opset=opset, tensors_to_rename=rename)
    except Exception as exc:
        raise BadInput(f"tf2onnx cannot convert the graph ({one_line(exc)})") from exc
    onnx_ops = onnx.defs.get_all_schemas_with_history()
    known = {s.name for s in onnx_ops if s.domain in ("", "ai.onnx")}
    unconverted = sorted({n.op_type for n in model_proto.graph.node if n.domain in ("", "ai.onnx")
                          and n.op_type not in known})
    if unconverted:
        raise BadInput("tf2onnx cannot convert these TensorFlow ops: " + ", ".join(unconverted))
    return model_proto


class SavedModelToOnnx:
    """--to onnx: the rewritten graph through tf2onnx, what it left split fused by the ONNX pass,
    proven in onnxruntime against the graph it came from, run in TensorFlow.

        GraphDef (rewritten, or a Keras export) ─ tf2onnx ─ [ONNX fuse] ─ save ─ onnxruntime vs TF
    """

    source, target, proves_source = "savedmodel", "onnx", False

    def check_output(self, output: Path) -> None:
        pass  # any name: an .onnx file

    def convert(self, model, written, folder: Path, options, report: Report) -> ir.Model:
        with report.timed("convert"):
            converted = ir.serde.deserialize_model(convert(model.frozen, model.graph_def))
        if report.mode == "fuse":
            from gconv_rewrite.passes.onnx import FuseSplitConvPass

            with report.timed("rewrite"):
                onnx_pass = FuseSplitConvPass(rewrite=True)
                onnx_pass(converted)
                report.rewrites.extend(onnx_pass.rewrites)
                report.skipped.extend(onnx_pass.skipped)
        report.after = model_stats(converted)
        return converted

    def verify(self, previous, converted, path: Path, options, report: Report):
        """Its own table for a SavedModel input; rows ``onnx:KEY`` beside a Keras check's."""
        feeds, expected, actual = _run_against_tf(previous.frozen, path, options)
        if report.verification is None or not report.verification.ran:
            return verify_outputs(expected, actual, feeds, options)
        if sorted(expected) != sorted(actual):
            raise VerificationFailed(f"verification failed: the ONNX model returns {', '.join(sorted(actual))}, "
                                     f"TF {', '.join(sorted(expected))}; nothing was written")
        rows = [compare(k, expected[k], actual[k], options.atol, options.rtol) for k in sorted(expected)]
        add_rows(report, rows, "onnx", feeds, options, "onnx: onnxruntime vs the fused model in TF")
        return None


def _run_against_tf(frozen: FrozenSignature, path: Path, options):
    """onnxruntime (graph optimisations off) on the ONNX file and TensorFlow on the original
    graph, the same inputs: ``(feeds, expected, actual)``."""
    import onnxruntime as ort

    from gconv_rewrite.verify import run_session

    feeds = verification_inputs(frozen, options)
    expected = run_function(frozen.function, feeds, "original")
    session_options = ort.SessionOptions()
    session_options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    session_options.log_severity_level = 3
    try:
        session = ort.InferenceSession(str(path), session_options, providers=["CPUExecutionProvider"])
    except Exception as exc:
        raise VerificationFailed(f"verification failed: onnxruntime refuses the converted model "
                                 f"({one_line(exc)}); nothing was written") from exc
    names = [o.name for o in session.get_outputs()]
    actual = dict(zip(names, run_session(session, feeds, "converted")))  # bfloat16 inputs as OrtValues
    return feeds, expected, actual
