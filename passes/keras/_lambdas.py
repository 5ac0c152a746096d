"""Lambda layers: Python bytecode inside the model file.

Running a Lambda is running the file's code, so nothing here is called unless the user passed
``--trust-lambdas``. With trust, each Lambda is rebuilt from its marshalled code, defaults and
closure (by hand: Keras 3 itself fails on defaults stored as a list, "arg 4 (defaults) must be
None or tuple"), and what it does is established by running it on probes whose every element is
distinguishable: only an exact, contiguous channel slice is accepted as a slice.

Late binding: Lambdas made in a loop that close over the loop variable all hold the loop's
*last* value (or, made at module level, read a global the file does not hold). Branches of one
Concatenate whose Lambdas share code and closure values are reported, and can be rebuilt with
each branch's intended index (its position in the Concatenate).
"""

from __future__ import annotations

import base64
import binascii
import builtins
import functools
import marshal
import types
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from gconv_rewrite.errors import BadInput
from gconv_rewrite.passes.keras._config import LayerSpec

TRUST_HINT = ("the file contains Lambda layers, whose Python code would run when the model is loaded "
              "or verified (running it means running the file's code); pass --trust-lambdas to opt in "
              "if you trust this file")


def is_lambda(layer: LayerSpec) -> bool:
    return layer.class_name == "Lambda"


@dataclass
class LambdaSource:
    """A Lambda's function as stored in the file (nothing executed yet)."""

    layer: str
    code: str  # base64 of the marshalled code object
    defaults: tuple | None
    closure: tuple | None
    arguments: dict = field(default_factory=dict)

    @property
    def fingerprint(self) -> tuple:
        return (self.code, repr(self.defaults), repr(self.closure), repr(sorted(self.arguments.items())))


def lambda_source(layer: LayerSpec) -> LambdaSource:
    """Read the function of a Lambda layer, in Keras 3 or legacy form, or say why it cannot."""
    config = layer.config
    function = config.get("function")
    arguments = config.get("arguments") or {}
    if isinstance(function, dict) and function.get("class_name") == "__lambda__":
        body = function.get("config") or {}
        code, defaults, closure = body.get("code"), body.get("defaults"), body.get("closure")
    elif isinstance(function, list) and len(function) == 3 and config.get("function_type", "lambda") == "lambda":
        code, defaults, closure = function
    else:
        name = function if isinstance(function, str) else (function or {}).get("config", function)
        raise BadInput(f"Lambda layer {layer.name!r} refers to a Python function {name!r} that is not in the file; "
                       "it cannot be rebuilt")
    if not isinstance(code, str):
        raise BadInput(f"Lambda layer {layer.name!r}: its code is not stored as marshalled bytecode")
    if not isinstance(arguments, dict):
        arguments = {}
    return LambdaSource(layer.name, code,
                        tuple(defaults) if isinstance(defaults, list) else defaults,
                        tuple(closure) if isinstance(closure, list) else closure,
                        dict(arguments))


def code_object(source: LambdaSource) -> types.CodeType:
    """Unmarshal the bytecode (trusted files only: marshal is not safe against crafted data)."""
    try:
        raw = base64.b64decode(source.code.encode("ascii"))
    except (UnicodeEncodeError, binascii.Error):
        raw = source.code.encode("raw_unicode_escape")
    try:
        code = marshal.loads(raw)
    except (ValueError, EOFError, TypeError) as exc:
        raise BadInput(f"Lambda layer {source.layer!r}: its bytecode cannot be read by this Python "
                       f"(written by another Python version?): {exc}") from exc
    if not isinstance(code, types.CodeType):
        raise BadInput(f"Lambda layer {source.layer!r}: its stored function is not Python bytecode")
    return code


def lambda_globals() -> dict[str, Any]:
    """What Lambda code commonly refers to (Keras's own loaders offer their module's globals).
    ``K`` is the Keras 2 backend legacy code was written for (``K.reshape``, ``K.int_shape``...;
    Keras 3's ``keras.backend`` has none of them): tf-keras's where installed, else a mapping
    onto ``keras.ops`` (``gconv_rewrite.passes.keras._keras2_backend``)."""
    import keras
    import tensorflow as tf

    from gconv_rewrite.passes.keras._keras2_backend import keras2_backend

    return {"__builtins__": builtins, "tf": tf, "keras": keras, "K": keras2_backend(), "ops": keras.ops,
            "np": np, "numpy": np}


