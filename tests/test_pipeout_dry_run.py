"""A truthful --dry-run (issue 24): the counts after are those of the real run, computed without
writing; BatchNorm folds counted apart from fusions; bytes before -> after; a note when the
parameter count changes."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import helper

import gconv_rewrite
from gconv_rewrite.api import dry_run
from samples.models import GraphBuilder
from tests.helpers import invoke


@pytest.fixture
def bn_model(tmp_path) -> Path:
    """split -> 4 Conv -> Concat -> BatchNormalization -> Relu: one fusion, one fold."""
    b = GraphBuilder(17)
    parts = b.split("x", 16, 4)
    outs = [b.conv(p, b.weight((4, 4, 3, 3), 36), None, name=f"conv{i}", kernel_shape=[3, 3], pads=[1] * 4)
            for i, p in enumerate(parts)]
    cat = b.node("Concat", outs, name="cat", axis=1)[0]
    rng = b.rng
    params = [b.const(n, a.astype(np.float32)) for n, a in (
        ("gamma", rng.uniform(0.5, 2, 16)), ("beta", rng.standard_normal(16)),
        ("mean", rng.standard_normal(16)), ("var", rng.uniform(0.5, 2, 16)))]
    bn = b.node("BatchNormalization", [cat, *params], name="bn", epsilon=1e-3)[0]
    b.nodes.append(helper.make_node("Relu", [bn], ["y"], name="relu"))
    path = tmp_path / "bn.onnx"
    onnx.save(b.model([("x", [1, 16, 6, 6])], [("y", [1, 16, 6, 6])]), path)
    return path


def changes(output: str) -> str:
    (line,) = [line for line in output.splitlines() if line.startswith("nodes: ")]
    return line


def test_dry_run_counts_what_the_real_run_does_and_writes_nothing(split_model, tmp_path):
    dry = invoke(split_model, "--dry-run")
    assert dry.exit_code == 0, dry.output
    assert sorted(p.name for p in tmp_path.iterdir()) == ["block.onnx"]
    real = invoke(split_model, "-o", tmp_path / "out.onnx")
    assert real.exit_code == 0, real.output
    line = changes(dry.stdout)
    assert line.startswith("nodes: 8 -> 3 ") and "parameters: " in line
    assert line == changes(real.stdout)  # nodes, parameters and bytes: the same as the written model's
    size_after = re.search(r"size: .* -> (.*)$", line).group(1)
    assert size_after.endswith(" KB")
    assert f"{(tmp_path / 'out.onnx').stat().st_size / 1000:.1f} KB" == size_after


def test_dry_run_json_after_is_the_rewritten_model(split_model, tmp_path):
    dry = json.loads(invoke(split_model, "--dry-run", "--format", "json").stdout)["models"][0]["report"]
    real = json.loads(invoke(split_model, "--format", "json", "-o", tmp_path / "o.onnx").stdout)["models"][0]["report"]
    assert dry["after"] != dry["before"]
    assert dry["after"] == real["after"] and dry["before"] == real["before"]
    assert dry["sizes"]["before"] == split_model.stat().st_size
    assert dry["sizes"]["after"] == real["sizes"]["after"] == (tmp_path / "o.onnx").stat().st_size
    assert dry["written"] is False and dry["verification"] is None


def test_batchnorm_folds_are_counted_apart_from_fusions(bn_model, tmp_path):
    dry = invoke(bn_model, "--dry-run")
    assert dry.exit_code == 0, dry.output
    assert "rewrites (1 fusion, 1 batchnorm fold):" in dry.stdout
    assert "1 model would be rewritten (1 group); run: gconv-rewrite" in dry.stdout  # a fold is no group
    real = invoke(bn_model, "-o", tmp_path / "out.onnx")
    assert "rewrites (1 fusion, 1 batchnorm fold):" in real.stdout
    assert changes(dry.stdout) == changes(real.stdout)
    # 16x4x3x3 weights + 4x16 BN tensors -> the same weights + a 16-wide bias: 48 parameters fewer, said why.
    assert "parameters: 640 -> 592" in changes(dry.stdout)
    (note,) = [line for line in dry.stdout.splitlines() if line.startswith("  parameters -48: ")]
    assert "BatchNorm fold" in note


def test_the_api_dry_run_leaves_an_in_memory_model_alone(split_model):
    import onnx_ir as ir

    model = ir.load(split_model)
    nodes = len(list(model.graph))
    result = dry_run(model)
    assert result.report.before.nodes == nodes == len(list(model.graph))  # the caller's model is untouched
    assert result.report.after.nodes == 3 and result.report.sizes["after"] > 0
    assert gconv_rewrite.check(split_model).after.nodes == nodes  # check(): find only, as before


def test_a_dry_run_that_cannot_rebuild_says_so(split_model, monkeypatch):
    from gconv_rewrite import api
    from gconv_rewrite.errors import BadInput

    def cannot(*args, **kwargs):
        raise BadInput("a rebuild this model does not allow")

    monkeypatch.setattr(api, "dry_run", cannot)
    result = invoke(split_model, "--dry-run")
    assert result.exit_code == 0, result.output
    assert "dry run: the counts after were not computed (the rewrite needs: a rebuild this model does not allow)" \
        in result.stdout
    assert "nodes: " not in result.stdout and "rewrites (1):" in result.stdout
