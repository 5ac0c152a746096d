"""What a run did, as data: rewrites, skips, counts, verification, timings; JSON and text forms."""

from __future__ import annotations

import collections
import math
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from typing import Any


@dataclass
class Rewrite:
    kind: str  # e.g. "fuse-split-conv"
    location: str  # the node that now stands for the pattern
    groups: int
    channels: dict[str, int]  # {"in": C, "out": O}
    nodes: list[str]  # the nodes replaced
    graph: str = ""
    # Did verification run the rewritten nodes? None: not verified (--no-verify, --check, failed
    # early); False for a rewrite in an If/Loop branch that no verification run reached.
    exercised: bool | None = None
    exercised_by: str = ""  # how ("model run", "subgraph ... as its own model"), or why not
    # The tensor(s) this rewrite replaces, compared directly in both models (gconv_rewrite.proof):
    # [{"tensor", "max_abs_error", "max_rel_error", "passed", "informative", "note"}].
    boundary: list[dict] = field(default_factory=list)


@dataclass
class Skip:
    """A pattern left alone: where (``location``, the node or layer that stands for it, in
    ``graph``), why (``reason``, the sentence users read) and the stable ``code`` of that reason
    (gconv_rewrite.reasons.CODES; docs/REASONS.md), which tools such as ``--check`` read."""

    location: str
    reason: str
    nodes: list[str] = field(default_factory=list)
    graph: str = ""
    # A fault of the model itself, not only a pattern left alone ("late-binding": Lambdas made in a
    # loop all read the last group): --check fails on it (exit 1) as on work to do.
    finding: str = ""
    code: str = ""

    @classmethod
    def refused(cls, location: str, refusal, nodes: list[str] | None = None, graph: str = "",
                finding: str = "") -> Skip:
        """The skip for a ``gconv_rewrite.reasons.Refusal`` (or a raised ``Refused``): its code and reason."""
        refusal = getattr(refusal, "refusal", refusal)
        return cls(location, refusal.reason, list(nodes if nodes is not None else refusal.nodes), graph, finding,
                   refusal.code)


@dataclass
class OutputComparison:
    name: str
    shape: list[int]
    dtype: str
    max_abs_error: float
    max_rel_error: float
    mean_abs_error: float
    passed: bool
    note: str = ""
    # False when the original's values cannot prove anything (all NaN/Inf, constant within atol).
    informative: bool = True


@dataclass
class Verification:
    ran: bool
    passed: bool | None
    atol: float
    rtol: float
    outputs: list[OutputComparison] = field(default_factory=list)
    note: str = ""
    inputs: dict[str, list[int]] = field(default_factory=dict)  # name -> shape used
    defaulted: dict[str, list[int]] = field(default_factory=dict)  # name -> unknown batch dims set to 1
    # Every run: [{"inputs": {name: shape}, "outputs": [{"name", "max_abs_error", "max_rel_error",
    # "passed", "informative"}]}]; a defaulted batch is run at 1 and at 2.
    runs: list[dict] = field(default_factory=list)
    # What ran the original for the comparison, where more than one thing could (Keras files):
    # "tf-keras 2.21.0 (load_model)", "keras 3.x (load_model)", "the tool's rebuild ..."
    reference: str = ""
    # The process that ran the original, where it was not the run's own (a Keras file's reference
    # process, gconv_rewrite.passes.keras.reference); None where it ran in the run's process.
    reference_pid: int | None = None


@dataclass
class ModelStats:
    nodes: int
    parameters: int
    op_counts: dict[str, int]


