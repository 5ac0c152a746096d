"""A Keras file's reference (tf-keras's or Keras 3's own load of the original) is loaded and run in
a process of its own while the main process rewrites (gconv_rewrite.passes.keras.reference): the proof is the
same, the reference process is gone after the run, and its death is a one-line error."""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path

import keras
import numpy as np
import pytest
import tf_keras
from click.testing import CliRunner

import gconv_rewrite
from gconv_rewrite.cli import main
from gconv_rewrite.errors import VerificationImpossible
from gconv_rewrite.passes.keras import reference
from gconv_rewrite.verify import Feeds
from samples.keras_models import lambda_model_keras3, legacy_model

_real_imports_beside_us = reference.imports_beside_us


@pytest.fixture(autouse=True)
def _an_idle_core(monkeypatch):
    """Whatever else runs on the machine: the reference process starts only where a core is idle
    (``reference.core_to_spare``), and these tests are about the process."""
    monkeypatch.setattr(reference, "core_to_spare", lambda: True)
    monkeypatch.setattr(reference, "imports_beside_us", lambda: True)  # (this test process has imported TF)


def test_a_process_that_imported_tensorflow_already_gets_no_reference_process(tmp_path, monkeypatch):
    """A notebook's or a test suite's call of the API: the reference process's own import would be
    all wait (the command line imports TensorFlow after starting it)."""
    monkeypatch.setattr(reference, "imports_beside_us", _real_imports_beside_us)
    assert not reference.imports_beside_us()  # pytest has imported TensorFlow
    path = legacy_model(tmp_path / "legacy.h5")
    verification = gconv_rewrite.fuse(path, output=tmp_path / "out.keras", trust_lambdas=True).report.verification
    assert verification.passed and verification.reference_pid is None


def test_a_busy_machine_gets_no_reference_process(monkeypatch):
    monkeypatch.undo()  # not the stand-in above: the real check, on a machine made busy, then idle
    monkeypatch.setattr(os, "getloadavg", lambda: (float(os.cpu_count()), 0.0, 0.0))
    assert not reference.core_to_spare()
    monkeypatch.setattr(os, "getloadavg", lambda: (0.0, 0.0, 0.0))
    assert reference.core_to_spare()


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def _sliced_keras3(path: Path) -> Path:
    """Keras 3: x[..., a:b] ×4 → Conv2D → Concatenate → pool → Dense (seeded)."""
    keras.utils.set_random_seed(0)
    L = keras.layers
    inp = keras.Input((6, 6, 8), name="image")
    joined = L.Concatenate(name="join")([L.Conv2D(4, 3, padding="same", name=f"c{i}")(inp[..., 2 * i:2 * i + 2])
                                         for i in range(4)])
    keras.Model(inp, L.Dense(3, name="head")(L.GlobalAveragePooling2D()(joined))).save(path)
    return path


def test_the_tf_keras_reference_runs_in_a_process_of_its_own(tmp_path):
    path = legacy_model(tmp_path / "legacy.h5")
    report = gconv_rewrite.fuse(path, output=tmp_path / "out.keras", trust_lambdas=True).report
    verification = report.verification
    assert verification.passed and verification.reference == f"tf-keras {tf_keras.__version__} (load_model)"
    assert isinstance(verification.reference_pid, int) and verification.reference_pid != os.getpid()
    assert not _alive(verification.reference_pid)  # ended with the run
    assert [run["inputs"][next(iter(run["inputs"]))][0] for run in verification.runs] == [1, 2]
    (entry,) = report.rewrites[0].boundary
    assert entry["passed"] is True and entry["informative"] is True and entry["max_abs_error"] < 1e-5
    assert json.loads(json.dumps(report.to_dict()))["verification"]["reference_pid"] == verification.reference_pid


def test_a_keras3_reference_runs_in_a_process_of_its_own_too(tmp_path):
    """Keras 3's own load of a Keras 3 file, in the reference process (the analysis stands in for
    what a fusion removes: the reference is the longer part of the run)."""
    path = _sliced_keras3(tmp_path / "sliced.keras")
    verification = gconv_rewrite.fuse(path, output=tmp_path / "out.keras").report.verification
    assert verification.passed and verification.reference == f"keras {keras.__version__} (load_model)"
    assert isinstance(verification.reference_pid, int) and verification.reference_pid != os.getpid()
    assert not _alive(verification.reference_pid)


