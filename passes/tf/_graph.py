"""Small readers and writers over a TensorFlow GraphDef shared by the TF passes.

A frozen, inlined GraphDef is plain data: nodes by name, inputs as ``"node:index"`` strings,
constants as ``Const`` nodes. These helpers index it once (producers, consumers), read
constants through ``Identity`` chains, and make new nodes.
"""

from __future__ import annotations

import collections

import numpy as np
import tensorflow as tf
from tensorflow.core.framework import attr_value_pb2, graph_pb2, node_def_pb2

from gconv_rewrite.names import fresh_name


def split_input(ref: str) -> tuple[str, int]:
    """``"a/b:2"`` → ``("a/b", 2)``; ``"a/b"`` → ``("a/b", 0)``. Control inputs are not tensors."""
    name, sep, index = ref.rpartition(":")
    if sep and index.isdigit():
        return name, int(index)
    return ref, 0


def tensor_name(node: str, index: int = 0) -> str:
    return f"{node}:{index}"


class GraphIndex:
    """Nodes by name and, for each tensor, who reads it — built once per pass."""

    def __init__(self, graph_def: graph_pb2.GraphDef, protected: set[str] = frozenset()):
        self.graph_def = graph_def
        self.nodes = {n.name: n for n in graph_def.node}
        self.protected = set(protected)  # tensors the signature returns: never removed or bypassed
        self.readers: dict[str, list[node_def_pb2.NodeDef]] = collections.defaultdict(list)
        for node in graph_def.node:
            for ref in node.input:
                if not ref.startswith("^"):
                    self.readers[tensor_name(*split_input(ref))].append(node)
        self._shapes = None

    def producer(self, ref: str) -> tuple[node_def_pb2.NodeDef | None, int]:
        name, index = split_input(ref)
        return self.nodes.get(name), index

    def uses(self, tensor: str) -> int:
        return len(self.readers.get(tensor, ())) + (tensor in self.protected)

    def skip_identity(self, ref: str) -> str:
        """Follow Identity nodes back to the tensor they forward."""
        node, _ = self.producer(ref)
        while node is not None and node.op in ("Identity", "Snapshot") and node.input:
            ref = node.input[0]
            node, _ = self.producer(ref)
        return tensor_name(*split_input(ref))

    def const(self, ref: str) -> np.ndarray | None:
        node, _ = self.producer(self.skip_identity(ref))
        if node is None or node.op != "Const":
            return None
        return tf.make_ndarray(node.attr["value"].tensor)

    def const_ints(self, ref: str) -> list[int] | None:
        array = self.const(ref)
        if array is None or array.dtype.kind not in "iu":
            return None
        return [int(v) for v in array.reshape(-1)]

    def shape(self, tensor: str) -> list[int | None] | None:
        """Static shape from TensorFlow's own shape inference (the graph imported once)."""
        if self._shapes is None:
            self._shapes = static_shapes(self.graph_def)
        return self._shapes.get(tensor_name(*split_input(tensor)))


def static_shapes(graph_def: graph_pb2.GraphDef) -> dict[str, list[int | None] | None]:
    graph = tf.Graph()
    with graph.as_default():
        tf.graph_util.import_graph_def(graph_def, name="")
    shapes = {}
    for op in graph.get_operations():
        for out in op.outputs:
            shape = out.shape
            shapes[out.name] = None if shape.rank is None else shape.as_list()
    return shapes


def attr_ints(node: node_def_pb2.NodeDef, key: str) -> list[int]:
    return list(node.attr[key].list.i) if key in node.attr else []


def attr_str(node: node_def_pb2.NodeDef, key: str, default: str = "") -> str:
    return node.attr[key].s.decode() if key in node.attr else default


def make_const(name: str, array: np.ndarray) -> node_def_pb2.NodeDef:
    node = node_def_pb2.NodeDef(name=name, op="Const")
    node.attr["dtype"].type = tf.as_dtype(array.dtype).as_datatype_enum
    node.attr["value"].tensor.CopyFrom(tf.make_tensor_proto(array))
    return node


def make_node(op: str, name: str, inputs: list[str], **attrs) -> node_def_pb2.NodeDef:
    node = node_def_pb2.NodeDef(name=name, op=op, input=inputs)
    for key, value in attrs.items():
        if isinstance(value, attr_value_pb2.AttrValue):
            node.attr[key].CopyFrom(value)
        elif isinstance(value, tf.dtypes.DType):
            node.attr[key].type = value.as_datatype_enum
        elif isinstance(value, bool):
            node.attr[key].b = value
        elif isinstance(value, int):
            node.attr[key].i = value
        elif isinstance(value, str):
            node.attr[key].s = value.encode()
        elif isinstance(value, (list, tuple)):
            node.attr[key].list.i.extend(int(v) for v in value)
        else:
            raise TypeError(f"attribute {key}: {type(value).__name__}")
    return node


class Names:
    """Fresh, deterministic node names."""

    def __init__(self, graph_def: graph_pb2.GraphDef):
        self._taken = {n.name for n in graph_def.node}

    def fresh(self, base: str) -> str:
        return fresh_name(base, self._taken)


def prune(graph_def: graph_pb2.GraphDef, keep: list[str]) -> graph_pb2.GraphDef:
    """Only the nodes the ``keep`` node names need (data and control inputs), in their order."""
    nodes = {n.name: n for n in graph_def.node}
    needed, stack = set(), [k for k in keep if k in nodes]
    while stack:
        name = stack.pop()
        if name in needed:
            continue
        needed.add(name)
        for ref in nodes[name].input:
            stack.append(split_input(ref.lstrip("^"))[0])
    out = graph_pb2.GraphDef()
    out.versions.CopyFrom(graph_def.versions)
    out.library.CopyFrom(graph_def.library)
    out.node.extend(n for n in graph_def.node if n.name in needed)
    return out


def attr_values(node: node_def_pb2.NodeDef) -> dict:
    """A node's attributes as plain Python values (lists as tuples, dtypes as their enum)."""
    values = {}
    for key, attr in node.attr.items():
        kind = attr.WhichOneof("value")
        if kind == "list":
            values[key] = tuple(v for field in ("i", "f", "s", "b", "type")
                                for v in getattr(attr.list, field))
        elif kind == "s":
            values[key] = attr.s.decode(errors="replace")
        elif kind in ("i", "f", "b", "type"):
            values[key] = getattr(attr, kind)
        else:
            values[key] = str(attr).strip()
    return values
