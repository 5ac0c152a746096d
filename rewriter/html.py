"""``--html``: one self-contained page a reviewer opens to see what a run changed and why it is safe.

The page is drawn from the run's report (``Report.to_dict()``) with Jinja2, autoescaping on:
every name that comes from the model (nodes, tensors, layers, files, reasons) is text, never
markup. It holds inline CSS and inline SVG only: no script, no font, no image or link to fetch,
so it reads the same from a CI artifact offline.

Each rewrite is drawn before and after. The report names the nodes a rewrite replaced (or, for
an expansion, the nodes it made); the op kinds and the wiring between those nodes are read from
the model file on that side (ONNX: ``onnx.load`` without external data; Keras: the file's layer
config), and the layout follows the pattern's own structure: the source, the split, the parallel
branches (the first few drawn, "… 29 more" for the rest), the join; after, the one grouped conv
and the tails it carries. No general graph layout is needed: the branches are parallel by
construction.
"""

from __future__ import annotations

import functools
import json
import re
import urllib.parse
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from gconv_rewrite import formats
from gconv_rewrite.report import format_benchmark

BRANCHES_DRAWN = 3  # branches drawn per rewrite; the rest are "… N more"
CHAIN_DRAWN = 5  # ops drawn per branch; a longer chain shows its first and last ops around "… N ops"
# Ops whose output is a shape, not data: what they read is not on the data path (the PyTorch
# legacy exporter computes Slice bounds with Shape → Gather → Div → Mul from the source itself).
SHAPE_OPS = frozenset({"Shape", "Size"})


# -- the model's wiring, as {node: (kind, [input keys])} and {key: producing node} -----------------

@dataclass
class Wiring:
    """The nodes of one model file: each node's op kind and the keys (tensor or layer names) it
    reads, and which node writes each key. Empty where the format is not read (SavedModel)."""

    kinds: dict[str, str] = field(default_factory=dict)
    inputs: dict[str, list[str]] = field(default_factory=dict)
    producer: dict[str, str] = field(default_factory=dict)
    order: dict[str, int] = field(default_factory=dict)

    def add(self, name: str, kind: str, inputs: list[str], outputs: list[str]) -> None:
        self.order.setdefault(name, len(self.order))
        self.kinds[name], self.inputs[name] = kind, inputs
        for key in outputs:
            self.producer[key] = name


def read_wiring(path: str | None) -> Wiring:
    """The wiring of the model file at ``path``, or an empty one when it cannot be read (the
    drawing then falls back to the report's names and counts)."""
    wiring = Wiring()
    if not path:
        return wiring
    model = Path(path)
    try:
        fmt = formats.detect_format(model)
        if fmt == "onnx":
            _onnx_wiring(model, wiring)
        elif fmt == "keras":
            _keras_wiring(model, wiring)
    except Exception:  # a drawing without op kinds is still a review page: never fail the run for it
        return Wiring()
    return wiring


def _onnx_wiring(path: Path, wiring: Wiring) -> None:
    import onnx

    model = onnx.load(str(path), load_external_data=False)

    def visit(graph) -> None:
        constants = {i.name for i in graph.initializer}
        for node in graph.node:
            if node.op_type == "Constant":
                constants.update(node.output)
            data = [name for name in node.input if name and name not in constants]
            wiring.add(node.name or node.output[0], node.op_type, data, list(node.output))
            for attribute in node.attribute:
                for sub in [attribute.g] * attribute.HasField("g") + list(attribute.graphs):
                    visit(sub)

    visit(model.graph)


def _keras_config(path: Path) -> dict:
    """The model config of a ``.keras`` archive (config.json) or an ``.h5`` file (model_config)."""
    if path.suffix.lower() == ".keras":
        import zipfile

        with zipfile.ZipFile(path) as archive:
            return json.loads(archive.read("config.json"))
    import h5py

    with h5py.File(path, "r") as file:
        config = file.attrs["model_config"]
    return json.loads(config.decode() if isinstance(config, bytes) else config)


def _inbound_layers(inbound: Any) -> list[str]:
    """Layer names in a layer's ``inbound_nodes``, in either form: Keras 3 (``keras_history``)
    or Keras 2 (``["name", node_index, tensor_index, {...}]``)."""
    if isinstance(inbound, dict):
        history = inbound.get("keras_history")
        if isinstance(history, list) and history and isinstance(history[0], str):
            return [history[0]]
        return [name for value in inbound.values() for name in _inbound_layers(value)]
    if isinstance(inbound, list):
        if len(inbound) >= 3 and isinstance(inbound[0], str) and isinstance(inbound[1], int):
            return [inbound[0]]
        return [name for value in inbound for name in _inbound_layers(value)]
    return []


