"""Write ONNX fixtures with PyTorch's real exporters (hand-made grouped convs), for the tests.

Needs torch==2.13.0 (CPU), onnx, onnxruntime, onnxscript, numpy — kept apart from the project's
venv:

    python3 -m venv /work/venv-torch
    /work/venv-torch/bin/pip install torch==2.13.0 onnx onnxruntime onnxscript numpy
    /work/venv-torch/bin/python samples/exporters/export_torch.py            # tests/fixtures/torch/
    /work/venv-torch/bin/python samples/exporters/export_torch.py --resnext  # + ResNeXt-50 pair

Each fixture NAME.onnx gets NAME.npz beside it (x: the fixed input, y: the torch output), and
tests/fixtures/torch/README.md says which exporter wrote which file and what it looks like.

--resnext writes resnext50_32x4d_chunk.onnx / resnext50_32x4d_grouped.onnx (+ .npz) to
--resnext-out (default /tmp/resnext_torch): torchvision's ResNeXt-50 32x4d layout with BN folded
away (plain conv biases), the grouped 3x3 written once as torch.chunk(32) + 32 Conv2d + cat and
once as nn.Conv2d(groups=32), sharing the same weights. Too big (~100 MB each) for fixtures.
"""

from __future__ import annotations

import argparse
import io
import sys
import warnings
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import torch
import torch.nn as nn

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
sys.path.insert(0, str(HERE))
from describe import describe, op_counts

warnings.filterwarnings("ignore", category=DeprecationWarning)
warnings.filterwarnings("ignore", category=UserWarning)
warnings.filterwarnings("ignore", category=FutureWarning)

MAX_BYTES = 200 * 1024
TOL = 1e-4


# --------------------------------------------------------------------------------------------
# Small hand-made grouped convolutions
# --------------------------------------------------------------------------------------------


class ChunkConv2d(nn.Module):
    """a. torch.chunk(x, 4, 1) -> 4 x Conv2d(4, 8, 3, padding=1) -> cat(dim=1)."""

    def __init__(self, groups=4, cin=4, cout=8):
        super().__init__()
        self.groups = groups
        self.convs = nn.ModuleList(nn.Conv2d(cin, cout, 3, padding=1) for _ in range(groups))

    def forward(self, x):
        return torch.cat([c(p) for c, p in zip(self.convs, torch.chunk(x, self.groups, 1))], dim=1)


class SplitConv2d(ChunkConv2d):
    """b. torch.split(x, 4, 1) -> 4 x Conv2d(4, 8, 3, padding=1) -> cat(dim=1)."""

    def forward(self, x):
        return torch.cat([c(p) for c, p in zip(self.convs, torch.split(x, 4, 1))], dim=1)


