"""SavedModel → ``.tflite`` with TensorFlow's converter; the flatbuffer read back and run in the
TFLite interpreter.

    SavedModel folder ─ TFLiteConverter.from_saved_model (builtin ops only) ─ flatbuffer
        ─ ops and grouped CONV_2D read back ─ interpreter (XNNPACK, as deployed) vs the original

Keras 3 and tf-keras wrap a grouped ``Conv2D`` in an XLA-compiled function on CPU (the trap that
makes tf2onnx write files onnxruntime refuses); the TFLite converter inlines it and writes one
``CONV_2D`` whose filter holds ``in_channels / groups`` input channels, which the interpreter runs
natively. Each conversion's ops are read back all the same (``describe``), so the report says
what the file holds, not what we hoped it would.
"""

from __future__ import annotations

import math
import re
import sys
import warnings
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from gconv_rewrite import quiet
from gconv_rewrite.errors import BadInput, VerificationImpossible
from gconv_rewrite.passes.tf import _compat as tf_compat
from gconv_rewrite.report import ModelStats, Report, count_ops
from gconv_rewrite.verify import InputSpec, output_order

SUFFIX = ".tflite"
CONV_OPS = ("CONV_2D", "DEPTHWISE_CONV_2D")


@dataclass(frozen=True)
class ConvOp:
    """A convolution of the flatbuffer: ``groups`` = input channels / the filter's input channels
    (CONV_2D), or the input channels (DEPTHWISE_CONV_2D)."""

    op: str
    location: str  # its output tensor's name
    groups: int
    in_channels: int
    out_channels: int


@dataclass
class TFLiteModel:
    """What ``--to tflite`` made: the flatbuffer, its convolutions, and with ``--benchmark`` the
    original model's own TFLite conversion (hand-made groups and all), to time against."""

    content: bytes
    signature: str
    convs: list[ConvOp] = field(default_factory=list)
    original: bytes | None = None
    original_note: str = ""  # why there is no ``original`` (its conversion failed)

    @property
    def grouped(self) -> list[ConvOp]:
        return [c for c in self.convs if c.op == "CONV_2D" and c.groups > 1]


def one_line(exc: BaseException) -> str:
    """The converter's own error line (``error: 'tf.X' op is neither a custom op nor a flex op``)
    where it gives one, else the first line."""
    lines = [line.strip() for line in str(exc).strip().splitlines() if line.strip()]
    errors = [line for line in lines if "error:" in line]
    line = errors[0] if errors else (lines[0] if lines else type(exc).__name__)
    return re.sub(r"^.*?error: ", "", line)[:240]


def check_output(output: Path | None) -> None:
    if output is not None and output.suffix.lower() != SUFFIX:
        raise BadInput(f"{output}: --to tflite writes a TFLite flatbuffer; name the output NAME.tflite")


# -- converting ---------------------------------------------------------------------------------


def convert_savedmodel(folder: Path, signature: str, what: str) -> bytes:
    """The TFLite flatbuffer of ``signature`` of the SavedModel in ``folder``, builtin ops only
    (a model needing TF's own kernels — SELECT_TF_OPS — would not run in a plain interpreter)."""
    import tensorflow as tf

    try:
        with quiet.native_stderr_captured(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            converter = tf.lite.TFLiteConverter.from_saved_model(str(folder), signature_keys=[signature])
            converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS]
            return converter.convert()
    except Exception as exc:
        raise BadInput(f"TensorFlow's TFLite converter cannot convert {what} ({one_line(exc)})") from exc


def interpreter_class():
    """The LiteRT interpreter (``ai-edge-litert``) where installed, else TensorFlow's."""
    try:
        from ai_edge_litert.interpreter import Interpreter
    except ImportError:
        import tensorflow as tf

        Interpreter = tf.lite.Interpreter
    return Interpreter


def runtime_name() -> str:
    return "litert" if interpreter_class().__module__.startswith("ai_edge_litert") else "tflite"