@dataclass
class Report:
    input: str
    mode: str
    output: str | None = None
    rewrites: list[Rewrite] = field(default_factory=list)
    skipped: list[Skip] = field(default_factory=list)
    before: ModelStats | None = None
    after: ModelStats | None = None
    verification: Verification | None = None
    timings: dict[str, float] = field(default_factory=dict)
    written: bool = False
    # --target: {"name": NAME, "nodes": [{"location", "graph", "form", "action", "rule"}]}, one
    # entry per grouped conv the target's rule judged (form: native|split; action: fuse|expand|keep).
    target: dict[str, Any] | None = None
    # --benchmark: {"runtime", "threads", "runs", "before_ms", "after_ms", "ratio" (before/after),
    # "before_spread_ms", "after_spread_ms", "ratio_spread", "sessions" (fresh session pairs),
    # "pair_ratios", "ratio_ci" (95% t interval across the pairs), "verdict", "interval"} (gconv_rewrite.benchmark).
    benchmark: dict[str, Any] | None = None
    # Bytes on disk, {"before", "after"}: the input and the written output (a dry run: the rewritten
    # model saved in scratch to measure it); None where nothing was written or measured.
    sizes: dict[str, int] | None = None
    # A dry run whose counts after could not be computed (the model could not be rebuilt): why.
    dry_run_note: str = ""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @contextmanager
    def timed(self, phase: str):
        # A plain attribute, not a field: progress display is not part of the report's data. A
        # listener with ``started`` hears of each phase as it starts, too (gconv_rewrite.progress).
        started = getattr(getattr(self, "on_phase", None), "started", None)
        if started is not None:
            started(phase)
        start = time.perf_counter()
        try:
            yield
        finally:
            self.timings[phase] = round(self.timings.get(phase, 0.0) + time.perf_counter() - start, 4)
            # A plain attribute, not a field: progress display is not part of the report's data.
            listener = getattr(self, "on_phase", None)
            if listener is not None:
                listener(phase, sum(self.timings.values()))


def count_ops(op_types) -> dict[str, int]:
    return dict(sorted(collections.Counter(op_types).items()))


def _table(headers: list[str], rows: list[list[str]]) -> list[str]:
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(headers)]
    line = lambda cells: "  " + "  ".join(c.ljust(w) for c, w in zip(cells, widths)).rstrip()
    return [line(headers), line(["-" * w for w in widths])] + [line(r) for r in rows]


def format_verification(verification: Verification) -> list[str]:
    if not verification.ran:
        return [f"verification: skipped ({verification.note})"]
    verdict = "passed" if verification.passed else "FAILED"
    if verification.defaulted:  # say at what shapes, where the batch was our choice
        label = lambda shapes: ", ".join(f"{name}={'x'.join(map(str, dims)) or 'scalar'}"
                                         for name, dims in shapes.items())
        verdict += f" at {label(verification.inputs)} (batch set to 1)"
        verdict += "".join(f" and at {label(run['inputs'])}" for run in verification.runs[1:])
    lines = [f"verification: {verdict} (atol={verification.atol:g}, rtol={verification.rtol:g}"
             + (f"; {verification.note}" if verification.note else "") + ")"]
    rows = [[o.name, "x".join(map(str, o.shape)) or "scalar", o.dtype, f"{o.max_abs_error:.3g}",
             f"{o.max_rel_error:.3g}", "ok" if o.passed else ("MISMATCH" + (f": {o.note}" if o.note else ""))]
            for o in verification.outputs]
    return lines + _table(["output", "shape", "dtype", "max abs err", "max rel err", ""], rows)


def format_boundaries(report: Report) -> list[str]:
    """One line when every rewrite matched at its own boundary tensor; each one that did not."""
    compared = [(r, e) for r in report.rewrites for e in r.boundary if e.get("passed") is not None]
    if not compared:
        return []
    failed = [(r, e) for r, e in compared if not e["passed"]]
    if failed:
        return [f"  rewrite {r.location} differs at {e['tensor']}: max abs err {e['max_abs_error']:.3g}, "
                f"max rel err {e['max_rel_error']:.3g}" + (f" ({e['note']})" if e.get("note") else "")
                for r, e in failed]
    worst = max(compared, key=lambda pair: pair[1]["max_abs_error"])
    rewrites = len({id(r) for r, _ in compared})
    return [f"  boundaries: {rewrites} rewrite{'s' if rewrites != 1 else ''} compared at the tensor each replaces, "
            f"all within tolerance (largest max abs err {worst[1]['max_abs_error']:.3g}, at {worst[1]['tensor']})"]