def test_a_file_keras_cannot_load_is_rebuilt_in_the_reference_process(tmp_path):
    """Keras 3.15 cannot load Lambdas with defaults: the reference process makes the tool's rebuild
    from the config itself, and a wrong rewrite still fails against it."""
    path = lambda_model_keras3(tmp_path / "defaults.keras", binding="default")
    report = gconv_rewrite.fuse(path, output=tmp_path / "out.keras", trust_lambdas=True).report
    verification = report.verification
    assert verification.passed and verification.reference == "the tool's rebuild of the file's config"
    assert "as Keras cannot load it" in verification.note
    assert isinstance(verification.reference_pid, int) and verification.reference_pid != os.getpid()
    (entry,) = report.rewrites[0].boundary
    assert entry["passed"] is True and entry["max_abs_error"] < 1e-5


def test_a_keras_file_is_worth_a_process(tmp_path, monkeypatch):
    legacy = legacy_model(tmp_path / "legacy.h5")
    assert reference.worth_a_process(legacy)
    inp = tf_keras.Input((4, 4, 2))
    tf_keras.Model(inp, tf_keras.layers.Conv2D(2, 1)(inp)).save(tmp_path / "tf_keras.keras")
    assert reference.worth_a_process(tmp_path / "tf_keras.keras")
    keras3 = _sliced_keras3(tmp_path / "sliced.keras")
    assert reference.worth_a_process(keras3)
    (tmp_path / "junk.h5").write_bytes(b"not a model")
    assert not reference.worth_a_process(tmp_path / "junk.h5")
    assert not reference.worth_a_process(tmp_path / "missing.h5")
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "tf_keras" else real(name, *a))
    assert not reference.worth_a_process(legacy)  # no tf-keras: no tf-keras reference to load
    assert reference.worth_a_process(keras3)


@pytest.mark.parametrize("kind", ["tf-keras", "keras3", "rebuild"])
def test_a_wrong_rewrite_still_fails_against_the_reference_process(tmp_path, monkeypatch, kind):
    """Whichever reference the process holds: tf-keras's load, Keras 3's, or the tool's rebuild it
    makes where Keras cannot load the file (their Lambdas: the analysis's shape stand-ins)."""
    import gconv_rewrite.plan as planner

    real = planner.plan_fusion

    def slightly_wrong(*args, **kwargs):
        plan = real(*args, **kwargs)
        plan.weight = plan.weight * np.float32(1.01)
        return plan

    path = {"tf-keras": lambda: legacy_model(tmp_path / "legacy.h5"),
            "keras3": lambda: lambda_model_keras3(tmp_path / "closure.keras", binding="closure"),
            "rebuild": lambda: lambda_model_keras3(tmp_path / "defaults.keras", binding="default")}[kind]()
    monkeypatch.setattr(planner, "plan_fusion", slightly_wrong)
    with pytest.raises(gconv_rewrite.errors.VerificationFailed) as failure:
        gconv_rewrite.fuse(path, output=tmp_path / "out.keras", trust_lambdas=True)
    verification = failure.value.verification
    assert verification.reference_pid not in (None, os.getpid())
    assert verification.reference.startswith({"tf-keras": "tf-keras", "keras3": "keras 3",
                                              "rebuild": "the tool's rebuild"}[kind])
    assert "differ at their boundary" in verification.note
    assert not (tmp_path / "out.keras").exists()


def _kill_after_request(monkeypatch, pids: list[int]):
    """The reference process is killed (as the OOM killer would) right after it is asked to run."""
    real = reference.ReferenceRunner.start

    def start_then_kill(self, sizes):
        awaited = real(self, sizes)
        pids.append(self.process.pid)
        os.kill(self.process.pid, signal.SIGKILL)
        return awaited

    monkeypatch.setattr(reference.ReferenceRunner, "start", start_then_kill)


def test_a_killed_reference_process_is_a_one_line_error(tmp_path, monkeypatch):
    path, pids = legacy_model(tmp_path / "legacy.h5"), []
    _kill_after_request(monkeypatch, pids)
    with pytest.raises(VerificationImpossible) as failure:
        gconv_rewrite.fuse(path, output=tmp_path / "out.keras", trust_lambdas=True)
    message = failure.value.message
    assert "killed by SIGKILL" in message and "nothing was written" in message and "\n" not in message
    assert not (tmp_path / "out.keras").exists()
    assert pids and not _alive(pids[0])


