"""End-to-end tests of the command line: every flag and every exit code, on real files."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest

from samples.models import grouped_block
from tests.helpers import digest, invoke, op_counts

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def dynamic_model(tmp_path) -> Path:
    model = grouped_block("slice", groups=2, channels=8, out_channels=8)
    dim = model.graph.input[0].type.tensor_type.shape.dim[0]
    dim.dim_param = "batch"
    path = tmp_path / "dynamic.onnx"
    onnx.save(model, path)
    return path


def test_default_fuse_writes_beside_input_and_keeps_input(split_model):
    before = digest(split_model)
    result = invoke(split_model)
    assert result.exit_code == 0, result.output
    out = split_model.with_name("block.fused.onnx")
    assert out.is_file()
    assert digest(split_model) == before
    assert op_counts(out) == {"Conv": 1, "Relu": 1, "Identity": 1}
    assert "rewrites (1)" in result.output
    assert "group=4, channels 16->8" in result.output
    assert "verification: passed" in result.output
    assert "nodes: 8 -> 3" in result.output
    assert "time: load" in result.output
    # No staging leftovers beside the output.
    assert sorted(p.name for p in split_model.parent.iterdir()) == ["block.fused.onnx", "block.onnx"]


def test_output_flag_force_and_refusals(split_model, tmp_path):
    out = tmp_path / "out.onnx"
    assert invoke(split_model, "-o", out).exit_code == 0
    first = digest(out)
    again = invoke(split_model, "-o", out)
    assert again.exit_code == 2
    assert "already exists" in again.output and "--force" in again.output
    assert digest(out) == first
    assert invoke(split_model, "-o", out, "--force").exit_code == 0
    same = invoke(split_model, "-o", split_model, "--force")
    assert same.exit_code == 2 and "refusing to overwrite the input" in same.output
    missing_dir = invoke(split_model, "-o", tmp_path / "nope" / "x.onnx")
    assert missing_dir.exit_code == 2 and "does not exist" in missing_dir.output


def test_check_exit_codes_and_writes_nothing(split_model, tmp_path):
    found = invoke(split_model, "--check")
    assert found.exit_code == 1
    assert "check: 1 fusable pattern found" in found.output
    assert sorted(p.name for p in tmp_path.iterdir()) == ["block.onnx"]
    assert invoke(split_model).exit_code == 0
    clean = invoke(split_model.with_name("block.fused.onnx"), "--check")
    assert clean.exit_code == 0
    assert "check: 0 fusable patterns found" in clean.output


def test_dry_run_lists_and_writes_nothing(split_model, tmp_path):
    result = invoke(split_model, "--dry-run")
    assert result.exit_code == 0
    assert "group=4" in result.output and "dry run: nothing written" in result.output
    assert sorted(p.name for p in tmp_path.iterdir()) == ["block.onnx"]
    assert invoke(split_model, "--check", "--dry-run").exit_code == 2


def test_report_json(split_model, tmp_path):
    report_path = tmp_path / "report.json"
    result = invoke(split_model, "--report", report_path)
    assert result.exit_code == 0
    report = json.loads(report_path.read_text())["models"][0]["report"]
    assert report["input"] == str(split_model)
    assert report["output"] == str(split_model.with_name("block.fused.onnx"))
    (rewrite,) = report["rewrites"]
    assert rewrite["kind"] == "fuse-split-conv" and rewrite["groups"] == 4
    assert rewrite["channels"] == {"in": 16, "out": 8}
    assert len(rewrite["nodes"]) == 6  # Split, 4 Conv, Concat
    assert report["skipped"] == []
    verification = report["verification"]
    assert verification["passed"] is True
    (output,) = verification["outputs"]
    assert output["name"] == "y" and output["max_abs_error"] < 1e-5 and "max_rel_error" in output
    assert report["before"]["op_counts"]["Conv"] == 4 and report["after"]["op_counts"]["Conv"] == 1
    assert report["before"]["nodes"] == 8 and report["after"]["nodes"] == 3
    assert set(report["timings"]) >= {"load", "rewrite", "save", "verify"}


def test_report_lists_skips_with_reasons(tmp_path):
    near_miss = REPO / "samples" / "near_miss_strides.onnx"
    report_path = tmp_path / "r.json"
    result = invoke(near_miss, "--dry-run", "--report", report_path)
    assert result.exit_code == 0
    (skip,) = json.loads(report_path.read_text())["models"][0]["report"]["skipped"]
    assert "different dilations between branches" in skip["reason"]
    assert "different dilations" in result.output


def test_no_verify_says_so(split_model):
    result = invoke(split_model, "--no-verify")
    assert result.exit_code == 0
    assert "verification: skipped (--no-verify)" in result.output


def test_inputs_npz(split_model, tmp_path):
    npz = tmp_path / "inputs.npz"
    np.savez(npz, x=np.ones((1, 16, 8, 8), np.float32))
    ok = invoke(split_model, "--inputs", npz, "-o", tmp_path / "a.onnx")
    assert ok.exit_code == 0 and "verification: passed" in ok.output
    wrong = tmp_path / "wrong.npz"
    np.savez(wrong, nope=np.ones((1, 16, 8, 8), np.float32))
    bad = invoke(split_model, "--inputs", wrong, "-o", tmp_path / "b.onnx")
    assert bad.exit_code == 2 and "missing x" in bad.output and "nope" in bad.output
    assert not (tmp_path / "b.onnx").exists()


def test_dynamic_dims_need_shape(dynamic_model, tmp_path):
    # A dynamic batch alone is set to 1 (tests/test_verify_inputs.py); any other dynamic dim needs --shape.
    model = onnx.load(str(dynamic_model))
    model.graph.input[0].type.tensor_type.shape.dim[2].dim_param = "height"
    onnx.save(model, str(dynamic_model))
    refused = invoke(dynamic_model)
    assert refused.exit_code == 2
    assert "height" in refused.output and "--shape x=1,8,N,8" in refused.output
    assert not dynamic_model.with_name("dynamic.fused.onnx").exists()
    ok = invoke(dynamic_model, "--shape", "x=2,8,8,8")
    assert ok.exit_code == 0, ok.output
    assert "2x8x8x8" in ok.output
    bad = invoke(dynamic_model, "--shape", "x=two", "-o", tmp_path / "c.onnx")
    assert bad.exit_code == 2 and "--shape" in bad.output
    unknown = invoke(dynamic_model, "--shape", "z=1,8,8,8", "-o", tmp_path / "d.onnx")
    assert unknown.exit_code == 2 and "model's inputs are x" in unknown.output


def test_tolerances_and_seed_are_used(split_model, tmp_path):
    report_path = tmp_path / "r.json"
    result = invoke(split_model, "--atol", "0.5", "--rtol", "0.25", "--seed", "7", "--report", report_path)
    assert result.exit_code == 0
    verification = json.loads(report_path.read_text())["models"][0]["report"]["verification"]
    assert verification["atol"] == 0.5 and verification["rtol"] == 0.25
    assert invoke(split_model, "--atol", "-1").exit_code == 2


def test_verification_failure_writes_nothing_and_exits_1(split_model, monkeypatch):
    """Corrupt one fused weight on purpose: verification must catch it."""
    import gconv_rewrite.passes.onnx.fuse_split_conv as fusion

    real_plan = fusion.plan_fusion

    def corrupted(*args, **kwargs):
        plan = real_plan(*args, **kwargs)
        plan.weight = plan.weight.copy()
        plan.weight.flat[0] += 1.0
        return plan

    monkeypatch.setattr(fusion, "plan_fusion", corrupted)
    result = invoke(split_model)
    assert result.exit_code == 1
    assert "verification failed" in result.output and "MISMATCH" in result.output
    assert sorted(p.name for p in split_model.parent.iterdir()) == ["block.onnx"]


def test_quiet_and_verbose(split_model, tmp_path):
    quiet = invoke(split_model, "-q")
    assert quiet.exit_code == 0 and quiet.output == ""
    missing = tmp_path / "missing.onnx"
    plain = invoke(missing)
    assert plain.exit_code == 2
    assert plain.output.strip() == f"gconv-rewrite: error: {missing}: no such file or directory"
    verbose = invoke(missing, "-v")
    assert verbose.exit_code == 2 and "Traceback" in verbose.output and "BadInput" in verbose.output


@pytest.mark.parametrize("content", [b"", b"\x8a\x07garbage\xff" * 50, b"not an onnx model at all\n"])
def test_bad_files_are_one_line_errors(tmp_path, content):
    path = tmp_path / "bad.onnx"
    path.write_bytes(content)
    result = invoke(path)
    assert result.exit_code == 2
    assert result.output.count("\n") == 1 and str(path) in result.output
    assert "Traceback" not in result.output
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.onnx"]


def test_truncated_model(split_model):
    data = split_model.read_bytes()
    split_model.write_bytes(data[: len(data) // 2])
    result = invoke(split_model)
    assert result.exit_code == 2 and "not a valid ONNX model" in result.output


def test_directory_that_is_not_a_savedmodel(tmp_path):
    result = invoke(tmp_path)
    assert result.exit_code == 2 and "not a SavedModel" in result.output


def test_unknown_ops_make_verification_impossible(tmp_path):
    model = grouped_block("split", groups=2, channels=8, out_channels=8)
    relu = next(n for n in model.graph.node if n.op_type == "Relu")
    relu.domain = "com.example"
    model.opset_import.append(onnx.helper.make_opsetid("com.example", 1))
    path = tmp_path / "custom.onnx"
    onnx.save(model, path)
    refused = invoke(path)
    assert refused.exit_code == 2
    assert "verification is impossible" in refused.output and "--no-verify" in refused.output
    assert not path.with_name("custom.fused.onnx").exists()
    forced = invoke(path, "--no-verify")
    assert forced.exit_code == 0
    assert op_counts(path.with_name("custom.fused.onnx"))["Conv"] == 1


def test_unsupported_opset(tmp_path):
    model = grouped_block("split", groups=2, channels=8, out_channels=8)
    model.opset_import[0].version = 99
    path = tmp_path / "future.onnx"
    onnx.save(model, path)
    result = invoke(path)
    assert result.exit_code == 2 and "opset 99 is not supported" in result.output


def test_determinism_and_idempotency(split_model, tmp_path):
    assert invoke(split_model, "-o", tmp_path / "one.onnx").exit_code == 0
    assert invoke(split_model, "-o", tmp_path / "two.onnx").exit_code == 0
    assert digest(tmp_path / "one.onnx") == digest(tmp_path / "two.onnx")
    again = invoke(tmp_path / "one.onnx", "-o", tmp_path / "three.onnx")
    assert again.exit_code == 0 and "rewrites: none" in again.output
    assert digest(tmp_path / "three.onnx") == digest(tmp_path / "one.onnx")


def test_version_and_module_entry_point(split_model):
    version = invoke("--version")
    assert version.exit_code == 0 and "gconv-rewrite" in version.output
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.run([sys.executable, "-m", "gconv_rewrite", str(split_model), "--check"],
                          capture_output=True, text=True, env=env, cwd=REPO)
    assert proc.returncode == 1, proc.stderr
    assert "check: 1 fusable pattern found" in proc.stdout


def test_progress_callback_gets_every_phase(split_model, tmp_path):
    import gconv_rewrite

    seen = []
    gconv_rewrite.fuse(split_model, output=tmp_path / "p.onnx", progress=lambda phase, seconds: seen.append(phase))
    assert seen == ["load", "rewrite", "save", "checker", "verify"]
