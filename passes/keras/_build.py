"""Rebuild a Keras 3 functional model from a ``KerasGraph``, call by call.

Keras itself cannot load every file we must read (TFOpLambda nodes, Lambdas with list defaults),
and the rewrite must replace some calls; so the model is rebuilt here, with the same layers,
names and configs, and hooks for what differs:

- ``lambda_functions``: the rebuilt (trusted) function of each Lambda layer;
- ``lambda_as_slice``: Lambda calls proven to be channel slices, written as ``GetItem`` (no code);
- ``replacements``: rewritten patterns; each removes some calls and, once its source tensor
  exists, emits the tensors that stand for their outputs (the Concatenate's, or each branch's
  where a fusion splits back).

Layer configs go through Keras's own deserialisation in safe mode (Keras 3 configs) or its legacy
converter (Keras 2 / tf-keras configs); a Lambda config never does: its function comes from
``lambda_functions`` or the build stops.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import json
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np

from gconv_rewrite.candidate import resolve_sizes
from gconv_rewrite.errors import BadInput, one_line
from gconv_rewrite.memory import paused_gc
from gconv_rewrite.passes.keras import _compat, _lambdas
from gconv_rewrite.passes.keras._config import (
    Call,
    KerasGraph,
    LayerSpec,
    TensorRef,
    WeightStore,
    first_arg_count,
    is_constant_leaf,
    kwarg_refs,
    legacy_kwargs,
    legacy_leaves,
)
from gconv_rewrite.passes.keras._slices import GETITEM_FUNCTIONS, SPLIT_FUNCTIONS


class Replacement(Protocol):
    source: TensorRef  # the tensor it reads
    removed: set[tuple[str, int]]  # the calls it replaces

    def emit(self, source_tensor) -> dict[TensorRef, Any]: ...  # tensors for the removed calls' outputs


@dataclass
class Built:
    model: Any  # keras.Model; None when a lenient build could not reach every output
    tensors: dict[TensorRef, Any]
    layers: dict[str, Any]  # layer name → Keras layer or operation object
    # Lenient builds: call key → why it was not built (its own failure, or the one upstream of it).
    unbuilt: dict[tuple[str, int], BadInput] = field(default_factory=dict)
    weights_loaded: bool = False  # load_weights gave every layer the file's arrays
    # Analysis builds (``BuildOptions.stand_ins``): layer name → the shape stand-in called in the
    # place of a layer that was not made. Such a model knows every shape but cannot run.
    stand_ins: dict[str, Any] = field(default_factory=dict)

    def first_failure(self) -> BadInput | None:
        """The failure the others follow from (the first layer that could not be rebuilt)."""
        return next(iter(self.unbuilt.values()), None)


@dataclass
class BuildOptions:
    lambda_functions: dict[str, Callable] = field(default_factory=dict)
    lambda_as_slice: dict[tuple[str, int], tuple[int, list[tuple[int, int]]]] = field(default_factory=dict)
    replacements: list = field(default_factory=list)
    # Called before each Lambda layer is made (with its call's input tensor, or None when it
    # reads several), e.g. to probe it; may return the output shape (without the batch dim).
    on_lambda: Callable[[Call, Any], Any] | None = None
    trusted: bool = False  # the user trusts the file's code (nested models' Lambdas may load)
    # Build what can be built: a layer Keras 3 cannot rebuild (a TFOpLambda without a rebuild, an
    # unknown class) is recorded in ``Built.unbuilt`` with everything downstream of it, instead of
    # stopping the build (analysis only needs the shapes it can get; Lambdas still stop it).
    lenient: bool = False
    # Layer objects an earlier build of the same graph made (the analysis), by layer name: called
    # again instead of made anew, with the weights they hold. Making, building and filling a
    # layer costs about a millisecond and a half; the emit after the analysis keeps most layers.
    reuse: dict[str, Any] = field(default_factory=dict)
    # Analysis only: where a call's output shape is known without making its layer — a Lambda the
    # probe (``on_lambda``) proved a channel slice, a Conv2D reading such a slice — a shape
    # stand-in is called instead (``Built.stand_ins``). Those are the calls a fusion removes: the
    # fusion reads their weights from the file, and making, building and calling their layers was
    # most of the analysis (512 Lambdas and 512 convs of a 1,199-layer ResNeXt: 1.3 of 2.0 s).
    stand_ins: bool = False


# Settings tf-keras writes that Keras 3 refuses as unknown arguments; dropped only where they hold
# the one value Keras 3 implies (anything else stays, and Keras says why it cannot rebuild it).
TF_KERAS_ONLY: dict[str, dict[str, Any]] = {"DepthwiseConv2D": {"groups": 1}}


def keras_name(name: str) -> str:
    """A layer name Keras 3 accepts: it refuses ``/`` (tf-keras's MobileNetV3 names layers
    ``expanded_conv/depthwise``). Weights stay keyed by the file's names; only the rebuilt layer
    is renamed."""
    return name.replace("/", "_")


def known_classes() -> dict[str, Any]:
    """tf-keras application layers that are no Keras built-in, by class name, as the Keras 3
    classes of the same config and computation (ConvNeXt's ``LayerScale`` is ``x * gamma``;
    ``StochasticDepth`` is the identity at inference). Library code, never the file's."""
    return _compat.convnext_layers()


