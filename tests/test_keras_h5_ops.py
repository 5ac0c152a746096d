"""Keras 3 ``.h5`` files holding ``keras.ops`` operations (zoo finding F3: MobileNetV3's
``x + 3.0`` crashed ``--check`` with ``internal error: KeyError: TensorRef(layer='add', ...)``).

A functional Keras 3 model that calls an operation on a KerasTensor (``x + 3.0``, ``x * y``,
``x[..., :4]``) holds it as a node. ``.keras`` records the operation's module; Keras 3's legacy
``.h5`` writer does not: ``{"class_name": "Add", "config": {"name": "add"}}`` with the call
``{"args": [tensor, 3.0]}``. Keras 3 reads such an entry back among *layers* only, so it cannot
load the file itself: ``Add``/``Multiply``/``Subtract``/``Maximum``/``Reshape`` become the layer
of that name, which does not fit the call (or config); ``GetItem``/``TrueDivide``/``Split``/
``Relu``... are unknown layers. Only ``Concatenate`` and ``Softmax`` operations read back as the
layers of the same effect, and load.

The tool does what Keras does: it rebuilds what Keras 3 loads, reads the rest as data (``--check``,
``--dry-run`` and runs that change nothing need only the config: shapes past such an operation
come from what the node records), and a rewrite that needs the model rebuilt stops with one line
that names the operation and says Keras 3 cannot load the file either. Never a KeyError.
"""

from __future__ import annotations

import json
import os
import re
import shutil

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import h5py
import keras
import numpy as np
import pytest

from tests.helpers import conv2d_groups as grouped
from tests.helpers import error_lines, invoke

L = keras.layers
ops = keras.ops


def ops_model():
    """``x + 3.0`` and ``x * y`` on Keras tensors before a hand-made group of two GetItem slices →
    Conv2D → Concatenate, then ``- 1.0`` and ``/ 2.0`` after it."""
    inp = keras.Input((8, 8, 8), name="img")
    x = L.Conv2D(8, 1, name="stem")(inp)
    x = x + 3.0                                      # numpy Add(tensor, 3.0)
    x = x * L.Conv2D(8, 1, name="gate")(inp)         # numpy Multiply(tensor, tensor)
    branches = [L.Conv2D(4, 3, padding="same", name=f"branch{i}")(x[..., 4 * i:4 * i + 4]) for i in range(2)]
    out = L.Concatenate(name="cat")(branches)
    out = (out - 1.0) / 2.0                          # Subtract(tensor, 1.0), TrueDivide(tensor, 2.0)
    return keras.Model(inp, out)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    folder = tmp_path_factory.mktemp("h5_ops")
    keras.utils.set_random_seed(0)
    model = ops_model()
    paths = {"h5": folder / "ops.h5", "keras": folder / "ops.keras"}
    model.save(paths["h5"])
    model.save(paths["keras"])
    return paths


def h5_config(path) -> dict:
    with h5py.File(path, "r") as handle:
        return json.loads(handle.attrs["model_config"])


def write_h5_config(path, config: dict) -> None:
    with h5py.File(path, "r+") as handle:
        handle.attrs["model_config"] = json.dumps(config)


def test_keras_writes_operations_without_their_module_and_cannot_load_the_h5(files):
    """What Keras 3 itself does (the premise of the rest: if Keras ever loads these files,
    the tool must rebuild these entries as the operations they are)."""
    entries = {e["config"]["name"]: e for e in h5_config(files["h5"])["config"]["layers"]}
    add = next(e for e in entries.values() if e["class_name"] == "Add")
    assert add["config"] == {"name": add["name"]} and "module" not in add
    assert add["inbound_nodes"][0]["args"][1] == 3.0
    multiply = next(e for e in entries.values() if e["class_name"] == "Multiply")
    assert len(multiply["inbound_nodes"][0]["args"]) == 2  # two positional tensors, not one list
    with pytest.raises((ValueError, TypeError)):  # Unknown layer: 'GetItem' / Add(tensor, 3.0)
        keras.models.load_model(files["h5"], compile=False)
    keras.models.load_model(files["keras"], compile=False)  # the .keras twin records the modules


def test_check_reads_the_h5_as_data_and_finds_the_group(files):
    result = invoke(files["h5"], "--check")
    assert result.exit_code == 1, result.output  # 1: a fusable pattern
    assert "internal error" not in result.output and "KeyError" not in result.output
    assert "check: 1 fusable pattern found" in result.output
    assert re.search(r"layer 'add(_\d+)?' \(Add\) is the keras\.ops operation keras\.src\.ops\.numpy\.Add"
                     r"\(tensor, 3\.0\)", result.output), result.output
    assert invoke(files["h5"], "--dry-run").exit_code == 0


def test_fuse_of_the_h5_is_one_line_naming_the_operation(files, tmp_path):
    out = tmp_path / "out.keras"
    result = invoke(files["h5"], "--fuse", "-o", out)
    assert result.exit_code == 2, result.output
    lines = error_lines(result)
    assert len(lines) == 1 and "internal error" not in lines[0], result.output
    assert re.search(r"cannot write the fused model, which needs the model rebuilt in Keras 3: layer "
                     r"'add(_\d+)?' \(Add\) is the keras\.ops operation .*Keras 3 cannot load this file either "
                     r"\(save the model as \.keras\)", lines[0]), lines[0]
    assert not out.exists()


