"""Habits users bring from other tools (issue 24, paths): `-` for stdin, and onnxsim's `TOOL IN OUT`.
Each is answered in one line, exit 2, before anything is written."""

from __future__ import annotations

import onnx

from samples.models import grouped_block
from tests.helpers import invoke


def test_a_second_path_named_like_an_output_gets_the_o_hint(tmp_path):
    source = tmp_path / "in.onnx"
    onnx.save(grouped_block("split"), source)
    result = invoke(source, tmp_path / "out.onnx")
    assert result.exit_code == 2
    (line,) = result.output.strip().splitlines()
    assert "out.onnx: no such model; to write the output there, pass it with -o" in line
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.onnx"]  # in.fused.onnx was not written first


def test_two_existing_models_still_run_as_a_batch(tmp_path):
    for name in ("a.onnx", "b.onnx"):
        onnx.save(grouped_block("split"), tmp_path / name)
    result = invoke(tmp_path / "a.onnx", tmp_path / "b.onnx", "--check")
    assert result.exit_code == 1, result.output  # both have a group to fuse
    assert "a.onnx" in result.output and "b.onnx" in result.output


def test_dash_is_not_stdin(tmp_path):
    result = invoke("-")
    assert result.exit_code == 2
    (line,) = result.output.strip().splitlines()
    assert "standard input is not supported" in line
