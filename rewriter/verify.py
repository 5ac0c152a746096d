"""Proof by execution: run the original and the rewritten model on the same inputs and compare.

As Polygraphy and onnxsim do: onnxruntime with its graph optimisations off (its own fusions
must not hide a difference), seeded inputs, every output compared; an element fails only when it
exceeds both atol and rtol; NaN/Inf, dtype and shape changes are failures.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np

from gconv_rewrite.errors import BadInput, VerificationFailed, VerificationImpossible
from gconv_rewrite.report import OutputComparison, Verification

# Verification inputs and outputs together may take at most this much memory (both models' outputs
# are held at once): 4 GiB, or half the memory available now where that is less.
MEMORY_LIMIT_BYTES = 4 << 30


def parse_shapes(specs: list[str] | tuple[str, ...]) -> dict[str, list[int]]:
    """``["x=1,3,224,224"]`` → ``{"x": [1, 3, 224, 224]}``."""
    shapes = {}
    for spec in specs:
        name, sep, dims = spec.rpartition("=")
        try:
            if not sep or not name:
                raise ValueError
            shapes[name] = [int(d) for d in dims.replace("x", ",").split(",") if d.strip()]
            if any(d < 0 for d in shapes[name]):
                raise ValueError
        except ValueError:
            raise BadInput(f"--shape {spec!r}: expected NAME=D0,D1,... with non-negative integers") from None
    return shapes


def load_inputs_file(path: Path) -> dict[str, np.ndarray]:
    try:
        with np.load(path, allow_pickle=False) as archive:  # never unpickle user data
            return {name: archive[name] for name in archive.files}
    except FileNotFoundError:
        raise BadInput(f"{path}: no such inputs file") from None
    except Exception as exc:
        raise BadInput(f"{path}: not a readable .npz of arrays ({str(exc).splitlines()[0][:160]})") from None


def _session(path: Path, role: str, model_bytes: bytes | None = None):
    """An onnxruntime session with its graph optimisations off, of the file at ``path`` or of
    ``model_bytes`` (a copy of it) whose external data lies beside ``path``."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    options.log_severity_level = 3
    try:
        if model_bytes is not None:
            options.add_session_config_entry("session.model_external_initializers_file_folder_path",
                                             str(Path(path).resolve().parent))
            return ort.InferenceSession(model_bytes, options, providers=["CPUExecutionProvider"])
        return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    except Exception as exc:
        detail = str(exc).strip().splitlines()[0][:240] if str(exc).strip() else type(exc).__name__
        raise VerificationImpossible(
            f"onnxruntime cannot run the {role} model, so verification is impossible ({detail}); "
            "pass --no-verify to write it without proof") from exc


@dataclass(frozen=True)
class InputSpec:
    """A model input (or output) as verification sees it, whatever the format.

    ``shape``: per dim an int (fixed), a str (a named dynamic dim, ONNX ``dim_param``) or None
    (unknown); the whole shape None when even the rank is unknown. ``dtype``: the type as
    onnxruntime spells it (``tensor(float)``), or a numpy / TensorFlow / Keras dtype name.
    """

    name: str
    shape: Sequence[int | str | None] | None
    dtype: str


class Feeds(dict):
    """The verification inputs, name → array in the model's input order; ``defaulted``: name →
    the dims that were unknown batch dims and were set to 1."""

    def __init__(self, arrays=(), defaulted: Mapping[str, list[int]] | None = None):
        super().__init__(arrays)
        self.defaulted = dict(defaulted or {})

    def shapes(self) -> dict[str, list[int]]:
        return {name: list(np.shape(array)) for name, array in self.items()}


# ONNX element types random inputs are made for (onnxruntime takes no array of the others:
# complex, 4-bit and the newer float types; sequences and maps are no tensors at all).
_GENERATED = {
    "FLOAT", "DOUBLE", "FLOAT16", "BFLOAT16", "FLOAT8E4M3FN", "FLOAT8E4M3FNUZ", "FLOAT8E5M2", "FLOAT8E5M2FNUZ",
    "INT8", "INT16", "INT32", "INT64", "UINT8", "UINT16", "UINT32", "UINT64", "BOOL", "STRING",
}
_TYPE_ALIASES = {"float32": "FLOAT", "float64": "DOUBLE", "half": "FLOAT16", "bool_": "BOOL", "str": "STRING",
                 "object": "STRING", "bytes": "STRING"}


def element_type(dtype) -> tuple[str, int | None]:
    """(the ONNX name of a dtype, its TensorProto code or None if ONNX has no such type)."""
    from onnx import TensorProto

    name = str(getattr(dtype, "name", dtype))
    if name.startswith("tensor(") and name.endswith(")"):
        name = name[len("tensor("):-1]
    key = _TYPE_ALIASES.get(name.lower(), name.upper().replace("_", ""))
    return key, TensorProto.DataType.Value(key) if key in TensorProto.DataType.keys() else None


# Plain numpy dtypes (what TF and Keras inputs declare), without ONNX's tables: a Keras or
# SavedModel run then never imports onnx.
_PLAIN_NUMPY = {"float32", "float64", "float16", "int8", "int16", "int32", "int64", "uint8", "uint16", "uint32",
                "uint64", "bool"}


