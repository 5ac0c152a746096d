"""tf-keras ``TFOpLambda`` layers rebuilt as the Keras 3 operations they compute.

tf-keras writes a ``TFOpLambda`` layer for every TensorFlow function called on a Keras tensor
(``x + y`` is ``tf.__operators__.add``, ``tf.nn.relu6(x)`` is ``nn.relu6``), storing the
function's *name* and its call arguments: the first argument as the node's tensors (or a
``[_CONSTANT_VALUE, -1, value]`` entry), the others by their parameter names in the node's kwargs.
Keras 3 cannot load these layers. Each function listed here is rebuilt from ``keras.ops`` with
TensorFlow's parameter names, so the file's recorded kwargs apply as they are; a parameter the
rebuild does not know, or a value it does not support, refuses the layer by name. Nothing is ever
looked up in TensorFlow by the file's function name (that would let a file call any TF API).

The set covers what ``tf_keras.applications`` writes (``benchmarks/tf_keras_tfoplambdas.py`` lists
it) and the everyday arithmetic, activations, reductions and reshapes of hand-written models.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np

from gconv_rewrite.errors import BadInput
from gconv_rewrite.passes.keras import _compat


class NotRebuilt(BadInput):
    """A TFOpLambda whose function (or arguments) Keras 3 cannot be given; ``function`` and
    ``layer`` name it."""

    def __init__(self, message: str, *, function: str, layer: str):
        super().__init__(message)
        self.function = function
        self.layer = layer


def _ops():
    import keras

    return keras.ops


def _is_tensor(value) -> bool:
    import keras

    return isinstance(value, keras.KerasTensor)


def _constant(value, like=None):
    """A recorded constant as an operand: Python scalars stay weakly typed; lists (serialized
    tensors) become arrays of the tensor operand's float dtype, so no op is promoted to float64."""
    if isinstance(value, (list, tuple)) and not any(_is_tensor(v) for v in value):
        array = np.asarray(value)
        dtype = str(getattr(like, "dtype", "") or "") if _is_tensor(like) else ""
        try:
            if dtype.startswith("float") or (not dtype and array.dtype.kind == "f"):
                array = array.astype(dtype or "float32")  # TF converts the constant to the tensor's dtype
            elif dtype.startswith(("int", "uint")) and array.dtype.kind in "iu":
                array = array.astype(dtype)
        except TypeError:  # a dtype numpy lacks (bfloat16): float32, Keras casts from there
            array = array.astype("float32")
        return array
    return value


def _binary(tf_name: str) -> Callable:
    keras_name = _OPS_BINARY[tf_name]

    def op(x, y, name=None):
        return getattr(_ops(), keras_name)(_constant(x, y), _constant(y, x))

    return op


def _unary(expression: Callable) -> Callable:
    def op(x, name=None):
        return expression(_ops(), x)

    return op


def _features(expression: Callable) -> Callable:
    def op(features, name=None):
        return expression(_ops(), features)

    return op


def _axis(axis):
    if isinstance(axis, list):
        return tuple(axis)
    return axis


def _static(value, what: str):
    if _is_tensor(value) or (isinstance(value, (list, tuple)) and any(_is_tensor(v) for v in value)):
        raise ValueError(f"{what} is computed at run time, not a constant")
    return value


def _reduce(keras_name: str) -> Callable:
    def op(input_tensor, axis=None, keepdims=False, name=None):
        return getattr(_ops(), keras_name)(input_tensor, axis=_axis(_static(axis, "axis")), keepdims=bool(keepdims))

    return op


# TF name → keras.ops name, for ``op(x, y, name=None)``.
_OPS_BINARY = {
    "__operators__.add": "add", "math.add": "add", "math.add_v2": "add",
    "math.subtract": "subtract", "math.multiply": "multiply",
    "math.truediv": "true_divide", "math.divide": "divide", "math.floordiv": "floor_divide",
    "math.floormod": "mod", "math.pow": "power", "math.maximum": "maximum", "math.minimum": "minimum",
    "math.greater": "greater", "math.greater_equal": "greater_equal", "math.less": "less",
    "math.less_equal": "less_equal", "math.equal": "equal", "math.not_equal": "not_equal",
    "math.logical_and": "logical_and", "math.logical_or": "logical_or",
}


