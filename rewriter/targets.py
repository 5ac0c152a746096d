"""Deployment targets: the form each runtime wants for a grouped convolution, native or split.

Whether ``Conv(group=N)`` or ``Split → N Conv → Concat`` runs better (or runs at all) depends on
where the model is deployed. Each target here is a small rule: a function of one grouped
convolution's properties (groups, input and output channels, kernel rank, transposed or not)
that returns the form the target wants and the sentence that says why. Every rule is backed by
the runtime's own source or by a measurement; docs/TARGETS.md lists each with its evidence.

    >>> from gconv_rewrite.targets import ConvProps, get
    >>> form, why = get("tflite-gpu").decide(ConvProps(groups=8, in_channels=16, out_channels=16))
    >>> form
    'split'

``--target NAME`` uses these rules in both directions: hand-made groups the target runs natively
are fused, native grouped convolutions it does not are expanded, everything else stays as it is.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any

from gconv_rewrite.errors import BadInput

NATIVE = "native"
SPLIT = "split"


@dataclass(frozen=True)
class ConvProps:
    """What a target rule may look at: one grouped convolution, as native or as its branches."""

    groups: int
    in_channels: int
    out_channels: int
    kernel_rank: int = 2  # spatial dims: 1, 2 or 3
    transposed: bool = False  # ConvTranspose

    @property
    def in_per_group(self) -> int:
        return self.in_channels // self.groups

    @property
    def out_per_group(self) -> int:
        return self.out_channels // self.groups

    @property
    def depthwise(self) -> bool:
        """One input channel per group (any channel multiplier), as TFLite/TF/TF.js depthwise ops take it."""
        return self.groups > 1 and self.groups == self.in_channels

    @property
    def strictly_depthwise(self) -> bool:
        """groups == in == out: what MNN and Arm Compute Library keep as a depthwise kernel."""
        return self.depthwise and self.out_channels == self.in_channels

    def describe(self) -> str:
        kind = "ConvTranspose" if self.transposed else "Conv"
        return (f"{self.kernel_rank}D {kind} group={self.groups}, channels {self.in_channels}->{self.out_channels} "
                f"({self.in_per_group}/{self.out_per_group} per group)")


@dataclass
class Decision:
    """What a target decided for one grouped conv a pass judged: one entry of the report's
    ``target.nodes`` (``to_json``). Every pass of every format writes these."""

    location: str  # the candidate's or the conv's name, as the report's rewrites and skips name it
    graph: str  # "" for the main graph, else the subgraph's or function's label
    form: str  # NATIVE or SPLIT: the form the target wants
    action: str  # "fuse", "expand" or "keep": what the pass did about it
    rule: str  # why (the skip reasons carry it with "FORM for TARGET: " in front)
    # --auto (gconv_rewrite.auto): both forms timed; None for a target's rule.
    native_ms: float | None = None
    split_ms: float | None = None
    verdict: str | None = None  # NATIVE, SPLIT or "tie"
    measurements: list[dict[str, Any]] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        entry = {"location": self.location, "graph": self.graph, "form": self.form, "action": self.action,
                 "rule": self.rule}
        if self.verdict is not None:  # measured
            entry.update(native_ms=self.native_ms, split_ms=self.split_ms, verdict=self.verdict,
                         measurements=self.measurements)
        return entry


Rule = Callable[[ConvProps], "tuple[str, str]"]


@dataclass(frozen=True)
class Target:
    name: str
    runtime: str  # what it is, in a few words
    native_when: str  # the headline of the rule, for --list-targets and the README
    evidence: str  # the source file or the measurement the rule rests on (details in docs/TARGETS.md)
    rule: Rule

    def decide(self, props: ConvProps) -> tuple[str, str]:
        """(NATIVE or SPLIT, the sentence that says why) for one grouped convolution."""
        return self.rule(props)


# -- the rules --------------------------------------------------------------------------------


def _onnxruntime_cpu(p: ConvProps) -> tuple[str, str]:
    return NATIVE, ("onnxruntime's CPU Conv and ConvTranspose run groups natively; measured here the split form "
                    "is 1.15-1.25x slower")


def _openvino_cpu(p: ConvProps) -> tuple[str, str]:
    return NATIVE, ("OpenVINO's CPU plugin runs GroupConvolution natively on x86 (and fuses Split -> Conv -> "
                    "Concat into it itself); on ARM use --target armnn")


def _tflite_structure(p: ConvProps) -> tuple[str, str] | None:
    """What every TFLite target shares: the op set has no grouped TRANSPOSE_CONV or CONV_3D, and
    a depthwise conv is written as DEPTHWISE_CONV_2D, which every TFLite backend runs."""
    if p.transposed:
        return SPLIT, "TFLite has no grouped TRANSPOSE_CONV"
    if p.kernel_rank == 3:
        return SPLIT, "TFLite has no grouped CONV_3D (a grouped Conv3D becomes a Flex op)"
    if p.depthwise and p.kernel_rank == 2:
        return NATIVE, "depthwise: written as DEPTHWISE_CONV_2D, which TFLite runs natively"
    return None


def _tflite_xnnpack(p: ConvProps) -> tuple[str, str]:
    fixed = _tflite_structure(p)
    if fixed is not None:
        return fixed
    return NATIVE, ("XNNPACK (TFLite's default CPU delegate) runs a grouped CONV_2D natively; measured here 15.8 ms "
                    "grouped vs 17.4 ms split")


def _tflite_builtin(p: ConvProps) -> tuple[str, str]:
    fixed = _tflite_structure(p)
    if fixed is not None:
        return fixed
    return SPLIT, ("TFLite's builtin CONV_2D runs a grouped conv with its reference kernel; measured here 99.6 ms "
                   "grouped vs 34.3 ms split")


def _tflite_gpu(p: ConvProps) -> tuple[str, str]:
    fixed = _tflite_structure(p)
    if fixed is not None:
        return fixed
    per_group = f"channels per group {p.in_per_group} in / {p.out_per_group} out"
    if p.in_per_group % 4 == 0 and p.out_per_group % 4 == 0:
        return NATIVE, f"{per_group} are multiples of 4: the GPU delegate runs one grouped CONV_2D"
    return SPLIT, (f"{per_group} are not both multiples of 4: the GPU delegate would split it into "
                   "per-group convolutions itself")


def _split_but_depthwise(reason: str) -> Rule:
    """Targets with no grouped conv at all, but a depthwise 2D kernel (converters write one for
    groups == input channels)."""

    def rule(p: ConvProps) -> tuple[str, str]:
        if p.depthwise and p.kernel_rank == 2 and not p.transposed:
            return NATIVE, "depthwise: converters write a depthwise conv, which it runs natively"
        return SPLIT, reason

    return rule


_edgetpu = _split_but_depthwise("the Edge TPU has no grouped CONV_2D; exporters force "
                                "disable_group_convolution for it")
_tfjs = _split_but_depthwise("TensorFlow.js conv2d has no groups (the input depth must equal the filter's)")
_tf_cpu_no_onednn = _split_but_depthwise(
    "TensorFlow's CPU kernels without oneDNN fail on grouped conv + bias + activation and run a grouped conv "
    "slower than its branches (measured here 58.8 ms vs 47.9 ms)")


def _mnn(p: ConvProps) -> tuple[str, str]:
    if p.strictly_depthwise:
        return NATIVE, "depthwise (groups == in == out): MNN runs it as ConvolutionDepthwise"
    return SPLIT, ("MNN runs only depthwise and group=1 convolutions; its converter splits every other grouped "
                   "conv into Slice -> Conv -> Concat")


def _armnn(p: ConvProps) -> tuple[str, str]:
    if p.strictly_depthwise and p.kernel_rank == 2 and not p.transposed:
        return NATIVE, "depthwise (groups == in == out): Arm Compute Library has a depthwise kernel"
    return SPLIT, ("Arm Compute Library's NEON backend has no grouped conv: Arm NN's ONNX parser takes only "
                   "group=1 or depthwise, and OpenVINO on ARM splits GroupConvolution")


TARGETS: dict[str, Target] = {t.name: t for t in [
    Target("onnxruntime-cpu", "onnxruntime, CPU execution provider", "always",
           "measured (README Performance); onnxruntime/core/providers/cpu/nn/conv.cc", _onnxruntime_cpu),
    Target("openvino-cpu", "OpenVINO CPU plugin on x86", "always",
           "OpenVINO common_optimizations/convolution_to_group_convolution.cpp (fuses the split form itself)",
           _openvino_cpu),
    Target("tflite", "TFLite / LiteRT with XNNPACK (the default CPU delegate)",
           "1D/2D Conv (not transposed, not 3D)", "measured: 15.8 ms grouped vs 17.4 ms split",
           _tflite_xnnpack),
    Target("tflite-builtin", "TFLite / LiteRT builtin kernels, no delegate", "depthwise 2D only",
           "measured: 99.6 ms grouped vs 34.3 ms split", _tflite_builtin),
    Target("tflite-gpu", "TFLite / LiteRT GPU delegate",
           "channels per group in and out multiples of 4; depthwise 2D",
           "tflite/delegates/gpu/common/model_builder.cc (Conv2DOperationParser)", _tflite_gpu),
    Target("edgetpu", "Coral Edge TPU (TFLite, edgetpu_compiler)", "depthwise 2D only",
           "onnx2tf -dgc / disable_group_convolution, forced for edgetpu by exporters", _edgetpu),
    Target("tfjs", "TensorFlow.js", "depthwise 2D only",
           "tfjs-core/src/ops/conv2d.ts; onnx2tf -dgc, forced for tfjs by exporters", _tfjs),
    Target("tf-cpu-no-onednn", "TensorFlow CPU without oneDNN (default off x86)", "depthwise 2D only",
           "measured: benchmarks/tf_expand.py", _tf_cpu_no_onednn),
    Target("mnn", "MNN", "depthwise (groups == in == out) only",
           "tools/converter/source/optimizer/postconvert/TransformGroupConvolution.cpp", _mnn),
    Target("armnn", "Arm NN / Arm Compute Library NEON (and OpenVINO on ARM)",
           "depthwise 2D (groups == in == out) only",
           "src/armnnOnnxParser/OnnxSupport.md; OpenVINO intel_cpu arm/pass/convert_group_conv.cpp", _armnn),
]}


def names() -> list[str]:
    return list(TARGETS)


def get(name: str) -> Target:
    """The target called ``name``; a one-line BadInput listing the known names otherwise."""
    try:
        return TARGETS[name]
    except KeyError:
        raise BadInput(f"unknown target {name!r}; known targets: {', '.join(TARGETS)}") from None


def format_table() -> str:
    """The table --list-targets prints: one row per target, then each target's evidence."""
    rows = [[t.name, t.native_when, t.runtime] for t in TARGETS.values()]
    headers = ["target", "native grouped conv when (else split)", "runtime"]
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(headers)]
    line = lambda cells: "  ".join(c.ljust(w) for c, w in zip(cells, widths)).rstrip()
    lines = [line(headers), line(["-" * w for w in widths])] + [line(r) for r in rows]
    lines += ["", "sources (details: docs/TARGETS.md):"]
    lines += [f"  {t.name}: {t.evidence}" for t in TARGETS.values()]
    lines += ["", "--auto (ONNX): no rule; each grouped conv is timed in both forms on onnxruntime here, the faster "
              "kept (native on a tie)"]
    return "\n".join(lines)


def target_accept(target, form: str):
    """The passes' ``accept`` hook for one direction of ``--target``: ``(ok, rule)`` with ok when
    ``target`` wants ``form`` (targets.NATIVE: fuse, targets.SPLIT: expand); the rule is prefixed
    with the form and target, as a skip's reason says it."""
    def accept(props) -> tuple[bool, str]:
        chosen, rule = target.decide(props)
        return chosen == form, f"{chosen} for {target.name}: {rule}"
    return accept


def target_nodes(decisions: list[Decision], name: str) -> list[Decision]:
    """A pass's ``decisions`` as the report lists them: the rule without the "native for NAME: "
    the skip reasons carry."""
    return [replace(d, rule=d.rule.removeprefix(f"{d.form} for {name}: ")) for d in decisions]
