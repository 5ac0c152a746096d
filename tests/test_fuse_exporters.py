"""onnx.fuse-split-conv on files written by the real exporters (tests/fixtures/{torch,tf2onnx}).

What each file must fuse into is read from its README's ``pattern:`` line (written by
samples/exporters/describe.py from the file itself): ``N x (op -> op -> ...)`` is one branch,
repeated N times. After fusion every op of that branch appears once (each conv layer as one
grouped conv, each tail once), nothing of the slicing is left, the Transposes did not grow, and
onnxruntime on the fused file reproduces the framework's own output ``y`` for the stored ``x``.
"""

from __future__ import annotations

import collections
import re
from pathlib import Path

import numpy as np
import onnx
import pytest

import gconv_rewrite
from tests.conftest import TOLERANCE, attribute, dead_constants, op_counts, run_onnx

FIXTURES = Path(__file__).parent / "fixtures"
FILES = sorted(FIXTURES.glob("*/*.onnx"))
CONV_OPS = ("Conv", "ConvTranspose")
# What only the branches' slicing is made of (PyTorch's chunk bounds: Shape → Gather → ...).
SLICING_OPS = ("Slice", "Split", "Concat", "Shape", "Gather")


def _patterns(readme: Path) -> dict[str, str]:
    """``{file name: pattern line}`` from a fixtures README."""
    patterns, current = {}, None
    for line in readme.read_text().splitlines():
        if line.startswith("## "):
            current = line[3:].strip()
        elif current and line.startswith("- pattern: "):
            patterns[current] = line[len("- pattern: "):]
    return patterns


PATTERNS = {name: line for folder in ("torch", "tf2onnx") for name, line in _patterns(FIXTURES / folder / "README.md").items()}


class Expected:
    """One fixture's branch structure, read off its pattern line."""

    def __init__(self, pattern: str):
        match = re.search(r"source=([^;]+); (\d+) x \(", pattern)
        assert match, pattern
        self.shared_input = match.group(1) == "graph input" and "Slice[" not in pattern and "Split[" not in pattern
        self.branches = int(match.group(2))
        # The branch is the balanced (...) after "N x "; bracketed details hold op names too, drop them.
        depth, body = 1, []
        for char in pattern[match.end():]:
            depth += {"(": 1, ")": -1}.get(char, 0)
            if depth == 0:
                break
            body.append(char)
        body = "".join(body)
        while "[" in body:  # nested: "Split[axis=1, split input=[4,4,4,4]]"
            body = re.sub(r"\[[^\[\]]*\]", "", body)
        ops = [op.strip() for op in body.split("->")]
        self.readers = [op for op in ops if op in ("Slice", "Split")]
        # PyTorch's chunk: "Slice[axes=1, bounds computed from Add/Constant/Div/Gather/Mul/Shape]".
        bounds = re.search(r"bounds computed from ([A-Za-z/]+)", pattern)
        self.bound_ops = set(bounds.group(1).split("/")) if bounds else set()
        self.branch_ops = [op for op in ops if op not in ("Slice", "Split")]
        self.layers = [op for op in self.branch_ops if op in CONV_OPS]

    @property
    def per_branch(self) -> collections.Counter:
        return collections.Counter(self.branch_ops)

    def groups(self) -> list[int]:
        """The group of each fused conv layer, in order: a first layer that reads the shared input
        whole becomes one wide conv (group 1); every other layer is grouped by the branch count."""
        return [1 if i == 0 and self.shared_input else self.branches for i in range(len(self.layers))]


def test_every_fixture_has_a_pattern():
    assert len(FILES) >= 20  # both folders are there
    assert {f.name for f in FILES} == set(PATTERNS)
    assert all(f.with_suffix(".npz").exists() for f in FILES)
    # The parser reads what the README says (spot checks of the three shapes of pattern).
    resnext = Expected(PATTERNS["torch_resnext_branches.onnx"])
    assert (resnext.branches, resnext.shared_input, resnext.layers, resnext.groups()) == (4, True, ["Conv", "Conv"], [1, 4])
    noopt = Expected(PATTERNS["keras_slice_bn_relu_noopt.onnx"])
    assert noopt.branch_ops == ["Transpose", "Conv", "Transpose", "Mul", "Add", "Relu"]
    depthwise = Expected(PATTERNS["torch_depthwise_chunk.onnx"])
    assert (depthwise.branches, depthwise.readers, depthwise.groups()) == (8, ["Slice"], [8])
    assert depthwise.bound_ops == {"Add", "Constant", "Div", "Gather", "Mul", "Shape"}
    split = Expected(PATTERNS["torch_split_conv2d.onnx"])
    assert (split.readers, split.branch_ops, split.bound_ops) == (["Split"], ["Conv"], set())


