"""Zoo battery: public architectures (random weights) through the gconv-rewrite CLI, and OpenVINO beside it.

    python benchmarks/zoo.py                       # export everything to a tmp dir, run the battery
    python benchmarks/zoo.py --out /tmp/zoo --only resnext --only regnet   # filters: substrings of model names
    python benchmarks/zoo.py --out /tmp/zoo --skip-export                 # re-run the CLI on the files there
    python benchmarks/zoo.py --frameworks torch --variant chunk           # torch,keras,tfkeras; native,chunk,...
    python benchmarks/zoo.py --cli-env TF_ENABLE_ONEDNN_OPTS=0            # the CLI as on a non-x86 TF build
    python benchmarks/zoo.py --full-matrix          # every exporter/batch/BN variant of every grouped torch model
    python benchmarks/zoo.py --fixtures /work/zoo   # also copy the exported models there

Writes benchmarks/zoo_results.md and benchmarks/zoo_results.json (or --results PREFIX). Never commit the
generated models: they live under --out (default: a fresh tmp dir).

Environment (its own, never the test environment; CI needs none of this):

    python3 -m venv /work/zoo-venv
    /work/zoo-venv/bin/pip install -e ".[test]" -r benchmarks/zoo-requirements.txt
    # torch==2.13.0 is the CPU wheel on this machine's disk: pip must not pull a CUDA torch.
    # torchvision 0.28.0 is the release for torch 2.13.0; PyPI's wheel is built against a torch that
    # registers its C++ ops, and on import it registers fake kernels for torchvision::nms and ::qnms,
    # which then "do not exist" beside the CPU torch. The classification models need none of its compiled
    # ops, so `_import_torchvision` declares those two schemas with torch.library before importing it.

What it exports (no downloads: every model is built with random weights):

* torch (torchvision + timm), exported with the TorchScript exporter (``dynamo=False``, opset 17, "ts") and
  the dynamo exporter ("dynamo"), static batch and ``dynamic_axes``/``dynamic_shapes`` batch ("-dyn"):
  - natively grouped: ResNeXt (torchvision layout, one block a stage), RegNetX/Y-400MF, ResNeSt-14d, DPN-68,
    timm ResNeXt26-ts and RegNetZ-B16 (ByobNet blocks: the grouped 3x3 is a ConvNormAct whose BatchNormAct2d
    applies SiLU), ShuffleNetV2 x0.5, MobileNetV3-Small, ConvNeXt-atto;
  - parallel branches that must stay: GoogLeNet, SqueezeNet 1.1, Inception v3, Res2Net-50 14w8s (one block a
    stage), GhostNet-050, MixNet-S (its MixedConv2d splits with *different* kernels must stay; its pointwise
    MixedConv2d with equal 1x1 kernels is a genuine hand-made grouped conv and may fuse);
  - "legacy" variants of the grouped ones: every ``nn.Conv2d`` with ``1 < groups < in_channels`` (grouped,
    not depthwise) replaced by ``torch.chunk -> N Conv2d -> torch.cat`` ("chunk"), and by ``torch.chunk ->
    N (Conv2d -> BatchNorm2d) -> torch.cat`` ("chunkbn", fresh BN as in any untrained export). Depthwise
    convs (groups == in_channels) stay native there: a legacy depthwise conv is C one-channel branches, so
    it is exercised once, on ShuffleNetV2 ("chunkdw", every grouped conv incl. depthwise, TorchScript only).
    Each legacy file is compared with its native twin from the same exporter: the original model for
    "chunk", and for "chunkbn" the model with each grouped conv followed by one BatchNorm2d holding the
    branches' BN parameters ("nativebn"), which is what a fused + BN-folded legacy export should equal.
    "chunkbnact" (models with timm ConvNormAct blocks around a grouped conv): ``torch.chunk -> N (Conv2d ->
    BatchNorm2d -> SiLU) -> torch.cat``, the block's activation moved into each branch (issue #20, finding 7).
    Each branch's BN holds the channel slice of the block's BN parameters and SiLU is channel-wise, so the
    legacy model computes what the native one does and its twin is the native export from the same exporter
    (TorchScript and dynamo, static batch): fused, it must end with the same Conv count and groups.
* the second zoo (issue #21, TORCH_PLAN): timm's SE-ResNeXt-26d, SK-ResNeXt-50, RegNetX/Y-002, CSPResNeXt-50,
  DLA-46x-C, Res2NeXt-50, GC-ResNeXt-26ts, NF-RegNet-B0 (ScaledStdConv2d: grouped weights standardised at run
  time), ESE-VoVNet-19b-dw, ReXNet-100 (partial residual: slices joined by a Concat), HGNetV2-B0 and
  HRNet-W18-small, each TorchScript export at its own opset (11 to 20) and by the dynamo exporter, with a
  few hand-made forms each (chunk, chunkbnact, "slice" = ``x[:, a:b]``, "split" = ``torch.split``; static
  and dynamic batch) instead of every form on every model.
* legacy Keras code (``benchmarks/zoo_keras_legacy.py``, framework "legacy"): ResNeXt, SE-ResNeXt, ShuffleNet
  v1, AlexNet's two channels_first towers and DPN written in the idioms of public Keras repositories (late-
  and correctly bound Lambda slices, Lambdas wrapping named functions, Keras 2 backend calls, tf.split /
  tf.concat), .h5 by tf-keras and .keras by Keras 3 where the code runs there; --check, --fuse, --to onnx and
  --to tflite (with --trust-lambdas, and --repair-late-binding where late-bound), every written file run and
  compared with the model as its author meant it, at the features before the classifier. Its docstring says
  more; its table closes zoo_results.md.
* keras.applications (Keras 3): MobileNetV3Small, ConvNeXtTiny (Conv2D groups=channels), Xception
  (SeparableConv2D and parallel branches; nothing to do) as .keras, .h5 and SavedModel (``model.export``);
  tf_keras.applications: RegNetX002/RegNetY002 (Conv2D groups, group width 8; Keras 3 has no RegNet), and the
  same three, as .keras, .h5 and SavedModel (``model.save(dir, save_format="tf")``). tf-keras writes TFOpLambda
  layers (tf.__operators__.add, tf.nn.relu6, tf.math.reduce_mean, ...): valuable inputs. Legacy tf-keras
  variants of the RegNets (.h5): each grouped Conv2D as ``tf.split`` (a TFOpLambda) → N Conv2D → Concatenate
  ("split"), with a BatchNormalization per branch ("splitbn"), and joined by ``tf.concat`` (another
  TFOpLambda) instead of a Concatenate layer ("splitconcat", issue #20, finding 8); their twin is the native .h5.
  Which saves each model gets is KERAS_FORMATS (each Keras CLI call pays TensorFlow's import and a rebuild).
  Depthwise-only Keras models get no --expand (C one-channel Conv2D layers take Keras minutes; ONNX covers it).

What it runs per file (the CLI in a subprocess, ``--format json --report``, verification on):
``--check``, ``--fuse``, and for natively grouped files ``--expand`` then ``--fuse`` of the expanded file.
It records exit codes, the one-line error, rewrites/skips, node and op counts, Conv count and the multiset of
``group`` attributes of every written ONNX (Keras: Conv layers and their ``groups``) against the native twin,
and the wall time of each call. "silent" (issue #20: clean means looked): for each ONNX/.keras/.h5 file
that gets ``--check`` or ``--fuse`` (the expanded files' fuse included), the Concats (Keras: ``Concatenate``
layers and ``tf.concat`` TFOpLambdas) behind whose inputs (through channel-wise ops: activations, BN, Q/DQ,
Add/Mul...) at least two distinct convs read Split/Slice outputs (Keras: ``tf.split``/getitem/``GetItem``/
``Lambda``) of one tensor, and that the report neither lists in a rewrite's ``nodes`` (or ``location``) nor
names as a ``skipped`` ``location``. It is read from the file and the report here, apart from the tool's
own matcher, so that it checks it; any is a problem. Network structure (U-Net skips, DenseNet, Inception,
CSP concats of convs of one whole tensor) is not counted: the tool leaves that silent by design. SavedModels
are not read ("–"). ``meta.commit`` is the commit of the checkout the CLI imports (``pip install -e``), not
this script's. Beside it, OpenVINO (``openvino.convert_model`` → compile on CPU →
``get_runtime_model()``): how many grouped (5-D weights / GroupConvolution) and plain convolutions it ends with
on the same legacy files, and what its converted (pre-plugin) model holds.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
import traceback
import zipfile
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ.setdefault("ABSL_MIN_LOG_LEVEL", "3")
os.environ.setdefault("GRPC_VERBOSITY", "ERROR")
os.environ.setdefault("KMP_WARNINGS", "0")

REPO = Path(__file__).resolve().parents[1]
HERE = Path(__file__).resolve()
CLI_TIMEOUT = 600
CLI_ENV: dict[str, str] = {}

# --------------------------------------------------------------------------------------------------------------
# Model zoo (torch)
# --------------------------------------------------------------------------------------------------------------

# name: (family, builder key, input size, kind)   kind: grouped | depthwise | branches | mixed
TORCH_MODELS = {
    "resnext_tv_32x4d": ("torchvision", 64, "grouped"),
    "regnet_x_400mf": ("torchvision", 64, "grouped"),
    "regnet_y_400mf": ("torchvision", 64, "grouped"),
    "resnest14d": ("timm", 64, "grouped"),
    "dpn68": ("timm", 64, "grouped"),
    # timm ByobNet blocks: the grouped 3x3 is a ConvNormAct whose BatchNormAct2d applies SiLU ("chunkbnact")
    "resnext26ts": ("timm", 64, "grouped"),
    "regnetz_b16": ("timm", 64, "grouped"),
    "shufflenet_v2_x0_5": ("torchvision", 64, "depthwise"),
    "mobilenet_v3_small": ("torchvision", 64, "depthwise"),
    "convnext_atto": ("timm", 64, "depthwise"),
    "googlenet": ("torchvision", 64, "branches"),
    "squeezenet1_1": ("torchvision", 64, "branches"),
    "inception_v3": ("torchvision", 96, "branches"),
    "res2net50_14w_8s": ("timm", 64, "branches"),
    "ghostnet_050": ("timm", 64, "branches"),
    "mixnet_s": ("timm", 64, "mixed"),
    # issue #21, the second zoo: each brings a grouped-conv idiom the ones above lack (kwargs in TIMM_KWARGS)
    "seresnext26d_32x4d": ("timm", 64, "grouped"),  # deep stem, avg-pool shortcut, SE after the grouped 3x3
    "skresnext50_32x4d": ("timm", 64, "grouped"),  # selective kernel: two grouped convs (3x3, dilated) on one input
    "regnetx_002": ("timm", 64, "grouped"),  # timm's RegNet: grouped ConvNormAct (BN + ReLU) blocks
    "regnety_002": ("timm", 64, "grouped"),  # + SE
    "cspresnext50": ("timm", 64, "grouped"),  # CSP: half the channels bypass ResNeXt blocks, then a Concat
    "dla46x_c": ("timm", 64, "grouped"),  # DLA tree aggregation (Concat of whole tensors) with ResNeXt blocks
    "res2next50": ("timm", 64, "grouped"),  # Res2Net scales chained, each scale's conv grouped (cardinality 8)
    "gcresnext26ts": ("timm", 64, "grouped"),  # ByobNet + global context attention, grouped ConvNormAct + SiLU
    "nf_regnet_b0": ("timm", 64, "grouped"),  # ScaledStdConv2d: grouped weights standardised at run time
    "ese_vovnet19b_dw": ("timm", 64, "depthwise"),  # OSA: a Concat of every layer's output, depthwise + 1x1
    "rexnet_100": ("timm", 64, "depthwise"),  # partial residual: x[:, :c] + shortcut, concat x[:, c:] (slices!)
    "hgnetv2_b0": ("timm", 64, "depthwise"),  # HG blocks: a Concat of a chain of light (1x1 + depthwise) convs
    "hrnet_w18_small": ("timm", 64, "branches"),  # parallel resolutions, fuse layers, no groups
}

# timm kwargs that keep the second zoo's deep models small (one block a stage; same blocks, same convs)
TIMM_KWARGS = {"seresnext26d_32x4d": {"layers": [1, 1, 1, 1]}, "skresnext50_32x4d": {"layers": [1, 1, 1, 1]},
               "res2next50": {"layers": [1, 1, 1, 1]}}

# The second zoo's export plan: the TorchScript exporter's opset (11-20 across models: Split has a ``split``
# attribute below 13, an input from 13) and which hand-made forms (variant, exporter, dynamic batch) each model
# gets, spread across models instead of every form on every model (the dynamo exporter takes minutes on a model
# with hundreds of branch convs). "slice": ``x[:, a:b]`` per branch (Slice nodes); "split": ``torch.split``
# (one Split); "chunk" / "chunkbnact" as above. Each form's twin is the native export by the same exporter,
# opset and batch, which is exported too.
TORCH_PLAN = {
    "seresnext26d_32x4d": (11, [("chunk", "ts", False), ("slice", "ts", True)]),
    "skresnext50_32x4d": (12, [("chunkbnact", "ts", False), ("split", "dynamo", False)]),
    "regnetx_002": (13, [("chunkbnact", "ts", False), ("chunkbnact", "dynamo", False), ("split", "ts", True)]),
    "regnety_002": (14, [("slice", "ts", False), ("chunk", "dynamo", True)]),
    "cspresnext50": (15, [("chunkbnact", "ts", False)]),
    "dla46x_c": (16, [("chunk", "ts", True), ("split", "dynamo", False), ("slice", "ts", False)]),
    "res2next50": (18, [("chunk", "ts", False), ("split", "dynamo", False)]),
    "gcresnext26ts": (19, [("chunkbnact", "ts", False), ("slice", "dynamo", False)]),
    "nf_regnet_b0": (20, []),  # ScaledStdConv2d is no nn.Conv2d: native only (expand -> fuse round trip)
    "ese_vovnet19b_dw": (11, []),
    "rexnet_100": (13, []),
    "hgnetv2_b0": (20, []),
    "hrnet_w18_small": (17, []),
}

# Keras saves per model (each Keras CLI call costs TensorFlow's import and a Keras rebuild: keep it lean)
KERAS_FORMATS = {
    ("keras", "ConvNeXtTiny"): ("keras", "savedmodel"),
    ("keras", "MobileNetV3Small"): ("keras", "h5"),
    ("keras", "Xception"): ("keras",),
    ("tfkeras", "RegNetX002"): ("h5", "keras", "savedmodel"),  # + split/splitbn legacy .h5 (tf.split TFOpLambda)
    ("tfkeras", "RegNetY002"): ("h5",),
    ("tfkeras", "MobileNetV3Small"): ("h5", "savedmodel"),
    ("tfkeras", "ConvNeXtTiny"): ("h5",),
    ("tfkeras", "Xception"): ("h5",),
}

FULL_MATRIX = {"resnext_tv_32x4d"}  # --full-matrix: every model

KERAS_MODELS = {
    # name: (input size, kind, flavours); Keras 3 dropped RegNet from keras.applications
    "RegNetX002": (64, "grouped", ("tfkeras",)),
    "RegNetY002": (64, "grouped", ("tfkeras",)),
    "MobileNetV3Small": (64, "depthwise", ("keras", "tfkeras")),
    "ConvNeXtTiny": (64, "depthwise", ("keras", "tfkeras")),
    "Xception": (96, "branches", ("keras", "tfkeras")),
}


def _import_torchvision():
    import torch

    try:
        import torchvision
    except RuntimeError:
        for mod in [m for m in sys.modules if m.startswith("torchvision")]:
            del sys.modules[mod]
        lib = torch.library.Library("torchvision", "DEF")
        lib.define("nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
        lib.define("qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
        _import_torchvision.lib = lib
        import torchvision
    import torchvision

    return torchvision


def build_torch(name: str):
    import torch

    torch.manual_seed(0)
    family, _, _ = TORCH_MODELS[name]
    tv = _import_torchvision()
    if name == "resnext_tv_32x4d":
        # torchvision's ResNeXt-50 32x4d layout with one Bottleneck per stage (small, same grouped convs).
        from torchvision.models.resnet import Bottleneck, ResNet

        return ResNet(Bottleneck, [1, 1, 1, 1], groups=32, width_per_group=4)
    if name == "inception_v3":
        return tv.models.inception_v3(weights=None, aux_logits=False, init_weights=True)
    if name == "googlenet":
        return tv.models.googlenet(weights=None, aux_logits=False, init_weights=True)
    if family == "torchvision":
        return getattr(tv.models, name)(weights=None)
    import timm

    kwargs = dict(TIMM_KWARGS.get(name, {}))
    if name == "res2net50_14w_8s":
        kwargs["layers"] = [1, 1, 1, 1]
    return timm.create_model(name, pretrained=False, **kwargs)


def _chunk_module(conv, with_bn: bool, form: str = "chunk"):
    """A grouped ``conv`` written by hand: its input cut into N channel ranges by ``torch.chunk`` (``form``
    "chunk"), by indexing ``x[:, a:b]`` ("slice") or by ``torch.split`` with the group width ("split"), N Conv2d
    [-> BatchNorm2d], ``torch.cat``."""
    import torch
    import torch.nn as nn

    groups = conv.groups
    cin, cout = conv.in_channels // groups, conv.out_channels // groups

    def cut(x):
        if form == "slice":
            return [x[:, g * cin:(g + 1) * cin] for g in range(groups)]
        if form == "split":
            return torch.split(x, cin, 1)
        return torch.chunk(x, groups, 1)

    class ChunkConv(nn.Module):
        """torch.chunk(x, N, 1) -> N Conv2d [-> BatchNorm2d] -> torch.cat: a grouped conv written by hand."""

        def __init__(self):
            super().__init__()
            self.groups = groups
            self.convs = nn.ModuleList()
            for g in range(groups):
                c = nn.Conv2d(cin, cout, conv.kernel_size, conv.stride, conv.padding, conv.dilation,
                              bias=conv.bias is not None, padding_mode=conv.padding_mode)
                with torch.no_grad():
                    c.weight.copy_(conv.weight[g * cout:(g + 1) * cout])
                    if conv.bias is not None:
                        c.bias.copy_(conv.bias[g * cout:(g + 1) * cout])
                self.convs.append(c)
            self.bns = nn.ModuleList(nn.BatchNorm2d(cout) for _ in range(groups)) if with_bn else None

        def forward(self, x):
            parts = cut(x)
            if self.bns is None:
                return torch.cat([c(p) for c, p in zip(self.convs, parts)], 1)
            return torch.cat([b(c(p)) for c, p, b in zip(self.convs, parts, self.bns)], 1)

    return ChunkConv()


def _chunk_norm_act_module(conv_norm_act):
    """timm's ConvNormAct (grouped Conv2d -> BatchNormAct2d: BN, then its activation) as ``torch.chunk`` ->
    N (Conv2d -> BatchNorm2d -> activation) -> ``torch.cat``: the activation moved into each branch.

    Each branch's BN holds the channel slice of the block's BN parameters and the activation is channel-wise,
    so the module computes exactly what the native block computes: its twin is the unchanged model."""
    import copy

    import torch
    import torch.nn as nn

    conv, norm = conv_norm_act.conv, conv_norm_act.bn
    width = conv.out_channels // conv.groups

    class ChunkConvNormAct(nn.Module):
        """torch.chunk(x, N, 1) -> N (Conv2d -> BatchNorm2d -> activation) -> torch.cat."""

        def __init__(self):
            super().__init__()
            self.groups = conv.groups
            self.convs = _chunk_module(conv, with_bn=False).convs
            self.bns = nn.ModuleList(nn.BatchNorm2d(width, eps=norm.eps) for _ in range(conv.groups))
            for g, bn in enumerate(self.bns):
                with torch.no_grad():
                    for name in ("weight", "bias", "running_mean", "running_var"):
                        getattr(bn, name).copy_(getattr(norm, name)[g * width:(g + 1) * width])
            self.acts = nn.ModuleList(nn.Sequential(copy.deepcopy(norm.drop), copy.deepcopy(norm.act))
                                      for _ in range(conv.groups))

        def forward(self, x):
            parts = torch.chunk(x, self.groups, 1)
            return torch.cat([a(b(c(p))) for c, p, b, a in zip(self.convs, parts, self.bns, self.acts)], 1)

    return ChunkConvNormAct()


def _is_grouped_conv_norm_act(module) -> bool:
    """A timm ConvNormAct (conv, then BatchNormAct2d) around a grouped (not depthwise) Conv2d, with nothing
    after its BatchNormAct2d. By class name: DPN's BnActConv2d has the same ``conv`` and ``bn`` attributes but
    runs them the other way round (pre-activation), and moving its BN behind the conv would change the model."""
    import torch.nn as nn

    conv, norm = getattr(module, "conv", None), getattr(module, "bn", None)
    return (type(module).__name__ == "ConvNormAct" and type(conv) is nn.Conv2d and 1 < conv.groups < conv.in_channels
            and isinstance(norm, nn.BatchNorm2d) and hasattr(norm, "act") and hasattr(norm, "drop")
            and isinstance(getattr(module, "aa", None), (nn.Identity, type(None))))


def legacy_variant(model, variant: str):
    """Copy of ``model`` with its grouped convs rewritten by hand; returns (model, native twin, count).

    "chunk", "slice", "split": the three ways to cut the input (``_chunk_module``), no BN per branch.
    "chunkbnact" rewrites only timm ConvNormAct blocks (grouped conv -> BN -> SiLU) and its twin is the model
    itself: the branches' BN and activation together compute what the block's did."""
    import copy

    import torch.nn as nn

    legacy, twin = copy.deepcopy(model), copy.deepcopy(model)
    count = 0
    for (_name, module), (_, twin_module) in zip(list(legacy.named_modules()), list(twin.named_modules())):
        for child_name, child in list(module.named_children()):
            if variant == "chunkbnact":
                if _is_grouped_conv_norm_act(child):
                    count += 1
                    setattr(module, child_name, _chunk_norm_act_module(child))
                continue
            if type(child) is not nn.Conv2d or child.groups <= 1:
                continue
            depthwise = child.groups == child.in_channels
            if depthwise and variant != "chunkdw":
                continue
            count += 1
            form = variant if variant in ("slice", "split") else "chunk"
            setattr(module, child_name, _chunk_module(child, variant == "chunkbn", form))
            if variant == "chunkbn":
                twin_child = getattr(twin_module, child_name)
                setattr(twin_module, child_name, nn.Sequential(twin_child, nn.BatchNorm2d(child.out_channels)))
    return legacy, twin, count


def export_torch(model, path: Path, size: int, exporter: str, dynamic: bool, opset: int = 17) -> None:
    import torch

    model.eval()
    x = torch.randn(1, 3, size, size)
    path.parent.mkdir(parents=True, exist_ok=True)
    with torch.no_grad():
        if exporter == "ts":
            torch.onnx.export(model, (x,), str(path), dynamo=False, opset_version=opset, input_names=["x"],
                              output_names=["y"],
                              dynamic_axes={"x": {0: "batch"}, "y": {0: "batch"}} if dynamic else None)
        else:
            shapes = ({0: torch.export.Dim("batch", min=1, max=64)},) if dynamic else None
            torch.onnx.export(model, (x,), str(path), dynamo=True, input_names=["x"], output_names=["y"],
                              dynamic_shapes=shapes, external_data=False, verbose=False)


class _TorchExports:
    """One torch model's exported files: their names, which variants get written, and one
    manifest entry per file written (or failed)."""

    def __init__(self, name: str, out: Path):
        self.name = name
        self.family, self.size, self.kind = TORCH_MODELS[name]
        self.folder = out / "torch" / name
        self.entries: list[dict] = []
        # The dynamo exporter takes minutes for a model with hundreds of branch convs on 2 busy cores: the full
        # matrix runs on ResNeXt; the other grouped models get the forms that differ (a variant already on disk
        # from an earlier --full run is kept in the battery all the same).
        self.full = name in FULL_MATRIX or os.environ.get("ZOO_FULL_MATRIX") == "1"
        self.opset = TORCH_PLAN[name][0] if name in TORCH_PLAN else 17  # the TorchScript exporter's

    def file(self, variant, exporter, dynamic) -> Path:
        opset = f"-op{self.opset}" if exporter == "ts" and self.opset != 17 else ""
        return self.folder / f"{self.name}.{variant}.{exporter}{opset}{'-dyn' if dynamic else ''}.onnx"

    def export(self, model, variant, exporter, dynamic, twin=None, expected=0, role=None) -> Path:
        """Export ``model`` as this variant (unless on disk already) and record its entry; returns the file."""
        name, size = self.name, self.size
        file = self.file(variant, exporter, dynamic)
        entry = {"name": name, "framework": "torch", "family": self.family, "kind": self.kind, "variant": variant,
                 "exporter": exporter, "dynamic": dynamic, "format": "onnx", "path": str(file),
                 "input": f"x=1,3,{size},{size}", "twin": str(twin) if twin else None,
                 "legacy_convs": expected, "role": role or ("legacy" if variant.startswith(("chunk", "slice", "split"))
                                                            else "native")}
        if exporter == "ts":
            entry["opset"] = self.opset
        start = time.perf_counter()
        try:
            if not file.exists():
                export_torch(model, file, size, exporter, dynamic, self.opset)
            entry["export_seconds"] = round(time.perf_counter() - start, 2)
        except Exception as exc:
            entry["export_error"] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:300] if str(exc) else ''}"
        self.entries.append(entry)
        return file

    def wanted(self, variant, exporter, dynamic) -> bool:
        if self.full or self.file(variant, exporter, dynamic).exists():
            return True
        return (variant, exporter, dynamic) in {("chunk", "ts", False), ("chunk", "ts", True),
                                                ("chunk", "dynamo", False), ("chunkbn", "ts", False),
                                                ("nativebn", "ts", False), ("chunkbnact", "ts", False),
                                                ("chunkbnact", "dynamo", False)}


def torch_entries(name: str, out: Path) -> list[dict]:
    """Export one torch model's variants; one manifest entry per file written (or failed)."""
    import warnings

    warnings.filterwarnings("ignore")
    exports = _TorchExports(name, out)
    model = build_torch(name).eval()
    if name in TORCH_PLAN:
        _export_planned(exports, model)
        return exports.entries
    exports.export(model, "native", "ts", False)
    exports.export(model, "native", "dynamo", False)
    if exports.kind in ("grouped", "depthwise"):
        exports.export(model, "native", "ts", True)
    if exports.kind == "grouped":
        _export_legacy_grouped(exports, model)
    if name == "shufflenet_v2_x0_5":
        legacy, _, count = legacy_variant(model, "chunkdw")
        exports.export(legacy, "chunkdw", "ts", False, exports.file("native", "ts", False), count)
    return exports.entries