def layer_object(layer: LayerSpec, legacy: bool, trusted: bool = False):
    """A Keras 3 layer from its config entry, in Keras's safe mode unless the file is trusted
    (a nested model may hold Lambdas). A top-level Lambda never comes here: it is built from
    its rebuilt function (see _lambdas)."""
    import keras

    if layer.class_name == "Lambda":
        raise AssertionError("Lambda layers are built from their rebuilt function, not their config")
    try:
        with warnings.catch_warnings():  # Keras's advice on how the file's author should have written it
            warnings.simplefilter("ignore")
            if legacy:
                entry = copy.deepcopy({"class_name": layer.class_name, "config": layer.config})
                if isinstance(entry["config"].get("name"), str):
                    entry["config"]["name"] = keras_name(entry["config"]["name"])
                for key, default in TF_KERAS_ONLY.get(layer.class_name, {}).items():
                    if entry["config"].get(key, default) == default:
                        entry["config"].pop(key, None)
                with _compat.safe_mode_scope(not trusted):
                    return _compat.legacy_model_from_config(entry, custom_objects=known_classes())
            entry = {k: copy.deepcopy(v) for k, v in layer.raw.items() if k not in ("inbound_nodes", "name")}
            if isinstance(entry.get("config"), dict) and isinstance(entry["config"].get("name"), str):
                entry["config"]["name"] = keras_name(entry["config"]["name"])
            return keras.saving.deserialize_keras_object(entry, safe_mode=not trusted, custom_objects=known_classes())
    except BadInput:
        raise
    except Exception as exc:
        raise BadInput(f"layer {layer.name!r} ({layer.class_name}): Keras cannot rebuild it "
                       f"({one_line(exc)})") from exc


def build(graph: KerasGraph, options: BuildOptions) -> Built:
    """Call every layer in dependency order; return the model and every tensor by reference.
    The file's layers start with zeros where Keras would draw random values (``load_weights``
    gives them the file's arrays); the replacements' layers are made as Keras makes them."""
    with paused_gc():
        return _build_model(graph, options)


def _build_model(graph: KerasGraph, options: BuildOptions) -> Built:
    tensors: dict[TensorRef, Any] = {}
    objects: dict[str, Any] = {}
    unbuilt: dict[tuple[str, int], BadInput] = {}
    removed = set().union(*(r.removed for r in options.replacements)) if options.replacements else set()
    pending = [c for c in graph.calls() if c.key not in removed]
    replacements = list(options.replacements)
    stand_ins: dict[str, Any] = {}
    if options.stand_ins and options.on_lambda is not None:
        options = dataclasses.replace(options, on_lambda=_probed_once(options.on_lambda))

    while pending or replacements:
        progress = False
        for replacement in [r for r in replacements if r.source in tensors]:
            tensors.update(replacement.emit(tensors[replacement.source]))
            replacements.remove(replacement)
            progress = True
        waiting = []
        for call in pending:
            upstream = next((unbuilt[(r.layer, r.node)] for r in call.inputs if (r.layer, r.node) in unbuilt), None)
            if upstream is not None:
                unbuilt[call.key] = upstream
                progress = True
            elif all(ref in tensors for ref in call.inputs):
                try:
                    if not (options.stand_ins and _stand_in(call, tensors, stand_ins, options)):
                        with _compat.unrandom_initial_values():  # load_weights replaces them all
                            _run_call(graph, call, tensors, objects, options)
                except BadInput as exc:
                    if not options.lenient or call.layer.class_name == "InputLayer":
                        raise
                    unbuilt[call.key] = exc
                progress = True
            else:
                waiting.append(call)
        if not progress:
            names = ", ".join(sorted({c.layer.name for c in waiting})[:5])
            raise BadInput(f"the model config cannot be ordered: layers {names} read tensors no layer makes")
        pending = waiting

    return _assemble(graph, Built(None, tensors, objects, unbuilt, stand_ins=stand_ins), options)


