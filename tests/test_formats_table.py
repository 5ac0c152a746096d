"""One table of formats and suffixes (issue 21 item 8): ``formats.READ_SUFFIXES`` and
``formats.WRITE_SUFFIX`` decide detection, the default output name and what a folder walk picks
up, for every suffix alike. ``.hdf5`` was detected as Keras, but its default output
``m.fused.hdf5`` was then refused and folder walks skipped it."""

from __future__ import annotations

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from pathlib import Path

import keras
import numpy as np
import onnx
import pytest
import tensorflow as tf
import tf_keras
from onnx import TensorProto, helper, numpy_helper

from gconv_rewrite import batch, cli, formats
from tests.conftest import attribute, op_counts, run_onnx
from tests.helpers import conv2d_groups as grouped
from tests.helpers import invoke

KERAS_SUFFIXES = (".keras", ".h5", ".hdf5")


def tf_keras_split_model(path: Path) -> Path:
    """x (8 ch) → tf.split into 2 → Conv2D(4) each → Concatenate: one hand-made group of 2, saved
    by tf-keras as HDF5 (tf-keras writes HDF5 for .h5; the file is then renamed as asked)."""
    tf_keras.utils.set_random_seed(0)
    inp = tf_keras.Input((8, 8, 8))
    parts = tf.split(inp, 2, axis=-1)
    out = tf_keras.layers.Concatenate()([tf_keras.layers.Conv2D(4, 3, padding="same", bias_initializer="random_normal",
                                                                name=f"conv{i}")(p) for i, p in enumerate(parts)])
    h5 = path.with_suffix(".h5")
    tf_keras.Model(inp, out).save(h5)
    if h5 != path:
        h5.rename(path)
    return path


def onnx_split_model(path: Path) -> Path:
    """x (8 ch) → Split into 2 → Conv(4) each → Concat: one hand-made group of 2."""
    rng = np.random.default_rng(0)
    weights = [numpy_helper.from_array(rng.standard_normal((4, 4, 3, 3)).astype(np.float32), f"w{i}")
               for i in range(2)]
    nodes = [helper.make_node("Split", ["x"], ["s0", "s1"], axis=1, num_outputs=2)]
    nodes += [helper.make_node("Conv", [f"s{i}", f"w{i}"], [f"c{i}"], pads=[1, 1, 1, 1]) for i in range(2)]
    nodes.append(helper.make_node("Concat", ["c0", "c1"], ["y"], axis=1))
    graph = helper.make_graph(nodes, "split", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 8, 6, 6])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 8, 6, 6])], weights)
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)]), path)
    return path


# -- the table itself ----------------------------------------------------------------------------


def test_every_suffix_is_in_one_row_and_walked():
    """No suffix belongs to two formats, and the walk's suffixes are exactly the read ones."""
    rows = [suffix for suffixes in formats.READ_SUFFIXES.values() for suffix in suffixes]
    assert len(rows) == len(set(rows))
    assert set(batch.MODEL_SUFFIXES) == set(rows) == set(formats.MODEL_SUFFIXES)
    assert set(formats.READ_SUFFIXES["keras"]) == set(KERAS_SUFFIXES)
    for fmt in formats.READ_SUFFIXES:
        assert fmt in formats.WRITE_SUFFIX  # every format read has a suffix it writes


@pytest.mark.parametrize("name, fmt", [("m.onnx", "onnx"), ("m.keras", "keras"), ("m.h5", "keras"),
                                       ("m.hdf5", "keras"), ("M.HDF5", "keras"), ("m.H5", "keras"),
                                       ("model", "onnx"), ("m.pb.bin", "onnx")])
def test_detection_reads_the_table(tmp_path, name, fmt):
    path = tmp_path / name
    path.write_bytes(b"")
    assert formats.detect_format(path) == fmt


def test_detection_of_a_savedmodel_folder(tmp_path):
    (tmp_path / "sm").mkdir()
    (tmp_path / "sm" / "saved_model.pb").write_bytes(b"")
    assert formats.detect_format(tmp_path / "sm") == "savedmodel"


@pytest.mark.parametrize("name, mode, to, expected", [
    ("m.onnx", "fuse", None, "m.fused.onnx"),
    ("m.onnx", "expand", None, "m.expanded.onnx"),
    ("m.keras", "fuse", None, "m.fused.keras"),
    ("m.h5", "fuse", None, "m.fused.keras"),
    ("m.hdf5", "fuse", None, "m.fused.keras"),
    ("m.HDF5", "expand", None, "m.expanded.keras"),
    ("m.hdf5", "fuse", "onnx", "m.fused.onnx"),
    ("m.hdf5", "fuse", "savedmodel", "m.fused"),
    ("m.hdf5", "fuse", "tflite", "m.tflite"),
    ("m.hdf5", "expand", "tflite", "m.expanded.tflite"),
])
def test_default_output_reads_the_table(tmp_path, name, mode, to, expected):
    assert formats.default_output(tmp_path / name, mode, to) == tmp_path / expected


