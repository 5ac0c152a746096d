"""Red-team findings on trust, files and processes (issue 13, items 1, 4, 5, 6, 7, 10).

Each test reproduces what an attacker or an unlucky user did, and pins what the tool does now:
the config cannot grant trust; nothing the input reads is ever written over; model and external
data are committed as one pair (a kill between the renames, or two concurrent ``--force`` runs,
leave the old pair or the new pair, never a mix); a dead run's staging is swept by the next run;
a killed batch worker becomes one row; TensorFlow's native log noise never reaches stderr.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import onnx
import pytest

from gconv_rewrite import formats
from samples.models import grouped_block
from tests.helpers import invoke, run_onnx

REPO = Path(__file__).resolve().parents[1]
X = np.random.default_rng(7).standard_normal((1, 32, 8, 8)).astype(np.float32)


def run_ort(path: Path) -> np.ndarray:
    return run_onnx(path, {"x": X})[0]


def save_external(path: Path, seed: int, location: str | None = None) -> Path:
    """A fusable block (32 channels, so its weights go external) with its data in ``location``."""
    onnx.save(grouped_block("split", groups=4, channels=32, out_channels=32, seed=seed), path,
              save_as_external_data=True, location=location or f"{path.name}.weights", size_threshold=512)
    return path


def referenced(path: Path) -> set[str]:
    model = onnx.load(str(path), load_external_data=False)
    return {e.value for t in model.graph.initializer if t.data_location == onnx.TensorProto.EXTERNAL
            for e in t.external_data if e.key == "location"}


def python(script: str, *args, env=None, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", textwrap.dedent(script), *map(str, args)], cwd=REPO,
                          capture_output=True, text=True, env=env, timeout=300, **kwargs)


def dead_pid() -> int:
    """The pid of a process that has exited (and been reaped)."""
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


# -- 1. the config cannot grant trust --------------------------------------------------------------


@pytest.mark.parametrize("key", ["trust-lambdas", "repair-late-binding"])
def test_config_file_cannot_grant_trust(tmp_path, key):
    source = tmp_path / "m.onnx"
    onnx.save(grouped_block("split"), source)
    config = tmp_path / "gconv.toml"
    config.write_text(f"{key} = true\n")
    result = invoke(source, "--config", config, "--check")
    assert result.exit_code == 2
    lines = result.output.strip().splitlines()
    assert len(lines) == 1, result.output
    assert key in lines[0] and "command line" in lines[0]


def test_pyproject_cannot_grant_trust(tmp_path, monkeypatch):
    """A cloned repository's pyproject.toml (read by the pre-commit hook) must not grant itself
    code execution."""
    source = tmp_path / "m.onnx"
    onnx.save(grouped_block("split"), source)
    project = tmp_path / "cloned"
    project.mkdir()
    (project / "pyproject.toml").write_text('[tool.gconv-rewrite]\natol = 0.5\ntrust-lambdas = true\n')
    monkeypatch.chdir(project)
    result = invoke(source, "--check")
    assert result.exit_code == 2
    assert len(result.output.strip().splitlines()) == 1, result.output
    assert "trust-lambdas" in result.output and "--trust-lambdas" in result.output
    (project / "pyproject.toml").write_text('[tool.gconv-rewrite]\ntrust-lambdas = false\n')
    assert invoke(source, "--check").exit_code == 2  # even false: the key has no place there


# -- 4. never write over what the input reads ------------------------------------------------------


def test_output_named_like_the_inputs_external_data_leaves_the_input_intact(tmp_path):
    """a.onnx's weights live in b.onnx.data: writing -o b.onnx must not touch them."""
    source = save_external(tmp_path / "a.onnx", seed=1, location="b.onnx.data")
    expected = run_ort(source)
    weights = (tmp_path / "b.onnx.data").read_bytes()
    inode = (tmp_path / "b.onnx.data").stat().st_ino
    result = invoke(source, "-o", tmp_path / "b.onnx", "--force")
    assert result.exit_code in (0, 2), result.output
    # (The fused weights may well be the same bytes: the file itself must not have been replaced.)
    assert (tmp_path / "b.onnx.data").stat().st_ino == inode
    assert (tmp_path / "b.onnx.data").read_bytes() == weights
    np.testing.assert_allclose(run_ort(source), expected, atol=1e-6)