def _assemble(graph: KerasGraph, built: Built, options: BuildOptions) -> Built:
    """The model of every called layer (``built.model``), or, in a lenient build, None with why."""
    import keras

    tensors, unbuilt = built.tensors, built.unbuilt
    if any((r.layer, r.node) in unbuilt for r in graph.outputs):
        return built
    missing = next((r for r in graph.inputs + graph.outputs if r not in tensors), None)
    if missing is not None:  # e.g. an output index past what the layer returns
        failure = BadInput(f"the model config names output {missing.tensor} of {missing.layer!r} call "
                           f"{missing.node} as a model input or output; the rebuilt layer has no such tensor")
        if not options.lenient:
            raise failure
        unbuilt[(graph.name, -1)] = failure
        return built
    inputs = [tensors[r] for r in graph.inputs]
    outputs = [tensors[r] for r in graph.outputs]
    try:
        built.model = keras.Model(inputs=inputs if len(inputs) > 1 else inputs[0],
                                  outputs=outputs if len(outputs) > 1 else outputs[0], name=keras_name(graph.name))
    except Exception as exc:
        failure = BadInput(f"cannot rebuild the model from its layers ({one_line(exc)})")
        if not options.lenient:
            raise failure from exc
        unbuilt[(graph.name, -1)] = failure  # every layer built, the model not: analysis goes on
    return built


def _probed_once(on_lambda: Callable[[Call, Any], Any]) -> Callable[[Call, Any], Any]:
    """``on_lambda`` asked once per call (the stand-in check asks first, the Lambda's making again
    where it is made)."""
    answers: dict[tuple[str, int], Any] = {}

    def probe(call: Call, tensor):
        if call.key not in answers:
            answers[call.key] = on_lambda(call, tensor)
        return answers[call.key]

    return probe


def _stand_in(call: Call, tensors, stand_ins: dict[str, Any], options: BuildOptions) -> bool:
    """Lambda (a proven slice) or Conv2D (reading one): its shape stand-in called in its place
    (see ``BuildOptions.stand_ins``); False where the layer must be made (any doubt)."""
    layer = call.layer
    if len(layer.calls) != 1 or len(call.inputs) != 1:
        return False
    source = tensors[call.inputs[0]]
    if layer.class_name == "Lambda" and options.on_lambda is not None:
        shape = options.on_lambda(call, source)
        shape = None if shape is None else (source.shape[0], *shape)
    elif layer.class_name == "Conv2D" and call.inputs[0].layer in stand_ins:
        shape = _conv2d_shape(layer.config, source)
    else:
        return False
    if shape is None:
        return False
    stand_in = _shape_stand_in()(tuple(shape), source.dtype, keras_name(layer.name))
    tensors[TensorRef(layer.name, call.index, 0)] = stand_in(source)
    stand_ins[layer.name] = stand_in
    return True


