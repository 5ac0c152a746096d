"""Describe, in one line, what an exporter wrote for each branch of a hand-made grouped conv.

Shared by export_torch.py and export_tf2onnx.py (needs only onnx and numpy), and usable alone:

    python samples/exporters/describe.py tests/fixtures/torch/*.onnx

For the Concat with the most inputs, each input is walked back along its data input (input 0) to
the shared source (a graph input, or a tensor read by more than one node). Slice bounds are shown
as constants where they are initializers/Constant nodes, or as "computed" where they come from a
subgraph (PyTorch's legacy exporter computes torch.chunk bounds from Shape).
"""

from __future__ import annotations

import sys
from collections import Counter, defaultdict

import numpy as np
import onnx
from onnx import numpy_helper


def _dims(vi: onnx.ValueInfoProto) -> str:
    dims = []
    for d in vi.type.tensor_type.shape.dim:
        dims.append(d.dim_param if d.dim_param else str(d.dim_value) if d.HasField("dim_value") else "?")
    return "x".join(dims)


class _Graph:
    def __init__(self, model: onnx.ModelProto):
        g = model.graph
        self.g = g
        self.inits = {t.name: t for t in g.initializer}
        self.inputs = {i.name for i in g.input} - set(self.inits)
        self.producer = {}
        self.consumers = defaultdict(list)
        for n in g.node:
            for o in n.output:
                self.producer[o] = n
            for i in n.input:
                if i:
                    self.consumers[i].append(n)

    def const(self, name: str):
        """Constant value of a tensor, or None when it is computed."""
        if not name:
            return None
        if name in self.inits:
            return numpy_helper.to_array(self.inits[name])
        n = self.producer.get(name)
        if n is not None and n.op_type == "Constant":
            for a in n.attribute:
                if a.name == "value":
                    return numpy_helper.to_array(a.t)
        if n is not None and n.op_type == "Identity":
            return self.const(n.input[0])
        return None

    def ancestors_ops(self, name: str, limit: int = 64) -> set[str]:
        ops, stack, seen = set(), [name], set()
        while stack and len(seen) < limit:
            t = stack.pop()
            if t in seen:
                continue
            seen.add(t)
            n = self.producer.get(t)
            if n is None:
                continue
            ops.add(n.op_type)
            if n.op_type != "Shape":  # a Shape reads only the shape of its input: stop there
                stack.extend(i for i in n.input if i)
        return ops


def _attr(n: onnx.NodeProto, name: str):
    for a in n.attribute:
        if a.name == name:
            return onnx.helper.get_attribute_value(a)
    return None


def _fmt(v) -> str:
    v = np.asarray(v).reshape(-1).tolist()
    return ",".join(str(int(x)) if isinstance(x, (int, np.integer)) or float(x).is_integer() else f"{x:g}" for x in v)