@pytest.mark.parametrize("how", ["same path", "symlink", "hard link"])
def test_output_may_not_be_the_inputs_external_data(tmp_path, how):
    source = save_external(tmp_path / "m.onnx", seed=1, location="m.onnx.data")
    data = tmp_path / "m.onnx.data"
    before = data.read_bytes()
    target = {"same path": data, "symlink": tmp_path / "link.onnx", "hard link": tmp_path / "hard.onnx"}[how]
    if how == "symlink":
        target.symlink_to(data)
    elif how == "hard link":
        os.link(data, target)
    result = invoke(source, "-o", target, "--force")
    assert result.exit_code == 2, result.output
    assert len(result.output.strip().splitlines()) == 1, result.output
    assert "the input reads" in result.output
    assert data.read_bytes() == before


def test_old_output_data_the_input_reads_is_not_removed(tmp_path):
    """b.onnx (an old output, a copy of a.onnx) and a.onnx share b.onnx.data: replacing b.onnx
    must not delete the data a.onnx reads."""
    source = save_external(tmp_path / "a.onnx", seed=1, location="b.onnx.data")
    (tmp_path / "b.onnx").write_bytes(source.read_bytes())
    expected = run_ort(source)
    invoke(source, "-o", tmp_path / "b.onnx", "--force")
    assert (tmp_path / "b.onnx.data").is_file()
    np.testing.assert_allclose(run_ort(source), expected, atol=1e-6)


@pytest.mark.parametrize("what", ["model", "data"])
def test_report_may_not_name_the_input_or_its_data(tmp_path, what):
    source = save_external(tmp_path / "m.onnx", seed=1, location="m.onnx.data")
    target = source if what == "model" else tmp_path / "m.onnx.data"
    before = target.read_bytes()
    result = invoke(source, "--check", "--report", target)
    assert result.exit_code == 2, result.output
    assert "the input reads" in result.output and "Traceback" not in result.output
    assert target.read_bytes() == before


def test_output_inside_the_input_savedmodel_folder_is_refused(tmp_path):
    folder = tmp_path / "sm"
    folder.mkdir()
    (folder / "saved_model.pb").write_bytes(b"whatever")
    with pytest.raises(Exception) as caught:
        formats.check_output_path(folder / "variables", [folder], force=True)
    assert "the input reads" in str(caught.value) or "inside the input" in str(caught.value)


# -- 5. model + external data committed as one ------------------------------------------------------

KILL_AT_RENAME = """
import os, signal, sys
when, out = sys.argv[1], os.path.abspath(sys.argv[2])
real_replace = os.replace

def replace(src, dst, *args, **kwargs):
    if when == "before-model" and os.path.abspath(dst) == out:
        os.kill(os.getpid(), signal.SIGKILL)
    real_replace(src, dst, *args, **kwargs)
    if when == "after-model" and os.path.abspath(dst) == out:
        os.kill(os.getpid(), signal.SIGKILL)

os.replace = replace
from gconv_rewrite.cli import main
sys.argv = ["gconv-rewrite", *sys.argv[3:]]
main()
"""


def staging_leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.startswith("."))


def data_files(folder: Path, out: Path) -> set[str]:
    return {p.name for p in folder.iterdir() if p.name.startswith(out.name + ".")}


@pytest.mark.parametrize("when", ["before-model", "after-model"])
def test_kill_between_the_renames_leaves_one_complete_pair(tmp_path, when):
    old_source = save_external(tmp_path / "old.onnx", seed=1)
    new_source = save_external(tmp_path / "new.onnx", seed=2)
    old_numbers, new_numbers = run_ort(old_source), run_ort(new_source)
    assert not np.allclose(old_numbers, new_numbers, atol=1e-3)
    out = tmp_path / "out.onnx"
    assert invoke(old_source, "-o", out).exit_code == 0
    killed = python(KILL_AT_RENAME, when, out, new_source, "-o", out, "--force")
    assert killed.returncode == -9, killed.stderr
    # What a reader finds on disk now: the old pair or the new pair, complete, never a mix.
    np.testing.assert_allclose(run_ort(out), old_numbers if when == "before-model" else new_numbers, atol=1e-4)
    assert referenced(out) <= data_files(tmp_path, out)
    # The next run on that output sweeps what the dead run left (its staging, unreferenced data).
    assert invoke(new_source, "-o", out, "--force").exit_code == 0
    np.testing.assert_allclose(run_ort(out), new_numbers, atol=1e-4)
    assert staging_leftovers(tmp_path) == []
    assert data_files(tmp_path, out) == referenced(out)