def _swish(features, beta=1.0, name=None):
    ops = _ops()
    if beta == 1.0:
        return ops.silu(features)
    return features * ops.sigmoid(_static(beta, "beta") * features)


def _gelu(features, approximate=False, name=None):
    return _ops().gelu(features, approximate=bool(approximate))


def _leaky_relu(features, alpha=0.2, name=None):
    return _ops().leaky_relu(features, negative_slope=float(_static(alpha, "alpha")))


def _softmax(logits, axis=None, name=None):
    return _ops().softmax(logits, axis=-1 if axis is None else int(axis))


def _log_softmax(logits, axis=None, name=None):
    return _ops().log_softmax(logits, axis=-1 if axis is None else int(axis))


def _reshape(tensor, shape, name=None):
    shape = _static(shape, "the shape")
    return _ops().reshape(tensor, tuple(int(d) for d in shape))


def _concat(values, axis, name="concat"):
    return _ops().concatenate(list(values), axis=int(_static(axis, "axis")))


def _stack(values, axis=0, name="stack"):
    return _ops().stack(list(values), axis=int(_static(axis, "axis")))


def _unstack(value, num=None, axis=0, name="unstack"):
    return list(_ops().unstack(value, num=num, axis=int(_static(axis, "axis"))))


def _transpose(a, perm=None, name="transpose", conjugate=False):
    if conjugate:
        raise ValueError("conjugate=True is not supported")
    return _ops().transpose(a, axes=None if perm is None else tuple(int(p) for p in _static(perm, "perm")))


def _transpose_v2(a, perm=None, conjugate=False, name="transpose"):
    return _transpose(a, perm, name, conjugate)


def _expand_dims(input, axis, name=None):
    return _ops().expand_dims(input, int(_static(axis, "axis")))


def _squeeze(input, axis=None, name=None, squeeze_dims=None):
    axis = squeeze_dims if axis is None else axis
    return _ops().squeeze(input, axis=_axis(_static(axis, "axis")))


def _tile(input, multiples, name=None):
    return _ops().tile(input, tuple(int(m) for m in _static(multiples, "multiples")))


def _broadcast_to(input, shape, name=None):
    return _ops().broadcast_to(input, tuple(int(d) for d in _static(shape, "shape")))


def _cast(x, dtype, name=None):
    return _ops().cast(x, str(dtype))


def _clip_by_value(t, clip_value_min, clip_value_max, name=None):
    return _ops().clip(t, _static(clip_value_min, "clip_value_min"), _static(clip_value_max, "clip_value_max"))


def _identity(input, name=None):
    return _ops().copy(input)


def _pad(tensor, paddings, mode="CONSTANT", constant_values=0, name=None):
    modes = {"CONSTANT": "constant", "REFLECT": "reflect", "SYMMETRIC": "symmetric"}
    if str(mode).upper() not in modes:
        raise ValueError(f"pad mode {mode!r} is not supported")
    paddings = [tuple(int(v) for v in pair) for pair in _static(paddings, "paddings")]
    kwargs = {"constant_values": constant_values} if modes[str(mode).upper()] == "constant" else {}
    return _ops().pad(tensor, paddings, mode=modes[str(mode).upper()], **kwargs)


def _matmul(a, b, transpose_a=False, transpose_b=False, adjoint_a=False, adjoint_b=False,
            a_is_sparse=False, b_is_sparse=False, output_type=None, grad_a=False, grad_b=False, name=None):
    ops = _ops()
    if adjoint_a or adjoint_b or output_type is not None:
        raise ValueError("adjoint/output_type are not supported")
    a, b = _constant(a, b), _constant(b, a)
    if transpose_a:
        a = ops.swapaxes(a, -1, -2)
    if transpose_b:
        b = ops.swapaxes(b, -1, -2)
    return ops.matmul(a, b)


