"""The Keras backend's parts (``gconv_rewrite.passes.keras.backend`` is the backend): reading the graph without
running it, the analysis that rebuilds it as it is (shapes, Lambdas probed, slices), the
reference model to compare with, running and comparing, and the statistics.
"""

from __future__ import annotations

import logging
import os
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np

from gconv_rewrite import formats
from gconv_rewrite.errors import BadInput, VerificationFailed, VerificationImpossible, one_line
from gconv_rewrite.memory import paused_gc
from gconv_rewrite.passes.keras import _build, _compat, _config, _lambdas, _slices
from gconv_rewrite.report import ModelStats, Report, Skip, Verification, count_ops
from gconv_rewrite.verify import Feeds, InputSpec, load_inputs_file, make_inputs

log = logging.getLogger(__name__)


def _unbuilt_skips(built: _build.Built) -> list[Skip]:
    """Each layer Keras 3 cannot rebuild, with what that hides: the layers after it are not
    rebuilt either, so their shapes are known only where the file records them."""
    roots: dict[int, tuple[str, BadInput, int]] = {}
    for (layer, _), failure in built.unbuilt.items():
        name, _, count = roots.get(id(failure), (layer, failure, 0))
        roots[id(failure)] = (name, failure, count + 1)
    return [Skip(name, failure.message + (f"; {count - 1} layer call(s) after it are not rebuilt: hand-made groups "
                                          "there are checked only where the file records their shapes, and cannot "
                                          "be rewritten" if count > 1 else "; the model cannot be rewritten"),
                 code="not-rebuilt")
            for name, failure, count in roots.values()]


def _read_graph(path: Path, kfile: _config.KerasFile, options, report: Report) -> _config.KerasGraph | None:
    """The model's graph of layers; None (reported) for a subclassed model; refused when the file
    holds Lambda code and the user does not trust it."""
    model_class = _config.model_class(kfile.config)
    if model_class not in _config.FUNCTIONAL + _config.SEQUENTIAL:
        report.skipped.append(Skip(model_class or "<model>", f"subclassed model ({model_class or 'unknown class'}): "
                                   "its computation is Python code, not a graph of layers in the file; left as it is",
                                   code="not-rebuilt"))
        report.verification = Verification(ran=False, passed=None, atol=options.atol, rtol=options.rtol,
                                           note="subclassed model: nothing to rewrite")
        return None
    graph = _config.parse_graph(kfile.config, legacy=kfile.kind == "h5" or _is_legacy(kfile.config), path=path)
    report.before = _graph_stats(graph, kfile.weights)
    lambda_layers = _config.lambda_names(kfile.config)  # nested models' too
    if lambda_layers and not options.trust_lambdas:
        names = ", ".join(lambda_layers[:3]) + (" …" if len(lambda_layers) > 3 else "")
        raise BadInput(f"{path}: refusing to run code: {_lambdas.TRUST_HINT} (Lambda layers: {names})")
    return graph


def _carry_compile_settings(model, kfile: _config.KerasFile, report: Report) -> None:
    """The file's optimizer, loss and metrics settings, compiled into the rewritten model
    (optimizer *state* is not carried: the output is for inference, or training anew)."""
    if not kfile.compile_config:
        return
    import warnings

    try:
        with warnings.catch_warnings(), _compat.safe_mode_scope(True):
            warnings.simplefilter("ignore")
            if kfile.kind == "h5":
                model.compile(**_compat.legacy_compile_args(kfile.compile_config))
            else:
                model.compile_from_config(kfile.compile_config)
    except Exception as exc:
        report.skipped.append(Skip("<compile settings>", "optimizer/loss/metrics settings not carried over "
                                   f"({one_line(exc)}); the model is written uncompiled", code="not-carried"))


def _has_lambda(model) -> bool:
    """Any Lambda left, nested models included (the written file then needs trust to load)."""
    return any(type(layer).__name__ == "Lambda" or (hasattr(layer, "layers") and _has_lambda(layer))
               for layer in model.layers)


def _is_legacy(config: dict) -> bool:
    """A Keras 2 config inside a .keras file? Its nodes are lists, not {args, kwargs}."""
    for layer in (config.get("config") or {}).get("layers", []):
        for node in layer.get("inbound_nodes", []) or []:
            return isinstance(node, list)
    return False


# -- analysis: shapes, Lambdas, slices ---------------------------------------------------------

