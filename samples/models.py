"""Builders of small and ResNeXt-shaped ONNX models with grouped convolutions in three forms:

- ``native``: one ``Conv(group=N)``
- ``split``:  ``Split(axis=1) → N Conv → Concat(axis=1)``
- ``slice``:  ``N Slice(axis=1) → N Conv → Concat(axis=1)``

Only numpy and onnx.helper: the tests, the samples script and the benchmarks all use them.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

INT64_MAX = 2**63 - 1


class GraphBuilder:
    def __init__(self, opset: int = 17, seed: int = 0):
        self.opset = opset
        self.nodes: list[onnx.NodeProto] = []
        self.initializers: list[onnx.TensorProto] = []
        self.rng = np.random.default_rng(seed)
        self._count = 0

    def fresh(self, base: str) -> str:
        self._count += 1
        return f"{base}_{self._count}"

    def const(self, base: str, array) -> str:
        name = self.fresh(base)
        self.initializers.append(numpy_helper.from_array(np.asarray(array), name))
        return name

    def node(self, op: str, inputs: list[str], outputs: int = 1, name: str | None = None, **attrs) -> list[str]:
        name = name or self.fresh(op)
        outs = [f"{name}_out{i}" if outputs > 1 else f"{name}_out" for i in range(outputs)]
        self.nodes.append(helper.make_node(op, inputs, outs, name=name, **attrs))
        return outs

    def weight(self, shape, fan_in: int) -> np.ndarray:
        return (self.rng.standard_normal(shape) / np.sqrt(fan_in)).astype(np.float32)

    def model(self, inputs, outputs, name: str = "graph") -> onnx.ModelProto:
        graph = helper.make_graph(
            self.nodes, name,
            [helper.make_tensor_value_info(n, TensorProto.FLOAT, s) for n, s in inputs],
            [helper.make_tensor_value_info(n, TensorProto.FLOAT, s) for n, s in outputs],
            initializer=self.initializers)
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", self.opset)],
                                  producer_name="gconv-rewrite-samples")
        model.ir_version = min(model.ir_version, 8 if self.opset <= 17 else 9)
        return model

    # -- convolutions -------------------------------------------------------------------------

    def conv(self, x: str, weight: np.ndarray, bias: np.ndarray | None, *, group: int = 1,
             name: str | None = None, **attrs) -> str:
        inputs = [x, self.const("W", weight)] + ([self.const("B", bias)] if bias is not None else [])
        if group != 1:
            attrs["group"] = group
        return self.node("Conv", inputs, name=name, **attrs)[0]

    def split(self, x: str, channels: int, parts: int, *, axis: int = 1, style: str = "auto") -> list[str]:
        """Split into ``parts`` even parts; ``style``: auto (attribute before opset 13, input
        from 13), equal (no sizes), num_outputs (opset 18)."""
        sizes = [channels // parts] * parts
        if style == "num_outputs":
            return self.node("Split", [x], parts, axis=axis, num_outputs=parts)
        if style == "equal":
            return self.node("Split", [x], parts, axis=axis)
        if self.opset < 13:
            return self.node("Split", [x], parts, axis=axis, split=sizes)
        return self.node("Split", [x, self.const("split", np.array(sizes, np.int64))], parts, axis=axis)

    def slice(self, x: str, start: int, end: int, *, axis: int = 1) -> str:
        if self.opset < 10:
            return self.node("Slice", [x], starts=[start], ends=[end], axes=[axis])[0]
        ints = lambda v: self.const("slice", np.array([v], np.int64))
        return self.node("Slice", [x, ints(start), ints(end), ints(axis)])[0]

    def grouped_conv(self, x: str, in_ch: int, out_ch: int, groups: int, *, form: str = "native",
                     kernel=(3, 3), bias: bool = True, inner_group: int = 1, axis: int = 1,
                     split_style: str = "auto", **attrs) -> str:
        """A grouped convolution ``in_ch → out_ch`` with ``groups`` groups, in the given form.
        In the split forms each branch may itself be grouped (``inner_group``)."""
        total_groups = groups * inner_group
        weight = self.weight((out_ch, in_ch // total_groups, *kernel), in_ch // total_groups * int(np.prod(kernel)))
        b = (self.rng.standard_normal(out_ch) * 0.1).astype(np.float32) if bias else None
        if form == "native":
            return self.conv(x, weight, b, group=total_groups, kernel_shape=list(kernel), **attrs)
        width, out_width = in_ch // groups, out_ch // groups
        if form == "split":
            parts = self.split(x, in_ch, groups, axis=axis, style=split_style)
        elif form == "slice":
            last = lambda i: INT64_MAX if i == groups - 1 else (i + 1) * width
            parts = [self.slice(x, i * width, last(i), axis=axis) for i in range(groups)]
        else:
            raise ValueError(form)
        outs = [self.conv(p, weight[i * out_width:(i + 1) * out_width],
                          None if b is None else b[i * out_width:(i + 1) * out_width],
                          group=inner_group, kernel_shape=list(kernel), **attrs)
                for i, p in enumerate(parts)]
        return self.node("Concat", outs, axis=axis)[0]


def grouped_block(form: str = "split", *, groups: int = 4, channels: int = 16, out_channels: int = 16,
                  spatial: tuple[int, ...] = (8, 8), opset: int = 17, seed: int = 0, **conv) -> onnx.ModelProto:
    """``x → grouped conv → Relu → y``: the smallest model with one candidate."""
    b = GraphBuilder(opset, seed)
    kernel = conv.pop("kernel", (3,) * len(spatial))
    conv.setdefault("pads", [1] * 2 * len(spatial) if all(k == 3 for k in kernel) else [0] * 2 * len(spatial))
    y = b.grouped_conv("x", channels, out_channels, groups, form=form, kernel=kernel, **conv)
    y = b.node("Relu", [y], name="relu")[0]
    b.nodes.append(helper.make_node("Identity", [y], ["y"], name="output"))
    return b.model([("x", [1, channels, *spatial])], [("y", [None] * (2 + len(spatial)))], name=f"grouped_{form}")


def resnext50(form: str = "native", *, groups: int = 32, width_per_group: int = 4, image: int = 224,
              batch: int | str = 1, opset: int = 17, seed: int = 0, classes: int = 1000) -> onnx.ModelProto:
    """A ResNeXt-50 (32×4d)-shaped network: the torchvision layout with BatchNorm folded into
    conv biases. About 25 M parameters (100 MB of float32)."""
    b = GraphBuilder(opset, seed)
    x = b.conv("input", b.weight((64, 3, 7, 7), 3 * 49), np.zeros(64, np.float32),
               kernel_shape=[7, 7], strides=[2, 2], pads=[3, 3, 3, 3])
    x = b.node("Relu", [x])[0]
    x = b.node("MaxPool", [x], kernel_shape=[3, 3], strides=[2, 2], pads=[1, 1, 1, 1])[0]
    in_ch = 64
    for stage, (blocks, planes) in enumerate(zip([3, 4, 6, 3], [64, 128, 256, 512])):
        width = planes * width_per_group * groups // 64
        out_ch = planes * 4
        for block in range(blocks):
            stride = 2 if block == 0 and stage > 0 else 1
            bias = lambda n: (b.rng.standard_normal(n) * 0.05).astype(np.float32)
            y = b.conv(x, b.weight((width, in_ch, 1, 1), in_ch), bias(width), kernel_shape=[1, 1])
            y = b.node("Relu", [y])[0]
            y = b.grouped_conv(y, width, width, groups, form=form, kernel=(3, 3), pads=[1, 1, 1, 1],
                               strides=[stride, stride])
            y = b.node("Relu", [y])[0]
            y = b.conv(y, b.weight((out_ch, width, 1, 1), width) * 0.5, bias(out_ch), kernel_shape=[1, 1])
            shortcut = x
            if block == 0:
                shortcut = b.conv(x, b.weight((out_ch, in_ch, 1, 1), in_ch) * 0.5, bias(out_ch),
                                  kernel_shape=[1, 1], strides=[stride, stride])
            x = b.node("Relu", [b.node("Add", [y, shortcut])[0]])[0]
            in_ch = out_ch
    x = b.node("GlobalAveragePool", [x])[0]
    x = b.node("Flatten", [x], axis=1)[0]
    fc = b.const("fc.weight", b.weight((classes, in_ch), in_ch))
    b.nodes.append(helper.make_node("Gemm", [x, fc, b.const("fc.bias", np.zeros(classes, np.float32))],
                                    ["logits"], name="fc", transB=1))
    return b.model([("input", [batch, 3, image, image])], [("logits", [batch, classes])],
                   name=f"resnext50_{form}")
