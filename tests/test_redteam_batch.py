"""Second red team (issue 22, items 1, 2, 9, 10, 11, 12): signals in ``--jobs`` runs, folder walks,
configuration files.

Each test reproduces what the red team did and pins what the tool does now: Ctrl-C or SIGTERM
during a ``--jobs`` run dispatches nothing more and writes nothing not complete; workers die with
a killed parent and write nothing after it; a folder walked again skips the tool's own outputs and
output folder; a config file is one regular, bounded TOML file whose errors are one line, whose
paths stay inside its folder, and whose ``report`` a ``--check`` does not write.

The signal tests run the CLI in its own session (``start_new_session``) with a ``sitecustomize``
hook that holds every model in its staging folder, just before the commit, for a long time: the
signal then provably lands while models are staged, whatever the load of the machine.
"""

from __future__ import annotations

import json
import os
import resource
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import onnx
import pytest

from gconv_rewrite import batch, workers
from samples.models import grouped_block
from tests.helpers import invoke, run_onnx

REPO = Path(__file__).resolve().parents[1]
X = np.random.default_rng(11).standard_normal((1, 16, 8, 8)).astype(np.float32)
HOLD_SECONDS = 90  # how long each model waits, staged, before its commit: far longer than the test
WAIT_SECONDS = 240  # for the workers to start and stage (a loaded 2-core machine is slow)


def run_ort(path: Path) -> np.ndarray:
    return run_onnx(path, {"x": X})[0]


def grouped_convs(path: Path) -> list[int]:
    """The ``group`` of every Conv in the file."""
    return [next((a.i for a in n.attribute if a.name == "group"), 1)
            for n in onnx.load(str(path)).graph.node if n.op_type == "Conv"]


def assert_fused_and_equal(source: Path, written: Path) -> None:
    assert grouped_convs(source) == [1, 1, 1, 1] and grouped_convs(written) == [4]
    np.testing.assert_allclose(run_ort(written), run_ort(source), rtol=1e-4, atol=1e-5)


# -- 1, 2. signals during --jobs ---------------------------------------------------------------------

HOLD_SITECUSTOMIZE = """
import contextlib
import os
import time

if os.environ.get("GCONV_TEST_MARKS"):
    import gconv_rewrite.api as api
    import gconv_rewrite.formats as formats

    marks = os.environ["GCONV_TEST_MARKS"]
    real_rewrite, real_atomic_output = api.rewrite, formats.atomic_output

    def mark(what, name):
        open(os.path.join(marks, f"{what}-{name}-{os.getpid()}"), "w").close()

    def rewrite(model, *args, **kwargs):
        mark("started", os.path.basename(str(model)))
        return real_rewrite(model, *args, **kwargs)

    @contextlib.contextmanager
    def atomic_output(output, **kwargs):
        with real_atomic_output(output, **kwargs) as staging:
            yield staging
            mark("staged", output.name)  # saved and verified: the commit comes next
            time.sleep(float(os.environ["GCONV_TEST_HOLD_SECONDS"]))

    api.rewrite, formats.atomic_output = rewrite, atomic_output
"""