class _Analysis:
    def __init__(self, graph: _config.KerasGraph | None = None):
        self.graph = graph
        self._readers: dict[_config.TensorRef, list[_config.Call]] | None = None
        self.built: _build.Built | None = None
        self.functions: dict[str, Any] = {}
        self.lambda_sources: dict[str, _lambdas.LambdaSource] = {}
        self.lambda_results: dict[tuple[str, int], Any] = {}
        self.lambda_skips: list[tuple[str, str]] = []
        self.placeholders: dict[str, list[str]] = {}  # Lambda → globals bound to 0 only for shapes
        self.slices: dict[tuple[str, int], _slices.SliceCall | str] = {}

    def shape_of(self, ref: _config.TensorRef) -> list[int | None] | None:
        tensor = self.built.tensors.get(ref) if self.built else None
        if tensor is not None:
            return list(tensor.shape)
        return self._recorded_shape(ref) if self.built is not None and self.built.unbuilt else None

    def _recorded_shape(self, ref: _config.TensorRef) -> list[int | None] | None:
        """Past a layer Keras 3 cannot rebuild, the shape the file records where a layer reads
        ``ref`` first: the Keras 3 node's tensor, or tf-keras's ``build_config`` input shape (of
        a layer called once; not every file has it)."""
        if self.graph is None:
            return None
        if self._readers is None:
            self._readers = self.graph.consumers()
        for call in self._readers.get(ref, []):
            if not call.inputs or call.inputs[0] != ref or len(call.layer.calls) != 1:
                continue
            if isinstance(call.data, dict):
                shape = _config.keras3_tensor_shape(call.data, 0)
            else:
                shape = (call.layer.raw.get("build_config") or {}).get("input_shape")
            if isinstance(shape, list) and shape and all(d is None or isinstance(d, int) for d in shape):
                return list(shape)
        return None


def _analyse(path: Path, graph: _config.KerasGraph, kfile: _config.KerasFile, options) -> _Analysis:
    """Rebuild the model as it is (Lambdas from their trusted code) to know every tensor's shape,
    and probe every Lambda call on its input's shape."""
    analysis = _Analysis(graph)
    for layer in graph.layers.values():
        if _lambdas.is_lambda(layer):
            source = _lambdas.lambda_source(layer)
            analysis.lambda_sources[layer.name] = source
            missing = _lambdas.unresolved_globals(source)
            if missing and options.repair_late_binding:
                # A module-level loop variable the file does not hold: bind it to 0 for the shapes;
                # the late-binding repair must then re-bind it per branch, or the run stops.
                analysis.placeholders[layer.name] = missing
                analysis.functions[layer.name] = _lambdas.make_function(source, bind={n: 0 for n in missing})
            else:
                analysis.functions[layer.name] = _lambdas.make_function(source)

    def on_lambda(call: _config.Call, input_tensor):
        if input_tensor is None:
            analysis.lambda_results[call.key] = "the Lambda reads several tensors"
            return None
        probed = _lambdas.probe_slice(analysis.functions[call.layer.name],
                                      analysis.lambda_sources[call.layer.name].arguments, list(input_tensor.shape))
        analysis.lambda_results[call.key] = probed
        return _slice_shape(probed, input_tensor)

    try:
        analysis.built = _build.build(graph, _build.BuildOptions(lambda_functions=analysis.functions,
                                                                 on_lambda=on_lambda, trusted=options.trust_lambdas,
                                                                 lenient=True, stand_ins=True))
    except BadInput as exc:
        raise BadInput(f"{path}: {exc.message}") from exc
    # Keras 3 files key weights by the model's layer order, which the rebuilt model now knows;
    # where part of it could not be rebuilt, the config's order of its layers (not its operations).
    if analysis.built.model is not None:
        kfile.weights.resolve(_layer_order(analysis.built, graph))
    else:
        kfile.weights.resolve([(layer.name, layer.class_name) for layer in graph.layers.values()
                               if not str(layer.raw.get("module") or "").startswith(_compat.OPS_MODULE_PREFIX)])
    for call in graph.calls():
        result = _slices.read_slice(call, analysis.shape_of, analysis.lambda_results)
        if result is not None:
            analysis.slices[call.key] = result
        if call.layer.class_name == "Lambda" and isinstance(result, str) and call.key not in analysis.built.unbuilt:
            analysis.lambda_skips.append((call.layer.name, f"Lambda left as it is: not a channel slice ({result})"))
    _lambdas.release_probes()  # every Lambda is probed: their memory is not held past the analysis
    return analysis