def format_coverage(report: Report) -> list[str]:
    """"N of M rewrites exercised" when verification did not run every rewritten node."""
    judged = [r for r in report.rewrites if r.exercised is not None]
    missed = [r for r in judged if not r.exercised]
    if not missed:
        return []
    return [f"  {len(judged) - len(missed)} of {len(judged)} rewrites exercised by verification; not exercised:"] + \
        [f"    {r.location}" + (f" ({r.exercised_by})" if r.exercised_by else "") for r in missed]


def format_target(target: dict[str, Any]) -> list[str]:
    """Each grouped conv under the form the target chose for it, grouped by rule."""
    nodes = target["nodes"]
    lines = [f"target {target['name']}: {len(nodes)} grouped conv{'s' if len(nodes) != 1 else ''} judged"]
    groups: dict[tuple[str, str, str], list[str]] = {}
    for n in nodes:
        where = f"{n['graph']}: " if n["graph"] else ""
        groups.setdefault((n["action"], n["form"], n["rule"]), []).append(where + n["location"])
    verbs = {"fuse": "fused to native", "expand": "expanded to split", "keep": "kept"}
    for (action, form, rule), locations in groups.items():
        state = verbs.get(action, action) + (f" {form}" if action == "keep" else "")
        lines.append(f"  {state} ({len(locations)}): {', '.join(locations)}")
        lines.append(f"    because {rule}")
    return lines


def format_summary(report: Report) -> str:
    heading = report.mode if report.target is None else f"target {report.target['name']}"
    lines = [f"{report.input}: {heading}"]
    if report.rewrites:
        lines.append(f"rewrites ({rewrite_counts(report.rewrites)}):")
        for r in report.rewrites:
            if r.kind.startswith("expand"):
                lines.append(f"  {r.location}: {r.kind}, group={r.groups} -> {len(r.nodes)} nodes, "
                             f"channels {r.channels['in']}->{r.channels['out']}")
            else:
                lines.append(f"  {r.location}: {r.kind}, {len(r.nodes)} nodes -> group={r.groups}, "
                             f"channels {r.channels['in']}->{r.channels['out']}")
    else:
        lines.append("rewrites: none")
    # A node the target keeps as it is is listed once, under the target, with its rule.
    kept = {n["location"]: n["rule"] for n in (report.target or {}).get("nodes", []) if n["action"] == "keep"}
    skipped = [s for s in report.skipped if not (s.location in kept and s.reason.endswith(kept[s.location]))]
    if skipped:
        lines.append(f"left alone ({len(skipped)}):")
        for s in skipped:
            lines.append(f"  {s.location}: {s.reason}" + (f" [{s.code}]" if s.code else ""))
    if report.target is not None:
        lines.extend(format_target(report.target))
    lines.extend(format_changes(report))
    if report.verification is not None:
        lines.extend(format_verification(report.verification))
        lines.extend(format_boundaries(report))
        lines.extend(format_coverage(report))
    if report.output and report.written:
        lines.append(f"wrote {report.output}")
    if report.benchmark is not None:

        lines.append(format_benchmark(report.benchmark))
    if report.timings:
        lines.append("time: " + ", ".join(f"{k} {v:.2f}s" for k, v in report.timings.items()))
    return "\n".join(lines)


def rewrite_kind(kind: str) -> str:
    """What a rewrite record is: a "fusion", an "expansion" or a "batchnorm fold"."""
    if "fold" in kind:
        return "batchnorm fold"
    return "expansion" if "expand" in kind else "fusion"


def rewrite_counts(rewrites: list[Rewrite]) -> str:
    """``3``, or per kind where there are several: ``16 fusions, 16 batchnorm folds``."""
    counts = collections.Counter(rewrite_kind(r.kind) for r in rewrites)
    if len(counts) == 1:
        return str(len(rewrites))
    return ", ".join(f"{n} {kind}{'s' if n != 1 else ''}" for kind, n in counts.items())


def _size(count: int) -> str:
    for unit in ("B", "KB", "MB"):
        if count < 1000 or unit == "MB":
            return f"{count:,} {unit}" if unit == "B" else f"{count:.1f} {unit}"
        count /= 1000
    return ""