def _export_planned(exports: _TorchExports, model) -> None:
    """The second zoo (TORCH_PLAN): the native model by both exporters (and with a dynamic batch by the
    TorchScript one, for grouped and depthwise models), then each planned hand-made form beside its twin."""
    exports.export(model, "native", "ts", False)
    exports.export(model, "native", "dynamo", False)
    if exports.kind in ("grouped", "depthwise"):
        exports.export(model, "native", "ts", True)
    legacy_models = {}
    for variant, exporter, dynamic in TORCH_PLAN[exports.name][1]:
        if variant not in legacy_models:
            legacy_models[variant] = legacy_variant(model, variant)
        legacy, _, count = legacy_models[variant]
        if not count:
            continue
        twin = exports.file("native", exporter, dynamic)
        if not any(e["path"] == str(twin) for e in exports.entries):
            exports.export(model, "native", exporter, dynamic)
        exports.export(legacy, variant, exporter, dynamic, twin, count)


def _export_legacy_grouped(exports: _TorchExports, model) -> None:
    """The hand-made forms of a grouped model ("chunk", "chunkbn"), each beside its native twin."""
    legacy, _, count = legacy_variant(model, "chunk")
    for exporter, dynamic in (("ts", False), ("ts", True), ("dynamo", False), ("dynamo", True)):
        if not exports.wanted("chunk", exporter, dynamic):
            continue
        twin = exports.file("native", exporter, dynamic)
        if exporter == "dynamo" and dynamic:
            exports.export(model, "native", "dynamo", True)
        exports.export(legacy, "chunk", exporter, dynamic, twin, count)
    legacy, twin_model, count = legacy_variant(model, "chunkbn")
    for exporter in ("ts", "dynamo"):
        if not exports.wanted("chunkbn", exporter, False):
            continue
        twin = exports.export(twin_model, "nativebn", exporter, False, role="twin")
        exports.export(legacy, "chunkbn", exporter, False, twin, count)
    legacy, _, count = legacy_variant(model, "chunkbnact")
    if count:  # timm blocks whose BN applies an activation: the native export is the twin
        for exporter in ("ts", "dynamo"):
            if exports.wanted("chunkbnact", exporter, False):
                exports.export(legacy, "chunkbnact", exporter, False, exports.file("native", exporter, False), count)