# -- verification ------------------------------------------------------------------------------

def _reference(path: Path, graph, kfile, analysis: _Analysis, fuser, options,
               has_lambdas: bool) -> tuple[Any, str, str]:
    """The model to compare against, a note on it for the verification line, and what it is
    (``Verification.reference``). In order: tf-keras's own load of a file tf-keras (or Keras 2)
    wrote, where tf-keras is installed — independent of the tool's Keras 3 rebuild, so a rebuild
    mistake shows; Keras 3's own load; else the model rebuilt from the file's config (layer by
    layer through Keras's deserialisers, Lambdas from the file's code). With a late-binding repair,
    the rebuild with the Lambdas re-bound to their branch positions: the written model is meant to
    differ from the file (tf-keras runs the late-bound computation), so the file cannot be the
    reference; every other layer of that rebuild is the one the analysis built."""
    if getattr(fuser, "rebound", None):
        functions = {**analysis.functions, **fuser.rebound}
        built = _build.build(graph, _build.BuildOptions(lambda_functions=functions, trusted=True))
        _build.load_weights(built, graph, kfile.weights)
        return (built.model, "reference: the late-bound Lambdas re-bound to their branch positions",
                "the tool's rebuild, late-bound Lambdas re-bound to their branch positions (--repair-late-binding)")
    loaded = load_reference(path, kfile, has_lambdas=has_lambdas, run_code=has_lambdas and options.trust_lambdas)
    return loaded if not isinstance(loaded, str) else rebuilt_reference(graph, kfile, analysis, loaded)


def load_reference(path: Path, kfile: _config.KerasFile, *, has_lambdas: bool,
                   run_code: bool) -> tuple[Any, str, str] | str:
    """The original as Keras itself loads it (the model, a note, what it is): tf-keras's load of a
    file tf-keras (or Keras 2) wrote, where tf-keras is installed, else Keras 3's; or, where
    neither loads it, the note that says why (the caller then rebuilds it from the config). Also
    run in the reference process (``gconv_rewrite.passes.keras.reference``), which has only the file."""
    loaded = _tf_keras_load(path, kfile, run_code=run_code)
    if not isinstance(loaded, str):
        return loaded
    tf_keras_failure = loaded
    import keras

    try:
        if kfile.kind == "keras":
            # Keras's loader extracts every member: it reads the archive as accepted within the
            # limits (gconv_rewrite.passes.keras._config), written anew, never the input file itself.
            with formats.scratch_dir() as scratch:
                accepted = Path(scratch) / "accepted.keras"
                kfile.write_accepted(accepted)
                model = keras.models.load_model(accepted, compile=False, safe_mode=not has_lambdas)
        else:
            model = keras.models.load_model(path, compile=False, safe_mode=not has_lambdas)
        return model, tf_keras_failure, f"keras {keras.__version__} (load_model)"
    except Exception as exc:
        reason = one_line(exc)
    # Keras cannot load it (tf-keras TFOpLambda nodes, Lambdas with list defaults...): compare with
    # the model rebuilt from the file's own config and trusted code.
    note = f"reference: rebuilt from the file's config, as Keras cannot load it ({reason[:80]})"
    return "; ".join(n for n in (tf_keras_failure, note) if n)


def _layer_order(built: _build.Built, graph: _config.KerasGraph) -> list[tuple[str, str]]:
    """(file name, class name) of the rebuilt model's layers in the order Keras 3 lists (and saves)
    them: its operations that are layers, a shape stand-in counted as the layer it stands for."""
    import keras

    names = {id(obj): name for name, obj in {**built.layers, **built.stand_ins}.items()}  # Keras 3 may rename
    stood_in = {id(obj): graph.layers[name].class_name for name, obj in built.stand_ins.items()}
    return [(names.get(id(op), op.name), stood_in.get(id(op), type(op).__name__))
            for op in built.model.operations if isinstance(op, keras.Layer) or id(op) in stood_in]


