"""Rebuild the sample models in samples/ (only numpy and onnx needed):

    python samples/build_samples.py
"""

from __future__ import annotations

import sys
from pathlib import Path

import onnx

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

from samples.models import grouped_block


def build() -> list[Path]:
    written = []
    samples = {
        # ResNeXt-style block: 32 channels in 8 groups, Split form (opset 17, sizes as input).
        "grouped_split.onnx": grouped_block("split", groups=8, channels=32, out_channels=32, spatial=(16, 16)),
        # The same block as PyTorch-style Slices (the last one open-ended).
        "grouped_slice.onnx": grouped_block("slice", groups=8, channels=32, out_channels=32, spatial=(16, 16)),
        # A near miss: branches with different strides cannot become one grouped Conv.
        "near_miss_strides.onnx": _near_miss(),
    }
    for name, model in samples.items():
        onnx.checker.check_model(model)
        path = HERE / name
        onnx.save(model, path)
        written.append(path)
    return written


def _near_miss() -> onnx.ModelProto:
    model = grouped_block("split", groups=2, channels=8, out_channels=8, spatial=(8, 8))
    convs = [n for n in model.graph.node if n.op_type == "Conv"]
    convs[1].attribute.append(onnx.helper.make_attribute("dilations", [2, 2]))
    for attr in convs[1].attribute:
        if attr.name == "pads":
            attr.ints[:] = [2, 2, 2, 2]
    return model


if __name__ == "__main__":
    for path in build():
        print(path.relative_to(HERE.parent))
