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

from passes.tf import _compat
from passes.tf import _graph as g
from passes.tf.savedmodel import (
    FrozenSignature,
    one_line,
    run_function,
    skipped_verification,
    verification_inputs,
    verify_outputs,
)
from rewriter import formats
from rewriter.errors import BadInput, VerificationFailed
from rewriter.report import Report

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
    import tf2onnx.rewriter  # noqa: F401  (its modules draw names at import; let them do it now)

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


def write_onnx(frozen: FrozenSignature, graph_def: graph_pb2.GraphDef, *, mode: str, output: Path | None,
               apply: bool, options, report: Report) -> ir.Model | graph_pb2.GraphDef:
    """Convert, (fuse what tf2onnx left,) check, verify against TF, write ``output`` atomically."""
    if not apply:
        return graph_def
    from rewriter.report import model_stats

    with report.timed("convert"):
        model = ir.serde.deserialize_model(convert(frozen, graph_def))
    if mode == "fuse":
        from passes.onnx import FuseSplitConvPass

        with report.timed("rewrite"):
            onnx_pass = FuseSplitConvPass(rewrite=True)
            onnx_pass(model)
            report.rewrites.extend(onnx_pass.rewrites)
            report.skipped.extend(onnx_pass.skipped)
    report.after = model_stats(model)

    def write_and_verify(folder: Path, name: str) -> None:
        path = folder / name
        with report.timed("save"):
            formats.save_onnx(model, path)
        with report.timed("verify"):
            try:
                onnx.checker.check_model(str(path), full_check=True)
            except Exception as exc:
                raise VerificationFailed(f"the converted model fails onnx.checker: {one_line(exc)}") from exc
            if options.verify:
                try:
                    report.verification = _verify_against_tf(frozen, path, options)
                except VerificationFailed as failure:
                    report.verification = failure.verification
                    raise
            else:
                report.verification = skipped_verification(options)

    if output is not None:
        with formats.atomic_output(output) as staging:
            write_and_verify(staging, output.name)
        report.output, report.written = str(output), True
    else:
        with formats.scratch_dir() as scratch:
            write_and_verify(Path(scratch), "converted.onnx")
    return model


def _verify_against_tf(frozen: FrozenSignature, path: Path, options):
    """onnxruntime (graph optimisations off) on the ONNX file vs TensorFlow on the original."""
    import onnxruntime as ort

    from rewriter.verify import run_session

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
    return verify_outputs(expected, actual, feeds, options)


def savedmodel_to_onnx(saved_model_dir: Path, output: Path | None, *, options, report: Report,
                       mode: str = "fuse", apply: bool = True):
    """SavedModel → verified ONNX, for callers that produced the SavedModel themselves (the Keras
    backend exports a Keras model to a temporary SavedModel, then calls this). Fills ``report``
    as ``rewrite_savedmodel`` does; returns the ONNX ``onnx_ir.Model``."""
    from dataclasses import replace

    from passes.tf.savedmodel import rewrite_savedmodel

    return rewrite_savedmodel(Path(saved_model_dir), mode=mode, output=output, apply=apply,
                              options=replace(options, to="onnx"), report=report)