def _conv2d_shape(config: dict, source) -> tuple | None:
    """A Conv2D's output shape from its config, by Keras's own rule for it; None where anything is
    unusual (a dtype policy other than float32, a setting the rule does not take, a shape it
    refuses: the layer itself is made then, and says why)."""
    import keras
    from keras.src.ops.operation_utils import compute_conv_output_shape

    dtype = config.get("dtype")
    if isinstance(dtype, dict):
        dtype = (dtype.get("config") or {}).get("name")
    padding = str(config.get("padding", "valid")).lower()
    if dtype not in (None, "float32") or source.dtype != "float32" or padding not in ("same", "valid"):
        return None

    def pair(value):
        return tuple(value) if isinstance(value, (list, tuple)) else (value, value)

    try:
        return tuple(compute_conv_output_shape(
            tuple(source.shape), int(config["filters"]), pair(config["kernel_size"]),
            strides=pair(config.get("strides", 1)), padding=padding,
            data_format=config.get("data_format") or keras.config.image_data_format(),
            dilation_rate=pair(config.get("dilation_rate", 1))))
    except Exception:
        return None


@functools.cache
def _shape_stand_in() -> type:
    """The stand-in operation: called on a tensor, it gives a tensor of the stood-in layer's
    output shape and dtype (connected, so the model can be assembled); it never runs."""
    import keras

    class ShapeStandIn(keras.Operation):
        def __init__(self, shape: tuple, dtype: str, name: str):
            super().__init__(name=name)
            self.stood_in_shape, self.stood_in_dtype = shape, dtype

        def compute_output_spec(self, x):
            return keras.KerasTensor(self.stood_in_shape, dtype=self.stood_in_dtype)

        def call(self, x):
            raise AssertionError(f"{self.name}: a shape stand-in is never run")

    return ShapeStandIn


def _run_call(graph: KerasGraph, call: Call, tensors, objects, options: BuildOptions) -> None:
    import keras
    from keras import tree

    layer = call.layer
    if layer.class_name == "InputLayer":
        obj = objects.get(layer.name) or options.reuse.get(layer.name) or layer_object(layer, graph.legacy)
        objects[layer.name] = obj
        tensors[TensorRef(layer.name, 0, 0)] = obj.output
        return

    if call.key in options.lambda_as_slice:
        axis, ranges = options.lambda_as_slice[call.key]
        outputs = _slice_ops(layer.name, tensors[call.inputs[0]], axis, ranges)
    elif layer.class_name in ("SlicingOpLambda", "TFOpLambda"):
        outputs = _tf_op(graph, call, tensors)
    else:
        obj = objects.get(layer.name) or options.reuse.get(layer.name)
        if obj is None:
            if layer.class_name == "Lambda":
                function = options.lambda_functions.get(layer.name)
                if function is None:
                    raise BadInput(f"Lambda layer {layer.name!r} has no trusted function to run")
                arguments = layer.config.get("arguments") or {}
                output_shape = None
                if options.on_lambda is not None:
                    # Probe first: a proven slice's shape spares Keras tracing the code for it.
                    inputs = [tensors[ref] for ref in call.inputs]
                    output_shape = options.on_lambda(call, inputs[0] if len(inputs) == 1 else None)
                    if len(layer.calls) != 1:
                        output_shape = None
                # Written so that the saved file loads and runs it again (a named def, K, tf...).
                obj = keras.layers.Lambda(_lambdas.portable(function), output_shape=output_shape, arguments=arguments or None,
                                          name=keras_name(layer.name))
            else:
                try:
                    obj = layer_object(layer, graph.legacy, options.trusted)
                except BadInput as exc:
                    operation = _operation_failure(layer)
                    if operation is None:
                        raise
                    raise operation from exc
            objects[layer.name] = obj
        args, kwargs = _call_arguments(graph, call, tensors)
        try:
            result = obj(*args, **kwargs)
        except Exception as exc:
            if layer.class_name == "Lambda":
                raise BadInput(_lambda_failure(layer.name, options.lambda_functions[layer.name],
                                               layer.config.get("arguments") or {}, args)) from exc
            raise _operation_failure(layer) or BadInput(f"layer {layer.name!r} ({layer.class_name}) fails when "
                                                        f"rebuilt ({type(exc).__name__}: {one_line(exc)})") from exc
        outputs = tree.flatten(result)
    for i, tensor in enumerate(outputs):
        tensors[TensorRef(layer.name, call.index, i)] = tensor


@functools.lru_cache(maxsize=1)
def operation_classes() -> dict[str, str]:
    """``keras.ops`` operation classes (no layers) by class name → module. Library code."""
    import inspect

    import keras

    found: dict[str, str] = {}
    for module in _compat.operation_modules():
        for name, obj in vars(module).items():
            if inspect.isclass(obj) and issubclass(obj, keras.Operation) and not issubclass(obj, keras.Layer):
                found.setdefault(name, obj.__module__)
    return found