# --------------------------------------------------------------------------------------------------------------
# Model zoo (Keras 3 and tf-keras)
# --------------------------------------------------------------------------------------------------------------


def keras_entries(name: str, out: Path, flavour: str) -> list[dict]:
    if flavour == "keras":
        import keras

        keras.utils.set_random_seed(0)
        apps = keras.applications
    else:
        import tensorflow as tf
        import tf_keras as keras

        tf.random.set_seed(0)
        apps = keras.applications
    size, kind, _ = KERAS_MODELS[name]
    folder = out / flavour / name
    folder.mkdir(parents=True, exist_ok=True)
    model = getattr(apps, name)(weights=None, input_shape=(size, size, 3))
    entries = []
    layers = collections.Counter(type(layer).__name__ for layer in model.layers)
    for fmt in KERAS_FORMATS[(flavour, name)]:
        path = folder / (f"{name}.{fmt}" if fmt != "savedmodel" else f"{name}_savedmodel")
        entry = {"name": name, "framework": flavour, "family": f"{flavour}.applications", "kind": kind,
                 "variant": "native", "exporter": fmt, "dynamic": True, "format": fmt, "path": str(path),
                 "twin": None, "legacy_convs": 0, "role": "native", "layers": dict(layers),
                 "input": f"{size}x{size}x3"}
        start = time.perf_counter()
        try:
            if not path.exists():
                if fmt == "savedmodel":
                    if flavour == "keras":
                        model.export(str(path), verbose=False)
                    else:
                        model.save(str(path), save_format="tf")
                else:
                    model.save(str(path))
            entry["export_seconds"] = round(time.perf_counter() - start, 2)
        except Exception as exc:
            entry["export_error"] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:300] if str(exc) else ''}"
        entries.append(entry)
    if flavour == "tfkeras" and kind == "grouped":
        native_h5 = folder / f"{name}.h5"
        for variant, with_bn in (("split", False), ("splitbn", True), ("splitconcat", False)):
            path = folder / f"{name}.{variant}.h5"
            entry = {"name": name, "framework": flavour, "family": f"{flavour}.applications", "kind": kind,
                     "variant": variant, "exporter": "h5", "dynamic": True, "format": "h5", "path": str(path),
                     "twin": str(native_h5), "role": "legacy", "input": f"{size}x{size}x3"}
            start = time.perf_counter()
            try:
                legacy, count = legacy_tfkeras(model, with_bn, tf_concat=variant == "splitconcat")
                entry["legacy_convs"] = count
                entry["layers"] = dict(collections.Counter(type(layer).__name__ for layer in legacy.layers))
                if not path.exists():
                    legacy.save(str(path))
                entry["export_seconds"] = round(time.perf_counter() - start, 2)
            except Exception as exc:
                entry["export_error"] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:300] if str(exc) else ''}"
            entries.append(entry)
    return entries


