"""Every private Keras API the Keras passes use, in one place, each with why the public API does
not suffice. Checked with Keras 3.15 (and tf-keras 2.21 files); on a new Keras version, this
module is what to re-check.

Importing this module does not import Keras; each helper imports what it needs when called.
"""

from __future__ import annotations

from typing import Any

# Keras 3 writes ``"module": "keras.src.ops.numpy"`` (etc.) into the config of a ``keras.ops``
# operation it saves in a .keras file: its internal package layout, read here as file data.
OPS_MODULE_PREFIX = "keras.src.ops"


def safe_mode_scope(enabled: bool):
    """Keras's safe-mode context. Public Keras has only the process-wide
    ``keras.config.enable_unsafe_deserialization()``; legacy ``model_from_config`` and
    ``compile_from_config`` take no ``safe_mode`` argument. (Keras 3.15)"""
    from keras.src.saving.serialization_lib import SafeModeScope

    return SafeModeScope(enabled)


def legacy_model_from_config(entry: dict, custom_objects: dict[str, Any]):
    """A layer from a Keras 2 / tf-keras config entry, as Keras 3's .h5 loader converts it; no
    public API converts one legacy layer config (``keras.models.model_from_json`` wants a whole
    model and a JSON string). (Keras 3.15)"""
    from keras.src.legacy.saving import saving_utils

    return saving_utils.model_from_config(entry, custom_objects=custom_objects)


def legacy_compile_args(training_config: dict) -> dict:
    """``model.compile`` arguments from an .h5 ``training_config``, as Keras 3's .h5 loader reads
    them; not public (``compile_from_config`` reads the .keras form only). (Keras 3.15)"""
    from keras.src.legacy.saving import saving_utils

    return saving_utils.compile_args_from_training_config(training_config)


def convnext_layers() -> dict[str, type]:
    """ConvNeXt's ``LayerScale`` and ``StochasticDepth``, which tf-keras application files name as
    layers; ``keras.applications`` exports the models only. (Keras 3.15)"""
    from keras.src.applications import convnext

    return {"LayerScale": convnext.LayerScale, "StochasticDepth": convnext.StochasticDepth}


def get_item(name: str):
    """A named ``GetItem`` operation (``x[key]`` as Keras 3 saves it); ``keras.ops.get_item``
    takes no name, and the rebuilt operations must keep the replaced layers' names. (Keras 3.15)"""
    from keras.src.ops.numpy import GetItem

    return GetItem(name=name)


def split(sections, axis: int, name: str):
    """A named ``Split`` operation; ``keras.ops.split`` takes no name (as ``get_item``). (Keras 3.15)"""
    from keras.src.ops.numpy import Split

    return Split(sections, axis=axis, name=name)


def operation_modules() -> tuple:
    """The modules defining the ``keras.ops`` operation classes, to map an .h5 entry's class name
    back to an operation; ``keras.ops`` exports the functions, not the classes. (Keras 3.15)"""
    from keras.src.ops import core, image, linalg, math, nn, numpy

    return numpy, nn, math, core, image, linalg


def keras_history(tensor):
    """The (operation, node_index, tensor_index) that made a Keras tensor; public Keras has no
    accessor for a symbolic tensor's producer. (Keras 3.15)"""
    return getattr(tensor, "_keras_history", None)


def inbound_node(operation, index: int):
    """The ``index``-th call node of an operation (``operation._inbound_nodes``); public Keras
    exposes no call node. (Keras 3.15)"""
    return operation._inbound_nodes[index]


def pre_serialization_history(tensor):
    """The (layer, node, tensor) reference a deserialised Keras tensor placeholder stands for, as
    Keras's own functional loader reads it; not public. (Keras 3.15)"""
    return getattr(tensor, "_pre_serialization_keras_history", None)


def own_variables(layer) -> list | None:
    """A layer's own variables in the order ``load_own_variables`` indexes them (trainable, then
    non-trainable, sublayers' excluded); public ``layer.weights`` includes sublayers' and
    ``trainable_weights`` reorders after ``trainable=False``. None where the layer has no such
    attributes. (Keras 3.15)"""
    if not hasattr(layer, "_trainable_variables"):
        return None
    return list(layer._trainable_variables) + list(layer._non_trainable_variables)


def unrandom_initial_values():
    """A context in which a Keras variable that a random initializer (Glorot, He, ...) would fill
    starts as zeros instead: for layers rebuilt from a file, whose weights the file's arrays then
    replace, drawing the random values first is the build's largest cost. Keras has no public
    switch (its lazy initialisation works only in a stateless scope, where no functional model
    can be built); this wraps the TensorFlow backend's ``Variable._initialize_with_initializer``
    for the context. Initializers that are not random (zeros, ones, constants, a seed
    generator's state) are left as they are. (Keras 3.15)"""
    import contextlib

    try:
        from keras.src.backend.tensorflow import core
        from keras.src.initializers import Zeros
        from keras.src.initializers.random_initializers import RandomInitializer
    except ImportError:  # another backend, or a Keras that moved them: values drawn as Keras does
        return contextlib.nullcontext()

    @contextlib.contextmanager
    def scope():
        original = core.Variable._initialize_with_initializer

        def initialize(variable, initializer):
            original(variable, Zeros() if isinstance(initializer, RandomInitializer) else initializer)

        core.Variable._initialize_with_initializer = initialize
        try:
            yield
        finally:
            core.Variable._initialize_with_initializer = original

    return scope()