def keras_operation(layer: LayerSpec) -> str | None:
    """The module of a ``keras.ops`` operation that Keras 3 wrote into an .h5 config as if it
    were a layer, or None. Keras 3's legacy .h5 writer drops an operation's module: ``x + 3.0``
    on a Keras tensor is ``{"class_name": "Add", "config": {"name": "add"}}`` with the call
    ``{"args": [tensor, 3.0]}``, and ``keras.layers.Add`` (always called with one list) has the
    same class name. Every Keras 3 layer writes ``trainable`` in its config; no operation does."""
    if layer.raw.get("module") or "trainable" in layer.config or layer.class_name == "InputLayer":
        return None
    if not layer.calls or not all(isinstance(c.data, dict) for c in layer.calls):
        return None  # tf-keras / Keras 2 nodes: no keras.ops there
    return operation_classes().get(layer.class_name)


def _operation_failure(layer: LayerSpec) -> BadInput | None:
    """For a keras.ops entry of an .h5 that Keras 3's own loader cannot rebuild either (it resolves
    the class name among layers only: ``Add(tensor, 3.0)`` fails as ``keras.layers.Add``,
    ``GetItem`` is unknown), the reason, said once; None for any other layer. (Where Keras's
    reading works, ``Concatenate``/``Softmax`` operations as the layers of the same effect, the
    model is rebuilt as Keras loads it, and this is never asked.)"""
    module = keras_operation(layer)
    return BadInput(_operation_refusal(layer, module)) if module is not None else None


def call_form(node: dict) -> str:
    """``(tensor, 3.0)``, ``(tensor, tensor)``, ``([tensor, tensor])``... of a Keras 3 node's call."""
    def show(item):
        if isinstance(item, dict) and item.get("class_name") == "__keras_tensor__":
            return "tensor"
        if isinstance(item, list):
            return "[" + ", ".join(show(i) for i in item) + "]"
        if isinstance(item, dict):
            return str(item.get("class_name") or "{...}")
        return repr(item)[:20]

    parts = [show(a) for a in node.get("args", [])]
    parts += [f"{k}={show(v)}" for k, v in (node.get("kwargs") or {}).items()]
    return "(" + ", ".join(parts) + ")"


def _operation_refusal(layer: LayerSpec, module: str) -> str:
    """Why an .h5's keras.ops entry is not rebuilt: Keras 3 cannot load the file itself."""
    import keras

    data = layer.calls[0].data if layer.calls else {}
    form = call_form(data)[1:-1][:80]
    reads = f"keras.layers.{layer.class_name}, which does not fit it" \
        if isinstance(getattr(keras.layers, layer.class_name, None), type) else "an unknown layer"
    return (f"layer {layer.name!r} ({layer.class_name}) is the keras.ops operation {module}.{layer.class_name}"
            f"({form}), which Keras 3's .h5 writer records without its module; Keras 3 reads it back as "
            f"{reads}: Keras 3 cannot load this file either (save the model as .keras)")


def _lambda_failure(name: str, function: Callable, arguments: dict, args: list) -> str:
    """Why a Lambda cannot run: Keras hides the cause behind "could not infer the output shape"."""
    import tensorflow as tf

    from gconv_rewrite.passes.keras._lambdas import probe_shape

    try:
        shape = probe_shape(list(args[0].shape))
        function(tf.zeros(shape), **arguments)
        cause = "Keras cannot infer its output shape"
    except NameError as exc:
        cause = (f"NameError: {exc}: a global the file does not hold (a helper defined beside the model, or "
                 "the loop variable of Lambdas made in a loop at module level, which --repair-late-binding "
                 "re-binds per branch)")
    except Exception as exc:
        cause = f"{type(exc).__name__}: {one_line(exc)}"
    return f"Lambda layer {name!r} fails when run: {cause}"