def make_function(source: LambdaSource, *, bind: dict[str, Any] | None = None) -> Callable:
    """Rebuild the Python function; ``bind`` overrides closure variables or unresolved globals by
    name (late-binding repair)."""
    code = code_object(source)
    bind = bind or {}
    globs = lambda_globals()
    for name in code.co_names:
        if name in bind:
            globs[name] = bind[name]
    closure = None
    if code.co_freevars:
        values = list(source.closure or ())
        if len(values) != len(code.co_freevars):
            raise BadInput(f"Lambda layer {source.layer!r}: the file stores {len(values)} closure values for "
                           f"{len(code.co_freevars)} free variables")
        closure = tuple(types.CellType(bind.get(name, value)) for name, value in zip(code.co_freevars, values))
    defaults = source.defaults
    if code.co_argcount and defaults is not None and code.co_varnames:
        # Defaults bind the last positional parameters; a repair may override them by name.
        names = code.co_varnames[:code.co_argcount][-len(defaults):]
        defaults = tuple(bind.get(n, v) for n, v in zip(names, defaults))
    return types.FunctionType(code, globs, code.co_name, defaults, closure)


# -- writing a kept Lambda -----------------------------------------------------------------------

# What Keras 3 does with a Lambda's function when it saves and loads it: bytecode only when the
# function is named "<lambda>" (a named ``def`` is written by name, which no loader finds again);
# its defaults come back as a list, which Python refuses ("arg 4 (defaults) must be None or
# tuple"); its closure values come back as cells; and the code runs with the globals of
# ``keras.src.utils.python_utils``: no ``K``, ``tf`` or ``np``. So a kept Lambda is written as
# this small carrier (its own bytecode, named "<lambda>"), whose closure holds the original's
# bytecode, defaults, closure values and any global a late-binding repair bound, and which
# rebuilds the original with the environment the file's code was run with here
# (``lambda_globals``). Where tf-keras is not installed at load time, ``K`` is this tool's
# mapping onto keras.ops if the tool is installed, else Keras 3's ``keras.backend``.
_CARRIER_SOURCE = """
def carry(_gconv_code, _gconv_defaults, _gconv_closure, _gconv_globals):
    def carrier(inputs, **arguments):
        import base64
        import builtins
        import marshal
        import types

        import keras
        import numpy as np
        import tensorflow as tf
        try:
            from tf_keras import backend as K
        except ImportError:
            try:
                from gconv_rewrite.passes.keras._keras2_backend import Keras2Backend
                K = Keras2Backend()
            except ImportError:
                K = keras.backend
        names = {"__builtins__": builtins, "tf": tf, "keras": keras, "K": K, "ops": keras.ops, "np": np,
                 "numpy": np}
        names.update(_gconv_globals or {})
        cells = None if _gconv_closure is None else tuple(types.CellType(v) for v in _gconv_closure)
        function = types.FunctionType(marshal.loads(base64.b64decode(_gconv_code)), names, "<lambda>",
                                      None if _gconv_defaults is None else tuple(_gconv_defaults), cells)
        return function(inputs, **arguments)
    return carrier
"""


@functools.lru_cache(maxsize=1)
def _carrier_code() -> types.CodeType:
    namespace: dict[str, Any] = {}
    exec(compile(_CARRIER_SOURCE, "<gconv-rewrite lambda>", "exec"), {"__builtins__": builtins}, namespace)
    code = namespace["carry"](None, None, None, None).__code__
    return code.replace(co_name="<lambda>", co_qualname="<lambda>")


def _global_names(code: types.CodeType) -> set[str]:
    """Every global the code (and the code it nests: comprehensions, inner functions) reads."""
    names = set(_global_loads(code))
    for const in code.co_consts:
        if isinstance(const, types.CodeType):
            names |= _global_names(const)
    return {n for n in names if not hasattr(builtins, n)}


