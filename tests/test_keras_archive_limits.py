"""Keras archive limits: a .keras zip bomb, a lying zip header and HDF5 datasets that declare far
more than the file holds are refused (exit 2, one line) before they take memory; Keras's own loader
only ever reads an archive the tool accepted or wrote."""

from __future__ import annotations

import json
import os
import struct
import tracemalloc
import zipfile

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import h5py
import pytest

from gconv_rewrite.errors import BadInput
from gconv_rewrite.passes.keras import _config
from tests.helpers import error_lines, invoke

BOMB_BYTES = 200 << 20  # 200 MiB of zeros: ~200 KB deflated, far over 50x and the 64 MiB floor


def _tiny_config() -> str:
    return json.dumps({"class_name": "Functional", "config": {"name": "m", "layers": [],
                                                               "input_layers": [], "output_layers": []}})


def _zip_with(path, weights_member_bytes: int, *, chunk: int = 8 << 20):
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED, compresslevel=9) as archive:
        archive.writestr("metadata.json", json.dumps({"keras_version": "3.0.0"}))
        archive.writestr("config.json", _tiny_config())
        zeros = bytes(chunk)
        with archive.open("model.weights.h5", "w", force_zip64=True) as member:
            for _ in range(weights_member_bytes // chunk):
                member.write(zeros)
    return path


@pytest.fixture(scope="module")
def bomb(tmp_path_factory):
    return _zip_with(tmp_path_factory.mktemp("bomb") / "bomb.keras", BOMB_BYTES)


def _peak_while(function, *args):
    tracemalloc.start()
    try:
        try:
            function(*args)
        except BadInput as exc:
            error = exc
        else:
            error = None
        return tracemalloc.get_traced_memory()[1], error
    finally:
        tracemalloc.stop()


def test_zip_bomb_is_refused_with_one_line_and_bounded_memory(bomb, tmp_path):
    assert bomb.stat().st_size < 2 << 20
    peak, error = _peak_while(_config.read_file, bomb)
    assert error is not None and "over the limit" in error.message and "decompression bomb" in error.message
    assert peak < 16 << 20, f"peak {peak / 2**20:.1f} MiB"
    for flags in ([], ["--check"], ["--expand"], ["--to", "onnx"]):
        result = invoke(bomb, *flags, "-o", tmp_path / ("out.onnx" if flags[-1:] == ["onnx"] else "out.keras"))
        assert result.exit_code == 2, result.output
        lines = error_lines(result)
        assert len(lines) == 1 and "over the limit" in lines[0], result.output
    assert not list(tmp_path.iterdir())


def _lie_about_size(path, member: str, declared: int):
    """Rewrite the zip's local and central headers of ``member`` to declare ``declared`` bytes."""
    data = bytearray(path.read_bytes())
    name = member.encode()
    for signature, size_at, name_at in ((b"PK\x03\x04", 22, 30), (b"PK\x01\x02", 24, 46)):
        start = 0
        while (start := data.find(signature, start)) != -1:
            if data[start + name_at:start + name_at + len(name)] == name:
                struct.pack_into("<I", data, start + size_at, declared)
            start += 4
    path.write_bytes(bytes(data))


def test_a_member_larger_than_declared_is_never_read_past_its_declaration(tmp_path):
    path = _zip_with(tmp_path / "liar.keras", 96 << 20)
    _lie_about_size(path, "model.weights.h5", 4096)
    # A zip64 member keeps its real size in the extra field; the declared 32-bit size is all
    # zipfile trusts where the extra field is absent. Either way: refused, memory bounded.
    peak, error = _peak_while(_config.read_file, path)
    assert error is not None and "not a readable .keras file" in error.message  # Bad CRC-32, after 4 KB
    assert peak < 16 << 20, f"peak {peak / 2**20:.1f} MiB"
    result = invoke(path, "--check")
    assert result.exit_code == 2 and len(error_lines(result)) == 1, result.output


def test_limits_are_relative_to_the_file_and_overridable(tmp_path, monkeypatch):
    path = _zip_with(tmp_path / "zeros.keras", 16 << 20)  # 16 MiB inside, ~16 KB file: under the floor
    with pytest.raises(BadInput, match="model.weights.h5 is not readable"):  # accepted; just not HDF5
        _config.read_file(path)
    monkeypatch.setattr(_config, "EXPANSION_FLOOR", 1 << 20)
    with pytest.raises(BadInput, match="over the limit"):
        _config.read_file(path)
    monkeypatch.setenv("GCONV_KERAS_MAX_RATIO", "5000")  # the user vouches for the file
    with pytest.raises(BadInput, match="model.weights.h5 is not readable"):
        _config.read_file(path)
    monkeypatch.setenv("GCONV_KERAS_MAX_BYTES", str(8 << 20))  # and an absolute cap below it
    with pytest.raises(BadInput, match="over the limit"):
        _config.read_file(path)


def _h5_declaring(path, gigabytes: int):
    """A legacy Keras .h5 of a few KB whose one dataset declares ``gigabytes`` GiB (chunked and
    compressed, never written: HDF5 reads it as fill values)."""
    side = int((gigabytes * (1 << 30) / 4) ** 0.5)
    with h5py.File(path, "w") as handle:
        handle.attrs["model_config"] = _tiny_config()
        group = handle.create_group("model_weights").create_group("dense")
        group.attrs["weight_names"] = [b"dense/kernel:0"]
        group.create_dataset("dense/kernel:0", shape=(side, side), dtype="f4", chunks=(256, 256),
                             compression="gzip")
    return path


def test_hdf5_dataset_declaring_gigabytes_is_refused(tmp_path):
    path = _h5_declaring(tmp_path / "bomb.h5", 4)
    assert path.stat().st_size < 1 << 20
    peak, error = _peak_while(_config.read_file, path)
    assert error is not None and "HDF5 datasets declare" in error.message
    assert peak < 16 << 20
    result = invoke(path, "--check")
    assert result.exit_code == 2 and len(error_lines(result)) == 1, result.output

    # The same HDF5 as the weights of a .keras archive.
    archive = tmp_path / "bomb_weights.keras"
    with zipfile.ZipFile(archive, "w", compression=zipfile.ZIP_DEFLATED) as out:
        out.writestr("config.json", _tiny_config())
        out.writestr("metadata.json", "{}")
        out.write(path, "model.weights.h5")
    result = invoke(archive, "--check")
    assert result.exit_code == 2 and "model.weights.h5 datasets declare" in error_lines(result)[0], result.output


def test_keras_loader_reads_only_archives_the_tool_accepted_or_wrote(tmp_path, monkeypatch):
    import keras

    from samples import keras_models as km

    source = km.getitem_model(tmp_path / "getitem.keras")
    seen = []
    original = keras.models.load_model

    def recording(path, *args, **kwargs):
        seen.append(os.path.realpath(path))
        return original(path, *args, **kwargs)

    monkeypatch.setattr(keras.models, "load_model", recording)
    out = tmp_path / "fused.keras"
    result = invoke(source, "-o", out)
    assert result.exit_code == 0, result.output
    assert seen and os.path.realpath(source) not in seen
    assert all(os.path.basename(p) == "accepted.keras" or os.path.basename(p) == out.name for p in seen), seen


def test_a_real_model_passes_the_limits(tmp_path):
    import keras  # noqa: F401  (the test extra installs it; a missing one must fail)

    from samples import keras_models as km

    path = km.getitem_model(tmp_path / "real.keras")
    kfile = _config.read_file(path)
    accepted = tmp_path / "again.keras"
    kfile.write_accepted(accepted)
    with zipfile.ZipFile(path) as a, zipfile.ZipFile(accepted) as b:
        assert [i.filename for i in a.infolist()] == [i.filename for i in b.infolist()]
        assert all(a.read(n) == b.read(n) for n in a.namelist())