CONCURRENT_WRITER = """
import fcntl, os, sys, time
from pathlib import Path
role, flags, out = sys.argv[1], Path(sys.argv[2]), os.path.abspath(sys.argv[3])
real_replace, real_flock = os.replace, fcntl.flock

def flock(fd, operation):
    if operation & fcntl.LOCK_EX:
        (flags / f"{role}-at-lock").touch()
    return real_flock(fd, operation)

def replace(src, dst, *args, **kwargs):
    if role == "A" and os.path.abspath(dst) == out:
        # Hold A between its renames until B has committed, or is waiting for A's lock.
        (flags / "A-in-window").touch()
        deadline = time.time() + 120
        while time.time() < deadline and not (flags / "B-done").exists():
            if (flags / "B-at-lock").exists():
                time.sleep(1.0)
                break
            time.sleep(0.05)
    real_replace(src, dst, *args, **kwargs)
    if role == "B" and os.path.abspath(dst) == out:
        (flags / "B-done").touch()

fcntl.flock, os.replace = flock, replace
from gconv_rewrite.cli import main
sys.argv = ["gconv-rewrite", *sys.argv[4:]]
main()
"""


def test_concurrent_force_writers_on_one_output_serialize(tmp_path):
    a = save_external(tmp_path / "a.onnx", seed=1)
    b = save_external(tmp_path / "b.onnx", seed=2)
    b_numbers = run_ort(b)
    out, flags = tmp_path / "out.onnx", tmp_path / "flags"
    flags.mkdir()
    command = [sys.executable, "-c", textwrap.dedent(CONCURRENT_WRITER)]
    writer_a = subprocess.Popen(command + ["A", str(flags), str(out), str(a), "-o", str(out), "--force", "-q"],
                                cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while not (flags / "A-in-window").exists():
        assert writer_a.poll() is None and time.time() < deadline, writer_a.communicate()
        time.sleep(0.05)
    writer_b = subprocess.run(command + ["B", str(flags), str(out), str(b), "-o", str(out), "--force", "-q"],
                              cwd=REPO, capture_output=True, text=True, timeout=300)
    assert writer_a.wait(timeout=300) == 0, writer_a.communicate()
    assert writer_b.returncode == 0, writer_b.stderr
    # B committed last (it waited for A's lock), and its model reads its own data.
    np.testing.assert_allclose(run_ort(out), b_numbers, atol=1e-4)
    assert data_files(tmp_path, out) == referenced(out)
    assert staging_leftovers(tmp_path) == []


def test_external_data_name_is_unique_to_its_content(tmp_path):
    """Deterministic (same input, same bytes) and never the name of another write's data."""
    source = save_external(tmp_path / "m.onnx", seed=1)
    other = save_external(tmp_path / "n.onnx", seed=2)
    out = tmp_path / "out.onnx"
    assert invoke(source, "-o", out).exit_code == 0
    first, first_bytes = referenced(out), out.read_bytes()
    assert invoke(source, "-o", out, "--force").exit_code == 0
    assert referenced(out) == first and out.read_bytes() == first_bytes
    assert invoke(other, "-o", out, "--force").exit_code == 0
    assert referenced(out) != first
    assert data_files(tmp_path, out) == referenced(out)  # the old data went once the new model was in


# -- 6. a dead run's leftovers are swept -----------------------------------------------------------


def test_dead_runs_staging_and_scratch_are_swept_live_ones_kept(tmp_path, monkeypatch):
    import tempfile

    scratch_root = tmp_path / "tmp"
    scratch_root.mkdir()
    monkeypatch.setenv("TMPDIR", str(scratch_root))
    monkeypatch.setattr(tempfile, "tempdir", None)  # re-read TMPDIR
    source = tmp_path / "m.onnx"
    onnx.save(grouped_block("split"), source)
    out = tmp_path / "m.fused.onnx"
    dead, alive = dead_pid(), os.getpid()
    stale = [tmp_path / f".m.fused.onnx.gconv-{dead}-a1b2c3.tmp", scratch_root / f"gconv-{dead}-d4e5f6"]
    live = [tmp_path / f".m.fused.onnx.gconv-{alive}-a1b2c3.tmp", scratch_root / f"gconv-{alive}-d4e5f6"]
    foreign = [tmp_path / ".m.fused.onnx.k3j2h1.tmp", tmp_path / f".other.onnx.gconv-{dead}-a1b2c3.tmp"]
    for folder in stale + live + foreign:
        folder.mkdir()
        (folder / "weights.data").write_bytes(b"\0" * 4096)
    result = invoke(source, "-o", out)
    assert result.exit_code == 0, result.output
    assert [p for p in stale if p.exists()] == []
    assert all(p.exists() for p in live + foreign)  # a live owner's, or not ours to judge


def test_staging_and_scratch_names_carry_the_owner_pid(tmp_path, monkeypatch):
    seen = []
    real_save = formats.save_onnx

    def save(model, path, **kwargs):
        seen.append(Path(path).parent.name)
        return real_save(model, path, **kwargs)

    monkeypatch.setattr(formats, "save_onnx", save)
    source = tmp_path / "m.onnx"
    onnx.save(grouped_block("split"), source)
    assert invoke(source, "-o", tmp_path / "out.onnx").exit_code == 0
    assert any(name.startswith(f".out.onnx.gconv-{os.getpid()}-") and name.endswith(".tmp") for name in seen), seen


# -- 7. a killed batch worker is one row -----------------------------------------------------------

KILLER_SITECUSTOMIZE = """
import os
if os.environ.get("GCONV_TEST_KILL_MODEL"):
    import signal
    import gconv_rewrite.api as api
    real_rewrite = api.rewrite

    def rewrite(model, *args, **kwargs):
        if os.path.basename(str(model)) == os.environ["GCONV_TEST_KILL_MODEL"]:
            os.kill(os.getpid(), signal.SIGKILL)  # what the OOM killer does
        return real_rewrite(model, *args, **kwargs)

    api.rewrite = rewrite
"""


def test_a_killed_worker_is_one_row_and_the_others_stay(tmp_path):
    hook = tmp_path / "hook"
    hook.mkdir()
    (hook / "sitecustomize.py").write_text(textwrap.dedent(KILLER_SITECUSTOMIZE))
    models = []
    for i, name in enumerate(["a.onnx", "b.onnx", "c.onnx"]):
        onnx.save(grouped_block("split", seed=i), tmp_path / name)
        models.append(tmp_path / name)
    env = {**os.environ, "GCONV_TEST_KILL_MODEL": "b.onnx",
           "PYTHONPATH": os.pathsep.join([str(hook), str(REPO), os.environ.get("PYTHONPATH", "")])}
    result = subprocess.run([sys.executable, "-m", "gconv_rewrite", *map(str, models), "--jobs", "2", "--format", "json",
                             "-o", str(tmp_path / "out")], cwd=REPO, capture_output=True, text=True, env=env,
                            timeout=300)
    assert "Traceback" not in result.stderr and "BrokenProcessPool" not in result.stderr, result.stderr
    assert result.returncode == 2
    document = json.loads(result.stdout)
    rows = {Path(r["input"]).name: r for r in document["models"]}
    assert document["exit_code"] == 2
    assert (rows["a.onnx"]["status"], rows["c.onnx"]["status"]) == ("rewritten", "rewritten")
    assert rows["b.onnx"]["status"] == "error" and rows["b.onnx"]["exit_code"] == 2
    assert "SIGKILL" in rows["b.onnx"]["error"]["message"] and "worker" in rows["b.onnx"]["error"]["message"]
    assert (tmp_path / "out" / "a.onnx").is_file() and (tmp_path / "out" / "c.onnx").is_file()
    assert not (tmp_path / "out" / "b.onnx").exists()


# -- 10. one line on stderr, whatever TensorFlow logs ----------------------------------------------


def test_garbage_saved_model_gives_exactly_one_stderr_line(tmp_path):
    import tensorflow  # noqa: F401  (the test extra installs it; a missing one must fail)
    folder = tmp_path / "sm"
    folder.mkdir()
    (folder / "saved_model.pb").write_bytes(os.urandom(300))
    env = {k: v for k, v in os.environ.items() if not k.startswith(("TF_CPP", "GLOG", "ABSL"))}
    result = subprocess.run([sys.executable, "-m", "gconv_rewrite", str(folder)], cwd=REPO, capture_output=True,
                            text=True, env=env, timeout=300)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("gconv-rewrite: error:") and "not a loadable SavedModel" in lines[0]


def test_batch_workers_are_silent_too(tmp_path):
    import tensorflow  # noqa: F401  (the test extra installs it; a missing one must fail)
    for name in ("sm1", "sm2"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "saved_model.pb").write_bytes(os.urandom(300))
    env = {k: v for k, v in os.environ.items() if not k.startswith(("TF_CPP", "GLOG", "ABSL"))}
    result = subprocess.run([sys.executable, "-m", "gconv_rewrite", str(tmp_path / "sm1"), str(tmp_path / "sm2"),
                             "--jobs", "2", "--format", "json"], cwd=REPO, capture_output=True, text=True, env=env,
                            timeout=300)
    assert result.returncode == 2
    assert result.stderr.strip() == "", result.stderr
    assert [r["status"] for r in json.loads(result.stdout)["models"]] == ["error", "error"]


def test_a_keras_fuse_with_many_grouped_convs_writes_nothing_to_stderr(tmp_path):
    """Verification runs the fused model eagerly, and Keras compiles each grouped conv anew at every
    eager call: TF's Python logger then warns about retracing after five. Users see none of it."""
    import keras

    inputs = keras.Input((6, 6, 8), name="x")
    y = inputs
    for layer in range(6):  # six hand-made groups, each fused into one Conv2D(groups=2)
        y = keras.layers.Concatenate()([keras.layers.Conv2D(4, 3, padding="same", name=f"c{layer}_{i}")(
            y[..., i * 4:(i + 1) * 4]) for i in range(2)])
    keras.Model(inputs, y).save(tmp_path / "six.keras")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("TF_CPP", "GLOG", "ABSL"))}
    result = subprocess.run([sys.executable, "-m", "gconv_rewrite", str(tmp_path / "six.keras"), "-o",
                             str(tmp_path / "out.keras"), "-q"], cwd=REPO, capture_output=True, text=True, env=env,
                            timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stderr.strip() == "", result.stderr
    assert (tmp_path / "out.keras").exists()


# -- 5. folder outputs (SavedModel) ------------------------------------------------------------------


def _stage_folder(output: Path, marker: str, **kwargs) -> None:
    with formats.atomic_output(output, **kwargs) as staging:
        (staging / output.name).mkdir()
        (staging / output.name / marker).write_text(marker)


def test_folder_output_is_replaced_in_one_step(tmp_path):
    out = tmp_path / "model.fused"
    _stage_folder(out, "old")
    _stage_folder(out, "new")
    assert sorted(p.name for p in out.iterdir()) == ["new"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.fused"]


SET_ASIDE_THEN_KILLED = """
import os, signal, sys
from pathlib import Path
from gconv_rewrite import formats
out = Path(sys.argv[1]).absolute()
formats._exchange = lambda a, b: False  # a system that cannot swap two folders in one step
real_replace = os.replace

def replace(src, dst, *args, **kwargs):
    if Path(dst).absolute() == out:  # the old output is set aside; the new one is not in yet
        os.kill(os.getpid(), signal.SIGKILL)
    return real_replace(src, dst, *args, **kwargs)

os.replace = replace
with formats.atomic_output(out) as staging:
    (staging / out.name).mkdir()
    (staging / out.name / "new").write_text("new")
"""


def test_folder_output_set_aside_by_a_dead_run_is_put_back(tmp_path):
    out = tmp_path / "model.fused"
    _stage_folder(out, "old")
    killed = python(SET_ASIDE_THEN_KILLED, out)
    assert killed.returncode == -9, killed.stderr
    assert not out.exists()  # the instant between the two renames, where only a fallback can be caught
    formats.sweep_staging(out)  # what the next run on that output does first
    assert sorted(p.name for p in out.iterdir()) == ["old"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.fused"]


def test_content_named_data_the_input_reads_is_not_replaced(tmp_path):
    """Fusing a model whose data is already named like the output's data (the same bytes) leaves
    the input's file as it is, not a new file in its place."""
    first = save_external(tmp_path / "m.onnx", seed=1)
    out = tmp_path / "out.onnx"
    assert invoke(first, "-o", out).exit_code == 0
    (data_name,) = referenced(out)
    source = tmp_path / "again.onnx"
    model = onnx.load(str(first), load_external_data=True)
    onnx.save(model, source, save_as_external_data=True, location=data_name, size_threshold=512)
    assert referenced(source) == {data_name}  # the input now reads the output's data file
    inode = (tmp_path / data_name).stat().st_ino
    assert invoke(source, "-o", out, "--force").exit_code == 0
    assert (tmp_path / data_name).stat().st_ino == inode


def test_a_file_output_never_replaces_a_folder(tmp_path):
    source = tmp_path / "m.onnx"
    onnx.save(grouped_block("split"), source)
    folder = tmp_path / "results"
    folder.mkdir()
    (folder / "keep.txt").write_text("mine")
    result = invoke(source, "-o", folder, "--force")
    assert result.exit_code == 2 and "is a folder" in result.output
    assert (folder / "keep.txt").read_text() == "mine"