def portable(function: Callable) -> Callable:
    """``function`` in a form Keras 3 writes as bytecode that loads and runs again from the
    written file (under ``safe_mode=False``, as the input needed ``--trust-lambdas``): a
    "<lambda>" without defaults or globals as it is, anything else in the carrier above (a named
    ``def`` helper, ``lambda z, c=c: ...``, code calling ``K``/``tf``/``np``)."""
    code = function.__code__
    reads = _global_names(code)
    if not reads and code.co_name == "<lambda>" and function.__defaults__ is None:
        return function
    environment = lambda_globals()
    bound = {n: function.__globals__[n] for n in sorted(reads)
             if n in function.__globals__ and n not in environment}
    payload = {"_gconv_code": base64.b64encode(marshal.dumps(code)).decode("ascii"),
               "_gconv_defaults": function.__defaults__,
               "_gconv_closure": None if function.__closure__ is None else
               tuple(cell.cell_contents for cell in function.__closure__),
               "_gconv_globals": bound or None}
    carrier = _carrier_code()
    return types.FunctionType(carrier, {"__builtins__": builtins}, "<lambda>", None,
                              tuple(types.CellType(payload[name]) for name in carrier.co_freevars))


def bindable_names(source: LambdaSource) -> list[tuple[str, Any]]:
    """Variables a loop could have late-bound: integer closure values, and globals the file does
    not hold (a Lambda made at module level reads its loop variable as a global)."""
    code = code_object(source)
    names: list[tuple[str, Any]] = []
    for name, value in zip(code.co_freevars, source.closure or ()):
        if isinstance(value, int) and not isinstance(value, bool):
            names.append((name, value))
    known = lambda_globals()
    for name in _global_loads(code):
        if name not in known and not hasattr(builtins, name):
            names.append((name, None))
    return names


def unresolved_globals(source: LambdaSource) -> list[str]:
    """Globals the code reads that neither the file nor the Lambda environment holds."""
    code = code_object(source)
    known = lambda_globals()
    return [n for n in _global_loads(code) if n not in known and not hasattr(builtins, n)]


def _global_loads(code: types.CodeType) -> list[str]:
    import dis

    names = []
    for instruction in dis.get_instructions(code):
        if instruction.opname in ("LOAD_GLOBAL", "LOAD_NAME") and instruction.argval not in names:
            names.append(instruction.argval)
    return names


# -- probing ------------------------------------------------------------------------------------

@dataclass
class ProbedSlice:
    """What probing found: each output is ``source[..., start:stop]`` along ``axis``."""

    axis: int  # non-negative
    ranges: list[tuple[int, int]]


def probe_shape(shape: list[int | None], fill: int = 3) -> list[int]:
    """A concrete shape: unknown dims (the batch too) get ``fill``; 2 for the batch by default."""
    return [(2 if fill == 3 else fill) if i == 0 and d is None else (d if d is not None else fill)
            for i, d in enumerate(shape)]


def probe_slice(function: Callable, arguments: dict, shape: list[int | None]) -> ProbedSlice | str:
    """Run ``function`` on distinguishable probes; a ProbedSlice if every output is an exact
    contiguous slice of one axis (the same axis for all), else the reason it is not.

    Unknown dims are probed at two sizes: a slice relative to a size the file does not fix
    (``z[:, 1:]`` on a dynamic height) must not pass for a constant one. The values are varied
    at the first size (three probes); at the second, the probe of unique values alone says
    exactly which slice it takes."""
    shapes = [probe_shape(shape)] + ([probe_shape(shape, fill=4)] if None in shape else [])
    found: ProbedSlice | None = None
    for count, dims in zip((3, 1), shapes):
        if int(np.prod(dims)) >= 2 ** 24:
            return "input too large to probe exactly"
        for probe in _probes(tuple(dims), count):
            arrays = _run_on(function, arguments, probe)
            if isinstance(arrays, str):
                return arrays
            described = _describe_slices(probe, arrays)
            if isinstance(described, str):
                return described
            if found is not None and (found.axis, found.ranges) != (described.axis, described.ranges):
                return "it slices differently depending on the values or sizes (not a constant slice)"
            found = described
    if found is not None and shape[found.axis] is None:
        return f"it slices axis {found.axis}, whose size is not fixed"
    return found


