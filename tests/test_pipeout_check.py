"""--check prints like a linter (issue 24): a ``path: location: CODE message`` line per finding and
near miss, kept under -q where they are findings, a footer whose command applies the fixes, and
GitHub workflow annotations under --format github."""

from __future__ import annotations

import json
import os
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import onnx
import pytest

from gconv_rewrite import lint
from gconv_rewrite.batch import JobResult
from samples.models import grouped_block
from tests.helpers import invoke

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def folder(tmp_path) -> Path:
    """One fusable model, one near miss (dilations differ between branches), one clean model."""
    root = tmp_path / "models"
    root.mkdir()
    onnx.save(grouped_block("split", groups=4, channels=16, out_channels=16), root / "fusable.onnx")
    shutil.copy(REPO / "samples" / "near_miss_strides.onnx", root / "near.onnx")
    onnx.save(grouped_block("native", groups=2, channels=8, out_channels=8), root / "clean.onnx")
    return root


def rewrite_location(path: Path) -> str:
    (report,) = [m["report"] for m in json.loads(invoke(path, "--check", "--format", "json").stdout)["models"]]
    (rewrite,) = report["rewrites"]
    return rewrite["location"]


def test_folder_check_prints_each_finding_with_its_location_and_the_fix(folder):
    location = rewrite_location(folder / "fusable.onnx")
    result = invoke(folder, "--check")
    assert result.exit_code == 1, result.output
    lines = result.stdout.splitlines()
    (fusable,) = [line for line in lines if line.startswith(f"{folder / 'fusable.onnx'}: ")]
    assert fusable.startswith(f"{folder / 'fusable.onnx'}: {location}: fusable-group fuse-split-conv: ")
    assert "Conv(group=4)" in fusable
    (near,) = [line for line in lines if line.startswith(f"{folder / 'near.onnx'}: ")]
    assert near == f"{folder / 'near.onnx'}: Concat_9: attribute-mismatch different dilations between branches: (1,1) vs (2,2)"
    assert not any(str(folder / "clean.onnx") in line for line in lines)  # a clean model: no line
    assert "3 models: 2 clean, 1 would-rewrite; exit 1" in lines
    assert lines[-1] == f"1 model would be rewritten (1 group); run: gconv-rewrite {folder} --fuse"

    # The footer's command applies the fix: what it writes is clean.
    command = shlex.split(lines[-1].split("; run: ", 1)[1])
    assert command[0] == "gconv-rewrite"
    assert invoke(*command[1:]).exit_code == 0
    again = invoke(folder / "fusable.fused.onnx", "--check")
    assert again.exit_code == 0, again.output
    assert "fusable-group" not in again.stdout


def test_quiet_keeps_the_findings_and_drops_the_chatter(folder):
    result = invoke(folder, "--check", "-q")
    assert result.exit_code == 1
    lines = result.stdout.splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"{folder / 'fusable.onnx'}: ") and "fusable-group" in lines[0]
    single = invoke(folder / "fusable.onnx", "--check", "-q")
    assert single.exit_code == 1 and single.stdout.splitlines() == lines
    assert invoke(folder / "clean.onnx", "--check", "-q").stdout == ""


def test_a_failed_model_is_a_line_too(folder):
    (folder / "broken.onnx").write_bytes(b"not protobuf at all" * 4)
    result = invoke(folder, "--check", "-q")
    assert result.exit_code == 2
    (broken,) = [line for line in result.stdout.splitlines() if "broken.onnx" in line]
    assert broken.startswith(f"{folder / 'broken.onnx'}: -: bad-input ") and "not a valid ONNX model" in broken