def legacy_tfkeras(model, with_bn=False, tf_concat=False):
    """tf-keras: every grouped Conv2D as tf.split (a TFOpLambda) -> N Conv2D [-> BN] -> Concatenate (or, with
    ``tf_concat``, ``tf.concat``: another TFOpLambda), as code written before Keras had ``groups`` looks;
    returns (model, count). Other layers are reused (same weights)."""
    import tensorflow as tf
    import tf_keras as keras
    from tf_keras.src.engine.keras_tensor import KerasTensor
    tensor_map = {}
    new_inputs = []
    for t in model.inputs:
        x = keras.Input(batch_shape=t.shape, dtype=t.dtype, name=t.name.split(":")[0])
        tensor_map[id(t)] = x
        new_inputs.append(x)
    count = 0
    def remap(v):
        return tensor_map[id(v)] if isinstance(v, KerasTensor) else v
    for depth in sorted(model._nodes_by_depth, reverse=True):
        for node in model._nodes_by_depth[depth]:
            layer = node.layer
            if isinstance(layer, keras.layers.InputLayer):
                continue
            args = tf.nest.map_structure(remap, node.call_args)
            kwargs = tf.nest.map_structure(remap, node.call_kwargs)
            if isinstance(layer, keras.layers.Conv2D) and type(layer) is keras.layers.Conv2D and layer.groups > 1:
                count += 1
                x = args[0]
                g = layer.groups
                parts = tf.split(x, g, axis=-1)
                kernel = layer.kernel.numpy()
                bias = layer.bias.numpy() if layer.use_bias else None
                fo = layer.filters // g
                outs = []
                for i, p in enumerate(parts):
                    conv = keras.layers.Conv2D(fo, layer.kernel_size, strides=layer.strides, padding=layer.padding,
                                               dilation_rate=layer.dilation_rate, use_bias=layer.use_bias,
                                               name=f"{layer.name}_g{i}")
                    y = conv(p)
                    conv.set_weights([kernel[..., i * fo:(i + 1) * fo]] + ([bias[i * fo:(i + 1) * fo]] if bias is not None else []))
                    if with_bn:
                        y = keras.layers.BatchNormalization(name=f"{layer.name}_g{i}_bn")(y)
                    outs.append(y)
                if tf_concat:
                    out = tf.concat(outs, axis=-1, name=f"{layer.name}_cat")
                else:
                    out = keras.layers.Concatenate(axis=-1, name=f"{layer.name}_cat")(outs)
            else:
                out = layer(*args, **kwargs)
            outs_old = tf.nest.flatten(node.outputs)
            outs_new = tf.nest.flatten(out)
            for o, n in zip(outs_old, outs_new):
                tensor_map[id(o)] = n
    outputs = [tensor_map[id(t)] for t in model.outputs]
    return keras.Model(new_inputs, outputs, name=model.name + "_legacy"), count


# --------------------------------------------------------------------------------------------------------------
# Counting what a file holds
# --------------------------------------------------------------------------------------------------------------


def onnx_stats(path: str) -> dict:
    import onnx

    model = onnx.load(path, load_external_data=False)
    ops = collections.Counter()
    groups = collections.Counter()

    def walk(graph):
        for node in graph.node:
            ops[node.op_type] += 1
            if node.op_type in ("Conv", "ConvTranspose"):
                group = next((a.i for a in node.attribute if a.name == "group"), 1)
                groups[group] += 1
            for attr in node.attribute:
                if attr.type == onnx.AttributeProto.GRAPH:
                    walk(attr.g)
        return ops

    walk(model.graph)
    for fn in model.functions:
        walk(fn)
    return {"nodes": sum(ops.values()), "ops": dict(sorted(ops.items())), "conv": ops["Conv"] + ops["ConvTranspose"],
            "groups": {str(k): v for k, v in sorted(groups.items())},
            "grouped": sum(v for k, v in groups.items() if k > 1)}


def keras_stats(path: str) -> dict:
    """Layer classes and Conv groups from a .keras or .h5 file's config (no Keras needed)."""
    if path.endswith(".h5"):
        import h5py

        with h5py.File(path, "r") as f:
            raw = f.attrs["model_config"]
        config = json.loads(raw.decode() if isinstance(raw, bytes) else raw)
    else:
        with zipfile.ZipFile(path) as archive:
            config = json.loads(archive.read("config.json"))
    ops = collections.Counter()
    groups = collections.Counter()

    def walk(cfg):
        for layer in cfg.get("config", {}).get("layers", []):
            ops[layer["class_name"]] += 1
            if layer["class_name"] in ("Conv1D", "Conv2D", "Conv3D"):
                groups[layer["config"].get("groups", 1)] += 1
            if layer["class_name"] in ("Functional", "Model", "Sequential"):
                walk(layer)

    walk(config)
    return {"nodes": sum(ops.values()), "ops": dict(sorted(ops.items())), "conv": sum(groups.values()),
            "groups": {str(k): v for k, v in sorted(groups.items())},
            "grouped": sum(v for k, v in groups.items() if k > 1)}


def file_stats(path: str | None) -> dict | None:
    if not path or not Path(path).exists():
        return None
    try:
        if path.endswith(".onnx"):
            return onnx_stats(path)
        if path.endswith((".keras", ".h5")):
            return keras_stats(path)
    except Exception as exc:
        return {"error": f"{type(exc).__name__}: {exc}"}
    return None


# --------------------------------------------------------------------------------------------------------------
# Silent candidates: a Concat that looks like hand-made groups, neither rewritten nor left alone in the report
# --------------------------------------------------------------------------------------------------------------

# What may stand between a branch conv and the Concat: channel-wise ops (activation formulas, BN, Q/DQ, a
# tf2onnx Transpose). Binary ops are followed through every non-constant input, the others through input 0.
ONNX_CHANNELWISE = {"Relu", "Sigmoid", "Tanh", "Erf", "Exp", "Log", "Neg", "Abs", "Sqrt", "Reciprocal",
                    "Softplus", "Softsign", "HardSigmoid", "HardSwish", "LeakyRelu", "Elu", "Selu", "Celu", "Gelu",
                    "Mish", "ThresholdedRelu", "Identity", "Cast", "Clip", "PRelu", "BatchNormalization",
                    "QuantizeLinear", "DequantizeLinear", "Transpose", "Add", "Sub", "Mul", "Div", "Pow", "Max",
                    "Min", "Sum"}
ONNX_BINARY = {"Add", "Sub", "Mul", "Div", "Pow", "Max", "Min", "Sum"}
ONNX_CONVS = {"Conv", "ConvTranspose", "QLinearConv"}
ONNX_READERS = {"Split", "Slice"}
SILENT_WALK_NODES = 16  # nodes walked back from one Concat input: a BN + GELU (erf form) is 6
SILENT_WALK_TO_READER = 4  # single-input nodes between a conv and the Split/Slice it reads (Pad, Transpose, Q/DQ)


def _onnx_group_like_concats(graph, constants: set[str]) -> list[str]:
    """Names of the Concats in ``graph`` (an onnx GraphProto or FunctionProto) behind whose inputs at least
    two distinct convs read Split/Slice outputs of one tensor: hand-made groups, whatever else the branches
    do. Written apart from the tool's matcher, so that it checks it. Network structure (U-Net skips, DenseNet
    or Inception concats of convs of one whole tensor) is not counted: the tool stays silent there by design."""
    producer = {out: node for node in graph.node for out in node.output if out}

    def variable_inputs(node):
        return [name for name in node.input if name and name not in constants]

    def split_source(name: str) -> str | None:
        for _ in range(SILENT_WALK_TO_READER):
            node = producer.get(name)
            if node is None:
                return None
            if node.op_type in ONNX_READERS:
                return node.input[0]
            inputs = variable_inputs(node)
            if node.op_type in ONNX_CONVS or len(inputs) != 1:
                return None
            name = inputs[0]
        return None

    found = []
    for concat in graph.node:
        if concat.op_type != "Concat" or concat.domain not in ("", "ai.onnx"):
            continue
        convs_by_source: dict[str, set[int]] = collections.defaultdict(set)
        for start in concat.input:
            pending, seen = [start], set()
            while pending and len(seen) < SILENT_WALK_NODES:
                node = producer.get(pending.pop(0))
                if node is None or id(node) in seen:
                    continue
                seen.add(id(node))
                if node.op_type in ONNX_CONVS:
                    source = split_source(node.input[0])
                    if source is not None:
                        convs_by_source[source].add(id(node))
                elif node.op_type in ONNX_CHANNELWISE:
                    inputs = variable_inputs(node)
                    pending.extend(inputs if node.op_type in ONNX_BINARY else inputs[:1])
        if any(len(convs) >= 2 for convs in convs_by_source.values()):
            found.append(concat.name or concat.output[0])
    return found


def onnx_group_like_concats(path: str) -> list[str]:
    """Every group-like Concat of an ONNX file: its main graph, subgraphs and local functions."""
    import onnx

    model = onnx.load(path, load_external_data=False)
    found = []

    def walk(graph, constants: set[str]):
        constants = constants | {t.name for t in getattr(graph, "initializer", [])}
        constants |= {out for n in graph.node if n.op_type == "Constant" for out in n.output}
        found.extend(_onnx_group_like_concats(graph, constants))
        for node in graph.node:
            for attr in node.attribute:
                for sub in ([attr.g] if attr.type == onnx.AttributeProto.GRAPH else list(attr.graphs)):
                    walk(sub, constants)

    walk(model.graph, set())
    for function in model.functions:
        walk(function, set())
    return found