def interpreter(content: bytes, threads: int | None = None, *, delegates: bool = True):
    """An interpreter of ``content`` as deployed (the default XNNPACK delegate), tensors allocated;
    its native log lines (``Created TensorFlow Lite XNNPACK delegate``) kept off stderr.
    ``delegates=False``: the builtin kernels only, tensors not allocated (to read the ops: once
    delegated, the op list also holds a DELEGATE node standing for the ops it took)."""
    Interpreter = interpreter_class()
    with quiet.native_stderr_captured(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # tf.lite.Interpreter's deprecation notice
        if delegates:
            loaded = Interpreter(model_content=content, num_threads=threads)
            loaded.allocate_tensors()
        else:
            resolver = sys.modules[Interpreter.__module__].OpResolverType.BUILTIN_WITHOUT_DEFAULT_DELEGATES
            loaded = Interpreter(model_content=content, num_threads=threads,
                                 experimental_op_resolver_type=resolver)
    return loaded


def describe(content: bytes) -> tuple[ModelStats, list[ConvOp]]:
    """The flatbuffer's ops (as counted for the report: one node per op, parameters = elements of
    its floating constant tensors) and its convolutions with their group counts."""
    loaded = interpreter(content, delegates=False)
    ops = tf_compat.tflite_ops(loaded)
    convs = []
    for op in ops:
        if op["op_name"] not in CONV_OPS or len(op["inputs"]) < 2:
            continue
        data = tf_compat.tflite_tensor(loaded, op["inputs"][0])["shape"]
        kernel = tf_compat.tflite_tensor(loaded, op["inputs"][1])["shape"]
        output = tf_compat.tflite_tensor(loaded, op["outputs"][0])
        if len(data) != 4 or len(kernel) != 4:
            continue
        channels = int(data[3])
        groups = channels if op["op_name"] == "DEPTHWISE_CONV_2D" else channels // max(int(kernel[3]), 1)
        convs.append(ConvOp(op["op_name"], output["name"], groups, channels, int(output["shape"][-1])))
    names = [op["op_name"] for op in ops]
    parameters = _parameters(content)
    return ModelStats(nodes=len(names), parameters=parameters if parameters is not None else 0,
                      op_counts=count_ops(names)), convs


def _parameters(content: bytes) -> int | None:
    """Elements of the floating tensors that hold data in the flatbuffer (weights, biases)."""
    try:
        from ai_edge_litert import schema_py_generated as schema
    except ImportError:
        try:
            from tensorflow.lite.python import schema_py_generated as schema
        except ImportError:
            return None
    floating = {schema.TensorType.FLOAT32, schema.TensorType.FLOAT16, schema.TensorType.FLOAT64,
                getattr(schema.TensorType, "BFLOAT16", -1)}
    model = schema.Model.GetRootAsModel(content, 0)
    counted, total = set(), 0
    for s in range(model.SubgraphsLength()):
        subgraph = model.Subgraphs(s)
        for t in range(subgraph.TensorsLength()):
            tensor = subgraph.Tensors(t)
            index = tensor.Buffer()
            if index == 0 or index in counted or tensor.Type() not in floating:
                continue
            buffer = model.Buffers(index)
            if buffer is None or (buffer.DataLength() == 0 and not buffer.Size()):
                continue
            counted.add(index)
            total += math.prod(int(d) for d in tensor.ShapeAsNumpy()) if tensor.ShapeLength() else 1
    return total


# -- running ------------------------------------------------------------------------------------


def signature_runner(loaded, signature: str):
    keys = list(loaded.get_signature_list())
    if not keys:
        raise VerificationImpossible("the .tflite file has no signature to run it by; pass --no-verify")
    return loaded.get_signature_runner(signature if signature in keys else keys[0])


def input_specs(runner) -> list[InputSpec]:
    """The signature's inputs (a ``-1`` dim, the converter's dynamic batch, as None)."""
    specs = []
    for name, detail in runner.get_input_details().items():
        shape = detail.get("shape_signature", detail["shape"])
        specs.append(InputSpec(name, [None if int(d) < 0 else int(d) for d in shape], np.dtype(detail["dtype"]).name))
    return specs


def run(content: bytes, feeds: Mapping[str, np.ndarray], signature: str, role: str = "converted") -> dict[str, np.ndarray]:
    """Run the flatbuffer's signature on ``feeds`` (keyed by the signature's input names)."""
    try:
        runner = signature_runner(interpreter(content), signature)
        expected = set(runner.get_input_details())
        if set(feeds) != expected:
            raise VerificationImpossible(f"the {role} .tflite takes inputs {', '.join(sorted(expected))}, the original "
                                         f"{', '.join(sorted(feeds))}; pass --no-verify")
        with quiet.native_stderr_captured():
            results = runner(**{k: np.ascontiguousarray(v) for k, v in feeds.items()})
    except VerificationImpossible:
        raise
    except Exception as exc:
        raise VerificationImpossible(f"the TFLite interpreter cannot run the {role} model on the verification "
                                     f"inputs ({one_line(exc)}); pass --inputs FILE.npz, or --no-verify") from exc
    return {key: np.asarray(results[key]) for key in output_order(list(results))}


# -- proving and writing ------------------------------------------------------------------------


def inspect(result: TFLiteModel, report: Report) -> None:
    """Record what the flatbuffer holds: its ops as the report's after-stats, its convolutions."""
    report.after, result.convs = describe(result.content)
    if report.after.parameters == 0 and report.before is not None:
        report.after.parameters = report.before.parameters  # no flatbuffer schema to count them with


def grouped_note(result: TFLiteModel) -> str:
    grouped = result.grouped
    convs = sum(c.op == "CONV_2D" for c in result.convs)
    return (f"tflite: the {runtime_name()} interpreter vs the original; {len(grouped)} of {convs} CONV_2D "
            "grouped")