def _numpy_dtype(spec: InputSpec) -> np.dtype:
    name = str(getattr(spec.dtype, "name", spec.dtype))
    if name in _PLAIN_NUMPY:
        return np.dtype(name)
    from onnx import helper

    key, code = element_type(spec.dtype)
    if code is None or key not in _GENERATED:
        raise VerificationImpossible(
            f"input {spec.name!r} has type {spec.dtype}, for which verification cannot make inputs; "
            f"pass --inputs FILE.npz, or --no-verify")
    return np.dtype(helper.tensor_dtype_to_np_dtype(code))


def _random_array(rng: np.random.Generator, shape: list[int], dtype: np.dtype) -> np.ndarray:
    """Seeded values valid for the dtype; always an ndarray, rank 0 included."""
    if dtype.kind == "b":
        return np.asarray(rng.random(shape) < 0.5)
    if dtype.kind in "iu":
        return np.asarray(rng.integers(0, 8, size=shape), dtype=dtype)
    if dtype.kind == "O":  # strings: short words
        letters = np.array(list("abcdefgh"), dtype=object)
        return np.asarray(letters[rng.integers(0, len(letters), size=shape)], dtype=object)
    # float16/32/64, and bfloat16 / float8 (ml_dtypes, kind "V"): through float32
    return np.asarray(np.asarray(rng.standard_normal(shape), dtype=np.float32).astype(dtype))


def _itemsize(dtype: np.dtype) -> int:
    return 16 if dtype.kind == "O" else dtype.itemsize


