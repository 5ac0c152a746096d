"""--auto: a measured target. Each grouped conv gets the form that runs faster *here*.

For every hand-made group (each grouped layer it would fuse into) and every native grouped
convolution of an ONNX model, both forms are built as isolated one-layer models with the node's
real shapes — ``x → Conv(group=N)`` and the ``Split → N Conv → Concat`` that ``--expand`` writes
for it — and timed on onnxruntime with the providers and threads of ``--benchmark``:

1. **discover**: on a copy of the model, fuse every candidate (an ``accept`` hook that records
   each grouped layer it is asked about), then list the native grouped convs the expand pass
   would be asked about; run that copy once on the verification inputs with each of those convs'
   inputs as an extra output, which gives every conv its real input shape;
2. **measure**: each form in ``SESSIONS`` fresh onnxruntime sessions, one pair at a time
   (native 1, split 1, then split 2, native 2, …: who is created first alternates; fewer pairs,
   but ``MIN_SESSIONS``, only for a conv so slow that ``NODE_SECONDS`` have passed); in each pair
   ``BATCHES_PER_SESSION`` interleaved batches (A B A B …, a few runs each; per batch the fastest
   run of each form), whose mean log ratio is that pair's split/native. Two sessions of one model
   differ by up to 15 % (issue 20), so the verdict is drawn once, across pairs: from the 95 %
   Student-t interval of the geometric mean of the pair ratios (``benchmark.ratio_interval``);
   convs with equal shapes and attributes are measured once;
3. **apply**: the ordinary ``--target`` run, with a target whose rule answers from those
   measurements (``MeasuredTarget.decide``): native when the native form is clearly faster or
   on a tie, split only when the split form was faster in every session pair and the whole
   interval is at least ``MIN_GAIN`` below 1. The whole
   model is then verified as always; ``--auto`` refuses to run without verification.

The report's ``target`` section carries, per node, both timings and the verdict.
"""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnx_ir as ir

from gconv_rewrite import benchmark, formats
from gconv_rewrite.errors import VerificationImpossible
from gconv_rewrite.targets import NATIVE, SPLIT, ConvProps, Decision
from gconv_rewrite.verify import InputSpec, make_inputs, run_session

NAME = "auto"
BATCH_SECONDS = 0.02  # one batch runs each form about this long
SESSIONS = benchmark.SESSIONS  # fresh session pairs per distinct conv (a fixed count: see benchmark.SESSIONS)
MIN_SESSIONS = 3  # a conv slower than NODE_SECONDS in all stops after this many pairs
BATCHES_PER_SESSION = 3
MIN_BATCHES = MIN_SESSIONS * BATCHES_PER_SESSION  # the fewest batches a measured conv has
NODE_SECONDS = 3.0  # per distinct conv: past this, no pair is added beyond MIN_SESSIONS
MIN_GAIN = 0.02  # the split form must be at least 2 % faster to be chosen over the native one


