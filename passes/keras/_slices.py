"""Which layer calls read a contiguous range of one axis of their input, and which range.

    Keras 3:   GetItem  (x[..., a:b], no code)       Split  (keras.ops.split)
    tf-keras:  SlicingOpLambda tf.__operators__.getitem    TFOpLambda tf.split
    any:       Lambda (bytecode: established by probing, trusted files only; see _lambdas)

Every reader becomes a ``SliceCall``: its source tensor, the axis, and one channel range per
output tensor. Bounds are resolved against the source's static shape.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from gconv_rewrite.candidate import resolve_sizes
from gconv_rewrite.passes.keras._config import Call, TensorRef, legacy_leaves

SLICE_CLASSES = ("GetItem", "Split", "SlicingOpLambda", "TFOpLambda", "Lambda")
GETITEM_FUNCTIONS = ("__operators__.getitem",)
SPLIT_FUNCTIONS = ("split",)


@dataclass
class SliceCall:
    call: Call
    source: TensorRef
    axis: int  # non-negative
    ranges: list[tuple[int, int]]  # per output tensor
    kind: str  # "GetItem", "Split", "tf.__operators__.getitem", "tf.split", "Lambda"


def read_slice(call: Call, shape_of: Callable[[TensorRef], list[int | None] | None],
               lambda_slices: dict[tuple[str, int], Any]) -> SliceCall | str | None:
    """A SliceCall; a reason (str) when it is a slicing layer but not a usable slice; or None
    when the layer is no slicing layer at all."""
    layer = call.layer
    if layer.class_name not in SLICE_CLASSES or len(call.inputs) < 1:
        return None
    source = call.inputs[0]
    shape = shape_of(source)
    if shape is None:
        return "the shape of its input is unknown"
    if layer.class_name == "Lambda":
        probed = lambda_slices.get(call.key)
        if probed is None:
            return None
        if isinstance(probed, str):
            return probed
        if len(call.inputs) != 1:
            return "the Lambda reads several tensors"
        return SliceCall(call, source, probed.axis, probed.ranges, "Lambda")
    if len(call.inputs) != 1:
        return "it reads several tensors"
    function = str(layer.config.get("function", ""))
    if layer.class_name == "GetItem":
        key = _keras3_key(call.data)
        return _from_key(call, source, shape, key, "GetItem")
    if layer.class_name == "Split":
        config = layer.config
        return _from_split(call, source, shape, config.get("indices_or_sections"), config.get("axis", 0),
                           numpy_style=True, kind="Split")
    if function in GETITEM_FUNCTIONS:
        kwargs = _legacy_kwargs(call)
        return _from_key(call, source, shape, kwargs.get("slice_spec"), "tf.__operators__.getitem")
    if function in SPLIT_FUNCTIONS:
        kwargs = _legacy_kwargs(call)
        if "num" in kwargs and kwargs.get("num") is not None:
            return "tf.split with num= is not supported"
        return _from_split(call, source, shape, kwargs.get("num_or_size_splits"), kwargs.get("axis", 0),
                           numpy_style=False, kind="tf.split")
    return None


def _legacy_kwargs(call: Call) -> dict:
    if isinstance(call.data, dict):  # a tf-keras layer in a Keras 3 style node
        return dict(call.data.get("kwargs") or {})
    leaves = legacy_leaves(call.data)
    kwargs = leaves[-1][3] if leaves and len(leaves[-1]) == 4 else {}
    return dict(kwargs or {})


def _keras3_key(node: Any):
    args = (node or {}).get("args") or []
    return args[1] if len(args) > 1 else (node or {}).get("kwargs", {}).get("key")


def _entry(item) -> tuple[str, Any]:
    """('ellipsis'|'slice'|'int'|'none'|'other', value) for one element of a slice key."""
    if item is None:
        return "none", None
    if isinstance(item, bool):
        return "other", item
    if isinstance(item, int):
        return "int", item
    if isinstance(item, dict):
        name = item.get("class_name")
        if name == "__ellipsis__":
            return "ellipsis", None
        if name == "__slice__":
            return "slice", item.get("config") or {}
        if name is None and {"start", "stop", "step"} & set(item):
            return "slice", item  # tf-keras slice_spec entry
    return "other", item


def _from_key(call: Call, source: TensorRef, shape: list, key, kind: str) -> SliceCall | str:
    items = key if isinstance(key, list) else [key]
    entries = [_entry(i) for i in items]
    if any(e[0] in ("none", "other") for e in entries):
        return "its index is not made of slices"
    if any(e[0] == "int" for e in entries):
        return "it indexes (drops an axis) instead of slicing"
    rank = len(shape)
    explicit = sum(1 for e in entries if e[0] != "ellipsis")
    if sum(1 for e in entries if e[0] == "ellipsis") > 1 or explicit > rank:
        return "its index does not fit the input's rank"
    per_axis: list[dict] = []
    for kind_, value in entries:
        if kind_ == "ellipsis":
            per_axis.extend({} for _ in range(rank - explicit))
        else:
            per_axis.append(value)
    per_axis.extend({} for _ in range(rank - len(per_axis)))
    partial = []
    for axis, bounds in enumerate(per_axis):
        start, stop, step = bounds.get("start"), bounds.get("stop"), bounds.get("step")
        if step not in (None, 1):
            return f"it slices with step {step}"
        size = shape[axis]
        if start in (None, 0) and (stop is None or (size is not None and stop >= size)):
            continue
        if size is None:
            return f"it slices axis {axis}, whose size is unknown"
        start = _clip(start if start is not None else 0, size)
        stop = _clip(stop if stop is not None else size, size)
        partial.append((axis, start, stop))
    if not partial:
        return "it reads the whole tensor"
    if len(partial) > 1:
        return "it slices more than one axis"
    axis, start, stop = partial[0]
    if stop <= start:
        return "it returns an empty slice"
    return SliceCall(call, source, axis, [(start, stop)], kind)


def _clip(index: int, size: int) -> int:
    if index < 0:
        index += size
    return max(0, min(index, size))


def _from_split(call: Call, source: TensorRef, shape: list, sections, axis, *, numpy_style: bool,
                kind: str) -> SliceCall | str:
    rank = len(shape)
    if not isinstance(axis, int) or not -rank <= axis < rank:
        return "its axis is not a constant"
    axis %= rank
    size = shape[axis]
    if size is None:
        return "the size of the split axis is unknown"
    if isinstance(sections, int):
        if sections <= 0 or size % sections:
            return f"{size} channels do not split into {sections} equal parts"
        width = size // sections
        return SliceCall(call, source, axis, [(i * width, (i + 1) * width) for i in range(sections)], kind)
    if isinstance(sections, list) and all(isinstance(s, int) for s in sections):
        if numpy_style:  # split points
            points = [0, *[_clip(p, size) for p in sections], size]
        else:  # sizes, one may be -1
            sizes = resolve_sizes(sections, size)
            if sizes is None or sum(sizes) != size or any(s < 0 for s in sizes):
                return "its sizes do not add up to the axis"
            points = [0]
            for s in sizes:
                points.append(points[-1] + s)
        return SliceCall(call, source, axis, list(zip(points, points[1:])), kind)
    return "its sizes are not constants"
