"""ONNX rewrites, each an onnx-ir pass."""

from passes.onnx.fuse_split_conv import FuseSplitConvPass
from passes.onnx.expand_grouped_conv import ExpandGroupedConvPass
from passes.onnx.fold_batchnorm import FoldBatchNormPass

FUSE_PASSES = ("onnx.fuse-split-conv",)
EXPAND_PASSES = ("onnx.expand-grouped-conv",)