class Batch:
    """``gconv-rewrite a.onnx b.onnx c.onnx d.onnx --jobs 2 -o out`` in a session of its own,
    every model held ``HOLD_SECONDS`` in staging before its commit."""

    def __init__(self, tmp_path: Path):
        hook, self.marks, self.out = tmp_path / "hook", tmp_path / "marks", tmp_path / "out"
        hook.mkdir()
        self.marks.mkdir()
        (hook / "sitecustomize.py").write_text(textwrap.dedent(HOLD_SITECUSTOMIZE))
        self.models = []
        for i, name in enumerate(["a.onnx", "b.onnx", "c.onnx", "d.onnx"]):
            onnx.save(grouped_block("split", seed=i), tmp_path / name)
            self.models.append(tmp_path / name)
        env = {**os.environ, "GCONV_TEST_MARKS": str(self.marks), "GCONV_TEST_HOLD_SECONDS": str(HOLD_SECONDS),
               "PYTHONPATH": os.pathsep.join([str(hook), str(REPO), os.environ.get("PYTHONPATH", "")])}
        self.process = subprocess.Popen([sys.executable, "-m", "gconv_rewrite", *map(str, self.models), "--jobs", "2",
                                         "-o", str(self.out), "-q"], cwd=REPO, env=env, text=True,
                                        stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True)

    def marked(self, what: str) -> dict[str, int]:
        """Model name → pid of the process that marked it ``what`` (started, staged)."""
        found = {}
        for mark in self.marks.iterdir():
            kind, rest = mark.name.split("-", 1)
            if kind == what:
                name, pid = rest.rsplit("-", 1)
                found[name] = int(pid)
        return found

    def wait_until_two_staged(self) -> dict[str, int]:
        assert wait_for(lambda: len(self.marked("staged")) >= 2 or self.process.poll() is not None, WAIT_SECONDS)
        assert self.process.poll() is None, self.process.communicate()
        return self.marked("staged")

    def written(self) -> list[str]:
        """Everything under the output folder (models, staging leftovers), as relative paths."""
        return sorted(p.relative_to(self.out).as_posix() for p in self.out.rglob("*")) if self.out.exists() else []

    def clean_up(self) -> None:
        """Whatever a failing test left running: the run's session, and its workers by pid."""
        for pid in [self.process.pid]:
            try:
                os.killpg(pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
        for pid in self.marked("started").values():
            if alive(pid):
                os.kill(pid, signal.SIGKILL)
        if self.process.poll() is None:
            self.process.kill()
        self.process.communicate()


def wait_for(condition, seconds: float) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.2)
    return condition()


def alive(pid: int) -> bool:
    """Whether ``pid`` runs (a zombie, dead but not yet reaped by init, does not)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        return state not in ("Z", "X")
    except (FileNotFoundError, ProcessLookupError):
        return False
    except OSError:  # no /proc: ask the kernel
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        return True


def pid_exists(pid: int) -> bool:
    """Whether ``pid`` still exists, running or as a zombie."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


@pytest.fixture
def held_batch(tmp_path):
    run = Batch(tmp_path)
    try:
        yield run
    finally:
        run.clean_up()


@pytest.mark.parametrize("to", ["process group", "main process"])
def test_ctrl_c_during_jobs_stops_at_once_and_writes_nothing(held_batch, to):
    staged = held_batch.wait_until_two_staged()
    signalled = time.monotonic()
    if to == "process group":
        os.killpg(held_batch.process.pid, signal.SIGINT)  # what Ctrl-C in a terminal does
    else:
        os.kill(held_batch.process.pid, signal.SIGINT)
    stdout, stderr = held_batch.process.communicate(timeout=120)
    assert held_batch.process.returncode == 130, stderr
    assert time.monotonic() - signalled < HOLD_SECONDS / 2  # it did not wait for the staged models
    assert stderr.strip().splitlines() == ["gconv-rewrite: interrupted; outputs not yet complete were not written"]
    assert held_batch.written() == []  # nothing committed, and no staging folder left behind
    assert sorted(held_batch.marked("started")) == sorted(staged)  # the other two were never started
    assert wait_for(lambda: not any(alive(pid) for pid in staged.values()), 30)


def test_sigterm_to_the_main_process_stops_the_workers_and_writes_nothing(held_batch):
    staged = held_batch.wait_until_two_staged()
    os.kill(held_batch.process.pid, signal.SIGTERM)  # a CI runner's timeout
    stdout, stderr = held_batch.process.communicate(timeout=120)
    assert held_batch.process.returncode == 128 + signal.SIGTERM, stderr
    assert stderr.strip().splitlines() == ["gconv-rewrite: stopped by SIGTERM; outputs not yet complete were "
                                           "not written"]
    assert wait_for(lambda: not any(alive(pid) for pid in staged.values()), 30)
    assert held_batch.written() == []
    assert sorted(held_batch.marked("started")) == sorted(staged)


