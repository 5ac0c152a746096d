"""Every way the tool says no, once: a refusal carries a stable ``code``, the sentence a user
reads (``reason``) and the nodes it is about.

    Refusal(code, reason, nodes)   returned by the planner and the readers
    Refused(code, reason, nodes)   the same refusal, raised (``exc.refusal``)

(onnxscript's ``MatchFailureInfo`` / ``MatchFailureError`` is the model.) The code is what tools
read (a report's ``skipped[i]["code"]``, ``--check`` lines): it never changes once released,
while the sentence may. ``CODES`` lists every code with a one-line summary; ``docs/REASONS.md``
gives each one an example and what a user can do about it (a test checks both lists agree with
the codes the source uses).
"""

from __future__ import annotations

from dataclasses import dataclass

# code -> one-line summary. Keep the order of docs/REASONS.md: matching, planning, tails, chains,
# constants, quantization, expansion, targets, model-level findings.
CODES: dict[str, str] = {
    # -- how the branches are wired --
    "concat-extra-inputs": "the concat also joins inputs that are not branch convolutions",
    "concat-twice": "one branch output is concatenated more than once",
    "used-outside": "a value inside the pattern is also read outside it (or is a graph output)",
    "different-sources": "the branches read different tensors",
    "mixed-readers": "the branches read their channels through different Split/Slice nodes or kinds",
    "op-before-conv": "a branch applies an op before its convolution that is not a layout transpose",
    "not-channel-axis": "the split or the concat is not on the channel axis",
    "not-a-range": "a branch's read is not one contiguous channel range (a step, several axes)",
    "unmatched-branches": "convs read slices of one tensor, but the branch walk stops at an op it cannot pass",
    "malformed": "an attribute has a form the ONNX spec does not allow",
    # -- what the branch convolutions do differently --
    "fewer-branches": "fewer than two branches",
    "empty-range": "a branch reads an empty channel range",
    "ranges-overlap": "two branches read overlapping channels",
    "ranges-gap": "some channels of the source are read by no branch",
    "out-of-order": "the branches are concatenated in another order than the channels they read",
    "partial-cover": "the branches do not read every channel of the source",
    "unknown-channels": "the source's channel count (or the split sizes) cannot be proven",
    "uneven-split": "the branches read different numbers of channels",
    "out-channels-differ": "the branches write different numbers of channels",
    "groups-differ": "the branch convolutions have different group counts",
    "kernel-mismatch": "the branch kernels have different shapes",
    "dtype-mismatch": "the branch weights have different dtypes",
    "attribute-mismatch": "the branch convolutions differ in strides, pads, dilations or another setting",
    "mixed-ops": "the branches mix op kinds (Conv and ConvTranspose, NHWC and NCHW ...)",
    "width-mismatch": "a convolution expects another channel count than its branch gives it",
    "rank-mismatch": "a convolution does not match its input's rank",
    "unsupported-form": "a form the runtime or this tool does not fuse (TF grouped Conv3D, quantized ConvTranspose...)",
    # -- tails --
    "branches-differ": "the branches apply different ops at the same step",
    "tails-differ": "a channel-wise tail has different settings or shared parameters per branch",
    "not-channel-wise": "an op after the convolution mixes channels or is not per-channel",
    # -- constants --
    "not-constant": "a weight, bias, split size or slice bound is computed at run time",
    "overridable-input": "a weight or bound reads a graph input that a caller may replace at run time",
    "call-site-attribute": "an attribute comes from the calling function (@ref), unknown here",
    "no-weights": "the file holds no weights for a layer",
    # -- quantization --
    "quantization-mismatch": "quantized branches do not stack exactly (types, axes, zero points, block size)",
    # -- expansion --
    "not-grouped": "the convolution is not grouped (group=1)",
    "indivisible-groups": "the groups or channels do not divide into the requested branches",
    "below-min-groups": "group count below --min-groups",
    "above-max-groups": "group count above --max-groups",
    "depthwise-kept": "a depthwise convolution kept (--keep-depthwise)",
    # -- targets --
    "target-keeps": "the --target's rule keeps this form",
    # -- model-level: what the tool cannot rewrite or carry --
    "late-binding": "Lambdas made in a loop all read the last group: the model does not compute what was meant",
    "not-rebuilt": "a layer or model the tool cannot rebuild, so what follows it stays as it is",
    "opaque-lambda": "a Lambda layer whose code is not read as a channel slice stays as it is",
    "not-carried": "a part of the file (compile settings, a signature) is not rewritten or carried over",
    "fold-refused": "a BatchNormalization after a fused conv is not folded into it",
}


@dataclass(frozen=True)
class Refusal:
    """Why a candidate is left as it is: a stable ``code`` (a key of ``CODES``), the sentence a
    user reads, and the nodes it is about (may be empty where the caller knows them better)."""

    code: str
    reason: str
    nodes: tuple[str, ...] = ()

    def __str__(self) -> str:
        return self.reason

    def with_reason(self, reason: str) -> Refusal:
        """The same refusal (same code) worded with more context."""
        return Refusal(self.code, reason, self.nodes)


class Refused(Exception):
    """A refusal, raised: ``raise Refused("uneven-split", "uneven split: 16,16,8 channels")`` or
    ``raise Refused(refusal)``. ``str(exc)`` is the reason."""

    def __init__(self, code: str | Refusal, reason: str | None = None, nodes: tuple[str, ...] = ()):
        if not isinstance(code, Refusal) and reason is None:
            raise TypeError("Refused(code, reason): a refusal needs a code of gconv_rewrite.reasons.CODES and a reason")
        self.refusal = code if isinstance(code, Refusal) else Refusal(code, reason, tuple(nodes))
        super().__init__(self.refusal.reason)

    @property
    def code(self) -> str:
        return self.refusal.code

    @property
    def reason(self) -> str:
        return self.refusal.reason


class NotACandidate(Exception):
    """Not a refusal: the concat does not join branch convolutions at all (nothing to report)."""