def _run_on(function: Callable, arguments: dict, probe: np.ndarray) -> list[np.ndarray] | str:
    """The function's outputs on ``probe`` as arrays, or why it cannot run. The probe goes in as
    a NumPy array first: slicing it is a view, where a TensorFlow tensor copies each slice (a
    512-Lambda ResNeXt spent a second there). Code that needs a tensor (``x.shape.as_list()``,
    ``K.int_shape``) fails or answers oddly on an array; it is then run on the constant tensor,
    as Keras would run it. Whatever probing concludes, verification checks the rewrite."""
    import tensorflow as tf

    for as_tensor in (False, True):
        try:
            result = function(tf.constant(probe) if as_tensor else probe, **arguments)
        except Exception as exc:  # user code: any failure means "not something we understand"
            if not as_tensor:
                continue
            text = str(exc).splitlines()[0][:120] if str(exc) else ""
            return f"running it on a probe failed ({type(exc).__name__}: {text})"
        outputs = list(result) if isinstance(result, (list, tuple)) else [result]
        try:
            arrays = [np.asarray(o) for o in outputs]
        except Exception:
            arrays = None
        if arrays is not None and all(a.dtype == probe.dtype for a in arrays):
            return arrays
    return "its output is not a tensor" if arrays is None else "it changes the tensor's type"


# Probe arrays by shape, the last few kept: each Lambda is probed at one or two shapes, and the
# branches of one group read the same tensor, so consecutive calls reuse them; the bound on the
# elements held keeps memory bounded on big inputs (one shape's probes are always kept).
_PROBES: dict[tuple[int, ...], list[np.ndarray]] = {}
_PROBE_SHAPES_KEPT = 4
_PROBE_ELEMENTS_KEPT = 2 ** 23


def _probes(dims: tuple[int, ...], count: int) -> list[np.ndarray]:
    """The first ``count`` of three probes: unique positive values, unique negative halves,
    seeded noise (made when first asked for: a dynamic batch's second size needs only the first)."""
    if dims not in _PROBES:
        size = int(np.prod(dims))
        while _PROBES and (len(_PROBES) >= _PROBE_SHAPES_KEPT or
                           sum(int(np.prod(d)) for d in _PROBES) + size > _PROBE_ELEMENTS_KEPT):
            del _PROBES[next(iter(_PROBES))]  # the oldest shape
        _PROBES[dims] = []
    probes = _PROBES[dims]
    while len(probes) < count:
        if not probes:
            probe = np.arange(1, int(np.prod(dims)) + 1, dtype=np.float32).reshape(dims)
        elif len(probes) == 1:
            probe = -0.5 * probes[0] + 0.25
        else:
            probe = np.random.default_rng(0).standard_normal(dims, dtype=np.float32)
        probe.setflags(write=False)  # code that writes into its input fails (and runs on a tensor) instead
        probes.append(probe)
    return probes[:count]


def release_probes() -> None:
    """Free the probes kept (at most a few shapes' worth; made again when next needed)."""
    _PROBES.clear()


def _describe_slices(probe: np.ndarray, outputs: list[np.ndarray]) -> ProbedSlice | str:
    axis: int | None = None
    ranges = []
    for out in outputs:
        if out.ndim != probe.ndim:
            return "it changes the tensor's rank"
        differing = [i for i, (a, b) in enumerate(zip(probe.shape, out.shape)) if a != b]
        if len(differing) > 1:
            return "it changes more than one axis"
        this_axis = differing[0] if differing else probe.ndim - 1
        if axis is not None and this_axis != axis:
            return "its outputs slice different axes"
        axis = this_axis
        width = out.shape[axis]
        if width == 0:
            return "it returns an empty slice"
        start = _find_start(probe, out, axis, width)
        if start is None:
            return "it is not an exact contiguous slice of its input"
        ranges.append((start, start + width))
    if axis is None:
        return "it returns nothing"
    return ProbedSlice(axis, ranges)


def _find_start(probe: np.ndarray, out: np.ndarray, axis: int, width: int) -> int | None:
    # Candidates: where the output's first element sits along the axis; then one exact check.
    corner = tuple(0 for _ in range(probe.ndim))
    line = np.moveaxis(probe, axis, -1)[corner[:-1]]
    first = out[corner]
    for start in np.flatnonzero(line == first):
        start = int(start)
        if start + width > probe.shape[axis]:
            continue
        index = [slice(None)] * probe.ndim
        index[axis] = slice(start, start + width)
        if np.array_equal(probe[tuple(index)], out):  # exact: NumPy compares in the promoted dtype
            return start
    return None
