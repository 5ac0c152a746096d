"""--benchmark: time the original and the rewritten model on the runtime of the output format.

The runtime is chosen from a small table, one entry per output format (``RUNTIMES``): each entry
loads a model file for timing with a given number of intra-op threads and says what inputs it
takes. A runtime is one entry (the TFLite interpreter for ``.tflite`` is the latest).

Method (issue 20): two sessions of one and the same model differ by up to 15 % in median latency
on a shared machine, so one session per model would let a session's own bias decide the verdict.
Each model is therefore loaded ``SESSIONS`` times afresh (a new onnxruntime ``InferenceSession``, a
new ``tf.saved_model.load`` / ``keras.models.load_model``, a new TFLite interpreter), one *pair* at
a time — A1 B1, then B2 A2, then A3 B3, … (who is created first alternates) — and each pair is
warmed up and timed in interleaved rounds (A B, B A, A B, … so that drift and a neighbour's load hit both
alike) on the verification inputs (``gconv_rewrite.verify.make_inputs``: the same seed, shapes and
``--inputs``). TensorFlow's thread pools are per process: a fresh TF/Keras load is a fresh function
and fresh weights, not fresh threads.

Reported: the median per model over all rounds with its spread (half the interquartile range);
per pair the median of its per-round ratios ``before / after`` (``pair_ratios``); ``ratio``, their
geometric mean; ``ratio_ci``, the 95 % Student-t interval of that mean over the pairs (computed on
the logarithms, ``ratio_interval``); and ``verdict``: "faster" or "slower" only when the whole
interval is on one side of 1, else "no measurable difference". Timings are wall-clock on whatever
else the machine is doing.
"""

from __future__ import annotations

import importlib
import math
import statistics
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from gconv_rewrite import formats
from gconv_rewrite.errors import BadInput, RewriteError
from gconv_rewrite.verify import InputSpec, load_inputs_file, make_inputs

# onnxruntime providers used for timing (--benchmark and --auto's per-node measurements).
ONNX_PROVIDERS = ["CPUExecutionProvider"]

WARMUP_SECONDS = 0.3  # at least this long (and 3 runs) per session before timing
BUDGET_SECONDS = 4.0  # timed rounds stop after this long, all session pairs together...
MIN_ROUNDS = 10  # ...but not before this many rounds (all pairs together; at least 3 per pair)
MAX_ROUNDS = 200
# Fresh sessions per model: the interval of the ratio is taken across these pairs. A fixed count:
# adding pairs while undecided would look at the interval again and again, and in a simulation of
# equal models (±15 % per-session bias) doubled the false verdicts (5.8 % with 3 fixed, 11 % with
# 3 growing to 5); 5 pairs give t(4) = 2.78 instead of t(2) = 4.30, an interval about half as wide.
SESSIONS = 5

FASTER, SLOWER, NO_DIFFERENCE = "faster", "slower", "no measurable difference"
INTERVAL_METHOD = "95% Student-t interval of the geometric mean of the per-session-pair ratios"

# The clock every timing reads; tests replace it with a simulated one (no test asserts real timings).
clock = time.perf_counter

# Two-sided 95 % t quantiles by degrees of freedom (1..30); 1.96 beyond.
_T95 = [12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160, 2.145,
        2.131, 2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048,
        2.045, 2.042]


def t95(df: int) -> float:
    """The two-sided 95 % quantile of Student's t with ``df`` degrees of freedom."""
    return _T95[df - 1] if 1 <= df <= len(_T95) else 1.96


def ratio_interval(ratios: list[float]) -> tuple[float, float, float]:
    """(geometric mean, low, high): the 95 % t interval of the mean of ``log(ratios)``, mapped back.

    Ratios multiply, so their logarithms are averaged; one ratio per session pair, so the width
    is the spread *between sessions* — what a single session cannot show. One ratio gives no
    interval: (r, 0, inf), which no verdict can be drawn from."""
    logs = [math.log(r) for r in ratios if r > 0]
    if not logs:
        return math.nan, 0.0, math.inf
    mean = statistics.fmean(logs)
    if len(logs) < 2:
        return math.exp(mean), 0.0, math.inf
    half = t95(len(logs) - 1) * statistics.stdev(logs) / math.sqrt(len(logs))
    return math.exp(mean), math.exp(mean - half), math.exp(mean + half)


def verdict(low: float, high: float) -> str:
    """before/after interval -> "faster" (the rewritten model) / "slower" / "no measurable difference"."""
    if low > 1:
        return FASTER
    if high < 1:
        return SLOWER
    return NO_DIFFERENCE


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
    from gconv_rewrite.verify import run_session

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
    from gconv_rewrite.passes.tflite import convert

    runner = convert.signature_runner(convert.interpreter(Path(path).read_bytes(), threads), options.signature)
    return Loaded(lambda feeds: runner(**feeds), convert.input_specs(runner), threads)


def _loader(spec: str) -> Callable[[Path, int | None, Any], Loaded]:
    """A format row's ``runtime_loader`` ("module:function"), imported when first called: the
    table names loaders of other packages, which an ONNX run must not import."""
    module, name = spec.split(":")

    def load(path: Path, threads: int | None, options) -> Loaded:
        return getattr(importlib.import_module(module), name)(path, threads, options)

    return load