def memory_limit() -> int:
    """Bytes the verification arrays may take: MEMORY_LIMIT_BYTES, or half the memory available
    now where that is less."""
    try:
        with open("/proc/meminfo") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return min(MEMORY_LIMIT_BYTES, int(line.split()[1]) * 1024 // 2)
    except (OSError, ValueError, IndexError):
        pass
    return MEMORY_LIMIT_BYTES


def _size(nbytes: int) -> str:
    for unit, scale in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if nbytes >= scale:
            return f"{nbytes / scale:.1f} {unit}"
    return f"{nbytes} B"


def _dims_text(dims) -> str:
    return "x".join(map(str, dims)) or "scalar"


def _shape_hint(name: str, dims: list[int]) -> str:
    example = [str(d) for d in dims]
    if dims:
        example[max(range(len(dims)), key=lambda i: dims[i])] = "N"
    return f"--shape {name}={','.join(example)}"


def _check_memory(specs, shapes_used: dict[str, list[int]], dtypes: dict[str, np.dtype],
                  outputs: Sequence[InputSpec] | None) -> None:
    """Refuse before allocating what would not fit (a declared dim of 10^9 is no reason to crash)."""
    limit = memory_limit()
    sizes = {name: math.prod(dims) * _itemsize(dtypes[name]) for name, dims in shapes_used.items()}
    total = sum(sizes.values())
    if total > limit:
        name = max(sizes, key=sizes.get)
        raise VerificationImpossible(
            f"verification inputs would take {_size(total)} (input {name!r}: {_dims_text(shapes_used[name])} "
            f"{dtypes[name].name}), over the {_size(limit)} limit: set a smaller shape with "
            f"{_shape_hint(name, shapes_used[name])}, or pass --inputs FILE.npz or --no-verify")
    # Outputs whose shapes are known once the inputs' named dims are: held twice (both models).
    bound: dict[str, int] = {}
    for spec in specs:
        if spec.shape is not None and spec.name in shapes_used:
            for declared, used in zip(spec.shape, shapes_used[spec.name]):
                if isinstance(declared, str) and declared:
                    bound.setdefault(declared, used)
    largest, output_total = None, 0
    for out in outputs or ():
        if out.shape is None:
            continue
        dims = [d if isinstance(d, int) and d >= 0 else bound.get(d) if isinstance(d, str) else None
                for d in out.shape]
        if any(d is None for d in dims):
            continue
        try:
            itemsize = _itemsize(_numpy_dtype(out))
        except VerificationImpossible:
            itemsize = 4
        nbytes = 2 * math.prod(dims) * itemsize
        output_total += nbytes
        if largest is None or nbytes > largest[1]:
            largest = (out.name, nbytes, dims)
    if largest is not None and total + output_total > limit:
        hints = " ".join(_shape_hint(n, d) for n, d in shapes_used.items())
        raise VerificationImpossible(
            f"verification outputs would take {_size(output_total)} (output {largest[0]!r}: "
            f"{_dims_text(largest[2])}, held for both models), over the {_size(limit)} limit: set smaller "
            f"input shapes with {hints}, or pass --no-verify")


def _input_specs(source) -> list[InputSpec]:
    items = source.get_inputs() if hasattr(source, "get_inputs") else source
    return [item if isinstance(item, InputSpec)
            else InputSpec(item.name, None if item.shape is None else list(item.shape), item.type)
            for item in items]


def make_inputs(source, *, shapes: Mapping[str, list[int]], seed: int,
                given: Mapping[str, np.ndarray] | None,
                outputs: Sequence[InputSpec] | None = None) -> Feeds:
    """Seeded random inputs per input dtype, or the user's arrays: the one input maker of the
    ONNX, SavedModel and Keras backends.

    ``source``: a list of ``InputSpec`` (or an onnxruntime session). An unknown leading dim
    (ONNX ``dim_param`` or unknown dim at position 0 that names no other dim, TF/Keras ``None``
    batch) is set to 1 and recorded in ``Feeds.defaulted``; any other unknown dim needs
    ``--shape``, which always wins. ``outputs``: output specs, to refuse early what would not
    fit in memory.
    """
    specs = _input_specs(source)
    if given is not None:
        return _given_feeds(specs, given)
    shapes_used, defaulted, dtypes = _input_shapes(specs, shapes)
    _check_memory(specs, shapes_used, dtypes, outputs)
    rng = np.random.default_rng(seed)
    return Feeds(((name, _random_array(rng, dims, dtypes[name])) for name, dims in shapes_used.items()), defaulted)


def _given_feeds(specs: list[InputSpec], given: Mapping[str, np.ndarray]) -> Feeds:
    """The user's --inputs arrays, in the model's input order; they must name every input, and
    nothing else."""
    names = {s.name for s in specs}
    missing = sorted(names - set(given))
    unknown = sorted(set(given) - names)
    if missing or unknown:
        raise BadInput("--inputs: " + "; ".join(
            ([f"missing {', '.join(missing)}"] if missing else [])
            + ([f"no model input named {', '.join(unknown)}"] if unknown else [])))
    return Feeds((s.name, np.asarray(given[s.name])) for s in specs)


def _input_shapes(specs: list[InputSpec], shapes: Mapping[str, list[int]]
                  ) -> tuple[dict[str, list[int]], dict[str, list[int]], dict[str, np.dtype]]:
    """The shape and dtype of each random input: ``(shapes_used, defaulted, dtypes)``, where
    ``defaulted`` names the inputs whose batch dim was set to 1 (and at which positions)."""
    # --shape names of other models' inputs are fine (one flag set for a folder of models); a
    # typo shows up as the dynamic input it failed to fill, with the names this model has.
    unknown_shapes = sorted(set(shapes) - {s.name for s in specs})
    # A named dim that also stands at another position (a sequence length, say) is no batch.
    named_elsewhere = {d for s in specs if s.shape is not None for d in list(s.shape)[1:] if isinstance(d, str)}
    shapes_used: dict[str, list[int]] = {}
    defaulted: dict[str, list[int]] = {}
    dtypes: dict[str, np.dtype] = {}
    for spec in specs:
        dtypes[spec.name] = _numpy_dtype(spec)
        hint = (f" (--shape named {', '.join(unknown_shapes)}, but the model's inputs are "
                f"{', '.join(s.name for s in specs)})" if unknown_shapes else "")
        if spec.name in shapes:
            shape = list(shapes[spec.name])
            if spec.shape is not None and len(shape) != len(spec.shape):
                raise BadInput(f"--shape {spec.name}: {len(shape)} dims given, the input has {len(spec.shape)}")
            shapes_used[spec.name] = shape
            continue
        declared, batch = _declared_shape(spec, named_elsewhere, hint)
        if batch:
            defaulted[spec.name] = [0]
        shapes_used[spec.name] = declared
    return shapes_used, defaulted, dtypes


def _declared_shape(spec: InputSpec, named_elsewhere: set[str], hint: str) -> tuple[list[int], bool]:
    """The input's declared shape with an unknown batch dim set to 1, and whether it had one;
    any other unknown dim (or an unknown rank) needs --shape. ``hint``: what to say about
    --shape names that matched no input."""
    if spec.shape is None:
        raise VerificationImpossible(f"input {spec.name!r} has an unknown rank: set its shape with "
                                     f"--shape {spec.name}=D0,D1,...{hint}")
    declared = list(spec.shape)
    known = lambda d: isinstance(d, int) and d >= 0
    batch = bool(declared) and not known(declared[0]) and declared[0] not in named_elsewhere
    dynamic = [str(d) if d else f"dim {i}" for i, d in enumerate(declared)
               if not known(d) and not (i == 0 and batch)]
    if dynamic:
        example = ",".join(str(d) if known(d) else ("1" if i == 0 and batch else "N")
                           for i, d in enumerate(declared))
        raise VerificationImpossible(
            f"input {spec.name!r} has dynamic dims ({', '.join(dynamic)}): set them with "
            f"--shape {spec.name}={example}{hint}")
    if batch:
        declared[0] = 1
    return declared, batch


def _needs_ort_value(array: np.ndarray) -> bool:
    """bfloat16 / float8 (ml_dtypes): no numpy type onnxruntime knows."""
    return array.dtype.kind == "V" or (array.dtype.kind == "f" and array.dtype.type.__module__.startswith("ml_dtypes"))


def run_session(session, feeds: Mapping[str, np.ndarray], role: str) -> list[np.ndarray]:
    """``session.run`` on the feeds; bfloat16 / float8 arrays go in as OrtValues of their ONNX type."""
    import onnxruntime as ort

    try:
        if not any(_needs_ort_value(a) for a in feeds.values()):
            return session.run(None, dict(feeds))
        values = {}
        for name, array in feeds.items():
            array = np.ascontiguousarray(array)
            if _needs_ort_value(array):
                raw = array.view(np.uint8 if array.dtype.itemsize == 1 else np.uint16)
                values[name] = ort.OrtValue.ortvalue_from_numpy_with_onnx_type(raw, element_type(array.dtype)[1])
            else:
                values[name] = ort.OrtValue.ortvalue_from_numpy(array)
        results = session.run_with_ort_values(None, values)
    except Exception as exc:
        detail = str(exc).strip().splitlines()[0][:240] if str(exc).strip() else type(exc).__name__
        raise VerificationImpossible(f"onnxruntime cannot run the {role} model on the verification inputs "
                                     f"({detail}); pass --inputs FILE.npz, or --no-verify") from exc
    arrays = []
    for spec, value in zip(session.get_outputs(), results):
        try:
            arrays.append(value.numpy())
        except Exception as exc:
            raise VerificationImpossible(f"output {spec.name!r} has type {spec.type}, which onnxruntime cannot "
                                         "hand back as an array; pass --no-verify") from exc
    return arrays


def compare(name: str, expected: np.ndarray, actual: np.ndarray, atol: float, rtol: float) -> OutputComparison:
    """One tensor of the original against the rewritten model's.

    An element fails when it exceeds both atol and rtol. Non-finite values match only where
    identical (+inf with +inf, NaN with NaN): +inf against -inf is a failure, never inf/inf = NaN
    that no comparison catches. The relative error is taken against ``max(|expected|, atol)`` so
    it cannot explode where the expected value is 0. A reference that carries no information for
    these inputs (all NaN / non-finite, or constant to within atol) is flagged ``informative``
    False: it passes or fails as compared, but it proves nothing about the rewrite.
    """
    expected, actual = np.asarray(expected), np.asarray(actual)
    base = dict(name=name, shape=list(expected.shape), dtype=str(expected.dtype))
    if expected.shape != actual.shape or expected.dtype != actual.dtype:
        return OutputComparison(**base, max_abs_error=float("inf"), max_rel_error=float("inf"),
                                mean_abs_error=float("inf"), passed=False,
                                note=f"changed to {actual.dtype}{list(actual.shape)}")
    if expected.size == 0:
        return OutputComparison(**base, max_abs_error=0.0, max_rel_error=0.0, mean_abs_error=0.0, passed=True,
                                informative=False, note="empty")
    if expected.dtype.kind in "OSU":  # strings: equal or not
        diff = np.asarray(expected != actual)
        return OutputComparison(**base, max_abs_error=float(diff.any()), max_rel_error=float(diff.any()),
                                mean_abs_error=float(diff.mean()), passed=not diff.any())
    if expected.dtype.kind not in "fcV":  # bool, ints: exact
        diff = expected != actual
        errors = np.abs(expected.astype(np.float64) - actual.astype(np.float64))
        return OutputComparison(**base, max_abs_error=float(errors.max()), max_rel_error=float(diff.any()),
                                mean_abs_error=float(errors.mean()), passed=not diff.any(),
                                **_information(expected.astype(np.float64), 0.0, []))
    if expected.dtype.kind == "c":  # complex: both parts, each compared as floats
        e = np.concatenate([np.atleast_1d(expected.real), np.atleast_1d(expected.imag)]).astype(np.float64)
        a = np.concatenate([np.atleast_1d(actual.real), np.atleast_1d(actual.imag)]).astype(np.float64)
    else:
        e, a = np.atleast_1d(expected.astype(np.float64)), np.atleast_1d(actual.astype(np.float64))  # rank 0 too
    finite_e, finite_a = np.isfinite(e), np.isfinite(a)
    # Where either side is non-finite, the two must be the very same value (NaN is NaN, inf keeps its sign).
    nonfinite = ~(finite_e & finite_a)
    same_nonfinite = (np.isnan(e) & np.isnan(a)) | (np.isinf(e) & (e == a))
    nonfinite_mismatch = nonfinite & ~same_nonfinite
    with np.errstate(invalid="ignore", over="ignore"):
        diff = np.where(nonfinite, 0.0, np.abs(e - a))
        rel = diff / np.maximum(np.abs(np.where(finite_e, e, 0.0)), max(atol, np.finfo(np.float64).tiny))
    failing = ((diff > atol) & (rel > rtol)) | nonfinite_mismatch
    notes = []
    if nonfinite_mismatch.any():
        where = int(np.flatnonzero(nonfinite_mismatch)[0])
        notes.append(f"non-finite values differ ({e.flat[where]:g} expected, {a.flat[where]:g} written)")
    logit_error = _log_probability_error(e, a, atol, rtol) if expected.dtype.kind == "f" and _softmax_rows(e) \
        else None
    if logit_error is not None:
        notes.append(f"softmax log-probabilities differ by up to {logit_error:.3g} (the logits behind "
                         "saturated probabilities)")
    return OutputComparison(
        **base,
        max_abs_error=float("inf") if nonfinite_mismatch.any() else float(diff.max()),
        max_rel_error=float("inf") if nonfinite_mismatch.any() else float(rel.max()),
        mean_abs_error=float(diff[~nonfinite].mean()) if (~nonfinite).any() else 0.0,
        passed=not failing.any() and logit_error is None, **_information(e, atol, notes))


def _softmax_rows(expected: np.ndarray) -> bool:
    """Whether a tensor looks like softmax probabilities: a batch of rows (rank 2 or more) of at
    least two classes, finite, non-negative, every row summing to 1."""
    if expected.ndim < 2 or expected.shape[-1] < 2 or not np.isfinite(expected).all() or (expected < 0).any():
        return False
    return bool(np.allclose(expected.sum(axis=-1), 1.0, atol=1e-3))


def _log_probability_error(expected: np.ndarray, actual: np.ndarray, atol: float, rtol: float) -> float | None:
    """Probabilities that random weights saturate (1e-17 beside 1.0) pass any absolute tolerance
    whatever the logits did. Their logarithms are the logits up to each row's constant: compared
    with the same atol/rtol, they show the difference. The largest failing difference, or None."""
    # Below 1e-30 float32 nears its subnormals, where the last digits are rounding, not logits.
    both_tiny = (expected < 1e-30) & (actual < 1e-30)
    with np.errstate(divide="ignore", invalid="ignore"):
        log_e, log_a = np.log(expected), np.log(np.maximum(actual, 0.0))
        diff = np.where(both_tiny, 0.0, np.abs(log_e - log_a))
    diff = np.where(np.isnan(diff), np.inf, diff)
    failing = (diff > atol) & (diff > rtol * np.abs(np.where(np.isfinite(log_e), log_e, 0.0)))
    return float(diff[failing].max()) if failing.any() else None


def _information(expected: np.ndarray, atol: float, notes: list[str]) -> dict:
    """``informative`` and ``note``: a reference tensor proves nothing when it is all non-finite,
    or when every finite value lies within atol of every other (a constant, a flat head)."""
    finite = expected[np.isfinite(expected)]
    informative = True
    if finite.size == 0:
        informative = False
        notes = [*notes, "the original's values are all NaN/Inf: not counted as proof"]
    elif float(finite.max() - finite.min()) <= atol:
        informative = False
        notes = [*notes, "the original's values are constant for these inputs: not counted as proof"]
    return dict(informative=informative, note="; ".join(notes))


def verify_onnx(original: Path, rewritten: Path, *, atol: float = 1e-4, rtol: float = 1e-3, seed: int = 0,
                shapes: Mapping[str, list[int]] | None = None,
                inputs: Mapping[str, np.ndarray] | None = None) -> Verification:
    """Run both files in onnxruntime on the same inputs; compare every output."""
    reference = _session(original, "original")
    feeds = make_inputs(reference, shapes=shapes or {}, seed=seed, given=inputs,
                        outputs=_input_specs(reference.get_outputs()))
    expected = run_session(reference, feeds, "original")
    output_names = [o.name for o in reference.get_outputs()]
    del reference  # free its memory before the second session
    used = dict(inputs=feeds.shapes(), defaulted=feeds.defaulted)
    try:
        candidate = _session(rewritten, "rewritten")
    except VerificationImpossible as exc:
        return Verification(ran=True, passed=False, atol=atol, rtol=rtol, note=exc.message, **used)
    new_names = [o.name for o in candidate.get_outputs()]
    if new_names != output_names:
        return Verification(ran=True, passed=False, atol=atol, rtol=rtol,
                            note=f"outputs changed: {output_names} -> {new_names}", **used)
    try:
        actual = run_session(candidate, feeds, "rewritten")
    except VerificationImpossible as exc:
        return Verification(ran=True, passed=False, atol=atol, rtol=rtol, note=exc.message, **used)
    outputs = [compare(n, e, a, atol, rtol) for n, e, a in zip(output_names, expected, actual)]
    return Verification(ran=True, passed=all(o.passed for o in outputs), atol=atol, rtol=rtol, outputs=outputs,
                        **used)


def _has_external_data(model) -> bool:
    from onnx import TensorProto

    return any(t.data_location == TensorProto.EXTERNAL for t in model.graph.initializer)


def _inline_small_tensors(model, folder: Path, limit: int = 1 << 16) -> None:
    """Load external tensors under ``limit`` bytes into the proto (Split sizes, shapes: what a
    session made from bytes must read while it infers shapes); weights stay on disk."""
    from onnx import TensorProto, external_data_helper

    for tensor in model.graph.initializer:
        if tensor.data_location != TensorProto.EXTERNAL:
            continue
        info = {entry.key: entry.value for entry in tensor.external_data}
        if int(info.get("length", limit)) < limit:
            external_data_helper.load_external_data_for_tensor(tensor, str(folder))
            tensor.data_location = TensorProto.DEFAULT
            del tensor.external_data[:]


class OnnxRunner:
    """A model file run in onnxruntime, with ``extra`` tensors of its main graph exposed as outputs
    (``gconv_rewrite.proof``'s runner): ``runner(feeds) → {name: array}``, model outputs and extras.
    ``outputs``: the model's own output names; ``extra``: the asked-for names the model computes."""

    def __init__(self, path: Path, role: str, extra: Sequence[str] = ()):
        import onnx

        self.role = role
        added: list[str] = []
        self.extra: list[str] = []
        if extra:
            model = onnx.load(str(path), load_external_data=False)  # external tensors stay on disk
            graph = model.graph
            computed = {o for node in graph.node for o in node.output} | {i.name for i in graph.input}
            declared = {o.name for o in graph.output}
            added = [name for name in dict.fromkeys(extra) if name in computed and name not in declared]
            self.extra = [name for name in dict.fromkeys(extra) if name in declared or name in added]
        if added and not _has_external_data(model):
            # The weights are in the file: copy it to scratch and append the extra outputs as a
            # second serialized graph field, which protobuf merges into the first (its repeated
            # outputs concatenate) -- the 100 MB of weights are never parsed or written again.
            import shutil

            from gconv_rewrite.formats import scratch_dir

            # An output without a type is legal for onnxruntime: it types it from the graph.
            more = onnx.ModelProto(graph=onnx.GraphProto(output=[onnx.ValueInfoProto(name=n) for n in added]))
            with scratch_dir() as scratch:
                copy = scratch / Path(path).name
                shutil.copyfile(path, copy)
                with open(copy, "ab") as stream:
                    stream.write(more.SerializeToString())
                self.session = _session(copy, role)
        elif added:  # weights outside: the proto is small; small tensors inline for shape inference
            model.graph.output.extend(onnx.ValueInfoProto(name=name) for name in added)
            _inline_small_tensors(model, Path(path).resolve().parent)
            self.session = _session(path, role, model.SerializeToString())
        else:
            self.session = _session(path, role)
        self.output_specs = _input_specs(self.session.get_outputs())
        self.outputs = [spec.name for spec in self.output_specs if spec.name not in added]
        self.inputs = _input_specs(self.session.get_inputs())

    def __call__(self, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        names = [spec.name for spec in self.output_specs]
        return dict(zip(names, run_session(self.session, feeds, self.role)))


# -- rewrites inside If / Loop / Scan bodies ------------------------------------------------------
#
# A run of the whole model takes one branch of each If (and maybe no Loop iteration): the rewrites
# in the branch not taken would go unproven. So each subgraph that holds a rewrite is also run as
# a model of its own, original against rewritten, on seeded random values for what it reads from
# the enclosing graphs (typed by ONNX shape inference at the shapes the main run used).


def _subgraph_index(graph, path=(), index=None) -> dict[tuple, object]:
    """path → GraphProto for every graph of a model; a path step is (owner node, attribute),
    the owner named by its name, or by op type and rank among unnamed ones (stable across the
    rewrite, which never adds or removes nodes that hold subgraphs)."""
    from onnx import AttributeProto

    index = {} if index is None else index
    index[path] = graph
    seen: dict[str, int] = {}
    for node in graph.node:
        holders = [a for a in node.attribute if a.type in (AttributeProto.GRAPH, AttributeProto.GRAPHS)]
        if not holders:
            continue
        if node.name:
            owner = node.name
        else:
            seen[node.op_type] = seen.get(node.op_type, 0) + 1
            owner = f"{node.op_type}#{seen[node.op_type]}"
        for attr in holders:
            subs = [attr.g] if attr.type == AttributeProto.GRAPH else list(attr.graphs)
            for k, sub in enumerate(subs):
                step = (owner, attr.name if attr.type == AttributeProto.GRAPH else f"{attr.name}[{k}]")
                _subgraph_index(sub, path + (step,), index)
    return index


def _path_label(path: tuple) -> str:
    return "/".join(f"{owner}.{attr}" for owner, attr in path)


def _node_paths(index: dict[tuple, object]) -> dict[str, list[tuple]]:
    """node name → the paths of the graphs holding a node of that name (exporters repeat names
    across branches)."""
    paths: dict[str, list[tuple]] = {}
    for path, graph in index.items():
        for node in graph.node:
            if node.name and path not in paths.setdefault(node.name, []):
                paths[node.name].append(path)
    return paths


def _rewrite_paths(rewrite, index: dict[tuple, object], node_paths: dict[str, list[tuple]]) -> list[tuple]:
    """The subgraphs a rewrite may sit in: found by its node names, narrowed by its graph label."""
    found: list[tuple] = []
    for name in [rewrite.location, *rewrite.nodes]:
        found.extend(p for p in node_paths.get(name, []) if p not in found)
    labelled = [p for p in found if (index[p].name or "subgraph") == rewrite.graph]
    return labelled or found


def _call_paths(model, index: dict[tuple, object], function: str) -> list[tuple]:
    """Paths of the graphs that call local function ``function``, directly or through other
    local functions."""
    callers, todo, seen = [], [function], set()
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        seen.add(name)
        callers.extend(p for p, graph in index.items() if p not in callers
                       and any(n.op_type == name for n in graph.node))
        todo.extend(f.name for f in model.functions if any(n.op_type == name for n in f.node))
    return callers


def _outer_reads(graph) -> list[str]:
    """Names a graph (its nested graphs included) reads but neither defines nor takes as input."""
    from onnx import AttributeProto

    defined = {i.name for i in graph.input} | {i.name for i in graph.initializer} | {""}
    defined |= {i.name for i in graph.sparse_initializer}
    reads: list[str] = []
    for node in graph.node:
        reads.extend(node.input)
        for attr in node.attribute:
            for sub in ([attr.g] if attr.type == AttributeProto.GRAPH else
                        list(attr.graphs) if attr.type == AttributeProto.GRAPHS else []):
                reads.extend(_outer_reads(sub))
        defined |= set(node.output)
    reads.extend(o.name for o in graph.output)
    return [name for name in dict.fromkeys(reads) if name not in defined]


def _owner_node(parent, step):
    from onnx import AttributeProto

    owner, _ = step
    seen: dict[str, int] = {}
    for node in parent.node:
        if node.name and node.name == owner:
            return node
        if not node.name and any(a.type in (AttributeProto.GRAPH, AttributeProto.GRAPHS) for a in node.attribute):
            seen[node.op_type] = seen.get(node.op_type, 0) + 1
            if f"{node.op_type}#{seen[node.op_type]}" == owner:
                return node
    return None


class _Unrunnable(Exception):
    """Why a subgraph cannot be run on its own (the rewrites in it then count as not exercised)."""


def _standalone(model, index: dict[tuple, object], typed_index: dict[tuple, object], path: tuple,
                reads: list[str]):
    """The subgraph at ``path`` as a model of its own: its formal inputs and ``reads`` (values of
    the enclosing graphs) as inputs, constants of the enclosing graphs copied in."""
    import onnx
    from onnx import helper

    graph = index[path]
    enclosing = [index[path[:i]] for i in range(len(path))]
    typed = [typed_index.get(path[:i]) for i in range(len(path) + 1)]
    types: dict[str, object] = {}
    for g in [g for g in typed if g is not None]:
        for info in list(g.input) + list(g.value_info) + list(g.output):
            if info.type.HasField("tensor_type") and info.type.tensor_type.elem_type:
                types.setdefault(info.name, info)
    constants, constant_nodes = {}, {}
    for g in enclosing:
        constants.update({i.name: i for i in g.initializer})
        constant_nodes.update({n.output[0]: n for n in g.node if n.op_type == "Constant" and n.output})
    inputs = []
    owner = _owner_node(enclosing[-1], path[-1])
    for position, info in enumerate(graph.input):  # Loop/Scan bodies: formal inputs
        copy = onnx.ValueInfoProto()
        copy.CopyFrom(info)
        loop = owner is not None and owner.op_type == "Loop"
        if loop and 2 <= position < len(owner.input) and owner.input[position] in types:
            copy.type.CopyFrom(types[owner.input[position]].type)  # carried: typed like the initial value
        elif loop and position < 2 and copy.type.HasField("tensor_type"):
            copy.type.tensor_type.shape.SetInParent()  # iteration number and condition: scalars
        inputs.append(copy)
    initializers, nodes = [], []
    for name in reads:
        if name in constants:
            initializers.append(constants[name])
        elif name in constant_nodes:
            nodes.append(constant_nodes[name])
        elif name in types:
            inputs.append(types[name])
        else:
            raise _Unrunnable(f"the type of {name!r}, read from the enclosing graph, is unknown")
    outputs = []
    for info in graph.output:
        if info.type.HasField("tensor_type") and info.type.tensor_type.elem_type:
            outputs.append(info)
        elif info.name in types:
            outputs.append(types[info.name])
        else:
            raise _Unrunnable(f"the type of its output {info.name!r} is unknown")
    for info in inputs:  # values of the enclosing graphs: their shapes must be known (a batch aside)
        tensor = info.type.tensor_type
        dims = list(tensor.shape.dim) if tensor.HasField("shape") else None
        if dims is None or any(not d.HasField("dim_value") for d in dims[1:]):
            raise _Unrunnable(f"the shape of {info.name!r} is not known before running")
    standalone = helper.make_graph(nodes + list(graph.node), f"{graph.name or 'subgraph'}_alone", inputs, outputs,
                                   initializer=initializers + list(graph.initializer),
                                   value_info=list(graph.value_info))
    standalone.sparse_initializer.extend(graph.sparse_initializer)
    result = helper.make_model(standalone, opset_imports=list(model.opset_import), ir_version=model.ir_version)
    result.functions.extend(model.functions)
    return result


def _with_input_shapes(model, shapes: Mapping[str, list[int]]):
    """A copy of ``model`` whose graph inputs have the shapes verification used."""
    import onnx

    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    for info in copy.graph.input:
        if info.name in shapes and info.type.HasField("tensor_type"):
            shape = info.type.tensor_type.shape
            shape.ClearField("dim")
            for d in shapes[info.name]:
                shape.dim.add().dim_value = d
    return copy


def verify_subgraphs(original: Path, rewritten: Path, rewrites, verification: Verification, *,
                     seed: int, scratch: Path) -> None:
    """Mark each rewrite ``exercised``; run every subgraph that holds one as its own model,
    original against rewritten, adding its outputs (named ``owner.attribute:output``) to
    ``verification``'s table and its verdict to ``verification.passed``."""
    import onnx

    in_subgraphs = [r for r in rewrites if r.graph]
    for r in rewrites:
        if not r.graph:
            r.exercised, r.exercised_by = True, "model run"
    if not in_subgraphs:
        return
    before = onnx.load(str(original))
    after = onnx.load(str(rewritten))
    pair = _SubgraphPair(before, after, _subgraph_index(before.graph), _subgraph_index(after.graph))
    paths_of = _subgraph_paths(in_subgraphs, pair)
    if not paths_of:
        return
    pair.type_with(verification.inputs)
    outcome: dict[tuple, str] = {}  # path → "" when it ran, else why not
    for n, path in enumerate(sorted({p for paths in paths_of.values() for p in paths})):
        outcome[path] = _run_subgraph(pair, path, [scratch / f"subgraph{n}_{i}.onnx" for i in range(2)],
                                      verification, seed=seed)
    for r in in_subgraphs:
        paths = paths_of.get(id(r))
        if paths is None:
            continue
        missed = [outcome[p] for p in paths if outcome[p]]
        r.exercised = not missed
        r.exercised_by = missed[0] if missed else \
            " and ".join(_path_label(p) for p in paths) + " run as its own model"


@dataclass
class _SubgraphPair:
    """The original and the rewritten model, each with its subgraphs by path and, once
    ``type_with`` ran, those of its shape-inferred copy (what gives a subgraph's inputs types)."""

    before: object
    after: object
    before_index: dict[tuple, object]
    after_index: dict[tuple, object]
    typed_index: dict[tuple, object] = field(default_factory=dict)
    typed_after_index: dict[tuple, object] = field(default_factory=dict)

    def type_with(self, shapes: Mapping[str, list[int]]) -> None:
        import onnx

        try:
            typed = onnx.shape_inference.infer_shapes(_with_input_shapes(self.before, shapes))
            typed_after = onnx.shape_inference.infer_shapes(_with_input_shapes(self.after, shapes))
        except Exception:  # shape inference is a help, not a requirement
            typed, typed_after = self.before, self.after
        self.typed_index, self.typed_after_index = _subgraph_index(typed.graph), _subgraph_index(typed_after.graph)


def _subgraph_paths(in_subgraphs, pair: _SubgraphPair) -> dict[int, list[tuple]]:
    """The subgraphs to run for each rewrite in one (by ``id`` of the rewrite); a rewrite that is
    exercised by the model run, or that no subgraph can run for, is marked here instead."""
    before_nodes, after_nodes = _node_paths(pair.before_index), _node_paths(pair.after_index)
    paths_of = {}
    for r in in_subgraphs:
        if r.graph.startswith("function "):  # a local function runs wherever it is called
            paths = _call_paths(pair.after, pair.after_index, r.graph[len("function "):])
            if () in paths:
                r.exercised, r.exercised_by = True, f"model run (the main graph calls {r.graph})"
                continue
            if not paths:
                r.exercised, r.exercised_by = False, f"no graph of the model calls {r.graph}"
                continue
        else:
            paths = [p for p in _rewrite_paths(r, pair.after_index, after_nodes) if p] or \
                [p for p in _rewrite_paths(r, pair.before_index, before_nodes) if p]
        if paths:
            paths_of[id(r)] = paths
        else:
            r.exercised, r.exercised_by = False, f"its subgraph {r.graph!r} was not found to run on its own"
    return paths_of


def _run_subgraph(pair: _SubgraphPair, path: tuple, files: list[Path], verification: Verification, *,
                  seed: int) -> str:
    """Run the subgraph at ``path`` of both models as models of their own (saved to ``files``)
    and add its outputs and verdict to ``verification``; returns "" when it ran, else why not
    (an odd subgraph is no reason to stop: its rewrites then count as not exercised)."""
    import onnx

    label = _path_label(path)
    try:
        if path not in pair.before_index or path not in pair.after_index:
            raise _Unrunnable("the subgraph is not in both models")
        reads = list(dict.fromkeys(_outer_reads(pair.before_index[path]) + _outer_reads(pair.after_index[path])))
        models = [_standalone(pair.before, pair.before_index, {**pair.typed_after_index, **pair.typed_index},
                              path, reads),
                  _standalone(pair.after, pair.after_index, {**pair.typed_index, **pair.typed_after_index},
                              path, reads)]
        for model, where in zip(models, files):
            onnx.save(model, str(where))
        result = verify_onnx(files[0], files[1], atol=verification.atol, rtol=verification.rtol, seed=seed)
    except (_Unrunnable, VerificationImpossible, BadInput) as exc:
        return f"in {label}, not run on its own: {getattr(exc, 'message', None) or exc}"
    except Exception as exc:  # an odd subgraph is no reason to stop: say it was not exercised
        return f"in {label}, not run on its own: {type(exc).__name__}: {exc}"
    for output in result.outputs:
        output.name = f"{label}:{output.name}"
    verification.outputs.extend(result.outputs)
    if not result.passed:
        verification.passed = False
        if result.note:
            verification.note = "; ".join(x for x in (verification.note, f"{label}: {result.note}") if x)
    return ""


def add_rows(report, rows: list[OutputComparison], prefix: str, feeds, options, note: str) -> None:
    """A converted output's rows (``PREFIX:OUTPUT``, e.g. ``tflite:y``) join the report's
    verification table; a mismatch fails the run (exit 1) with nothing written."""
    rows = [replace(r, name=f"{prefix}:{r.name}") for r in rows]
    passed = all(r.passed for r in rows)
    current = report.verification
    if current is not None and current.ran:
        current.outputs.extend(rows)
        current.passed = bool(current.passed and passed)
        current.note = "; ".join(n for n in (current.note, note) if n)
    else:
        report.verification = current = Verification(
            ran=True, passed=passed, atol=options.atol, rtol=options.rtol, outputs=rows, note=note,
            inputs=feeds.shapes(), defaulted=dict(getattr(feeds, "defaulted", {})))
    if not current.passed:
        failing = [o.name for o in current.outputs if not o.passed]
        raise VerificationFailed(f"verification failed: outputs {', '.join(failing)} differ beyond atol/rtol; "
                                 "nothing was written", current)


# -- signature outputs (the TF-family conversions) ----------------------------------------------


def output_order(keys) -> list[str]:
    """Signature output keys in the model's output order: ``output_0, output_1, …, output_10``
    (what Keras's export writes) by number, other keys as TensorFlow orders them (sorted)."""
    numbered = [re.fullmatch(r"output_(\d+)", k) for k in keys]
    if keys and all(numbered):
        return [m.group(0) for m in sorted(numbered, key=lambda m: int(m.group(1)))]
    return sorted(keys)


def compare_outputs(names: list[str], expected: list[np.ndarray], actual: list[np.ndarray],
                    options) -> list[OutputComparison]:
    """The original's outputs (in its order, named ``names``) against the interpreter's."""
    if len(expected) != len(actual):
        note = f"outputs changed: {len(expected)} -> {len(actual)}"
        raise VerificationFailed(f"verification failed: the .tflite has {len(actual)} outputs, the original "
                                 f"{len(expected)}; nothing was written",
                                 Verification(ran=True, passed=False, atol=options.atol, rtol=options.rtol, note=note))
    return [compare(name, e, a, options.atol, options.rtol) for name, e, a in zip(names, expected, actual)]