def rebuilt_reference(graph, kfile: _config.KerasFile, analysis: _Analysis, note: str) -> tuple[Any, str, str]:
    """The model rebuilt from the file's config, given the file's weights, as the reference where
    Keras cannot load the file (``note`` says why): the analysis's build, or, where it stood in for
    some layers (``_build.BuildOptions.stand_ins``), a build that calls the analysis's layers again
    and makes those (a boundary layer's output is then its call in this model: ``_output_in``)."""
    _build.load_weights(analysis.built, graph, kfile.weights)
    built = analysis.built
    if built.stand_ins:
        built = _build.build(graph, _build.BuildOptions(lambda_functions=analysis.functions, reuse=built.layers))
        _build.load_weights(built, graph, kfile.weights, reused=analysis.built.layers)
    return built.model, note, "the tool's rebuild of the file's config"


def _slice_shape(probed, input_tensor) -> tuple | None:
    """The output shape (without the batch dim) of a Lambda the probe proved one channel slice."""
    if isinstance(probed, str) or len(probed.ranges) != 1:
        return None
    shape = list(input_tensor.shape)
    (start, stop), axis = probed.ranges[0], probed.axis
    return tuple(shape[1:axis] + [stop - start] + shape[axis + 1:])


def rebuilt_from_file(path: Path, kfile: _config.KerasFile, note: str, *, trusted: bool) -> tuple[Any, str, str]:
    """The reference ``rebuilt_reference`` gives, made from the file alone (the reference process
    has no analysis): the model rebuilt from the config with every layer made, Lambdas from their
    trusted code (a slice's shape from the probe, as the analysis does, which spares Keras tracing
    it), given the file's weights. ``kfile`` must hold them."""
    graph = _config.parse_graph(kfile.config, legacy=kfile.kind == "h5" or _is_legacy(kfile.config), path=path)
    sources = {layer.name: _lambdas.lambda_source(layer) for layer in graph.layers.values() if _lambdas.is_lambda(layer)}
    functions = {name: _lambdas.make_function(source) for name, source in sources.items()}

    def on_lambda(call: _config.Call, input_tensor):
        if input_tensor is None:
            return None
        source = sources[call.layer.name]
        return _slice_shape(_lambdas.probe_slice(functions[call.layer.name], source.arguments,
                                                 list(input_tensor.shape)), input_tensor)

    try:
        built = _build.build(graph, _build.BuildOptions(lambda_functions=functions, trusted=trusted, on_lambda=on_lambda))
    finally:
        _lambdas.release_probes()
    kfile.weights.resolve(_layer_order(built, graph))
    _build.load_weights(built, graph, kfile.weights)
    return built.model, note, "the tool's rebuild of the file's config"


