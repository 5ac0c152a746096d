"""Paths given to -o and --report (issue 24): a symlink is written through (its target replaced
atomically, the link kept), a link to a process's stream (/dev/stdout) and non-regular files are
refused, ``--report -`` is stdout, and an output named like another format than the one written
is refused with the flag (``--to``) or the suffix that fits."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import onnx
import pytest

from gconv_rewrite import formats
from gconv_rewrite.errors import BadInput, OutputError
from tests.conftest import attribute, op_counts
from tests.helpers import invoke
from tests.test_formats_table import onnx_split_model

REPO = Path(__file__).resolve().parents[1]


def fused_groups(path: Path) -> list[int]:
    model = onnx.load(path)
    assert op_counts(model) == {"Conv": 1}
    return [attribute(node, "group") for node in model.graph.node]


@pytest.fixture
def model(tmp_path) -> Path:
    return onnx_split_model(tmp_path / "m.onnx")


# -- symlinks: written through ---------------------------------------------------------------------


def test_a_symlink_output_is_written_through_and_kept(tmp_path, model):
    (tmp_path / "real").mkdir()
    target = tmp_path / "real" / "target.onnx"
    target.write_bytes(b"old")
    link = tmp_path / "link.onnx"
    link.symlink_to(Path("real") / "target.onnx")

    refused = invoke(model, "-o", link)
    assert refused.exit_code == 2 and "already exists (use --force" in refused.stderr
    assert target.read_bytes() == b"old"

    result = invoke(model, "-o", link, "--force")
    assert result.exit_code == 0, result.stderr
    assert link.is_symlink() and os.readlink(link) == str(Path("real") / "target.onnx")
    assert fused_groups(target) == [2]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["link.onnx", "m.onnx", "real"]  # no staging left
    assert sorted(p.name for p in (tmp_path / "real").iterdir()) == ["target.onnx"]


def test_a_dangling_symlink_output_creates_its_target(tmp_path, model):
    (tmp_path / "real").mkdir()
    link = tmp_path / "link.onnx"
    link.symlink_to(tmp_path / "real" / "new.onnx")
    result = invoke(model, "-o", link)
    assert result.exit_code == 0, result.stderr
    assert link.is_symlink() and fused_groups(tmp_path / "real" / "new.onnx") == [2]


def test_a_chain_of_symlinks_lands_on_the_last_target(tmp_path, model):
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    final = tmp_path / "b" / "final.onnx"
    (tmp_path / "a" / "middle.onnx").symlink_to(final)
    (tmp_path / "first.onnx").symlink_to(tmp_path / "a" / "middle.onnx")
    assert formats.follow_output_link(tmp_path / "first.onnx") == final
    assert invoke(model, "-o", tmp_path / "first.onnx").exit_code == 0
    assert (tmp_path / "first.onnx").is_symlink() and (tmp_path / "a" / "middle.onnx").is_symlink()
    assert fused_groups(final) == [2]


def test_a_symlink_report_is_written_through(tmp_path, model):
    (tmp_path / "reports").mkdir()
    link = tmp_path / "report.json"
    link.symlink_to(tmp_path / "reports" / "r.json")
    result = invoke(model, "--report", link)
    assert result.exit_code == 0, result.stderr
    assert link.is_symlink()
    assert json.loads((tmp_path / "reports" / "r.json").read_text())["models"][0]["report"]["input"] == str(model)


def test_a_plain_path_is_returned_as_given(tmp_path):
    assert formats.follow_output_link(Path("out.onnx")) == Path("out.onnx")
    assert formats.follow_output_link(tmp_path / "x.onnx") == tmp_path / "x.onnx"


# -- streams and non-regular files: refused --------------------------------------------------------


@pytest.mark.skipif(not Path("/proc/self/fd").is_dir(), reason="needs /proc")
@pytest.mark.parametrize("flag", ["-o", "--report"])
def test_a_link_to_a_stream_is_refused_and_kept(tmp_path, model, flag):
    """What /dev/stdout is: a link to /proc/self/fd/1 (a local one here, so a regression cannot
    replace the system's). Refused before anything runs, the link left as it is."""
    link = tmp_path / ("stdout.onnx" if flag == "-o" else "stdout.json")
    link.symlink_to("/proc/self/fd/1")
    result = invoke(model, flag, link, "--force")
    assert result.exit_code == 2
    assert "leads to a stream of a process" in result.stderr and f"choose a file for {flag}" in result.stderr
    assert ("--report - writes the report to stdout" in result.stderr) == (flag == "--report")
    assert link.is_symlink() and os.readlink(link) == "/proc/self/fd/1"
    assert not (tmp_path / "m.fused.onnx").exists()


@pytest.mark.skipif(not Path("/proc/self/fd").is_dir(), reason="needs /proc")
def test_dev_stdout_redirected_to_a_file_is_neither_replaced_nor_written(tmp_path, model):
    """The finding: ``-o /dev/stdout --force`` with stdout redirected to a file replaced the
    /dev/stdout link. Checked through formats (no link of the system's is touched): /dev/stdout and
    /dev/fd/1 are both refused while stdout is a regular file."""
    for path in ("/dev/stdout", "/dev/fd/1"):
        with pytest.raises(OutputError, match="leads to a stream of a process"):
            formats.follow_output_link(Path(path))
    out = tmp_path / "captured.txt"
    with open(out, "wb") as stdout:
        done = subprocess.run([sys.executable, "-m", "gconv_rewrite", str(model), "-o", "/dev/stdout", "--force"],
                              stdout=stdout, stderr=subprocess.PIPE, cwd=REPO, text=True,
                              env={**os.environ, "PYTHONPATH": str(REPO)}, timeout=120)
    assert done.returncode == 2 and "leads to a stream of a process" in done.stderr
    assert out.read_bytes() == b""


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="POSIX")
@pytest.mark.parametrize("flag", ["-o", "--report"])
def test_a_fifo_is_refused(tmp_path, model, flag):
    fifo = tmp_path / ("pipe.onnx" if flag == "-o" else "pipe.json")
    os.mkfifo(fifo)
    result = invoke(model, flag, fifo, "--force")
    assert result.exit_code == 2 and "FIFO" in result.stderr
    assert fifo.exists() and not fifo.is_file()


