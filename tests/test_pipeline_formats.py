"""Acceptance for pipelines: a folder holding ONNX, Keras and SavedModel models (one of them
broken), processed with --jobs 2; outputs, JSON and exit code checked."""

from __future__ import annotations

import json
import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import onnx
from click.testing import CliRunner

from gconv_rewrite.cli import main
from samples.keras_models import getitem_model
from samples.models import grouped_block
from tests.tf_models import SplitConvConcat, save_module


def test_mixed_formats_folder_with_jobs(tmp_path):
    models = tmp_path / "models"
    (models / "keras").mkdir(parents=True)
    onnx.save(grouped_block("split", groups=4, channels=16, out_channels=16), models / "block.onnx")
    getitem_model(models / "keras" / "sliced.keras")
    save_module(SplitConvConcat(), models / "tf_block")
    (models / "keras" / "broken.keras").write_text("this is not a zip file")
    out = tmp_path / "out"
    result = CliRunner().invoke(main, [str(models), "-o", str(out), "--jobs", "2", "--format", "json",
                                       "--shape", "image=1,8,8,8"])
    document = json.loads(result.stdout)
    assert result.exit_code == 2 == document["exit_code"]
    rows = {os.path.relpath(m["input"], models): m for m in document["models"]}
    assert sorted(rows) == ["block.onnx", "keras/broken.keras", "keras/sliced.keras", "tf_block"]
    broken = rows["keras/broken.keras"]
    assert broken["status"] == "error" and broken["exit_code"] == 2 and "broken.keras" in broken["error"]["message"]
    for name in ("block.onnx", "keras/sliced.keras", "tf_block"):
        row = rows[name]
        assert row["status"] == "rewritten", row
        assert row["report"]["verification"]["passed"] is True
        assert row["report"]["rewrites"][0]["groups"] == 4
        assert os.path.exists(row["output"]) and row["output"].startswith(str(out))
    assert (out / "tf_block" / "saved_model.pb").is_file()
    assert not (out / "keras" / "broken.keras").exists()