# The runtime of each output format, from the format table; for .tflite (--to tflite) "before" is
# the original model's own TFLite conversion, hand-made groups and all (gconv_rewrite.api._benchmark).
RUNTIMES: dict[str, Runtime] = {fmt.name: Runtime(fmt.runtime, _loader(fmt.runtime_loader))
                                for fmt in formats.FORMATS}


# -- timing ---------------------------------------------------------------------------------------


def _spread(values: list[float]) -> float:
    """Half the interquartile range."""
    if len(values) < 2:
        return 0.0
    q = statistics.quantiles(values, n=4, method="inclusive")
    return (q[2] - q[0]) / 2


def _timed(run, feeds) -> float:
    start = clock()
    run(feeds)
    return clock() - start


def interleaved(run_a, run_b, feeds_a, feeds_b=None, *, budget: float | None = None,
                min_rounds: int | None = None, max_rounds: int | None = None) -> tuple[list[float], list[float]]:
    """Warm both up, then time rounds of one run each, alternating which goes first; seconds."""
    feeds_b = feeds_a if feeds_b is None else feeds_b
    budget = BUDGET_SECONDS if budget is None else budget
    min_rounds = MIN_ROUNDS if min_rounds is None else min_rounds
    max_rounds = MAX_ROUNDS if max_rounds is None else max_rounds
    start = clock()
    runs = 0
    while runs < 3 or clock() - start < WARMUP_SECONDS:
        run_a(feeds_a)
        run_b(feeds_b)
        runs += 1
    a, b = [], []
    start = clock()
    while len(a) < max_rounds and (len(a) < min_rounds or clock() - start < budget):
        if len(a) % 2 == 0:
            a.append(_timed(run_a, feeds_a))
            b.append(_timed(run_b, feeds_b))
        else:
            b.append(_timed(run_b, feeds_b))
            a.append(_timed(run_a, feeds_a))
    return a, b


def output_format(input_format: str, to: str | None) -> str:
    return to or ("keras" if input_format == "keras" else input_format)


def _round_ratios(times_before: list[float], times_after: list[float]) -> list[float]:
    """before / after of each timed round."""
    return [x / y for x, y in zip(times_before, times_after) if y > 0]


def _pair_ratios(pairs: list[tuple]) -> list[float]:
    """One before / after ratio per session pair: the median of its rounds' ratios."""
    return [statistics.median(ratios) for ratios in (_round_ratios(a, b) for a, b in pairs) if ratios]


def _timed_session_pairs(runtime: Runtime, before: Path, after: Path, options) -> tuple[list[tuple], int | None]:
    """``SESSIONS`` fresh pairs (original, rewritten), one pair alive at a time, each warmed up and
    timed interleaved: [(before seconds, after seconds), ...] per pair, and the threads in force."""
    given = options.inputs
    if given is not None and not isinstance(given, Mapping):
        given = load_inputs_file(Path(given))
    rounds = max(3, math.ceil(MIN_ROUNDS / SESSIONS))
    pairs, feeds, threads = [], None, options.threads
    for index in range(SESSIONS):
        # Who is created first alternates: creation order must not favour one model either.
        if index % 2 == 0:
            original = runtime.load(before, options.threads, options)
            rewritten = runtime.load(after, options.threads, options)
        else:
            rewritten = runtime.load(after, options.threads, options)
            original = runtime.load(before, options.threads, options)
        if feeds is None:
            feeds = make_inputs(original.specs, shapes=options.shapes, seed=options.seed, given=given)
        pairs.append(interleaved(original.run, rewritten.run, feeds, budget=BUDGET_SECONDS / SESSIONS,
                                 min_rounds=rounds, max_rounds=max(rounds, MAX_ROUNDS // SESSIONS)))
        threads = rewritten.threads if rewritten.threads is not None else options.threads
        del original, rewritten  # one pair in memory at a time
    return pairs, threads


def benchmark(before: Path, after: Path, fmt: str, options, *, input_format: str | None = None) -> dict[str, Any]:
    """Time ``before`` (the original) against ``after`` (the rewritten model, format ``fmt``)
    on ``fmt``'s runtime in ``SESSIONS`` fresh session pairs: {runtime, threads, sessions, runs,
    before_ms, after_ms, ratio, ratio_ci, verdict, ...} (the module docstring says how)."""
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
        pairs, threads = _timed_session_pairs(runtime, before, after, options)
    except RewriteError:
        raise
    except Exception as exc:
        detail = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else type(exc).__name__
        raise BadInput(f"--benchmark: {runtime.name} cannot run the models ({detail})") from exc
    a = [t for times_a, _ in pairs for t in times_a]
    b = [t for _, times_b in pairs for t in times_b]
    pair_ratios = _pair_ratios(pairs)
    ratio, low, high = ratio_interval(pair_ratios)
    result.update(
        threads=threads, sessions=len(pairs), runs=len(a),
        before_ms=round(statistics.median(a) * 1e3, 4), after_ms=round(statistics.median(b) * 1e3, 4),
        ratio=round(ratio, 4) if pair_ratios else None,
        ratio_ci=[round(low, 4), round(high, 4)] if len(pair_ratios) > 1 else None,
        pair_ratios=[round(r, 4) for r in pair_ratios],
        verdict=verdict(low, high), interval=INTERVAL_METHOD,
        before_spread_ms=round(_spread(a) * 1e3, 4), after_spread_ms=round(_spread(b) * 1e3, 4),
        ratio_spread=round(_spread([r for times in pairs for r in _round_ratios(*times)]), 4))
    return result
