"""ONNX I/O: what the rewrite did not touch survives; external data stays external; big models."""

from __future__ import annotations

import time

import numpy as np
import onnx
import onnx_ir as ir
from click.testing import CliRunner
from onnx import helper

import gconv_rewrite
from gconv_rewrite.cli import main
from samples.models import grouped_block, resnext50
from tests.helpers import run_onnx as run_ort


def decorated_model() -> onnx.ModelProto:
    """A fusable block carrying everything a save must keep."""
    model = grouped_block("split", groups=4, channels=16, out_channels=16)
    model.producer_name, model.producer_version = "my-exporter", "9.9"
    model.doc_string = "model doc"
    model.graph.doc_string = "graph doc"
    helper.set_model_props(model, {"author": "someone", "license": "MIT"})
    relu = next(n for n in model.graph.node if n.op_type == "Relu")
    relu.doc_string = "relu doc"
    relu.metadata_props.append(onnx.StringStringEntryProto(key="origin", value="layer4"))
    model.graph.value_info.append(helper.make_tensor_value_info(relu.output[0], onnx.TensorProto.FLOAT,
                                                                [1, 16, 8, 8]))
    # A local function and its opset, unused by the rewrite.
    function = helper.make_function("custom.fn", "Twice", ["a"], ["b"],
                                    [helper.make_node("Add", ["a", "a"], ["b"])],
                                    [helper.make_opsetid("", 17)])
    model.functions.append(function)
    model.opset_import.append(helper.make_opsetid("custom.fn", 1))
    return model


def test_everything_untouched_is_kept(tmp_path):
    source = tmp_path / "m.onnx"
    onnx.save(decorated_model(), source)
    out = tmp_path / "m.fused.onnx"
    result = gconv_rewrite.fuse(source, output=out)
    assert result.report.verification.passed
    fused = onnx.load(str(out))
    assert (fused.producer_name, fused.producer_version) == ("my-exporter", "9.9")
    assert fused.doc_string == "model doc" and fused.graph.doc_string == "graph doc"
    assert {p.key: p.value for p in fused.metadata_props} == {"author": "someone", "license": "MIT"}
    assert {(o.domain, o.version) for o in fused.opset_import} == {("", 17), ("custom.fn", 1)}
    assert [f.name for f in fused.functions] == ["Twice"]
    relu = next(n for n in fused.graph.node if n.op_type == "Relu")
    assert relu.name == "relu" and relu.doc_string == "relu doc"
    assert {p.key: p.value for p in relu.metadata_props} == {"origin": "layer4"}
    assert [v.name for v in fused.graph.value_info] == [relu.output[0]]
    assert [n.name for n in fused.graph.node if n.op_type != "Conv"] == ["relu", "output"]
    assert [o.name for o in fused.graph.output] == ["y"] and [i.name for i in fused.graph.input] == ["x"]
    onnx.checker.check_model(fused)


def test_external_data_stays_external_and_input_is_untouched(tmp_path):
    source = tmp_path / "ext.onnx"
    onnx.save(grouped_block("slice", groups=4, channels=32, out_channels=32), source,
              save_as_external_data=True, location="ext.weights", size_threshold=512)
    weights_before = (tmp_path / "ext.weights").read_bytes()
    result = CliRunner().invoke(main, [str(source)])
    assert result.exit_code == 0, result.output
    out = tmp_path / "ext.fused.onnx"
    (data,) = tmp_path.glob("ext.fused.onnx.*.data")  # named after its content: see test_redteam_io.py
    assert (tmp_path / "ext.weights").read_bytes() == weights_before
    fused = onnx.load(str(out), load_external_data=False)
    external = [t.name for t in fused.graph.initializer if t.data_location == onnx.TensorProto.EXTERNAL]
    assert external, "the fused weight must be external like the weights it replaces"
    assert all(e.value == data.name for t in fused.graph.initializer
               if t.data_location == onnx.TensorProto.EXTERNAL for e in t.external_data if e.key == "location")
    x = np.random.default_rng(1).standard_normal((1, 32, 8, 8)).astype(np.float32)
    np.testing.assert_allclose(run_ort(out, {"x": x})[0], run_ort(source, {"x": x})[0], atol=1e-5)


def test_missing_external_data_is_a_clear_error(tmp_path):
    source = tmp_path / "ext.onnx"
    onnx.save(grouped_block("split"), source, save_as_external_data=True, location="w.bin", size_threshold=0)
    (tmp_path / "w.bin").unlink()
    result = CliRunner().invoke(main, [str(source)])
    assert result.exit_code == 2
    assert "external data file w.bin is missing" in result.output


def test_api_accepts_an_ir_model_and_leaves_it_unchanged():
    model = ir.serde.deserialize_model(grouped_block("split", groups=2, channels=8, out_channels=8))
    before = [n.op_type for n in model.graph]
    result = gconv_rewrite.fuse(model)
    assert [n.op_type for n in model.graph] == before
    assert [n.op_type for n in result.model.graph] == ["Conv", "Relu", "Identity"]
    assert result.report.verification.passed and result.changed
    report = gconv_rewrite.check(model)
    assert len(report.rewrites) == 1 and report.rewrites[0].groups == 2


def test_api_verify(tmp_path):
    a, b = tmp_path / "a.onnx", tmp_path / "b.onnx"
    onnx.save(grouped_block("split", seed=0), a)
    onnx.save(grouped_block("native", seed=0), b)  # same weights, native form
    assert gconv_rewrite.verify(a, b).passed
    onnx.save(grouped_block("native", seed=1), b)  # other weights
    verification = gconv_rewrite.verify(a, b)
    assert not verification.passed and verification.outputs[0].max_abs_error > 1e-3


def test_resnext50_100mb_fuses_and_verifies_from_the_cli(tmp_path):
    """Acceptance: a ~100 MB ResNeXt-50-shaped model in Split form fuses and verifies."""
    source = tmp_path / "resnext50_split.onnx"
    onnx.save(resnext50("split", image=64), source)
    assert source.stat().st_size > 95e6
    start = time.perf_counter()
    result = CliRunner().invoke(main, [str(source), "-o", tmp_path / "fused.onnx"])
    elapsed = time.perf_counter() - start
    assert result.exit_code == 0, result.output
    assert "rewrites (16)" in result.output and "verification: passed" in result.output
    fused = onnx.load(str(tmp_path / "fused.onnx"))
    convs = [n for n in fused.graph.node if n.op_type == "Conv"]
    native = resnext50("native", image=64)
    assert len(convs) == sum(n.op_type == "Conv" for n in native.graph.node) == 53
    groups = sorted(a.i for n in convs for a in n.attribute if a.name == "group")
    assert groups == [32] * 16
    assert not any(n.op_type in ("Split", "Concat") for n in fused.graph.node)
    print(f"100 MB ResNeXt-50 fuse+verify from the CLI: {elapsed:.2f} s")