def _parameters_note(report: Report, delta: int) -> str:
    """Why the parameter count changed, where a reader would expect a rewrite to keep it."""
    kinds = {rewrite_kind(r.kind) for r in report.rewrites}
    why = []
    if "batchnorm fold" in kinds:
        why.append("each BatchNorm fold replaces its scale, offset, mean and variance by the conv's bias")
    if "fusion" in kinds and delta > 0:
        why.append("a fused conv holds one weight and one bias for every branch: zeros where a branch had no bias, "
                   "or a smaller kernel or depthwise branch padded")
    if "expansion" in kinds:
        why.append("an expansion gives each group its own bias")
    return f"  parameters {delta:+,}: " + ("; ".join(why) or "the rewritten model holds them differently")


def format_changes(report: Report) -> list[str]:
    """Nodes, parameters and bytes on disk before -> after, the ops that changed, and why the
    parameters changed when they did."""
    if not (report.before and report.after):
        return [f"dry run: {report.dry_run_note}"] if report.dry_run_note else []
    b, a = report.before, report.after
    line = f"nodes: {b.nodes} -> {a.nodes}   parameters: {b.parameters:,} -> {a.parameters:,}"
    if report.sizes:
        line += f"   size: {_size(report.sizes['before'])} -> {_size(report.sizes['after'])}"
    lines = [line]
    changed = sorted(k for k in set(b.op_counts) | set(a.op_counts) if b.op_counts.get(k) != a.op_counts.get(k))
    if changed:
        lines.append("ops: " + ", ".join(f"{k} {b.op_counts.get(k, 0)}->{a.op_counts.get(k, 0)}" for k in changed))
    if a.parameters != b.parameters and report.rewrites:
        lines.append(_parameters_note(report, a.parameters - b.parameters))
    if report.dry_run_note:
        lines.append(f"dry run: {report.dry_run_note}")
    return lines


def model_stats(model) -> ModelStats:
    """Node, op and parameter counts of an onnx-ir model (every graph, subgraphs included).
    Parameters are the float tensors held by initializers and by ``Constant`` nodes (Paddle2ONNX
    and many exporters keep weights in Constant nodes; an expand writes initializers instead)."""
    op_types, parameters = [], 0
    for graph in model.graphs():
        op_types.extend(n.op_type for n in graph)
        tensors = [value.const_value for value in graph.initializers.values()]
        tensors += [node.attributes["value"].value for node in graph
                    if node.op_type == "Constant" and node.domain in ("", "ai.onnx") and "value" in node.attributes]
        for tensor in tensors:
            # Parameters are the float tensors; int64 Split sizes and Slice bounds are not.
            if tensor is not None and tensor.dtype.is_floating_point():
                parameters += math.prod(tensor.shape.dims)
    return ModelStats(nodes=len(op_types), parameters=parameters, op_counts=count_ops(op_types))


def format_benchmark(result: dict[str, Any]) -> str:
    """One line for the summary."""
    count = result.get("threads")
    threads = f"{count} thread{'s' if count != 1 else ''}" if count else "default threads"
    head = f"benchmark ({result['runtime']}, {threads}"
    if result.get("before_ms") is None:
        return f"{head}): not timed ({result.get('note', 'no result')})"
    ratio, interval, verdict = result["ratio"], result.get("ratio_ci"), result.get("verdict")
    if not ratio:
        said = "n/a"
    elif interval is None or verdict is None:  # one session pair: no interval, no verdict
        said = "one session pair: no verdict"
    else:  # "faster" only when the whole interval across session pairs is above 1 (gconv_rewrite.benchmark)
        said = {"faster": f"{ratio:.3f}x faster", "slower": f"{1 / ratio:.3f}x slower"}.get(verdict, verdict)
        said = f"95% CI {interval[0]:.3f}-{interval[1]:.3f} across {result['sessions']} session pairs: {said}"
    return (f"{head}, {result.get('sessions', 1)} sessions each, {result['runs']} interleaved runs): before "
            f"{result['before_ms']:.3f} ms ± {result.get('before_spread_ms', 0):.3f}, after "
            f"{result['after_ms']:.3f} ms ± {result.get('after_spread_ms', 0):.3f}; ratio {ratio:.3f} ({said})")
