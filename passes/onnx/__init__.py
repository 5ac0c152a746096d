"""ONNX rewrites, each an onnx-ir pass; the classes are loaded on first use (PEP 562), so
importing one pass module does not import the others."""

from __future__ import annotations

import importlib

_CLASSES = {
    "ExpandGroupedConvPass": "gconv_rewrite.passes.onnx.expand_grouped_conv",
    "FoldBatchNormPass": "gconv_rewrite.passes.onnx.fold_batchnorm",
    "FuseQLinearConvPass": "gconv_rewrite.passes.onnx.fuse_qlinear_conv",
    "FuseSplitConvPass": "gconv_rewrite.passes.onnx.fuse_split_conv",
}

__all__ = list(_CLASSES)


def __getattr__(name: str):
    module = _CLASSES.get(name)
    if module is None:  # a submodule (``from gconv_rewrite.passes.onnx import _graph``) is imported by Python itself
        raise AttributeError(f"module 'gconv_rewrite.passes.onnx' has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)