def test_workers_die_with_a_killed_main_process_and_write_nothing(held_batch, tmp_path):
    staged = held_batch.wait_until_two_staged()
    os.kill(held_batch.process.pid, signal.SIGKILL)  # no handler runs: the kernel must end the workers
    held_batch.process.communicate(timeout=60)
    assert wait_for(lambda: not any(alive(pid) for pid in staged.values()), 30), "orphaned workers still run"
    assert [p for p in held_batch.written() if not p.startswith(".")] == []  # no model committed
    assert sorted(held_batch.marked("started")) == sorted(staged)
    # What a killed worker left (its staging folder) the next run writing that output sweeps,
    # once the worker is reaped (a zombie's pid still answers).
    assert wait_for(lambda: not any(pid_exists(pid) for pid in staged.values()), 30)
    assert invoke(held_batch.models[0], "-o", held_batch.out / "a.onnx", "-q").exit_code == 0
    assert [p for p in held_batch.written() if "a.onnx" in p] == ["a.onnx"]
    assert_fused_and_equal(held_batch.models[0], held_batch.out / "a.onnx")


def test_an_orphaned_worker_stops_before_it_commits(tmp_path):
    """The check a worker makes after each phase (the last right before the commit): a parent
    other than the run's main process stops it, by ``SystemExit`` (no traceback)."""
    workers.check_parent(os.getppid())  # its parent: goes on
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    with pytest.raises(workers.WorkerStop) as stop:
        workers.check_parent(child.pid)  # a parent that is gone
    assert isinstance(stop.value, SystemExit) and stop.value.code == 128 + signal.SIGTERM


def test_a_plain_jobs_run_still_writes_every_model(tmp_path):
    """The signal handling changes nothing when no signal comes: four models, two workers."""
    models = []
    for i, name in enumerate(["a.onnx", "b.onnx", "c.onnx", "d.onnx"]):
        onnx.save(grouped_block("split", seed=i), tmp_path / name)
        models.append(tmp_path / name)
    result = invoke(*models, "--jobs", "2", "-o", tmp_path / "out", "--format", "json")
    assert result.exit_code == 0, result.output
    assert [r["status"] for r in json.loads(result.stdout)["models"]] == ["rewritten"] * 4
    for model in models:
        assert_fused_and_equal(model, tmp_path / "out" / model.name)


# -- 9. a folder walked again skips the tool's own outputs ---------------------------------------------


@pytest.fixture
def models_dir(tmp_path) -> Path:
    folder = tmp_path / "models"
    folder.mkdir()
    onnx.save(grouped_block("split"), folder / "m.onnx")
    return folder


def walked(result) -> list[str]:
    return [Path(row["input"]).name for row in json.loads(result.stdout)["models"]]


def test_a_target_folder_run_does_not_reprocess_its_outputs(models_dir):
    first = invoke(models_dir, "--target", "onnxruntime-cpu", "--format", "json")
    assert first.exit_code == 0 and walked(first) == ["m.onnx"]
    written = models_dir / "m.onnxruntime-cpu.onnx"
    assert_fused_and_equal(models_dir / "m.onnx", written)
    again = invoke(models_dir, "--target", "onnxruntime-cpu", "--force", "--format", "json")
    assert again.exit_code == 0 and walked(again) == ["m.onnx"]
    assert sorted(p.name for p in models_dir.iterdir()) == ["m.onnx", "m.onnxruntime-cpu.onnx"]
    assert_fused_and_equal(models_dir / "m.onnx", written)


def test_a_mirror_folder_inside_the_input_folder_does_not_nest(models_dir):
    out = models_dir / "out"
    for flags in ([], ["--force"]):
        result = invoke(models_dir, "-o", out, *flags, "--format", "json")
        assert result.exit_code == 0 and walked(result) == ["m.onnx"], result.output
    assert sorted(p.relative_to(models_dir).as_posix() for p in models_dir.rglob("*")) == \
        ["m.onnx", "out", "out/m.onnx"]
    assert_fused_and_equal(models_dir / "m.onnx", out / "m.onnx")