def test_github_annotations(folder):
    location = rewrite_location(folder / "fusable.onnx")
    prefix = f"{folder / 'fusable.onnx'}: {location}: fusable-group "
    (text,) = [line for line in invoke(folder, "--check").stdout.splitlines() if line.startswith(prefix)]
    result = invoke(folder, "--check", "--format", "github")
    assert result.exit_code == 1, result.output
    lines = result.stdout.splitlines()
    assert lines[0] == f"::error file={folder / 'fusable.onnx'},title=fusable-group::{location}: " + text[len(prefix):]
    assert lines[1] == (f"::warning file={folder / 'near.onnx'},title=attribute-mismatch::Concat_9: different dilations "
                        "between branches: (1,1) vs (2,2)")
    assert lines[2].startswith("1 model would be rewritten (1 group); run: gconv-rewrite ")


def test_github_escapes_what_would_break_the_command():
    finding = lint.Finding("a,b:c%.onnx", "node", "near-miss", "line one\nline two: 100%", "warning")
    assert lint.github_line(finding) == ("::warning file=a%2Cb%3Ac%25.onnx,title=near-miss::"
                                         "node: line one%0Aline two: 100%25")


def _result(skipped, rewrites=()) -> JobResult:
    report = {"rewrites": list(rewrites), "skipped": skipped}
    return JobResult("m.onnx", None, "clean", 0, report=report)


def test_codes_come_from_the_skip_record_with_a_generic_fallback():
    skipped = [{"location": "cat", "reason": "sizes differ", "graph": "", "finding": "", "code": "uneven-split"},
               {"location": "cat2", "reason": "kernels differ", "graph": "", "finding": ""},
               {"location": "concat_1", "reason": "LATE BINDING", "graph": "", "finding": "late-binding"},
               {"location": "c", "reason": "r", "graph": "body", "finding": ""}]
    found = lint.model_findings(_result(skipped), check=True)
    assert [(f.location, f.code, f.severity) for f in found] == [
        ("cat", "uneven-split", "warning"), ("cat2", "near-miss", "warning"),
        ("concat_1", "late-binding", "error"), ("body/c", "near-miss", "warning")]
    assert lint.text_line(found[0]) == "m.onnx: cat: uneven-split sizes differ"


def test_footer_counts_groups_not_batchnorm_folds():
    fold = {"kind": "fold-batchnorm", "location": "c", "groups": 4, "channels": {"in": 8, "out": 8}, "nodes": ["bn"]}
    fuse = {**fold, "kind": "fuse-split-conv", "nodes": ["s", "c0", "c1", "cat"]}
    results = [_result([], [fuse, fold]), _result([], [fuse]), _result([])]
    line = lint.footer(results, mode="fuse", check=False, fix="gconv-rewrite m/ --fuse")
    assert line == "2 models would be rewritten (2 groups); run: gconv-rewrite m/ --fuse"
    assert lint.footer([_result([])], mode="fuse", check=False, fix="x") is None
    assert lint.footer([_result([])], mode="fuse", check=True, fix="x") == "0 models would be rewritten (0 groups)"


def test_the_command_line_check_of_a_folder_exits_1_with_the_location(folder):
    """The issue's 'done when': ``gconv-rewrite models/ --check`` in a shell, as CI runs it."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run([sys.executable, "-m", "gconv_rewrite", str(folder), "--check"], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 1, done.stderr
    location = rewrite_location(folder / "fusable.onnx")
    assert f"{folder / 'fusable.onnx'}: {location}: fusable-group " in done.stdout
    assert "run: gconv-rewrite" in done.stdout.splitlines()[-1]


def test_one_failed_model_is_its_one_line_error_only(tmp_path):
    broken = tmp_path / "broken.onnx"
    broken.write_bytes(b"not protobuf at all" * 4)
    for flags in ([], ["--format", "github"]):
        result = invoke(broken, "--check", *flags)
        assert result.exit_code == 2
        (line,) = result.stderr.splitlines()
        assert line.startswith("gconv-rewrite: error: ") and "not a valid ONNX model" in line
        if flags:  # the annotation, and no footer
            (annotation,) = result.stdout.splitlines()
            assert annotation.startswith(f"::error file={broken},title=bad-input::-: ")
        else:
            assert result.stdout == ""
