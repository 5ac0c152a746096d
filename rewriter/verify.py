"""Proof by execution: run the original and the rewritten model on the same inputs and compare.

As Polygraphy and onnxsim do: onnxruntime with its graph optimisations off (its own fusions
must not hide a difference), seeded inputs, every output compared; an element fails only when it
exceeds both atol and rtol; NaN/Inf, dtype and shape changes are failures.
"""

from __future__ import annotations

from pathlib import Path
from typing import Mapping

import numpy as np

from rewriter.errors import BadInput, VerificationImpossible
from rewriter.report import OutputComparison, Verification

_ORT_TYPES = {
    "tensor(float)": np.float32, "tensor(double)": np.float64, "tensor(float16)": np.float16,
    "tensor(int8)": np.int8, "tensor(int16)": np.int16, "tensor(int32)": np.int32, "tensor(int64)": np.int64,
    "tensor(uint8)": np.uint8, "tensor(uint16)": np.uint16, "tensor(uint32)": np.uint32,
    "tensor(uint64)": np.uint64, "tensor(bool)": np.bool_,
}


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


def _session(path: Path, role: str):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    options.log_severity_level = 3
    try:
        return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    except Exception as exc:
        detail = str(exc).strip().splitlines()[0][:240] if str(exc).strip() else type(exc).__name__
        raise VerificationImpossible(
            f"onnxruntime cannot run the {role} model, so verification is impossible ({detail}); "
            "pass --no-verify to write it without proof") from exc


def make_inputs(session, *, shapes: Mapping[str, list[int]], seed: int,
                given: Mapping[str, np.ndarray] | None) -> dict[str, np.ndarray]:
    """Seeded random inputs per input dtype, or the user's arrays."""
    specs = session.get_inputs()
    if given is not None:
        names = {s.name for s in specs}
        missing = sorted(names - set(given))
        unknown = sorted(set(given) - names)
        if missing or unknown:
            raise BadInput("--inputs: " + "; ".join(
                ([f"missing {', '.join(missing)}"] if missing else [])
                + ([f"no model input named {', '.join(unknown)}"] if unknown else [])))
        return {s.name: given[s.name] for s in specs}
    # --shape names of other models' inputs are fine (one flag set for a folder of models); a
    # typo shows up as the dynamic input it failed to fill, with the names this model has.
    unknown_shapes = sorted(set(shapes) - {s.name for s in specs})
    rng = np.random.default_rng(seed)
    feeds = {}
    for spec in specs:
        if spec.name in shapes:
            shape = shapes[spec.name]
            if len(shape) != len(spec.shape):
                raise BadInput(f"--shape {spec.name}: {len(shape)} dims given, the input has {len(spec.shape)}")
        else:
            dynamic = [str(d) if d else f"dim {i}" for i, d in enumerate(spec.shape) if not isinstance(d, int)]
            if dynamic:
                example = ",".join(str(d) if isinstance(d, int) else "N" for d in spec.shape)
                hint = (f" (--shape named {', '.join(unknown_shapes)}, but the model's inputs are "
                        f"{', '.join(s.name for s in specs)})" if unknown_shapes else "")
                raise VerificationImpossible(
                    f"input {spec.name!r} has dynamic dims ({', '.join(dynamic)}): set them with "
                    f"--shape {spec.name}={example}{hint}")
            shape = list(spec.shape)
        dtype = _ORT_TYPES.get(spec.type)
        if dtype is None:
            raise VerificationImpossible(f"input {spec.name!r} has type {spec.type}, which verification "
                                         "cannot generate; pass --inputs FILE.npz")
        if np.issubdtype(dtype, np.floating):
            feeds[spec.name] = rng.standard_normal(shape).astype(dtype)
        elif dtype is np.bool_:
            feeds[spec.name] = rng.random(shape) < 0.5
        else:
            feeds[spec.name] = rng.integers(0, 8, size=shape).astype(dtype)
    return feeds


def compare(name: str, expected: np.ndarray, actual: np.ndarray, atol: float, rtol: float) -> OutputComparison:
    expected, actual = np.asarray(expected), np.asarray(actual)
    base = dict(name=name, shape=list(expected.shape), dtype=str(expected.dtype))
    if expected.shape != actual.shape or expected.dtype != actual.dtype:
        return OutputComparison(**base, max_abs_error=float("inf"), max_rel_error=float("inf"),
                                mean_abs_error=float("inf"), passed=False,
                                note=f"changed to {actual.dtype}{list(actual.shape)}")
    if expected.size == 0:
        return OutputComparison(**base, max_abs_error=0.0, max_rel_error=0.0, mean_abs_error=0.0, passed=True)
    if expected.dtype.kind not in "fc":
        diff = expected != actual
        errors = np.abs(expected.astype(np.float64) - actual.astype(np.float64))
        return OutputComparison(**base, max_abs_error=float(errors.max()), max_rel_error=float(diff.any()),
                                mean_abs_error=float(errors.mean()), passed=not diff.any())
    e, a = expected.astype(np.float64), actual.astype(np.float64)
    nan_mismatch = np.isnan(e) != np.isnan(a)
    inf_mismatch = np.isinf(e) != np.isinf(a)
    with np.errstate(invalid="ignore", over="ignore"):
        diff = np.abs(e - a)
        diff[np.isnan(e) & np.isnan(a)] = 0.0
        diff[np.isinf(e) & (e == a)] = 0.0
        rel = diff / np.maximum(np.abs(e), np.finfo(np.float64).tiny)
        failing = (diff > atol) & (rel > rtol)
    failing |= nan_mismatch | inf_mismatch
    finite = np.isfinite(diff)
    note = "NaN/Inf where the original has none" if (nan_mismatch | inf_mismatch).any() else ""
    return OutputComparison(
        **base,
        max_abs_error=float(diff[finite].max()) if finite.any() else float("inf"),
        max_rel_error=float(rel[finite].max()) if finite.any() else float("inf"),
        mean_abs_error=float(diff[finite].mean()) if finite.any() else float("inf"),
        passed=not failing.any(), note=note)


def verify_onnx(original: Path, rewritten: Path, *, atol: float = 1e-4, rtol: float = 1e-3, seed: int = 0,
                shapes: Mapping[str, list[int]] | None = None,
                inputs: Mapping[str, np.ndarray] | None = None) -> Verification:
    """Run both files in onnxruntime on the same inputs; compare every output."""
    reference = _session(original, "original")
    feeds = make_inputs(reference, shapes=shapes or {}, seed=seed, given=inputs)
    expected = reference.run(None, feeds)
    output_names = [o.name for o in reference.get_outputs()]
    del reference  # free its memory before the second session
    try:
        candidate = _session(rewritten, "rewritten")
    except VerificationImpossible as exc:
        return Verification(ran=True, passed=False, atol=atol, rtol=rtol, note=exc.message)
    new_names = [o.name for o in candidate.get_outputs()]
    if new_names != output_names:
        return Verification(ran=True, passed=False, atol=atol, rtol=rtol,
                            note=f"outputs changed: {output_names} -> {new_names}")
    actual = candidate.run(None, feeds)
    outputs = [compare(n, e, a, atol, rtol) for n, e, a in zip(output_names, expected, actual)]
    return Verification(ran=True, passed=all(o.passed for o in outputs), atol=atol, rtol=rtol, outputs=outputs,
                        inputs={k: list(v.shape) for k, v in feeds.items()})