KERAS_CONVS = {"Conv1D", "Conv2D", "Conv3D", "Conv1DTranspose", "Conv2DTranspose", "Conv3DTranspose"}
KERAS_CHANNELWISE = {"BatchNormalization", "Activation", "ReLU", "LeakyReLU", "PReLU", "ELU", "Dropout",
                     "SpatialDropout2D", "GaussianNoise", "GaussianDropout", "Add", "Subtract", "Multiply",
                     "Maximum", "Minimum", "TFOpLambda"}
KERAS_READER_FUNCTIONS = {"split", "tf.split", "__operators__.getitem", "getitem"}
KERAS_CONCAT_FUNCTIONS = {"concat", "tf.concat", "concatenate"}


def _keras_config(path: str) -> dict:
    if path.endswith(".h5"):
        import h5py

        with h5py.File(path, "r") as f:
            raw = f.attrs["model_config"]
        return json.loads(raw.decode() if isinstance(raw, bytes) else raw)
    with zipfile.ZipFile(path) as archive:
        return json.loads(archive.read("config.json"))


def _keras_inbound(layer: dict) -> list[str]:
    """The layers whose outputs ``layer`` reads, in order, from either config dialect: Keras 3's
    ``{"args": [..{"keras_history": [name, node, index]}..]}`` or Keras 2's ``[[name, node, index, kwargs]]``."""
    names: list[str] = []

    def collect(item):
        if isinstance(item, dict):
            history = item.get("config", {}).get("keras_history") if item.get("class_name") == "__keras_tensor__" \
                else None
            if history:
                names.append(history[0])
                return
            for value in item.values():
                collect(value)
        elif isinstance(item, list):
            if len(item) in (3, 4) and isinstance(item[0], str) and isinstance(item[1], int):
                names.append(item[0])
                if len(item) == 4:
                    collect(item[3])  # TFOpLambda keyword tensors (``y=``)
                return
            for value in item:
                collect(value)

    collect(layer.get("inbound_nodes", []))
    return list(dict.fromkeys(names))


def keras_group_like_concats(path: str) -> list[str]:
    """Names of the join layers of a .keras/.h5 file (``Concatenate``, or a TFOpLambda ``tf.concat``) behind
    whose inputs at least two distinct Conv layers read slices (``tf.split``, a getitem, a ``GetItem``
    operation, a ``Lambda``) of one tensor: the Keras side of ``_onnx_group_like_concats``."""
    config = _keras_config(path)
    layers = {layer.get("name") or layer["config"].get("name"): layer
              for layer in config.get("config", {}).get("layers", [])}
    inbound = {name: _keras_inbound(layer) for name, layer in layers.items()}

    def function(layer) -> str:
        return str(layer["config"].get("function", "")) if layer["class_name"] in ("TFOpLambda",
                                                                                    "SlicingOpLambda") else ""

    def is_reader(layer) -> bool:
        return layer["class_name"] in ("GetItem", "Lambda", "SlicingOpLambda") or \
            function(layer) in KERAS_READER_FUNCTIONS

    def split_source(name: str) -> str | None:
        for _ in range(SILENT_WALK_TO_READER):
            layer = layers.get(name)
            if layer is None or not inbound[name]:
                return None
            if is_reader(layer):
                return inbound[name][0]
            if layer["class_name"] in KERAS_CONVS or len(inbound[name]) != 1:
                return None
            name = inbound[name][0]
        return None

    found = []
    for join_name, join in layers.items():
        if join["class_name"] != "Concatenate" and function(join) not in KERAS_CONCAT_FUNCTIONS:
            continue
        convs_by_source: dict[str, set[str]] = collections.defaultdict(set)
        for start in inbound[join_name]:
            pending, seen = [start], set()
            while pending and len(seen) < SILENT_WALK_NODES:
                name = pending.pop(0)
                layer = layers.get(name)
                if layer is None or name in seen:
                    continue
                seen.add(name)
                if layer["class_name"] in KERAS_CONVS:
                    source = split_source(inbound[name][0]) if inbound[name] else None
                    if source is not None:
                        convs_by_source[source].add(name)
                elif layer["class_name"] in KERAS_CHANNELWISE and not is_reader(layer) \
                        and function(layer) not in KERAS_CONCAT_FUNCTIONS:
                    pending.extend(inbound[name])
        if any(len(convs) >= 2 for convs in convs_by_source.values()):
            found.append(join_name)
    return found


def silent_concats(path: str, report: dict) -> tuple[list[str], list[str]] | None:
    """The group-like Concats of the file at ``path``, and those of them that ``report`` (the CLI's JSON
    report of a --check or --fuse of that file) neither lists among a rewrite's replaced nodes nor names as
    a skipped location (the silent ones); None where the format is not read here (SavedModels)."""
    if path.endswith(".onnx"):
        candidates = onnx_group_like_concats(path)
    elif path.endswith((".keras", ".h5")):
        candidates = keras_group_like_concats(path)
    else:
        return None
    accounted = {name for rewrite in report.get("rewrites", []) for name in rewrite.get("nodes") or []}
    accounted |= {rewrite.get("location") for rewrite in report.get("rewrites", [])}
    accounted |= {skip.get("location") if isinstance(skip, dict) else skip for skip in report.get("skipped", [])}
    return candidates, [name for name in candidates if name not in accounted]


# --------------------------------------------------------------------------------------------------------------
# Running the CLI
# --------------------------------------------------------------------------------------------------------------


def cli_executable() -> list[str]:
    found = shutil.which("gconv-rewrite", path=str(Path(sys.executable).parent))
    return [found] if found else [sys.executable, "-m", "gconv_rewrite"]


def _mirror_name(path: str) -> str:
    """The name the CLI gives a model's output inside an ``-o`` folder (.h5 is written as .keras)."""
    name = Path(path).name
    return name[:-3] + ".keras" if name.endswith(".h5") else name


def _parse_model(entry: dict) -> dict:
    report = entry.get("report") or {}
    result = {"status": entry.get("status"), "exit": entry.get("exit_code"), "error": entry.get("error"),
              "seconds": round(entry.get("seconds") or 0, 2), "output": entry.get("output")}
    if result["error"] and str(result["error"]).startswith("internal error"):
        result["crash"] = True
    # rewrites by (kind, groups): an expand of a depthwise model lists thousands otherwise
    kinds = collections.Counter((r.get("kind"), r.get("groups")) for r in report.get("rewrites", []))
    result["rewrites"] = [{"kind": k, "groups": g, "count": n} for (k, g), n in sorted(kinds.items(), key=str)]
    result["rewrite_count"] = sum(kinds.values())
    result["skipped"] = [s if isinstance(s, str) else {k: s.get(k) for k in ("location", "reason", "kind") if k in s}
                         for s in report.get("skipped", [])]
    result["before"], result["after"] = report.get("before"), report.get("after")
    verification = report.get("verification") or {}
    result["verification"] = {k: verification.get(k) for k in ("ran", "passed", "note", "inputs")}
    if verification.get("outputs"):
        result["verification"]["max_abs_error"] = max((o.get("max_abs_error") or 0) for o in verification["outputs"])
    if entry.get("status") == "verification-failed":
        result["verification"].update(ran=True, passed=False)
    result["written"] = bool(report.get("written")) or (entry.get("status") == "rewritten")
    return result


def run_cli(models: list[str], mode: str, out_dir: Path | None) -> dict[str, dict]:
    """One CLI process over ``models`` (``--format json``); per model: exit, error, report digest, seconds.

    ``seconds`` is the CLI's own time for that model (load → verify → save, interpreter start and imports
    excluded); ``process_seconds`` is the whole subprocess's wall time. A process that dies without its JSON
    document is re-run one model at a time, so a crash is pinned on its model."""
    args = cli_executable() + list(models) + ["--format", "json"]
    if mode == "check":
        args.append("--check")
    else:
        out_dir.mkdir(parents=True, exist_ok=True)
        target = out_dir / _mirror_name(models[0]) if len(models) == 1 else out_dir
        args += [f"--{mode}", "-o", str(target), "--force"]
    command = " ".join(args)
    start = time.perf_counter()
    try:
        proc = subprocess.run(args, capture_output=True, text=True, timeout=CLI_TIMEOUT * len(models), cwd=REPO,
                              env={**os.environ, "PYTHONWARNINGS": "ignore", **CLI_ENV})
    except subprocess.TimeoutExpired:
        proc = None
    wall = round(time.perf_counter() - start, 2)
    try:
        doc = json.loads(proc.stdout) if proc else None
        by_input = {m["input"]: m for m in doc["models"]}
    except (json.JSONDecodeError, KeyError, TypeError):
        if len(models) > 1:
            results = {}
            for model in models:
                results.update(run_cli([model], mode, out_dir))
            return results
        if proc is None:
            return {models[0]: {"mode": mode, "exit": "timeout", "error": f"timed out after {CLI_TIMEOUT}s",
                                "seconds": wall, "process_seconds": wall, "command": command}}
        tail = [line for line in proc.stderr.splitlines() if line.strip()]
        return {models[0]: {"mode": mode, "exit": proc.returncode, "crash": True, "seconds": wall,
                            "process_seconds": wall, "command": command,
                            "error": (tail[-1] if tail else proc.stdout.strip()[-300:])[:500],
                            "stderr_tail": proc.stderr[-1500:]}}
    results = {}
    for model in models:
        entry = by_input.get(model) or by_input.get(str(Path(model)))
        if entry is None:
            results[model] = {"mode": mode, "exit": "missing", "error": "not in the CLI's JSON document"}
            continue
        one = _parse_model(entry)
        if mode in ("check", "fuse") and entry.get("report"):
            try:
                found = silent_concats(model, entry["report"])
                if found is not None:
                    one["group_like"], one["silent"] = len(found[0]), found[1]
            except Exception as exc:
                one["silent_error"] = f"{type(exc).__name__}: {exc}"[:300]
        output = None if mode == "check" else str(out_dir / _mirror_name(model))
        one.update(mode=mode, process_seconds=wall, batch=len(models),
                   command=" ".join(cli_executable() + [model] + (["--check"] if mode == "check" else
                                                                  [f"--{mode}", "-o", output, "--force"])),
                   output=output if one.get("written") else None)
        if "Traceback (most recent call last)" in proc.stderr and len(models) == 1:
            one["crash"] = True
            one["stderr_tail"] = proc.stderr[-1500:]
        results[model] = one
    return results