class ChunkBnRelu(nn.Module):
    """c. chunk(4) -> per branch Conv2d(4, 8, 3, pad 1) -> BatchNorm2d(8) -> ReLU -> cat."""

    def __init__(self):
        super().__init__()
        self.branches = nn.ModuleList(
            nn.Sequential(nn.Conv2d(4, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU()) for _ in range(4)
        )
        for b in self.branches:  # non-trivial statistics, so BN is not an identity
            bn = b[1]
            with torch.no_grad():
                bn.weight.uniform_(0.5, 1.5)
                bn.bias.uniform_(-0.5, 0.5)
                bn.running_mean.uniform_(-0.2, 0.2)
                bn.running_var.uniform_(0.5, 2.0)

    def forward(self, x):
        return torch.cat([b(p) for b, p in zip(self.branches, torch.chunk(x, 4, 1))], dim=1)


class ResNeXtBranches(nn.Module):
    """d. ResNeXt fig. 3 form: 4 branches on the SAME x, Conv1x1(16->4) -> ReLU -> Conv3x3(4->4) -> ReLU, cat.

    Equal to a wide Conv1x1(16->16) -> ReLU -> Conv3x3(16->16, groups=4) -> ReLU.
    """

    def __init__(self):
        super().__init__()
        self.branches = nn.ModuleList(
            nn.Sequential(nn.Conv2d(16, 4, 1), nn.ReLU(), nn.Conv2d(4, 4, 3, padding=1), nn.ReLU()) for _ in range(4)
        )

    def forward(self, x):
        return torch.cat([b(x) for b in self.branches], dim=1)


class ChunkConvTranspose(nn.Module):
    """e. chunk(4) -> ConvTranspose2d(4, 4, 4, stride 2, pad 1) per branch -> cat (8x8 -> 16x16)."""

    def __init__(self):
        super().__init__()
        self.convs = nn.ModuleList(nn.ConvTranspose2d(4, 4, 4, stride=2, padding=1) for _ in range(4))

    def forward(self, x):
        return torch.cat([c(p) for c, p in zip(self.convs, torch.chunk(x, 4, 1))], dim=1)


class DepthwiseChunk(nn.Module):
    """f. chunk(8) into single channels -> Conv2d(1, 2, 3, padding=1) each -> cat (depthwise, multiplier 2)."""

    def __init__(self):
        super().__init__()
        self.convs = nn.ModuleList(nn.Conv2d(1, 2, 3, padding=1) for _ in range(8))

    def forward(self, x):
        return torch.cat([c(p) for c, p in zip(self.convs, torch.chunk(x, 8, 1))], dim=1)


# name -> (module class, input shape, exporter, export options, description)
LEGACY = "torch.onnx.export(dynamo=False) (TorchScript)"
DYNAMO = "torch.onnx.export(dynamo=True) (torch.export + onnxscript)"
DYN_AXES = {"x": {0: "batch"}, "y": {0: "batch"}}

FIXTURES = [
    ("torch_chunk_conv2d", ChunkConv2d, (1, 16, 8, 8), "legacy", dict(opset_version=17),
     "chunk(x,4,1) -> 4 Conv2d(4,8,3,p1) -> cat"),
    ("torch_chunk_conv2d_opset11", ChunkConv2d, (1, 16, 8, 8), "legacy", dict(opset_version=11),
     "same model, opset 11"),
    ("torch_chunk_conv2d_dynbatch", ChunkConv2d, (2, 16, 8, 8), "legacy",
     dict(opset_version=17, dynamic_axes=DYN_AXES), "same model, dynamic batch axis 'batch' (x has batch 2)"),
    ("torch_split_conv2d", SplitConv2d, (1, 16, 8, 8), "legacy", dict(opset_version=17),
     "split(x,4,1) -> 4 Conv2d(4,8,3,p1) -> cat"),
    ("torch_split_conv2d_opset11", SplitConv2d, (1, 16, 8, 8), "legacy", dict(opset_version=11),
     "same model, opset 11 (Split sizes as attribute)"),
    ("torch_chunk_bn_relu", ChunkBnRelu, (1, 16, 8, 8), "legacy", dict(opset_version=17),
     "chunk(4) -> Conv2d -> BatchNorm2d -> ReLU per branch -> cat; eval, BN folded by the exporter"),
    ("torch_chunk_bn_relu_nofold", ChunkBnRelu, (1, 16, 8, 8), "legacy",
     dict(opset_version=17, do_constant_folding=False),
     "same model with do_constant_folding=False: BatchNormalization nodes kept"),
    ("torch_resnext_branches", ResNeXtBranches, (1, 16, 8, 8), "legacy", dict(opset_version=17),
     "4 branches on the same x: Conv1x1(16->4) -> ReLU -> Conv3x3(4->4) -> ReLU, cat"),
    ("torch_chunk_convtranspose", ChunkConvTranspose, (1, 16, 8, 8), "legacy", dict(opset_version=17),
     "chunk(4) -> ConvTranspose2d(4,4,4,s2,p1) per branch -> cat"),
    ("torch_depthwise_chunk", DepthwiseChunk, (1, 8, 8, 8), "legacy", dict(opset_version=17),
     "chunk(8) single channels -> Conv2d(1,2,3,p1) each -> cat"),
    ("torch_chunk_conv2d_dynamo", ChunkConv2d, (1, 16, 8, 8), "dynamo", dict(opset_version=18),
     "chunk(x,4,1) -> 4 Conv2d -> cat, dynamo exporter"),
    ("torch_chunk_conv2d_dynamo_dynbatch", ChunkConv2d, (2, 16, 8, 8), "dynamo",
     dict(opset_version=18, dynamic_shapes={"x": {0: "batch"}}),
     "same, dynamo exporter, dynamic batch (x has batch 2)"),
    ("torch_split_conv2d_dynamo", SplitConv2d, (1, 16, 8, 8), "dynamo", dict(opset_version=18),
     "split(x,4,1) -> 4 Conv2d -> cat, dynamo exporter"),
    ("torch_chunk_bn_relu_dynamo", ChunkBnRelu, (1, 16, 8, 8), "dynamo", dict(opset_version=18),
     "chunk(4) -> Conv2d -> BatchNorm2d -> ReLU -> cat, dynamo exporter"),
]


def _export(model: nn.Module, x: torch.Tensor, exporter: str, opts: dict) -> onnx.ModelProto:
    if exporter == "legacy":
        f = io.BytesIO()
        torch.onnx.export(model, (x,), f, dynamo=False, input_names=["x"], output_names=["y"], **opts)
        return onnx.load_from_string(f.getvalue())
    opts = dict(opts)
    if "dynamic_shapes" in opts:
        opts["dynamic_shapes"] = {k: {ax: torch.export.Dim(n) for ax, n in v.items()}
                                  for k, v in opts["dynamic_shapes"].items()}
    prog = torch.onnx.export(model, (x,), dynamo=True, input_names=["x"], output_names=["y"],
                             verbose=False, **opts)
    return prog.model_proto


def verify(path: Path, x: np.ndarray, y: np.ndarray) -> float:
    onnx.checker.check_model(str(path), full_check=True)
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    got = sess.run(None, {sess.get_inputs()[0].name: x})[0]
    if got.shape != y.shape:
        raise AssertionError(f"{path.name}: shape {got.shape} != {y.shape}")
    err = float(np.max(np.abs(got - y)))
    if err > TOL:
        raise AssertionError(f"{path.name}: onnxruntime differs from torch by {err:g}")
    return err


def build_fixtures(out: Path) -> list[dict]:
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    for name, cls, shape, exporter, opts, what in FIXTURES:
        torch.manual_seed(0)
        model = cls().eval()
        x = torch.randn(*shape, generator=torch.Generator().manual_seed(1))
        with torch.no_grad():
            y = model(x)
        row = dict(name=name, exporter=LEGACY if exporter == "legacy" else DYNAMO, what=what,
                   opts={k: v for k, v in opts.items()})
        try:
            proto = _export(model, x, exporter, opts)
        except Exception as e:  # record, do not hide: the README says why
            row["failed"] = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
            print(f"FAILED {name}: {row['failed']}")
            rows.append(row)
            continue
        path = out / f"{name}.onnx"
        onnx.save(proto, str(path))
        np.savez(out / f"{name}.npz", x=x.numpy(), y=y.numpy())
        size = path.stat().st_size
        if size > MAX_BYTES:
            raise AssertionError(f"{name}: {size} bytes, over {MAX_BYTES}")
        err = verify(path, x.numpy(), y.numpy())
        row.update(size=size, err=err, pattern=describe(proto), nodes=op_counts(proto))
        print(f"{path.relative_to(REPO) if path.is_relative_to(REPO) else path}  {size:>7} B  "
              f"max|ort-torch|={err:.2e}\n    {row['pattern']}\n    nodes: {row['nodes']}")
        rows.append(row)
    return rows


def write_readme(out: Path, rows: list[dict]) -> None:
    lines = [
        "# PyTorch-exported fixtures",
        "",
        "Written by real PyTorch exporters; do not edit by hand. Rebuild (from the repo root):",
        "",
        "```",
        "python3 -m venv /work/venv-torch",
        "/work/venv-torch/bin/pip install torch==2.13.0 onnx onnxruntime onnxscript numpy",
        "/work/venv-torch/bin/python samples/exporters/export_torch.py",
        "```",
        "",
        f"torch {torch.__version__}, onnx {onnx.__version__}, onnxruntime {ort.__version__}"
        + (f", onnxscript {_ver('onnxscript')}" if _ver("onnxscript") else "") + ".",
        "All models are `eval()`, seeded (`torch.manual_seed(0)`), exported with input name `x` and",
        "output name `y`. Each `NAME.npz` holds `x` (the fixed input) and `y` (the torch output);",
        f"onnxruntime reproduces `y` within {TOL:g} (checked when written). The pattern lines are",
        "produced by `samples/exporters/describe.py` from the files themselves.",
        "",
        "What the exporters write:",
        "",
        "- Legacy (TorchScript) exporter, `torch.chunk(x, N, 1)`, at opset 11 and 17 alike, with a",
        "  static or a dynamic batch: one `Shape(x) -> Gather(axis=0, indices=Constant[1]) ->",
        "  Add(Constant[N-1]) -> Div(Constant[N])` (the chunk size, ceil(C/N)), then per branch i",
        "  `Mul(size, Constant[i+1])` as `ends`; `starts` is `Constant[0]` for branch 0 and the",
        "  previous branch's Mul output after that; `axes` is the same `Constant[1]` as the Gather",
        "  index; no `steps` input. These Shape-based bounds stay even with a fully static input",
        "  and `do_constant_folding=True`.",
        "- Legacy exporter, `torch.split(x, 4, 1)`: one `Split(axis=1)` with sizes",
        "  `Constant[4,4,4,4]` as input (opset 17) or as the `split` attribute (opset 11).",
        "- Legacy exporter, BatchNorm2d after each branch's Conv2d in eval mode: folded into the",
        "  Conv weights and bias (default `do_constant_folding=True`); `BatchNormalization` nodes",
        "  stay with `do_constant_folding=False` (`*_nofold`).",
        "- Dynamo exporter (opset 18): `torch.chunk` and `torch.split` both become one",
        "  `Split(axis=1, num_outputs=N)` with no sizes input, no Shape ops, also with a dynamic",
        "  batch; its optimizer folds eval-mode BatchNorm2d into the Conv.",
        "- The ResNeXt fig. 3 form (`torch_resnext_branches`) has no slicing at all: N branches",
        "  read the same tensor.",
        "",
        "`--resnext [--resnext-out DIR]` also writes `resnext50_32x4d_chunk.onnx` and",
        "`resnext50_32x4d_grouped.onnx` (+ `.npz`, ~100 MB each, not kept here): torchvision's",
        "ResNeXt-50 32x4d layout with plain conv biases (no BN), the grouped 3x3 written as",
        "`torch.chunk(32)` + 32 `Conv2d` + `cat` vs `nn.Conv2d(groups=32)`, same weights, same",
        "output (asserted in torch), input 1x3x224x224, legacy exporter, opset 17.",
        "",
    ]
    for r in rows:
        lines.append(f"## {r['name']}.onnx")
        lines.append("")
        lines.append(f"- model: {r['what']}")
        lines.append(f"- exporter: {r['exporter']}, options: `{_opts_str(r['opts'])}`")
        if "failed" in r:
            lines.append(f"- **export failed**: {r['failed']}")
        else:
            lines.append(f"- pattern: {r['pattern']}")
            lines.append(f"- nodes: {r['nodes']}")
            lines.append(f"- size: {r['size']} bytes; max |onnxruntime - torch| = {r['err']:.1e}")
        lines.append("")
    (out / "README.md").write_text("\n".join(lines))


def _opts_str(opts: dict) -> str:
    return ", ".join(f"{k}={v!r}" for k, v in opts.items())


def _ver(mod: str) -> str | None:
    try:
        return __import__(mod).__version__
    except Exception:
        return None


# --------------------------------------------------------------------------------------------
# ResNeXt-50 32x4d (torchvision layout, BN folded away: plain conv biases)
# --------------------------------------------------------------------------------------------


class ChunkGroupedConv3x3(nn.Module):
    """The hand-made grouped 3x3: torch.chunk(x, groups, 1) -> groups x Conv2d -> cat."""

    def __init__(self, width: int, groups: int, stride: int):
        super().__init__()
        self.groups = groups
        w = width // groups
        self.convs = nn.ModuleList(nn.Conv2d(w, w, 3, stride=stride, padding=1) for _ in range(groups))

    def forward(self, x):
        return torch.cat([c(p) for c, p in zip(self.convs, torch.chunk(x, self.groups, 1))], dim=1)


class Bottleneck(nn.Module):
    expansion = 4

    def __init__(self, inplanes, planes, stride=1, chunked=False, groups=32, base_width=4):
        super().__init__()
        width = int(planes * (base_width / 64.0)) * groups
        self.conv1 = nn.Conv2d(inplanes, width, 1)
        if chunked:
            self.conv2 = ChunkGroupedConv3x3(width, groups, stride)
        else:
            self.conv2 = nn.Conv2d(width, width, 3, stride=stride, padding=1, groups=groups)
        self.conv3 = nn.Conv2d(width, planes * self.expansion, 1)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = None
        if stride != 1 or inplanes != planes * self.expansion:
            self.downsample = nn.Sequential(nn.Conv2d(inplanes, planes * self.expansion, 1, stride=stride))

    def forward(self, x):
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.conv1(x))
        out = self.relu(self.conv2(out))
        out = self.conv3(out)
        return self.relu(out + identity)