@dataclass
class Measurement:
    """One grouped conv layer: the form it should take here, and why."""

    kind: str  # "fuse": a layer of a hand-made group; "expand": a native grouped conv
    location: str
    props: ConvProps
    candidate: int = 0  # fuse: which candidate (a candidate may have several grouped layers)
    input_shape: list[int] | None = None
    native_ms: float | None = None
    split_ms: float | None = None
    ratio: float | None = None  # split / native (> 1: native faster): geometric mean over session pairs
    ci95: tuple[float, float] | None = None  # its 95 % t interval across the session pairs
    batches: int = 0
    runs: int = 0  # per form
    sessions: int = 0  # fresh session pairs
    pair_ratios: list[float] = field(default_factory=list)  # split / native per session pair
    verdict: str = "not measured"  # native | split | tie | not measured
    note: str = ""
    same_as: str = ""  # measured once for an earlier node with the same shapes
    key: tuple | None = field(default=None, repr=False)
    dtype: Any = field(default=None, repr=False)

    @property
    def form(self) -> str:
        return SPLIT if self.verdict == SPLIT else NATIVE

    def rule(self, runtime: str) -> str:
        if self.verdict == "not measured":
            return f"not measured ({self.note}): the native form is kept"
        lo, hi = self.ci95
        pairs = f" over {self.sessions} session pairs" if self.sessions else ""
        timing = (f"measured on {runtime}: native {self.native_ms:.3f} ms, split {self.split_ms:.3f} ms "
                  f"(split/native {self.ratio:.3f}, 95% CI {lo:.3f}-{hi:.3f}{pairs}, {self.batches} batches "
                  f"x {self.runs // max(self.batches, 1)} runs" + (f", same shapes as {self.same_as}" if self.same_as
                                                                   else "") + ")")
        if self.verdict == NATIVE:
            return f"{timing}: native is faster"
        if self.verdict == SPLIT:
            return f"{timing}: split is faster"
        return f"{timing}: a tie ({self.note}), the native form is kept"

    def to_dict(self) -> dict[str, Any]:
        return {"location": self.location, "input_shape": self.input_shape, "native_ms": self.native_ms,
                "split_ms": self.split_ms, "ratio": self.ratio, "ci95": list(self.ci95) if self.ci95 else None,
                "batches": self.batches, "runs": self.runs, "sessions": self.sessions,
                "pair_ratios": self.pair_ratios, "verdict": self.verdict,
                **({"note": self.note} if self.note else {}), **({"same_as": self.same_as} if self.same_as else {})}


class MeasuredTarget:
    """A target whose rule is the measurements: ``decide(props)`` answers, in the order the fuse
    and expand passes ask, with the next measurement of equal properties."""

    name = NAME

    def __init__(self, measurements: list[Measurement], runtime: str, threads: int | None):
        self.measurements = measurements
        self.runtime = runtime
        self.threads = threads
        self._cursor = 0
        self._served: list[Measurement] = []

    def decide(self, props: ConvProps) -> tuple[str, str]:
        for i in range(self._cursor, len(self.measurements)):
            if self.measurements[i].props == props:
                self._cursor = i + 1
                chosen = self.measurements[i]
                break
        else:  # asked about a conv discovery did not see (the graph changed in between)
            chosen = Measurement("expand", "", props, candidate=-1 - len(self._served),
                                 note="not seen while measuring")
        self._served.append(chosen)
        return chosen.form, chosen.rule(self.runtime)

    def annotate(self, nodes: list[Decision]) -> None:
        """Add the timings to the report's target entries one pass just judged (in order)."""
        served, self._served = self._served, []
        position = 0
        for node in nodes:
            if position >= len(served):
                break
            first = served[position]
            group = [first]
            position += 1
            if first.kind == "fuse":  # every grouped layer of one candidate was asked in a row
                while position < len(served) and served[position].kind == "fuse" and \
                        served[position].candidate == first.candidate:
                    group.append(served[position])
                    position += 1
            known = [m for m in group if m.native_ms is not None]
            node.native_ms = round(sum(m.native_ms for m in known), 4) if known else None
            node.split_ms = round(sum(m.split_ms for m in known), 4) if known else None
            node.verdict = SPLIT if any(m.verdict == SPLIT for m in group) else \
                ("tie" if all(m.verdict in ("tie", "not measured") for m in group) else NATIVE)
            node.measurements = [m.to_dict() for m in group]


# -- discovery --------------------------------------------------------------------------------


def _location(node: ir.Node) -> str:
    return node.name or node.outputs[0].name or node.op_type