def _tf_keras_load(path: Path, kfile: _config.KerasFile, *, run_code: bool) -> tuple[Any, str, str] | str:
    """tf-keras's own load of a file written by tf-keras or Keras 2 (the model, "", what it is), or
    why not ("" where tf-keras does not apply: a Keras 3 file, or tf-keras not installed).

    Trust is kept: tf-keras's legacy ``.h5`` loader ignores ``safe_mode=`` and would run Lambda
    bytecode; its Lambda layer refuses in a safe-mode scope, so the load runs in one unless
    ``run_code`` (the file has Lambdas and the user trusts it; an untrusted file with Lambdas is
    refused before this point anyway)."""
    if not kfile.keras_version.startswith(("1.", "2.")):
        return ""
    try:
        import tf_keras
        from tf_keras.src.saving.serialization_lib import SafeModeScope
    except ImportError:
        return ""
    safe = not run_code
    # tf-keras runs Lambda code with its own module's globals and the custom objects: given the
    # names the rebuild gives it (``K``, ``tf``, ``np``...), code written for them loads here too.
    names = {k: v for k, v in _lambdas.lambda_globals().items() if k != "__builtins__"} if run_code else None
    try:
        # tf-keras warns when a Lambda's module (the author's code that made it) is not imported
        # here: advice to the file's author, not to whoever runs this tool.
        with SafeModeScope(safe), paused_gc(), linear_ancillary_check(), unrandom_tf_keras_variables(), \
                static_output_shapes(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            if kfile.kind == "keras":
                with formats.scratch_dir() as scratch:
                    accepted = Path(scratch) / "accepted.keras"
                    kfile.write_accepted(accepted)
                    model = tf_keras.models.load_model(accepted, compile=False, safe_mode=safe,
                                                       custom_objects=names)
            else:
                model = tf_keras.models.load_model(path, compile=False, safe_mode=safe, custom_objects=names)
    except Exception as exc:
        return f"tf-keras cannot load the file ({one_line(exc)[:80]})"
    unreadable = _keras3_unreadable(kfile.config)
    note = f"reference: tf-keras's own load{f', as Keras cannot load it ({unreadable})' if unreadable else ''}"
    return model, note, f"tf-keras {tf_keras.__version__} (load_model)"


@contextmanager
def unrandom_tf_keras_variables() -> Iterator[None]:
    """While inside, a tf-keras variable that a random initializer (Glorot, He, uniform...) would
    fill starts as zeros: in a load, the file's arrays replace every variable (tf-keras refuses a
    file whose weights do not match the layers'), so the random draws are only cost (0.3 s of a
    1,199-layer ResNeXt's 4.6 s load, measured). The tf-keras counterpart of
    ``_build.unrandom_initial_values``; the only entry point is ``make_variable``, the getter every
    ``add_weight`` calls. (tf-keras 2.21)"""
    import inspect

    from tf_keras.src.engine import base_layer_utils
    from tf_keras.src.initializers import initializers

    drawn = (initializers.RandomUniform, initializers.RandomNormal, initializers.TruncatedNormal,
             initializers.VarianceScaling, initializers.Orthogonal)
    original = base_layer_utils.make_variable
    signature = inspect.signature(original)

    def make_variable(*args, **kwargs):
        bound = signature.bind(*args, **kwargs)
        if isinstance(bound.arguments.get("initializer"), drawn):
            bound.arguments["initializer"] = initializers.Zeros()
        return original(*bound.args, **bound.kwargs)

    base_layer_utils.make_variable = make_variable
    try:
        yield
    finally:
        base_layer_utils.make_variable = original


@contextmanager
def static_output_shapes() -> Iterator[None]:
    """While inside, tf-keras rebuilding a functional model learns the output of a built-in layer
    whose output shape has a fixed rule (a convolution, a normalization, an activation, a merge,
    a pooling: ``STATIC_SHAPE_LAYERS``) from that rule, ``compute_output_shape``, instead of
    calling the layer in a scratch graph of its own: the layer is built the same way (its
    weights made as ``_maybe_build`` makes them), only the scratch graph is not (1.0 s of a
    1,199-layer ResNeXt's 4.4 s load, measured). Anything else is traced as tf-keras does: a
    Lambda, a layer of the file's or a subclass, an activation function not tf-keras's or
    TensorFlow's, a call with arguments (but ``training``, which
    tf-keras passes a normalization and which changes no shape) or masks, an activity
    regularizer, a dtype other than float32. The model is the same; only how its layers' output
    shapes were learned differs. (tf-keras 2.21)"""
    import tensorflow as tf
    from tf_keras.src.engine import base_layer, keras_tensor

    static = static_shape_layers()
    original = base_layer.Layer._infer_output_signature

    def infer(layer, inputs, args, kwargs, input_masks):
        flat = tf.nest.flatten(inputs)
        if (type(layer) not in static or not _built_in_activation(layer) or args or set(kwargs) - {"training"}
                or layer.activity_regularizer is not None
                or any(m is not None for m in tf.nest.flatten(input_masks)) or layer._compute_dtype != "float32"
                or not all(isinstance(x, keras_tensor.KerasTensor) and x.dtype == tf.float32 for x in flat)):
            return original(layer, inputs, args, kwargs, input_masks)
        layer._maybe_build(inputs)
        shapes = layer.compute_output_shape(tf.nest.map_structure(lambda x: x.shape, inputs))
        layer._set_save_spec(inputs, args, kwargs)
        return keras_tensor.KerasTensor(tf.TensorSpec(tf.TensorShape(shapes), tf.float32))

    base_layer.Layer._infer_output_signature = infer
    try:
        yield
    finally:
        base_layer.Layer._infer_output_signature = original


def _built_in_activation(layer) -> bool:
    """Whether the layer's activation (if any) is tf-keras's or TensorFlow's own, which keep the
    shape their rule assumes (a function of the file's could return any shape)."""
    activation = getattr(layer, "activation", None)
    return activation is None or str(getattr(activation, "__module__", "")).startswith(("tf_keras.", "tensorflow."))


def static_shape_layers() -> tuple[type, ...]:
    """tf-keras's built-in layers of one output whose shape rule (``compute_output_shape``) is
    fixed by their config and input shapes."""
    from tf_keras import layers

    return (layers.Conv2D, layers.DepthwiseConv2D, layers.BatchNormalization, layers.ReLU, layers.Activation,
            layers.Add, layers.Concatenate, layers.Dense, layers.MaxPooling2D, layers.AveragePooling2D,
            layers.GlobalAveragePooling2D, layers.ZeroPadding2D)


@contextmanager
def linear_ancillary_check() -> Iterator[None]:
    """While inside, tf-keras rebuilds a functional model in time linear in its layers, not
    quadratic: for each layer of the config its ``connect_ancillary_layers`` asks ``layer not in
    model.layers``, and ``model.layers`` walks the whole model every time (1,199 layers: 1.4
    million walks, 1.4 s of a 5.5 s load). The same test against one walk (layers compare by
    identity) builds the same model; tf-keras's own function is back on the way out."""
    try:
        import tensorflow as tf
        from tf_keras.src.engine import functional
    except ImportError:
        yield
        return
    quadratic = functional.connect_ancillary_layers
    if getattr(quadratic, "linear", False) or not hasattr(functional, "_should_skip_first_node"):
        yield  # inside already, or a tf-keras whose rebuild this was not written for: left as it is
        return

    def connect_ancillary_layers(model, created_layers):
        known = {id(layer) for layer in model.layers}
        ancillary = [layer for layer in created_layers.values() if id(layer) not in known]
        if ancillary:
            relevant_nodes = tf.nest.flatten([
                layer.inbound_nodes[1:] if functional._should_skip_first_node(layer) else layer.inbound_nodes
                for layer in created_layers.values()])
            model._insert_layers(ancillary, relevant_nodes)
        return model

    connect_ancillary_layers.linear = True
    functional.connect_ancillary_layers = connect_ancillary_layers
    try:
        yield
    finally:
        functional.connect_ancillary_layers = quadratic


def _keras3_unreadable(config: dict) -> str:
    """What in a tf-keras file Keras 3's loader certainly fails on, known from the config alone
    (trying would cost a second load): TFOpLambda nodes (no such class in Keras 3), Lambda
    defaults (stored as a list: "arg 4 (defaults) must be None or tuple"). "" if nothing known."""
    classes = {layer.get("class_name") for layer in (config.get("config") or {}).get("layers", [])}
    if classes & {"TFOpLambda", "SlicingOpLambda"}:
        return "its TFOpLambda layers have no Keras 3 class"
    for layer in (config.get("config") or {}).get("layers", []):
        function = (layer.get("config") or {}).get("function") if layer.get("class_name") == "Lambda" else None
        if isinstance(function, list) and len(function) == 3 and function[1] is not None:
            return "its Lambda defaults are stored as a list"
    return ""


def _load_written(target: Path, *, trusted: bool):
    import keras

    try:
        # Keras's own load; it fails unless the file gives every variable its value, so the
        # random values it would draw first are skipped.
        with _compat.unrandom_initial_values(), paused_gc():
            return keras.models.load_model(target, compile=False, safe_mode=not trusted)
    except Exception as exc:
        raise VerificationFailed(f"the written model does not load in Keras ({root_cause(exc)}); "
                                 "nothing was written") from exc


def root_cause(exc: BaseException) -> str:
    """The exception a failure started from, whole: ``TYPE: its first line``. Keras wraps a
    layer's failure in a message that repeats the whole layer config; the cause is at the end of
    the chain (``raise ... from``, or raised while handling), and is never cut mid-word."""
    seen = {id(exc)}
    while (exc.__cause__ or exc.__context__) is not None and id(exc.__cause__ or exc.__context__) not in seen:
        exc = exc.__cause__ or exc.__context__
        seen.add(id(exc))
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text.splitlines()[0]}" if text else type(exc).__name__