class ResNeXt50(nn.Module):
    def __init__(self, chunked=False, layers=(3, 4, 6, 3), num_classes=1000):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 64, 7, stride=2, padding=3)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, stride=2, padding=1)
        inplanes = 64
        for i, (planes, n) in enumerate(zip((64, 128, 256, 512), layers)):
            blocks = []
            for b in range(n):
                blocks.append(Bottleneck(inplanes, planes, stride=(1 if i == 0 or b > 0 else 2), chunked=chunked))
                inplanes = planes * Bottleneck.expansion
            setattr(self, f"layer{i + 1}", nn.Sequential(*blocks))
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Linear(512 * Bottleneck.expansion, num_classes)

    def forward(self, x):
        x = self.maxpool(self.relu(self.conv1(x)))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(torch.flatten(self.avgpool(x), 1))


def grouped_to_chunked(grouped: ResNeXt50) -> ResNeXt50:
    """The chunk(32) network carrying exactly the grouped network's weights."""
    chunked = ResNeXt50(chunked=True).eval()
    src = grouped.state_dict()
    dst = {}
    for key, value in chunked.state_dict().items():
        if ".conv2.convs." in key:  # layerX.Y.conv2.convs.I.weight|bias
            prefix, rest = key.split(".conv2.convs.")
            i, kind = rest.split(".")
            full = src[f"{prefix}.conv2.{kind}"]
            per = full.shape[0] // 32
            dst[key] = full[int(i) * per:(int(i) + 1) * per].clone()
        else:
            dst[key] = src[key]
        assert dst[key].shape == value.shape, key
    chunked.load_state_dict(dst)
    return chunked