def _discover(path: Path, options) -> tuple[ir.Model, list[tuple[Measurement, ir.Node | None]]]:
    from gconv_rewrite.passes.onnx import ExpandGroupedConvPass, FuseSplitConvPass

    model = formats.load_onnx(path)
    found: list[tuple[Measurement, ir.Node | None]] = []
    asked: list[tuple[int, ConvProps]] = []

    def record_fuse(props: ConvProps) -> tuple[bool, str]:
        asked.append((len(fuse.decisions), props))
        return True, "measuring"

    fuse = FuseSplitConvPass(rewrite=True, accept=record_fuse)
    fuse(model)
    grouped = [c for c in fuse.created if c.attributes.get("group") is not None and c.attributes["group"].as_int() > 1]
    for i, (candidate, props) in enumerate(asked):
        node = grouped[i] if i < len(grouped) and grouped[i].attributes["group"].as_int() == props.groups else None
        found.append((Measurement("fuse", _location(node) if node is not None else "?", props, candidate), node))

    native: list[ConvProps] = []

    def record_expand(props: ConvProps) -> tuple[bool, str]:
        native.append(props)
        return False, "measuring"

    expand = ExpandGroupedConvPass(rewrite=False, keep_depthwise=options.keep_depthwise,
                                   min_groups=options.min_groups, max_groups=options.max_groups,
                                   accept=record_expand, exclude=fuse.created)
    expand(model)
    by_location = {}
    for node in model.graph:
        if node.op_type in ("Conv", "ConvTranspose"):
            by_location.setdefault(_location(node), node)
    for decision, props in zip(expand.decisions, native):
        node = by_location.get(decision.location) if not decision.graph else None
        found.append((Measurement("expand", decision.location, props), node))
    return model, found


def _input_shapes(model: ir.Model, found, options, given_inputs, scratch: Path) -> None:
    """Run the (fused) copy once with each measured conv's input as an extra output."""
    wanted = {}
    for measurement, node in found:
        if node is None:
            measurement.note = "inside a subgraph or function" if measurement.location != "?" else \
                "its fused node was not found"
            continue
        if node.graph is not model.graph:
            measurement.note = "inside a subgraph or function"
            continue
        wanted[id(node.inputs[0])] = node.inputs[0]
    outputs = {id(v) for v in model.graph.outputs}
    for measurement, node in found:
        value = node.inputs[0] if node is not None and not measurement.note else None
        if value is not None and id(value) not in outputs:
            if value.type is None:  # a value the fusion made: a conv's input has its weight's type
                weight = node.inputs[1].const_value if len(node.inputs) > 1 and node.inputs[1] is not None else None
                value.type = ir.TensorType(weight.dtype if weight is not None else ir.DataType.FLOAT)
            model.graph.outputs.append(value)
            outputs.add(id(value))
    if not wanted:
        return
    path = scratch / "shapes.onnx"
    formats.save_onnx(model, path)
    try:
        session = benchmark.ort_session(path, None, optimized=False)
    except Exception as exc:
        detail = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else type(exc).__name__
        raise VerificationImpossible(f"--auto: onnxruntime cannot run the model to learn its convs' input shapes "
                                     f"({detail})") from exc
    feeds = make_inputs(session, shapes=options.shapes, seed=options.seed, given=given_inputs)
    arrays = dict(zip([o.name for o in session.get_outputs()], run_session(session, feeds, "original")))
    del session
    for measurement, node in found:
        if node is not None and not measurement.note:
            array = arrays.get(node.inputs[0].name)
            if array is None:
                measurement.note = "its input shape is unknown"
            else:
                measurement.input_shape = list(array.shape)
                measurement.key = (_signature(node), tuple(array.shape), str(array.dtype))
                measurement.dtype = array.dtype


# -- one-layer models -------------------------------------------------------------------------


def _signature(node: ir.Node) -> tuple:
    from gconv_rewrite.passes.onnx import _graph as g

    weight = g.const_shape(node.inputs[1]) if len(node.inputs) > 1 else None
    if weight is None and len(node.inputs) > 1 and node.inputs[1] is not None and node.inputs[1].shape is not None:
        weight = tuple(node.inputs[1].shape.dims)
    bias = len(node.inputs) > 2 and node.inputs[2] is not None
    attributes = tuple(sorted((k, repr(a.value)) for k, a in node.attributes.items()))
    return node.op_type, tuple(weight) if weight is not None else None, bias, attributes


