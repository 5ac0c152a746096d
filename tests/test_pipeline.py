"""Pipelines: folders of models, --jobs, --format json, exit codes, config files, the pre-commit hook."""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
from pathlib import Path

import onnx
import pytest

from samples.models import grouped_block
from tests.helpers import invoke

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def models_dir(tmp_path) -> Path:
    root = tmp_path / "models"
    (root / "vision").mkdir(parents=True)
    onnx.save(grouped_block("split", groups=4, channels=16, out_channels=16), root / "a.onnx")
    onnx.save(grouped_block("slice", groups=2, channels=8, out_channels=8), root / "vision" / "b.onnx")
    onnx.save(grouped_block("native", groups=2, channels=8, out_channels=8), root / "vision" / "c.onnx")
    (root / "broken.onnx").write_bytes(b"\x00\x01 definitely not protobuf" * 3)
    (root / "notes.txt").write_text("not a model")
    return root


def test_folder_with_jobs_json_and_a_broken_model(models_dir, tmp_path):
    out = tmp_path / "out"
    result = invoke(models_dir, "--fuse", "-o", out, "--jobs", "2", "--format", "json")
    document = json.loads(result.stdout)  # stdout is exactly one JSON document
    assert result.exit_code == 2 == document["exit_code"]
    rows = {Path(m["input"]).relative_to(models_dir).as_posix(): m for m in document["models"]}
    assert sorted(rows) == ["a.onnx", "broken.onnx", "vision/b.onnx", "vision/c.onnx"]
    assert rows["broken.onnx"]["status"] == "error" and rows["broken.onnx"]["exit_code"] == 2
    assert "not a valid ONNX model" in rows["broken.onnx"]["error"]["message"]
    for name in ("a.onnx", "vision/b.onnx"):
        assert rows[name]["status"] == "rewritten"
        assert rows[name]["report"]["verification"]["passed"] is True
        written = out / name
        assert rows[name]["output"] == str(written) and written.is_file()
        assert sum(n.op_type == "Conv" for n in onnx.load(str(written)).graph.node) == 1
    assert rows["vision/c.onnx"]["status"] == "unchanged" and (out / "vision" / "c.onnx").is_file()
    assert not (out / "broken.onnx").exists()


def test_text_table_and_worst_exit_code(models_dir, tmp_path):
    (models_dir / "broken.onnx").unlink()
    result = invoke(models_dir, "-o", tmp_path / "out")
    assert result.exit_code == 0
    assert "model" in result.stdout and "status" in result.stdout and "rewritten" in result.stdout
    assert "3 models: 2 rewritten, 1 unchanged; exit 0" in result.stdout
    check = invoke(models_dir, "--check")
    assert check.exit_code == 1
    assert "3 models: 1 clean, 2 would-rewrite; exit 1" in check.stdout
    assert not any(p.name.endswith(".fused.onnx") for p in models_dir.rglob("*"))


def test_several_files_beside_inputs_and_rerun_skips_outputs(models_dir):
    (models_dir / "broken.onnx").unlink()
    a, b = models_dir / "a.onnx", models_dir / "vision" / "b.onnx"
    assert invoke(a, b).exit_code == 0
    assert a.with_name("a.fused.onnx").is_file() and b.with_name("b.fused.onnx").is_file()
    again = invoke(models_dir, "--check", "--format", "json")
    inputs = [Path(m["input"]).name for m in json.loads(again.stdout)["models"]]
    assert sorted(inputs) == ["a.onnx", "b.onnx", "c.onnx"]  # our outputs are not walked again


def test_name_collision_is_refused(tmp_path):
    for sub in ("x", "y"):
        (tmp_path / sub).mkdir()
        onnx.save(grouped_block("split"), tmp_path / sub / "m.onnx")
    result = invoke(tmp_path / "x" / "m.onnx", tmp_path / "y" / "m.onnx", "-o", tmp_path / "out")
    assert result.exit_code == 2 and "would both be written" in result.output


def test_config_file_and_pyproject_defaults_flags_win(models_dir, tmp_path, monkeypatch):
    (models_dir / "broken.onnx").unlink()
    config = tmp_path / "gconv.toml"
    config.write_text('atol = 0.5\nrtol = 0.25\nseed = 3\n')
    report = tmp_path / "r.json"
    assert invoke(models_dir / "a.onnx", "--config", config, "--report", report, "-o", tmp_path / "1.onnx").exit_code == 0
    verification = json.loads(report.read_text())["models"][0]["report"]["verification"]
    assert (verification["atol"], verification["rtol"]) == (0.5, 0.25)
    assert invoke(models_dir / "a.onnx", "--config", config, "--atol", "0.125", "--report", report,
                  "-o", tmp_path / "2.onnx").exit_code == 0
    assert json.loads(report.read_text())["models"][0]["report"]["verification"]["atol"] == 0.125
    project = tmp_path / "project"
    project.mkdir()
    (project / "pyproject.toml").write_text('[tool.gconv-rewrite]\nrtol = 0.0625\nformat = "json"\n')
    monkeypatch.chdir(project)
    result = invoke(models_dir / "a.onnx", "-o", tmp_path / "3.onnx")
    assert result.exit_code == 0
    (row,) = json.loads(result.stdout)["models"]
    assert row["report"]["verification"]["rtol"] == 0.0625
    (project / "pyproject.toml").write_text('[tool.gconv-rewrite]\nrtoll = 1\n')
    typo = invoke(models_dir / "a.onnx", "--check")
    assert typo.exit_code == 2 and "unknown setting 'rtoll'" in typo.output


def test_pre_commit_hook_entry_as_pre_commit_runs_it(models_dir):
    """Run the hook's entry the way pre-commit does: entry + the matching staged file names."""
    import yaml

    (hook,) = yaml.safe_load((REPO / ".pre-commit-hooks.yaml").read_text())
    assert hook["id"] == "gconv-rewrite-check" and hook["language"] == "python"
    import re

    files = [str(p) for p in sorted(models_dir.rglob("*")) if re.search(hook["files"], p.name)
             and p.name != "broken.onnx"]
    command = shlex.split(hook["entry"])
    assert command[0] == "gconv-rewrite"
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    run = lambda names: subprocess.run([sys.executable, "-m", "gconv_rewrite", *command[1:], *names],
                                       capture_output=True, text=True, env=env)
    dirty = run(files)
    assert dirty.returncode == 1, dirty.stderr
    assert "would-rewrite" in dirty.stdout
    clean = run([f for f in files if f.endswith("c.onnx")])
    assert clean.returncode == 0 and "check: 0 fusable patterns found" in clean.stdout
