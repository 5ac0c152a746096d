"""Progress a CI log shows (issue 24): with stderr a file, a --jobs run writes one whole line per
finished model, counting the models done (not the job's index) with an ETA; a slow model's phases
as they start; --progress auto|always|never."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import onnx
import pytest

from gconv_rewrite import progress
from gconv_rewrite.report import Report
from samples.models import grouped_block

REPO = Path(__file__).resolve().parents[1]
LINE = re.compile(r"^\[(\d+)/3\] (\S+): rewritten \(\d+\.\d s\); (ETA \d+ s|all done in \d+ s)$")


@pytest.fixture
def folder(tmp_path) -> Path:
    root = tmp_path / "models"
    root.mkdir()
    for i, name in enumerate(("a", "b", "c")):
        onnx.save(grouped_block("split", groups=2 * (i + 1), channels=8 * (i + 1), out_channels=8 * (i + 1)),
                  root / f"{name}.onnx")
    return root


def run(*args, tmp_path: Path) -> tuple[subprocess.CompletedProcess, str]:
    """The CLI with stderr redirected to a file, as a CI step's log would be."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    log = tmp_path / "stderr.log"
    with log.open("w") as stderr:
        done = subprocess.run([sys.executable, "-m", "gconv_rewrite", *map(str, args)], cwd=REPO, env=env,
                              stdout=subprocess.PIPE, stderr=stderr, text=True, timeout=300)
    return done, log.read_text()


def test_jobs_run_with_stderr_in_a_file_shows_one_line_per_finished_model(folder, tmp_path):
    done, log = run(folder, "--jobs", "2", "-o", tmp_path / "out", tmp_path=tmp_path)
    assert done.returncode == 0, log
    lines = log.splitlines()
    assert len(lines) == 3, log
    matches = [LINE.match(line) for line in lines]
    assert all(matches), log
    assert [int(m.group(1)) for m in matches] == [1, 2, 3]  # models done, in the order they finished
    assert sorted(Path(m.group(2)).name for m in matches) == ["a.onnx", "b.onnx", "c.onnx"]
    assert [m.group(3).split()[0] for m in matches] == ["ETA", "ETA", "all"]
    assert "\r" not in log and "\x1b" not in log  # whole lines, no redraws


@pytest.mark.parametrize("flags", [["--progress", "never"], ["-q"], ["--format", "json"]])
def test_progress_off(folder, tmp_path, flags):
    done, log = run(folder, "--check", *flags, tmp_path=tmp_path)
    assert done.returncode == 1
    assert log == ""


def test_progress_always_under_json(folder, tmp_path):
    done, log = run(folder, "--check", "--format", "json", "--progress", "always", tmp_path=tmp_path)
    assert done.returncode == 1
    assert len(log.splitlines()) == 3 and log.startswith("[1/3] ")
    assert done.stdout.lstrip().startswith("{")  # stdout: the JSON document only


def test_enabled():
    assert progress.enabled("auto", tty=False, quiet=False, as_json=False)
    assert not progress.enabled("auto", tty=False, quiet=False, as_json=True)
    assert progress.enabled("auto", tty=True, quiet=False, as_json=True)
    assert not progress.enabled("auto", tty=True, quiet=True, as_json=False)
    assert progress.enabled("always", tty=False, quiet=True, as_json=True)
    assert not progress.enabled("never", tty=True, quiet=False, as_json=False)


class Clock:
    def __init__(self):
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_phases_are_announced_as_they_start_once_the_model_is_slow(monkeypatch):
    clock = Clock()
    monkeypatch.setattr(progress.time, "perf_counter", clock)
    said: list[str] = []
    phases = progress.Phases(said.append, "m.keras")
    phases.started("load")  # at 0 s: a fast run says nothing
    clock.now += 28.0
    phases("load", 28.0)
    phases.started("rewrite")
    clock.now += 0.5
    phases("rewrite", 28.5)
    phases.started("verify")
    clock.now += 35.0
    phases("verify", 63.5)
    assert said == ["  m.keras: load done (28.0 s)", "  m.keras: rewrite … (28.0 s)",
                    "  m.keras: verify … (28.5 s)", "  m.keras: verify done (35.0 s)"]
    phases.started("load")  # the next model of a batch: its clock starts again
    clock.now += 0.5
    phases("load", 0.5)
    phases.started("rewrite")
    assert len(said) == 4


def test_report_timed_tells_a_listener_when_a_phase_starts():
    heard: list[tuple] = []

    class Listener:
        def started(self, phase):
            heard.append(("start", phase))

        def __call__(self, phase, seconds):
            heard.append(("end", phase))

    report = Report(input="m", mode="fuse")
    report.on_phase = Listener()
    with report.timed("load"):
        heard.append(("inside",))
    assert heard == [("start", "load"), ("inside",), ("end", "load")]
    plain = Report(input="m", mode="fuse")
    plain.on_phase = lambda phase, seconds: heard.append(("plain", phase))  # a bare callable still works
    with plain.timed("save"):
        pass
    assert heard[-1] == ("plain", "save")


def test_finished_counts_and_estimates(monkeypatch):
    clock = Clock()
    monkeypatch.setattr(progress.time, "perf_counter", clock)
    said: list[str] = []
    finished = progress.Finished(said.append, 4)
    clock.now += 10
    finished("b.onnx", "rewritten", 9.5)
    clock.now += 110
    finished("a.onnx", "error", 1.0)
    assert said == ["[1/4] b.onnx: rewritten (9.5 s); ETA 30 s", "[2/4] a.onnx: error (1.0 s); ETA 2 min 00 s"]