def _layer_models(node: ir.Node, shape: list[int], dtype: np.dtype, opset: int, scratch: Path,
                  tag: str) -> tuple[Path, Path]:
    """Write ``x → Conv(group=N)`` and its expansion (``--expand``'s own output) for one node."""
    from gconv_rewrite.passes.onnx import ExpandGroupedConvPass

    op_type, weight_shape, has_bias, _ = _signature(node)
    if weight_shape is None or any(not isinstance(d, int) for d in weight_shape):
        raise ValueError("its weight shape is unknown")
    rng = np.random.default_rng(0)
    elem = ir.DataType.from_numpy(np.dtype(dtype))
    x = ir.Value(name="x", type=ir.TensorType(elem), shape=ir.Shape(shape))
    weight = ir.Value(name="w", const_value=ir.tensor((rng.standard_normal(weight_shape) * 0.1).astype(dtype),
                                                      name="w"))
    inputs = [x, weight]
    initializers = [weight]
    if has_bias:
        channels = weight_shape[1] * node.attributes["group"].as_int() if op_type == "ConvTranspose" else \
            weight_shape[0]
        bias = ir.Value(name="b", const_value=ir.tensor(np.zeros(channels, dtype), name="b"))
        inputs.append(bias)
        initializers.append(bias)
    attributes = [ir.Attr(a.name, a.type, a.value) for a in node.attributes.values()]
    conv = ir.Node("", op_type, inputs, attributes, name="conv")
    conv.outputs[0].name = "y"
    conv.outputs[0].type = ir.TensorType(elem)
    graph = ir.Graph([x], [conv.outputs[0]], nodes=[conv], initializers=initializers, name="layer",
                     opset_imports={"": opset})
    native = scratch / f"{tag}.native.onnx"
    split = scratch / f"{tag}.split.onnx"
    ir.save(ir.Model(graph, ir_version=8 if opset <= 17 else 9), native)
    expanded = ir.load(native)
    ExpandGroupedConvPass(rewrite=True)(expanded)
    ir.save(expanded, split)
    return native, split


def _open_session(path: Path, threads: int | None):
    """A fresh onnxruntime session of ``path`` as ``--benchmark`` times it: ``run(feeds)``."""
    session = benchmark.ort_session(path, threads)
    return lambda feeds: session.run(None, feeds)


def _time_one_pair(native: Path, split: Path, feeds, options, index: int) -> tuple[list[float], list[float], int]:
    """One fresh session of each form, warmed up, then ``BATCHES_PER_SESSION`` interleaved batches:
    the fastest run of each form per batch (seconds), and the runs per batch."""
    if index % 2 == 0:  # who is created first alternates from pair to pair
        run_a = _open_session(native, options.threads)
        run_b = _open_session(split, options.threads)
    else:
        run_b = _open_session(split, options.threads)
        run_a = _open_session(native, options.threads)
    for _ in range(2):  # warm-up
        run_a(feeds)
        run_b(feeds)
    # Runs per batch from the fastest of a few probes (one slow run must not make batches of one).
    probe = max(min(benchmark._timed(run_a, feeds) for _ in range(3)),
                min(benchmark._timed(run_b, feeds) for _ in range(3)))
    per_batch = max(1, min(50, int(BATCH_SECONDS / max(probe, 1e-6))))
    fastest_a, fastest_b = [], []
    for _ in range(BATCHES_PER_SESSION):
        batch_a, batch_b = [], []
        for i in range(per_batch):
            first, second = (run_a, run_b) if i % 2 == 0 else (run_b, run_a)
            t_first, t_second = benchmark._timed(first, feeds), benchmark._timed(second, feeds)
            batch_a.append(t_first if first is run_a else t_second)
            batch_b.append(t_second if first is run_a else t_first)
        # The fastest run of each form per batch: other processes only ever add time, and they
        # hit a whole batch of one form less often than single runs.
        fastest_a.append(min(batch_a))
        fastest_b.append(min(batch_b))
    return fastest_a, fastest_b, per_batch