def _fuse(path: Path, out: Path, shapes: dict) -> gconv_rewrite.api.Result:
    # The fusion alone: what follows a Concat is kept here (folding it is test_onnx_constants').
    return gconv_rewrite.fuse(path, output=out, verify=True, shapes=shapes, fold_bn=False)


@pytest.mark.parametrize("path", FILES, ids=[f"{f.parent.name}/{f.stem}" for f in FILES])
def test_exporter_file_fuses(path: Path, tmp_path: Path):
    expected = Expected(PATTERNS[path.name])
    stored = np.load(path.with_suffix(".npz"))
    # Dynamic-batch files: verification needs the batch, the stored input has it.
    shapes = {"x": list(stored["x"].shape)}
    out = tmp_path / "fused.onnx"
    committed = path.read_bytes()
    report = _fuse(path, out, shapes).report
    assert path.read_bytes() == committed  # the input is never modified
    assert report.verification.ran and report.verification.passed
    assert report.skipped == [], [s.reason for s in report.skipped]
    assert [r.groups for r in report.rewrites] == [max(expected.groups())]
    assert report.rewrites[0].kind == ("fuse-parallel-branches" if expected.shared_input else "fuse-split-conv")

    original, fused = onnx.load(str(path)), onnx.load(str(out))
    onnx.checker.check_model(fused, full_check=True)
    before, after = op_counts(original), op_counts(fused)
    n = expected.branches

    # Nothing of the slicing is left, bound computations included (none of these ops exists
    # elsewhere in the fixtures).
    for op in set(SLICING_OPS) | expected.bound_ops:
        assert after.get(op, 0) == 0, f"{op} left: {after}"
    assert dead_constants(fused) == []

    # Each op of the branch appears once instead of N times; everything else is kept.
    for op, count in expected.per_branch.items():
        assert after.get(op, 0) == before[op] - n * count + count, (op, before, after)
    # (Constant nodes: Split sizes and Slice bounds go with their readers; dead_constants above.)
    untouched_ops = set(before) - set(expected.per_branch) - set(SLICING_OPS) - expected.bound_ops - {"Constant"}
    assert {op: after.get(op) for op in untouched_ops} == {op: before[op] for op in untouched_ops}

    # One conv per grouped layer, with the expected groups, in graph order; the convs outside
    # the branches (keras_lambda_resnext's 1x1s) keep their names and group 1.
    old_names = {node.name for node in original.graph.node}
    new_convs = [node for node in fused.graph.node if node.op_type in CONV_OPS and node.name not in old_names]
    assert [node.op_type for node in new_convs] == expected.layers
    assert [attribute(node, "group", 1) for node in new_convs] == expected.groups()
    kept = [node for node in fused.graph.node if node.op_type in CONV_OPS and node.name in old_names]
    assert len(kept) == sum(before.get(op, 0) for op in CONV_OPS) - n * len(expected.layers)
    assert all(attribute(node, "group", 1) == 1 for node in kept)

    # The fused model does not gain Transposes; tf2onnx's per-branch ones collapse to one.
    assert after.get("Transpose", 0) <= before.get("Transpose", 0)
    if "Transpose" in expected.per_branch:
        assert after["Transpose"] < before["Transpose"]

    # The framework's own output, not only "same as the unfused model".
    (y,) = run_onnx(out, {"x": stored["x"]})
    assert y.shape == stored["y"].shape and np.abs(stored["y"]).max() > 0
    np.testing.assert_allclose(y, stored["y"], rtol=TOLERANCE, atol=TOLERANCE)

    # Fusing the fused file again rewrites nothing; fusing the original again gives the same bytes.
    again = _fuse(out, tmp_path / "again.onnx", shapes).report
    assert again.rewrites == [] and again.skipped == []
    _fuse(path, tmp_path / "twice.onnx", shapes)
    assert (tmp_path / "twice.onnx").read_bytes() == out.read_bytes()


def test_tf2onnx_files_lose_their_branch_transposes(tmp_path: Path):
    # The README's layouts: per-branch Transpose(0,3,1,2) (+ Transpose(0,2,3,1) without
    # tf2onnx's optimizers) become one in front of the grouped Conv and one at the end.
    for name in ("keras_slice_conv", "keras_split_conv", "keras_slice_conv_opset9", "keras_slice_bn_relu_noopt"):
        path = FIXTURES / "tf2onnx" / f"{name}.onnx"
        out = tmp_path / f"{name}.fused.onnx"
        _fuse(path, out, {"x": list(np.load(path.with_suffix(".npz"))["x"].shape)})
        fused = onnx.load(str(out))
        perms = [tuple(attribute(n, "perm")) for n in fused.graph.node if n.op_type == "Transpose"]
        assert perms == [(0, 3, 1, 2), (0, 2, 3, 1)], (name, perms)
        order = [n.op_type for n in fused.graph.node if n.op_type in ("Transpose", "Conv")]
        assert order == ["Transpose", "Conv", "Transpose"], (name, order)