def expands(entry: dict) -> bool:
    """Natively grouped files get --expand and the round trip. Depthwise-only Keras models do not: C
    one-channel Conv2D layers (6,624 for ConvNeXtTiny) take Keras minutes to build, and ONNX covers that."""
    return entry["role"] == "native" and (entry["kind"] == "grouped" or
                                          (entry["kind"] == "depthwise" and entry["format"] == "onnx"))


def run_battery(entries: list[dict], work: Path) -> None:
    """--check and --fuse on every file; --expand then --fuse of the expanded file on natively grouped ones.

    One CLI process per model and format (a model's variants share the interpreter start)."""
    live = [e for e in entries if not e.get("export_error")]
    for e in live:
        e["calls"] = {}
    batches = collections.defaultdict(list)
    for e in live:
        batches[(e["framework"], e["name"], e["format"])].append(e)
    for n, ((framework, name, fmt), group) in enumerate(batches.items(), 1):
        t0 = time.perf_counter()
        base = work / "out" / framework / name / fmt
        paths = [e["path"] for e in group]
        by_path = {e["path"]: e for e in group}
        for path, call in run_cli(paths, "check", None).items():
            by_path[path]["calls"]["check"] = call
        for path, call in run_cli(paths, "fuse", base / "fused").items():
            call["stats"] = file_stats(call.get("output"))
            by_path[path]["calls"]["fuse"] = call
        expandable = [e["path"] for e in group if expands(e)]
        if expandable:
            expanded = {}
            for path, call in run_cli(expandable, "expand", base / "expanded").items():
                call["stats"] = file_stats(call.get("output"))
                by_path[path]["calls"]["expand"] = call
                if call.get("output"):
                    expanded[call["output"]] = path
            if expanded:
                for path, call in run_cli(list(expanded), "fuse", base / "roundtrip").items():
                    call["stats"] = file_stats(call.get("output"))
                    by_path[expanded[path]]["calls"]["roundtrip"] = call
        print(f"[zoo] {n}/{len(batches)} {framework} {name} {fmt}: {len(group)} files, "
              f"{time.perf_counter() - t0:.1f}s", file=sys.stderr, flush=True)


# --------------------------------------------------------------------------------------------------------------
# OpenVINO, the peer
# --------------------------------------------------------------------------------------------------------------


def openvino_counts(path: str, shape: list[int] | None) -> dict:
    import openvino as ov

    start = time.perf_counter()
    try:
        core = ov.Core()
        model = ov.convert_model(path)
        if shape is not None and model.inputs[0].get_partial_shape().is_dynamic:
            model.reshape({model.inputs[0].get_any_name(): ov.PartialShape(shape)})
        converted = collections.Counter(op.get_type_name() for op in model.get_ordered_ops())
        compiled = core.compile_model(model, "CPU", {"INFERENCE_NUM_THREADS": 1})
        runtime = compiled.get_runtime_model()
        plain = grouped = 0
        types = collections.Counter()
        for op in runtime.get_ordered_ops():
            info = op.get_rt_info()
            layer = info["layerType"].astype(str) if "layerType" in info else op.get_type_name()
            types[layer] += 1
            if layer in ("Convolution", "GroupConvolution"):
                # the CPU plugin names both "Convolution"; a grouped one has 5-D weights [G, O/G, I/G, kH, kW]
                is_grouped = layer == "GroupConvolution"
                if op.get_input_size() > 1:
                    weights = op.input(1).get_partial_shape()
                    is_grouped = is_grouped or (weights.rank.is_static and weights.rank.get_length() == 5)
                grouped += is_grouped
                plain += not is_grouped
        return {"convolution": plain, "group_convolution": grouped,
                "converted": {"Convolution": converted.get("Convolution", 0),
                              "GroupConvolution": converted.get("GroupConvolution", 0),
                              "nodes": sum(converted.values())},
                "runtime_nodes": sum(types.values()), "seconds": round(time.perf_counter() - start, 2)}
    except Exception as exc:
        return {"error": f"{type(exc).__name__}: {str(exc).splitlines()[0][:300] if str(exc) else ''}",
                "seconds": round(time.perf_counter() - start, 2)}


# --------------------------------------------------------------------------------------------------------------
# Judging and tabulating
# --------------------------------------------------------------------------------------------------------------


def judge(entry: dict, twin_stats: dict | None) -> list[str]:
    """Problems found in one file's results, each a short sentence (empty: as expected)."""
    calls = entry.get("calls", {})
    if entry.get("export_error"):
        return []
    problems = _call_problems(calls)
    if entry["role"] == "legacy":
        problems += _legacy_problems(entry, calls, twin_stats)
    elif entry["role"] in ("native", "twin"):
        problems += _native_problems(entry, calls)
    return problems


def _call_problems(calls: dict) -> list[str]:
    """What went wrong in any CLI call: crashes, timeouts, bad exits, failed verification."""
    problems = []
    for mode, call in calls.items():
        if call.get("crash"):
            problems.append(f"{mode}: crash ({call.get('error')})")
        elif call.get("exit") == "timeout":
            problems.append(f"{mode}: timeout")
        elif call.get("exit") == 2:
            problems.append(f"{mode}: exit 2 ({call.get('error')})")
        verification = call.get("verification") or {}
        if verification.get("ran") and verification.get("passed") is False:
            problems.append(f"{mode}: verification failed")
        if mode in ("fuse", "roundtrip", "expand") and call.get("exit") == 1:
            problems.append(f"{mode}: exit 1 ({call.get('error')})")
        if call.get("silent"):
            names = ", ".join(call["silent"][:5]) + (", …" if len(call["silent"]) > 5 else "")
            problems.append(f"{mode}: {len(call['silent'])} silent Concat (neither rewritten nor left alone: {names})")
    return problems


def _legacy_problems(entry: dict, calls: dict, twin_stats: dict | None) -> list[str]:
    """A legacy (hand-made groups) file: --check must see it, --fuse must fuse every group and
    end like its native twin. Records ``fused_groups`` (and layer notes for Keras) on ``entry``."""
    problems = []
    check, fuse = calls.get("check", {}), calls.get("fuse", {})
    if check.get("exit") == 0:
        problems.append("check: exit 0 on a legacy file (patterns not seen)")
    fused = fuse.get("rewrite_count", 0)
    fused_convs = sum(r["count"] for r in fuse.get("rewrites") or [] if "fuse" in (r.get("kind") or ""))
    stats = fuse.get("stats")
    if fuse.get("exit") == 0 and fused_convs < entry["legacy_convs"]:
        problems.append(f"fuse: {fused_convs} of {entry['legacy_convs']} hand-made groups fused")
    if stats and twin_stats:
        if stats["conv"] != twin_stats["conv"] or stats["groups"] != twin_stats["groups"]:
            problems.append(f"fuse: Conv {stats['conv']} groups {stats['groups']} vs native "
                            f"{twin_stats['conv']} {twin_stats['groups']}")
        elif stats["ops"] != twin_stats["ops"] and entry["format"] != "onnx":
            entry.setdefault("notes", []).append(f"layers vs native: {op_diff(stats['ops'], twin_stats['ops'])}")
        elif stats["ops"] != twin_stats["ops"]:
            diff = op_diff(stats["ops"], twin_stats["ops"])
            only = " (Identity only)" if same_but_identity(stats["ops"], twin_stats["ops"]) else ""
            problems.append(f"fuse: op counts differ from native{only} ({diff})")
    entry["fused_groups"] = fused
    return problems


def _native_problems(entry: dict, calls: dict) -> list[str]:
    """A native file (or a twin): nothing to find (unless mixed), --expand leaves no grouped
    conv, and the expand → fuse round trip gives the original back."""
    problems = []
    check, fuse = calls.get("check", {}), calls.get("fuse", {})
    if entry["kind"] != "mixed":
        if check.get("exit") == 1:
            problems.append("check: exit 1 on a native file (false positive?)")
        if fuse.get("rewrite_count"):
            problems.append(f"fuse: {fuse['rewrite_count']} rewrites on a native file (false positive?)")
    expand, roundtrip = calls.get("expand"), calls.get("roundtrip")
    source = file_stats(entry["path"]) if entry["format"] in ("onnx", "keras", "h5") else None
    if expand and expand.get("exit") == 0 and source:
        expanded = expand.get("stats") or {}
        if expanded.get("grouped", 0) and expand.get("written"):
            problems.append(f"expand: {expanded['grouped']} of {source['grouped']} grouped convs left")
    if expands(entry) and expand and expand.get("exit") == 0 and not expand.get("written") and source \
            and source.get("grouped"):
        problems.append(f"expand: nothing written, {source['grouped']} grouped convs left")
    if roundtrip and source and roundtrip.get("stats"):
        stats = roundtrip["stats"]
        if stats["conv"] != source["conv"] or stats["groups"] != source["groups"]:
            problems.append(f"roundtrip: Conv {stats['conv']} groups {stats['groups']} vs original "
                            f"{source['conv']} {source['groups']}")
        elif stats["ops"] != source["ops"] and entry["format"] != "onnx":
            # a Keras output is Keras 3: tf-keras TFOpLambda layers come back as Keras layers (Add, ...)
            entry.setdefault("notes", []).append(f"roundtrip: layers differ ({op_diff(stats['ops'], source['ops'])})")
        elif stats["ops"] != source["ops"]:
            only = " (Identity only)" if same_but_identity(stats["ops"], source["ops"]) else ""
            problems.append(f"roundtrip: op counts differ{only} ({op_diff(stats['ops'], source['ops'])})")
    return problems


def same_but_identity(got: dict, want: dict) -> bool:
    strip = lambda ops: {k: v for k, v in ops.items() if k != "Identity"}
    return strip(got) == strip(want)


def op_diff(got: dict, want: dict) -> str:
    keys = sorted(set(got) | set(want))
    return ", ".join(f"{k} {got.get(k, 0)} vs {want.get(k, 0)}" for k in keys if got.get(k, 0) != want.get(k, 0))


def cell_exit(call: dict | None) -> str:
    if not call:
        return "–"
    text = str(call.get("exit"))
    if call.get("crash"):
        text += " CRASH"
    return text


def summarize_groups(stats: dict | None) -> str:
    if not stats:
        return "–"
    if "error" in stats:
        return "?"
    grouped = {k: v for k, v in stats["groups"].items() if k != "1"}
    return f"{stats['conv']}" + (f" (g>1: {sum(grouped.values())})" if grouped else "")


def silent_cell(calls: dict) -> str:
    """Silent Concats found after --check / --fuse / the fuse of the expanded file ("–": not read)."""
    counts = [str(len(calls[m]["silent"])) if (calls.get(m) or {}).get("silent") is not None else "–"
              for m in ("check", "fuse", "roundtrip") if m in calls]
    return "/".join(counts) if any(c != "–" for c in counts) else "–"