def _keras_wiring(path: Path, wiring: Wiring) -> None:
    config = _keras_config(path)
    layers = config.get("config", {}).get("layers", [])
    sequential = config.get("class_name") == "Sequential"
    previous: list[str] = []
    for layer in layers:
        name = layer.get("name") or layer.get("config", {}).get("name", "")
        kind = layer.get("class_name", "?")
        function = layer.get("config", {}).get("function")
        if kind in ("TFOpLambda", "SlicingOpLambda") and isinstance(function, str):
            kind = f"{kind} {function}"
        inputs = previous if sequential else _inbound_layers(layer.get("inbound_nodes", []))
        wiring.add(name, kind, inputs, [name])
        previous = [name]


# -- one rewrite's pattern: head, branches, join ---------------------------------------------------

@dataclass
class Pattern:
    """A split → branches → join pattern as drawn: each entry (node name, op kind)."""

    head: list[tuple[str, str]]
    branches: list[list[tuple[str, str]]]
    join: tuple[str, str] | None


def find_pattern(nodes: list[str], wiring: Wiring) -> Pattern | None:
    """The pattern the ``nodes`` form in ``wiring``: the data path from the source (shape and
    weight computations left out), the join at its end, one branch per input of the join, and
    what the branches share before them (the split). None when the nodes are not in the file."""
    members = [n for n in nodes if n in wiring.kinds]
    if len(members) < 2:
        return None
    inside = set(members)
    data = _data_nodes(members, inside, wiring)
    readers = {n: [m for m in data if any(wiring.producer.get(k) == n for k in wiring.inputs[m])] for n in data}
    sinks = [n for n in data if not readers[n]]
    if not sinks:
        return None
    join = max(sinks, key=wiring.order.__getitem__)
    branch_sets = []
    for key in wiring.inputs[join]:
        start = wiring.producer.get(key)
        if start in data and start != join:
            branch_sets.append(_closure(start, data, wiring))
    counted: dict[str, int] = {}
    for branch in branch_sets:
        for n in branch:
            counted[n] = counted.get(n, 0) + 1
    by_order = lambda names: sorted(names, key=wiring.order.__getitem__)
    pair = lambda n: (n, wiring.kinds[n])
    head = [pair(n) for n in by_order(n for n in data if n != join and counted.get(n, 0) != 1)]
    branches = [[pair(n) for n in by_order(n for n in branch if counted[n] == 1)] for branch in branch_sets]
    return Pattern(head=head, branches=[b for b in branches if b], join=pair(join))


def _data_nodes(members: list[str], inside: set[str], wiring: Wiring) -> set[str]:
    """Members reached from the pattern's source tensors (what flows in from outside) along data
    edges; a shape op reads the source but yields no data, so the walk does not pass it."""
    outside = {k for n in members for k in wiring.inputs[n] if wiring.producer.get(k) not in inside}
    data: set[str] = set()
    changed = True
    while changed:
        changed = False
        for n in members:
            if n in data:
                continue
            fed = any(k in outside or (wiring.producer.get(k) in data and
                                       wiring.kinds[wiring.producer[k]] not in SHAPE_OPS)
                      for k in wiring.inputs[n])
            if fed:
                data.add(n)
                changed = True
    return {n for n in data if wiring.kinds[n] not in SHAPE_OPS}


def _closure(start: str, data: set[str], wiring: Wiring) -> set[str]:
    """``start`` and every data node it reads from, transitively."""
    seen, todo = {start}, [start]
    while todo:
        for key in wiring.inputs[todo.pop()]:
            producer = wiring.producer.get(key)
            if producer in data and producer not in seen:
                seen.add(producer)
                todo.append(producer)
    return seen


# -- the drawing: boxes and edges in SVG coordinates -----------------------------------------------

BOX_W, BOX_H, COL_GAP, ROW_GAP, MARGIN = 136, 34, 34, 12, 10