def _input_specs(graph: _config.KerasGraph) -> list[tuple[str, list[int | None], str]]:
    specs = []
    for ref in graph.inputs:
        config = graph.layers[ref.layer].config
        shape = config.get("batch_shape") or config.get("batch_input_shape")
        if shape is None and config.get("shape") is not None:
            shape = [None, *config["shape"]]
        dtype = config.get("dtype") or "float32"
        if isinstance(dtype, dict):
            dtype = (dtype.get("config") or {}).get("name", "float32")
        specs.append((ref.layer, list(shape or []), str(dtype)))
    return specs


def _make_inputs(graph, options) -> Feeds:
    """The verification inputs, made as for ONNX and SavedModels (gconv_rewrite.verify.make_inputs):
    a ``None`` batch is set to 1 and recorded; other ``None`` dims need ``--shape``."""
    given = options.inputs
    if given is not None and not isinstance(given, dict):
        given = load_inputs_file(Path(given))
    specs = [InputSpec(name, shape, dtype) for name, shape, dtype in _input_specs(graph)]
    return make_inputs(specs, shapes=options.shapes, seed=options.seed, given=given)


def _run(model, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    import warnings

    from keras import tree

    arrays = list(feeds.values())
    with warnings.catch_warnings():  # Keras warns about list-vs-tensor input structure; harmless here
        warnings.simplefilter("ignore")
        result = model(arrays if len(arrays) > 1 else arrays[0], training=False)
    return [np.asarray(r) for r in tree.flatten(result)]


def with_extra_outputs(model, extra) -> tuple[Any, list[str]]:
    """``model`` with the outputs of the layers named in ``extra`` after its own, and the names it
    could expose. A layer that is not at the model's top level, or is called more than once, has
    no one output: it is left out."""
    present, tensors = [], []
    for name in extra:
        try:
            tensors.append(_output_in(model, model.get_layer(name)))
        except Exception:  # not a top-level layer, or called more than once
            continue
        present.append(name)
    if not tensors:
        return model, present
    import importlib

    # The same framework's functional API (tf_keras for a tf-keras reference).
    framework = importlib.import_module(type(model).__module__.split(".")[0])
    return framework.Model(model.inputs, [*model.outputs, *tensors]), present


def _output_in(model, layer):
    """The layer's output in ``model``: where a Keras 3 layer was called in another model too (the
    analysis's layers, called again by the reference rebuilt with them), the output of its call
    that belongs to ``model`` (``Function._nodes``, Keras 3.15), not its first call's."""
    nodes = getattr(model, "_nodes", None)
    calls = getattr(layer, "_inbound_nodes", [])
    if isinstance(nodes, set) and len(calls) > 1 and type(model).__module__.startswith("keras."):
        (node,) = [call for call in calls if call in nodes]  # none or several: no one output
        (output,) = node.output_tensors
        return output
    return layer.output


class KerasRunner:
    """A Keras (or tf-keras) model run on verification feeds, with the outputs of the layers named
    in ``extra`` exposed beside its own (``gconv_rewrite.proof``'s runner; see ``with_extra_outputs``)."""

    def __init__(self, model, graph: _config.KerasGraph, role: str, extra=()):
        self.role = role
        self.outputs = [ref.layer for ref in graph.outputs]
        self.inputs = [InputSpec(name, shape, dtype) for name, shape, dtype in _input_specs(graph)]
        self.output_specs = None
        self.model, self.extra = with_extra_outputs(model, extra)

    def __call__(self, feeds) -> dict[str, np.ndarray]:
        try:
            values = _run(self.model, feeds)
        except Exception as exc:
            raise VerificationImpossible(f"the {self.role} model cannot run on the verification inputs "
                                         f"({one_line(exc)}); pass --no-verify to write it without proof") from exc
        return named_values(self.outputs, self.extra, values)


def named_values(outputs: list[str], extra: list[str], values: list[np.ndarray]) -> dict[str, np.ndarray]:
    """A run's arrays by name: the model's outputs, then the exposed layers (``extra``)."""
    if len(values) != len(outputs) + len(extra):
        raise VerificationImpossible(f"outputs changed: {len(outputs)} -> {len(values) - len(extra)}")
    return dict(zip(outputs + extra, values))


# -- statistics --------------------------------------------------------------------------------

def _graph_stats(graph: _config.KerasGraph, weights: _config.WeightStore) -> ModelStats:
    classes = [layer.class_name for layer in graph.layers.values()]
    return ModelStats(nodes=len(classes), parameters=weights.total_parameters(), op_counts=count_ops(classes))


def _model_stats(model) -> ModelStats:
    operations = list(getattr(model, "operations", model.layers))
    classes = [type(op).__name__ for op in operations]
    return ModelStats(nodes=len(classes), parameters=int(model.count_params()), op_counts=count_ops(classes))