def _judge(pair_ratios: list[float], lo: float, hi: float) -> tuple[str, str]:
    """The verdict (and the reason of a tie) from the split/native ratios of the session pairs
    and their 95 % interval ``lo``-``hi``. Native is the default: split only when it was faster in
    every pair and the whole interval is at least ``MIN_GAIN`` below 1."""
    if lo > 1:
        return NATIVE, ""
    if hi < 1 - MIN_GAIN and all(r < 1 for r in pair_ratios):
        return SPLIT, ""
    if lo >= 1 - MIN_GAIN and hi <= 1 + MIN_GAIN:
        return "tie", f"within {MIN_GAIN:.0%} of each other"
    if hi < 1:
        return "tie", f"split not faster by {MIN_GAIN:.0%} across all {len(pair_ratios)} session pairs"
    return "tie", f"the 95% CI over {len(pair_ratios)} session pairs includes 1"


def _measure_pair(native: Path, split: Path, shape: list[int], dtype: np.dtype, options) -> dict[str, Any]:
    """``SESSIONS`` fresh session pairs, then one verdict from the 95 % interval of split/native
    across them: timings and the verdict (the module docstring says how)."""
    feeds = make_inputs([InputSpec("x", shape, np.dtype(dtype).name)], shapes={}, seed=options.seed, given=None)
    start = benchmark.clock()
    times_a, times_b, pair_ratios, runs = [], [], [], 0
    while len(pair_ratios) < SESSIONS and (len(pair_ratios) < MIN_SESSIONS or
                                           benchmark.clock() - start <= NODE_SECONDS):
        fastest_a, fastest_b, per_batch = _time_one_pair(native, split, feeds, options, len(pair_ratios))
        times_a += fastest_a
        times_b += fastest_b
        runs += per_batch * len(fastest_a)
        pair_ratios.append(math.exp(statistics.fmean(math.log(b / a) for a, b in zip(fastest_a, fastest_b))))
    ratio, lo, hi = benchmark.ratio_interval(pair_ratios)
    verdict, note = _judge(pair_ratios, lo, hi)
    return {"native_ms": round(statistics.median(times_a) * 1e3, 4),
            "split_ms": round(statistics.median(times_b) * 1e3, 4), "ratio": round(ratio, 4),
            "ci95": (round(lo, 4), round(hi, 4)), "batches": len(times_a), "runs": runs,
            "sessions": len(pair_ratios), "pair_ratios": [round(r, 4) for r in pair_ratios],
            "verdict": verdict, "note": note}


def measure(path: Path, options, given_inputs) -> MeasuredTarget:
    """Discover every grouped conv of the ONNX model at ``path``, measure both forms of each on
    onnxruntime, and return the target that applies the winners."""
    model, found = _discover(path, options)
    opset = model.opset_imports.get("", model.opset_imports.get("ai.onnx", 17))
    measured: dict[tuple, Measurement] = {}
    with formats.scratch_dir() as scratch:
        _input_shapes(model, found, options, given_inputs, scratch)
        for i, (m, node) in enumerate(found):
            if m.key is None:
                m.note = m.note or "its input shape is unknown"
                continue
            earlier = measured.get(m.key)
            if earlier is not None:
                for attribute in ("native_ms", "split_ms", "ratio", "ci95", "batches", "runs", "sessions",
                                  "pair_ratios", "verdict", "note"):
                    setattr(m, attribute, getattr(earlier, attribute))
                m.same_as = earlier.location
                continue
            try:
                native, split = _layer_models(node, m.input_shape, m.dtype, opset, scratch, f"layer{i}")
                timings = _measure_pair(native, split, m.input_shape, m.dtype, options)
            except Exception as exc:  # a layer that cannot be built or run alone: judged not measured
                m.note = f"cannot be timed alone: {str(exc).strip().splitlines()[0][:120] if str(exc).strip() else type(exc).__name__}"
                continue
            for attribute, value in timings.items():
                setattr(m, attribute, value)
            measured[m.key] = m
    threads = options.threads
    runtime = f"onnxruntime CPU, {threads} thread{'s' if threads != 1 else ''}" if threads else \
        "onnxruntime CPU, default threads"
    return MeasuredTarget([m for m, _ in found], runtime, threads)
