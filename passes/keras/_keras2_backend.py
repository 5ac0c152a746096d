"""The Keras 2 backend (``K``) that legacy Lambda code was written for.

Legacy Lambda code calls ``K.reshape``, ``K.permute_dimensions``, ``K.int_shape``,
``K.spatial_2d_padding``, ``K.concatenate``, ``K.sum``, ``K.square``... Keras 3's ``keras.backend``
has none of them. Where tf-keras is installed, its ``backend`` *is* the Keras 2 backend (and runs
on the TensorFlow tensors Keras 3 traces with); without it, ``Keras2Backend`` maps the common
calls onto ``keras.ops``. A name neither knows raises AttributeError, as Keras 2 would for a name
it did not have, and the Lambda is then reported (or, where it must run, the run stops with it).
"""

from __future__ import annotations

import functools
import math
from typing import Any


@functools.lru_cache(maxsize=1)
def keras2_backend() -> Any:
    """tf-keras's ``backend`` module where installed, else the mapping onto ``keras.ops``."""
    try:
        from tf_keras import backend
    except ImportError:
        return Keras2Backend()
    return backend


def _axis_pairs(padding, data_format: str | None, rank: int) -> list[tuple[int, int]]:
    """Keras 2 spatial padding ``((top, bottom), (left, right))`` as one pair per axis."""
    import keras

    channels_first = (data_format or keras.backend.image_data_format()) == "channels_first"
    spatial = [tuple(int(v) for v in pair) for pair in padding]
    none = [(0, 0)] * (rank - 2 - len(spatial))
    return [(0, 0), (0, 0), *none, *spatial] if channels_first else [(0, 0), *none, *spatial, (0, 0)]


class Keras2Backend:
    """Keras 2 backend functions over ``keras.ops`` (used only where tf-keras is not installed).
    Names whose signature is the same in ``keras.ops`` (``reshape``, ``concatenate``, ``sum``,
    ``mean``, ``max``, ``square``, ``sqrt``, ``exp``, ``expand_dims``, ``sigmoid``, ``relu``...)
    come from there unchanged; those that differ are written out below."""

    @staticmethod
    def int_shape(x) -> tuple:
        return tuple(None if d is None else int(d) for d in x.shape)

    @staticmethod
    def shape(x):
        import keras

        return keras.ops.shape(x)

    @staticmethod
    def ndim(x) -> int:
        return len(x.shape)

    @staticmethod
    def permute_dimensions(x, pattern):
        import keras

        return keras.ops.transpose(x, axes=tuple(pattern))

    @staticmethod
    def pow(x, a):
        import keras

        return keras.ops.power(x, a)

    @staticmethod
    def batch_flatten(x):
        import keras

        return keras.ops.reshape(x, (-1, math.prod(x.shape[1:])))

    @staticmethod
    def spatial_2d_padding(x, padding=((1, 1), (1, 1)), data_format=None):
        import keras

        return keras.ops.pad(x, _axis_pairs(padding, data_format, len(x.shape)))

    @staticmethod
    def spatial_3d_padding(x, padding=((1, 1), (1, 1), (1, 1)), data_format=None):
        import keras

        return keras.ops.pad(x, _axis_pairs(padding, data_format, len(x.shape)))

    @staticmethod
    def temporal_padding(x, padding=(1, 1)):
        import keras

        return keras.ops.pad(x, [(0, 0), tuple(padding), (0, 0)])

    @staticmethod
    def l2_normalize(x, axis=None):
        import keras

        return keras.ops.normalize(x, axis=-1 if axis is None else axis, order=2)

    def __getattr__(self, name: str):
        import keras

        for namespace in (keras.backend, keras.ops, keras.activations):
            if hasattr(namespace, name):
                return getattr(namespace, name)
        raise AttributeError(f"the Keras 2 backend has no '{name}' (neither tf-keras nor keras.ops provide it)")