def test_a_killed_reference_process_in_the_cli(tmp_path, monkeypatch):
    path = legacy_model(tmp_path / "legacy.h5")
    _kill_after_request(monkeypatch, [])
    result = CliRunner().invoke(main, [str(path), "-o", str(tmp_path / "out.keras"), "--trust-lambdas"])
    assert result.exit_code == 2, result.output
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and "error:" in lines[0] and "killed by SIGKILL" in lines[0], result.output
    assert "Traceback" not in result.output and not (tmp_path / "out.keras").exists()


def test_an_interrupted_run_kills_the_reference_process(tmp_path, monkeypatch):
    """Ctrl-C reaches the main process alone (the reference process ignores SIGINT); the run's
    way out kills the reference process."""
    path, pids = legacy_model(tmp_path / "legacy.h5"), []
    real = reference.ReferenceRunner.start

    def start_then_interrupt(self, sizes):
        real(self, sizes)
        pids.append(self.process.pid)
        assert _alive(self.process.pid)
        raise KeyboardInterrupt

    monkeypatch.setattr(reference.ReferenceRunner, "start", start_then_interrupt)
    with pytest.raises(KeyboardInterrupt):
        gconv_rewrite.fuse(path, output=tmp_path / "out.keras", trust_lambdas=True)
    assert pids and not _alive(pids[0])
    assert not (tmp_path / "out.keras").exists()


