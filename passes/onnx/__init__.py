"""ONNX rewrites, each an onnx-ir pass."""

from passes.onnx.expand_grouped_conv import ExpandGroupedConvPass
from passes.onnx.fold_batchnorm import FoldBatchNormPass
from passes.onnx.fuse_qlinear_conv import FuseQLinearConvPass
from passes.onnx.fuse_split_conv import FuseSplitConvPass

# What ``--fuse`` runs, in order: float (and QDQ) branches, then QOperator (QLinearConv) branches.
FUSE_PASSES = ("onnx.fuse-split-conv", "onnx.fuse-qlinear-conv")
EXPAND_PASSES = ("onnx.expand-grouped-conv",)

__all__ = ["ExpandGroupedConvPass", "FoldBatchNormPass", "FuseQLinearConvPass", "FuseSplitConvPass", "FUSE_PASSES",
           "EXPAND_PASSES"]
