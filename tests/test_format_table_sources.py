"""One format table (issue 23): loading, folder walks, ``--to``, the benchmark's runtimes and the
driver's backend and conversion lookup all read ``gconv_rewrite.formats.FORMATS``; a new format is its
package plus one row. Each place that kept its own list is checked against the table, and a row
added at run time is detected, walked, named and looked up without touching anything else."""

from __future__ import annotations

import dataclasses
import sys
import types
from pathlib import Path

import click
import pytest

from gconv_rewrite import backend, batch, benchmark, cli, formats
from gconv_rewrite.errors import BadInput
from gconv_rewrite.report import Report


def _to_choices() -> list[str]:
    (param,) = [p for p in cli.main.params if p.name == "to"]
    assert isinstance(param.type, click.Choice)
    return list(param.type.choices)


def test_to_choices_are_the_tables_formats():
    assert _to_choices() == formats.output_formats() == ["onnx", "savedmodel", "keras", "tflite"]


def test_routes_are_the_tables_conversions():
    expected = {(f.name, to): list(hops) for f in formats.FORMATS for to, hops in f.conversions.items()}
    assert backend.ROUTES == expected
    assert set(backend.ROUTES) == {("savedmodel", "onnx"), ("savedmodel", "tflite"), ("keras", "onnx"),
                                   ("keras", "savedmodel"), ("keras", "tflite")}


def test_runtimes_are_the_tables_runtimes():
    assert {name: runtime.name for name, runtime in benchmark.RUNTIMES.items()} == \
        {f.name: f.runtime for f in formats.FORMATS}
    assert benchmark.RUNTIMES["onnx"].name == "onnxruntime"


def test_every_row_names_an_importable_backend_and_loader():
    """The strings in the table resolve (a typo would fail only when that format is first used)."""
    import importlib

    for fmt in formats.FORMATS:
        for spec in (fmt.backend, fmt.runtime_loader, *[h for hops in fmt.conversions.values() for h in hops]):
            module, name = spec.split(":")
            assert callable(getattr(importlib.import_module(module), name)), spec


def test_the_walk_and_detection_read_the_table(tmp_path):
    for name in ("a.onnx", "b.keras", "c.h5", "d.hdf5", "e.tflite", "f.txt"):
        (tmp_path / name).write_bytes(b"")
    assert [p.name for p in batch.walk(tmp_path)] == ["a.onnx", "b.keras", "c.h5", "d.hdf5"]
    assert formats.model_suffixes() == (".onnx", ".keras", ".h5", ".hdf5")


# -- a new format: one row ------------------------------------------------------------------------


class _ToyBackend:
    def __init__(self, report):
        self.report = report


class _ToyToOnnx:
    pass


@pytest.fixture
def toy_format(monkeypatch):
    """A format "toy" (files .toy, folders holding toy.json) whose package is a module of this test."""
    package = types.ModuleType("toy_format_package")
    package.ToyBackend, package.ToyToOnnx = _ToyBackend, _ToyToOnnx
    package.load = lambda path, threads, options: ("loaded", path, threads)
    monkeypatch.setitem(sys.modules, "toy_format_package", package)
    row = formats.Format("toy", (".toy",), "toy.json", ".toy", "toy_format_package:ToyBackend", "toyrt",
                         "toy_format_package:load", {"onnx": ("toy_format_package:ToyToOnnx",)})
    monkeypatch.setattr(formats, "FORMATS", formats.FORMATS + (row,))
    return row


def test_a_new_row_is_detected_walked_and_named(tmp_path, toy_format):
    (tmp_path / "m.toy").write_bytes(b"")
    (tmp_path / "m.fused.toy").write_bytes(b"")  # its own output: not walked again
    (tmp_path / "folder").mkdir()
    (tmp_path / "folder" / "toy.json").write_text("{}")
    assert formats.detect_format(tmp_path / "m.toy") == "toy"
    assert formats.detect_format(tmp_path / "folder") == "toy"
    assert formats.default_output(tmp_path / "m.toy", "fuse") == tmp_path / "m.fused.toy"
    assert formats.default_output(tmp_path / "m.toy", "fuse", "onnx") == tmp_path / "m.fused.onnx"
    assert [p.name for p in batch.walk(tmp_path)] == ["folder", "m.toy"]
    assert ".toy" in formats.suffixes_shown()
    assert formats.output_formats()[-1] == "toy"


def test_a_new_row_is_the_drivers_backend_and_conversion(toy_format):
    made = backend.rewriter_backend("toy", Report(input="m.toy", output=None, mode="fuse"))
    assert isinstance(made, _ToyBackend)
    hops = backend.conversions("toy", "onnx", "m.toy")
    assert [type(h) for h in hops] == [_ToyToOnnx]
    with pytest.raises(BadInput, match="--to keras is not supported for toy inputs \\(they convert to onnx\\)"):
        backend.conversions("toy", "keras", "m.toy")


def test_a_row_loader_is_imported_only_when_called(monkeypatch):
    """The benchmark's loader for a format imports its module on first use (an ONNX run never
    imports TensorFlow for the SavedModel row)."""
    calls = []
    package = types.ModuleType("late_loader_package")
    package.load = lambda path, threads, options: calls.append((path, threads)) or "loaded"
    load = benchmark._loader("late_loader_package:load")
    monkeypatch.setitem(sys.modules, "late_loader_package", package)
    assert load(Path("m"), 2, None) == "loaded" and calls == [(Path("m"), 2)]


def test_rows_are_frozen():
    with pytest.raises(dataclasses.FrozenInstanceError):
        formats.FORMATS[0].name = "other"


def test_the_pre_commit_hook_matches_every_file_suffix_the_table_reads():
    """The shipped hook's ``files`` pattern is the one list outside the table: it must take every
    suffix the table reads (an ``.hdf5`` model was once walked but never hooked)."""
    import re

    import yaml

    (hook,) = yaml.safe_load((Path(__file__).resolve().parents[1] / ".pre-commit-hooks.yaml").read_text())
    suffixes = [s for fmt in formats.FORMATS for s in fmt.read_suffixes]
    assert suffixes and all(re.search(hook["files"], f"models/m{s}") for s in suffixes), (hook["files"], suffixes)
    assert not re.search(hook["files"], "models/m.fused.json")
