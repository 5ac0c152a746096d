"""--benchmark: time the original and the rewritten model on the runtime of the output format.

The runtime is chosen from a small table, one entry per output format (``RUNTIMES``): each entry
loads a model file for timing with a given number of intra-op threads and says what inputs it
takes. A runtime is one entry (the TFLite interpreter for ``.tflite`` is the latest).

Method, the same as ``benchmarks/run.py``: both models are loaded once, warmed up, then run in
interleaved rounds (A B, B A, A B, … so that drift and a neighbour's load hit both alike) on the
verification inputs (``rewriter.verify.make_inputs``: the same seed, shapes and ``--inputs``).
Reported: the median per model with its spread (half the interquartile range), and ``ratio`` =
``before_ms / after_ms`` taken as the median of the per-round ratios (> 1: the rewritten model is
faster). Timings are wall-clock on whatever else the machine is doing: read the spread.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from rewriter.errors import BadInput, RewriteError
from rewriter.verify import InputSpec, load_inputs_file, make_inputs

# onnxruntime providers used for timing (--benchmark and --auto's per-node measurements).
ONNX_PROVIDERS = ["CPUExecutionProvider"]

WARMUP_SECONDS = 0.3  # at least this long (and 3 runs) per model before timing
BUDGET_SECONDS = 4.0  # timed rounds stop after this long...
MIN_ROUNDS = 10  # ...but not before this many rounds
MAX_ROUNDS = 200


@dataclass
class Loaded:
    """A model ready to be timed: ``run(feeds)`` runs it once; ``threads``: the intra-op thread
    count the runtime reports it uses (None: the runtime's default, not readable)."""

    run: Callable[[Mapping[str, np.ndarray]], Any]
    specs: list[InputSpec]
    threads: int | None


@dataclass(frozen=True)
class Runtime:
    name: str  # as reported: "onnxruntime", "tensorflow", "keras"
    load: Callable[[Path, int | None, Any], Loaded]  # (path, threads, options) -> Loaded


# -- onnxruntime ----------------------------------------------------------------------------------


def ort_session(path: Path | str | bytes, threads: int | None, *, optimized: bool = True):
    """An onnxruntime session as deployed (graph optimisations on) with ``threads`` intra-op threads."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    if threads:
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
    if not optimized:
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    return ort.InferenceSession(path if isinstance(path, bytes) else str(path), options, providers=ONNX_PROVIDERS)


def session_threads(session) -> int | None:
    """The intra-op thread count the session was created with (None: onnxruntime's default)."""
    threads = session.get_session_options().intra_op_num_threads
    return threads or None


def _load_onnx(path: Path, threads: int | None, options) -> Loaded:
    from rewriter.verify import run_session

    session = ort_session(path, threads)
    specs = [InputSpec(i.name, None if i.shape is None else list(i.shape), i.type) for i in session.get_inputs()]
    return Loaded(lambda feeds: run_session(session, feeds, "benchmarked"), specs, session_threads(session))


# -- TensorFlow and Keras -------------------------------------------------------------------------


def set_tensorflow_threads(threads: int | None) -> int | None:
    """Set TensorFlow's intra-op threads; must run before TensorFlow runs anything (afterwards it
    cannot change, and the threads in force are reported instead). Returns the count in force."""
    import tensorflow as tf

    if threads:
        try:
            tf.config.threading.set_intra_op_parallelism_threads(threads)
            tf.config.threading.set_inter_op_parallelism_threads(1)
        except RuntimeError:  # TensorFlow already ran: its thread pools are fixed now
            pass
    return tf.config.threading.get_intra_op_parallelism_threads() or None


def _load_savedmodel(path: Path, threads: int | None, options) -> Loaded:
    import tensorflow as tf

    in_force = set_tensorflow_threads(threads)
    function = tf.saved_model.load(str(path)).signatures[options.signature]
    _, keywords = function.structured_input_signature
    specs = [InputSpec(key, None if spec.shape.rank is None else list(spec.shape), spec.dtype.name)
             for key, spec in sorted(keywords.items())]
    cache: dict[int, dict] = {}

    def run(feeds):
        tensors = cache.setdefault(id(feeds), {k: tf.constant(v) for k, v in feeds.items()})
        return function(**tensors)

    return Loaded(run, specs, in_force)


def _load_keras(path: Path, threads: int | None, options) -> Loaded:
    import warnings

    in_force = set_tensorflow_threads(threads)
    import keras

    model = keras.models.load_model(path, compile=False, safe_mode=not options.trust_lambdas)
    specs = [InputSpec(t.name, list(t.shape), str(t.dtype)) for t in model.inputs]

    def run(feeds):
        arrays = list(feeds.values())
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return model.predict_on_batch(arrays if len(arrays) > 1 else arrays[0])

    return Loaded(run, specs, in_force)


def _load_tflite(path: Path, threads: int | None, options) -> Loaded:
    """A .tflite in the LiteRT interpreter (TensorFlow's where ai-edge-litert is not installed),
    as deployed: the default XNNPACK delegate, ``num_threads=threads``."""
    from passes.tflite import convert

    runner = convert.signature_runner(convert.interpreter(Path(path).read_bytes(), threads), options.signature)
    return Loaded(lambda feeds: runner(**feeds), convert.input_specs(runner), threads)


# The runtime of each output format; for .tflite (--to tflite) "before" is the original model's
# own TFLite conversion, hand-made groups and all (rewriter.api._benchmark).
RUNTIMES: dict[str, Runtime] = {
    "onnx": Runtime("onnxruntime", _load_onnx),
    "savedmodel": Runtime("tensorflow", _load_savedmodel),
    "keras": Runtime("keras", _load_keras),
    "tflite": Runtime("tflite", _load_tflite),
}


# -- timing ---------------------------------------------------------------------------------------


def _spread(values: list[float]) -> float:
    """Half the interquartile range."""
    if len(values) < 2:
        return 0.0
    q = statistics.quantiles(values, n=4, method="inclusive")
    return (q[2] - q[0]) / 2


def _timed(run, feeds) -> float:
    start = time.perf_counter()
    run(feeds)
    return time.perf_counter() - start


def interleaved(run_a, run_b, feeds_a, feeds_b=None, *, budget: float | None = None,
                min_rounds: int | None = None, max_rounds: int | None = None) -> tuple[list[float], list[float]]:
    """Warm both up, then time rounds of one run each, alternating which goes first; seconds."""
    feeds_b = feeds_a if feeds_b is None else feeds_b
    budget = BUDGET_SECONDS if budget is None else budget
    min_rounds = MIN_ROUNDS if min_rounds is None else min_rounds
    max_rounds = MAX_ROUNDS if max_rounds is None else max_rounds
    start = time.perf_counter()
    runs = 0
    while runs < 3 or time.perf_counter() - start < WARMUP_SECONDS:
        run_a(feeds_a)
        run_b(feeds_b)
        runs += 1
    a, b = [], []
    start = time.perf_counter()
    while len(a) < max_rounds and (len(a) < min_rounds or time.perf_counter() - start < budget):
        if len(a) % 2 == 0:
            a.append(_timed(run_a, feeds_a))
            b.append(_timed(run_b, feeds_b))
        else:
            b.append(_timed(run_b, feeds_b))
            a.append(_timed(run_a, feeds_a))
    return a, b


def output_format(input_format: str, to: str | None) -> str:
    return to or ("keras" if input_format == "keras" else input_format)


def benchmark(before: Path, after: Path, fmt: str, options, *, input_format: str | None = None) -> dict[str, Any]:
    """Time ``before`` (the original) against ``after`` (the rewritten model, format ``fmt``)
    on ``fmt``'s runtime: {runtime, threads, runs, before_ms, after_ms, ratio, ...}."""
    runtime = RUNTIMES.get(fmt)
    if runtime is None:
        raise BadInput(f"--benchmark: no runtime to time {fmt} models with (known: {', '.join(RUNTIMES)})")
    result: dict[str, Any] = {"runtime": runtime.name, "threads": options.threads, "runs": 0,
                              "before_ms": None, "after_ms": None, "ratio": None}
    if input_format is not None and input_format != fmt:
        result["note"] = (f"the original is a {input_format} model and the output {fmt}: no one runtime runs "
                          "both, so nothing was timed")
        return result
    try:
        original = runtime.load(before, options.threads, options)
        rewritten = runtime.load(after, options.threads, options)
        given = options.inputs
        if given is not None and not isinstance(given, Mapping):
            given = load_inputs_file(Path(given))
        feeds = make_inputs(original.specs, shapes=options.shapes, seed=options.seed, given=given)
        a, b = interleaved(original.run, rewritten.run, feeds)
    except RewriteError:
        raise
    except Exception as exc:
        detail = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else type(exc).__name__
        raise BadInput(f"--benchmark: {runtime.name} cannot run the models ({detail})") from exc
    ratios = [x / y for x, y in zip(a, b) if y > 0]
    result.update(
        threads=rewritten.threads if rewritten.threads is not None else options.threads,
        runs=len(a),
        before_ms=round(statistics.median(a) * 1e3, 4), after_ms=round(statistics.median(b) * 1e3, 4),
        ratio=round(statistics.median(ratios), 4) if ratios else None,
        before_spread_ms=round(_spread(a) * 1e3, 4), after_spread_ms=round(_spread(b) * 1e3, 4),
        ratio_spread=round(_spread(ratios), 4))
    return result