@dataclass
class Drawing:
    """What the template draws for one rewrite: boxes, edges with labels, notes; its size."""

    boxes: list[dict] = field(default_factory=list)
    edges: list[dict] = field(default_factory=list)
    notes: list[dict] = field(default_factory=list)
    width: int = 0
    height: int = 0

    def box(self, column: int, row: float, kind: str, name: str = "", style: str = "op") -> dict:
        box = {"x": MARGIN + column * (BOX_W + COL_GAP), "y": self.top + row * (BOX_H + ROW_GAP), "w": BOX_W,
               "h": BOX_H, "kind": _short(kind, 20), "name": _short(name, 21), "title": f"{kind} {name}".strip(),
               "style": style}
        self.boxes.append(box)
        self.width = max(self.width, box["x"] + BOX_W + MARGIN)
        self.height = max(self.height, box["y"] + BOX_H + MARGIN)
        return box

    def edge(self, a: dict, b: dict, label: str = "", dashed: bool = False) -> None:
        x1, y1, x2, y2 = a["x"] + a["w"], a["y"] + a["h"] / 2, b["x"], b["y"] + b["h"] / 2
        self.edges.append({"x1": x1, "y1": y1, "x2": x2, "y2": y2, "label": label, "dashed": dashed,
                           "lx": (x1 + x2) / 2, "ly": (y1 + y2) / 2 - 4 if abs(y1 - y2) < 1 else y2 - 4})

    def note(self, x: float, y: float, text: str, style: str = "note") -> None:
        self.notes.append({"x": x, "y": y, "text": text, "style": style})
        self.width = max(self.width, int(x + 8 * len(text)))

    top: float = 0