def test_the_keras_twin_fuses_and_verifies(files, tmp_path):
    """The advice holds: the same model saved as .keras fuses, verified against Keras's load."""
    out = tmp_path / "fused.keras"
    result = invoke(files["keras"], "--fuse", "-o", out)
    assert result.exit_code == 0, result.output
    assert "verification: passed" in result.output
    fused = keras.models.load_model(out, safe_mode=True)
    assert grouped(fused) == [2]
    x = np.random.default_rng(0).standard_normal((2, 8, 8, 8)).astype("float32")
    original = keras.models.load_model(files["keras"], compile=False)
    np.testing.assert_allclose(np.asarray(fused(x)), np.asarray(original(x)), atol=1e-5)


def test_an_h5_with_operations_and_nothing_to_change_is_fine(tmp_path):
    """MobileNetV3's hard_sigmoid (``relu6(x + 3.0) * (1/6)``): --check 0, --fuse 0, nothing
    written (an .h5 becomes a .keras only when rebuilt) and the reason said."""
    inp = keras.Input((8, 8, 4))
    x = L.Conv2D(4, 1)(inp)
    out = L.Multiply()([x, L.ReLU(6.0)(x + 3.0) * (1.0 / 6.0)])
    path = tmp_path / "hard_swish.h5"
    keras.Model(inp, out).save(path)
    assert invoke(path, "--check").exit_code == 0
    out_path = tmp_path / "out.keras"
    result = invoke(path, "--fuse", "-o", out_path)
    assert result.exit_code == 0, result.output
    assert "not written: an .h5 becomes a .keras only when rebuilt" in result.output
    assert "Keras 3 cannot load this file either" in result.output
    assert not out_path.exists()


def test_operations_keras_loads_from_h5_are_rebuilt_as_keras_loads_them(tmp_path):
    """``ops.concatenate`` and ``ops.softmax`` read back as keras.layers.Concatenate/Softmax of
    the same effect: Keras 3 loads the .h5, so the tool rebuilds, writes and verifies it."""
    inp = keras.Input((8, 8, 4), name="img")
    a, b = L.Conv2D(4, 1, name="a")(inp), L.Conv2D(4, 1, name="b")(inp)
    out = ops.softmax(ops.concatenate([a, b], axis=-1), axis=1)
    path = tmp_path / "loads.h5"
    keras.Model(inp, out).save(path)
    keras.models.load_model(path, compile=False)  # Keras's own reading works
    out_path = tmp_path / "out.keras"
    result = invoke(path, "--fuse", "-o", out_path)
    assert result.exit_code == 0, result.output
    assert "verification: passed" in result.output and out_path.exists()


@pytest.mark.parametrize("suffix", [".h5", ".keras"])
def test_nested_functional_called_twice_keras3(tmp_path, suffix):
    """Keras 3 counts a nested model's built-in node in the model's output references
    (``["backbone", 2, 0]`` for its second call) but not in the nodes that read it: was a
    KeyError when the model was assembled."""
    inner_in = keras.Input((8, 8, 8))
    backbone = keras.Model(inner_in, L.BatchNormalization()(L.Conv2D(8, 1)(inner_in)), name="backbone")
    inp = keras.Input((8, 8, 8), name="img")
    x = backbone(inp)
    x = L.Concatenate(name="cat")([L.Conv2D(4, 3, padding="same")(L.Cropping2D(0)(x)) for _ in range(2)])
    path = tmp_path / f"nested{suffix}"
    keras.Model(inp, [backbone(x), x]).save(path)
    out = tmp_path / "out.keras"
    result = invoke(path, "--fuse", "-o", out)
    assert result.exit_code == 0, result.output
    assert "verification: passed" in result.output and out.exists()


def _break(config: dict, how: str) -> dict:
    body = config["config"]
    if how == "output index":
        body["output_layers"] = [[body["output_layers"][0][0], 0, 5]]
    elif how == "keras_history":
        for entry in body["layers"]:
            for node in entry.get("inbound_nodes", []):
                for arg in node["args"]:
                    if isinstance(arg, dict) and arg.get("class_name") == "__keras_tensor__":
                        arg["config"]["keras_history"] = {"layer": "stem"}
    elif how == "layer entry":
        body["layers"].append("not a layer")
    elif how == "layers":
        body["layers"] = {"stem": {}}
    return config


@pytest.mark.parametrize("how", ["output index", "keras_history", "layer entry", "layers"])
def test_malformed_configs_are_one_line_bad_input(files, tmp_path, how):
    path = tmp_path / "broken.h5"
    shutil.copy(files["h5"], path)
    write_h5_config(path, _break(h5_config(path), how))
    for flags in (["--check"], ["--fuse", "-o", tmp_path / "out.keras"]):
        result = invoke(path, *flags)
        assert result.exit_code in (0, 1, 2), result.output
        assert "internal error" not in result.output and "Traceback" not in result.output, result.output
        if result.exit_code == 2:
            assert len(error_lines(result)) == 1, result.output