def _call_arguments(graph: KerasGraph, call: Call, tensors) -> tuple[list, dict]:
    """The args/kwargs of a call with the file's tensor references replaced by built tensors."""
    import keras
    from keras import tree

    if call.data is None:  # Sequential: one input
        return [tensors[call.inputs[0]]], {}
    if isinstance(call.data, dict):
        data = call.data

        def revive(x):
            if isinstance(x, keras.KerasTensor):
                history = _compat.pre_serialization_history(x)
                if history is not None:
                    ref = TensorRef(history[0], int(history[1]), int(history[2]))
                    if ref not in tensors:  # the parsed refs and the node disagree, or no such output
                        raise BadInput(f"layer {call.layer.name!r} reads {ref.layer!r} call {ref.node} output "
                                       f"{ref.tensor}, which the rebuilt model does not hold")
                    return tensors[ref]
            return x

        try:
            args = keras.saving.deserialize_keras_object(copy.deepcopy(data.get("args", [])), safe_mode=True)
            kwargs = keras.saving.deserialize_keras_object(copy.deepcopy(data.get("kwargs", {})), safe_mode=True)
        except Exception as exc:
            raise BadInput(f"layer {call.layer.name!r}: cannot read its call arguments ({one_line(exc)})") from exc
        try:
            return tree.map_structure(revive, args), tree.map_structure(revive, kwargs or {})
        except (TypeError, ValueError, IndexError) as exc:  # a malformed keras_history
            raise BadInput(f"layer {call.layer.name!r}: cannot read its call arguments ({one_line(exc)})") from exc
    # The parsed refs (node indexes already corrected): the first argument's, then the kwargs'.
    count = first_arg_count(call.data)
    built = [tensors[ref] for ref in call.inputs[:count]]
    kwargs = _revive_kwargs(legacy_kwargs(call.data), call.inputs[count:], tensors)
    return [built[0] if len(built) == 1 else built], kwargs


def _revive_kwargs(kwargs: dict, refs: list[TensorRef], tensors) -> dict:
    """Legacy kwargs with each ``[layer, node, tensor]`` replaced by its built tensor; ``refs``
    are the parsed (corrected) references of those lists, in the order ``kwarg_refs`` finds them."""
    pending = iter(refs)

    def revive(value):
        if kwarg_refs(value) == [value]:
            return tensors[next(pending)]
        if isinstance(value, dict):
            return {k: revive(v) for k, v in value.items()}
        if isinstance(value, list):
            return [revive(v) for v in value]
        return value

    return {k: revive(v) for k, v in kwargs.items()}


def _slice_ops(name: str, source, axis: int, ranges: list[tuple[int, int]]) -> list:
    """source[..., a:b] per range, as Keras 3 GetItem operations named after the replaced layer."""
    outputs = []
    rank = len(source.shape)
    for i, (start, stop) in enumerate(ranges):
        key = (Ellipsis, slice(start, stop)) if axis == rank - 1 else \
            tuple([slice(None)] * axis + [slice(start, stop)])
        op = _compat.get_item(keras_name(name if len(ranges) == 1 else f"{name}_{i}"))
        outputs.append(op(source, key))
    return outputs


def _tf_op(graph: KerasGraph, call: Call, tensors) -> list:
    """tf-keras TFOpLambda / SlicingOpLambda nodes, as the Keras 3 operations they are."""
    from gconv_rewrite.passes.keras import _tf_ops

    layer = call.layer
    function = str(layer.config.get("function", ""))
    if isinstance(call.data, dict):
        raise _tf_ops.NotRebuilt(f"layer {layer.name!r} (tf.{function}): a TFOpLambda node in Keras 3 form "
                                 "cannot be rebuilt", function=function, layer=layer.name)
    count = first_arg_count(call.data)
    kwargs = _revive_kwargs(legacy_kwargs(call.data), call.inputs[count:], tensors)
    kwargs.pop("name", None)
    if function in GETITEM_FUNCTIONS or function in SPLIT_FUNCTIONS:
        if count != 1 or len(call.inputs) != 1:
            raise _tf_ops.NotRebuilt(f"layer {layer.name!r} (tf.{function}): only slices and splits of one "
                                     "tensor by constants can be rebuilt", function=function, layer=layer.name)
        source = tensors[call.inputs[0]]
        if function in GETITEM_FUNCTIONS:
            key = tuple(_slice_item(item) for item in (kwargs.get("slice_spec") or []))
            return [_compat.get_item(keras_name(layer.name))(source, key)]
        sections = kwargs.get("num_or_size_splits")
        axis = kwargs.get("axis", 0)
        if isinstance(sections, list):
            size = source.shape[axis]
            sizes = resolve_sizes(sections, size) or list(sections)
            sections = list(np.cumsum(sizes)[:-1].astype(int).tolist())
        return list(_compat.split(sections, axis=axis, name=keras_name(layer.name))(source))
    first = _first_argument(call, tensors)
    return _tf_ops.rebuild(function, layer.name, first, kwargs)