def test_no_reference_process_where_nothing_is_compared_with_keras_load(tmp_path, monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("a reference process was started")

    monkeypatch.setattr(reference.ReferenceProcess, "__init__", refuse)
    path = _sliced_keras3(tmp_path / "sliced.keras")
    assert gconv_rewrite.check(path).rewrites  # --check: nothing is written, nothing proven
    assert gconv_rewrite.fuse(path, output=tmp_path / "a.keras", verify=False).report.written
    late = legacy_model(tmp_path / "late.h5", style="lambda", late=True)  # --repair-late-binding: the reference is the rebuild
    repaired = gconv_rewrite.fuse(late, output=tmp_path / "b.keras", trust_lambdas=True, repair_late_binding=True)
    assert repaired.report.verification.passed and repaired.report.verification.reference_pid is None


def test_inside_a_jobs_worker_the_reference_runs_in_process(tmp_path, monkeypatch):
    """A ``--jobs`` worker (a child of the run's main process) starts no reference process: the
    runs are parallel already. The reference is then loaded in the worker itself, as before."""
    import multiprocessing

    monkeypatch.setattr(multiprocessing, "parent_process", lambda: object())
    path = legacy_model(tmp_path / "legacy.h5")
    verification = gconv_rewrite.fuse(path, output=tmp_path / "out.keras", trust_lambdas=True).report.verification
    assert verification.passed and verification.reference == f"tf-keras {tf_keras.__version__} (load_model)"
    assert verification.reference_pid is None


class _Unloaded:
    """A reference process that could not load the file (what it answers, without the process)."""

    pid = 0

    def __init__(self):
        self.requests = []

    def request(self, extra, sizes):
        self.requests.append((extra, len(sizes)))

    def receive(self):
        return ("unloaded", "reference: rebuilt from the file's config, as Keras cannot load it (why)")


def test_a_file_the_reference_process_cannot_load_is_compared_with_the_rebuild():
    class Runner:  # the in-process rebuild's runner
        extra = ["join"]

        def __call__(self, feeds):
            return {"head": feeds["image"] * 2, "join": feeds["image"]}

    made = []
    runner = reference.ReferenceRunner(_Unloaded(), ["head"], [], ["join", "nested"],
                                       fallback=lambda note, extra: (made.append(extra) or Runner(), note, "rebuild"))
    sizes = [{"image": np.ones((1, 2), "float32")}, {"image": np.ones((2, 2), "float32")}]
    values, exposed = runner.start(sizes)()
    assert made == [["join", "nested"]] and runner.process.requests == [(["join", "nested"], 2)]
    assert exposed == ["join"] and [v["head"].shape for v in values] == [(1, 2), (2, 2)]
    assert runner.name == "rebuild" and runner.note.startswith("reference: rebuilt") and runner.pid is None


def test_the_linear_ancillary_check_builds_the_same_tf_keras_model(tmp_path):
    """tf-keras's load with ``connect_ancillary_layers`` made linear (gconv_rewrite.passes.keras.model) builds the
    same model: same layers in the same order, same outputs; tf-keras's own function is back after."""
    from tf_keras.src.engine import functional

    from gconv_rewrite.passes.keras.model import linear_ancillary_check

    path = legacy_model(tmp_path / "legacy.h5")
    x = np.random.default_rng(0).standard_normal((2, 8, 8, 8)).astype("float32")

    def load():
        model = tf_keras.models.load_model(path, compile=False, safe_mode=False)
        return [layer.name for layer in model.layers], np.asarray(model(x, training=False))

    quadratic = functional.connect_ancillary_layers
    names, values = load()
    with linear_ancillary_check():
        assert functional.connect_ancillary_layers.linear
        names_after, values_after = load()
    assert functional.connect_ancillary_layers is quadratic
    assert len(names) > 10 and [n.rsplit("_", 1)[0] for n in names] == [n.rsplit("_", 1)[0] for n in names_after]
    np.testing.assert_array_equal(values, values_after)


def test_the_original_is_asked_for_once_as_soon_as_the_rewrites_are_known(tmp_path, monkeypatch):
    """The backend asks the reference process for the run when it knows the rewrites (before the
    rebuild and the save); the proof wants the same run and does not ask again."""
    asked = []
    real = reference.ReferenceProcess._send

    def record(self, message):
        asked.append(message[:2])
        real(self, message)

    monkeypatch.setattr(reference.ReferenceProcess, "_send", record)
    path = legacy_model(tmp_path / "legacy.h5")
    report = gconv_rewrite.fuse(path, output=tmp_path / "out.keras", trust_lambdas=True).report
    assert asked == [("run", [report.rewrites[0].boundary[0]["tensor"]])]
    assert report.verification.passed and report.verification.reference_pid is not None


def test_a_later_request_is_answered_and_the_earlier_answer_skipped(tmp_path):
    path = legacy_model(tmp_path / "legacy.h5")
    x = np.random.default_rng(1).standard_normal((1, 8, 8, 8)).astype("float32")
    sizes = [Feeds({"x": x}), Feeds({"x": np.concatenate([x, x])})]
    with reference.reference_process(path, trust_lambdas=True) as process:
        process.request(["stem"], sizes)
        process.request(["stem"], [dict(s) for s in sizes])  # the same run: not asked again
        assert process.requests == 1
        runner = reference.ReferenceRunner(process, ["out"], [], ["nowhere", "stem"], fallback=None)
        values, exposed = runner.start(sizes)()
        assert process.requests == 2 and process.answered == 2
    assert exposed == ["stem"] and runner.name == f"tf-keras {tf_keras.__version__} (load_model)"
    model = tf_keras.models.load_model(path, compile=False, safe_mode=False)
    stem = tf_keras.Model(model.inputs, model.get_layer("stem").output)
    for feeds, got in zip(sizes, values):
        np.testing.assert_allclose(got["out"], np.asarray(model(feeds["x"])), atol=1e-5)
        np.testing.assert_allclose(got["stem"], np.asarray(stem(feeds["x"])), atol=1e-5)
    assert not _alive(process.pid)


def test_inputs_that_cannot_be_made_are_refused_by_the_proof_as_before(tmp_path):
    """A dynamic dim besides the batch needs --shape: the backend's early request to the reference
    process makes no inputs then, and the proof refuses in one line, as without the process."""
    L = tf_keras.layers
    inp = tf_keras.Input((None, None, 8), name="image")
    joined = L.Concatenate(name="join")([L.Conv2D(4, 3, padding="same")(inp[..., 2 * i:2 * i + 2]) for i in range(4)])
    path = tmp_path / "dynamic.h5"
    tf_keras.Model(inp, joined).save(path)
    with pytest.raises(gconv_rewrite.errors.RewriteError) as failure:
        gconv_rewrite.fuse(path, output=tmp_path / "out.keras")
    assert "--shape" in failure.value.message and not (tmp_path / "out.keras").exists()
    shaped = gconv_rewrite.fuse(path, output=tmp_path / "out.keras", shapes={"image": [1, 6, 6, 8]}).report
    assert shaped.rewrites and shaped.verification.passed
    assert shaped.verification.reference_pid not in (None, os.getpid())
