"""Under --format json a --report that cannot be written once the models ran still answers with
one JSON document: the models' records, the run's error and exit code 2 (docs/JSON.md)."""

from __future__ import annotations

import json

import onnx

from gconv_rewrite import cli, formats
from gconv_rewrite.errors import OutputError
from samples.models import grouped_block
from tests.helpers import invoke


def test_a_report_that_fails_after_the_run_is_one_envelope(tmp_path, monkeypatch):
    model = tmp_path / "m.onnx"
    onnx.save(grouped_block("split", groups=4), model)
    report = tmp_path / "r.json"
    real = formats.atomic_output

    def failing(path, *args, **kwargs):
        if path == report:  # the disk fills between the check up front and the write
            raise OutputError(f"cannot write {path}: no space left on device; nothing was written")
        return real(path, *args, **kwargs)

    monkeypatch.setattr(cli.formats, "atomic_output", failing)
    result = invoke(model, "--format", "json", "--report", report)
    assert result.exit_code == 2
    document = json.loads(result.stdout)  # one document, nothing else on stdout
    assert document["exit_code"] == 2 and document["error"]["kind"] == "output"
    assert "the report was not written, but the model output" in document["error"]["message"]
    (record,) = document["models"]
    assert record["status"] == "rewritten" and record["report"]["written"] is True
    assert (tmp_path / "m.fused.onnx").exists() and not report.exists()
    assert result.stderr.startswith("gconv-rewrite: error: ")