def _bias_add(value, bias, data_format=None, name=None):
    ops = _ops()
    bias = _constant(bias, value)
    if data_format in (None, "NHWC", "NWC", "NDHWC", "N...C"):
        return ops.add(value, bias)
    rank = len(value.shape)
    return ops.add(value, ops.reshape(bias, (-1,) + (1,) * (rank - 2)))


def _block_shapes(x, block_size: int, data_format: str):
    if data_format != "NHWC":
        raise ValueError(f"data_format {data_format} is not supported (NHWC only)")
    _, height, width, channels = x.shape
    if None in (height, width, channels):
        raise ValueError("its input's height, width and channels must be static")
    return height, width, channels


def _depth_to_space(input, block_size, data_format="NHWC", name=None):
    """tf.nn.depth_to_space (DCR order): [N,H,W,b·b·C] → [N,H·b,W·b,C]."""
    ops = _ops()
    block = int(_static(block_size, "block_size"))
    height, width, channels = _block_shapes(input, block, str(data_format))
    depth = channels // (block * block)
    x = ops.reshape(input, (-1, height, width, block, block, depth))
    x = ops.transpose(x, (0, 1, 3, 2, 4, 5))
    return ops.reshape(x, (-1, height * block, width * block, depth))


def _space_to_depth(input, block_size, data_format="NHWC", name=None):
    """tf.nn.space_to_depth: [N,H·b,W·b,C] → [N,H,W,b·b·C]."""
    ops = _ops()
    block = int(_static(block_size, "block_size"))
    height, width, channels = _block_shapes(input, block, str(data_format))
    x = ops.reshape(input, (-1, height // block, block, width // block, block, channels))
    x = ops.transpose(x, (0, 1, 3, 2, 4, 5))
    return ops.reshape(x, (-1, height // block, width // block, block * block * channels))


def _resize(images, size, method="bilinear", preserve_aspect_ratio=False, antialias=False, name=None):
    from keras import ops

    if preserve_aspect_ratio:
        raise ValueError("preserve_aspect_ratio=True is not supported")
    size = tuple(int(s) for s in _static(size, "size"))
    return ops.image.resize(images, size, interpolation=str(method), antialias=bool(antialias))


def _l2_normalize(x, axis=None, epsilon=1e-12, name=None, dim=None):
    ops = _ops()
    axis = _axis(dim if axis is None else axis)
    squares = ops.sum(ops.square(x), axis=axis, keepdims=True)
    return x * ops.rsqrt(ops.maximum(squares, float(epsilon)))


REBUILT: dict[str, Callable[..., Any]] = {
    **{name: _binary(name) for name in _OPS_BINARY},
    "math.negative": _unary(lambda ops, x: ops.negative(x)),
    "math.abs": _unary(lambda ops, x: ops.abs(x)),
    "math.exp": _unary(lambda ops, x: ops.exp(x)),
    "math.log": _unary(lambda ops, x: ops.log(x)),
    "math.sqrt": _unary(lambda ops, x: ops.sqrt(x)),
    "math.rsqrt": _unary(lambda ops, x: ops.rsqrt(x)),
    "math.square": _unary(lambda ops, x: ops.square(x)),
    "math.reciprocal": _unary(lambda ops, x: ops.reciprocal(x)),
    "math.sigmoid": _unary(lambda ops, x: ops.sigmoid(x)),
    "math.log_sigmoid": _unary(lambda ops, x: ops.log_sigmoid(x)),
    "math.tanh": _unary(lambda ops, x: ops.tanh(x)),
    "math.sin": _unary(lambda ops, x: ops.sin(x)),
    "math.cos": _unary(lambda ops, x: ops.cos(x)),
    "math.erf": _unary(lambda ops, x: ops.erf(x)),
    "math.floor": _unary(lambda ops, x: ops.floor(x)),
    "math.ceil": _unary(lambda ops, x: ops.ceil(x)),
    "math.round": _unary(lambda ops, x: ops.round(x)),
    "math.sign": _unary(lambda ops, x: ops.sign(x)),
    "math.softplus": _features(lambda ops, x: ops.softplus(x)),
    "math.logical_not": _unary(lambda ops, x: ops.logical_not(x)),
    "nn.relu": _features(lambda ops, x: ops.relu(x)),
    "nn.relu6": _features(lambda ops, x: ops.relu6(x)),
    "nn.elu": _features(lambda ops, x: ops.elu(x)),
    "nn.selu": _features(lambda ops, x: ops.selu(x)),
    "nn.softsign": _features(lambda ops, x: ops.soft_sign(x)),
    "nn.silu": _swish, "nn.swish": _swish,
    "nn.gelu": _gelu,
    "nn.leaky_relu": _leaky_relu,
    "nn.softmax": _softmax, "math.softmax": _softmax,
    "nn.log_softmax": _log_softmax, "math.log_softmax": _log_softmax,
    "math.reduce_mean": _reduce("mean"), "math.reduce_sum": _reduce("sum"),
    "math.reduce_max": _reduce("max"), "math.reduce_min": _reduce("min"),
    "math.reduce_prod": _reduce("prod"), "math.reduce_variance": _reduce("var"),
    "math.reduce_std": _reduce("std"), "math.reduce_logsumexp": _reduce("logsumexp"),
    "reshape": _reshape,
    "concat": _concat,
    "stack": _stack,
    "unstack": _unstack,
    "compat.v1.transpose": _transpose, "transpose": _transpose_v2,
    "expand_dims": _expand_dims,
    "compat.v1.squeeze": _squeeze, "squeeze": _squeeze,
    "tile": _tile,
    "broadcast_to": _broadcast_to,
    "cast": _cast,
    "clip_by_value": _clip_by_value,
    "identity": _identity,
    "pad": _pad, "compat.v1.pad": _pad,
    "linalg.matmul": _matmul,
    "nn.bias_add": _bias_add,
    "nn.depth_to_space": _depth_to_space, "compat.v1.nn.depth_to_space": _depth_to_space,
    "nn.space_to_depth": _space_to_depth, "compat.v1.nn.space_to_depth": _space_to_depth,
    "image.resize": _resize,
    "math.l2_normalize": _l2_normalize,
}


def rebuild(function: str, layer: str, first: Any, kwargs: dict) -> list:
    """``tf.<function>(first, **kwargs)`` as Keras 3 operations on the built tensors; its outputs
    flattened. Refuses (NotRebuilt, naming the function and the layer) what it cannot rebuild."""
    from keras import tree

    implementation = REBUILT.get(function)
    if implementation is None:
        raise NotRebuilt(f"layer {layer!r} is a tf-keras TFOpLambda calling tf.{function}, which has no "
                         "Keras 3 rebuild", function=function, layer=layer)
    inputs = [t for t in tree.flatten([first, kwargs]) if _is_tensor(t)]
    try:
        result = implementation(first, **kwargs)
    except Exception as exc:
        text = str(exc).strip().splitlines()[0][:160] if str(exc).strip() else type(exc).__name__
        raise NotRebuilt(f"layer {layer!r} calls tf.{function} with arguments its Keras 3 rebuild does not "
                         f"support ({type(exc).__name__}: {text})", function=function, layer=layer) from exc
    outputs = list(tree.flatten(result))
    _name_operations(outputs, inputs, layer.replace("/", "_"))
    return outputs


def _name_operations(outputs: list, inputs: list, base: str) -> None:
    """Name the operations one rebuild made after its layer (``base``, then ``base_1``…): their
    automatic names (``multiply``) would clash with the file's own layers of that name."""
    known = {id(t) for t in inputs}
    seen: set[int] = set()
    pending = [t for t in outputs if id(t) not in known]
    count = 0
    while pending:
        tensor = pending.pop(0)
        history = _compat.keras_history(tensor)
        if history is None or id(tensor) in known:
            continue
        operation = history.operation
        if id(operation) in seen:
            continue
        seen.add(id(operation))
        operation.name = base if count == 0 else f"{base}_{count}"
        count += 1
        node = _compat.inbound_node(operation, history.node_index)
        pending.extend(t for t in node.input_tensors if id(t) not in known)