def test_default_output_of_a_savedmodel_folder(tmp_path):
    (tmp_path / "sm").mkdir()
    assert formats.default_output(tmp_path / "sm", "fuse") == tmp_path / "sm.fused"
    assert formats.default_output(tmp_path / "sm", "fuse", "onnx") == tmp_path / "sm.fused.onnx"


@pytest.mark.parametrize("suffix", KERAS_SUFFIXES)
def test_target_output_of_any_keras_suffix_is_keras(tmp_path, suffix):
    assert cli._target_output(tmp_path / f"m{suffix}", "tflite-gpu", None) == tmp_path / "m.tflite-gpu.keras"


def test_walk_picks_up_every_suffix_and_skips_outputs(tmp_path):
    for name in ("a.onnx", "b.keras", "c.h5", "d.hdf5", "E.HDF5", "notes.txt", "d.fused.keras", "c.fused.hdf5"):
        (tmp_path / name).write_bytes(b"")
    (tmp_path / "sm").mkdir()
    (tmp_path / "sm" / "saved_model.pb").write_bytes(b"")
    found = [p.name for p in batch.walk(tmp_path)]
    assert found == ["sm", "E.HDF5", "a.onnx", "b.keras", "c.h5", "d.hdf5"]


def test_help_and_the_empty_folder_error_list_every_suffix(tmp_path):
    assert all(suffix in " ".join(invoke("--help").output.split()) for suffix in formats.MODEL_SUFFIXES)
    (tmp_path / "empty").mkdir()
    result = invoke(tmp_path / "empty", "--check")
    assert result.exit_code != 0
    assert formats.suffixes_shown() in result.output and ".hdf5" in result.output


def test_mirrored_names_take_the_written_suffix(tmp_path):
    (tmp_path / "in" / "sub").mkdir(parents=True)
    for name in ("a.onnx", "b.keras", "sub/c.h5", "sub/d.hdf5"):
        (tmp_path / "in" / name).write_bytes(b"")
    jobs = batch.plan_jobs((tmp_path / "in",), tmp_path / "out", mode="fuse", to=None, write=True)
    assert sorted(str(j.output.relative_to(tmp_path / "out")) for j in jobs) == \
        ["a.onnx", "b.keras", "sub/c.keras", "sub/d.keras"]


# -- end to end: the three decisions on real files ------------------------------------------------


def test_hdf5_fuses_to_the_default_output(tmp_path):
    """The finding itself: `gconv-rewrite m.hdf5` writes m.fused.keras (it was refused), with the
    hand-made group fused and the numbers of tf-keras's own run."""
    source = tf_keras_split_model(tmp_path / "m.hdf5")
    result = invoke(source)
    assert result.exit_code == 0, result.output
    out = tmp_path / "m.fused.keras"
    assert out.is_file() and not (tmp_path / "m.fused.hdf5").exists()
    fused = keras.models.load_model(out, safe_mode=True)
    assert grouped(fused) == [2]
    original = tf_keras.models.load_model(source, compile=False)
    x = np.random.default_rng(1).standard_normal((2, 8, 8, 8)).astype(np.float32)
    np.testing.assert_allclose(np.asarray(fused(x)), np.asarray(original(x)), rtol=1e-5, atol=1e-5)


def test_folder_walk_runs_hdf5_and_onnx(tmp_path):
    """A folder of .hdf5, .h5 and .onnx models: --check finds the group in each, a write mirrors
    them under -o with the written suffixes, and each output is fused and computes the same."""
    folder = tmp_path / "models"
    folder.mkdir()
    tf_keras_split_model(folder / "k.hdf5")
    tf_keras_split_model(folder / "l.h5")
    onnx_split_model(folder / "o.onnx")
    check = invoke(folder, "--check")
    assert check.exit_code == 1, check.output  # 1: candidates found
    assert "3 models: 3 would-rewrite" in check.output
    assert "k.hdf5" in check.output

    result = invoke(folder, "-o", tmp_path / "out")
    assert result.exit_code == 0, result.output
    written = sorted(p.name for p in (tmp_path / "out").iterdir())
    assert written == ["k.keras", "l.keras", "o.onnx"]
    x = np.random.default_rng(2).standard_normal((1, 8, 8, 8)).astype(np.float32)
    for name in ("k", "l"):
        fused = keras.models.load_model(tmp_path / "out" / f"{name}.keras", safe_mode=True)
        assert grouped(fused) == [2]
        original = tf_keras.models.load_model(folder / f"{name}.{'hdf5' if name == 'k' else 'h5'}", compile=False)
        np.testing.assert_allclose(np.asarray(fused(x)), np.asarray(original(x)), rtol=1e-5, atol=1e-5)
    fused_onnx = onnx.load(tmp_path / "out" / "o.onnx")
    assert op_counts(fused_onnx) == {"Conv": 1}
    assert attribute(fused_onnx.graph.node[0], "group") == 2
    feeds = {"x": np.random.default_rng(3).standard_normal((1, 8, 6, 6)).astype(np.float32)}
    np.testing.assert_allclose(run_onnx(fused_onnx, feeds)[0], run_onnx(onnx.load(folder / "o.onnx"), feeds)[0],
                               rtol=1e-5, atol=1e-5)
