"""Bad Keras inputs: one-line errors, exit 2, input unchanged, nothing written, nothing escapes."""

from __future__ import annotations

import os
import zipfile

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import h5py
import numpy as np
import pytest
from click.testing import CliRunner

from gconv_rewrite.cli import main


def _text(path):
    path.write_text("hello, not a model\n")


def _corrupt_zip(path):
    path.write_bytes(b"PK\x03\x04" + b"\x00garbage" * 20)


def _weights_only_h5(path):
    with h5py.File(path, "w") as f:
        f.create_dataset("dense/kernel", data=np.ones((3, 3), np.float32))


def _escaping_zip(path):
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("../../escaped.txt", "should never be written")
        archive.writestr("config.json", "{}")
        archive.writestr("metadata.json", "{}")


@pytest.mark.parametrize("name, make, message", [
    ("text.keras", _text, "not a Keras file"),
    ("corrupt.keras", _corrupt_zip, "not a Keras file"),
    ("weights.h5", _weights_only_h5, "without a model config"),
    ("evil.keras", _escaping_zip, "holds no model.weights.h5"),
])
def test_bad_keras_files(tmp_path, name, make, message):
    folder = tmp_path / "models"
    folder.mkdir()
    path = folder / name
    make(path)
    before = path.read_bytes()
    result = CliRunner().invoke(main, [str(path)])
    assert result.exit_code == 2
    lines = [line for line in result.output.splitlines() if line.startswith("gconv-rewrite")]
    assert len(lines) == 1 and str(path) in lines[0] and message in lines[0], result.output
    assert "Traceback" not in result.output
    assert path.read_bytes() == before
    assert sorted(p.name for p in folder.iterdir()) == [name]
    assert not (tmp_path / "escaped.txt").exists() and not (folder.parent.parent / "escaped.txt").exists()
