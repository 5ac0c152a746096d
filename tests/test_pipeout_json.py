"""One versioned JSON envelope for --format json and --report, success or error (issue 24):
schema_version, environment, exit_code, models with status and error {kind, message}; usage errors
and --list-targets in JSON too; a bad --report folder refused before any model is read or written."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import onnx
import pytest

from gconv_rewrite import __version__, envelope
from samples.models import grouped_block
from tests.helpers import invoke

REPO = Path(__file__).resolve().parents[1]
ENVELOPE_KEYS = {"schema_version", "tool", "version", "environment", "exit_code", "models"}


@pytest.fixture
def model(tmp_path) -> Path:
    path = tmp_path / "m.onnx"
    onnx.save(grouped_block("split", groups=4, channels=16, out_channels=8), path)
    return path


def check_envelope(document: dict, exit_code: int) -> None:
    assert ENVELOPE_KEYS <= set(document)
    assert document["schema_version"] == envelope.SCHEMA_VERSION == 1
    assert document["tool"] == "gconv-rewrite" and document["version"] == __version__
    assert document["exit_code"] == exit_code
    env = document["environment"]
    assert {"python", "onnx", "onnx_ir", "onnxruntime", "platform"} <= set(env)
    assert env["onnx"] == onnx.__version__


def test_format_json_and_report_hold_the_same_envelope(model, tmp_path):
    report_path = tmp_path / "r.json"
    result = invoke(model, "--format", "json", "--report", report_path)
    assert result.exit_code == 0, result.output
    printed, written = json.loads(result.stdout), json.loads(report_path.read_text())
    for document in (printed, written):
        check_envelope(document, 0)
        (record,) = document["models"]
        assert record["path"] == str(model) and record["status"] == "rewritten" and record["error"] is None
        assert record["output"] == str(model.with_name("m.fused.onnx"))
        assert record["report"]["rewrites"][0]["groups"] == 4
        assert record["status"] in envelope.STATUSES
    assert printed["models"][0]["report"]["rewrites"] == written["models"][0]["report"]["rewrites"]


def test_a_failed_model_is_an_error_record_in_the_report(tmp_path):
    broken = tmp_path / "broken.onnx"
    broken.write_bytes(b"not protobuf" * 8)
    report_path = tmp_path / "r.json"
    result = invoke(broken, "--report", report_path)
    assert result.exit_code == 2
    document = json.loads(report_path.read_text())
    check_envelope(document, 2)
    (record,) = document["models"]
    assert record["path"] == str(broken) and record["status"] == "error" and record["report"] is None
    assert record["error"]["kind"] == "bad-input" and "not a valid ONNX model" in record["error"]["message"]


def test_error_kinds_follow_the_exception():
    from gconv_rewrite import errors

    assert envelope.error_kind(errors.VerificationFailed("x")) == "verification-failed"
    assert envelope.error_kind(errors.VerificationImpossible("x")) == "verification-impossible"
    assert envelope.error_kind(errors.OutputError("x")) == "output"
    assert envelope.error_kind(errors.BadInput("x")) == "bad-input"
    assert envelope.error_kind(errors.RewriteError("x")) == "bad-input"
    assert envelope.error_kind(KeyError("x")) == "internal"


@pytest.mark.parametrize("args, says", [
    (["--check", "--dry-run"], "exclusive"),
    (["--no-such-flag"], "No such option"),
    (["--jobs", "0"], "--jobs"),
])
def test_usage_errors_answer_in_json_too(model, args, says):
    result = invoke(model, "--format", "json", *args)
    assert result.exit_code == 2
    document = json.loads(result.stdout)
    check_envelope(document, 2)
    assert document["models"] == [] and document["error"]["kind"] == "usage" and says in document["error"]["message"]
    assert says in result.stderr  # the one-line error stays on stderr


def test_usage_error_under_a_config_format_json(model, tmp_path):
    config = tmp_path / "gconv.toml"
    config.write_text('format = "json"\n')
    result = invoke(model, "--config", config, "--check", "--dry-run")
    assert result.exit_code == 2
    assert json.loads(result.stdout)["error"]["kind"] == "usage"


def test_usage_error_without_json_prints_no_json(model):
    result = invoke(model, "--check", "--dry-run")
    assert result.exit_code == 2 and result.stdout == ""


def test_a_run_level_error_answers_in_json(tmp_path):
    (tmp_path / "empty").mkdir()
    result = invoke(tmp_path / "empty", "--format", "json")
    assert result.exit_code == 2
    document = json.loads(result.stdout)
    check_envelope(document, 2)
    assert document["error"]["kind"] == "bad-input" and "no models in it" in document["error"]["message"]
    assert result.stderr.startswith("gconv-rewrite: error: ")


def test_a_bad_config_answers_in_json(model, tmp_path):
    config = tmp_path / "bad.toml"
    config.write_text("this is not toml = = =")
    result = invoke(model, "--config", config, "--format", "json")
    assert result.exit_code == 2
    document = json.loads(result.stdout)
    check_envelope(document, 2)
    assert document["error"]["kind"] == "bad-input" and str(config) in document["error"]["message"]


def test_list_targets_in_json():
    result = invoke("--list-targets", "--format", "json")
    assert result.exit_code == 0, result.output
    document = json.loads(result.stdout)
    assert document["schema_version"] == envelope.SCHEMA_VERSION
    names = [t["name"] for t in document["targets"]]
    assert "onnxruntime-cpu" in names and "tflite-gpu" in names
    assert all({"name", "native_when", "runtime", "evidence"} == set(t) for t in document["targets"])
    assert "target" in invoke("--list-targets").stdout.splitlines()[0]  # text without --format json


@pytest.mark.parametrize("where", ["missing folder", "a folder", "read-only folder"])
def test_a_bad_report_place_is_refused_before_anything_is_written(model, tmp_path, where):
    if where == "missing folder":
        report_path = tmp_path / "nope" / "r.json"
    elif where == "a folder":
        report_path = tmp_path / "reports"
        report_path.mkdir()
    elif os.geteuid() == 0:  # root writes into a chmod-ed folder: /proc takes no new file from anyone
        report_path = Path("/proc") / "r.json"
    else:
        (tmp_path / "ro").mkdir()
        (tmp_path / "ro").chmod(0o500)
        report_path = tmp_path / "ro" / "r.json"
    result = invoke(model, "--report", report_path)
    assert result.exit_code == 2
    assert result.stderr.startswith("gconv-rewrite: error: ") and "--report" in result.stderr
    assert not model.with_name("m.fused.onnx").exists()  # the model was not written either


def test_tensorflow_versions_only_where_a_model_needed_it(model):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run([sys.executable, "-m", "gconv_rewrite", str(model), "--check", "--format", "json"], cwd=REPO,
                          env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 1, done.stderr
    environment = json.loads(done.stdout)["environment"]
    assert "tensorflow" not in environment and "keras" not in environment
    assert envelope.environment(tensorflow=True)["tensorflow"] is not None


def test_docs_describe_the_schema_version_statuses_and_error_kinds():
    text = (REPO / "docs" / "JSON.md").read_text()
    assert f"schema_version`: {envelope.SCHEMA_VERSION}" in text
    for word in (*envelope.STATUSES, *envelope.ERROR_KINDS.values(), envelope.USAGE, envelope.INTERNAL,
                 envelope.WORKER_DIED):
        assert f"`{word}`" in text, word
