"""ONNX rewrites, each an onnx-ir pass."""

from passes.onnx.expand_grouped_conv import ExpandGroupedConvPass
from passes.onnx.fold_batchnorm import FoldBatchNormPass
from passes.onnx.fuse_split_conv import FuseSplitConvPass

EXPAND_PASSES = ("onnx.expand-grouped-conv",)

__all__ = ["ExpandGroupedConvPass", "FoldBatchNormPass", "FuseSplitConvPass", "EXPAND_PASSES"]
