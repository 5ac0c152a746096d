"""ONNX rewrites, each an onnx-ir pass."""

from passes.onnx.fuse_split_conv import FuseSplitConvPass

FUSE_PASSES = ("onnx.fuse-split-conv",)
