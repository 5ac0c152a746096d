"""Every private TensorFlow, TFLite interpreter and tf2onnx API the TF passes use, in one place,
each with why the public API does not suffice. Checked with TensorFlow 2.21, ai-edge-litert /
tf.lite 2.21 and tf2onnx 1.17; on a new version, this module is what to re-check.

(``tensorflow.core.framework`` / ``tensorflow.core.protobuf`` message modules, imported by the
passes directly, are TF's serialisation format rather than internals.)

Importing this module does not import TensorFlow or tf2onnx; each helper imports what it needs
when called.
"""

from __future__ import annotations


def freeze(function):
    """(GraphDef with variables as constants, its input tensor names, its output tensor names).

    What ``convert_variables_to_constants_v2`` computes, without building a ConcreteFunction of
    the result (half of its time on a large model, and we only need the GraphDef). TF has no
    public v2 freezing at all (``tf.compat.v1.graph_util`` freezes v1 sessions only), hence
    ``tensorflow.python.framework.convert_to_constants``; its private converter data and
    ``_replace_variables_by_constants`` give the GraphDef alone. (TF 2.21)"""
    try:
        from tensorflow.python.framework.convert_to_constants import (
            _FunctionConverterDataInEager,
            _replace_variables_by_constants,
        )
        from tensorflow.python.util.object_identity import ObjectIdentitySet
    except ImportError:  # another TF version: the slower way, still not public
        from tensorflow.python.framework.convert_to_constants import convert_variables_to_constants_v2

        frozen = convert_variables_to_constants_v2(function, aggressive_inlining=True)
        return (frozen.graph.as_graph_def(), [t.name for t in frozen.inputs],
                [t.name for t in frozen.outputs])
    data = _FunctionConverterDataInEager(func=function, lower_control_flow=True, aggressive_inlining=True)
    graph_def, converted = _replace_variables_by_constants(converter_data=data)
    captures = function.graph.internal_captures
    frozen_inputs = ObjectIdentitySet([captures[i] for i in converted])
    inputs = [t.name for t in function.inputs if t not in frozen_inputs]
    return graph_def, inputs, [t.name for t in function.outputs]


def optimize_graph(config, meta_graph):
    """Grappler on a MetaGraphDef with the given ConfigProto's rewrite options; public TF runs
    grappler only inside ``tf.function`` tracing, never on a GraphDef we hand it. (TF 2.21)"""
    from tensorflow.python.grappler import tf_optimizer

    return tf_optimizer.OptimizeGraph(config, meta_graph)


def tflite_ops(interpreter) -> list[dict]:
    """The flatbuffer's ops (name, input and output tensor indices) of a TFLite / LiteRT
    interpreter; public ``tf.lite.experimental.Analyzer`` only prints them. (TF 2.21, LiteRT)"""
    return interpreter._get_ops_details()


def tflite_tensor(interpreter, index: int, subgraph: int = 0) -> dict:
    """One tensor's details (name, shape) by index; the public API has no lookup by index
    (``get_tensor_details()`` builds every tensor's details to find three). (TF 2.21, LiteRT)"""
    return interpreter._get_tensor_details(index, subgraph)


_TF2ONNX_NAME_COUNTER_START: int | None = None


def restart_tf2onnx_names() -> None:
    """Restart the process-wide counter tf2onnx names its inserted nodes from
    (``tf2onnx.utils.INTERNAL_NAME``), so the same input gives the same file however many
    conversions ran before in this process; tf2onnx has no option for it. (tf2onnx 1.17)"""
    global _TF2ONNX_NAME_COUNTER_START
    import tf2onnx.utils

    if _TF2ONNX_NAME_COUNTER_START is None:
        _TF2ONNX_NAME_COUNTER_START = tf2onnx.utils.INTERNAL_NAME
    tf2onnx.utils.INTERNAL_NAME = _TF2ONNX_NAME_COUNTER_START