def _first_argument(call: Call, tensors):
    """The node's first-argument structure with each leaf a built tensor (or its constant)."""
    pending = iter(call.inputs[:first_arg_count(call.data)])

    def revive(node):
        if is_constant_leaf(node):
            return node[2]
        if legacy_leaves(node) == [node]:
            return tensors[next(pending)]
        return [revive(item) for item in node]

    return revive(call.data)


def _slice_item(item):
    if isinstance(item, dict):
        if item.get("class_name") == "__ellipsis__":
            return Ellipsis
        if {"start", "stop", "step"} & set(item):
            return slice(item.get("start"), item.get("stop"), item.get("step"))
    if item is None or isinstance(item, int):
        return item
    raise BadInput(f"unsupported slice item {json.dumps(item)[:60]}")


def load_weights(built: Built, graph: KerasGraph, weights: WeightStore, *, reused: dict[str, Any] | None = None) -> None:
    """Give every rebuilt layer the arrays the file holds for it (once: a second call on the same
    build returns); ``reused``: an earlier build's layers, which this one called again and which
    already hold theirs."""
    if built.weights_loaded:
        return
    for name, obj in built.layers.items():
        if not hasattr(obj, "weights") or (reused is not None and reused.get(name) is obj):
            continue  # an operation (GetItem, Split): nothing to hold; or a layer given its arrays
        try:
            if weights.keras3:
                _assign_keras3(obj, weights.tree(name), name)
            else:
                _assign_legacy(obj, weights.get(name), name)
        except BadInput:
            raise
        except Exception as exc:
            raise BadInput(f"layer {name!r}: its weights do not fit ({one_line(exc)})") from exc
    built.weights_loaded = True


def _assign_keras3(obj, tree: dict, name: str) -> None:
    """As Keras 3 loads them: own variables by index; a nested model's layers by saved key."""
    import keras

    from gconv_rewrite.passes.keras._config import saved_keys

    if isinstance(obj, keras.Model):
        sublayers = list(obj.layers)
        saved = tree.get("layers", {})
        for sub, key in zip(sublayers, saved_keys([type(s).__name__ for s in sublayers])):
            _assign_keras3(sub, saved.get(key, {}), f"{name}/{sub.name}")
        return
    if tree.get("other") and any(t.get("vars") or t.get("layers") or t.get("other")
                                 for t in tree["other"].values()):
        raise BadInput(f"layer {name!r} holds sublayers of its own; rebuilding those is not supported yet")
    arrays = tree.get("vars", [])
    own = _compat.own_variables(obj)
    if own is None:
        own = list(obj.weights)
    if len(arrays) != len(own):
        raise BadInput(f"layer {name!r}: the file holds {len(arrays)} weight arrays, the layer expects {len(own)}")
    if arrays:
        obj.load_own_variables({str(i): a for i, a in enumerate(arrays)})


def _assign_legacy(obj, arrays: list[np.ndarray], name: str) -> None:
    """As Keras loads legacy .h5 files: trainable weights, then non-trainable, in order."""
    symbolic = list(obj.trainable_weights) + list(obj.non_trainable_weights)
    if len(arrays) != len(symbolic):
        raise BadInput(f"layer {name!r}: the file holds {len(arrays)} weight arrays, the layer expects "
                       f"{len(symbolic)}")
    for variable, array in zip(symbolic, arrays):
        if tuple(variable.shape) != tuple(array.shape):
            raise BadInput(f"layer {name!r}: weight of shape {tuple(array.shape)} does not fit "
                           f"{tuple(variable.shape)}")
        variable.assign(array)