def _short(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _chain(branch: list[tuple[str, str]]) -> list[tuple[str, str]]:
    """A branch as drawn: at most CHAIN_DRAWN ops, the middle of a longer one folded."""
    if len(branch) <= CHAIN_DRAWN:
        return branch
    hidden = len(branch) - CHAIN_DRAWN + 1
    return branch[:2] + [("", f"… {hidden} ops")] + branch[-(CHAIN_DRAWN - 3):]


def _draw_parallel(drawing: Drawing, pattern: Pattern, groups: int, channels: dict, top: float) -> None:
    """source → head → the first branches (and "… N more") → join → boundary, from ``top``."""
    drawing.top = top
    total = max(len(pattern.branches), groups)
    shown = pattern.branches[:BRANCHES_DRAWN]
    rows = len(shown) + (total > len(shown))
    middle = (rows - 1) / 2
    source = drawing.box(0, middle, "source", f"{channels['in']} channels", "tensor")
    column, last = 1, source
    for name, kind in pattern.head:
        box = drawing.box(column, middle, kind, name)
        drawing.edge(last, box, f"{channels['in']} ch" if last is source else "")
        column, last = column + 1, box
    width = max((len(_chain(b)) for b in shown), default=1)
    join_column = column + width
    join_name, join_kind = pattern.join or ("", "Concat")
    join = drawing.box(join_column, middle, join_kind, join_name)
    for row, branch in enumerate(shown):
        previous = last
        for offset, (name, kind) in enumerate(_chain(branch)):
            box = drawing.box(column + offset, row, kind, name, "fold" if not name else "op")
            first_edge = previous is last and row == 0
            drawing.edge(previous, box, _per_group(channels["in"], groups) if first_edge else "")
            previous = box
        drawing.edge(previous, join, _per_group(channels["out"], groups) if row == 0 else "")
    if total > len(shown):
        y = top + len(shown) * (BOX_H + ROW_GAP) + BOX_H / 2 + 4
        x = MARGIN + column * (BOX_W + COL_GAP) + 8
        drawing.note(x, y, f"… {total - len(shown)} more", "more")
        drawing.edges.append({"x1": last["x"] + BOX_W, "y1": last["y"] + BOX_H / 2, "x2": x - 4, "y2": y - 4,
                              "label": "", "dashed": True})
        drawing.height = max(drawing.height, int(y + MARGIN))
    out = drawing.box(join_column + 1, middle, "boundary", f"{channels['out']} channels", "tensor")
    drawing.edge(join, out, f"{channels['out']} ch")


def _per_group(count: int, groups: int) -> str:
    return f"{count // groups} ch" if groups and count % groups == 0 else ""


def _draw_grouped(drawing: Drawing, kind: str, name: str, groups: int, channels: dict, tails: list[tuple[str, str]],
                  top: float) -> None:
    """source → the one grouped conv (group=N) → its hoisted tails → boundary, from ``top``."""
    drawing.top = top
    source = drawing.box(0, 0, "source", f"{channels['in']} channels", "tensor")
    conv = drawing.box(1, 0, f"{kind} group={groups}", name, "grouped")
    drawing.edge(source, conv, f"{channels['in']} ch")
    last = conv
    for column, (tail_name, tail_kind) in enumerate(tails, start=2):
        box = drawing.box(column, 0, tail_kind, tail_name or "carried once")
        drawing.edge(last, box, f"{channels['out']} ch")
        last = box
    out = drawing.box(len(tails) + 2, 0, "boundary", f"{channels['out']} channels", "tensor")
    drawing.edge(last, out, f"{channels['out']} ch")


def _fallback_pattern(rewrite: dict) -> Pattern:
    """Without the file's wiring (a SavedModel): one box per branch, named by the report."""
    return Pattern(head=[], branches=[[(name, "node")] for name in rewrite["nodes"][:BRANCHES_DRAWN]], join=None)


def _conv_and_tails(pattern: Pattern) -> tuple[str, list[tuple[str, str]]]:
    """The conv kind of the branches and the tail ops after it (drawn once after the fusion)."""
    branch = pattern.branches[0] if pattern.branches else []
    at = next((i for i, (_, kind) in enumerate(branch) if "conv" in kind.lower()), None)
    if at is None:
        return "Conv", []
    return branch[at][1], [("", kind) for _, kind in branch[at + 1:]]


def draw_rewrite(rewrite: dict, before: Wiring, after: Wiring) -> Drawing:
    """One rewrite drawn before (top) and after (bottom). A fusion's pattern is read from the
    input's wiring, an expansion's from the output's (the nodes it made)."""
    drawing = Drawing()
    expanding = rewrite["kind"].startswith("expand")
    wiring = after if expanding else before
    pattern = find_pattern(rewrite["nodes"], wiring) or _fallback_pattern(rewrite)
    kind, tails = _conv_and_tails(pattern)
    grouped_kind = before.kinds.get(rewrite["location"], kind) if expanding else kind
    drawing.note(MARGIN, 14, "before", "side")
    if expanding:
        _draw_grouped(drawing, grouped_kind, rewrite["location"], rewrite["groups"], rewrite["channels"], [], 22)
    else:
        _draw_parallel(drawing, pattern, rewrite["groups"], rewrite["channels"], 22)
    second = drawing.height + 18
    drawing.note(MARGIN, second - 6, "after", "side")
    if expanding:
        _draw_parallel(drawing, pattern, rewrite["groups"], rewrite["channels"], second + 2)
    else:
        _draw_grouped(drawing, kind, rewrite["location"], rewrite["groups"], rewrite["channels"], tails, second + 2)
    return drawing


# -- the page ---------------------------------------------------------------------------------------

@functools.cache
def _environment():
    import jinja2

    # Autoescaping on for every template, whatever its name: the model's names are untrusted text.
    return jinja2.Environment(loader=jinja2.PackageLoader("gconv_rewrite", "templates"), autoescape=True,
                              trim_blocks=True, lstrip_blocks=True)


def _verdict(report: dict) -> tuple[str, str]:
    """(css class, sentence): verified, failed, or not verified and why."""
    if report.get("error"):
        return "bad", f"not written: {report['error']}"
    verification = report.get("verification") or {}
    if verification.get("ran") and verification.get("passed"):
        runs = len(verification.get("runs") or []) or 1
        return "good", f"verified: outputs and boundaries match ({runs} run{'s' if runs != 1 else ''})"
    if verification.get("ran"):
        return "bad", "verification FAILED" + (f": {verification['note']}" if verification.get("note") else "")
    return "neutral", f"not verified: {verification.get('note') or 'no verification ran'}"


def _changed_ops(report: dict) -> list[dict]:
    before, after = (report.get("before") or {}), (report.get("after") or {})
    b, a = before.get("op_counts", {}), after.get("op_counts", {})
    return [{"op": k, "before": b.get(k, 0), "after": a.get(k, 0)}
            for k in sorted(set(b) | set(a)) if b.get(k, 0) != a.get(k, 0)]


def _near_misses(report: dict) -> list[dict]:
    """Candidates left alone, grouped by reason (and code, where the report has one)."""
    grouped: dict[tuple[str, str], list[str]] = {}
    for skip in report.get("skipped", []):
        where = f"{skip['graph']}: {skip['location']}" if skip.get("graph") else skip["location"]
        grouped.setdefault((skip.get("code", ""), skip["reason"]), []).append(where)
    return [{"code": code, "reason": reason, "locations": locations}
            for (code, reason), locations in sorted(grouped.items(), key=lambda item: -len(item[1]))]


def _target_groups(report: dict) -> list[dict]:
    target = report.get("target")
    if not target:
        return []
    grouped: dict[tuple[str, str, str], list[str]] = {}
    for n in target.get("nodes", []):
        grouped.setdefault((n["action"], n["form"], n["rule"]), []).append(n["location"])
    return [{"action": a, "form": f, "rule": r, "locations": locs} for (a, f, r), locs in grouped.items()]


def _benchmark_chart(benchmark: dict | None) -> dict | None:
    """Two bars (before, after) scaled to the slower, with the spread as a whisker."""
    if not benchmark:
        return None
    chart = {"line": format_benchmark(benchmark), "bars": []}
    if benchmark.get("before_ms") is None:
        return chart
    largest = max(benchmark["before_ms"] + (benchmark.get("before_spread_ms") or 0),
                  benchmark["after_ms"] + (benchmark.get("after_spread_ms") or 0)) or 1.0
    scale = 420 / largest
    for row, side in enumerate(("before", "after")):
        ms, spread = benchmark[f"{side}_ms"], benchmark.get(f"{side}_spread_ms") or 0
        chart["bars"].append({"label": side, "y": 8 + row * 30, "w": max(ms * scale, 1), "ms": ms,
                              "lo": (ms - spread) * scale, "hi": (ms + spread) * scale})
    return chart


def page_context(report: dict) -> dict:
    """Everything the page template shows, computed once (the template only lays it out)."""
    before_wiring = read_wiring(report.get("input"))
    # An expansion's pattern is what it wrote: only then is the output read.
    expanded = any(r["kind"].startswith("expand") for r in report.get("rewrites", []))
    after_wiring = read_wiring(report.get("output")) if expanded and report.get("written") else Wiring()
    rewrites = [{"rewrite": r, "drawing": draw_rewrite(r, before_wiring, after_wiring),
                 "where": f"{r['graph']}: {r['location']}" if r.get("graph") else r["location"]}
                for r in report.get("rewrites", [])]
    verdict_class, verdict = _verdict(report)
    target = report.get("target")
    mode = f"target {target['name']}" if target else report.get("mode", "")
    return {"report": report, "rewrites": rewrites, "verdict": verdict, "verdict_class": verdict_class,
            "mode": mode, "changed_ops": _changed_ops(report), "near_misses": _near_misses(report),
            "targets": _target_groups(report), "benchmark": _benchmark_chart(report.get("benchmark")),
            "verification": report.get("verification"), "details": report.get("details", [])}


def render_page(report: dict) -> str:
    """The review page of one model's run, as HTML text."""
    return _environment().get_template("review.html.j2").render(**page_context(report))


def render_index(models: list[dict], code: int) -> str:
    """The index page of a batch run: one row per model, linking its page (``page``: a file name
    beside the index, or None where none was written)."""
    rows = [{**m, "href": urllib.parse.quote(m["page"]) if m.get("page") else None} for m in models]
    return _environment().get_template("index.html.j2").render(models=rows, code=code)


def model_page_names(index: Path, inputs: Iterable[str]) -> list[Path]:
    """Where a batch run writes each model's page: beside the index, ``INDEX-NNN-MODEL.html``
    (numbered, so two models of one name never share a page; the name reduced to safe letters)."""
    names = []
    for number, model in enumerate(inputs, start=1):
        stem = Path(model.rstrip("/")).name or "model"
        safe = re.sub(r"[^A-Za-z0-9._-]+", "_", stem)[:60]
        names.append(index.with_name(f"{index.stem}-{number:03d}-{safe}.html"))
    return names


def check_page_path(page: Path, read: list[Path], force: bool, outputs: Iterable[Path] = ()) -> None:
    """Refuse a page path before the run: one that names a file the input reads or a model
    output, is no regular file, lies in a missing folder, or exists without ``force``."""
    from gconv_rewrite.errors import OutputError

    formats.check_utf8(page, "--html")
    formats.check_not_read(page, read, "--html")
    for output in outputs:
        if page.absolute() == output.absolute() or formats.same_file(page, output):
            raise OutputError(f"{page}: it is also a model output; choose another --html")
    if page.is_dir():
        raise OutputError(f"{page}: is a folder; --html names the page file to write")
    if (page.exists() or page.is_symlink()) and not force:
        raise OutputError(f"{page}: already exists (use --force to overwrite)")
    folder = page.parent if str(page.parent) else Path(".")
    if not folder.is_dir():
        raise OutputError(f"{page}: folder {folder} does not exist")


def write_page(page: Path, text: str, *, protected: list[Path], force: bool) -> None:
    """Write ``text`` at ``page`` atomically (staged beside it, then one rename); without
    ``force`` the rename itself refuses a file that appeared since the run began."""
    with formats.atomic_output(page, protected=protected, replace=force) as staging:
        (staging / page.name).write_text(text, encoding="utf-8")
