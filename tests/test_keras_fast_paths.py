"""What the Keras fuse no longer spends time on, each with the proof that nothing else changed:
the command's exit after TensorFlow skips the interpreter's teardown (everything written and
flushed first, the atexit handlers run); the reference process reads no weights of its own and
draws no random initial values that the file's arrays replace."""

from __future__ import annotations

import atexit
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import tf_keras

from gconv_rewrite import cli
from gconv_rewrite.passes.keras import _config
from gconv_rewrite.passes.keras import model as km
from samples.keras_models import legacy_model

REPO = Path(__file__).resolve().parents[1]


class _Exited(Exception):
    def __init__(self, code):
        super().__init__(code)
        self.code = code


def _entry(monkeypatch, argv: list[str]) -> int:
    """``cli.entry`` with ``os._exit`` caught: the code it exits with."""
    def quick_exit(code):
        raise _Exited(code)

    monkeypatch.setattr(os, "_exit", quick_exit)
    monkeypatch.setattr(sys, "argv", ["gconv-rewrite", *argv])
    with pytest.raises(_Exited) as exited:
        cli.entry()
    return exited.value.code


def test_after_tensorflow_the_command_runs_the_exit_handlers_then_exits_at_once(tmp_path, monkeypatch, capsys):
    path = legacy_model(tmp_path / "legacy.h5")
    ran = []  # (this test process's own handlers are pytest's: recorded, not run)
    monkeypatch.setattr(atexit, "_run_exitfuncs", lambda: ran.append("handlers"))
    code = _entry(monkeypatch, [str(path), "--check", "--trust-lambdas"])
    assert code == 1  # a finding: --check's exit code, kept
    assert ran == ["handlers"]  # what a normal exit runs, run before the quick one
    assert "fusable" in capsys.readouterr().out


def test_without_tensorflow_the_command_exits_as_python_does(monkeypatch, tmp_path):
    monkeypatch.delitem(sys.modules, "tensorflow")
    monkeypatch.setattr(sys, "argv", ["gconv-rewrite", str(tmp_path / "missing.onnx")])
    monkeypatch.setattr(os, "_exit", lambda code: pytest.fail("quick exit without TensorFlow"))
    with pytest.raises(SystemExit) as exited:
        cli.entry()
    assert exited.value.code == 2


def test_the_command_s_output_is_whole_when_it_exits_quickly(tmp_path):
    """The real process (``python -m gconv_rewrite``): the JSON document on stdout complete, the
    model written and loadable, the exit code the run's."""
    path = legacy_model(tmp_path / "legacy.h5")
    output = tmp_path / "out.keras"
    done = subprocess.run([sys.executable, "-m", "gconv_rewrite", str(path), "-o", str(output), "--trust-lambdas",
                           "--format", "json"], cwd=REPO, capture_output=True, text=True, timeout=300,
                          env={k: v for k, v in os.environ.items() if k != "TF_CPP_MIN_LOG_LEVEL"})
    assert done.returncode == 0, done.stderr
    document = json.loads(done.stdout)
    assert document["exit_code"] == 0 and document["models"][0]["status"] == "rewritten"
    assert document["models"][0]["report"]["verification"]["passed"] is True
    import keras

    assert len(keras.models.load_model(output, safe_mode=False).layers) > 0
    assert done.stderr.strip() == ""  # nothing but what the run says (tf-keras's Lambda warning silenced)


def test_the_reference_process_reads_the_config_without_the_weights(tmp_path):
    path = legacy_model(tmp_path / "legacy.h5")
    whole, config_only = _config.read_file(path), _config.read_file(path, weights=False)
    assert config_only.config == whole.config and config_only.keras_version == whole.keras_version
    assert whole.weights.total_parameters() > 0 and config_only.weights.total_parameters() == 0


def test_tf_keras_loads_the_same_model_without_drawing_random_initial_values(tmp_path):
    path = legacy_model(tmp_path / "legacy.h5", style="getitem")
    inputs = np.random.default_rng(0).standard_normal((2, 8, 8, 8)).astype("float32")
    expected = tf_keras.models.load_model(path, compile=False)(inputs).numpy()
    original = tf_keras.src.engine.base_layer_utils.make_variable
    with km.unrandom_tf_keras_variables():
        loaded = tf_keras.models.load_model(path, compile=False)
        fresh = tf_keras.layers.Dense(3)
        fresh.build((None, 4))  # a Glorot kernel, made inside: zeros, not drawn
    assert np.array_equal(loaded(inputs).numpy(), expected)
    assert not np.any(fresh.kernel.numpy())
    assert tf_keras.src.engine.base_layer_utils.make_variable is original


def test_tf_keras_loads_the_same_model_learning_static_shapes_from_their_rule(tmp_path):
    """Lambdas traced, convolutions, normalizations, merges and the head by their shape rule: the
    same layers, output shapes, weights and outputs as tf-keras's own load."""
    path = legacy_model(tmp_path / "legacy.h5")
    names = {k: v for k, v in km._lambdas.lambda_globals().items() if k != "__builtins__"}
    expected = tf_keras.models.load_model(path, compile=False, custom_objects=names)
    layer_class = tf_keras.src.engine.base_layer.Layer
    tracing, traced = layer_class._infer_output_signature, []

    def recording(layer, *args):  # what the load still traces in a scratch graph
        traced.append(type(layer).__name__)
        return tracing(layer, *args)

    layer_class._infer_output_signature = recording
    try:
        with km.static_output_shapes():
            loaded = tf_keras.models.load_model(path, compile=False, custom_objects=names)
        assert layer_class._infer_output_signature is recording  # put back on the way out
    finally:
        layer_class._infer_output_signature = tracing
    assert set(traced) == {"Lambda"}
    assert [(a.name, a.output.shape, a.output.dtype) for a in loaded.layers] == \
        [(b.name, b.output.shape, b.output.dtype) for b in expected.layers]
    assert all(np.array_equal(a, b) for a, b in zip(loaded.get_weights(), expected.get_weights()))
    inputs = np.random.default_rng(0).standard_normal((2, 8, 8, 8)).astype("float32")
    assert np.array_equal(loaded(inputs).numpy(), expected(inputs).numpy())


def test_a_layer_with_an_activation_of_the_file_s_own_is_traced():
    """A built-in layer whose activation is a function of the file's keeps tf-keras's tracing: the
    function could return any shape."""
    assert km._built_in_activation(tf_keras.layers.Conv2D(2, 1, activation="relu"))
    assert km._built_in_activation(tf_keras.layers.Add())  # no activation at all
    assert not km._built_in_activation(tf_keras.layers.Activation(lambda x: x[..., :1]))
    assert not km._built_in_activation(tf_keras.layers.Dense(2, activation=lambda x: x[:, :1]))


@pytest.mark.parametrize("binding", ["closure", "default"])
def test_check_still_finds_the_groups_the_analysis_stands_in_for(tmp_path, binding):
    """The analysis's shape stand-ins replace the very calls a group is made of: --check still
    names the group and exits 1 (Keras 3 Lambdas; ``default``: a file Keras cannot load)."""
    from click.testing import CliRunner

    from samples.keras_models import lambda_model_keras3

    path = lambda_model_keras3(tmp_path / f"{binding}.keras", binding=binding)
    result = CliRunner().invoke(cli.main, [str(path), "--check", "--trust-lambdas"])
    assert result.exit_code == 1, result.output
    assert "fusable-group" in result.output