def test_a_walk_skips_written_savedmodels_and_another_runs_staging(models_dir):
    fused_savedmodel = models_dir / "sm.fused"  # what `gconv-rewrite sm` writes beside sm/
    fused_savedmodel.mkdir()
    (fused_savedmodel / "saved_model.pb").write_bytes(b"not read")
    staging = models_dir / ".m.onnx.gconv-12345-0123456789abcdef.tmp"  # a concurrent run's, mid-commit
    staging.mkdir()
    onnx.save(grouped_block("split", seed=3), staging / "m.onnx")
    result = invoke(models_dir, "--check", "--format", "json")
    assert result.exit_code == 1 and walked(result) == ["m.onnx"], result.output
    assert json.loads(result.stdout)["models"][0]["status"] == "would-rewrite"


@pytest.mark.parametrize("name, ours", [
    ("m.fused.onnx", True), ("m.expanded.keras", True), ("m.auto.onnx", True), ("m.tflite-gpu.onnx", True),
    ("m.onnxruntime-cpu.keras", True), ("sm.fused", True), (".m.onnx.gconv.lock", True),
    ("m.onnx", False), ("resnet.v2.onnx", False), ("fused.onnx", False), ("sm", False), ("m.fusedx.onnx", False),
])
def test_the_names_the_tool_writes(name, ours):
    assert batch.is_own_output(name) is ours


# -- 10. a bad config file is one line, exit 2 -------------------------------------------------------


def one_error_line(result) -> str:
    assert result.exit_code == 2, result.output
    assert result.stdout == ""
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("gconv-rewrite: error: "), result.stderr
    return lines[0]


@pytest.mark.parametrize("text, says", [
    ('[tool.gconv-rewrite\nrtol = 1\n', "not valid TOML"),
    ('[tool.gconv-rewrite]\nrtoll = 1\n', "unknown setting 'rtoll'"),
    ('[tool.gconv-rewrite]\natol = "small"\n', "atol = 'small'"),
    ('[tool.gconv-rewrite]\njobs = 0\n', "jobs = 0"),
    ('[tool.gconv-rewrite]\nformat = "xml"\n', "format = 'xml'"),
    ('[tool]\ngconv-rewrite = 3\n', "must be a table"),
    ('tool = 3\n', "'tool' must be a table"),
    ('[tool.gconv-rewrite]\nexpand = "yes"\n', "only `expand = true`"),
])
def test_a_bad_pyproject_is_one_line_exit_2(models_dir, tmp_path, monkeypatch, text, says):
    project = tmp_path / "project"
    project.mkdir()
    (project / "pyproject.toml").write_text(text)
    monkeypatch.chdir(project)
    line = one_error_line(invoke(models_dir / "m.onnx", "--check"))
    assert line.startswith("gconv-rewrite: error: pyproject.toml: ") and says in line


def test_a_config_flag_sets_the_mode(models_dir, tmp_path):
    config = tmp_path / "gconv.toml"
    config.write_text("expand = true\n")
    result = invoke(models_dir / "m.onnx", "--config", config, "--check")
    assert result.exit_code == 0 and "check: 0 expandable convolutions found" in result.stdout


# -- 11. paths from a config stay inside its folder; --check writes only the asked report --------------


@pytest.fixture
def repository(tmp_path, monkeypatch) -> Path:
    """A repository with a model, beside a home folder with a .bashrc; the run starts in the repository."""
    home = tmp_path / "home"
    home.mkdir()
    (home / ".bashrc").write_text("export PATH=$PATH:~/bin\n")
    repo = tmp_path / "repo"
    repo.mkdir()
    onnx.save(grouped_block("split"), repo / "model.onnx")
    monkeypatch.chdir(repo)
    return repo