def markdown(results: dict) -> str:
    meta = results["meta"]
    lines = [
        "# Zoo battery",
        "",
        f"`python benchmarks/zoo.py` — {meta['date']} · {meta['machine']} · torch {meta.get('torch', '–')}, "
        f"torchvision {meta.get('torchvision', '–')}, timm {meta.get('timm', '–')}, keras {meta.get('keras', '–')}, "
        f"tf-keras {meta.get('tf_keras', '–')}, openvino {meta.get('openvino', '–')} · gconv-rewrite at "
        f"`{meta.get('commit_at_start') or meta.get('commit', '?')}`"
        + (f" (`{meta['commit']}` by the end)" if meta.get("commit_at_start") not in (None, meta.get("commit"))
           else "") + f" · battery {meta['battery_seconds']:.0f} s (exports {meta['export_seconds']:.0f} s)",
        "",
        "Random weights, no downloads. `ts` = `torch.onnx.export(dynamo=False)` opset 17, `dynamo` = the dynamo "
        "exporter, `-opN` = the TorchScript exporter at opset N, `-dyn` = dynamic batch. `chunk`: every grouped (non-depthwise) `nn.Conv2d` as `torch.chunk` → N "
        "Conv2d → `torch.cat`; `chunkbn`: a BatchNorm2d per branch; `chunkdw`: depthwise ones too. The twin is "
        "the native export the fused legacy file should equal. Exit codes: check / fuse / expand / fuse of the "
        "expanded file. Conv = Conv nodes (g>1: how many grouped). silent: Concats (Keras: Concatenate / tf.concat) "
        "behind which two or more convs read Split/Slice outputs of one tensor, yet which the report neither "
        "rewrote nor left alone, after check / fuse / fuse of the expanded file (– : SavedModel, not read). "
        "`chunkbnact` (timm ConvNormAct blocks): `torch.chunk` → N (Conv2d → BatchNorm2d → SiLU) → `torch.cat`, "
        "each branch's BN a channel slice of the block's, so the twin is the native export itself. `slice`: "
        "`x[:, a:b]` per branch, `split`: `torch.split` (the second zoo, issue #21). "
        "OpenVINO: convolutions its CPU runtime model ends with, plain / grouped.",
        "",
        "| model | variant | exporter | check | fuse | rewrites | silent | Conv after fuse | Conv twin | expand | "
        "round trip | Conv after round trip | verify | OpenVINO plain/grouped | time check/fuse/expand/rt (s) | "
        "problems |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for entry in results["entries"]:
        calls = entry.get("calls", {})
        if entry.get("export_error"):
            lines.append(f"| {entry['name']} | {entry['variant']} | {entry['exporter']}{'-dyn' if entry['dynamic'] and entry['format'] == 'onnx' else ''} "
                         f"| export failed: {entry['export_error'][:120]} |" + " |" * 12)
            continue
        fuse = calls.get("fuse", {})
        twin = results["stats"].get(entry.get("twin") or "", None)
        verify = []
        for mode in ("fuse", "expand", "roundtrip"):
            v = (calls.get(mode) or {}).get("verification") or {}
            if v.get("ran"):
                verify.append("ok" if v.get("passed") else "FAIL")
        ov = entry.get("openvino")
        ov_cell = "–" if not ov else ("error" if "error" in ov else f"{ov['convolution']}/{ov['group_convolution']}")
        times = "/".join(f"{calls[m]['seconds']:.1f}" if m in calls else "–"
                         for m in ("check", "fuse", "expand", "roundtrip"))
        exporter = entry["exporter"] + (f"-op{entry['opset']}" if entry.get("opset", 17) != 17 else "") + \
            ("-dyn" if entry["dynamic"] and entry["format"] == "onnx" else "")
        problems = "; ".join(entry.get("problems", [])) or "ok"
        if entry.get("notes"):
            problems += " (note: " + "; ".join(entry["notes"]) + ")"
        lines.append(
            f"| {entry['name']} | {entry['variant']} | {exporter} | {cell_exit(calls.get('check'))} | "
            f"{cell_exit(fuse)} | {fuse.get('rewrite_count', 0)} | {silent_cell(calls)} | "
            f"{summarize_groups(fuse.get('stats'))} | "
            f"{summarize_groups(twin) if twin else '–'} | {cell_exit(calls.get('expand'))} | "
            f"{cell_exit(calls.get('roundtrip'))} | {summarize_groups((calls.get('roundtrip') or {}).get('stats'))} | "
            f"{','.join(verify) or '–'} | {ov_cell} | {times} | {problems.replace('|', '/')} |")
    s = results["summary"]
    lines += ["", "## Per model", ""] + compact(results)
    lines += ["", f"**Summary**: {s['files']} files, {s['cli_calls']} CLI calls, {s['crashes']} crashes, "
              f"{s['exit2']} exit 2, {s['verify_failed']} verification failures, {s['false_positives']} false "
              f"positives, {s['silent']} silent Concats of {s['group_like']} group-like ones read after check/fuse "
              f"({s['silent_read']} files read, {s['silent_files']} with a silent one), legacy files fused to the twin's Conv/groups: {s['legacy_conv_match']}/{s['legacy']}, "
              f"ONNX ones op for op: {s['legacy_op_match']}/{s['legacy_onnx']} (ignoring Identity: "
              f"{s['legacy_op_match_but_identity']}/{s['legacy_onnx']}); round trips restoring every grouped conv: "
              f"{s['roundtrip_ok']}/{s['roundtrips']} (op for op: {s['roundtrip_ops']}/{s['roundtrips']}); files with a problem: {s['with_problems']}.", ""]
    if results.get("legacy_keras"):
        lines += results["legacy_keras"]["markdown"]
    return "\n".join(lines)


def short_problem(problem: str) -> str:
    head = problem.split(" (")[0].split(" groups {")[0]
    return head + (" (Identity only)" if "(Identity only)" in problem else "")


def compact(results: dict) -> list[str]:
    """One row a model: the README's table."""
    rows = ["| model | source | native Conv (grouped) | legacy files fused like native | expand → fuse restores | "
            "verification | silent (of group-like, all calls) | OpenVINO on legacy ts / dynamo (plain/grouped) | problems |",
            "|---|---|---|---|---|---|---|---|---|"]
    models = collections.OrderedDict()
    for e in results["entries"]:
        models.setdefault((e["framework"], e["name"]), []).append(e)
    for (framework, name), group in models.items():
        live = [e for e in group if not e.get("export_error")]
        native = next((e for e in live if e["role"] == "native"), None)
        src = file_stats(native["path"]) if native and native["format"] in ("onnx", "keras", "h5") else None
        legacy = [e for e in live if e["role"] == "legacy"]
        matched = sum(1 for e in legacy if (e["calls"].get("fuse") or {}).get("stats")
                      and results["stats"].get(e.get("twin") or "")
                      and e["calls"]["fuse"]["stats"]["conv"] == results["stats"][e["twin"]]["conv"]
                      and e["calls"]["fuse"]["stats"]["groups"] == results["stats"][e["twin"]]["groups"])
        trips = [e for e in live if "expand" in e.get("calls", {})]
        restored = sum(1 for e in trips if (e["calls"].get("roundtrip") or {}).get("exit") == 0
                       and not any(p.startswith(("roundtrip: Conv", "expand")) for p in e.get("problems", [])))
        verified = [(c.get("verification") or {}) for e in live for c in e.get("calls", {}).values()]
        ran = [v for v in verified if v.get("ran")]
        passed = sum(1 for v in ran if v.get("passed"))
        ov = {}
        for e in legacy:
            o = e.get("openvino")
            if o and "error" not in o:
                ov.setdefault(e["exporter"], f"{o['convolution']}/{o['group_convolution']}")
        problems = sorted({short_problem(p) for e in group for p in e.get("problems", [])} |
                          ({"export failed"} if any(e.get("export_error") for e in group) else set()))
        silent = [c["silent"] for e in live for c in e.get("calls", {}).values() if c.get("silent") is not None]
        group_like = sum(c.get("group_like") or 0 for e in live for c in e.get("calls", {}).values())
        silent_total = f"{sum(map(len, silent))} of {group_like}" if silent else "–"
        native_cell = f"{src['conv']} ({src['grouped']})" if src else "–"
        legacy_cell = f"{matched}/{len(legacy)}" if legacy else "–"
        trip_cell = f"{restored}/{len(trips)}" if trips else "–"
        problem_cell = "; ".join(problems).replace("|", "/") or "ok"
        rows.append(f"| {name} | {framework} ({len(live)} files) | {native_cell} | {legacy_cell} | {trip_cell} | "
                    f"{passed}/{len(ran)} | {silent_total} | {ov.get('ts', '–')} / {ov.get('dynamo', '–')} | {problem_cell} |")
    return rows


def summarize(results: dict) -> dict:
    entries = [e for e in results["entries"] if not e.get("export_error")]
    calls = [c for e in entries for c in e.get("calls", {}).values()]
    legacy = [e for e in entries if e["role"] == "legacy"]

    def conv_match(e):
        s, t = (e.get("calls", {}).get("fuse") or {}).get("stats"), results["stats"].get(e.get("twin") or "")
        return bool(s and t and s["conv"] == t["conv"] and s["groups"] == t["groups"])

    def op_match(e, identity=True):
        s, t = (e.get("calls", {}).get("fuse") or {}).get("stats"), results["stats"].get(e.get("twin") or "")
        return bool(s and t and (s["ops"] == t["ops"] if identity else same_but_identity(s["ops"], t["ops"])))

    roundtrips = [e for e in entries if "expand" in e.get("calls", {})]
    return {
        "files": len(entries), "export_failures": len(results["entries"]) - len(entries), "cli_calls": len(calls),
        "crashes": sum(1 for c in calls if c.get("crash")), "exit2": sum(1 for c in calls if c.get("exit") == 2),
        "verify_failed": sum(1 for c in calls if (c.get("verification") or {}).get("passed") is False
                             and (c.get("verification") or {}).get("ran")),
        "false_positives": sum(1 for e in entries for p in e.get("problems", []) if "false positive" in p),
        "legacy": len(legacy), "legacy_conv_match": sum(map(conv_match, legacy)),
        "legacy_onnx": sum(1 for e in legacy if e["format"] == "onnx"),
        "legacy_op_match": sum(op_match(e) for e in legacy if e["format"] == "onnx"),
        "legacy_op_match_but_identity": sum(op_match(e, identity=False) for e in legacy if e["format"] == "onnx"),
        "roundtrips": len(roundtrips),
        "roundtrip_ok": sum(1 for e in roundtrips if not any(p.startswith(("roundtrip: Conv", "expand"))
                                                            for p in e.get("problems", []))
                            and (e["calls"].get("roundtrip") or {}).get("exit") == 0),
        "roundtrip_ops": sum(1 for e in roundtrips if not any(p.startswith(("roundtrip", "expand"))
                                                             for p in e.get("problems", []))
                             and (e["calls"].get("roundtrip") or {}).get("exit") == 0),
        "with_problems": sum(1 for e in entries if e.get("problems")),
        "silent": sum(len(c.get("silent") or []) for c in calls),
        "group_like": sum(c.get("group_like") or 0 for c in calls),
        "silent_files": sum(1 for e in entries if any(c.get("silent") for c in e.get("calls", {}).values())),
        "silent_read": sum(1 for e in entries if any(c.get("silent") is not None
                                                      for c in e.get("calls", {}).values())),
    }


# --------------------------------------------------------------------------------------------------------------
# Driver
# --------------------------------------------------------------------------------------------------------------


def selected(names, only):
    return [n for n in names if not only or any(o.lower() in n.lower() for o in only)]


def export_worker(framework: str, out: Path, only: list[str]) -> None:
    """Runs in its own interpreter (torch and TF apart); prints one JSON manifest entry a line."""
    names = selected(TORCH_MODELS if framework == "torch" else
                     [n for n, spec in KERAS_MODELS.items() if framework in spec[2]], only)
    for name in names:
        try:
            entries = torch_entries(name, out) if framework == "torch" else keras_entries(name, out, framework)
        except Exception as exc:
            traceback.print_exc()
            entries = [{"name": name, "framework": framework, "variant": "native", "exporter": "?", "dynamic": False,
                        "format": "?", "path": "", "role": "native", "kind": "?",
                        "export_error": f"build: {type(exc).__name__}: {exc}"[:300]}]
        for entry in entries:
            print("ZOO " + json.dumps(entry), flush=True)


def run_exports(framework: str, out: Path, only: list[str], full_matrix: bool = False) -> list[dict]:
    args = [sys.executable, str(HERE), "_export", framework, "--out", str(out)] + sum((["--only", o] for o in only), [])
    print(f"[zoo] exporting {framework} models …", file=sys.stderr, flush=True)
    proc = subprocess.run(args, capture_output=True, text=True, cwd=REPO,
                          env={**os.environ, "ZOO_FULL_MATRIX": "1" if full_matrix else "0"})
    entries = [json.loads(line[4:]) for line in proc.stdout.splitlines() if line.startswith("ZOO ")]
    if proc.returncode != 0:
        print(f"[zoo] {framework} export exited {proc.returncode}: {proc.stderr[-2000:]}", file=sys.stderr)
    return entries


def versions() -> dict:
    from importlib import metadata

    found = {}
    for dist, key in (("torch", "torch"), ("torchvision", "torchvision"), ("timm", "timm"), ("keras", "keras"),
                      ("tf-keras", "tf_keras"), ("tensorflow", "tensorflow"), ("openvino", "openvino"),
                      ("onnxruntime", "onnxruntime")):
        try:
            found[key] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            pass
    # The commit of the tool the CLI runs: the checkout this environment installed (``pip install -e``), which
    # need not be the one this script lies in.
    try:
        where = subprocess.run([sys.executable, "-c", "import os, gconv_rewrite; print(os.path.dirname(gconv_rewrite.__file__))"],
                               capture_output=True, text=True, cwd=tempfile.gettempdir()).stdout.strip() or str(REPO)
        found["commit"] = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                         cwd=where).stdout.strip()
        found["tool"] = str(Path(where).parent)
    except OSError:
        pass
    return found


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "_export":
        return _export_subcommand(argv[1:])
    args = _parser().parse_args(argv)
    CLI_ENV.update(kv.split("=", 1) for kv in args.cli_env)

    out = args.out or Path(tempfile.mkdtemp(prefix="gconv-zoo-"))
    out.mkdir(parents=True, exist_ok=True)
    tool_at_start = versions().get("commit")
    start = time.perf_counter()
    entries = _battery_entries(args, out)
    export_seconds = time.perf_counter() - start
    if args.fixtures:
        _copy_fixtures(entries, args.fixtures)

    start = time.perf_counter()
    run_battery(entries, out)
    cli_seconds = time.perf_counter() - start
    stats = _judge_entries(entries, openvino=not args.no_openvino)
    legacy_keras = None
    if "legacy" in args.frameworks.split(","):  # issue #21: the legacy Keras code battery (its own exports)
        sys.path.insert(0, str(HERE.parent))
        import zoo_keras_legacy

        legacy_keras = zoo_keras_legacy.run(out, args.only)
    battery_seconds = time.perf_counter() - start

    results = {"meta": {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
                        "machine": f"{platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}",
                        "battery_seconds": battery_seconds, "cli_seconds": cli_seconds, "export_seconds": export_seconds, "out": str(out),
                        **versions(), "commit_at_start": tool_at_start},
               "entries": entries, "stats": stats}
    results["summary"] = summarize(results)
    if legacy_keras is not None:
        results["legacy_keras"] = legacy_keras
    args.results.parent.mkdir(parents=True, exist_ok=True)
    Path(f"{args.results}.json").write_text(json.dumps(results, indent=1, default=str))
    Path(f"{args.results}.md").write_text(markdown(results))
    print(markdown(results))
    return 0