def _node_label(G: _Graph, n: onnx.NodeProto) -> tuple[str, str]:
    """(signature shared by all branches, per-branch detail)."""
    op = n.op_type
    if op == "Slice":
        if len(n.input) == 1:  # opset < 10: attributes
            return (f"Slice[attrs axes={_fmt(_attr(n, 'axes') or [])}]",
                    f"{_fmt(_attr(n, 'starts'))}:{_fmt(_attr(n, 'ends'))}")
        starts, ends = G.const(n.input[1]), G.const(n.input[2])
        axes = G.const(n.input[3]) if len(n.input) > 3 and n.input[3] else None
        axes_s = "absent" if len(n.input) <= 3 or not n.input[3] else (_fmt(axes) if axes is not None else "computed")
        computed = starts is None or ends is None
        if computed:
            srcs = G.ancestors_ops(n.input[1]) | G.ancestors_ops(n.input[2])
            how = "computed from " + "/".join(sorted(srcs)) if srcs else "computed"
            return f"Slice[axes={axes_s}, bounds {how}]", "?"
        return f"Slice[axes={axes_s}, const bounds]", f"{_fmt(starts)}:{_fmt(ends)}"
    if op == "Split":
        split_in = G.const(n.input[1]) if len(n.input) > 1 and n.input[1] else None
        split_attr = _attr(n, "split")
        parts = [f"axis={_attr(n, 'axis') if _attr(n, 'axis') is not None else 0}"]
        if _attr(n, "num_outputs") is not None:
            parts.append(f"num_outputs={_attr(n, 'num_outputs')}")
        if split_attr is not None:
            parts.append(f"split attr=[{_fmt(split_attr)}]")
        elif split_in is not None:
            parts.append(f"split input=[{_fmt(split_in)}]")
        elif len(n.input) < 2 or not n.input[1]:
            parts.append("no split sizes (equal)")
        return f"Split[{', '.join(parts)}]", ""
    if op == "Transpose":
        return f"Transpose[perm={_fmt(_attr(n, 'perm'))}]", ""
    if op in ("Conv", "ConvTranspose"):
        w = G.const(n.input[1])
        parts = []
        if w is not None:
            parts.append("W" + "x".join(map(str, w.shape)))
        parts.append("bias" if len(n.input) > 2 and n.input[2] else "no bias")
        for key in ("group", "strides", "pads", "output_padding"):
            v = _attr(n, key)
            if v is not None and (key != "group" or v != 1) and (key != "pads" or any(v)):
                parts.append(f"{key}={_fmt(v)}")
        return f"{op}[{', '.join(parts)}]", ""
    if op in ("Add", "Mul", "Sub", "Div"):
        other = [i for i in n.input[1:] if G.const(i) is not None]
        return (f"{op}[const {'x'.join(map(str, G.const(other[0]).shape))}]" if other else op), ""
    if op == "BatchNormalization":
        return "BatchNormalization", ""
    return op, ""


def describe(model: onnx.ModelProto) -> str:
    G = _Graph(model)
    concats = [n for n in G.g.node if n.op_type == "Concat"]
    if not concats:
        return "no Concat"
    cat = max(concats, key=lambda n: len(n.input))
    sigs, details = [], []
    source = None
    for t in cat.input:
        chain, detail = [], []
        while True:
            n = G.producer.get(t)
            if n is None:
                source = t
                break
            sig, det = _node_label(G, n)
            if n.op_type == "Split":
                sig += f"->out{list(n.output).index(t)}"
            chain.append(sig)
            if det:
                detail.append(det)
            t = n.input[0]
            if t in G.inputs or len(G.consumers[t]) > 1:
                source = t
                break
        sigs.append(" -> ".join(reversed(chain)))
        details.append("/".join(detail))
    base = [" -> ".join(p.split("->out")[0] if p.startswith("Split[") else p for p in s.split(" -> ")) for s in sigs]
    n = len(cat.input)
    if len(set(base)) == 1:
        body = f"{n} x ({base[0]})"
    else:
        body = " | ".join(f"({b})" for b in base)
    ranges = [d for d in details if d and d != "?"]
    if ranges:
        body += f"; slice ranges {' '.join(ranges) if n <= 8 else ranges[0] + ' ... ' + ranges[-1]}"
    src_kind = "graph input" if source in G.inputs else f"tensor from {G.producer[source].op_type}" if source in G.producer else source
    after = [c.op_type for c in G.consumers[cat.output[0]]]
    after_s = f" -> {'/'.join(after)}" if after else " (graph output)"
    if after and after[0] == "Transpose":
        after_s = f" -> Transpose[perm={_fmt(_attr(G.consumers[cat.output[0]][0], 'perm'))}]"
    shape_ops = any(nd.op_type == "Shape" for nd in G.g.node)
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), None)
    ins = ", ".join(f"{i.name}[{_dims(i)}]" for i in G.g.input if i.name in G.inputs)
    return (f"opset {opset}; input {ins}; source={src_kind}; {body}; Concat(axis={_attr(cat, 'axis')}){after_s}; "
            f"Shape ops: {'yes' if shape_ops else 'no'}")


def op_counts(model: onnx.ModelProto) -> str:
    c = Counter(n.op_type for n in model.graph.node)
    return ", ".join(f"{k}x{v}" for k, v in sorted(c.items()))


if __name__ == "__main__":
    for p in sys.argv[1:]:
        m = onnx.load(p)
        print(f"{p}: {describe(m)}\n    nodes: {op_counts(m)}")