@pytest.mark.parametrize("value", ["../home/.bashrc", "{home}/.bashrc", "linked/.bashrc"])
def test_a_config_report_outside_its_folder_is_refused(repository, value):
    (repository / "linked").symlink_to(repository.parent / "home")
    value = value.format(home=repository.parent / "home")
    (repository / "pyproject.toml").write_text(f'[tool.gconv-rewrite]\nreport = "{value}"\n')
    for flags in (["--check"], ["-o", "fused.onnx"]):
        line = one_error_line(invoke("model.onnx", *flags))
        assert "report" in line and "outside the config's folder" in line
    assert (repository.parent / "home" / ".bashrc").read_text() == "export PATH=$PATH:~/bin\n"
    assert not (repository / "fused.onnx").exists()


def test_check_writes_a_report_only_where_the_command_line_asks(repository):
    (repository / "pyproject.toml").write_text('[tool.gconv-rewrite]\nreport = "from-config.json"\n')
    assert invoke("model.onnx", "--check").exit_code == 1
    assert invoke("model.onnx", "--dry-run").exit_code == 0
    assert not (repository / "from-config.json").exists()
    assert invoke("model.onnx", "--check", "--report", "asked.json").exit_code == 1
    assert json.loads((repository / "asked.json").read_text())["models"][0]["report"]["rewrites"][0]["kind"] == "fuse-split-conv"
    # A run that writes the model writes the config's report too.
    assert invoke("model.onnx", "-o", "fused.onnx").exit_code == 0
    assert json.loads((repository / "from-config.json").read_text())["models"][0]["report"]["verification"]["passed"] is True
    assert_fused_and_equal(repository / "model.onnx", repository / "fused.onnx")


def test_config_paths_are_relative_to_the_configs_folder(repository):
    settings = repository / "settings"
    settings.mkdir()
    (settings / "gconv.toml").write_text('report = "reports/run.json"\n')
    (settings / "reports").mkdir()
    assert invoke("model.onnx", "--config", "settings/gconv.toml", "-o", "fused.onnx").exit_code == 0
    assert (settings / "reports" / "run.json").is_file() and not (repository / "reports").exists()
    assert_fused_and_equal(repository / "model.onnx", repository / "fused.onnx")


# -- 12. a config file is a regular file of bounded size ----------------------------------------------


def run_cli(*args, timeout: float = 120) -> subprocess.CompletedProcess:
    """The CLI in a process whose address space is capped at 4 GiB: reading an endless file
    fails fast there instead of taking the machine's memory."""
    def cap_memory():
        resource.setrlimit(resource.RLIMIT_AS, (4 << 30, 4 << 30))

    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    return subprocess.run([sys.executable, "-m", "gconv_rewrite", *map(str, args)], cwd=REPO, env=env, text=True,
                          capture_output=True, timeout=timeout, preexec_fn=cap_memory)


@pytest.mark.parametrize("special", ["/dev/zero", "fifo", "folder"])
def test_a_config_that_is_not_a_regular_file_is_refused(models_dir, tmp_path, special):
    if special == "fifo":
        config = tmp_path / "gconv.toml"
        os.mkfifo(config)  # nobody writes: a blocking read would wait forever
    elif special == "folder":
        config = tmp_path / "conf.d"
        config.mkdir()
    else:
        config = Path(special)
    result = run_cli(models_dir / "m.onnx", "--config", config, "--check", timeout=60)
    assert result.returncode == 2, result.stderr
    assert result.stderr.strip().splitlines() == [f"gconv-rewrite: error: {config}: not a regular file; a config "
                                                  "file must be a TOML file"]


def test_a_huge_config_file_is_refused(models_dir, tmp_path):
    config = tmp_path / "gconv.toml"
    config.write_text("# padding\n" * 200_000 + "atol = 0.5\n")  # 2 MB of valid TOML
    line = one_error_line(invoke(models_dir / "m.onnx", "--config", config, "--check"))
    assert "larger than 1 MiB" in line


def test_a_pyproject_that_is_a_device_is_refused(models_dir, tmp_path, monkeypatch):
    project = tmp_path / "project"
    project.mkdir()
    (project / "pyproject.toml").symlink_to("/dev/zero")
    monkeypatch.chdir(project)
    line = one_error_line(invoke(models_dir / "m.onnx", "--check"))
    assert line == "gconv-rewrite: error: pyproject.toml: not a regular file; a config file must be a TOML file"