def _export_subcommand(argv: list[str]) -> int:
    """``zoo.py _export FRAMEWORK --out DIR [--only NAME]``: the export worker, run in its own process."""
    sub = argparse.ArgumentParser()
    sub.add_argument("framework")
    sub.add_argument("--out", type=Path, required=True)
    sub.add_argument("--only", action="append", default=[])
    a = sub.parse_args(argv)
    export_worker(a.framework, a.out, a.only)
    return 0


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, help="work folder (models and outputs); default a fresh tmp dir")
    parser.add_argument("--only", action="append", default=[], help="substring of model names to run (repeatable)")
    parser.add_argument("--variant", action="append", default=[], help="only these variants (native, chunk, ...)")
    parser.add_argument("--frameworks", default="torch,keras,tfkeras,legacy",
                        help="comma list: torch, keras, tfkeras, legacy (the legacy Keras code battery, "
                             "benchmarks/zoo_keras_legacy.py)")
    parser.add_argument("--full-matrix", action="store_true",
                        help="every exporter/batch/BN variant for every grouped torch model (slow: dynamo)")
    parser.add_argument("--skip-export", action="store_true", help="reuse the manifest in --out")
    parser.add_argument("--no-openvino", action="store_true")
    parser.add_argument("--cli-env", action="append", default=[], metavar="KEY=VALUE",
                        help="environment for the CLI calls, e.g. TF_ENABLE_ONEDNN_OPTS=0 (non-x86 TF default)")
    parser.add_argument("--results", type=Path, default=REPO / "benchmarks" / "zoo_results",
                        help="write PREFIX.md and PREFIX.json")
    parser.add_argument("--fixtures", type=Path, help="copy the exported ONNX/Keras files here (e.g. /work/zoo)")
    return parser


def _battery_entries(args, out: Path) -> list[dict]:
    """The files the battery runs: exported now (merged into out/manifest.json) or, with
    --skip-export, read from that manifest; filtered by --frameworks, --only and --variant."""
    manifest_path = out / "manifest.json"
    frameworks = [f.strip() for f in args.frameworks.split(",") if f.strip()]
    if args.skip_export and manifest_path.exists():
        entries = json.loads(manifest_path.read_text())
        entries = [e for e in entries if e["framework"] in frameworks
                   and (not args.only or selected([e["name"]], args.only))]
    else:
        entries = []
        for framework in frameworks:
            if framework != "legacy":  # zoo_keras_legacy exports its own
                entries += run_exports(framework, out / "models", args.only, args.full_matrix)
        previous = json.loads(manifest_path.read_text()) if manifest_path.exists() else []
        keep = {e["path"]: e for e in previous}
        keep.update({e["path"]: e for e in entries})
        manifest_path.write_text(json.dumps(list(keep.values()), indent=1))
    entries = [e for e in entries if e["framework"] == "torch" or e.get("export_error")
               or e["format"] in KERAS_FORMATS.get((e["framework"], e["name"]), ())]
    if args.variant:
        entries = [e for e in entries if e["variant"] in args.variant]
    return entries


def _copy_fixtures(entries: list[dict], fixtures: Path) -> None:
    """--fixtures: copy each exported file (or SavedModel folder) into FIXTURES/FRAMEWORK/."""
    fixtures.mkdir(parents=True, exist_ok=True)
    for e in entries:
        src = Path(e["path"])
        if src.exists():
            dst = fixtures / e["framework"] / src.name
            dst.parent.mkdir(parents=True, exist_ok=True)
            (shutil.copytree if src.is_dir() else shutil.copy2)(src, dst, **({"dirs_exist_ok": True}
                                                                          if src.is_dir() else {}))


def _judge_entries(entries: list[dict], *, openvino: bool) -> dict:
    """Judge every entry (stats of written ONNX files and their twins, OpenVINO's counts beside
    them), printing one line each; returns the stats by path."""
    stats = {}
    for entry in entries:
        if entry.get("format") == "onnx" and not entry.get("export_error"):
            stats[entry["path"]] = file_stats(entry["path"])
            grouped = entry["kind"] in ("grouped", "depthwise")
            if openvino and (entry["role"] == "legacy" or (entry["role"] == "native" and grouped
                                                           and not entry.get("dynamic"))):
                dims = [int(d) for d in entry["input"].split("=")[1].split(",")]
                entry["openvino"] = openvino_counts(entry["path"], dims)
        twin = entry.get("twin")
        if twin and twin not in stats:
            stats[twin] = file_stats(twin)
        entry["problems"] = judge(entry, stats.get(twin) if twin else None)
        label = f"{entry['name']}.{entry['variant']}.{entry['exporter']}{'-dyn' if entry.get('dynamic') else ''}"
        print(f"[zoo] {label}: {'; '.join(entry['problems']) or 'ok'}", file=sys.stderr, flush=True)
    return stats


if __name__ == "__main__":
    sys.exit(main())