# -- --report - ------------------------------------------------------------------------------------


def test_report_dash_is_stdout_and_the_summary_goes_to_stderr(tmp_path, model):
    result = invoke(model, "--report", "-")
    assert result.exit_code == 0, result.stderr
    document = json.loads(result.stdout)["models"][0]["report"]  # the one envelope (docs/JSON.md)
    assert document["input"] == str(model) and document["written"] is True
    assert [r["kind"] for r in document["rewrites"]] == ["fuse-split-conv"]
    assert "wrote" in result.stderr
    assert not (tmp_path / "-").exists()
    assert fused_groups(tmp_path / "m.fused.onnx") == [2]


def test_report_dash_with_json_format_is_a_usage_error(model):
    result = invoke(model, "--report", "-", "--format", "json")
    assert result.exit_code == 2
    assert "--report - and --format json both write" in result.stderr
    # stdout holds one document only: the usage error's envelope (docs/JSON.md), no report
    document = json.loads(result.stdout)
    assert document["exit_code"] == 2 and document["models"] == [] and document["error"]["kind"] == "usage"


# -- an output named like another format -----------------------------------------------------------


@pytest.mark.parametrize("name, named", [("out.keras", "Keras"), ("out.tflite", "TFLite"), ("out.h5", "Keras"),
                                         ("OUT.HDF5", "Keras")])
def test_onnx_written_under_another_formats_suffix_is_refused(tmp_path, model, name, named):
    result = invoke(model, "-o", tmp_path / name)
    assert result.exit_code == 2
    assert f"named like a {named} file" in result.stderr  # (a Keras, a TFLite) and "this run writes ONNX" in result.stderr
    assert "name it NAME.onnx" in result.stderr
    assert not (tmp_path / name).exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.onnx"]


def test_an_unknown_suffix_is_the_users_choice(tmp_path, model):
    result = invoke(model, "-o", tmp_path / "out.bin")
    assert result.exit_code == 0, result.stderr
    assert fused_groups(tmp_path / "out.bin") == [2]


@pytest.mark.parametrize("input_format, to, name, says", [
    ("keras", None, "out.onnx", "named like an ONNX file (.onnx), but this run writes Keras: use --to onnx to "
                                "write ONNX, or name it NAME.keras"),
    ("keras", None, "out.tflite", "use --to tflite to write TFLite, or name it NAME.keras"),
    ("savedmodel", None, "out.onnx", "use --to onnx to write ONNX, or name the folder without a model file suffix"),
    ("savedmodel", None, "out.keras", "(a SavedModel input is not converted to Keras); name the folder without"),
    ("keras", "onnx", "out.keras", "this run writes ONNX: use --to keras to write Keras, or name it NAME.onnx"),
    ("savedmodel", "tflite", "out.onnx", "this run writes TFLite: use --to onnx to write ONNX, or name it "
                                         "NAME.tflite"),
])
def test_the_hint_names_the_flag_that_writes_that_format(input_format, to, name, says):
    with pytest.raises(BadInput) as raised:
        formats.check_output_suffix(Path(name), input_format, to)
    assert says in raised.value.message


@pytest.mark.parametrize("input_format, to, name", [("keras", None, "out.keras"), ("keras", "onnx", "out.onnx"),
                                                   ("keras", "savedmodel", "out.onnx"),  # to_savedmodel's own check
                                                   ("savedmodel", None, "out"), ("savedmodel", None, "sm.v2"),
                                                   ("keras", "tflite", "m.tflite"), ("onnx", None, "m.onnx")])
def test_matching_suffixes_pass(input_format, to, name):
    formats.check_output_suffix(Path(name), input_format, to)
