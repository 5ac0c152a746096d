"""Reliability: faults while writing, mutated files, nothing lost, nothing half-written."""

from __future__ import annotations

import errno
import random
from pathlib import Path

import numpy as np
import onnx
import pytest

from gconv_rewrite import formats
from gconv_rewrite.errors import BadInput
from samples.models import grouped_block
from tests.helpers import invoke


@pytest.fixture
def model_path(tmp_path) -> Path:
    path = tmp_path / "m.onnx"
    onnx.save(grouped_block("split", groups=4, channels=16, out_channels=16), path)
    return path


def leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


def _partial_then(exc):
    real_save = formats.save_onnx

    def save(model, path, **kwargs):
        real_save(model, path, **kwargs)
        Path(path).write_bytes(Path(path).read_bytes()[:100])  # half a file on disk...
        raise exc  # ...then the fault

    return save


def test_disk_full_leaves_no_output(model_path, monkeypatch):
    before = model_path.read_bytes()
    monkeypatch.setattr(formats, "save_onnx", _partial_then(OSError(errno.ENOSPC, "No space left on device")))
    result = invoke(model_path)
    assert result.exit_code == 2
    assert "No space left on device" in result.output and "Traceback" not in result.output
    assert leftovers(model_path.parent) == ["m.onnx"]
    assert model_path.read_bytes() == before


def test_interrupt_during_write_leaves_no_output(model_path, monkeypatch):
    monkeypatch.setattr(formats, "save_onnx", _partial_then(KeyboardInterrupt()))
    result = invoke(model_path)
    assert result.exit_code == 130
    assert "interrupted" in result.output
    assert leftovers(model_path.parent) == ["m.onnx"]


def test_interrupt_during_rename_of_external_data_rolls_back(tmp_path, monkeypatch):
    source = tmp_path / "ext.onnx"
    onnx.save(grouped_block("split", channels=32, out_channels=32), source, save_as_external_data=True,
              location="ext.bin", size_threshold=512)
    import os

    real_replace = os.replace

    def replace(src, dst):
        if str(dst).endswith("ext.fused.onnx"):
            raise OSError(errno.EIO, "I/O error")
        return real_replace(src, dst)

    def rename_noreplace(src, dst, flags):  # the commit without --force renames this way (issue 22, item 5)
        if str(dst).endswith("ext.fused.onnx"):
            raise OSError(errno.EIO, "I/O error")
        return False

    monkeypatch.setattr(os, "replace", replace)
    monkeypatch.setattr(formats, "_renameat2", rename_noreplace)
    result = invoke(source)
    assert result.exit_code == 2 and "I/O error" in result.output
    assert leftovers(tmp_path) == ["ext.bin", "ext.onnx"]


def test_unwritable_output_folder(model_path, monkeypatch):
    import os

    real_mkdir = os.mkdir

    def refuse(path, *args, **kwargs):  # the staging folder beside the output cannot be made
        if Path(path).parent == model_path.parent:
            raise PermissionError(errno.EACCES, "Permission denied")
        return real_mkdir(path, *args, **kwargs)

    monkeypatch.setattr(os, "mkdir", refuse)
    result = invoke(model_path)
    assert result.exit_code == 2 and "Permission denied" in result.output
    assert leftovers(model_path.parent) == ["m.onnx"]


def test_mutated_bytes_give_only_clean_errors(tmp_path):
    """Truncations and bit flips of a valid model: the loader loads it or says why, in one line;
    the whole CLI never shows a traceback or an internal error."""
    original = onnx._serialize(grouped_block("slice", groups=2, channels=8, out_channels=8)) \
        if hasattr(onnx, "_serialize") else grouped_block("slice", groups=2, channels=8, out_channels=8).SerializeToString()
    rng = random.Random(1234)
    cases = {"loaded": 0, "refused": 0}
    for case in range(150):
        data = bytearray(original)
        if case % 2:
            data = data[: rng.randrange(len(data))]
        else:
            for _ in range(rng.randint(1, 8)):
                data[rng.randrange(len(data))] ^= 1 << rng.randrange(8)
        path = tmp_path / f"case{case}.onnx"
        path.write_bytes(bytes(data))
        try:
            formats.load_onnx(path)
            cases["loaded"] += 1
        except BadInput as error:
            assert str(path) in error.message and "\n" not in error.message
            cases["refused"] += 1
        if case % 10 == 0:  # the whole CLI, verification off, on a sample of the cases
            result = invoke(path, "--no-verify", "-o", tmp_path / f"out{case}.onnx")
            assert result.exit_code in (0, 1, 2), result.output
            assert "Traceback" not in result.output and "internal error" not in result.output, result.output
    assert cases["loaded"] + cases["refused"] == 150 and cases["refused"] > 50
    print(f"mutation fuzz: {cases}")


def test_inputs_npz_is_loaded_without_pickle(model_path, tmp_path):
    npz = tmp_path / "objects.npz"
    np.savez(npz, x=np.array([{"a": 1}], dtype=object))
    result = invoke(model_path, "--inputs", npz)
    assert result.exit_code == 2 and "not a readable .npz" in result.output
    assert not model_path.with_name("m.fused.onnx").exists()
