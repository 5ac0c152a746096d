"""The SavedModel backend's parts (``gconv_rewrite.passes.tf.backend`` is the backend): load a signature as one
frozen, inlined GraphDef, write a GraphDef back as a SavedModel, and run both in TensorFlow.

    SavedModel ─ signature ─ freeze + inline calls ─ fuse | expand ─ write ─ verify in TF

Keras 3 and tf-keras wrap every grouped ``Conv2D`` on CPU in an XLA-compiled function marked
``_noinline``; TF's own inliner (grappler's function optimizer) then leaves the call in place.
We drop those two markers and let grappler inline everything, so the passes (and tf2onnx) see
plain ops.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np
import tensorflow as tf
from tensorflow.core.framework import graph_pb2
from tensorflow.core.protobuf import config_pb2, meta_graph_pb2

from gconv_rewrite.errors import BadInput, VerificationFailed, VerificationImpossible
from gconv_rewrite.passes.tf import _compat
from gconv_rewrite.passes.tf import _graph as g
from gconv_rewrite.report import ModelStats, Verification, count_ops
from gconv_rewrite.verify import Feeds, InputSpec, compare, load_inputs_file, make_inputs

CALL_OPS = ("PartitionedCall", "StatefulPartitionedCall")
_NO_INLINE_MARKS = ("_noinline", "_XlaMustCompile", "_XlaCompile")


@dataclass
class TensorSpec:
    key: str  # the signature's name for it
    tensor: str  # "node:index" in the frozen graph
    dtype: tf.dtypes.DType
    shape: list[int | None]


@dataclass
class FrozenSignature:
    """One signature as a self-contained GraphDef: constants for variables, no function calls."""

    name: str
    graph_def: graph_pb2.GraphDef
    inputs: list[TensorSpec]
    outputs: list[TensorSpec]
    function: object = None  # the loaded signature, to run the original
    aliases: list[str] = field(default_factory=list)  # other signatures that compute the same
    others: list[str] = field(default_factory=list)  # signatures that are not rewritten (not written)

    @property
    def protected(self) -> set[str]:
        """Tensors the signature reads or returns: passes never remove or bypass them."""
        return {t.tensor for t in self.inputs + self.outputs}


def one_line(exc: BaseException) -> str:
    """The line of an error that says what went wrong (TF puts it after "Graph execution error")."""
    lines = [line.strip() for line in str(exc).strip().splitlines()]
    lines = [line for line in lines if line and not line.startswith(("[[", "<stack", "Detected at"))
             and line != "Graph execution error:"]
    return (lines[0] if lines else type(exc).__name__)[:240]


def load_signature(path: Path, signature: str = "serving_default") -> FrozenSignature:
    """Load ``signature`` of the SavedModel at ``path``; freeze variables; inline every call."""
    try:
        loaded = tf.saved_model.load(str(path))
    except Exception as exc:
        raise BadInput(f"{path}: not a loadable SavedModel ({one_line(exc)})") from exc
    signatures = dict(getattr(loaded, "signatures", {}) or {})
    if signature not in signatures:
        known = ", ".join(sorted(signatures)) or "none"
        raise BadInput(f"{path}: no signature {signature!r} (signatures: {known}); choose one with --signature")
    function = signatures[signature]
    try:
        graph_def, input_names, output_names = _compat.freeze(function)
    except Exception as exc:
        raise BadInput(f"{path}: cannot freeze signature {signature!r} ({one_line(exc)})") from exc

    input_specs = function.structured_input_signature[1]
    if len(input_names) != len(input_specs):
        raise BadInput(f"{path}: signature {signature!r} takes inputs that are not plain tensors")
    # Placeholders are named after the specs; TF orders them by key, the fallback if names differ.
    by_name = {f"{spec.name}:0": key for key, spec in input_specs.items() if spec.name}
    keys = ([by_name[name] for name in input_names] if set(by_name) == set(input_names)
            else sorted(input_specs))
    inputs = [TensorSpec(key, name, input_specs[key].dtype,
                         list(input_specs[key].shape) if input_specs[key].shape.rank is not None else None)
              for key, name in zip(keys, input_names)]
    output_specs = function.structured_outputs
    outputs = [TensorSpec(key, name, output_specs[key].dtype, None)
               for key, name in zip(sorted(output_specs), output_names)]
    graph_def = inline_calls(graph_def, [i.tensor for i in inputs], [o.tensor for o in outputs])
    graph_def = drop_dead_placeholders(graph_def, {g.split_input(i.tensor)[0] for i in inputs})
    aliases = [name for name, other in sorted(signatures.items())
               if name != signature and _same_computation(other, function)]
    others = sorted(set(signatures) - {signature, *aliases})
    return FrozenSignature(signature, graph_def, inputs, outputs, function, aliases, others)


def _same_computation(a, b) -> bool:
    """Two signatures that call the same traced function with the same inputs and outputs
    (``keras.Model.export`` writes ``serve`` and ``serving_default`` so)."""
    def callees(function):
        return sorted(n.attr["f"].func.name for n in function.graph.as_graph_def().node if n.op in CALL_OPS)

    return (a.structured_input_signature == b.structured_input_signature
            and a.structured_outputs == b.structured_outputs and callees(a) and callees(a) == callees(b))


def inline_calls(graph_def: graph_pb2.GraphDef, inputs: list[str], outputs: list[str]) -> graph_pb2.GraphDef:
    """Inline every (Stateful)PartitionedCall, XLA-compiled ones included, with grappler."""
    for _ in range(8):  # nested calls inline level by level; real models need one or two rounds
        graph_def = _unmark_no_inline(graph_def)
        graph_def = _grappler(graph_def, inputs + outputs, ["function", "dependency", "constfold"])
        if not any(n.op in CALL_OPS for n in graph_def.node):
            break
    left = sorted({n.op for n in graph_def.node if n.op in CALL_OPS})
    if left:
        raise BadInput(f"cannot inline the graph's {', '.join(left)} nodes")
    # The library is dead weight once every call is inlined.
    del graph_def.library.function[:]
    return graph_def


def drop_dead_placeholders(graph_def: graph_pb2.GraphDef, keep: set[str]) -> graph_pb2.GraphDef:
    """Remove the ``Placeholder`` nodes nothing reads, other than the signature's inputs.

    A SavedModel whose function imports a GraphDef with ``input_map`` (what ``write_savedmodel``
    writes, so any SavedModel this tool wrote) keeps the mapped placeholders as dead nodes; once
    frozen and inlined they are placeholders of the graph that no signature input feeds, and TF
    refuses to run the graph written from it again ("You must feed a value for placeholder
    tensor ...")."""
    read = {g.split_input(ref.lstrip("^"))[0] for node in graph_def.node for ref in node.input}
    dead = {n.name for n in graph_def.node if n.op == "Placeholder" and n.name not in keep and n.name not in read}
    if not dead:
        return graph_def
    graph_def = graph_pb2.GraphDef.FromString(graph_def.SerializeToString())
    kept = [n for n in graph_def.node if n.name not in dead]
    del graph_def.node[:]
    graph_def.node.extend(kept)
    return graph_def


def _unmark_no_inline(graph_def: graph_pb2.GraphDef) -> graph_pb2.GraphDef:
    graph_def = graph_pb2.GraphDef.FromString(graph_def.SerializeToString())
    for function in graph_def.library.function:
        for key in _NO_INLINE_MARKS:
            function.attr.pop(key, None)
        for node in function.node_def:
            for key in _NO_INLINE_MARKS:
                node.attr.pop(key, None)
    for node in graph_def.node:
        for key in _NO_INLINE_MARKS:
            node.attr.pop(key, None)
    return graph_def


def _grappler(graph_def: graph_pb2.GraphDef, fetches: list[str], optimizers: list[str]) -> graph_pb2.GraphDef:
    config = config_pb2.ConfigProto()
    rewrite = config.graph_options.rewrite_options
    rewrite.optimizers[:] = optimizers
    rewrite.min_graph_nodes = -1  # small graphs too
    graph = tf.Graph()
    with graph.as_default():
        tf.graph_util.import_graph_def(graph_def, name="")
    meta_graph = tf.compat.v1.train.export_meta_graph(graph_def=graph_def, graph=graph)
    fetch = meta_graph_pb2.CollectionDef()
    fetch.node_list.value.extend(fetches)
    meta_graph.collection_def["train_op"].CopyFrom(fetch)
    return _compat.optimize_graph(config, meta_graph)


def graph_stats(graph_def: graph_pb2.GraphDef) -> ModelStats:
    """Ops (without constants and NoOp/Identity plumbing, as ONNX counts nodes) and parameters
    (elements of floating constants, as ONNX counts floating initializers)."""
    op_types, parameters = [], 0
    for node in graph_def.node:
        if node.op not in ("NoOp", "Identity", "Placeholder", "Const"):
            op_types.append(node.op)
        if node.op == "Const" and tf.as_dtype(node.attr["dtype"].type).is_floating:
            dims = node.attr["value"].tensor.tensor_shape.dim
            size = int(np.prod([d.size for d in dims], dtype=np.int64)) if dims else 1
            parameters += size
    return ModelStats(nodes=len(op_types), parameters=parameters, op_counts=count_ops(op_types))


# -- writing ---------------------------------------------------------------------------------

# Floating constants at least this large go back into variables (the variables/ folder), as the
# original had them; this also keeps saved_model.pb under protobuf's 2 GB limit.
_VARIABLE_MIN_ELEMENTS = 16


def write_savedmodel(frozen: FrozenSignature, graph_def: graph_pb2.GraphDef, folder: Path, *,
                     keep_tf_runnable: bool = True) -> None:
    """Write ``graph_def`` as a SavedModel with the same signature name, input and output keys,
    dtypes and shapes; large constants become variables again. ``keep_tf_runnable``: write a
    grouped conv's bias as an AddV2 (see ``bias_after_grouped_conv_as_add``)."""
    if keep_tf_runnable:
        graph_def = tf_runnable(graph_def)
    stripped = graph_pb2.GraphDef()
    stripped.versions.CopyFrom(graph_def.versions)
    weights: dict[str, tf.Variable] = {}
    for node in graph_def.node:
        if node.op == "Const" and _is_weight(node):
            array = tf.make_ndarray(node.attr["value"].tensor)
            weights[node.name] = tf.Variable(array, trainable=False, name=_variable_name(node.name))
            # A placeholder of the same name, mapped to the variable on import.
            placeholder = stripped.node.add(name=node.name, op="Placeholder")
            placeholder.attr["dtype"].type = node.attr["dtype"].type
            placeholder.attr["shape"].shape.CopyFrom(tf.TensorShape(array.shape).as_proto())
        else:
            stripped.node.add().CopyFrom(node)

    specs = [tf.TensorSpec(i.shape, i.dtype, name=i.key) for i in frozen.inputs]

    def body(*args):
        input_map = {i.tensor: arg for i, arg in zip(frozen.inputs, args)}
        input_map.update({f"{name}:0": tf.identity(v) for name, v in weights.items()})
        # Control inputs on a replaced node (grappler gives the constants it folds inside a
        # function a "^input" one) follow it too; else they run its placeholder, unfed.
        input_map.update({f"^{g.split_input(ref)[0]}": t for ref, t in list(input_map.items())})
        results = tf.graph_util.import_graph_def(stripped, input_map=input_map, name="model",
                                                 return_elements=[o.tensor for o in frozen.outputs])
        return {o.key: tf.identity(t, name=o.key) for o, t in zip(frozen.outputs, results)}

    wrapped = tf.compat.v1.wrap_function(body, specs)

    @tf.function(input_signature=specs)
    def serve(*args):
        return wrapped(*args)

    module = tf.Module()
    module.weights = list(weights.values())  # tracked: saved under variables/
    module.serve = serve
    concrete = serve.get_concrete_function()
    tf.saved_model.save(module, str(folder), signatures={name: concrete for name in [frozen.name, *frozen.aliases]})


def tf_runnable(graph_def: graph_pb2.GraphDef) -> graph_pb2.GraphDef:
    """The graph as ``write_savedmodel`` writes it: a grouped conv's FusedBatchNorm and BiasAdd
    as Mul/AddV2 (names kept), which TF can run without oneDNN."""
    return bias_after_grouped_conv_as_add(batch_norm_after_grouped_conv_as_mul_add(graph_def))


def bias_after_grouped_conv_as_add(graph_def: graph_pb2.GraphDef) -> graph_pb2.GraphDef:
    """``grouped Conv2D → BiasAdd`` ⇒ ``grouped Conv2D → AddV2``, so that TF can run it.

    Grappler's remapper fuses Conv2D + BiasAdd into ``_FusedConv2D``, whose CPU kernel refuses
    grouped filters ("Fused conv implementation does not support grouped convolutions for now")
    unless oneDNN is on; Keras avoids it by compiling each grouped conv with XLA. An AddV2 of the
    same vector is not fused and computes the same.
    """
    index = g.GraphIndex(graph_def)
    targets = []
    for node in graph_def.node:
        if node.op != "BiasAdd":
            continue
        conv, _ = index.producer(index.skip_identity(node.input[0]))
        if conv is not None and conv.op == "Squeeze":  # Conv1D: Conv2D → Squeeze → BiasAdd fuses too
            conv, _ = index.producer(index.skip_identity(conv.input[0]))
        if conv is None or conv.op != "Conv2D":
            continue
        channel_axis = 3 if g.attr_str(conv, "data_format", "NHWC") == "NHWC" else 1
        data, kernel = index.shape(conv.input[0]), index.shape(conv.input[1])
        if data and kernel and len(data) == 4 and len(kernel) == 4 and data[channel_axis] not in (None, kernel[2]):
            bias_rank = len(index.shape(node.input[0]) or data)
            targets.append((node, g.attr_str(node, "data_format", "NHWC") != "NHWC", bias_rank))
    if not targets:
        return graph_def
    graph_def = graph_pb2.GraphDef.FromString(graph_def.SerializeToString())
    nodes = {n.name: n for n in graph_def.node}
    names = g.Names(graph_def)
    for original, channels_first, rank in targets:
        node = nodes[original.name]
        node.op = "AddV2"
        node.attr.pop("data_format", None)
        if channels_first:  # NCHW: the vector must broadcast over [C, H, W]
            shape = g.make_const(names.fresh(f"{node.name}/bias_shape"), np.array([-1] + [1] * (rank - 2), np.int32))
            reshape = g.make_node("Reshape", names.fresh(f"{node.name}/bias"), [node.input[1], shape.name],
                                  T=node.attr["T"], Tshape=tf.int32)
            node.input[1] = reshape.name
            graph_def.node.extend([shape, reshape])
    return graph_def


_BATCH_NORMS = ("FusedBatchNorm", "FusedBatchNormV2", "FusedBatchNormV3")


def batch_norm_after_grouped_conv_as_mul_add(graph_def: graph_pb2.GraphDef) -> graph_pb2.GraphDef:
    """``grouped Conv2D → FusedBatchNorm`` (inference, constant statistics) ⇒ ``Conv2D → Mul → AddV2``.

    The remapper fuses Conv2D + FusedBatchNorm (+ activation) into ``_FusedConv2D`` just as it
    does Conv2D + BiasAdd (tf-keras's grouped ``Conv2D`` + ``BatchNormalization``, once frozen
    and without Keras's XLA wrapper, in RegNet for one): the same vector per channel,
    ``scale / sqrt(variance + epsilon)``, then ``offset - mean * that``, computes the same.
    """
    index = g.GraphIndex(graph_def)
    targets = []
    for node in graph_def.node:
        if node.op not in _BATCH_NORMS or node.attr["is_training"].b or not _reads_grouped_conv(index, node):
            continue
        if any(index.readers.get(g.tensor_name(node.name, i)) for i in range(1, 6)):
            continue  # the statistics outputs are read: leave it
        params = [index.const(ref) for ref in node.input[1:5]]
        if any(p is None or p.ndim != 1 for p in params):
            continue
        targets.append((node.name, params))
    if not targets:
        return graph_def
    graph_def = graph_pb2.GraphDef.FromString(graph_def.SerializeToString())
    nodes = {n.name: n for n in graph_def.node}
    names = g.Names(graph_def)
    for name, (scale, offset, mean, variance) in targets:
        node = nodes[name]
        dtype = tf.as_dtype(node.attr["T"].type).as_numpy_dtype
        factor = scale.astype(np.float64) / np.sqrt(variance.astype(np.float64) + node.attr["epsilon"].f)
        shift = offset.astype(np.float64) - mean.astype(np.float64) * factor
        shape = [-1, 1, 1] if g.attr_str(node, "data_format", "NHWC").startswith("NC") else [-1]
        factor_node = g.make_const(names.fresh(f"{name}/scale"), factor.astype(dtype).reshape(shape))
        shift_node = g.make_const(names.fresh(f"{name}/shift"), shift.astype(dtype).reshape(shape))
        mul = g.make_node("Mul", names.fresh(f"{name}/mul"), [node.input[0], factor_node.name], T=node.attr["T"])
        # The AddV2 keeps the batch norm's name: its readers need no change.
        t = node.attr["T"].type
        node.op = "AddV2"
        node.ClearField("attr")
        node.attr["T"].type = t
        kept = [ref for ref in node.input[5:] if ref.startswith("^")]
        del node.input[:]
        node.input.extend([mul.name, shift_node.name, *kept])
        graph_def.node.extend([factor_node, shift_node, mul])
    return graph_def


def _reads_grouped_conv(index: g.GraphIndex, node) -> bool:
    """``node``'s first input is a grouped Conv2D's output (filter depth below the input's channels)."""
    conv, _ = index.producer(index.skip_identity(node.input[0]))
    if conv is None or conv.op != "Conv2D":
        return False
    channel_axis = 3 if g.attr_str(conv, "data_format", "NHWC") == "NHWC" else 1
    data, kernel = index.shape(conv.input[0]), index.shape(conv.input[1])
    return bool(data and kernel and len(data) == 4 and len(kernel) == 4
                and data[channel_axis] not in (None, kernel[2]))


def _is_weight(node) -> bool:
    dtype = tf.as_dtype(node.attr["dtype"].type)
    if not dtype.is_floating:
        return False
    dims = node.attr["value"].tensor.tensor_shape.dim
    return bool(dims) and int(np.prod([d.size for d in dims])) >= _VARIABLE_MIN_ELEMENTS


def _variable_name(node_name: str) -> str:
    return "".join(c if c.isalnum() or c in "_." else "_" for c in node_name)[-120:] or "w"


# -- verifying -------------------------------------------------------------------------------

def verification_inputs(frozen: FrozenSignature, options) -> Feeds:
    """Seeded random inputs per signature input (or the user's ``--inputs``), made as for ONNX
    (a ``None`` batch set to 1 and recorded in ``Feeds.defaulted``)."""
    given = options.inputs
    if given is not None and not isinstance(given, Mapping):
        given = load_inputs_file(Path(given))
    specs = [InputSpec(i.key, i.shape, i.dtype.name) for i in frozen.inputs]
    return make_inputs(specs, shapes=options.shapes, seed=options.seed, given=given,
                       outputs=_output_specs(frozen.function))


@contextmanager
def remapper_off():
    """Grappler's remapper off while TF runs a model for verification.

    The remapper fuses ``Conv2D`` + ``BiasAdd`` / ``FusedBatchNorm`` (+ activation) into
    ``_FusedConv2D``, whose CPU kernel without oneDNN (``TF_ENABLE_ONEDNN_OPTS=0``, the default
    on non-x86 builds) refuses grouped filters; a frozen graph with a native grouped conv, or a
    ``tf.function`` without Keras's XLA wrapper, then cannot run at all. Verification compares
    what the graphs compute, so it runs both unfused. The previous setting is restored after."""
    before = tf.config.optimizer.get_experimental_options().get("remapping", True)
    tf.config.optimizer.set_experimental_options({"remapping": False})
    try:
        yield
    finally:
        tf.config.optimizer.set_experimental_options({"remapping": before})


def run_function(function, feeds: dict[str, np.ndarray], role: str) -> dict[str, np.ndarray]:
    try:
        with remapper_off():
            results = function(**{k: tf.constant(v) for k, v in feeds.items()})
    except Exception as exc:
        raise VerificationImpossible(f"TensorFlow cannot run the {role} model, so verification is impossible "
                                     f"({one_line(exc)}); pass --no-verify to write it without proof") from exc
    return {k: v.numpy() for k, v in results.items()}


def verify_outputs(expected: dict[str, np.ndarray], actual: dict[str, np.ndarray], feeds, options) -> Verification:
    """The same per-output table as ONNX verification; raise VerificationFailed on a mismatch."""
    atol, rtol = options.atol, options.rtol
    inputs = {k: list(np.shape(v)) for k, v in feeds.items()}
    defaulted = dict(getattr(feeds, "defaulted", {}))
    if sorted(expected) != sorted(actual):
        verification = Verification(ran=True, passed=False, atol=atol, rtol=rtol, inputs=inputs,
                                    defaulted=defaulted,
                                    note=f"outputs changed: {sorted(expected)} -> {sorted(actual)}")
    else:
        outputs = [compare(k, expected[k], actual[k], atol, rtol) for k in sorted(expected)]
        verification = Verification(ran=True, passed=all(o.passed for o in outputs), atol=atol, rtol=rtol,
                                    outputs=outputs, inputs=inputs, defaulted=defaulted)
    if not verification.passed:
        failing = [o.name for o in verification.outputs if not o.passed]
        detail = verification.note or f"outputs {', '.join(failing)} differ beyond atol/rtol"
        raise VerificationFailed(f"verification failed: {detail}; nothing was written", verification)
    return verification


class SignatureRunner:
    """A signature run in TensorFlow, with ``extra`` tensors of its graph fetched as well
    (``gconv_rewrite.proof``'s runner): ``runner(feeds) → {name: array}``, the signature's outputs by
    key and each extra tensor by its name in the graph (``"node:0"``).

    ``function`` computes the outputs (the original signature, or the written SavedModel's);
    ``graph_def`` the extras (the frozen graph the passes read, or the graph they wrote, in the
    form ``write_savedmodel`` writes them). A signature returns only its outputs, and in a written
    SavedModel every node sits inside nested function calls under names grappler chooses, so the
    boundary tensors are fetched from the GraphDef, whose names are the ones the rewrites
    recorded. ``extra``: the asked-for names the graph has."""

    def __init__(self, function, frozen: FrozenSignature, graph_def: graph_pb2.GraphDef, role: str,
                 extra=()):
        self.function, self.role = function, role
        self.inputs = [InputSpec(i.key, i.shape, i.dtype.name) for i in frozen.inputs]
        self.output_specs = _output_specs(function)
        self.outputs = sorted(getattr(function, "structured_outputs", None) or {})
        nodes = {n.name for n in graph_def.node}
        self.extra = [name for name in dict.fromkeys(extra) if g.split_input(name)[0] in nodes]
        self._graph = None
        if self.extra:
            try:
                self._graph = _GraphRun(graph_def, {i.key: i.tensor for i in frozen.inputs}, self.extra)
            except Exception as exc:
                raise self._cannot_run(exc) from exc

    def __call__(self, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        values = run_function(self.function, feeds, self.role)
        if self._graph is not None:
            try:
                values.update(zip(self.extra, self._graph(feeds)))
            except Exception as exc:
                raise self._cannot_run(exc) from exc
        return values

    def _cannot_run(self, exc: Exception) -> VerificationImpossible:
        return VerificationImpossible(f"TensorFlow cannot run the {self.role} graph to its rewrites' boundaries "
                                      f"({one_line(exc)}); pass --no-verify to write it without proof")


class _GraphRun:
    """``graph_def`` run as it is, in a TF 1 session, to the tensors ``fetches``: ``run(feeds) →
    [arrays]``, feeds by signature key. Grappler is off (nothing fused or folded, as onnxruntime
    runs with its optimisations off; its remapper would also refuse a grouped conv + BiasAdd, see
    ``remapper_off``), which also spares its pass over the whole graph: on a 12-block, 384-conv
    graph the first run takes 0.2 s, against 1.4 s with it on (2.6 s as a pruned tf.function)."""

    def __init__(self, graph_def: graph_pb2.GraphDef, inputs: dict[str, str], fetches: list[str]):
        self.graph = tf.Graph()
        with self.graph.as_default():
            tf.compat.v1.import_graph_def(graph_def, name="")
        config = config_pb2.ConfigProto()
        config.graph_options.rewrite_options.disable_meta_optimizer = True
        self.session = tf.compat.v1.Session(graph=self.graph, config=config)
        self.inputs = {key: self.graph.get_tensor_by_name(name) for key, name in inputs.items()}
        self.fetches = [self.graph.get_tensor_by_name(name) for name in fetches]

    def __call__(self, feeds: Mapping[str, np.ndarray]) -> list[np.ndarray]:
        return self.session.run(self.fetches, {self.inputs[key]: feeds[key] for key in self.inputs})

    def __del__(self):
        self.session.close()  # its memory (the imported constants) goes with the runner


def _output_specs(function) -> list[InputSpec]:
    """The signature's outputs whose rank is known (what ``make_inputs`` sizes memory by)."""
    specs = []
    for key, spec in sorted((getattr(function, "structured_outputs", None) or {}).items()):
        shape = getattr(spec, "shape", None)
        if shape is not None and shape.rank is not None and hasattr(spec, "dtype"):
            specs.append(InputSpec(key, list(shape), spec.dtype.name))
    return specs


def load_written(path: Path, signature: str):
    """The written SavedModel's signature, or VerificationImpossible saying why it does not load."""
    try:
        return tf.saved_model.load(str(path)).signatures[signature]
    except Exception as exc:
        raise VerificationImpossible(f"the rewritten SavedModel does not load: {one_line(exc)}") from exc