def build_resnext(out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    grouped = ResNeXt50(chunked=False).eval()
    chunked = grouped_to_chunked(grouped)
    x = torch.randn(1, 3, 224, 224, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        y_grouped = grouped(x)
        y_chunked = chunked(x)
    diff = float((y_grouped - y_chunked).abs().max())
    scale = float(y_grouped.abs().max())
    print(f"ResNeXt-50 32x4d: max|chunk - grouped| = {diff:.2e} (output scale {scale:.2e})")
    torch.testing.assert_close(y_chunked, y_grouped, rtol=1e-4, atol=1e-5 * max(scale, 1.0))
    for name, model, y in (("resnext50_32x4d_chunk", chunked, y_chunked),
                           ("resnext50_32x4d_grouped", grouped, y_grouped)):
        path = out / f"{name}.onnx"
        torch.onnx.export(model, (x,), str(path), dynamo=False, opset_version=17,
                          input_names=["x"], output_names=["y"])
        np.savez(out / f"{name}.npz", x=x.numpy(), y=y.numpy())
        sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        got = sess.run(None, {"x": x.numpy()})[0]
        err = float(np.max(np.abs(got - y.numpy())))
        proto = onnx.load(str(path), load_external_data=False)
        print(f"{path}  {path.stat().st_size / 1e6:.1f} MB  max|ort-torch|={err:.2e}\n    "
              f"{describe(proto)}\n    nodes: {op_counts(proto)}")
        if err > 1e-3 * max(scale, 1.0):
            raise AssertionError(f"{name}: onnxruntime differs from torch by {err:g}")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=REPO / "tests" / "fixtures" / "torch",
                    help="where the small fixtures go (default: tests/fixtures/torch)")
    ap.add_argument("--no-fixtures", action="store_true", help="skip the small fixtures")
    ap.add_argument("--resnext", action="store_true", help="also export the ResNeXt-50 32x4d pair")
    ap.add_argument("--resnext-out", type=Path, default=Path("/tmp/resnext_torch"))
    args = ap.parse_args(argv)
    if not args.no_fixtures:
        rows = build_fixtures(args.out)
        write_readme(args.out, rows)
    if args.resnext:
        build_resnext(args.resnext_out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
